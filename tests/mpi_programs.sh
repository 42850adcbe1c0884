#!/usr/bin/env bash
# The example programs under mpirun on this one machine (ctest: mpi.programs).
#   mpi_programs.sh <build/examples dir> <work dir>
# 1. Module-parallel incubation: `mpirun -np 2 incubate --phase all` (rank r incubates modules r
#    and r + 2, rank 0 the other phases) writes byte-identical files to one process's
#    --phase all, and `mpirun -np 4 incubate --phase module` (one module per rank) the same
#    module files as four single processes.
# 2. Data-parallel: `mpirun -np 2 train_e2e --distributed` prints its result once, and a rank
#    killed mid-run stops the job (non-zero exit, no hang: a time-out guards the wait) with no
#    half-written file; rerunning the same command resumes from the last saved epoch.
# Skips (77) without the Fashion-MNIST directory.
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: $0 <examples dir> <work dir>" >&2; exit 2; }
bin=$1 work=$2
data=${HATCH_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
[[ -d "$data" ]] || { echo "$0: skipped: no Fashion-MNIST directory at $data" >&2; exit 77; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
mpi=(mpirun --oversubscribe -np)
rm -rf "$work" && mkdir -p "$work"
status=0
fail() { echo "FAIL: $*" >&2; status=1; }
common=(--data "$data" --preset vit-micro --train-limit 256 --test-limit 128 --epochs-meta 1 --epochs-module 1
        --epochs-finetune 1 --no-progress --threads 1)

# 1. module-parallel
"$bin/incubate" "${common[@]}" --phase all --out "$work/one" > "$work/one.txt"
"${mpi[@]}" 2 "$bin/incubate" "${common[@]}" --phase all --out "$work/two" > "$work/two.txt"
for phase in meta modules assembled finetuned; do
  for i in 0 1 2 3; do
    cmp -s "$work/one/$phase/stage$i.safetensors" "$work/two/$phase/stage$i.safetensors" ||
      fail "$phase/stage$i differs between one process and 2 module-parallel ranks"
  done
done
[[ $(grep -c '^test_accuracy=' "$work/two.txt") -eq 1 ]] || fail "the 2-rank job did not print one result: $(cat "$work/two.txt")"
[[ $(tail -n1 "$work/one.txt") == $(tail -n1 "$work/two.txt") ]] || fail "results differ: $(tail -n1 "$work/one.txt") vs $(tail -n1 "$work/two.txt")"
mkdir -p "$work/four" && cp -r "$work/one/meta" "$work/four/"
"${mpi[@]}" 4 "$bin/incubate" "${common[@]}" --phase module --out "$work/four" > "$work/four.txt"
for i in 0 1 2 3; do
  cmp -s "$work/one/modules/stage$i.safetensors" "$work/four/modules/stage$i.safetensors" ||
    fail "modules/stage$i differs between a single process and 4 ranks"
done

# 2. data-parallel, and a rank killed mid-run
e2e=(--data "$data" --preset vit-micro --train-limit 2048 --test-limit 256 --no-progress --threads 1
     --distributed --out "$work/dp")
"${mpi[@]}" 2 "$bin/train_e2e" "${e2e[@]}" --epochs 1 > "$work/dp1.txt" 2>&1 || fail "data-parallel train_e2e failed: $(cat "$work/dp1.txt")"
[[ $(grep -c '^test_accuracy=' "$work/dp1.txt") -eq 1 ]] || fail "data-parallel train_e2e printed $(grep -c '^test_accuracy=' "$work/dp1.txt") results"
rm -rf "$work/dp"
"${mpi[@]}" 2 "$bin/train_e2e" "${e2e[@]}" --epochs 6 > "$work/kill.txt" 2>&1 &
job=$!
for _ in $(seq 600); do  # until an epoch is saved
  [[ -f "$work/dp/e2e.state.safetensors" ]] && break
  sleep 0.1
done
victim=""
for pid in $(pgrep -f "$bin/train_e2e" || true); do
  tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx 'OMPI_COMM_WORLD_RANK=1' && victim=$pid
done
[[ -n $victim ]] || fail "found no rank 1 to kill"
[[ -n $victim ]] && kill -9 "$victim"
rc=0
timeout 60 tail --pid="$job" -f /dev/null || { fail "the job did not stop within 60 s of a rank's death"; kill -9 "$job"; }
wait "$job" || rc=$?
[[ $rc -ne 0 ]] || fail "the job with a killed rank exited 0"
ls "$work/dp" | grep -q '\.tmp' && fail "a temporary file was left in $work/dp: $(ls "$work/dp")"
"${mpi[@]}" 2 "$bin/train_e2e" "${e2e[@]}" --epochs 6 > "$work/resume.txt" 2>&1 || fail "the rerun failed: $(cat "$work/resume.txt")"
grep -q 'e2e: resuming after epoch [1-5] of 6' "$work/resume.txt" || fail "the rerun did not resume: $(head -n3 "$work/resume.txt")"
[[ $(grep -c '^test_accuracy=' "$work/resume.txt") -eq 1 ]] || fail "the resumed job printed no result"

[[ $status -eq 0 ]] && echo "OK: module-parallel files identical to one process (2 and 4 ranks); data-parallel result printed once; a killed rank stopped the job (exit $rc) and the rerun resumed"
exit $status
