"""On a CUDA GPU, in bf16: SFT training throughput, memory and MFU, and one PPO iteration.

    python -m benchmarks gpu [--steps 10 --batch 8 --seq-len 512 --ppo-batch 16 --new-tokens 128]

- The GPU's sustained bf16 matmul FLOP/s (8192 x 8192, measured here), the hardware limit.
- ``align sft``'s own trainer (``benchmarks.overhead.time_ours``) on SmolLM2-135M with LoRA and
  with full fine-tuning, ``model.device=cuda`` (dtype and precision ``auto`` resolve to bf16 on a
  GPU that supports it): tokens/s, peak CUDA memory allocated, and MFU = tokens/s x
  (6N + 12·L·d·T) / matmul FLOP/s (for LoRA 6N overstates the work: frozen weights get no weight
  gradient, so its MFU is an upper bound).
- One PPO iteration (``benchmarks.ppo_speed.ppo_iterations`` on the GPU): the phase split and
  the peak CUDA memory.

Without a CUDA GPU it measures nothing and says so (CI and the CPU machines have none).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

MODEL = "smollm2-135m"


def matmul_flops_cuda(n: int = 8192, repeats: int = 20) -> float:
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict:
    import torch

    from benchmarks.common import table

    p = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ppo-iterations", type=int, default=3)
    p.add_argument("--ppo-batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--big", default=None, help="also full SFT on this model (a folder), e.g. the GPU check's 0.5B Llama; "
                                                "left out when the folder has no config.json")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing measured")
        return {"args": vars(a), "skipped": "no CUDA GPU"}

    from benchmarks.hardware import model_flops_per_token
    from benchmarks.overhead import time_ours
    from benchmarks.ppo_speed import PHASES, ppo_iterations

    peak = matmul_flops_cuda()
    runs = [(MODEL, False), (MODEL, True)]
    if a.big and (Path(a.big) / "config.json").is_file():
        runs.append((a.big, True))
    flops = {name: model_flops_per_token(name, a.seq_len) for name in dict(runs)}
    fl = flops[MODEL]
    rows = []
    for name, full in runs:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        r = time_ours("sft", a.steps, a.batch, a.seq_len, full=full, extra=["model.device=cuda", f"model.name={name}"])
        tokens_per_s = math.prod(r["input_shape"]) / r["median_s"]
        rows.append({"sft": ("full" if full else "lora") + ("" if name == MODEL else f" ({flops[name]['params'] / 1e9:.2f}B)"),
                     "model": name, "params": flops[name]["params"],
                     "dtype": str(r["cfg"].model.dtype), "precision": r["cfg"].train.precision,
                     "input_shape": r["input_shape"], "median_step_s": r["median_s"], "tokens_per_s": tokens_per_s,
                     "mfu": tokens_per_s * flops[name]["flops_per_token"] / peak,
                     "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30})
    print(table([[x["sft"], x["tokens_per_s"], f"{100 * x['mfu']:.1f}%", x["peak_cuda_gib"]] for x in rows],
                ["SFT (bf16)", "tokens/s", "MFU", "peak GiB"]))
    print(f"bf16 matmul: {peak / 1e12:.1f} TFLOP/s")
    torch.cuda.empty_cache()
    ppo = ppo_iterations(a.ppo_iterations, a.ppo_batch, a.new_tokens, extra=["model.device=cuda"])
    med = ppo["median"]
    print(table([[k.split("/")[1], med[k], med[k] / med["time/iteration"]] for k in PHASES]
                + [["iteration", med["time/iteration"], 1.0]], ["PPO phase (GPU)", "seconds", "share"]))
    return {"args": vars(a), "gpu": torch.cuda.get_device_name(0), "matmul_bf16_tflops": peak / 1e12, "flops": fl,
            "sft": rows, "ppo": ppo}


if __name__ == "__main__":
    main()
