"""The JSON every evaluation writes, and how the report reads it back.

Every result file is one JSON object with a common header::

    {"eval": "truthfulqa", "schema_version": 1, "model": "runs/p/round-2/policy",
     "created_at": "2026-11-22T10:00:00+00:00", "metrics": {...}, "timing": {"seconds": 12.3}, ...}

and evaluation-specific keys (documented in docs/DEVELOPING.md, "Evaluation results"). Files are
written atomically and never replaced: writing a result that already exists fails unless
``overwrite=True``. The round orchestrator places them in ``runs/<project>/round-<N>/eval/``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


def header(eval_name: str, model: str | None, **extra: Any) -> dict:
    """The common keys of a result; ``extra`` keys follow them."""
    return {
        "eval": eval_name,
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }


def _clean(value: Any) -> Any:
    """JSON-safe: numpy/torch scalars to Python, NaN/inf to null, tuples to lists."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, payload: dict, *, overwrite: bool = False) -> Path:
    """Write ``payload`` atomically (temp file, then rename); refuse to replace an existing file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it (choose another --out or --name)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(_clean(payload), fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_free(*paths: str | Path) -> None:
    """Fail before any work starts if an output file already exists."""
    for p in paths:
        if Path(p).exists():
            raise FileExistsError(f"{p} exists; refusing to overwrite it (choose another --out or --name)")


def read_result(path: str | Path) -> dict:
    """Load a result file; a file that is not one fails with its path and the reason."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a JSON object, got {type(data).__name__}")
    # rm_eval.json (reward/evaluate.py) predates this header: recognise it by its keys
    if "eval" not in data and {"accuracy", "by_strength"} <= set(data):
        data = {"eval": "rm_eval", "schema_version": SCHEMA_VERSION, **data}
    if "eval" not in data:
        raise ValueError(f"{path}: not an evaluation result (no 'eval' key)")
    version = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {version!r} is newer than this align reads ({SCHEMA_VERSION})")
    return data


def default_out(eval_name: str, model: str) -> Path:
    """Where results go without ``--out``: beside a stage output, in its round's ``eval/`` folder
    (``runs/p/round-2/policy`` -> ``runs/p/round-2/eval``, where ``align report`` looks);
    otherwise ``runs/eval/<model name>``."""
    p = Path(model)
    if p.is_dir():
        if p.name == "model" and (p.parent / "config.yaml").is_file():
            p = p.parent
        if (p / "config.yaml").is_file():  # a stage output folder
            return p.parent / "eval"
        return Path("runs") / "eval" / p.name
    return Path("runs") / "eval" / model.replace("/", "--")


def first_existing(candidates: Any) -> str | None:
    """The first candidate data source that is there (``bundled:``/``hub:`` names and ``truthful_qa`` always are)."""
    for c in candidates or []:
        if c.startswith(("bundled:", "hub:")) or c == "truthful_qa" or Path(c).expanduser().exists():
            return c
    return None


def pct(x: Any, digits: int = 1) -> str:
    """A share as a percentage for a report cell ("—" when missing)."""
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (imported only when a plot is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def bootstrap_ci(outcomes: Sequence[float], *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean outcome: resample prompts with replacement ``n_boot`` times."""
    import numpy as np

    x = np.asarray(outcomes, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no outcomes")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))
