"""``align round``: init, next, run, status, promote."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from foundation.config import ConfigError, load_config
from data.heldout import HeldOutLeak
from alignment.rounds.config import WAITING, RoundConfig
from alignment.rounds.driver import current_round, format_status, promote, run, run_step, status
from alignment.rounds.project import ProjectBusy
from alignment.rounds.project import Project
from alignment.rounds.steps import StageFailed

log = logging.getLogger("alignment.rounds")

# CLI


def cli(name: str, argv: Sequence[str], description: str | None = None) -> int:
    """``align round ...``; ``description``: the help's text (alignment.rounds' docstring)."""
    from foundation.runs import setup_logging

    parser = argparse.ArgumentParser(prog="align round", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def add(cmd: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(cmd, help=help)
        sp.add_argument("--project", required=True, help="project name (folder <root>/<project>)")
        sp.add_argument("--root", default="runs", help="parent folder of projects (default: runs)")
        return sp

    sp = add("init", "create a project from a round config")
    sp.add_argument("--config", help="round config YAML (configs/round.yaml); key=value overrides follow")
    sp.add_argument("overrides", nargs="*", metavar="key=value")
    add("next", "run the next step")
    sp = add("run", "run steps until one needs people or all rounds are done")
    sp.add_argument("--rounds", type=int, help="run up to this many rounds (default: the config's `rounds`)")
    sp = add("status", "where each round stands")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp = add("promote", "make a round's policy the current one")
    sp.add_argument("--round", type=int, required=True)
    a = parser.parse_args(argv)
    setup_logging()

    if a.cmd == "init":
        try:
            cfg = load_config(RoundConfig, a.config, [*a.overrides, f"project={a.project}", f"root={a.root}"], stage="round")
        except ConfigError as exc:
            print(f"align round init: config error: {exc}", file=sys.stderr)
            return 2
        p = Project.init(cfg)
        print(f"project {p.dir} created; run it with: align round run --project {a.project}"
              + (f" --root {a.root}" if a.root != "runs" else ""))
        return 0
    p = Project(a.root, a.project)
    if a.cmd == "status":
        s = status(p)
        print(json.dumps(s, indent=2) if a.json else format_status(s))
        return 0
    if a.cmd == "promote":
        try:
            promote(p, a.round)
        except (ValueError, ProjectBusy) as exc:
            print(f"align round promote: {exc}", file=sys.stderr)
            return 2
        print(f"round {a.round}'s policy is now the current policy: {p.policy_of(a.round)}")
        return 0
    try:
        if a.cmd == "next":
            n = current_round(p)
            step = p.pending(n)[0]
            print(f"round {n}: {step} {run_step(p, n, step)}")
            return 0
        if a.rounds:
            p.cfg.rounds = a.rounds
        result = run(p)
    except (StageFailed, HeldOutLeak, ProjectBusy) as exc:
        print(f"align round {a.cmd}: {exc}", file=sys.stderr)
        return 1
    print(format_status(status(p)))
    if result == WAITING:
        print("waiting for annotations: label in the app, then run `align round run` again")
    elif result == "done":
        print(f"report: {p.dir / 'report' / 'report.md'} (and report.html)")
    return 0
