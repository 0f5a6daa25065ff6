"""Checkpoints of an RL run: trainable weights only, optimiser and controller state, RNG streams.

A checkpoint is a folder ``checkpoints/checkpoint-<iteration>/`` holding ``state.pt`` (written by
the main process) and ``rng-<rank>.pt`` (one per process: each samples with its own stream). It is
written under a temporary name and renamed when complete, so a run killed while saving leaves
the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn


def trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters of a model (an adapter and head; everything for a full model), on CPU."""
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load :func:`trainable_state` back; every trainable parameter must be present, nothing else."""
    import torch

    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.device, p.dtype))


def rng_state() -> dict[str, Any]:
    """This process's random streams: Python, NumPy, torch CPU and CUDA."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def staging_dir(checkpoints: Path, iteration: int) -> Path:
    """Where a checkpoint is written before it is complete."""
    return checkpoints / f".checkpoint-{iteration}.tmp"


def finalize(checkpoints: Path, iteration: int, keep: int) -> Path:
    """Rename the staged checkpoint into place and delete all but the newest ``keep``."""
    final = checkpoints / f"checkpoint-{iteration}"
    if final.exists():
        shutil.rmtree(final)
    staging_dir(checkpoints, iteration).rename(final)
    done = sorted((int(p.name.split("-")[-1]), p) for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit())
    for _, old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
