#!/bin/bash
# Barrier mutations: which of the emulator's thread orders catch a missing barrier?
#
# Takes each __syncthreads() and __syncwarp() of the CUDA kernels (backend/cuda_kernels.cuh,
# backend/cuda_attention.cuh) out in turn, in a copy of this working tree, rebuilds the kernels'
# two CPU test programs and runs them with the block's threads in order, reversed and shuffled
# (HATCH_EMULATION_THREAD_ORDER): the CUDA suite on the stand-ins (hatch_cuda_on_cpu_tests, less
# its four slowest cases, which run the same kernels as the parity cases, and those left to a GPU)
# and the emulated kernel tests of the unit suite (hatch_tests -sf=*emulated*, as the ctest
# unit.emulated_shuffled runs them). The three schedules are those of the ctests cuda_on_cpu,
# cuda_on_cpu.reversed and cuda_on_cpu.shuffled (the first with the emulator's racecheck, the
# second without hatch's cache, as there). Prints a markdown table: "caught" where the run
# failed. The first build (the whole unit suite) takes about 15 minutes on two cores; then about
# 2 minutes a barrier (only the emulated tests' files are rebuilt; 19 barriers in all).
#
#   tests/cuda_on_cpu/barrier_mutations.sh [WORKDIR [KERNEL HEADERS...]]
#   # default /tmp/hatch-barrier-mutations, both headers
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-/tmp/hatch-barrier-mutations}
rm -rf "$work" && mkdir -p "$work"
(cd "$src" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work")
cd "$work"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >build.log 2>&1
skip="*ViT-B/16 sizes*,*on a GPU only*,*waits for the device once*,*four phases*,*a fetch of step scalars*,*the fit loop, two epochs*"
build() { cmake --build build --target hatch_cuda_on_cpu_tests hatch_tests -j2 >>build.log 2>&1; }
verdict() { if "$@" >run.log 2>&1; then echo -n "passed"; else echo -n "**caught**"; fi; }
row() {  # the six verdicts for the tree as it is
  for schedule in "HATCH_EMULATION_THREAD_ORDER=forward HATCH_EMULATION_RACECHECK=1" \
                  "HATCH_EMULATION_THREAD_ORDER=reverse HATCH_EMULATION_BLOCK_ORDER=reverse HATCH_CUDA_CACHING=0" \
                  "HATCH_EMULATION_THREAD_ORDER=shuffle HATCH_EMULATION_BLOCKS_AT_ONCE=4 HATCH_EMULATION_SEED=1"; do
    echo -n " | $(export $schedule OMP_NUM_THREADS=2; verdict timeout 600 build/tests/hatch_cuda_on_cpu_tests "-tce=$skip")"
    echo -n " / $(export $schedule OMP_NUM_THREADS=2; verdict timeout 600 build/tests/hatch_tests "-sf=*emulated*")"
  done
  echo " |"
}
echo "| barrier taken out (file:line, kernel) | in order: suite / emulated | reversed | shuffled, 4 blocks at once |"
echo "|---|---|---|---|"
build || { echo "the unchanged tree does not build: $work/build.log"; exit 1; }
echo -n "| none (the tree as it is)"; row
headers=("${@:2}")
[ ${#headers[@]} -gt 0 ] || headers=(include/hatch/backend/cuda_kernels.cuh include/hatch/backend/cuda_attention.cuh)
for f in "${headers[@]}"; do
  for ln in $(grep -n "__syncthreads();\|__syncwarp();" "$f" | cut -d: -f1); do
    # the function the barrier is in: the last kernel or device function declared above it
    fn=$(head -n "$ln" "$f" | grep -E "^(__global__|__device__)|^  *__device__ .*\(" | tail -1 |
         sed -E 's/\(.*//; s/.* //')
    cp "$f" "$f.orig"
    sed -i "${ln}s/__syncthreads();/(void)0;/; ${ln}s/__syncwarp();/(void)0;/" "$f"
    echo -n "| $(basename "$f"):$ln, \`$fn\`"
    if build; then row; else echo " | build failed | | |"; fi
    mv "$f.orig" "$f"
  done
done
