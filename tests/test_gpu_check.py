"""The prepared GPU check (scripts/gpu_check.sh -> benchmarks/gpu_check.py), checked where it can be
without a GPU: its plan, its time budget, its refusal of a CPU-only torch, and its steps run on
the CPU with the tiny model (``--device cpu``), each writing what it measured into one JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _script(tmp_path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "ALIGN_GPU_PYTHON": sys.executable, "OUT": str(tmp_path), **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=900, check=False)


def test_dry_run_plans_every_step_into_one_json_under_out(tmp_path):
    res = _script(tmp_path, "--dry-run", env={"ALIGN_GPU_CHECK_SECONDS": "470"})
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["steps"]) == ["env", "models", "sft", "ppo", "ppo_ddp", "dpo_ddp", "pytest_gpu", "bench", "model_0p5b"]
    assert {s["status"] for s in report["steps"].values()} == {"planned"}
    assert report["device"] == "cuda" and 400 <= report["budget_s"] <= 470  # what the installs (none here) left
    steps = report["steps"]
    for name in ("sft", "ppo"):
        assert "model.name=smollm2-135m" in steps[name]["cmd"] and "model.dtype=bfloat16" in steps[name]["cmd"]
    for name in ("ppo_ddp", "dpo_ddp"):
        assert steps[name]["cmd"].endswith("--launch configs/accelerate/ddp.yaml --nproc 1")
    assert "-m gpu" in steps["pytest_gpu"]["cmd"] and "-m benchmarks gpu" in steps["bench"]["cmd"]
    assert len(steps["model_0p5b"]["then"]) == 2 and "adapter.method=full" in steps["model_0p5b"]["then"][0]


def test_a_cpu_only_torch_is_refused_before_anything_runs(tmp_path):
    if torch.version.cuda:
        return  # this machine has a CUDA build: nothing to refuse
    res = _script(tmp_path)
    assert res.returncode == 2 and "CPU-only torch" in res.stderr and "torch==2.13.0" in res.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_steps_that_do_not_fit_the_budget_are_skipped_and_said_so(tmp_path):
    out = tmp_path / "check.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--budget", "5", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    steps = json.loads(out.read_text())["steps"]
    assert {s["status"] for s in steps.values()} == {"skipped"}
    assert all(s["reason"].startswith("budget: ") for s in steps.values())


def test_steps_run_on_the_cpu_and_report_what_they_measured(tmp_path):
    """env, SFT and PPO (bf16, tiny model), PPO and DPO under ddp.yaml with one process, the GPU
    benchmark (which measures nothing without a GPU): every step ok, its numbers in the JSON."""
    out = tmp_path / "check.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--budget", "800", "--out", str(out),
                          "--work", str(tmp_path / "work"), "--skip", "pytest_gpu,model_0p5b"],
                         cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads(out.read_text())
    assert res.returncode == 0, json.dumps(report, indent=1)[-4000:]
    steps = report["steps"]
    assert [n for n, s in steps.items() if s["status"] == "ok"] == ["env", "models", "sft", "ppo", "ppo_ddp", "dpo_ddp", "bench"]
    assert steps["env"]["metrics"]["torch"] == torch.__version__
    sft = steps["sft"]["metrics"]
    assert sft["steps"] == 4 and sft["loss_first"] > 0 and sft["sequences_per_s"] > 0
    ppo = steps["ppo"]["metrics"]
    assert ppo["iterations"] == 2 and ppo["tokens_per_s"] > 0 and ppo["launch"]["processes"] == 1
    assert steps["ppo_ddp"]["metrics"]["iterations"] == 2 and steps["ppo_ddp"]["cmd"].endswith("--nproc 1")
    assert steps["dpo_ddp"]["metrics"]["steps"] == 2
    assert report["ok"] is True and 0 < report["seconds"] < 800
