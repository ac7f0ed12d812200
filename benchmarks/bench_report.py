"""report.html at scale: size and time against the number of rows (score records, no images).

For each row count: ``write_report`` seconds, the size of ``report.html`` and of ``report-rows.js`` beside it (rows
past GALLERY_INLINE_ROWS go there), and, with Chromium on PATH, the wall seconds of a headless Chromium opening the
page sorted by a metric at its middle page (start-up included), checking the page it shows. Printed as a Markdown
table.

    python benchmarks/bench_report.py                   # 1k, 10k, 100k rows, 12 metrics
    python benchmarks/bench_report.py --rows 1000,5000 --metrics 4
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.report import GALLERY_PAGE_ROWS, GALLERY_ROWS_FILE, write_report  # noqa: E402


def records(n: int, metrics: int) -> list[dict]:
    rng = random.Random(0)
    names = [f"metric_{j:02d}" for j in range(metrics)]
    return [
        {
            "id": f"system{i % 3}/{i:06d}.jpg",
            "status": "ok",
            "direction": "score",
            "system": f"system{i % 3}",
            "image_id": f"{i:06d}",
            "caption": f"a person riding a bicycle down a street number {i}",
            "scores": {m: rng.random() for m in names},
            "warnings": [],
        }
        for i in range(n)
    ]


def browse_seconds(page: Path, fragment: str, tmp: Path) -> tuple[float, str]:
    chromium = next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    if chromium is None:
        return float("nan"), ""
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp / 'p'}",
            "--dump-dom",
            f"{page.resolve().as_uri()}#{fragment}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return time.perf_counter() - t0, r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1000,10000,100000")
    ap.add_argument("--metrics", type=int, default=12)
    args = ap.parse_args()
    print(
        f"score records, {args.metrics} metrics, ~50-character captions, no images; {GALLERY_PAGE_ROWS} rows a "
        "page\n"
    )
    print("| rows | write_report (s) | report.html | report-rows.js | Chromium, sorted, middle page (s) |")
    print("| --- | --- | --- | --- | --- |")
    for n in [int(x) for x in args.rows.split(",")]:
        recs = records(n, args.metrics)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            t0 = time.perf_counter()
            page = write_report(tmp, recs, {"name": "bench"})
            t_write = time.perf_counter() - t0
            side = tmp / GALLERY_ROWS_FILE
            middle = max(1, n // GALLERY_PAGE_ROWS // 2)
            t_browse, dom = browse_seconds(page, f"sort=metric_03&dir=desc&page={middle}", tmp)
            ok = (
                bool(re.search(rf"page {middle} of {max(1, -(-n // GALLERY_PAGE_ROWS))}", dom))
                if dom
                else None
            )
            print(
                f"| {n:,} | {t_write:.1f} | {page.stat().st_size / 1e6:.2f} MB | "
                f"{side.stat().st_size / 1e6:.1f} MB |"
                if side.exists()
                else f"| {n:,} | {t_write:.1f} | {page.stat().st_size / 1e6:.2f} MB | — |",
                end="",
            )
            print(f" {t_browse:.1f}{'' if ok in (None, True) else ' (WRONG PAGE)'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
