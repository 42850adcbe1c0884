// incubate on the Cuda backend: the template of programs.hpp instantiated by nvcc, one translation
// unit per program so that a parallel build compiles them side by side.
#include "cuda_device.cuh"

namespace examples {

int incubate_cuda(const IncubateOptions& a) {
  select_device(a.common);
  return incubate<hatch::Cuda>(a);
}

}  // namespace examples
