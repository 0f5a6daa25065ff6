"""Speed of TruthfulQA multiple-choice scoring: one pass per choice vs batched vs batched + primer KV cache.

    flock /tmp/align-heavy.lock .venv/bin/python benchmarks/truthfulqa_speed.py \
        --data ../shared/data/truthfulqa/mc_task.json --questions 12 --repeats 2 [--model smollm2-135m] [--out bench.json]

Scores the (context, choice) pairs of the first ``--questions`` questions in several ways and prints
seconds (best of ``--repeats`` runs, taken in turn so that load from other jobs hits all of them),
pairs per second, the speed-up over the first way, and the largest score difference from it:

1. ``one-by-one``: one unpadded forward pass per pair (lm-eval's HFLM with ``batch_size=1``);
2. ``lm-eval``: lm-evaluation-harness's own ``HFLM.loglikelihood`` with ``batch_size=16``, when
   ``lm_eval`` is importable (it is not a dependency of this project; skipped otherwise);
3. ``batched``: our full sequences, right-padded batches of ``--batch-size``, longest first;
4. ``batched+cache``: as 3, but the 6-shot primer's key/value cache is computed once and only each
   pair's own suffix (question + answer, ~31 of ~199 tokens) runs through the model.

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
    p.add_argument("--repeats", type=int, default=1, help="run every way this many times (in turn) and keep the best time")
    p.add_argument("--out", help="write the numbers as JSON here")
    a = p.parse_args()

    import os

    import torch

    from alignment.evals.loglikelihood import score_continuations, score_one_by_one
    from alignment.evals.truthfulqa import QA_PRIMER, mc_context
    from alignment.evals.truthfulqa_data import load_items
    from foundation.models import load_causal_lm, load_tokenizer, resolve

    tok, model = load_tokenizer(a.model), load_causal_lm(a.model)
    items = load_items(a.data, limit=a.questions)
    pairs = list(dict.fromkeys((mc_context(it.question), " " + c) for it in items for c in [*it.mc1_targets, *it.mc2_targets]))
    print(f"{len(items)} questions, {len(pairs)} distinct (context, choice) pairs, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    runs = {"one-by-one": lambda: score_one_by_one(model, tok, pairs)}
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        hflm = HFLM(pretrained=resolve(a.model).path, device="cpu", batch_size=a.batch_size, dtype="float32")
        requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
        runs["lm-eval"] = lambda: [ll for ll, _ in hflm.loglikelihood(requests, disable_tqdm=True)]
    except ImportError:
        print("lm_eval is not importable: skipping its HFLM")
    runs["batched"] = lambda: score_continuations(model, tok, pairs, batch_size=a.batch_size)
    runs["batched+cache"] = lambda: score_continuations(model, tok, pairs, batch_size=a.batch_size, shared_prefix=QA_PRIMER)
    best: dict[str, float] = {}
    scores: dict[str, list[float]] = {}
    for _ in range(a.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            scores[name] = fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    ref = scores["one-by-one"]
    results = {}
    for name in runs:
        results[name] = {"seconds": round(best[name], 2), "pairs_per_second": round(len(pairs) / best[name], 2),
                         "speedup": round(best["one-by-one"] / best[name], 2),
                         "max_abs_diff_vs_one_by_one": max(abs(x - y) for x, y in zip(scores[name], ref))}
        r = results[name]
        print(f"{name:>14}: {r['seconds']:8.1f} s  {r['pairs_per_second']:6.2f} pairs/s  x{r['speedup']:<6}  "
              f"max |diff| {r['max_abs_diff_vs_one_by_one']:.2e}")
    print(f"load average {os.getloadavg()[0]:.1f}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"model": a.model, "questions": len(items), "pairs": len(pairs), "batch_size": a.batch_size,
                       "repeats": a.repeats, **results}, fh, indent=2)


if __name__ == "__main__":
    main()
