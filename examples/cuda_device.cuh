#pragma once
// What every program's Cuda instantiation (cuda_<program>.cu) does first. Only these files see
// the Cuda policy; the .cpp files never see Eigen's counterpart here.
#include <hatch/cuda.hpp>

#include "programs.hpp"

namespace examples {

inline void select_device(const CommonOptions& c) {
  hatch::require(hatch::Cuda::device_available(), "--device cuda", "no CUDA device is visible to this process");
  hatch::Cuda::set_tf32(c.tf32);
  if (!c.no_progress && c.rank() == 0)
    std::fprintf(stderr, "device: %s%s\n", hatch::Cuda::device_name().c_str(), c.tf32 ? " (TF32 GEMMs)" : "");
}

}  // namespace examples
