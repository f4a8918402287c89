#!/usr/bin/env bash
# Every shipped kernel config compiled for sm_90a with the pinned Triton (the baseline, from .venv)
# and with each newer Triton the kernels support, each installed in its own directory that shadows
# the pinned one on PYTHONPATH (cached in $W4A16_TRITON_CACHE between runs). Fails if a config does
# not compile, spills, or grows its main loop beyond `w4a16 sass`'s tolerance over the baseline
# (beyond a documented allowance, src/w4a16/sass/allowances.py). The Tritons that compile sm_90
# with a newer ptxas than the one they ship for older GPUs (3.9) are also checked with
# W4A16_SM90_PTXAS=legacy (the older ptxas: no config may spill more there than in the baseline).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${W4A16_VENV:-.venv}/bin/python
VERSIONS=${W4A16_TRITON_VERSIONS:-3.7.1 3.8.0 3.9.0}
CACHE=${W4A16_TRITON_CACHE:-$HOME/.cache/w4a16/tritons}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
base=$($PY -c "import triton; print(triton.__version__)")
echo "== w4a16 sass, triton $base (the baseline)"
$PY -m w4a16 sass --json "$work/base.json" > "$work/sass-$base.txt" 2> "$work/sass-$base.err"
tail -n 1 "$work/sass-$base.txt"
status=0
for v in $VERSIONS; do
    dir="$CACHE/triton-$v"
    if [ ! -f "$dir/.complete" ]; then
        rm -rf "$dir"
        $PY -m pip install -q --no-deps --target "$dir" "triton==$v"
        touch "$dir/.complete"
    fi
    echo "== w4a16 sass, triton $v"
    if ! PYTHONPATH="$dir" $PY -m w4a16 sass --baseline "$work/base.json" > "$work/sass-$v.txt" 2> "$work/sass-$v.err"; then
        status=1
        grep -E "^FAIL" "$work/sass-$v.txt" || tail -n 20 "$work/sass-$v.err"
    fi
    grep -E "^triton|configs ok" "$work/sass-$v.txt" | head -n 2
    if grep -q "=legacy compiles it" <(PYTHONPATH="$dir" $PY -m w4a16 info 2>/dev/null); then
        echo "== w4a16 sass, triton $v, W4A16_SM90_PTXAS=legacy"
        if ! W4A16_SM90_PTXAS=legacy PYTHONPATH="$dir" $PY -m w4a16 sass --baseline "$work/base.json" \
                --json "$work/legacy-$v.json" > "$work/sass-$v-legacy.txt" 2> "$work/sass-$v-legacy.err"; then
            status=1
            grep -E "^FAIL" "$work/sass-$v-legacy.txt" || tail -n 20 "$work/sass-$v-legacy.err"
        fi
        grep -E "^triton|configs ok" "$work/sass-$v-legacy.txt" | head -n 2
        if ! $PY .ci/spills_beyond_baseline.py "$work/base.json" "$work/legacy-$v.json"; then
            echo "a config spills more with the older ptxas than in the baseline"; status=1
        fi
    fi
done
exit $status
