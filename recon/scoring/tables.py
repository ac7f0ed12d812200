"""Reading score runs: leaderboards with bootstrap CIs and paired tests, and metric correlation analysis.

Inputs are the records of a score run (``"direction": "score"``, see :mod:`recon.scoring`): one per
(system, image) with a ``scores`` mapping. Every statistic is over images, pairs systems on the images both
scored, and is deterministic given ``seed``. Numbers are means of per-image scores (for BLEU and METEOR the
corpus-level values pycocoevalcap reports are in the run's ``corpus.json``).
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Sequence

import numpy as np

from recon import stats
from recon.config import is_truncation_warning, metric_direction

# Display order of metric families; unknown metrics follow in first-seen order.
_ORDER = ("recon_", "clipscore", "refclipscore", "bleu_", "meteor", "rouge_l", "cider", "spice", "sbert")


def metric_order(records: Sequence[dict]) -> list[str]:
    seen = list(dict.fromkeys(m for r in records if r.get("status") == "ok" for m in (r.get("scores") or {})))

    def rank(m: str) -> tuple[int, int]:
        family = next((i for i, p in enumerate(_ORDER) if m.startswith(p)), len(_ORDER))
        return family, seen.index(m)

    return sorted(seen, key=rank)


def score_matrix(
    records: Sequence[dict], systems: Sequence[str], metric: str
) -> tuple[list[str], np.ndarray]:
    """Image ids (first-seen order) and ``[systems, images]`` scores, NaN where a system has no ok score."""
    keys = list(
        dict.fromkeys(
            str(r.get("image_id")) for r in records if r.get("status") == "ok" and r.get("system") in systems
        )
    )
    col = {k: j for j, k in enumerate(keys)}
    row = {s: i for i, s in enumerate(systems)}
    out = np.full((len(systems), len(keys)), np.nan)
    for r in records:
        v = (r.get("scores") or {}).get(metric)
        if r.get("status") == "ok" and r.get("system") in row and isinstance(v, (int, float)):
            out[row[r["system"]], col[str(r.get("image_id"))]] = v
    return keys, out


def system_of(record: dict) -> str:
    """A record's system; failed records written by the job loop carry it only in their id ``SYSTEM/IMAGE``."""
    return str(record.get("system") or str(record.get("id", "")).split("/", 1)[0])


def truncated_by(record: dict) -> list[str]:
    """Which encoders saw only a prefix of a record's caption: the metrics its ``truncated`` list names
    (CLIPScore's and SBERT's text encoders under the ``truncate`` policy) and ``generator`` when the generator's
    truncation warning is among its ``warnings``."""
    out = [str(m) for m in record.get("truncated") or []]
    if any(is_truncation_warning(w) for w in record.get("warnings") or []):
        out.append("generator")
    return out


def truncation_counts(records: Sequence[dict], systems: Sequence[str]) -> dict[str, dict]:
    """Per system ``{"n": ok captions truncated by any encoder, "by": {encoder: n}}``."""
    out = {s: {"n": 0, "by": {}} for s in systems}
    for r in records:
        s = system_of(r)
        if r.get("status") != "ok" or s not in out or not (by := truncated_by(r)):
            continue
        out[s]["n"] += 1
        for e in by:
            out[s]["by"][e] = out[s]["by"].get(e, 0) + 1
    return out


def truncation_cell(t: dict | None) -> str:
    """``3 (clipscore 3, generator 1)``, ``0``, or "–" for a board written before truncation was counted."""
    if t is None:
        return "–"
    return f"{t['n']}" + (f" ({', '.join(f'{e} {n}' for e, n in t['by'].items())})" if t["by"] else "")


def truncation_note(records: Sequence[dict], where: str) -> str | None:
    """One line for a table's notes when captions of ``records`` were truncated (metaeval's runs), else None."""
    ok = [{**r, "system": "all"} for r in records if r.get("status") == "ok"]
    t = truncation_counts(ok, ["all"])["all"]
    if not t["n"]:
        return None
    by = ", ".join(f"{e} {n}" for e, n in t["by"].items())
    return f"{where}: n truncated = {t['n']} of {len(ok)} captions ({by}): scored on their first tokens only"


def primary_metric(metrics: Sequence[str]) -> str | None:
    """The reconstruction score (first ``recon_*`` metric) when there is one, else the first metric."""
    return next((m for m in metrics if m.startswith("recon_")), metrics[0] if metrics else None)


def leaderboard(
    records: Sequence[dict], systems: Sequence[str], seed: int = 0, n_resamples: int = stats.N_RESAMPLES
) -> dict:
    """Per system and metric the mean with a 95% bootstrap CI; paired tests between every two systems.

    Systems are ordered best first by the primary metric. Paired tests use the images both systems scored;
    ``p_holm`` adjusts the p-values of all tests of the board together (Holm-Bonferroni).
    """
    metrics = metric_order(records)
    systems = list(systems)
    mats = {m: score_matrix(records, systems, m)[1] for m in metrics}
    rows = {
        s: {
            m: stats.bootstrap_mean(mats[m][i], n_resamples, seed=[seed, i, j]).to_dict()
            for j, m in enumerate(metrics)
        }
        for i, s in enumerate(systems)
    }
    counts = {
        s: {
            "ok": sum(system_of(r) == s and r.get("status") == "ok" for r in records),
            "failed": sum(system_of(r) == s and r.get("status") != "ok" for r in records),
        }
        for s in systems
    }
    primary = primary_metric(metrics)
    index = {s: i for i, s in enumerate(systems)}  # rows of the score matrices
    if primary is not None:
        sign = -1 if metric_direction(primary) == "lower" else 1

        def best_first(s: str) -> tuple[int, float]:
            v = rows[s][primary]["value"]
            return (1, 0.0) if v is None else (0, -sign * v)

        systems.sort(key=best_first)
    paired = []
    for a, b in itertools.combinations(systems, 2):
        for j, m in enumerate(metrics):
            t = stats.paired_test(mats[m][index[a]], mats[m][index[b]], n_resamples, seed=[seed, 1000 + j])
            paired.append({"a": a, "b": b, "metric": m, **t.to_dict()})
    holm_adjust(paired)
    return {
        "metrics": metrics,
        "systems": systems,
        "primary": primary,
        "rows": rows,
        "counts": counts,
        "truncated": truncation_counts(records, systems),
        "paired": paired,
        "confidence": stats.CONFIDENCE,
        "n_resamples": n_resamples,
        "corpus": corpus_rows(records, systems, seed, n_resamples),
    }


def holm_adjust(paired: list[dict]) -> None:
    """Add ``p_holm`` to every test of a table: Holm-Bonferroni over all of them together (None where no p)."""
    for p, adj in zip(paired, stats.holm([np.nan if p["p_value"] is None else p["p_value"] for p in paired])):
        p["p_holm"] = None if adj != adj else adj


CORPUS_BLEU = ("bleu_1", "bleu_2", "bleu_3", "bleu_4")


def corpus_rows(
    records: Sequence[dict], systems: Sequence[str], seed: int = 0, n_resamples: int = stats.N_RESAMPLES
) -> dict[str, dict[str, dict]]:
    """``{system: {bleu_n: estimate}}``: corpus BLEU as pycocoevalcap computes it over the system's scored images
    (from each record's ``bleu_stats``), with a bootstrap CI that recomputes the corpus score per resample of
    images. Empty when no record carries the statistics."""
    from recon.scoring.caption_metrics import corpus_bleu

    out: dict[str, dict[str, dict]] = {}
    for i, s in enumerate(systems):
        rows = [
            r["bleu_stats"]
            for r in records
            if r.get("system") == s
            and r.get("status") == "ok"
            and isinstance(r.get("bleu_stats"), list)
            and len(r["bleu_stats"]) == 10
        ]
        if rows:
            ests = stats.bootstrap_statistic(
                np.asarray(rows), corpus_bleu, n_resamples, seed=[seed, 2000 + i]
            )
            out[s] = {name: e.to_dict() for name, e in zip(CORPUS_BLEU, ests)}
    return out


def fmt(v, digits: int = 3) -> str:
    return "–" if v is None or v != v else f"{v:.{digits}f}"


def fmt_estimate(e: dict) -> str:
    if e["value"] is None:
        return "–"
    ci = f" [{fmt(e['low'])}, {fmt(e['high'])}]" if e["low"] is not None else ""
    return f"{fmt(e['value'])}{ci}"


def fmt_p(p) -> str:
    return "–" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def paired_cell(p: dict | None, sep: str = " ", holm: str = "") -> str:
    """A paired test as a table cell: ``diff [low, high]{sep}p=... ({holm}p_holm)``, or "–" without one."""
    if p is None or p["diff"] is None:
        return "–"
    return (
        f"{fmt(p['diff'])} [{fmt(p['low'])}, {fmt(p['high'])}]{sep}{fmt_pv(p['p_value'])} "
        f"({holm}{fmt_p(p['p_holm'])})"
    )


def fmt_pv(p) -> str:
    """``p=0.012`` / ``p<0.001``."""
    return "p=–" if p is None else ("p<0.001" if p < 0.001 else f"p={p:.3f}")


def _md(text) -> str:
    """Text for a markdown table cell or list item: HTML-escaped (markdown renders raw HTML, and file names and
    captions come from users), pipes and line breaks escaped (they would break the table)."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def corpus_names(corpus: dict) -> list[str]:
    """The corpus-level rows a board has (BLEU-1..4, METEOR), in table order."""
    present = {m for rows in corpus.values() for m in rows}
    return [m for m in (*CORPUS_BLEU, "meteor") if m in present]


def metric_label(metric: str, corpus: dict) -> str:
    """A per-image BLEU / METEOR row is labelled as such when the board also has the corpus rows papers table."""
    return f"{metric} (mean of per-image)" if metric in corpus_names(corpus) else metric


def coverage_notes(board: dict) -> list[str]:
    """One note per metric that some system scored on fewer items than it has ok (no references for some
    images, a metric that failed on some captions): its mean covers those items only."""
    notes = []
    for m in board["metrics"]:
        short = [
            f"{s} {board['rows'][s][m]['n']}/{board['counts'][s]['ok']}"
            for s in board["systems"]
            if board["rows"][s][m]["n"] < board["counts"][s]["ok"]
        ]
        if short:
            notes.append(f"{m} covers only part of the ok items ({', '.join(short)}): its mean is over those")
    return notes


def estimate_cell(board: dict, system: str, metric: str) -> str:
    """``mean [low, high]``, with ``(n=k/N)`` when the metric covers only k of the system's N ok items."""
    e, ok = board["rows"][system][metric], board["counts"][system]["ok"]
    return fmt_estimate(e) + (f" (n={e['n']}/{ok})" if e["n"] < ok else "")


def leaderboard_markdown(board: dict, notes: Sequence[str] = ()) -> str:
    systems, metrics = board["systems"], board["metrics"]
    lines = [
        "# Leaderboard",
        "",
        f"Mean of per-image scores with a {round(100 * board['confidence'])}% percentile bootstrap CI "
        f"({board['n_resamples']} resamples of the images); systems ordered by `{board['primary']}`. "
        "**Corpus** BLEU / METEOR rows are pycocoevalcap's corpus scores (the numbers captioning papers table), "
        "their CI recomputing the corpus score per resample of images.",
        "",
        "| metric (better) | " + " | ".join(_md(s) for s in systems) + " |",
        "|---|" + "---|" * len(systems),
    ]
    lines.append(
        "| items ok / failed | "
        + " | ".join(f"{board['counts'][s]['ok']} / {board['counts'][s]['failed']}" for s in systems)
        + " |"
    )
    lines.append(
        "| n truncated (captions past a text encoder's context) | "
        + " | ".join(truncation_cell((board.get("truncated") or {}).get(s)) for s in systems)
        + " |"
    )
    corpus = board.get("corpus") or {}
    for name in corpus_names(corpus):
        lines.append(
            f"| **{name} (corpus)** (higher) | "
            + " | ".join(fmt_estimate(corpus[s][name]) if name in corpus.get(s, {}) else "–" for s in systems)
            + " |"
        )
    for m in metrics:
        lines.append(
            f"| {_md(metric_label(m, corpus))} ({metric_direction(m)}) | "
            + " | ".join(estimate_cell(board, s, m) for s in systems)
            + " |"
        )
    if board["paired"]:
        pairs = list(dict.fromkeys((p["a"], p["b"]) for p in board["paired"]))
        lines += [
            "",
            "## Paired differences (A − B on the images both scored)",
            "",
            "Mean difference [bootstrap CI], two-sided paired permutation p-value (Holm-adjusted over the "
            "whole table in parentheses).",
            "",
            "| metric | " + " | ".join(f"{_md(a)} − {_md(b)}" for a, b in pairs) + " |",
            "|---|" + "---|" * len(pairs),
        ]
        cell = {(p["a"], p["b"], p["metric"]): p for p in board["paired"]}
        for m in metrics:
            row = []
            for a, b in pairs:
                p = cell[(a, b, m)]
                row.append(paired_cell(p))
            lines.append(f"| {_md(m)} | " + " | ".join(row) + " |")
    if notes:
        lines += ["", "Notes:", *[f"- {_md(n)}" for n in notes]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- correlations
def correlations(
    records: Sequence[dict],
    recon_metric: str | None = None,
    seed: int = 0,
    n_resamples: int = stats.N_RESAMPLES,
) -> dict:
    """Spearman and Kendall correlation of the reconstruction score with every other metric.

    * ``item``: over all (system, image) items pooled; ``per_system``: within each system's items;
    * ``system``: of system means (needs 3 or more systems), CI by resampling images.
    All with bootstrap CIs. A ``*_distance`` reconstruction score correlates negatively when it agrees.
    """
    ok = [r for r in records if r.get("status") == "ok"]
    metrics = metric_order(ok)
    recon_metric = recon_metric or primary_metric([m for m in metrics if m.startswith("recon_")])
    if recon_metric is None or recon_metric not in metrics:
        raise ValueError(
            f"no reconstruction score {recon_metric or 'recon_*'} in these records; metrics: {metrics}"
        )
    others = [m for m in metrics if not m.startswith("recon_")]
    systems = list(dict.fromkeys(r.get("system") for r in ok))

    def pair(rs: Sequence[dict], m: str) -> tuple[list[float], list[float]]:
        both = [r["scores"] for r in rs if recon_metric in r["scores"] and m in r["scores"]]
        return [s[recon_metric] for s in both], [s[m] for s in both]

    def both_methods(x, y, s) -> dict:
        return {
            meth: stats.correlation(x, y, meth, n_resamples, seed=s).to_dict() for meth in stats.CORRELATIONS
        }

    out: dict = {
        "recon_metric": recon_metric,
        "metrics": others,
        "systems": systems,
        "n_resamples": n_resamples,
        "confidence": stats.CONFIDENCE,
        "item": {},
        "per_system": {},
        "system": {},
    }
    for j, m in enumerate(others):
        out["item"][m] = both_methods(*pair(ok, m), [seed, j])
        for i, s in enumerate(systems):
            out["per_system"].setdefault(s, {})[m] = both_methods(
                *pair([r for r in ok if r.get("system") == s], m), [seed, j, i + 1]
            )
        _, x = score_matrix(ok, systems, recon_metric)
        _, y = score_matrix(ok, systems, m)
        out["system"][m] = {
            meth: stats.system_correlation(x, y, meth, n_resamples, seed=[seed, j, 0]).to_dict()
            for meth in stats.CORRELATIONS
        }
    return out


def fmt_corr(c: dict) -> str:
    if c["r"] is None:
        return f"– (n={c['n']})"
    return f"{c['r']:.3f} [{fmt(c['low'])}, {fmt(c['high'])}] (n={c['n']})"


def correlations_markdown(res: dict) -> str:
    rm = res["recon_metric"]
    lines = [
        "# Correlation with the reconstruction score",
        "",
        f"Rank correlation of `{rm}` ({metric_direction(rm)} is better) with each metric; "
        f"{round(100 * res['confidence'])}% bootstrap CI over items ({res['n_resamples']} resamples) in "
        "brackets.",
        "",
    ]
    sections = [("Per caption (all systems' items pooled)", res["item"])]
    sections += [(f"Per caption, system `{_md(s)}`", res["per_system"][s]) for s in res["systems"]]
    sections += [
        (f"Per system (system means, {len(res['systems'])} systems; CI resamples images)", res["system"])
    ]
    for title, table in sections:
        lines += [f"## {title}", "", "| metric | Spearman ρ | Kendall τ |", "|---|---|---|"]
        lines += [
            f"| {_md(m)} | {fmt_corr(table[m]['spearman'])} | {fmt_corr(table[m]['kendall'])} |"
            for m in res["metrics"]
        ]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ rule tables
def compare_rules(
    values: dict[str, dict[str, Sequence[float]]],
    reference: str,
    seed: int = 0,
    n_resamples: int = stats.N_RESAMPLES,
) -> dict:
    """Selection rules compared on the same images: ``values = {rule: {metric: [per image]}}`` (aligned lists).

    Returns means with bootstrap CIs per rule and metric, and paired tests of ``reference`` against every other
    rule (``reference - other``), Holm-adjusted over the table.
    """
    rules = list(values)
    metrics = list(dict.fromkeys(m for v in values.values() for m in v))
    rows = {
        r: {
            m: stats.bootstrap_mean(values[r].get(m, []), n_resamples, seed=[seed, j]).to_dict()
            for j, m in enumerate(metrics)
        }
        for r in rules
    }
    paired = []
    for r in rules:
        if r == reference:
            continue
        for j, m in enumerate(metrics):
            if m in values[reference] and m in values[r]:
                t = stats.paired_test(values[reference][m], values[r][m], n_resamples, seed=[seed, j])
                paired.append({"a": reference, "b": r, "metric": m, **t.to_dict()})
    holm_adjust(paired)
    return {
        "rules": rules,
        "metrics": metrics,
        "reference": reference,
        "rows": rows,
        "paired": paired,
        "confidence": stats.CONFIDENCE,
        "n_resamples": n_resamples,
    }


def rules_markdown(table: dict, title: str, caption: str = "", metrics: Sequence[str] | None = None) -> str:
    """The table of :func:`compare_rules` as markdown (``metrics``: the columns to show, default all)."""
    ref = table["reference"]
    metrics = [m for m in (metrics or table["metrics"]) if m in table["metrics"]]
    lines = [f"## {title}", ""] + ([caption, ""] if caption else [])
    lines += ["| rule | " + " | ".join(_md(m) for m in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for r in table["rules"]:
        name = f"**{_md(r)}**" if r == ref else _md(r)
        lines.append(f"| {name} | " + " | ".join(fmt_estimate(table["rows"][r][m]) for m in metrics) + " |")
    if table["paired"]:
        others = list(dict.fromkeys(p["b"] for p in table["paired"]))
        cell = {(p["b"], p["metric"]): p for p in table["paired"]}
        lines += [
            "",
            f"Paired differences `{_md(ref)}` − rule on the same images: mean [{round(100 * table['confidence'])}"
            "% bootstrap CI], permutation p (Holm-adjusted in parentheses).",
            "",
            "| rule | " + " | ".join(_md(m) for m in metrics) + " |",
            "|---|" + "---|" * len(metrics),
        ]
        for o in others:
            row = []
            for m in metrics:
                p = cell.get((o, m))
                row.append(paired_cell(p))
            lines.append(f"| {_md(ref)} − {_md(o)} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
