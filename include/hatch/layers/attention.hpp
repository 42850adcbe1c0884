#pragma once
// Multi-head self-attention with a fused qkv projection (timm's Attention).
// Heads are read in place from the (B, N, 3, H, dh) qkv buffer and written in place into the
// (B, N, H, dh) output: the two-level batched GEMM makes every permute unnecessary. The core
// softmax(scale Q K^T) V is fused::attention_forward/backward (backend/fused.hpp): two batched
// GEMMs and a softmax keeping the probabilities, or a backend's fused kernels (Cuda).
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
    saved_.resize({std::int64_t(fused::attention_saved_size<B>(batch_, Heads, n_, head_dim))});
    heads_.resize(x.shape());
    fused::attention_forward<B>(heads_.data(), saved_.data(), q.data(), batch_, n_, Heads, head_dim, scale());
    return proj.forward(heads_, ctx);
  }

  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const Tensor<B>& dheads = backward_inner(proj, dy, ctx);
    Tensor<B>& scratch =
        grad_buffer(ctx, scratch_, Shape{std::int64_t(fused::attention_scratch_size<B>(batch_, Heads, n_, head_dim))});
    Tensor<B>& dqkv = grad_buffer(ctx, dqkv_, Shape{batch_, n_, 3 * D});
    fused::attention_backward<B>(dqkv.data(), scratch.data(), dheads.data(), qkv_out().data(), heads_.data(),
                                 saved_.data(), batch_, n_, Heads, head_dim, scale());
    release_grad(ctx, scratch);
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
  Tensor<B> saved_, heads_, scratch_, dqkv_;  // saved_: the probabilities, or what a fused backend keeps
};

template <int D, int Heads, bool QkvBias = true>
struct Attention {
  static constexpr int in = D, out = D;
  template <Backend B> using bind = AttentionLayer<B, D, Heads, QkvBias>;
};

}  // namespace hatch
