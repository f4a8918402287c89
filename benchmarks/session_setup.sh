# Sourced by the GPU session scripts: `source benchmarks/session_setup.sh NAME LIMIT` from the repo
# root. Exports PYTHONUNBUFFERED and PYTHONPATH=src, sets OUT (default /tmp/NAME, created), PY
# (PYTHON or python3) and LIMIT (T_LIMIT or LIMIT seconds), and prints the card, driver, torch and
# triton the session runs on.
export PYTHONUNBUFFERED=1 PYTHONPATH=src
OUT=${OUT:-/tmp/$1}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LIMIT=${T_LIMIT:-$2}
echo "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader), $($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"
