"""On a CUDA GPU: SFT and PPO train in bf16, and the DeepSpeed ZeRO configs validate there.

Marker ``gpu``; skipped where there is no CUDA device (CI has none). ``ALIGN_GPU_TEST_DEVICE=cpu``
runs the same tests on the CPU (bf16 there is slow but works), to check the tests themselves on a
machine without a GPU. Numbers (throughput, memory) belong in ``python -m benchmarks gpu``.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import REPO, run_align, write_jsonl
from safetensors.torch import load_file

from foundation.runs import read_metrics

DEVICE = os.environ.get("ALIGN_GPU_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def sft_data(tmp_path, sft_rows):
    return write_jsonl(tmp_path / "sft.jsonl", sft_rows)


def _sft_args(data, root, *more: str) -> list[str]:
    return ["--config", str(REPO / "configs/sft.yaml"), "model.name=tiny-llama", f"model.device={DEVICE}", "model.dtype=bfloat16",
            "train.precision=bf16", "adapter.method=full", "run.wandb=disabled", f"data.sources=[{{path: {data}}}]",
            "data.val_fraction=0", "data.sample_prompts=0", "train.batch_size=4", "train.grad_accum=1", "train.lr=3e-3",
            "train.warmup_ratio=0", "train.logging_steps=1", f"run.root={root}", *more]


def test_sft_trains_in_bf16(tmp_path, tiny_model, sft_data):
    res = run_align("sft", *_sft_args(sft_data, tmp_path, "train.max_steps=12"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "default" / "sft"
    weights = load_file(out / "model" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}  # trained and saved in bf16
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns


def test_ppo_trains_in_bf16(tmp_path, tiny_model):
    res = run_align("ppo", "--config", str(REPO / "configs/ppo.yaml"), "model.name=tiny-llama", f"model.device={DEVICE}",
                    "model.dtype=bfloat16", "run.wandb=disabled", "reward.helpful=null",
                    "reward.safety=null", "critic.init=policy",
                    "reward.function=alignment.rl.rule_rewards:char_fraction", "reward.function_kwargs={chars: aeiou}",
                    "train.max_steps=3", "ppo.rollout_batch_size=8", "ppo.minibatch_size=4", "ppo.micro_batch_size=4",
                    "sampling.max_new_tokens=16", "train.lr=1e-2", "eval.every=0", "eval.max_prompts=4", f"run.root={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "default" / "ppo"
    rows = [m for m in read_metrics(out) if "reward/combined" in m]
    assert len(rows) == 3
    for m in rows:
        assert all(math.isfinite(m[k]) for k in ("reward/combined", "kl/ref", "policy/loss", "value/loss"))
    summary = json.loads((out / "summary.json").read_text())
    if DEVICE.startswith("cuda"):
        assert summary["perf/peak_cuda_gb"] > 0


@pytest.mark.parametrize("layout", ["zero2", "zero3"])
def test_zero_configs_run(layout, tmp_path, tiny_model, sft_data):
    """ZeRO-2/3 on as many GPUs as there are (at most 2): the config validates and the ranks agree."""
    nproc = 2 if DEVICE == "cpu" else min(2, torch.cuda.device_count())
    res = run_align("sft", *_sft_args(sft_data, tmp_path, "train.max_steps=4", "train.batch_size=2"),
                    "--launch", str(REPO / f"configs/accelerate/{layout}.yaml"), "--nproc", str(nproc),
                    env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "default" / "sft" / "summary.json").read_text())
    fp = summary["rank_fingerprints"]
    if nproc > 1:
        assert len(fp) == nproc and fp[0] == pytest.approx(fp[1], rel=1e-12)
    assert math.isfinite(summary["train_loss"])
