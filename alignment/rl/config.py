"""Config sections shared by the online RL stages (PPO and GRPO): the prompts they sample for and the reward
they optimise. Here, below both, so that neither stage borrows the other's config classes (tests/test_layers.py)."""

from __future__ import annotations

from dataclasses import dataclass

from foundation.config import check, option
from data.loaders import DataSource
from reward.config import RewardConfig


@dataclass
class PromptDataConfig:
    """Prompts to sample responses for."""

    sources: list[DataSource] = option(factory=lambda: [DataSource("bundled:prompts")],
                                       doc="prompt datasets to mix (each prompt's category picks the safety "
                                           "or helpfulness reward)")
    val_fraction: float = option(0.15, "share of prompts held out for evaluation and early stopping (by a hash of the prompt); "
                                        "unused when val_sources are given")
    val_sources: list[DataSource] = option(factory=list, doc="validation prompts (a project's validation set): keep-best and "
                                                             "early stopping read these and every prompt of sources trains; "
                                                             "empty = split data.val_fraction off the sources")
    max_prompt_tokens: int = option(256, "skip prompts longer than this many tokens (chat template included)")

    def __post_init__(self) -> None:
        check(bool(self.sources), "sources", "needs at least one data source")
        check(0 < self.val_fraction < 1, "val_fraction",
              f"must be in (0, 1): held-out prompts drive evaluation, got {self.val_fraction}")
        check(self.max_prompt_tokens >= 8, "max_prompt_tokens", f"must be >= 8, got {self.max_prompt_tokens}")


@dataclass
class OnlineRewardConfig(RewardConfig):
    """The reward (reward.config.RewardConfig) of responses sampled during training."""

    missing_eos_penalty: float = option(1.0,
                                        "subtracted from the (normalised) score of responses that hit max_new_tokens without EOS")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.missing_eos_penalty >= 0, "missing_eos_penalty", f"must be >= 0, got {self.missing_eos_penalty}")
