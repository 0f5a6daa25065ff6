"""Pure parts of the benchmarks, computed by hand (the benchmarks themselves are too long for CI)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from benchmarks.rm_real import by_length, curve, length_baseline


def _pair(chosen: str, rejected: str) -> SimpleNamespace:
    return SimpleNamespace(chosen_response=chosen, rejected_response=rejected)


def test_rm_real_length_baseline_and_the_length_controlled_split():
    pairs = [_pair("long answer", "short"), _pair("longer one", "tiny"), _pair("no", "a long rejected"), _pair("same", "size")]
    assert length_baseline(pairs) == pytest.approx((1 + 1 + 0 + 0.5) / 4)  # a tie counts half
    chosen, rejected = [1.0, 0.0, 2.0, 5.0], [0.5, 1.0, 1.0, 0.0]  # right, wrong, right, (tie in length: left out)
    split = by_length(chosen, rejected, pairs)
    assert split["chosen_longer"] == {"n": 2, "accuracy": 0.5, "length_baseline": 1.0}
    assert split["chosen_shorter"] == {"n": 1, "accuracy": 1.0, "length_baseline": 0.0}


def test_rm_real_curve_reads_the_evaluation_rows(tmp_path):
    rows = [{"step": 10, "loss": 0.7}, {"step": 50, "eval_accuracy": 0.6, "eval_loss": 0.66}, {"step": 60, "loss": 0.6},
            {"step": 100, "eval/accuracy": 0.65}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert curve(path, 8) == [{"step": 50, "pairs_seen": 400, "accuracy": 0.6, "loss": 0.66},
                              {"step": 100, "pairs_seen": 800, "accuracy": 0.65, "loss": None}]
