#!/usr/bin/env bash
# Where a training step's time goes: perf samples build/bench/train_step (one preset, one thread by
# default, so that every sample is work and not a waiting thread) and sums them by what the
# function does: GEMM (kernels and packing, Eigen's or OpenBLAS's), LayerNorm, GELU, softmax,
# AdamW, element-wise adds and copies, memset, and the rest, each with its share of the samples
# and its top functions.
#
#   bench/profile.sh [--preset vit-small] [--batch 128] [--threads 1] [--steps 10] [--build build]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
preset=vit-small batch=128 threads=1 steps=10 build=build
die() { echo "profile.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset|--batch|--threads|--steps|--build)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      declare "${1#--}=$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done
for k in batch threads steps; do
  [[ "${!k}" =~ ^[1-9][0-9]*$ ]] || die "--$k must be a positive integer, got '${!k}'"
done
if [[ "$build" != /* && ! -d "$build" ]]; then build="$root/$build"; fi
bin="$build/bench/train_step"
[[ -x "$bin" ]] || die "missing $bin (cmake --build $build --target train_step, or pass --build DIR)"
command -v perf >/dev/null || die "missing perf (Debian package linux-perf)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "preset=$preset batch=$batch threads=$threads steps=$steps (load average $(cut -d' ' -f1-3 /proc/loadavg))"
perf record -q -F 1999 -o "$tmp/perf.data" "$bin" --preset "$preset" --batch "$batch" --threads "$threads" \
  --steps "$steps" --warmup 2 >"$tmp/out" 2>"$tmp/err" || { cat "$tmp/err" >&2; die "perf record failed"; }
grep -E "images_per_second|gemm_gflop" "$tmp/out" || true
perf report -q -i "$tmp/perf.data" --no-children --sort symbol --stdio 2>/dev/null >"$tmp/report"
python3 - "$tmp/report" <<'PY'
import re, sys, collections
groups = [  # first match wins
    ("GEMM (kernels, packing)", r"gebp|gemm_pack|sgemm|dgemm|gemm_kernel|general_matrix_matrix|_kernel_[nt][nt]|sgemm_|blas|oncopy|otcopy|incopy|itcopy|beta_"),
    ("LayerNorm", r"layer_norm"),
    ("GELU", r"gelu"),
    ("softmax", r"softmax"),
    ("AdamW", r"adamw"),
    ("add / bias / copies", r"::add\b|add_bias|axpy|copy_2d|sum_rows|scale_rows|::mul\b|::add\(|memcpy|memmove"),
    ("memset", r"memset"),
    ("OpenMP runtime (waiting, forking)", r"libgomp|gomp_|GOMP_"),
]
share = collections.Counter()
top = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.match(r"\s*([\d.]+)%\s+\[[.k]\]\s+(.*)", line)
    if not m:
        continue
    pct, sym = float(m.group(1)), m.group(2).strip()
    name = next((g for g, rx in groups if re.search(rx, sym)), "other")
    share[name] += pct
    top[name].append((pct, sym[:90]))
print(f"\n{'what':36s} {'share of samples':>16s}")
for name, pct in share.most_common():
    print(f"{name:36s} {pct:15.1f}%")
    for p, s in sorted(top[name], reverse=True)[:3]:
        print(f"    {p:5.1f}%  {s}")
PY
