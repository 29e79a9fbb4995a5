"""oaif.stats against hand-computed values: the statistics behind `oaif eval`, `oaif annotate`,
the judges and the report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from oaif.stats import (bootstrap_ci, histogram, histogram_edges, length_stats, mean, outcomes, percentile, score,
                        sigmoid, wilson_interval)


def test_sigmoid_by_hand_and_in_the_tails():
    assert sigmoid(0.0) == 0.5
    assert sigmoid(2.0) == pytest.approx(0.8807970779778823, abs=1e-15)  # 1 / (1 + e^-2)
    assert sigmoid(-2.0) == pytest.approx(0.11920292202211755, abs=1e-15)
    for x in (0.3, 5.0, 36.0, 700.0):
        assert sigmoid(x) + sigmoid(-x) == pytest.approx(1.0, abs=1e-15)
    # past |x| ~ 709 math.exp overflows; the stable form saturates instead
    assert sigmoid(1e4) == 1.0 and sigmoid(-1e4) == 0.0 and sigmoid(-800.0) == 0.0
    assert sigmoid(math.inf) == 1.0 and sigmoid(-math.inf) == 0.0 and math.isnan(sigmoid(math.nan))


def test_mean_score_and_outcomes_count_a_tie_as_half():
    assert mean([]) is None and mean([1.0, 2.0, 4.0]) == pytest.approx(7 / 3)
    assert [score(p) for p in (1.0, 0.51, 0.5, 0.49, 0.0)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    o = outcomes([0.9, 0.5, 0.2, 0.7, 0.5])
    assert (o.wins, o.ties, o.losses, o.n) == (2, 2, 1, 5)
    assert o.rate == pytest.approx((2 + 2 * 0.5) / 5) and o.scores == (1.0, 0.5, 0.0, 1.0, 0.5)
    empty = outcomes([])
    assert empty.rate is None and empty.n == 0


def test_bootstrap_ci_known_small_cases():
    assert bootstrap_ci([1.0] * 7) == (1.0, 1.0)
    assert bootstrap_ci([]) is None
    # [0, 1]: resample means are 0, 1/2, 1 with probability 1/4, 1/2, 1/4 -> 2.5% and 97.5% quantiles 0 and 1
    assert bootstrap_ci([0.0, 1.0], n=1000, seed=0) == (0.0, 1.0)
    # [0, 0, 0, 1]: P(mean <= 1/2) = 0.949 < 0.975 < P(mean <= 3/4) = 0.996 -> [0, 3/4]
    assert bootstrap_ci([0.0, 0.0, 0.0, 1.0], n=1000, seed=0) == (0.0, 0.75)
    # 60 wins in 100: close to the normal interval 0.6 +- 1.96 * sqrt(0.24 / 100)
    lo, hi = bootstrap_ci([1.0] * 60 + [0.0] * 40, n=2000, seed=1)
    half = 1.959964 * math.sqrt(0.24 / 100)
    assert lo == pytest.approx(0.6 - half, abs=0.02) and hi == pytest.approx(0.6 + half, abs=0.02)
    assert bootstrap_ci([0.0, 1.0, 1.0], n=300, seed=5) == bootstrap_ci([0.0, 1.0, 1.0], n=300, seed=5)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_ci([1.0], n=0)


def test_wilson_interval_by_hand():
    lo, hi = wilson_interval(7, 10)
    # Wilson (1927) for p = 0.7, n = 10, z = 1.96: [0.3968, 0.8922]
    assert lo == pytest.approx(0.39676, abs=1e-4) and hi == pytest.approx(0.89222, abs=1e-4)
    # ties count half: 2.5 of 5 is p = 0.5, symmetric about 0.5: half-width 1.96 sqrt(0.05 + 0.0384) / 1.7683
    lo, hi = wilson_interval(2.5, 5)
    assert lo == pytest.approx(0.17042, abs=1e-4) and hi == pytest.approx(0.82958, abs=1e-4)
    # 0 of 5 and 5 of 5: clipped at the ends, mirror images
    assert wilson_interval(0, 5) == pytest.approx((0.0, 0.43448), abs=1e-4)
    assert wilson_interval(5, 5) == pytest.approx((0.56552, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) is None


def test_percentile_histogram_and_length_stats_by_hand():
    xs = [1, 2, 3, 4, 10]
    # linear interpolation between order statistics: position (n - 1) q / 100
    assert [percentile(xs, q) for q in (0, 10, 25, 50, 90, 100)] == pytest.approx([1.0, 1.4, 2.0, 3.0, 7.6, 10.0])
    rng = np.random.default_rng(0)
    for _ in range(5):
        ys = rng.normal(size=int(rng.integers(1, 30))).tolist()
        assert percentile(ys, 37) == pytest.approx(float(np.percentile(ys, 37)))
    assert percentile([], 50) is None
    assert histogram_edges(10, bins=5) == [0, 3, 6, 9, 12]  # width ceil(11 / 5) = 3
    assert histogram_edges(23, bins=12) == list(range(0, 26, 2))
    assert histogram_edges(0) == [0, 1]
    # [e_i, e_i+1); the last bin also takes its right edge; values past it are not counted
    assert histogram([0, 2, 3, 11, 12, 13], [0, 3, 6, 9, 12]) == [2, 1, 0, 2]
    s = length_stats(xs)
    assert (s["n"], s["mean"], s["median"], s["min"], s["max"]) == (5, 4.0, 3.0, 1.0, 10.0)
    assert s["p10"] == pytest.approx(1.4) and s["p90"] == pytest.approx(7.6)
    assert s["histogram"] == {"edges": list(range(12)), "counts": [0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1]}
    assert length_stats([])["mean"] is None and length_stats([])["histogram"]["counts"] == [0]
