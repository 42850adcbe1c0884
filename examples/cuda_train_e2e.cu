// train_e2e on the Cuda backend: the template of programs.hpp instantiated by nvcc, one translation
// unit per program so that a parallel build compiles them side by side.
#include "cuda_device.cuh"

namespace examples {

int train_e2e_cuda(const E2eOptions& a) {
  select_device(a.common);
  return train_e2e<hatch::Cuda>(a);
}

}  // namespace examples
