"""The reward a sampling stage optimises or ranks by: the two reward models combined, one reward
model, or a rule-based function. Shared by PPO, GRPO/RLOO and rejection sampling (and the round
orchestrator, which fills in the paths of the round's reward models)."""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundation.config import ConfigError, check, option


@dataclass
class RewardConfig:
    """The reward: the two reward models combined, or a rule-based function."""

    helpful: str | None = option("runs/default/rm_helpful",
                                 "helpfulness reward model (an `align rm` output folder, or gold:<name> for a cached gold "
                                 "model); null with `function`")
    safety: str | None = option("runs/default/rm_safety",
                                "safety reward model (an `align rm` output folder); null = use the helpfulness RM alone")
    rule: str = option("llama2", "combination (reward.combine.RULES): llama2 (eq. 4, piecewise on the safety score) or safe_rlhf "
                                 "(reward - λ·cost, cost = -safety score; PPO learns λ by dual ascent (PPO-Lagrangian), the "
                                 "other stages use λ = cost_weight)")
    safety_threshold: float = option(0.15, "llama2 rule: use the safety score when sigmoid(safety) is below this, even "
                                           "on helpfulness prompts")
    cost_weight: float = option(1.0, "safe_rlhf rule: λ in reward - λ·cost (fixed in rejection sampling, GRPO and the win-rate "
                                     "judge; PPO's initial λ, then learned)")
    function: str | None = option(None,
                                  "instead of reward models: a rule-based reward `module:function` taking (prompt_messages, "
                                  "response, **kwargs) -> float, e.g. alignment.rl.rule_rewards:target_length")
    function_kwargs: dict[str, Any] = option(factory=dict, doc="keyword arguments for reward.function")
    batch_size: int = option(16, "reward-model scoring batch size")

    def __post_init__(self) -> None:
        from reward.combine import RULES

        check(self.rule in RULES, "rule", f"unknown rule {self.rule!r}; expected one of: {', '.join(RULES)}")
        if self.function is not None:
            check(":" in self.function, "function", f"must look like module:function, got {self.function!r}")
            check(self.helpful is None and self.safety is None, "function",
                  "a reward function replaces the reward models: also set reward.helpful=null and reward.safety=null")
        else:
            check(self.helpful is not None, "helpful", "needs a helpfulness reward model (or set reward.function)")
            check(self.rule != "safe_rlhf" or self.safety is not None, "rule",
                  "safe_rlhf needs reward.safety: the cost is the negated safety score")
        check(0 < self.safety_threshold < 1, "safety_threshold", f"must be in (0, 1), got {self.safety_threshold}")
        check(self.cost_weight >= 0, "cost_weight", f"must be >= 0, got {self.cost_weight}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")


def build_scorer(cfg: RewardConfig, device: str = "auto", dtype: str = "auto") -> tuple[Any, dict[str, Any]]:
    """(scorer, {"rm_helpful": model, "rm_safety": model} for the reward models loaded). The scorer
    implements reward.scorer.RewardScorer; with both models it is Llama 2's combined reward (its
    ``score_detailed`` also gives each model's score)."""
    from reward.scorer import FunctionScorer

    if cfg.function is not None:
        module_name, fn_name = cfg.function.split(":", 1)
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError("reward.function", f"cannot import {cfg.function!r}: {exc}") from None
        return FunctionScorer(functools.partial(fn, **cfg.function_kwargs)), {}
    for key in ("helpful", "safety"):
        path = getattr(cfg, key)
        if path is not None and path.startswith("gold:"):  # a cached gold reward model (reward.gold)
            from reward.gold_cache import resolve

            try:
                resolve(path)
            except FileNotFoundError as exc:
                raise ConfigError(f"reward.{key}", str(exc)) from None
            continue
        if path is not None and not Path(path).exists():
            raise ConfigError(f"reward.{key}", f"no reward model at {path}; train one with `align rm` (or set reward.function)")
    from reward.combine import CombinedScorer
    from reward.model import load_scorer

    helpful = load_scorer(cfg.helpful, device=device, batch_size=cfg.batch_size, dtype=dtype)
    if cfg.safety is None:
        return helpful, {"rm_helpful": helpful.model}
    safety = load_scorer(cfg.safety, device=device, batch_size=cfg.batch_size, dtype=dtype)
    combined = CombinedScorer(helpful, safety, rule=cfg.rule, threshold=cfg.safety_threshold, lam=cfg.cost_weight)
    return combined, {"rm_helpful": helpful.model, "rm_safety": safety.model}
