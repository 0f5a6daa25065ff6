"""Peak memory of PPO (policy, reference, critic and both reward models) against SFT-LoRA of the
same model and batch. Goal (issue 4): PPO <= 2x SFT-LoRA.

    flock /tmp/align-heavy.lock .venv/bin/python -m benchmarks.ppo_memory \\
        --rm-helpful runs/default/rm_helpful --rm-safety runs/default/rm_safety

Each side runs in a fresh process (so neither inherits the other's allocations): on CPU the peak is
the process's maximum resident set size (ru_maxrss; it includes Python, torch and the libraries,
~0.5 GB, on both sides); on a GPU it is torch.cuda.max_memory_allocated.

- SFT-LoRA: `align sft` (TRL SFTTrainer), LoRA r=16 on all linear layers, `--batch` sequences of up to
  `--seq-len` tokens per step, `--steps` steps.
- PPO: `align ppo`, LoRA r=16, `--batch` prompts per iteration = minibatch = micro-batch, responses of
  up to `--new-tokens` tokens, `--steps` iterations plus the final held-out evaluation on `--batch`
  prompts. Without reward models (`--rm-helpful` unset) a rule-based reward is used and the critic
  starts from the policy's base: the number then shows PPO's own overhead.

Writes the numbers to stdout and, with --out, to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak() -> dict:
    import torch

    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def child_sft(a: argparse.Namespace, root: str) -> dict:
    from foundation.config import load_config
    from foundation.runs import read_metrics
    from alignment.sft import SFTConfig, main

    cfg = load_config(SFTConfig, REPO / "configs/sft.yaml", [
        f"model.name={a.model}", f"run.root={root}", "run.name=bench", "run.wandb=disabled", "adapter.method=lora",
        f"train.batch_size={a.batch}", "train.grad_accum=1", f"train.max_steps={a.steps}", f"train.max_length={a.seq_len}",
        "train.logging_steps=1", "train.save_steps=1000", "data.sample_prompts=0", "data.val_fraction=0.05",
    ], stage="sft")
    t0 = time.time()
    out = main(cfg)
    seconds = time.time() - t0
    tokens = [m.get("num_tokens") for m in read_metrics(out) if m.get("num_tokens")]
    return {**peak(), "seconds": round(seconds, 1), "tokens_seen": tokens[-1] if tokens else None}


def child_ppo(a: argparse.Namespace, root: str) -> dict:
    from foundation.config import load_config
    from alignment.ppo import PPOConfig, main
    from foundation.runs import read_metrics

    reward = ([f"reward.helpful={a.rm_helpful}", f"reward.safety={a.rm_safety or 'null'}", "critic.init=reward_model"]
              if a.rm_helpful
              else ["reward.helpful=null", "reward.safety=null", "critic.init=policy",
                    "reward.function=alignment.rl.rule_rewards:target_length"])
    cfg = load_config(PPOConfig, REPO / "configs/ppo.yaml", [
        f"model.name={a.model}", f"run.root={root}", "run.name=bench", "run.wandb=disabled", *reward,
        f"train.max_steps={a.steps}", f"ppo.rollout_batch_size={a.batch}", f"ppo.minibatch_size={a.batch}",
        f"ppo.micro_batch_size={a.batch}", f"sampling.max_new_tokens={a.new_tokens}", f"sampling.batch_size={a.batch}",
        "eval.every=0", f"eval.max_prompts={a.batch}",
    ], stage="ppo")
    t0 = time.time()
    out = main(cfg)
    seconds = time.time() - t0
    rows = [m for m in read_metrics(out) if "time/iteration" in m]
    summary = json.loads((out / "summary.json").read_text())
    return {**peak(), "seconds": round(seconds, 1), "seconds_per_iteration": sum(m["time/iteration"] for m in rows) / len(rows),
            "response_length": sum(m["response/length"] for m in rows) / len(rows),
            "weights_mib": {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith("weights_mib/")}}


def run_child(kind: str, argv: list[str]) -> dict:
    # -m, not the file: run as a script, benchmarks/ would come first on sys.path and benchmarks/alignment.py
    # would shadow the alignment package
    res = subprocess.run([sys.executable, "-m", "benchmarks.ppo_memory", "--child", kind, *argv], check=False, cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if res.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (SFT) = prompts per iteration (PPO)")
    p.add_argument("--seq-len", type=int, default=256, help="SFT max_length (tokens); choose ~ prompt + response of PPO")
    p.add_argument("--new-tokens", type=int, default=128, help="PPO response length limit")
    p.add_argument("--steps", type=int, default=3, help="SFT steps / PPO iterations")
    p.add_argument("--rm-helpful", default=None, help="helpfulness reward model (align rm output); unset = rule-based reward")
    p.add_argument("--rm-safety", default=None, help="safety reward model")
    p.add_argument("--out", default=None, help="also write the results here (JSON)")
    p.add_argument("--child", choices=["sft", "ppo"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        with tempfile.TemporaryDirectory() as root:
            result = (child_sft if a.child == "sft" else child_ppo)(a, root)
        print(json.dumps(result))
        return
    argv = [f"--model={a.model}", f"--batch={a.batch}", f"--seq-len={a.seq_len}",
            f"--new-tokens={a.new_tokens}", f"--steps={a.steps}"]
    argv += [f"--rm-helpful={a.rm_helpful}"] if a.rm_helpful else []
    argv += [f"--rm-safety={a.rm_safety}"] if a.rm_safety else []
    sft = run_child("sft", argv)
    ppo = run_child("ppo", argv)
    key = "peak_cuda_gib" if "peak_cuda_gib" in sft else "peak_rss_gib"
    result = {"model": a.model, "batch": a.batch, "seq_len": a.seq_len, "new_tokens": a.new_tokens, "steps": a.steps,
              "reward_models": [x for x in (a.rm_helpful, a.rm_safety) if x], "sft_lora": sft, "ppo": ppo,
              "measure": key, "ratio": round(ppo[key] / sft[key], 3)}
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
