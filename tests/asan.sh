#!/usr/bin/env bash
# The main CPU unit suite (the hatch_tests target of tests/CMakeLists.txt) under AddressSanitizer
# and UBSan, with the target's own defines and libraries (OpenBLAS GEMMs, zlib), and libstdc++'s
# std::vector annotations (_GLIBCXX_SANITIZE_VECTOR: a read between a vector's size and its
# capacity, e.g. in a thread_local workspace that only grows, is reported too). Not part of ctest
# or CI: a manual check, like tests/cuda_on_cpu/asan.sh (about 10 minutes to build on two cores,
# 1 to run). Compiles two translation units at a time and, on a later run, only those whose
# sources or headers changed. Every test case runs; the leak checker stays on (nothing leaks,
# OpenBLAS and libgomp included, so no suppressions). OpenBLAS itself is not instrumented: with
# HATCH_CPU_GEMM=eigen in the environment every GEMM runs Eigen's kernel, compiled here, so that
# ASan also sees the GEMMs' reads of their operands (clean too, 1.5 minutes).
# Usage: tests/asan.sh [build-dir] [doctest options]     (default build-dir: build/asan)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/asan}
shift || true
mkdir -p "$out"
# Keep in step with add_executable(hatch_tests ...) in tests/CMakeLists.txt.
sources=(test_main test_gradcheck test_compose test_parity test_safetensors test_data test_train test_arena
         test_checkpoint test_fit test_incubator test_incubator_grad test_distiller test_elementwise
         test_aux_loss test_routing test_moe test_nac test_nac_distill test_shift test_async
         test_emulated_attention test_emulated_rows)
flags=(-std=c++20 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
       -fopenmp -D_GLIBCXX_SANITIZE_VECTOR=1)
defs=(-Iinclude -I/usr/include/eigen3 -Itests "-DHATCH_FIXTURE_DIR=\"$PWD/tests/fixtures\"" -DHATCH_WITH_OPENBLAS=1)

# Objects built with other flags are stale.
stamp="${flags[*]} ${defs[*]}"
if [[ ! -f $out/flags.txt || $(<"$out/flags.txt") != "$stamp" ]]; then
  rm -f "$out"/*.o "$out"/*.d
  printf '%s' "$stamp" >"$out/flags.txt"
fi
stale() {  # stale OBJECT: true when it is missing or older than a file it was compiled from
  local o=$1 d=${1%.o}.d f
  [[ -f $o && -f $d ]] || return 0
  for f in $(sed -e 's/\\$//' -e 's/^[^:]*://' "$d"); do
    [[ ! -e $f || $f -nt $o ]] && return 0
  done
  return 1
}
running=0
for s in "${sources[@]}"; do
  stale "$out/$s.o" || continue
  if ((running == 2)); then
    wait -n
    running=$((running - 1))
  fi
  echo "compiling tests/$s.cpp"
  g++ "${flags[@]}" "${defs[@]}" -MMD -MP -c "tests/$s.cpp" -o "$out/$s.o" &
  running=$((running + 1))
done
while ((running > 0)); do
  wait -n
  running=$((running - 1))
done
objects=("${sources[@]/#/$out/}")
g++ -fsanitize=address,undefined -fopenmp "${objects[@]/%/.o}" -lopenblas -lz -o "$out/hatch_tests_asan"
OMP_NUM_THREADS=2 UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} "$out/hatch_tests_asan" "$@"
