"""Optimisation settings shared by the stages built on TRL trainers (SFT, reward model, DPO).

:class:`TrainConfig` is the one place the optimiser, schedule, batching, checkpointing and
precision are configured; :func:`trainer_kwargs` maps it onto ``transformers.TrainingArguments``
fields (which TRL's configs extend), with the defaults that are fast on the detected hardware:
fp32 and no activation checkpointing on CPU (TRL defaults to bf16 and checkpointing, both slower
on CPUs without native bf16; see benchmarks/).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from foundation import distributed
from foundation.config import check, option

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from foundation.runs import MetricsLogger, RunConfig


@dataclass
class TrainConfig:
    """Optimiser, schedule, batching, checkpointing."""

    max_steps: int = option(-1, "stop after this many optimiser steps; -1 = train for num_epochs")
    num_epochs: float = option(1.0, "passes over the training data when max_steps is -1")
    batch_size: int = option(4, "micro-batch size per device")
    grad_accum: int = option(1, "micro-batches per optimiser step (global batch = batch_size x grad_accum x processes)")
    lr: float = option(2e-5, "peak learning rate")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = option("cosine",
                                                                                           "learning-rate schedule after warm-up")
    min_lr_ratio: float = option(0.0, "cosine schedule floor as a fraction of lr (Llama 2 RMs: 0.1)")
    warmup_ratio: float = option(0.03, "fraction of steps spent warming up linearly")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off)")
    max_length: int = option(512, "truncate tokenised examples to this many tokens")
    logging_steps: int = option(5, "log training metrics every N steps")
    eval_steps: int | None = option(None, "evaluate on the validation split every N steps; null = at the end only")
    save_steps: int = option(50, "write a checkpoint every N steps (for --resume)")
    save_total_limit: int = option(2, "keep at most this many checkpoints")
    gradient_checkpointing: bool | None = option(None, "recompute activations in backward to save memory; null = on for GPUs, "
                                                       "off on CPU (faster there)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option("auto", "mixed precision: auto = fp32 on CPU, bf16 "
                                                                        "on GPUs that support it")
    dataloader_workers: int = option(0, "data-loader worker processes")

    def __post_init__(self) -> None:
        check(self.max_steps == -1 or self.max_steps > 0, "max_steps", f"must be -1 or > 0, got {self.max_steps}")
        check(self.num_epochs > 0, "num_epochs", f"must be > 0, got {self.num_epochs}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        check(self.grad_accum > 0, "grad_accum", f"must be > 0, got {self.grad_accum}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.min_lr_ratio < 1, "min_lr_ratio", f"must be in [0, 1), got {self.min_lr_ratio}")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.max_length >= 16, "max_length", f"must be >= 16, got {self.max_length}")
        check(self.logging_steps > 0, "logging_steps", f"must be > 0, got {self.logging_steps}")
        check(self.eval_steps is None or self.eval_steps > 0, "eval_steps", f"must be > 0 or null, got {self.eval_steps}")
        check(self.save_steps > 0, "save_steps", f"must be > 0, got {self.save_steps}")
        check(self.save_total_limit > 0, "save_total_limit", f"must be > 0, got {self.save_total_limit}")


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def precision_flags(precision: str) -> dict[str, bool]:
    """``bf16``/``fp16`` TrainingArguments flags for a precision setting."""
    import torch

    if precision == "auto":
        precision = "bf16" if on_gpu() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def checkpointing_kwargs(enabled: bool, fields: Collection[str] | None = None) -> dict[str, Any]:
    """The TrainingArguments fields that turn activation checkpointing on or off, under the names this transformers
    knows: ``activation_checkpointing[_kwargs]`` in the pinned 5.23, ``gradient_checkpointing[_kwargs]`` before that
    (the GPU check's machine has 5.17). ``fields``: TrainingArguments' field names (default: read them)."""
    if fields is None:
        import dataclasses

        from transformers import TrainingArguments

        fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    if name not in fields:
        raise RuntimeError("this transformers' TrainingArguments has neither activation_checkpointing nor gradient_checkpointing")
    out: dict[str, Any] = {name: enabled}
    if enabled:
        out[f"{name}_kwargs"] = {"use_reentrant": False}
    return out


def trainer_kwargs(train: TrainConfig, run: RunConfig, out: Path, *, has_eval: bool) -> dict[str, Any]:
    """``TrainingArguments`` fields for a TRL config class (SFTConfig, RewardConfig, DPOConfig)."""
    scheduler = train.lr_scheduler
    scheduler_kwargs: dict[str, Any] = {}
    if scheduler == "cosine" and train.min_lr_ratio > 0:
        scheduler, scheduler_kwargs = "cosine_with_min_lr", {"min_lr_rate": train.min_lr_ratio}
    grad_ckpt = on_gpu() if train.gradient_checkpointing is None else train.gradient_checkpointing
    kwargs: dict[str, Any] = dict(
        output_dir=str(out / "checkpoints"),
        max_steps=train.max_steps,
        num_train_epochs=train.num_epochs,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_epsilon=train.adam_epsilon,
        max_grad_norm=train.max_grad_norm,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        eval_strategy=("steps" if train.eval_steps else "no") if has_eval else "no",
        eval_steps=train.eval_steps if has_eval else None,
        seed=run.seed,
        data_seed=run.seed,
        dataloader_num_workers=train.dataloader_workers,
        report_to=[],  # our MetricsCallback writes metrics.jsonl and W&B
        disable_tqdm=False,
        dataloader_pin_memory=on_gpu(),
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        **precision_flags(train.precision),
        **distributed.trainer_state_kwargs(),
        **checkpointing_kwargs(grad_ckpt),
    )
    if kwargs["bf16"] and not on_gpu():
        kwargs["use_cpu"] = True  # bf16 autocast on CPU: transformers refuses it unless told it runs on the CPU
    return kwargs


def metrics_callback(logger: MetricsLogger) -> TrainerCallback:
    """A TrainerCallback that forwards the trainer's logs to our MetricsLogger (main process only)."""
    import math

    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            row = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            if "eval_loss" in row:
                row["eval_perplexity"] = math.exp(min(row["eval_loss"], 50.0))
            logger.log(row, state.global_step)

    return MetricsCallback()


def mean_logged_loss(log_history: list[dict], key: str = "loss") -> float | None:
    """Average training loss over the whole run from the trainer's log history.

    Each logged value is the mean over its logging window (gathered across processes), so the
    window-length-weighted mean is the run's mean loss. (transformers' own final ``train_loss`` is
    rank 0's local value, scaled by the number of processes under DDP; this one is not.)
    """
    total, steps, last = 0.0, 0, 0
    for row in log_history:
        if key in row and "step" in row:
            width = row["step"] - last
            total += row[key] * width
            steps += width
            last = row["step"]
    return total / steps if steps else None


def train_resumed(trainer: Any, checkpoint: Path | None) -> Any:
    """``trainer.train``, resumed from ``checkpoint`` when one is given.

    A run killed after its last checkpoint but before it finished (no model saved yet) resumes from a
    checkpoint at ``max_steps``. transformers then trains one step more whenever ``max_steps`` ends inside an
    epoch (it only checks the step budget after a step), so the resumed run would differ from the
    uninterrupted one. Here a run whose budget is spent trains no further step: the checkpoint's weights are
    loaded and the stage goes on to save and report them.
    """
    run_epoch = getattr(trainer, "_run_epoch", None)
    if checkpoint is not None and run_epoch is not None:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            state = trainer.state
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                trainer.control.should_training_stop = True
                return None
            return run_epoch(*args, **kwargs)

        trainer._run_epoch = guarded
    try:
        return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        if checkpoint is not None and run_epoch is not None:
            del trainer._run_epoch
