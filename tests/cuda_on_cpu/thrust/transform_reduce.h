#pragma once
// thrust::transform_reduce on the host, for builds that run the Cuda backend on the CPU
// (tests/cuda_on_cpu). The range must be device memory, as for Thrust's CUDA algorithm.
#include <cstddef>
#include <iterator>

#include "../cuda_on_cpu.hpp"
#include "system/cuda/execution_policy.h"
namespace thrust {
template <class Alloc, class It, class Op, class T, class Bin>
T transform_reduce(const cuda::policy<Alloc>& policy, It first, It last, Op op, T init, Bin bin) {
  const auto n = std::size_t(last - first);
  hatch_cuda_on_cpu::require_device(&*first, n * sizeof(*first), "thrust::transform_reduce: the range");
  // the temporary storage Thrust's reduction takes from the allocator
  char* tmp = policy.alloc->allocate(std::ptrdiff_t(256));
  // on the policy's stream, and the result comes back to the host: it waits for it
  hatch_cuda_on_cpu::run_now(policy.stream, [&] {
    hatch_cuda_on_cpu::DeviceAccess open{&*first};
    for (It i = first; i != last; ++i) init = bin(init, op(*i));
  });
  policy.alloc->deallocate(tmp, 256);
  return init;
}
}  // namespace thrust
