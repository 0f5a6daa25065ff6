"""The scoring interface every consumer of rewards uses (PPO, rejection sampling, evals, rounds).

    class RewardScorer(Protocol):
        def score(self, prompts, responses) -> torch.Tensor   # [B] float32, on CPU

``prompts[i]`` is a conversation (a list of ``{role, content}`` ending with a user turn) and
``responses[i]`` the assistant's answer to it. Anything with that method is a scorer: a trained
reward model, an ensemble, the combined helpfulness/safety reward, or a plain function in a test
(:class:`FunctionScorer`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, Sequence, runtime_checkable

from data.schemas import Message

if TYPE_CHECKING:
    import torch


@runtime_checkable
class RewardScorer(Protocol):
    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> "torch.Tensor":
        """One scalar reward per (prompt, response) pair: a float32 tensor of shape [B] on CPU."""
        ...


class FunctionScorer:
    """A scorer from a Python function ``fn(prompt_messages, response) -> float`` (rule-based rewards, tests)."""

    def __init__(self, fn: Callable[[Sequence[Message], str], float]) -> None:
        self.fn = fn

    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> "torch.Tensor":
        import torch

        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return torch.tensor([float(self.fn(p, r)) for p, r in zip(prompts, responses)], dtype=torch.float32)
