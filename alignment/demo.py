"""``align demo``: the main job on the embedded default model, unattended.

Runs RLHF-V1 (SFT -> helpfulness and safety reward models -> rejection sampling -> evaluation) and
RLHF-V2 (sample pairs from the V1 policy -> simulated annotation -> reward models on all
comparisons -> PPO -> evaluation) on SmolLM2-135M-Instruct with the bundled data, then writes the
report (``runs/<project>/report/report.md`` and ``report.html``). The ``quick`` profile
(``configs/round_quick.yaml``) takes about 20 minutes on 2 CPU cores; ``full``
(``configs/round.yaml``) runs three longer rounds.

Each demo is its own project (``runs/demo-<timestamp>``), so running it again never touches
earlier output; a killed demo continues with ``align round run --project <name>``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROFILES = {"quick": "round_quick.yaml", "full": "round.yaml"}


def changes(s: dict) -> list[str]:
    """One line per key metric: its value in each round (the demo's "what changed")."""
    keys = [("policy reward (held-out, combined RM)", ("policy_reward_after", "policy_eval_reward_best")),
            ("helpfulness RM accuracy (held-out)", ("rm_helpful_accuracy",)),
            ("safety RM accuracy (held-out)", ("rm_safety_accuracy",)),
            ("win rate vs previous policy", ("winrate_vs_previous",)),
            ("TruthfulQA MC2", ("truthfulqa_mc2",)),
            ("ToxiGen % toxic", ("toxigen_pct_toxic",))]
    lines = []
    for label, names in keys:
        vals = []
        for r in s["rounds"]:
            v = next((r["metrics"][k] for k in names if r["metrics"].get(k) is not None), None)
            vals.append(f"V{r['round']} " + ("-" if v is None else f"{v:.3f}"))
        lines.append(f"  {label:<40} {'   '.join(vals)}")
    return lines


def cli(name: str, argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="align demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--project", help="project name (default: demo-<timestamp>)")
    p.add_argument("--root", default="runs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="round config overrides (align round --help)")
    a = p.parse_args(argv)

    from alignment import rounds
    from alignment.config import load_config
    from alignment.runs import setup_logging

    setup_logging()
    project = a.project or time.strftime("demo-%Y%m%d-%H%M%S")
    cfg = load_config(rounds.RoundConfig, REPO_CONFIGS / PROFILES[a.profile],
                      [*a.overrides, f"project={project}", f"root={a.root}"], stage="round")
    # the stage configs named in the round config are the repository's, wherever the demo runs from
    for spec in (cfg.sft, cfg.rm_helpful, cfg.rm_safety, cfg.rs, cfg.ppo, cfg.dpo):
        if not Path(spec.config).is_absolute() and not Path(spec.config).exists():
            spec.config = str(REPO_CONFIGS.parent / spec.config)
    t0 = time.time()
    proj = rounds.Project.init(cfg)
    print(f"demo project {proj.dir}: {cfg.rounds} rounds ({', '.join(cfg.methods)}) on {PROFILES[a.profile]}")
    result = rounds.run(proj)
    s = rounds.status(proj)
    print()
    print(rounds.format_status(s))
    print("\nwhat changed between rounds:")
    print("\n".join(changes(s)))
    minutes = (time.time() - t0) / 60
    print(f"\ndemo {result} in {minutes:.1f} min; report: {proj.dir / 'report' / 'report.md'} (and report.html)")
    print(f"continue or inspect with: align round status --project {project}" + (f" --root {a.root}" if a.root != "runs" else ""))
    return 0
