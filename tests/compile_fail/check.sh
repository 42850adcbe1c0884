#!/usr/bin/env bash
# check.sh MAX_LINES HEAD_REGEX ERROR_REGEX COMPILER_COMMAND...
# Passes when the compile fails with exactly one error, in at most MAX_LINES lines of output,
# with HEAD_REGEX (the sentence with the numbers) in the first 6 lines and ERROR_REGEX (what to
# do) on the error line.
max=$1 head_re=$2 err_re=$3
shift 3
out=$(LC_ALL=C "$@" 2>&1)
rc=$?
fail() { echo "$1"; echo "---- compiler output ($(wc -l <<<"$out") lines) ----"; echo "$out"; exit 1; }
[ "$rc" -ne 0 ] || fail "expected the compile to fail, it succeeded"
lines=$(wc -l <<<"$out")
[ "$lines" -le "$max" ] || fail "expected at most $max lines of compiler output, got $lines"
errors=$(grep -c ': error: ' <<<"$out")
[ "$errors" -eq 1 ] || fail "expected exactly one error, got $errors"
head -n 6 <<<"$out" | grep -Eq -- "$head_re" || fail "the first 6 lines do not match /$head_re/"
grep ': error: ' <<<"$out" | grep -Eq -- "$err_re" || fail "the error line does not match /$err_re/"
echo "ok: $lines lines, one error: $(grep -E -m1 -o -- "$head_re" <<<"$out")"
