"""recon.report: a self-contained, escaped report.html for both record kinds and failed records."""

from __future__ import annotations

import base64
import io
import json
import os
import re

import pytest
from PIL import Image

from recon.config import metric_direction
from recon.data import DataError, save_png
from recon.report import write_report
from recon.runs import read_records

XSS = "<script>alert(1)</script>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def _image(run_dir, rel, color):
    save_png(Image.new("RGB", (16, 16), color), run_dir / rel)
    return rel


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    return run


def _iti_record(run_dir, item_id="cat.png", caption=XSS):
    original = _image(run_dir, f"images/{item_id}/original.png", (200, 10, 10))
    candidates = []
    for c, text in enumerate([caption, "a red square"]):
        images = [_image(run_dir, f"images/{item_id}/c{c}_k{k}.png", (10 * c, 100, 20 * k)) for k in range(2)]
        candidates.append(
            {
                "caption": text,
                "scores": {"clip": 0.5 + c / 10, "lpips_distance": 0.4 - c / 10},
                "scores_per_image": {"clip": [0.5, 0.5 + c / 5], "lpips_distance": [0.4, 0.4 - c / 5]},
                "seeds": [11, 12],
                "images": images,
                "flagged": [False, c == 1],
                "log_likelihood": -3.25 - c,
            }
        )
    return {
        "id": item_id,
        "status": "ok",
        "direction": "image-text-image",
        "source": f"/data/{item_id}",
        "original": original,
        "candidates": candidates,
        "chosen": 1,
        "caption": "a red square",
        "scores": candidates[1]["scores"],
        "seeds": [11, 12],
        "warnings": [f"prompt truncated {XSS}"],
    }


def _tit_record(run_dir, item_id="line-1", text=XSS):
    images = [_image(run_dir, f"images/{item_id}/k{k}.png", (0, 0, 100 + 50 * k)) for k in range(2)]
    return {
        "id": item_id,
        "status": "ok",
        "direction": "text-image-text",
        "text": text,
        "images": images,
        "seeds": [0, 1],
        "captions": [f"blue {XSS}", "navy"],
        "scores_per_image": {"sbert": [0.25, 0.75]},
        "scores": {"sbert": 0.5},
        "chosen": 1,
        "warnings": [],
    }


def _failed(item_id, direction="image-text-image", error=f"bad file {XSS}"):
    return {"id": item_id, "status": "failed", "direction": direction, "error": error}


def _no_injected_script(page: str) -> None:
    """The page's one script is the gallery's own (beside at most its rows as JSON); nothing from a record became
    markup."""
    data = page.lower().count('<script type="application/json" id="gallery-rows">')
    assert page.lower().count("<script") == 1 + data and data <= 1 and "<script>(function" not in page.lower()
    assert "alert(1)</script>" not in page and page.index("<script>") > page.index("</table>")


def _gallery_rows(page: str) -> dict:
    """The gallery rows embedded as data (JSON) in ``page``."""
    return json.loads(
        re.search(
            r'<script type="application/json" id="gallery-rows">(.*?)</script>', page, flags=re.S
        ).group(1)
    )


def _embedded_images(page: str) -> dict[str, Image.Image]:
    """{alt text: image} of every embedded PNG."""
    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)"', page)
    assert len(found) == page.count("<img ")
    return {alt: Image.open(io.BytesIO(base64.b64decode(uri))) for uri, alt in found}


def test_report_both_kinds_escaped_and_self_contained(run_dir):
    records = [
        _iti_record(run_dir),
        _tit_record(run_dir),
        _failed(f"broken{XSS}.png"),
        _failed("line-2", "text-image-text", error="text is empty"),
    ]
    config = {"name": XSS, "run": {"seed": 0}, "path": run_dir}  # a Path is not YAML: shown as JSON
    path = write_report(run_dir, records, config, title=f"run {XSS}")
    assert path == run_dir / "report.html"
    page = path.read_text(encoding="utf-8")
    _no_injected_script(page)
    assert page.count(XSS_ESCAPED) >= 7  # title x2, config, caption, text, captions, warning, error, id
    assert "text is empty" in page and "broken&lt;script&gt;" in page
    # original + 2 candidates x 2 images (the chosen in the row, the other on demand) + 2 text->image images;
    # histograms (clip, lpips_distance, sbert) are SVG
    images = _embedded_images(page)
    assert len(images) == 1 + 4 + 2
    assert re.findall(r"<svg [^>]*><title>histogram of ([^<]*)</title>", page) == [
        "clip (image-text-image)",
        "lpips_distance (image-text-image)",
        "sbert (text-image-text)",
    ]
    original = images["images/cat.png/original.png"]
    assert original.size == (16, 16) and original.getpixel((0, 0)) == (200, 10, 10)
    assert images["images/line-1/k1.png"].getpixel((0, 0)) == (0, 0, 150)
    assert 'src="images/' not in page and "file://" not in page
    assert "lower (distance)" in page and "higher (similarity)" in page
    assert "flagged by the safety checker" in page and "-4.2500" in page
    assert "<details><summary>config</summary>" in page
    assert sorted(os.listdir(run_dir)) == ["images", "report.html"]  # no temporary file left behind


def test_report_statistics_and_caps(run_dir):
    records = [_tit_record(run_dir, f"line-{i}", text=f"text {i}") for i in range(5)]
    for i, r in enumerate(records):
        r["scores"] = {"sbert": float(i)}
    records.append({**_failed("line-0", "text-image-text")})  # a retry of line-0 failed: the last one counts
    records.append(
        {"id": "nan", "status": "ok", "direction": "text-image-text", "scores": {"sbert": float("nan")}}
    )
    page = write_report(run_dir, records, max_items=2).read_text(encoding="utf-8")
    stats = re.search(r"<td>text-image-text</td><td>sbert</td>.*?</tr>", page).group(0)
    cells = re.findall(r'<td class="num">([^<]*)</td>', stats)
    # n, mean, std, median, min, max over lines 1..4 (line-0 failed on retry); one non-finite; one failed
    assert cells == ["4", "2.5000", "1.2910", "2.5000", "1.0000", "4.0000", "1", "1"]
    assert "Images for the first 2 of 6 items" in page
    rows = re.findall(r'<tr id="item-[^"]*".*?</tr>', page)
    assert len(rows) == 2 and [len(re.findall("<img ", r)) for r in rows] == [2, 2]  # HTML rows: with images
    data = _gallery_rows(page)  # the other four: data the page's script renders, unscored last
    assert [d[1] for d in data["rows"]] == ["line-3", "line-4", "line-0", "nan"] and data["metrics"] == [
        "sbert"
    ]
    assert [d[8] for d in data["rows"]] == [3.0, 4.0, None, "nan"] and data["rows"][2][5:8] == [
        "",
        f"bad file {XSS}",
        1,
    ]
    assert "bad file \\u003cscript>" in page  # as data, a "<" is never markup


def test_report_tolerates_missing_and_outside_images(run_dir, tmp_path):
    outside = tmp_path / "secret.png"
    save_png(Image.new("RGB", (4, 4)), outside)
    record = _tit_record(run_dir)
    record["images"] = ["images/none.png", "../secret.png"]
    odd = {"id": "odd", "status": "ok", "direction": "something-else", "note": XSS}
    broken = {"id": "x", "status": "ok", "direction": "image-text-image", "candidates": [{"scores": "oops"}]}
    page = write_report(run_dir, [record, odd, broken], config=None).read_text(encoding="utf-8")
    assert "file not found" in page and "outside the run directory" in page
    assert len(_embedded_images(page)) == 0 and page.count("<svg ") == 1  # only the sbert histogram
    _no_injected_script(page)
    assert "cannot render this record" in page


def test_report_from_results_file(run_dir):
    (run_dir / "config.yaml").write_text(f"name: '{XSS}'\n")
    lines = [json.dumps(_iti_record(run_dir)), json.dumps(_failed("b")), '{"id": "c", "sta']
    (run_dir / "results.jsonl").write_text("\n".join(lines))
    records = read_records(run_dir / "results.jsonl")
    page = write_report(run_dir, records).read_text(encoding="utf-8")
    assert "2 records, 1 ok, 1 failed; 1 unreadable line(s) at the end of results.jsonl skipped" in page
    assert XSS_ESCAPED in page
    _no_injected_script(page)


def test_metric_direction():
    assert metric_direction("lpips_distance") == "lower" and metric_direction("clip") == "higher"


def test_read_records(tmp_path):
    path = tmp_path / "results.jsonl"
    good = [{"id": "a", "status": "ok"}, {"id": "é", "status": "failed", "error": "boom"}]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good).encode()
    path.write_bytes(body)
    assert read_records(path) == good and read_records(path).skipped_lines == 0
    path.write_bytes(body + b'{"id": "c", "caption": "caf' + "é".encode()[:1])  # killed mid-character
    records = read_records(path)
    assert records == good and records.skipped_lines == 1
    path.write_text('{"id": "a"}\n{"id": \n{"id": "b"}\n')  # corrupt in the middle: skipped, the rest read
    assert read_records(path) == [{"id": "a"}, {"id": "b"}] and read_records(path).skipped_lines == 1
    with pytest.raises(DataError, match="no such results file"):
        read_records(tmp_path / "absent.jsonl")


def test_report_other_directions(run_dir):
    gen = {
        "id": "t",
        "status": "ok",
        "direction": "generate",
        "text": XSS,
        "seeds": [3],
        "images": [_image(run_dir, "images/t/k0.png", (1, 2, 3))],
    }
    cap = {"id": "c", "status": "ok", "direction": "caption", "source": "/x/c.png", "captions": [XSS, "b"]}
    page = write_report(run_dir, [gen, cap]).read_text(encoding="utf-8")
    _no_injected_script(page)
    assert page.count(XSS_ESCAPED) >= 4
    assert _embedded_images(page)["images/t/k0.png"].getpixel((0, 0)) == (1, 2, 3)


# ------------------------------------------------------------------------------------ records a run never writes
def test_recon_report_on_odd_score_types_and_huge_values_is_a_report_not_a_traceback(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    odd = ["0.5", [0.1], True, None, {"a": 1}]
    records = [
        {
            "id": f"odd{i}",
            "status": "ok",
            "direction": "image-text-image",
            "scores": {"clip_similarity": v},
            "candidates": [
                {
                    "caption": "c",
                    "scores": {"clip_similarity": v},
                    "scores_per_image": {"clip_similarity": [v]},
                }
            ],
        }
        for i, v in enumerate(odd)
    ]
    records += [
        {"id": f"huge{i}", "status": "ok", "direction": "image-text-image", "scores": {"clip_similarity": v}}
        for i, v in enumerate([1e308, -1e308, 1e308, 7.0])
    ]
    records += [
        {"id": f"shape{i}", "status": "ok", "direction": "score", "scores": s}
        for i, s in enumerate(["x", [1, 2], None, 3.5, True])
    ]
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    env = dict(os.environ, PYTHONWARNINGS="error::RuntimeWarning")  # an overflow warning is a failure too
    r = subprocess.run(
        [sys.executable, "-m", "recon", "report", str(run)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "14 records, 14 ok, 0 failed" in page
    stats = re.search(r"<td>image-text-image</td><td>clip_similarity</td>.*?</tr>", page).group(0)
    cells = re.findall(r'<td class="num">([^<]*)</td>', stats)
    # n, mean (7 / 4: no overflow), std, median, min, max; the five odd values are missing / non-finite
    assert cells[0] == "4" and float(cells[1]) == pytest.approx(1e308 / 4 + 7 / 4, rel=1e-12)
    assert cells[3:] == ["5e+307", "-1e+308", "1e+308", "5", "0"]
    assert "Score distributions" in page and "inf" not in stats
    for shown in ("[0.1]", "True", "None"):  # an odd value is shown as the text it is
        assert f">{shown}</td>" in page
