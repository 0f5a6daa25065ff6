"""foundation.memory.PhasePeaks: the peak resident memory of each phase, on a CPU."""

from __future__ import annotations

import mmap
import time

import torch

from foundation.memory import GIB, PhasePeaks, peak_rss_bytes, rss_bytes

MB = 2**20


def _hold(peaks: PhasePeaks, nbytes: int) -> None:
    """Make ``nbytes`` resident until the sampling thread has seen them, then give them back.

    An anonymous mapping, not a tensor: after other tests the allocator can hold freed heap that is already
    resident, and a tensor served from it would not change the resident set. And the thread is waited for
    (up to 10 s), not given a fixed time: on a loaded machine other threads can hold the GIL for a while."""
    buf = mmap.mmap(-1, nbytes)
    for i in range(0, nbytes, mmap.PAGESIZE):  # written, so every page is resident
        buf[i] = 1
    resident, deadline = rss_bytes(), time.monotonic() + 10
    while peaks._high < resident and time.monotonic() < deadline:
        time.sleep(0.005)
    buf.close()


def test_each_phase_reports_its_own_peak_and_an_outer_phase_includes_an_inner_one():
    peaks = PhasePeaks(interval=0.002, cuda=False)
    try:
        with peaks.phase("small"):
            _hold(peaks, 8 * MB)
        with peaks.phase("large"):
            _hold(peaks, 256 * MB)
        with peaks.phase("outer"):
            with peaks.phase("inner"):
                _hold(peaks, 256 * MB)
            _hold(peaks, 8 * MB)
        with peaks.phase("small"):  # a later, smaller visit does not lower a phase's peak
            pass
    finally:
        peaks.close()
    got = peaks.metrics()
    assert set(got) == {"memory/small_gb", "memory/large_gb", "memory/outer_gb", "memory/inner_gb", "memory/peak_rss_gb"}
    small, large = got["memory/small_gb"] * GIB, got["memory/large_gb"] * GIB
    assert large - small > 200 * MB  # the 256 MB tensor shows in its phase, not in the other
    assert got["memory/outer_gb"] >= got["memory/inner_gb"] and got["memory/inner_gb"] * GIB - small > 200 * MB
    assert got["memory/peak_rss_gb"] * GIB >= large - MB and peak_rss_bytes() >= rss_bytes()


def test_on_a_gpu_each_phase_resets_the_counter_and_the_runs_peak_is_kept(monkeypatch):
    """torch.cuda's peak counter is reset when a phase begins: the phase's own peak is read from it, and the run's
    peak (PPO's perf/peak_cuda_gb) is the largest of them, not what the counter says after the last phase."""
    state = {"now": 0, "max": 0}

    def alloc(n):
        state["now"] = n
        state["max"] = max(state["max"], n)

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: state.update(max=state["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: state["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: state["max"])
    peaks = PhasePeaks(cuda=True)
    alloc(10)
    with peaks.phase("generate"):
        alloc(100)
        alloc(20)
    with peaks.phase("update"):
        with peaks.phase("inner"):
            alloc(60)
        alloc(30)
    assert peaks.peaks == {"generate": 100, "inner": 60, "update": 60}
    assert torch.cuda.max_memory_allocated() == 60 and peaks.cuda_peak_bytes() == 100
