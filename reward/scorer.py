"""The scoring interface every consumer of rewards uses (PPO, GRPO, rejection sampling, win rates, rounds).

    class RewardScorer(Protocol):
        def score(self, prompts, responses, is_safety=None) -> torch.Tensor           # [B], on CPU
        def score_detailed(self, prompts, responses, is_safety=None) -> dict[str, torch.Tensor]
        def describe(self) -> dict

``prompts[i]`` is a conversation (a list of ``{role, content}`` ending with a user turn) and
``responses[i]`` the assistant's answer to it; ``is_safety[i]`` says whether prompt i is a safety
prompt (a combination rule reads it; a single reward model ignores it). ``score_detailed`` always
has ``"combined"`` (the reward, the same as ``score``) and, for a scorer that combines a helpfulness
and a safety model, ``"helpful"`` and ``"safety"``. ``describe`` says what the scorer is, for a
result's ``judge`` block (``{"kind": "rm", "scorer": <class>}`` unless the scorer says more).

Every scorer derives from :class:`Scorer`, which gives ``score_detailed`` and ``describe`` their
one-model defaults, so consumers call all three without asking what they hold: a trained reward
model (``reward.model.RewardModelScorer``), the combined reward (``reward.combine.CombinedScorer``),
a plain function (:class:`FunctionScorer`), the gold judge (``alignment.evals.gold.GoldScorer``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

from data.schemas import Message

if TYPE_CHECKING:
    import torch

@runtime_checkable
class RewardScorer(Protocol):
    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str],
              is_safety: Any = None) -> "torch.Tensor":
        """One scalar reward per (prompt, response) pair: a tensor of shape [B] on CPU."""
        ...

    def score_detailed(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str],
                       is_safety: Any = None) -> dict[str, "torch.Tensor"]:
        """``{"combined": [B]}``, plus ``"helpful"`` and ``"safety"`` [B] when the scorer combines two models."""
        ...

    def describe(self) -> dict:
        """What this scorer is, for a result's ``judge`` block."""
        ...


class Scorer:
    """Base class of every scorer: implement ``score``; ``score_detailed`` and ``describe`` default to one model's."""

    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str],
              is_safety: Any = None) -> "torch.Tensor":
        raise NotImplementedError

    def score_detailed(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str],
                       is_safety: Any = None) -> dict[str, "torch.Tensor"]:
        return {"combined": self.score(prompts, responses, is_safety)}

    def describe(self) -> dict:
        return {"kind": "rm", "scorer": type(self).__name__}


class FunctionScorer(Scorer):
    """A scorer from a Python function ``fn(prompt_messages, response) -> float`` (rule-based rewards, tests)."""

    def __init__(self, fn: Callable[[Sequence[Message], str], float]) -> None:
        self.fn = fn

    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str],
              is_safety: Any = None) -> "torch.Tensor":
        import torch

        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return torch.tensor([float(self.fn(p, r)) for p, r in zip(prompts, responses)], dtype=torch.float32)
