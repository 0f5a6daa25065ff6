"""Stages under multi-process launch configs (CPU, 2 processes, gloo): every rank ends with the same
weights, and those match a single-process run with the same global batch (STYLE.md item 8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_align, write_jsonl

pytestmark = pytest.mark.distributed

LAYOUTS = ["ddp", "zero2", "zero3"]  # zero3_offload and fsdp also run; see benchmarks/


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    model = stage_dir / "model"
    name = "model.safetensors" if (model / "model.safetensors").is_file() else "adapter_model.safetensors"
    weights = load_file(model / name)
    # DeepSpeed writes a tied lm_head explicitly; it is the embedding matrix
    head, emb = weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")
    if head is not None and emb is not None and torch.equal(head, emb):
        del weights["lm_head.weight"]
    return weights


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), k


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    rows = []
    for i in range(48):
        a, b = (i * 7) % 50 + 1, (i * 13) % 50 + 1
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", rows)


@pytest.fixture(scope="module")
def sft_single(tmp_path_factory, sft_data, tiny_model) -> Path:
    """The reference: one process, micro-batch 4."""
    root = tmp_path_factory.mktemp("single")
    res = run_align("sft", *_sft_args(sft_data, root), "train.batch_size=4")
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "default" / "sft"


def _sft_args(data: Path, root: Path) -> list[str]:
    return ["--config", str(REPO / "configs/sft.yaml"), "model.name=tiny-llama", "adapter.method=full", "run.wandb=disabled",
            f"data.sources=[{{path: {data}}}]", "data.val_fraction=0", "data.sample_prompts=0", "train.max_steps=6",
            "train.grad_accum=1", "train.lr=1e-3", "train.warmup_ratio=0", f"run.root={root}"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sft_matches_single_process(layout, tmp_path, sft_data, sft_single):
    res = run_align("sft", *_sft_args(sft_data, tmp_path), "train.batch_size=2",
                    "--launch", str(REPO / f"configs/accelerate/{layout}.yaml"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "default" / "sft"
    summary = json.loads((out / "summary.json").read_text())
    fp = summary["rank_fingerprints"]
    assert len(fp) == 2 and fp[0] == pytest.approx(fp[1], rel=1e-12)  # both ranks hold the same weights
    _assert_same(_weights(out), _weights(sft_single))  # 2 x 2 == 1 x 4: same global batch, same result
    single = json.loads((sft_single / "summary.json").read_text())
    assert summary["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)


def test_launch_rejects_a_missing_or_bad_config(tmp_path, sft_data):
    res = run_align("sft", *_sft_args(sft_data, tmp_path), "--launch", "configs/accelerate/nope.yaml")
    assert res.returncode == 2 and "config file not found" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: WARP_DRIVE\n")
    res = run_align("sft", *_sft_args(sft_data, tmp_path), "--launch", str(bad))
    assert res.returncode == 2 and "WARP_DRIVE" in res.stderr


def test_cpu_config_with_several_processes_is_rewritten():
    """accelerate's `use_cpu: true` path would silently run one process: the launcher takes the
    multi-process path instead."""
    import yaml

    from alignment.launch import launch_command

    cfg = Path(REPO / "configs/accelerate/ddp.yaml")
    cmd, env, tmp = launch_command(cfg, ["sft"], nproc=None)
    assert tmp is None and "--config_file" in cmd and env["ALIGN_LAUNCHED"] == "1"
    cpu_cfg = Path(REPO / "tests" / "_cpu_tmp.yaml")
    cpu_cfg.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\nuse_cpu: true\n")
    try:
        cmd, env, tmp = launch_command(cpu_cfg, ["sft"])
        rewritten = yaml.safe_load(Path(tmp).read_text())
        assert rewritten["use_cpu"] is False and rewritten["distributed_type"] == "MULTI_GPU"
        Path(tmp).unlink()
    finally:
        cpu_cfg.unlink()
