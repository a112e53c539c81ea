#!/bin/sh
# The MQAR comparison of docs/mqar.md: KLA against the GDN baseline, 3 seeds each, the KLA
# authors' protocol (their data distribution, AdamW, 10000 steps with validation every 200
# and early stopping, the best checkpoint evaluated at 1x 2x 4x 8x the training length) at
# the notes' screening size (d 128, 2 heads of 48 x 96, MLP 512), or the published size
# with SIZE=published. Runs are resumable: a run with a checkpoint continues from it, a
# finished run (its log has a final line) is skipped. Two runs at a time, one thread each.
#   tools/mqar_screen.sh [OUTDIR]      (default mqar-runs; KLA=path/to/kla)
set -u
KLA=${KLA:-build/kla}
OUT=${1:-mqar-runs}
mkdir -p "$OUT" || exit 1
case ${SIZE:-screen} in
    screen) MODEL="--d-model 128 --n-head 2 --d-k 48 --d-v 96 --d-ff 512" ;;
    published) MODEL="" ;;
    *) echo "SIZE must be screen or published" >&2; exit 2 ;;
esac
run() { # mixer seed
    name=$1-seed$2
    if [ -f "$OUT/$name.jsonl" ] && grep -q '"final"' "$OUT/$name.jsonl"; then
        echo "$name: finished"; return 0
    fi
    resume=""
    [ -f "$OUT/$name.ckpt" ] && resume="--resume $OUT/$name.ckpt"
    echo "$name: $(date -u +%H:%M) ${resume:-starting}"
    # shellcheck disable=SC2086
    "$KLA" train --mixer "$1" --seed "$2" $MODEL --threads 1 --quiet \
        --checkpoint "$OUT/$name.ckpt" --log "$OUT/$name.jsonl" $resume >"$OUT/$name.out" 2>&1
    echo "$name: $(date -u +%H:%M) exit $?"
}
for seed in 42 43 44; do
    run kla "$seed" &
    run gdn "$seed" &
    wait
done
python3 tools/plot_mqar.py "$OUT"/*.jsonl --out "$OUT" --paper --table "$OUT/table.md"
