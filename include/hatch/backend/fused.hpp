#pragma once
// Fused operations: a sequence of Backend primitives that a backend may run as one, faster call.
// A layer calls hatch::fused::X<B>(...); when B has a static member X with the same arguments it
// runs, otherwise the unfused sequence below (the definition of X's result) does. So a backend
// is complete with the concept's primitives alone, and a fast path is one static member.
//
// Cuda has all of them (cuBLASLt epilogues; AdamW in one launch; attention in fused kernels when
// switched on, backend/cuda_attention.cuh; under tf32x3 GEMMs, linear_backward and the unfused
// attention split each operand once per call rather than once per GEMM). Cpu has linear_forward
// and linear_backward_params, each one parallel region (Cpu::gemm_panels): linear_forward writes
// the bias where each thread's GEMM accumulates, and linear_backward_params sums the bias
// gradient on each thread right after its panel of dW.
#include <cstddef>

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

// A Linear layer's whole backward: the parameter gradients as linear_backward_params, and the
// input gradient dx (rows x in) = dy W unless dx is null. A backend's member may share work
// between the two GEMMs that read dy (Cuda: under tf32x3, dy's split).
template <Backend B>
void linear_backward_unfused(S<B>* dx, S<B>* dw, S<B>* dbias, const S<B>* dy, const S<B>* x, const S<B>* w, int rows,
                             int in, int out) {
  linear_backward_params<B>(dw, dbias, dy, x, rows, in, out);
  if (dx) B::gemm(false, false, rows, in, out, S<B>(1), dy, out, w, in, S<B>(0), dx, in);
}
template <Backend B>
void linear_backward(S<B>* dx, S<B>* dw, S<B>* dbias, const S<B>* dy, const S<B>* x, const S<B>* w, int rows, int in,
                     int out) {
  if constexpr (requires { B::linear_backward(dx, dw, dbias, dy, x, w, rows, in, out); })
    B::linear_backward(dx, dw, dbias, dy, x, w, rows, in, out);
  else
    linear_backward_unfused<B>(dx, dw, dbias, dy, x, w, rows, in, out);
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

// Multi-head scaled-dot-product self-attention, softmax(scale Q K^T) V per (example, head), with
// the heads read in place: qkv (batch, n, 3, heads, dh), out (batch, n, heads, dh). The forward
// keeps attention_saved_size values in `saved` for the backward; the backward takes
// attention_scratch_size values of scratch and writes all of dqkv.
// Unfused (the definition): the probabilities (batch, heads, n, n) are what is saved, and the
// scratch holds their gradient; two batched GEMMs and a softmax forward, four GEMMs and a softmax
// backward. Cuda's members run one fused kernel forward (saving one log-sum-exp per row) and three
// backward, where enabled (Cuda::set_fused_attention).
template <Backend B>
std::size_t attention_saved_size(int batch, int heads, int n, int dh) {
  if constexpr (requires { B::attention_saved_size(batch, heads, n, dh); })
    return B::attention_saved_size(batch, heads, n, dh);
  else
    return std::size_t(batch) * heads * n * n;
}
template <Backend B>
std::size_t attention_scratch_size(int batch, int heads, int n, int dh) {
  if constexpr (requires { B::attention_scratch_size(batch, heads, n, dh); })
    return B::attention_scratch_size(batch, heads, n, dh);
  else
    return std::size_t(batch) * heads * n * n;
}

template <Backend B>
void attention_forward_unfused(S<B>* out, S<B>* probs, const S<B>* qkv, int batch, int n, int heads, int dh,
                               S<B> scale) {
  const int d = heads * dh;
  const std::size_t sx = std::size_t(n) * 3 * d, sp = std::size_t(n) * n, so = std::size_t(n) * d;
  // scores = Q K^T (scaled inside the softmax)
  B::gemm_batched(false, true, n, n, dh, S<B>(1), qkv, 3 * d, sx, dh, qkv + d, 3 * d, sx, dh, S<B>(0), probs, n,
                  heads * sp, sp, batch, heads);
  B::softmax_forward(probs, probs, batch * heads * n, n, scale);
  B::gemm_batched(false, false, n, dh, n, S<B>(1), probs, n, heads * sp, sp, qkv + 2 * d, 3 * d, sx, dh, S<B>(0), out,
                  d, so, dh, batch, heads);
}
template <Backend B>
void attention_forward(S<B>* out, S<B>* saved, const S<B>* qkv, int batch, int n, int heads, int dh, S<B> scale) {
  if constexpr (requires { B::attention_forward(out, saved, qkv, batch, n, heads, dh, scale); })
    B::attention_forward(out, saved, qkv, batch, n, heads, dh, scale);
  else
    attention_forward_unfused<B>(out, saved, qkv, batch, n, heads, dh, scale);
}

// dqkv (batch, n, 3, heads, dh) from dout (batch, n, heads, dh); out is the forward's output
// (the unfused form does not read it) and saved what the forward saved.
template <Backend B>
void attention_backward_unfused(S<B>* dqkv, S<B>* dprobs, const S<B>* dout, const S<B>* qkv, const S<B>* probs,
                                int batch, int n, int heads, int dh, S<B> scale) {
  const int d = heads * dh;
  const std::size_t sx = std::size_t(n) * 3 * d, sp = std::size_t(n) * n, so = std::size_t(n) * d;
  // dP = dO V^T ; dV = P^T dO
  B::gemm_batched(false, true, n, n, dh, S<B>(1), dout, d, so, dh, qkv + 2 * d, 3 * d, sx, dh, S<B>(0), dprobs, n,
                  heads * sp, sp, batch, heads);
  B::gemm_batched(true, false, n, dh, n, S<B>(1), probs, n, heads * sp, sp, dout, d, so, dh, S<B>(0), dqkv + 2 * d,
                  3 * d, sx, dh, batch, heads);
  B::softmax_backward(dprobs, dprobs, probs, batch * heads * n, n, scale);
  // dQ = dS K ; dK = dS^T Q
  B::gemm_batched(false, false, n, dh, n, S<B>(1), dprobs, n, heads * sp, sp, qkv + d, 3 * d, sx, dh, S<B>(0), dqkv,
                  3 * d, sx, dh, batch, heads);
  B::gemm_batched(true, false, n, dh, n, S<B>(1), dprobs, n, heads * sp, sp, qkv, 3 * d, sx, dh, S<B>(0), dqkv + d,
                  3 * d, sx, dh, batch, heads);
}
template <Backend B>
void attention_backward(S<B>* dqkv, S<B>* scratch, const S<B>* dout, const S<B>* qkv, const S<B>* out,
                        const S<B>* saved, int batch, int n, int heads, int dh, S<B> scale) {
  if constexpr (requires { B::attention_backward(dqkv, scratch, dout, qkv, out, saved, batch, n, heads, dh, scale); })
    B::attention_backward(dqkv, scratch, dout, qkv, out, saved, batch, n, heads, dh, scale);
  else
    attention_backward_unfused<B>(dqkv, scratch, dout, qkv, saved, batch, n, heads, dh, scale);
}

}  // namespace hatch::fused
