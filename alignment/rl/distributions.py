"""Log-probabilities and entropy of next-token distributions, from logits.

Shapes: ``logits`` [B, R, V] (the distribution over the vocabulary V before each of R response
tokens), ``tokens`` [B, R]. Computed in float32 whatever the model's dtype: the PPO ratio
exp(logp - old_logp) is sensitive to rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token] for each position: [B, R, V], [B, R] -> [B, R].

    Gathers the token's logit and subtracts logsumexp, without materialising the full
    log-softmax tensor (V is ~50k for real models)."""
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - logits.logsumexp(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy H = logsumexp(z) - sum softmax(z) * z of each position's distribution: [B, R, V] -> [B, R]."""
    import torch

    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return logits.logsumexp(-1) - (probs * logits).sum(-1)
