"""PPO step 1 and 2: prompts and models, scoring responses, making experience (a ``Rollout``), advantages."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from alignment.ppo.config import PPOAlgoConfig, PPOConfig, PromptDataConfig, PPORewardConfig

if TYPE_CHECKING:
    from alignment.ppo.loop import Context
    from reward.scorer import RewardScorer

log = logging.getLogger("alignment.ppo")
STAGE = "ppo"


# ---------------------------------------------------------------------------------------------
# setup


def load_prompts(cfg: PromptDataConfig, tokenizer: Any, seed: int) -> tuple[list, list]:
    """(train, held-out) prompts; prompts longer than max_prompt_tokens are skipped."""
    from foundation.generation import encode_prompts
    from data.loaders import load_prompts as load
    from data.mixing import mix, split

    def short(records: list) -> list:
        lengths = [len(ids) for ids in encode_prompts(tokenizer, [r.messages for r in records])]
        kept = [r for r, n in zip(records, lengths) if n <= cfg.max_prompt_tokens]
        if len(kept) < len(records):
            log.warning("skipped %d prompts longer than data.max_prompt_tokens=%d", len(records) - len(kept),
                        cfg.max_prompt_tokens)
        return kept

    kept = short(mix([(load(src), src.weight) for src in cfg.sources], seed=seed))
    if cfg.val_sources:  # a project's validation set: every source prompt trains
        from data.splits import selecting

        with selecting("keep-best and early stopping (data.val_sources)"):  # a test set here is refused
            val = short([r for src in cfg.val_sources for r in load(src)])
        val_keys = {json.dumps(r.messages, sort_keys=True) for r in val}
        train = [r for r in kept if json.dumps(r.messages, sort_keys=True) not in val_keys]
        if len(train) < len(kept):
            log.warning("dropped %d training prompts that are also validation prompts", len(kept) - len(train))
    else:
        train, val, _ = split(kept, val_fraction=cfg.val_fraction, seed=seed, at_least_one_val=True)
    if not train or not val:
        raise ValueError(f"need both training and held-out prompts, got {len(train)} and {len(val)}; check "
                         "data.sources and data.val_fraction")
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

    from foundation import distributed
    from foundation.adapters import peft_config
    from foundation.models import load_causal_lm
    from foundation.precision import master_dtype
    from alignment.rl.critic import critic_from_causal_lm, critic_from_reward_model, critic_pair, tie_identical_weights

    def load(on: str) -> Any:  # in the dtype the training device calls for, also when loaded on the CPU
        return load_causal_lm(cfg.model.name, dtype=master_dtype(cfg.model.dtype, cfg.adapter.method, device), device=on,
                              revision=cfg.model.revision, attn_implementation=cfg.model.attn_implementation)

    base = load(device)
    critic_lora = peft_config(cfg.adapter, None) if cfg.critic.lora else None
    if cfg.adapter.method == "lora":
        for p in base.parameters():
            p.requires_grad_(False)
        reference = None
        critic_source = base
    else:  # full fine-tuning: the reference is a frozen copy (the critic may share its weights)
        # under ZeRO-3 (share=False) it is loaded again on the CPU and partitioned later (distributed.partition_frozen)
        reference = (copy.deepcopy(base) if share else load(distributed.frozen_placement(device)[0])).eval()
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
                       if cfg.critic.init == "reward_model"
                       else critic_from_causal_lm(critic_source, lora=critic_lora, share=share))
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


def score_responses(scorer: RewardScorer, prompts: Sequence, responses: Sequence[str]) -> dict[str, Any]:
    """Raw rewards {"combined": [B], and "helpful"/"safety" when the scorer combines two models}."""
    is_safety = [p.is_safety for p in prompts]
    return {k: v.float() for k, v in scorer.score_detailed([p.messages for p in prompts], list(responses),
                                                           is_safety=is_safety).items()}


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

    from foundation.generation import generate
    from alignment.rl.rollout import Rollout, build_sequences

    cfg, acc, models = ctx.cfg, ctx.accelerator, ctx.models
    times = {}
    t0 = time.perf_counter()
    with ctx.phase("generate"), models.generating() as policy:
        gens = generate(policy, ctx.tokenizer, [p.messages for p in prompts], max_new_tokens=cfg.sampling.max_new_tokens,
                        temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, batch_size=cfg.sampling.batch_size,
                        sync=models.generation_sync)
    times["time/generate"] = time.perf_counter() - t0
    times["time/generate_prefill"], times["time/generate_decode"] = gens.stats.seconds_prefill, gens.stats.seconds_decode
    if models.generation_sync is not None:  # generated from ZeRO-3 partitions: forwards run to keep pace, all processes
        from foundation.distributed import all_gather

        times["perf/generate_sync_forwards"] = float(sum(all_gather(gens.stats.sync_forwards)))

    t0 = time.perf_counter()
    texts = [g.text for g in gens]
    finished = torch.tensor([g.finished for g in gens])
    with ctx.phase("score"):
        raw, scores, cost_scores, score_metrics = score_batch(ctx, prompts, texts, finished)
    times["time/score"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # a response is never empty: generate() stops a row at a sampled pad token, which is then the response
    responses = [g.response_ids or [ctx.tokenizer.pad_token_id] for g in gens]
    input_ids, attention_mask, response_mask = build_sequences([g.prompt_ids for g in gens], responses,
                                                               ctx.tokenizer.pad_token_id)
    input_ids, attention_mask, response_mask = (t.to(acc.device) for t in (input_ids, attention_mask, response_mask))
    B, R = response_mask.shape
    # the no-grad passes run over micro-batches of similar length, each cut to its own width
    frame = Rollout(input_ids, attention_mask, response_mask, *(torch.zeros(B, R, device=acc.device) for _ in range(3)),
                    torch.zeros(B, device=acc.device))
    logprobs, ref_logprobs, values, entropy = (torch.zeros(B, R, device=acc.device) for _ in range(4))
    cost_values = torch.zeros(B, R, device=acc.device) if cost_scores is not None else None
    models.train(False)
    with ctx.phase("ref_and_values"), torch.no_grad():
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
