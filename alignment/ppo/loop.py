"""The PPO stage: the ``Context`` of a run, checkpoints (``--resume``), saving and the iteration loop (``main``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundation import distributed
from foundation.adapters import set_adapter_base
from alignment.ppo.config import PPOConfig
from alignment.ppo.experience import (
    build_models,
    build_optimizer,
    compute_advantages,
    load_prompts,
    make_experience,
    prompt_batch,
)
from alignment.ppo.update import evaluate, ppo_update
from foundation.runs import MetricsLogger, last_checkpoint, start_stage
from reward.config import build_scorer

log = logging.getLogger("alignment.ppo")
STAGE = "ppo"


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
    judges: dict[str, Any] | None = None  # eval.judges: extra scorers of the validation answers
    memory: Any = None  # foundation.memory.PhasePeaks: peak memory of each phase (memory/<phase>_gb)

    def phase(self, name: str) -> Any:
        """Measure a block's peak memory as phase ``name`` (a no-op context without a tracker)."""
        import contextlib

        return self.memory.phase(name) if self.memory is not None else contextlib.nullcontext()

    def reduce(self, t: Any) -> Any:
        """Sum a tensor over all processes (the identity with one process). The tensor must be on
        the accelerator's device: NCCL reduces GPU tensors only, so a CPU tensor here would crash a
        multi-GPU run; refusing it everywhere makes one-GPU runs catch it too."""
        import torch

        want = torch.device(self.accelerator.device)  # cpu processes may say cpu:0; cuda:N must match
        if t.device.type != want.type or (want.type != "cpu" and None not in (t.device.index, want.index)
                                          and t.device.index != want.index):
            raise RuntimeError(f"a tensor on {t.device} reached a cross-process reduction, but the processes run on "
                               f"{self.accelerator.device}: move it to accelerator.device first")
        return self.accelerator.reduce(t, "sum")


def setup(cfg: PPOConfig, accelerator: Any) -> tuple[Context, list, list]:
    import torch
    from accelerate.utils import set_seed

    from foundation.memory import PhasePeaks, rss_bytes
    from foundation.models import load_tokenizer, model_summary
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
    share = not distributed.zero3()
    runtime = rss_bytes()  # Python, torch and the libraries, before any model (memory/runtime_gb)
    with distributed.whole_weights():  # the engine partitions policy and critic (ZeRO-3); the reward models stay whole
        scorer, reward_models = build_scorer(cfg.reward, *distributed.frozen_placement(device))
        policy, reference, critic = build_models(cfg, device, reward_models, share=share)
    log.info("policy: %s; critic: %s", model_summary(policy), model_summary(critic))
    steps = cfg.train.max_steps * cfg.ppo.epochs * (cfg.ppo.rollout_batch_size // cfg.ppo.minibatch_size)
    optimizer, scheduler = build_optimizer(cfg, policy, critic, steps)
    # the scheduler is not prepared: accelerate would step it once per process
    models = prepare_models(accelerator, policy, reference, critic, optimizer, micro_batch_size=cfg.ppo.micro_batch_size,
                            accumulation_steps=cfg.ppo.minibatch_size // cfg.ppo.micro_batch_size,
                            max_grad_norm=cfg.train.max_grad_norm, gather_for_generation=cfg.sampling.gather_for_generation)
    kl_ctl = (AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon) if cfg.ppo.kl_target
              else FixedKLController(cfg.ppo.kl_coef))
    lag = cfg.lagrangian
    lagrange = (LagrangeMultiplier(cfg.reward.cost_weight, lag.lambda_lr, cost_limit=lag.cost_limit,
                                   optimizer=lag.lambda_optimizer,
                                   max_value=lag.lambda_max) if cfg.reward.rule == "safe_rlhf" else None)
    from reward import load_scorer

    with distributed.whole_weights():
        on, dtype = distributed.frozen_placement(device)
        judges = {name: load_scorer(spec, device=on, dtype=dtype) for name, spec in cfg.eval.judges.items()}
    # ZeRO-3: the frozen models (reward models, judges, a full fine-tuning reference) are partitioned
    # over the processes too, each by a DeepSpeed inference engine (a no-op under other launches)
    for model in [*reward_models.values(), *(j.model for j in judges.values()), reference]:
        if model is not None:
            distributed.partition_frozen(model)
    memory = weight_memory({"policy": policy, "reference": reference, **reward_models, "critic": critic})
    log.info("weights in memory on this process (MiB each model adds; shared tensors counted once): %s", memory)
    peaks = PhasePeaks(cuda=torch.device(accelerator.device).type == "cuda")
    peaks.runtime, peaks.loaded = runtime, rss_bytes()
    ctx = Context(cfg, accelerator, tokenizer, models, scorer, scheduler, kl_ctl, RunningMoments(), memory,
                  lagrange, RunningMoments(), judges, peaks)
    set_seed(cfg.run.seed + accelerator.process_index)  # each process samples its own responses
    return ctx, train, val


def weight_memory(models: dict[str, Any]) -> dict[str, float]:
    """MiB of parameters and buffers each model adds on this process, in order, counting a tensor
    shared with an earlier model (the reference = policy base, the critic's backbone = the helpfulness
    RM) once. A ZeRO-3 parameter counts its partition (``ds_tensor``), which is what the process holds."""
    seen: set[int] = set()
    out = {}
    for name, model in models.items():
        if model is None:
            continue
        total = 0
        for t in [*model.parameters(), *model.buffers()]:
            for held in (t, getattr(t, "ds_tensor", None)):
                if held is None or held.numel() == 0:
                    continue
                storage = held.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        out[name] = round(total / 2**20, 3)
    out["total"] = round(sum(out.values()), 3)
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
        from foundation.runs import jsonl_lines

        rows = [line for line in jsonl_lines(path.read_text(encoding="utf-8")) if json.loads(line)["iteration"] <= iteration]
        path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")


def _write_samples(path: Path, iteration: int, split: str, rows: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({"iteration": iteration, "split": split, **row}, ensure_ascii=False) + "\n")


def peak_memory_gb(peaks: Any) -> dict[str, float]:
    """Peak resident memory of this process (CPU), and the run's peak CUDA memory allocated when on a GPU
    (``peaks``: the run's :class:`foundation.memory.PhasePeaks`, which resets torch.cuda's counter per phase)."""
    import torch

    from foundation.memory import GIB, peak_rss_bytes

    out = {"perf/peak_rss_gb": peak_rss_bytes() / GIB}
    if torch.cuda.is_available():
        out["perf/peak_cuda_gb"] = peaks.cuda_peak_bytes() / GIB
    return out


# ---------------------------------------------------------------------------------------------
# main


def main(cfg: PPOConfig, *, resume: bool = False) -> Path:
    import torch
    from accelerate import Accelerator

    if distributed.uses_fsdp():  # before any work: accelerate's FSDP2 would refuse prepare(policy, critic, optimizer)
        from foundation.config import ConfigError
        from foundation.launch import UNSUPPORTED

        where = os.environ.get("ALIGN_LAUNCH_CONFIG") or "this launch (ACCELERATE_USE_FSDP=true)"
        raise ConfigError("--launch", f"{where}: align ppo cannot run under FSDP: {UNSUPPORTED['ppo', 'FSDP']}", show_key=False)
    out = start_stage(cfg, STAGE, resume=resume)  # process group (if launched on several), logging, output folder
    # cpu=True also on machines without a GPU: only then does accelerate wrap models in DDP over gloo;
    # DeepSpeed runs only with cpu=False (on CPU through the gloo state distributed.init created)
    acc = Accelerator(cpu=(cfg.model.device == "cpu" or not torch.cuda.is_available()) and not distributed.uses_deepspeed())
    checkpoint = last_checkpoint(out) if resume else None

    ctx, train_prompts, val_prompts = setup(cfg, acc)
    launch = {"type": str(acc.distributed_type), "processes": acc.num_processes,
              "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
              "device": str(acc.device)}
    log.info("PPO: %d training / %d held-out prompts, %d process(es), %s (backend %s, %s)", len(train_prompts), len(val_prompts),
             acc.num_processes, launch["type"], launch["backend"], launch["device"])
    start, loop = 0, {"best": None, "best_iteration": None, "bad_evals": 0, "baseline": None, "stopped_early": False,
                      "baseline_rewards": None, "best_gain": None}
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
        """Evaluate; keep the checkpoint whose paired validation gain over the starting policy has the
        highest lower confidence bound (alignment.rl.selection); count evaluations without one."""
        from alignment.rl.selection import Gain, improves, paired_gain

        with ctx.phase("eval"):
            metrics, rows = evaluate(ctx, val_prompts)
        rewards = [r["reward_combined"] for r in rows]
        if loop["baseline_rewards"] is None:  # the starting policy: what every checkpoint is compared with
            loop.update(baseline_rewards=rewards, best=None, best_iteration=0, best_gain=None, bad_evals=0)
            if cfg.eval.keep_best:
                save_policy(ctx, out / "best")
        else:
            gain = paired_gain(rewards, loop["baseline_rewards"], cfg.eval.z)
            best = Gain(**loop["best_gain"]) if loop["best_gain"] else None
            metrics.update({"eval/gain": gain.mean, "eval/gain_se": gain.se, "eval/gain_lcb": gain.lcb})
            if improves(gain, best, cfg.eval.min_delta):
                loop.update(best=metrics["eval/reward_combined"], best_iteration=iteration, best_gain=gain.as_dict(), bad_evals=0)
                if cfg.eval.keep_best:
                    save_policy(ctx, out / "best")
            else:
                loop["bad_evals"] += 1
        if acc.is_main_process:
            _write_samples(samples_path, iteration, "heldout", rows[: cfg.eval.num_samples])
        return {**metrics, "eval/best_iteration": float(loop["best_iteration"] or 0)}

    if start == 0 and (cfg.eval.every or cfg.eval.keep_best):  # the starting policy: what keep-best compares with
        baseline = run_eval(0)
        loop["baseline"] = baseline["eval/reward_combined"]
        logger.log(baseline, step=0)
        log.info("held-out reward before training: %.4f", loop["baseline"])

    times = []
    iteration = start
    for iteration in range(start + 1, cfg.train.max_steps + 1):
        t_start = time.perf_counter()
        prompts = prompt_batch(train_prompts, iteration, cfg.ppo.rollout_batch_size, cfg.run.seed,
                               acc.process_index, acc.num_processes)
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
        with ctx.phase("update"):
            metrics.update(ppo_update(ctx, rollout))  # 3. update
        metrics["time/update"] = time.perf_counter() - t0
        ctx.kl_ctl.update(metrics["kl/ref"], cfg.ppo.rollout_batch_size * acc.num_processes)

        metrics["time/iteration"] = time.perf_counter() - t_start
        keys = sorted(metrics)  # global means over processes (sums for token counts)
        averaged = acc.reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=acc.device),
                              "mean").tolist()
        metrics = dict(zip(keys, averaged))
        metrics["tokens/generated"] *= acc.num_processes
        metrics["perf/tokens_per_s"] = metrics["tokens/generated"] / metrics["time/iteration"]
        metrics["perf/gen_tokens_per_s"] = metrics["tokens/generated"] / metrics["time/generate"]
        metrics.update(peak_memory_gb(ctx.memory))
        metrics.update(ctx.memory.metrics())  # this process's (the main one's) peaks so far, not averaged
        times.append(metrics["time/iteration"])

        if cfg.eval.every and iteration % cfg.eval.every == 0 or iteration == cfg.train.max_steps:
            metrics.update(run_eval(iteration))
            loop["stopped_early"] = bool(cfg.eval.patience) and loop["bad_evals"] >= cfg.eval.patience
        if acc.is_main_process and cfg.eval.samples_every and iteration % cfg.eval.samples_every == 0:
            _write_samples(samples_path, iteration, "train", samples[: cfg.eval.num_samples])
        logger.log(metrics, step=iteration)
        log.info("iteration %d: reward %.4f, KL %.4f, held-out %s, %.1f s", iteration,
                 metrics["reward/combined"], metrics["kl/ref"],
                 f"{metrics['eval/reward_combined']:.4f}" if "eval/reward_combined" in metrics else "-",
                 metrics["time/iteration"])

        if iteration % cfg.eval.save_every == 0 or loop["stopped_early"] or iteration == cfg.train.max_steps:
            save_checkpoint(ctx, out, iteration, loop)
        if loop["stopped_early"]:
            log.info("early stopping at iteration %d: no validation improvement in %d evaluations (best at %s)",
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
        from alignment.rl.selection import Gain, describe

        returned = ("start" if keep_best and not loop["best_iteration"] else
                    f"iteration {loop['best_iteration']}" if keep_best else f"iteration {iteration} (last)")
        gain = Gain(**loop["best_gain"]) if loop["best_gain"] else None
        summary = {
            "iterations": iteration, "stopped_early": loop["stopped_early"], "best_iteration": loop["best_iteration"],
            "returned": returned,
            "returned_note": describe(loop["best_iteration"] or 0, gain) if keep_best else "the last policy",
            "validation_gain": loop["best_gain"], "validation_prompts": len(val_prompts), "selection_z": cfg.eval.z,
            "eval_reward_baseline": loop["baseline"], "eval_reward_best": loop["best"] if gain else loop["baseline"],
            "seconds_per_iteration": sum(times) / len(times) if times else None,
            "resumed_from": checkpoint.name if checkpoint else None, **peak_memory_gb(ctx.memory), **ctx.memory.metrics(),
            **ctx.memory.first_metrics(),
            **{f"weights_mib/{k}": v for k, v in ctx.weights_mib.items()},
            "model": "best" if cfg.eval.keep_best and (out / "best").is_dir() else "last",
            "rank_fingerprints": fingerprints, "launch": launch,
        }
        logger.summary(summary)
        log.info("PPO done: %s (validation reward %s at the start; %s)", out, loop["baseline"], summary["returned_note"])
    logger.close()
    ctx.memory.close()
    acc.wait_for_everyone()
    return out
