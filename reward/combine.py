"""The combined reward: one scalar from a helpfulness and a safety score.

Llama 2, eq. 4 (section 3.2.3)::

    R_c(g | p) = R_s(g | p)   if IS_SAFETY(p) or R_s(g | p) < 0.15
               = R_h(g | p)   otherwise
    R~_c       = WHITEN(LOGIT(R_c(g | p)))

R_s and R_h are the reward models' scores read as probabilities (σ of the scalar output), so
the 0.15 threshold is a probability of being safe: a response the safety model finds clearly
unsafe is scored by the safety model even on a helpfulness prompt (precision 0.89 / recall 0.55
on unsafe responses in the paper). LOGIT turns the probability back into a score.
:func:`llama2_combined` returns LOGIT(R_c); :func:`whiten` is separate because PPO whitens with
global (or running) statistics, not per call.

Alternative (safe-rlhf, PKU-Alignment, PPO-Lagrangian): a reward model and a *cost* model,
combined as ``reward - λ·cost``. Our safety model scores "higher = safer", so
:class:`CombinedScorer` uses ``cost = -safety score``. Here λ is the fixed ``lam`` (``reward.cost_weight``):
that is what rejection sampling, GRPO and the win-rate judge rank by. The PPO stage learns λ
instead (PPO-Lagrangian, :mod:`alignment.rl.lagrangian`): it takes the helpfulness and safety
scores from ``score_detailed`` and keeps two critics; ``combined`` with the fixed λ is then only
its logged and held-out measure.

Rules are a registry (:data:`RULES`: name -> function of the two scores, the safety flags, the
threshold and λ): a new rule is one function and one line there; ``reward.rule``, ``align score
--rule`` and every scorer built by ``reward.config.build_scorer`` accept it.

Departure from the paper: LOGIT is computed on probabilities clamped to [1e-6, 1 - 1e-6], so a
score beyond about ±13.8 is clipped there instead of becoming ±inf.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from data.schemas import Message
from reward.scorer import RewardScorer, Scorer

if TYPE_CHECKING:
    import torch

LOGIT_EPS = 1e-6


def _flags(is_safety: torch.Tensor | Sequence[bool] | None, n: int) -> torch.Tensor:
    import torch

    if is_safety is None:
        return torch.zeros(n, dtype=torch.bool)
    flags = torch.as_tensor(is_safety, dtype=torch.bool).flatten()
    if flags.numel() != n:
        raise ValueError(f"is_safety has {flags.numel()} flags for {n} responses")
    return flags


def llama2_combined(
    r_help: torch.Tensor, r_safe: torch.Tensor, is_safety: torch.Tensor | Sequence[bool] | None, threshold: float = 0.15
) -> torch.Tensor:
    """Llama 2 eq. 4 before whitening: LOGIT(R_c).

    r_help, r_safe: [B] raw scores of the helpfulness and safety reward models; is_safety: [B]
    bool (the prompt is a safety prompt) or None (none is); threshold: on σ(r_safe).
    Returns [B] float32: r_safe where the prompt is a safety prompt or σ(r_safe) < threshold,
    else r_help (up to the clamp of LOGIT).
    """
    import torch

    if r_help.shape != r_safe.shape or r_help.dim() != 1:
        raise ValueError(f"r_help and r_safe must be 1-D of the same length, got {tuple(r_help.shape)} and {tuple(r_safe.shape)}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold is a probability in (0, 1), got {threshold}")
    p_help = torch.sigmoid(r_help.double())
    p_safe = torch.sigmoid(r_safe.double())
    use_safety = _flags(is_safety, r_help.numel()).to(p_safe.device) | (p_safe < threshold)
    r_c = torch.where(use_safety, p_safe, p_help)
    return torch.logit(r_c, eps=LOGIT_EPS).float()


def whiten(x: torch.Tensor, mean: float | torch.Tensor | None = None, std: float | torch.Tensor | None = None,
           eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(std² + eps)``; batch mean and population std of ``x`` unless given.

    x: [B] (any shape: statistics are over all elements). Returns the same shape.
    """
    import torch

    m = x.mean() if mean is None else torch.as_tensor(mean, dtype=x.dtype)
    s = x.std(unbiased=False) if std is None else torch.as_tensor(std, dtype=x.dtype)
    return (x - m) / torch.sqrt(s * s + eps)


def safe_rlhf_combined(reward: torch.Tensor, cost: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """safe-rlhf's Lagrangian objective per response: ``reward - λ·cost``.

    reward, cost: [B]; lam: a float or a 0-d tensor (λ ≥ 0). Returns [B]."""
    return reward - lam * cost


def _llama2_rule(helpful: torch.Tensor, safety: torch.Tensor, is_safety: torch.Tensor | Sequence[bool] | None,
                 threshold: float, lam: float) -> torch.Tensor:
    return llama2_combined(helpful, safety, is_safety, threshold)


def _safe_rlhf_rule(helpful: torch.Tensor, safety: torch.Tensor, is_safety: torch.Tensor | Sequence[bool] | None,
                    threshold: float, lam: float) -> torch.Tensor:
    _flags(is_safety, len(helpful))  # the same validation for every rule
    return safe_rlhf_combined(helpful, -safety, lam)


Rule = Callable[..., "torch.Tensor"]  # (helpful [B], safety [B], is_safety, threshold, lam) -> combined [B]
RULES: dict[str, Rule] = {
    "llama2": _llama2_rule,  # eq. 4: the safety score on safety prompts or below the threshold, else the helpfulness score
    "safe_rlhf": _safe_rlhf_rule,  # helpful - λ·cost, cost = -safety score
}


class CombinedScorer(Scorer):
    """A :class:`~reward.scorer.RewardScorer` over a helpfulness and a safety scorer.

    ``rule="llama2"``: :func:`llama2_combined` (safety prompts and clearly unsafe responses are
    scored by the safety model). ``rule="safe_rlhf"``: ``helpful - λ·cost`` with
    ``cost = -safety``. Scores are returned unwhitened: consumers whiten with global statistics.
    """

    def __init__(self, helpful: RewardScorer, safety: RewardScorer, rule: str = "llama2",
                 threshold: float = 0.15, lam: float = 1.0) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; expected one of: {', '.join(repr(r) for r in RULES)}")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold is a probability in (0, 1), got {threshold}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.helpful, self.safety, self.rule, self.threshold, self.lam = helpful, safety, rule, threshold, lam

    def score_detailed(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str],
                       is_safety: torch.Tensor | Sequence[bool] | None = None) -> dict[str, torch.Tensor]:
        """``{"helpful", "safety", "combined"}``: [B] float32 tensors on CPU."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        r_help = self.helpful.score(prompts, responses).float().cpu()
        r_safe = self.safety.score(prompts, responses).float().cpu()
        combined = RULES[self.rule](r_help, r_safe, is_safety, self.threshold, self.lam)
        return {"helpful": r_help, "safety": r_safe, "combined": combined}

    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str],
              is_safety: torch.Tensor | Sequence[bool] | None = None) -> torch.Tensor:
        """The combined reward, [B] float32 on CPU (unwhitened)."""
        return self.score_detailed(prompts, responses, is_safety)["combined"]
