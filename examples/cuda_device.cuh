#pragma once
// What every program's Cuda instantiation (cuda_<program>.cu) does first. Only these files see
// the Cuda policy; the .cpp files never see Eigen's counterpart here.
#include <hatch/cuda.hpp>

#include "programs.hpp"

namespace examples {

inline void select_device(const CommonOptions& c) {
  hatch::require(hatch::Cuda::device_available(), "--device cuda", "no CUDA device is visible to this process");
  // --tf32 or --tf32x3; neither leaves the backend's default (HATCH_CUDA_GEMM, else fp32)
  if (c.tf32) hatch::Cuda::set_gemm_precision(hatch::Cuda::GemmPrecision::tf32);
  if (c.tf32x3) hatch::Cuda::set_gemm_precision(hatch::Cuda::GemmPrecision::tf32x3);
  if (!c.no_progress && c.rank() == 0)
    std::fprintf(stderr, "device: %s (%s GEMMs)\n", hatch::Cuda::device_name().c_str(),
                 hatch::cuda_detail::name(hatch::Cuda::gemm_precision()));
}

}  // namespace examples
