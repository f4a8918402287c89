#!/usr/bin/env bash
# One GPU call that checks rather than times: the C library's session first (it holds the only timing,
# C entry points against w4a16.gemm, so nothing else runs beside it), then, side by side, the random
# problems of `w4a16 fuzz` on each kernel backend, the GPU tests of benchmarks/session_backends.py
# and compute-sanitizer (memcheck, racecheck, synccheck, initcheck) on each kernel's ragged cases.
# Logs: $OUT/capi/*, $OUT/fuzz_<backend>_<seed>.txt, $OUT/tests/session.log. Exit status: non-zero if a part failed.
#
#   W4A16_CAPI_DIR=build/capi bash benchmarks/verify_session.sh      # build/capi from `w4a16 build-lib` (optional)
#
# Environment: FUZZ_CASES (default 2000 per backend, run in FUZZ_SHARDS processes of one seed each, default 4), T_FUZZ and T_TESTS (seconds, default 420 each),
# SKIP_CAPI=1, SKIP_TESTS=1, SKIP_SANITIZER=1 to leave a part out; SANITIZER_TOOLS, T_SANITIZER.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/verify_session}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0

if [ "${SKIP_CAPI:-0}" != 1 ]; then
    OUT="$OUT/capi" T_TEST=90 T_PYTEST=200 bash benchmarks/capi_session.sh > "$OUT/capi_session.txt" 2>&1 || status=1
    tail -n 3 "$OUT/capi_session.txt"
fi

pids=()
shards=${FUZZ_SHARDS:-4}
for be in gluon triton; do
    for seed in $(seq 0 $((shards - 1))); do   # one process per seed: the draw is host-bound
        timeout "${T_FUZZ:-420}" $PY -m w4a16 fuzz --cases $(( ${FUZZ_CASES:-2000} / shards )) --backend "$be" \
            --seed "$seed" --max-mnk 300,1100,4200 --progress 100 > "$OUT/fuzz_${be}_$seed.txt" 2>&1 &
        pids+=($!)
    done
done
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    $PY benchmarks/session_backends.py --out "$OUT/tests" --test-timeout "${T_TESTS:-420}" \
        --skip env,bench,host,model,backward,fuzz,sanitize,e2e > /dev/null 2>&1 || status=1
fi
# compute-sanitizer, every tool on each kernel's small ragged cases, and racecheck on the smallest
# warp-specialized kernel (benchmarks/racecheck_probe.py: hazards of Triton's lowering, not of ours)
declare -A WORK=([decode]="benchmarks/gluon_decode_session.py --sanitize --out $OUT/san_decode"
                 [prefill]="benchmarks/gluon_prefill_session.py --sanitize"
                 [triton]="-m w4a16 fuzz --cases 12 --backend triton --max-mnk 300,600,1100"
                 [probe]="benchmarks/racecheck_probe.py")
if command -v compute-sanitizer > /dev/null && [ "${SKIP_SANITIZER:-0}" != 1 ]; then
    mkdir -p "$OUT/san_decode"
    for kernel in decode prefill triton probe; do
        for tool in ${SANITIZER_TOOLS:-memcheck racecheck synccheck initcheck}; do
            [ "$kernel" = probe ] && [ "$tool" != racecheck ] && continue
            timeout "${T_SANITIZER:-400}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
                $PY ${WORK[$kernel]} > "$OUT/sanitize_${kernel}_$tool.txt" 2>&1 &
            pids+=($!)
        done
    done
fi
for p in "${pids[@]}"; do wait "$p" || status=1; done
for f in "$OUT"/sanitize_*.txt; do [ -f "$f" ] && echo "$(basename "$f" .txt): $(grep -E 'SUMMARY' "$f" | tail -n 1)"; done
for f in "$OUT"/fuzz_*.txt; do echo "$(basename "$f" .txt): $(tail -n 1 "$f")"; done
[ -f "$OUT/tests/session.log" ] && echo "tests: $(grep -E 'passed|failed' "$OUT/tests/session.log" | tail -n 1)"
echo "status $status"
exit $status
