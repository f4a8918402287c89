#!/usr/bin/env bash
# The whole test suite on a GPU, in shards that each fit one call (run them back to back on the warm
# machine: Triton's kernel cache under ~/.triton carries over, so later shards compile less):
#
#   bash benchmarks/gpu_tests_session.sh SHARD [TARBALL]
#
# SHARD: gluon-decode (the Gluon decode kernel's GPU tests), gluon-prefill, gpu-kernels (the GPU-marked
# tests of the Triton kernels and the MoE kernels), gpu-rest (every other GPU-marked test), kernels (the
# Triton kernel and MoE tests that are not GPU-marked, on the GPU), rest (everything else).
# With TARBALL (a .tar.xz of a newer Triton's triton/ folder) the shard runs on that Triton.
# pytest-xdist workers: WORKERS (default 12). Log: $OUT/tests_SHARD.txt (default /tmp/gpu_tests). A shard
# that reaches T_TESTS (default 560 s) is interrupted (SIGINT): pytest still prints what passed and failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_tests}
mkdir -p "$OUT"
shard=${1:?shard: gluon-decode, gluon-prefill, gpu-kernels, gpu-rest, kernels or rest}
path=src
if [ $# -ge 2 ]; then
    NEW=${NEW_TRITON_DIR:-/tmp/triton-new}
    [ -d "$NEW/triton" ] || { mkdir -p "$NEW" && tar xJf "$2" -C "$NEW"; } || exit 1
    path="$NEW:src"
    export TRITON_BACKENDS_IN_TREE=1
fi
G=tests/backends/gluon
case "$shard" in
gluon-decode)  args=(-m gpu "$G/test_decode_gpu.py" "$G/test_stream_k_gpu.py" "$G/test_dependent_launch_gpu.py") ;;
gluon-prefill) args=(-m gpu "$G/test_prefill_gpu.py") ;;
gpu-kernels)   args=(-m gpu tests/backends/triton tests/moe "$G/test_moe_decode_gpu.py") ;;
gpu-rest)      args=(-m gpu tests --ignore="$G/test_decode_gpu.py" --ignore="$G/test_stream_k_gpu.py"
                     --ignore="$G/test_dependent_launch_gpu.py" --ignore="$G/test_prefill_gpu.py"
                     --ignore=tests/backends/triton --ignore=tests/moe --ignore="$G/test_moe_decode_gpu.py") ;;
kernels)       args=(-m "not gpu" tests/backends tests/moe tests/test_nonfinite.py tests/test_custom_op.py) ;;
rest)          args=(-m "not gpu" tests --ignore=tests/backends --ignore=tests/moe --ignore=tests/test_nonfinite.py
                     --ignore=tests/test_custom_op.py) ;;
*) echo "shard: gluon-decode, gluon-prefill, gpu-kernels, gpu-rest, kernels or rest"; exit 2 ;;
esac
echo "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader), triton $(PYTHONPATH=$path python3 -c 'import triton; print(triton.__version__)'), shard $shard"
PYTHONPATH=$path timeout -s INT -k 30 "${T_TESTS:-560}" python3 -m pytest -q -p no:cacheprovider -p no:benchmark \
    -n "${WORKERS:-12}" --durations=10 "${args[@]}" > "$OUT/tests_$shard.txt" 2>&1
status=$?
grep -E "^(FAILED|ERROR)" "$OUT/tests_$shard.txt" | head -n 20
tail -n 1 "$OUT/tests_$shard.txt"
exit $status
