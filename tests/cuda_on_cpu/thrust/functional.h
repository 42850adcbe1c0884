#pragma once
// thrust::plus, for builds that run the Cuda backend on the CPU (tests/cuda_on_cpu).
namespace thrust {
template <class T = void>
struct plus {
  constexpr T operator()(const T& a, const T& b) const { return a + b; }
};
}  // namespace thrust
