#!/usr/bin/env bash
# Peak resident memory of a whole training run, hatch (examples/train_e2e) against its PyTorch
# twin (bench/torch_fmnist_train.py) on the same recipe (issue 14): the two run one after the
# other, each under /usr/bin/time -v, and a table gives peak RSS, the ratio, wall time and test
# accuracy.
#
#   bench/memory.sh [--preset vit-small] [--epochs 1] [--train-limit 0] [--test-limit 0]
#                   [--threads 1] [--build build]
#
# --train-limit / --test-limit 0 = the full sets. The recipe is both programs' defaults (AdamW,
# lr 2e-3, warmup 1 epoch, cosine, label smoothing 0.1, batch 128, no augmentation), seed 0.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
preset=vit-small epochs=1 train_limit=0 test_limit=0 threads=1 build=build
python=/usr/bin/python3

usage() { sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "memory.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset|--epochs|--train-limit|--test-limit|--threads|--build)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      k="${1#--}"; declare "${k//-/_}=$2"; shift 2 ;;
    --preset=*|--epochs=*|--train-limit=*|--test-limit=*|--threads=*|--build=*)
      k="${1%%=*}"; k="${k#--}"; declare "${k//-/_}=${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
for k in epochs threads; do
  [[ "${!k}" =~ ^[1-9][0-9]*$ ]] || die "--${k//_/-} must be a positive integer, got '${!k}'"
done
for k in train_limit test_limit; do
  [[ "${!k}" =~ ^[0-9]+$ ]] || die "--${k//_/-} must be a non-negative integer, got '${!k}'"
done

# A relative --build is taken from the current directory if it is there, else from the repo root.
if [[ "$build" != /* && ! -d "$build" ]]; then build="$root/$build"; fi
hatch_bin="$build/examples/train_e2e"
torch_py="$here/torch_fmnist_train.py"
[[ -x "$hatch_bin" ]] || die "missing $hatch_bin: build it (cmake --build $build --target train_e2e), or pass --build DIR"
[[ -f "$torch_py" ]] || die "missing $torch_py"
[[ -x /usr/bin/time ]] || die "missing /usr/bin/time (Debian package 'time')"
"$python" -c 'import torch' 2>/dev/null || die "$python cannot import torch (Debian package python3-torch)"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# run NAME CMD...: sets rss_NAME (KiB), wall_NAME (s) and acc_NAME from the run's output.
run() {
  local name="$1" out="$tmp/$1.out" tv="$tmp/$1.time"
  shift
  echo "running $name: $*" >&2
  if ! /usr/bin/time -v -o "$tv" "$@" >"$out" 2>&1; then
    tail -20 "$out" >&2
    die "$name failed: $*"
  fi
  local rss wall acc
  rss="$(sed -n 's/.*Maximum resident set size (kbytes): *\([0-9]*\).*/\1/p' "$tv")"
  # "Elapsed (wall clock) time (h:mm:ss or m:ss): 3:07.41" -> seconds
  wall="$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): *//p' "$tv" |
          awk -F: '{s = 0; for (i = 1; i <= NF; ++i) s = s * 60 + $i; printf "%.1f", s}')"
  acc="$(sed -n 's/^test_accuracy=\([0-9.]*\)$/\1/p' "$out" | tail -1)"
  [[ -n "$acc" ]] || { tail -20 "$out" >&2; die "$name printed no test_accuracy= line"; }
  declare -g "rss_$name=$rss" "wall_$name=$wall" "acc_$name=$acc"
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?'; }
echo "preset=$preset epochs=$epochs train_limit=$train_limit test_limit=$test_limit threads=$threads (load average $(loadavg))"
run hatch "$hatch_bin" --preset "$preset" --epochs "$epochs" --train-limit "$train_limit" --test-limit "$test_limit" \
  --threads "$threads" --seed 0 --no-progress --no-resume --out "$tmp/hatch-out"
run torch "$python" "$torch_py" --preset "$preset" --epochs "$epochs" --train-limit "$train_limit" \
  --test-limit "$test_limit" --threads "$threads" --seed 0
echo "load average after: $(loadavg)"

mib() { awk -v k="$1" 'BEGIN{printf "%.0f", k / 1024}'; }
printf '\n| program | peak RSS (MiB) | wall (s) | test accuracy |\n|---|---:|---:|---:|\n'
printf '| hatch train_e2e | %s | %s | %s |\n' "$(mib "$rss_hatch")" "$wall_hatch" "$acc_hatch"
printf '| PyTorch twin | %s | %s | %s |\n' "$(mib "$rss_torch")" "$wall_torch" "$acc_torch"
printf '\nhatch / PyTorch peak RSS: %s (issue 14 asks for <= 0.5)\n' \
  "$(awk -v a="$rss_hatch" -v b="$rss_torch" 'BEGIN{printf "%.2f", a / b}')"
