"""DPO under a multi-process launch (CPU, 2 processes, gloo): both ranks end with the same weights,
and those match a single-process run with the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_align, write_jsonl
from safetensors.torch import load_file
from test_dpo import marker_pairs

pytestmark = pytest.mark.distributed


def _args(data: Path, root: Path) -> list[str]:
    return ["--config", str(REPO / "configs/dpo.yaml"), "model.name=tiny-llama", "adapter.method=full", "run.wandb=disabled",
            f"data.sources=[{{path: {data}}}]", "data.val_fraction=0.25", "train.max_steps=4", "train.grad_accum=1",
            "train.lr=1e-3", "train.warmup_ratio=0", f"run.root={root}"]


def test_dpo_ddp_matches_single_process(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per process: the two ranks share two cores
    data = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(32))
    res = run_align("dpo", *_args(data, tmp_path / "single"), "train.batch_size=4")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_align("dpo", *_args(data, tmp_path / "ddp"), "train.batch_size=2", "--launch", str(REPO / "configs/accelerate/ddp.yaml"))
    assert res.returncode == 0, res.stderr[-3000:]
    single, ddp = tmp_path / "single" / "default" / "dpo", tmp_path / "ddp" / "default" / "dpo"
    fp = json.loads((ddp / "summary.json").read_text())["rank_fingerprints"]
    assert len(fp) == 2 and fp[0] == pytest.approx(fp[1], rel=1e-12)
    a, b = load_file(single / "model" / "model.safetensors"), load_file(ddp / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), k
    after = [json.loads((d / "eval.json").read_text())["after"] for d in (single, ddp)]
    assert after[0]["margin"] == pytest.approx(after[1]["margin"], abs=1e-4) and after[0]["n"] == after[1]["n"]
