#!/usr/bin/env bash
# The prepared GPU check (README "Scale and speed"): one unattended command on a CUDA machine (one H100
# or H200) that may have no network and no package registry. Here, where PyPI is reachable, first:
#
#   make gpu-bundle          # gpu-bundle/: wheels (trl, datasets' and deepspeed's needs, deepspeed, transformers pin)
#                            # + SmolLM2's config and tokenizer; checked to fit 64 MiB with the working tree
#
# There, with this checkout and gpu-bundle/ (the device tool: carry=["gpu-bundle"]):
#
#   bash scripts/gpu_check.sh                       # everything, 540 s at most
#   bash scripts/gpu_check.sh --skip model_0p5b     # flags go to benchmarks/gpu_check.py (--only, --skip, --dry-run, --device cpu)
#
# It uses the interpreter that holds torch (no virtual environment, nothing fetched), installs the
# bundle's wheels with `pip install --no-index --no-deps --target DIR` and puts DIR first on
# PYTHONPATH, then runs `python -m benchmarks.gpu_check` (benchmarks/gpu_check.py lists the steps),
# which writes ONE JSON and one log: $OUT/gpu_check.json and $OUT/gpu_check.log when OUT is set, else
# under benchmarks/results/. A failed install does not stop it: the env step then says which package
# is missing and only the steps that need it are skipped.
#
# Environment:
#   ALIGN_GPU_PYTHON=PATH    the interpreter (default: python3)
#   ALIGN_GPU_BUNDLE=DIR     the bundle (default: gpu-bundle); "none": install nothing (a machine that has everything)
#   ALIGN_GPU_SITE=DIR       where the wheels are installed (default: /tmp/align-gpu-site)
#   ALIGN_GPU_CHECK_SECONDS  seconds for the whole command (default 540)
set -uo pipefail   # no -e: whatever fails, the JSON must still be written
START=$(date +%s)
cd "$(dirname "$0")/.."
TOTAL=${ALIGN_GPU_CHECK_SECONDS:-540}
PY=${ALIGN_GPU_PYTHON:-python3}
BUNDLE=${ALIGN_GPU_BUNDLE:-gpu-bundle}
SITE=${ALIGN_GPU_SITE:-/tmp/align-gpu-site}
ARGS=" $* "

if ! TORCH=$("$PY" -c "import torch; print(torch.__version__, torch.version.cuda or '')" 2>/dev/null); then
  echo "gpu_check: $PY cannot import torch; set ALIGN_GPU_PYTHON to the interpreter that holds it" >&2
  exit 2
fi
read -r TORCH_VERSION CUDA_BUILD <<<"$TORCH"
if [ -z "${CUDA_BUILD:-}" ] && [[ "$ARGS" != *" --device cpu "* ]] && [[ "$ARGS" != *" --dry-run "* ]]; then
  echo "gpu_check: $PY has a CPU-only torch ($TORCH_VERSION); run it with the interpreter that has a CUDA build" >&2
  echo "  (ALIGN_GPU_PYTHON=...), or install one: $PY -m pip install --force-reinstall torch==2.13.0 (from PyPI)" >&2
  exit 2
fi

STATUS=none
if [ "$BUNDLE" != none ] && [ -d "$BUNDLE/wheels" ] && [[ "$ARGS" != *" --dry-run "* ]]; then
  WANT=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('python', ''))" "$BUNDLE/manifest.json" 2>/dev/null)
  HAVE=$("$PY" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
  if [ -n "$WANT" ] && [ "$WANT" != "$HAVE" ]; then
    STATUS="skipped: the bundle is for Python $WANT, $PY is $HAVE"
  else
    mkdir -p "$SITE"
    if "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$BUNDLE"/wheels/*.whl >"$SITE.log" 2>&1; then
      STATUS=ok
    else
      STATUS="failed: $(tail -c 400 "$SITE.log" | tr '\n' ' ')"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  echo "gpu_check: bundle $BUNDLE: $STATUS" >&2
fi

export ALIGN_INSTALL_SECONDS=$(( $(date +%s) - START )) ALIGN_INSTALL_STATUS=$STATUS ALIGN_INSTALL_SITE=$SITE
BUDGET=$(( TOTAL - ALIGN_INSTALL_SECONDS ))
if [ "$BUDGET" -lt 60 ]; then BUDGET=60; fi
BUNDLE_ARG=(--bundle none)
if [ "$BUNDLE" != none ] && [ -d "$BUNDLE" ]; then BUNDLE_ARG=(--bundle "$BUNDLE"); fi
echo "gpu_check: installs took ${ALIGN_INSTALL_SECONDS} s; ${BUDGET} s left for the steps" >&2
exec "$PY" -m benchmarks.gpu_check --budget "$BUDGET" "${BUNDLE_ARG[@]}" "$@"
