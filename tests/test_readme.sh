#!/bin/sh
# The README's C program compiles against this build's libkla and runs (TAP).
# Usage: sh tests/test_readme.sh SOURCE_DIR BUILD_DIR CC [SANITIZE]
#   SANITIZE: meson's b_sanitize of the build ("none" or e.g. "address,undefined")
SRC=${1:?usage: test_readme.sh SOURCE_DIR BUILD_DIR CC [SANITIZE]}
BUILD=${2:?}
CC=${3:-cc}
SAN=""
[ -n "$4" ] && [ "$4" != none ] && SAN="-fsanitize=$4"
W=$(mktemp -d "${TMPDIR:-/tmp}/kla_readme.XXXXXX") || exit 1
trap 'rm -rf "$W"' EXIT
# the first ```c block of README.md
awk '/^```c$/ { on = 1; next } on && /^```$/ { exit } on' "$SRC/README.md" >"$W/demo.c"
N=0; FAILED=0
t() { N=$((N + 1)); if [ "$1" = 0 ]; then echo "ok $N - $2"; else FAILED=$((FAILED + 1)); echo "not ok $N - $2"; sed 's/^/# /' "$W/log" | head -20; fi; }
grep -q 'int main' "$W/demo.c"; t $? "README's C block is a whole program"
# against the shared library, as `pkg-config --libs kla` links it
$CC -std=c11 -Wall -Wextra -Werror $SAN -I"$SRC/include" "$W/demo.c" -o "$W/demo" -L"$BUILD" \
    -Wl,-rpath,"$BUILD" -lkla -lm >"$W/log" 2>&1
t $? "README's C program compiles with -Wall -Wextra -Werror"
"$W/demo" >"$W/log" 2>&1 && grep -q '^o\[0\] = .*, ran recurrent$' "$W/log"
t $? "README's C program runs and prints o[0]"
echo "1..$N"
[ $FAILED -eq 0 ]
