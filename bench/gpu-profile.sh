#!/usr/bin/env bash
# Where the device time of one ViT-B/16 training step goes, on a GPU machine, hatch beside its
# PyTorch twin (at most about 2 minutes):
#   hatch: Nsight Compute (ncu) times every kernel of one step (--clock-control none: the card's
#          clocks as found), grouped by kernel and launch shape, largest first;
#   twin:  torch.profiler over one step after the timed ones, kernels by self device time.
#
#   bench/gpu-profile.sh --bundle DIR [--batch 64] [--tf32] [--python python3]
#   bench/gpu-profile.sh --build build-gpu [...]
# Full listings go to $OUT/profile-*.txt when OUT is set.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { echo "gpu-profile.sh: $*" >&2; exit 2; }
bin="" batch=64 python=python3 tf32=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bundle) [[ $# -ge 2 ]] || die "--bundle needs a directory"; bin="$2/bin/train_step"
              export LD_LIBRARY_PATH="$2/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; shift 2 ;;
    --build) [[ $# -ge 2 ]] || die "--build needs a directory"; bin="$2/bench/train_step"; shift 2 ;;
    --batch|--python) [[ $# -ge 2 ]] || die "$1 needs a value"; declare "${1#--}=$2"; shift 2 ;;
    --tf32) tf32=(--tf32); shift ;;
    -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -x $bin ]] || die "missing train_step (pass --bundle DIR or --build DIR)"
ncu="$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
logdir="${OUT:-/tmp}"
mkdir -p "$logdir"

echo "== hatch kernels, one ViT-B/16 step, batch $batch ${tf32[*]} (ncu)"
if [[ -x $ncu ]]; then
  timeout 150 "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    "$bin" --device cuda --preset vit-b16 --batch "$batch" --steps 1 --warmup 0 "${tf32[@]}" \
    >"$logdir/profile-hatch.csv" 2>"$logdir/profile-hatch.err"
  echo "   ncu exit $?"
  "$python" - "$logdir/profile-hatch.csv" <<'EOF' | tee "$logdir/profile-hatch.txt"
import csv, collections, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows:
    sys.exit("no ncu rows")
h = rows[0]
ki, gi, bi, vi = h.index("Kernel Name"), h.index("Grid Size"), h.index("Block Size"), h.index("Metric Value")
by_shape, by_name = collections.defaultdict(lambda: [0, 0.0]), collections.defaultdict(lambda: [0, 0.0])
total = 0.0
for r in rows[1:]:
    try:
        ns = float(r[vi].replace(",", ""))  # ncu writes thousands separators
    except ValueError:
        continue
    name = r[ki].split("(")[0].replace("void ", "")[:60]
    total += ns
    for d, k in ((by_shape, (name, r[gi], r[bi])), (by_name, name)):
        d[k][0] += 1
        d[k][1] += ns
print(f"total kernel time {total / 1e6:.2f} ms in {len(rows) - 1} launches")
print(f"{'ms':>8} {'%':>5} {'calls':>6}  kernel")
for k, (n, ns) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]:
    print(f"{ns / 1e6:8.2f} {100 * ns / total:5.1f} {n:6d}  {k}")
print(f"\n{'ms':>8} {'%':>5} {'calls':>6}  kernel grid block")
for k, (n, ns) in sorted(by_shape.items(), key=lambda kv: -kv[1][1])[:25]:
    print(f"{ns / 1e6:8.2f} {100 * ns / total:5.1f} {n:6d}  {k[0]} {k[1]} {k[2]}")
EOF
else
  echo "   no ncu on this machine"
fi

echo "== PyTorch twin kernels, one ViT-B/16 step, batch $batch ${tf32[*]} (torch.profiler)"
timeout 90 "$python" "$here/torch_vit_step.py" --device cuda --preset vit-b16 --batch "$batch" --steps 3 --warmup 2 \
  "${tf32[@]}" --profile >"$logdir/profile-torch.txt" 2>&1
echo "   exit $?"
head -45 "$logdir/profile-torch.txt" | cut -c1-200
