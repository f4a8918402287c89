#!/usr/bin/env bash
# On a GPU machine: the Gluon prefill kernel's K-split and stream-K configs, in one call.
#
#   bash benchmarks/prefill_stream_session.sh
#
# 1. the child-process test of the split configs (a deadlock fails it instead of hanging);
# 2. gluon_prefill_session.py: smoke of every named, K-split and stream-K config, the option matrix
#    on the split configs, the split sweep (8B and 70B small layers at M = 128, 256), timing;
# 3. compute-sanitizer memcheck (and racecheck with RACECHECK=1) on small ragged calls of the named
#    and stream-K configs.
# Logs under $OUT (default /tmp/prefill_stream). T_LIMIT: seconds for step 1 (default 300); BUDGET:
# seconds for step 2 (default 240).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/session_setup.sh prefill_stream 300
status=0
timeout -s INT -k 20 "$LIMIT" $PY -m pytest -q -p no:cacheprovider -m gpu tests/backends/gluon/test_prefill_gpu.py \
    -k split_configs > "$OUT/split_child_test.txt" 2>&1 || status=1
tail -n 5 "$OUT/split_child_test.txt"
$PY benchmarks/gluon_prefill_session.py --quick --skip-correctness --split-correctness --split-sweep \
    --budget "${BUDGET:-240}" --out "$OUT" > /dev/null 2>&1 || status=1
grep -E "^(FAIL|HANG|child)|correctness .*passed|M=  (128|256)|geomean" "$OUT/gluon_prefill_session.log" | head -n 60
tools=memcheck
[ "${RACECHECK:-0}" = 1 ] && tools="memcheck racecheck"
for tool in $tools; do
    timeout 150 compute-sanitizer --tool "$tool" --print-limit 20 $PY benchmarks/gluon_prefill_session.py --sanitize \
        > "$OUT/sanitize_$tool.txt" 2>&1 || status=1
    echo "$tool: $(grep -E "ERROR SUMMARY|sanitize cases failed" "$OUT/sanitize_$tool.txt" | tr '\n' ' ')"
done
echo "status $status"
exit $status
