// distill on the Cuda backend: the template of programs.hpp instantiated by nvcc, one translation
// unit per program so that a parallel build compiles them side by side.
#include "cuda_device.cuh"

namespace examples {

int distill_cuda(const DistillOptions& a) {
  select_device(a.common);
  return distill<hatch::Cuda>(a);
}

}  // namespace examples
