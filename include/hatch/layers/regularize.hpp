#pragma once
// ActivationPenalty<Weight>: an L2 penalty on the activations that pass through it, the
// smallest layer with an auxiliary loss (core/aux_loss.hpp) and the guide's example of one.
//
// The output is the input, unchanged. In a training forward the layer computes
//   aux = Weight * sum(x^2) / N          (N = x.dim(0), the batch: a mean over samples)
// and reports it through aux_loss(); fit adds it to the training loss. Backward passes
//   dx = dy + 2 Weight x / N
// i.e. it adds the term's gradient, which then reaches every trainable parameter before the
// layer, but only when ctx.param_grads is set: in a frozen part of a model the layer adds no
// gradient (and collect_aux_loss, through FrozenExcept, does not count its term). An
// evaluation forward (ctx.training false) computes nothing and reports 0.
//
//   using Net = Sequential<Flatten<784>, Linear<784, 64>, Gelu, ActivationPenalty<1e-3>, Linear<64, 10>>;
#include <string>

#include "hatch/core/error.hpp"
#include "hatch/core/layer.hpp"
#include "hatch/core/parameter.hpp"

namespace hatch {

template <Backend B, double Weight>
class ActivationPenaltyLayer : public ParameterFreeLayer<ActivationPenaltyLayer<B, Weight>, B> {
 public:
  using T = typename B::Scalar;
  static constexpr double weight = Weight;

  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    x_ = &x;
    active_ = ctx.training && Weight != 0 && x.numel() > 0;
    aux_ = active_ ? Weight * double(B::sum_squares(x.data(), std::size_t(x.numel()))) / double(x.dim(0)) : 0.0;
    return x;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    if (!active_ || !ctx.param_grads || !ctx.input_grad) return dy;  // frozen, or nowhere to go
    HATCH_CHECK(dy.shape() == x_->shape(), "ActivationPenalty::backward",
                "expected shape " + x_->shape().str() + ", got " + dy.shape().str() + " (gradient of the output)");
    Tensor<B>& dx = grad_buffer(ctx, dx_, dy.shape());
    B::copy(dx.data(), dy.data(), std::size_t(dy.numel()));
    B::axpy(dx.data(), T(2 * Weight / double(x_->dim(0))), x_->data(), std::size_t(dy.numel()));
    return dx;
  }
  // The penalty of the last training forward, weighted; 0 after an evaluation forward.
  double aux_loss() const { return aux_; }

 private:
  const Tensor<B>* x_ = nullptr;
  bool active_ = false;
  double aux_ = 0;
  Tensor<B> dx_;
};

template <double Weight>
struct ActivationPenalty {
  static_assert(Weight >= 0, "hatch::ActivationPenalty<Weight>: the weight must not be negative");
  static constexpr int in = kAnyWidth, out = kAnyWidth;
  template <Backend B> using bind = ActivationPenaltyLayer<B, Weight>;
};

}  // namespace hatch
