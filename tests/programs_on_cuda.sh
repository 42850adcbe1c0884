#!/usr/bin/env bash
# The example programs with --device cuda against the same programs with --device cpu, vit-micro
# on 64 Fashion-MNIST training images and 32 test images (batches of 32), in one work directory:
#   [PROGRAMS_TOLERANCE=3e-3] programs_on_cuda.sh <bin dir> <work dir> [suffix]
# runs <bin dir>/{train_e2e,incubate,distill}<suffix>. CI runs it on the stand-ins for CUDA
# (suffix _on_cpu: tests/cuda_on_cpu/programs_cuda.cpp, vit-micro alone on Cuda); bench/gpu.sh
# runs it on the card with the bundle's programs.
# 1. train_e2e: the Cuda run's per-epoch train and test losses match the Cpu run's.
# 2. incubate --phase all on Cuda matches it on Cpu (each phase's last metrics line), and a run
#    whose phases alternate between the devices (meta on Cuda, modules 0 and 2 on Cpu, 1 and 3 on
#    Cuda, assemble on Cpu, fine-tuning on Cuda) reads the other device's files and ends where
#    the Cpu run ends.
# 3. distill --student vit --phase all on Cuda matches it on Cpu (the teacher: 2's incubation on
#    the same device).
# 4. On the stand-ins, a preset the build has no Cuda instantiation for is refused by name.
# "Matches": every loss within a relative PROGRAMS_TOLERANCE (default 3e-3, the tolerance of the
# CUDA suite's fit and Incubator parity cases on a GPU; CI passes 1e-6 on the stand-ins, where
# the two backends' losses differed by at most 5.1e-9, docs/cuda.md), accuracies within 2 test
# images.
# Skips (77) without Fashion-MNIST.
set -euo pipefail
[[ $# -eq 2 || $# -eq 3 ]] || { echo "usage: $0 <bin dir> <work dir> [suffix]" >&2; exit 2; }
work=$2
suffix=${3:-}
e2e="$1/train_e2e$suffix" incubate="$1/incubate$suffix" distill="$1/distill$suffix"
for b in "$e2e" "$incubate" "$distill"; do [[ -x $b ]] || { echo "$0: $b is not an executable" >&2; exit 2; }; done
data=${HATCH_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
[[ -d "$data" ]] || { echo "$0: skipped: no Fashion-MNIST directory at $data" >&2; exit 77; }
rm -rf "$work"
mkdir -p "$work"
test_images=32
data_args=(--data "$data" --train-limit 64 --test-limit "$test_images" --batch 32 --no-progress)
common=("${data_args[@]}" --preset vit-micro)
status=0

# compare <what> <cpu metrics.jsonl> <cuda metrics.jsonl> [phase]: the last line of each phase
# (or every epoch of [phase]) agrees between the two files.
compare() {
  local what=$1
  shift
  if ! python3 - "${PROGRAMS_TOLERANCE:-3e-3}" "$test_images" "$@" <<'EOF'
import json, sys
tolerance, test_images, a_path, b_path = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
only = sys.argv[5] if len(sys.argv) > 5 else None
def lines(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]
def keyed(rows):
    # every epoch of the phase asked for, else each phase's last line
    out = {}
    for r in rows:
        if only is None or r["phase"] == only:
            out[(r["phase"], r["epoch"] if only else None)] = r
    return out
a, b = keyed(lines(a_path)), keyed(lines(b_path))
if not a or sorted(a) != sorted(b):
    sys.exit(f"  phases/epochs differ: cpu {sorted(a)}, cuda {sorted(b)}")
worst, bad = 0.0, []
for k in sorted(a):
    for field in ("train_loss", "test_loss"):
        if field not in a[k]:
            continue
        x, y = a[k][field], b[k][field]
        rel = abs(x - y) / max(abs(x), 1e-12)
        worst = max(worst, rel)
        if not rel <= tolerance:
            bad.append(f"{k} {field}: cpu {x:.6f}, cuda {y:.6f} (relative {rel:.2e})")
    if "test_accuracy" in a[k] and abs(a[k]["test_accuracy"] - b[k]["test_accuracy"]) > 2 / test_images + 1e-9:
        bad.append(f"{k} test_accuracy: cpu {a[k]['test_accuracy']}, cuda {b[k]['test_accuracy']}")
if bad:
    sys.exit("  " + "\n  ".join(bad))
print(f"  {len(a)} metrics lines agree, largest relative loss difference {worst:.1e}")
EOF
  then
    echo "FAIL: $what: the Cuda run does not match the Cpu run" >&2
    status=1
  else
    echo "ok: $what"
  fi
}
# last_accuracy <stdout file>: its test_accuracy= line, which must be the last line.
last_accuracy() {
  tail -n1 "$1" | grep -E '^test_accuracy=0[.][0-9]{4}$' || { echo "FAIL: $1 does not end with test_accuracy=:" >&2; cat "$1" >&2; status=1; }
}

# 1. End to end, two epochs.
for device in cpu cuda; do
  "$e2e" "${common[@]}" --epochs 2 --device "$device" --out "$work/e2e_$device" > "$work/e2e_$device.txt"
  last_accuracy "$work/e2e_$device.txt"
done
compare "train_e2e" "$work/e2e_cpu/metrics.jsonl" "$work/e2e_cuda/metrics.jsonl" e2e

# 2. Deep Incubation: every phase in one process on each device, then phases alternating.
inc=("${common[@]}" --epochs-meta 1 --epochs-module 1 --epochs-finetune 1)
for device in cpu cuda; do
  "$incubate" "${inc[@]}" --device "$device" --out "$work/inc_$device" > "$work/inc_$device.txt"
  last_accuracy "$work/inc_$device.txt"
done
compare "incubate --phase all" "$work/inc_cpu/metrics.jsonl" "$work/inc_cuda/metrics.jsonl"
m="$work/inc_mixed"
"$incubate" "${inc[@]}" --out "$m" --device cuda --phase meta > "$m.meta.txt"
for i in 0 1 2 3; do
  device=$([[ $((i % 2)) -eq 0 ]] && echo cpu || echo cuda)
  "$incubate" "${inc[@]}" --out "$m" --device "$device" --phase module --index "$i" > "$m.module$i.txt"
done
"$incubate" "${inc[@]}" --out "$m" --device cpu --phase assemble > "$m.assemble.txt"
"$incubate" "${inc[@]}" --out "$m" --device cuda --phase finetune > "$m.finetune.txt"
last_accuracy "$m.finetune.txt"
compare "incubate, phases alternating between the devices" "$work/inc_cpu/metrics.jsonl" "$m/metrics.jsonl"

# 3. m2mKD, a vit-micro student of the vit-micro teacher incubated in 2 on the same device.
dis=("${common[@]}" --student vit --epochs-module 1 --epochs-finetune 1)
for device in cpu cuda; do
  "$distill" "${dis[@]}" --device "$device" --teacher-dir "$work/inc_$device" --out "$work/dis_$device" > "$work/dis_$device.txt"
  last_accuracy "$work/dis_$device.txt"
done
compare "distill --phase all" "$work/dis_cpu/metrics.jsonl" "$work/dis_cuda/metrics.jsonl"

# 4. What the stand-ins' build cannot run on Cuda it refuses, naming the preset (its Cpu side has it).
if [[ $suffix == _on_cpu ]]; then
  "$(dirname "$0")/expect_failure.sh" "--preset vit-tiny: the on-CPU CUDA build of the programs .* has vit-micro only" \
    "$e2e" "${data_args[@]}" --preset vit-tiny --device cuda --epochs 0 --out "$work/tiny" || status=1
fi

[[ $status -eq 0 ]] && echo "OK: the programs on Cuda match them on Cpu"
exit $status
