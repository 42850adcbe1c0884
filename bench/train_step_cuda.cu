// The Cuda instantiation of train_step (see train_step.hpp).
#include <hatch/cuda.hpp>

#include "train_step.hpp"

int bench::time_train_step_cuda(const StepOptions& o) {
  hatch::require(hatch::Cuda::device_available(), "--device cuda", "no CUDA device is visible to this process");
  hatch::Cuda::set_tf32(o.tf32);
  auto named = o;
  named.label = "hatch cuda " + std::string(o.tf32 ? "tf32" : "fp32") + " (" + hatch::Cuda::device_name() + ")";
  return time_train_step<hatch::Cuda>(named);
}
