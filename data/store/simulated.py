"""Simulated annotators: a rule set or a reward model labelling tasks through the store's API.

Both satisfy :class:`data.store.SimulatedAnnotator` and are run with
``store.label_with(annotator, round=N)``; their labels carry their own user name (``sim:...``,
kind ``simulated``), so exports and statistics always tell them from people.

- :class:`FunctionAnnotator`: ``fn(task) -> Judgement | None`` (rule sets, LLM judges, tests);
- :func:`rule_judgement` (``annotation.simulated: rules`` in rounds): fixed rules on length, ending,
  repetition and refusals, with :func:`rule_scores`;
- :class:`ScorerAnnotator`: anything with ``score(prompts, responses) -> [B]`` (``reward.scorer.RewardScorer``)
  picks the higher-scoring response; the score gap sets the Llama 2 strength; an optional safety
  scorer labels each response safe when ``sigmoid(score) >= safe_threshold``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from data.heuristics import CAUTION, REFUSALS, repetition
from data.store.label import Judgement
from data.store.values import LeasedTask


@dataclass
class FunctionAnnotator:
    name: str
    fn: Callable[[LeasedTask], Judgement | None]

    def judge(self, tasks: Sequence[LeasedTask]) -> list[Judgement | None]:
        return [self.fn(t) for t in tasks]


def strength_from_gap(gap: float, thresholds: Sequence[float] = (0.25, 0.5, 1.0)) -> str:
    """|reward gap| -> strength: below ``thresholds[0]`` negligibly better, then slightly better,
    better, and significantly better from ``thresholds[2]`` on (``gap`` in reward units)."""
    g = abs(gap)
    if g < thresholds[0]:
        return "negligibly_better"
    if g < thresholds[1]:
        return "slightly_better"
    if g < thresholds[2]:
        return "better"
    return "significantly_better"


def _floats(scores: Any) -> list[float]:
    """A scorer's [B] tensor as floats."""
    return [float(x) for x in scores.tolist()]


@dataclass
class ScorerAnnotator:
    """A reward model (or any ``RewardScorer``) as an annotator; scores the responses of a batch in one call.

    A response is scored once: K responses of a prompt make up to K(K-1)/2 tasks, and each is scored the first time it
    appears (its score is kept for the tasks that pair it again)."""

    name: str
    scorer: Any  # RewardScorer: score(prompts, responses) -> [B]
    safety_scorer: Any | None = None
    thresholds: tuple[float, float, float] = (0.25, 0.5, 1.0)
    safe_threshold: float = 0.5
    _scores: dict = field(default_factory=dict, repr=False)
    _safe: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def _scored(scorer: Any, cache: dict, keys: list[tuple[str, str]], prompts: list, responses: list[str]) -> list[float]:
        where: dict[tuple[str, str], int] = {}
        for i, k in enumerate(keys):
            if k not in cache:
                where.setdefault(k, i)
        new = list(where)
        if new:
            got = _floats(scorer.score([prompts[where[k]] for k in new], [responses[where[k]] for k in new]))
            cache.update(zip(new, got))
        return [cache[k] for k in keys]

    def judge(self, tasks: Sequence[LeasedTask]) -> list[Judgement]:
        prompts = [t.prompt for t in tasks] * 2
        responses = [t.response_a for t in tasks] + [t.response_b for t in tasks]
        keys = [(json.dumps(p, sort_keys=True), r) for p, r in zip(prompts, responses)]
        scores = self._scored(self.scorer, self._scores, keys, prompts, responses)
        n = len(tasks)
        safe: list[bool | None] = [None] * (2 * n)
        if self.safety_scorer is not None:
            safe = [1.0 / (1.0 + math.exp(-s)) >= self.safe_threshold
                    for s in self._scored(self.safety_scorer, self._safe, keys, prompts, responses)]
        out = []
        for i in range(n):
            gap = scores[i] - scores[n + i]
            out.append(Judgement(chosen="A" if gap >= 0 else "B", strength=strength_from_gap(gap, self.thresholds),
                                 safe_a=safe[i], safe_b=safe[n + i]))
        return out


# ---------------------------------------------------------------------------------------------
# the rule judge


def rule_scores(response: str, *, safety_prompt: bool, finished: bool = True, target_words: int = 80) -> tuple[float, bool]:
    """(helpfulness-style score, safe) of one response by fixed rules.

    Safe: on a safety prompt, a response that refuses or warns; on other prompts, always.
    Score: up to 1 for length (``target_words`` words or more), +1 for ending on its own, -2 x the
    share of repeated trigrams, -1 for refusing a harmless prompt; on safety prompts +2 when safe.
    """
    low = response.lower()
    refuses = any(r in low for r in REFUSALS)
    safe = (refuses or any(c in low for c in CAUTION)) if safety_prompt else True
    score = min(len(response.split()), target_words) / target_words + (1.0 if finished else 0.0) - 2.0 * repetition(response)
    if safety_prompt:
        score += 2.0 if safe else 0.0
    elif refuses:
        score -= 1.0
    return score, safe


def rule_judgement(task: LeasedTask) -> Judgement:
    """A Judgement for a leased task by :func:`rule_scores` (``annotation.simulated: rules``)."""
    safety_prompt = task.category == "safety"
    meta = task.meta or {}
    sa, safe_a = rule_scores(task.response_a, safety_prompt=safety_prompt, finished=bool(meta.get("finished_a", True)))
    sb, safe_b = rule_scores(task.response_b, safety_prompt=safety_prompt, finished=bool(meta.get("finished_b", True)))
    return Judgement(chosen="A" if sa >= sb else "B", strength=strength_from_gap(sa - sb), safe_a=safe_a, safe_b=safe_b)
