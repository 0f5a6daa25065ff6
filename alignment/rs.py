"""Rejection-sampling fine-tuning (Llama 2, section 3.2.3): best-of-K by reward, then SFT on the best.

Length (~460 lines): one stage read top to bottom: sample, score, select, fine-tune, evaluate, resume. Which sample a
prompt keeps and the pool of every round's are pure functions in ``alignment.rs_pool``.

    align rs --config configs/rs.yaml [key=value ...] [--resume]

One round:
  1. Prompts: mix the sources; hold out a share (by a hash of the prompt) to measure the result.
  2. Evaluate the policy before: responses to the held-out prompts (``eval`` decoding), scored.
  3. Sample K responses per training prompt at temperature T, batched (several prompts x K samples
     per ``generate`` call, KV cache), score each with the reward and keep the best. The reward is
     the combined helpfulness/safety score (Llama 2 eq. 4, ``reward.combine.CombinedScorer``) with
     each prompt's safety flag, a single reward model, or a rule-based function. Each prompt's
     samples and rewards are appended to ``samples.jsonl`` as soon as its batch is scored; a killed
     run resumed with ``--resume`` skips every prompt already there.
  4. Pool: this round's best samples plus every earlier round's (``pool.previous``: the previous
     RS round's ``pool.jsonl``, which already holds all rounds before it; a record found in several
     given files is kept once), each record tagged with its round, written to ``pool.jsonl``
     (readable as SFT data). Llama 2 first
     fine-tuned on the last round's samples only and saw regressions (e.g. forgetting how to
     rhyme); keeping the best samples of every earlier round fixed them (Llama 2, section 3.2.3).
  5. Fine-tune on the pool with the SFT stage's trainer (``alignment.sft.build_trainer``:
     assistant-only loss, LoRA or full, checkpoints and ``--resume``).
  6. Evaluate again with the same prompts, decoding and seed; ``summary.json`` holds both.

Under ``--launch`` (several processes) the sampling batches and the held-out prompts are shared out and
the results gathered (the first process writes the files): the same samples and pool as one process.

Outputs (``runs/<run>/rs/``): ``samples.jsonl`` (every sample with its reward), ``pool.jsonl``,
``eval_before.json`` / ``eval_after.json`` (responses and rewards), ``model/`` (the fine-tuned
policy: ``model.name=runs/<run>/rs`` samples the next round), ``checkpoints/``, ``metrics.jsonl``
(SFT curve), ``summary.json``.

Departures from the paper: Llama 2 samples with its latest RLHF model and K up to 100 at T 1.2-1.3
(best for large K); on a 135M model on CPU the default K and T are the ones measured in
``benchmarks/rs_temperature.py`` (README). Samples that never emit the end-of-turn token are not
eligible (``sampling.require_eos``): SFT on a truncated answer would teach the model to stop
mid-sentence. Llama 2 fine-tunes from the previous round's checkpoint; here the policy named by
``model.name`` is both sampled and fine-tuned (point it at the last round's output).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from foundation import distributed
from foundation.adapters import AdapterConfig
from foundation.config import check, option
from foundation.models import ModelConfig
from foundation.runs import MetricsLogger, RunConfig, last_checkpoint, start_stage
from foundation.training import TrainConfig
from data.loaders import DataSource
from data.schemas import Message, PromptRecord
from reward.config import RewardConfig, build_scorer

from alignment.rs_pool import eligible_of, merge_pools, pick_of, pick_seed, pool_record, prompt_key, read_pool

if TYPE_CHECKING:
    from reward.scorer import RewardScorer

log = logging.getLogger(__name__)
STAGE = "rs"


@dataclass
class RSPromptsConfig:
    """Prompts to sample for, and the held-out share that measures the result."""

    sources: list[DataSource] = option(factory=lambda: [DataSource("bundled:prompts")],
                                       doc="prompt datasets to mix (prompt files, or the prompt side of dialogue/preference "
                                           "data); see data.loaders.DataSource")
    val_fraction: float = option(0.1,
                                 "share of prompts held out for the before/after evaluation (chosen by a hash of the prompt)")

    def __post_init__(self) -> None:
        check(bool(self.sources), "sources", "needs at least one data source")
        check(0 < self.val_fraction < 1, "val_fraction",
              f"must be in (0, 1): the held-out prompts measure the result, got {self.val_fraction}")


@dataclass
class SamplingConfig:
    """Best-of-K sampling."""

    num_samples: int = option(4, "K: responses sampled per prompt; the best one (by reward) is kept")
    temperature: float = option(1.0, "sampling temperature (Llama 2: 1.2-1.3 best for K of 10-100; see "
                                     "benchmarks/rs_temperature.py for a 135M model)")
    top_p: float = option(1.0, "nucleus sampling threshold (1 = off)")
    max_new_tokens: int = option(256, "length limit of each sampled response")
    batch_size: int = option(16, "sequences per generate call: batch_size // K prompts with their K samples "
                                 "each (at least one prompt)")
    require_eos: bool = option(True, "only responses that end with the end-of-turn token (and are not empty) can be kept")
    pick: Literal["best", "random"] = option("best", "which eligible sample a prompt keeps: best = the highest reward "
                                                     "(rejection sampling); random = a seeded random one, the control "
                                                     "that shows what the reward's ranking adds (same samples, no ranking)")

    def __post_init__(self) -> None:
        check(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        check(self.temperature > 0, "temperature", f"must be > 0 (best-of-K needs different samples), got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")


@dataclass
class PoolConfig:
    """The pool of best samples kept across rounds."""

    round: int = option(1, "this round's number; its pool records are tagged with it")
    previous: list[str] = option(factory=list, doc="earlier pool.jsonl files whose records are kept in this round's pool: the "
                                                   "previous RS round's pool (it already holds every round before it); a record "
                                                   "found in several files is kept once")

    def __post_init__(self) -> None:
        check(self.round >= 1, "round", f"must be >= 1, got {self.round}")


@dataclass
class RSEvalConfig:
    """The before/after evaluation on held-out prompts."""

    temperature: float = option(0.0, "decoding temperature (0 = greedy)")
    samples: int = option(1, "responses per held-out prompt (more than 1 needs temperature > 0)")
    max_new_tokens: int = option(256, "length limit of the evaluated responses")
    batch_size: int = option(16, "generation batch size")

    def __post_init__(self) -> None:
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(self.samples >= 1, "samples", f"must be >= 1, got {self.samples}")
        check(self.samples == 1 or self.temperature > 0, "samples",
              "several responses per prompt need temperature > 0 (greedy gives one)")
        check(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")


@dataclass
class RSConfig:
    """Rejection-sampling fine-tuning."""

    run: RunConfig = option(factory=RunConfig, doc="run name, output folder, seed, tracking")
    model: ModelConfig = option(factory=ModelConfig, doc="the policy: sampled, then fine-tuned on the pool")
    data: RSPromptsConfig = option(factory=RSPromptsConfig, doc="prompts")
    sampling: SamplingConfig = option(factory=SamplingConfig, doc="best-of-K sampling")
    reward: RewardConfig = option(factory=RewardConfig, doc="the reward that ranks samples")
    pool: PoolConfig = option(factory=PoolConfig, doc="round number and earlier rounds' pools")
    train: TrainConfig = option(factory=lambda: TrainConfig(lr=2e-4), doc="SFT on the pool: optimisation")
    adapter: AdapterConfig = option(factory=AdapterConfig, doc="SFT on the pool: full fine-tuning, LoRA, QLoRA or prompt tuning")
    eval: RSEvalConfig = option(factory=RSEvalConfig, doc="before/after evaluation on held-out prompts")


Config = RSConfig


# ---------------------------------------------------------------------------------------------
# reward


def score(scorer: RewardScorer, prompts: Sequence[Sequence[Message]], responses: Sequence[str],
          is_safety: Sequence[bool]) -> dict[str, list[float]]:
    """{"reward": [B]} plus "helpful" and "safety" [B] when the scorer combines two reward models."""
    detail = scorer.score_detailed(prompts, responses, is_safety=list(is_safety))
    return {("reward" if k == "combined" else k): v.tolist() for k, v in detail.items()}


# ---------------------------------------------------------------------------------------------
# steps


def load_prompts(cfg: RSPromptsConfig, seed: int) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(1) (training, held-out) prompts, each prompt once."""
    from data.loaders import load_prompts as load
    from data.mixing import mix, split

    seen: set[str] = set()
    prompts = []
    for p in mix([(load(src), src.weight) for src in cfg.sources], seed=seed):
        if prompt_key(p.messages) not in seen:  # duplicates would be sampled twice and skew the pool
            seen.add(prompt_key(p.messages))
            prompts.append(p)
    train, val, _ = split(prompts, val_fraction=cfg.val_fraction, seed=seed, at_least_one_val=True)
    if not train or not val:
        raise ValueError(f"{len(prompts)} prompts give {len(train)} for sampling and {len(val)} held out; add prompts or "
                         "change data.val_fraction")
    return train, val


def evaluate(model: Any, tokenizer: Any, scorer: Any, prompts: Sequence[PromptRecord], cfg: RSEvalConfig, seed: int) -> dict:
    """(2, 6) Mean reward of the policy's responses to held-out prompts (same decoding and seed before and after).

    Under several processes each process answers a contiguous share of the prompts and the shares are
    gathered in order (greedy decoding, the default, gives one process's responses; sampled ones are
    drawn per share). A collective call: every process makes it."""
    from foundation.generation import generate

    convs = [p.messages for p in prompts for _ in range(cfg.samples)]
    flags = [p.is_safety for p in prompts for _ in range(cfg.samples)]
    mine = distributed.shard(len(convs))
    part: dict[str, Any] = {"texts": [], "finished": [], "tokens": [], "scores": {}}
    if len(mine):
        gens = generate(model, tokenizer, [convs[i] for i in mine], max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature, batch_size=cfg.batch_size, seed=seed)
        texts = [g.text for g in gens]
        part = {"texts": texts, "finished": [g.finished for g in gens], "tokens": [len(g.response_ids) for g in gens],
                "scores": score(scorer, [convs[i] for i in mine], texts, [flags[i] for i in mine])}
    parts = distributed.all_gather(part)
    texts = [t for q in parts for t in q["texts"]]
    keys = next((list(q["scores"]) for q in parts if q["scores"]), [])
    scores = {key: [v for q in parts for v in q["scores"].get(key, [])] for key in keys}
    n = len(texts)
    result: dict[str, Any] = {f"mean_{k}": sum(v) / n for k, v in scores.items()}
    result.update(n=n, finished=sum(f for q in parts for f in q["finished"]) / n,
                  mean_tokens=sum(t for q in parts for t in q["tokens"]) / n)
    result["responses"] = [{"prompt": c, "response": t, **{k: v[i] for k, v in scores.items()}}
                           for i, (c, t) in enumerate(zip(convs, texts))]
    return result


class SampleLog:
    """``samples.jsonl``: one line per prompt, appended and flushed as soon as the prompt is scored.

    Opening it drops a last line left half-written by a killed run; ``done`` holds the prompt keys
    already there, which a resumed run skips. ``writer=False`` (every process but the first, under a
    multi-process launch): the file is only read, and ``append`` keeps the record in memory.
    """

    def __init__(self, path: Path, *, writer: bool = True) -> None:
        self.path = path
        self.writer = writer
        self.records: list[dict] = []
        if path.is_file():
            raw = path.read_bytes()
            lines = raw.split(b"\n")
            complete, tail = lines[:-1], lines[-1]  # bytes after the last newline never finished
            for lineno, line in enumerate(complete, 1):
                if line.strip():
                    try:
                        self.records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{lineno}: malformed JSON ({exc.msg}); the sample log is damaged") from None
            if tail and writer:
                log.warning("%s: dropping a half-written last line (%d bytes) from a killed run", path, len(tail))
                with path.open("r+b") as fh:
                    fh.truncate(len(raw) - len(tail))
        self.done = {r["key"] for r in self.records}

    def append(self, record: dict) -> None:
        if self.writer:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        self.records.append(record)
        self.done.add(record["key"])


def sample_round(model: Any, tokenizer: Any, scorer: Any, prompts: Sequence[PromptRecord], cfg: SamplingConfig,
                 samples: SampleLog, seed: int) -> dict:
    """(3) K samples per pending prompt, scored; each prompt's record appended when its batch is done.

    The pending prompts go in batches of ``batch_size // K`` prompts, each batch with its own seed (from its
    first prompt). Under several processes the batches are dealt out in rounds, one per process; each round's
    records are gathered and appended in batch order by every process (written to the file by the first), so
    the samples, and the pool, are the ones one process draws. Prefill and decode seconds add up the processes'."""
    k = cfg.num_samples
    pending = [p for p in prompts if prompt_key(p.messages) not in samples.done]
    if len(pending) < len(prompts):
        log.info("sampling: %d of %d prompts already done, %d to go", len(prompts) - len(pending), len(prompts), len(pending))
    per_call = max(1, cfg.batch_size // k)
    chunks = [pending[i:i + per_call] for i in range(0, len(pending), per_call)]
    world, rank = distributed.world_size(), distributed.rank()
    t0, new_tokens, prefill, decode, done = time.time(), 0, 0.0, 0.0, 0
    for first in range(0, len(chunks), world):
        mine = chunks[first + rank] if first + rank < len(chunks) else []
        part = _sample_chunk(model, tokenizer, scorer, mine, cfg, seed) if mine else ([], 0, 0.0, 0.0)
        for records, tokens, pre, dec in distributed.all_gather(part):  # rank order is batch order
            for record in records:
                samples.append(record)
            new_tokens, prefill, decode, done = new_tokens + tokens, prefill + pre, decode + dec, done + len(records)
        log.info("sampled %d / %d prompts (%.1f new tokens/s)", done, len(pending), new_tokens / max(time.time() - t0, 1e-9))
    seconds = time.time() - t0
    return {"prompts_sampled": len(pending), "prompts_already_done": len(prompts) - len(pending),
            "sampling_seconds": round(seconds, 2), "sampling_prefill_seconds": round(prefill, 2),
            "sampling_decode_seconds": round(decode, 2),
            "sampling_tokens_per_second": round(new_tokens / seconds, 2) if seconds > 0 else None}


def _sample_chunk(model: Any, tokenizer: Any, scorer: Any, chunk: Sequence[PromptRecord], cfg: SamplingConfig,
                  seed: int) -> tuple[list[dict], int, float, float]:
    """One generate call: K samples for each prompt of ``chunk``, scored; (records, new tokens, prefill s, decode s)."""
    from foundation.generation import generate

    k = cfg.num_samples
    convs = [p.messages for p in chunk for _ in range(k)]
    # a seed per chunk (from its first prompt), so a resumed run (or another process) samples it as a fresh one would
    chunk_seed = int(prompt_key(chunk[0].messages), 16) % (2**31) ^ seed
    gens = generate(model, tokenizer, convs, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                    top_p=cfg.top_p, batch_size=cfg.batch_size, seed=chunk_seed)
    scores = score(scorer, convs, [g.text for g in gens], [p.is_safety for p in chunk for _ in range(k)])
    records = []
    for j, p in enumerate(chunk):
        rows = range(j * k, (j + 1) * k)
        sampled = [{"response": gens[i].text, "finished": gens[i].finished, "tokens": len(gens[i].response_ids),
                    **{name: vals[i] for name, vals in scores.items()}} for i in rows]
        key = prompt_key(p.messages)
        records.append({"key": key, "id": p.id, "prompt": p.messages, "category": p.category, "samples": sampled,
                        "best": pick_of([s["reward"] for s in sampled], eligible_of(sampled, cfg.require_eos), cfg.pick,
                                        pick_seed(key, seed))})
    return records, sum(len(g.response_ids) for g in gens), gens.stats.seconds_prefill, gens.stats.seconds_decode


# ---------------------------------------------------------------------------------------------
# the stage


def main(cfg: RSConfig, *, resume: bool = False) -> Path:
    import gc

    import torch

    from foundation.adapters import set_adapter_base
    from foundation.models import load_causal_lm, load_tokenizer, model_summary
    from alignment.sft import trainer_for
    from foundation.training import mean_logged_loss, train_resumed
    from data.loaders import load_sft, write_jsonl

    out = start_stage(cfg, STAGE, resume=resume)
    main_process = distributed.is_main()
    torch.manual_seed(cfg.run.seed)

    # 1. prompts, earlier pools (read first: a bad file stops the run before any work)
    train_prompts, eval_prompts = load_prompts(cfg.data, cfg.run.seed)
    earlier = [read_pool(p) for p in cfg.pool.previous]
    log.info("RS round %d: %d prompts to sample, %d held out; %d earlier pool records", cfg.pool.round, len(train_prompts),
             len(eval_prompts), sum(map(len, earlier)))
    scorer, _ = build_scorer(cfg.reward, cfg.model.device)
    pool_path = out / "pool.jsonl"
    timings: dict[str, float] = {}

    # 2-3. evaluate, then sample (skipped when a resumed run already wrote its pool)
    before_path = out / "eval_before.json"
    sampling: dict = {}
    if not pool_path.is_file() or not before_path.is_file():
        model = load_causal_lm(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device, revision=cfg.model.revision,
                               attn_implementation=cfg.model.attn_implementation)
        tokenizer = load_tokenizer(cfg.model.name, revision=cfg.model.revision)
        if not before_path.is_file():
            t0 = time.time()
            before = evaluate(model, tokenizer, scorer, eval_prompts, cfg.eval, cfg.run.seed)
            timings["eval_before_seconds"] = round(time.time() - t0, 2)
            if main_process:
                before_path.write_text(json.dumps(before, indent=2, ensure_ascii=False) + "\n")
        samples = _open_samples(out / "samples.jsonl")
        sampling = sample_round(model, tokenizer, scorer, train_prompts, cfg.sampling, samples, cfg.run.seed)
        del model
        gc.collect()
    distributed.barrier()  # the first process has written eval_before.json and every sample
    before = json.loads(before_path.read_text())
    log.info("held-out reward before: %.4f", before["mean_reward"])

    # 4. the pool: all earlier rounds + this round's best
    samples = _open_samples(out / "samples.jsonl")
    keys = {prompt_key(p.messages) for p in train_prompts}
    this_round = [r for r in samples.records if r["key"] in keys]
    new = [pool_record(PromptRecord(r["prompt"], r["category"], r["id"]), r["samples"][r["best"]]["response"],
                       r["samples"][r["best"]]["reward"], cfg.pool.round,
                       temperature=cfg.sampling.temperature, model=cfg.model.name)
           for r in this_round if r["best"] is not None]
    if main_process and not pool_path.is_file():
        write_jsonl(pool_path, merge_pools(earlier, new))
    distributed.barrier()
    pool = load_sft(str(pool_path))
    all_rewards = [s["reward"] for r in this_round for s in r["samples"]]
    sampling.update(
        mean_sample_reward=sum(all_rewards) / max(len(all_rewards), 1),
        mean_best_reward=sum(row["reward"] for row in new) / max(len(new), 1),
        prompts_without_eligible_sample=sum(r["best"] is None for r in this_round),
        pool_new=len(new), pool_size=len(pool),
    )
    if not pool:
        raise ValueError(f"{pool_path} is empty: no sample was eligible (see sampling.require_eos)")
    log.info("pool: %d records (%d new, mean best reward %.4f vs mean sample reward %.4f)", len(pool), len(new),
             sampling["mean_best_reward"], sampling["mean_sample_reward"])

    # 5. SFT on the pool, with the SFT stage's trainer
    checkpoint = last_checkpoint(out) if resume else None
    logger = MetricsLogger(out, run=cfg.run, stage=STAGE, config=cfg, enabled=main_process,
                           resume_step=int(checkpoint.name.split("-")[-1]) if checkpoint else None)
    trainer = trainer_for(cfg.run, cfg.model, cfg.train, cfg.adapter, out, pool, [], logger)
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    t0 = time.time()
    train_resumed(trainer, checkpoint)
    timings["sft_seconds"] = round(time.time() - t0, 2)

    # 6. evaluate after, save
    tokenizer = trainer.processing_class
    t0 = time.time()
    with _whole_model(trainer) as policy:
        after = evaluate(policy, tokenizer, scorer, eval_prompts, cfg.eval, cfg.run.seed)
    timings["eval_after_seconds"] = round(time.time() - t0, 2)
    log.info("held-out reward: %.4f before -> %.4f after", before["mean_reward"], after["mean_reward"])
    summary_fingerprints = distributed.fingerprints(trainer.model_wrapped)  # collective; None for one process
    model_dir = out / "model"
    trainer.save_model(str(model_dir))  # every process: under ZeRO-3 it gathers the partitions; the first writes
    if trainer.is_world_process_zero():
        (out / "eval_after.json").write_text(json.dumps(after, indent=2, ensure_ascii=False) + "\n")
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(model_dir)
        if cfg.adapter.method != "full":
            set_adapter_base(model_dir, cfg.model.name)
        def brief(ev):
            return {k: v for k, v in ev.items() if k != "responses"}
        logger.summary({
            "round": cfg.pool.round, "prompts_train": len(train_prompts), "prompts_eval": len(eval_prompts),
            "num_samples": cfg.sampling.num_samples, "temperature": cfg.sampling.temperature, **sampling,
            "pool_by_round": _count_by_round(pool_path), "sft_train_loss": mean_logged_loss(trainer.state.log_history),
            "sft_global_step": trainer.state.global_step, "resumed_from": checkpoint.name if checkpoint else None,
            "reward_before": before["mean_reward"], "reward_after": after["mean_reward"],
            **{f"eval_before_{k}": v for k, v in brief(before).items()},
            **{f"eval_after_{k}": v for k, v in brief(after).items()}, **timings, **model_summary(trainer.model),
            "processes": distributed.world_size(), "rank_fingerprints": summary_fingerprints,
        })
        log.info("RS done: %s", out)
    logger.close()
    return out


def _open_samples(path: Path) -> SampleLog:
    """The sample log: the first process opens it (dropping a half-written last line), then the others read it."""
    samples = SampleLog(path) if distributed.is_main() else None
    distributed.barrier()
    return samples if samples is not None else SampleLog(path, writer=False)


@contextlib.contextmanager
def _whole_model(trainer: Any) -> Iterator[Any]:
    """The trained policy with every weight on this process, to generate from (under ZeRO-3 TRL gathers them)."""
    if not distributed.uses_deepspeed():
        yield trainer.model
        return
    from trl.models import unwrap_model_for_generation

    with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator, gather_deepspeed3_params=True) as model:
        yield model


def _count_by_round(pool_path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    from foundation.runs import read_jsonl

    for row in read_jsonl(pool_path):
        r = str(row["round"])
        counts[r] = counts.get(r, 0) + 1
    return counts
