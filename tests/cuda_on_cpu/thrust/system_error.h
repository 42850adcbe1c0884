#pragma once
// Thrust's error type, for builds that run the Cuda backend on the CPU (tests/cuda_on_cpu).
#include <stdexcept>
namespace thrust {
struct system_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
}  // namespace thrust
