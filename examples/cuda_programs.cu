// The example programs on the Cuda backend: the same templates as on the CPU (programs.hpp),
// instantiated by nvcc. Only this file sees the Cuda policy; the .cpp files never see Eigen's
// counterpart here.
#include <hatch/cuda.hpp>

#include "programs.hpp"

namespace examples {
namespace {

void select_device(const CommonOptions& c) {
  hatch::require(hatch::Cuda::device_available(), "--device cuda", "no CUDA device is visible to this process");
  hatch::Cuda::set_tf32(c.tf32);
  if (!c.no_progress)
    std::fprintf(stderr, "device: %s%s\n", hatch::Cuda::device_name().c_str(), c.tf32 ? " (TF32 GEMMs)" : "");
}

}  // namespace

int train_e2e_cuda(const E2eOptions& a) {
  select_device(a.common);
  return train_e2e<hatch::Cuda>(a);
}

int incubate_cuda(const IncubateOptions& a) {
  select_device(a.common);
  return incubate<hatch::Cuda>(a);
}

int distill_cuda(const DistillOptions& a) {
  select_device(a.common);
  return distill<hatch::Cuda>(a);
}

}  // namespace examples
