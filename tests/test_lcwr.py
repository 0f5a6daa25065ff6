"""Length-controlled win rate (alignment.evals.lcwr), against values computed by hand."""

from __future__ import annotations

import math

import pytest

from alignment.evals import lcwr


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_two_length_groups_fit_exactly():
    """Half the prompts A is longer (+10) and wins 80%; half it is shorter (-10) and wins 40%. The model
    fits both groups exactly: theta = (logit 0.8 + logit 0.4) / 2, so LC = sigma(0.4904) = 0.620 (raw 0.60)."""
    outcomes = [1.0] * 8 + [0.0] * 2 + [1.0] * 4 + [0.0] * 6
    diffs = [10.0] * 10 + [-10.0] * 10
    theta, phi = lcwr.fit(outcomes, diffs, ridge=0.0)
    t = math.tanh(10 / 10)  # the differences' standard deviation is 10
    assert theta == pytest.approx((_logit(0.8) + _logit(0.4)) / 2, abs=1e-6)
    assert phi * t == pytest.approx((_logit(0.8) - _logit(0.4)) / 2, abs=1e-6)
    assert lcwr.lc_win_rate(outcomes, diffs) == pytest.approx(1 / (1 + math.exp(-0.4904)), abs=2e-3)


def test_wins_that_come_from_length_vanish():
    """A wins exactly where it is much longer: raw 50%, but at equal length the judge would prefer B."""
    diffs = [float(d) for d in range(1, 41)]
    outcomes = [1.0 if d > 20 else 0.0 for d in diffs]
    res = lcwr.summarise(outcomes, [100 + d for d in diffs], [100.0] * 40, n_boot=200)
    assert sum(outcomes) / 40 == 0.5
    assert res["lc_win_rate"] < 0.2 and res["length_coef"] > 0
    assert res["mean_len_a"] == pytest.approx(120.5) and res["mean_len_b"] == 100.0 and res["n"] == 40


def test_no_length_difference_gives_the_raw_rate_and_ties_count_half():
    outcomes = [1.0, 0.5, 0.5, 0.0, 1.0, 1.0]
    res = lcwr.summarise(outcomes, [50] * 6, [50] * 6, n_boot=200)
    assert res["lc_win_rate"] == pytest.approx(4 / 6, abs=1e-6)
    assert res["ci_low"] <= res["lc_win_rate"] <= res["ci_high"]
    with pytest.raises(ValueError, match="every prompt"):
        lcwr.summarise([1.0], [1, 2], [1, 2])
