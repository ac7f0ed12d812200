"""Post-hoc breakdown of `recon metaeval --shapes` runs (experiments/RESULTS_METAEVAL.md).

    python experiments/metaeval_breakdown.py runs/metaeval-shapes \
        --k1 runs/metaeval-shapes-k1-100 --k4 runs/metaeval-shapes-k4

Reads the runs' score records back through the slot files (no model runs): FOIL accuracy by foiled attribute,
within-scene pairwise accuracy per pair of wrong-attribute counts, a CLIP + SSIM combination, and K = 1 vs K = 4
reconstructions on the same scenes with `recon.scoring.metaeval`'s own statistics (bootstrap over scenes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

from recon import stats
from recon.scoring.metaeval import pair_table, rating_table
from recon.scoring.metaeval_dir import scores_by_caption
from recon.shapes.judgments import EXPERT_SCORE

METRICS = ("recon_clip_similarity", "recon_ssim_similarity", "clipscore")


def right(a: float, b: float) -> float:
    return float(a > b) + 0.5 * float(a == b)


def breakdown(out: Path) -> None:
    scenes = json.loads((out / "judgments" / "judgments.json").read_text())["scenes"]
    score = scores_by_caption(out)
    if not score:
        raise ValueError(f"{out}: no scored caption in its runs/ (did `recon metaeval --shapes` finish?)")
    metrics = [m for m in METRICS if m in next(iter(score.values()))]
    print(
        "## FOIL accuracy by foiled attribute\n\n| attribute | n | "
        + " | ".join(metrics)
        + " |\n|---|---|"
        + "---|" * len(metrics)
    )
    by_attr: dict[str, list] = {}
    for s in scenes:
        ok, foil = (score[(c["caption"], s["image"])] for c in s["candidates"][:2])
        by_attr.setdefault(s["candidates"][1]["changes"][0]["attribute"], []).append(
            [right(ok[m], foil[m]) for m in metrics]
        )
    for attr, rows in sorted(by_attr.items()):
        cells = [stats.bootstrap_mean(np.array(rows)[:, j], seed=j) for j in range(len(metrics))]
        print(
            f"| {attr} | {len(rows)} | "
            + " | ".join(f"{e.value:.2f} [{e.low:.2f}, {e.high:.2f}]" for e in cells)
            + " |"
        )
    print(
        "\n## Within-scene pairwise accuracy (the caption with fewer wrong attributes scores higher)\n\n"
        "| wrong a vs b | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics)
    )
    per_scene = {m: np.zeros(len(scenes)) for m in metrics}
    for i in range(6):
        for j in range(i + 1, 6):
            cells = []
            for m in metrics:
                v = [
                    right(
                        score[(s["candidates"][i]["caption"], s["image"])][m],
                        score[(s["candidates"][j]["caption"], s["image"])][m],
                    )
                    for s in scenes
                ]
                per_scene[m] += np.array(v) / 15
                e = stats.bootstrap_mean(v, seed=6 * i + j)
                cells.append(f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]")
            print(f"| {i} vs {j} | " + " | ".join(cells) + " |")
    print(
        "\nAll 15 pairs, mean per scene: "
        + "; ".join(
            f"{m} {(e := stats.bootstrap_mean(per_scene[m], seed=1)).value:.3f} [{e.low:.3f}, {e.high:.3f}]"
            for m in metrics
        )
    )
    t = stats.paired_test(per_scene["recon_clip_similarity"], per_scene["clipscore"], seed=2)
    print(
        f"recon_clip_similarity - clipscore: {t.diff:+.3f} [{t.low:+.3f}, {t.high:+.3f}], permutation "
        f"p={t.p_value:.3f}"
    )
    keys = [(c["caption"], s["image"]) for s in scenes for c in s["candidates"]]
    truth = [5 - c["n_wrong"] for s in scenes for c in s["candidates"]]
    z = {
        m: (lambda v: (v - v.mean()) / v.std())(np.array([score[k][m] for k in keys]))
        for m in ("recon_clip_similarity", "recon_ssim_similarity")
    }
    print(
        "\nCF tau_b of z(recon_clip) + z(recon_ssim): "
        f"{kendalltau(z['recon_clip_similarity'] + z['recon_ssim_similarity'], truth).statistic:.3f}"
    )


def compare_k(k1: Path, k4: Path) -> None:
    runs = {"K=1": k1, "K=4": k4}
    scenes = json.loads((k1 / "judgments" / "judgments.json").read_text())["scenes"]
    tabs = {k: scores_by_caption(p) for k, p in runs.items()}
    scenes = [
        s for s in scenes if all((s["candidates"][0]["caption"], s["image"]) in t for t in tabs.values())
    ]
    keys = [(c["caption"], s["image"]) for s in scenes for c in s["candidates"]]
    clusters = np.array([image for _, image in keys])
    metrics = ("recon_clip_similarity", "recon_ssim_similarity")
    values = {f"{m} {k}": np.array([tabs[k][key][m] for key in keys]) for m in metrics for k in runs}
    truths = {
        "CF tau_b": ([5 - c["n_wrong"] for s in scenes for c in s["candidates"]], "b"),
        "Expert tau_c": ([EXPERT_SCORE[c["n_wrong"]] for s in scenes for c in s["candidates"]], "c"),
    }
    print(f"\n## K = 1 vs K = 4 reconstructions on the same {len(scenes)} scenes\n")
    for title, (truth, variant) in truths.items():
        t = rating_table(values, np.array(truth, float), clusters, variant, 1000, 0)
        print(
            f"{title}: "
            + "; ".join(
                f"{v} {r['value']:.3f} [{r['low']:.3f}, {r['high']:.3f}]" for v, r in t["rows"].items()
            )
        )
        for p in t["paired"]:
            if p["a"].split()[0] == p["b"].split()[0]:
                print(
                    f"  {p['b']} - {p['a']}: {-p['diff']:+.3f} [{-p['high']:+.3f}, {-p['low']:+.3f}] "
                    f"p={p['p_value']:.3f}"
                )
    correct, cats, pair_clusters = {}, [], []
    for s in scenes:
        for i in range(6):
            for j in range(i + 1, 6):
                cats.append(f"{i}v{j}")
                pair_clusters.append(s["image"])
                for v in values:
                    m, k = v.split()
                    correct.setdefault(v, []).append(
                        right(
                            tabs[k][(s["candidates"][i]["caption"], s["image"])][m],
                            tabs[k][(s["candidates"][j]["caption"], s["image"])][m],
                        )
                    )
    t = pair_table(
        {k: np.array(v) for k, v in correct.items()},
        np.array(cats),
        np.array(pair_clusters),
        sorted(set(cats)),
        1000,
        0,
    )
    print(
        "within-scene pairwise accuracy, all 15 pairs: "
        + "; ".join(
            f"{v} {r['all']['value']:.3f} [{r['all']['low']:.3f}, {r['all']['high']:.3f}]"
            for v, r in t["rows"].items()
        )
    )
    for p in t["paired"]:
        if p["a"].split()[0] == p["b"].split()[0]:
            print(
                f"  {p['b']} - {p['a']}: {-p['diff']:+.3f} [{-p['high']:+.3f}, {-p['low']:+.3f}] "
                f"p={p['p_value']:.3f}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a `recon metaeval --shapes` output folder")
    parser.add_argument("--k1", type=Path, default=None, help="K = 1 run on a subset (with --k4)")
    parser.add_argument("--k4", type=Path, default=None, help="K = 4 run on the same subset")
    args = parser.parse_args()
    breakdown(args.run)
    if args.k1 and args.k4:
        compare_k(args.k1, args.k4)
