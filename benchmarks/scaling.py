"""Data-parallel scaling on CPU: ``align sft`` (SmolLM2-135M, LoRA, fp32) on 1 process and under
``--launch configs/accelerate/ddp.yaml`` (2 processes, gloo), same micro-batch per process.

    flock /tmp/align-heavy.lock .venv/bin/python -m benchmarks scaling [--steps 6 --batch 4 --seq-len 128]

Every example is truncated to ``--seq-len`` tokens, so a step processes batch x seq_len tokens per
process. Tokens/s comes from the stage's own ``train_seconds`` (summary.json; the first step
included, on both sides). With 2 processes each rank gets one of the 2 cores (torch's launcher sets
OMP_NUM_THREADS=1); the single process uses both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_sft(root: Path, data: Path, steps: int, batch: int, seq_len: int, launch: list[str]) -> dict:
    from benchmarks.overhead import MODEL

    cmd = [sys.executable, "-m", "alignment.cli", "sft", "--config", str(REPO / "configs/sft.yaml"), f"model.name={MODEL}",
           f"run.root={root}", "run.wandb=disabled", f"data.sources=[{{path: {data}}}]",
           "data.val_fraction=0", "data.sample_prompts=0",
           f"train.max_steps={steps}", f"train.batch_size={batch}", "train.grad_accum=1", f"train.max_length={seq_len}",
           "train.save_steps=100000", *launch]
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return {**json.loads((root / "default" / "sft" / "summary.json").read_text()), "wall_s": wall}


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import table
    from benchmarks.overhead import sft_examples

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "sft.jsonl"
        data.write_text("".join(json.dumps({"messages": ex.messages}) + "\n" for ex in sft_examples(64)))
        for procs, launch in ((1, []), (2, ["--launch", str(REPO / "configs/accelerate/ddp.yaml")])):
            s = run_sft(Path(d) / f"p{procs}", data, a.steps, a.batch, a.seq_len, launch)
            tokens = s["global_step"] * a.batch * a.seq_len * procs
            rows.append({"processes": procs, "train_seconds": s["train_seconds"], "wall_s": s["wall_s"], "tokens": tokens,
                         "tokens_per_s": tokens / s["train_seconds"],
                         "tokens_per_s_per_process": tokens / s["train_seconds"] / procs})
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(table([[r["processes"], r["train_seconds"], r["tokens_per_s"], r["tokens_per_s_per_process"]] for r in rows],
                ["processes", "train s", "tokens/s", "tokens/s per process"]))
    print(f"2-process speed-up: {speedup:.2f}x")
    return {"args": vars(a), "rows": rows, "speedup": speedup}


if __name__ == "__main__":
    main()
