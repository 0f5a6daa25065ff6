"""Rejection sampling on a small model: best-of-K reward against the sampling temperature.

    flock /tmp/align-heavy.lock .venv/bin/python -m benchmarks.rs_temperature \
        [--model smollm2-135m] [--helpful runs/default/rm_helpful --safety runs/default/rm_safety] \
        [--prompts 24] [--k 8] [--temperatures 0.7 1.0 1.2] [--max-new-tokens 256]

Llama 2 (Figure 8) found T = 1.2-1.3 best for K of 10-100 on 70B models; a 135M model's samples
fall apart sooner as T grows. For each temperature this samples K responses for each of the same
held-out prompts (bundled:prompts, the RS stage's split), scores them with the combined reward and
reports: the mean reward of one sample, the expected reward of the best of k samples for
k = 1, 2, 4, ... K (``alignment.rs_pool.expected_best_of``), the share that end with EOS (only those
can be kept), the mean length and sampling throughput. Results: benchmarks/results/rs_temperature.json.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--helpful", default="runs/default/rm_helpful")
    p.add_argument("--safety", default="runs/default/rm_safety")
    p.add_argument("--function", default=None, help="a rule-based reward module:function instead of the reward models")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0, 1.2])
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    from foundation.generation import generate
    from foundation.models import load_causal_lm, load_tokenizer
    from alignment.rs import RewardConfig, RSPromptsConfig, build_scorer, load_prompts, score
    from alignment.rs_pool import expected_best_of
    from benchmarks.common import machine, save, table

    reward = (RewardConfig(helpful=None, safety=None, function=a.function) if a.function
              else RewardConfig(helpful=a.helpful, safety=a.safety))
    scorer = build_scorer(reward)
    _, held_out = load_prompts(RSPromptsConfig(), seed=42)  # the RS stage's held-out prompts (default seed)
    prompts = held_out[: a.prompts]
    model, tok = load_causal_lm(a.model), load_tokenizer(a.model)
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= a.k]
    rows, results = [], {"machine": machine(), "args": vars(a), "temperatures": {}}
    for t in a.temperatures:
        convs = [pr.messages for pr in prompts for _ in range(a.k)]
        t0 = time.time()
        gens = generate(model, tok, convs, max_new_tokens=a.max_new_tokens, temperature=t, batch_size=a.batch_size, seed=a.seed)
        seconds = time.time() - t0
        scores = score(scorer, convs, [g.text for g in gens], [pr.is_safety for pr in prompts for _ in range(a.k)])["reward"]
        per_prompt = [scores[i * a.k:(i + 1) * a.k] for i in range(len(prompts))]
        best = {k: sum(expected_best_of(r, k) for r in per_prompt) / len(per_prompt) for k in ks}
        tokens = sum(len(g.response_ids) for g in gens)
        res = {"mean_reward": sum(scores) / len(scores), "best_of": best, "finished": sum(g.finished for g in gens) / len(gens),
               "mean_tokens": tokens / len(gens), "tokens_per_s": tokens / seconds, "seconds": seconds}
        results["temperatures"][str(t)] = res
        rows.append([t, res["mean_reward"], *[best[k] for k in ks], res["finished"], res["mean_tokens"], res["tokens_per_s"]])
        print(f"T={t}: {json.dumps(res)}", flush=True)
    save("rs_temperature", results)
    if a.json:
        print(json.dumps(results))
    else:
        print(table(rows, ["T", "mean", *[f"best-of-{k}" for k in ks], "EOS share", "tokens", "tok/s"]))
    return results


if __name__ == "__main__":
    main()
