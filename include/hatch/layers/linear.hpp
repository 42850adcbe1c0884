#pragma once
// Linear: y = x W^T + b over the last dimension; W is (Out, In) as in PyTorch.
// LinearGelu: y = GELU(x W^T + b), one layer so that a backend may fuse the activation into the
// GEMM's pass over its output (fused::linear_gelu_forward) and its derivative into the weight
// gradient's (fused::gelu_linear_backward_params); the MLP's fc1. Parameters as Linear's.
#include <string>

#include "hatch/backend/fused.hpp"
#include "hatch/core/layer.hpp"
#include "hatch/core/parameter.hpp"

namespace hatch {

template <Backend B, int In, int Out, bool Bias = true, bool GeluOut = false>
class LinearLayer : public LeafLayer<LinearLayer<B, In, Out, Bias, GeluOut>, B, In, Out> {
 public:
  LinearLayer() : weight({Out, In}, true) {
    if constexpr (Bias) bias = Parameter<B>({Out}, false);
  }
  void reset_parameters(Initializer& init) {
    init.trunc_normal(weight, 0.02);
    if constexpr (Bias) bias.value.zero();
  }

  const Tensor<B>& forward(const Tensor<B>& x, Context&) {
    HATCH_CHECK(x.cols() == In, "Linear", "input width " + std::to_string(x.cols()) + ", expected " + std::to_string(In));
    x_ = &x;
    Shape s = x.shape();
    s.dims[s.rank - 1] = Out;
    y_.resize(s);
    const auto* b = Bias ? bias.value.data() : nullptr;
    if constexpr (GeluOut) {
      pre_.resize(s);
      fused::linear_gelu_forward<B>(pre_.data(), y_.data(), x.data(), weight.value.data(), b, int(x.rows()), In, Out);
    } else {
      fused::linear_forward<B>(y_.data(), x.data(), weight.value.data(), b, int(x.rows()), In, Out);
    }
    return y_;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const int rows = int(dy.rows());
    typename B::Scalar* dbias = nullptr;
    if constexpr (Bias)
      if (wants_grad(bias, ctx)) dbias = bias.grad.data();
    typename B::Scalar* dw = wants_grad(weight, ctx) ? weight.grad.data() : nullptr;
    // The gradient at the GEMM's output: dy itself, or with GELU dy * GELU'(pre), a temporary
    const Tensor<B>* dout = &dy;
    if constexpr (GeluOut) {
      if (!dw && !dbias && !ctx.input_grad) return dx_;
      Tensor<B>& dpre = grad_buffer(ctx, dpre_, dy.shape());
      fused::gelu_linear_backward_params<B>(dpre.data(), dw, dbias, dy.data(), pre_.data(), x_->data(), rows, In, Out);
      dout = &dpre;
    } else {
      fused::linear_backward_params<B>(dw, dbias, dy.data(), x_->data(), rows, In, Out);
    }
    if (!ctx.input_grad) {
      if constexpr (GeluOut) release_grad(ctx, *dout);
      return dx_;
    }
    Tensor<B>& dx = grad_buffer(ctx, dx_, x_->shape());
    B::gemm(false, false, rows, In, Out, 1, dout->data(), Out, weight.value.data(), In, 0, dx.data(), In);
    if constexpr (GeluOut) release_grad(ctx, *dout);
    return dx;
  }
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "weight", weight);
    if constexpr (Bias) f(prefix + "bias", bias);
  }
  const Tensor<B>& output() const { return y_; }

  Parameter<B> weight, bias;

 private:
  const Tensor<B>* x_ = nullptr;  // the input is owned by the previous layer and outlives backward
  Tensor<B> y_, dx_;
  Tensor<B> pre_, dpre_;  // GeluOut: the pre-activation, and the gradient at it (without a pool)
};

template <int In, int Out, bool Bias = true>
struct Linear {
  static constexpr int in = In, out = Out;
  template <Backend B> using bind = LinearLayer<B, In, Out, Bias>;
};

template <int In, int Out, bool Bias = true>
struct LinearGelu {
  static constexpr int in = In, out = Out;
  template <Backend B> using bind = LinearLayer<B, In, Out, Bias, true>;
};

}  // namespace hatch
