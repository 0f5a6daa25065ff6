"""``align <stage> ... --launch CONFIG``: run a stage on several processes through Accelerate.

One documented way to launch any stage with any parallel layout: the same stage code runs under
every config in ``configs/accelerate/`` (single process, DDP, DeepSpeed ZeRO-2/3 with or without
CPU offload, FSDP). The command is re-executed as

    accelerate launch --config_file CONFIG -m alignment.cli <stage> <the same arguments>

and the traps measured on CPU machines (ENVIRONMENT.md) are handled here and in
``foundation.distributed``:

- ``use_cpu: true`` with several processes silently runs ONE process in accelerate: such a config
  is rewritten (temporary copy) to the multi-process path, and the stage's process group uses gloo;
- DeepSpeed on CPU needs the process state created before the trainer: ``foundation.distributed.init``
  does that in every stage, and trainers reuse it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
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


@dataclass
class Machines:
    """``--num-machines/--machine-rank/--main-process-ip/--main-process-port``: None keeps the config's value."""

    num: int | None = None
    rank: int | None = None
    ip: str | None = None
    port: int | None = None

    def apply(self, data: dict) -> dict:
        """The accelerate config with these values; errors name the flag."""
        out = dict(data)
        for key, value in (("num_machines", self.num), ("machine_rank", self.rank), ("main_process_ip", self.ip),
                           ("main_process_port", self.port)):
            if value is not None:
                out[key] = value
        n, rank = int(out.get("num_machines", 1)), int(out.get("machine_rank", 0))
        if n < 1:
            raise LaunchError(f"--num-machines must be >= 1, got {n}")
        if not 0 <= rank < n:
            raise LaunchError(f"--machine-rank must be in 0 .. {n - 1} (--num-machines {n}), got {rank}")
        if n > 1 and not out.get("main_process_ip"):
            raise LaunchError(f"--num-machines {n} needs --main-process-ip (the address of machine 0)")
        if n > 1 and str(out.get("distributed_type", "NO")) == "NO":
            out["distributed_type"] = "MULTI_GPU"  # several machines are a multi-process run, whatever the config
        if n > 1:
            out.setdefault("main_process_port", 29500)
            out.setdefault("rdzv_backend", "static")
            out.setdefault("same_network", True)
            if isinstance(out.get("deepspeed_config"), dict):  # one launcher per machine (torchrun), not pdsh over ssh
                out["deepspeed_config"] = {"deepspeed_multinode_launcher": "standard", **out["deepspeed_config"]}
        return out


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


def launch_command(config: str | Path, argv: Sequence[str], nproc: int | None = None,
                   machines: Machines | None = None) -> tuple[list[str], dict[str, str], str | None]:
    """(command, environment, temp config to delete) for running ``align <argv>`` under ``config``.
    ``nproc``: processes on this machine; accelerate's ``num_processes`` counts every machine's."""
    from foundation.config import find_config

    path = find_config(config)
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
    changed = (machines or Machines()).apply(data)
    n_machines = int(changed.get("num_machines", 1))
    per_machine = nproc if nproc is not None else int(data.get("num_processes", 1)) // max(1, int(data.get("num_machines", 1)))
    n = max(1, per_machine) * n_machines
    kind = str(changed.get("distributed_type", "NO"))
    if nproc is not None or n_machines > 1:
        changed["num_processes"] = n
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


def run(config: str | Path, argv: Sequence[str], nproc: int | None = None, machines: Machines | None = None) -> int:
    """Run ``align <argv>`` under ``config``."""
    if os.environ.get("ALIGN_LAUNCHED"):
        raise LaunchError("--launch inside a launched process: remove --launch (the stage is already distributed)")
    cmd, env, tmp = launch_command(config, argv, nproc, machines)
    print("launching: " + " ".join(cmd[2:] if cmd[1] == "-m" else cmd), file=sys.stderr)
    try:
        return subprocess.call(cmd, env=env)
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
