#!/usr/bin/env bash
# The CUDA suite on CPU threads under AddressSanitizer and UBSan, with every device block a heap
# block (HATCH_CUDA_ON_CPU_EXACT_BLOCKS) of its tensor's exact size and freed with it (hatch's
# cache off: HATCH_CUDA_CACHING=0), so that a kernel or a copy that touches a byte past a tensor,
# or a tensor already freed, is reported. Not part of ctest (about 3 minutes to build, 3 to run on two
# cores). Usage: tests/cuda_on_cpu/asan.sh [build-dir] [doctest options]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-build/cuda_on_cpu_asan}
shift || true
mkdir -p "$out"
flags=(-std=c++20 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined)
dev=(-DHATCH_CUDA_ON_CPU -DHATCH_CUDA_ON_CPU_EXACT_BLOCKS -Itests/cuda_on_cpu -Iinclude -Itests -Itests/cuda)
g++ "${flags[@]}" "${dev[@]}" -c tests/cuda_on_cpu/backend_tests.cpp -o "$out/backend.o" &
g++ "${flags[@]}" "${dev[@]}" -c tests/cuda_on_cpu/kernel_tests.cpp -o "$out/kernels.o" &&
  g++ "${flags[@]}" "${dev[@]}" -c tests/cuda_on_cpu/test_stand_ins.cpp -o "$out/stand_ins.o" &&
  g++ "${flags[@]}" -fopenmp -Iinclude -I/usr/include/eigen3 -Itests/cuda -c tests/cuda/cpu_side.cpp -o "$out/cpu_side.o" &&
  g++ -std=c++20 -c tests/test_main.cpp -o "$out/main.o"
wait
g++ -fsanitize=address,undefined -fopenmp "$out"/backend.o "$out"/kernels.o "$out"/stand_ins.o "$out"/cpu_side.o "$out"/main.o -lz \
  -o "$out/hatch_cuda_on_cpu_asan"
HATCH_CUDA_CACHING=0 OMP_NUM_THREADS=2 "$out/hatch_cuda_on_cpu_asan" "-tce=*ViT-B/16 sizes*,*on a GPU only*" "$@"
