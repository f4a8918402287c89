#!/usr/bin/env bash
# The GEMM epilogues and the fused decoder layers on a GPU, one phase per call:
#
#   bash benchmarks/fused_layers_session.sh check   # the epilogue GPU tests (Gluon decode, stream-K,
#                                                   # prefill, Triton; fp16, bf16; fused layers in a
#                                                   # CUDA graph) and the kernels' launch-path GPU tests
#                                                   # (pytest-xdist, WORKERS default 8), then
#                                                   # benchmarks/epilogue_bench.py
#   model                                           # w4a16.e2e.speed, Llama-3-8B shape, compiled:
#                                                   # fp16, W4A16, W4A16 with fused layers, + 4-bit lm_head
#   attention                                       # the decode attention GPU tests (fused and packed),
#                                                   # benchmarks/attention_bench.py (the one-kernel
#                                                   # attention against torch's operations), then the
#                                                   # kernels of a compiled decode step
#                                                   # (benchmarks/model_profile.py, 8 layers, fused layers)
#                                                   # with each attention of PROFILE_ATTENTIONS
#   peer                                            # w4a16.e2e.speed with the torchao int4 peer (bf16,
#                                                   # compiled; TORCHAO_WHEEL: its wheel, installed into
#                                                   # /tmp/torchao-peer without dependencies)
#
# Every phase runs the Gluon decode kernel's own RMSNorm epilogue (W4A16_GLUON_KERNEL_NORM=1, the
# setting of w4a16.backends.gluon.decode.config.KERNEL_NORM; KERNEL_NORM=0 here: the norm in torch).
# Logs and tables under $OUT (default /tmp/fused_layers). MS (bench rows), BENCH_LAYERS (a prefix of the
# bench layers, e.g. 8B), LAYERS (model layers, default 32), ITERS (default 20), DTYPE (the model's, fp16 or bf16),
# ATTENTION (every model's: sdpa, the default, packed-gqa or fused-decode), PROFILE_ATTENTIONS (default
# "packed-gqa fused-decode"),
# T_LIMIT (seconds for the phase, default 560).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/session_setup.sh fused_layers 560
export W4A16_GLUON_KERNEL_NORM=${KERNEL_NORM:-1}
case "${1:-check}" in
check)
    G=tests/backends/gluon
    timeout -s INT -k 30 $((LIMIT * 3 / 5)) $PY -m pytest -q -p no:cacheprovider -n "${WORKERS:-8}" --durations=10 -m gpu \
        tests/test_epilogue_gpu.py "$G/test_stream_k_gpu.py" "$G/test_decode_gpu.py" "$G/test_prefill_gpu.py" \
        tests/backends/triton/test_kernels_gpu.py tests/test_torch_integration_gpu.py \
        -k "epilogue or fused or bound or fast_path or split or every_config or stream or kernels or graph or compile" \
        > "$OUT/tests.txt" 2>&1
    grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -n 20; tail -n 1 "$OUT/tests.txt"
    timeout $((LIMIT * 2 / 5)) $PY benchmarks/epilogue_bench.py --m "${MS:-1,2,4,8,16,64,2048}" --layers "${BENCH_LAYERS:-}" --out "$OUT" \
        > "$OUT/epilogue_bench.txt" 2>&1
    tail -n 25 "$OUT/epilogue_bench.txt" ;;
model)
    timeout "$LIMIT" $PY -m w4a16.e2e.speed --layers "${LAYERS:-32}" --batches 1 16 --iters "${ITERS:-20}" --compile \
        --fuse-layers-too --lm-head-int4 --dtype "${DTYPE:-fp16}" --attention "${ATTENTION:-sdpa}" --out "$OUT" \
        > "$OUT/model.txt" 2>&1
    tail -n 30 "$OUT/model.txt" ;;
attention)
    timeout -s INT -k 30 $((LIMIT / 5)) $PY -m pytest -q -p no:cacheprovider -n 4 tests/test_fused_attention.py \
        tests/test_attention.py > "$OUT/attention_tests.txt" 2>&1
    grep -E "^(FAILED|ERROR)" "$OUT/attention_tests.txt" | head -n 20; tail -n 1 "$OUT/attention_tests.txt"
    timeout $((LIMIT / 5)) $PY benchmarks/attention_bench.py --dtype "${DTYPE:-fp16}" --out "$OUT" \
        > "$OUT/attention_bench.txt" 2>&1
    tail -n 26 "$OUT/attention_bench.txt"
    for att in ${PROFILE_ATTENTIONS:-packed-gqa fused-decode}; do
        timeout $((LIMIT * 3 / 10)) $PY benchmarks/model_profile.py decode --model llama3-8b --layers 8 --batches 1,16 \
            --compile --fuse-layers --dtype "${DTYPE:-fp16}" --attention "$att" --top 14 > "$OUT/profile_$att.txt" 2>&1
        grep -E "ms of kernels" "$OUT/profile_$att.txt"
    done ;;
peer)
    wheel=${TORCHAO_WHEEL:?TORCHAO_WHEEL: the torchao wheel (the GPU machine has no network)}
    $PY -m pip install -q --no-deps --target /tmp/torchao-peer "$wheel" || exit 1
    PYTHONPATH="src:/tmp/torchao-peer" timeout "$LIMIT" $PY -m w4a16.e2e.speed --layers "${LAYERS:-32}" --batches 1 16 \
        --iters "${ITERS:-20}" --compile --fuse-layers-too --dtype bf16 --attention "${ATTENTION:-sdpa}" \
        --peers torchao-int4 --out "$OUT" > "$OUT/peer.txt" 2>&1
    tail -n 30 "$OUT/peer.txt" ;;
*) echo "phase: check, model, attention or peer"; exit 2 ;;
esac
