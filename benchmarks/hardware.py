"""Hardware limit: the machine's matmul FLOP/s, and model FLOPs utilisation (MFU) of training.

    python -m benchmarks.hardware [--json]

FLOPs per trained token follow the PaLM appendix: 6·N (N = parameters; with tied embeddings the
matrix is counted once, as the LM head's matmul) + 12·L·d·T for attention (L layers, width d,
sequence T). MFU = achieved training FLOP/s ÷ measured fp32 matmul FLOP/s on this machine.
"""

from __future__ import annotations

import argparse
import json


def matmul_flops(n: int = 2048, dtype: str = "float32", repeats: int = 10) -> float:
    """Sustained FLOP/s of an n×n matmul."""
    import torch

    from benchmarks.common import time_steps

    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    t = time_steps(lambda: a @ b, steps=repeats, warmup=2)["median_s"]
    return 2 * n**3 / t


def train_flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    return 6 * n_params + 12 * n_layers * d_model * seq_len


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    out = {"fp32_matmul_gflops": matmul_flops(dtype="float32") / 1e9, "bf16_matmul_gflops": matmul_flops(n=512, dtype="bfloat16", repeats=3) / 1e9}
    print(json.dumps(out) if a.json else f"fp32 {out['fp32_matmul_gflops']:.0f} GFLOP/s, bf16 {out['bf16_matmul_gflops']:.0f} GFLOP/s")
    return out


if __name__ == "__main__":
    main()
