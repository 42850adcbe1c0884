#!/usr/bin/env bash
# Training-step throughput and peak memory of hatch (build/bench/train_step) against PyTorch
# (bench/torch_vit_step.py) on the same configuration. The two run alternately (hatch, torch,
# hatch, torch, ...) so that a change in machine load hits both; each run is under
# /usr/bin/time -v for its peak resident set size. Before every round, the machine's GEMM rate
# (the ceiling): a 2048^3 float GEMM through hatch's Cpu::gemm, through Eigen's product and
# through torch.mm at the same thread count, the best of the three. The table gives each side's
# images/s as a fraction of the ceiling of its own round (a step's GEMM work, counted by
# Cpu::gemm, times images/s over the ceiling), the median over the rounds.
#
#   bench/compare_torch.sh [--preset vit-small] [--batch 128] [--threads 2] [--steps 20]
#                          [--rounds 2] [--build build]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
preset=vit-small batch=128 threads=2 steps=20 rounds=2 build=build
python=/usr/bin/python3

usage() { sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "compare_torch.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset|--batch|--threads|--steps|--rounds|--build)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      declare "${1#--}=$2"; shift 2 ;;
    --preset=*|--batch=*|--threads=*|--steps=*|--rounds=*|--build=*)
      k="${1%%=*}"; declare "${k#--}=${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
for k in batch threads steps rounds; do
  [[ "${!k}" =~ ^[1-9][0-9]*$ ]] || die "--$k must be a positive integer, got '${!k}'"
done
case "$preset" in vit-micro|vit-tiny|vit-small|vit-base) ;; *)
  die "--preset: unknown preset '$preset', expected one of vit-micro, vit-tiny, vit-small, vit-base" ;;
esac

# A relative --build is taken from the current directory if it is there, else from the repo root.
if [[ "$build" != /* && ! -d "$build" ]]; then build="$root/$build"; fi
hatch_bin="$build/bench/train_step"
torch_py="$here/torch_vit_step.py"
[[ -x "$hatch_bin" ]] || die "missing $hatch_bin: configure with -DHATCH_BUILD_BENCHMARKS=ON and build the train_step target (cmake --build $build --target train_step), or pass --build DIR"
[[ -f "$torch_py" ]] || die "missing $torch_py"
[[ -x /usr/bin/time ]] || die "missing /usr/bin/time (Debian package 'time')"
[[ -x "$python" ]] || die "missing $python"
blas="$("$python" -c 'import torch, re; m = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show()); print(m.group(1) if m else "?")' 2>/dev/null)" \
  || die "$python cannot import torch (Debian package python3-torch)"

# torch.set_num_threads does not reach the threads of Debian's OpenBLAS (pthreads build): at
# --threads 1, torch.mm ran on both cores. The environment limits them.
torch_env=(OPENBLAS_NUM_THREADS="$threads" OMP_NUM_THREADS="$threads")
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# run NAME CMD...: appends this run's images/s and peak RSS (KiB) to $tmp/NAME.ips / NAME.rss
run() {
  local name="$1" out="$tmp/$1.out" tv="$tmp/$1.time"
  shift
  if ! /usr/bin/time -v -o "$tv" "$@" >"$out" 2>&1; then
    cat "$out" >&2
    die "$name failed: $*"
  fi
  local ips rss
  ips="$(sed -n 's/^images_per_second=\([0-9.]*\)$/\1/p' "$out" | tail -1)"
  rss="$(sed -n 's/.*Maximum resident set size (kbytes): *\([0-9]*\).*/\1/p' "$tv")"
  [[ -n "$ips" ]] || { cat "$out" >&2; die "$name printed no images_per_second= line"; }
  echo "$ips" >>"$tmp/$name.ips"
  echo "$rss" >>"$tmp/$name.rss"
  printf '  round %d %-5s %10.1f images/s  %8.1f MiB  | %s\n' "$round" "$name" "$ips" "$(awk -v k="$rss" 'BEGIN{print k/1024}')" \
    "$(grep -v '^images_per_second=' "$out" | tail -1)"
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?'; }
echo "preset=$preset batch=$batch threads=$threads steps=$steps rounds=$rounds (load average $(loadavg))"
echo "hatch: $hatch_bin; environment: OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE-(unset)} (both sides run with it as it is)"
echo "torch: $python $torch_py (BLAS_INFO=$blas$([[ "$blas" == generic ]] && printf ', libblas.so.3 -> %s' "$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || echo '?')"))"
# The ceiling (measured again before every round: the machine's GEMM rate drifts by several
# percent between minutes here, so each round's images/s is taken against the ceiling of its own
# minute) and the step's GEMM work.
step_gflop=""
measure_ceiling() {
  local out hatch_gemm eigen_gemm torch_gemm
  out="$("$hatch_bin" --preset "$preset" --batch "$batch" --threads "$threads" --steps 1 --warmup 1 --ceiling)" \
    || die "train_step --ceiling failed"
  field() { sed -n "s/^$1=\([0-9.]*\)$/\1/p" <<<"$out" | tail -1; }
  hatch_gemm="$(field gemm_gflops)" eigen_gemm="$(field eigen_gemm_gflops)" step_gflop="$(field gemm_gflop_per_step)"
  torch_gemm="$(env "${torch_env[@]}" "$python" - "$threads" <<'PY'
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
n = 2048
a, b = torch.randn(n, n), torch.randn(n, n)
torch.mm(a, b)
times = []
for _ in range(5):
    t0 = time.perf_counter()
    torch.mm(a, b)
    times.append(time.perf_counter() - t0)
print(f"{2 * n ** 3 / min(times) / 1e9:.1f}")
PY
)" || die "timing torch.mm failed"
  ceiling="$(printf '%s\n' "$hatch_gemm" "$eigen_gemm" "$torch_gemm" | sort -g | tail -1)"
  echo "$ceiling" >>"$tmp/ceiling"
  printf '  round %d ceiling %.1f GFLOP/s  | GEMM 2048^3, %s threads: hatch Cpu::gemm %s, Eigen %s, torch.mm %s\n' \
    "$round" "$ceiling" "$threads" "$hatch_gemm" "$eigen_gemm" "$torch_gemm"
}
for ((round = 1; round <= rounds; round++)); do
  measure_ceiling
  [[ $round -gt 1 ]] || echo "  GEMM work of one step: $step_gflop GFLOP ($(awk -v g="$step_gflop" -v b="$batch" 'BEGIN{printf "%.4f", g / b}') GFLOP per image)"
  run hatch "$hatch_bin" --preset "$preset" --batch "$batch" --threads "$threads" --steps "$steps"
  run torch env "${torch_env[@]}" "$python" "$torch_py" --preset "$preset" --batch "$batch" --threads "$threads" --steps "$steps"
  for side in hatch torch; do
    awk -v i="$(tail -1 "$tmp/$side.ips")" -v g="$step_gflop" -v b="$batch" -v c="$ceiling" \
      'BEGIN { printf "%.4f\n", i * g / b / c }' >>"$tmp/$side.frac"
  done
done

echo "  load average after: $(loadavg)"
median() { sort -g "$1" | awk '{v[NR]=$1} END{print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
maxof() { sort -g "$1" | tail -1; }
h_ips="$(median "$tmp/hatch.ips")" t_ips="$(median "$tmp/torch.ips")"
h_best="$(maxof "$tmp/hatch.ips")" t_best="$(maxof "$tmp/torch.ips")"
h_rss="$(maxof "$tmp/hatch.rss")" t_rss="$(maxof "$tmp/torch.rss")"
echo
awk -v hi="$h_ips" -v ti="$t_ips" -v hb="$h_best" -v tb="$t_best" -v hr="$h_rss" -v tr="$t_rss" 'BEGIN {
  printf "%-12s %18s %16s %20s\n", "", "images/s median", "images/s best", "peak RSS MiB max"
  printf "%-12s %18.1f %16.1f %20.1f\n", "hatch", hi, hb, hr / 1024
  printf "%-12s %18.1f %16.1f %20.1f\n", "torch", ti, tb, tr / 1024
  printf "%-12s %17.2fx %15.2fx %19.2fx\n", "hatch/torch", hi / ti, hb / tb, hr / tr
}'
c_med="$(median "$tmp/ceiling")" c_min="$(sort -g "$tmp/ceiling" | head -1)" c_max="$(maxof "$tmp/ceiling")"
awk -v hf="$(median "$tmp/hatch.frac")" -v tf="$(median "$tmp/torch.frac")" -v g="$step_gflop" -v b="$batch" \
    -v c="$c_med" -v lo="$c_min" -v hi="$c_max" 'BEGIN {
  printf "fraction of the GEMM ceiling (each round: images/s x %.4f GFLOP / that round'"'"'s ceiling; median of the rounds): hatch %.2f, torch %.2f\n", g / b, hf, tf
  printf "ceiling median %.1f GFLOP/s (rounds: %.1f to %.1f)\n", c, lo, hi
}'
