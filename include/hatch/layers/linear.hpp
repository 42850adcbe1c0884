#pragma once
// Linear: y = x W^T + b over the last dimension; W is (Out, In) as in PyTorch.
#include <string>

#include "hatch/backend/fused.hpp"
#include "hatch/core/layer.hpp"
#include "hatch/core/parameter.hpp"

namespace hatch {

template <Backend B, int In, int Out, bool Bias = true>
class LinearLayer : public LeafLayer<LinearLayer<B, In, Out, Bias>, B, In, Out> {
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
    fused::linear_forward<B>(y_.data(), x.data(), weight.value.data(), Bias ? bias.value.data() : nullptr,
                             int(x.rows()), In, Out);
    return y_;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const int rows = int(dy.rows());
    typename B::Scalar* dbias = nullptr;
    if constexpr (Bias)
      if (wants_grad(bias, ctx)) dbias = bias.grad.data();
    Tensor<B>* dx = ctx.input_grad ? &grad_buffer(ctx, dx_, x_->shape()) : nullptr;
    fused::linear_backward<B>(dx ? dx->data() : nullptr, wants_grad(weight, ctx) ? weight.grad.data() : nullptr, dbias,
                              dy.data(), x_->data(), weight.value.data(), rows, In, Out);
    return dx ? *dx : dx_;
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
};

template <int In, int Out, bool Bias = true>
struct Linear {
  static constexpr int in = In, out = Out;
  template <Backend B> using bind = LinearLayer<B, In, Out, Bias>;
};

}  // namespace hatch
