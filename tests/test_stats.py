"""Bootstrap CIs, paired tests, rank correlations, and the leaderboard / correlation analysis built on them."""

import numpy as np
import pytest
from scipy import stats as st

from recon import stats
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
        ref = st.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), vectorized=True,
                                  permutation_type="samples", n_resamples=9999).pvalue
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
    assert stats.correlation([1, 1, 1, 1], [1, 2, 3, 4]).r is None or np.isnan(stats.correlation([1, 1, 1, 1],
                                                                                                [1, 2, 3, 4]).r)


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
            recs.append({"id": f"{s}/{i}", "status": "ok", "system": s, "image_id": str(i),
                         "scores": {"cider": r + rng.normal(0, 0.3), "recon_clip_similarity": r,
                                    "recon_lpips_distance": -r}})
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
    table = compare_rules({"reconstruction": {"acc": good}, "random": {"acc": rand}}, "reconstruction",
                          n_resamples=300)
    (p,) = table["paired"]
    assert p["b"] == "random" and p["diff"] == pytest.approx(good.mean() - rand.mean()) and p["p_value"] < 0.01
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
