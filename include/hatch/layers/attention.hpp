#pragma once
// Multi-head self-attention with a fused qkv projection (timm's Attention).
// Heads are read in place from the (B, N, 3, H, dh) qkv buffer and written in place into the
// (B, N, H, dh) output (fused::attention_forward/backward: two-level batched GEMMs, or a
// backend's one pass over the heads), so no permute is ever materialised.
#include <cmath>
#include <string>

#include "hatch/backend/fused.hpp"
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
    probs_.resize({batch_, Heads, n_, n_});
    heads_.resize(x.shape());
    fused::attention_forward<B>(probs_.data(), heads_.data(), q.data(), batch_, Heads, n_, head_dim, scale());
    return proj.forward(heads_, ctx);
  }

  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const Tensor<B>& dheads = backward_inner(proj, dy, ctx);
    Tensor<B>& dprobs = grad_buffer(ctx, dprobs_, probs_.shape());
    Tensor<B>& dqkv = grad_buffer(ctx, dqkv_, Shape{batch_, n_, 3 * D});
    fused::attention_backward<B>(dqkv.data(), dprobs.data(), dheads.data(), probs_.data(), qkv_out().data(), batch_,
                                 Heads, n_, head_dim, scale());
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
