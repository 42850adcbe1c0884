#pragma once
// Fused operations: a sequence of Backend primitives that a backend may run as one, faster call.
// A layer calls hatch::fused::X<B>(...); when B has a static member X with the same arguments it
// runs, otherwise the unfused sequence below (the definition of X's result) does. So a backend
// is complete with the concept's primitives alone, and a fast path is one static member.
//
// Cuda has both of these (cuBLASLt epilogues). Cpu has both too, each one parallel region
// (Cpu::gemm_panels): linear_forward writes the bias where each thread's GEMM accumulates, and
// linear_backward_params sums the bias gradient on each thread right after its panel of dW, and
// the GELU pair applies GELU to each thread's panel right after its GEMM wrote it, and GELU's
// derivative to the columns of dy a thread's weight-gradient GEMM is about to read.
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

// pre = x W^T + bias (kept: backward needs it) and y = GELU(pre), both rows x out.
template <Backend B>
void linear_gelu_forward_unfused(S<B>* pre, S<B>* y, const S<B>* x, const S<B>* w, const S<B>* bias, int rows, int in,
                                 int out) {
  linear_forward<B>(pre, x, w, bias, rows, in, out);
  B::gelu_forward(y, pre, std::size_t(rows) * out);
}
template <Backend B>
void linear_gelu_forward(S<B>* pre, S<B>* y, const S<B>* x, const S<B>* w, const S<B>* bias, int rows, int in, int out) {
  if constexpr (requires { B::linear_gelu_forward(pre, y, x, w, bias, rows, in, out); })
    B::linear_gelu_forward(pre, y, x, w, bias, rows, in, out);
  else
    linear_gelu_forward_unfused<B>(pre, y, x, w, bias, rows, in, out);
}

// Backward through y = GELU(x W^T + b) up to the parameters: dpre = dy * GELU'(pre) is written
// (the input gradient, dpre W, is the caller's GEMM), then dw += dpre^T x and dbias += its column
// sums, either of which may be null.
template <Backend B>
void gelu_linear_backward_params_unfused(S<B>* dpre, S<B>* dw, S<B>* dbias, const S<B>* dy, const S<B>* pre,
                                         const S<B>* x, int rows, int in, int out) {
  B::gelu_backward(dpre, dy, pre, std::size_t(rows) * out);
  linear_backward_params<B>(dw, dbias, dpre, x, rows, in, out);
}
template <Backend B>
void gelu_linear_backward_params(S<B>* dpre, S<B>* dw, S<B>* dbias, const S<B>* dy, const S<B>* pre, const S<B>* x,
                                 int rows, int in, int out) {
  if constexpr (requires { B::gelu_linear_backward_params(dpre, dw, dbias, dy, pre, x, rows, in, out); })
    B::gelu_linear_backward_params(dpre, dw, dbias, dy, pre, x, rows, in, out);
  else
    gelu_linear_backward_params_unfused<B>(dpre, dw, dbias, dy, pre, x, rows, in, out);
}

}  // namespace hatch::fused
