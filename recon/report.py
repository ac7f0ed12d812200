"""The HTML report of a run directory: one self-contained ``report.html`` (over 400 lines: statistics, histograms
and the gallery are one page's parts; its script lives in report.js). A run of more than GALLERY_INLINE_ROWS items
keeps its gallery rows in ``report-rows.js`` beside the page, so the page stays small (see :func:`gallery`).

Images (as PNG thumbnails) and score histograms are embedded as base64 data URIs, so the file can be mailed
or archived alone. Every value that comes from a record or the config (ids, captions, texts, errors, paths,
metric names) is HTML-escaped: captions are model output and texts are user input. A record is shown whatever it
holds: a score that is not a finite number (a string, a list, a bool, null) is shown as text and counted as missing,
and finite scores up to ±1.8e308 are summarised without overflow.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from recon.config import metric_direction
from recon.data import DataError, atomic_write_text, encode_png, load_image
from recon.runs import item_dir_name, latest_per_id

__all__ = ["Gallery", "gallery", "write_gallery_rows", "write_report"]

IMAGE_TEXT_IMAGE = "image-text-image"
TEXT_IMAGE_TEXT = "text-image-text"

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.row { display: flex; flex-wrap: wrap; gap: .5em; align-items: flex-start; }
figure { margin: 0; max-width: 330px; font-size: .85em; }
figure img { max-width: 256px; display: block; }
.chosen { background: #e3f4e6; }
.missing { width: 128px; height: 96px; background: #eee; font-size: .8em; padding: .3em; overflow: hidden; }
.flagged { color: #b00; }
.warnings { color: #8a5a00; font-size: .9em; }
.muted { color: #777; }
pre { background: #f6f6f6; padding: .5em; overflow-x: auto; }
#gallery { width: 100%; table-layout: auto; }
#gallery th[data-key] { cursor: pointer; white-space: nowrap; }
#gallery th[aria-sort=ascending]::after { content: " \\25B2"; }
#gallery th[aria-sort=descending]::after { content: " \\25BC"; }
#gallery td.caption { max-width: 32em; overflow-wrap: anywhere; }
#gallery tr.failed td { background: #fdecea; }
#gallery tr.target td { outline: 2px solid #4a78b5; }
img.px { image-rendering: pixelated; }
.pair { display: flex; gap: .3em; align-items: flex-start; }
.controls { margin: .5em 0; }
"""


def script() -> str:
    """The gallery's sorting / filtering script (recon/report.js), inlined: the report stays one file."""
    return Path(__file__).with_name("report.js").read_text(encoding="utf-8").replace("</", "<\\/")


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and abs(value) >= 1e9:
        return f"{value:.4g}"  # 1e308 as 309 digits is no number to read
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4f}" if isinstance(value, float) else str(value)
    return esc(value)


def _scores(r: Mapping) -> Mapping:
    """A record's ``scores`` mapping, or an empty one when it holds something else."""
    scores = r.get("scores")
    return scores if isinstance(scores, Mapping) else {}


# -------------------------------------------------------------------------------------------- statistics


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _metric_values(records: list[dict]) -> dict[tuple[str, str], list[float]]:
    """Finite scores of ok records per (direction, metric), in first-appearance order."""
    values: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        for metric, v in _scores(r).items():
            bucket = values.setdefault((str(r.get("direction", "")), str(metric)), [])
            if _finite(v):
                bucket.append(float(v))
    return values


def _stats_table(records: list[dict], values: dict[tuple[str, str], list[float]]) -> str:
    failed: dict[str, int] = {}
    ok: dict[str, int] = {}
    for r in records:
        counts = ok if r.get("status") == "ok" else failed
        counts[str(r.get("direction", ""))] = counts.get(str(r.get("direction", "")), 0) + 1
    rows = []
    for (direction, metric), vs in values.items():
        a = np.asarray(vs, dtype=np.float64)
        better = metric_direction(metric)
        stats = [len(a), *_summary(a), a.min(), a.max()] if len(a) else [0] + [float("nan")] * 5
        missing = ok.get(direction, 0) - len(a)
        cells = "".join(f'<td class="num">{"–" if s != s else _num(s)}</td>' for s in stats)  # NaN: "–"
        rows.append(
            f"<tr><td>{esc(direction)}</td><td>{esc(metric)}</td>"
            f"<td>{'lower (distance)' if better == 'lower' else 'higher (similarity)'}</td>{cells}"
            f'<td class="num">{missing}</td><td class="num">{failed.get(direction, 0)}</td></tr>'
        )
    for direction, n in failed.items():
        if not any(d == direction for d, _ in values):
            rows.append(
                f"<tr><td>{esc(direction)}</td><td class='muted' colspan='9'>no scores</td>"
                f'<td class="num">{n}</td></tr>'
            )
    if not rows:
        return "<p class='muted'>No records.</p>"
    head = (
        "<tr><th>direction</th><th>metric</th><th>better</th><th>n</th><th>mean</th><th>std</th>"
        "<th>median</th><th>min</th><th>max</th><th>missing / non-finite</th><th>failed records</th></tr>"
    )
    return (
        f"<table>{head}{''.join(rows)}</table><p class='muted'>Over records with status ok; std is the "
        "sample standard deviation; a metric ending in <code>_distance</code> is lower-is-better, "
        "every other metric higher-is-better.</p>"
    )


def _exponent(a: np.ndarray) -> int:
    """A power of two that brings finite ``a`` within [-1, 1] (exactly: ldexp only shifts exponents), so sums and
    spans of values near ±1.8e308 cannot overflow."""
    top = float(np.abs(a).max()) if a.size else 0.0
    return int(np.frexp(top)[1]) if top > 1 else 0


def _summary(a: np.ndarray) -> list[float]:
    """Mean, sample std (NaN for one value) and median of finite ``a``, computed on ``a`` scaled into [-1, 1]: a
    std beyond the largest float is inf, never an overflow warning."""
    e = _exponent(a)
    scaled = np.ldexp(a, -e)
    with np.errstate(over="ignore"):
        std = float(np.ldexp(scaled.std(ddof=1), e)) if len(a) > 1 else float("nan")
        return [float(np.ldexp(scaled.mean(), e)), std, float(np.ldexp(np.median(scaled), e))]


def _histogram(direction: str, metric: str, values: list[float]) -> str:
    """An inline SVG histogram. Written by hand rather than with matplotlib: importing matplotlib alone took
    0.35 s of `recon report`'s 0.5 s start-up budget, for a few rectangles and labels."""
    a = np.asarray(values, dtype=float)
    e = _exponent(a)  # binned scaled: a span of 2e308 would overflow numpy's bin widths
    counts, edges = np.histogram(np.ldexp(a, -e), bins=max(5, min(30, len(values) // 2)))
    top = np.finfo(float).max
    with np.errstate(
        over="ignore"
    ):  # only the outer edge of a one-value histogram can pass the largest float
        edges = np.clip(np.ldexp(edges, e), -top, top)
    w, h, left, bottom, top = 320, 190, 36, 34, 22
    pw, ph, top_count = w - left - 8, h - bottom - top, max(1, int(counts.max()))
    bw = pw / len(counts)
    bars = "".join(
        f'<rect x="{left + i * bw:.1f}" y="{top + ph * (1 - c / top_count):.1f}" width="{max(bw - 1, 0.5):.1f}" '
        f'height="{ph * c / top_count:.1f}" fill="#4a78b5"><title>{edges[i]:.4g} to {edges[i + 1]:.4g}: {c}'
        "</title></rect>"
        for i, c in enumerate(counts.tolist())
    )
    title = f"{metric} ({metric_direction(metric)} is better)"
    alt = f"histogram of {metric} ({direction})"
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" font-size="9" '
        f'font-family="sans-serif"><title>{esc(alt)}</title>'
        f'<text x="{w / 2}" y="13" text-anchor="middle" font-size="10">{esc(title)}</text>{bars}'
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#444"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#444"/>'
        f'<text x="{left}" y="{top + ph + 12}">{edges[0]:.4g}</text>'
        f'<text x="{left + pw}" y="{top + ph + 12}" text-anchor="end">{edges[-1]:.4g}</text>'
        f'<text x="{left + pw / 2}" y="{h - 4}" text-anchor="middle">{esc(metric)}</text>'
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{top_count}</text>'
        f'<text x="{left - 4}" y="{top + ph}" text-anchor="end">0</text>'
        f'<text x="10" y="{top + ph / 2}" transform="rotate(-90 10 {top + ph / 2})" text-anchor="middle">records'
        "</text></svg>"
    )
    return f"<figure>{svg}<figcaption>{esc(alt)}</figcaption></figure>"


# ------------------------------------------------------------------------------------------------ images


class Images:
    """Embeds images referenced by records (paths relative to the run directory) as PNG data URIs."""

    def __init__(self, run_dir: Path, thumb_size: int | None):
        self.root = run_dir.resolve()
        self.thumb_size = thumb_size
        self.cache: dict[str, str] = {}
        self.sizes: dict[str, tuple[int, int]] = {}

    def uri(self, rel: Any) -> tuple[str | None, str]:
        """(data URI or None, reason when None)."""
        if not isinstance(rel, str) or not rel:
            return None, "no image"
        if rel not in self.cache:
            path = (self.root / rel).resolve()
            if not path.is_relative_to(self.root):
                return None, f"outside the run directory: {rel}"
            try:
                img = load_image(path)
            except DataError as e:
                return None, str(e)
            if self.thumb_size:
                img.thumbnail((self.thumb_size, self.thumb_size))
            self.sizes[rel] = img.size
            self.cache[rel] = "data:image/png;base64," + base64.b64encode(encode_png(img)).decode("ascii")
        return self.cache[rel], ""

    def img(self, rel: Any, width: int = 128) -> str:
        """An inline image at ``width`` CSS pixels (small images upscaled nearest-neighbour, so pixels stay
        honest), or a grey box saying why there is none."""
        uri, reason = self.uri(rel)
        if not uri:
            return f'<div class="missing">{esc(reason)}</div>'
        native = self.sizes.get(rel, (width, width))[0]
        cls = ' class="px"' if native < width else ""
        return f'<img src="{uri}" alt="{esc(rel)}" width="{max(width, 1)}"{cls} loading="lazy">'


# ------------------------------------------------------------------------------------------------- items


def _warnings(record: dict) -> str:
    ws = record.get("warnings")
    if not isinstance(ws, list) or not ws:
        return ""
    return "<ul class='warnings'>" + "".join(f"<li>{esc(w)}</li>" for w in ws) + "</ul>"


# ----------------------------------------------------------------------------------------------- gallery
SHOW = ("all", "failed", "flagged", "warnings")


def _select_key(records: list[dict], metrics: list[str]) -> str | None:
    """The metric the run selected candidates by (its records' ``select_by``), else the first metric."""
    chosen = next((r["select_by"] for r in records if isinstance(r.get("select_by"), str)), None)
    return chosen if chosen in metrics else (metrics[0] if metrics else None)


def _item_key(r: dict) -> str:
    return item_dir_name(str(r.get("id", "?")))


def _flagged(r: dict) -> bool:
    lists = [r.get("flagged")] + [
        c.get("flagged") for c in r.get("candidates") or [] if isinstance(c, Mapping)
    ]
    return any(isinstance(f, list) and any(f) for f in lists)


def _io_cells(r: dict, images: Images, with_images: bool) -> tuple[str, str, str]:
    """(input, output images, caption / text) cells of a gallery row."""
    direction = r.get("direction")
    if direction == IMAGE_TEXT_IMAGE:
        candidates = [c for c in r.get("candidates") or [] if isinstance(c, Mapping)]
        chosen = r.get("chosen") if isinstance(r.get("chosen"), int) else 0
        best = candidates[chosen] if 0 <= chosen < len(candidates) else {}
        source = images.img(r.get("original")) if with_images and r.get("original") else ""
        out = "".join(images.img(rel) for rel in best.get("images") or []) if with_images else ""
        others = (
            ""
            if not candidates
            else (
                f"<details><summary>{len(candidates)} candidate(s), per-image scores"
                f"</summary>{_candidates_table(r, candidates, images, with_images)}"
                "</details>"
            )
        )
        return source, out, f"{esc(r.get('caption', best.get('caption', '')))}{others}"
    if direction == "score":  # recon score: one caption of one system for one image
        source = images.img(r.get("original")) if with_images and r.get("original") else ""
        out = "".join(images.img(rel) for rel in r.get("images") or []) if with_images else ""
        if r.get("status") != "ok":
            return source, out, f"<span class='flagged'>{esc(r.get('error', r.get('status')))}</span>"
        return source, out, f"<b>{esc(r.get('system', ''))}</b>: {esc(r.get('caption', ''))}"
    if direction == TEXT_IMAGE_TEXT:
        out = "".join(images.img(rel) for rel in r.get("images") or []) if with_images else ""
        captions = "".join(f"<li>{esc(c)}</li>" for c in r.get("captions") or [])
        per = r.get("scores_per_image") if isinstance(r.get("scores_per_image"), Mapping) else {}
        per_text = "".join(
            f"<li>{esc(m)}: " + ", ".join(_num(v) for v in vs) + "</li>"
            for m, vs in per.items()
            if isinstance(vs, list)
        )
        details = (
            f"<details><summary>per-image scores</summary><ul>{per_text}</ul></details>" if per_text else ""
        )
        return (
            f"<q>{esc(r.get('text', ''))}</q>",
            out,
            (f"<ol start='0'>{captions}</ol>" if captions else "") + details,
        )
    out = "".join(images.img(rel) for rel in r.get("images") or []) if with_images else ""
    if r.get("status") != "ok":
        return (
            esc(r.get("source", "")),
            out,
            f"<span class='flagged'>{esc(r.get('error', r.get('status')))}</span>",
        )
    text = "".join(f"<p>{key}: <q>{esc(r[key])}</q></p>" for key in ("text", "caption") if key in r)
    if isinstance(r.get("captions"), list):
        text += "<ol start='0'>" + "".join(f"<li>{esc(c)}</li>" for c in r["captions"]) + "</ol>"
    raw = esc(json.dumps(r, ensure_ascii=False, indent=1, default=str))
    return (
        esc(r.get("source", "")),
        out,
        f"{text}<details><summary>record</summary><pre>{raw}</pre></details>",
    )


def _candidates_table(r: dict, candidates: list, images: Images, with_images: bool) -> str:
    """Every candidate: caption, mean scores, per-image scores, and the images of the candidates not shown in
    the row (the chosen one's are)."""
    metrics = list(dict.fromkeys(m for c in candidates for m in (c.get("scores") or {})))
    has_ll = any("log_likelihood" in c for c in candidates)
    metrics += ["log-likelihood"] if has_ll else []
    rows = []
    for i, c in enumerate(candidates):
        scores = dict(
            c.get("scores") or {}, **({"log-likelihood": c.get("log_likelihood", "–")} if has_ll else {})
        )
        chosen = i == r.get("chosen")
        per = c.get("scores_per_image") if isinstance(c.get("scores_per_image"), Mapping) else {}
        per_text = "; ".join(
            f"{esc(m)}: " + ", ".join(_num(v) for v in vs) for m, vs in per.items() if isinstance(vs, list)
        )
        flags = c.get("flagged") if isinstance(c.get("flagged"), list) else []
        flag = " <span class='flagged'>flagged by the safety checker</span>" if any(flags) else ""
        figs = (
            "" if chosen or not with_images else "".join(images.img(rel, 64) for rel in c.get("images") or [])
        )
        rows.append(
            f"<tr{' class=chosen' if chosen else ''}><td>{'★ ' if chosen else ''}{i}</td>"
            f"<td>{esc(c.get('caption', ''))}{flag}</td>"
            + "".join(f'<td class="num">{_num(scores.get(m, "–"))}</td>' for m in metrics)
            + f"<td class='muted'>{per_text}</td><td><div class='pair'>{figs}</div></td></tr>"
        )
    head = (
        "<tr><th>#</th><th>caption</th>"
        + "".join(f"<th>{esc(m)}</th>" for m in metrics)
        + "<th>per image</th><th>images</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


# The gallery at scale: the first ``max_items`` rows (default order) are HTML with images; every other row is data the
# page's script renders a page at a time (text, scores, warnings). Up to GALLERY_INLINE_ROWS such rows are embedded in
# report.html; beyond that they all go to GALLERY_ROWS_FILE beside it, loaded by a <script src> (which a file:// page
# may do, unlike fetch), so report.html stays bounded whatever the run's size.
GALLERY_PAGE_ROWS = 100
GALLERY_INLINE_ROWS = 10_000
GALLERY_ROWS_FILE = "report-rows.js"


@dataclass(frozen=True)
class Gallery:
    """The gallery's HTML and, for a run past ``GALLERY_INLINE_ROWS`` rows, the text of its rows file."""

    html: str
    rows_js: str | None = None


def _row_text(r: dict) -> tuple[str, str, int]:
    """(bold label, text, 1 when the text is an error) of a row the page's script renders."""
    if r.get("status") != "ok":
        return "", str(r.get("error", r.get("status"))), 1
    direction = r.get("direction")
    if direction == "score":
        return str(r.get("system", "")), str(r.get("caption", "")), 0
    if direction == TEXT_IMAGE_TEXT:
        captions = r.get("captions") if isinstance(r.get("captions"), list) else []
        return "", f"“{r.get('text', '')}” → " + " / ".join(map(str, captions)), 0
    return "", str(r.get("caption", r.get("text", r.get("source", "")))), 0


def _row_data(r: dict, metrics: list[str]) -> list:
    """One rendered-by-script row: [key, id, ok, flagged, warnings, label, text, error, score per metric]; a score
    is a finite number, a string (shown as text, sorted as missing) or null (no score)."""
    scores = _scores(r)
    warnings = [str(w) for w in r.get("warnings")] if isinstance(r.get("warnings"), list) else []
    cells = [
        float(v) if _finite(v) else (None if v is None else str(v)) for v in (scores.get(m) for m in metrics)
    ]
    return [
        _item_key(r),
        str(r.get("id", "?")),
        int(r.get("status") == "ok"),
        int(_flagged(r)),
        warnings,
        *_row_text(r),
        *cells,
    ]


def _json_for_html(value: Any) -> str:
    """JSON that is inert inside a <script> element: no "<" at all (so no </script>, no <!--)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace(
        "<", "\\u003c"
    )


def gallery(records: list[dict], images: Images, max_items: int, select: str | None = None) -> Gallery:
    """One sortable, filterable, paged table row per item: input | output | caption | each metric. The first
    ``max_items`` rows in the default order (worst first by the selection metric) are HTML with images; the rest are
    data the page's script renders a page at a time, inline up to ``GALLERY_INLINE_ROWS`` rows, else in
    ``Gallery.rows_js`` (to be written beside the page as ``GALLERY_ROWS_FILE``)."""
    metrics = list(dict.fromkeys(m for r in records if r.get("status") == "ok" for m in _scores(r)))
    select = select if select in metrics else _select_key(records, metrics)
    direction = "desc" if select and metric_direction(select) == "lower" else "asc"  # worst first

    def worst_first(r: dict):  # as the page's script sorts: items without the score (failed ones too) last
        v = _scores(r).get(select) if select and r.get("status") == "ok" else None
        return (0, -v if direction == "desc" else v) if _finite(v) else (1, 0.0)

    ordered = sorted(records, key=worst_first)
    head = (
        "<tr><th></th><th>input</th><th>reconstruction / output</th><th>caption</th>"
        + "".join(
            f'<th data-key="{esc(m)}">{esc(m)} <span class="muted">({metric_direction(m)})</span></th>'
            for m in metrics
        )
        + '<th data-key="@warnings">warnings</th></tr>'
    )
    rows = []
    for r in ordered[:max_items]:
        key = _item_key(r)
        try:
            source, out, text = _io_cells(r, images, with_images=True)
        except Exception as e:  # a malformed record must not cost the whole report
            source, out, text = "", "", f"<span class='flagged'>cannot render this record: {esc(e)}</span>"
        scores = _scores(r)
        cells = "".join(
            f'<td class="num" data-v="{scores[m] if _finite(scores.get(m)) else ""}">'
            f"{_num(scores.get(m, '–'))}</td>"
            for m in metrics
        )
        warnings = r.get("warnings") if isinstance(r.get("warnings"), list) else []
        status = "ok" if r.get("status") == "ok" else "failed"
        rows.append(
            f'<tr id="item-{key}" data-item="{key}" data-status="{status}" data-flagged="{int(_flagged(r))}" '
            f'data-warn="{int(bool(warnings))}" class="{status}">'
            f'<td><a class="itemlink" href="#item={key}" title="link to this item">#</a> '
            f"<span class='muted'>{esc(r.get('id', '?'))}</span></td>"
            f'<td>{source}</td><td><div class="pair">{out}</div></td><td class="caption">{text}</td>{cells}'
            f'<td data-v="{len(warnings)}">{_warnings(r)}</td></tr>'
        )
    rest = ordered[max_items:]
    data, rows_js, source_attr = "", None, ""
    if rest:
        payload = _json_for_html({"metrics": metrics, "rows": [_row_data(r, metrics) for r in rest]})
        token = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
        if len(rest) <= GALLERY_INLINE_ROWS:
            data = f'<script type="application/json" id="gallery-rows">{payload}</script>'
        else:
            rows_js = f'window.reconGalleryRows = {{"token": "{token}", "data": {payload}}};\n'
            data = f'<script src="{GALLERY_ROWS_FILE}"></script>'
            source_attr = f' data-rows-file="{GALLERY_ROWS_FILE}" data-token="{token}"'
    options = "".join(f'<option value="{v}">{v}</option>' for v in SHOW)
    shown = min(len(ordered), max_items)
    where = (
        f"; the other {len(rest)} are in <code>{GALLERY_ROWS_FILE}</code> beside this page" if rows_js else ""
    )
    html_ = (
        f"<h2>Items</h2><p class='controls'>show <select id='show'>{options}</select> "
        f"<span id='view' class='muted'></span></p><p class='muted'>Click a column to sort (again to reverse); "
        f"the view is kept in the address, so it can be shared. Images for the first {shown} of {len(ordered)} "
        f"items (run.max_report_items){where}; {GALLERY_PAGE_ROWS} rows a page; default order: worst first by "
        f"<code>{esc(select or '–')}</code>.</p>"
        f'<table id="gallery" data-sort="{esc(select or "")}" data-dir="{direction}" '
        f'data-page-rows="{GALLERY_PAGE_ROWS}" data-total="{len(ordered)}"{source_attr}><thead>{head}</thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        "<p class='controls' id='pager'><a id='prev' href='#'>« previous</a> <span id='page'></span> "
        f"<a id='next' href='#'>next »</a></p>{data}"
    )
    return Gallery(html_, rows_js)


def write_gallery_rows(run_dir: Path, g: Gallery) -> None:
    """Write (or remove a stale) ``GALLERY_ROWS_FILE`` beside the page that holds ``g``; before the page itself."""
    path = run_dir / GALLERY_ROWS_FILE
    if g.rows_js is not None:
        atomic_write_text(path, g.rows_js)
    elif path.is_file():
        path.unlink()


# ---------------------------------------------------------------------------------------------- assembly


def config_text(run_dir: Path, config: Any) -> str | None:
    if config is None:
        path = run_dir / "config.yaml"
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    try:
        return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:  # e.g. a Path value: still show it
        return json.dumps(config, ensure_ascii=False, indent=2, default=str)


def write_report(
    run_dir: str | Path,
    records: Iterable[dict],
    config: Mapping | None = None,
    title: str = "recon report",
    max_items: int = 200,
    thumb_size: int | None = 256,
) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path.

    ``records``: result records (see ``recon.pipeline``); when an id repeats, its last record counts.
    Statistics and histograms cover all records; item cards are shown for the first ``max_items`` ok records
    and the failure table for the first ``max_items`` failed ones. Images are read from paths relative to
    ``run_dir`` and embedded as PNG thumbnails at most ``thumb_size`` pixels on a side (None: full size).
    ``config``: a dict (or a Config); None reads ``run_dir/config.yaml`` when there is one.
    """
    run_dir = Path(run_dir)
    skipped = getattr(records, "skipped_lines", 0)
    records = latest_per_id(records)
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    values = _metric_values(records)
    images = Images(run_dir, thumb_size)

    parts = [
        f"<h1>{esc(title)}</h1>",
        f"<p>run directory <code>{esc(run_dir.resolve().name)}</code>: {len(records)} records, "
        f"{len(ok)} ok, {len(failed)} failed"
        + (f"; {skipped} unreadable line(s) at the end of results.jsonl skipped" if skipped else "")
        + ".</p>",
    ]
    shown_config = config_text(run_dir, config)
    if shown_config is not None:
        parts.append(f"<details><summary>config</summary><pre>{esc(shown_config)}</pre></details>")
    parts.append(f"<h2>Statistics</h2>{_stats_table(records, values)}")
    hists = [_histogram(d, m, vs) for (d, m), vs in values.items() if vs]
    if hists:
        parts.append(f"<h2>Score distributions</h2><div class='row'>{''.join(hists)}</div>")
    items = gallery(records, images, max_items)
    parts.append(items.html)
    if failed:
        rows = "".join(
            f"<tr><td>{esc(r.get('id', '?'))}</td><td>{esc(r.get('direction', ''))}</td>"
            f"<td>{esc(r.get('error', r.get('status', 'no status')))}</td></tr>"
            for r in failed[:max_items]
        )
        more = f"<p class='muted'>and {len(failed) - max_items} more.</p>" if len(failed) > max_items else ""
        parts.append(
            f"<h2>Failed items</h2><table><tr><th>id</th><th>direction</th><th>error</th></tr>"
            f"{rows}</table>{more}"
        )
    page = (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head><body>\n"
        + "\n".join(parts)
        + f"\n<script>{script()}</script>\n</body></html>\n"
    )
    write_gallery_rows(run_dir, items)
    return atomic_write_text(run_dir / "report.html", page)
