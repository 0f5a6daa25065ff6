"""The prepared GPU check (scripts/gpu_check.sh -> benchmarks/gpu_check.py), checked where it can be without a
GPU: its plan and time budget (540 s there, installs included), the bundle installed with no index into a
target folder, the refusals (no torch, a CPU-only torch), one failing import skipping only the steps that
need it, a step killed whole at its limit, and the steps run on the CPU with the tiny model (``--device cpu``),
each writing what it measured into one JSON and its output into one log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from conftest import REPO

from benchmarks import gpu_check

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _script(tmp_path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "ALIGN_GPU_PYTHON": sys.executable, "OUT": str(tmp_path), "ALIGN_GPU_BUNDLE": "none", **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=900, check=False)


def test_the_plan_fits_540_seconds_with_the_installs():
    assert gpu_check.PLAN_LIMIT_S == 540
    assert set(gpu_check.CAPS) == set(gpu_check.STEPS) == set(gpu_check.NEEDS)
    assert sum(gpu_check.CAPS.values()) + gpu_check.INSTALL_RESERVE_S <= gpu_check.PLAN_LIMIT_S
    assert "ALIGN_GPU_CHECK_SECONDS:-540" in SCRIPT.read_text()  # the whole command's default


def test_dry_run_plans_every_step_into_one_json_under_out(tmp_path):
    res = _script(tmp_path, "--dry-run", env={"ALIGN_GPU_CHECK_SECONDS": "540"})
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["steps"]) == ["env", "models", "sft", "ppo", "ppo_ddp", "ppo_zero3", "sft_zero3", "dpo_ddp",
                                     "model_0p5b", "bench"]
    assert {s["status"] for s in report["steps"].values()} == {"planned"}
    assert report["device"] == "cuda" and 500 <= report["budget_s"] <= 540  # what the installs (none here) left
    assert report["install"]["status"] == "none" and report["bundle"] is None
    steps = report["steps"]
    for name in ("sft", "ppo", "sft_zero3", "ppo_zero3"):
        assert "model.name=smollm2-135m" in steps[name]["cmd"] and "model.dtype=bfloat16" in steps[name]["cmd"]
    assert "adapter.method=lora" in steps["sft"]["cmd"] and "train.precision=bf16" in steps["sft"]["cmd"]
    for name, layout in (("ppo_ddp", "ddp"), ("dpo_ddp", "ddp"), ("ppo_zero3", "zero3"), ("sft_zero3", "zero3")):
        assert steps[name]["cmd"].endswith(f"--launch configs/accelerate/{layout}.yaml --nproc 1")
    assert "data.sample_prompts=4" in steps["sft_zero3"]["cmd"] and "data.val_fraction=0.2" in steps["sft_zero3"]["cmd"]
    assert "benchmarks.gpu_models smollm2 --device cuda" in steps["models"]["cmd"]
    big = steps["model_0p5b"]
    assert "benchmarks.gpu_models big" in big["cmd"] and len(big["then"]) == 2
    assert "adapter.method=full" in big["then"][0] and "adapter.method=lora" not in big["then"][0]
    assert big["then"][1].split()[3] == "ppo" and "llama-0p5b" in big["then"][1]
    assert "-m benchmarks gpu" in steps["bench"]["cmd"] and "--big" in steps["bench"]["cmd"]
    assert "--only" not in report["command"] and report["caps_s"] == gpu_check.CAPS


def test_an_interpreter_without_torch_or_with_a_cpu_only_torch_is_refused(tmp_path):
    bare = tmp_path / "python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")  # no site-packages: no torch
    bare.chmod(0o755)
    res = _script(tmp_path, env={"ALIGN_GPU_PYTHON": str(bare)})
    assert res.returncode == 2 and "cannot import torch" in res.stderr
    if not torch.version.cuda:  # this machine's torch is a CPU build
        res = _script(tmp_path)
        assert res.returncode == 2 and "CPU-only torch" in res.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def _wheel(folder, name: str, version: str = "0.1", body: str = "VALUE = 42\n"):
    """A minimal pure-Python wheel (what pip needs to install one)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", body)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


def test_the_bundle_installs_with_no_index_into_a_target_that_goes_first_on_pythonpath(tmp_path):
    """Nothing is fetched: the wheels go into ALIGN_GPU_SITE; a step that cannot run says why, and the JSON says
    how the install went. A bundle for another Python is not installed, and says so."""
    bundle = tmp_path / "bundle"
    _wheel(bundle / "wheels", "alignfakepkg")
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    (bundle / "manifest.json").write_text(json.dumps({"python": version, "wheels": [{"name": "alignfakepkg", "version": "0.1"}]}))
    site = tmp_path / "site"
    out = tmp_path / "out"
    res = _script(out, "--device", "cpu", "--only", "models",
                  env={"ALIGN_GPU_BUNDLE": str(bundle), "ALIGN_GPU_SITE": str(site), "PIP_INDEX_URL": "http://127.0.0.1:9/nope"})
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["install"]["status"] == "ok" and report["install"]["site"] == str(site), res.stderr
    assert (site / "alignfakepkg" / "__init__.py").is_file()
    assert report["bundle"]["wheels"] == {"alignfakepkg": "0.1"}
    assert report["steps"]["models"] == {"status": "skipped", "reason": "the env probe did not run or failed (see the env step)"}
    assert res.returncode == 1 and report["ok"] is False  # a selected step that did not run is not a pass

    (bundle / "manifest.json").write_text(json.dumps({"python": "3.99"}))
    res = _script(out, "--device", "cpu", "--only", "models", env={"ALIGN_GPU_BUNDLE": str(bundle),
                                                                     "ALIGN_GPU_SITE": str(tmp_path / "site2")})
    assert json.loads((out / "gpu_check.json").read_text())["install"]["status"].startswith(
        "skipped: the bundle is for Python 3.99")
    assert not (tmp_path / "site2").exists()

    (bundle / "wheels" / "broken-0.1-py3-none-any.whl").write_bytes(b"not a zip")
    (bundle / "manifest.json").write_text(json.dumps({"python": version}))
    res = _script(out, "--device", "cpu", "--only", "models", env={"ALIGN_GPU_BUNDLE": str(bundle),
                                                                     "ALIGN_GPU_SITE": str(tmp_path / "site3")})
    assert json.loads((out / "gpu_check.json").read_text())["install"]["status"].startswith("failed: ")  # and the JSON is there


def test_each_package_is_probed_on_its_own_and_a_failing_one_blocks_only_its_steps():
    res = subprocess.run([sys.executable, "-c", gpu_check.ENV_PROBE, "torch,align_no_such_package,yaml"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=True)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["packages"]["torch"]["ok"] and info["packages"]["yaml"]["ok"]  # probed after the failure
    assert info["packages"]["align_no_such_package"] == {"ok": False, "error": info["packages"]["align_no_such_package"]["error"]}
    assert "ModuleNotFoundError" in info["packages"]["align_no_such_package"]["error"]
    assert info["cuda_available"] == torch.cuda.is_available()

    packages = {p: {"ok": True} for p in gpu_check.PROBED}
    packages["trl"] = {"ok": False, "error": "ImportError: no trl"}
    report = {"steps": {"env": {"status": "ok", "metrics": {"packages": packages, "cuda_available": True}}}}
    why = {n: gpu_check.blocked(n, report, "cuda") for n in gpu_check.STEPS}
    assert why["sft"] == why["dpo_ddp"] == why["sft_zero3"] == "needs trl (ImportError: no trl)"
    assert why["ppo"] is None and why["ppo_ddp"] is None and why["models"] is None and why["env"] is None
    assert why["ppo_zero3"] == "needs trl (ImportError: no trl)"  # DeepSpeed's PPO generation uses TRL's hooks
    report["steps"]["env"]["metrics"]["cuda_available"] = False
    assert gpu_check.blocked("ppo", report, "cuda").startswith("no CUDA GPU") and gpu_check.blocked("ppo", report, "cpu") is None
    report["steps"]["env"] = {"status": "failed"}
    assert "env probe" in gpu_check.blocked("ppo", report, "cpu")


def test_a_step_past_its_limit_is_killed_with_every_process_it_started(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(120)")
    t0 = time.time()
    res = gpu_check.run_step("ppo", {"cmd": [sys.executable, "-c", script]}, 3, "cpu", dict(os.environ), tmp_path / "logs")
    assert res["status"] == "timeout" and res["limit_s"] == 3 and time.time() - t0 < 30
    assert "started" in (tmp_path / "logs" / "ppo.log").read_text()
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # reaped by init shortly after the kill
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {grandchild} outlived its step")


def test_steps_that_do_not_fit_the_budget_are_skipped_and_said_so(tmp_path):
    out = tmp_path / "check.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--budget", "5", "--out", str(out),
                          "--bundle", "none"], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    report = json.loads(out.read_text())
    assert res.returncode == 1 and report["ok"] is False
    assert {s["status"] for s in report["steps"].values()} == {"skipped"}
    assert all(s["reason"].startswith("budget: ") for s in report["steps"].values())


def test_a_random_smollm2_shaped_model_is_built_from_a_config_and_tokenizer_alone(tmp_path, tiny_model):
    """What the GPU machine gets instead of the real weights: the bundle's config and tokenizer, random weights."""
    from foundation.models import builtin_path, load_causal_lm, load_tokenizer
    from benchmarks.gpu_models import RANDOM_MARK, build_random

    src = builtin_path("tiny-llama")
    bundle_model = tmp_path / "bundle-model"
    bundle_model.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            (bundle_model / f.name).write_bytes(f.read_bytes())
    dest = tmp_path / "built"
    n = build_random(bundle_model, dest, overrides={"num_hidden_layers": 1}, dtype="float32")
    model = load_causal_lm(str(dest), device="cpu")
    assert model.config.num_hidden_layers == 1 and sum(p.numel() for p in model.parameters()) == n
    assert model.config.hidden_size == json.loads((src / "config.json").read_text())["hidden_size"]
    assert json.loads((dest / RANDOM_MARK).read_text())["overrides"] == {"num_hidden_layers": 1}
    tok = load_tokenizer(str(dest))
    assert tok.chat_template == load_tokenizer("tiny-llama").chat_template and len(tok) == model.config.vocab_size
    assert model.generation_config.eos_token_id == load_causal_lm("tiny-llama", device="cpu").generation_config.eos_token_id


def test_steps_run_on_the_cpu_and_report_what_they_measured(tmp_path, tiny_model):
    """env, the models (with a bundle: a random SmolLM2-shaped model from its config alone), SFT with samples and
    PPO (bf16, tiny model) under ZeRO-3 with one process, DPO under ddp.yaml: every step ok, its numbers in the
    JSON, its output in the log. The single-process sft and ppo run the same arguments without --launch, ppo_ddp
    is ppo_zero3 under another config, bench measures nothing without a GPU and model_0p5b is GPU only: left out
    to keep this test's time (the dry run checks their commands)."""
    from foundation.models import builtin_path

    bundle = tmp_path / "bundle"
    (bundle / "smollm2-135m").mkdir(parents=True)
    for f in builtin_path("tiny-llama").iterdir():  # a SmolLM2 stand-in of the tiny shape: config and tokenizer only
        if not f.name.endswith(".safetensors"):
            (bundle / "smollm2-135m" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "check.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--budget", "800", "--out", str(out),
                          "--work", str(tmp_path / "work"), "--bundle", str(bundle),
                          "--skip", "sft,ppo,ppo_ddp,bench,model_0p5b"],
                         cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads(out.read_text())
    assert res.returncode == 0, json.dumps(report, indent=1)[-4000:]
    steps = report["steps"]
    assert [n for n, s in steps.items() if s["status"] == "ok"] == ["env", "models", "ppo_zero3", "sft_zero3", "dpo_ddp"]
    env = steps["env"]["metrics"]
    assert env["packages"]["torch"]["version"] == torch.__version__ and env["packages"]["deepspeed"]["ok"]
    models = steps["models"]["metrics"]
    assert models["smollm2"] == "random (bundle config and tokenizer)" and models["path"].startswith(str(tmp_path / "work"))
    assert (tmp_path / "work" / "cache" / "smollm2-135m-instruct-v1" / "random_weights.json").is_file()
    ppo = steps["ppo_zero3"]["metrics"]
    assert ppo["iterations"] == 2 and ppo["tokens_per_s"] > 0 and ppo["launch"]["type"] == "DistributedType.DEEPSPEED"
    assert ppo["launch"]["processes"] == 1
    sft = steps["sft_zero3"]["metrics"]
    assert sft["steps"] == 2 and sft["loss_first"] > 0 and sft["sequences_per_s"] > 0
    assert sft["samples"] == {"ok": True, "samples": 2}
    assert steps["dpo_ddp"]["metrics"]["steps"] == 2
    assert report["ok"] is True and 0 < report["seconds"] < 800
    log = out.with_suffix(".log").read_text()
    for name in ("env", "models", "ppo_zero3", "sft_zero3", "dpo_ddp"):
        assert f"===== {name}: ok in " in log and (tmp_path / "work" / "logs" / f"{name}.log").is_file()
    assert "SFT done" in (tmp_path / "work" / "logs" / "sft_zero3.log").read_text()
