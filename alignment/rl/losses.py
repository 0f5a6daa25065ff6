"""The two PPO losses (Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
arXiv:1707.06347), averaged over the response tokens of a minibatch.

All inputs are [B, R] with ``mask`` marking response tokens; each function returns a scalar loss
and a dict of scalar statistics (detached) for logging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignment.rl.stats import masked_mean

if TYPE_CHECKING:
    from torch import Tensor


def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)), rho_t = pi(y_t) / pi_old(y_t)
    (PPO eq. 7, negated to minimise).

    Statistics: ``clipfrac`` (share of tokens where the clipped term was taken), ``approx_kl``
    (k3 estimate of KL(pi_old || pi), how far this update moved the policy), ``ratio`` (mean rho)."""
    import torch

    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = 0.5 * mean_t max((V_t - G_t)^2, (V_old,t + clip(V_t - V_old,t, -c, c) - G_t)^2).

    The clipped term keeps the critic from moving far from the values the advantages were
    computed with (as in OpenAI baselines' ppo2; ``clip=None`` gives the plain squared error).
    Statistic: ``clipfrac`` (share of tokens where the clipped term was larger)."""
    import torch

    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(unclipped, mask), {"clipfrac": torch.zeros((), device=values.device)}
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats
