"""Rule-based rewards: ``fn(prompt_messages, response, **kwargs) -> float``.

Select one in a config with ``reward.function: alignment.rl.rule_rewards:<name>`` and its
arguments in ``reward.function_kwargs`` (any importable ``module:function`` of the same shape
works). They replace the reward models when the right answer can be checked by a rule, and give
PPO a reward whose optimum is known, which is how its tests check that it learns.
"""

from __future__ import annotations

from collections.abc import Sequence

from data.schemas import Message


def target_length(prompt: Sequence[Message], response: str, *, target: int = 20, unit: str = "words") -> float:
    """-|length - target| / target: 0 at the target length, negative either side."""
    n = len(response.split()) if unit == "words" else len(response)
    return -abs(n - target) / max(target, 1)


def contains(prompt: Sequence[Message], response: str, *, text: str = "thank you", case_sensitive: bool = False) -> float:
    """1 if the response contains ``text``, else 0."""
    if not case_sensitive:
        return float(text.lower() in response.lower())
    return float(text in response)


def char_fraction(prompt: Sequence[Message], response: str, *, chars: str = "aeiou") -> float:
    """Share of the response's characters that are in ``chars`` (0 for an empty response)."""
    return sum(c in chars for c in response) / len(response) if response else 0.0
