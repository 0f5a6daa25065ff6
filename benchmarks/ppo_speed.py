"""One PPO iteration on SmolLM2-135M (fp32, CPU): where the time goes, our rollout generation against
plain batched ``model.generate``, and PPO's peak memory against SFT-LoRA.

    flock /tmp/align-heavy.lock .venv/bin/python -m benchmarks ppo [--iterations 3 --batch 8 --new-tokens 64]

1. ``align ppo`` (LoRA policy, critic from the policy's base, the rule reward
   ``target_length``: no reward models are trained in a fresh checkout) for ``--iterations``
   iterations of ``--batch`` prompts (one minibatch, one micro-batch); the per-phase times are the
   stage's own ``time/*`` metrics (generate, score, ref_and_values = pi_old + critic + reference
   forward passes, advantages, update), median over iterations after the first.
2. Sampling the same prompts with the same seed, max_new_tokens and temperature from the same LoRA
   model: ``foundation.generation.generate`` (what PPO calls) against plain ``model.generate`` on the
   same left-padded batch (``Engine(backend="model.generate")``); tokens/s counts response tokens up
   to EOS. ``python -m benchmarks generate`` measures the engine in detail.
3. Peak RSS of PPO against SFT-LoRA in fresh processes (``python -m benchmarks.ppo_memory``).
4. What the PPO passes save by not computing what they do not need, on one batch of the bundled
   prompts with responses of mixed length (a quarter to all of ``--new-tokens``): the update's
   policy forward + backward projecting only the R + 1 response positions onto the vocabulary
   (``logits_to_keep``, what PPO does) against all positions; and the no-grad passes over
   length-sorted micro-batches cut to their own width (what PPO does) against micro-batches in
   sampling order at the full rollout width. Best of ``repeats`` each, same process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
PHASES = ["time/generate", "time/score", "time/ref_and_values", "time/advantages", "time/update"]


def ppo_iterations(iterations: int, batch: int, new_tokens: int, extra: list[str] | None = None) -> dict:
    from foundation.config import load_config
    from alignment.ppo import PPOConfig, main
    from foundation.runs import read_metrics

    with tempfile.TemporaryDirectory() as root:
        cfg = load_config(PPOConfig, REPO / "configs/ppo.yaml", [
            f"model.name={MODEL}", f"run.root={root}", "run.wandb=disabled", "run.log_level=warning",
            "reward.helpful=null", "reward.safety=null", "critic.init=policy",
            "reward.function=alignment.rl.rule_rewards:target_length", "reward.function_kwargs={target: 30}",
            f"train.max_steps={iterations}", f"ppo.rollout_batch_size={batch}", f"ppo.minibatch_size={batch}",
            f"ppo.micro_batch_size={batch}", f"sampling.max_new_tokens={new_tokens}", f"sampling.batch_size={batch}",
            "eval.every=0", "eval.max_prompts=2", "eval.max_new_tokens=8", "eval.samples_every=0", *(extra or [])], stage="ppo")
        out = main(cfg)
        rows = [m for m in read_metrics(out) if "time/iteration" in m]
    timed = rows[1:] or rows
    med = {k: statistics.median(m[k] for m in timed)
           for k in [*PHASES, "time/iteration", "tokens/generated", "perf/gen_tokens_per_s"]}
    if "perf/peak_cuda_gb" in rows[-1]:
        med["perf/peak_cuda_gb"] = rows[-1]["perf/peak_cuda_gb"]
    return {"iterations": len(rows), "median": med,
            "all": [{k: m[k] for k in [*PHASES, "time/iteration", "tokens/generated"]} for m in rows]}


def generation(batch: int, new_tokens: int, repeats: int = 2) -> dict:
    import torch
    from peft import get_peft_model

    from foundation.adapters import AdapterConfig, peft_config
    from foundation.generation import Engine, SamplingParams, encode_prompts, generate
    from foundation.models import load_causal_lm, load_tokenizer
    from data.loaders import DataSource, load_prompts

    tok = load_tokenizer(MODEL)
    model = get_peft_model(load_causal_lm(MODEL, dtype="float32", device="cpu"),
                           peft_config(AdapterConfig(dropout=0.0), "CAUSAL_LM"))
    model.eval()
    prompts = [p.messages for p in load_prompts(DataSource("bundled:prompts"))[:batch]]

    def ours() -> int:
        torch.manual_seed(0)
        gens = generate(model, tok, prompts, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, batch_size=batch)
        return sum(len(g.response_ids) for g in gens)

    def plain() -> int:
        engine = Engine(model, tok, batch_size=batch, backend="model.generate")  # model.generate on the same batches
        outs, _ = engine.run(encode_prompts(tok, prompts), SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0))
        return sum(len(o.response_ids) for o in outs)

    result = {}
    for name, fn in (("ours", ours), ("plain", plain), ("ours_again", ours), ("plain_again", plain)):
        t = time.perf_counter()
        n = fn()
        result[name] = {"tokens": n, "seconds": time.perf_counter() - t}
    best = {k: min((result[k], result[k + "_again"]), key=lambda r: r["seconds"]) for k in ("ours", "plain")}
    return {"runs": result, "ours_tokens_per_s": best["ours"]["tokens"] / best["ours"]["seconds"],
            "plain_tokens_per_s": best["plain"]["tokens"] / best["plain"]["seconds"]}


def pass_costs(batch: int, new_tokens: int, repeats: int = 3) -> dict:
    import random

    import torch
    from peft import get_peft_model

    from foundation.adapters import AdapterConfig, peft_config
    from foundation.generation import encode_prompts
    from foundation.models import load_causal_lm, load_tokenizer
    from alignment.rl.distributions import logprobs_from_logits
    from alignment.rl.rollout import Rollout, build_sequences, position_ids
    from data.loaders import DataSource, load_prompts

    tok = load_tokenizer(MODEL)
    model = get_peft_model(load_causal_lm(MODEL, dtype="float32", device="cpu"),
                           peft_config(AdapterConfig(dropout=0.0), "CAUSAL_LM"))
    prompts = encode_prompts(tok, [p.messages for p in load_prompts(DataSource("bundled:prompts"))[:batch]])
    rng = random.Random(0)
    responses = [[rng.randrange(100, 20000) for _ in range(rng.randint(max(1, new_tokens // 4), new_tokens))] for _ in prompts]
    ids, mask, resp = build_sequences(prompts, responses, tok.pad_token_id)
    R = resp.shape[1]

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    def update(keep: bool) -> None:
        model.train()
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                    logits_to_keep=R + 1 if keep else 0, use_cache=False)
        lp = logprobs_from_logits(out.logits[:, -R - 1:-1].float(), ids[:, -R:])
        (-(lp * resp).sum() / resp.sum()).backward()
        model.zero_grad(set_to_none=True)

    micro = max(1, batch // 2)
    frame = Rollout(ids, mask, resp, *(torch.zeros(len(ids), R) for _ in range(3)), torch.zeros(len(ids)))

    def no_grad(trimmed: bool) -> None:
        model.eval()
        with torch.no_grad():
            if trimmed:  # what make_experience does
                batches = [(mb.input_ids, mb.attention_mask, mb.response_mask.shape[1]) for _, mb in frame.by_length(micro)]
            else:
                batches = [(ids[s:s + micro], mask[s:s + micro], R) for s in range(0, len(ids), micro)]
            for i, m, w in batches:
                model(input_ids=i, attention_mask=m, position_ids=position_ids(m), logits_to_keep=w + 1, use_cache=False)

    result = {"batch": batch, "width": ids.shape[1], "response_width": R, "micro_batch": micro,
              "real_tokens": int(mask.sum()), "padded_tokens": int(mask.numel())}
    result["update_all_logits_s"] = best(lambda: update(False))
    result["update_response_logits_s"] = best(lambda: update(True))
    result["no_grad_full_width_s"] = best(lambda: no_grad(False))
    result["no_grad_sorted_trimmed_s"] = best(lambda: no_grad(True))
    result["update_ratio"] = result["update_response_logits_s"] / result["update_all_logits_s"]
    result["no_grad_ratio"] = result["no_grad_sorted_trimmed_s"] / result["no_grad_full_width_s"]
    return result


def memory(batch: int, new_tokens: int, seq_len: int, steps: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "mem.json"
        subprocess.run([sys.executable, "-m", "benchmarks.ppo_memory", f"--model={MODEL}", f"--batch={batch}",
                        f"--seq-len={seq_len}", f"--new-tokens={new_tokens}", f"--steps={steps}", f"--out={out}"],
                       cwd=REPO, check=True, capture_output=True, text=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=192, help="SFT-LoRA sequence length for the memory comparison")
    p.add_argument("--skip-memory", action="store_true")
    a = p.parse_args(argv)
    it = ppo_iterations(a.iterations, a.batch, a.new_tokens)
    med = it["median"]
    total = med["time/iteration"]
    print(table([[k.split("/")[1], med[k], med[k] / total] for k in PHASES] + [["iteration", total, 1.0]],
                ["phase", "seconds", "share"]))
    gen = generation(a.batch, a.new_tokens)
    print(table([["ours (foundation.generation.generate)", gen["ours_tokens_per_s"]],
                 ["plain model.generate", gen["plain_tokens_per_s"]]],
                ["rollout generation", "tokens/s"]))
    costs = pass_costs(a.batch, a.new_tokens)
    print(table([["update fwd+bwd: all logits -> response logits", costs["update_all_logits_s"],
                  costs["update_response_logits_s"], costs["update_ratio"]],
                 ["no-grad pass: full width -> sorted, trimmed", costs["no_grad_full_width_s"], costs["no_grad_sorted_trimmed_s"],
                  costs["no_grad_ratio"]]], ["PPO pass", "before s", "after s", "ratio"]))
    mem = None if a.skip_memory else memory(a.batch, a.new_tokens, a.seq_len)
    if mem:
        print(table([["SFT-LoRA", mem["sft_lora"]["peak_rss_gib"]], ["PPO", mem["ppo"]["peak_rss_gib"]], ["ratio", mem["ratio"]]],
                    ["peak RSS", "GiB"]))
    return {"args": vars(a), "iteration": it, "generation": gen, "pass_costs": costs, "memory": mem}


if __name__ == "__main__":
    main()
