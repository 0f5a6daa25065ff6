"""Reward models: a helpfulness RM and a safety RM, the Llama 2 way (section 3.2.2).

    align rm --config configs/rm_helpful.yaml [key=value ...] [--resume]     # -> runs/<run>/rm_helpful/
    align rm --config configs/rm_safety.yaml                                 # -> runs/<run>/rm_safety/

Model: a chat/SFT checkpoint (default: the embedded SmolLM2) whose LM head is replaced by a
scalar head (``AutoModelForSequenceClassification``, ``num_labels=1``), read at the last token of
the chat-template rendering of prompt + response (``reward.model.encode``). Trained in full or
with LoRA (a peft SEQ_CLS adapter; the head is trained in full).

Loss (``reward.losses``): ``-log σ(r_c - r_r - m)`` with the margin m from the annotator's
strength rating (``margin: none | small | large``, Llama 2 appendix A.3.3), plus, optionally, the
safety auxiliary loss: binary cross-entropy of σ(r) against each response's safe/unsafe label
(``safety_aux_weight``; Llama 2 Table 29). Training runs on TRL's RewardTrainer with that loss
(``reward/trainer.py`` says why).

Data (``data.sources``: our comparison files or the annotation store's export, HH-RLHF,
PKU-SafeRLHF, TRL preference files, several mixed with weights). Each comparison has a category
(from the record or the source's ``category:``). Llama 2's mixes:

- helpfulness RM (``objective: helpfulness``, ``focus_share: 0.5``): all helpfulness comparisons
  plus an equal amount of the rest (safety and uncategorised open-source data), sampled uniformly;
- safety RM (``objective: safety``, ``focus_share: 0.9``): all safety comparisons mixed 90/10 with
  the rest (helpfulness data); pairs where the chosen response is unsafe and the other safe are
  dropped (``drop_chosen_unsafe``, on by default for the safety RM).

Steps: (1) read and validate every source, then hold out ``val_fraction`` of each by a hash of
the prompt, before anything is written; (2) mix the training part; (3) model and trainer;
(4) train (one epoch, cosine to 10% with 3% warm-up by default); (5) evaluate on the held-out
split: accuracy overall, per strength and per safety bin (``eval/rm_eval.{json,md}``,
``eval/rewards.png``), and the reward mean/std stored as ``model/reward_stats.json``; (6) save.

Departures from the paper: with a small rest pool the mix never repeats records to reach its
share (it takes all of them and logs the lower share); sequences longer than
``train.max_length`` lose their start (left truncation keeps the response), where TRL would
drop the pair.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from foundation.adapters import AdapterConfig, peft_config, quantization_config, set_adapter_base
from foundation.config import ConfigError, check, option
from foundation.models import ModelConfig
from foundation.runs import MetricsLogger, RunConfig, last_checkpoint, setup_logging, start_stage
from foundation.training import TrainConfig, metrics_callback, train_resumed, trainer_kwargs
from data.loaders import DataSource
from data.schemas import Comparison, SafetyBin
from reward.losses import MarginVariant, margin_for

log = logging.getLogger(__name__)
STAGE = "rm"
FOLDERS = {"helpfulness": "rm_helpful", "safety": "rm_safety"}


@dataclass
class RMDataConfig:
    """Comparisons and the Llama 2 data mix."""

    sources: list[DataSource] = option(factory=lambda: [DataSource("bundled:comparisons")],
                                       doc="comparison datasets (path, format, weight, category, limit ...); see "
                                           "data.loaders.DataSource")
    focus_share: float | None = option(0.5, "share of the RM's own category (objective) in the training mix; the rest is the "
                                            "other categories and uncategorised data (Llama 2: 0.5 helpfulness, 0.9 safety); "
                                            "null = all sources as weighted")
    drop_chosen_unsafe: bool | None = option(None, "drop pairs whose chosen response is unsafe and the other safe; null = on for "
                                                   "the safety RM, off for the helpfulness RM")
    val_fraction: float = option(0.1, "share of each source held out for validation (by a hash of the prompt)")

    def __post_init__(self) -> None:
        check(bool(self.sources), "sources", "needs at least one data source")
        check(self.focus_share is None or 0 < self.focus_share <= 1, "focus_share",
              f"must be in (0, 1] or null, got {self.focus_share}")
        check(0 <= self.val_fraction < 1, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")


@dataclass
class RMConfig:
    """Reward model (helpfulness or safety)."""

    run: RunConfig = option(factory=RunConfig, doc="run name, output folder, seed, tracking")
    model: ModelConfig = option(factory=ModelConfig, doc="chat/SFT model to start from (its LM head is replaced by a scalar "
                                                         "head), or a reward model to continue")
    objective: Literal["helpfulness", "safety"] = option("helpfulness", "which reward model: its data focus, its safety filter "
                                                                        "and its output folder (rm_helpful or rm_safety)")
    data: RMDataConfig = option(factory=RMDataConfig, doc="comparisons and mix")
    train: TrainConfig = option(factory=lambda: TrainConfig(lr=1e-5, min_lr_ratio=0.1, warmup_ratio=0.03),
                                doc="optimisation (Llama 2: one epoch, lr 1e-5, cosine to 10%, 3% warm-up)")
    adapter: AdapterConfig = option(factory=AdapterConfig,
                                    doc="full fine-tuning or LoRA (QLoRA on a GPU); the scalar head is always trained in full")
    margin: MarginVariant = option("small",
                                   "Llama 2 margin from the strength rating: none, small (1, 2/3, 1/3, 0) or large (3, 2, 1, 0)")
    safety_aux_weight: float = option(0.0, "weight of the safety auxiliary loss (binary safe/unsafe cross-entropy on each "
                                           "response's score); 0 = off")
    group_by_length: bool = option(True,
                                   "batch pairs of similar length together (on the bundled data: 1.48x -> 1.20x the real tokens)")
    eval_batch_size: int = option(16, "pairs per batch when scoring the validation split after training")

    def __post_init__(self) -> None:
        check(self.adapter.method in ("full", "lora", "qlora"), "adapter.method",
              f"a reward model is trained in full or with LoRA/QLoRA, got {self.adapter.method!r}")
        check(self.safety_aux_weight >= 0, "safety_aux_weight", f"must be >= 0, got {self.safety_aux_weight}")
        check(self.eval_batch_size > 0, "eval_batch_size", f"must be > 0, got {self.eval_batch_size}")


Config = RMConfig


# ---------------------------------------------------------------------------------------------
# 1-2. data


def focus_mix(records: list[Comparison], objective: str, share: float, seed: int) -> tuple[list[Comparison], dict]:
    """Llama 2 mix: every ``objective`` comparison, plus the rest sampled to make up ``1 - share``.

    Never repeats records: when the rest is too small for its share, all of it is taken.
    Returns (mixed records, counts for the summary).
    """
    from data.mixing import mix_proportions

    focus = [c for c in records if c.category == objective]
    rest = [c for c in records if c.category != objective]
    if not focus:
        raise ConfigError("data.sources", f"no {objective} comparisons to focus on (set `category: {objective}` on a source, "
                          "or data.focus_share=null to use the sources as they are)")
    want_rest = round(len(focus) * (1 - share) / share)
    if want_rest > len(rest):
        if share < 1:
            log.warning("only %d other comparisons for a %.0f%% share (%d wanted): taking all of them", len(rest),
                        100 * (1 - share), want_rest)
        parts = [(focus, float(len(focus))), (rest, float(len(rest)))]
    else:
        parts = [(focus, share), (rest, 1 - share)]
    mixed = mix_proportions(parts, seed=seed) if rest else list(focus)
    n_focus = sum(1 for c in mixed if c.category == objective)
    return mixed, {"focus": n_focus, "rest": len(mixed) - n_focus, "rest_available": len(rest)}


def load_data(cfg: RMDataConfig, objective: str, seed: int) -> tuple[list[Comparison], list[Comparison], dict]:
    """(train, validation, counts). Every source is read and validated here, before any output."""
    from data.loaders import load_comparisons
    from data.mixing import mix, split

    parts, val = [], []
    for src in cfg.sources:
        train_part, val_part, _ = split(load_comparisons(src), val_fraction=cfg.val_fraction, seed=seed)
        parts.append((train_part, src.weight))
        val += val_part
    pool = mix(parts, seed=seed)  # source weights multiply sizes
    info: dict = {"dropped_chosen_unsafe": 0}
    drop = cfg.drop_chosen_unsafe if cfg.drop_chosen_unsafe is not None else objective == "safety"
    if drop:
        def keep(c):
            return c.safety_bin != SafetyBin.CHOSEN_UNSAFE_OTHER_SAFE
        info["dropped_chosen_unsafe"] = sum(not keep(c) for c in pool) + sum(not keep(c) for c in val)
        pool, val = [c for c in pool if keep(c)], [c for c in val if keep(c)]
    if cfg.focus_share is None:
        train = pool
    else:
        train, counts = focus_mix(pool, objective, cfg.focus_share, seed)
        info.update(counts)
    if not train:
        raise ConfigError("data.val_fraction", "no training comparisons left after the validation split; lower it")
    info.update(train=len(train), validation=len(val))
    return train, val, info


def _safe_label(value: bool | None) -> float:
    return -1.0 if value is None else float(value)


def to_dataset(comparisons: list[Comparison], tokenizer, margin: MarginVariant, max_length: int):
    """A tokenized ``datasets.Dataset``: chosen_ids, rejected_ids, margin, chosen_safe, rejected_safe, length."""
    import datasets

    from reward.model import encode

    rows = []
    for c in comparisons:
        chosen, rejected = encode(tokenizer, c.prompt, c.chosen_response, max_length), encode(tokenizer, c.prompt,
                                                                                              c.rejected_response, max_length)
        rows.append({"chosen_ids": chosen, "rejected_ids": rejected, "margin": margin_for(c, margin),
                     "chosen_safe": _safe_label(c.chosen_safe), "rejected_safe": _safe_label(c.rejected_safe),
                     "length": max(len(chosen), len(rejected))})  # a pair pads to its longer side
    return datasets.Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------
# 3. model and trainer


def build_trainer(cfg: RMConfig, out: Path, train: list[Comparison], val: list[Comparison], logger: MetricsLogger | None = None):
    """The reward model (new scalar head on the chat model) and the trainer that trains it."""
    from trl import RewardConfig

    from foundation.models import load_tokenizer, resolve
    from foundation.precision import master_dtype
    from reward.model import load_reward_model
    from reward.trainer import LlamaRewardTrainer, PairCollator

    tokenizer = load_tokenizer(cfg.model.name, revision=cfg.model.revision)
    tokenizer.padding_side = "right"
    model = load_reward_model(cfg.model.name, dtype=master_dtype(cfg.model.dtype, cfg.adapter.method, cfg.model.device),
                              device=cfg.model.device, revision=cfg.model.revision,
                              attn_implementation=cfg.model.attn_implementation,
                              quantization_config=quantization_config(cfg.adapter))
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.adapter.method == "full":  # a LoRA reward model it starts from (rm_start: previous) comes merged and frozen
        model.requires_grad_(True)
    if cfg.adapter.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    args = RewardConfig(**trainer_kwargs(cfg.train, cfg.run, out, has_eval=bool(val)), max_length=cfg.train.max_length,
                        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
                        length_column_name="length")
    return LlamaRewardTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=to_dataset(train, tokenizer, cfg.margin, cfg.train.max_length),
        eval_dataset=to_dataset(val, tokenizer, cfg.margin, cfg.train.max_length) if val else None,
        data_collator=PairCollator(pad_token_id=tokenizer.pad_token_id),
        peft_config=peft_config(cfg.adapter, "SEQ_CLS", tokenizer_path=resolve(cfg.model.name).path),
        callbacks=[metrics_callback(logger)] if logger else None,
        safety_aux_weight=cfg.safety_aux_weight,
    )


# ---------------------------------------------------------------------------------------------
# run


def main(cfg: RMConfig, *, resume: bool = False) -> Path:
    import torch

    from foundation import distributed
    from foundation.models import model_summary
    from reward.evaluate import pair_metrics, score_pairs, write_report
    from reward.losses import pairwise_loss, reward_stats
    from reward.model import STATS_FILE, RewardModelScorer

    setup_logging(cfg.run.log_level)
    torch.manual_seed(cfg.run.seed)

    # 1-2. data: a bad file fails here, before the output folder is touched
    train, val, data_info = load_data(cfg.data, cfg.objective, cfg.run.seed)
    log.info("%s RM data: %s", cfg.objective, data_info)
    out = start_stage(cfg, STAGE, resume=resume, folder=FOLDERS[cfg.objective])
    checkpoint = last_checkpoint(out) if resume else None

    # 3. model and trainer
    logger = MetricsLogger(out, run=cfg.run, stage=FOLDERS[cfg.objective], config=cfg,
                           resume_step=int(checkpoint.name.split("-")[-1]) if checkpoint else None)
    trainer = build_trainer(cfg, out, train, val, logger)
    tokenizer = trainer.processing_class
    log.info("trainable parameters: %s", model_summary(trainer.model))

    # 4. train
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    t0 = time.time()
    result = train_resumed(trainer, checkpoint)
    train_seconds = time.time() - t0
    summary = {"objective": cfg.objective, "train_loss": result.training_loss, "global_step": trainer.state.global_step,
               "train_seconds": round(train_seconds, 2), "data": data_info,
               "resumed_from": checkpoint.name if checkpoint else None, **model_summary(trainer.model)}

    # 5-6. held-out report, reward statistics, save. Every rank scores and saves (ZeRO-3 gathers
    # its shards collectively); only the main rank writes the report.
    summary["rank_fingerprints"] = distributed.fingerprints(trainer.model_wrapped)  # collective; None for one process
    held_out, split_name = (val, "validation") if val else (train[:128], "train")
    scorer = RewardModelScorer(trainer.model, tokenizer, batch_size=cfg.eval_batch_size, max_length=cfg.train.max_length)
    chosen, rejected = score_pairs(scorer, held_out)
    model_dir = out / "model"
    trainer.save_model(str(model_dir))
    if trainer.is_world_process_zero():
        if not val:
            log.warning("no validation split (data.val_fraction=0): reward statistics come from %d training pairs", len(held_out))
        report = {**pair_metrics(chosen, rejected, held_out), "model": str(model_dir),
                  "data": f"{split_name} split of {', '.join(s.path for s in cfg.data.sources)}"}
        if val:
            write_report(report, chosen.tolist(), rejected.tolist(), out / "eval", replace=resume)
        tokenizer.save_pretrained(model_dir)
        if cfg.adapter.method != "full":
            set_adapter_base(model_dir, cfg.model.name)
        stats = {**reward_stats(torch.cat([chosen, rejected])), "split": split_name, "max_length": cfg.train.max_length,
                 "objective": cfg.objective}
        (model_dir / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
        margins = torch.tensor([margin_for(c, cfg.margin) for c in held_out])
        summary.update({"held_out_loss": pairwise_loss(chosen, rejected, margins).item(),
                        "held_out_accuracy": report["accuracy"], "held_out_pairs": report["n"],
                        "held_out_by_strength": {k: v["accuracy"] for k, v in report["by_strength"].items()},
                        "held_out_by_safety_bin": {k: v["accuracy"] for k, v in report["by_safety_bin"].items()},
                        "unsafe_recall": report["unsafe_recall"], "reward_mean": stats["mean"], "reward_std": stats["std"]})
        logger.summary(summary)
        log.info("%s RM done: %s (held-out accuracy %.3f on %d pairs)", cfg.objective, out, report["accuracy"], report["n"])
    logger.close()
    return out
