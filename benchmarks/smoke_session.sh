#!/usr/bin/env bash
# A short GPU check for one call of a few minutes: the GPU tests of the Gluon decode kernel's launch
# paths and of the moved test files (pytest -m gpu, a subset), and `w4a16 fuzz` with small and odd K
# on the Gluon backend (per-channel weights of small K included), on the installed Triton; with a
# TARBALL of a newer Triton's `triton/` folder, the decode launch tests on that Triton too.
#
#   bash benchmarks/smoke_session.sh [TARBALL]
#
# Logs under $OUT (default /tmp/smoke_session): fuzz.txt, tests.txt, tests_new.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/smoke_session}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0
echo "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader), triton $($PY -c 'import triton; print(triton.__version__)')"
PYTHONPATH=src timeout "${T_FUZZ:-240}" $PY -m w4a16 fuzz --cases "${FUZZ_CASES:-200}" --backend gluon \
    --max-mnk 64,300,400 --progress 50 > "$OUT/fuzz.txt" 2>&1 &
fuzz=$!
PYTHONPATH=src timeout "${T_TESTS:-240}" $PY -m pytest -q -p no:cacheprovider -m gpu \
    tests/backends/gluon/test_decode_gpu.py tests/backends/gluon/test_prefill_gpu.py tests/test_nonfinite_gpu.py \
    -k "bound or fast_path or graph or split_configs or unsupported" > "$OUT/tests.txt" 2>&1 || status=1
tail -n 3 "$OUT/tests.txt"
if [ $# -ge 1 ]; then
    NEW=${NEW_TRITON_DIR:-/tmp/triton_new}
    [ -d "$NEW/triton" ] || { mkdir -p "$NEW" && tar xJf "$1" -C "$NEW"; } || exit 1
    PYTHONPATH="$NEW:src" TRITON_BACKENDS_IN_TREE=1 timeout "${T_TESTS:-240}" $PY -m pytest -q -p no:cacheprovider \
        -m gpu tests/backends/gluon/test_decode_gpu.py -k "bound or fast_path" > "$OUT/tests_new.txt" 2>&1 || status=1
    echo "new triton: $(tail -n 1 "$OUT/tests_new.txt")"
fi
wait "$fuzz" || status=1
grep FAIL "$OUT/fuzz.txt" | head -n 10
tail -n 1 "$OUT/fuzz.txt"
exit $status
