#!/bin/sh
# One command as one TAP test: tap_one.sh NAME CMD... (exit 77 from CMD: a skip)
name=$1; shift
out=$("$@" 2>&1); rc=$?
if [ $rc -eq 0 ]; then echo "ok 1 - $name"
elif [ $rc -eq 77 ]; then echo "ok 1 - $name # SKIP"
else echo "not ok 1 - $name (exit $rc)"; printf '%s\n' "$out" | tail -30 | sed 's/^/# /'; fi
echo "1..1"
[ $rc -eq 0 ] || [ $rc -eq 77 ]
