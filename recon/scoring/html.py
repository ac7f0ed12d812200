"""HTML of score runs: ``report.html`` (leaderboard, paired tests, correlations with scatter plots, per-item
rows, failures) and a standalone ``leaderboard.html``.

Built from the pieces of :mod:`recon.report` (style, escaping, embedded thumbnails), so a score report looks and
escapes like every other recon report: captions are model output or user input, and every value from a record
is HTML-escaped.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from recon.config import metric_direction
from recon.data import atomic_write_text
from recon.report import CSS, Images, config_text, esc, gallery, write_gallery_rows
from recon.report import script as report_script
from recon.scoring.tables import (
    corpus_names,
    estimate_cell,
    fmt_corr,
    fmt_estimate,
    metric_label,
    paired_cell,
    system_of,
    truncation_cell,
)


def _page(title: str, parts: Sequence[str], with_script: bool = False) -> str:
    script = f"\n<script>{report_script()}</script>" if with_script else ""
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + f"{script}\n</body></html>\n"
    )


def leaderboard_html(board: Mapping) -> str:
    systems, metrics = board["systems"], board["metrics"]
    head = "<tr><th>metric (better)</th>" + "".join(f"<th>{esc(s)}</th>" for s in systems) + "</tr>"
    rows = [
        "<tr><td>items ok / failed</td>"
        + "".join(
            f"<td class='num'>{board['counts'][s]['ok']} / {board['counts'][s]['failed']}</td>"
            for s in systems
        )
        + "</tr>",
        "<tr><td>n truncated (captions past a text encoder's context)</td>"
        + "".join(
            f"<td class='num'>{esc(truncation_cell((board.get('truncated') or {}).get(s)))}</td>"
            for s in systems
        )
        + "</tr>",
    ]
    corpus = board.get("corpus") or {}
    for name in corpus_names(corpus):
        rows.append(
            f"<tr><td><b>{name} (corpus)</b> (higher)</td>"
            + "".join(
                f"<td class='num'><b>{esc(fmt_estimate(corpus[s][name]))}</b></td>"
                if name in corpus.get(s, {})
                else "<td>–</td>"
                for s in systems
            )
            + "</tr>"
        )
    for m in metrics:
        rows.append(
            f"<tr><td>{esc(metric_label(m, corpus))} ({metric_direction(m)})</td>"
            + "".join(f"<td class='num'>{esc(estimate_cell(board, s, m))}</td>" for s in systems)
            + "</tr>"
        )
    parts = [
        f"<h2>Leaderboard</h2><p class='muted'>Mean of per-image scores with a "
        f"{round(100 * board['confidence'])}% percentile bootstrap CI ({board['n_resamples']} resamples of the "
        f"images); systems ordered by <code>{esc(board['primary'])}</code>. Bold corpus BLEU / METEOR rows: "
        "pycocoevalcap's corpus scores, their CI recomputing the corpus score per resample of images.</p>",
        f"<table>{head}{''.join(rows)}</table>",
    ]
    if board["paired"]:
        pairs = list(dict.fromkeys((p["a"], p["b"]) for p in board["paired"]))
        cell = {(p["a"], p["b"], p["metric"]): p for p in board["paired"]}
        head = "<tr><th>metric</th>" + "".join(f"<th>{esc(a)} − {esc(b)}</th>" for a, b in pairs) + "</tr>"
        rows = []
        for m in metrics:
            tds = []
            for a, b in pairs:
                text = esc(paired_cell(cell[(a, b, m)], sep="\n", holm="Holm ")).replace("\n", "<br>")
                tds.append(f"<td class='num'>{text}</td>")
            rows.append(f"<tr><td>{esc(m)}</td>{''.join(tds)}</tr>")
        parts += [
            "<h3>Paired differences (A − B on the images both scored)</h3><p class='muted'>Mean difference "
            "[bootstrap CI]; two-sided paired permutation p-value, Holm-adjusted over the table.</p>",
            f"<table>{head}{''.join(rows)}</table>",
        ]
    return "\n".join(parts)


def _scatter(records: Sequence[dict], x_metric: str, y_metric: str, rho: Mapping | None) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0, 3.0), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    systems = list(dict.fromkeys(system_of(r) for r in records))
    for s in systems:
        pts = [
            (r["scores"][x_metric], r["scores"][y_metric])
            for r in records
            if system_of(r) == s and x_metric in r["scores"] and y_metric in r["scores"]
        ]
        if pts:
            ax.scatter(*zip(*pts), s=8, alpha=0.6, label=s[:24])
    if 1 < len(systems) <= 8:
        ax.legend(fontsize=6)
    title = f"Spearman ρ = {rho['r']:.3f}" if rho and rho.get("r") is not None else "Spearman ρ undefined"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(x_metric, fontsize=8)
    ax.set_ylabel(y_metric, fontsize=8)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    alt = f"{y_metric} against {x_metric}, one point per caption"
    return f'<figure><img src="{uri}" alt="{esc(alt)}"><figcaption>{esc(alt)}</figcaption></figure>'


def analysis_html(records: Sequence[dict], res: Mapping) -> str:
    rm = res["recon_metric"]
    ok = [r for r in records if r.get("status") == "ok" and isinstance(r.get("scores"), Mapping)]
    sections = [("per caption, all systems pooled", res["item"])]
    sections += [(f"per caption, system {s}", res["per_system"][s]) for s in res["systems"]]
    sections.append((f"per system (means of {len(res['systems'])} systems)", res["system"]))
    parts = [
        f"<h2>Correlation with {esc(rm)}</h2><p class='muted'>Rank correlations, "
        f"{round(100 * res['confidence'])}% bootstrap CI in brackets; {esc(rm)} is "
        f"{metric_direction(rm)}-is-better.</p>"
    ]
    for title, table in sections:
        rows = "".join(
            f"<tr><td>{esc(m)}</td><td class='num'>{esc(fmt_corr(table[m]['spearman']))}</td>"
            f"<td class='num'>{esc(fmt_corr(table[m]['kendall']))}</td></tr>"
            for m in res["metrics"]
        )
        parts.append(
            f"<h3>{esc(title)}</h3><table><tr><th>metric</th><th>Spearman ρ</th><th>Kendall τ</th></tr>"
            f"{rows}</table>"
        )
    plots = [_scatter(ok, m, rm, res["item"][m]["spearman"]) for m in res["metrics"]]
    if plots:
        parts.append(f"<div class='row'>{''.join(plots)}</div>")
    return "\n".join(parts)


def write_score_report(
    run_dir: str | Path,
    records: Sequence[dict],
    config,
    board: Mapping,
    notes: Sequence[str] = (),
    analysis: Mapping | None = None,
    max_items: int | None = None,
    title: str = "recon score report",
) -> Path:
    """Write ``report.html`` and ``leaderboard.html`` into ``run_dir``; returns the report's path."""
    run_dir = Path(run_dir)
    max_items = max_items or getattr(getattr(config, "run", None), "max_report_items", 200)
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    board_html = leaderboard_html(board)
    atomic_write_text(run_dir / "leaderboard.html", _page("recon leaderboard", [board_html]))
    parts = [
        f"<h1>{esc(title)}</h1>",
        f"<p>run directory <code>{esc(run_dir.resolve().name)}</code>: {len(records)} records, {len(ok)} ok, "
        f"{len(failed)} failed; {len(board['systems'])} caption set(s). The leaderboard alone: "
        "<a href='leaderboard.html'>leaderboard.html</a>.</p>",
    ]
    if notes:
        parts.append("<ul class='warnings'>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    shown_config = config_text(run_dir, config)
    if shown_config is not None:
        parts.append(f"<details><summary>config</summary><pre>{esc(shown_config)}</pre></details>")
    parts.append(board_html)
    if analysis:
        parts.append(analysis_html(records, analysis))
    items = gallery(list(records), Images(run_dir, 128), max_items, select=board.get("primary"))
    parts.append(items.html)
    if failed:
        rows = "".join(
            f"<tr><td>{esc(r.get('id', '?'))}</td><td>{esc(r.get('error', r.get('status')))}</td></tr>"
            for r in failed[:max_items]
        )
        more = f"<p class='muted'>and {len(failed) - max_items} more.</p>" if len(failed) > max_items else ""
        parts.append(f"<h2>Failed items</h2><table><tr><th>id</th><th>error</th></tr>{rows}</table>{more}")
    write_gallery_rows(run_dir, items)
    return atomic_write_text(run_dir / "report.html", _page(title, parts, with_script=True))
