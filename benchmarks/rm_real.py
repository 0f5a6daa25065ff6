"""A helpfulness reward model on real preferences: HH-RLHF helpful-base, trained and tested on disjoint prompts.

    flock /tmp/align-heavy.lock .venv/bin/python -m benchmarks rm_real [--data FILE] [--val-fraction 0.15] [--eval-every 50]

The data is Anthropic's HH-RLHF helpful-base test split (``../shared/data/hh-rlhf/helpful-base/test.jsonl.gz``,
2,354 pairs, a few degenerate ones skipped), or any file or Hugging Face layout ``--data`` names. It is split by a
stable hash of the prompt (``data.mixing.split``, the RM stage's own split): about 2,000 pairs train the
helpfulness RM for one epoch (``align rm --config configs/rm_helpful.yaml``, SmolLM2-135M + LoRA, Llama 2's loss;
HH has no strength ratings, so the margin is 0), the rest is held out. Every ``--eval-every`` steps the RM is scored
on the held-out pairs (the learning curve: accuracy against pairs seen). Beside it, the length baseline: the
longer response wins (HH's chosen answers are often the longer ones).

Writes ``benchmarks/results/rm_real.json`` and ``benchmarks/results/rm_real.png`` (the curve), and prints the
table the README shows. Target (issue 13): held-out accuracy >= 60% (Llama 2's 70B helpfulness RM: 72.0 on
Anthropic Helpful; chance: 50).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"


def length_baseline(pairs: list) -> float:
    """Share of pairs whose chosen response is longer (in characters); ties count half."""
    wins = [1.0 if len(c.chosen_response) > len(c.rejected_response) else 0.5
            if len(c.chosen_response) == len(c.rejected_response) else 0.0
            for c in pairs]
    return sum(wins) / len(wins)


def by_length(chosen: list[float], rejected: list[float], pairs: list) -> dict:
    """The RM's accuracy where the chosen response is the longer one and where it is the shorter one (characters;
    equal lengths left out): an RM that only learned "longer is better" scores ~100% / ~0% here."""
    out = {}
    for name, keep in (("chosen_longer", lambda c: len(c.chosen_response) > len(c.rejected_response)),
                       ("chosen_shorter", lambda c: len(c.chosen_response) < len(c.rejected_response))):
        idx = [i for i, c in enumerate(pairs) if keep(c)]
        right = sum(chosen[i] > rejected[i] for i in idx)
        out[name] = {"n": len(idx), "accuracy": right / len(idx) if idx else None,
                     "length_baseline": 1.0 if name == "chosen_longer" else 0.0}
    return out


def curve(metrics_path: Path, pairs_per_step: int) -> list[dict]:
    """(step, pairs seen, held-out accuracy, loss) from the RM stage's metrics.jsonl evaluation rows."""
    out = []
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        acc = row.get("eval_accuracy", row.get("eval/accuracy"))
        if acc is not None:
            step = int(row.get("step", row.get("global_step", 0)))
            out.append({"step": step, "pairs_seen": step * pairs_per_step, "accuracy": float(acc), "loss": row.get("eval_loss")})
    return out


def plot(points: list[dict], final: float, baseline: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    # measured points only (the untrained RM is not evaluated; chance is drawn as a line)
    ax.plot([p["pairs_seen"] for p in points], [100 * p["accuracy"] for p in points], "o-", label="helpfulness RM (held out)")
    ax.axhline(100 * baseline, ls="--", color="tab:orange", label=f"length baseline {100 * baseline:.1f}%")
    ax.axhline(50, ls=":", color="grey", label="chance")
    ax.axhline(60, ls="-.", color="tab:green", lw=1, label="target 60%")
    ax.set_xlabel("training pairs seen")
    ax.set_xlim(0, None)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(40, 80)
    ax.set_title(f"{title}\nfinal {100 * final:.1f}%", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import RESULTS, table
    from data.loaders import DataSource, load_comparisons
    from data.mixing import split

    p = argparse.ArgumentParser(prog="python -m benchmarks rm_real", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="HH-RLHF-format preference data (file or Hugging Face layout)")
    p.add_argument("--val-fraction", type=float, default=0.15, help="held-out share, by a hash of the prompt")
    p.add_argument("--batch", type=int, default=8, help="pairs per optimiser step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-length", type=int, default=320, help="tokens of prompt + response (longer ones lose their start)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations (the learning curve)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--out", default=str(REPO / "runs" / "bench-rm-real"), help="the RM stage's output folder (replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true",
                   help="score the RM already trained in --out (same settings) instead of training again")
    a = p.parse_args(argv)
    if not Path(a.data).exists():
        return {"skipped": f"{a.data} not found (HH-RLHF helpful-base; ../shared/data or a local copy)"}
    src = DataSource(path=a.data, category="helpfulness")
    pairs = load_comparisons(src)
    train, held, _ = split(pairs, val_fraction=a.val_fraction, seed=a.seed)
    print(f"{len(pairs)} pairs: {len(train)} train, {len(held)} held out (disjoint prompts)", flush=True)
    out = Path(a.out)
    reuse = a.reuse and (out / "summary.json").is_file()
    if a.reuse and not reuse:
        print(f"--reuse: {out} holds no finished RM; training it", flush=True)
    if out.exists() and not reuse:
        import shutil

        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "alignment.cli", "rm", "--config",
           str(REPO / "configs" / "rm_helpful.yaml"), f"run.output_dir={out}",
           f"data.sources=[{{path: '{a.data}', category: helpfulness}}]",
           f"data.val_fraction={a.val_fraction}", f"run.seed={a.seed}",
           "margin=none", "train.num_epochs=1", f"train.batch_size={a.batch}", "train.grad_accum=1", f"train.lr={a.lr}",
           f"train.max_length={a.max_length}", f"train.eval_steps={a.eval_every}", f"train.save_steps={a.eval_every}",
           "train.logging_steps=10",
           f"adapter.r={a.lora_r}", f"adapter.alpha={2 * a.lora_r}", "eval_batch_size=16", "run.wandb=disabled"]
    t0 = time.time()
    if not reuse:
        subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"})
    seconds = time.time() - t0
    summary = json.loads((out / "summary.json").read_text())
    if reuse:  # the training run's wall time: from its earlier result with the same settings, else the RM stage's own
        seconds = float(summary.get("train_seconds") or 0.0)
        prev = RESULTS / "rm_real.json"
        mine = {k: v for k, v in vars(a).items() if k not in ("out", "reuse")}
        same = prev.is_file() and json.loads(prev.read_text()).get("settings") == mine
        if same:
            seconds = float(json.loads(prev.read_text())["seconds"])
    from reward import load_scorer
    from reward.evaluate import score_pairs

    chosen, rejected = score_pairs(load_scorer(str(out / "model")), held)
    split_by_length = by_length(chosen.tolist(), rejected.tolist(), held)
    points = curve(out / "metrics.jsonl", a.batch)
    final = summary["held_out_accuracy"]
    baseline = length_baseline(held)
    RESULTS.mkdir(parents=True, exist_ok=True)
    title = f"Helpfulness RM on HH-RLHF helpful-base ({len(train)} train / {len(held)} held-out pairs, one epoch)"
    plot(points, final, baseline, RESULTS / "rm_real.png", title)
    result = {"data": a.data, "pairs": len(pairs), "train_pairs": len(train), "held_out_pairs": summary["held_out_pairs"],
              "held_out_accuracy": final, "length_baseline": baseline, "target": 0.60, "target_met": final >= 0.60,
              "by_length": split_by_length, "curve": points, "train_seconds": summary.get("train_seconds"),
              "seconds": round(seconds, 1), "reused": reuse,
              "settings": {k: v for k, v in vars(a).items() if k not in ("out", "reuse")}, "model": "smollm2-135m + LoRA",
              "llama2_reference": "Llama 2 helpfulness RM (70B): 72.0 on Anthropic Helpful (Table 7)"}
    print(table([["helpfulness RM, held out", f"{100 * final:.1f}%", f"n={summary['held_out_pairs']}"],
                 ["length baseline (longer wins)", f"{100 * baseline:.1f}%", f"n={len(held)}"],
                 *[[f"RM where the chosen response is {k.split('_')[1]}", f"{100 * v['accuracy']:.1f}%",
                    f"n={v['n']}; length baseline {100 * v['length_baseline']:.0f}%"]
                   for k, v in split_by_length.items() if v["accuracy"] is not None],
                 *[[f"after {pt['pairs_seen']} pairs", f"{100 * pt['accuracy']:.1f}%", f"step {pt['step']}"] for pt in points]],
                ["measurement", "accuracy", "note"]))
    print(f"target >= 60%: {'met' if result['target_met'] else 'NOT met'}; {seconds / 60:.1f} min")
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
