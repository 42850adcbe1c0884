#pragma once
// Parameter: a value, its gradient, the flags the optimizer needs. The full (timm-style) name
// of a parameter is given by the path through which visit() reaches it.
#include <cmath>
#include <random>
#include <type_traits>
#include <vector>

#include "hatch/core/grad_pool.hpp"
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
  // The pass's gradient pool (core/grad_pool.hpp); without one every layer keeps its own
  // gradient buffers. Type-erased: the pool is per backend, the Context is not.
  template <Backend B>
  void use(GradientPool<B>& pool) {
    grad_pool_ = &pool;
    grad_pool_backend_ = &GradientPool<B>::tag;
  }
  template <Backend B>
  GradientPool<B>* grad_pool() const {
    return grad_pool_backend_ == &GradientPool<B>::tag ? static_cast<GradientPool<B>*>(grad_pool_) : nullptr;
  }

  // Set by use(); public so that Context stays an aggregate (Context{.training = true}).
  void* grad_pool_ = nullptr;
  const void* grad_pool_backend_ = nullptr;
};

// The buffer for an input gradient or a backward temporary of shape s: the pass's pool's when it
// has one, else the layer's own tensor `own` (see core/grad_pool.hpp for who gives it back).
template <Backend B>
Tensor<B>& grad_buffer(const Context& ctx, Tensor<B>& own, const Shape& s) {
  if (auto* pool = ctx.grad_pool<B>()) return pool->acquire(s);
  own.resize(s);
  return own;
}

// Gives back a gradient the caller is done with (a child's returned gradient, the layer's own
// temporary) unless a tensor the caller still holds, `keep`, is it or a view into it (a backward
// may return its dy). Nothing happens without a pool or for a tensor that is not the pool's.
template <Backend B, class... Keep>
void release_grad(const Context& ctx, const Tensor<B>& g, const Keep&... keep) {
  static_assert((std::is_same_v<Keep, Tensor<B>> && ...));
  if (auto* pool = ctx.grad_pool<B>())
    if (!(GradientPool<B>::holds(g, keep) || ...)) pool->release(g);
}

// A gradient g that a child returned, writable in place: when it is a pool buffer that holds
// nothing of `other` (the caller's own dy). Null otherwise: the caller copies.
template <Backend B>
Tensor<B>* writable_grad(const Context& ctx, const Tensor<B>& g, const Tensor<B>& other) {
  auto* pool = ctx.grad_pool<B>();
  if (!pool || GradientPool<B>::holds(g, other) || GradientPool<B>::holds(other, g)) return nullptr;
  return pool->owned(g);
}

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
