"""Peak memory per phase of a training loop (generate, score, update, ...), so a user sees where memory goes.

    peaks = PhasePeaks()
    with peaks.phase("generate"):
        ...
    logger.log(peaks.metrics())      # {"memory/generate_gb": ..., ...}: the largest peak of each phase so far

On a GPU a phase's peak is ``torch.cuda.max_memory_allocated`` since the phase began (the counter is
reset at each phase). On a CPU the process's resident set (``/proc/self/statm``) is sampled by a
thread every ``interval`` seconds while a phase runs: ``ru_maxrss`` only ever grows, so it cannot
say which phase set it. A spike shorter than the interval can be missed; ``peak_rss_gb`` (the
process's ``ru_maxrss``) is reported beside the phases and bounds them all.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
from collections.abc import Iterator

GIB = 2**30


def rss_bytes() -> int:
    """The process's resident set size now (Linux: /proc/self/statm; elsewhere its peak, ru_maxrss)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PhasePeaks:
    """The largest memory seen in each named phase (see the module docstring). ``cuda=None`` asks
    torch whether a GPU is in use."""

    def __init__(self, *, interval: float = 0.005, cuda: bool | None = None) -> None:
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        self.cuda, self.interval = cuda, interval
        self.peaks: dict[str, int] = {}
        self.first: dict[str, int] = {}  # each phase's peak on its first visit (before later phases ran)
        self.runtime: int | None = None  # resident bytes before any model was loaded (set by the caller)
        self.loaded: int | None = None  # resident bytes once the models are loaded (set by the caller)
        self._phase: str | None = None
        self._high = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = rss_bytes()
            with self._lock:
                if self._phase is not None and rss > self._high:
                    self._high = rss

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measure the block as phase ``name``. A phase inside another counts toward both."""
        outer = self._phase
        if self.cuda:
            import torch

            outer_high = max(self._high, torch.cuda.max_memory_allocated()) if outer else 0
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        else:
            if self._thread is None:
                self._thread = threading.Thread(target=self._sample, name="phase-memory", daemon=True)
                self._thread.start()
            outer_high, start = self._high, rss_bytes()
        with self._lock:
            self._phase, self._high = name, start
        try:
            yield
        finally:
            if self.cuda:
                import torch

                high = max(self._high, torch.cuda.max_memory_allocated())
            else:
                with self._lock:
                    high = max(self._high, rss_bytes())
            with self._lock:
                self.peaks[name] = max(self.peaks.get(name, 0), high)
                self.first.setdefault(name, high)
                self._phase, self._high = outer, (max(outer_high, high) if outer else 0)

    def metrics(self) -> dict[str, float]:
        """``memory/<phase>_gb`` for every phase so far, and the process's ``memory/peak_rss_gb``."""
        out = {f"memory/{k}_gb": v / GIB for k, v in self.peaks.items()}
        if self.runtime is not None:
            out["memory/runtime_gb"] = self.runtime / GIB
        if self.loaded is not None:
            out["memory/loaded_gb"] = self.loaded / GIB
        # the kernel updates ru_maxrss lazily: a sampled phase can read a little above it
        peaks = [] if self.cuda else list(self.peaks.values())
        out["memory/peak_rss_gb"] = max(peak_rss_bytes(), *peaks) / GIB
        return out

    def cuda_peak_bytes(self) -> int:
        """The largest GPU memory allocated over the whole run: the phases reset torch.cuda's peak counter,
        so it alone would say only what happened since the last phase began."""
        import torch

        return max(torch.cuda.max_memory_allocated(), *self.peaks.values()) if self.cuda else torch.cuda.max_memory_allocated()

    def first_metrics(self) -> dict[str, float]:
        """``memory/first_<phase>_gb``: each phase's peak the first time it ran. On a CPU memory that a phase freed
        often stays with the process (the allocator keeps it), so later phases read what earlier ones left;
        the first visits, in order, separate what each phase adds."""
        return {f"memory/first_{k}_gb": v / GIB for k, v in self.first.items()}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None
