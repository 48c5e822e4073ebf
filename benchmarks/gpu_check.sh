#!/usr/bin/env bash
# One command, <= 8 minutes on one H100: the model's fast paths vs reference on the GPU, then MFU for
# 125m / 350m / 1b (bf16, seq 2048). Results go to the folder given as $1, else $OUT, else ./gpu_check_out:
#   env.txt (GPU, torch, packages), pytest-gpu.txt (tests marked gpu, when pytest is there),
#   gpu_check.json + gpu_check.md (the table; also printed).
# Optional: COMMUNS_WHEELS=DIR installs the wheels in DIR first (liger-kernel, flash-attn: the GPU machine
# has no network), PYTHON=... picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ -n "${COMMUNS_WHEELS:-}" ] && ls "$COMMUNS_WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install --no-deps --no-index "$COMMUNS_WHEELS"/*.whl >"$OUT_DIR/pip.txt" 2>&1 || echo "wheel install failed (see pip.txt)"
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c 'import torch, importlib.util as u; print("torch", torch.__version__, "cuda", torch.version.cuda); print({m: u.find_spec(m) is not None for m in ("flash_attn", "liger_kernel", "triton", "transformers", "pytest")})'
} >"$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

status=0
if "$PY" -c 'import pytest' 2>/dev/null; then
  timeout 150 "$PY" -m pytest -q -m gpu tests/model -p no:cacheprovider -o addopts="" >"$OUT_DIR/pytest-gpu.txt" 2>&1 || status=1
  tail -3 "$OUT_DIR/pytest-gpu.txt"
else
  echo "pytest not installed: gpu-marked tests skipped (gpu_check.py's own checks still run)" | tee "$OUT_DIR/pytest-gpu.txt"
fi
timeout 330 "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" "${@:2}" || status=1
exit $status
