"""Timing helpers and the machine description written next to every number."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"
# packed gold reward models (``align gold pack``), tracked: a reset machine unpacks them instead of rebuilding for an hour
GOLD_PACKS = Path(__file__).resolve().parent / "state" / "gold"


def golds_named(*texts: str) -> list[str]:
    """The gold models (``gold:<name>``) a config's text or overrides name, in order, once each."""
    import re

    names: list[str] = []
    for text in texts:
        for name in re.findall(r"gold:([A-Za-z0-9_.-]+)", text):
            if name not in names:
                names.append(name)
    return names


def ensure_gold(name: str, packs: Path | None = GOLD_PACKS) -> str:
    """Make ``gold:<name>`` usable: 'cached' when it is in the model cache, 'unpacked' from ``packs/<name>`` when a
    packed copy is there, else 'missing' (the caller builds it or stops)."""
    from reward import gold

    if (gold.gold_dir(name) / "card.json").is_file():
        return "cached"
    if packs is not None and (packs / name / "card.json").is_file():
        gold.unpack(packs / name, name=name)
        return "unpacked"
    return "missing"


def machine() -> dict[str, Any]:
    import torch
    import transformers
    import trl

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl.__version__, "load_avg_at_start": os.getloadavg()[0],
    }
    return info


def time_steps(fn: Callable[[], Any], steps: int, warmup: int = 1) -> dict[str, float]:
    """Median and spread of ``fn``'s wall time over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": steps}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(module: str, *args: str, timeout: int = 3600) -> dict:
    """Run ``python -m benchmarks.<module> --json ...`` in a fresh process (clean peak-memory readings)."""
    res = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--json", *args], capture_output=True, text=True,
                         timeout=timeout, cwd=Path(__file__).resolve().parents[1])
    if res.returncode != 0:
        raise RuntimeError(f"benchmarks.{module} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in cells[1:]])
