#!/usr/bin/env bash
# On a GPU machine: the package on the Triton it has (the baseline) and on a newer Triton brought
# as a tarball of its `triton` package folder (the NVIDIA parts are enough), side by side.
#
#   bash benchmarks/triton_versions.sh check TARBALL   # GPU tests on the newer Triton, the fuzz on both
#   bash benchmarks/triton_versions.sh bench TARBALL   # w4a16 bench on both Tritons, same machine
#   bash benchmarks/triton_versions.sh tests TARBALL   # the whole test suite on the baseline and the
#                                                      # GPU tests on the newer Triton, at once (pytest-xdist)
#   bash benchmarks/triton_versions.sh gpu-tests TARBALL  # the GPU tests (-m gpu) on both Tritons, at once
#   bash benchmarks/triton_versions.sh fuzz TARBALL    # the fuzz alone, both backends on both Tritons
#
# TARBALL: a .tar.xz holding triton/ (for example the wheel's triton/ without backends/amd). Logs and
# bench tables go to $OUT (default /tmp/triton_versions). Environment: M (bench rows, default
# 1,16,64,256,1024,4096), DTYPE (default fp16), FUZZ_CASES (default 400 per backend), T_TESTS, T_FUZZ,
# WORKERS (pytest-xdist workers per suite in `tests`, default 6). A test run that reaches T_TESTS is
# interrupted (SIGINT), so pytest still prints how many passed and which failed, and its slowest tests.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=$1
tarball=$2
OUT=${OUT:-/tmp/triton_versions}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
NEW=/tmp/triton-new
if [ ! -d "$NEW/triton" ]; then
    mkdir -p "$NEW" && tar xJf "$tarball" -C "$NEW" || exit 1
fi
base_path="src"
new_path="$NEW:src"
version() { PYTHONPATH=$1 TRITON_BACKENDS_IN_TREE=1 $PY -c "import triton; print(triton.__version__)"; }
echo "baseline triton $(version "$base_path"), new triton $(version "$new_path"), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
status=0
fuzz_all() {   # the fuzz of both backends on both Tritons, in the background; pids in `pids`
    pids=()
    for which in new base; do   # the fuzz on the baseline too: the kernels' sources changed for both
        path=new_path; [ "$which" = base ] && path=base_path
        for be in gluon triton; do
            PYTHONPATH=${!path} TRITON_BACKENDS_IN_TREE=1 timeout "${T_FUZZ:-360}" $PY -m w4a16 fuzz \
                --cases "${FUZZ_CASES:-400}" --backend "$be" --max-mnk 300,1100,4200 --progress 100 \
                > "$OUT/fuzz_${which}_$be.txt" 2>&1 &
            pids+=($!)
        done
    done
}
fuzz_report() {   # wait for the fuzz runs of fuzz_all, then each one's last line
    for p in "${pids[@]}"; do wait "$p" || status=1; done
    for f in "$OUT"/fuzz_*.txt; do echo "$(basename "$f" .txt): $(tail -n 1 "$f")"; done
}
side_by_side() {  # $1 log prefix, $2 default workers, $3 the baseline's pytest marker ("": the whole suite):
                  # the baseline's tests and the GPU tests on the newer Triton at once (pytest-xdist)
    local mark=()
    [ -n "$3" ] && mark=(-m "$3")
    PYTHONPATH=$base_path timeout -s INT -k 30 "${T_TESTS:-520}" $PY -m pytest -q -p no:cacheprovider -n "${WORKERS:-$2}" \
        --durations=15 "${mark[@]}" tests > "$OUT/${1}_base.txt" 2>&1 &
    local base=$!
    PYTHONPATH=$new_path TRITON_BACKENDS_IN_TREE=1 timeout -s INT -k 30 "${T_TESTS:-520}" $PY -m pytest -q -p no:cacheprovider \
        -n "${WORKERS:-$2}" --durations=15 -m gpu tests > "$OUT/${1}_new.txt" 2>&1 || status=1
    wait "$base" || status=1
    for f in "$OUT/${1}_base.txt" "$OUT/${1}_new.txt"; do
        echo "== $(basename "$f" .txt)"; grep -E "^(FAILED|ERROR)" "$f" | head -n 20; tail -n 1 "$f"
    done
}
case "$mode" in
check)
    fuzz_all
    PYTHONPATH=$new_path TRITON_BACKENDS_IN_TREE=1 timeout -s INT -k 30 "${T_TESTS:-420}" $PY -m pytest -q -p no:cacheprovider \
        -m gpu tests > "$OUT/gpu_tests.txt" 2>&1 || status=1
    tail -n 15 "$OUT/gpu_tests.txt"
    fuzz_report
    ;;
tests)
    side_by_side tests 6 ""
    ;;
gpu-tests)
    side_by_side gpu_tests 7 gpu
    ;;
fuzz)
    fuzz_all
    fuzz_report
    ;;
bench)
    for which in base new; do
        path=base_path; [ "$which" = new ] && path=new_path
        PYTHONPATH=${!path} TRITON_BACKENDS_IN_TREE=1 $PY -m w4a16 bench --m "${M:-1,16,64,256,1024,4096}" \
            --dtype "${DTYPE:-fp16}" --peers w4a16,cublas-fp16 --no-progress --out "$OUT/bench_$which" \
            > "$OUT/bench_$which.txt" 2>&1 || status=1
        tail -n 3 "$OUT/bench_$which.txt"
    done
    PYTHONPATH=src $PY benchmarks/compare_bench.py "$OUT/bench_base/bench.csv" "$OUT/bench_new/bench.csv" \
        | tee "$OUT/compare.txt"
    ;;
*) echo "mode: check, tests, gpu-tests, fuzz or bench"; exit 2 ;;
esac
echo "status $status"
exit $status
