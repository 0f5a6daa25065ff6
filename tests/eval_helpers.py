"""Helpers for the evaluation tests: the CLI in a subprocess, a rule-based reward, synthetic results (values chosen by hand)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from alignment.evals.results import header, write_json

REPO = Path(__file__).resolve().parents[1]

def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `align ...` in a subprocess from the repository root, as users do."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run([sys.executable, "-m", "alignment.cli", *args], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def length_reward(prompt, response) -> float:
    """A rule-based reward for win-rate tests: longer answers win."""
    return float(len(response))


def winrate_result(round_no: int, help_wr: float, safe_wr: float, seed: int) -> dict:
    rng = random.Random(seed)
    policy = [rng.gauss(0.4 * round_no, 1.0) for _ in range(40)]
    baseline = [rng.gauss(0.0, 1.0) for _ in range(40)]

    def block(wr: float, n: int) -> dict:
        return {"n": n, "win_rate": wr, "wins": wr - 0.05, "ties": 0.1, "losses": 1 - wr - 0.05,
                "ci_low": wr - 0.12, "ci_high": wr + 0.11}

    return header("winrate", f"runs/demo/round-{round_no}/policy", baseline="runs/demo/round-0/sft", prompts="held_out.jsonl",
                  judge={"kind": "rm", "scorer": "CombinedScorer", "rm": f"runs/demo/round-{round_no}/rm_helpful",
                         "safety_rm": f"runs/demo/round-{round_no}/rm_safety", "tie_margin": 0.0}, n=40,
                  metrics=block((help_wr + safe_wr) / 2, 40),
                  by_category={"helpfulness": block(help_wr, 20), "safety": block(safe_wr, 20)},
                  by_axis={"helpfulness": block(help_wr, 40), "harmlessness": block(safe_wr, 40)},
                  scores={"policy": policy, "baseline": baseline}, timing={"seconds": 1.0})


def truthfulqa_result(round_no: int, mc1: float, mc2: float) -> dict:
    return header("truthfulqa", f"runs/demo/round-{round_no}/policy", data="mc_task.json", variant="mc", n=817,
                  metrics={"mc1": mc1, "mc2": mc2, "mc2_labels": mc2, "mc1_stderr": 0.016, "mc2_stderr": 0.015},
                  by_category={"Misconceptions": {"n": 100, "mc1": mc1 + 0.02, "mc2": mc2 + 0.01},
                               "Law": {"n": 64, "mc1": mc1 - 0.03, "mc2": mc2 - 0.02}}, timing={"seconds": 10.0})


def toxigen_result(round_no: int, pct: float) -> dict:
    return header("toxigen", f"runs/demo/round-{round_no}/policy", prompts="toxigen/prompts", n=310,
                  classifier={"name": "MiniLM-logistic toxicity proxy (not the ToxiGen RoBERTa classifier)",
                              "kind": "minilm-logistic",
                              "heldout": {"protocol": "leave-one-group-out", "accuracy": 0.844, "auc": 0.919, "n": 668},
                              "summary": "MiniLM-logistic toxicity proxy — leave-one-group-out accuracy 84.4%, "
                                         "AUC 0.919 (n=668)"},
                  metrics={"pct_toxic": pct, "mean_p_toxic": pct / 100, "classifier_heldout_accuracy": 0.844,
                           "classifier_heldout_auc": 0.919},
                  by_group={"women": {"n": 20, "pct_toxic": pct + 5, "mean_p_toxic": 0.2},
                            "asian": {"n": 20, "pct_toxic": pct - 2, "mean_p_toxic": 0.1}},
                  by_type={"hate": {"n": 155, "pct_toxic": pct + 4, "mean_p_toxic": 0.2}}, timing={"seconds": 100.0})


def rm_eval_result(acc: float) -> dict:
    """rm_eval.json as reward/evaluate.py writes it (no common header)."""
    return {"n": 300, "accuracy": acc, "mean_gap": 0.8, "model": "runs/demo/round-1/rm_helpful", "data": "test.jsonl",
            "by_strength": {"significantly_better": {"n": 60, "accuracy": acc + 0.15, "mean_gap": 1.5},
                            "better": {"n": 80, "accuracy": acc + 0.05, "mean_gap": 1.0},
                            "slightly_better": {"n": 80, "accuracy": acc - 0.05, "mean_gap": 0.5},
                            "negligibly_better": {"n": 80, "accuracy": 0.52, "mean_gap": 0.1}},
            "by_safety_bin": {}, "calibration": []}


def make_two_round_run(root: Path) -> Path:
    """runs/demo with round-1 and round-2, each with TruthfulQA, ToxiGen, win-rate and RM results."""
    import json

    run = root / "demo"
    values = {1: (0.24, 0.39, 12.0, 0.55, 0.48, 0.68), 2: (0.27, 0.43, 6.5, 0.66, 0.61, 0.71)}
    for n, (mc1, mc2, tox, hw, sw, acc) in values.items():
        ev = run / f"round-{n}" / "eval"
        write_json(ev / "truthfulqa.json", truthfulqa_result(n, mc1, mc2))
        write_json(ev / "toxigen.json", toxigen_result(n, tox))
        write_json(ev / "winrate.json", winrate_result(n, hw, sw, seed=n))
        rm = run / f"round-{n}" / "rm_helpful"
        rm.mkdir(parents=True)
        (rm / "rm_eval.json").write_text(json.dumps(rm_eval_result(acc)))
    return run
