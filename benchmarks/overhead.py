"""Framework overhead: our SFT, RM and DPO training steps against a minimal hand-written PyTorch loop.

    flock /tmp/align-heavy.lock .venv/bin/python -m benchmarks overhead [--steps 5 --batch 4 --seq-len 128]

Both sides train the same model (SmolLM2-135M, fp32, CPU) with the stage's default adapter (LoRA
r=16 on all linear layers, or ``--full``) on the same batch shape: every example is longer than
``--seq-len`` and truncated to it, so each micro-batch is exactly [batch, seq_len] tokens (RM and DPO:
[2 x batch, seq_len], the chosen and the rejected responses). Grad accumulation 1.

- **ours**: the stage's ``build_trainer`` (TRL trainer as our config sets it up) and ``trainer.train()``;
  a step is the time between consecutive ``on_step_begin`` callbacks (data loading, forward, loss
  and metrics, backward, clipping, optimiser, scheduler, logging every ``train.logging_steps``).
- **hand**: the same model and adapter, one batch taken from the trainer's own data loader, and a
  loop of forward, the loss written out (SFT: next-token cross-entropy on the labelled tokens; RM:
  -log sigmoid(r_chosen - r_rejected); DPO: the sigmoid DPO loss against the precomputed reference
  log-probs), backward, gradient clipping, AdamW step.

Each side runs ``--rounds`` times, alternating (ours, hand, ours, hand), and the best median step time
counts (the machine is shared). The first step of every run is a warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
WORDS = ["the", "river", "bends", "past", "the", "old", "mill", "where", "children", "count", "stones", "and", "the", "baker",
         "sings", "about", "bread", "while", "clouds", "drift"]


def long_text(i: int, n_words: int = 220) -> str:
    """A deterministic text longer than any --seq-len used here (so truncation fixes the length)."""
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] + (str(k) if k % 11 == 0 else "") for k in range(n_words))


def sft_examples(n: int) -> list:
    return [SimpleNamespace(messages=[{"role": "user", "content": f"Tell story {i}."},
                                      {"role": "assistant", "content": long_text(i)}]) for i in range(n)]


def comparisons(n: int, offset: int = 0) -> list:
    from data.schemas import Comparison

    return [Comparison(prompt=[{"role": "user", "content": f"Tell story {i}."}], response_a=long_text(i),
                       response_b=long_text(i + 1000), chosen="A") for i in range(offset, offset + n)]


def _overrides(root: str, steps: int, batch: int, seq_len: int, full: bool, extra: list[str]) -> list[str]:
    return [f"model.name={MODEL}", f"run.root={root}", "run.wandb=disabled", "run.log_level=warning", f"train.max_steps={steps}",
            f"train.batch_size={batch}", "train.grad_accum=1", f"train.max_length={seq_len}", "train.save_steps=100000",
            "train.warmup_ratio=0", *(["adapter.method=full"] if full else []), *extra]


def build_stage_trainer(stage: str, root: str, steps: int, batch: int, seq_len: int, full: bool,
                        extra: list[str]) -> tuple[Any, Any]:
    """(trainer, cfg) for ``stage`` in sft/rm/dpo, built by the stage's own build_trainer."""
    from foundation.config import load_config

    ov = _overrides(root, steps, batch, seq_len, full, extra)
    n = batch * 2
    if stage == "sft":
        from alignment.sft import SFTConfig, build_trainer

        cfg = load_config(SFTConfig, REPO / "configs/sft.yaml", ov, stage="sft")
        return build_trainer(cfg, Path(root) / "sft", sft_examples(n), []), cfg
    if stage == "rm":
        from reward.rm import RMConfig, build_trainer

        cfg = load_config(RMConfig, REPO / "configs/rm_helpful.yaml", ov, stage="rm")
        return build_trainer(cfg, Path(root) / "rm", comparisons(n), []), cfg
    if stage == "dpo":
        from alignment.dpo import DPOConfig, build_trainer

        cfg = load_config(DPOConfig, REPO / "configs/dpo.yaml", ov, stage="dpo")
        return build_trainer(cfg, Path(root) / "dpo", comparisons(n), comparisons(2, offset=500)), cfg
    raise ValueError(stage)


def time_ours(stage: str, steps: int, batch: int, seq_len: int, full: bool = False, extra: list[str] | None = None) -> dict:
    """Median seconds per step of the stage's trainer (first step excluded), and the batch it trains on."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.begins: list[float] = []

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.begins.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as root:
        # warm-up step + timed steps + one more, whose start ends the last timed step (what follows it,
        # e.g. an end-of-training evaluation, is not a training step)
        trainer, cfg = build_stage_trainer(stage, root, steps + 2, batch, seq_len, full, extra or [])
        timer = StepTimer()
        trainer.add_callback(timer)
        batch_tensors = next(iter(trainer.get_train_dataloader()))
        trainer.train()
        marks = timer.begins
        times = [b - a for a, b in itertools.pairwise(marks)][1:]
        shape = list(batch_tensors["input_ids"].shape)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"median_s": statistics.median(times), "times": [round(t, 3) for t in times], "input_shape": shape,
            "trainable_params": trainable, "batch": {k: v for k, v in batch_tensors.items() if hasattr(v, "shape")}, "cfg": cfg}


def hand_model(stage: str, cfg: Any) -> Any:
    """The same model and adapter the stage trains, loaded without the framework's trainer."""
    from peft import get_peft_model

    from foundation.adapters import peft_config
    from foundation.models import load_causal_lm, load_tokenizer, resolve

    if stage == "rm":
        from reward.model import load_reward_model

        model = load_reward_model(cfg.model.name, dtype=cfg.model.dtype, device="cpu")
        model.config.pad_token_id = load_tokenizer(cfg.model.name).pad_token_id
        task = "SEQ_CLS"
    else:
        model = load_causal_lm(cfg.model.name, dtype=cfg.model.dtype, device="cpu")
        task = "CAUSAL_LM"
    pc = peft_config(cfg.adapter, task, tokenizer_path=resolve(cfg.model.name).path)
    return get_peft_model(model, pc) if pc is not None else model


def hand_loss(stage: str, model: Any, b: dict, beta: float = 0.1) -> Any:
    import torch.nn.functional as F

    if stage == "sft":
        logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)
    if stage == "rm":
        rewards = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits.squeeze(-1)
        chosen, rejected = rewards.chunk(2)
        return -F.logsigmoid(chosen - rejected).mean()
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits[:, :-1]
    token_logps = logits.log_softmax(-1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
    logps = (token_logps * b["completion_mask"][:, 1:]).sum(1)
    chosen, rejected = logps.chunk(2)
    margin = (chosen - b["ref_chosen_logps"]) - (rejected - b["ref_rejected_logps"])
    return -F.logsigmoid(beta * margin).mean()


def time_hand(stage: str, cfg: Any, batch: dict, steps: int) -> dict:
    import torch

    model = hand_model(stage, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    beta = getattr(getattr(cfg, "dpo", None), "beta", 0.1)

    def step() -> None:
        loss = hand_loss(stage, model, batch, beta)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        step()
        if i:
            times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "times": [round(t, 3) for t in times]}


def compare(stage: str, steps: int, batch: int, seq_len: int, rounds: int, full: bool = False,
            extra: list[str] | None = None) -> dict:
    ours, hand = [], []
    shape = None
    for _ in range(rounds):
        o = time_ours(stage, steps, batch, seq_len, full, extra)
        shape, trainable = o["input_shape"], o["trainable_params"]
        ours.append(o["median_s"])
        hand.append(time_hand(stage, o["cfg"], o["batch"], steps)["median_s"])
    best_ours, best_hand = min(ours), min(hand)
    tokens = shape[0] * shape[1]
    return {"stage": stage, "adapter": "full" if full else "lora", "input_shape": shape, "trainable_params": trainable,
            "ours_s": best_ours, "hand_s": best_hand, "ratio": best_ours / best_hand, "ours_runs_s": ours, "hand_runs_s": hand,
            "tokens_per_step": tokens, "ours_tokens_per_s": tokens / best_ours, "hand_tokens_per_s": tokens / best_hand}


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="sft,rm,dpo")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    p.add_argument("--batch", type=int, default=4, help="examples (SFT) or pairs (RM, DPO) per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of the configs' LoRA")
    a = p.parse_args(argv)
    rows = [compare(s, a.steps, a.batch, a.seq_len, a.rounds, a.full) for s in a.stages.split(",")]
    print(table([[r["stage"], r["adapter"], "x".join(map(str, r["input_shape"])), r["hand_s"], r["ours_s"], r["ratio"]]
                 for r in rows],
                ["stage", "adapter", "batch", "hand s/step", "ours s/step", "ours/hand"]))
    return {"args": vars(a), "rows": rows}


if __name__ == "__main__":
    main()
