"""Direct Preference Optimisation (DPO) on comparison data, with TRL's DPOTrainer.

    align dpo --config configs/dpo.yaml [key=value ...] [--resume]

Loss (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290). For a prompt x with a chosen
response y_c and a rejected one y_r, the policy's *implicit reward* is

    r(x, y) = beta * (log pi_theta(y | x) - log pi_ref(y | x))

and the default (``loss_type: [sigmoid]``) loss is ``-log sigmoid(r(x, y_c) - r(x, y_r) - m)``.
Every loss type of TRL 1.16 is selectable (hinge, IPO, robust, ...), as is WPO weighting.

Margin m (``dpo.margin``). Llama 2 trains its reward models with a margin that grows with the
annotator's rating (Touvron et al. 2023, section 3.2.2, Table 27); ``small`` / ``large`` apply the same tables here,
``data`` takes
each record's ``margin`` field (TRL preference files), ``none`` is plain DPO (m = 0). This is DPO
with an offset (ODPO, Amini et al. 2024, https://arxiv.org/abs/2402.10571). Departure from TRL:
its DPOTrainer has no per-pair margin or weight (only WPO's policy-probability weighting), so the
margin enters through the reference: the precomputed ``log pi_ref(y_c | x)`` of each training pair
is raised by ``m / beta``, which turns beta * (chosen - rejected log-ratio) into exactly that minus m.
That is the margin loss for the ``sigmoid``, ``hinge`` and ``robust`` losses; for the others the
shift has no such meaning, so a margin is refused with them. Training logs then show rewards
shifted by -m on the chosen side; the held-out evaluation never carries a margin.

Reference policy. With LoRA (or prompt tuning) the reference is the same model with the adapter
disabled: TRL keeps no second copy (``ref_model`` stays None and ``use_adapter(model, None)``
wraps peft's ``disable_adapter()``; tested). With full fine-tuning and ``precompute_ref: true``
(default) the reference log-probs of every pair are computed once, before the first step, from the
initial weights, so no second copy is kept there either; ``precompute_ref: false`` with full
fine-tuning loads a frozen copy. Precomputing also saves one reference forward per step.

Evaluation: on held-out pairs (split by a hash of the prompt), before and after training, the mean
implicit reward margin r(x, y_c) - r(x, y_r) and the accuracy (share of pairs with r(x, y_c) >
r(x, y_r), ties count 1/2: before training policy = reference, every pair ties, accuracy 0.5),
overall and by Llama 2 strength, into ``eval.json`` and ``summary.json``.

Steps: (1) data: comparisons from any preference format, chosen/rejected resolved from A/B, pairs
whose chosen response is unsafe and rejected safe dropped (Llama 2 drops them from safety data),
split; (2) model, tokenizer and trainer (reference log-probs precomputed, margins applied);
(3) evaluate held-out pairs; (4) train (checkpoints, ``--resume``); (5) evaluate again; (6) save.
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
    import torch

    from data.schemas import Comparison

log = logging.getLogger(__name__)
STAGE = "dpo"

LossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
# Losses in which beta * (chosen log-ratio - rejected log-ratio) appears only as a whole: shifting
# the chosen reference log-prob by m / beta subtracts exactly m from it.
MARGIN_LOSSES = ("sigmoid", "hinge", "robust")
# Llama 2's margin m(r) by rating (section 3.2.2, Table 27); no rating = 0.
MARGIN_TABLES: dict[str, dict[str, float]] = {
    "small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0.0},
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0},
}


@dataclass
class DPOLossConfig:
    """The DPO objective."""

    beta: float = option(0.1, "KL strength: implicit reward = beta * log(pi / pi_ref); higher keeps the policy "
                              "closer to the reference")
    loss_type: list[LossType] = option(factory=lambda: ["sigmoid"], doc="TRL loss type(s): sigmoid (DPO), hinge, ipo, robust, "
                                                                        "... several are summed with loss_weights")
    loss_weights: list[float] | None = option(None, "weight of each loss_type when several are combined (null = 1 each)")
    label_smoothing: float = option(0.0, "robust / exo_pair: assumed share of flipped labels (robust DPO: in [0, 0.5))")
    margin: Literal["none", "small", "large", "data"] = option("none", "per-pair margin: Llama 2's strength tables (small: 1, "
                                                                       "2/3, 1/3, 0; large: 3, 2, 1, 0), data = each record's "
                                                                       "margin field, none = plain DPO")
    use_weighting: bool = option(False,
                                 "WPO weighting of pairs by the policy's length-normalised probability (TRL use_weighting)")
    precompute_ref: bool = option(True, "compute reference log-probs once before training (no reference forward per step, no "
                                        "second copy for full fine-tuning; needed for margins)")

    def __post_init__(self) -> None:
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(bool(self.loss_type), "loss_type", "needs at least one loss type")
        check(self.loss_weights is None or len(self.loss_weights) == len(self.loss_type), "loss_weights",
              f"needs one weight per loss_type ({len(self.loss_type)}), got {self.loss_weights}")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.margin != "none":
            check(self.precompute_ref, "margin",
                  "a margin is applied to the precomputed reference log-probs; set dpo.precompute_ref: true")
            bad = [t for t in self.loss_type if t not in MARGIN_LOSSES]
            check(not bad, "margin", f"a margin is defined for the {', '.join(MARGIN_LOSSES)} losses only, not {', '.join(bad)}")


@dataclass
class DPOConfig:
    """Direct preference optimisation."""

    run: RunConfig = option(factory=RunConfig, doc="run name, output folder, seed, tracking")
    model: ModelConfig = option(factory=ModelConfig, doc="policy to optimise (and, frozen, the reference)")
    data: PreferenceDataConfig = option(factory=PreferenceDataConfig, doc="preference pairs")
    train: TrainConfig = option(factory=lambda: TrainConfig(lr=1e-4), doc="optimisation (batch_size counts pairs; lr 1e-4 suits "
                                                                          "LoRA, use ~5e-7 to 5e-6 for full fine-tuning)")
    adapter: AdapterConfig = option(factory=AdapterConfig,
                                    doc="full fine-tuning, LoRA (reference = adapter disabled), QLoRA or prompt tuning")
    dpo: DPOLossConfig = option(factory=DPOLossConfig, doc="loss type, beta, margin")


Config = DPOConfig


# ---------------------------------------------------------------------------------------------
# math (pure functions)


def pair_margin(strength: str | None, record_margin: float | None, mode: str) -> float:
    """Margin m of one pair: Llama 2's table for its strength, its own ``margin`` field, or 0."""
    if mode == "none":
        return 0.0
    if mode == "data":
        return float(record_margin or 0.0)
    return MARGIN_TABLES[mode].get(strength or "", 0.0)


def implicit_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """r = beta * (log pi(y|x) - log pi_ref(y|x)). logps, ref_logps: [N] summed response log-probs -> [N]."""
    return beta * (logps - ref_logps)


def preference_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict:
    """Mean margin, accuracy (ties count 1/2) and mean rewards of [N] chosen / rejected implicit rewards."""
    gap = r_chosen - r_rejected
    wins = (gap > 0).float() + 0.5 * (gap == 0).float()
    return {"n": int(gap.numel()), "margin": gap.mean().item(), "accuracy": wins.mean().item(),
            "reward_chosen": r_chosen.mean().item(), "reward_rejected": r_rejected.mean().item(), "ties": int((gap == 0).sum())}


# ---------------------------------------------------------------------------------------------
# setup


def to_rows(pairs: Sequence[Comparison], margin_mode: str) -> list[dict]:
    """TRL's conversational preference rows, plus the pair's strength and margin."""
    return [{
        "prompt": c.prompt,
        "chosen": [{"role": "assistant", "content": c.chosen_response}],
        "rejected": [{"role": "assistant", "content": c.rejected_response}],
        "strength": c.strength.value if c.strength else "unrated",
        "margin": pair_margin(c.strength.value if c.strength else None, c.meta.get("margin"), margin_mode),
    } for c in pairs]


def build_trainer(cfg: DPOConfig, out: Path, train: list, val: list, logger: MetricsLogger | None = None):
    """(2) model, tokenizer and the TRL DPOTrainer; margins applied to the training pairs."""
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from foundation.models import load_causal_lm, load_tokenizer, resolve
    from foundation.precision import master_dtype

    def load_model(trained: bool = True):
        return load_causal_lm(
            cfg.model.name, dtype=master_dtype(cfg.model.dtype, cfg.adapter.method if trained else "frozen", cfg.model.device),
            device=cfg.model.device, revision=cfg.model.revision,
            attn_implementation=cfg.model.attn_implementation, quantization_config=quantization_config(cfg.adapter),
        )

    tokenizer = load_tokenizer(cfg.model.name, revision=cfg.model.revision)  # left padding, as TRL expects
    model = load_model()
    if cfg.adapter.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    peft_cfg = peft_config(cfg.adapter, "CAUSAL_LM", tokenizer_path=resolve(cfg.model.name).path)
    # Full fine-tuning without precomputed reference log-probs needs a frozen copy; load it the way we
    # load the policy (TRL would otherwise re-read config.name_or_path, which may not resolve here).
    ref_model = load_model(trained=False).eval() if peft_cfg is None and not cfg.dpo.precompute_ref else None
    args = TRLDPOConfig(
        **trainer_kwargs(cfg.train, cfg.run, out, has_eval=True),
        max_length=cfg.train.max_length,
        beta=cfg.dpo.beta,
        loss_type=list(cfg.dpo.loss_type),
        loss_weights=cfg.dpo.loss_weights,
        label_smoothing=cfg.dpo.label_smoothing,
        use_weighting=cfg.dpo.use_weighting,
        precompute_ref_log_probs=cfg.dpo.precompute_ref,
    )
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=args, processing_class=tokenizer, peft_config=peft_cfg,
        train_dataset=on_disk(to_rows(train, cfg.dpo.margin), out / "datasets" / "train"),
        eval_dataset=on_disk(to_rows(val, "none"), out / "datasets" / "eval"),
        callbacks=[metrics_callback(logger)] if logger else None,
    )
    if cfg.dpo.margin != "none":
        # The margin enters through the reference (see the module docstring): log pi_ref(y_c) += m / beta.
        beta = cfg.dpo.beta
        with trainer.accelerator.main_process_first():  # the main rank writes the cache, the others read it
            trainer.train_dataset = trainer.train_dataset.map(
                lambda ex: {"ref_chosen_logps": ex["ref_chosen_logps"] + ex["margin"] / beta}, desc="Applying per-pair margins")
    return trainer


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate_pairs(trainer, beta: float) -> dict:
    """(3, 5) Implicit-reward margin and accuracy of the current policy on the held-out pairs, overall and by strength."""
    import torch
    from torch.utils.data import DataLoader

    dataset = trainer.eval_dataset
    model = trainer.model
    device = trainer.accelerator.device
    loader = DataLoader(dataset, batch_size=trainer.args.per_device_eval_batch_size,
                        collate_fn=trainer.data_collator, shuffle=False)
    logps, ref_logps = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
                mask = batch["completion_mask"]
                labels = batch["input_ids"].masked_fill(mask == 0, -100)
                # TRL's fused LM head (added by DPOTrainer): per-token log-probs of the labels, no [B, T, V] logits.
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                            fused_lm_head=True, use_cache=False)
                logps.append(out.log_probs[:, -(mask.shape[1] - 1):].sum(dim=1).float().cpu())
                if "ref_chosen_logps" in batch:
                    ref_logps.append(torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float().cpu())
                else:  # reference = adapter disabled, or the frozen copy
                    ref_c, ref_r = trainer.compute_ref_log_probs(trainer.ref_model or model, batch)
                    ref_logps.append(torch.cat([ref_c, ref_r]).float().cpu())
    finally:
        if was_training:
            model.train()
    # each batch is [chosen..., rejected...]
    chosen = torch.cat([b.chunk(2)[0] for b in logps])
    rejected = torch.cat([b.chunk(2)[1] for b in logps])
    ref_chosen = torch.cat([b.chunk(2)[0] for b in ref_logps])
    ref_rejected = torch.cat([b.chunk(2)[1] for b in ref_logps])
    r_c, r_r = implicit_rewards(chosen, ref_chosen, beta), implicit_rewards(rejected, ref_rejected, beta)
    result = preference_metrics(r_c, r_r)
    strengths = list(dataset["strength"])
    result["by_strength"] = {}
    for s in sorted(set(strengths)):
        idx = torch.tensor([i for i, x in enumerate(strengths) if x == s])
        result["by_strength"][s] = preference_metrics(r_c[idx], r_r[idx])
    return result


# ---------------------------------------------------------------------------------------------
# the stage


def main(cfg: DPOConfig, *, resume: bool = False) -> Path:
    import torch

    from foundation.models import model_summary

    out = start_stage(cfg, STAGE, resume=resume)
    checkpoint = last_checkpoint(out) if resume else None
    before_file = out / "eval_before.json"
    have_before = before_file.is_file()  # checked before any rank could write it
    torch.manual_seed(cfg.run.seed)

    # 1. data
    train, val = load_data(cfg.data, cfg.run.seed)
    log.info("DPO data: %d train / %d held-out pairs", len(train), len(val))

    # 2. model, tokenizer, trainer
    logger = MetricsLogger(out, run=cfg.run, stage=STAGE, config=cfg, enabled=distributed.is_main(),
                           resume_step=int(checkpoint.name.split("-")[-1]) if checkpoint else None)
    t0 = time.time()
    trainer = build_trainer(cfg, out, train, val, logger)
    setup_seconds = time.time() - t0
    log.info("trainable parameters: %s; reference: %s", model_summary(trainer.model), _reference_kind(cfg))

    # 3. held-out implicit rewards before training (kept on disk, so a resumed run reports the same);
    #    every rank evaluates (a collective under ZeRO-3), the main one writes
    if have_before:
        before = json.loads(before_file.read_text())
    else:
        before = evaluate_pairs(trainer, cfg.dpo.beta)
        if trainer.is_world_process_zero():
            before_file.write_text(json.dumps(before, indent=2) + "\n")
    log.info("held-out before: margin %.4f, accuracy %.3f", before["margin"], before["accuracy"])

    # 4. train
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    t0 = time.time()
    train_resumed(trainer, checkpoint)
    train_seconds = time.time() - t0

    # 5. held-out implicit rewards after training
    after = evaluate_pairs(trainer, cfg.dpo.beta)
    log.info("held-out after: margin %.4f, accuracy %.3f", after["margin"], after["accuracy"])

    # 6. save (every rank calls save_model: under ZeRO-3 it gathers the shards; only rank 0 writes)
    fingerprints = distributed.fingerprints(trainer.model_wrapped)  # collective; None for one process
    model_dir = out / "model"
    trainer.save_model(str(model_dir))
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(model_dir)
        if cfg.adapter.method != "full":
            set_adapter_base(model_dir, cfg.model.name)
        (out / "eval.json").write_text(json.dumps({"before": before, "after": after}, indent=2) + "\n")
        logger.summary({
            "train_loss": mean_logged_loss(trainer.state.log_history), "global_step": trainer.state.global_step,
            "setup_seconds": round(setup_seconds, 2), "train_seconds": round(train_seconds, 2),
            "train_pairs": len(train), "val_pairs": len(val), "reference": _reference_kind(cfg),
            "resumed_from": checkpoint.name if checkpoint else None,
            "val_margin_before": before["margin"], "val_margin_after": after["margin"],
            "val_accuracy_before": before["accuracy"], "val_accuracy_after": after["accuracy"],
            **model_summary(trainer.model), "rank_fingerprints": fingerprints,
        })
        log.info("DPO done: %s", out)
    logger.close()
    return out


def _reference_kind(cfg: DPOConfig) -> str:
    if cfg.adapter.method != "full":
        return "adapter disabled" + (" (precomputed)" if cfg.dpo.precompute_ref else "")
    return "initial weights (precomputed)" if cfg.dpo.precompute_ref else "frozen copy"
