"""Run folders, resume rules and metrics logging, shared by every stage.

A stage writes to ``<run.root>/<run.name>/<stage>/`` (or ``run.output_dir``)::

    config.yaml      the resolved config (loadable with --config)
    model/           final weights (or adapter) and tokenizer
    checkpoints/     checkpoint-<step>/ folders for --resume
    metrics.jsonl    one JSON object per logged step
    summary.json     final metrics
    wandb/           offline W&B run (sync later with `wandb sync`)

Starting a stage whose folder already holds a run fails unless ``--resume`` is given: nothing
already written is overwritten by accident.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from foundation.config import check, option, save_config, to_dict

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """Where outputs go and how the run is tracked."""

    name: str = option("default", "run name: outputs go to <root>/<name>/<stage>/")
    root: str = option("runs", "folder holding all runs")
    output_dir: str | None = option(None, "write this stage's outputs exactly here instead of <root>/<name>/<stage>")
    seed: int = option(42, "random seed for data order, initialisation and sampling")
    wandb: Literal["offline", "online", "disabled"] = option("offline", "Weights & Biases mode: offline needs no account or "
                                                                        "network (files under <output>/wandb)")
    wandb_project: str = option("align", "W&B project name")
    log_level: Literal["debug", "info", "warning", "error"] = option("info", "logging verbosity")

    def __post_init__(self) -> None:
        check(bool(self.name.strip()) and "/" not in self.name, "name",
              f"must be a non-empty folder name without '/', got {self.name!r}")

    def stage_dir(self, stage: str) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(self.root) / self.name / stage


class OutputExistsError(RuntimeError):
    pass


def prepare_output(out: Path, *, resume: bool) -> Path:
    """Create ``out``; refuse to reuse a folder that holds a run unless resuming."""
    has_run = (out / "config.yaml").is_file()
    if has_run and not resume:
        raise OutputExistsError(
            f"{out} already holds a run; pass --resume to continue it, or choose another run.name (or run.output_dir)"
        )
    if resume and not has_run:
        raise OutputExistsError(f"--resume: {out} holds no run to resume")
    out.mkdir(parents=True, exist_ok=True)
    return out


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete ``checkpoints/checkpoint-<step>`` folder, if any."""
    ckpt_dir = out / "checkpoints"
    if not ckpt_dir.is_dir():
        return None
    steps = []
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name.split("-")[-1].isdigit():
            if (p / "trainer_state.json").is_file() or (p / "state.pt").is_file():
                steps.append((int(p.name.split("-")[-1]), p))
    return max(steps)[1] if steps else None


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Append metrics to ``metrics.jsonl`` and, unless disabled, to an offline W&B run.

    Only the main process logs (pass ``enabled=False`` elsewhere). On resume, entries past the
    checkpoint's step are dropped first, so the file reads as one uninterrupted run.
    """

    def __init__(
        self, out: Path, *, run: RunConfig, stage: str, config: Any = None, enabled: bool = True, resume_step: int | None = None
    ) -> None:
        self.out = Path(out)
        self.path = self.out / "metrics.jsonl"
        self.enabled = enabled
        self._wandb = None
        if not enabled:
            return
        if resume_step is not None:
            self.truncate_after(resume_step)
        if run.wandb != "disabled":
            self._wandb = self._init_wandb(run, stage, config)

    def _init_wandb(self, run: RunConfig, stage: str, config: Any) -> Any:
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed; metrics go to %s only", self.path)
            return None
        id_file = self.out / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        try:
            return wandb.init(
                project=run.wandb_project, name=f"{run.name}/{stage}", id=run_id, resume="allow", dir=str(self.out),
                mode=run.wandb, config=to_dict(config) if config is not None else None, reinit="finish_previous",
            )
        except Exception as exc:  # a broken W&B setup must not stop training
            log.warning("wandb.init failed (%s); metrics go to %s only", exc, self.path)
            return None

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        keep = [line for line in jsonl_lines(self.path.read_text(encoding="utf-8")) if json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k not in ("step", "time") and v is not None}, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _clean(v) for k, v in metrics.items()}
        (self.out / "summary.json").write_text(json.dumps(clean, indent=2) + "\n")
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in clean.items() if v is not None})

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def jsonl_lines(text: str) -> list[str]:
    """The non-blank lines of JSONL text. Lines end at "\\n" only: ``str.splitlines()`` also splits at U+2028, U+0085,
    form feeds and other separators that ``json.dumps(..., ensure_ascii=False)`` leaves inside strings, and a model
    can generate any of them."""
    return [line for line in text.split("\n") if line.strip()]


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL file (see :func:`jsonl_lines`)."""
    return [json.loads(line) for line in jsonl_lines(Path(path).read_text(encoding="utf-8"))]


def read_metrics(out: Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return []
    return read_jsonl(path)


def start_stage(cfg: Any, stage: str, *, resume: bool, folder: str | None = None) -> Path:
    """Common stage start: process group, logging, output folder (resume rules), resolved config.

    Under a multi-process launch every rank checks the folder before any rank writes to it, then
    only the main rank writes the config; the others wait for it.
    """
    from foundation import distributed

    distributed.init()
    setup_logging(cfg.run.log_level if distributed.is_main() else "warning")
    out = cfg.run.stage_dir(folder or stage)
    error = None
    try:
        prepare_output(out, resume=resume) if distributed.is_main() else _check_output(out, resume=resume)
    except OutputExistsError as exc:
        error = exc
    distributed.barrier()
    if error is not None:
        raise error
    if distributed.is_main():
        save_config(cfg, out / "config.yaml", stage=stage)
    distributed.barrier()
    distributed.check_shared_folder(out)
    return out


def _check_output(out: Path, *, resume: bool) -> None:
    """The checks of :func:`prepare_output` without creating anything (non-main ranks)."""
    has_run = (out / "config.yaml").is_file()
    if has_run and not resume:
        raise OutputExistsError(f"{out} already holds a run; pass --resume to continue it")
    if resume and not has_run:
        raise OutputExistsError(f"--resume: {out} holds no run to resume")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (manifests, cards and bundles record inputs by it)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
