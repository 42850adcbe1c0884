#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over the CUDA primitive and kernel tests (not the
# layer-parity cases, which take too long under the sanitizer, nor the two tests that provoke
# failing CUDA and cuBLAS calls on purpose, which the sanitizer reports as API errors, nor the
# tests at ViT-B/16 sizes and over 65,538 (example, head) pairs, the same kernels as the smaller
# cases at sizes that would take the sanitizers minutes):
#
#   bench/gpu-sanitize.sh --bundle DIR      (binaries from bench/gpu-bundle.sh)
#   bench/gpu-sanitize.sh --build build-gpu (a build tree)
#
# memcheck runs with hatch's caching allocator off (HATCH_CUDA_CACHING=0, as PyTorch's
# PYTORCH_NO_CUDA_MEMORY_CACHING=1): every tensor then has a cudaMalloc block of its exact size,
# freed with it, so an access past a tensor's end or to a freed tensor is an access outside every
# allocation, which memcheck reports (inside a cached, rounded block it could not tell).
#
# About 3 minutes; each tool has its own time-out (SANITIZE_TIMEOUT seconds, default 90). Exit status: non-zero if any tool reports.
# SANITIZE_TOOLS picks the tools (default "memcheck racecheck"; also "initcheck", reads of device
# memory nothing wrote, and "synccheck", barriers misused).
set -uo pipefail
die() { echo "gpu-sanitize.sh: $*" >&2; exit 2; }
bin=""
case "${1:-}" in
  --bundle) [[ $# -ge 2 ]] || die "--bundle needs a directory"; bin="$2/bin/hatch_cuda_tests"
            export LD_LIBRARY_PATH="$2/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
  --build) [[ $# -ge 2 ]] || die "--build needs a directory"; bin="$2/tests/hatch_cuda_tests" ;;
  *) die "usage: gpu-sanitize.sh --bundle DIR | --build DIR" ;;
esac
tools=${SANITIZE_TOOLS:-memcheck racecheck}
for tool in $tools; do
  case "$tool" in memcheck|racecheck|initcheck|synccheck) ;; *) die "SANITIZE_TOOLS: unknown tool '$tool' (memcheck, racecheck, initcheck, synccheck)" ;; esac
done
[[ -x $bin ]] || die "missing $bin"
sanitizer="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
[[ -x $sanitizer ]] || die "no compute-sanitizer on PATH or in /usr/local/cuda/bin"
status=0
for tool in $tools; do
  caching=1
  [[ $tool == memcheck || $tool == initcheck ]] && caching=0
  echo "== compute-sanitizer --tool $tool (HATCH_CUDA_CACHING=$caching)"
  HATCH_CUDA_CACHING=$caching HATCH_EXPECT_GPU=1 timeout "${SANITIZE_TIMEOUT:-90}" "$sanitizer" --tool "$tool" --error-exitcode 3 "$bin" -tc='cuda: *,cuda kernels*' \
    -tce='*failing*,*ViT-B/16 sizes*,*on a GPU only*' \
    2>&1 | tail -15
  rc=${PIPESTATUS[0]}
  echo "   $tool: exit $rc"; ((rc == 0)) || status=1
done
exit $status
