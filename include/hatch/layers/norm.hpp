#pragma once
// LayerNorm over the last dimension (eps 1e-6 as in timm's ViT).
#include <string>

#include "hatch/core/layer.hpp"
#include "hatch/core/parameter.hpp"

namespace hatch {

template <Backend B, int D>
class LayerNormLayer : public LeafLayer<LayerNormLayer<B, D>, B, D, D> {
 public:
  using T = typename B::Scalar;
  static constexpr double eps = 1e-6;

  LayerNormLayer() : weight({D}, false), bias({D}, false) { weight.value.fill(T(1)); }
  void reset_parameters(Initializer& init) {
    init.constant(weight, 1.0);
    init.constant(bias, 0.0);
  }

  const Tensor<B>& forward(const Tensor<B>& x, Context&) {
    HATCH_CHECK(x.cols() == D, "LayerNorm", "input width " + std::to_string(x.cols()) + ", expected " + std::to_string(D));
    x_ = &x;
    y_.resize(x.shape());
    mean_.resize({x.rows()});
    rstd_.resize({x.rows()});
    B::layer_norm_forward(y_.data(), mean_.data(), rstd_.data(), x.data(), weight.value.data(),
                          bias.value.data(), int(x.rows()), D, T(eps));
    return y_;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const bool pg = wants_grad(weight, ctx) || wants_grad(bias, ctx);
    Tensor<B>& dx = ctx.input_grad ? grad_buffer(ctx, dx_, x_->shape()) : dx_;
    if (pg && !(wants_grad(weight, ctx) && wants_grad(bias, ctx))) {
      // One of the two frozen: compute both into scratch and keep the trainable one.
      scratch_g_.resize({D});
      scratch_b_.resize({D});
      scratch_g_.zero();
      scratch_b_.zero();
    }
    T* dg = !pg ? nullptr : wants_grad(weight, ctx) ? weight.grad.data() : scratch_g_.data();
    T* db = !pg ? nullptr : wants_grad(bias, ctx) ? bias.grad.data() : scratch_b_.data();
    B::layer_norm_backward(ctx.input_grad ? dx.data() : nullptr, dg, db, dy.data(), x_->data(),
                           mean_.data(), rstd_.data(), weight.value.data(), int(dy.rows()), D);
    return dx;
  }
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "weight", weight);
    f(prefix + "bias", bias);
  }
  Parameter<B> weight, bias;

 private:
  const Tensor<B>* x_ = nullptr;
  Tensor<B> y_, dx_, mean_, rstd_, scratch_g_, scratch_b_;
};

template <int D>
struct LayerNorm {
  static constexpr int in = D, out = D;
  template <Backend B> using bind = LayerNormLayer<B, D>;
};

}  // namespace hatch
