"""``recon metaeval``'s statistics at the sizes of the judgment sets: time against size, one core.

Synthetic scores shaped like each set (judgments, judged images, the human scale, the statistic), 12 metrics,
1,000 bootstrap resamples of images, printed as a Markdown table:

  * ``rating_table`` (Kendall tau with CIs and 66 paired differences from one bootstrap) at Flickr8k-Expert,
    Composite and Flickr8k-CF sizes and a doubling series; beside it the previous implementation (``scipy.stats.
    kendalltau`` on every expanded resample), timed on ``--old-resamples`` resamples and scaled to 1,000, and a
    check that both give the same taus bit for bit on those resamples;
  * ``pair_table`` (accuracy per category with CIs, 66 paired tests with 9,999 sign flips) at PASCAL-50S and FOIL
    sizes, beside the previous one (a paired test per pair) where it finishes in reasonable time.

    OMP_NUM_THREADS=1 python benchmarks/bench_metaeval_stats.py            # ~3 min on a busy core
    OMP_NUM_THREADS=1 python benchmarks/bench_metaeval_stats.py --quick    # small sizes only
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy.stats import kendalltau  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon import stats  # noqa: E402
from recon.kendall import kendall_tau_resampled  # noqa: E402
from recon.scoring.metaeval import pair_table, rating_table  # noqa: E402

METRICS = 12
# (name, judgments, images, human scale, tau variant); the scale: ratings 1..k, or "cf" (yes fractions of 3-8 votes)
RATING_SETS = [
    ("Composite", 12_000, 4_000, 5, "c"),
    ("Flickr8k-Expert", 18_000, 1_000, 4, "c"),
    ("Flickr8k-CF", 48_000, 1_000, "cf", "b"),
]
SERIES = [("Expert-shaped", n, max(1, n // 18), 4, "c") for n in (2_250, 4_500, 9_000, 18_000, 36_000)]
# (name, pairs, images, categories)
PAIR_SETS = [("PASCAL-50S", 4_000, 1_000, ["HC", "HI", "HM", "MM"]), ("FOIL", 32_000, 32_000, ["foil"])]


def rating_data(n: int, images: int, scale, seed: int = 0):
    rng = np.random.default_rng(seed)
    clusters = np.sort(rng.integers(0, images, n))
    if scale == "cf":
        votes = rng.integers(3, 9, n)
        human = rng.binomial(votes, rng.uniform(0, 1, n)) / votes
    else:
        human = rng.integers(1, scale + 1, n).astype(float)
    values = {f"metric{j:02d}": human + rng.normal(0, 0.5 + 0.2 * j, n) for j in range(METRICS)}
    values["metric11"] = np.round(values["metric11"], 1)  # a metric with ties, as BLEU's zeros
    return values, human, clusters


def old_taus(
    values: dict, human: np.ndarray, clusters: np.ndarray, variant: str, n_resamples: int, seed: int
) -> np.ndarray:
    """The previous rating_table's resampled taus: expand each resample, call scipy."""
    _, codes = np.unique(clusters, return_inverse=True)
    order = np.argsort(codes, kind="stable")
    members = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)
    rng = np.random.default_rng([seed, 15])
    draws = [
        np.concatenate([members[c] for c in rng.integers(0, len(members), len(members))])
        for _ in range(n_resamples)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array(
            [[kendalltau(x[i], human[i], variant=variant).statistic for i in draws] for x in values.values()]
        )


def new_taus(
    values: dict, human: np.ndarray, clusters: np.ndarray, variant: str, n_resamples: int, seed: int
) -> np.ndarray:
    codes = np.unique(clusters, return_inverse=True)[1]
    c = codes.max() + 1
    rng = np.random.default_rng([seed, 15])
    counts = np.array([np.bincount(rng.integers(0, c, c), minlength=c) for _ in range(n_resamples)])
    return kendall_tau_resampled(np.stack(list(values.values())), human, counts, codes, variant)


def old_pair_table(correct, categories, clusters, names, n_resamples, seed):
    """The previous pair_table: a per-cluster loop and one paired test per pair."""

    def per_cluster(x, mask):
        _, codes = np.unique(clusters[mask], return_inverse=True)
        order = np.argsort(codes, kind="stable")
        members = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)
        return np.array([x[mask][i].sum() for i in members]) * len(members) / max(int(mask.sum()), 1)

    groups = {"all": np.ones(len(categories), bool), **{c: categories == c for c in names}}
    for j, x in enumerate(correct.values()):
        for k, mask in enumerate(groups.values()):
            stats.bootstrap_mean(per_cluster(x, mask), n_resamples, seed=[seed, j, k])
    for a, b in itertools.combinations(correct, 2):
        stats.paired_test(
            per_cluster(correct[a], groups["all"]),
            per_cluster(correct[b], groups["all"]),
            n_resamples,
            seed=[seed, 99],
        )


def timed(fn, *args) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of ``fn(*args)``: CPU time is what one core spent, whatever the neighbours do."""
    t, c = time.perf_counter(), time.process_time()
    fn(*args)
    return time.process_time() - c, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument(
        "--old-resamples",
        type=int,
        default=10,
        help="resamples the previous implementation is timed on (scaled to --resamples)",
    )
    ap.add_argument("--quick", action="store_true", help="the doubling series up to 9k and PASCAL-50S only")
    args = ap.parse_args()
    r, r_old = args.resamples, args.old_resamples
    print(
        f"{METRICS} metrics, {r} resamples, 1 thread, CPU seconds (wall in brackets); previous implementation "
        f"timed on {r_old} resamples, scaled\n"
    )
    print(
        "| set | judgments | images | statistic | CPU s (wall) | previous CPU s (scaled) | speed-up | "
        "taus = scipy's |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    sets = [s for s in SERIES if s[1] <= 9_000] if args.quick else RATING_SETS + SERIES
    for name, n, images, scale, variant in sets:
        values, human, clusters = rating_data(n, images, scale)
        t_new, w_new = timed(rating_table, values, human, clusters, variant, r, 0)
        t0 = time.process_time()
        old = old_taus(values, human, clusters, variant, r_old, 0)
        t_old = (time.process_time() - t0) * r / r_old
        same = np.array_equal(old, new_taus(values, human, clusters, variant, r_old, 0), equal_nan=True)
        print(
            f"| {name} | {n:,} | {images:,} | tau-{variant} | {t_new:.1f} ({w_new:.1f}) | {t_old:.0f} | "
            f"{t_old / t_new:.0f}x | {'yes' if same else 'NO'} |",
            flush=True,
        )
    print("\n| set | pairs | images | CPU s (wall) | previous CPU s | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, n, images, cats in PAIR_SETS[:1] if args.quick else PAIR_SETS:
        rng = np.random.default_rng(1)
        correct = {
            f"metric{j:02d}": rng.choice([0.0, 0.5, 1.0], n, p=[0.3, 0.05, 0.65]) for j in range(METRICS)
        }
        categories = rng.choice(cats, n)
        clusters = np.arange(n) if images == n else np.sort(rng.integers(0, images, n))
        t_new, w_new = timed(pair_table, correct, categories, clusters, cats, r, 0)
        if n <= 8_000:
            t_old, _ = timed(old_pair_table, correct, categories, clusters, cats, r, 0)
            old = f"{t_old:.1f} | {t_old / t_new:.0f}x"
        else:
            old = "— (not run: ~66 x 9,999 x images sign flips) | —"
        print(f"| {name} | {n:,} | {images:,} | {t_new:.1f} ({w_new:.1f}) | {old} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
