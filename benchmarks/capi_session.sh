#!/usr/bin/env bash
# GPU session of the C library (libw4a16_sm90_kernel.so), from the repository root, on an sm_90 GPU:
#   1. build the library with `w4a16 build-lib` unless $W4A16_CAPI_DIR (default build/capi) holds one;
#   2. test_w4a16_sm90 (the original's example and more shapes, timed, PASS/FAIL);
#   3. the ctypes tests (tests/capi/test_capi_gpu.py);
#   4. compute-sanitizer --tool memcheck on test_w4a16_sm90 (one call per case, large cases skipped
#      except the original's example);
#   5. the C entry points against w4a16.gemm at M = 1, 16, 4096 on N = K = 4096 (python -m w4a16.capi.bench).
# Logs go to $OUT (default /tmp/capi_session). Exit status: non-zero if a step failed.
#
#   bash benchmarks/capi_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/capi_session}
mkdir -p "$OUT"
LIB_DIR=${W4A16_CAPI_DIR:-build/capi}
PY=${PYTHON:-python3}
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
uname -m

if [ ! -f "$LIB_DIR/libw4a16_sm90_kernel.so" ]; then
    step "build-lib --out $LIB_DIR"
    $PY -m w4a16.capi.cli --out "$LIB_DIR" 2>&1 | tee "$OUT/build.txt" || status=1
fi
LIB_DIR=$(cd "$LIB_DIR" && pwd)

step "test_w4a16_sm90"
timeout ${T_TEST:-60} "$LIB_DIR/test_w4a16_sm90" --iters 20 2>&1 | tee "$OUT/test_w4a16_sm90.txt" || status=1

step "ctypes tests"
W4A16_CAPI_DIR="$LIB_DIR" timeout ${T_PYTEST:-120} $PY -m pytest -q -p no:cacheprovider tests/capi/test_capi_gpu.py \
    2>&1 | tee "$OUT/pytest_capi.txt" || status=1

step "compute-sanitizer memcheck"
if command -v compute-sanitizer >/dev/null; then
    timeout ${T_SANITIZER:-90} compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 \
        "$LIB_DIR/test_w4a16_sm90" --iters 0 --quick 2>&1 | tee "$OUT/memcheck.txt" || status=1
else
    echo "compute-sanitizer not found"
fi

step "C entry points vs w4a16.gemm"
timeout ${T_BENCH:-60} $PY -m w4a16.capi.bench --lib "$LIB_DIR" --m 1 16 4096 2>&1 | tee "$OUT/bench.txt" || status=1

step "done: status $status"
exit $status
