"""The pages of ``recon metaeval``: ``metaeval.md`` and ``metaeval.html`` (leaderboard, per-set tables, paired
comparisons). Every name, file name and note is escaped (HTML, and markdown table cells)."""

from __future__ import annotations

import html

import numpy as np

from recon.scoring.metaeval_formats import FORMAT

STAT_TEXT = {
    "kendall_tau_c": "Kendall τ_c with the human ratings",
    "kendall_tau_b": "Kendall τ_b with the human ratings",
    "accuracy": "pairwise accuracy (the human-preferred caption scores higher; a tie is ½)",
}


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _est(e: dict | None) -> str:
    if not e or e.get("value") is None:
        return "–"
    return f"{_f(e['value'])} [{_f(e['low'])}, {_f(e['high'])}]"


def _pval(p) -> str:
    return "–" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _unit(s: dict) -> str:
    return "pairs" if FORMAT[s["format"]].pairs else "judgments"


def _set_tables(s: dict) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(header, rows) of a set's leaderboard and of its paired comparisons (leader and each recon_* metric
    against every other metric); plain text, escaped by the writers."""
    pairs = _unit(s) == "pairs"
    groups = ["all", *s["categories"]] if pairs and len(s["categories"]) > 1 else ["all"] if pairs else []
    head = ["rank", "metric"] + ([f"accuracy: {g}" for g in groups] if pairs else [s["statistic"], "n"])
    rows = []
    for rank, m in enumerate(s["order"], 1):
        r = s["rows"][m]
        rows.append([str(rank), m] + ([_est(r.get(g)) for g in groups] if pairs else [_est(r), str(r["n"])]))
    focus = (
        [s["order"][0]] + [m for m in s["order"] if m.startswith("recon_") and m != s["order"][0]]
        if s["order"]
        else []
    )
    by_pair = {(p["a"], p["b"]): (p, 1) for p in s["paired"]} | {
        (p["b"], p["a"]): (p, -1) for p in s["paired"]
    }
    phead = ["A", "B", "A − B [95% CI]", "p", "p (Holm)"]
    prows, seen = [], set()
    for a in focus:
        for b in s["order"]:
            if b == a or frozenset((a, b)) in seen:
                continue
            seen.add(frozenset((a, b)))
            p, sgn = by_pair[(a, b)]
            d = None if p["diff"] is None else sgn * p["diff"]
            lo, hi = (
                (p["low"], p["high"])
                if sgn == 1
                else (None if p["high"] is None else -p["high"], None if p["low"] is None else -p["low"])
            )
            prows.append([a, b, f"{_f(d)} [{_f(lo)}, {_f(hi)}]", _pval(p["p_value"]), _pval(p["p_holm"])])
    return head, rows, phead, prows


TEXT_SIDE = (
    "clipscore",
    "refclipscore",
)  # the cheaper signals each recon_* metric is compared with per category


def _category_table(s: dict) -> tuple[list[str], list[list[str]]]:
    """Per category, each recon_* metric minus each text-side CLIP score, with its CI (empty without categories)."""
    by_cat = s.get("paired_by_category") or {}
    if not by_cat:
        return [], []
    cats = [c for c in s["categories"] if c in by_cat]
    rows = []
    for a in [m for m in s["order"] if m.startswith("recon_")]:
        for b in [m for m in TEXT_SIDE if m in s["order"]]:
            row = [a, b]
            for c in cats:
                hit = [(p, 1) for p in by_cat[c] if (p["a"], p["b"]) == (a, b)] + [
                    (p, -1) for p in by_cat[c] if (p["a"], p["b"]) == (b, a)
                ]
                p, sgn = hit[0]
                lo, hi = (
                    (p["low"], p["high"])
                    if sgn == 1
                    else (None if p["high"] is None else -p["high"], None if p["low"] is None else -p["low"])
                )
                row.append(f"{_f(None if p['diff'] is None else sgn * p['diff'])} [{_f(lo)}, {_f(hi)}]")
            rows.append(row)
    return ["A", "B", *[f"A − B: {c}" for c in cats]], rows


def _summary(result: dict) -> tuple[list[str], list[list[str]]]:
    sets = list(result["sets"])
    metrics = list(dict.fromkeys(m for s in result["sets"].values() for m in s["order"]))
    ranks = {
        m: np.mean([s["order"].index(m) for s in result["sets"].values() if m in s["order"]]) for m in metrics
    }
    head = ["metric"] + [f"{k} ({result['sets'][k]['statistic']})" for k in sets]
    rows = [
        [m]
        + [
            _est(result["sets"][k]["rows"][m].get("all", result["sets"][k]["rows"][m]))
            if m in result["sets"][k]["rows"]
            else "–"
            for k in sets
        ]
        for m in sorted(metrics, key=lambda m: ranks[m])
    ]
    return head, rows


def _md(text) -> str:
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def metaeval_markdown(result: dict) -> str:
    def table(head, rows, names=(0,)):  # only names (metrics) are text; the other cells are numbers we format
        return [
            "| " + " | ".join(_md(h) for h in head) + " |",
            "|" + "---|" * len(head),
            *["| " + " | ".join(_md(c) if i in names else c for i, c in enumerate(r)) + " |" for r in rows],
            "",
        ]

    lines = [
        "# Meta-evaluation: agreement of caption metrics with judgments",
        "",
        f"Preset `{_md(result['config'])}`, seed {result['seed']}; {round(100 * result['confidence'])}% "
        f"bootstrap CIs over images ({result['n_resamples']} resamples). Metrics are ordered by average rank.",
        "",
        "## Leaderboard",
        "",
        *table(*_summary(result)),
    ]
    for name, s in result["sets"].items():
        head, rows, phead, prows = _set_tables(s)
        lines += [
            f"## {_md(name)}: {_md(STAT_TEXT[s['statistic']])}",
            "",
            f"Files: {', '.join(f'`{_md(f)}`' for f in s['files'])}; {s['n']} {_unit(s)} on "
            f"{s['n_images']} images.",
            "",
            *table(head, rows, (1,)),
            "Paired differences (bootstrap CI; p two-sided, Holm-adjusted over the set's comparisons):",
            "",
            *table(phead, prows, (0, 1)),
        ]
        if (cat := _category_table(s))[1]:
            lines += [
                "Per category, reconstruction minus text-side score (bootstrap CI over images):",
                "",
                *table(*cat, (0, 1)),
            ]
        if s["notes"]:
            lines += ["Notes:", *[f"- {_md(n)}" for n in s["notes"]], ""]
    if result["notes"]:
        lines += ["## Notes", "", *[f"- {_md(n)}" for n in result["notes"]], ""]
    return "\n".join(lines)


def metaeval_html(result: dict) -> str:
    esc = html.escape

    def table(head, rows):
        return (
            "<table><tr>"
            + "".join(f"<th>{esc(h)}</th>" for h in head)
            + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
            + "</table>"
        )

    parts = [
        "<h1>Meta-evaluation: agreement of caption metrics with judgments</h1>",
        f"<p>Preset <code>{esc(result['config'])}</code>, seed {result['seed']}; "
        f"{round(100 * result['confidence'])}% bootstrap CIs over images ({result['n_resamples']} resamples)."
        "</p>",
        "<h2>Leaderboard</h2>",
        table(*_summary(result)),
    ]
    for name, s in result["sets"].items():
        head, rows, phead, prows = _set_tables(s)
        parts += [
            f"<h2>{esc(name)}: {esc(STAT_TEXT[s['statistic']])}</h2>",
            f"<p>Files: {esc(', '.join(s['files']))}; {s['n']} {_unit(s)} on {s['n_images']} images.</p>",
            table(head, rows),
            "<h3>Paired differences</h3>",
            table(phead, prows),
        ]
        if (cat := _category_table(s))[1]:
            parts += ["<h3>Per category: reconstruction minus text-side score</h3>", table(*cat)]
        if s["notes"]:
            parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in s["notes"]) + "</ul>")
    if result["notes"]:
        parts += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in result["notes"]) + "</ul>"]
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}"
    )
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>recon metaeval</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


# ---------------------------------------------------------------------------------------------- command
