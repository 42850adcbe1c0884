#pragma once
// Parameter: a value, its gradient, the flags the optimizer needs. The full (timm-style) name
// of a parameter is given by the path through which visit() reaches it.
#include <cmath>
#include <random>
#include <vector>

#include "hatch/tensor.hpp"

namespace hatch {

template <Backend B>
struct Parameter {
  Tensor<B> value, grad;
  bool decay = true;      // AdamW weight decay applies (false for norms, biases, tokens)
  bool trainable = true;  // false freezes it: backward skips its gradient, optimizers skip it
  // A table the model owns and several of its layers share (NAC's codes and signatures): a
  // module file may leave it out, and assembling from modules then keeps the model's own
  // (fresh) table (LoadOptions::keep_missing_shared).
  bool shared = false;

  Parameter() = default;
  Parameter(Shape s, bool decay_) : value(s), grad(s), decay(decay_) {
    value.zero();
    grad.zero();
  }
  void zero_grad() { grad.zero(); }
};

// The run-time mode of one forward/backward pass.
struct Context {
  bool training = false;     // dropout and drop-path are active
  bool param_grads = true;   // backward accumulates parameter gradients (false: frozen suffix)
  bool input_grad = true;    // backward must produce the gradient of its input
  std::uint64_t seed = 0;    // randomness of this pass: masks are drawn at (seed, counter)
  std::uint64_t counter = 0;
  std::uint64_t draw(std::uint64_t n) {
    const auto c = counter;
    counter += n;
    return c;
  }
};

template <Backend B>
bool wants_grad(const Parameter<B>& p, const Context& ctx) {
  return ctx.param_grads && p.trainable;
}

// Host-side initialisation as in timm's ViT: truncated normal for weights and embeddings.
struct Initializer {
  std::mt19937_64 rng;
  explicit Initializer(std::uint64_t seed) : rng(seed) {}

  template <Backend B>
  void trunc_normal(Parameter<B>& p, double stddev) {
    std::normal_distribution<double> nd(0.0, 1.0);
    std::vector<typename B::Scalar> h(static_cast<std::size_t>(p.value.numel()));
    for (auto& v : h) {
      double z;
      do z = nd(rng);
      while (std::abs(z) > 2.0);  // resample outside two standard deviations
      v = static_cast<typename B::Scalar>(z * stddev);
    }
    p.value.from_host(h);
  }
  template <Backend B>
  void constant(Parameter<B>& p, double v) {
    p.value.fill(static_cast<typename B::Scalar>(v));
  }
};

// Widths at a layer's boundary; kAnyWidth marks a layer that keeps whatever width it gets.
inline constexpr int kAnyWidth = -1;

}  // namespace hatch
