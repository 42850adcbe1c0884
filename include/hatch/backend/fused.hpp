#pragma once
// Fused operations: a sequence of Backend primitives that a backend may run as one, faster call.
// A layer calls hatch::fused::X<B>(...); when B has a static member X with the same arguments it
// runs, otherwise the unfused sequence below (the definition of X's result) does. So a backend
// is complete with the concept's primitives alone, and a fast path is one static member.
//
// Cuda has both of these (cuBLASLt epilogues). Cpu has both too, each one parallel region
// (Cpu::gemm_panels): linear_forward writes the bias where each thread's GEMM accumulates, and
// linear_backward_params sums the bias gradient on each thread right after its panel of dW.
#include "hatch/backend/concept.hpp"

namespace hatch::fused {

template <class B>
using S = typename B::Scalar;  // the scalar type of backend B

// y (rows x out) = x (rows x in) W^T + bias, W (out x in) as PyTorch stores it; bias may be null.
template <Backend B>
void linear_forward_unfused(S<B>* y, const S<B>* x, const S<B>* w, const S<B>* bias, int rows, int in, int out) {
  B::gemm(false, true, rows, out, in, S<B>(1), x, in, w, in, S<B>(0), y, out);
  if (bias) B::add_bias_rows(y, bias, rows, out);
}
template <Backend B>
void linear_forward(S<B>* y, const S<B>* x, const S<B>* w, const S<B>* bias, int rows, int in, int out) {
  if constexpr (requires { B::linear_forward(y, x, w, bias, rows, in, out); })
    B::linear_forward(y, x, w, bias, rows, in, out);
  else
    linear_forward_unfused<B>(y, x, w, bias, rows, in, out);
}

// The parameter gradients of y = x W^T + b, accumulated: dw (out x in) += dy^T x and
// dbias (out) += the column sums of dy (rows x out). Either output may be null (frozen).
template <Backend B>
void linear_backward_params_unfused(S<B>* dw, S<B>* dbias, const S<B>* dy, const S<B>* x, int rows, int in, int out) {
  if (dw) B::gemm(true, false, out, in, rows, S<B>(1), dy, out, x, in, S<B>(1), dw, in);
  if (dbias) B::sum_rows(dbias, dy, rows, out, out, S<B>(1));
}
template <Backend B>
void linear_backward_params(S<B>* dw, S<B>* dbias, const S<B>* dy, const S<B>* x, int rows, int in, int out) {
  if constexpr (requires { B::linear_backward_params(dw, dbias, dy, x, rows, in, out); })
    B::linear_backward_params(dw, dbias, dy, x, rows, in, out);
  else
    linear_backward_params_unfused<B>(dw, dbias, dy, x, rows, in, out);
}

}  // namespace hatch::fused
