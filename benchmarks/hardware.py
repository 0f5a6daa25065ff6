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
    out = {"fp32_matmul_gflops": matmul_flops(dtype="float32") / 1e9,
           "bf16_matmul_gflops": matmul_flops(n=512, dtype="bfloat16", repeats=3) / 1e9}
    print(json.dumps(out) if a.json
          else f"fp32 {out['fp32_matmul_gflops']:.0f} GFLOP/s, bf16 {out['bf16_matmul_gflops']:.0f} GFLOP/s")
    return out


if __name__ == "__main__":
    main()


def model_flops_per_token(model_name: str, seq_len: int) -> dict:
    """N, layers, width and training FLOPs per token (6N + 12·L·d·T) of a model, read from its weights."""
    from foundation.models import load_causal_lm

    model = load_causal_lm(model_name, dtype="float32", device="cpu")
    n = sum(p.numel() for p in model.parameters())  # a tied LM head / embedding matrix is one parameter: counted once
    c = model.config
    return {"params": n, "layers": c.num_hidden_layers, "d_model": c.hidden_size, "seq_len": seq_len,
            "flops_per_token": train_flops_per_token(n, c.num_hidden_layers, c.hidden_size, seq_len)}


def mfu(steps: int = 3, batch: int = 4, seq_len: int = 128, rounds: int = 1) -> dict:
    """Model FLOPs utilisation of full fine-tuning SmolLM2-135M (fp32, CPU): our SFT stage and the
    hand-written loop, against this machine's measured fp32 matmul FLOP/s (measured in the same run)."""
    from benchmarks.overhead import MODEL, compare

    peak = matmul_flops(dtype="float32")
    fl = model_flops_per_token(MODEL, seq_len)
    sft = compare("sft", steps, batch, seq_len, rounds, full=True)
    peak_after = matmul_flops(dtype="float32")  # the machine is shared: bracket the training measurement
    peak_best = max(peak, peak_after)
    rows = []
    for who in ("hand", "ours"):
        tps = sft[f"{who}_tokens_per_s"]
        rows.append({"loop": who, "tokens_per_s": tps, "achieved_gflops": tps * fl["flops_per_token"] / 1e9,
                     "mfu": tps * fl["flops_per_token"] / peak_best})
    return {"matmul_fp32_gflops": [peak / 1e9, peak_after / 1e9], "flops": fl, "approximation": "6N + 12*L*d*T per token (PaLM)",
            "sft_full": {k: v for k, v in sft.items()}, "rows": rows}
