#pragma once
// Fused operations: a sequence of Backend primitives that a backend may run as one, faster call.
// A layer calls hatch::fused::X<B>(...); when B has a static member X with the same arguments it
// runs, otherwise the unfused sequence below (the definition of X's result) does. So a backend
// is complete with the concept's primitives alone, and a fast path is one static member.
//
// Cuda has all three (cuBLASLt epilogues; AdamW in one launch). Cpu has the two linear ones, each
// one parallel region (Cpu::gemm_panels): linear_forward writes the bias where each thread's GEMM
// accumulates, and linear_backward_params sums the bias gradient on each thread right after its
// panel of dW.
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

// AdamW over [0, n) with weight decay on [0, decay_end) only, as over a ParameterArena (decayed
// parameters first): two adamw_update calls, or one pass where the backend has the member.
template <Backend B>
void adamw_update_segments_unfused(S<B>* w, S<B>* m, S<B>* v, const S<B>* g, std::size_t n, std::size_t decay_end,
                                   S<B> lr, S<B> beta1, S<B> beta2, S<B> eps, S<B> weight_decay, S<B> bias_corr1,
                                   S<B> bias_corr2) {
  const std::size_t d = decay_end < n ? decay_end : n;
  if (d) B::adamw_update(w, m, v, g, d, lr, beta1, beta2, eps, weight_decay, bias_corr1, bias_corr2);
  if (n > d)
    B::adamw_update(w + d, m + d, v + d, g + d, n - d, lr, beta1, beta2, eps, S<B>(0), bias_corr1, bias_corr2);
}
template <Backend B>
void adamw_update_segments(S<B>* w, S<B>* m, S<B>* v, const S<B>* g, std::size_t n, std::size_t decay_end, S<B> lr,
                           S<B> beta1, S<B> beta2, S<B> eps, S<B> weight_decay, S<B> bias_corr1, S<B> bias_corr2) {
  if constexpr (requires {
                  B::adamw_update_segments(w, m, v, g, n, decay_end, lr, beta1, beta2, eps, weight_decay, bias_corr1,
                                           bias_corr2);
                })
    B::adamw_update_segments(w, m, v, g, n, decay_end, lr, beta1, beta2, eps, weight_decay, bias_corr1, bias_corr2);
  else
    adamw_update_segments_unfused<B>(w, m, v, g, n, decay_end, lr, beta1, beta2, eps, weight_decay, bias_corr1,
                                     bias_corr2);
}

}  // namespace hatch::fused
