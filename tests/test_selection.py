"""Keep-best's rule (alignment.rl.selection): paired gains over the starting policy, by hand."""

from __future__ import annotations

import math

import pytest

from alignment.rl.selection import Gain, describe, improves, paired_gain


def test_paired_gain_by_hand():
    g = paired_gain([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], z=1.64)
    # d = 1, 2, 3: mean 2, sample sd 1, se 1/sqrt(3)
    assert g.n == 3 and g.mean == pytest.approx(2.0) and g.se == pytest.approx(1 / math.sqrt(3))
    assert g.lcb == pytest.approx(2.0 - 1.64 / math.sqrt(3))
    assert paired_gain([0.5, 0.5], [0.25, 0.25], z=3.0).lcb == pytest.approx(0.25)  # no spread: the mean itself
    with pytest.raises(ValueError, match="same prompts"):
        paired_gain([1.0], [1.0, 2.0], z=1.0)


def test_noise_is_not_an_improvement():
    """+0.01 on average, but prompt by prompt it goes both ways: not kept (the start stays)."""
    start = [0.0] * 64
    noisy = [0.5 if i % 2 else -0.48 for i in range(64)]
    g = paired_gain(noisy, start, z=1.64)
    assert g.mean > 0 and g.lcb < 0
    assert not improves(g, None, 0.0)
    steady = [0.05 + (0.01 if i % 2 else -0.01) for i in range(64)]
    s = paired_gain(steady, start, z=1.64)
    assert improves(s, None, 0.0) and not improves(s, s, 0.0)  # must beat the best's bound, not tie it
    assert not improves(s, None, min_delta=0.06)
    assert improves(Gain(64, 0.2, 0.01, 0.18), s, 0.0)


def test_describe_says_when_the_start_came_back():
    assert "returned the starting policy" in describe(0, None)
    assert describe(20, Gain(64, 0.1, 0.02, 0.067)).startswith("returned iteration 20: validation gain +0.1000")
