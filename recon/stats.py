"""Uncertainty for caption metrics: bootstrap confidence intervals, paired tests, rank correlations.

Everything takes plain arrays and a ``seed``, and is deterministic given it. Confidence intervals are percentile
bootstrap intervals over items (images); resamples whose statistic is undefined (a constant resample of a
correlation) are dropped before taking percentiles. Paired tests compare two systems on the same images:
the difference's CI comes from resampling images, its p-value from a paired permutation test (the sign of each
image's difference is flipped at random; exact enumeration when there are few images; vectorised here because
scipy.stats.permutation_test took seconds per test at 1000 images -- tests check the two agree).
Correlation coefficients and their p-values are scipy's (``spearmanr``, ``kendalltau``). Many systems compared
pairwise on the same items share one set of draws (:func:`paired_tests`); Kendall's tau on resamples of tens of
thousands of judgments: :mod:`recon.kendall`.
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


def bootstrap_mean(
    values: Sequence[float],
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int | Sequence[int] = 0,
) -> Estimate:
    """Mean of ``values`` with a percentile bootstrap CI over items (non-finite values are dropped first)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    if x.size == 1:
        return Estimate(float(x[0]), float("nan"), float("nan"), 1)
    rng, step = _rng(seed), _chunk_rows(x.size)
    # drawn a chunk of resamples at a time: the same stream as one (n_resamples, n) draw, without its memory
    means = np.concatenate(
        [
            x[rng.integers(0, x.size, (min(step, n_resamples - i), x.size))].mean(axis=1)
            for i in range(0, n_resamples, step)
        ]
        or [np.zeros(0)]
    )
    lo, hi = _percentiles(means, confidence)
    return Estimate(float(x.mean()), lo, hi, int(x.size))


def _chunk_rows(n: int, elements: int = 1 << 18) -> int:
    """Rows of ``n`` values per chunk so a chunk holds about ``elements`` values (stays in cache, no page faults)."""
    return max(1, elements // max(n, 1))


def bootstrap_statistic(
    rows: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int | Sequence[int] = 0,
    chunk: int = 100,
) -> list[Estimate]:
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


def paired_test(
    a: Sequence[float],
    b: Sequence[float],
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int | Sequence[int] = 0,
    n_permutations: int = N_PERMUTATIONS,
) -> PairedTest:
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


def paired_tests(
    columns: np.ndarray,
    pairs: Sequence[tuple[int, int]],
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int | Sequence[int] = 0,
    n_permutations: int = N_PERMUTATIONS,
) -> list[PairedTest]:
    """:func:`paired_test` of ``columns[:, i]`` against ``columns[:, j]`` for each ``(i, j)`` in ``pairs`` (``columns
    [n, k]``: k systems on n items), all from one set of draws: the same bootstrap resamples and sign flips as
    :func:`paired_test` with this seed draws for each pair, applied to every pair at once (matrix products over the
    draws' counts and signs instead of one pass per pair). Equal to the loop up to float rounding of the means."""
    columns = np.asarray(columns, dtype=np.float64)
    n = columns.shape[0]
    exact = n <= 20 and 2**n <= n_permutations
    if not pairs or exact or n < 2 or not np.isfinite(columns).all():  # the loop's own paths (rare, or cheap)
        return [
            paired_test(columns[:, i], columns[:, j], n_resamples, confidence, seed, n_permutations)
            for i, j in pairs
        ]
    d = np.stack([columns[:, i] - columns[:, j] for i, j in pairs], axis=1)  # [n, pairs]
    rng, step = _rng(seed), _chunk_rows(n)  # bootstrap_mean's draws, as item counts per resample
    counts = [
        np.bincount(row, minlength=n)
        for i in range(0, n_resamples, step)
        for row in rng.integers(0, n, (min(step, n_resamples - i), n))
    ]
    means = np.array(counts, dtype=np.float64).reshape(n_resamples, n) @ d / n
    observed = np.abs(d.mean(0))
    tol = 1e-12 * np.maximum(1.0, np.abs(d).max(0))
    rng, hits, done = _rng(seed), np.zeros(len(pairs), dtype=np.int64), 0  # sign_flip_p_value's draws
    step = max(1, 4_000_000 // n)
    while done < n_permutations:
        m = min(step, n_permutations - done)
        signs = (rng.integers(0, 2, (m, n), dtype=np.int8) * 2 - 1).astype(np.float64)
        hits += np.sum(np.abs(signs @ d) / n >= observed - tol, axis=0)
        done += m
    out = []
    for k in range(len(pairs)):
        lo, hi = _percentiles(means[:, k], confidence)
        p = 1.0 if np.all(d[:, k] == 0) else (hits[k] + 1) / (n_permutations + 1)
        out.append(PairedTest(float(d[:, k].mean()), lo, hi, float(p), n))
    return out


def seeds_by_items_bootstrap(
    a: np.ndarray,
    b: np.ndarray | None = None,
    n_resamples: int = 2000,
    confidence: float = CONFIDENCE,
    seed: int | Sequence[int] = 0,
) -> PairedTest:
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


def seeds_by_items_t_interval(
    a: np.ndarray, b: np.ndarray | None = None, confidence: float = CONFIDENCE
) -> PairedTest:
    """Mean of ``a`` (or of ``a - b``) over a ``[seeds, items]`` grid, with an interval that holds at few seeds.

    The crossed random-effects model ``d[s, i] = mu + seed_s + item_i + e_si`` (every training seed scored on the
    same items) has ``Var(mean) = (var_seed + var_e / N) / S + var_item / N``: the variance of a seed's mean over the
    items, over ``S``, plus the shared items' part. From the two-way ANOVA mean squares (``E[MS_seed] = var_e +
    N var_seed``, ``E[MS_item] = var_e + S var_item``, ``E[MS_resid] = var_e``): ``A = MS_seed / (S N)`` -- the
    seed means' variance over ``S``, known to ``S - 1`` degrees of freedom -- and ``B = max(MS_item - MS_resid, 0)
    / (S N)`` -- the scenes' part, without the interaction ``A`` already holds, known to ``N - 1``. The half-width
    adds each part at its own t quantile in quadrature: ``sqrt(t(S-1)^2 A + t(N-1)^2 B)``, a t interval over seed
    means combined with the scenes' variance. Without scene effects it is exactly the t interval over seed means
    (t = 4.30 at three seeds, where the two-way bootstrap uses ~1.96 on 2/3 of the variance); the bootstrap also
    counts the interaction twice. Two variants were simulated first and under-cover at three seeds (see
    :func:`coverage_simulation`): Satterthwaite's single df (91% at a seed s.d. of 6 points) and the interaction
    put in ``B`` (91% with 0/1 outcomes). One seed: ``MS_item / N`` alone (the seed variance cannot be estimated;
    the interval then covers evaluation variance only). ``p_value`` (with ``b``): the smallest ``1 - confidence``
    whose interval excludes 0; ``n`` counts seeds.
    """
    d = (
        np.asarray(a, dtype=np.float64)
        if b is None
        else np.asarray(a, dtype=np.float64) - np.asarray(b, np.float64)
    )
    if d.ndim != 2:
        raise ValueError(f"expected a [seeds, items] grid, got shape {d.shape}")
    s, n = d.shape
    mean = float(d.mean())
    if n < 2:
        return PairedTest(mean, float("nan"), float("nan"), float("nan"), int(s))
    rows, cols = d.mean(1), d.mean(0)
    ms_item = s * float(((cols - mean) ** 2).sum()) / (n - 1)
    part_seeds, part_items = 0.0, ms_item / (s * n)
    if s > 1:
        ms_seed = n * float(((rows - mean) ** 2).sum()) / (s - 1)
        resid = d - rows[:, None] - cols[None, :] + mean
        ms_resid = float((resid**2).sum()) / ((s - 1) * (n - 1))
        part_seeds, part_items = ms_seed / (s * n), max(ms_item - ms_resid, 0.0) / (s * n)

    def half_width(level: float) -> float:
        q = 0.5 + level / 2
        seeds_q = float(st.t.ppf(q, s - 1)) if s > 1 else 0.0
        return float(np.sqrt(seeds_q**2 * part_seeds + float(st.t.ppf(q, n - 1)) ** 2 * part_items))

    half = half_width(confidence)
    if b is None:
        p = float("nan")
    elif part_seeds + part_items == 0:
        p = 1.0 if mean == 0 else 0.0
    elif mean == 0:
        p = 1.0
    else:
        from scipy.optimize import brentq

        gap = lambda alpha: half_width(1 - alpha) - abs(mean)  # noqa: E731 -- decreasing in alpha
        if gap(1e-12) < 0:
            p = 0.0
        elif gap(1 - 1e-12) >= 0:  # a mean within rounding of 0 (arms that differ on a handful of items)
            p = 1.0
        else:
            p = float(brentq(gap, 1e-12, 1 - 1e-12, xtol=1e-10))
    return PairedTest(mean, mean - half, mean + half, p, int(s))


SEED_INTERVALS = {"bootstrap": seeds_by_items_bootstrap, "t": seeds_by_items_t_interval}


def coverage_simulation(
    method: str | Callable[[np.ndarray], PairedTest],
    seeds: int,
    items: int,
    seed_sd: float,
    item_sd: float = 0.3,
    noise_sd: float = 0.3,
    reps: int = 200,
    confidence: float = CONFIDENCE,
    kind: str = "gaussian",
    seed: int = 0,
    n_resamples: int = 2000,
) -> dict:
    """How often an interval over a ``[seeds, items]`` grid contains the true mean, by simulation.

    ``gaussian``: ``d[s, i] = mu + seed_s + item_i + e_si`` with the three standard deviations (a paired
    difference in accuracy points: ``seed_sd`` 0.06 is six points between training seeds; items and noise of
    0.3 give a per-scene difference of s.d. ~0.42, as 0/1 outcomes do); truth ``mu`` = 0.05. ``binary``: 0/1
    outcomes ``y = [z < alpha + seed_s + item_i]`` with a probit link (``z``, ``seed_s``, ``item_i`` normal with s.d.
    1, ``seed_sd``, ``item_sd`` on the probit scale), truth ``Phi(alpha / sqrt(1 + item_sd^2 + seed_sd^2))`` = 0.7;
    ``noise_sd`` is unused. ``method``: a name in :data:`SEED_INTERVALS` or a function of the grid (``n_resamples``: the bootstrap's). Returns
    ``coverage`` (fraction of ``reps`` intervals containing the truth), ``mean_width`` and ``reps``."""
    fn = SEED_INTERVALS[method] if isinstance(method, str) else method
    rng = _rng([seed, seeds, items])
    hits, widths = 0, []
    for r in range(reps):
        a_s = rng.normal(0, seed_sd, (seeds, 1))
        b_i = rng.normal(0, item_sd, (1, items))
        if kind == "gaussian":
            truth = 0.05
            grid = truth + a_s + b_i + rng.normal(0, noise_sd, (seeds, items))
        elif kind == "binary":
            truth = 0.7
            alpha = st.norm.ppf(truth) * np.sqrt(1 + item_sd**2 + seed_sd**2)
            grid = (rng.normal(0, 1, (seeds, items)) < alpha + a_s + b_i).astype(np.float64)
        else:
            raise ValueError(f"kind={kind!r}: expected gaussian or binary")
        if fn is seeds_by_items_bootstrap:
            e = fn(grid, n_resamples=n_resamples, confidence=confidence, seed=r)
        elif fn is seeds_by_items_t_interval:
            e = fn(grid, confidence=confidence)
        else:
            e = fn(grid)
        hits += bool(e.low <= truth <= e.high)
        widths.append(e.high - e.low)
    return {"coverage": hits / reps, "mean_width": float(np.mean(widths)), "reps": reps}


def sign_flip_p_value(
    d: np.ndarray, n_permutations: int = N_PERMUTATIONS, seed: int | Sequence[int] = 0
) -> float:
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
        sx = np.sign(x[i : i + step, :, None] - x[i : i + step, None, :])
        sy = np.sign(y[i : i + step, :, None] - y[i : i + step, None, :])
        num = (sx * sy).sum((1, 2))
        den = np.sqrt(np.abs(sx).sum((1, 2)) * np.abs(sy).sum((1, 2)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i : i + step] = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
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


def correlation(
    x: Sequence[float],
    y: Sequence[float],
    method: str = "spearman",
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int | Sequence[int] = 0,
) -> Correlation:
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


def system_correlation(
    x: np.ndarray,
    y: np.ndarray,
    method: str = "spearman",
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int | Sequence[int] = 0,
) -> Correlation:
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
