#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything bench/gpu.sh runs on a GPU machine that has
# CUDA, PyTorch and timm but no package registry (no Eigen, doctest, CLI11, data set there):
#
#   bench/gpu-bundle.sh [--build build-bundle] [--out gpu-bundle]
#
# The CUDA test binary, train_step, cuda_rows, train_e2e, incubate and distill are built for sm_90 with
# -DHATCH_NATIVE=OFF (the GPU machine's CPU may lack this one's instructions), without MPI, NCCL
# or OpenBLAS, and packed with the Fashion-MNIST files, the scripts gpu.sh needs, the host
# libraries the binaries need that a bare machine may lack (not glibc, not the CUDA libraries:
# those must be the machine's own), and libs.txt (what each binary needs, from ldd), into the
# folder OUT and the archive OUT.tar.xz (the binaries are about 65 MiB, 10 compressed; the
# device tool carries 64 MiB in all, so the archive is what travels). Then, there:
#
#   tar xJf gpu-bundle.tar.xz && gpu-bundle/bench/gpu-run.sh --bundle gpu-bundle
#   (without xz: python3 -m tarfile -e gpu-bundle.tar.xz .; gpu-run.sh runs gpu.sh, then
#   gpu-sanitize.sh, within one time budget)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
build="$root/build-bundle" out="$root/gpu-bundle"
die() { echo "gpu-bundle.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build|--out) [[ $# -ge 2 ]] || die "$1 needs a value"; declare "${1#--}=$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
command -v nvcc >/dev/null || die "no nvcc on PATH or in /usr/local/cuda/bin: the bundle needs the CUDA toolkit"
data=/usr/share/datasets/fashion-mnist
[[ -f $data/train-images-idx3-ubyte.gz ]] || die "no Fashion-MNIST in $data (tools/setup-debian.sh installs it)"

# One GPU, one process: no MPI or NCCL (libnccl alone is over 200 MiB), and Eigen's GEMM on the
# host side (no OpenBLAS to carry); sm_90 code only (H100/H200), no PTX.
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DHATCH_ENABLE_CUDA=ON -DHATCH_NATIVE=OFF \
  -DHATCH_ENABLE_MPI=OFF -DHATCH_ENABLE_NCCL=OFF -DHATCH_ENABLE_OPENBLAS=OFF \
  -DCMAKE_CUDA_ARCHITECTURES=90-real -DHATCH_BUILD_TESTS=ON -DHATCH_BUILD_EXAMPLES=ON -DHATCH_BUILD_BENCHMARKS=ON >/dev/null
targets=(hatch_cuda_tests train_step cuda_rows train_e2e incubate distill)
cmake --build "$build" -j"$(nproc)" --target "${targets[@]}"

rm -rf "$out" && mkdir -p "$out/bin" "$out/lib" "$out/data" "$out/bench"
cp "$build/tests/hatch_cuda_tests" "$build/bench/train_step" "$build/bench/cuda_rows" "$build/examples/train_e2e" "$build/examples/incubate" "$build/examples/distill" \
  "$out/bin/"
strip --strip-unneeded "$out"/bin/*
cp "$data"/*.gz "$out/data/"
cp "$here/gpu.sh" "$here/gpu-run.sh" "$here/gpu-sanitize.sh" "$here/gpu-profile.sh" "$here/torch_vit_step.py" "$here/torch_fmnist_train.py" \
  "$here/torch_rows.py" "$root/tests/programs_on_cuda.sh" "$out/bench/"

: >"$out/libs.txt"
for b in "$out"/bin/*; do
  echo "== $(basename "$b")" >>"$out/libs.txt"
  ldd "$b" | sed 's/ (0x[0-9a-f]*)//' >>"$out/libs.txt"
  # Host libraries a bare machine may lack or have older; glibc and CUDA stay the machine's own.
  ldd "$b" | awk '/=> \//{print $1, $3}' | while read -r name path; do
    case "$name" in
      libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|ld-linux*|libcuda.so*|libcudart.so*|libcublas*) ;;
      *) cp -n "$path" "$out/lib/" ;;
    esac
  done
done
tar -C "$(dirname "$out")" -cf - "$(basename "$out")" | xz -T0 -6 >"$out.tar.xz.tmp"
mv "$out.tar.xz.tmp" "$out.tar.xz"
size=$(du -sm "$out" | cut -f1) packed=$(du -sm "$out.tar.xz" | cut -f1)
echo "gpu-bundle.sh: $out is ${size} MiB ($(ls "$out/bin" | tr '\n' ' ')), $out.tar.xz ${packed} MiB"
((packed <= 60)) || die "$out.tar.xz is ${packed} MiB, more than the 60 MiB the device tool carries with room to spare"
