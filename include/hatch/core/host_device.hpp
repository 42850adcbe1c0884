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

namespace hatch {

// Gradient clipping's rule, the one place it is written: gradients of global L2 norm `norm` are
// scaled by the returned factor, max_norm / (norm + 1e-6) when norm > max_norm, else 1 (callers
// skip the scale then; a NaN norm is never clipped). Used by clip_grad_norm over parameter lists
// (train/optimizer.hpp), ParameterArena::clip_grad_norm, StepScalars::clip_to_norm and Cuda's
// clip_to_norm kernel, which reads the norm on the device.
HATCH_HD inline double clip_factor(double norm, double max_norm) {
  return max_norm > 0 && norm > max_norm ? max_norm / (norm + 1e-6) : 1.0;
}

}  // namespace hatch
