#!/bin/sh
# examples/validate (a plain C program linking libkla) on every golden case (TAP).
# Usage: sh tests/test_examples.sh PATH_TO_VALIDATE SOURCE_DIR
V=${1:?usage: test_examples.sh PATH_TO_VALIDATE SOURCE_DIR}
SRC=${2:?usage: test_examples.sh PATH_TO_VALIDATE SOURCE_DIR}
N=0
FAILED=0
# the operator's cases (layer_* and model_* are kla layer backward / kla model step cases)
for f in "$SRC"/golden/kla_*.safetensors "$SRC"/golden/gdn_*.safetensors; do
    c=$(basename "$f" .safetensors)
    for b in ref ref64; do
        N=$((N + 1))
        if out=$("$V" "$f" $b 2>&1) && echo "$out" | grep -q ' 0 failed$'; then
            echo "ok $N - validate $c ($b)"
        else
            FAILED=$((FAILED + 1))
            echo "not ok $N - validate $c ($b)"
            echo "$out" | sed 's/^/# /'
        fi
    done
done
# a wrong backend name is reported and fails
N=$((N + 1))
if "$V" "$SRC/golden/kla_B1_T2_H1_HV1_K2_V1_spec6.safetensors" nosuch >/dev/null 2>&1; then
    FAILED=$((FAILED + 1)); echo "not ok $N - validate fails with an unknown backend"
else echo "ok $N - validate fails with an unknown backend"; fi
echo "1..$N"
[ $FAILED -eq 0 ]
