#pragma once
// Parameter-free layers that keep the width: GELU (exact, erf), Dropout, DropPath.
#include <string>
#include <vector>

#include "hatch/core/parameter.hpp"

namespace hatch {

template <Backend B>
class GeluLayer {
 public:
  using backend = B;
  static constexpr int in = kAnyWidth, out = kAnyWidth;
  void reset_parameters(Initializer&) {}
  const Tensor<B>& forward(const Tensor<B>& x, Context&) {
    x_ = &x;
    y_.resize(x.shape());
    B::gelu_forward(y_.data(), x.data(), x.numel());
    return y_;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context&) {
    dx_.resize(x_->shape());
    B::gelu_backward(dx_.data(), dy.data(), x_->data(), dy.numel());
    return dx_;
  }
  template <class F> void visit(F&&, const std::string&) {}
  template <class F> void for_each_layer(F&& f) { f(*this); }

 private:
  const Tensor<B>* x_ = nullptr;
  Tensor<B> y_, dx_;
};

// Element-wise dropout with rate p (scaled by 1/(1-p) in training, identity in evaluation).
// PerSample = true is DropPath (stochastic depth): one keep/drop decision per sample.
template <Backend B, bool PerSample>
class DropLayer {
 public:
  using backend = B;
  using T = typename B::Scalar;
  static constexpr int in = kAnyWidth, out = kAnyWidth;
  void reset_parameters(Initializer&) {}
  void set_rate(double p) {
    HATCH_CHECK(p >= 0 && p < 1, PerSample ? "DropPath" : "Dropout", "rate must be in [0, 1), got " + std::to_string(p));
    rate_ = p;
  }
  double rate() const { return rate_; }

  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    active_ = ctx.training && rate_ > 0;
    if (!active_) return x;
    y_.resize(x.shape());
    const std::int64_t groups = PerSample ? x.dim(0) : x.numel();
    mask_.resize({groups});
    B::bernoulli_mask(mask_.data(), groups, T(1 - rate_), ctx.seed, ctx.draw(groups));
    if constexpr (PerSample)
      B::scale_rows(y_.data(), x.data(), mask_.data(), int(groups), int(x.numel() / groups));
    else
      B::mul(y_.data(), x.data(), mask_.data(), x.numel());
    return y_;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context&) {
    if (!active_) return dy;
    dx_.resize(dy.shape());
    if constexpr (PerSample)
      B::scale_rows(dx_.data(), dy.data(), mask_.data(), int(mask_.numel()), int(dy.numel() / mask_.numel()));
    else
      B::mul(dx_.data(), dy.data(), mask_.data(), dy.numel());
    return dx_;
  }
  template <class F> void visit(F&&, const std::string&) {}
  template <class F> void for_each_layer(F&& f) { f(*this); }

 private:
  double rate_ = 0;
  bool active_ = false;
  Tensor<B> y_, dx_, mask_;
};

template <Backend B> using DropoutLayer = DropLayer<B, false>;
template <Backend B> using DropPathLayer = DropLayer<B, true>;

struct Gelu {
  static constexpr int in = kAnyWidth, out = kAnyWidth;
  template <Backend B> using bind = GeluLayer<B>;
};
struct Dropout {
  static constexpr int in = kAnyWidth, out = kAnyWidth;
  template <Backend B> using bind = DropoutLayer<B>;
};
struct DropPath {
  static constexpr int in = kAnyWidth, out = kAnyWidth;
  template <Backend B> using bind = DropPathLayer<B>;
};

}  // namespace hatch
