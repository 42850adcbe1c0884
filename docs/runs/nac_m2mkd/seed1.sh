#!/usr/bin/env bash
# seed 1 of the scale-free comparison (m2mKD vs end to end), after the kd lane
set -u
B=/work/nacbin2; O=/work/nacrun; T=/work/exp/kd/teacher-run
while ! grep -q "kd-erdos-renyi-ft" <(grep -E "done|FAIL" $O/jobs.log); do sleep 10; done
common=(--train-limit 10000 --test-limit 0 --threads 1 --seed 1 --no-progress --label-smoothing 0.1)
kd=(--preset vit-small --student nac --teacher-dir $T "${common[@]}")
run() { local n=$1; shift; echo "$(date +%T) start $n: $*" >> $O/jobs.log; /usr/bin/time -v "$@" > $O/$n.stdout.txt 2> $O/$n.stderr.txt; echo "$(date +%T) done  $n: $(tail -n2 $O/$n.stdout.txt | tr '\n' ' ')" >> $O/jobs.log; }
run kd-s1-meta $B/distill "${kd[@]}" --out $O/kd-s1 --phase meta
run kd-s1-modules $B/distill "${kd[@]}" --out $O/kd-s1 --phase module --epochs-module 4
run kd-s1-assemble $B/distill "${kd[@]}" --out $O/kd-s1 --phase assemble --nac-prior scale-free
run kd-s1-ft $B/distill "${kd[@]}" --out $O/kd-s1 --phase finetune --nac-prior scale-free --epochs-finetune 6 --finetune-lr 1e-3 --finetune-clip 1 --ood
run e2e-s1-scale-free $B/train_e2e --preset nac-small "${common[@]}" --nac-prior scale-free --out $O/e2e-s1-scale-free --epochs 10 --lr 1e-3 --warmup-epochs 0.5 --ood
