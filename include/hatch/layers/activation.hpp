#pragma once
// Parameter-free layers that keep the width: GELU (exact, erf), Dropout, DropPath, and
// Elementwise<Fn>: any activation written as its maths only, e.g. SiLU below.
#include <string>
#include <vector>

#include "hatch/core/host_device.hpp"
#include "hatch/core/layer.hpp"
#include "hatch/core/parameter.hpp"

namespace hatch {

// ---- Elementwise<Fn>: a user-defined activation on every backend ------------------------------
// Fn gives the function and its derivative, as HATCH_HD templates over the scalar type (float on
// Cpu and Cuda, double on Cpu64), static or not:
//
//   struct SoftplusFn {
//     template <class T> HATCH_HD static T f(T x) { return hd::log1p(hd::exp(x)); }
//     template <class T> HATCH_HD static T df(T x) { return hd::sigmoid(x); }
//   };
//   using Softplus = Elementwise<SoftplusFn>;          // a spec, like Gelu
//
// Forward is B::map(y, x, f); backward is B::map_binary(dx, dy, x, dy * df(x)), so the same Fn
// runs in an OpenMP loop on Cpu and in a CUDA kernel on Cuda (Fn must then be a namespace-scope
// type, not one defined inside a function). A layer holds an Fn object (fn()), so Fn may carry
// parameters, e.g. a leaky slope set after construction.
namespace detail {
template <class Fn>
struct ApplyF {
  Fn fn;
  template <class T> HATCH_HD T operator()(T x) const { return fn.f(x); }
};
template <class Fn>
struct ApplyDf {
  Fn fn;
  template <class T> HATCH_HD T operator()(T dy, T x) const { return dy * fn.df(x); }
};
}  // namespace detail

template <Backend B, class Fn>
class ElementwiseLayer : public ParameterFreeLayer<ElementwiseLayer<B, Fn>, B> {
 public:
  const Tensor<B>& forward(const Tensor<B>& x, Context&) {
    x_ = &x;
    y_.resize(x.shape());
    B::map(y_.data(), x.data(), std::size_t(x.numel()), detail::ApplyF<Fn>{fn_});
    return y_;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    HATCH_CHECK(dy.shape() == x_->shape(), "Elementwise::backward",
                "expected shape " + x_->shape().str() + ", got " + dy.shape().str() + " (gradient of the output)");
    Tensor<B>& dx = grad_buffer(ctx, dx_, x_->shape());
    B::map_binary(dx.data(), dy.data(), x_->data(), std::size_t(dy.numel()), detail::ApplyDf<Fn>{fn_});
    return dx;
  }
  Fn& fn() { return fn_; }
  const Fn& fn() const { return fn_; }

 private:
  Fn fn_{};
  const Tensor<B>* x_ = nullptr;
  Tensor<B> y_, dx_;
};

template <class Fn>
struct Elementwise {
  static constexpr int in = kAnyWidth, out = kAnyWidth;
  template <Backend B> using bind = ElementwiseLayer<B, Fn>;
};

// SiLU (swish): x sigmoid(x), as in torch.nn.SiLU.
struct SiluFn {
  template <class T> HATCH_HD static T f(T x) { return x * hd::sigmoid(x); }
  template <class T> HATCH_HD static T df(T x) {
    const T s = hd::sigmoid(x);
    return s * (T(1) + x * (T(1) - s));
  }
};
using Silu = Elementwise<SiluFn>;
template <Backend B> using SiluLayer = ElementwiseLayer<B, SiluFn>;

template <Backend B>
class GeluLayer : public ParameterFreeLayer<GeluLayer<B>, B> {
 public:
  const Tensor<B>& forward(const Tensor<B>& x, Context&) {
    x_ = &x;
    y_.resize(x.shape());
    B::gelu_forward(y_.data(), x.data(), x.numel());
    return y_;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    Tensor<B>& dx = grad_buffer(ctx, dx_, x_->shape());
    B::gelu_backward(dx.data(), dy.data(), x_->data(), dy.numel());
    return dx;
  }

 private:
  const Tensor<B>* x_ = nullptr;
  Tensor<B> y_, dx_;
};

// Element-wise dropout with rate p (scaled by 1/(1-p) in training, identity in evaluation).
// PerSample = true is DropPath (stochastic depth): one keep/drop decision per sample.
template <Backend B, bool PerSample>
class DropLayer : public ParameterFreeLayer<DropLayer<B, PerSample>, B> {
 public:
  using T = typename B::Scalar;
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
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    if (!active_) return dy;
    Tensor<B>& dx = grad_buffer(ctx, dx_, dy.shape());
    if constexpr (PerSample)
      B::scale_rows(dx.data(), dy.data(), mask_.data(), int(mask_.numel()), int(dy.numel() / mask_.numel()));
    else
      B::mul(dx.data(), dy.data(), mask_.data(), dy.numel());
    return dx;
  }

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
