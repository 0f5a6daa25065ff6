"""Speed of TruthfulQA multiple-choice scoring: one pass per choice vs batched vs batched + primer KV cache.

    flock /tmp/align-heavy.lock .venv/bin/python benchmarks/truthfulqa_speed.py \
        --data ../shared/data/truthfulqa/mc_task.json --questions 25 [--model smollm2-135m] [--out bench.json]

Scores the (context, choice) pairs of the first ``--questions`` questions three ways and prints
seconds, pairs per second, the speed-up over the first way, and the largest score difference:

1. ``one-by-one``: one unpadded forward pass per pair (lm-eval's HFLM with ``batch_size=1``);
2. ``batched``: full sequences, right-padded batches of ``--batch-size``, longest first;
3. ``batched+cache``: as 2, but the 6-shot primer's key/value cache is computed once and only
   each pair's own suffix (question + answer, ~31 of ~199 tokens) runs through the model.

Duplicate pairs (mc1 choices repeat in mc2) are removed first, as ``align eval truthfulqa`` does.
Measured numbers are in README.md ("Evaluations"); they were taken on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/truthfulqa/mc_task.json")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--questions", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", help="write the numbers as JSON here")
    a = p.parse_args()

    import torch

    from alignment.evals.loglikelihood import score_continuations, score_one_by_one
    from alignment.evals.truthfulqa import QA_PRIMER, load_items, mc_context
    from alignment.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(a.model), load_causal_lm(a.model)
    items = load_items(a.data, limit=a.questions)
    pairs = list(dict.fromkeys((mc_context(it.question), " " + c) for it in items for c in [*it.mc1_targets, *it.mc2_targets]))
    print(f"{len(items)} questions, {len(pairs)} distinct (context, choice) pairs, torch threads {torch.get_num_threads()}")
    runs = {
        "one-by-one": lambda: score_one_by_one(model, tok, pairs),
        "batched": lambda: score_continuations(model, tok, pairs, batch_size=a.batch_size),
        "batched+cache": lambda: score_continuations(model, tok, pairs, batch_size=a.batch_size, shared_prefix=QA_PRIMER),
    }
    results, ref = {}, None
    for name, fn in runs.items():
        t0 = time.perf_counter()
        scores = fn()
        sec = time.perf_counter() - t0
        ref = ref or scores
        results[name] = {"seconds": round(sec, 2), "pairs_per_second": round(len(pairs) / sec, 2),
                         "max_abs_diff_vs_one_by_one": max(abs(x - y) for x, y in zip(scores, ref))}
    base = results["one-by-one"]["seconds"]
    for name, r in results.items():
        r["speedup"] = round(base / r["seconds"], 2)
        print(f"{name:>14}: {r['seconds']:8.1f} s  {r['pairs_per_second']:6.2f} pairs/s  x{r['speedup']:<5}  "
              f"max |diff| {r['max_abs_diff_vs_one_by_one']:.2e}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"model": a.model, "questions": len(items), "pairs": len(pairs), "batch_size": a.batch_size, **results}, fh, indent=2)


if __name__ == "__main__":
    main()
