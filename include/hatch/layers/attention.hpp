#pragma once
// Multi-head self-attention with a fused qkv projection (timm's Attention).
// Heads are read in place from the (B, N, 3, H, dh) qkv buffer and written in place into the
// (B, N, H, dh) output: the two-level batched GEMM makes every permute unnecessary.
#include <cmath>
#include <string>

#include "hatch/core/layer.hpp"
#include "hatch/layers/linear.hpp"

namespace hatch {

template <Backend B, int D, int Heads, bool QkvBias = true>
class AttentionLayer : public LeafLayer<AttentionLayer<B, D, Heads, QkvBias>, B, D, D> {
  static_assert(D % Heads == 0, "hatch::Attention: the width must be divisible by the number of heads");

 public:
  using T = typename B::Scalar;
  static constexpr int head_dim = D / Heads;

  void reset_parameters(Initializer& init) {
    qkv.reset_parameters(init);
    proj.reset_parameters(init);
  }

  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    HATCH_CHECK(x.shape().rank == 3, "Attention", "expected tokens (batch, tokens, width), got " + x.shape().str());
    batch_ = int(x.dim(0));
    n_ = int(x.dim(1));
    const Tensor<B>& q = qkv.forward(x, ctx);
    const T* base = q.data();
    probs_.resize({batch_, Heads, n_, n_});
    heads_.resize(x.shape());
    const std::size_t sx = std::size_t(n_) * 3 * D, sp = std::size_t(n_) * n_, so = std::size_t(n_) * D;
    // scores = Q K^T (scaled inside the softmax)
    B::gemm_batched(false, true, n_, n_, head_dim, T(1), base, 3 * D, sx, head_dim, base + D, 3 * D, sx,
                    head_dim, T(0), probs_.data(), n_, Heads * sp, sp, batch_, Heads);
    B::softmax_forward(probs_.data(), probs_.data(), batch_ * Heads * n_, n_, scale());
    B::gemm_batched(false, false, n_, head_dim, n_, T(1), probs_.data(), n_, Heads * sp, sp, base + 2 * D,
                    3 * D, sx, head_dim, T(0), heads_.data(), D, so, head_dim, batch_, Heads);
    return proj.forward(heads_, ctx);
  }

  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const Tensor<B>& dheads = backward_inner(proj, dy, ctx);
    const T* base = qkv_out().data();
    Tensor<B>& dprobs = grad_buffer(ctx, dprobs_, probs_.shape());
    Tensor<B>& dqkv = grad_buffer(ctx, dqkv_, Shape{batch_, n_, 3 * D});
    const std::size_t sx = std::size_t(n_) * 3 * D, sp = std::size_t(n_) * n_, so = std::size_t(n_) * D;
    // dP = dO V^T ; dV = P^T dO
    B::gemm_batched(false, true, n_, n_, head_dim, T(1), dheads.data(), D, so, head_dim, base + 2 * D, 3 * D,
                    sx, head_dim, T(0), dprobs.data(), n_, Heads * sp, sp, batch_, Heads);
    B::gemm_batched(true, false, n_, head_dim, n_, T(1), probs_.data(), n_, Heads * sp, sp, dheads.data(), D,
                    so, head_dim, T(0), dqkv.data() + 2 * D, 3 * D, sx, head_dim, batch_, Heads);
    B::softmax_backward(dprobs.data(), dprobs.data(), probs_.data(), batch_ * Heads * n_, n_, scale());
    // dQ = dS K ; dK = dS^T Q
    B::gemm_batched(false, false, n_, head_dim, n_, T(1), dprobs.data(), n_, Heads * sp, sp, base + D, 3 * D,
                    sx, head_dim, T(0), dqkv.data(), 3 * D, sx, head_dim, batch_, Heads);
    B::gemm_batched(true, false, n_, head_dim, n_, T(1), dprobs.data(), n_, Heads * sp, sp, base, 3 * D, sx,
                    head_dim, T(0), dqkv.data() + D, 3 * D, sx, head_dim, batch_, Heads);
    release_grad(ctx, dprobs);
    release_grad(ctx, dheads, dy);
    const Tensor<B>& dx = qkv.backward(dqkv, ctx);
    release_grad(ctx, dqkv);
    return dx;
  }

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    qkv.visit(f, prefix + "qkv.");
    proj.visit(f, prefix + "proj.");
  }
  LinearLayer<B, D, 3 * D, QkvBias> qkv;
  LinearLayer<B, D, D> proj;

 private:
  static T scale() { return T(1) / std::sqrt(T(head_dim)); }
  const Tensor<B>& qkv_out() const { return qkv.output(); }  // forward's q, k, v, kept by qkv
  int batch_ = 0, n_ = 0;
  Tensor<B> probs_, heads_, dprobs_, dqkv_;
};

template <int D, int Heads, bool QkvBias = true>
struct Attention {
  static constexpr int in = D, out = D;
  template <Backend B> using bind = AttentionLayer<B, D, Heads, QkvBias>;
};

}  // namespace hatch
