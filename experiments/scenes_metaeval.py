"""Does the reconstruction score beat CLIPScore where text-side scores are bags of words? (issue 22; pre-registered
in experiments/RESULTS_METAEVAL.md, "the compositional scenes world").

    python experiments/scenes_metaeval.py --out runs/scenes-metaeval --n 300 --seeds 0,1,2 --jobs 2

Runs ``recon metaeval --scenes N --preset scenes --seed S --metrics recon,clipscore`` once per seed (each seed its
own scenes and generation noise; ``--jobs`` runs at a time, one thread each; a rerun resumes them), then pools the
seeds' true-vs-altered pairs: per category, each metric's pair accuracy and each ``recon_*`` metric minus CLIPScore
with 95% bootstrap CIs over (seed, scene) — ``recon.scoring.metaeval.pair_table``, the statistics ``recon
metaeval`` prints — plus each seed alone, and the ceiling: the scenes judge reading the original image and scoring
each caption's claims exactly, and ``recon_judge_similarity``: the reconstruction score with the judge as the image
similarity (:func:`judge_similarity`). ``--analyze-only`` skips the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from recon.scoring.metaeval import pair_table
from recon.scoring.metaeval_dir import scores_by_caption, slot_captions
from recon.shapes import scenes as S
from recon.shapes.scenes_judgments import CATEGORIES

JUDGE = "judge_ceiling"
TEXT_SIDE = "clipscore"


def run_seed(out: Path, n: int, seed: int, preset: str, extra: list[str]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "recon",
        "metaeval",
        "--scenes",
        str(n),
        "--preset",
        preset,
        "--seed",
        str(seed),
        "--metrics",
        "recon,clipscore",
        "--out",
        str(out),
        "--threads",
        "1",
        "--no-progress",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = out.with_suffix(".log")
    with open(log, "a") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"seed {seed}: `{' '.join(cmd)}` exited {rc}; see {log}")


def judge_scores(out: Path, scenes: list[dict], judge_dir: Path) -> dict[tuple[str, str], float]:
    """The ceiling: the judge reads each original image; a caption scores 1 when its claims match the judged scene
    exactly, plus a tenth of its mean partial scores (object / attribute F1, binding, relation, count)."""
    import torch
    from PIL import Image

    from recon.shapes.metrics import to_tensor
    from recon.shapes.scenes_train import load_judge

    judge = load_judge(judge_dir)
    images = torch.cat(
        [
            to_tensor(np.asarray(Image.open(out / "judgments" / "images" / s["image"]).convert("RGB"))[None])
            for s in scenes
        ]
    )
    with torch.no_grad():
        judged = judge.predict(images)
    table = {}
    for s, seen in zip(scenes, judged):
        for c in s["candidates"]:
            sc = S.score_claims(S.parse_caption(c["caption"]), seen)
            partial = [v for k, v in sc.items() if k != "exact" and v is not None]
            table[(c["caption"], s["image"])] = float(sc["exact"]) + 0.1 * float(
                np.mean(partial) if partial else 0
            )
    return table


def judge_similarity(out: Path, judge_dir: Path) -> dict[tuple[str, str], float]:
    """``recon_judge_similarity`` (post hoc, from the saved reconstructions): the judge reads the original and the
    reconstruction; the similarity is the fraction of the five readings (background, each cell's object or
    emptiness with its shape, colour and size) on which they agree. The image similarity of an exact reader: it
    separates what the generator gets wrong from what CLIP's image embedding or SSIM cannot see."""
    import torch
    from PIL import Image

    from recon.shapes.metrics import to_tensor
    from recon.shapes.scenes_train import load_judge

    run = out / "runs" / "ExpertAnnotations" / "recon"
    caption_of = slot_captions(out, "ExpertAnnotations")
    rows = [
        r
        for r in map(json.loads, (run / "results.jsonl").read_text().splitlines())
        if r.get("status") == "ok" and r.get("images")
    ]
    judge = load_judge(judge_dir)

    def read(paths: list[Path]) -> list:
        x = torch.cat([to_tensor(np.asarray(Image.open(p).convert("RGB"))[None]) for p in paths])
        with torch.no_grad():
            return judge.predict(x)

    originals = read([run / r["original"] for r in rows])
    recons = iter(read([run / p for r in rows for p in r["images"]]))
    table = {}
    for r, a in zip(
        rows, originals
    ):  # K reconstructions: the mean agreement, as recon averages its similarities
        agree = [
            np.mean([a.background == b.background] + [x == y for x, y in zip(a.layout, b.layout)])
            for b in (next(recons) for _ in r["images"])
        ]
        table[(caption_of[(r["system"], r["image_id"])], r["image_id"])] = float(np.mean(agree))
    return table


def right(a: float, b: float) -> float:
    return float(a > b) + 0.5 * float(a == b)


def pairs_of(out: Path, seed: int, judge_dir: Path | None, keys: bool = False) -> tuple:
    """(categories, clusters, metric -> correctness) of one seed's true-vs-altered pairs; with ``keys`` also each
    pair's ``(category, image, altered caption)``."""
    scenes = json.loads((out / "judgments" / "judgments.json").read_text())["scenes"]
    score = scores_by_caption(out)
    if not score:
        raise ValueError(f"{out}: no scored caption in its runs/ (did `recon metaeval --scenes` finish?)")
    judged = judge_scores(out, scenes, judge_dir) if judge_dir is not None else {}
    if judge_dir is not None:
        for key, v in judge_similarity(out, judge_dir).items():
            score.setdefault(key, {})["recon_judge_similarity"] = v
    metrics = sorted({m for v in score.values() for m in v})
    cats, clusters, pair_keys, correct = [], [], [], {m: [] for m in [*metrics, *([JUDGE] if judged else [])]}
    for s in scenes:
        by_code = {c["code"]: c for c in s["candidates"]}
        for c in s["candidates"]:
            if c["category"] is None:
                continue
            true = by_code["true-count" if c["category"] == "count-change" else "true-detailed"]
            a, b = (true["caption"], s["image"]), (c["caption"], s["image"])
            if (
                a not in score
                or b not in score
                or any(m not in score[a] or m not in score[b] for m in metrics)
            ):
                continue  # a failed item: left out (counted in n)
            cats.append(c["category"])
            clusters.append(f"{seed}/{s['image']}")
            pair_keys.append((c["category"], s["image"], c["caption"]))
            for m in metrics:
                correct[m].append(right(score[a][m], score[b][m]))
            if judged:
                correct[JUDGE].append(right(judged[a], judged[b]))
    return (cats, clusters, correct, pair_keys) if keys else (cats, clusters, correct)


def seconds(out: Path) -> dict[str, float]:
    """CPU-side wall seconds per metric run of the Expert file (where every caption is scored first)."""
    t = {}
    for run in (out / "runs" / "ExpertAnnotations").iterdir():
        f = run / "timing.json"
        if f.is_file():
            t[run.name] = round(sum(json.loads(f.read_text()).get("seconds", {}).values()), 1)
    return t


def analyze(root: Path, seeds: list[int], n_resamples: int, judge_dir: Path | None) -> dict:
    cats, clusters, correct, per_seed, compute = [], [], {}, {}, {}
    for seed in seeds:
        out = root / f"seed-{seed}"
        c, cl, cor = pairs_of(out, seed, judge_dir)
        cats += c
        clusters += cl
        for m, v in cor.items():
            correct.setdefault(m, []).extend(v)
        per_seed[seed] = {
            m: {cat: float(np.mean([x for x, k in zip(v, c) if k == cat])) for cat in CATEGORIES if cat in c}
            for m, v in cor.items()
        }
        compute[seed] = seconds(out)
    arrays = {m: np.asarray(v, dtype=np.float64) for m, v in correct.items()}
    table = pair_table(arrays, np.asarray(cats), np.asarray(clusters), list(CATEGORIES), n_resamples, seed=0)
    return {
        "seeds": seeds,
        "n_pairs": len(cats),
        "n_scenes": len(set(clusters)),
        "table": table,
        "per_seed": per_seed,
        "compute_seconds": compute,
    }


def compare_k(k1: Path, k4: Path, n_resamples: int, judge_dir: Path | None) -> dict:
    """K = 1 (``k1``, a seed's run) vs K = 4 (``k4``: the same seed with ``--limit`` and
    ``generator.images_per_caption=4``) on the pairs both scored: per category accuracy, ``_k1`` / ``_k4``."""
    runs = [pairs_of(d, 0, judge_dir, keys=True) for d in (k1, k4)]
    common = sorted(set(runs[0][3]) & set(runs[1][3]))
    correct, cats = {}, []
    for tag, (c, _, cor, keys) in zip(("k1", "k4"), runs):
        where = {k: i for i, k in enumerate(keys)}
        for m, v in cor.items():
            if m != JUDGE:
                correct[f"{m}_{tag}"] = np.asarray([v[where[k]] for k in common])
        cats = [c[where[k]] for k in common]
    clusters = np.asarray([k[1] for k in common])
    table = pair_table(correct, np.asarray(cats), clusters, list(CATEGORIES), n_resamples, seed=0)
    return {"n_pairs": len(common), "table": table}


def markdown(res: dict) -> str:
    rows, by_cat = res["table"]["rows"], res["table"]["paired_by_category"]
    metrics = [m for m in rows if m != JUDGE] + ([JUDGE] if JUDGE in rows else [])
    cats = [c for c in CATEGORIES if c in rows[metrics[0]]]
    out = [
        f"Pooled over seeds {res['seeds']}: {res['n_pairs']} pairs on {res['n_scenes']} scenes; 95% bootstrap "
        "CIs over (seed, scene).",
        "",
        "| category | n | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for c in ["all", *cats]:
        cells = [rows[m][c] for m in metrics]
        out.append(
            f"| {c} | {cells[0]['n']} | "
            + " | ".join(f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]" for e in cells)
            + " |"
        )
    out += [
        "",
        f"Reconstruction minus {TEXT_SIDE} (paired, same resamples):",
        "",
        "| category | " + " | ".join(m for m in metrics if m.startswith("recon_")) + " |",
        "|---|" + "---|" * sum(m.startswith("recon_") for m in metrics),
    ]
    for c in ["all", *cats]:
        pairs = res["table"]["paired"] if c == "all" else by_cat[c]
        cells = []
        for m in [m for m in metrics if m.startswith("recon_")]:
            p = next(p for p in pairs if {p["a"], p["b"]} == {m, TEXT_SIDE})
            sgn = 1 if p["a"] == m else -1
            lo, hi = (p["low"], p["high"]) if sgn == 1 else (-p["high"], -p["low"])
            cells.append(f"{sgn * p['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Each seed alone (accuracy):",
        "",
        "| seed | metric | " + " | ".join(cats) + " |",
        "|---|---|" + "---|" * len(cats),
    ]
    for seed, by_metric in res["per_seed"].items():
        for m in metrics:
            out.append(
                f"| {seed} | {m} | "
                + " | ".join(f"{by_metric[m].get(c, float('nan')):.3f}" for c in cats)
                + " |"
            )
    out += [
        "",
        "Seconds per metric run (Expert file, where every caption is scored first): "
        + "; ".join(f"seed {s}: {t}" for s, t in res["compute_seconds"].items()),
    ]
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    """Pair accuracy per category and metric with 95% CIs, as grouped bars (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["table"]["rows"]
    metrics = [
        m
        for m in ("clipscore", "recon_clip_similarity", "recon_ssim_similarity", "recon_judge_similarity")
        if m in rows
    ]
    cats = [c for c in CATEGORIES if c in rows[metrics[0]]]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        v = np.array([rows[m][c]["value"] for c in cats])
        lo = v - np.array([rows[m][c]["low"] for c in cats])
        hi = np.array([rows[m][c]["high"] for c in cats]) - v
        ax.bar(
            np.arange(len(cats)) + (j - (len(metrics) - 1) / 2) * width,
            v,
            width,
            yerr=[lo, hi],
            capsize=2,
            label=m,
        )
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(cats)), cats)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("pair accuracy (true caption preferred)")
    ax.set_title(
        f"Scenes judgment set, {res['n_scenes']} scenes over seeds {res['seeds']}: 95% bootstrap CIs"
    )
    ax.legend(fontsize=8, ncol=len(metrics), loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--preset", default="scenes")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument(
        "--judge",
        type=Path,
        default=None,
        help="the judge folder for the ceiling (default: the scenes bundle's; 'none' to skip)",
    )
    p.add_argument("--analyze-only", action="store_true")
    p.add_argument(
        "--plot", type=Path, default=None, metavar="PNG", help="also draw the per-category bars (matplotlib)"
    )
    p.add_argument(
        "--k4",
        type=Path,
        default=None,
        metavar="DIR",
        help="also compare K = 1 (seed 0's run) with this K = 4 metaeval run of seed 0 on their common pairs",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], help="passed to recon metaeval")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.analyze_only:
        extra = [x for o in args.overrides for x in ("--set", o)]
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(lambda s: run_seed(args.out / f"seed-{s}", args.n, s, args.preset, extra), seeds))
    if args.judge is None:
        from recon.hub import builtin_path

        judge = builtin_path("builtin:scenes/judge")
    else:
        judge = None if str(args.judge) == "none" else args.judge
    res = analyze(args.out, seeds, args.resamples, judge)
    (args.out / "summary.json").write_text(json.dumps(res, indent=1) + "\n")
    text = markdown(res)
    if args.k4 is not None:
        cmp = compare_k(args.out / "seed-0", args.k4, args.resamples, judge)
        res["k1_vs_k4"] = cmp
        rows = cmp["table"]["rows"]
        text += (
            f"\nK = 1 vs K = 4 on the same {cmp['n_pairs']} pairs (seed 0):\n\n| category | "
            + " | ".join(rows)
            + " |\n|---|"
            + "---|" * len(rows)
            + "\n"
        )
        for c in ["all", *[c for c in CATEGORIES if c in next(iter(rows.values()))]]:
            text += (
                f"| {c} | "
                + " | ".join(
                    f"{rows[m][c]['value']:.3f} [{rows[m][c]['low']:.3f}, {rows[m][c]['high']:.3f}]"
                    for m in rows
                )
                + " |\n"
            )
        (args.out / "summary.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "summary.md").write_text(text)
    if args.plot is not None:
        plot(res, args.plot)
    print(text)
    return 0


if __name__ == "__main__":
    from recon.scoring.experiment_data import run_script

    run_script(main, "scenes_metaeval")
