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
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("no Chromium on PATH: install Debian's chromium (apt-get install chromium), as .ci/run does")


def browse(page, fragment: str, tmp_path, *extra: str) -> tuple[str, str]:
    """(DOM after the page's script ran, browser log) of ``page`` opened at ``#fragment``."""
    r = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *extra, "--dump-dom",
                        f"{page.resolve().as_uri()}#{fragment}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, r.stderr


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    records = []
    for i, (score, caption) in enumerate([(0.9, "a red circle"), (0.2, PWN), (0.5, "a blue square"),
                                          (0.7, "two green stars")]):
        rels = []
        for name, color in (("original.png", (200, 20 * i, 0)), ("c0_k0.png", (0, 20 * i, 200))):
            save_png(Image.new("RGB", (16, 16), color), run / f"images/it{i}/{name}")
            rels.append(f"images/it{i}/{name}")
        records.append({"id": f"it{i}.png", "status": "ok", "direction": "image-text-image", "original": rels[0],
                        "caption": caption, "chosen": 0, "select_by": "clip_similarity",
                        "scores": {"clip_similarity": score, "lpips_distance": 1 - score},
                        "candidates": [{"caption": caption, "images": [rels[1]], "flagged": [i == 3],
                                        "scores": {"clip_similarity": score, "lpips_distance": 1 - score}}],
                        "warnings": ["prompt truncated"] if i == 2 else []})
    records.append({"id": "broken.png", "status": "failed", "direction": "image-text-image", "error": "not an image"})
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
    assert [i for i, _ in rows(dom)] == ["it0.png", "it3.png", "it2.png", "it1.png", "broken.png"]  # missing last
    assert 'aria-sort="descending"' in dom
    dom, _ = browse(report, "sort=lpips_distance&dir=asc&show=flagged", tmp_path)
    assert rows(dom) == [("it0.png", False), ("it3.png", True), ("it2.png", False), ("it1.png", False),
                         ("broken.png", False)]
    dom, _ = browse(report, "show=failed", tmp_path)
    assert [i for i, shown in rows(dom) if shown] == ["broken.png"]
    dom, _ = browse(report, "show=warnings&item=" + re.search(r'data-item="(it2[^"]*)"', dom).group(1), tmp_path)
    assert [i for i, shown in rows(dom) if shown] == ["it2.png"] and 'class="ok target"' in dom


def test_a_hostile_caption_is_shown_as_text_and_never_runs(report, tmp_path):
    dom, log = browse(report, "", tmp_path)
    assert "data-pwned" not in dom.split("<body", 1)[1].split(">", 1)[0]  # its onerror did not run
    assert "&lt;img src=x onerror=" in dom and '<img src="x"' not in dom and "<img src=x" not in dom
    assert ":CONSOLE" not in log


def test_screenshot_renders(report, tmp_path):
    shot = tmp_path / "report.png"
    _, log = browse(report, "sort=clip_similarity&dir=asc", tmp_path, "--window-size=1200,900",
                    f"--screenshot={shot}")
    with Image.open(shot) as im:
        assert im.size == (1200, 900) and len(set(im.convert("RGB").getdata())) > 10  # not a blank page
