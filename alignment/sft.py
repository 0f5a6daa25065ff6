"""Supervised fine-tuning (SFT) on chat dialogues, with TRL's SFTTrainer.

    align sft --config configs/sft.yaml [key=value ...] [--resume]

Loss: next-token cross-entropy on the assistant turns only (Llama 2, section 3.1: "we zero-out
the loss on tokens from the user prompt"). The chat template's ``{% generation %}`` markers tell
TRL which tokens are the assistant's; each turn's end-of-turn token is inside them, so the model
learns to stop. Set ``assistant_only_loss: false`` to train on whole dialogues.

What is trained (``adapter.method``): all weights, a LoRA adapter, QLoRA (4-bit base, GPU only) or
peft soft prompts. Outputs go to ``runs/<run.name>/sft/`` (see ``foundation.runs``); the final
weights (or adapter) and tokenizer are in ``model/``, so ``model.name=runs/<run>/sft`` starts any
later stage from them. ``--resume`` continues from the newest checkpoint with optimiser,
scheduler, data position and RNG state restored.

Steps: (1) data: mix sources, split train/validation by a hash of each prompt; (2) model and
tokenizer; (3) train; (4) evaluate validation loss and perplexity; (5) save, and write a few
generations on validation prompts to ``samples.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from foundation import distributed
from foundation.adapters import AdapterConfig, peft_config, quantization_config, set_adapter_base
from foundation.config import check, option
from foundation.models import ModelConfig
from foundation.runs import MetricsLogger, RunConfig, last_checkpoint, start_stage
from foundation.training import TrainConfig, mean_logged_loss, metrics_callback, train_resumed, trainer_kwargs
from data.loaders import DataSource

log = logging.getLogger(__name__)
STAGE = "sft"


@dataclass
class SFTDataConfig:
    """Training dialogues."""

    sources: list[DataSource] = option(factory=lambda: [DataSource("bundled:sft")],
                                       doc="datasets to mix (path, format, weight, ...); see data.loaders.DataSource")
    val_fraction: float = option(0.1, "share of dialogues held out for validation (chosen by a hash of the prompt)")
    sample_prompts: int = option(4, "after training, generate answers to this many validation prompts into samples.jsonl")
    sample_max_new_tokens: int = option(96, "length limit of those sample answers")

    def __post_init__(self) -> None:
        check(bool(self.sources), "sources", "needs at least one data source")
        check(0 <= self.val_fraction < 1, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        check(self.sample_prompts >= 0, "sample_prompts", f"must be >= 0, got {self.sample_prompts}")


@dataclass
class SFTConfig:
    """Supervised fine-tuning."""

    run: RunConfig = option(factory=RunConfig, doc="run name, output folder, seed, tracking")
    model: ModelConfig = option(factory=ModelConfig, doc="model to fine-tune")
    data: SFTDataConfig = option(factory=SFTDataConfig, doc="training data")
    train: TrainConfig = option(factory=TrainConfig, doc="optimisation")
    adapter: AdapterConfig = option(factory=AdapterConfig, doc="full fine-tuning, LoRA, QLoRA or prompt tuning")
    assistant_only_loss: bool = option(True, "compute the loss on assistant turns only (Llama 2); false = whole dialogue")
    packing: bool = option(False, "pack several dialogues into each max_length sequence (faster on many short examples)")
    token_metrics: bool = option(False, "log TRL's per-step entropy and token accuracy; they go through its chunked LM head, "
                                        "~25% slower steps on CPU (benchmarks/overhead.py)")


Config = SFTConfig


def load_data(cfg: SFTDataConfig, seed: int) -> tuple[list, list]:
    """(train, validation) dialogues from the configured mixture."""
    from data.loaders import load_sft
    from data.mixing import mix, split

    parts = [(load_sft(src), src.weight) for src in cfg.sources]
    examples = mix(parts, seed=seed)
    train, val, _ = split(examples, val_fraction=cfg.val_fraction, seed=seed)
    if not train:
        raise ValueError("no training dialogues left after the validation split; lower data.val_fraction")
    return train, val


def trainer_for(run: RunConfig, model: ModelConfig, train_cfg: TrainConfig, adapter: AdapterConfig, out: Path, train: list,
                val: list, logger: MetricsLogger | None = None):
    """The SFT trainer for another stage's settings (rejection sampling fine-tunes on its pool this way), the loss
    on assistant turns only, as in :func:`build_trainer`."""
    return build_trainer(SFTConfig(run=run, model=model, train=train_cfg, adapter=adapter, assistant_only_loss=True),
                         out, train, val, logger)


def build_trainer(cfg: SFTConfig, out: Path, train: list, val: list, logger: MetricsLogger | None = None):
    """(2) model and tokenizer, and the TRL SFTTrainer that trains them."""
    import datasets
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from foundation.models import load_causal_lm, load_tokenizer, resolve
    from foundation.precision import master_dtype

    train_ds = datasets.Dataset.from_list([{"messages": ex.messages} for ex in train])
    val_ds = datasets.Dataset.from_list([{"messages": ex.messages} for ex in val]) if val else None
    tokenizer = load_tokenizer(cfg.model.name, revision=cfg.model.revision)
    tokenizer.padding_side = "right"  # training pads on the right; generation switches to left
    model = load_causal_lm(
        cfg.model.name, dtype=master_dtype(cfg.model.dtype, cfg.adapter.method, cfg.model.device), device=cfg.model.device,
        revision=cfg.model.revision,
        attn_implementation=cfg.model.attn_implementation, quantization_config=quantization_config(cfg.adapter),
    )
    if cfg.adapter.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    peft_cfg = peft_config(cfg.adapter, "CAUSAL_LM", tokenizer_path=resolve(cfg.model.name).path)
    args = TRLSFTConfig(
        **trainer_kwargs(cfg.train, cfg.run, out, has_eval=val_ds is not None),
        max_length=cfg.train.max_length,
        assistant_only_loss=cfg.assistant_only_loss,
        packing=cfg.packing,
    )
    trainer_cls = SFTTrainer if cfg.token_metrics else _plain_loss_trainer(SFTTrainer)
    return trainer_cls(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
        peft_config=peft_cfg, callbacks=[metrics_callback(logger)] if logger else None,
    )


def _plain_loss_trainer(base: type) -> type:
    """``base`` (TRL's SFTTrainer) whose loss is the plain next-token cross-entropy on the labelled
    tokens from the model's logits, without TRL's per-step entropy / token-accuracy metrics (and the
    chunked LM head that computes them). Same loss and normalisation: the sum over labelled tokens
    divided by the tokens of the whole accumulated batch (``num_items_in_batch``) when given."""
    import torch
    import torch.nn.functional as F

    class PlainLossSFTTrainer(base):  # type: ignore[misc, valid-type]
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            batch = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
            outputs = model(**batch, use_cache=False)
            logits = outputs.logits[:, -labels.shape[1]:]  # prompt tuning prepends virtual tokens
            targets = labels[:, 1:]
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
            count = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
            loss = loss / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL does: DDP averages the gradients over ranks
            return (loss, outputs) if return_outputs else loss

    return PlainLossSFTTrainer


def main(cfg: SFTConfig, *, resume: bool = False) -> Path:
    import torch

    from foundation.generation import generate
    from foundation.models import model_summary

    out = start_stage(cfg, STAGE, resume=resume)
    checkpoint = last_checkpoint(out) if resume else None
    torch.manual_seed(cfg.run.seed)

    # 1. data
    train, val = load_data(cfg.data, cfg.run.seed)
    log.info("SFT data: %d train / %d validation dialogues", len(train), len(val))

    # 2. model, tokenizer, trainer
    logger = MetricsLogger(out, run=cfg.run, stage=STAGE, config=cfg, enabled=distributed.is_main(),
                           resume_step=_checkpoint_step(checkpoint) if checkpoint else None)
    trainer = build_trainer(cfg, out, train, val, logger)
    tokenizer = trainer.processing_class
    log.info("trainable parameters: %s", model_summary(trainer.model))

    # 3. train
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    t0 = time.time()
    train_resumed(trainer, checkpoint)
    train_seconds = time.time() - t0

    # 4. evaluate
    summary = {"train_loss": mean_logged_loss(trainer.state.log_history), "global_step": trainer.state.global_step,
               "train_seconds": round(train_seconds, 2), "train_examples": len(train), "val_examples": len(val),
               "resumed_from": checkpoint.name if checkpoint else None, **model_summary(trainer.model)}
    if torch.cuda.is_available():
        summary["perf/peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if val:  # every rank takes part in evaluation
        metrics = trainer.evaluate()
        summary["eval_loss"] = metrics["eval_loss"]
        summary["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    summary["rank_fingerprints"] = distributed.fingerprints(trainer.model_wrapped)  # collective; None for one process

    # 5. save (every rank calls save_model: under ZeRO-3 it gathers the shards; only rank 0 writes)
    model_dir = out / "model"
    trainer.save_model(str(model_dir))
    if trainer.is_world_process_zero():
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(model_dir)
        if cfg.adapter.method != "full":
            set_adapter_base(model_dir, cfg.model.name)
        if val and cfg.data.sample_prompts:
            _write_samples(out, trainer.model, tokenizer, val[: cfg.data.sample_prompts],
                           cfg.data.sample_max_new_tokens, generate)
        logger.summary(summary)
        log.info("SFT done: %s (eval loss %s)", out, summary.get("eval_loss"))
    logger.close()
    return out


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def _write_samples(out: Path, model, tokenizer, examples: list, max_new_tokens: int, generate) -> None:
    """Greedy answers to validation prompts, next to the reference answers."""
    prompts = []
    for ex in examples:
        last_user = max(i for i, m in enumerate(ex.messages) if m["role"] == "user")
        prompts.append(ex.messages[: last_user + 1])
    gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    with (out / "samples.jsonl").open("w", encoding="utf-8") as fh:
        for ex, prompt, gen in zip(examples, prompts, gens):
            reference = next((m["content"] for m in ex.messages[len(prompt):] if m["role"] == "assistant"), None)
            fh.write(json.dumps({"prompt": prompt, "response": gen.text, "reference": reference}, ensure_ascii=False) + "\n")
