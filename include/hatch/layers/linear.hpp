#pragma once
// Linear: y = x W^T + b over the last dimension; W is (Out, In) as in PyTorch.
#include <string>

#include "hatch/core/parameter.hpp"

namespace hatch {

template <Backend B, int In, int Out, bool Bias = true>
class LinearLayer {
 public:
  using backend = B;
  static constexpr int in = In, out = Out;

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
    const int rows = int(x.rows());
    B::gemm(false, true, rows, Out, In, 1, x.data(), In, weight.value.data(), In, 0, y_.data(), Out);
    if constexpr (Bias) B::add_bias_rows(y_.data(), bias.value.data(), rows, Out);
    return y_;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const int rows = int(dy.rows());
    if (wants_grad(weight, ctx))
      B::gemm(true, false, Out, In, rows, 1, dy.data(), Out, x_->data(), In, 1, weight.grad.data(), In);
    if constexpr (Bias)
      if (wants_grad(bias, ctx)) B::sum_rows(bias.grad.data(), dy.data(), rows, Out, Out, 1);
    if (ctx.input_grad) {
      dx_.resize(x_->shape());
      B::gemm(false, false, rows, In, Out, 1, dy.data(), Out, weight.value.data(), In, 0, dx_.data(), In);
    }
    return dx_;
  }
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "weight", weight);
    if constexpr (Bias) f(prefix + "bias", bias);
  }
  template <class F>
  void for_each_layer(F&& f) { f(*this); }

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
