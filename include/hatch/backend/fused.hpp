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

// Attention's core over a fused qkv buffer (batch, n, 3, heads, dh), heads read in place:
// probs (batch, heads, n, n) = softmax(scale Q K^T) and out (batch, n, heads, dh) = probs V.
template <Backend B>
void attention_forward_unfused(S<B>* probs, S<B>* out, const S<B>* qkv, int batch, int heads, int n, int dh, S<B> scale) {
  using T = S<B>;
  const int D = heads * dh;
  const std::size_t sx = std::size_t(n) * 3 * D, sp = std::size_t(n) * n, so = std::size_t(n) * D;
  B::gemm_batched(false, true, n, n, dh, T(1), qkv, 3 * D, sx, dh, qkv + D, 3 * D, sx, dh, T(0), probs, n,
                  heads * sp, sp, batch, heads);  // scores = Q K^T (scaled inside the softmax)
  B::softmax_forward(probs, probs, batch * heads * n, n, scale);
  B::gemm_batched(false, false, n, dh, n, T(1), probs, n, heads * sp, sp, qkv + 2 * D, 3 * D, sx, dh, T(0), out, D, so,
                  dh, batch, heads);
}
template <Backend B>
void attention_forward(S<B>* probs, S<B>* out, const S<B>* qkv, int batch, int heads, int n, int dh, S<B> scale) {
  if constexpr (requires { B::attention_forward(probs, out, qkv, batch, heads, n, dh, scale); })
    B::attention_forward(probs, out, qkv, batch, heads, n, dh, scale);
  else
    attention_forward_unfused<B>(probs, out, qkv, batch, heads, n, dh, scale);
}

// Its backward: dqkv (batch, n, 3, heads, dh) from dout (batch, n, heads, dh), through dprobs
// (batch, heads, n, n, a temporary): dP = dO V^T, dV = P^T dO, dS = softmax'(dP), dQ = dS K,
// dK = dS^T Q.
template <Backend B>
void attention_backward_unfused(S<B>* dqkv, S<B>* dprobs, const S<B>* dout, const S<B>* probs, const S<B>* qkv,
                                int batch, int heads, int n, int dh, S<B> scale) {
  using T = S<B>;
  const int D = heads * dh;
  const std::size_t sx = std::size_t(n) * 3 * D, sp = std::size_t(n) * n, so = std::size_t(n) * D;
  B::gemm_batched(false, true, n, n, dh, T(1), dout, D, so, dh, qkv + 2 * D, 3 * D, sx, dh, T(0), dprobs, n,
                  heads * sp, sp, batch, heads);
  B::gemm_batched(true, false, n, dh, n, T(1), probs, n, heads * sp, sp, dout, D, so, dh, T(0), dqkv + 2 * D, 3 * D,
                  sx, dh, batch, heads);
  B::softmax_backward(dprobs, dprobs, probs, batch * heads * n, n, scale);
  B::gemm_batched(false, false, n, dh, n, T(1), dprobs, n, heads * sp, sp, qkv + D, 3 * D, sx, dh, T(0), dqkv, 3 * D,
                  sx, dh, batch, heads);
  B::gemm_batched(true, false, n, dh, n, T(1), dprobs, n, heads * sp, sp, qkv, 3 * D, sx, dh, T(0), dqkv + D, 3 * D,
                  sx, dh, batch, heads);
}
template <Backend B>
void attention_backward(S<B>* dqkv, S<B>* dprobs, const S<B>* dout, const S<B>* probs, const S<B>* qkv, int batch,
                        int heads, int n, int dh, S<B> scale) {
  if constexpr (requires { B::attention_backward(dqkv, dprobs, dout, probs, qkv, batch, heads, n, dh, scale); })
    B::attention_backward(dqkv, dprobs, dout, probs, qkv, batch, heads, n, dh, scale);
  else
    attention_backward_unfused<B>(dqkv, dprobs, dout, probs, qkv, batch, heads, n, dh, scale);
}

}  // namespace hatch::fused
