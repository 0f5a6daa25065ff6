"""The prepared GPU check: one unattended run on a CUDA machine with no network, one JSON.

    make gpu-bundle                               # here, where PyPI is reachable: wheels + SmolLM2 config (gpu-bundle/)
    bash scripts/gpu_check.sh                     # there: installs the bundle, then this (540 s in all)
    python -m benchmarks.gpu_check [--budget 510] [--out FILE] [--only a,b] [--skip a,b] [--device cuda|cpu] [--dry-run]
                                   [--bundle DIR] [--work DIR]

Steps, in this order; each runs as child processes (their own process group, killed whole at the
step's limit) with a limit cut to what is left of the budget, and is skipped, saying why, when a
package it needs failed to import, when there is no CUDA GPU, or when less than ``MIN_STEP_S`` is left:

- ``env``: each package imported on its own (one failing import fails only the steps that need it),
  GPU, driver, torch's CUDA build, bf16 support, and the bf16 matmul FLOP/s (the MFU denominator).
- ``models``: SmolLM2-135M into the check's own cache: the real model when it can be had offline,
  else random weights of its shape from the bundle's config and tokenizer (``benchmarks.gpu_models``).
- ``sft``: ``align sft`` on SmolLM2-135M, LoRA, bf16: the loss is finite and falls, weights saved.
- ``ppo``: ``align ppo``, bf16, a rule reward (no reward models exist there), one process.
- ``ppo_ddp``: the same under ``--launch configs/accelerate/ddp.yaml --nproc 1``: a real process group
  over NCCL (which takes GPU tensors only); PPO's summary names the backend.
- ``ppo_zero3``: PPO under ``zero3.yaml --nproc 1`` (DeepSpeed: one engine for policy and critic).
- ``sft_zero3``: SFT under ``zero3.yaml --nproc 1`` with validation samples written after training.
- ``dpo_ddp``: ``align dpo`` under ``ddp.yaml --nproc 1``.
- ``model_0p5b``: a ~0.5B Llama (SmolLM2's tokenizer, random weights) built on the GPU, then full SFT
  and LoRA PPO on it, bf16: sequences/s, tokens/s and peak memory at that size.
- ``bench``: ``python -m benchmarks gpu``: SFT tokens/s, MFU against the measured bf16 matmul and peak
  memory (LoRA and full on SmolLM2, full on the 0.5B model), a PPO iteration's phase split.

Every step's output goes to ``<work>/logs/<step>.log`` and, as one section per step, to
``gpu_check.log`` beside the JSON; the JSON (``$OUT/gpu_check.json`` when ``OUT`` is set, else
``benchmarks/results/gpu_check.json``) is written before the first step and after every step.
``--device cpu`` runs the steps on the CPU with the tiny model and small sizes (it checks this script
on machines without a GPU, CI included; ``model_0p5b`` is GPU only). ``--dry-run`` writes the plan.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MIN_STEP_S = 20
PLAN_LIMIT_S = 540  # the whole command there, installs included: 9 minutes of a 10-minute cap, time left to rerun
INSTALL_RESERVE_S = 30  # what scripts/gpu_check.sh may spend installing the bundle before the steps
STEPS = ("env", "models", "sft", "ppo", "ppo_ddp", "ppo_zero3", "sft_zero3", "dpo_ddp", "model_0p5b", "bench")
# seconds each step may take at most (the budget may cut them); they add up to PLAN_LIMIT_S - INSTALL_RESERVE_S
CAPS = {"env": 25, "models": 25, "sft": 40, "ppo": 45, "ppo_ddp": 45, "ppo_zero3": 55, "sft_zero3": 50, "dpo_ddp": 45,
        "model_0p5b": 120, "bench": 60}
# on a CPU (--device cpu: CI) the steps are small but slower, and DeepSpeed's first use there compiles an op (~1-2 min)
CPU_CAP_FACTOR = 3
LOG_SECTION_BYTES = 200_000  # of each step's output in the combined log (the whole output stays in <work>/logs)

PROBED = ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "deepspeed", "yaml", "numpy", "safetensors",
          "tokenizers", "alignment")
TRAIN = ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "alignment")
RL = ("torch", "transformers", "accelerate", "peft", "alignment")
NEEDS: dict[str, tuple[str, ...]] = {
    "env": (), "models": ("torch", "transformers", "alignment"), "sft": TRAIN, "ppo": RL, "ppo_ddp": RL,
    "ppo_zero3": (*RL, "trl", "deepspeed"), "sft_zero3": (*TRAIN, "deepspeed"), "dpo_ddp": TRAIN, "model_0p5b": TRAIN,
    "bench": TRAIN,
}

ENV_PROBE = r"""
import importlib, json, os, platform, sys, time
info = {"python": platform.python_version(), "executable": sys.executable, "packages": {}}
for name in sys.argv[1].split(","):
    t = time.time()
    try:
        mod = importlib.import_module(name)
        if name == "alignment":  # the project: what every stage imports first
            for sub in ("foundation.training", "foundation.models", "foundation.runs", "alignment.ppo.config"):
                importlib.import_module(sub)
        info["packages"][name] = {"ok": True, "version": getattr(mod, "__version__", None),
                                  "file": os.path.dirname(getattr(mod, "__file__", "") or ""),
                                  "seconds": round(time.time() - t, 2)}
    except BaseException as exc:  # noqa: BLE001 - any failure is a finding, and the next package still gets its try
        info["packages"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600]}
torch = sys.modules.get("torch")
if torch is not None:
    info.update(torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                nccl=torch.distributed.is_available() and torch.distributed.is_nccl_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported(),
                    memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
        from benchmarks.gpu import matmul_flops_cuda  # the measurement the GPU benchmark's MFU reads

        info["matmul_bf16_tflops"] = round(matmul_flops_cuda() / 1e12, 1)
else:
    info["cuda_available"] = False
print(json.dumps(info))
"""


def _with(args: list[str], key: str, value: str) -> list[str]:
    """``args`` with the ``key=...`` override replaced by ``key=value``."""
    return [f"{key}={value}" if a.startswith(f"{key}=") else a for a in args]


def plan(device: str, work: Path, bundle: Path | None = None, user_cache: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every step's command(s) (argv), the run folder(s) they write and what the check reads there."""
    py, cpu = sys.executable, device == "cpu"
    model = "tiny-llama" if cpu else "smollm2-135m"
    common = [f"model.name={model}", f"model.device={device}", "model.dtype=bfloat16", "run.wandb=disabled", "run.log_level=info"]
    sft = ["sft", "--config", "configs/sft.yaml", *common, "train.precision=bf16", "adapter.method=lora", "train.grad_accum=1",
           "train.warmup_ratio=0", "train.logging_steps=1", "data.sample_prompts=0", "data.val_fraction=0",
           f"train.max_steps={4 if cpu else 30}", f"train.batch_size={2 if cpu else 8}", f"train.lr={1e-3 if cpu else 2e-4}",
           "train.save_steps=1000"]
    if cpu:  # tokenising the whole bundled set is most of a CPU step's time
        sft.append("data.sources=[{path: 'bundled:sft', limit: 24}]")
    ppo = ["ppo", "--config", "configs/ppo.yaml", *common, "reward.helpful=null", "reward.safety=null", "critic.init=policy",
           "reward.function=alignment.rl.rule_rewards:target_length", "reward.function_kwargs={target: 40}",
           f"train.max_steps={2 if cpu else 4}", f"ppo.rollout_batch_size={4 if cpu else 32}",
           f"ppo.minibatch_size={4 if cpu else 16}", f"ppo.micro_batch_size={4 if cpu else 16}",
           f"sampling.max_new_tokens={8 if cpu else 64}", f"sampling.batch_size={4 if cpu else 32}", "eval.every=0",
           "eval.max_prompts=4", "eval.keep_best=false"]
    dpo = ["dpo", "--config", "configs/dpo.yaml", *common, "train.precision=bf16", "train.grad_accum=1", "train.warmup_ratio=0",
           "train.logging_steps=1", f"train.max_steps={2 if cpu else 10}", f"train.batch_size={2 if cpu else 8}",
           "data.val_fraction=0.1", "train.max_length=256", "train.eval_steps=1000", "train.save_steps=1000",
           f"data.sources=[{{path: 'bundled:comparisons', limit: {24 if cpu else 200}}}]"]
    sft_samples = [*_with(_with(_with(sft, "data.sample_prompts", "2" if cpu else "4"), "data.val_fraction", "0.2"),
                          "train.max_steps", "2" if cpu else "10"), f"data.sample_max_new_tokens={8 if cpu else 32}"]

    def launch(layout: str) -> list[str]:
        return ["--launch", f"configs/accelerate/{layout}.yaml", "--nproc", "1"]

    align = [py, "-m", "alignment.cli"]
    big = work / "llama-0p5b"
    models = [py, "-m", "benchmarks.gpu_models", "smollm2", "--device", device]
    if bundle is not None:
        models += ["--bundle", str(bundle)]
    if user_cache is not None:
        models += ["--user-cache", str(user_cache)]
    tiny = [py, "-m", "benchmarks.gpu_models", "tiny", *(["--user-cache", str(user_cache)] if user_cache else [])]
    steps: dict[str, dict[str, Any]] = {
        "env": {"cmd": [py, "-c", ENV_PROBE, ",".join(PROBED)]},
        # on the CPU the stages use the tiny model; with a bundle its random SmolLM2 is still built (a check of that path)
        "models": {"cmd": tiny, "then": [[*models, "--from-bundle"]] if bundle is not None else []} if cpu else {"cmd": models},
        "sft": {"cmd": [*align, *sft, f"run.root={work / 'sft'}"], "out": work / "sft" / "default" / "sft",
                "batch": 2 if cpu else 8},
        "ppo": {"cmd": [*align, *ppo, f"run.root={work / 'ppo'}"], "out": work / "ppo" / "default" / "ppo"},
        "ppo_ddp": {"cmd": [*align, *_with(ppo, "train.max_steps", "2"), f"run.root={work / 'ppo_ddp'}", *launch("ddp")],
                    "out": work / "ppo_ddp" / "default" / "ppo", "backend": "nccl"},
        "ppo_zero3": {"cmd": [*align, *_with(ppo, "train.max_steps", "2"), f"run.root={work / 'ppo_zero3'}", *launch("zero3")],
                      "out": work / "ppo_zero3" / "default" / "ppo"},
        "sft_zero3": {"cmd": [*align, *sft_samples, f"run.root={work / 'sft_zero3'}", *launch("zero3")],
                      "out": work / "sft_zero3" / "default" / "sft", "batch": 2 if cpu else 8,
                      "samples": 2 if cpu else 4},
        "dpo_ddp": {"cmd": [*align, *dpo, f"run.root={work / 'dpo_ddp'}", *launch("ddp")],
                    "out": work / "dpo_ddp" / "default" / "dpo"},
        "model_0p5b": {"cmd": [py, "-m", "benchmarks.gpu_models", "big", str(big), "--device", device], "then": [
            [*align, *_with(_with(_with(_with(sft, "model.name", str(big)), "adapter.method", "full"), "train.max_steps", "10"),
                            "train.lr", "1e-4"), "train.max_length=512", f"run.root={work / 'sft_0p5b'}"],
            [*align, *_with(_with(ppo, "model.name", str(big)), "train.max_steps", "2"), f"run.root={work / 'ppo_0p5b'}"]],
            "out": work / "sft_0p5b" / "default" / "sft", "out2": work / "ppo_0p5b" / "default" / "ppo", "batch": 8},
        "bench": {"cmd": [py, "-m", "benchmarks", "gpu", "--steps", "5", "--batch", "8", "--seq-len", "512",
                          "--ppo-iterations", "2", "--ppo-batch", "16", "--new-tokens", "64", "--big", str(big)],
                  "result": REPO / "benchmarks" / "results" / "gpu.json"},
    }
    if cpu:  # the 0.5B model is for GPUs
        steps["model_0p5b"] = {"cmd": [py, "-c", "print('0.5B model: GPU only')"]}
        steps["bench"]["cmd"] = steps["bench"]["cmd"][:-2]
    return steps


# ---------------------------------------------------------------------------------------------
# reading what a step wrote


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    from foundation.runs import read_jsonl

    return read_jsonl(path) if path.is_file() else []


def _summary(out: Path) -> dict:
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def check_sft(out: Path, batch: int | None = None) -> dict[str, Any]:
    losses = [m["loss"] for m in _metrics(out) if "loss" in m]
    s = _summary(out)
    k = max(1, len(losses) // 4)
    ok = bool(losses) and all(math.isfinite(x) for x in losses) and (out / "model").is_dir()
    return {"ok": ok, "steps": len(losses), "loss_first": sum(losses[:k]) / k if losses else None,
            "loss_last": sum(losses[-k:]) / k if losses else None,
            "loss_falls": bool(losses) and sum(losses[-k:]) < sum(losses[:k]),
            "train_seconds": s.get("train_seconds"), "params_total": s.get("params_total"),
            "peak_cuda_gb": s.get("perf/peak_cuda_gb"),
            "sequences_per_s": round(len(losses) * batch / s["train_seconds"], 2) if batch and s.get("train_seconds") else None}


def check_ppo(out: Path) -> dict[str, Any]:
    rows = [m for m in _metrics(out) if "reward/combined" in m]
    keys = ("reward/combined", "kl/ref", "policy/loss", "value/loss")
    s = _summary(out)
    ok = bool(rows) and all(math.isfinite(m[k]) for m in rows for k in keys) and (out / "model").is_dir()
    return {"ok": ok, "iterations": len(rows), "reward_first": rows[0]["reward/combined"] if rows else None,
            "reward_last": rows[-1]["reward/combined"] if rows else None,
            "tokens_per_s": rows[-1].get("perf/tokens_per_s") if rows else None,
            "gen_tokens_per_s": rows[-1].get("perf/gen_tokens_per_s") if rows else None,
            "seconds_per_iteration": s.get("seconds_per_iteration"), "peak_cuda_gb": s.get("perf/peak_cuda_gb"),
            "launch": s.get("launch")}


def check_dpo(out: Path) -> dict[str, Any]:
    losses = [m["loss"] for m in _metrics(out) if "loss" in m]
    return {"ok": bool(losses) and all(math.isfinite(x) for x in losses) and (out / "model").is_dir(), "steps": len(losses),
            "summary": {k: v for k, v in _summary(out).items() if isinstance(v, (int, float, str)) or v is None}}


def check_samples(out: Path, expected: int) -> dict[str, Any]:
    path = out / "samples.jsonl"
    from foundation.runs import read_jsonl

    rows = read_jsonl(path) if path.is_file() else []
    return {"ok": len(rows) == expected and all(isinstance(r.get("response"), str) for r in rows), "samples": len(rows)}


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def read_step(name: str, spec: dict[str, Any], outputs: list[str], device: str, t0: float) -> dict[str, Any]:
    """What the step's files and output say; ``ok`` decides its status."""
    if name == "env":
        info = _last_json(outputs[0])
        return {"ok": bool(info) and info.get("packages", {}).get("torch", {}).get("ok", False), **info}
    if name == "models":
        info: dict[str, Any] = {"ok": True}
        for text in outputs:
            info.update(_last_json(text))
        return info
    if name == "sft":
        return check_sft(spec["out"], spec.get("batch"))
    if name in ("ppo", "ppo_ddp", "ppo_zero3"):
        m = check_ppo(spec["out"])
        if spec.get("backend") and device != "cpu":  # a real process group over NCCL, one process
            m["ok"] = m["ok"] and (m.get("launch") or {}).get("backend") == spec["backend"]
        return m
    if name == "sft_zero3":
        m = check_sft(spec["out"], spec.get("batch"))
        m["samples"] = check_samples(spec["out"], spec["samples"])
        m["ok"] = m["ok"] and m["samples"]["ok"]
        return m
    if name == "dpo_ddp":
        return check_dpo(spec["out"])
    if name == "model_0p5b" and "out" in spec:
        m = {"build": _last_json(outputs[0]), "sft": check_sft(spec["out"], spec.get("batch")), "ppo": check_ppo(spec["out2"])}
        m["ok"] = m["sft"]["ok"] and m["ppo"]["ok"]
        return m
    if name == "bench":
        if spec["result"].is_file() and spec["result"].stat().st_mtime >= t0:
            data = json.loads(spec["result"].read_text())
            return {"ok": True, **{k: data.get(k) for k in ("gpu", "matmul_bf16_tflops", "sft", "flops")},
                    "ppo_median": (data.get("ppo") or {}).get("median")}
        # without a GPU it measures nothing (expected on the CPU)
        return {"ok": device == "cpu", "note": "python -m benchmarks gpu wrote no result", "stdout": outputs[0][-300:]}
    return {"ok": True}


# ---------------------------------------------------------------------------------------------
# running


def _kill_group(proc: subprocess.Popen) -> None:
    """End the step's whole process group (accelerate launch's workers included), politely first."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(name: str, spec: dict[str, Any], limit: float, device: str, env: dict[str, str], logs: Path) -> dict[str, Any]:
    """Run one step's command(s) within ``limit`` seconds, output to ``logs/<name>.log``; parse what it wrote."""
    env = {**env, **spec.get("env", {})}
    t0 = time.time()
    result: dict[str, Any] = {"cmd": " ".join(str(c) for c in spec["cmd"]), "log": str(logs / f"{name}.log")}
    outputs: list[str] = []
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.log").open("w", encoding="utf-8", errors="replace") as log:
        for cmd in [spec["cmd"], *spec.get("then", [])]:
            log.write(f"$ {' '.join(str(c) for c in cmd)}\n")
            log.flush()
            start = log.tell()
            left = limit - (time.time() - t0)
            proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                before = _extension_locks()
                _kill_group(proc)
                result.update(status="timeout", seconds=round(time.time() - t0, 1), limit_s=round(limit),
                              tail=_tail(logs / f"{name}.log"))
                if before:  # a build killed half-way leaves its lock, and every later build of that op waits on it forever
                    result["extension_locks"] = before
                    print(f"   warning: torch extension build locks exist after killing {name} (remove them if no build is "
                          f"running, or later DeepSpeed steps wait forever): {', '.join(before)}", flush=True)
                return result
            log.flush()
            text = (logs / f"{name}.log").read_text(errors="replace")
            outputs.append(text[start:] if start <= len(text) else text)
            if rc != 0:
                result.update(status="failed", rc=rc, seconds=round(time.time() - t0, 1), tail=_tail(logs / f"{name}.log"))
                return result
    result["seconds"] = round(time.time() - t0, 1)
    try:
        metrics = read_step(name, spec, outputs, device, t0)
    except (OSError, ValueError, KeyError) as exc:
        metrics = {"ok": False, "error": f"reading the step's results: {type(exc).__name__}: {exc}"}
    result.update(status="ok" if metrics.get("ok", True) else "failed", metrics=metrics)
    if result["status"] == "failed":
        result["tail"] = _tail(logs / f"{name}.log")
    return result


def _extension_locks() -> list[str]:
    """Lock files of torch extension builds (DeepSpeed compiles its ops on first use) that exist now."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return sorted(str(p) for p in root.glob("*/*/lock"))


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def blocked(name: str, report: dict, device: str) -> str | None:
    """Why ``name`` cannot run given the env probe (None when it can)."""
    if name == "env":
        return None
    env = report["steps"].get("env", {})
    if env.get("status") != "ok":
        return "the env probe did not run or failed (see the env step)"
    packages = env["metrics"].get("packages", {})
    bad = [f"{p} ({packages.get(p, {}).get('error', 'not probed')})" for p in NEEDS[name] if not packages.get(p, {}).get("ok")]
    if bad:
        return "needs " + "; ".join(bad)
    if device == "cuda" and not env["metrics"].get("cuda_available"):
        return "no CUDA GPU (torch.cuda.is_available() is False; see the env step)"
    return None


def default_out() -> Path:
    return (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
            else REPO / "benchmarks" / "results" / "gpu_check.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, help="seconds for all steps",
                   default=float(os.environ.get("ALIGN_GPU_CHECK_BUDGET", PLAN_LIMIT_S - INSTALL_RESERVE_S)))
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON (default: $OUT/gpu_check.json, else benchmarks/results/gpu_check.json); the log goes beside it")
    p.add_argument("--only", default="", help="comma-separated steps to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: check this script on a machine without a GPU")
    p.add_argument("--bundle", type=Path, default=None,
                   help="the bundle from make gpu-bundle (default: gpu-bundle/ when it exists; none: no bundle): "
                        "SmolLM2's config and tokenizer")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the runs, logs and model cache (default: a temporary folder)")
    p.add_argument("--dry-run", action="store_true", help="write the plan without running anything")
    a = p.parse_args(argv)
    only, skip = {s for s in a.only.split(",") if s}, {s for s in a.skip.split(",") if s}
    unknown = (only | skip) - set(STEPS)
    if unknown:
        p.error(f"unknown step(s) {', '.join(sorted(unknown))}; steps: {', '.join(STEPS)}")
    bundle = a.bundle if a.bundle is not None else (REPO / "gpu-bundle" if (REPO / "gpu-bundle").is_dir() else None)
    if bundle is not None and str(bundle) == "none":
        bundle = None
    if bundle is not None and not bundle.is_dir():
        p.error(f"--bundle {bundle}: no such folder (make gpu-bundle builds it)")
    out = a.out or default_out()
    if a.work is None:
        a.work = (Path(tempfile.gettempdir()) / "align-gpu-check-WORK" if a.dry_run
                  else Path(tempfile.mkdtemp(prefix="align-gpu-check-")))
    work = a.work.resolve()
    from foundation.models import cache_root

    user_cache = cache_root()  # before the steps get a cache of their own (random weights never land in the user's)
    steps = plan(a.device, work, bundle.resolve() if bundle else None, user_cache)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "ALIGN_CACHE": str(work / "cache")}
    if a.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    started = time.time()
    report: dict[str, Any] = {"check": "gpu", "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "command": " ".join(["python -m benchmarks.gpu_check",
                                                   *(argv if argv is not None else sys.argv[1:])]),
                              "device": a.device, "budget_s": a.budget, "plan_limit_s": PLAN_LIMIT_S,
                              "caps_s": {n: CAPS[n] for n in STEPS},
                              "install": {"seconds": _float(os.environ.get("ALIGN_INSTALL_SECONDS")),
                                          "status": os.environ.get("ALIGN_INSTALL_STATUS"),
                                          "site": os.environ.get("ALIGN_INSTALL_SITE")},
                              "bundle": _bundle_info(bundle), "work": str(work), "log": str(out.with_suffix(".log")),
                              "steps": {n: {"status": "pending"} for n in STEPS}}
    log_path = out.with_suffix(".log")
    if not a.dry_run:
        out.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"gpu check {report['created_at']}: {report['command']}\n")
    _write(out, report, started)  # the plan, before anything runs
    for name in STEPS:
        if (only and name not in only) or name in skip:
            report["steps"][name] = {"status": "skipped", "reason": "not selected"}
            continue
        spec = steps[name]
        if a.dry_run:
            report["steps"][name] = {"status": "planned", "cmd": " ".join(str(c) for c in spec["cmd"]),
                                     "then": [" ".join(str(c) for c in t) for t in spec.get("then", [])], "cap_s": CAPS[name]}
            continue
        left = a.budget - (time.time() - started)
        why = f"budget: {left:.0f} s left" if left < MIN_STEP_S else blocked(name, report, a.device)
        if why is not None:
            report["steps"][name] = {"status": "skipped", "reason": why}
            _write(out, report, started)
            continue
        cap = CAPS[name] * (CPU_CAP_FACTOR if a.device == "cpu" else 1)
        print(f"== {name} (up to {min(cap, left):.0f} s)", flush=True)
        report["steps"][name] = res = run_step(name, spec, min(cap, left), a.device, env, work / "logs")
        print(f"   {res['status']} in {res.get('seconds')} s {json.dumps(res.get('metrics', {}))[:300]}", flush=True)
        _append_log(log_path, name, res, work / "logs" / f"{name}.log")
        _write(out, report, started)  # after every step: a killed run keeps what it measured
    _write(out, report, started)
    ran = [s for s in report["steps"].values() if s["status"] not in ("skipped", "planned")]
    skipped = [n for n, s in report["steps"].items() if s["status"] == "skipped" and s["reason"] != "not selected"]
    print(f"wrote {out}: {sum(s['status'] == 'ok' for s in ran)}/{len(ran)} steps ok in {report['seconds']} s"
          + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    return 0 if report["ok"] else 1


def _bundle_info(bundle: Path | None) -> dict | None:
    if bundle is None:
        return None
    manifest = bundle / "manifest.json"
    if not manifest.is_file():
        return {"path": str(bundle), "manifest": None}
    m = json.loads(manifest.read_text())
    return {"path": str(bundle), "created_at": m.get("created_at"), "python": m.get("python"),
            "wheels": {w["name"]: w["version"] for w in m.get("wheels", [])}}


def _append_log(path: Path, name: str, res: dict, step_log: Path) -> None:
    text = step_log.read_text(errors="replace") if step_log.is_file() else ""
    if len(text) > LOG_SECTION_BYTES:
        cut = len(text) - LOG_SECTION_BYTES
        text = f"[... {cut} characters left out; the whole log: {step_log}]\n" + text[-LOG_SECTION_BYTES:]
    with path.open("a", encoding="utf-8") as fh:
        fh.write(f"\n===== {name}: {res['status']} in {res.get('seconds')} s =====\n{text}")


def _float(x: str | None) -> float | None:
    try:
        return float(x) if x else None
    except ValueError:
        return None


def _write(out: Path, report: dict, started: float) -> None:
    report["seconds"] = round(time.time() - started, 1)
    report["ok"] = all(s["status"] in ("ok", "planned", "pending") or s.get("reason") == "not selected"
                       for s in report["steps"].values())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    sys.exit(main())
