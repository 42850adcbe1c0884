#!/usr/bin/env bash
# The GPU check, in one run on a machine with an NVIDIA GPU (at most about 6 minutes):
#   1. builds the CUDA targets in build-gpu/ -- or, with --bundle DIR, uses the binaries that
#      bench/gpu-bundle.sh built and packed on another machine (the GPU machines have no
#      package registry, so nothing can be built there),
#   2. runs the CUDA tests with HATCH_EXPECT_GPU=1 (a test that skips for want of a device is a
#      failure here),
#   3. times a ViT-B/16 training step (224x224x3 random data, 1000 classes, batch 64) in hatch,
#      in its PyTorch twin and in timm's vit_base_patch16_224 (fused attention), float32 and
#      TF32, alternating, and prints each timed run's first and last loss (about ln 1000 = 6.91
#      at the start, never NaN), PyTorch's matmul precision setting, and each one's peak device
#      memory (hatch's cache and PyTorch's caching allocator: in use, and held from the driver);
#      also hatch with --tf32x3 (GEMMs as three TF32 products of split operands, near-float
#      accuracy) against PyTorch's float32, as a row of its own (and, among the variants, with
#      each operand split per GEMM, HATCH_CUDA_SPLIT_REUSE=0),
#   4. times the row kernels (LayerNorm, softmax) at ViT-B/16's shapes, each variant the launcher
#      can pick, against PyTorch's in the same run (cuda_rows, torch_rows.py),
#   5. trains vit-tiny on Fashion-MNIST for one epoch with `train_e2e --device cuda` (fit: one
#      wait for the device per step, batches from pinned memory) and with its PyTorch twin
#      (bench/torch_fmnist_train.py --device cuda), and compares their training seconds,
#   6. runs train_e2e, incubate and distill with --device cuda against --device cpu on vit-micro
#      (tests/programs_on_cuda.sh: every phase's losses agree, phases alternate between devices),
# and prints a markdown table (also written to $OUT/gpu.md when OUT is set), even when a step
# fails or times out: every step has its own time-out, and all of them together the budget
# (--budget seconds, default 360, from the start of step 2; the build is not counted): a step
# gets at most what is left of it less 15 s kept for the table, and a step that would get less
# than it needs to mean anything is skipped and says so. The steps run in order of what they
# are worth: 2, the main rows of 3, 6, 5, then 3's variants (each switch off in turn) and 4.
#
#   bench/gpu.sh [--bundle DIR | --build build-gpu [--no-build]] [--batch 64] [--steps 20] [--rounds 2]
#                [--budget 360] [--python python3]
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
build="$root/build-gpu" batch=64 steps=20 rounds=2 budget=360 python=python3 no_build=0 bundle=""
die() { echo "gpu.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build|--batch|--steps|--rounds|--budget|--python|--bundle)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      declare "${1#--}=$2"; shift 2 ;;
    --no-build) no_build=1; shift ;;
    -h|--help) sed -n '2,31p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
for k in batch steps rounds budget; do [[ "${!k}" =~ ^[1-9][0-9]*$ ]] || die "--$k must be a positive integer, got '${!k}'"; done
command -v nvidia-smi >/dev/null || die "no nvidia-smi: this script needs a machine with an NVIDIA GPU"
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"

card="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
echo "== $(date -u +%F\ %H:%M) UTC, $card"
start=$SECONDS
jobs="$(nproc)"

# Where each binary is: the build tree's layout, or the bundle's bin/.
tests_bin="$build/tests/hatch_cuda_tests" step_bin="$build/bench/train_step" e2e_bin="$build/examples/train_e2e"
rows_bin="$build/bench/cuda_rows"
fmnist_default=/usr/share/datasets/fashion-mnist
if [[ -n $bundle ]]; then
  bundle="$(cd "$bundle" && pwd)" || die "--bundle: no directory '$bundle'"
  no_build=1 build="$bundle"
  tests_bin="$bundle/bin/hatch_cuda_tests" step_bin="$bundle/bin/train_step" e2e_bin="$bundle/bin/train_e2e"
  rows_bin="$bundle/bin/cuda_rows"
  fmnist_default="$bundle/data"
  export LD_LIBRARY_PATH="$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # cuBLAS and the CUDA runtime are the machine's own: the toolkit's, or the ones PyTorch ships.
  if ldd "$step_bin" | grep -q "not found"; then
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/lib64 \
             $("$python" -c 'import nvidia; b = list(nvidia.__path__)[0]; print(b + "/cublas/lib", b + "/cuda_runtime/lib")' 2>/dev/null); do
      [[ -d $d ]] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"
    done
  fi
  echo "== bundle $bundle; libraries still missing: $(ldd "$step_bin" | grep "not found" | awk '{print $1}' | tr '\n' ' ')"
fi

if [[ $no_build == 0 ]]; then
  command -v nvcc >/dev/null || die "no nvcc on PATH or in /usr/local/cuda/bin (or pass --no-build)"
  echo "== configure + build ($build, -j$jobs, $(nvcc --version | tail -1))"
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DHATCH_ENABLE_CUDA=ON -DHATCH_BUILD_TESTS=ON \
    -DHATCH_BUILD_EXAMPLES=ON -DHATCH_BUILD_BENCHMARKS=ON >"$build.configure.log" 2>&1 \
    || { tail -30 "$build.configure.log"; die "configure failed (log: $build.configure.log)"; }
  cmake --build "$build" -j"$jobs" --target hatch_cuda_tests train_step cuda_rows train_e2e incubate distill >"$build.build.log" 2>&1 \
    || { grep -m20 -B2 -A6 "error" "$build.build.log"; die "build failed (log: $build.build.log)"; }
  echo "   built in $((SECONDS - start)) s"
fi
for bin in "$tests_bin" "$step_bin" "$rows_bin" "$e2e_bin"; do
  [[ -x "$bin" ]] || die "missing $bin"
done

# The budget (--budget): every step below draws its time-out from it, and the table keeps
# `reserve` seconds. limit WANT [NEED] prints the time-out for a step that wants WANT seconds:
# WANT or what is left, whichever is less, and 0 (skip the step) when that is under NEED.
deadline=$((SECONDS + budget)) reserve=15 skips=""
left() { local l=$((deadline - reserve - SECONDS)); echo $((l > 0 ? l : 0)); }
limit() {
  local want=$1 need=${2:-10} l
  l=$(left)
  ((l < want)) && want=$l
  ((want < need)) && want=0
  echo "$want"
}
skip() {  # a step left out for want of time: said where it would have run, and under the table
  echo "   skipped: $1 ($(left) s of the budget left)"
  skips+="${skips:+; }$1"
}
# What a step's exit status says: passed, FAILED, or TIMED OUT (its time-out was the budget's).
outcome() { case $1 in 0) echo passed ;; 124|137) echo "TIMED OUT after $2 s" ;; *) echo FAILED ;; esac; }

echo "== CUDA tests (HATCH_EXPECT_GPU=1)"
tests_status=skipped
if t=$(limit 150 30) && ((t > 0)); then
  HATCH_EXPECT_GPU=1 timeout "$t" "$tests_bin" >"$build/gpu-tests.log" 2>&1
  tests_status="$(outcome $? "$t")"
  tail -25 "$build/gpu-tests.log"
  echo "   measured parity margins (Cpu vs Cuda):"
  grep -o "parity .*tolerance .*" "$build/gpu-tests.log" | sed 's/^/     /'
  grep -o "fused: .*" "$build/gpu-tests.log" | sort | uniq -c | sed 's/^/     /'
  echo "   GEMM precision (fp32, tf32, tf32x3 against a double reference; how TF32 takes its inputs):"
  grep -o -e "gemm .*relative error against double.*" -e "TF32 GEMM inputs: .*" "$build/gpu-tests.log" | sed 's/^/     /'
  [[ -n "${OUT:-}" ]] && cp "$build/gpu-tests.log" "$OUT/" 2>/dev/null
else
  skip "CUDA tests"
fi

isnum() { [[ $1 =~ ^[0-9]+(\.[0-9]*)?$ ]]; }
# "images/s peak-MiB held-MiB" of one run (peak device memory in use, and held from the driver),
# "failed - -", or "skipped - -" when the budget has no 20 s left for it; the run's own output
# goes to the log.
ips() {
  local out i m t
  t=$(limit 60 20)
  if ((t == 0)); then echo "skipped - -"; return; fi
  if out="$(timeout "$t" "$@" 2>&1)"; then
    echo "$out" >>"$build/gpu-runs.log"
    echo "$out" | grep -E "^first_loss=|^host_waits_per_step=|^peak_device_mib=|^tf32x3_split|matmul precision" | sed 's/^/     /' >&2
    i="$(echo "$out" | sed -n 's/^images_per_second=//p' | tail -1)"
    m="$(echo "$out" | sed -n 's/^peak_device_mib=\([0-9.]*\) reserved_device_mib=\([0-9.]*\).*/\1 \2/p' | tail -1)"
    echo "${i:-failed} ${m:-- -}"
  else
    echo "$out" >>"$build/gpu-runs.log"; echo "$out" | tail -3 >&2; echo "failed - -"
  fi
}
# The better of two images/s results, either of which may be empty, "failed" or "skipped".
better() {
  if ! isnum "$1"; then echo "${2:-$1}"
  elif ! isnum "$2"; then echo "$1"
  else "$python" -c "print(max($1, $2))"; fi
}
ratio() { if isnum "$1" && isnum "$2"; then "$python" -c "print(f'{$1 / $2:.2f}')"; else echo "-"; fi; }

: >"$build/gpu-runs.log"
declare -A H T M A MEM
for prec in fp32 tf32; do
  flag=(); [[ $prec == tf32 ]] && flag=(--tf32)
  echo "== ViT-B/16 training step, batch $batch, $prec"
  for ((round = 1; round <= rounds; ++round)); do  # alternate so that a change in the machine's state hits all three
    torch_args=("$here/torch_vit_step.py" --device cuda --preset vit-b16 --batch "$batch" --steps "$steps" --warmup 5 "${flag[@]}")
    read -r h hp hr <<<"$(ips "$step_bin" --device cuda --preset vit-b16 --batch "$batch" --steps "$steps" --warmup 5 "${flag[@]}")"
    read -r t tp tr <<<"$(ips "$python" "${torch_args[@]}")"
    read -r m mp mr <<<"$(ips "$python" "${torch_args[@]}" --model timm)"
    echo "   round $round: hatch $h, torch twin $t, timm $m images/s; peak device memory in use (held) MiB: hatch $hp ($hr), twin $tp ($tr), timm $mp ($mr)"
    # hatch's GEMMs as three TF32 products of split operands (near-float accuracy), against
    # PyTorch's fp32 ('highest'): a separate row, not hatch's fp32 (the arithmetic differs).
    if [[ $prec == fp32 ]]; then
      read -r x xp xr <<<"$(ips "$step_bin" --device cuda --preset vit-b16 --batch "$batch" --steps "$steps" --warmup 5 --tf32x3)"
      echo "   round $round: hatch --tf32x3 $x images/s; peak device memory in use (held) MiB: $xp ($xr)"
      H[x3]="$(better "${H[x3]:-}" "$x")" MEM[x3,hatch]="$xp ($xr)" MEM[x3,ratio]="$(ratio "$xp" "$tp")"
    fi
    # peak memory: the same in every round (the last one's is kept)
    MEM[$prec,hatch]="$hp ($hr)" MEM[$prec,twin]="$tp ($tr)" MEM[$prec,timm]="$mp ($mr)"
    MEM[$prec,ratio]="$(ratio "$hp" "$tp")"
    # keep the better round of each (the first may pay for cuBLAS heuristics and clocks)
    H[$prec]="$(better "${H[$prec]:-}" "$h")"
    T[$prec]="$(better "${T[$prec]:-}" "$t")"
    M[$prec]="$(better "${M[$prec]:-}" "$m")"
  done
  [[ ${H[$prec]} == skipped || ${T[$prec]} == skipped || ${M[$prec]} == skipped ]] && skips+="${skips:+; }$prec step runs"
done

acc="-" e2e_s="-" twin_s="-" twin_acc="-" programs_status="-"
# Fashion-MNIST: $HATCH_FASHION_MNIST, as in the test scripts (HATCH_FMNIST, its old name here, is
# still read), the bundle's data/ with --bundle, else Debian's dataset-fashion-mnist.
fmnist="${HATCH_FASHION_MNIST:-${HATCH_FMNIST:-$fmnist_default}}"
if [[ -d $fmnist ]]; then
  # The programs on the card against the same programs on the host (the bundle carries the
  # script in bench/; a build tree has it in tests/).
  programs_script="$here/programs_on_cuda.sh"
  [[ -f $programs_script ]] || programs_script="$root/tests/programs_on_cuda.sh"
  echo "== train_e2e, incubate, distill: --device cuda against --device cpu (vit-micro, programs_on_cuda.sh)"
  programs_status=skipped
  if t=$(limit 300 60) && ((t > 0)); then
    HATCH_FASHION_MNIST="$fmnist" timeout "$t" \
      bash "$programs_script" "$(dirname "$e2e_bin")" "$build/programs-gpu" >"$build/programs-gpu.log" 2>&1
    programs_status="$(outcome $? "$t")"
    tail -12 "$build/programs-gpu.log"
    [[ -n "${OUT:-}" ]] && cp "$build/programs-gpu.log" "$OUT/" 2>/dev/null
  else
    skip "programs on Cuda against Cpu"
  fi

  echo "== train_e2e --device cuda (vit-tiny, 1 epoch, full Fashion-MNIST)"
  if t=$(limit 120 30) && ((t > 0)); then
    e2e_out="$(timeout "$t" "$e2e_bin" --device cuda --preset vit-tiny --epochs 1 --no-progress --no-resume \
      --out "$build/e2e-gpu" --data "$fmnist" 2>&1)"
    echo "$e2e_out" | tail -3
    acc="$(echo "$e2e_out" | sed -n 's/^test_accuracy=//p')"; acc="${acc:-failed}"
    e2e_s="$(echo "$e2e_out" | sed -n 's/.* seconds=\([0-9.]*\).*/\1/p')"; e2e_s="${e2e_s:-failed}"
  else
    skip "train_e2e --device cuda"; acc=skipped e2e_s=skipped
  fi
  echo "== its PyTorch twin on the GPU (bench/torch_fmnist_train.py --device cuda, same recipe)"
  if t=$(limit 180 40) && ((t > 0)); then
    twin_out="$(timeout "$t" "$python" "$here/torch_fmnist_train.py" --device cuda --preset vit-tiny --epochs 1 \
      --data "$fmnist" 2>&1)"
    echo "$twin_out" | tail -3
    twin_s="$(echo "$twin_out" | sed -n 's/^train_seconds=//p')"; twin_s="${twin_s:-failed}"
    twin_acc="$(echo "$twin_out" | sed -n 's/^test_accuracy=//p')"; twin_acc="${twin_acc:-failed}"
  else
    skip "the PyTorch twin's epoch"; twin_s=skipped twin_acc=skipped
  fi
fi

# hatch with one speed-up turned off at a time (environment switches of backend/cuda.hpp;
# autotuning, off by default, turned on), and with all of them off: what each is worth,
# measured in the same run as the rows above.
declare -A VARIANTS=(
  ["GEMMs autotuned (HATCH_CUDA_AUTOTUNE=1)"]="HATCH_CUDA_AUTOTUNE=1"
  ["without cuBLASLt: cublasSgemm, separate bias kernels (HATCH_CUDA_LT=0)"]="HATCH_CUDA_LT=0"
  ["row kernels without registers (HATCH_CUDA_ROW_REGISTERS=0)"]="HATCH_CUDA_ROW_REGISTERS=0"
  ["fused attention kernels on, tile 32 (HATCH_CUDA_FUSED_ATTENTION=1)"]="HATCH_CUDA_FUSED_ATTENTION=1"
  ["fused attention kernels on, tile 64 (and HATCH_CUDA_ATTENTION_TILE=64)"]="HATCH_CUDA_FUSED_ATTENTION=1 HATCH_CUDA_ATTENTION_TILE=64"
  ["all off (the backend before 2026-11-27)"]="HATCH_CUDA_LT=0 HATCH_CUDA_ROW_REGISTERS=0"
)
for prec in fp32 tf32; do
  flag=(); [[ $prec == tf32 ]] && flag=(--tf32)
  echo "== ViT-B/16 training step, batch $batch, $prec: each speed-up switched off in turn"
  for ((round = 1; round <= rounds; ++round)); do
    for v in "${!VARIANTS[@]}"; do
      read -r r vp _ <<<"$(ips env ${VARIANTS[$v]} "$step_bin" --device cuda --preset vit-b16 --batch "$batch" --steps "$steps" --warmup 5 "${flag[@]}" 2>/dev/null)"
      echo "   round $round: $r images/s, $v"
      A[$prec,$v]="$(better "${A[$prec,$v]:-}" "$r")"
      [[ $prec == fp32 && $vp != - ]] && MEM[variant,$v]="$vp"
    done
  done
done
echo "== ViT-B/16 training step, batch $batch, --tf32x3 with each operand split per GEMM (HATCH_CUDA_SPLIT_REUSE=0)"
for ((round = 1; round <= rounds; ++round)); do
  read -r r _ _ <<<"$(ips env HATCH_CUDA_SPLIT_REUSE=0 "$step_bin" --device cuda --preset vit-b16 --batch "$batch" --steps "$steps" --warmup 5 --tf32x3 2>/dev/null)"
  echo "   round $round: $r images/s"
  H[x3split]="$(better "${H[x3split]:-}" "$r")"
done
for v in "${!VARIANTS[@]}"; do
  [[ ${A[fp32,$v]} == skipped || ${A[tf32,$v]} == skipped || ${H[x3split]} == skipped ]] && { skips+="${skips:+; }step variants"; break; }
done

echo "== row kernels at ViT-B/16's shapes: each variant, and PyTorch's (cuda_rows, torch_rows.py)"
rows_out=""
if t=$(limit 60 20) && ((t > 0)); then rows_out="$(timeout "$t" "$rows_bin" 2>&1)"; else skip "row kernels (cuda_rows)"; fi
if t=$(limit 90 20) && ((t > 0)); then rows_out+=$'\n'"$(timeout "$t" "$python" "$here/torch_rows.py" 2>&1)"
else skip "PyTorch's row kernels (torch_rows.py)"; fi
rows_table="$(echo "$rows_out" | "$python" -c '
import sys
lines = [l.split() for l in sys.stdin if l.startswith("rows ")]
torch = {l[1]: float(l[3]) for l in lines if l[2] == "torch"}
print("| kernel, ViT-B/16 shape (batch 64) | variant | median us | effective GB/s | PyTorch us / this |")
print("|---|---|---:|---:|---:|")
for _, name, variant, us, gbps in lines:
    r = f"{torch[name] / float(us):.2f}" if name in torch else "-"
    print(f"| {name} | {variant} | {us} | {gbps} | {r} |")
' 2>&1)"
echo "$rows_table"

table="$(cat <<EOT
| $(date -u +%F), ${card%%,*} | hatch img/s | PyTorch $("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null) twin img/s | timm img/s | hatch / twin | hatch / timm |
|---|---:|---:|---:|---:|---:|
| ViT-B/16 step, batch $batch, fp32 | ${H[fp32]} | ${T[fp32]} | ${M[fp32]} | $(ratio "${H[fp32]}" "${T[fp32]}") | $(ratio "${H[fp32]}" "${M[fp32]}") |
| ViT-B/16 step, batch $batch, TF32 | ${H[tf32]} | ${T[tf32]} | ${M[tf32]} | $(ratio "${H[tf32]}" "${T[tf32]}") | $(ratio "${H[tf32]}" "${M[tf32]}") |
| ViT-B/16 step, batch $batch, hatch --tf32x3 against PyTorch fp32 | ${H[x3]:--} | ${T[fp32]} | ${M[fp32]} | $(ratio "${H[x3]:-}" "${T[fp32]}") | $(ratio "${H[x3]:-}" "${M[fp32]}") |
| ViT-B/16 step, batch $batch, hatch --tf32x3, each operand split per GEMM (HATCH_CUDA_SPLIT_REUSE=0), against PyTorch fp32 | ${H[x3split]:--} | ${T[fp32]} | ${M[fp32]} | $(ratio "${H[x3split]:-}" "${T[fp32]}") | $(ratio "${H[x3split]:-}" "${M[fp32]}") |

| ViT-B/16 step, batch $batch: peak device memory, MiB in use (held) | hatch | PyTorch twin | timm | hatch / twin (in use) |
|---|---:|---:|---:|---:|
| fp32 | ${MEM[fp32,hatch]:--} | ${MEM[fp32,twin]:--} | ${MEM[fp32,timm]:--} | ${MEM[fp32,ratio]:--} |
| TF32 | ${MEM[tf32,hatch]:--} | ${MEM[tf32,twin]:--} | ${MEM[tf32,timm]:--} | ${MEM[tf32,ratio]:--} |
| hatch --tf32x3 (PyTorch fp32) | ${MEM[x3,hatch]:--} | ${MEM[fp32,twin]:--} | ${MEM[fp32,timm]:--} | ${MEM[x3,ratio]:--} |

CUDA tests: $tests_status. Programs on Cuda against Cpu (train_e2e, incubate, distill): $programs_status. Total $((SECONDS - start)) s (budget $budget s from the tests on). Skipped for want of time: ${skips:-nothing}.

| vit-tiny, 1 epoch of Fashion-MNIST (60,000 images, batch 128) | training s | test accuracy |
|---|---:|---:|
| hatch train_e2e --device cuda | $e2e_s | $acc |
| PyTorch twin, --device cuda | $twin_s | $twin_acc |
| twin / hatch (speed-up) | $(ratio "$twin_s" "$e2e_s") | |

$rows_table

| hatch, ViT-B/16 step, batch $batch | fp32 img/s | all on / this | TF32 img/s | all on / this | fp32 peak MiB in use |
|---|---:|---:|---:|---:|---:|
$(for v in "${!VARIANTS[@]}"; do echo "| $v | ${A[fp32,$v]:--} | $(ratio "${H[fp32]}" "${A[fp32,$v]:-}") | ${A[tf32,$v]:--} | $(ratio "${H[tf32]}" "${A[tf32,$v]:-}") | ${MEM[variant,$v]:--} |"; done)
EOT
)"
echo; echo "$table"
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT" && { echo "$table"; echo; echo '```'; cat "$build/gpu-runs.log"; echo '```'; } >"$OUT/gpu.md"
fi
[[ $tests_status == passed && $programs_status != FAILED && $programs_status != TIMED* ]]
