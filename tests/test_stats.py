"""Bootstrap CIs, paired tests, rank correlations, and the leaderboard / correlation analysis built on them."""

import numpy as np
import pytest
from scipy import stats as st

from recon import stats
from recon.kendall import kendall_tau_resampled
from recon.scoring.tables import (
    compare_rules,
    correlations,
    leaderboard,
    leaderboard_markdown,
    rules_markdown,
)


def test_bootstrap_mean_is_deterministic_and_brackets_the_mean():
    x = np.random.default_rng(0).normal(1.0, 1.0, 200)
    a, b = stats.bootstrap_mean(x, seed=3), stats.bootstrap_mean(x, seed=3)
    assert a == b and a.n == 200 and a.value == pytest.approx(x.mean())
    assert a.low < a.value < a.high and a.high - a.low == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.2)
    assert stats.bootstrap_mean([np.nan, 2.0]).to_dict() == {"value": 2.0, "low": None, "high": None, "n": 1}


def test_paired_test_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, 100)
    shifted = stats.paired_test(base + 0.3 + rng.normal(0, 0.1, 100), base, seed=0)
    assert shifted.p_value < 0.01 and shifted.low > 0 and shifted.diff == pytest.approx(0.3, abs=0.05)
    same = stats.paired_test(base, base)
    assert same.p_value == 1.0 and same.diff == 0
    few = stats.paired_test([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])  # exact: 2^3 sign flips
    assert few.p_value == pytest.approx(0.25)


def test_sign_flip_p_value_equals_scipy_permutation_test_when_exact():
    rng = np.random.default_rng(7)
    for n in (5, 9, 12):
        a, b = rng.normal(0.3, 1, n), rng.normal(0, 1, n)
        ref = st.permutation_test(
            (a, b),
            lambda x, y, axis: np.mean(x - y, axis=axis),
            vectorized=True,
            permutation_type="samples",
            n_resamples=9999,
        ).pvalue
        assert stats.sign_flip_p_value(a - b) == pytest.approx(ref)


def test_correlations_equal_scipy_and_vectorised_bootstrap_matches_loops():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 6, 60).astype(float)
    y = x + rng.normal(0, 2, 60)
    for method, fn in (("spearman", st.spearmanr), ("kendall", st.kendalltau)):
        c = stats.correlation(x, y, method, n_resamples=300, seed=0)
        assert c.r == pytest.approx(fn(x, y).statistic) and c.p_value == pytest.approx(fn(x, y).pvalue)
        assert c.low < c.r < c.high
    idx = rng.integers(0, 60, (20, 60))
    for rows, fn in ((stats._spearman_rows, st.spearmanr), (stats._kendall_rows, st.kendalltau)):
        assert rows(x[idx], y[idx]) == pytest.approx([fn(x[i], y[i]).statistic for i in idx], abs=1e-12)
    assert stats.correlation([1, 1, 1, 1], [1, 2, 3, 4]).r is None or np.isnan(
        stats.correlation([1, 1, 1, 1], [1, 2, 3, 4]).r
    )


def test_system_correlation_uses_system_means():
    rng = np.random.default_rng(3)
    quality = np.array([0.1, 0.5, 0.9, 1.3])[:, None]
    x = quality + rng.normal(0, 0.2, (4, 50))
    y = 2 * quality + rng.normal(0, 0.2, (4, 50))
    c = stats.system_correlation(x, y, "kendall", n_resamples=200)
    assert c.r == pytest.approx(1.0) and c.n == 4 and c.high == pytest.approx(1.0)
    assert np.isnan(stats.system_correlation(x[:2], y[:2]).r)  # two systems: undefined


def test_holm():
    assert stats.holm([0.01, 0.04, np.nan, 0.03]) == pytest.approx([0.03, 0.06, np.nan, 0.06], nan_ok=True)


def _records(rng, systems=("weak", "good", "best"), n=40):
    recs = []
    for s, q in zip(systems, (0.0, 0.5, 1.0)):
        for i in range(n):
            r = rng.normal(q, 0.3)
            recs.append(
                {
                    "id": f"{s}/{i}",
                    "status": "ok",
                    "system": s,
                    "image_id": str(i),
                    "scores": {
                        "cider": r + rng.normal(0, 0.3),
                        "recon_clip_similarity": r,
                        "recon_lpips_distance": -r,
                    },
                }
            )
    recs.append({"id": "weak/x", "status": "failed", "error": "boom"})
    return recs


def test_leaderboard_orders_systems_and_pairs_them():
    recs = _records(np.random.default_rng(4))
    board = leaderboard(recs, ["weak", "good", "best"], n_resamples=200)
    assert board["systems"] == ["best", "good", "weak"] and board["primary"] == "recon_clip_similarity"
    assert board["metrics"][0].startswith("recon_") and board["counts"]["weak"] == {"ok": 40, "failed": 1}
    test = next(p for p in board["paired"] if (p["a"], p["b"], p["metric"]) == ("best", "weak", "cider"))
    assert test["diff"] > 0.5 and test["p_value"] < 0.01 and test["p_holm"] >= test["p_value"]
    md = leaderboard_markdown(board, ["a note | with a pipe"])
    assert "| cider (higher) |" in md and "recon_lpips_distance (lower)" in md and "best − weak" in md
    assert "a note \\| with a pipe" in md


def test_correlations_item_and_system_level():
    recs = _records(np.random.default_rng(5))
    res = correlations(recs, n_resamples=100)
    assert res["recon_metric"] == "recon_clip_similarity" and res["metrics"] == ["cider"]
    assert res["item"]["cider"]["spearman"]["r"] > 0.5 and res["item"]["cider"]["spearman"]["n"] == 120
    assert res["system"]["cider"]["kendall"]["r"] == pytest.approx(1.0)
    assert set(res["per_system"]) == {"weak", "good", "best"}
    with pytest.raises(ValueError, match="no reconstruction score"):
        correlations([{"status": "ok", "system": "a", "scores": {"cider": 1.0}}])


def test_compare_rules_tests_the_reference_against_each_rule():
    rng = np.random.default_rng(6)
    good = (rng.random(80) < 0.6).astype(float)
    rand = (rng.random(80) < 0.2).astype(float)
    table = compare_rules(
        {"reconstruction": {"acc": good}, "random": {"acc": rand}}, "reconstruction", n_resamples=300
    )
    (p,) = table["paired"]
    assert (
        p["b"] == "random" and p["diff"] == pytest.approx(good.mean() - rand.mean()) and p["p_value"] < 0.01
    )
    md = rules_markdown(table, "t")
    assert "**reconstruction**" in md and "reconstruction − random" in md


def test_seeds_by_items_bootstrap_covers_seed_and_item_variance():
    import numpy as np

    from recon.stats import seeds_by_items_bootstrap

    rng = np.random.default_rng(0)
    items = rng.normal(0, 1, 200)
    # three training seeds that shift every item by a seed effect: the interval must widen with that spread
    tight = np.stack([items, items, items])
    loose = np.stack([items - 1, items, items + 1])
    a, b = seeds_by_items_bootstrap(tight), seeds_by_items_bootstrap(loose)
    assert a.diff == pytest.approx(items.mean()) and b.diff == pytest.approx(items.mean())
    assert a.n == b.n == 3 and np.isnan(a.p_value)
    assert (b.high - b.low) > 2 * (a.high - a.low)
    # paired: a constant improvement of 0.5 on every seed and item is certain; no difference gives p = 1
    t = seeds_by_items_bootstrap(loose + 0.5, loose)
    assert t.diff == pytest.approx(0.5) and t.low == pytest.approx(0.5) and t.high == pytest.approx(0.5)
    assert t.p_value == 0.0
    assert seeds_by_items_bootstrap(loose, loose).p_value == 1.0
    with pytest.raises(ValueError, match="seeds, items"):
        seeds_by_items_bootstrap(items)


def test_seeds_by_items_t_interval_reduces_to_the_textbook_intervals():
    from recon.stats import seeds_by_items_t_interval

    rng = np.random.default_rng(0)
    items = rng.normal(0.1, 1, 200)
    one = seeds_by_items_t_interval(items[None])  # one seed: the items' t interval (evaluation variance only)
    assert (one.low, one.high) == pytest.approx(
        st.t.interval(0.95, 199, loc=items.mean(), scale=st.sem(items))
    )
    seed_means = np.array([0.2, 0.5, 0.35, 0.9])  # every item alike within a seed: the seeds' t interval
    by_seed = seeds_by_items_t_interval(np.repeat(seed_means[:, None], 50, axis=1))
    assert (by_seed.low, by_seed.high) == pytest.approx(
        st.t.interval(0.95, 3, loc=seed_means.mean(), scale=st.sem(seed_means))
    )
    loose = np.stack([items - 1, items, items + 1])
    t = seeds_by_items_t_interval(loose + 0.5, loose)  # a constant improvement is certain
    assert (t.diff, t.low, t.high, t.p_value) == pytest.approx((0.5, 0.5, 0.5, 0.0))
    assert seeds_by_items_t_interval(loose, loose).p_value == 1.0
    noisy = loose + rng.normal(0.05, 0.5, loose.shape)
    test = seeds_by_items_t_interval(noisy, loose)  # its p is where the interval reaches 0
    assert 0 < test.p_value < 1 and seeds_by_items_t_interval(
        noisy, loose, 1 - test.p_value
    ).low == pytest.approx(0, abs=1e-8)
    with pytest.raises(ValueError, match="seeds, items"):
        seeds_by_items_t_interval(items)


def test_coverage_simulation_finds_the_bootstrap_too_narrow_at_three_seeds_and_the_t_interval_nominal():
    """Small and fast (200 simulated experiments of 3 seeds x 100 items); the full table is in RESULTS.md."""
    from recon.stats import coverage_simulation

    large = dict(seeds=3, items=100, seed_sd=0.12, reps=200, seed=0)
    boot = coverage_simulation("bootstrap", **large, n_resamples=300)
    t = coverage_simulation("t", **large)
    none = coverage_simulation("t", **{**large, "seed_sd": 0.0})
    assert boot["coverage"] < 0.9 <= 0.92 <= t["coverage"] <= 0.99 and 0.92 <= none["coverage"] <= 0.99
    assert t["mean_width"] > boot["mean_width"] and boot["reps"] == 200
    binary = coverage_simulation("t", 5, 100, 0.2, kind="binary", reps=100, seed=0)
    assert 0.88 <= binary["coverage"] <= 1.0
    with pytest.raises(ValueError, match="gaussian or binary"):
        coverage_simulation("t", 3, 10, 0.1, kind="poisson", reps=1)


# ------------------------------------------------------------------------ metaeval's resampled statistics
def _cluster_draws(clusters: np.ndarray, n_resamples: int, seed) -> list[np.ndarray]:
    """Row indices of each bootstrap resample of whole clusters, expanded (as metaeval drew them before)."""
    codes = np.unique(clusters, return_inverse=True)[1]
    members = [np.flatnonzero(codes == c) for c in range(codes.max() + 1)]
    rng = np.random.default_rng(seed)
    return [
        np.concatenate([members[c] for c in rng.integers(0, len(members), len(members))])
        for _ in range(n_resamples)
    ]


def _scipy_taus(x, y, draws, variant):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array([st.kendalltau(x[i], y[i], variant=variant).statistic for i in draws])


@pytest.mark.parametrize("variant", ["b", "c"])
def test_kendall_tau_resampled_is_scipys_bit_for_bit_on_every_resample(variant):
    rng = np.random.default_rng(5)
    n = 240
    human = rng.integers(1, 5, n).astype(float)  # a 1-4 scale: ties galore
    clusters = np.sort(rng.integers(0, 60, n))
    xs = np.stack(
        [
            human + rng.normal(0, 1.5, n),  # continuous
            np.round(rng.normal(0, 1, n), 1),  # ties in x too
            -human,  # x coarser than y's complement: the roles swap
            np.full(n, 0.5),
        ]
    )  # constant: NaN, as scipy
    draws = _cluster_draws(clusters, 15, [3, 15])
    codes = np.unique(clusters, return_inverse=True)[1]
    c, rng = codes.max() + 1, np.random.default_rng([3, 15])
    counts = np.array([np.bincount(rng.integers(0, c, c), minlength=c) for _ in range(15)])
    got = kendall_tau_resampled(xs, human, counts, codes, variant, chunk=4)
    for x, taus in zip(xs, got):
        ref = _scipy_taus(x, human, draws, variant)
        assert np.array_equal(taus, ref, equal_nan=True)  # identical floats, not approximately equal
    # rows as their own groups, some drawn twice or never
    counts = np.random.default_rng(1).integers(0, 3, (5, n))
    draws = [np.repeat(np.arange(n), c) for c in counts]
    assert np.array_equal(
        kendall_tau_resampled(xs[0], human, counts, variant=variant)[0],
        _scipy_taus(xs[0], human, draws, variant),
    )


def test_rating_table_takes_its_intervals_from_the_same_resamples_as_before():
    from recon.scoring.metaeval import _interval, rating_table

    rng = np.random.default_rng(8)
    human = rng.integers(1, 6, 150).astype(float)
    clusters = np.repeat(np.arange(50), 3)
    values = {"a": human + rng.normal(0, 1, 150), "b": human + rng.normal(0, 2, 150)}
    table = rating_table(values, human, clusters, "c", 40, 2)
    draws = _cluster_draws(clusters, 40, [2, 15])
    reps = {m: _scipy_taus(x, human, draws, "c") for m, x in values.items()}
    for m in values:
        assert (table["rows"][m]["low"], table["rows"][m]["high"]) == _interval(reps[m], stats.CONFIDENCE)
    assert (table["paired"][0]["low"], table["paired"][0]["high"]) == _interval(
        reps["a"] - reps["b"], stats.CONFIDENCE
    )


def test_paired_tests_equal_a_paired_test_per_pair_and_bootstrap_mean_its_one_shot_draw():
    rng = np.random.default_rng(4)
    columns = rng.choice([0.0, 0.5, 1.0], (400, 4)) * 400 / 950
    pairs = [(0, 1), (0, 3), (2, 3)]
    for (i, j), t in zip(pairs, stats.paired_tests(columns, pairs, 300, seed=[1, 99], n_permutations=999)):
        ref = stats.paired_test(columns[:, i], columns[:, j], 300, seed=[1, 99], n_permutations=999)
        assert t.p_value == ref.p_value and t.n == ref.n and t.diff == ref.diff
        assert (t.low, t.high) == pytest.approx((ref.low, ref.high), abs=1e-12)
    x = rng.normal(0, 1, 3000)
    idx = np.random.default_rng(9).integers(
        0, 3000, (700, 3000)
    )  # bootstrap_mean draws in chunks: same numbers
    assert stats.bootstrap_mean(x, 700, seed=9) == stats.Estimate(
        float(x.mean()), *stats._percentiles(x[idx].mean(1), 0.95), 3000
    )


def test_seeds_by_items_t_interval_p_value_when_the_mean_is_rounding_error():
    from recon.stats import seeds_by_items_t_interval

    # arms equal but for items whose differences cancel up to rounding: 0.1 + 0.2 - 0.3 = 5.6e-17, not 0 (the
    # E1 re-check's report met such a mean and the root finder had no sign change)
    a, b = np.zeros((5, 400)), np.zeros((5, 400))
    a[:, 0], a[:, 1], b[:, 2] = 0.1, 0.2, 0.3  # in every seed: the items' variance is real, the mean is not
    t = seeds_by_items_t_interval(a, b)
    assert t.diff != 0 and abs(t.diff) < 1e-15 and t.low < 0 < t.high
    assert t.p_value > 0.99
