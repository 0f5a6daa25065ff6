"""``align demo``: the main job on the embedded default model, unattended.

Runs RLHF-V1 (SFT -> pairs sampled from the SFT model -> gold-judge labels -> helpfulness and
safety reward models -> rejection sampling -> evaluation) and RLHF-V2 (pairs from the V1 policy ->
gold-judge labels -> reward models on all labels -> PPO -> evaluation) on SmolLM2-135M-Instruct with
the bundled data, then writes the report (``runs/<project>/report/report.md`` and ``report.html``).
Every round's policy is scored by the gold judge on held-out prompts no stage saw (win rates with
95% CIs against the SFT model and the previous round), on TruthfulQA and ToxiGen when
``../shared/data`` has them (else the bundled truthfulness probe, labelled as such). The ``quick``
profile (``configs/round_quick.yaml``) takes under 30 minutes on 2 CPU cores; ``full``
(``configs/round.yaml``) runs three longer rounds.

Each demo is its own project (``runs/demo-<timestamp>``), so running it again never touches
earlier output; a killed demo continues with ``align round run --project <name>``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROFILES = {"quick": "round_quick.yaml", "full": "round.yaml"}


def _ci(x: dict | None, pct: bool = True) -> str:
    if not x:
        return "-"
    if pct:
        text = f"{100 * x['win_rate']:.1f}% [{100 * x['ci_low']:.1f}, {100 * x['ci_high']:.1f}] n={x['n']}"
        if x.get("lc_win_rate") is not None:
            text += f", LC {100 * x['lc_win_rate']:.1f}%"
        return text
    return f"{x['mean']:.3f} [{x['ci_low']:.3f}, {x['ci_high']:.3f}] n={x['n']}"


def _returned(proj: Any, n: int) -> str:
    """What round n's policy step handed back: trained weights, or its starting policy (no change)."""
    m = proj.manifest(n)["steps"]
    returned = m.get("policy", {}).get("outputs", {}).get("metrics", {}).get("returned")
    promoted = m.get("promote", {}).get("outputs", {}).get("promoted")
    if returned == "start":
        return "its starting policy: no change"
    what = f"trained ({returned})" if returned else "trained"
    return what + ("" if promoted is None else ", promoted" if promoted else ", not promoted")


def changes(proj: Any, markdown: bool = False) -> list[str]:
    """One line per key number: the SFT model's and each round's (the demo's "what changed"); ``markdown``: the same
    table as a Markdown table (what the README shows, written beside the report as ``demo_table.md``)."""
    from alignment.evals.suite import BENCHMARKS

    evals = {n: proj.manifest(n)["steps"].get("eval", {}).get("outputs", {}) for n in proj.rounds()}
    if not evals:
        return []
    first = evals[min(evals)]
    cols = ["SFT"] + [f"V{n} ({proj.manifest(n).get('method')})" for n in evals]
    rows = [
        ("gold reward, test prompts [95% CI]", _ci((first.get("gold_reward") or {}).get("sft"), pct=False),
         [_ci((e.get("gold_reward") or {}).get("policy"), pct=False) for e in evals.values()]),
        ("gold-judge win rate vs SFT [95% CI], test", "", [_ci(e.get("winrate_gold_vs_sft")) for e in evals.values()]),
        ("gold-judge win rate vs previous", "", [_ci(e.get("winrate_gold_vs_previous")) for e in evals.values()]),
        ("RM-judged win rate vs previous (its own RMs)", "", [_ci(e.get("winrate_rm_vs_previous")) for e in evals.values()]),
        ("validation win rate vs previous (decides promotion)", "",
         [_ci((e.get("validation") or {}).get("winrate_vs_previous")) for e in evals.values()]),
        ("the policy step returned", "", [_returned(proj, n) for n in evals]),
    ]
    for bench in BENCHMARKS:  # one row each: its own label and cells (the round keeps <name> and, in round 1, <name>_sft)
        mod = bench.load()
        sft, per_round = first.get(f"{bench.name}_sft"), [e.get(bench.name) for e in evals.values()]
        rows.append((mod.demo_label([s for s in (sft, *per_round) if s]), mod.demo_cell(sft),
                     [mod.demo_cell(s) for s in per_round]))
    if markdown:
        return (["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
                + [f"| {label} | " + " | ".join(v or "" for v in [sft, *vals]) + " |" for label, sft, vals in rows])
    width = max(len(r[0]) for r in rows)
    colw = [max(len(c), *(len(r[1] if i == 0 else r[2][i - 1]) for r in rows)) for i, c in enumerate(cols)]
    lines = ["  " + " " * width + "  " + "  ".join(c.ljust(w) for c, w in zip(cols, colw))]
    for label, sft, vals in rows:
        lines.append("  " + label.ljust(width) + "  " + "  ".join(v.ljust(w) for v, w in zip([sft, *vals], colw)))
    return lines


def data_note(cfg: Any) -> str:
    """Which evaluation data the run uses (real data when ../shared/data is there, else the bundled probe)."""
    from alignment.evals.suite import BENCHMARKS

    parts = [b.load().describe_settings(s) if (s := getattr(cfg.eval, b.name)) is not None
             else f"{b.name} off" for b in BENCHMARKS]
    return (f"evaluation data: {'; '.join(parts)}; {cfg.eval.heldout} test prompts (reported numbers) and "
            f"{cfg.eval.validation} validation prompts (decisions), judged by {', '.join(cfg.eval.judges)}")


def cli(name: str, argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="align demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--project", help="project name (default: demo-<timestamp>)")
    p.add_argument("--root", default="runs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="round config overrides (align round --help)")
    a = p.parse_args(argv)

    from alignment import rounds
    from foundation.config import load_config
    from foundation.runs import setup_logging

    setup_logging()
    project = a.project or time.strftime("demo-%Y%m%d-%H%M%S")
    cfg = load_config(rounds.RoundConfig, REPO_CONFIGS / PROFILES[a.profile],
                      [*a.overrides, f"project={project}", f"root={a.root}"], stage="round")
    # the stage configs named in the round config are the repository's, wherever the demo runs from
    for spec in cfg.stage_specs():
        if not Path(spec.config).is_absolute() and not Path(spec.config).exists():
            spec.config = str(REPO_CONFIGS.parent / spec.config)
    t0 = time.time()
    proj = rounds.Project.init(cfg)
    print(f"demo project {proj.dir}: {cfg.rounds} rounds ({', '.join(cfg.methods)}) on {PROFILES[a.profile]}")
    print(data_note(cfg))
    result = rounds.run(proj)
    s = rounds.status(proj)
    print()
    print(rounds.format_status(s))
    print("\nwhat changed between rounds:")
    print("\n".join(changes(proj)))
    table = proj.dir / "report" / "demo_table.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text("\n".join(changes(proj, markdown=True)) + "\n")
    minutes = (time.time() - t0) / 60
    print(f"\ndemo {result} in {minutes:.1f} min; report: {proj.dir / 'report' / 'report.md'} (and report.html); "
          f"the table above as Markdown: {table}")
    print(f"continue or inspect with: align round status --project {project}" + (f" --root {a.root}" if a.root != "runs" else ""))
    return 0
