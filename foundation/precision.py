"""Devices and dtypes: which device a process uses, and which dtype a model loads in there.

``select_dtype`` picks bf16 on GPUs that have it and fp32 on the CPU: torch emulates bf16 on most CPUs (``benchmarks
defaults`` measured a 19x slower SFT step on one). CPUs with native bf16 (AVX512-BF16, AMX) may run no-grad work
(evaluation answers, judges) in bf16 inside an ``inference_precision`` block, a round's ``eval.dtype``; ``benchmarks
precision`` measures its speed and fidelity. ``master_dtype`` keeps weights that train in full in fp32 (the
optimiser's master copy), with bf16 compute from autocast.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from foundation.config import check

if TYPE_CHECKING:
    import torch


def select_device(device: str = "auto") -> "torch.device":
    import torch

    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local)
    return torch.device("cpu")


INFERENCE_DTYPES = ("auto", "float32", "bfloat16")
_cpu_inference_dtype: list[str] = []  # the innermost inference_precision() block's CPU dtype (empty: fp32)


def cpu_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 in ``/proc/cpuinfo``, or the ``cpuinfo`` text
    given). Without it torch emulates bf16 and is much slower than fp32 (``benchmarks defaults``: 19x on an SFT step);
    with it, measure (``benchmarks precision``)."""
    text = cpuinfo
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_inference_dtype(dtype: str) -> str:
    """The CPU dtype of no-grad work (evaluation answers, judges, benchmarks) for a setting ``auto`` / ``float32`` /
    ``bfloat16``: ``auto`` is bf16 on a CPU with native bf16 and fp32 on any other (``benchmarks precision`` on a
    2-core EPYC with avx512_bf16: generation 1.35x, log-likelihood scoring and reward-model judging ~2x faster; the
    gold RM picked the same answer in 19 of 20 pairs, TruthfulQA MC2 moved -0.5 points, both models of a comparison
    always in one dtype); ``bfloat16`` on a CPU without native bf16 is refused (emulated, many times slower)."""
    check(dtype in INFERENCE_DTYPES, "dtype", f"must be one of {', '.join(INFERENCE_DTYPES)}, got {dtype!r}")
    if dtype == "bfloat16" and not cpu_native_bf16():
        import torch

        if not torch.cuda.is_available():
            raise ValueError("dtype: bfloat16 needs a CPU with native bf16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo) or a "
                             "GPU; this machine has neither (torch would emulate it, many times slower than fp32)")
    if dtype == "auto":
        return "bfloat16" if cpu_native_bf16() else "float32"
    return dtype


@contextlib.contextmanager
def inference_precision(dtype: str) -> Iterator[str]:
    """Within the block, a model loaded with ``dtype="auto"`` on the CPU loads in ``dtype`` (``resolve_inference_dtype``);
    GPUs keep their own ``auto`` (bf16 where supported). For no-grad work only: nothing may train in the block.
    Reward-model scorers loaded in a bf16 block keep their score head and its input in fp32 (``reward.load_scorer``),
    so that bf16 rounding makes no ties between rewards. Yields the resolved dtype."""
    resolved = resolve_inference_dtype(dtype)
    _cpu_inference_dtype.append(resolved)
    try:
        yield resolved
    finally:
        _cpu_inference_dtype.pop()


def inference_dtype() -> str | None:
    """The CPU dtype of the enclosing ``inference_precision`` block, None outside one."""
    return _cpu_inference_dtype[-1] if _cpu_inference_dtype else None


def rows_dtypes(rows: Iterable[dict]) -> set[str]:
    """The dtypes cached result rows (answers, TruthfulQA/ToxiGen rows) were computed in, from their ``dtype`` key; rows
    written before rows kept it are fp32 (the CPU's only evaluation dtype then)."""
    return {r.get("dtype", "float32") for r in rows}


def effective_inference_dtype(dtype: str) -> str:
    """The dtype no-grad work runs in on this machine for the setting ``dtype`` (``auto`` / ``float32`` / ``bfloat16``),
    by name: on the CPU as ``resolve_inference_dtype`` resolves it, on a GPU its own ``auto`` (bf16 where supported)."""
    with inference_precision(dtype):
        return dtype_name()


def dtype_name(dtype: str = "auto", device: str = "auto") -> str:
    """What ``select_dtype`` resolves to on ``device``, by name (``float32``, ``bfloat16``)."""
    return str(select_dtype(dtype, select_device(device))).removeprefix("torch.")


def select_dtype(dtype: str = "auto", device: "torch.device | str | None" = None) -> "torch.dtype":
    """bf16 on GPUs that have it; fp32 on CPU (torch emulates bf16 on most CPUs, much slower), or the dtype of the
    enclosing ``inference_precision`` block."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    dev = torch.device(device) if device is not None else select_device()
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if dev.type == "cpu" and _cpu_inference_dtype:
        return getattr(torch, _cpu_inference_dtype[-1])
    return torch.float32


def master_dtype(dtype: str, method: str, device: "torch.device | str | None" = None) -> str:
    """The dtype to load a model whose weights train (``method``: the adapter method). ``auto`` is bf16 on GPUs;
    weights trained in full then load in fp32 instead: they are the optimiser's master copy (AdamW on bf16 weights
    loses small updates), and bf16 compute comes from ``train.precision``'s autocast (mixed precision, as
    TRL and accelerate do it). LoRA trains fp32 adapters over a frozen bf16 base, so it keeps ``auto``; an
    explicit dtype is kept as given."""
    import torch

    if isinstance(device, str):
        device = select_device(device)  # "auto", "cpu", "cuda:1"
    if method == "full" and dtype == "auto" and select_dtype(dtype, device) != torch.float32:
        return "float32"
    return dtype
