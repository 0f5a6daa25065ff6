"""Rule rewards for the distributed tests (importable as ``dist_rewards:<name>`` with tests/ on PYTHONPATH)."""

from __future__ import annotations


def prompt_length(prompt, response: str) -> float:
    """Grows with the prompt's length: different prompt batches on different ranks get rewards with
    different means and spreads, so per-rank normalisation would differ from the global one."""
    return len(prompt[-1]["content"]) / 50.0 + len(response) / 10.0
