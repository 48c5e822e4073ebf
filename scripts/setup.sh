#!/usr/bin/env bash
# Create .venv (or $VENV) with everything communs needs, without ever pulling a CUDA torch onto a
# machine that has no GPU, and without touching a torch that is already installed.
set -euo pipefail
export DS_BUILD_OPS=0
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev,eval}
stamp="$VENV/.communs-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt corpus/_gather.c ]; then exit 0; fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
log="$VENV/setup.log"
: > "$log"
# pip's output goes to the log; it is shown only when a step fails.
pipi() { "$PY" -m pip install -q "$@" >>"$log" 2>&1 || { cat "$log"; echo "setup: pip install $* failed (log: $log)"; exit 1; }; }
pipi --upgrade pip

if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
  echo "setup: GPU found, installing the default (CUDA) torch"
  pipi "torch>=2.4"
else
  # On these machines torch==2.13.0 is a CPU build on local disk; an unpinned torch is a multi-GB CUDA build.
  echo "setup: no GPU, installing torch==${COMMUNS_TORCH:-2.13.0}"
  pipi "torch==${COMMUNS_TORCH:-2.13.0}"
fi
# DS_BUILD_OPS=0: DeepSpeed installs without compiling CUDA ops (they JIT where needed).
pipi -e ".[$EXTRAS]"
touch "$stamp"
echo "setup: ready ($VENV)"
