#!/bin/sh
# gpu_figures.sh BUILD [OUTDIR]: everything issues 5 and 13 ask of a real GPU, in one run
# (a few minutes on an H100): the Vulkan test suite, KlaState, KlaBuffer (resident and
# 16-bit tensors), the application-device example, the mid-size check against ref64, the
# independent float64 oracle (tests/test_indep.py) on the vulkan backend, then
# `kla bench --backend vulkan` on the issue's shapes (host, resident and bf16-resident
# rows) and, where PyTorch and flash-linear-attention import, tools/bench_fla.py on the
# same shapes (docs/benchmarks.md records them). Each step's output goes to OUTDIR
# (default .) as well as stdout; the exit status is 1 if any check failed.
# Environment: TESTS=0 skips the test steps (figures only); TENSORS=host|resident|both
# (default both) picks the bench rows; FLA_TIMEOUT (seconds, default 300) bounds each
# bench_fla.py run (Triton compiles and autotunes on first use); FLA_ARGS adds options to
# it (--bypass-hopper-guard: time fla's backward where its Triton check refuses it).
B=${1:?usage: gpu_figures.sh BUILD [OUTDIR]}
O=${2:-.}
S=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$O" || exit 1
fail=0
step() { # step NAME CMD...: run, log, count failure
    name=$1; shift
    echo "== $name: $*"
    "$@" >"$O/$name.txt" 2>&1; rc=$?
    tail -n 40 "$O/$name.txt"
    [ $rc -eq 0 ] || { echo "== $name FAILED (exit $rc)"; fail=1; }
}
TN=${TENSORS:-both}
step info "$B/kla" info
PY=
for p in /usr/bin/python3 python3 python; do # the first Python that has numpy
    if [ -z "$PY" ] && "$p" -c 'import numpy' 2>/dev/null; then PY=$p; fi
done
if [ "${TESTS:-1}" != 0 ]; then
    step test_vulkan "$B/tests/test_vulkan"
    step test_state "$B/tests/test_state"
    step test_buffer "$B/tests/test_buffer"
    step vulkan_app "$B/examples/vulkan_app"
    step vkcheck "$B/tests/vkcheck"
    if [ -n "$PY" ]; then
        step indep "$PY" "$S/tests/test_indep.py" --kla "$B/kla" --backends vulkan
    else
        echo "== indep FAILED: no Python with numpy"; fail=1
    fi
fi
for shape in "16 128 128" "12 96 192"; do
    set -- $shape
    for T in 4096 32768; do
        step "bench_T${T}_H$1_K$2_V$3" "$B/kla" bench --backend vulkan --T $T --H $1 --K $2 --V $3 \
            --N 256 --reps 5 --op forward --tensors $TN
        step "bench_bf16_T${T}_H$1_K$2_V$3" "$B/kla" bench --backend vulkan --T $T --H $1 --K $2 --V $3 \
            --N 256 --reps 5 --op forward --storage bf16 --tensors $TN
    done
    step "bench_fwdbwd_T32768_H$1_K$2_V$3" "$B/kla" bench --backend vulkan --T 32768 --H $1 --K $2 --V $3 \
        --reps 3 --op backward --tensors $TN
    step "bench_decode_H$1_K$2_V$3" "$B/kla" bench --backend vulkan --H $1 --K $2 --V $3 --N 256 --reps 8 --op decode --tensors $TN
    step "bench_decode16_H$1_K$2_V$3" "$B/kla" bench --backend vulkan --H $1 --K $2 --V $3 --N 16 --reps 8 --op decode --tensors $TN
done
# fla on the same GPU, the same day (PYTHONPATH naming a copy of flash-linear-attention)
if [ -n "$PY" ] && "$PY" -c 'import torch, fla' 2>/dev/null; then
    for shape in "16 128 128" "12 96 192"; do
        set -- $shape
        for T in 4096 32768; do
            step "fla_T${T}_H$1_K$2_V$3" timeout "${FLA_TIMEOUT:-300}" "$PY" "$S/tools/bench_fla.py" --T $T --H $1 --K $2 --V $3 --N 256 \
                --json "$O/fla_T${T}_H$1_K$2_V$3.json" ${FLA_ARGS:-}
        done
    done
else
    echo "== fla: skipped (no Python with torch and fla)"
fi
exit $fail
