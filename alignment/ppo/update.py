"""PPO step 3: clipped policy and value losses over epochs x minibatches; the held-out evaluation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from alignment.ppo.experience import score_responses

if TYPE_CHECKING:
    from alignment.ppo.loop import Context

log = logging.getLogger("alignment.ppo")
STAGE = "ppo"


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
                    logged = {"policy/loss": pg_loss.detach(), "value/loss": vf_loss.detach(),
                              "policy/clipfrac": pg_stats["clipfrac"],
                              "policy/approx_kl": pg_stats["approx_kl"], "policy/ratio": pg_stats["ratio"],
                              "value/clipfrac": vf_stats["clipfrac"]}
                    if lagrangian:  # the cost critic's loss, same form and weight
                        cost_loss, cost_stats = clipped_value_loss(values[..., 1], mb.cost_values,
                                                                   mb.cost_returns, mb.response_mask, cfg.critic.value_clip)
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
    metrics["value/explained_variance"] = float(explained_variance(rollout.values, rollout.returns,
                                                                   rollout.response_mask, ctx.reduce))
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

    from foundation.generation import generate

    cfg, acc = ctx.cfg, ctx.accelerator
    shard = list(prompts[acc.process_index::acc.num_processes])
    with ctx.models.generating() as policy:
        gens = generate(policy, ctx.tokenizer, [p.messages for p in shard],
                        max_new_tokens=cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens, temperature=0.0,
                        batch_size=cfg.sampling.batch_size, sync=ctx.models.generation_sync)
    # every process scores, an empty shard too: a partitioned (ZeRO-3) reward model's forwards are collective
    raw = score_responses(ctx.scorer, shard, [g.text for g in gens])
    for name, judge in (ctx.judges or {}).items():  # extra judges (e.g. the gold): logged, never selected on
        raw[f"judge_{name}"] = judge.score([p.messages for p in shard], [g.text for g in gens]).float()
    rows = [{"prompt": p.messages, "category": p.category, "response": g.text, "finished": g.finished,
             "length": len(g.response_ids), **{f"reward_{k}": float(v[i]) for k, v in raw.items()}}
            for i, (p, g) in enumerate(zip(shard, gens))]
    rows = gather_object(rows)
    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")
    metrics = {f"eval/{k}": mean([r[k] for r in rows]) for k in rows[0] if k.startswith("reward_")}
    for category in sorted({r["category"] for r in rows}):
        metrics[f"eval/reward_combined_{category}"] = mean([r["reward_combined"] for r in rows if r["category"] == category])
    metrics["eval/length"] = mean([r["length"] for r in rows])
    metrics["eval/eos_fraction"] = mean([float(r["finished"]) for r in rows])
    if ctx.models.generation_sync is not None:  # ZeRO-3 partitions: forwards run to keep pace, over all processes
        from foundation.distributed import all_gather

        metrics["eval/generate_sync_forwards"] = float(sum(all_gather(gens.stats.sync_forwards)))
    return metrics, rows
