#!/usr/bin/env bash
# expect_failure.sh REGEX COMMAND...: passes when COMMAND exits non-zero (but not by a signal)
# and its combined output matches REGEX.
regex=$1
shift
out=$("$@" 2>&1)
rc=$?
if [ "$rc" -eq 0 ]; then
  echo "expected a failure, got exit code 0"; echo "$out"; exit 1
fi
if [ "$rc" -ge 128 ]; then
  echo "crashed with signal $((rc - 128))"; echo "$out"; exit 1
fi
if ! grep -Eq -- "$regex" <<<"$out"; then
  echo "exit code $rc, but the output does not match /$regex/:"; echo "$out"; exit 1
fi
echo "ok: exit code $rc, message: $(grep -E -m1 -- "$regex" <<<"$out")"
