"""Both reward models on the embedded SmolLM2 with the bundled comparisons, on CPU: time and accuracy.

    flock /tmp/align-heavy.lock .venv/bin/python benchmarks/rm_smollm2.py [--name bench] [--hh-sample 500] [key=value ...]

1. ``align rm --config configs/rm_helpful.yaml`` and ``configs/rm_safety.yaml`` with their defaults
   (plus any ``key=value`` overrides given here), each timed;
2. held-out accuracy overall, per strength rating and per safety bin (from each run's eval/);
3. ``align rm-eval`` of the helpfulness RM on a seeded random sample of Anthropic HH-RLHF
   helpful-base test pairs, and of the safety RM on harmless-base (``../shared/data/hh-rlhf``;
   skipped when absent), to set beside Llama 2's Table 7.

Writes ``runs/<name>/benchmark.json`` and prints a Markdown summary (the numbers in
benchmarks/rm_smollm2.md and the README come from it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf"
LLAMA2_TABLE7 = {"helpful-base": {"Llama 2 helpfulness RM": 72.0, "Llama 2 safety RM": 55.4, "Open Assistant RM": 67.7},
                 "harmless-base": {"Llama 2 helpfulness RM": 71.0, "Llama 2 safety RM": 74.7, "Open Assistant RM": 68.4}}


def align(*args: str) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "alignment.cli", *args], cwd=REPO, check=True)
    return round(time.time() - t0, 1)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="bench-rm", help="run name (outputs under runs/<name>/)")
    p.add_argument("--hh-sample", type=int, default=500, help="HH-RLHF test pairs to evaluate per file (seeded random sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of the HH-RLHF sample")
    p.add_argument("overrides", nargs="*", help="key=value overrides for both RM configs")
    a = p.parse_args()
    runs = REPO / "runs" / a.name
    result: dict = {"name": a.name, "overrides": a.overrides, "rms": {}, "hh_rlhf": {}}
    for objective, config, folder in (("helpfulness", "rm_helpful", "rm_helpful"), ("safety", "rm_safety", "rm_safety")):
        seconds = align("rm", "--config", f"configs/{config}.yaml", f"run.name={a.name}", *a.overrides)
        summary = json.loads((runs / folder / "summary.json").read_text())
        report = json.loads((runs / folder / "eval" / "rm_eval.json").read_text())
        result["rms"][objective] = {"wall_seconds": seconds, "train_seconds": summary["train_seconds"],
                                    "steps": summary["global_step"], "train_pairs": summary["data"]["train"], "held_out": report}
    for file, folder in (("helpful-base", "rm_helpful"), ("harmless-base", "rm_safety")):
        data = HH / file / "test.jsonl.gz"
        if not data.is_file():
            print(f"skipping HH-RLHF {file}: {data} is absent")
            continue
        out = runs / folder / f"hh-{file}-{a.hh_sample}"
        seconds = align("rm-eval", "--model", str(runs / folder), "--data", str(data), "--sample", str(a.hh_sample),
                        "--seed", str(a.seed), "--out", str(out))
        report = json.loads((out / "rm_eval.json").read_text())
        result["hh_rlhf"][file] = {"model": folder, "wall_seconds": seconds, "n": report["n"], "accuracy": report["accuracy"],
                                   "ci95": report["ci95"], "published": LLAMA2_TABLE7[file]}
    (runs / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n## Reward models on SmolLM2-135M, bundled comparisons ({a.name})\n")
    print("| RM | train pairs | steps | train time | held-out pairs | accuracy (95% CI) | significantly | better | "
          "slightly | negligibly |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for objective, r in result["rms"].items():
        h = r["held_out"]
        by = h["by_strength"]
        cells = [pct(by.get(s, {}).get("accuracy"))
                 for s in ("significantly_better", "better", "slightly_better", "negligibly_better")]
        print(f"| {objective} | {r['train_pairs']} | {r['steps']} | {r['train_seconds'] / 60:.1f} min | {h['n']} | "
              f"{pct(h['accuracy'])} ({pct(h['ci95'][0])}–{pct(h['ci95'][1])}) | " + " | ".join(cells) + " |")
    for objective, r in result["rms"].items():
        bins = ", ".join(f"{k.replace('_', ' ')} {pct(v['accuracy'])} (n={v['n']})"
                         for k, v in r["held_out"]["by_safety_bin"].items())
        print(f"\n{objective} RM per safety bin: {bins}; unsafe responses below 0: {pct(r['held_out']['unsafe_recall'])}")
    for file, r in result["hh_rlhf"].items():
        published = ", ".join(f"{k} {v}%" for k, v in r["published"].items())
        print(f"\nHH-RLHF {file} test, random sample of {r['n']} pairs: {r['model']} {pct(r['accuracy'])} "
              f"(95% CI {pct(r['ci95'][0])}–{pct(r['ci95'][1])}), {r['wall_seconds'] / 60:.1f} min; Llama 2 Table 7: {published}")
    print(f"\nwritten: {runs / 'benchmark.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
