"""Proximal policy optimisation (PPO) against the combined helpfulness/safety reward, on Accelerate.

    align ppo --config configs/ppo.yaml [key=value ...] [--resume]
    align ppo --config configs/ppo.yaml --launch configs/accelerate/ddp.yaml    # several processes (DDP)
    align ppo --config configs/ppo.yaml --launch configs/accelerate/zero3.yaml  # DeepSpeed ZeRO-2/3

How the policy and the critic are wrapped, stepped and checkpointed under each launch is in
:mod:`alignment.rl.actor_critic` (two DDP models, or one DeepSpeed engine holding both).

Each iteration runs three plain steps over a :class:`~alignment.rl.rollout.Rollout`:

1. **Make experience.** Sample one response per prompt from the policy (batched, KV cache,
   temperature/top-p); score (prompt, response) with the reward: Llama 2's piecewise combination
   of the helpfulness and safety reward models (eq. 4: the safety score on safety prompts or when
   sigmoid(R_s) < 0.15, else the helpfulness score, as a logit); normalise it with statistics of
   the global batch, subtract a penalty from responses that never emitted EOS, clip. Then, without
   gradients: log-probs of the sampled tokens under the policy (pi_old) and the reference (pi_ref),
   and the critic's values.
2. **Advantages.** Per-token reward r_t = -beta * KL_t (k1 or k3 estimator, clamped) plus the
   sequence score on the last token; beta fixed or adapted towards a target KL (Ziegler et al.);
   GAE with gamma and lambda; advantages whitened over the global batch.
3. **Update.** ``ppo.epochs`` passes over the rollout in shuffled minibatches, one optimiser step
   per minibatch (micro-batches accumulate gradients): clipped surrogate policy loss
   (- entropy_coef * entropy) for the actor, vf_coef * clipped value loss for the critic (two
   backward passes: actor and critic share no trainable weights, and only one graph is alive).

**PPO-Lagrangian** (``reward.rule=safe_rlhf``, as safe-rlhf's ``ppo_lag`` trainer; math in
:mod:`alignment.rl.lagrangian`): the reward is the helpfulness score and the cost the negated
safety score, each normalised like the reward above (no missing-EOS term on the cost), each with
its own KL-shaped per-token signal, critic (the cost critic starts from the safety reward model,
negated) and GAE. Before step 2 of every iteration, λ = exp(log λ) takes one dual-ascent step on
the iteration's global mean episode cost (raw, unnormalised) against ``lagrangian.cost_limit``,
starting from ``reward.cost_weight``; the policy follows (A_r - λ·A_c) / (1 + λ), each advantage
whitened first. λ is logged (``lagrangian/lambda``) and checkpointed. Departures from safe-rlhf: λ
moves once per iteration on that iteration's batch (safe-rlhf: once per update step on a window
of the last episodes), and the KL penalty enters the combination whole (see the module).
The held-out reward for early stopping stays ``helpful - cost_weight·cost`` with the initial λ, so
evaluations compare across iterations.

Every ``eval.every`` iterations the policy answers held-out prompts greedily and their mean
combined reward is logged; the run stops early when it has not improved for ``eval.patience``
evaluations, and ``model/`` holds the best policy by that measure.

Memory: with LoRA (the default) the reference policy is the policy's own base with the adapter
switched off, and the critic is a weight-sharing copy of the helpfulness reward model's backbone
(OpenRLHF initialises the critic from the reward model) with a second LoRA adapter and a trainable
value head. Frozen weights exist once: one policy base, one helpfulness RM (scorer + critic), one
safety RM, and reward-model tensors that equal the policy base's (the embeddings and norms of RMs
trained with LoRA from the same base) are tied to it. Actor and critic run their backward passes
one after the other. benchmarks/ppo_memory.py measures the peak against SFT-LoRA.

Where this departs from the papers and the usual implementations:
- Llama 2 trains all weights with lr 1e-6 and batch 512; the default here is LoRA (lr 1e-5) with
  small batches for CPUs. ``adapter.method=full`` trains all weights (the reference is then a
  frozen copy).
- The log-probs PPO uses are those of the temperature-scaled distribution the samples came from
  (as TRL and OpenRLHF do); top-p truncation is ignored in them.
- Rewards are whitened over each iteration's global batch (Llama 2's WHITEN) by default;
  ``reward.normalize=running`` uses running statistics instead (OpenRLHF).
- Losses are token-level means over the minibatch (TRL), not per-sequence means.
- Dropout is best left off (``adapter.dropout: 0``): it makes the first ratio pi/pi_old != 1.

Outputs in ``runs/<run.name>/ppo/``: ``model/`` (the policy adapter; ``model.name=runs/<run>/ppo``
loads it), ``metrics.jsonl``, ``samples.jsonl``, ``summary.json``, ``checkpoints/`` for
``--resume`` (trainable weights, optimiser, scheduler, KL controller, reward statistics, RNG
streams of every process, iteration; under DeepSpeed the weights and optimiser are DeepSpeed's
per-process checkpoint in ``deepspeed/``).
"""

from __future__ import annotations

import json
import logging
import random
import resource
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from alignment import distributed
from alignment.adapters import AdapterConfig, set_adapter_base
from alignment.config import check, option
from alignment.models import ModelConfig
from alignment.runs import MetricsLogger, RunConfig, last_checkpoint, start_stage
from data.loaders import DataSource
from reward.config import RewardConfig, build_scorer

log = logging.getLogger(__name__)
STAGE = "ppo"


# ---------------------------------------------------------------------------------------------
# config


@dataclass
class PPODataConfig:
    """Prompts to sample responses for."""

    sources: list[DataSource] = option(factory=lambda: [DataSource("bundled:prompts")], doc="prompt datasets to mix (each prompt's category picks the safety or helpfulness reward)")
    val_fraction: float = option(0.15, "share of prompts held out for evaluation and early stopping (by a hash of the prompt)")
    max_prompt_tokens: int = option(256, "skip prompts longer than this many tokens (chat template included)")

    def __post_init__(self) -> None:
        check(bool(self.sources), "sources", "needs at least one data source")
        check(0 < self.val_fraction < 1, "val_fraction", f"must be in (0, 1): held-out prompts drive evaluation, got {self.val_fraction}")
        check(self.max_prompt_tokens >= 8, "max_prompt_tokens", f"must be >= 8, got {self.max_prompt_tokens}")


@dataclass
class PPORewardConfig(RewardConfig):
    """The reward (reward.config.RewardConfig) and how PPO normalises it."""

    normalize: Literal["batch", "running", "none"] = option("batch", "normalise the combined score: batch = whiten over each iteration's global batch (Llama 2), running = running mean/std, none")
    clip: float = option(5.0, "clip normalised scores to [-clip, clip]; 0 = no clipping")
    missing_eos_penalty: float = option(1.0, "subtracted from the (normalised) score of responses that hit max_new_tokens without EOS")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.clip >= 0, "clip", f"must be >= 0, got {self.clip}")
        check(self.missing_eos_penalty >= 0, "missing_eos_penalty", f"must be >= 0, got {self.missing_eos_penalty}")


@dataclass
class CriticConfig:
    """The value model."""

    init: Literal["reward_model", "policy"] = option("reward_model", "start from the helpfulness reward model (OpenRLHF; shares its weights) or from the policy's base with a zero value head")
    lora: bool = option(True, "train a LoRA adapter (settings of `adapter`) + value head over the shared frozen weights; false = a full trainable copy")
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
    kl_coef: float = option(0.05, "beta: weight of the per-token KL penalty (Llama 2: 0.01 for 7B/13B); initial value when adaptive")
    kl_estimator: Literal["k1", "k2", "k3"] = option("k1", "per-token KL estimator for the penalty (k1 = log ratio, k3 = low-variance, non-negative)")
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
    max_grad_norm: float = option(1.0, "clip each model's gradient norm to this (under DeepSpeed: both models' norm together); 0 = off")
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

    cost_limit: float = option(0.0, "d: the mean episode cost (cost = -safety score) to stay under; λ rises while the cost is above it (0 = the safety RM's safe/unsafe boundary)")
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
    max_prompts: int = option(32, "evaluate on at most this many held-out prompts")
    max_new_tokens: int | None = option(None, "response length limit for evaluation; null = sampling.max_new_tokens")
    patience: int = option(3, "stop after this many evaluations without improvement of the held-out reward; 0 = never stop early")
    min_delta: float = option(0.0, "an evaluation must beat the best by more than this to count as an improvement")
    keep_best: bool = option(True, "model/ holds the policy with the best held-out reward (else the last one)")
    samples_every: int = option(10, "append a few training samples to samples.jsonl every N iterations; 0 = never")
    num_samples: int = option(4, "samples written each time")
    save_every: int = option(10, "write a checkpoint every N iterations (for --resume)")
    save_total_limit: int = option(2, "keep at most this many checkpoints")

    def __post_init__(self) -> None:
        check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        check(self.max_prompts > 0, "max_prompts", f"must be > 0, got {self.max_prompts}")
        check(self.patience >= 0, "patience", f"must be >= 0, got {self.patience}")
        check(self.samples_every >= 0, "samples_every", f"must be >= 0, got {self.samples_every}")
        check(self.save_every > 0, "save_every", f"must be > 0, got {self.save_every}")
        check(self.save_total_limit > 0, "save_total_limit", f"must be > 0, got {self.save_total_limit}")


@dataclass
class PPOConfig:
    """PPO with a reward model (or rule-based reward), reference policy and critic."""

    RENAMED: ClassVar[dict[str, str]] = {"ppo.iterations": "train.max_steps", "optim": "train"}  # until the next release

    run: RunConfig = option(factory=RunConfig, doc="run name, output folder, seed, tracking")
    model: ModelConfig = option(factory=ModelConfig, doc="the policy to start from (an SFT output: its LoRA adapter is merged first)")
    adapter: AdapterConfig = option(factory=lambda: AdapterConfig(dropout=0.0), doc="what is trained: lora (reference = adapter off) or full (reference = a frozen copy)")
    data: PPODataConfig = option(factory=PPODataConfig, doc="prompts")
    reward: PPORewardConfig = option(factory=PPORewardConfig, doc="reward models and normalisation")
    critic: CriticConfig = option(factory=CriticConfig, doc="value model")
    ppo: PPOAlgoConfig = option(factory=PPOAlgoConfig, doc="PPO objective and batches")
    sampling: SamplingConfig = option(factory=SamplingConfig, doc="response sampling")
    train: OptimConfig = option(factory=OptimConfig, doc="iterations, optimiser and schedule")
    eval: PPOEvalConfig = option(factory=PPOEvalConfig, doc="held-out evaluation, early stopping, samples, checkpoints")
    lagrangian: PPOLagrangianConfig = option(factory=PPOLagrangianConfig, doc="PPO-Lagrangian's multiplier (used with reward.rule=safe_rlhf)")

    def __post_init__(self) -> None:
        check(self.adapter.method in ("lora", "full"), "adapter.method", f"PPO trains lora or full, got {self.adapter.method!r}")
        check(self.critic.init == "policy" or self.reward.helpful is not None, "critic.init",
              "reward_model needs reward.helpful; use critic.init=policy with a reward function")
        if self.reward.rule == "safe_rlhf":
            check(self.reward.function is None and self.reward.safety is not None, "reward.rule",
                  "safe_rlhf (PPO-Lagrangian) needs both reward models: reward.helpful (the reward) and reward.safety (cost = -safety score)")
            check(self.reward.cost_weight > 0, "reward.cost_weight",
                  f"PPO-Lagrangian learns λ in log space starting from cost_weight: it must be > 0, got {self.reward.cost_weight}")
            check(self.lagrangian.lambda_max is None or self.lagrangian.lambda_max >= self.reward.cost_weight, "lagrangian.lambda_max",
                  f"must be >= the initial λ (reward.cost_weight = {self.reward.cost_weight}), got {self.lagrangian.lambda_max}")


Config = PPOConfig


# ---------------------------------------------------------------------------------------------
# setup


def load_prompts(cfg: PPODataConfig, tokenizer: Any, seed: int) -> tuple[list, list]:
    """(train, held-out) prompts; prompts longer than max_prompt_tokens are skipped."""
    from alignment.generation import encode_prompts
    from data.loaders import load_prompts as load
    from data.mixing import mix, split

    records = mix([(load(src), src.weight) for src in cfg.sources], seed=seed)
    lengths = [len(ids) for ids in encode_prompts(tokenizer, [r.messages for r in records])]
    kept = [r for r, n in zip(records, lengths) if n <= cfg.max_prompt_tokens]
    if len(kept) < len(records):
        log.warning("skipped %d prompts longer than data.max_prompt_tokens=%d", len(records) - len(kept), cfg.max_prompt_tokens)
    train, val, _ = split(kept, val_fraction=cfg.val_fraction, seed=seed)
    if not train or not val:
        raise ValueError(f"need both training and held-out prompts, got {len(train)} and {len(val)}; check data.sources and data.val_fraction")
    return train, val


def prompt_batch(prompts: Sequence, iteration: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list:
    """This process's prompts for ``iteration`` (1-based): a deterministic walk over seeded epoch
    shuffles, so a resumed run draws exactly the prompts the uninterrupted run would have."""
    n, total = len(prompts), batch_size * world
    start = (iteration - 1) * total + rank * batch_size
    out, orders = [], {}
    for k in range(start, start + batch_size):
        epoch = k // n
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(seed * 1000003 + epoch).shuffle(orders[epoch])
        out.append(prompts[orders[epoch][k % n]])
    return out


def build_models(cfg: PPOConfig, device: str, reward_models: dict[str, Any], *, share: bool = True) -> tuple[Any, Any, Any]:
    """(policy, reference or None, critic). With LoRA the reference is the policy with its adapter
    disabled (None here); the critic shares frozen weights with the helpfulness RM or the base;
    reward-model tensors identical to the frozen base (embeddings, norms) are tied to it. With
    ``share=False`` (ZeRO-3, which partitions what it trains) nothing is shared: the critic's
    backbone is its own copy."""
    import copy

    from peft import get_peft_model

    from alignment.adapters import peft_config
    from alignment.models import load_causal_lm
    from alignment.rl.critic import critic_from_causal_lm, critic_from_reward_model, critic_pair, tie_identical_weights

    base = load_causal_lm(cfg.model.name, dtype=cfg.model.dtype, device=device, revision=cfg.model.revision,
                          attn_implementation=cfg.model.attn_implementation)
    critic_lora = peft_config(cfg.adapter, None) if cfg.critic.lora else None
    if cfg.adapter.method == "lora":
        for p in base.parameters():
            p.requires_grad_(False)
        reference = None
        critic_source = base
    else:  # full fine-tuning: the reference is a frozen copy (the critic may share its weights)
        reference = copy.deepcopy(base).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        critic_source = reference
    for name, rm in reward_models.items():
        for p in rm.parameters():
            p.requires_grad_(False)
        freed = tie_identical_weights(rm.base_model, critic_source.base_model) if share else 0
        if freed:
            log.info("%s shares %.1f MiB of identical frozen weights with the policy's base", name, freed / 2**20)
    if cfg.critic.init == "reward_model":
        critic = critic_from_reward_model(reward_models["rm_helpful"], lora=critic_lora, share=share)
    else:
        critic = critic_from_causal_lm(critic_source, lora=critic_lora, share=share)
    if cfg.reward.rule == "safe_rlhf":  # PPO-Lagrangian: a cost critic too (from the safety RM, negated: cost = -safety)
        cost_critic = (critic_from_reward_model(reward_models["rm_safety"], lora=critic_lora, share=share, sign=-1.0)
                       if cfg.critic.init == "reward_model" else critic_from_causal_lm(critic_source, lora=critic_lora, share=share))
        critic = critic_pair(critic, cost_critic)
    policy = get_peft_model(base, peft_config(cfg.adapter, "CAUSAL_LM")) if cfg.adapter.method == "lora" else base
    grad_ckpt = cfg.train.gradient_checkpointing if cfg.train.gradient_checkpointing is not None else device.startswith("cuda")
    if grad_ckpt:
        kwargs = {"use_reentrant": False}
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        for backbone in critic.backbones:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return policy, reference, critic


def build_optimizer(cfg: PPOConfig, policy: Any, critic: Any, total_steps: int) -> tuple[Any, Any]:
    import torch
    from transformers import get_scheduler

    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.train.lr},
              {"params": [p for p in critic.parameters() if p.requires_grad], "lr": cfg.critic.lr}]
    optimizer = torch.optim.AdamW(groups, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_epsilon,
                                  weight_decay=cfg.train.weight_decay)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.train.lr_scheduler]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=total_steps)
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------
# 1. make experience


def score_responses(scorer: Any, prompts: Sequence, responses: Sequence[str]) -> dict[str, Any]:
    """Raw rewards {"combined": [B], and "helpful"/"safety" when the scorer reports them}."""
    messages = [p.messages for p in prompts]
    if hasattr(scorer, "score_detailed"):
        is_safety = [p.is_safety for p in prompts]
        return {k: v.float() for k, v in scorer.score_detailed(messages, list(responses), is_safety=is_safety).items()}
    return {"combined": scorer.score(messages, list(responses)).float()}


def normalize_scores(raw: Any, finished: Any, cfg: PPORewardConfig, running: Any, reduce: Any) -> Any:
    """Normalise (global batch or running statistics), penalise missing EOS (unless ``finished`` is
    None), clip: [B] -> [B]."""
    import torch

    from alignment.rl.stats import masked_whiten

    scores = raw.clone()
    if cfg.normalize == "batch":
        scores = masked_whiten(scores, torch.ones_like(scores), reduce=reduce)
    elif cfg.normalize == "running":
        running.update(scores, reduce=reduce)
        scores = (scores - running.mean) / (running.std + 1e-8)
    if finished is not None:
        scores = scores - cfg.missing_eos_penalty * (~finished).float()
    if cfg.clip > 0:
        scores = scores.clamp(-cfg.clip, cfg.clip)
    return scores


def score_batch(ctx: Context, prompts: Sequence, texts: Sequence[str], finished: Any) -> tuple[dict, Any, Any, dict]:
    """Score and normalise one rollout's responses: (raw scores {name: [B]}, scores [B], cost scores
    [B] or None, metrics {name: 0-d tensor}). Everything is moved to the accelerator's device first:
    the scorers return CPU tensors, and NCCL reduces GPU tensors only.

    PPO-Lagrangian: the scores are the helpfulness RM's, the costs the negated safety RM's (each
    normalised; the missing-EOS penalty goes to the reward only); ``cost/episode`` is the raw
    global mean cost, what λ is updated on."""
    import torch

    from alignment.rl.stats import masked_moments

    cfg, device = ctx.cfg.reward, ctx.accelerator.device
    raw = {k: v.to(device) for k, v in score_responses(ctx.scorer, prompts, texts).items()}
    finished = finished.to(device)
    ones = torch.ones_like(raw["combined"])
    metrics = {"reward/combined_std": masked_moments(raw["combined"], ones, ctx.reduce)[1].sqrt()}  # of the global batch
    if ctx.lagrange is None:
        return raw, normalize_scores(raw["combined"], finished, cfg, ctx.running_reward, ctx.reduce), None, metrics
    cost = -raw["safety"]
    metrics["cost/episode"] = masked_moments(cost, ones, ctx.reduce)[0]
    scores = normalize_scores(raw["helpful"], finished, cfg, ctx.running_reward, ctx.reduce)
    return raw, scores, normalize_scores(cost, None, cfg, ctx.running_cost, ctx.reduce), metrics


def make_experience(ctx: Context, prompts: Sequence) -> tuple[Any, dict[str, Any], list[dict]]:
    """Step 1: sample, score, and compute pi_old, pi_ref log-probs and values. Returns the rollout
    (rewards/advantages not yet filled), metrics and sample rows."""
    import torch

    from alignment.generation import generate
    from alignment.rl.rollout import Rollout, build_sequences

    cfg, acc, models = ctx.cfg, ctx.accelerator, ctx.models
    times = {}
    t0 = time.perf_counter()
    with models.generating() as policy:
        gens = generate(policy, ctx.tokenizer, [p.messages for p in prompts], max_new_tokens=cfg.sampling.max_new_tokens,
                        temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, batch_size=cfg.sampling.batch_size)
    times["time/generate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    texts = [g.text for g in gens]
    finished = torch.tensor([g.finished for g in gens])
    raw, scores, cost_scores, score_metrics = score_batch(ctx, prompts, texts, finished)
    times["time/score"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # a response is never empty: generate() stops a row at a sampled pad token, which is then the response
    responses = [g.response_ids or [ctx.tokenizer.pad_token_id] for g in gens]
    input_ids, attention_mask, response_mask = build_sequences([g.prompt_ids for g in gens], responses, ctx.tokenizer.pad_token_id)
    input_ids, attention_mask, response_mask = (t.to(acc.device) for t in (input_ids, attention_mask, response_mask))
    B, R = response_mask.shape
    # the no-grad passes run over micro-batches of similar length, each cut to its own width
    frame = Rollout(input_ids, attention_mask, response_mask, *(torch.zeros(B, R, device=acc.device) for _ in range(3)),
                    torch.zeros(B, device=acc.device))
    logprobs, ref_logprobs, values, entropy = (torch.zeros(B, R, device=acc.device) for _ in range(4))
    cost_values = torch.zeros(B, R, device=acc.device) if cost_scores is not None else None
    models.train(False)
    with torch.no_grad():
        for rows, mb in frame.by_length(cfg.ppo.micro_batch_size):
            width = mb.response_mask.shape[1]
            lp, ent = models.logprobs(mb.input_ids, mb.attention_mask, width, cfg.sampling.temperature, with_entropy=True)
            logprobs[rows, :width], entropy[rows, :width] = lp, ent
            v = models.values(mb.input_ids, mb.attention_mask, width)  # [b, width], or [b, width, 2] with a cost critic
            if cost_values is not None:
                values[rows, :width], cost_values[rows, :width] = v[..., 0], v[..., 1]
            else:
                values[rows, :width] = v
            ref_logprobs[rows, :width] = models.logprobs(mb.input_ids, mb.attention_mask, width, cfg.sampling.temperature,
                                                         reference=True)[0]
    times["time/ref_and_values"] = time.perf_counter() - t0

    rollout = Rollout(input_ids, attention_mask, response_mask, logprobs, ref_logprobs, values, scores,
                      cost_scores=cost_scores, cost_values=cost_values)
    mask = response_mask.float()
    lengths = mask.sum(1)
    metrics = {f"reward/{k}": v.mean().item() for k, v in raw.items()}
    metrics.update({k: v.item() for k, v in score_metrics.items()})
    metrics.update({
        "reward/normalized": scores.mean().item(),
        "policy/entropy": (entropy * mask).sum().item() / mask.sum().item(),
        "response/length": lengths.mean().item(),
        "response/eos_fraction": finished.float().mean().item(),
        "tokens/generated": lengths.sum().item(),
        **times,
    })
    samples = [{"prompt": p.messages, "category": p.category, "response": t, "finished": bool(f),
                **{f"reward_{k}": round(float(v[i]), 4) for k, v in raw.items()}}
               for i, (p, t, f) in enumerate(zip(prompts, texts, finished.tolist()))]
    if cost_scores is not None:
        metrics["cost/normalized"] = cost_scores.mean().item()
    return rollout, metrics, samples


# ---------------------------------------------------------------------------------------------
# 2. advantages


def compute_advantages(rollout: Any, kl_coef: float, cfg: PPOAlgoConfig, reduce: Any, lam: float | None = None) -> dict[str, Any]:
    """Step 2: KL-shaped per-token rewards, GAE, whitening (global). Fills rollout.rewards,
    .advantages, .returns; returns KL metrics (per sequence, global means).

    With a cost stream (PPO-Lagrangian; ``lam`` = λ): the costs get +β·KL per token and their own
    GAE (fills .cost_returns); advantages = (A_r - λ·A_c) / (1 + λ), each whitened first."""
    from alignment.rl.advantages import gae, kl_shaped_rewards
    from alignment.rl.kl import kl_penalty
    from alignment.rl.lagrangian import combine_advantages
    from alignment.rl.stats import masked_moments, masked_whiten

    mask = rollout.response_mask
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, cfg.kl_estimator, cfg.kl_clamp) * mask
    rollout.rewards = kl_shaped_rewards(rollout.scores, kl, mask, kl_coef)
    advantages, rollout.returns = gae(rollout.rewards, rollout.values, mask, cfg.gamma, cfg.lam)
    whiten = (lambda a: masked_whiten(a, mask, reduce=reduce)) if cfg.whiten_advantages else (lambda a: a)
    rollout.advantages = whiten(advantages)
    if rollout.cost_scores is not None:
        if lam is None:
            raise ValueError("a rollout with costs needs the Lagrange multiplier `lam`")
        cost_rewards = kl_shaped_rewards(rollout.cost_scores, -kl, mask, kl_coef)  # the KL penalty enters A_r - λ·A_c whole
        cost_advantages, rollout.cost_returns = gae(cost_rewards, rollout.cost_values, mask, cfg.gamma, cfg.lam)
        rollout.advantages = combine_advantages(rollout.advantages, whiten(cost_advantages), lam)
    log_ratio = (rollout.logprobs - rollout.ref_logprobs) * mask  # k1 per token: the plain KL estimate we report
    seq_kl, _, _ = masked_moments(log_ratio.sum(1), mask.new_ones(len(rollout)).float(), reduce)
    seq_penalty, _, _ = masked_moments(kl.sum(1), mask.new_ones(len(rollout)).float(), reduce)
    return {"kl/ref": seq_kl.item(), "kl/penalty": seq_penalty.item(), "kl/coef": kl_coef,
            "reward/kl_shaped": (rollout.rewards.sum(1)).mean().item()}


# ---------------------------------------------------------------------------------------------
# 3. update


def ppo_update(ctx: Context, rollout: Any) -> dict[str, float]:
    """Step 3: ``epochs`` passes of shuffled minibatches; one optimiser step per minibatch."""
    import torch

    from alignment.rl.losses import clipped_policy_loss, clipped_value_loss
    from alignment.rl.stats import explained_variance, masked_mean

    cfg, models = ctx.cfg, ctx.models
    models.train()
    sums: dict[str, float] = {}
    n_steps = 0
    for _ in range(cfg.ppo.epochs):
        order = torch.randperm(len(rollout))
        for start in range(0, len(rollout), cfg.ppo.minibatch_size):
            minibatch = order[start:start + cfg.ppo.minibatch_size]
            n_tokens = rollout.response_mask[minibatch].sum().clamp(min=1)
            micro_rows = minibatch.split(cfg.ppo.micro_batch_size)
            for i, rows in enumerate(micro_rows):
                mb = rollout.select(rows)
                R = mb.response_mask.shape[1]
                weight = mb.response_mask.sum() / n_tokens  # token-level mean over the whole minibatch
                with models.micro_step(last=i == len(micro_rows) - 1):  # gradients are reduced once per minibatch
                    # actor and critic share no trainable weights: two backward passes, so only one graph is alive at a time
                    logprobs, entropy = models.logprobs(mb.input_ids, mb.attention_mask, R, cfg.sampling.temperature,
                                                        with_entropy=True, entropy_grad=cfg.ppo.entropy_coef > 0)
                    pg_loss, pg_stats = clipped_policy_loss(logprobs, mb.logprobs, mb.advantages, mb.response_mask, cfg.ppo.clip)
                    mean_entropy = masked_mean(entropy, mb.response_mask)
                    models.backward((pg_loss - cfg.ppo.entropy_coef * mean_entropy) * weight)
                    values = models.values(mb.input_ids, mb.attention_mask, R)  # [b, R], or [b, R, 2] with a cost critic
                    lagrangian = mb.cost_values is not None
                    vf_loss, vf_stats = clipped_value_loss(values[..., 0] if lagrangian else values, mb.values, mb.returns,
                                                           mb.response_mask, cfg.critic.value_clip)
                    logged = {"policy/loss": pg_loss.detach(), "value/loss": vf_loss.detach(), "policy/clipfrac": pg_stats["clipfrac"],
                              "policy/approx_kl": pg_stats["approx_kl"], "policy/ratio": pg_stats["ratio"], "value/clipfrac": vf_stats["clipfrac"]}
                    if lagrangian:  # the cost critic's loss, same form and weight
                        cost_loss, cost_stats = clipped_value_loss(values[..., 1], mb.cost_values, mb.cost_returns, mb.response_mask,
                                                                   cfg.critic.value_clip)
                        logged.update({"cost_value/loss": cost_loss.detach(), "cost_value/clipfrac": cost_stats["clipfrac"]})
                        vf_loss = vf_loss + cost_loss
                    models.backward(cfg.critic.vf_coef * vf_loss * weight)
                w = float(weight)
                for k, v in logged.items():
                    sums[k] = sums.get(k, 0.0) + v.item() * w
            for k, v in models.step(cfg.train.max_grad_norm).items():  # clip, update, zero the gradients
                sums[k] = sums.get(k, 0.0) + v
            ctx.scheduler.step()
            n_steps += 1
    metrics = {k: v / n_steps for k, v in sums.items()}
    metrics["value/explained_variance"] = float(explained_variance(rollout.values, rollout.returns, rollout.response_mask, ctx.reduce))
    metrics["value/mean"] = float((rollout.values * rollout.response_mask).sum() / rollout.response_mask.sum())
    if rollout.cost_values is not None:
        metrics["cost_value/mean"] = float((rollout.cost_values * rollout.response_mask).sum() / rollout.response_mask.sum())
        metrics["cost_value/explained_variance"] = float(explained_variance(rollout.cost_values, rollout.cost_returns,
                                                                            rollout.response_mask, ctx.reduce))
    metrics["lr"] = ctx.scheduler.get_last_lr()[0]
    return metrics


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate(ctx: Context, prompts: Sequence) -> tuple[dict[str, float], list[dict]]:
    """Greedy answers to the held-out prompts (split over processes), scored; global means."""
    from accelerate.utils import gather_object

    from alignment.generation import generate

    cfg, acc = ctx.cfg, ctx.accelerator
    shard = list(prompts[acc.process_index::acc.num_processes])
    with ctx.models.generating() as policy:
        gens = generate(policy, ctx.tokenizer, [p.messages for p in shard],
                        max_new_tokens=cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens, temperature=0.0,
                        batch_size=cfg.sampling.batch_size)
    raw = score_responses(ctx.scorer, shard, [g.text for g in gens]) if shard else {}
    rows = [{"prompt": p.messages, "category": p.category, "response": g.text, "finished": g.finished,
             "length": len(g.response_ids), **{f"reward_{k}": float(v[i]) for k, v in raw.items()}}
            for i, (p, g) in enumerate(zip(shard, gens))]
    rows = gather_object(rows)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    metrics = {f"eval/{k}": mean([r[k] for r in rows]) for k in rows[0] if k.startswith("reward_")}
    for category in sorted({r["category"] for r in rows}):
        metrics[f"eval/reward_combined_{category}"] = mean([r["reward_combined"] for r in rows if r["category"] == category])
    metrics["eval/length"] = mean([r["length"] for r in rows])
    metrics["eval/eos_fraction"] = mean([float(r["finished"]) for r in rows])
    return metrics, rows


# ---------------------------------------------------------------------------------------------
# setup, checkpoints, saving


@dataclass
class Context:
    """Everything the three steps need, built once by :func:`setup`."""

    cfg: PPOConfig
    accelerator: Any
    tokenizer: Any
    models: Any  # policy, reference and critic as the launch needs them (alignment.rl.actor_critic)
    scorer: Any  # RewardScorer
    scheduler: Any
    kl_ctl: Any
    running_reward: Any
    weights_mib: dict[str, float]  # memory each model's weights add (see weight_memory)
    lagrange: Any = None  # PPO-Lagrangian's multiplier (alignment.rl.lagrangian), or None
    running_cost: Any = None  # running statistics of the cost (reward.normalize=running)

    def reduce(self, t: Any) -> Any:
        """Sum a tensor over all processes (the identity with one process). The tensor must be on
        the accelerator's device: NCCL reduces GPU tensors only, so a CPU tensor here would crash a
        multi-GPU run; refusing it everywhere makes one-GPU runs catch it too."""
        import torch

        want = torch.device(self.accelerator.device)  # cpu processes may say cpu:0; cuda:N must match
        if t.device.type != want.type or (want.type != "cpu" and None not in (t.device.index, want.index) and t.device.index != want.index):
            raise RuntimeError(f"a tensor on {t.device} reached a cross-process reduction, but the processes run on "
                               f"{self.accelerator.device}: move it to accelerator.device first")
        return self.accelerator.reduce(t, "sum")


def setup(cfg: PPOConfig, accelerator: Any) -> tuple[Context, list, list]:
    from accelerate.utils import set_seed

    from alignment.models import load_tokenizer, model_summary
    from alignment.rl.actor_critic import prepare_models
    from alignment.rl.kl import AdaptiveKLController, FixedKLController
    from alignment.rl.lagrangian import LagrangeMultiplier
    from alignment.rl.stats import RunningMoments

    set_seed(cfg.run.seed)  # the same initial adapters on every process
    device = str(accelerator.device) if cfg.model.device == "auto" else cfg.model.device
    tokenizer = load_tokenizer(cfg.model.name, revision=cfg.model.revision)
    train, val = load_prompts(cfg.data, tokenizer, cfg.run.seed)
    val = val[: cfg.eval.max_prompts]
    # ZeRO-3 partitions every weight of the engine: the critic may not share any with the reward models
    share = not (distributed.uses_deepspeed() and int(accelerator.state.deepspeed_plugin.zero_stage) == 3)
    with distributed.whole_weights():  # the engine partitions policy and critic (ZeRO-3); the reward models stay whole
        scorer, reward_models = build_scorer(cfg.reward, device)
        policy, reference, critic = build_models(cfg, device, reward_models, share=share)
    log.info("policy: %s; critic: %s", model_summary(policy), model_summary(critic))
    memory = weight_memory({"policy": policy, "reference": reference, **reward_models, "critic": critic})
    log.info("weights in memory (MiB each model adds; shared tensors counted once): %s", memory)
    steps = cfg.train.max_steps * cfg.ppo.epochs * (cfg.ppo.rollout_batch_size // cfg.ppo.minibatch_size)
    optimizer, scheduler = build_optimizer(cfg, policy, critic, steps)
    # the scheduler is not prepared: accelerate would step it once per process
    models = prepare_models(accelerator, policy, reference, critic, optimizer, micro_batch_size=cfg.ppo.micro_batch_size,
                            accumulation_steps=cfg.ppo.minibatch_size // cfg.ppo.micro_batch_size, max_grad_norm=cfg.train.max_grad_norm)
    kl_ctl = (AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon) if cfg.ppo.kl_target
              else FixedKLController(cfg.ppo.kl_coef))
    lag = cfg.lagrangian
    lagrange = (LagrangeMultiplier(cfg.reward.cost_weight, lag.lambda_lr, cost_limit=lag.cost_limit, optimizer=lag.lambda_optimizer,
                                   max_value=lag.lambda_max) if cfg.reward.rule == "safe_rlhf" else None)
    ctx = Context(cfg, accelerator, tokenizer, models, scorer, scheduler, kl_ctl, RunningMoments(), memory, lagrange, RunningMoments())
    set_seed(cfg.run.seed + accelerator.process_index)  # each process samples its own responses
    return ctx, train, val


def weight_memory(models: dict[str, Any]) -> dict[str, float]:
    """MiB of parameters and buffers each model adds, in order, counting a tensor shared with an
    earlier model (the reference = policy base, the critic's backbone = the helpfulness RM) once."""
    seen: set[int] = set()
    out = {}
    for name, model in models.items():
        if model is None:
            continue
        total = 0
        for t in [*model.parameters(), *model.buffers()]:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        out[name] = round(total / 2**20, 2)
    out["total"] = round(sum(out.values()), 2)
    return out


def save_checkpoint(ctx: Context, out: Path, iteration: int, loop: dict) -> None:
    """Trainable weights, optimiser, scheduler, KL controller, reward statistics, loop state and
    every process's RNG streams, written atomically."""
    import torch

    from alignment.rl.checkpoint import finalize, rng_state, staging_dir

    acc = ctx.accelerator
    ckpts = out / "checkpoints"
    staging = staging_dir(ckpts, iteration)
    if acc.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(rng_state(), staging / f"rng-{acc.process_index}.pt")
    ctx.models.save_engine(staging)  # DeepSpeed: every process writes its partition
    with ctx.models.gathered():
        models_state = ctx.models.checkpoint_state()  # weights and optimiser (DDP), or nothing (in the engine's files)
    acc.wait_for_everyone()
    if acc.is_main_process:
        torch.save({
            "iteration": iteration,
            **models_state,
            "scheduler": ctx.scheduler.state_dict(),
            "kl_ctl": ctx.kl_ctl.state_dict(),
            "running_reward": ctx.running_reward.state_dict(),
            "running_cost": ctx.running_cost.state_dict(),
            "lagrange": ctx.lagrange.state_dict() if ctx.lagrange is not None else None,
            "loop": loop,
        }, staging / "state.pt")
        finalize(ckpts, iteration, ctx.cfg.eval.save_total_limit)
        log.info("checkpoint %s", ckpts / f"checkpoint-{iteration}")
    acc.wait_for_everyone()


def load_checkpoint(ctx: Context, checkpoint: Path) -> tuple[int, dict]:
    import torch

    from alignment.rl.checkpoint import set_rng_state

    acc = ctx.accelerator
    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
    ctx.models.load_checkpoint(state, checkpoint)
    ctx.scheduler.load_state_dict(state["scheduler"])
    ctx.kl_ctl.load_state_dict(state["kl_ctl"])
    ctx.running_reward.load_state_dict(state["running_reward"])
    if ctx.lagrange is not None:
        if state.get("lagrange") is None:
            raise ValueError(f"{checkpoint} was written without PPO-Lagrangian (reward.rule=safe_rlhf): it holds no λ to resume")
        ctx.lagrange.load_state_dict(state["lagrange"])
        ctx.running_cost.load_state_dict(state["running_cost"])
    rng_file = checkpoint / f"rng-{acc.process_index}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} is missing: the checkpoint was written by fewer processes than this run has")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return int(state["iteration"]), state["loop"]


def save_policy(ctx: Context, folder: Path) -> None:
    """The policy (its LoRA adapter, or full weights) and tokenizer, loadable as model.name=<folder>.
    Written by the main process under a temporary name and renamed. Collective: every process
    calls it (ZeRO-3 gathers the partitioned weights first)."""
    with ctx.models.gathered():
        if ctx.accelerator.is_main_process:
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            ctx.models.policy.save_pretrained(tmp)
            ctx.tokenizer.save_pretrained(tmp)
            set_adapter_base(tmp, ctx.cfg.model.name)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
    ctx.accelerator.wait_for_everyone()


def _drop_samples_after(path: Path, iteration: int) -> None:
    if path.is_file():
        rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["iteration"] <= iteration]
        path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")


def _write_samples(path: Path, iteration: int, split: str, rows: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({"iteration": iteration, "split": split, **row}, ensure_ascii=False) + "\n")


def peak_memory_gb() -> dict[str, float]:
    """Peak resident memory of this process (CPU), and peak CUDA memory allocated when on a GPU."""
    import torch

    out = {"perf/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["perf/peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ---------------------------------------------------------------------------------------------
# main


def main(cfg: PPOConfig, *, resume: bool = False) -> Path:
    import torch
    from accelerate import Accelerator

    out = start_stage(cfg, STAGE, resume=resume)  # process group (if launched on several), logging, output folder
    # cpu=True also on machines without a GPU: only then does accelerate wrap models in DDP over gloo;
    # DeepSpeed runs only with cpu=False (on CPU through the gloo state distributed.init created)
    acc = Accelerator(cpu=(cfg.model.device == "cpu" or not torch.cuda.is_available()) and not distributed.uses_deepspeed())
    checkpoint = last_checkpoint(out) if resume else None

    ctx, train_prompts, val_prompts = setup(cfg, acc)
    launch = {"type": str(acc.distributed_type), "processes": acc.num_processes,
              "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None, "device": str(acc.device)}
    log.info("PPO: %d training / %d held-out prompts, %d process(es), %s (backend %s, %s)", len(train_prompts), len(val_prompts),
             acc.num_processes, launch["type"], launch["backend"], launch["device"])
    start, loop = 0, {"best": None, "best_iteration": None, "bad_evals": 0, "baseline": None, "stopped_early": False}
    if checkpoint is not None:
        start, loop = load_checkpoint(ctx, checkpoint)
        log.info("resuming from %s (iteration %d)", checkpoint, start)
    samples_path = out / "samples.jsonl"
    logger = MetricsLogger(out, run=cfg.run, stage=STAGE, config=cfg, enabled=acc.is_main_process,
                           resume_step=start if checkpoint else (-1 if resume else None))
    if acc.is_main_process and resume:
        _drop_samples_after(samples_path, start if checkpoint else -1)
        if checkpoint is None:
            shutil.rmtree(out / "best", ignore_errors=True)

    def run_eval(iteration: int) -> dict[str, float]:
        """Evaluate, update the early-stopping state, keep the best policy."""
        metrics, rows = evaluate(ctx, val_prompts)
        value = metrics["eval/reward_combined"]
        if loop["best"] is None or value > loop["best"] + cfg.eval.min_delta:
            loop.update(best=value, best_iteration=iteration, bad_evals=0)
            if cfg.eval.keep_best:
                save_policy(ctx, out / "best")
        else:
            loop["bad_evals"] += 1
        if acc.is_main_process:
            _write_samples(samples_path, iteration, "heldout", rows[: cfg.eval.num_samples])
        return {**metrics, "eval/best": loop["best"]}

    if start == 0 and cfg.eval.every:
        baseline = run_eval(0)
        loop["baseline"] = baseline["eval/reward_combined"]
        logger.log(baseline, step=0)
        log.info("held-out reward before training: %.4f", loop["baseline"])

    times = []
    iteration = start
    for iteration in range(start + 1, cfg.train.max_steps + 1):
        t_start = time.perf_counter()
        prompts = prompt_batch(train_prompts, iteration, cfg.ppo.rollout_batch_size, cfg.run.seed, acc.process_index, acc.num_processes)
        rollout, metrics, samples = make_experience(ctx, prompts)  # 1. make experience

        if ctx.lagrange is not None:  # PPO-Lagrangian: one dual-ascent step on this batch's mean cost, before the advantages
            if iteration > cfg.lagrangian.update_delay:
                ctx.lagrange.update(metrics["cost/episode"])
            metrics["lagrangian/lambda"] = ctx.lagrange.value

        t0 = time.perf_counter()
        metrics.update(compute_advantages(rollout, ctx.kl_ctl.value, cfg.ppo, ctx.reduce,  # 2. advantages
                                          lam=ctx.lagrange.value if ctx.lagrange is not None else None))
        metrics["time/advantages"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        metrics.update(ppo_update(ctx, rollout))  # 3. update
        metrics["time/update"] = time.perf_counter() - t0
        ctx.kl_ctl.update(metrics["kl/ref"], cfg.ppo.rollout_batch_size * acc.num_processes)

        metrics["time/iteration"] = time.perf_counter() - t_start
        keys = sorted(metrics)  # global means over processes (sums for token counts)
        averaged = acc.reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=acc.device), "mean").tolist()
        metrics = dict(zip(keys, averaged))
        metrics["tokens/generated"] *= acc.num_processes
        metrics["perf/tokens_per_s"] = metrics["tokens/generated"] / metrics["time/iteration"]
        metrics["perf/gen_tokens_per_s"] = metrics["tokens/generated"] / metrics["time/generate"]
        metrics.update(peak_memory_gb())
        times.append(metrics["time/iteration"])

        if cfg.eval.every and iteration % cfg.eval.every == 0 or iteration == cfg.train.max_steps:
            metrics.update(run_eval(iteration))
            loop["stopped_early"] = bool(cfg.eval.patience) and loop["bad_evals"] >= cfg.eval.patience
        if acc.is_main_process and cfg.eval.samples_every and iteration % cfg.eval.samples_every == 0:
            _write_samples(samples_path, iteration, "train", samples[: cfg.eval.num_samples])
        logger.log(metrics, step=iteration)
        log.info("iteration %d: reward %.4f, KL %.4f, held-out %s, %.1f s", iteration, metrics["reward/combined"], metrics["kl/ref"],
                 f"{metrics['eval/reward_combined']:.4f}" if "eval/reward_combined" in metrics else "-", metrics["time/iteration"])

        if iteration % cfg.eval.save_every == 0 or loop["stopped_early"] or iteration == cfg.train.max_steps:
            save_checkpoint(ctx, out, iteration, loop)
        if loop["stopped_early"]:
            log.info("early stopping at iteration %d: no held-out improvement in %d evaluations (best at %s)",
                     iteration, cfg.eval.patience, loop["best_iteration"])
            break

    # save: the best policy by held-out reward (early stopping), or the last one
    fingerprints = distributed.fingerprints(ctx.models.policy)  # collective: replicas in sync give equal numbers
    model_dir = out / "model"
    keep_best = cfg.eval.keep_best and (out / "best").is_dir()
    if not keep_best:
        save_policy(ctx, model_dir)  # collective
    if acc.is_main_process:
        if keep_best:
            shutil.rmtree(model_dir, ignore_errors=True)
            shutil.copytree(out / "best", model_dir)
        summary = {
            "iterations": iteration, "stopped_early": loop["stopped_early"], "best_iteration": loop["best_iteration"],
            "eval_reward_baseline": loop["baseline"], "eval_reward_best": loop["best"],
            "seconds_per_iteration": sum(times) / len(times) if times else None,
            "resumed_from": checkpoint.name if checkpoint else None, **peak_memory_gb(),
            **{f"weights_mib/{k}": v for k, v in ctx.weights_mib.items()},
            "model": "best" if cfg.eval.keep_best and (out / "best").is_dir() else "last",
            "rank_fingerprints": fingerprints, "launch": launch,
        }
        logger.summary(summary)
        log.info("PPO done: %s (held-out reward %s -> best %s at iteration %s)", out, loop["baseline"], loop["best"], loop["best_iteration"])
    logger.close()
    acc.wait_for_everyone()
    return out
