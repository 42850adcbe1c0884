#!/usr/bin/env bash
# The GPU check, in one run on a machine with an NVIDIA GPU (about 5 minutes on 16 cores):
#   1. configures and builds the CUDA targets (CUDA tests, train_step, train_e2e) in build-gpu/,
#   2. runs the CUDA tests (CPU-vs-CUDA parity of every primitive, layer and a training step),
#   3. times a ViT-B/16 training step (224x224x3 random data, 1000 classes, batch 64) in hatch
#      and in PyTorch eager on the same GPU, float32 and TF32, alternating hatch and torch,
#   4. trains vit-tiny on Fashion-MNIST for one epoch with `train_e2e --device cuda` (if the
#      data set is installed),
# and prints a table (also written to $OUT/gpu.md when OUT is set).
#
#   bench/gpu.sh [--build build-gpu] [--no-build] [--batch 64] [--steps 20] [--python python3]
#
# --no-build uses the binaries already in the build directory (for example built with CUDA on
# another machine and copied over, when this one lacks the Debian packages the build needs).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
build="$root/build-gpu" batch=64 steps=20 python=python3 no_build=0
die() { echo "gpu.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build|--batch|--steps|--python)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      declare "${1#--}=$2"; shift 2 ;;
    --no-build) no_build=1; shift ;;
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
for k in batch steps; do [[ "${!k}" =~ ^[1-9][0-9]*$ ]] || die "--$k must be a positive integer, got '${!k}'"; done
command -v nvidia-smi >/dev/null || die "no nvidia-smi: this script needs a machine with an NVIDIA GPU"
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"

card="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
echo "== $(date -u +%F\ %H:%M) UTC, $card"
start=$SECONDS
jobs="$(nproc)"

if [[ $no_build == 0 ]]; then
  command -v nvcc >/dev/null || die "no nvcc on PATH or in /usr/local/cuda/bin (or pass --no-build)"
  echo "== configure + build ($build, -j$jobs, $(nvcc --version | tail -1))"
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DHATCH_ENABLE_CUDA=ON -DHATCH_BUILD_TESTS=ON \
    -DHATCH_BUILD_EXAMPLES=ON -DHATCH_BUILD_BENCHMARKS=ON >"$build.configure.log" 2>&1 \
    || { tail -30 "$build.configure.log"; die "configure failed (log: $build.configure.log)"; }
  cmake --build "$build" -j"$jobs" --target hatch_cuda_tests train_step train_e2e >"$build.build.log" 2>&1 \
    || { grep -m20 -B2 -A6 "error" "$build.build.log"; die "build failed (log: $build.build.log)"; }
  echo "   built in $((SECONDS - start)) s"
fi
for bin in tests/hatch_cuda_tests bench/train_step examples/train_e2e; do
  [[ -x "$build/$bin" ]] || die "missing $build/$bin"
done

echo "== CUDA tests"
tests_status=passed
timeout 300 "$build/tests/hatch_cuda_tests" 2>&1 | tail -25
[[ ${PIPESTATUS[0]} -eq 0 ]] || tests_status=FAILED

# images/s of one run, or "failed"; the run's own output goes to the log.
ips() {
  local out
  if out="$(timeout 180 "$@" 2>&1)"; then
    echo "$out" >>"$build/gpu-runs.log"
    echo "$out" | sed -n 's/^images_per_second=//p' | tail -1
  else
    echo "$out" >>"$build/gpu-runs.log"; echo "$out" | tail -3 >&2; echo failed
  fi
}
# The better of two images/s results, either of which may be empty or "failed".
better() {
  if [[ -z "$1" || "$1" == failed ]]; then echo "$2"
  elif [[ -z "$2" || "$2" == failed ]]; then echo "$1"
  else "$python" -c "print(max($1, $2))"; fi
}
ratio() { if [[ "$1" == failed || "$2" == failed || -z "$1" || -z "$2" ]]; then echo "-"; else
  "$python" -c "print(f'{$1 / $2:.2f}')"; fi; }

: >"$build/gpu-runs.log"
declare -A H T
for prec in fp32 tf32; do
  flag=(); [[ $prec == tf32 ]] && flag=(--tf32)
  echo "== ViT-B/16 training step, batch $batch, $prec"
  for round in 1 2; do  # alternate so that a change in the machine's state hits both
    h="$(ips "$build/bench/train_step" --device cuda --preset vit-b16 --batch "$batch" --steps "$steps" --warmup 5 "${flag[@]}")"
    t="$(ips "$python" "$here/torch_vit_step.py" --device cuda --preset vit-b16 --batch "$batch" --steps "$steps" --warmup 5 "${flag[@]}")"
    echo "   round $round: hatch $h, torch $t images/s"
    # keep the better round of each (the first may pay for cuBLAS heuristics and clocks)
    H[$prec]="$(better "${H[$prec]:-}" "$h")"
    T[$prec]="$(better "${T[$prec]:-}" "$t")"
  done
done

acc="-"
if [[ -d /usr/share/datasets/fashion-mnist || -n "${HATCH_FMNIST:-}" ]]; then
  echo "== train_e2e --device cuda (vit-tiny, 1 epoch, full Fashion-MNIST)"
  e2e_out="$(timeout 240 "$build/examples/train_e2e" --device cuda --preset vit-tiny --epochs 1 --no-progress --no-resume \
    --out "$build/e2e-gpu" ${HATCH_FMNIST:+--data "$HATCH_FMNIST"} 2>&1)"
  echo "$e2e_out" | tail -3
  acc="$(echo "$e2e_out" | sed -n 's/^test_accuracy=//p')"; acc="${acc:-failed}"
fi

table="$(cat <<EOT
| $(date -u +%F), ${card%%,*} | hatch img/s | PyTorch $("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null) img/s | hatch / PyTorch |
|---|---:|---:|---:|
| ViT-B/16 step, batch $batch, fp32 | ${H[fp32]} | ${T[fp32]} | $(ratio "${H[fp32]}" "${T[fp32]}") |
| ViT-B/16 step, batch $batch, TF32 | ${H[tf32]} | ${T[tf32]} | $(ratio "${H[tf32]}" "${T[tf32]}") |

CUDA tests: $tests_status. train_e2e --device cuda, vit-tiny 1 epoch: test_accuracy $acc. Total $((SECONDS - start)) s.
EOT
)"
echo; echo "$table"
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT" && { echo "$table"; echo; echo '```'; cat "$build/gpu-runs.log"; echo '```'; } >"$OUT/gpu.md"
fi
[[ $tests_status == passed ]]
