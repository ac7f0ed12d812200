"""Uncertainty for caption metrics: bootstrap confidence intervals, paired tests, rank correlations.

Everything takes plain arrays and a ``seed``, and is deterministic given it. Confidence intervals are percentile
bootstrap intervals over items (images); resamples whose statistic is undefined (a constant resample of a
correlation) are dropped before taking percentiles. Paired tests compare two systems on the same images:
the difference's CI comes from resampling images, its p-value from a paired permutation test (the sign of each
image's difference is flipped at random; exact enumeration when there are few images; vectorised here because
scipy.stats.permutation_test took seconds per test at 1000 images -- tests check the two agree).
Correlation coefficients and their p-values are scipy's (``spearmanr``, ``kendalltau``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as st

N_RESAMPLES = 1000
# Permutations of a paired test: enough that p-values survive a Holm adjustment over a few hundred tests
# (the smallest attainable p is 1 / (N_PERMUTATIONS + 1)).
N_PERMUTATIONS = 9999
CONFIDENCE = 0.95
CORRELATIONS = ("spearman", "kendall")


class _Result:
    def to_dict(self) -> dict:
        """JSON-ready: NaN (undefined) becomes None."""
        return {k: _clean(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Estimate(_Result):
    """A statistic with its percentile bootstrap interval (NaN bounds when ``n`` is too small)."""

    value: float
    low: float
    high: float
    n: int


def _clean(v):
    return None if isinstance(v, float) and not np.isfinite(v) else v


def _rng(seed: int | Sequence[int]) -> np.random.Generator:
    return np.random.default_rng(seed)


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_mean(values: Sequence[float], n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                   seed: int | Sequence[int] = 0) -> Estimate:
    """Mean of ``values`` with a percentile bootstrap CI over items (non-finite values are dropped first)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    if x.size == 1:
        return Estimate(float(x[0]), float("nan"), float("nan"), 1)
    idx = _rng(seed).integers(0, x.size, (n_resamples, x.size))
    lo, hi = _percentiles(x[idx].mean(axis=1), confidence)
    return Estimate(float(x.mean()), lo, hi, int(x.size))


def bootstrap_statistic(rows: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray],
                        n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                        seed: int | Sequence[int] = 0, chunk: int = 100) -> list[Estimate]:
    """A statistic of a whole set of items that is not a mean (corpus BLEU), with percentile bootstrap CIs:
    ``rows [n, ...]`` are the items; ``statistic([R, n, ...]) -> [R, k]`` computes it per resample (k values).
    Resamples are drawn and evaluated ``chunk`` at a time, so memory stays ``chunk * n`` rows."""
    rows = np.asarray(rows, dtype=np.float64)
    n = rows.shape[0]
    full = np.asarray(statistic(rows[None]), dtype=np.float64)[0]
    if n < 2:
        return [Estimate(float(v), float("nan"), float("nan"), n) for v in full]
    rng, samples = _rng(seed), []
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, (min(chunk, n_resamples - start), n))
        samples.append(np.asarray(statistic(rows[idx]), dtype=np.float64))
    samples = np.concatenate(samples)
    return [Estimate(float(v), *_percentiles(samples[:, j], confidence), n) for j, v in enumerate(full)]


@dataclass(frozen=True)
class PairedTest(_Result):
    """``mean(a - b)`` over paired items with its bootstrap CI and a two-sided permutation p-value."""

    diff: float
    low: float
    high: float
    p_value: float
    n: int


def paired_test(a: Sequence[float], b: Sequence[float], n_resamples: int = N_RESAMPLES,
                confidence: float = CONFIDENCE, seed: int | Sequence[int] = 0,
                n_permutations: int = N_PERMUTATIONS) -> PairedTest:
    """Compare two systems scored on the same items (pairs with a non-finite value are dropped).

    ``n_resamples`` bootstrap resamples give the CI of the mean difference; ``n_permutations`` random sign
    flips the p-value (all ``2^n`` of them when that is fewer).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    if d.size < 2:
        diff = float(d.mean()) if d.size else float("nan")
        return PairedTest(diff, float("nan"), float("nan"), float("nan"), int(d.size))
    est = bootstrap_mean(d, n_resamples, confidence, seed)
    p = 1.0 if np.all(d == 0) else sign_flip_p_value(d, n_permutations, seed)
    return PairedTest(est.value, est.low, est.high, p, int(d.size))


def seeds_by_items_bootstrap(a: np.ndarray, b: np.ndarray | None = None, n_resamples: int = 2000,
                             confidence: float = CONFIDENCE, seed: int | Sequence[int] = 0) -> PairedTest:
    """Mean of ``a`` (or of ``a - b``) over a ``[seeds, items]`` grid, with a two-way bootstrap CI.

    For training runs evaluated on shared items: each resample draws training seeds and items independently
    (a crossed design: every seed saw the same items), so the interval covers both training-seed and evaluation
    variance. ``b`` on the same grid is paired: the same draws for both. ``p_value`` is the two-sided bootstrap
    p of a zero difference, ``2 * min(P(d* <= 0), P(d* >= 0))`` (``nan`` without ``b``); ``n`` counts seeds.
    """
    a = np.asarray(a, dtype=np.float64)
    d = a if b is None else a - np.asarray(b, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"expected a [seeds, items] grid, got shape {d.shape}")
    s, n = d.shape
    rng = _rng(seed)
    rows, cols = rng.integers(0, s, (n_resamples, s)), rng.integers(0, n, (n_resamples, n))
    means = np.stack([d[r][:, c].mean() for r, c in zip(rows, cols)])
    lo, hi = _percentiles(means, confidence)
    p = float("nan") if b is None else min(1.0, 2 * min(np.mean(means <= 0), np.mean(means >= 0)))
    return PairedTest(float(d.mean()), lo, hi, p, int(s))


def sign_flip_p_value(d: np.ndarray, n_permutations: int = N_PERMUTATIONS, seed: int | Sequence[int] = 0) -> float:
    """Two-sided paired permutation test of ``mean(d) = 0``: each pair's two values are swapped at random (the
    sign of its difference flipped). Exact over all ``2^n`` flips when that is at most ``n_permutations``;
    otherwise ``(1 + #{|mean of flipped d| >= |mean d|}) / (1 + n_permutations)`` (never 0)."""
    d = np.asarray(d, dtype=np.float64)
    n, observed = d.size, abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))  # float noise must not turn a tie into a miss
    if n <= 20 and 2**n <= n_permutations:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ d) / n >= observed - tol))
    rng, hits, done = _rng(seed), 0, 0
    step = max(1, 4_000_000 // n)
    while done < n_permutations:
        m = min(step, n_permutations - done)
        signs = rng.integers(0, 2, (m, n), dtype=np.int8) * 2 - 1
        hits += int(np.sum(np.abs(signs @ d) / n >= observed - tol))
        done += m
    return (hits + 1) / (n_permutations + 1)


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair of ``[B, n]`` arrays (average ranks for ties, as scipy.stats.spearmanr)."""
    rx, ry = st.rankdata(x, axis=-1), st.rankdata(y, axis=-1)
    rx -= rx.mean(-1, keepdims=True)
    ry -= ry.mean(-1, keepdims=True)
    den = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1), np.nan)


PAIRWISE_MAX_N = 300  # Kendall by pairwise signs (vectorised) up to this n; scipy per resample above it


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair of ``[B, n]`` arrays (as scipy.stats.kendalltau's default)."""
    n = x.shape[-1]
    if n > PAIRWISE_MAX_N:
        return np.array([st.kendalltau(a, b).statistic for a, b in zip(x, y)], dtype=np.float64)
    out = np.empty(x.shape[0])
    step = max(1, 4_000_000 // (n * n))
    for i in range(0, x.shape[0], step):
        sx = np.sign(x[i:i + step, :, None] - x[i:i + step, None, :])
        sy = np.sign(y[i:i + step, :, None] - y[i:i + step, None, :])
        num = (sx * sy).sum((1, 2))
        den = np.sqrt(np.abs(sx).sum((1, 2)) * np.abs(sy).sum((1, 2)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i:i + step] = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    return out


def _rows(method: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    if method == "spearman":
        return _spearman_rows
    if method == "kendall":
        return _kendall_rows
    raise ValueError(f"correlation {method!r}: expected one of {CORRELATIONS}")


def _test(method: str, x: np.ndarray, y: np.ndarray):
    return st.spearmanr(x, y) if method == "spearman" else st.kendalltau(x, y)


@dataclass(frozen=True)
class Correlation(_Result):
    """A rank correlation coefficient, scipy's p-value and a bootstrap CI over items."""

    method: str
    r: float
    p_value: float
    low: float
    high: float
    n: int


def correlation(x: Sequence[float], y: Sequence[float], method: str = "spearman", n_resamples: int = N_RESAMPLES,
                confidence: float = CONFIDENCE, seed: int | Sequence[int] = 0) -> Correlation:
    """Spearman or Kendall correlation of paired values (pairs with a non-finite value are dropped)."""
    rows = _rows(method)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    nan = float("nan")
    if x.size < 3:
        return Correlation(method, nan, nan, nan, nan, int(x.size))
    with warnings.catch_warnings():  # constant inputs: scipy warns and returns NaN, which we report as is
        warnings.simplefilter("ignore")
        test = _test(method, x, y)
    idx = _rng(seed).integers(0, x.size, (n_resamples, x.size))
    lo, hi = _percentiles(rows(x[idx], y[idx]), confidence)
    return Correlation(method, float(test.statistic), float(test.pvalue), lo, hi, int(x.size))


def system_correlation(x: np.ndarray, y: np.ndarray, method: str = "spearman", n_resamples: int = N_RESAMPLES,
                       confidence: float = CONFIDENCE, seed: int | Sequence[int] = 0) -> Correlation:
    """Correlation of system means: ``x``, ``y`` are ``[systems, images]`` scores on the same images.

    The CI resamples images (columns), recomputing every system's mean, so it reflects how stable the ranking
    of systems is on a test set of this size. Images with a non-finite value for any system are dropped.
    """
    rows = _rows(method)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"expected two [systems, images] arrays of one shape, got {x.shape} and {y.shape}")
    keep = np.isfinite(x).all(0) & np.isfinite(y).all(0)
    x, y = x[:, keep], y[:, keep]
    nan = float("nan")
    if x.shape[0] < 3 or x.shape[1] < 1:
        return Correlation(method, nan, nan, nan, nan, int(x.shape[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        test = _test(method, x.mean(1), y.mean(1))
    idx = _rng(seed).integers(0, x.shape[1], (n_resamples, x.shape[1]))
    mx = np.stack([x[:, i].mean(1) for i in idx])  # [B, systems]
    my = np.stack([y[:, i].mean(1) for i in idx])
    lo, hi = _percentiles(rows(mx, my), confidence)
    return Correlation(method, float(test.statistic), float(test.pvalue), lo, hi, int(x.shape[0]))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN), for reading many paired tests at once."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()
