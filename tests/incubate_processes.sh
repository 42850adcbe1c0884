#!/usr/bin/env bash
# Deep Incubation run as separate processes gives byte-identical checkpoints to one process.
#   incubate_processes.sh <path to build/examples/incubate> <work dir>
# Runs vit-micro on a small Fashion-MNIST subset once with --phase all (into <work>/all) and
# once phase by phase (meta; module --index 0..3; assemble; finetune) into <work>/split, then
# compares every per-stage file of every phase byte for byte with cmp, and the final accuracy
# (the split run's finetune with --ood, which must print ood_accuracy= and change nothing else);
# then checks that mixed or stale inputs are refused (lineage).
# The data directory is $HATCH_FASHION_MNIST (default /usr/share/datasets/fashion-mnist); when
# it is missing the script exits 77, which CTest reports as skipped (SKIP_RETURN_CODE 77).
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 <incubate binary> <work dir>" >&2
  exit 2
fi
bin=$1
work=$2
[[ -x "$bin" ]] || { echo "$0: $bin is not an executable" >&2; exit 2; }
data=${HATCH_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
if [[ ! -d "$data" ]]; then
  echo "$0: skipped: no Fashion-MNIST directory at $data (set HATCH_FASHION_MNIST)" >&2
  exit 77
fi

a="$work/all"
b="$work/split"
rm -rf "$a" "$b"
mkdir -p "$a" "$b"

common=(--data "$data" --preset vit-micro --train-limit 256 --test-limit 128 --epochs-meta 1 --epochs-module 1
        --epochs-finetune 1 --no-progress)

"$bin" "${common[@]}" --out "$a" --phase all > "$a/stdout.txt"

"$bin" "${common[@]}" --out "$b" --phase meta > "$b/stdout.meta.txt"
for i in 0 1 2 3; do
  "$bin" "${common[@]}" --out "$b" --phase module --index "$i" > "$b/stdout.module$i.txt"
done
"$bin" "${common[@]}" --out "$b" --phase assemble > "$b/stdout.assemble.txt"
"$bin" "${common[@]}" --out "$b" --phase finetune --ood > "$b/stdout.finetune.txt"  # --ood changes no file

status=0
compared=0
for phase in meta modules assembled finetuned; do
  for i in 0 1 2 3; do
    f="$phase/stage$i.safetensors"
    for d in "$a" "$b"; do
      [[ -f "$d/$f" ]] || { echo "FAIL: $d/$f was not written" >&2; status=1; }
    done
    if [[ -f "$a/$f" && -f "$b/$f" ]]; then
      compared=$((compared + 1))
      if ! cmp "$a/$f" "$b/$f"; then
        echo "FAIL: $f differs between one process and separate processes" >&2
        status=1
      fi
    fi
  done
done

# The final accuracy line must agree as well.
acc_a=$(grep '^test_accuracy=' "$a/stdout.txt" | tail -n1)
acc_b=$(grep '^test_accuracy=' "$b/stdout.finetune.txt" | tail -n1)
if [[ "$acc_a" != "$acc_b" ]]; then
  echo "FAIL: one process says '$acc_a', separate processes say '$acc_b'" >&2
  status=1
fi

# --ood: the out-of-distribution accuracy on the line before the last.
if ! tail -n2 "$b/stdout.finetune.txt" | head -n1 | grep -Eq '^ood_accuracy=0[.][0-9]{4}$'; then
  echo "FAIL: --phase finetune --ood printed no ood_accuracy= before its last line:" >&2
  cat "$b/stdout.finetune.txt" >&2
  status=1
fi

# Lineage: a phase refuses inputs that do not belong together. A meta directory mixed from two
# meta runs (--seed 1 in <work>/other, one stage copied in) stops a module job; after a new meta
# run, assembling the modules incubated on the old one stops too. Each names the files.
expect_refusal() {  # <pattern> <log> <command...>
  local pattern=$1 log=$2
  shift 2
  if "$@" > "$log" 2>&1; then
    echo "FAIL: '$*' succeeded, expected a refusal matching '$pattern'" >&2
    status=1
  elif ! grep -q -- "$pattern" "$log"; then
    echo "FAIL: '$*' failed without '$pattern':" >&2
    cat "$log" >&2
    status=1
  fi
}
c="$work/other"
rm -rf "$c"
mkdir -p "$c"
"$bin" "${common[@]}" --out "$c" --phase meta --seed 1 > "$c/stdout.meta.txt"
cp "$b/meta/stage1.safetensors" "$c/stage1.keep"
cp "$c/meta/stage1.safetensors" "$b/meta/stage1.safetensors"
expect_refusal "mixed lineage.*$b/meta/stage1.safetensors" "$c/mixed.txt" \
  "$bin" "${common[@]}" --out "$b" --phase module --index 0
cp "$c/stage1.keep" "$b/meta/stage1.safetensors"
"$bin" "${common[@]}" --out "$b" --phase meta --seed 1 --no-resume > "$c/stdout.meta2.txt"
expect_refusal "stale.*$b/modules/stage0.safetensors" "$c/stale.txt" \
  "$bin" "${common[@]}" --out "$b" --phase assemble
ls "$b" | grep -q '\.tmp\.' && { echo "FAIL: a temporary directory was left in $b: $(ls "$b")" >&2; status=1; }

if [[ $status -eq 0 ]]; then
  echo "OK: $compared stage files identical ($acc_a); mixed and stale inputs refused"
fi
exit $status
