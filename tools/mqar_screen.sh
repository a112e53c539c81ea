#!/bin/sh
# The MQAR comparison of docs/mqar.md: KLA against the GDN baseline, 3 seeds each, the KLA
# authors' protocol (their data distribution, AdamW, 10000 steps with validation every 200
# and early stopping, the best checkpoint evaluated at 1x 2x 4x 8x the training length) at
# the notes' screening size (d 128, 2 heads of 48 x 96, MLP 512), or the published size
# with SIZE=published. Runs are resumable: a run with a checkpoint continues from it, a
# finished run (its log has a final line) is skipped, and a run whose pid file names a live
# process (another invocation's) is waited for rather than started twice. JOBS runs at a
# time (default 2), one thread each, the next starting as soon as one ends.
#   tools/mqar_screen.sh [OUTDIR]      (default mqar-runs; KLA=path/to/kla, SEEDS="42 43 44")
set -u
KLA=${KLA:-build/kla}
OUT=${1:-mqar-runs}
JOBS=${JOBS:-2}
mkdir -p "$OUT" || exit 1
case ${SIZE:-screen} in
    screen) MODEL="--d-model 128 --n-head 2 --d-k 48 --d-v 96 --d-ff 512" ;;
    published) MODEL="" ;;
    *) echo "SIZE must be screen or published" >&2; exit 2 ;;
esac
run() { # mixer seed
    name=$1-seed$2
    pidf=$OUT/$name.pid
    if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
        echo "$name: $(date -u +%H:%M) running as pid $(cat "$pidf"), waiting for it"
        while kill -0 "$(cat "$pidf")" 2>/dev/null; do sleep 30; done
    fi
    if [ -f "$OUT/$name.jsonl" ] && grep -q '"final"' "$OUT/$name.jsonl"; then
        echo "$name: finished"; return 0
    fi
    resume=""
    [ -f "$OUT/$name.ckpt" ] && resume="--resume $OUT/$name.ckpt"
    echo "$name: $(date -u +%H:%M) ${resume:-starting}"
    # shellcheck disable=SC2086
    "$KLA" train --mixer "$1" --seed "$2" $MODEL --threads 1 --quiet \
        --checkpoint "$OUT/$name.ckpt" --log "$OUT/$name.jsonl" $resume >"$OUT/$name.out" 2>&1 &
    echo $! >"$pidf"
    wait $!
    echo "$name: $(date -u +%H:%M) exit $?"
}
pids=""
running() { # how many of our runs are alive
    n=0
    for p in $pids; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done
    echo $n
}
for seed in ${SEEDS:-42 43 44}; do
    for mixer in kla gdn; do
        while [ "$(running)" -ge "$JOBS" ]; do sleep 20; done
        run $mixer "$seed" &
        pids="$pids $!"
    done
done
wait
python3 tools/plot_mqar.py "$OUT"/*.jsonl --out "$OUT" --paper --table "$OUT/table.md"
