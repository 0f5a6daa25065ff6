"""PPO's config: prompts, reward, critic, the PPO objective, sampling, ``train`` (iterations and AdamW), evaluation,
PPO-Lagrangian."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from foundation.adapters import AdapterConfig
from foundation.config import check, option
from foundation.models import ModelConfig
from foundation.runs import RunConfig
from alignment.rl.config import OnlineRewardConfig, PromptDataConfig

log = logging.getLogger("alignment.ppo")
STAGE = "ppo"


# ---------------------------------------------------------------------------------------------
# config


@dataclass
class PPORewardConfig(OnlineRewardConfig):
    """The reward (reward.config.RewardConfig) and how PPO normalises it."""

    normalize: Literal["batch", "running", "none"] = option("batch",
                                                            "normalise the combined score: batch = whiten over each iteration's "
                                                            "global batch (Llama 2), running = running mean/std, none")
    clip: float = option(5.0, "clip normalised scores to [-clip, clip]; 0 = no clipping")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.clip >= 0, "clip", f"must be >= 0, got {self.clip}")


@dataclass
class CriticConfig:
    """The value model."""

    init: Literal["reward_model", "policy"] = option("reward_model",
                                                     "start from the helpfulness reward model (OpenRLHF; shares its weights) or "
                                                     "from the policy's base with a zero value head")
    lora: bool = option(True, "train a LoRA adapter (settings of `adapter`) + value head over the shared frozen weights; false "
                              "= a full trainable copy")
    lr: float = option(5e-5, "critic learning rate")
    value_clip: float | None = option(0.2, "clip new values to old +/- this in the value loss; null = unclipped")
    vf_coef: float = option(0.1, "weight of the value loss")

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.value_clip is None or self.value_clip > 0, "value_clip", f"must be > 0 or null, got {self.value_clip}")
        check(self.vf_coef >= 0, "vf_coef", f"must be >= 0, got {self.vf_coef}")


@dataclass
class PPOAlgoConfig:
    """PPO iterations, batch sizes and the objective's coefficients."""

    rollout_batch_size: int = option(16, "prompts (one response each) per iteration and process")
    minibatch_size: int = option(8, "sequences per optimiser step (Llama 2: one step per minibatch)")
    micro_batch_size: int = option(8, "sequences per forward pass (gradients accumulate over a minibatch); bounds memory")
    epochs: int = option(1, "passes over each rollout (DeepSpeed-Chat found 1 the most stable)")
    clip: float = option(0.2, "policy ratio clip epsilon")
    gamma: float = option(1.0, "discount")
    lam: float = option(0.95, "GAE lambda")
    kl_coef: float = option(0.05,
                            "beta: weight of the per-token KL penalty (Llama 2: 0.01 for 7B/13B); initial value when adaptive")
    kl_estimator: Literal["k1", "k2", "k3"] = option("k1", "per-token KL estimator for the penalty (k1 = log ratio, k3 = "
                                                           "low-variance, non-negative)")
    kl_clamp: float = option(10.0, "clamp the per-token log-ratio to +/- this before the estimator")
    kl_target: float | None = option(None, "adaptive KL controller target (KL per sequence, nats); null = fixed beta")
    kl_horizon: int = option(10000, "adaptive KL controller horizon (samples)")
    entropy_coef: float = option(0.0, "entropy bonus weight")
    whiten_advantages: bool = option(True, "whiten advantages over the global batch")

    def __post_init__(self) -> None:
        check(self.rollout_batch_size > 0, "rollout_batch_size", f"must be > 0, got {self.rollout_batch_size}")
        check(self.minibatch_size > 0 and self.rollout_batch_size % self.minibatch_size == 0, "minibatch_size",
              f"must divide rollout_batch_size ({self.rollout_batch_size}), got {self.minibatch_size}")
        check(self.micro_batch_size > 0 and self.minibatch_size % self.micro_batch_size == 0, "micro_batch_size",
              f"must divide minibatch_size ({self.minibatch_size}), got {self.micro_batch_size}")
        check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        check(0 < self.clip < 1, "clip", f"must be in (0, 1), got {self.clip}")
        check(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        check(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
        check(self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef}")
        check(self.kl_clamp > 0, "kl_clamp", f"must be > 0, got {self.kl_clamp}")
        check(self.kl_target is None or self.kl_target > 0, "kl_target", f"must be > 0 or null, got {self.kl_target}")
        check(self.kl_target is None or self.kl_coef > 0, "kl_coef", "the adaptive controller needs an initial kl_coef > 0")
        check(self.kl_horizon > 0, "kl_horizon", f"must be > 0, got {self.kl_horizon}")
        check(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")


@dataclass
class SamplingConfig:
    """How responses are sampled during training."""

    max_new_tokens: int = option(96, "response length limit (tokens)")
    temperature: float = option(1.0, "sampling temperature (> 0: PPO needs samples from the policy)")
    top_p: float = option(1.0, "nucleus sampling threshold")
    batch_size: int = option(16, "generation batch size")
    gather_for_generation: bool = option(True, "ZeRO-3: gather the policy's whole weights on every process to generate "
                                               "(fast; the policy must fit one accelerator; TRL's ds3_gather_for_generation); "
                                               "false = generate from the partitions, every forward gathering one layer at a "
                                               "time (slow; for a policy larger than one accelerator)")

    def __post_init__(self) -> None:
        check(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")


@dataclass
class OptimConfig:
    """Optimisation, named as in every stage's ``train`` section: PPO iterations, AdamW for the policy (and,
    with critic.lr, the critic) and its schedule."""

    max_steps: int = option(100, "PPO iterations (Llama 2: 200-400); each samples ppo.rollout_batch_size prompts per process")
    lr: float = option(1e-5, "policy learning rate (Llama 2, full weights: 1e-6)")
    weight_decay: float = option(0.0, "AdamW weight decay (Llama 2: 0.1 on full weights)")
    adam_beta1: float = option(0.9, "AdamW beta1 (Llama 2: 0.9)")
    adam_beta2: float = option(0.95, "AdamW beta2 (Llama 2: 0.95)")
    adam_epsilon: float = option(1e-5, "AdamW epsilon (Llama 2: 1e-5)")
    max_grad_norm: float = option(1.0, "clip each model's gradient norm to this (under DeepSpeed: both models' "
                                       "norm together); 0 = off")
    lr_scheduler: Literal["constant", "linear", "cosine"] = option("constant", "schedule after warm-up (Llama 2: constant)")
    warmup_steps: int = option(0, "optimiser steps of linear warm-up")
    gradient_checkpointing: bool | None = option(None, "recompute activations in backward; null = on for GPUs, off on CPU")

    def __post_init__(self) -> None:
        check(self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")


@dataclass
class PPOLagrangianConfig:
    """PPO-Lagrangian (reward.rule=safe_rlhf): λ learned by dual ascent so the mean cost stays under a limit."""

    cost_limit: float = option(0.0, "d: the mean episode cost (cost = -safety score) to stay under; λ rises while the cost is "
                                    "above it (0 = the safety RM's safe/unsafe boundary)")
    lambda_lr: float = option(0.1, "learning rate of log λ (safe-rlhf: 0.1); λ starts at reward.cost_weight")
    lambda_optimizer: Literal["sgd", "adam"] = option("sgd", "optimiser of log λ (safe-rlhf: sgd)")
    lambda_max: float | None = option(None, "cap on λ; null = none")
    update_delay: int = option(0, "iterations before λ starts to move")

    def __post_init__(self) -> None:
        check(self.lambda_lr > 0, "lambda_lr", f"must be > 0, got {self.lambda_lr}")
        check(self.lambda_max is None or self.lambda_max > 0, "lambda_max", f"must be > 0 or null, got {self.lambda_max}")
        check(self.update_delay >= 0, "update_delay", f"must be >= 0, got {self.update_delay}")


@dataclass
class PPOEvalConfig:
    """Held-out evaluation, early stopping, samples and checkpoints."""

    every: int = option(10, "evaluate on held-out prompts every N iterations (and before training); 0 = only at the end")
    max_prompts: int = option(64, "evaluate on at most this many validation prompts (the data.val_fraction split; never a "
                                  "project's test prompts)")
    max_new_tokens: int | None = option(None, "response length limit for evaluation; null = sampling.max_new_tokens")
    patience: int = option(3, "stop after this many evaluations without improvement of the held-out reward; 0 = never stop early")
    min_delta: float = option(0.0, "a checkpoint is kept only if the lower confidence bound of its validation gain over the "
                                   "starting policy is above this")
    judges: dict[str, str] = option(factory=dict, doc="extra scorers of the validation answers, logged as "
                                                      "eval/reward_judge_<name> and never used to select: name -> a reward "
                                                      "model folder or gold:<name>")
    z: float = option(1.64, "the bound: mean gain - z x its standard error over the paired per-prompt gains (one-sided; "
                            "1.64 = 95%, 0 = the mean alone); see alignment.rl.selection")
    keep_best: bool = option(True, "model/ holds the checkpoint with the best validation gain by that rule, or the starting "
                                   "policy when none is shown better (the summary says which); false = the last one")
    samples_every: int = option(10, "append a few training samples to samples.jsonl every N iterations; 0 = never")
    num_samples: int = option(4, "samples written each time")
    save_every: int = option(10, "write a checkpoint every N iterations (for --resume)")
    save_total_limit: int = option(2, "keep at most this many checkpoints")

    def __post_init__(self) -> None:
        check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        check(self.max_prompts > 0, "max_prompts", f"must be > 0, got {self.max_prompts}")
        check(self.z >= 0, "z", f"must be >= 0, got {self.z}")
        check(self.patience >= 0, "patience", f"must be >= 0, got {self.patience}")
        check(self.samples_every >= 0, "samples_every", f"must be >= 0, got {self.samples_every}")
        check(self.save_every > 0, "save_every", f"must be > 0, got {self.save_every}")
        check(self.save_total_limit > 0, "save_total_limit", f"must be > 0, got {self.save_total_limit}")


@dataclass
class PPOConfig:
    """PPO with a reward model (or rule-based reward), reference policy and critic."""

    run: RunConfig = option(factory=RunConfig, doc="run name, output folder, seed, tracking")
    model: ModelConfig = option(factory=ModelConfig,
                                doc="the policy to start from (an SFT output: its LoRA adapter is merged first)")
    adapter: AdapterConfig = option(factory=lambda: AdapterConfig(dropout=0.0),
                                    doc="what is trained: lora (reference = adapter off) or full (reference = a frozen copy)")
    data: PromptDataConfig = option(factory=PromptDataConfig, doc="prompts")
    reward: PPORewardConfig = option(factory=PPORewardConfig, doc="reward models and normalisation")
    critic: CriticConfig = option(factory=CriticConfig, doc="value model")
    ppo: PPOAlgoConfig = option(factory=PPOAlgoConfig, doc="PPO objective and batches")
    sampling: SamplingConfig = option(factory=SamplingConfig, doc="response sampling")
    train: OptimConfig = option(factory=OptimConfig, doc="iterations, optimiser and schedule")
    eval: PPOEvalConfig = option(factory=PPOEvalConfig, doc="held-out evaluation, early stopping, samples, checkpoints")
    lagrangian: PPOLagrangianConfig = option(factory=PPOLagrangianConfig,
                                             doc="PPO-Lagrangian's multiplier (used with reward.rule=safe_rlhf)")

    def __post_init__(self) -> None:
        check(self.adapter.method in ("lora", "full"), "adapter.method", f"PPO trains lora or full, got {self.adapter.method!r}")
        check(self.critic.init == "policy" or self.reward.helpful is not None, "critic.init",
              "reward_model needs reward.helpful; use critic.init=policy with a reward function")
        if self.reward.rule == "safe_rlhf":
            check(self.reward.function is None and self.reward.safety is not None, "reward.rule",
                  "safe_rlhf (PPO-Lagrangian) needs both reward models: reward.helpful (the reward) and reward.safety "
                  "(cost = -safety score)")
            check(self.reward.cost_weight > 0, "reward.cost_weight",
                  "PPO-Lagrangian learns λ in log space starting from cost_weight: it must be > 0, "
                  f"got {self.reward.cost_weight}")
            check(self.lagrangian.lambda_max is None or self.lagrangian.lambda_max >= self.reward.cost_weight,
                  "lagrangian.lambda_max",
                  f"must be >= the initial λ (reward.cost_weight = {self.reward.cost_weight}), got {self.lagrangian.lambda_max}")


Config = PPOConfig
