// Linked instead of the cuda_<program>.cu files when hatch is configured without CUDA.
#include <hatch/core/error.hpp>

#include "programs.hpp"

namespace examples {
namespace {
[[noreturn]] void no_cuda() {
  throw hatch::Error(
      "--device cuda: this build has no CUDA backend (nvcc was not found when it was configured; "
      "reconfigure with nvcc on PATH or -DHATCH_ENABLE_CUDA=ON)");
}
}  // namespace
int train_e2e_cuda(const E2eOptions&) { no_cuda(); }
int incubate_cuda(const IncubateOptions&) { no_cuda(); }
int distill_cuda(const DistillOptions&) { no_cuda(); }
}  // namespace examples
