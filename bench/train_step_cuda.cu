// The Cuda instantiation of train_step (see train_step.hpp).
#include <hatch/cuda.hpp>

#include "train_step.hpp"

int bench::time_train_step_cuda(const StepOptions& o) {
  hatch::require(hatch::Cuda::device_available(), "--device cuda", "no CUDA device is visible to this process");
  // --tf32 or --tf32x3; neither leaves the backend's default (HATCH_CUDA_GEMM, else fp32)
  if (o.tf32) hatch::Cuda::set_gemm_precision(hatch::Cuda::GemmPrecision::tf32);
  if (o.tf32x3) hatch::Cuda::set_gemm_precision(hatch::Cuda::GemmPrecision::tf32x3);
  auto named = o;
  named.label = "hatch cuda " + std::string(hatch::cuda_detail::name(hatch::Cuda::gemm_precision())) + " (" +
                hatch::Cuda::device_name() + ")";
  return time_train_step<hatch::Cuda>(named);
}
