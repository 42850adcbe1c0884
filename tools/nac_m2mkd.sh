#!/usr/bin/env bash
# NAC on Fashion-MNIST: m2mKD (a vit-small teacher distilled into nac-small, module by module)
# against nac-small trained end to end, for two graph priors, with the dense-attention NAC and
# the teacher beside them (docs/results.md §8, issue 10).
#
#   tools/nac_m2mkd.sh BIN_DIR TEACHER_RUN OUT_DIR [kd|e2e]
#
# BIN_DIR holds train_e2e and distill (build/examples); TEACHER_RUN is a finished
# `incubate --preset vit-small` run (its finetuned/ stages are the teacher, its meta/ the meta
# model); OUT_DIR gets one directory per run with stdout, stderr (/usr/bin/time -v) and
# metrics.jsonl. Recipe (both arms): the first 10,000 training images, the full test set and its
# shifted copy (--ood), batch 128, AdamW, weight decay 0.05, label smoothing 0.1, one thread per
# run, seed 0. m2mKD: each of the 4 modules distilled for 4 epochs (peak 2e-3, warmup 0.5,
# alpha 0.5, T 1), assembled with fresh codes and signatures on the prior, then fine-tuned 6 epochs
# at peak RATE (no warmup, clip 1); end to end: 10 epochs (= 4 x 4 / 4 + 6, §6's accounting) at
# peak RATE, warmup 0.5. The modules are distilled once: the prior enters only at assembly.
# Two lanes run side by side (two cores): the distillation chain and the end-to-end runs (a
# fourth argument runs one lane only).
set -euo pipefail
[[ $# -eq 3 || $# -eq 4 ]] || { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
bin=$1 teacher=$2 out=$3 lane=${4:-both}
rate=${RATE:-1e-3}
mkdir -p "$out"
common=(--train-limit 10000 --test-limit 0 --threads 1 --seed 0 --no-progress --label-smoothing 0.1)
log() { echo "$(date +%T) $*" | tee -a "$out/jobs.log"; }
run() {  # <name> <command...>
  local name=$1
  shift
  log "start $name: $*"
  if /usr/bin/time -v "$@" >"$out/$name.stdout.txt" 2>"$out/$name.stderr.txt"; then
    log "done  $name: $(tail -n2 "$out/$name.stdout.txt" | tr '\n' ' ')"
  else
    log "FAIL  $name: $(tail -n3 "$out/$name.stderr.txt" | tr '\n' ' ')"
  fi
}
kd=(--preset vit-small --student nac --teacher-dir "$teacher" "${common[@]}")
distill_lane() {
  if [[ ! -f $out/kd/modules/stage3.safetensors ]]; then  # distilled once, reused by every prior
    run kd-meta "$bin/distill" "${kd[@]}" --out "$out/kd" --phase meta
    run kd-modules "$bin/distill" "${kd[@]}" --out "$out/kd" --phase module --epochs-module 4
  fi
  run kd-teacher-ood "$bin/distill" "${kd[@]}" --out "$out/kd" --phase meta --ood  # the teacher in and out
  for prior in scale-free erdos-renyi; do
    local dir="$out/kd-$prior"
    rm -rf "$dir" && mkdir -p "$dir" && cp -r "$out/kd/teacher" "$out/kd/modules" "$dir/"
    run "kd-$prior" "$bin/distill" "${kd[@]}" --out "$dir" --phase assemble --nac-prior "$prior"
    run "kd-$prior-ft" "$bin/distill" "${kd[@]}" --out "$dir" --phase finetune --nac-prior "$prior" \
      --epochs-finetune 6 --finetune-lr "$rate" --finetune-clip 1 --ood
  done
}
e2e_lane() {
  for arm in scale-free erdos-renyi dense; do
    local flags=(--nac-prior scale-free)
    [[ $arm == dense ]] && flags+=(--nac-dense) || flags=(--nac-prior "$arm")
    run "e2e-$arm" "$bin/train_e2e" --preset nac-small "${common[@]}" "${flags[@]}" --out "$out/e2e-$arm" \
      --epochs 10 --lr "$rate" --warmup-epochs 0.5 --ood
  done
}
[[ $lane == e2e ]] || distill_lane &
[[ $lane == kd ]] || e2e_lane &
wait
log "all done"
