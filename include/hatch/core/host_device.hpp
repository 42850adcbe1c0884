#pragma once
// HATCH_HD marks a function that runs on the host and, under nvcc, on the device too. Element-wise
// functors passed to B::map / B::map_binary mark their operator() with it, so one functor serves
// Cpu, Cpu64 and Cuda:
//
//   struct Softplus {
//     template <class T> HATCH_HD T operator()(T x) const { return hatch::hd::log1p(hatch::hd::exp(x)); }
//   };
//
// Use the hatch::hd math functions below (or any function that is itself HATCH_HD) inside such
// a functor: they call the CUDA device functions under nvcc and <cmath> otherwise.
#include <cmath>

#if defined(__CUDACC__)
#define HATCH_HD __host__ __device__
#else
#define HATCH_HD
#endif

namespace hatch::hd {

// float and double overloads, so a functor templated on the scalar reads the same for both.
#define HATCH_HD_UNARY(name)                                  \
  HATCH_HD inline float name(float v) { return ::name##f(v); } \
  HATCH_HD inline double name(double v) { return ::name(v); }
HATCH_HD_UNARY(exp)
HATCH_HD_UNARY(expm1)
HATCH_HD_UNARY(log)
HATCH_HD_UNARY(log1p)
HATCH_HD_UNARY(tanh)
HATCH_HD_UNARY(erf)
HATCH_HD_UNARY(sqrt)
HATCH_HD_UNARY(fabs)
#undef HATCH_HD_UNARY

// 1 / (1 + exp(-x)) without overflow for large |x|.
template <class T>
HATCH_HD inline T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + exp(-x));
  const T e = exp(x);
  return e / (T(1) + e);
}

}  // namespace hatch::hd
