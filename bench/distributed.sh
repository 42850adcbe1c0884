#!/usr/bin/env bash
# Issue 12's measurements on one machine: data-parallel vit-small (2 ranks x 1 thread against
# 1 rank x 2 threads, same global batches) and module-parallel Deep Incubation (the 4 module jobs
# of vit-small on 2 ranks x 1 thread against one process with 2 threads). Wall times of whole
# processes (loading included), one run each, under mpirun --oversubscribe.
#
#   bench/distributed.sh [--build build] [--train-limit 5120]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
build=build train_limit=5120
die() { echo "distributed.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build|--train-limit) [[ $# -ge 2 ]] || die "$1 needs a value"; k="${1#--}"; declare "${k//-/_}=$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[[ "$train_limit" =~ ^[1-9][0-9]*$ ]] || die "--train-limit must be a positive integer"
if [[ "$build" != /* && ! -d "$build" ]]; then build="$root/$build"; fi
bin="$build/examples"
for p in train_e2e incubate; do [[ -x "$bin/$p" ]] || die "missing $bin/$p"; done
command -v mpirun >/dev/null || die "missing mpirun (Debian package openmpi-bin)"
[[ -x /usr/bin/time ]] || die "missing /usr/bin/time"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
common=(--preset vit-small --train-limit "$train_limit" --test-limit 512 --no-progress --seed 0)
wall() { /usr/bin/time -f "%e" -o "$tmp/t" "$@" >"$tmp/out" 2>&1 || { cat "$tmp/out" >&2; die "failed: $*"; }; cat "$tmp/t"; }
acc() { sed -n 's/^test_accuracy=\(.*\)$/\1/p' "$tmp/out" | tail -1; }
echo "load average $(cut -d' ' -f1-3 /proc/loadavg); vit-small, $train_limit training images"

t1="$(wall "$bin/train_e2e" "${common[@]}" --epochs 1 --threads 2 --no-resume --out "$tmp/dp1")"; a1="$(acc)"
t2="$(wall env OMP_NUM_THREADS=1 mpirun --oversubscribe -np 2 "$bin/train_e2e" "${common[@]}" --epochs 1 --threads 1 \
      --distributed --no-resume --out "$tmp/dp2")"; a2="$(acc)"
echo "| data-parallel, 1 epoch | 1 rank x 2 threads: $t1 s (test $a1) | 2 ranks x 1 thread: $t2 s (test $a2) |"

inc=("$bin/incubate" "${common[@]}" --epochs-meta 1 --epochs-module 1)
wall "${inc[@]}" --phase meta --threads 2 --out "$tmp/mp1" >/dev/null
cp -r "$tmp/mp1" "$tmp/mp2"
t3="$(wall "${inc[@]}" --phase module --index -1 --threads 2 --out "$tmp/mp1")"
t4="$(wall env OMP_NUM_THREADS=1 mpirun --oversubscribe -np 2 "${inc[@]}" --phase module --index -1 --threads 1 --out "$tmp/mp2")"
same=yes
for i in 0 1 2 3; do cmp -s "$tmp/mp1/modules/stage$i.safetensors" "$tmp/mp2/modules/stage$i.safetensors" || same=no; done
echo "| module-parallel, 4 modules x 1 epoch | 1 process x 2 threads: $t3 s | 2 ranks x 1 thread: $t4 s | module files identical: $same |"
