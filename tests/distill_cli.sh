#!/usr/bin/env bash
# The distill program (m2mKD) end to end and its refusals.
#   distill_cli.sh <path to build/examples/distill> <work dir>
# 1. --phase all --ood on vit-micro (a teacher incubated first into <work>/all/teacher-run) ends
#    with ood_accuracy= and test_accuracy=, with every stage file of every phase written.
# 2. The same run phase by phase in separate processes, taking the teacher of run 1 with
#    --teacher-dir, gives byte-identical module, assembled and fine-tuned files.
# 3. Bad inputs stop with one message naming the file or flag, a non-zero exit, and every file
#    of the run as it was: a teacher of another preset, a missing teacher run, assembling without
#    module files, a student not staged like the teacher, a NAC student of a teacher without one.
# 4. A NAC student of a vit-small teacher, every phase; its module files hold no tables.
# Skips (77) without the Fashion-MNIST directory ($HATCH_FASHION_MNIST).
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: $0 <distill binary> <work dir>" >&2; exit 2; }
bin=$1
work=$2
data=${HATCH_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
[[ -d "$data" ]] || { echo "$0: skipped: no Fashion-MNIST directory at $data" >&2; exit 77; }
rm -rf "$work"
mkdir -p "$work"
a="$work/all"
b="$work/split"
common=(--data "$data" --preset vit-micro --train-limit 256 --test-limit 128 --epochs-module 1
        --epochs-finetune 1 --teacher-epochs-meta 1 --teacher-epochs-module 1 --teacher-epochs-finetune 1 --no-progress
        --student)  # the student comes last: vit, or the one a refusal names
status=0

"$bin" "${common[@]}" vit --out "$a" --phase all --ood > "$a.stdout.txt"
tail -n1 "$a.stdout.txt" | grep -Eq '^test_accuracy=0[.][0-9]{4}$' || { echo "FAIL: last line of --phase all:" >&2; cat "$a.stdout.txt" >&2; status=1; }
tail -n2 "$a.stdout.txt" | head -n1 | grep -Eq '^ood_accuracy=0[.][0-9]{4}$' || { echo "FAIL: no ood_accuracy= before the last line of --phase all --ood" >&2; status=1; }
grep -Eq '^teacher: vit-micro from .*teacher-run, ood_accuracy=0[.][0-9]{4}, test_accuracy=0[.][0-9]{4}$' "$a.stdout.txt" || { echo "FAIL: no teacher accuracy (in and out of distribution)" >&2; status=1; }
[[ $(grep -Ec '^module [0-3]: teacher_hybrid_accuracy=0[.][0-9]{4} student_hybrid_accuracy=0[.][0-9]{4}$' "$a.stdout.txt") -eq 4 ]] ||
  { echo "FAIL: expected a teacher/student hybrid accuracy line per module" >&2; status=1; }

run=(--teacher-dir "$a/teacher-run" --out "$b")
"$bin" "${common[@]}" vit "${run[@]}" --phase meta > "$b.meta.txt"
for i in 0 1 2 3; do "$bin" "${common[@]}" vit "${run[@]}" --phase module --index "$i" > "$b.module$i.txt"; done
"$bin" "${common[@]}" vit "${run[@]}" --phase assemble > "$b.assemble.txt"
"$bin" "${common[@]}" vit "${run[@]}" --phase finetune > "$b.finetune.txt"
compared=0
for phase in teacher modules assembled finetuned; do
  for i in 0 1 2 3; do
    f="$phase/stage$i.safetensors"
    if ! cmp -s "$a/$f" "$b/$f"; then echo "FAIL: $f differs (or is missing) between one process and several" >&2; status=1; fi
    compared=$((compared + 1))
  done
done
[[ $(tail -n1 "$a.stdout.txt") == $(tail -n1 "$b.finetune.txt") ]] || { echo "FAIL: final accuracies differ" >&2; status=1; }

sums() { find "$1" -type f -print0 | sort -z | xargs -0 md5sum; }
before=$(sums "$work")
expect_refusal() {  # <pattern> <command...>
  local pattern=$1 out rc
  shift
  set +e
  out=$("$@" 2>&1)
  rc=$?
  set -e
  if [[ $rc -eq 0 || $rc -ge 128 ]]; then echo "FAIL: '$*' exited $rc, expected a refusal" >&2; echo "$out" >&2; status=1
  elif ! grep -Eq -- "$pattern" <<<"$out"; then echo "FAIL: '$*' did not say /$pattern/:" >&2; echo "$out" >&2; status=1
  elif [[ $(grep -c . <<<"$out") -ne 1 ]]; then echo "FAIL: '$*' said more than one line:" >&2; echo "$out" >&2; status=1
  fi
}
# A teacher run of another preset (vit-micro's files, read as vit-tiny's).
expect_refusal "distill: error: $a/teacher-run/finetuned/stage0.safetensors: .*vit-tiny" \
  "$bin" "${common[@]/vit-micro/vit-tiny}" vit --teacher-dir "$a/teacher-run" --out "$b" --phase meta
# No teacher run there.
expect_refusal "distill: error: $work/none/finetuned/stage0.safetensors: missing" \
  "$bin" "${common[@]}" vit --teacher-dir "$work/none" --out "$b" --phase meta
# Assembling before the modules exist.
expect_refusal "distill: error: $work/empty/modules/stage0.safetensors: missing" \
  "$bin" "${common[@]}" vit --teacher-dir "$a/teacher-run" --out "$work/empty" --phase assemble
# A student that is not staged like the teacher.
expect_refusal "distill: error: --student vit-base: no student preset 'vit-base' staged like the teacher --preset vit-micro" \
  "$bin" "${common[@]}" vit-base --out "$b" --phase module
# A NAC student for a teacher that has none.
expect_refusal "distill: error: --student nac: there is no NAC student of the shape of --preset vit-micro" \
  "$bin" "${common[@]}" nac --out "$b" --phase module
rm -rf "$work/empty"
[[ $(sums "$work") == "$before" ]] || { echo "FAIL: a refused run changed files under $work" >&2; status=1; }

# 4. A NAC student (nac-small) of a vit-small teacher, every phase: the module files hold no
#    codes or signatures (the assembly draws them), the fine-tuned model does.
n="$work/nac"
"$bin" "${common[@]/vit-micro/vit-small}" nac --out "$n" --phase all > "$n.stdout.txt"
tail -n1 "$n.stdout.txt" | grep -Eq '^test_accuracy=0[.][0-9]{4}$' || { echo "FAIL: last line of --student nac:" >&2; cat "$n.stdout.txt" >&2; status=1; }
[[ $(grep -Ec '^module [0-3]: teacher_hybrid_accuracy=0[.][0-9]{4} student_hybrid_accuracy=0[.][0-9]{4}$' "$n.stdout.txt") -eq 4 ]] ||
  { echo "FAIL: expected a hybrid accuracy line per NAC module" >&2; status=1; }
if grep -aq 'codes\|signatures' "$n"/modules/stage*.safetensors; then echo "FAIL: a NAC module file holds a table" >&2; status=1; fi
grep -aq 'codes' "$n/finetuned/stage1.safetensors" || { echo "FAIL: the fine-tuned NAC stage has no codes" >&2; status=1; }

[[ $status -eq 0 ]] && echo "OK: --phase all ends with $(tail -n1 "$a.stdout.txt"); $compared stage files identical across processes; 5 bad inputs refused, files untouched; NAC student: $(tail -n1 "$n.stdout.txt")"
exit $status
