"""``align <stage> ... --launch CONFIG``: run a stage on several processes through Accelerate.

One documented way to launch any stage with any parallel layout: the same stage code runs under
every config in ``configs/accelerate/`` (single process, DDP, DeepSpeed ZeRO-2/3 with or without
CPU offload, FSDP). The command is re-executed as

    accelerate launch --config_file CONFIG -m alignment.cli <stage> <the same arguments>

and the traps measured on CPU machines (ENVIRONMENT.md) are handled here and in
``alignment.distributed``:

- ``use_cpu: true`` with several processes silently runs ONE process in accelerate: such a config
  is rewritten (temporary copy) to the multi-process path, and the stage's process group uses gloo;
- DeepSpeed on CPU needs the process state created before the trainer: ``alignment.distributed.init``
  does that in every stage, and trainers reuse it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import yaml

KNOWN_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED", "FSDP")
# (stage, distributed_type) pairs that cannot run, and why: refused before any process starts
UNSUPPORTED = {
    ("ppo", "FSDP"): "PPO trains two models (policy and critic) and accelerate's FSDP2 prepares one model per "
                     "Accelerator; use configs/accelerate/zero3.yaml (ZeRO-3 shards parameters, gradients and optimizer "
                     "state like FSDP, with policy and critic in one engine) or configs/accelerate/ddp.yaml",
}


class LaunchError(ValueError):
    pass


def _load(config: Path) -> dict:
    if not config.is_file():
        raise LaunchError(f"--launch: config file not found: {config}")
    try:
        data = yaml.safe_load(config.read_text())
    except yaml.YAMLError as exc:
        raise LaunchError(f"--launch: {config}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise LaunchError(f"--launch: {config}: expected an accelerate config (a mapping)")
    kind = str(data.get("distributed_type", "NO"))
    if kind not in KNOWN_TYPES:
        raise LaunchError(f"--launch: {config}: distributed_type {kind!r} is not one of {', '.join(KNOWN_TYPES)}")
    return data


def launch_command(config: str | Path, argv: Sequence[str],
                   nproc: int | None = None) -> tuple[list[str], dict[str, str], str | None]:
    """(command, environment, temp config to delete) for running ``align <argv>`` under ``config``."""
    path = Path(config)
    data = _load(path)
    kind = str(data.get("distributed_type", "NO"))
    stage = argv[0] if argv else ""
    if (stage, kind) in UNSUPPORTED:
        raise LaunchError(f"--launch {config}: align {stage} cannot run under distributed_type {kind}: "
                          f"{UNSUPPORTED[stage, kind]}")
    env = dict(os.environ)
    env["ALIGN_LAUNCHED"] = "1"
    env["ALIGN_LAUNCH_CONFIG"] = str(config)
    tmp = None
    n = int(nproc or data.get("num_processes", 1))
    changed = dict(data)
    if nproc is not None:
        changed["num_processes"] = nproc
    if data.get("use_cpu") and n > 1:
        # accelerate's CPU path runs a single process: take the multi-process path; the stage's
        # process group then uses gloo because no GPU is present.
        changed["use_cpu"] = False
        if kind in ("NO", "MULTI_CPU"):
            changed["distributed_type"] = "MULTI_GPU"
    if kind == "MULTI_CPU" and n > 1:
        changed["distributed_type"] = "MULTI_GPU"
    if changed != data:
        fd, tmp = tempfile.mkstemp(prefix="align-accelerate-", suffix=".yaml")
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(changed, fh)
        path = Path(tmp)
    if n == 1 and kind == "NO":
        return [sys.executable, "-m", "alignment.cli", *argv], env, tmp
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), "-m", "alignment.cli", *argv]
    return cmd, env, tmp


def run(config: str | Path, argv: Sequence[str], nproc: int | None = None) -> int:
    """Run ``align <argv>`` under ``config``."""
    if os.environ.get("ALIGN_LAUNCHED"):
        raise LaunchError("--launch inside a launched process: remove --launch (the stage is already distributed)")
    cmd, env, tmp = launch_command(config, argv, nproc)
    print("launching: " + " ".join(cmd[2:] if cmd[1] == "-m" else cmd), file=sys.stderr)
    try:
        return subprocess.call(cmd, env=env)
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
