"""``align demo``: the main job on the embedded default model.

Fine-tunes SmolLM2-135M-Instruct (LoRA) on the bundled dialogues and prints a few answers to
held-out prompts before and after training, and where everything was written. Each demo run gets
its own run folder (``runs/demo-<timestamp>``), so running it again never touches earlier output.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from alignment.config import load_config

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

PROFILES = {
    # quick: about 4 minutes of training on 2 CPU cores (~8 s per step of 4 x 320 tokens)
    "quick": ["train.max_steps=24", "train.batch_size=4", "train.grad_accum=1", "train.max_length=320", "train.save_steps=12",
              "train.logging_steps=5", "train.lr=3e-4", "data.sample_prompts=0"],
    "full": ["train.num_epochs=1", "train.batch_size=4", "train.grad_accum=2", "data.sample_prompts=8"],
}


def _show(title: str, prompts: list, answers: list[str]) -> None:
    print(f"\n=== {title} ===")
    for conv, answer in zip(prompts, answers):
        for m in conv[:-1]:  # earlier turns of a multi-turn prompt, shortened
            text = m["content"] if len(m["content"]) < 100 else m["content"][:97] + "..."
            print(f"\n  [{m['role']}] {text}")
        print(f"\n> {conv[-1]['content']}\n{answer}")


def cli(name: str, argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="align demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--root", default="runs")
    p.add_argument("--prompts", type=int, default=3, help="held-out prompts to answer before and after")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra SFT config overrides")
    a = p.parse_args(argv)

    from alignment import sft
    from alignment.generation import generate
    from alignment.models import load_causal_lm, load_tokenizer
    from alignment.runs import setup_logging

    setup_logging()
    run_name = time.strftime("demo-%Y%m%d-%H%M%S")
    cfg = load_config(sft.SFTConfig, REPO_CONFIGS / "sft.yaml" if (REPO_CONFIGS / "sft.yaml").is_file() else None,
                      [f"model.name={a.model}", f"run.name={run_name}", f"run.root={a.root}", *PROFILES[a.profile], *a.overrides],
                      stage="sft")
    _, val = sft.load_data(cfg.data, cfg.run.seed)
    prompts = []
    for ex in val[: a.prompts]:
        last_user = max(i for i, m in enumerate(ex.messages) if m["role"] == "user")
        prompts.append(ex.messages[: last_user + 1])

    t0 = time.time()
    base, tok = load_causal_lm(a.model), load_tokenizer(a.model)
    before = [g.text for g in generate(base, tok, prompts, max_new_tokens=80)]
    del base
    _show(f"before training ({a.model})", prompts, before)

    out = sft.main(cfg)

    tuned, tok = load_causal_lm(str(out)), load_tokenizer(str(out))
    after = [g.text for g in generate(tuned, tok, prompts, max_new_tokens=80)]
    _show("after SFT", prompts, after)
    changed = sum(b != c for b, c in zip(before, after))
    print(f"\n{changed} of {len(prompts)} answers changed after training.")
    print(f"demo finished in {time.time() - t0:.0f} s; outputs: {out}")
    print(f"  model/ (LoRA adapter), metrics.jsonl, summary.json, config.yaml; merge with: align merge --adapter {out} --out {out}-merged")
    return 0
