"""Defaults audit: fp32 vs bf16 autocast, activation checkpointing off vs on, for our SFT-LoRA step
on SmolLM2-135M on this machine; the stage defaults (``train.precision=auto``,
``train.gradient_checkpointing=null``) must pick the fastest.

    flock /tmp/align-heavy.lock .venv/bin/python -m benchmarks defaults [--steps 2 --batch 4 --seq-len 128]

Each setting runs our SFT trainer (benchmarks/overhead.py's ``time_ours``) for one warm-up and
``--steps`` timed steps; settings are measured one after the other in one process.
"""

from __future__ import annotations

import argparse

SETTINGS = {
    "default (auto)": [],
    "fp32, no checkpointing": ["train.precision=fp32", "train.gradient_checkpointing=false"],
    "bf16 autocast": ["train.precision=bf16", "train.gradient_checkpointing=false"],
    "activation checkpointing": ["train.precision=fp32", "train.gradient_checkpointing=true"],
}


def main(argv: list[str] | None = None) -> dict:
    from foundation.training import TrainConfig, on_gpu, precision_flags
    from benchmarks.common import table
    from benchmarks.overhead import time_ours

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    a = p.parse_args(argv)
    rows = []
    for name, extra in SETTINGS.items():
        r = time_ours("sft", a.steps, a.batch, a.seq_len, extra=extra)
        rows.append({"setting": name, "overrides": extra, "median_s": r["median_s"], "times": r["times"]})
    base = rows[0]["median_s"]
    for r in rows:
        r["vs_default"] = r["median_s"] / base
    fastest = min(rows, key=lambda r: r["median_s"])
    default = TrainConfig()
    resolved = {"precision": precision_flags(default.precision),
                "gradient_checkpointing": on_gpu() if default.gradient_checkpointing is None
                else default.gradient_checkpointing}
    print(table([[r["setting"], r["median_s"], r["vs_default"]] for r in rows], ["SFT-LoRA step", "s/step", "vs default"]))
    print(f"defaults resolve to {resolved}; fastest: {fastest['setting']}")
    return {"args": vars(a), "rows": rows, "default_resolves_to": resolved, "fastest": fastest["setting"]}


if __name__ == "__main__":
    main()
