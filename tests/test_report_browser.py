"""report.html in a real browser (headless Chromium): what a person sees after the page's script has run.

Chromium is a test requirement (`.ci/run` installs Debian's `chromium`): without it these tests fail, they are
not skipped."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from PIL import Image

from recon.data import save_png
from recon.report import write_report

PWN = "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("no Chromium on PATH: install Debian's chromium (apt-get install chromium), as .ci/run does")


def browse(page, fragment: str, tmp_path, *extra: str) -> tuple[str, str]:
    """(DOM after the page's script ran, browser log) of ``page`` opened at ``#fragment``."""
    r = subprocess.run(
        [
            chromium(),
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            *extra,
            "--dump-dom",
            f"{page.resolve().as_uri()}#{fragment}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, r.stderr


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    records = []
    for i, (score, caption) in enumerate(
        [(0.9, "a red circle"), (0.2, PWN), (0.5, "a blue square"), (0.7, "two green stars")]
    ):
        rels = []
        for name, color in (("original.png", (200, 20 * i, 0)), ("c0_k0.png", (0, 20 * i, 200))):
            save_png(Image.new("RGB", (16, 16), color), run / f"images/it{i}/{name}")
            rels.append(f"images/it{i}/{name}")
        records.append(
            {
                "id": f"it{i}.png",
                "status": "ok",
                "direction": "image-text-image",
                "original": rels[0],
                "caption": caption,
                "chosen": 0,
                "select_by": "clip_similarity",
                "scores": {"clip_similarity": score, "lpips_distance": 1 - score},
                "candidates": [
                    {
                        "caption": caption,
                        "images": [rels[1]],
                        "flagged": [i == 3],
                        "scores": {"clip_similarity": score, "lpips_distance": 1 - score},
                    }
                ],
                "warnings": ["prompt truncated"] if i == 2 else [],
            }
        )
    records.append(
        {"id": "broken.png", "status": "failed", "direction": "image-text-image", "error": "not an image"}
    )
    return write_report(run, records, {"name": "browser"})


def rows(dom: str) -> list[tuple[str, bool]]:
    """(item id, visible) of the gallery rows, in page order."""
    found = re.findall(r'<tr id="item-[^"]*"([^>]*)>.*?<span class="muted">([^<]*)</span>', dom, flags=re.S)
    return [(item, "hidden" not in attrs) for attrs, item in found]


def test_default_view_is_worst_first_by_the_selection_metric(report, tmp_path):
    dom, log = browse(report, "", tmp_path)
    assert [i for i, _ in rows(dom)] == ["it1.png", "it2.png", "it3.png", "it0.png", "broken.png"]
    assert "Showing 5 of 5 items, sorted by clip_similarity (ascending)." in dom
    assert ":CONSOLE" not in log  # no console message, no uncaught error


def test_the_fragment_sorts_and_filters(report, tmp_path):
    dom, _ = browse(report, "sort=clip_similarity&dir=desc", tmp_path)
    assert [i for i, _ in rows(dom)] == [
        "it0.png",
        "it3.png",
        "it2.png",
        "it1.png",
        "broken.png",
    ]  # missing last
    assert 'aria-sort="descending"' in dom
    dom, _ = browse(report, "sort=lpips_distance&dir=asc&show=flagged", tmp_path)
    assert rows(dom) == [("it3.png", True)]  # a filter lists the matching rows only
    dom, _ = browse(report, "show=failed", tmp_path)
    assert [i for i, shown in rows(dom) if shown] == ["broken.png"]
    dom, _ = browse(
        report,
        "show=warnings&item=" + re.search(r'data-item="(it2[^"]*)"', report.read_text()).group(1),
        tmp_path,
    )
    assert [i for i, shown in rows(dom) if shown] == ["it2.png"] and 'class="ok target"' in dom


def test_a_hostile_caption_is_shown_as_text_and_never_runs(report, tmp_path):
    dom, log = browse(report, "", tmp_path)
    assert "data-pwned" not in dom.split("<body", 1)[1].split(">", 1)[0]  # its onerror did not run
    assert "&lt;img src=x onerror=" in dom and '<img src="x"' not in dom and "<img src=x" not in dom
    assert ":CONSOLE" not in log


def test_screenshot_renders(report, tmp_path):
    shot = tmp_path / "report.png"
    _, log = browse(
        report, "sort=clip_similarity&dir=asc", tmp_path, "--window-size=1200,900", f"--screenshot={shot}"
    )
    with Image.open(shot) as im:
        assert im.size == (1200, 900) and len(set(im.convert("RGB").getdata())) > 10  # not a blank page


def test_a_malformed_fragment_shows_the_default_view_and_clicks_still_sort(report, tmp_path):
    dom, log = browse(report, "sort=%", tmp_path)  # decodeURIComponent("%") throws URIError
    assert [i for i, _ in rows(dom)] == ["it1.png", "it2.png", "it3.png", "it0.png", "broken.png"]
    assert "Showing 5 of 5 items, sorted by clip_similarity (ascending)." in dom
    assert ":CONSOLE" not in log
    # a click on a column header, from that same address: it must set a sorting fragment, not throw
    clicking = report.with_name("clicking.html")
    clicking.write_text(
        report.read_text(encoding="utf-8").replace(
            "</body>",
            (
                "<script>document.querySelector('th[data-key=lpips_distance]').click();"
                "document.body.dataset.after = location.hash;</script></body>"
            ),
        ),
        encoding="utf-8",
    )
    dom, log = browse(clicking, "sort=%", tmp_path)
    assert 'data-after="#sort=lpips_distance&amp;dir=asc&amp;show=all"' in dom and ":CONSOLE" not in log


# ------------------------------------------------------------------------------------------- a large run
METRICS = ["clip_similarity", "lpips_distance"]


def score_records(n: int) -> list[dict]:
    """``n`` score records (no images), every 37th failed, every 11th with a warning, one hostile caption."""
    import random

    rng = random.Random(n)
    records = []
    for i in range(n):
        if i % 37 == 5:
            records.append(
                {"id": f"s/{i}", "status": "failed", "direction": "score", "system": "s", "error": "no image"}
            )
            continue
        value = round(rng.random(), 2)  # ties, so the order among equal scores is checked too
        if i == n - 2:  # the hostile caption: on the first page, past the HTML rows (a data row)
            value = 0.015
        records.append(
            {
                "id": f"s/{i}",
                "status": "ok",
                "direction": "score",
                "system": "s",
                "caption": PWN if i == n - 2 else f"caption {i}",
                "select_by": "clip_similarity",
                "scores": {"clip_similarity": value, "lpips_distance": rng.random()},
                "warnings": ["truncated"] if i % 11 == 0 else [],
            }
        )
    return records


def expected(records: list[dict], key: str, desc: bool) -> list[str]:
    """Item ids as the page sorts them: the default order (worst first by clip_similarity, stable) as the tie-break,
    items without the score last."""

    def score(r, m):
        return r["scores"][m] if r["status"] == "ok" else None

    default = sorted(
        records, key=lambda r: (score(r, "clip_similarity") is None, score(r, "clip_similarity") or 0)
    )
    with_score = [r for r in default if score(r, key) is not None]
    without = [r for r in default if score(r, key) is None]
    return [r["id"] for r in sorted(with_score, key=lambda r: score(r, key), reverse=desc) + without]


def visible(dom: str) -> list[str]:
    return [i for i, shown in rows(dom) if shown]


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """3,000 rows: 20 as HTML, the rest in the rows file (the inline limit lowered to 1,000 so the file is used)."""
    import recon.report as report_module

    run = tmp_path_factory.mktemp("large")
    records = score_records(3000)
    inline, report_module.GALLERY_INLINE_ROWS = report_module.GALLERY_INLINE_ROWS, 1000
    try:
        page = write_report(run, records, {"name": "large"}, max_items=20)
    finally:
        report_module.GALLERY_INLINE_ROWS = inline
    return page, records


def test_a_large_run_sorts_filters_and_pages_across_every_row(large, tmp_path):
    page, records = large
    assert (page.parent / "report-rows.js").is_file() and "s/2999" not in page.read_text(encoding="utf-8")
    dom, log = browse(page, "", tmp_path)
    assert visible(dom) == expected(records, "clip_similarity", False)[:100]
    assert (
        "Showing 3000 of 3000 items" in dom and "page 1 of 30 (items 1–100)" in dom and ":CONSOLE" not in log
    )
    hostile = expected(records, "clip_similarity", False).index(
        "s/2998"
    )  # its caption is PWN: text, never run
    assert 20 <= hostile < 100 and "&lt;img src=x onerror=" in dom
    assert "data-pwned" not in dom.split("<body", 1)[1].split(">", 1)[0]
    dom, _ = browse(page, "sort=lpips_distance&dir=desc&page=7", tmp_path)
    assert visible(dom) == expected(records, "lpips_distance", True)[600:700]
    failed = [r["id"] for r in records if r["status"] != "ok"]
    dom, _ = browse(page, "sort=clip_similarity&dir=asc&show=failed", tmp_path)
    assert visible(dom) == failed[:100] and f"Showing {len(failed)} of 3000 items" in dom
    deep = expected(records, "clip_similarity", True)[2345]  # on page 24 sorted descending
    key = re.search(rf'"([^"]*)","{re.escape(deep)}"', (page.parent / "report-rows.js").read_text()).group(1)
    dom, _ = browse(page, f"sort=clip_similarity&dir=desc&item={key}", tmp_path)
    assert "page 24 of 30" in dom and f'id="item-{key}"' in dom and 'class="ok target"' in dom


def test_a_page_without_its_rows_file_says_so_and_lists_its_own_rows(large, tmp_path):
    page, records = large
    alone = tmp_path / "alone" / "report.html"
    alone.parent.mkdir()
    alone.write_text(page.read_text(encoding="utf-8"), encoding="utf-8")
    dom, _ = browse(alone, "", tmp_path)
    assert visible(dom) == expected(records, "clip_similarity", False)[:20]
    assert "The other 2980 items are in report-rows.js, which is not beside this page" in dom


def test_rows_inline_below_the_limit(tmp_path):
    records = score_records(300)
    page = write_report(tmp_path, records, {"name": "inline"}, max_items=10)
    assert not (tmp_path / "report-rows.js").exists() and 'id="gallery-rows"' in page.read_text(
        encoding="utf-8"
    )
    dom, log = browse(page, "sort=lpips_distance&dir=asc&page=3", tmp_path)
    assert visible(dom) == expected(records, "lpips_distance", False)[200:300] and ":CONSOLE" not in log


@pytest.mark.slow
def test_a_100k_row_report_stays_small_and_works(tmp_path):
    records = score_records(100_000)
    page = write_report(tmp_path, records, {"name": "100k"})  # 200 HTML rows (these records have no images)
    assert page.stat().st_size < 400_000  # the bound: the rows beyond the first 200 are in the rows file
    dom, log = browse(page, "sort=lpips_distance&dir=desc&page=500", tmp_path)
    assert visible(dom) == expected(records, "lpips_distance", True)[49_900:50_000] and ":CONSOLE" not in log
    assert "Showing 100000 of 100000 items" in dom and "page 500 of 1000" in dom
