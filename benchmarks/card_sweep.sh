#!/usr/bin/env bash
# One card's tuning sweep in one GPU call: `w4a16 tune` over the named layers and M values on the
# Gluon backend, F.linear on the dequantized weight timed in the same run (--cublas), every
# candidate's time in sweep.csv and the winners in tuned.json, under $OUT (default /tmp/card_sweep).
# benchmarks/heldout_report.py reads the CSVs: the winners per card, and how a choice fitted on
# some model families holds on the others.
#
#   LAYERS="8b.qkv qwen7b.qkv 70b.qkv" MS="256 1024" BUDGET=470 bash benchmarks/card_sweep.sh
#
# Then, here: w4a16 tune --merge tuned.json --into src/w4a16/data/tuned.json
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/card_sweep}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
echo "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader), $(PYTHONPATH=src $PY -c \
    'import torch, triton, sys; print(f"torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}")'), $(date -u +%F)" \
    | tee "$OUT/env.txt"
# shellcheck disable=SC2086  # LAYERS and MS are lists
PYTHONPATH=src $PY -m w4a16 tune --layers ${LAYERS:?names of preset or family layers} --ms ${MS:-256 1024} \
    --backend "${BACKEND:-gluon}" --cublas --budget "${BUDGET:-470}" --csv "$OUT/sweep.csv" --out "$OUT/tuned.json" \
    > "$OUT/tune.log" 2>&1
status=$?
grep -E "tuned in|budget|done in|Error" "$OUT/tune.log" | tail -n 20
exit $status
