#!/usr/bin/env bash
# The collective time-out (ctest: mpi.timeout): under `mpirun -np 2`, rank 1 never joins an
# all-reduce (or broadcast) that rank 0 enters with a 2 s time-out. The job must stop within
# 20 s with a non-zero exit, and stderr must name the operation, the rank, the element count
# and the time-out. A job whose ranks both join (one late) still succeeds, with a time-out and
# with none (0: the blocking calls).
#   mpi_timeout.sh <hatch_mpi_timeout binary>
set -uo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 <hatch_mpi_timeout>" >&2; exit 2; }
bin=$1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
unset HATCH_COLLECTIVE_TIMEOUT
status=0
fail() { echo "FAIL: $*" >&2; status=1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# case <name> <regex the output must hold> [env assignments...]
expect_timeout() {
  local mode=$1 regex=$2
  shift 2
  local t0=$SECONDS rc=0
  env "$@" timeout -k 5 25 mpirun --oversubscribe -np 2 "$bin" "$mode" > "$out/$mode.txt" 2>&1 || rc=$?
  local took=$((SECONDS - t0))
  if [[ $rc -eq 0 ]]; then
    fail "$mode: the job exited 0"
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    fail "$mode: the job hung (killed after 25 s)"
  elif ((took > 20)); then
    fail "$mode: the job took $took s to stop"
  fi
  grep -Eq "$regex" "$out/$mode.txt" || fail "$mode: no time-out message matching '$regex' in: $(cat "$out/$mode.txt")"
  echo "$mode: exit $rc after ${took} s: $(grep -E 'timed out' "$out/$mode.txt" | head -n1)"
}
expect_timeout allreduce 'hatch: MPI all-reduce of 1000 floats timed out on rank 0 of 2 after 2 s'
expect_timeout broadcast 'hatch: MPI broadcast of 4000 bytes timed out on rank 0 of 2 after 2 s'
expect_timeout env 'hatch: MPI all-reduce of 1000 floats timed out on rank 0 of 2 after 3 s' HATCH_COLLECTIVE_TIMEOUT=3
grep -q 'rank 0: time-out 3 s' "$out/env.txt" || fail "env: HATCH_COLLECTIVE_TIMEOUT=3 was not the time-out"

for mode in ok ok0; do
  rc=0
  timeout -k 5 25 mpirun --oversubscribe -np 2 "$bin" $mode > "$out/$mode.txt" 2>&1 || rc=$?
  [[ $rc -eq 0 ]] || fail "$mode: both ranks joined but the job exited $rc: $(cat "$out/$mode.txt")"
done
rc=0
HATCH_COLLECTIVE_TIMEOUT=soon timeout -k 5 25 mpirun --oversubscribe -np 2 "$bin" ok > "$out/bad.txt" 2>&1 || rc=$?
[[ $rc -ne 0 ]] || fail "HATCH_COLLECTIVE_TIMEOUT=soon was accepted"
grep -q "HATCH_COLLECTIVE_TIMEOUT: expected a whole number of seconds >= 0 (0: no time-out), got 'soon'" "$out/bad.txt" ||
  fail "no message for HATCH_COLLECTIVE_TIMEOUT=soon: $(cat "$out/bad.txt")"

[[ $status -eq 0 ]] && echo "OK: a rank that never joined stopped the job with the time-out message (all-reduce, broadcast, env); a late rank within the time-out did not"
exit $status
