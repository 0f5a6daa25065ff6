"""From per-sequence scores to per-token advantages: KL-shaped rewards and GAE.

Layout: responses are right-padded; ``mask`` [B, R] is 1 on every sampled token up to and
including EOS, 0 after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row: [B, R] -> [B] (0 for an all-zero row)."""
    import torch

    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).argmax(dim=1)


def kl_shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """r_t = -beta * KL_t on every response token, plus the sequence's score on its last token.

    The reward model judges the whole response, so its score is given where the response ends
    (at EOS, or at the length limit); the KL penalty keeps every token close to the reference
    (Ziegler et al. 2019; Llama 2 eq. 4 uses R - beta * KL).

    scores [B], kl [B, R], mask [B, R] -> rewards [B, R] (0 on padding)."""
    import torch

    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438).

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last token = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns_t = A_t + V_t                          (the critic's regression target)

    rewards, values, mask: [B, R] -> (advantages [B, R], returns [B, R]), both 0 on padding."""
    import torch

    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns
