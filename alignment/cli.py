"""The ``align`` command line.

    align <stage> [--config FILE] [--resume] [key=value ...]     run a training stage
    align <stage> --help                                          its config fields and their docs
    align <command> ...                                           tools (merge, models, ...)

Stages are modules exposing ``Config`` (a dataclass) and ``main(cfg, resume=...)``; commands are
modules exposing ``cli(argv) -> int``. Modules are imported only when their command runs, so
``align --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from alignment.methods import METHODS

# name -> (module, kind, one-line help). kind: "stage" (typed config) or "command" (own argparse).
# The policy methods come from their registry (alignment/methods.py, read when a command runs); importing it
# imports no stage.
SFT = {"sft": ("alignment.sft", "stage", "supervised fine-tuning: full, LoRA, prompt tuning or QLoRA, assistant-only loss")}
COMMANDS: dict[str, tuple[str, str, str]] = {
    "round": ("alignment.rounds", "command", "iterative RLHF rounds V1..Vn: init, next, run, status, promote"),
    "demo": ("alignment.demo", "command",
             "the main job: RLHF-V1 and V2 on the embedded SmolLM2, unattended (simulated annotator), then the report"),
    "merge": ("alignment.commands", "command", "merge a LoRA adapter into its base model (a full checkpoint)"),
    "models": ("alignment.commands", "command", "build/list the built-in models (smollm2-135m, tiny-llama) in the cache"),
    "generate": ("alignment.commands", "command", "generate answers from a model for prompts (a file or --prompt)"),
    "rm": ("reward.rm", "stage", "reward model (helpfulness or safety): Llama 2 margin loss, data mixes, safety auxiliary loss"),
    "rm-eval": ("reward.commands", "command", "reward-model accuracy report: overall, per strength, per safety bin, calibration"),
    "gold": ("reward.gold", "command", "the gold reward model (Gao et al.): build it once on HH-RLHF, cached; show its card"),
    "score": ("reward.commands", "command", "score responses with the helpfulness/safety reward models and the combined reward"),
    "annotate": ("alignment.annotate", "command", "preference annotation: users, sample/queue pairs, web app, stats, export"),
    "eval": ("alignment.evals.cli", "command", "evaluations: truthfulqa, toxigen, winrate, metrics, train-classifier"),
    "report": ("alignment.evals.cli", "command",
               "Markdown + HTML report with plots across a run's rounds (align report --run runs/<project>)"),
}


def commands() -> dict[str, tuple[str, str, str]]:
    """Every command: SFT, the registered policy methods, then the rest."""
    return {**SFT, **{m.name: (m.module, "stage", m.help) for m in METHODS.values()}, **COMMANDS}


def _usage() -> str:
    table = commands()
    width = max(len(n) for n in table)
    lines = ["usage: align <command> [options]", "", "stages (align <stage> --config FILE [--resume] [key=value ...]):"]
    lines += [f"  {n:<{width}}  {h}" for n, (_, kind, h) in table.items() if kind == "stage"]
    lines += ["", "commands (align <command> --help):"]
    lines += [f"  {n:<{width}}  {h}" for n, (_, kind, h) in table.items() if kind == "command"]
    lines += ["", "Run `align <stage> --help` for every config field of a stage."]
    return "\n".join(lines)


def run_stage(name: str, module_name: str, help_text: str, argv: Sequence[str]) -> int:
    from foundation.config import ConfigError, format_help, load_config

    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"align {name}", description=f"{help_text}\n\n{(module.__doc__ or '').strip()}",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=format_help(module.Config),
    )
    parser.add_argument("--config", help="YAML config file (fields below); key=value overrides follow")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder from its last checkpoint")
    parser.add_argument("--launch", metavar="ACCELERATE_CONFIG",
                        help="run on several processes with this accelerate config (configs/accelerate/*.yaml)")
    parser.add_argument("--nproc", type=int, help="with --launch: processes on this machine (default: the config's)")
    machines = parser.add_argument_group("several machines (with --launch; run the same command on each machine, "
                                         "with its own --machine-rank; run.root on a filesystem every machine shares)")
    machines.add_argument("--num-machines", type=int, help="machines in the run (default: the config's, else 1)")
    machines.add_argument("--machine-rank", type=int, help="this machine's rank, 0 .. num-machines - 1 (0 is the main one)")
    machines.add_argument("--main-process-ip", help="address of machine 0, reachable from every machine")
    machines.add_argument("--main-process-port", type=int, help="a free port on machine 0 (default: the config's, else 29500)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. train.max_steps=5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(module.Config, args.config, args.overrides, stage=name)
    except ConfigError as exc:
        print(f"align {name}: config error: {exc}", file=sys.stderr)
        return 2
    if args.launch:  # validated above; now re-run the same command on every process
        from foundation import launch

        rest, skip = [], False
        launch_flags = ("--launch", "--nproc", "--num-machines", "--machine-rank", "--main-process-ip", "--main-process-port")
        for arg in argv:  # the same command minus the launch flags (both `--x v` and `--x=v`)
            if skip:
                skip = False
            elif arg in launch_flags:
                skip = True
            elif not arg.startswith(tuple(f"{f}=" for f in launch_flags)):
                rest.append(arg)
        try:
            machines_given = launch.Machines(args.num_machines, args.machine_rank, args.main_process_ip,
                                             args.main_process_port)
            return launch.run(args.launch, [name, *rest], nproc=args.nproc, machines=machines_given)
        except launch.LaunchError as exc:
            print(f"align {name}: {exc}", file=sys.stderr)
            return 2
    module.main(cfg, resume=args.resume)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.path.exists("/proc/driver/nvidia"):
        # DeepSpeed probes for an accelerator at import (transformers imports it when installed) and
        # prints a warning to stdout when it finds none; say "cpu" up front on GPU-less machines.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    table = commands()
    if name not in table:
        import difflib

        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"align: unknown command '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, kind, help_text = table[name]
    from foundation.config import ConfigError
    from foundation.runs import OutputExistsError
    from data.errors import DataError

    try:
        if kind == "stage":
            code = run_stage(name, module_name, help_text, rest)
        else:
            module = importlib.import_module(module_name)
            code = int(module.cli(name, rest) or 0)
    except (ConfigError, DataError, OutputExistsError, FileNotFoundError, FileExistsError) as exc:
        print(f"align {name}: error: {exc}", file=sys.stderr)
        return 2
    from foundation.distributed import shutdown

    global _ENDED_GROUP
    _ENDED_GROUP = shutdown()  # under a multi-process launch: end the process group before exit
    return code


_ENDED_GROUP = False  # main() ended a process group: this process is a rank of a launch


if __name__ == "__main__":
    code = main()
    if _ENDED_GROUP:  # a rank exits without interpreter finalisation, where gloo can abort it (exit_rank)
        from foundation.distributed import exit_rank

        exit_rank(code)
    sys.exit(code)
