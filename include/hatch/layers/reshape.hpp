#pragma once
// Flatten and Reshape: a new shape over the same elements, without a copy. Forward returns a
// view of its input (Tensor::view_of) and backward a view of the output gradient, so neither
// moves data nor allocates. The leading (batch) dimension is kept.
#include <array>
#include <cstdint>
#include <string>

#include "hatch/core/layer.hpp"
#include "hatch/core/parameter.hpp"

namespace hatch {

// Flatten<Width>: (N, d1, ..., dk) -> (N, Width) with Width = d1 ... dk, as
// torch.nn.Flatten(start_dim=1). The width is part of the type, as Linear's are, so Sequential
// checks the next layer at compile time (a width-less Flatten would read as width-keeping to
// those checks); forward checks it against the input at run time.
template <Backend B, int Width>
class FlattenLayer : public ParameterFreeLayer<FlattenLayer<B, Width>, B, kAnyWidth, Width> {
  static_assert(Width > 0, "hatch::Flatten<Width>: give the flattened width d1 * ... * dk, e.g. Flatten<28 * 28>");

 public:
  const Tensor<B>& forward(const Tensor<B>& x, Context&) {
    HATCH_CHECK(x.shape().rank >= 1, "Flatten", "expects a tensor with a batch dimension, got shape " + x.shape().str());
    in_shape_ = x.shape();
    const std::int64_t n = x.dim(0);
    const std::int64_t w = n ? x.numel() / n : 0;
    HATCH_CHECK(w == Width, "Flatten<" + std::to_string(Width) + ">",
                "input " + x.shape().str() + " flattens to width " + std::to_string(w));
    y_.view_of(x, Shape{n, w});
    return y_;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context&) {
    dx_.view_of(dy, in_shape_);
    return dx_;
  }

 private:
  Shape in_shape_;
  Tensor<B> y_, dx_;  // views
};

// Reshape<D1, ..., Dk>: (N, ...) -> (N, D1, ..., Dk) with N = elements / (D1 ... Dk), as
// x.reshape(-1, D1, ..., Dk). Its output width is Dk.
template <Backend B, int... Dims>
class ReshapeLayer
    : public ParameterFreeLayer<ReshapeLayer<B, Dims...>, B, kAnyWidth, std::array<int, sizeof...(Dims)>{Dims...}.back()> {
  static_assert(sizeof...(Dims) >= 1 && sizeof...(Dims) < Shape::kMaxRank,
                "hatch::Reshape<D1, ..., Dk>: give 1 to 4 dimensions per sample (the batch dimension is kept)");
  static_assert(((Dims > 0) && ...), "hatch::Reshape<D1, ..., Dk>: every dimension must be positive");

 public:
  static constexpr std::int64_t sample = (std::int64_t(1) * ... * Dims);
  const Tensor<B>& forward(const Tensor<B>& x, Context&) {
    HATCH_CHECK(x.numel() % sample == 0, "Reshape",
                "input " + x.shape().str() + " has " + std::to_string(x.numel()) + " elements, not a multiple of " +
                    std::to_string(sample) + " (the per-sample shape's size)");
    in_shape_ = x.shape();
    y_.view_of(x, Shape{x.numel() / sample, std::int64_t(Dims)...});
    return y_;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context&) {
    dx_.view_of(dy, in_shape_);
    return dx_;
  }

 private:
  Shape in_shape_;
  Tensor<B> y_, dx_;  // views
};

template <int Width>
struct Flatten {
  static constexpr int in = kAnyWidth, out = Width;
  template <Backend B> using bind = FlattenLayer<B, Width>;
};
template <int... Dims>
struct Reshape {
  static constexpr int in = kAnyWidth, out = std::array<int, sizeof...(Dims)>{Dims...}.back();
  template <Backend B> using bind = ReshapeLayer<B, Dims...>;
};

}  // namespace hatch
