#!/usr/bin/env bash
# Deep Incubation against end-to-end training on deep, narrow ViTs (docs/results.md §7, issue 11).
#
#   tools/deep_incubation.sh BIN_DIR OUT_DIR JOB [JOB ...]
#
# BIN_DIR holds train_e2e and incubate (build/examples); OUT_DIR gets one directory per job,
# with the program's stdout, stderr (with /usr/bin/time -v) and metrics.jsonl. A JOB is
#   e2e:PRESET:IMAGES:LR:SEED:EPOCHS   end to end, EPOCHS at peak rate LR
#   di:PRESET:IMAGES:LR:SEED[:META]    Deep Incubation, every phase, fine-tuning at peak rate LR;
#                                      META (default 60) meta epochs, each module and fine-tuning
#                                      META / 3 (the job is then named diMETA-...)
#   ft:PRESET:IMAGES:LR:SEED[:EPOCHS]  fine-tuning only, at LR, of the assembly of the di job
#                                      with the same PRESET, IMAGES and SEED whose fine-tuning
#                                      rate is 2e-3 (the tuning trials of the fine-tuning phase);
#                                      EPOCHS (default 20) lengthens it, and the job is then
#                                      named ftEPOCHS-...
# Jobs run two at a time (JOBS=N to change), one thread each; WARMUP=E sets the warmup epochs of
# every phase that has one (default 5; scale it with the schedule). IMAGES is a class-balanced head of
# the training set (--balanced; 0 = all 60,000); the full test set is always used, every 5th
# epoch and the last. The recipe is the same in both arms and follows the paper's ratios
# (ALGORITHMS.md §1): meta 60 epochs, each module 20, fine-tuning 20 (60 : 20 : 20 as
# 300 : 100 : 100); one peak rate, 2e-3, in meta pre-training and incubation, 5 warmup epochs;
# fine-tuning without warmup, clip 1.0; drop-path 0.1 end to end, in the hybrids and when
# fine-tuning; crop 2 + flip and label smoothing 0.1 everywhere.
set -euo pipefail
[[ $# -ge 3 ]] || { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
bin=$1 out=$2
shift 2
mkdir -p "$out"
export bin out

run_job() {
  IFS=: read -r kind preset images lr seed epochs <<<"$1"
  local name="$kind-$preset-n$images-lr$lr-s$seed" dir ft_epochs=${epochs:-20} meta=${epochs:-60} warmup=${WARMUP:-5}
  # an ft or di job with its own length names it (an e2e job's EPOCHS is not optional)
  [[ $kind != e2e && -n $epochs ]] && name="$kind$epochs-$preset-n$images-lr$lr-s$seed"
  dir="$out/$name"
  local common=(--preset "$preset" --train-limit "$images" --test-limit 0 --crop-padding 2 --hflip
                --label-smoothing 0.1 --eval-every 5 --threads 1 --seed "$seed" --no-progress --no-resume)
  [[ $images -gt 0 ]] && common+=(--balanced)
  local cmd
  case $kind in
    e2e) cmd=("$bin/train_e2e" "${common[@]}" --epochs "$epochs" --lr "$lr" --warmup-epochs "$warmup" --drop-path 0.1) ;;
    di) cmd=("$bin/incubate" "${common[@]}" --phase all --epochs-meta "$meta" --epochs-module $((meta / 3))
             --epochs-finetune $((meta / 3)) --lr 2e-3 --warmup-epochs "$warmup" --hybrid-drop-path 0.1
             --finetune-drop-path 0.1 --finetune-lr "$lr" --finetune-clip 1) ;;
    ft) local from="$out/di-$preset-n$images-lr2e-3-s$seed"
        [[ -f $from/assembled/stage0.safetensors ]] || { echo "$name: no assembly in $from" >&2; return 1; }
        rm -rf "$dir" && mkdir -p "$dir" && cp -r "$from/meta" "$from/modules" "$from/assembled" "$dir/"
        cmd=("$bin/incubate" "${common[@]}" --phase finetune --epochs-meta 60 --epochs-module 20 --epochs-finetune "$ft_epochs"
             --lr 2e-3 --warmup-epochs "$warmup" --hybrid-drop-path 0.1 --finetune-drop-path 0.1 --finetune-lr "$lr"
             --finetune-clip 1) ;;
    *) echo "unknown job kind '$kind' in '$1'" >&2; return 2 ;;
  esac
  [[ $kind == ft ]] || { rm -rf "$dir"; mkdir -p "$dir"; }
  echo "$(date +%T) start $name: ${cmd[*]} --out $dir" | tee -a "$out/jobs.log"
  if /usr/bin/time -v "${cmd[@]}" --out "$dir" >"$dir/stdout.txt" 2>"$dir/stderr.txt"; then
    echo "$(date +%T) done  $name: $(tail -n1 "$dir/stdout.txt")" | tee -a "$out/jobs.log"
  else
    echo "$(date +%T) FAIL  $name: $(tail -n3 "$dir/stderr.txt" | tr '\n' ' ')" | tee -a "$out/jobs.log"
  fi
}
export -f run_job
printf '%s\n' "$@" | xargs -P "${JOBS:-2}" -I{} bash -c 'run_job "$@"' _ {}
