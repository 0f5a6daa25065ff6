"""Which checkpoint an RL run returns: the one whose gain over the starting policy on validation
prompts is surely positive, not the one that happened to score highest.

Every evaluation scores the policy's greedy answers to the same validation prompts, so two
evaluations are paired prompt by prompt. For checkpoint k with per-prompt rewards r_k and the
starting policy's r_0, the gain is d = r_k - r_0 (per prompt); its lower confidence bound is

    lcb_k = mean(d) - z · sd(d) / sqrt(n)

(one-sided; z = 1.64 for 95%). The run returns the checkpoint with the highest lcb_k, and the
starting policy when no lcb_k is above ``min_delta``: then it *says so* (``returned: start``),
because the trained weights were evaluated and were not shown to be better. A plain "highest
mean" rule on a few prompts picks noise (the alignment benchmark's PPO round kept iteration 0 on
8 prompts by a 0.0000 margin and reported nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Gain:
    """A checkpoint's paired gain over the starting policy on the validation prompts."""

    n: int
    mean: float
    se: float
    lcb: float

    def as_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "se": self.se, "lcb": self.lcb}


def paired_gain(candidate: Sequence[float], start: Sequence[float], z: float) -> Gain:
    """Gain of ``candidate`` over ``start`` (rewards of the same prompts, in the same order)."""
    if len(candidate) != len(start):
        raise ValueError(f"paired rewards need the same prompts: {len(candidate)} vs {len(start)}")
    n = len(candidate)
    if n == 0:
        raise ValueError("no validation rewards to compare")
    d = [c - s for c, s in zip(candidate, start)]
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    se = sd / math.sqrt(n)
    return Gain(n, mean, se, mean - z * se)


def improves(gain: Gain, best: Gain | None, min_delta: float) -> bool:
    """Does this checkpoint replace the best so far (the starting policy when ``best`` is None)?"""
    if gain.lcb <= min_delta:
        return False
    return best is None or gain.lcb > best.lcb


def describe(best_iteration: int, gain: Gain | None) -> str:
    if not best_iteration or gain is None:
        return "returned the starting policy: no evaluated checkpoint beat it on the validation prompts by the selection rule"
    return (f"returned iteration {best_iteration}: validation gain {gain.mean:+.4f} ± {gain.se:.4f} (se, n={gain.n}), "
            f"lower bound {gain.lcb:+.4f}")
