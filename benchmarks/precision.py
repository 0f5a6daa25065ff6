"""bf16 on this CPU, measured before it is trusted: speed and fidelity of SmolLM2-135M in bf16 against fp32
for what the recipe spends its time on (generation, scoring, SFT-LoRA training steps).

    flock /tmp/align-heavy.lock .venv/bin/python -m benchmarks precision [--prompts 64 --batch 32 --new-tokens 64]

``foundation.precision.select_dtype`` picks fp32 on CPU because ``benchmarks/defaults.py`` measured bf16 autocast
training 19x slower on an earlier machine (no native bf16). Some machines now have it (``avx512_bf16`` /
``amx_bf16`` in /proc/cpuinfo; bf16 matmul ~4x fp32 on the one this was written on), so the choice is measured on
the machine that runs, part by part:

- **matmul**: GFLOP/s of a 1024² matmul and of a decode-shaped linear layer (B × 576 → 1536), fp32 and bf16.
- **generation**: the engine (``foundation.generation``) on ``--prompts`` prompts of the demo's pool at batch
  ``--batch``, ``--new-tokens`` tokens at temperature 0.8, model weights fp32 vs bf16 (its linears on oneDNN's
  prepacked bf16 kernels, and on plain ``F.linear``); runs alternate (fp32, bf16, bf16 F.linear, twice) so that drift
  in the machine's speed hits all; tokens/s of each run.
- **greedy fidelity**: greedy answers (48 tokens) of both on 32 prompts: how many are identical, and the mean share
  of tokens before the first difference.
- **scoring fidelity**: TruthfulQA MC2 (the round eval's loglikelihood path) on ``--questions`` questions in
  both precisions: mean MC2 of each, the mean and max absolute per-question difference, seconds of each; and the
  summed log-probability of the fp32 greedy answers under both models (mean absolute difference per token).
- **judging**: the gold reward model (``--gold``) in both precisions on both models' greedy answers: the mean score
  gap, and on how many prompts the two precisions pick the same of the two answers (a win rate's unit).
- **training**: our SFT-LoRA trainer's step (``benchmarks/overhead.py``'s ``time_ours``, as ``defaults`` times it)
  in fp32, with bf16 autocast over fp32 weights, and with bf16 base weights under autocast (LoRA adapters fp32).

Writes ``benchmarks/results/precision.json``; verdicts are the numbers. On the 2-core EPYC with avx512_bf16 it
measured generation 1.35x, scoring and judging ~2x faster in bf16 with the gold RM's pick kept in 19 of 20 pairs, so
evaluation's ``auto`` is bf16 on CPUs with native bf16 (``foundation.precision.resolve_inference_dtype``); training
stays fp32 on CPUs (7-14% faster steps in bf16 did not pay for a change in every stage's numerics).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m"
TRUTHFULQA = ("../shared/data/truthfulqa/mc_task.json", "bundled:truthfulness")
TRAIN_SETTINGS = {
    "fp32": ["train.precision=fp32", "train.gradient_checkpointing=false"],
    "bf16 autocast, fp32 weights": ["train.precision=bf16", "train.gradient_checkpointing=false"],
    "bf16 autocast, bf16 base weights": ["train.precision=bf16", "train.gradient_checkpointing=false",
                                         "model.dtype=bfloat16"],
}


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if "bf16" in f or "amx" in f or f == "avx512f")
    except OSError:
        pass
    return []


def matmuls() -> dict:
    import torch

    from benchmarks.common import time_steps
    from benchmarks.hardware import matmul_flops

    out: dict[str, Any] = {}
    for dt in ("float32", "bfloat16"):
        d = getattr(torch, dt)
        x, w = torch.randn(32, 576, dtype=d), torch.randn(1536, 576, dtype=d)
        t = time_steps(lambda: torch.nn.functional.linear(x, w), steps=50, warmup=5)["median_s"]
        out[dt] = {"matmul_1024_gflops": matmul_flops(n=1024, dtype=dt, repeats=8) / 1e9,
                   "linear_32x576x1536_gflops": 2 * 32 * 576 * 1536 / t / 1e9}
    return out


def generation(models: dict, tok: Any, prompts: list, *, batch: int, new_tokens: int, seed: int) -> dict:
    from benchmarks.generate import engine_run

    variants = [("float32", models["float32"], {}), ("bfloat16", models["bfloat16"], {}),
                ("bfloat16, F.linear", models["bfloat16"], {"fast_linears": False})]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for _ in range(2):
        for name, model, extra in variants:
            r = engine_run(model, tok, prompts, batch=batch, new_tokens=new_tokens, temperature=0.8, seed=seed, **extra)
            runs[name].append({k: r[k] for k in ("tokens", "seconds", "tokens_per_s", "linear_kernel", "eos_fraction")})
            print(f"generation {name}: {r['tokens_per_s']:.1f} tokens/s ({r['linear_kernel']})", flush=True)
    best = {k: max(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    return {"runs": runs, "best_tokens_per_s": best, "bf16_vs_fp32": best["bfloat16"] / best["float32"],
            "bf16_prepacked_vs_f_linear": best["bfloat16"] / best["bfloat16, F.linear"]}


def greedy(models: dict, tok: Any, prompts: list, new_tokens: int) -> tuple[dict, list]:
    from foundation.generation import Engine, SamplingParams, encode_prompts

    encoded = encode_prompts(tok, prompts)
    outs = {k: Engine(m, tok, batch_size=8).run(encoded, SamplingParams(max_new_tokens=new_tokens))[0] for k, m in models.items()}
    a, b = outs["float32"], outs["bfloat16"]
    shares = []
    for x, y in zip(a, b):
        n = max(len(x.response_ids), len(y.response_ids), 1)
        same = next((i for i, (p, q) in enumerate(zip(x.response_ids, y.response_ids)) if p != q),
                    min(len(x.response_ids), len(y.response_ids)))
        shares.append(same / n)
    return ({"prompts": len(prompts), "new_tokens": new_tokens,
             "identical": sum(x.response_ids == y.response_ids for x, y in zip(a, b)),
             "mean_shared_prefix_share": sum(shares) / len(shares)}, outs)


def scoring(models: dict, tok: Any, prompts: list, answers: list, questions: int, seed: int) -> dict:
    from alignment.evals.loglikelihood import score_tokens
    from alignment.evals.results import first_existing
    from alignment.evals.truthfulqa import evaluate_mc
    from alignment.evals.truthfulqa_data import load_items
    from foundation.generation import encode_prompts

    out: dict[str, Any] = {}
    data = first_existing(list(TRUTHFULQA))
    items = load_items(data, sample=questions, seed=seed)
    per: dict[str, list[float]] = {}
    for name, model in models.items():
        t = time.perf_counter()
        res = evaluate_mc(model, tok, items, batch_size=16)
        per[name] = [r["mc2"] for r in res["rows"]]
        out[name] = {"mc2": res["metrics"]["mc2"], "mc1": res["metrics"]["mc1"], "seconds": time.perf_counter() - t}
        print(f"truthfulqa {name}: MC2 {res['metrics']['mc2']:.4f} in {out[name]['seconds']:.0f} s", flush=True)
    diffs = [abs(x - y) for x, y in zip(per["float32"], per["bfloat16"])]
    out["truthfulqa"] = {"data": data, "n": len(items), "mc2_mean_abs_diff": sum(diffs) / len(diffs),
                         "mc2_max_abs_diff": max(diffs),
                         "mc2_diff_points": 100 * (out["bfloat16"]["mc2"] - out["float32"]["mc2"])}
    requests = [(list(p), list(a.response_ids)) for p, a in zip(encode_prompts(tok, prompts), answers) if a.response_ids]
    sums = {name: score_tokens(m, requests, batch_size=8, pad_id=tok.pad_token_id) for name, m in models.items()}
    tokens = sum(len(c) for _, c in requests)
    gap = sum(abs(x - y) for x, y in zip(sums["float32"], sums["bfloat16"]))
    out["answer_logprobs"] = {"answers": len(requests), "tokens": tokens, "mean_abs_diff_per_token": gap / tokens}
    return out


def judging(gold: str, prompts: list, texts: dict[str, list[str]]) -> dict:
    """The gold reward model (a judge) in fp32 and in bf16 (fp32 head) on the fp32 and bf16 models' greedy answers:
    score gaps, and how often the two precisions pick the same answer of each pair (what a win rate reads)."""
    import torch

    from foundation.precision import inference_precision
    from reward import load_scorer

    scores: dict[str, dict[str, list[float]]] = {}
    for dt in ("float32", "bfloat16"):
        with inference_precision(dt):
            scorer = load_scorer(gold)
            t = time.perf_counter()
            scores[dt] = {k: scorer.score(prompts, v).tolist() for k, v in texts.items()}
            seconds = time.perf_counter() - t
            del scorer
        scores[dt]["seconds"] = seconds  # type: ignore[assignment]
        print(f"judging {dt}: {seconds:.1f} s", flush=True)
    a, b = scores["float32"], scores["bfloat16"]
    gaps = [abs(x - y) for k in texts for x, y in zip(a[k], b[k])]
    picks = [(x1 > y1) == (x2 > y2) for x1, y1, x2, y2 in zip(a["float32"], a["bfloat16"], b["float32"], b["bfloat16"])
             if x1 != y1]
    spread = torch.tensor(a["float32"] + a["bfloat16"]).std().item()
    return {"gold": gold, "answers": len(gaps), "mean_abs_score_diff": sum(gaps) / len(gaps), "score_sd": spread,
            "pairs_with_different_answers": len(picks), "same_pick": sum(picks),
            "seconds": {"float32": a["seconds"], "bfloat16": b["seconds"]}}


def training(steps: int, batch: int, seq_len: int) -> list[dict]:
    from benchmarks.overhead import time_ours

    rows = []
    for name, extra in TRAIN_SETTINGS.items():
        try:
            r = time_ours("sft", steps, batch, seq_len, extra=extra)
            rows.append({"setting": name, "overrides": extra, "median_s": r["median_s"], "times": r["times"]})
        except Exception as exc:  # a setting this machine's torch cannot run is a result, not a crash
            rows.append({"setting": name, "overrides": extra, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(f"training {name}: {rows[-1].get('median_s', rows[-1].get('error'))}", flush=True)
    base = rows[0].get("median_s")
    for r in rows:
        if base and "median_s" in r:
            r["vs_fp32"] = r["median_s"] / base
    return rows


def main(argv: list[str] | None = None) -> dict:
    import random

    import torch

    from benchmarks.common import table
    from foundation.models import load_causal_lm, load_tokenizer
    from data.loaders import DataSource, load_prompts

    p = argparse.ArgumentParser(prog="python -m benchmarks precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--questions", type=int, default=50, help="TruthfulQA questions scored in each precision")
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--gold", default="gold:hh-helpful-smollm2",
                   help="a reward model judged in both precisions (empty: skip); built by `align gold build`")
    a = p.parse_args(argv)

    out: dict[str, Any] = {"args": vars(a), "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "matmul": matmuls()}
    print("matmul", out["matmul"], flush=True)
    tok = load_tokenizer(MODEL)
    models = {dt: load_causal_lm(MODEL, dtype=dt, device="cpu").eval() for dt in ("float32", "bfloat16")}
    pool = [r.messages for r in load_prompts(DataSource("bundled:prompts"))]
    random.Random(a.seed).shuffle(pool)
    with torch.inference_mode():
        out["generation"] = generation(models, tok, pool[:a.prompts], batch=a.batch, new_tokens=a.new_tokens, seed=a.seed)
        out["greedy"], answers = greedy(models, tok, pool[:32], 48)
        out["scoring"] = scoring(models, tok, pool[:32], answers["float32"], a.questions, a.seed)
        if a.gold:
            out["judging"] = judging(a.gold, pool[:32], {k: [tok.decode(o.response_ids, skip_special_tokens=True) for o in v]
                                                        for k, v in answers.items()})
    del models
    if not a.skip_training:
        out["training"] = training(a.train_steps, 4, 128)

    g, s = out["generation"], out["scoring"]
    mm = out["matmul"]
    rows = [["matmul 1024² GFLOP/s", mm["float32"]["matmul_1024_gflops"], mm["bfloat16"]["matmul_1024_gflops"]],
            ["linear 32×576→1536 GFLOP/s", mm["float32"]["linear_32x576x1536_gflops"],
             mm["bfloat16"]["linear_32x576x1536_gflops"]],
            [f"generation tokens/s (batch {a.batch})", g["best_tokens_per_s"]["float32"], g["best_tokens_per_s"]["bfloat16"]],
            [f"TruthfulQA MC2 ({s['truthfulqa']['n']} q)", s["float32"]["mc2"], s["bfloat16"]["mc2"]],
            ["TruthfulQA seconds", s["float32"]["seconds"], s["bfloat16"]["seconds"]]]
    rows += [[f"SFT-LoRA s/step: {r['setting']}", r.get("median_s", float("nan")), ""] for r in out.get("training", [])]
    print(table(rows, ["", "fp32", "bf16"]))
    print(f"greedy: {out['greedy']['identical']}/{out['greedy']['prompts']} identical; MC2 |diff| mean "
          f"{s['truthfulqa']['mc2_mean_abs_diff']:.4f}, max {s['truthfulqa']['mc2_max_abs_diff']:.4f}; answer log-prob |diff| "
          f"{s['answer_logprobs']['mean_abs_diff_per_token']:.4f} nats per token")
    return out
