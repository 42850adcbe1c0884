#pragma once
// GradientPool: the backward pass's gradient buffers, shared between layers.
//
// A gradient lives from the backward that writes it to the backward that reads it; an
// attention's dscores or an MLP's dhidden, only inside one layer's backward. Yet a layer that
// owns its gradient buffers keeps them for the whole run: eight vit-small blocks held about
// 160 MiB of them at batch 128, of which a few MiB are alive at any moment. With a pool attached
// to the pass's Context (`ctx.use(pool)`), layers take those buffers from the pool and whoever is
// done with one gives it back, so the blocks share a handful of buffers.
//
//   GradientPool<Cpu> pool;                        // lives as long as the training loop
//   for (each step) {
//     Context ctx; ctx.training = true; ctx.use(pool);
//     model.forward(x, ctx); ... model.backward(dlogits, ctx); optimizer.step(lr);
//     pool.release_all();                          // the step's gradients are dead
//   }
//
// The contract, for a layer (core/parameter.hpp has the helpers):
//  - `grad_buffer(ctx, own, shape)` gives the buffer for an input gradient or a backward
//    temporary: the pool's when the pass has one, else the layer's own tensor `own` (a pass
//    without a pool runs exactly as before).
//  - A gradient that backward returns belongs to its caller. A composite gives it back with
//    `release_grad(ctx, g, keep...)` once the next child's backward has read it (Sequential,
//    Repeat), or adds into it in place and returns it (Residual). A layer gives back its own
//    temporaries before it returns. It never gives back its dy (its caller's).
//  - A backward may return its dy, or a view of it (Reshape; an inactive DropPath): release_grad
//    keeps a buffer that one of `keep` points into, so callers name what they still hold.
//  - A buffer nobody gives back stays taken until release_all(), which the pool's owner calls
//    after each step (fit does). A layer that never releases only takes more buffers; it is never
//    wrong. Only an early release is wrong: `poison_released(true)` (the gradient checks turn it
//    on) fills every released buffer with NaN, so that a read after release shows.
// Buffers only grow, and acquire takes the first free one: the same step takes the same buffers
// in the same order every time, so after the first step no step allocates (tests/test_alloc.cpp).
#include <algorithm>
#include <cstddef>
#include <limits>
#include <memory>
#include <vector>

#include "hatch/tensor.hpp"

namespace hatch {

template <Backend B>
class GradientPool {
 public:
  using T = typename B::Scalar;
  static constexpr char tag = 0;  // its address names the backend in a type-erased Context

  GradientPool() = default;
  GradientPool(const GradientPool&) = delete;
  GradientPool& operator=(const GradientPool&) = delete;

  // The first free buffer, resized to s (it grows, never shrinks); a new one when none is free.
  Tensor<B>& acquire(const Shape& s) {
    std::size_t i = 0;
    while (i < busy_.size() && busy_[i]) ++i;
    if (i == busy_.size()) {
      buffers_.push_back(std::make_unique<Tensor<B>>());
      busy_.push_back(0);
    }
    busy_[i] = 1;
    buffers_[i]->resize(s);
    return *buffers_[i];
  }
  // The pool's buffer t, writable, when t is one of the pool's taken buffers; else null.
  Tensor<B>* owned(const Tensor<B>& t) {
    const int i = index_of(t);
    return i >= 0 && busy_[std::size_t(i)] ? buffers_[std::size_t(i)].get() : nullptr;
  }
  // Gives t back. Nothing happens when t is not the pool's (a layer's own buffer, a view).
  void release(const Tensor<B>& t) {
    const int i = index_of(t);
    if (i < 0 || !busy_[std::size_t(i)]) return;
    busy_[std::size_t(i)] = 0;
    if (poison_ && buffers_[std::size_t(i)]->capacity())
      B::fill(buffers_[std::size_t(i)]->data(), buffers_[std::size_t(i)]->capacity(), std::numeric_limits<T>::quiet_NaN());
  }
  void release_all() {
    for (auto& b : buffers_) release(*b);
  }
  // Whether t's elements lie in buffer g's allocation (t is g, or a view into it).
  static bool holds(const Tensor<B>& g, const Tensor<B>& t) {
    return t.data() && g.data() && t.data() >= g.data() && t.data() < g.data() + std::max<std::size_t>(g.capacity(), 1);
  }
  void poison_released(bool on) { poison_ = on; }

  std::size_t buffers() const { return buffers_.size(); }
  std::size_t in_use() const {
    std::size_t n = 0;
    for (char b : busy_) n += b != 0;
    return n;
  }
  std::size_t bytes() const {
    std::size_t n = 0;
    for (const auto& b : buffers_) n += b->capacity() * sizeof(T);
    return n;
  }

 private:
  int index_of(const Tensor<B>& t) const {
    for (std::size_t i = 0; i < buffers_.size(); ++i)
      if (buffers_[i].get() == &t) return int(i);
    return -1;
  }
  std::vector<std::unique_ptr<Tensor<B>>> buffers_;  // stable addresses: layers return references
  std::vector<char> busy_;
  bool poison_ = false;
};

}  // namespace hatch
