"""Generation speed: the engine (``foundation.generation``) against plain ``model.generate`` and against
the machine's compute bound, on SmolLM2-135M with a LoRA adapter (how PPO, rejection sampling and
pair sampling run it), fp32 on CPU.

    flock /tmp/align-heavy.lock .venv/bin/python -m benchmarks generate [--batches 8,32,64,128] [--new-tokens 64]

- **Bound**: measured fp32 matmul FLOP/s ÷ 2·(non-embedding parameters + LM head) FLOPs per generated
  token. Prompt tokens are not in it, so a generator that also runs its prompts cannot reach 100%.
  The machine is shared and its matmul speed drifts (35-70 GFLOP/s within an hour here), so each
  run carries its own bound, from 1024² matmul probes right before and after it; shares and the
  normalised speedup compare runs at the speed each actually had.
- **Rows**: for each batch size B, ``max(B, 32)`` prompts of the demo's pool (``bundled:prompts``, a
  seeded draw), 64 new tokens at temperature 0.8, EOS allowed: the engine (``generate()`` with
  ``batch_size=B``) and today's baseline, plain ``model.generate`` on length-sorted left-padded
  batches of B with the adapter unmerged (what ``generate()`` did before the engine). tokens/s =
  generated tokens (EOS included) ÷ wall time of the call, prefill included.
- **Ablation** at B = 32: each optimisation switched off alone, each run right after the engine
  itself (paired; the ratio of their normalised shares).
- **Linear kernels**: the decode step's linear layers alone (30 layers × 7 + LM head) at 8-128 rows:
  MKL's ``F.linear``, the transposed GEMM, prepacked oneDNN.
- **Greedy check**: greedy answers of the engine and of ``model.generate`` on 16 prompts.

Writes ``benchmarks/results/generate.json``; the README's "Generation" section reports it.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

MODEL = "smollm2-135m"


def probe() -> float:
    """This moment's fp32 matmul FLOP/s (~0.3 s): the machine is shared and its speed drifts by 2x within minutes,
    so every run is normalised by probes taken right before and after it."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    t = time.perf_counter()
    for _ in range(8):
        a @ b
    return 8 * 2 * 1024**3 / (time.perf_counter() - t)


def probed(fn: Any, flops_per_token: float) -> dict:
    """Run ``fn`` (returns a dict with tokens_per_s) between two probes; add the run's own bound and share."""
    before = probe()
    r = fn()
    after = probe()
    gflops = (before + after) / 2
    r.update(probe_gflops=[before / 1e9, after / 1e9], bound_tokens_per_s=gflops / flops_per_token,
             share_of_bound=r["tokens_per_s"] / (gflops / flops_per_token))
    return r


def bound(model: Any, matmul_flops: float) -> dict:
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied embedding / LM head matrix is one parameter
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    base = total - lora
    non_embedding = base - emb.numel()
    head = model.get_output_embeddings().weight.numel()
    flops_per_token = 2 * (non_embedding + head)
    return {"non_embedding_params": non_embedding, "lm_head_params": head, "flops_per_token": flops_per_token,
            "tokens_per_s": matmul_flops / flops_per_token}


def baseline(model: Any, tok: Any, prompts: list, *, batch: int, new_tokens: int, temperature: float, seed: int) -> dict:
    """What ``generate()`` did before the engine: length-sorted batches, ``model.generate``, adapter unmerged."""
    from foundation.generation import Engine, SamplingParams, encode_prompts

    encoded = sorted(encode_prompts(tok, prompts), key=len)
    t0, tokens = time.perf_counter(), 0
    for start in range(0, len(encoded), batch):
        outs, _ = Engine(model, tok, batch_size=batch, backend="model.generate").run(
            encoded[start:start + batch], SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=seed + start))
        tokens += sum(len(o.response_ids) for o in outs)
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def engine_run(model: Any, tok: Any, prompts: list, *, batch: int, new_tokens: int, temperature: float, seed: int,
               **engine_kwargs: Any) -> dict:
    from foundation.generation import Engine, SamplingParams, encode_prompts

    sampler = engine_kwargs.pop("sampler", "inverse_cdf")
    params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=seed, sampler=sampler)
    outs, st = Engine(model, tok, batch_size=batch, **engine_kwargs).run(encode_prompts(tok, prompts), params)
    return {"tokens": st.new_tokens, "seconds": st.seconds, "tokens_per_s": st.tokens_per_s,
            "prefill_seconds": st.seconds_prefill, "decode_seconds": st.seconds_decode,
            "prefill_positions": st.prefill_tokens, "prompt_tokens": st.prompt_tokens,
            "decode_steps": st.decode_steps, "decode_rows": st.decode_rows, "compactions": st.compactions,
            "linear_kernel": st.linear_kernel, "merged_layers": st.merged_layers,
            "eos_fraction": sum(o.finished for o in outs) / max(1, len(outs))}


def linear_kernels(model: Any, rows_list: list[int]) -> list[dict]:
    """ms for one decode step's linear layers (the model's own weight shapes) at each row count."""
    import torch
    import torch.nn.functional as F

    weights = [m.weight.detach() for m in model.modules() if type(m) is torch.nn.Linear and "lora_" not in str(m)]
    out = []
    try:
        packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    except Exception:  # no oneDNN in this build
        packed = None
    flops = 2 * sum(w.numel() for w in weights)
    for rows in rows_list:
        xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
        kernels = {"mkl F.linear": lambda i, w: F.linear(xs[w.shape[1]], w),
                   "transposed W@x.T": lambda i, w: torch.mm(w, xs[w.shape[1]].t()).t().contiguous()}
        if packed is not None:
            kernels["onednn prepacked"] = lambda i, w: torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], packed[i], None,
                                                                                          "none", [], "")
        row: dict[str, Any] = {"rows": rows}
        for name, fn in kernels.items():
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                for i, w in enumerate(weights):
                    fn(i, w)
                best = min(best, time.perf_counter() - t)
            row[name] = {"ms": 1000 * best, "gflops": rows * flops / best / 1e9}
        out.append(row)
    return out


def greedy_check(model: Any, tok: Any, prompts: list, new_tokens: int) -> dict:
    from foundation.generation import Engine, SamplingParams, encode_prompts

    encoded = encode_prompts(tok, prompts)
    params = SamplingParams(max_new_tokens=new_tokens)
    ours, _ = Engine(model, tok, batch_size=8).run(encoded, params)
    ref, _ = Engine(model, tok, batch_size=8, backend="model.generate").run(encoded, params)
    return {"prompts": len(prompts), "identical": sum(a.response_ids == b.response_ids for a, b in zip(ours, ref)),
            "new_tokens": new_tokens}


def main(argv: list[str] | None = None) -> dict:
    import torch
    from peft import get_peft_model

    from foundation.adapters import AdapterConfig, peft_config
    from foundation.models import load_causal_lm, load_tokenizer
    from benchmarks.common import table
    from benchmarks.hardware import matmul_flops
    from data.loaders import DataSource, load_prompts

    p = argparse.ArgumentParser(prog="python -m benchmarks generate")
    p.add_argument("--batches", default="8,32,64,128")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablation-batch", type=int, default=32)
    p.add_argument("--skip-baseline", action="store_true", help="engine rows only (no model.generate runs)")
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]

    peak_before = matmul_flops(dtype="float32")
    tok = load_tokenizer(MODEL)
    model = get_peft_model(load_causal_lm(MODEL, dtype="float32", device="cpu"),
                           peft_config(AdapterConfig(dropout=0.0), "CAUSAL_LM"))
    model.eval()
    pool = [r.messages for r in load_prompts(DataSource("bundled:prompts"))]
    random.Random(a.seed).shuffle(pool)
    kw = dict(new_tokens=a.new_tokens, temperature=a.temperature, seed=a.seed)

    fpt = bound(model, 1.0)["flops_per_token"]
    rows = []
    for b in batches:
        prompts = pool[:max(b, 32)]
        row: dict[str, Any] = {"batch_size": b, "prompts": len(prompts),
                               "engine": probed(lambda: engine_run(model, tok, prompts, batch=b, **kw), fpt)}
        if not a.skip_baseline:
            row["model_generate"] = probed(lambda: baseline(model, tok, prompts, batch=b, **kw), fpt)
            row["speedup"] = row["engine"]["tokens_per_s"] / row["model_generate"]["tokens_per_s"]
            row["speedup_normalised"] = row["engine"]["share_of_bound"] / row["model_generate"]["share_of_bound"]
        print({k: v for k, v in row.items() if k not in ("engine", "model_generate")},
              f"engine {row['engine']['tokens_per_s']:.1f} tokens/s ({100 * row['engine']['share_of_bound']:.0f}%)", flush=True)
        rows.append(row)

    ablation = []
    prompts = pool[:max(a.ablation_batch, 32)]
    settings: list[tuple[str, dict]] = [
        ("adapter not merged", {"merge_adapters": False}), ("F.linear (MKL) kernels", {"fast_linears": False}),
        ("no shared-prefix prefill", {"share_prefix": False}), ("finished rows kept", {"compact_fraction": 2.0}),
        ("torch.multinomial draw", {"sampler": "multinomial"})]
    for name, extra in settings:  # each variant right after the engine itself: paired, both normalised by their probes
        ref = probed(lambda: engine_run(model, tok, prompts, batch=a.ablation_batch, **kw), fpt)
        var = probed(lambda: engine_run(model, tok, prompts, batch=a.ablation_batch, **kw, **extra), fpt)
        ablation.append({"setting": name, "engine": ref, "variant": var,
                         "variant_vs_engine": var["share_of_bound"] / ref["share_of_bound"]})
        print(name, f"{var['share_of_bound'] / ref['share_of_bound']:.2f}x the engine (normalised)", flush=True)

    kernels = linear_kernels(model, [8, 32, 64, 128])
    greedy = greedy_check(model, tok, pool[:16], 48)
    peak_after = matmul_flops(dtype="float32")
    peak = max(peak_before, peak_after)
    b_ = bound(model, peak)

    print(table([[r["batch_size"], r["engine"]["tokens_per_s"], f"{100 * r['engine']['share_of_bound']:.0f}%",
                  r.get("model_generate", {}).get("tokens_per_s", float("nan")), r.get("speedup", float("nan")),
                  r.get("speedup_normalised", float("nan"))] for r in rows],
                ["batch", "engine tokens/s", "of its bound", "model.generate tokens/s", "speedup", "speedup (normalised)"]))
    print(f"bound {b_['tokens_per_s']:.0f} tokens/s "
          f"(matmul {peak_before / 1e9:.0f} / {peak_after / 1e9:.0f} GFLOP/s before / after)")
    return {"args": vars(a), "model": f"{MODEL} + LoRA r16 on all linear layers (unmerged in the baseline)",
            "matmul_fp32_gflops": [peak_before / 1e9, peak_after / 1e9], "bound": b_, "rows": rows, "ablation": ablation,
            "linear_kernels": kernels, "greedy_check": greedy, "threads": torch.get_num_threads()}
