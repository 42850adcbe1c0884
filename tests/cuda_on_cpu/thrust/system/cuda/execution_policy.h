#pragma once
// thrust::cuda::par(allocator).on(stream), for builds that run the Cuda backend on the CPU
// (tests/cuda_on_cpu): the policy carries the allocator, which the host algorithms use for their
// temporary storage as Thrust's CUDA algorithms would, and the stream they run on.
#include "../../../cuda_on_cpu.hpp"
namespace thrust::cuda {
template <class Alloc>
struct policy {
  Alloc* alloc;
  cudaStream_t stream = nullptr;
  policy on(cudaStream_t s) const { return {alloc, s}; }
};
struct par_t {
  template <class Alloc>
  policy<Alloc> operator()(Alloc& a) const {
    return {&a};
  }
};
inline constexpr par_t par{};
}  // namespace thrust::cuda
