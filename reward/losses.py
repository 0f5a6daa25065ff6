"""Reward-model losses (pure functions on tensors; the stage in ``reward/rm.py`` only calls them).

Pairwise ranking loss with the Llama 2 margin (Touvron et al. 2023, arXiv 2307.09288, eq. 2)::

    L = -log σ(r(x, y_c) - r(x, y_r) - m(rating))

The margin ``m`` grows with how much better the annotator said the chosen response is, so pairs
with a clear winner must be separated by more. The paper (appendix A.3.3) gives two variants:

    =========  ====================  ======  ===============  ====================
    variant    significantly better  better  slightly better  negligibly / unsure
    =========  ====================  ======  ===============  ====================
    small      1                     2/3     1/3              0
    large      3                     2       1                0
    =========  ====================  ======  ===============  ====================

Pairs without a rating (public data) get margin 0; a TRL preference row's own ``margin`` column
is used as is when a margin variant is on.

Safety auxiliary loss (Llama 2, Table 29): a binary safe/unsafe cross-entropy on
each response's score, read as ``P(safe) = σ(r)``. It is what makes the safety score usable as a
probability in the combined reward (``reward.combine``, threshold 0.15) and raised the recall of
unsafe responses (score < 0) from 73.0 to 90.4 in the paper.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from data.schemas import Comparison, Strength

if TYPE_CHECKING:
    import torch

MarginVariant = Literal["none", "small", "large"]

MARGINS: dict[str, dict[Strength, float]] = {
    "small": {Strength.SIGNIFICANTLY_BETTER: 1.0, Strength.BETTER: 2 / 3, Strength.SLIGHTLY_BETTER: 1 / 3,
              Strength.NEGLIGIBLY_BETTER: 0.0},
    "large": {Strength.SIGNIFICANTLY_BETTER: 3.0, Strength.BETTER: 2.0, Strength.SLIGHTLY_BETTER: 1.0,
              Strength.NEGLIGIBLY_BETTER: 0.0},
}


def margin_for(comparison: Comparison, variant: MarginVariant) -> float:
    """The margin m(r) of one comparison: from its strength rating, or a preference file's own margin."""
    if variant == "none":
        return 0.0
    if variant not in MARGINS:
        raise ValueError(f"unknown margin variant {variant!r}; expected none, small or large")
    if comparison.strength is not None:
        return MARGINS[variant][comparison.strength]
    explicit = comparison.meta.get("margin")
    return float(explicit) if explicit is not None else 0.0


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``-log σ(chosen - rejected - margin)``.

    chosen, rejected: [B] rewards of the preferred and the other response; margin: [B] or None (0).
    Returns a scalar.
    """
    import torch.nn.functional as F

    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    return -F.logsigmoid(diff).mean()


def safety_aux_loss(rewards: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of ``σ(reward)`` against the safe (1) / unsafe (0) label of each response.

    rewards: [N] scores; safe: [N] with 1 = safe, 0 = unsafe, -1 = no label (ignored).
    Returns the mean over labelled responses (a scalar; 0 when none is labelled).
    """
    import torch.nn.functional as F

    labelled = safe >= 0
    if not bool(labelled.any()):
        return rewards.sum() * 0.0  # keeps the graph (and the device) of the rewards
    return F.binary_cross_entropy_with_logits(rewards[labelled], safe[labelled].to(rewards.dtype))


def reward_stats(rewards: torch.Tensor) -> dict:
    """``{"mean", "std", "n"}`` of a 1-D tensor of rewards (population std), for normalisation later."""
    import torch

    x = rewards.detach().double().flatten()
    if x.numel() == 0:
        raise ValueError("no rewards to compute statistics from")
    return {"mean": float(x.mean()), "std": float(torch.sqrt(((x - x.mean()) ** 2).mean())), "n": int(x.numel())}
