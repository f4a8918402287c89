#!/usr/bin/env bash
# The mixture-of-experts checks and timings on a GPU, one phase per call (each fits one call):
#
#   bash benchmarks/moe_session.sh check   # the MoE tests on the GPU (bf16 included), w4a16 fuzz --moe,
#                                          # then w4a16 bench --moe on two presets at small T
#   bench                                  # w4a16 bench --moe all --m 1,16,64,256,4096 (bf16)
#   model                                  # w4a16.e2e.speed --model qwen3-30b-a3b --layers 8 --compile --dtype bf16
#                                          # (HEAD4=1: the 4-bit lm_head's row too; ATTENTION=fused-decode
#                                          # and ROUTERS=1: every model's attention / routers fused)
#   final                                  # the MoE tests, w4a16 bench --moe all, the per-kernel
#                                          # profile (benchmarks/moe_profile.py), then the model phase
#   sanitize                               # compute-sanitizer (memcheck, racecheck, synccheck,
#                                          # initcheck) on 24 small random layers (w4a16 fuzz --moe);
#                                          # KERNEL=gluon: on the Gluon decode kernel's GPU tests instead
#   tiles                                  # the MoE tests, a short fuzz, then every PackedTile of the
#                                          # grouped kernel timed per projection (benchmarks/moe_tiles.py)
#   verify                                 # the MoE tests, a short fuzz, the presets at T = 1 and 16
#                                          # (about 220 s)
#   packed                                 # the MoE tests, w4a16 bench --moe all, w4a16 fuzz --moe,
#                                          # then the tile sweep at T = 1, 16 for what time is left
#   gluon                                  # the Gluon MoE decode kernel's GPU tests, the presets at
#                                          # T = 1 (w4a16-gluon against w4a16-triton and torch), its
#                                          # ring depths (benchmarks/moe_gluon_stages.py;
#                                          # SWEEP=0 skips them)
#   prefill                                # the MoE tests, the presets at T = 256, 4096, 16384 one
#                                          # preset at a time, and the Triton backend's prefill tiles
#                                          # on the Llama-3 layers against cuBLAS (w4a16 bench;
#                                          # DENSE=0 skips them)
#   host                                   # the MoE tests (the align kernels on the GPU), then the
#                                          # prefill forward's host time in bf16, W4A16 and W4A16 with
#                                          # the two-launch align kernels (benchmarks/host_profile.py
#                                          # --moe-prefill 2048: what ops.WIDE_ALIGN waits for)
#
# Logs and tables under $OUT (default /tmp/moe_session). DTYPE (default bf16), T_LIMIT (seconds
# for the phase, default 540).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/session_setup.sh moe_session 540
case "${1:-check}" in
check)
    timeout -s INT -k 30 $((LIMIT / 3)) $PY -m pytest -q -p no:cacheprovider tests/moe tests/bench/test_bench_moe.py > "$OUT/tests.txt" 2>&1
    tail -n 5 "$OUT/tests.txt"
    timeout $((LIMIT / 3)) $PY -m w4a16 fuzz --moe --cases "${FUZZ_CASES:-300}" --backend triton --progress 100 \
        > "$OUT/fuzz.txt" 2>&1
    grep FAIL "$OUT/fuzz.txt" | head -n 10; tail -n 1 "$OUT/fuzz.txt"
    timeout $((LIMIT / 3)) $PY -m w4a16 bench --moe qwen3-30b-a3b,mixtral-8x7b --m 1,16,256 --dtype "${DTYPE:-bf16}" \
        --no-progress --out "$OUT/check" > "$OUT/check.txt" 2>&1
    tail -n 12 "$OUT/check.txt" ;;
bench)
    timeout "$LIMIT" $PY -m w4a16 bench --moe all --m 1,16,64,256,4096 --dtype "${DTYPE:-bf16}" --no-progress \
        --out "$OUT/bench" > "$OUT/bench.txt" 2>&1
    tail -n 70 "$OUT/bench.txt" ;;
model)
    timeout "$LIMIT" $PY -m w4a16.e2e.speed --model qwen3-30b-a3b --layers 8 --batches 1 16 --compile --dtype "${DTYPE:-bf16}" \
        ${HEAD4:+--lm-head-int4} --attention "${ATTENTION:-sdpa}" ${ROUTERS:+--fused-routers} --out "$OUT/model" \
        > "$OUT/model.txt" 2>&1
    tail -n 30 "$OUT/model.txt" ;;
tiles)
    timeout -s INT -k 30 120 $PY -m pytest -q -p no:cacheprovider -n 8 tests/moe > "$OUT/tests.txt" 2>&1
    tail -n 3 "$OUT/tests.txt"
    timeout 90 $PY -m w4a16 fuzz --moe --cases "${FUZZ_CASES:-100}" --backend triton > "$OUT/fuzz.txt" 2>&1
    grep FAIL "$OUT/fuzz.txt" | head -n 10; tail -n 1 "$OUT/fuzz.txt"
    timeout "$((LIMIT - 210))" $PY benchmarks/moe_tiles.py --tokens "${TOKENS:-1,16,256,4096}" \
        --limit-s "$((LIMIT - 260))" --out "$OUT/tiles" > "$OUT/tiles.txt" 2>&1
    grep -E "^(BEST|WRONG)|failed" "$OUT/tiles.txt" | head -n 60 ;;
packed)
    timeout -s INT -k 20 120 $PY -m pytest -q -p no:cacheprovider -n 8 tests/moe tests/bench/test_bench_moe.py \
        > "$OUT/tests.txt" 2>&1
    tail -n 3 "$OUT/tests.txt"
    timeout 180 $PY -m w4a16 bench --moe all --m 1,16,64,256,4096 --dtype "${DTYPE:-bf16}" --no-progress \
        --out "$OUT/bench" > "$OUT/bench.txt" 2>&1
    grep -E "^\| .* \| (w4a16|torch)" "$OUT/bench.txt" | grep -v loop; tail -n 3 "$OUT/bench.txt"
    timeout 60 $PY -m w4a16 fuzz --moe --cases "${FUZZ_CASES:-200}" --backend triton --progress 100 > "$OUT/fuzz.txt" 2>&1
    grep FAIL "$OUT/fuzz.txt" | head -n 10; tail -n 1 "$OUT/fuzz.txt"
    timeout "$((LIMIT - 380))" $PY benchmarks/moe_tiles.py --tokens "${TOKENS:-1,16}" \
        --limit-s "$((LIMIT - 410))" --out "$OUT/tiles" > "$OUT/tiles.txt" 2>&1
    grep -E "^(BEST|WRONG)|failed" "$OUT/tiles.txt" | head -n 40 ;;
verify)
    timeout -s INT -k 10 60 $PY -m pytest -q -p no:cacheprovider -n 8 tests/moe > "$OUT/tests.txt" 2>&1
    tail -n 2 "$OUT/tests.txt"
    timeout 60 $PY -m w4a16 fuzz --moe --cases "${FUZZ_CASES:-200}" --backend triton --progress 100 > "$OUT/fuzz.txt" 2>&1
    grep FAIL "$OUT/fuzz.txt" | head -n 5; tail -n 1 "$OUT/fuzz.txt"
    timeout 100 $PY -m w4a16 bench --moe all --m 1,16 --dtype "${DTYPE:-bf16}" --no-progress --out "$OUT/bench" \
        > "$OUT/bench.txt" 2>&1
    grep -E "^\| .* \| w4a16 " "$OUT/bench.txt" | grep -v loop; tail -n 1 "$OUT/bench.txt" ;;
prefill)
    timeout -s INT -k 10 80 $PY -m pytest -q -p no:cacheprovider -n 8 tests/moe > "$OUT/tests.txt" 2>&1
    tail -n 1 "$OUT/tests.txt"
    for p in mixtral-8x7b qwen3-30b-a3b qwen3-235b-a22b deepseek-v3; do
        timeout 120 $PY -m w4a16 bench --moe "$p" --m 256,4096,16384 --dtype "${DTYPE:-bf16}" --peers w4a16,torch \
            --no-progress --out "$OUT/prefill_$p" > "$OUT/prefill_$p.txt" 2>&1
        grep -E "^\| .* \| (w4a16|torch)" "$OUT/prefill_$p.txt"
    done
    if [ "${DENSE:-1}" = 1 ]; then
        timeout 120 $PY -m w4a16 bench --m 256,1024,4096 --peers w4a16-triton,cublas-fp16 --no-progress \
            --out "$OUT/dense_triton" > "$OUT/dense_triton.txt" 2>&1
        tail -n 30 "$OUT/dense_triton.txt"
    fi ;;
host)
    timeout -s INT -k 10 100 $PY -m pytest -q -p no:cacheprovider -n 8 tests/moe > "$OUT/tests.txt" 2>&1
    grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -n 20; tail -n 1 "$OUT/tests.txt"
    timeout $((LIMIT - 120)) $PY benchmarks/host_profile.py --out "$OUT/host" --only-models --moe-prefill 2048 \
        > "$OUT/host_profile.txt" 2>&1
    grep -E "moe prefill|model step|logits equal" "$OUT/host_profile.txt" ;;
gluon)
    timeout -s INT -k 10 150 $PY -m pytest -q -p no:cacheprovider -x tests/backends/gluon/test_moe_decode_gpu.py \
        tests/moe/test_moe_gluon_rule.py > "$OUT/tests.txt" 2>&1
    grep -E "^(FAILED|ERROR|E )" "$OUT/tests.txt" | head -n 30; tail -n 1 "$OUT/tests.txt"
    timeout 150 $PY -m w4a16 bench --moe all --m 1 --dtype "${DTYPE:-bf16}" --peers w4a16-gluon,w4a16-triton,torch \
        --no-progress --out "$OUT/decode" > "$OUT/decode.txt" 2>&1
    grep -E "^\| .* \| (w4a16|torch)" "$OUT/decode.txt"; tail -n 2 "$OUT/decode.txt"
    if [ "${SWEEP:-1}" = 1 ]; then
        timeout 200 $PY benchmarks/moe_gluon_stages.py --dtype "${DTYPE:-bf16}" > "$OUT/stages.txt" 2>&1
        cat "$OUT/stages.txt"
    fi ;;
sanitize)
    pids=()
    for tool in memcheck racecheck synccheck initcheck; do
        if [ "${KERNEL:-triton}" = gluon ]; then   # one token's layer: model-sized and ragged shapes, k splits
            run=($PY -m pytest -q -p no:cacheprovider tests/backends/gluon/test_moe_decode_gpu.py -k "reference or another")
        else
            run=($PY -m w4a16 fuzz --moe --cases "${SAN_CASES:-24}" --backend triton)
        fi
        timeout "$LIMIT" compute-sanitizer --tool "$tool" --error-exitcode 9 "${run[@]}" > "$OUT/sanitize_$tool.txt" 2>&1 &
        pids+=($!)
    done
    status=0
    for p in "${pids[@]}"; do wait "$p" || status=1; done
    for tool in memcheck racecheck synccheck initcheck; do
        echo "$tool: $(grep -E 'SUMMARY' "$OUT/sanitize_$tool.txt" | tail -n 1) | $(tail -n 1 "$OUT/sanitize_$tool.txt")"
    done
    exit $status ;;
final)
    timeout -s INT -k 30 120 $PY -m pytest -q -p no:cacheprovider -n 8 tests/moe > "$OUT/tests.txt" 2>&1
    tail -n 1 "$OUT/tests.txt"
    timeout 180 $PY -m w4a16 bench --moe all --m 1,16,64,256,4096 --dtype "${DTYPE:-bf16}" --no-progress \
        --out "$OUT/bench" > "$OUT/bench.txt" 2>&1
    grep -E "^\| .* \| (w4a16|torch)" "$OUT/bench.txt" | grep -v loop
    timeout 60 $PY benchmarks/moe_profile.py > "$OUT/profile.txt" 2>&1; cat "$OUT/profile.txt"
    timeout "$((LIMIT - 370))" $PY -m w4a16.e2e.speed --model qwen3-30b-a3b --layers 8 --batches 1 16 --compile --dtype "${DTYPE:-bf16}" \
        --out "$OUT/model" > "$OUT/model.txt" 2>&1
    tail -n 25 "$OUT/model.txt" ;;
*) echo "phase: check, bench, model, sanitize, tiles, packed, verify, gluon, prefill, host or final"; exit 2 ;;
esac
