"""The scale-and-speed benchmark suite on SmolLM2-135M (fp32, CPU unless a GPU is present).

    flock /tmp/align-heavy.lock .venv/bin/python -m benchmarks            # every part, one table
    flock /tmp/align-heavy.lock .venv/bin/python -m benchmarks overhead   # one part (extra flags go to it)
    .venv/bin/python -m benchmarks report                                 # the table from the saved results

Parts: overhead (our SFT/RM/DPO step vs a hand-written PyTorch loop), mfu (tokens/s vs measured
matmul FLOP/s), ppo (PPO iteration split, rollout generation vs model.generate, memory vs SFT-LoRA),
generate (the generation engine vs model.generate and the compute bound, batch 8-128), memory (per-GPU
memory of PPO at 7B/13B/70B under ZeRO-2/3 and offload, computed from the model configs),
defaults (fp32 vs bf16 autocast, activation checkpointing), precision (bf16 vs fp32 on this CPU: generation,
scoring fidelity, training steps), scaling (SFT on 1 vs 2 processes), gpu
(SFT and PPO in bf16 on a CUDA GPU: throughput, memory, MFU; skipped without one). Two long parts run
only when named: alignment (three RLHF rounds judged by the gold judge, ~90 min), rm_real (a
helpfulness RM on HH-RLHF, ~1 h) and rlhf_core (Gao et al.'s proxy/gold protocol: best-of-n and PPO
curves, hours) and truthfulqa_tax (a round's policy step trained again with other settings, each read on
TruthfulQA questions no seed reports and on validation prompts, ~25 min per setting) and length_control (each
round's policy against the SFT model made as short by an EOS bias chosen on validation prompts, ~10 min a round)
and rs_room (a rejection-sampling round again with K answers of up to T tokens, ranked and at random, ~30 min).
Each part writes benchmarks/results/<part>.json with the machine, library versions, the command and
the numbers; the summary table at the end is what README's "Scale and speed" section shows.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any


def _memory(argv: list[str]) -> dict:
    from benchmarks import memory

    return memory.main(argv)


def _overhead(argv: list[str]) -> dict:
    from benchmarks import overhead

    return overhead.main(argv)


def _mfu(argv: list[str]) -> dict:
    import argparse

    from benchmarks.hardware import mfu

    p = argparse.ArgumentParser(prog="python -m benchmarks mfu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    a = p.parse_args(argv)
    out = mfu(a.steps, a.batch, a.seq_len)
    from benchmarks.common import table

    print(table([[r["loop"], r["tokens_per_s"], r["achieved_gflops"], r["mfu"]] for r in out["rows"]],
                ["full fine-tune (SFT)", "tokens/s", "GFLOP/s", "MFU"]))
    print(f"fp32 matmul: {out['matmul_fp32_gflops'][0]:.0f} / {out['matmul_fp32_gflops'][1]:.0f} GFLOP/s (before / after)")
    return {"args": vars(a), **out}


def _ppo(argv: list[str]) -> dict:
    from benchmarks import ppo_speed

    return ppo_speed.main(argv)


def _generate(argv: list[str]) -> dict:
    from benchmarks import generate

    return generate.main(argv)


def _defaults(argv: list[str]) -> dict:
    from benchmarks import defaults

    return defaults.main(argv)


def _precision(argv: list[str]) -> dict:
    from benchmarks import precision

    return precision.main(argv)


def _scaling(argv: list[str]) -> dict:
    from benchmarks import scaling

    return scaling.main(argv)


def _gpu(argv: list[str]) -> dict:
    from benchmarks import gpu

    return gpu.main(argv)


def _alignment(argv: list[str]) -> dict:
    from benchmarks import alignment

    return alignment.main(argv)


def _rlhf_core(argv: list[str]) -> dict:
    from benchmarks import rlhf_core

    return rlhf_core.main(argv)


def _length_control(argv: list[str]) -> dict:
    from benchmarks import length_control

    return length_control.main(argv)


def _rs_room(argv: list[str]) -> dict:
    from benchmarks import rs_room

    return rs_room.main(argv)


def _truthfulqa_tax(argv: list[str]) -> dict:
    from benchmarks import truthfulqa_tax

    return truthfulqa_tax.main(argv)


def _rm_real(argv: list[str]) -> dict:
    from benchmarks import rm_real

    return rm_real.main(argv)


PARTS: dict[str, Callable[[list[str]], dict]] = {"overhead": _overhead, "mfu": _mfu, "ppo": _ppo, "generate": _generate,
                                                 "defaults": _defaults, "precision": _precision, "scaling": _scaling,
                                                   "gpu": _gpu, "alignment": _alignment, "rm_real": _rm_real,
                                                   "rlhf_core": _rlhf_core, "memory": _memory,
                                                   "truthfulqa_tax": _truthfulqa_tax, "length_control": _length_control,
                                                   "rs_room": _rs_room}
# an hour or more each: run by name only, never in the all-parts run
LONG = ("alignment", "rm_real", "rlhf_core", "truthfulqa_tax", "length_control", "rs_room")


def summary_rows(name: str, r: dict) -> list[list[Any]]:
    """The suite's one table: (part, measurement, value, goal/note)."""
    if name == "overhead":
        return [["overhead", f"{x['stage']} {x['adapter']} step, ours / hand loop", x["ratio"], "<= 1.10"] for x in r["rows"]]
    if name == "mfu":
        return [["mfu", f"SFT full, {x['loop']}: tokens/s, MFU",
                 f"{x['tokens_per_s']:.0f}, {100 * x['mfu']:.0f}%", "vs fp32 matmul"]
                for x in r["rows"]]
    if name == "ppo":
        med = r["iteration"]["median"]
        rows = [["ppo", f"{k.split('/')[1]} share of iteration", med[k] / med["time/iteration"], ""]
                for k in ("time/generate", "time/score", "time/ref_and_values", "time/update")]
        rows.append(["ppo", "rollout generation tokens/s, ours / model.generate",
                     r["generation"]["ours_tokens_per_s"] / r["generation"]["plain_tokens_per_s"], ">= 1"])
        if r.get("pass_costs"):
            c = r["pass_costs"]
            rows.append(["ppo", "update fwd+bwd, response logits / all logits", c["update_ratio"], "< 1"])
            rows.append(["ppo", "no-grad pass, sorted + trimmed / full width", c["no_grad_ratio"], "< 1"])
        if r.get("memory"):
            rows.append(["ppo", "peak RSS, PPO / SFT-LoRA", r["memory"]["ratio"], "<= 2"])
        return rows
    if name == "generate":
        return [["generate", f"batch {r['batch_size']}: engine tokens/s (share of bound), x model.generate",
                 f"{r['engine']['tokens_per_s']:.0f} ({100 * r['engine']['share_of_bound']:.0f}%), "
                 + (f"{r['speedup']:.2f}x" if "speedup" in r else "no baseline"), ">= 40% at batch >= 32"] for r in r["rows"]]
    if name == "defaults":
        return [["defaults", f"SFT-LoRA step, {x['setting']} / default", x["vs_default"], ""] for x in r["rows"][1:]]
    if name == "precision":
        g, s = r["generation"]["best_tokens_per_s"], r["scoring"]["truthfulqa"]
        rows = [["precision", "generation tokens/s, bf16 / fp32", g["bfloat16"] / g["float32"], "speed"],
                ["precision", f"TruthfulQA MC2, bf16 - fp32 (points, n={s['n']})", s["mc2_diff_points"], "fidelity"]]
        return rows + [["precision", f"SFT-LoRA step, {x['setting']} / fp32", x.get("vs_fp32", x.get("error")), ""]
                       for x in r.get("training", [])[1:]]
    if name == "memory":
        return [["memory", f"PPO {x['method']} {x['model']}, {x['layout']}: GiB per GPU of {r['args']['gpus']}",
                 x["total"], f"<= {r['args']['gpu_gib']:.0f} (estimate)"] for x in r["rows"] if x["layout"] == "zero3"]
    if name == "scaling":
        return [["scaling", "SFT tokens/s, 2 processes / 1", r["speedup"], "2 cores"]]
    if name == "alignment" and "across_seeds" in r:
        t = r["across_seeds"]["mean_winrate_vs_sft"]
        rows = [["alignment", f"final round vs SFT over {len(r['seeds'])} seeds"
                 + (f" ({len(r['seeds_missing'])} not run yet)" if r.get("seeds_missing") else "") + ", mean +- sd",
                 "-" if t["mean"] is None else f"{100 * t['mean']:.1f}%" + (" (one seed: no sd)" if t["sd"] is None
                                                                             else f" +- {100 * t['sd']:.1f}"),
                 ">= 65%, each CI > 50%"]]
        def verdict(key: str, c: dict) -> str:
            if c.get("partial"):
                return c["partial"]
            if key == "final_not_promoted":  # a list of seeds, not a target
                return "seeds " + ", ".join(str(i) for i, x in enumerate(c["seeds"]) if x) if any(c["seeds"]) else "none"
            return "reported" if c["met"] is None else "met" if c["met"] else "not met"

        return rows + [["alignment", key, verdict(key, c), c["target"]]
                       for key, c in r["across_seeds"].items() if key != "mean_winrate_vs_sft"]
    if name == "alignment":
        t = r["targets"]
        w = t["winrate_vs_sft"]
        return [["alignment", "final round vs SFT, gold-judge win rate [95% CI]",
                 f"{100 * w['value']:.1f}% [{100 * w['ci'][0]:.1f}, {100 * w['ci'][1]:.1f}] n={w['n']}", ">= 65%, CI > 50%"],
                ["alignment", "ToxiGen % toxic, final / SFT",
                 f"{t['toxigen_not_worse']['value']:.1f} / {t['toxigen_not_worse']['sft']:.1f}", "not worse"],
                ["alignment", "TruthfulQA MC2, final / SFT",
                 f"{100 * t['truthfulqa_mc2']['value']:.1f} / {100 * t['truthfulqa_mc2']['sft']:.1f}", "within 2 points"],
                ["alignment", "minutes (3 rounds)", t["time"]["minutes"], "<= 90"]]
    if name == "rm_real":
        if r.get("skipped"):
            return [["rm_real", "skipped", r["skipped"], ""]]
        return [["rm_real", f"helpfulness RM on HH-RLHF, held out (n={r['held_out_pairs']})", r["held_out_accuracy"], ">= 0.60"],
                ["rm_real", "length baseline", r["length_baseline"], ""]]
    if name == "rlhf_core":
        if r.get("skipped"):
            return [["rlhf_core", "skipped", r["skipped"], ""]]
        rows = []
        for key, t in r.get("targets", {}).items():
            if "winrate" in t:
                value = (f"{100 * t['winrate']:.1f}% [{100 * t['ci'][0]:.1f}, {100 * t['ci'][1]:.1f}], "
                         f"LC {100 * t['lc_winrate']:.1f}% n={t['n']}")
            elif key == "agreement":
                value = f"{100 * t['value']:.1f}% [{100 * t['ci95'][0]:.1f}, {100 * t['ci95'][1]:.1f}] n={t['n']}"
            else:
                value = f"{t['value']:.2f}" if t.get("value") is not None else "-"
            rows.append(["rlhf_core", key, value, t["target"] + (" (met)" if t["met"] else " (NOT met)")])
        return rows
    if name == "gpu":
        if r.get("skipped"):
            return [["gpu", "skipped", r["skipped"], ""]]
        return [["gpu", f"SFT {x['sft']} bf16: tokens/s, MFU, peak GiB",
                 f"{x['tokens_per_s']:.0f}, {100 * x['mfu']:.0f}%, {x['peak_cuda_gib']:.1f}", r["gpu"]] for x in r["sft"]]
    return []


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import machine, save, table

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:  # the table from the last results of every part, without measuring
        import json

        from benchmarks.common import RESULTS

        rows = []
        for name in PARTS:
            path = RESULTS / f"{name}.json"
            if path.is_file():
                rows += summary_rows(name, json.loads(path.read_text()))
        print(table(rows, ["part", "measurement", "value", "goal"]))
        return 0
    names = [argv.pop(0)] if argv and argv[0] in PARTS else [n for n in PARTS if n not in LONG]
    if argv and len(names) > 1:
        print(f"flags ({' '.join(argv)}) need one part: python -m benchmarks <{'|'.join(PARTS)}> [flags]", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        print(f"\n== {name}", flush=True)
        t = time.time()
        result = PARTS[name](argv)
        result.pop("cfg", None)
        for row in result.get("rows", []):
            row.pop("batch", None)
            row.pop("cfg", None)
        for part in ("sft_full",):
            if part in result:
                result[part] = {k: v for k, v in result[part].items() if k not in ("batch", "cfg")}
        data = {"part": name, "command": "python -m benchmarks " + " ".join([name, *argv]), "machine": machine(),
                "seconds": round(time.time() - t, 1), **result}
        if result.get("skipped"):  # e.g. gpu without a GPU: keep what an earlier run on a GPU measured
            print(f"{name}: skipped ({result['skipped']}); nothing written")
        else:
            print(f"wrote {save(name, data)}")
        rows += summary_rows(name, data)
    print()
    print(table(rows, ["part", "measurement", "value", "goal"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
