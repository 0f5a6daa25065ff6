"""Kahneman-Tversky optimisation (KTO) on comparison data, with TRL's KTOTrainer.

    align kto --config configs/kto.yaml [key=value ...] [--resume]

KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306) learns from answers labelled
desirable or undesirable, one at a time, instead of pairs. With r(x, y) = log pi(y|x) - log
pi_ref(y|x) and z_ref an estimate of KL(pi || pi_ref) from mismatched prompt/answer pairs of the
batch, the loss of a desirable answer is ``w_d * (1 - sigmoid(beta * (r - z_ref)))`` and of an
undesirable one ``w_u * (1 - sigmoid(beta * (z_ref - r)))``.

Data: the same comparisons as DPO (any preference format, the same split by a hash of the prompt,
pairs whose chosen answer is unsafe and rejected one safe dropped), each pair unpaired into its
chosen answer (desirable) and its rejected answer (undesirable). The KL estimate needs at least two
examples per device batch (``train.batch_size`` >= 2). Reference: with LoRA, the model with its
adapter disabled, as for DPO.

Evaluation: TRL's held-out metrics (loss, rewards of desirable and undesirable answers and their
margin) before and after training, into ``eval.json`` and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from foundation import distributed
from foundation.adapters import AdapterConfig, peft_config, quantization_config, set_adapter_base
from foundation.config import check, option
from foundation.models import ModelConfig
from alignment.preferences import PreferenceDataConfig, load_data, on_disk
from foundation.runs import MetricsLogger, RunConfig, last_checkpoint, start_stage
from foundation.training import TrainConfig, mean_logged_loss, metrics_callback, train_resumed, trainer_kwargs

if TYPE_CHECKING:
    from data.schemas import Comparison

log = logging.getLogger(__name__)
STAGE = "kto"


@dataclass
class KTOLossConfig:
    """The KTO objective."""

    beta: float = option(0.1, "KL strength: higher keeps the policy closer to the reference")
    loss_type: Literal["kto", "apo_zero_unpaired"] = option("kto", "kto (Ethayarajh et al.) or apo_zero_unpaired (TRL)")
    desirable_weight: float = option(1.0, "w_d: weight of desirable (chosen) answers")
    undesirable_weight: float = option(1.0, "w_u: weight of undesirable (rejected) answers")

    def __post_init__(self) -> None:
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(self.desirable_weight > 0 and self.undesirable_weight > 0, "desirable_weight", "both weights must be > 0")


@dataclass
class KTOConfig:
    """Kahneman-Tversky optimisation."""

    run: RunConfig = option(factory=RunConfig, doc="run name, output folder, seed, tracking")
    model: ModelConfig = option(factory=ModelConfig, doc="policy to optimise (and, frozen, the reference)")
    data: PreferenceDataConfig = option(factory=PreferenceDataConfig,
                                        doc="preference pairs, unpaired into desirable / undesirable answers")
    train: TrainConfig = option(factory=lambda: TrainConfig(lr=1e-4),
                                doc="optimisation (batch_size counts answers, >= 2 for the KL estimate)")
    adapter: AdapterConfig = option(factory=AdapterConfig, doc="full fine-tuning or LoRA (reference = adapter disabled)")
    kto: KTOLossConfig = option(factory=KTOLossConfig, doc="beta, loss type, class weights")

    def __post_init__(self) -> None:
        check(self.train.batch_size >= 2, "train.batch_size",
              f"KTO's KL estimate needs >= 2 answers per batch, got {self.train.batch_size}")
        check(self.adapter.method in ("lora", "full"), "adapter.method", f"KTO trains lora or full, got {self.adapter.method!r}")


Config = KTOConfig


def to_rows(pairs: Sequence[Comparison]) -> list[dict]:
    """TRL's unpaired conversational rows: each pair's chosen answer (label True) and rejected one (False)."""
    rows = []
    for c in pairs:
        rows.append({"prompt": c.prompt, "completion": [{"role": "assistant", "content": c.chosen_response}], "label": True})
        rows.append({"prompt": c.prompt, "completion": [{"role": "assistant", "content": c.rejected_response}], "label": False})
    return rows


def build_trainer(cfg: KTOConfig, out: Path, train: list, val: list, logger: MetricsLogger | None = None):
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer

    from foundation.models import load_causal_lm, load_tokenizer, resolve
    from foundation.precision import master_dtype

    tokenizer = load_tokenizer(cfg.model.name, revision=cfg.model.revision)
    model = load_causal_lm(cfg.model.name, dtype=master_dtype(cfg.model.dtype, cfg.adapter.method, cfg.model.device),
                           device=cfg.model.device, revision=cfg.model.revision,
                           attn_implementation=cfg.model.attn_implementation,
                           quantization_config=quantization_config(cfg.adapter))
    peft_cfg = peft_config(cfg.adapter, "CAUSAL_LM", tokenizer_path=resolve(cfg.model.name).path)
    ref_model = None
    if peft_cfg is None:  # full fine-tuning: a frozen copy, loaded the way the policy is
        ref_model = load_causal_lm(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device,
                                   revision=cfg.model.revision).eval()
    args = TRLKTOConfig(**trainer_kwargs(cfg.train, cfg.run, out, has_eval=True),
                        max_length=cfg.train.max_length, beta=cfg.kto.beta,
                        loss_type=cfg.kto.loss_type, desirable_weight=cfg.kto.desirable_weight,
                        undesirable_weight=cfg.kto.undesirable_weight)
    return KTOTrainer(model=model, ref_model=ref_model, args=args, processing_class=tokenizer, peft_config=peft_cfg,
                      train_dataset=on_disk(to_rows(train), out / "datasets" / "train"),
                      eval_dataset=on_disk(to_rows(val), out / "datasets" / "eval"),
                      callbacks=[metrics_callback(logger)] if logger else None)


def _evaluate(trainer) -> dict:
    """TRL's held-out metrics (loss, rewards/chosen, rewards/rejected, rewards/margins, kl, ...), without the eval_ prefix."""
    return {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()}


def main(cfg: KTOConfig, *, resume: bool = False) -> Path:
    import torch

    from foundation.models import model_summary

    out = start_stage(cfg, STAGE, resume=resume)
    checkpoint = last_checkpoint(out) if resume else None
    torch.manual_seed(cfg.run.seed)
    train, val = load_data(cfg.data, cfg.run.seed)
    log.info("KTO data: %d train / %d held-out pairs (x2 answers)", len(train), len(val))
    logger = MetricsLogger(out, run=cfg.run, stage=STAGE, config=cfg, enabled=distributed.is_main(),
                           resume_step=int(checkpoint.name.split("-")[-1]) if checkpoint else None)
    trainer = build_trainer(cfg, out, train, val, logger)
    log.info("trainable parameters: %s", model_summary(trainer.model))
    before_file = out / "eval_before.json"
    before = json.loads(before_file.read_text()) if before_file.is_file() else _evaluate(trainer)
    if trainer.is_world_process_zero():
        before_file.write_text(json.dumps(before, indent=2) + "\n")
    t0 = time.time()
    train_resumed(trainer, checkpoint)
    train_seconds = time.time() - t0
    after = _evaluate(trainer)
    model_dir = out / "model"
    trainer.save_model(str(model_dir))
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(model_dir)
        if cfg.adapter.method != "full":
            set_adapter_base(model_dir, cfg.model.name)
        (out / "eval.json").write_text(json.dumps({"before": before, "after": after}, indent=2) + "\n")
        logger.summary({
            "train_loss": mean_logged_loss(trainer.state.log_history), "global_step": trainer.state.global_step,
            "train_seconds": round(train_seconds, 2), "train_pairs": len(train), "val_pairs": len(val),
            "resumed_from": checkpoint.name if checkpoint else None,
            "val_loss_before": before.get("loss"), "val_loss_after": after.get("loss"),
            "val_margin_before": before.get("rewards/margins"), "val_margin_after": after.get("rewards/margins"),
            **model_summary(trainer.model),
        })
        log.info("KTO done: %s", out)
    logger.close()
    return out
