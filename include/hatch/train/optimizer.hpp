#pragma once
// Optimizers over the trainable parameters of a model (collected once, by visit), gradient
// clipping by global norm, freezing, and the warmup + cosine schedule.
//
// An optimizer is built either over a parameter list (one update call per parameter) or over a
// ParameterArena (core/arena.hpp): then its moments share the arena's layout and a step is one
// update call per segment (decayed, not decayed), whatever the number of parameters. Both
// expose the same state names (exp_avg.<name>, ...), so checkpoints do not tell them apart.
#include <cmath>
#include <functional>
#include <map>
#include <numbers>
#include <string>
#include <vector>

#include "hatch/backend/fused.hpp"
#include "hatch/core/error.hpp"
#include "hatch/core/arena.hpp"
#include "hatch/core/parameter.hpp"

namespace hatch {

// The trainable parameters of a model, in visit order, with their full names (checked unique).
template <class M>
auto trainable_parameters(M& model) {
  using B = typename M::backend;
  require_unique_parameter_names(model);
  std::vector<ParamRef<B>> out;
  model.visit([&](const std::string& n, Parameter<B>& p) {
    if (p.trainable) out.push_back({n, &p});
  }, "");
  return out;
}

// Freezing a sub-module: its parameters keep their values and get no gradients.
template <class M>
void set_trainable(M& part, bool trainable) {
  part.visit([&](const std::string&, Parameter<typename M::backend>& p) { p.trainable = trainable; }, "");
}

template <Backend B>
void zero_grads(const std::vector<ParamRef<B>>& params) {
  for (auto& r : params) r.param->zero_grad();
}

template <Backend B>
double global_grad_norm(const std::vector<ParamRef<B>>& params) {
  double s = 0;
  for (auto& r : params) s += B::sum_squares(r.param->grad.data(), r.param->grad.numel());
  return std::sqrt(s);
}

// Scales all gradients so their global L2 norm is at most max_norm; returns the norm before.
template <Backend B>
double clip_grad_norm(const std::vector<ParamRef<B>>& params, double max_norm) {
  const double norm = global_grad_norm(params), f = clip_factor(norm, max_norm);
  if (f != 1.0)
    for (auto& r : params) B::scale(r.param->grad.data(), typename B::Scalar(f), r.param->grad.numel());
  return norm;
}

// The same over an arena: one reduction, one scale.
template <Backend B>
void zero_grads(ParameterArena<B>& arena) {
  arena.zero_grad();
}
template <Backend B>
double global_grad_norm(const ParameterArena<B>& arena) {
  return arena.grad_norm();
}
template <Backend B>
double clip_grad_norm(ParameterArena<B>& arena, double max_norm) {
  return arena.clip_grad_norm(max_norm);
}

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.05;
};

// AdamW with decoupled weight decay, applied only to parameters flagged `decay` (matrices and
// the patch projection; never norms, biases, class token or position embedding).
template <Backend B>
class AdamW {
 public:
  using T = typename B::Scalar;
  struct Slot {
    ParamRef<B> ref;
    Tensor<B> m, v;
  };
  AdamW(std::vector<ParamRef<B>> params, AdamWOptions opt = {}) : opt_(opt) {
    for (auto& r : params) {
      Slot s{r, Tensor<B>(r.param->value.shape()), Tensor<B>(r.param->value.shape())};
      s.m.zero();
      s.v.zero();
      slots_.push_back(std::move(s));
    }
  }
  // Over an arena (which must outlive the optimizer): moments in the arena's layout, a step is
  // one pass over the trainable range with decay on its first (decayed) segment
  // (fused::adamw_update_segments: one launch on Cuda).
  AdamW(ParameterArena<B>& arena, AdamWOptions opt = {}) : opt_(opt), arena_(&arena) {
    const auto n = arena.trainable_end();
    m_.resize({n});
    v_.resize({n});
    m_.zero();
    v_.zero();
    for (const auto& e : arena.entries()) {
      if (!e.trainable) continue;
      Slot s{{e.name, e.param}, {}, {}};
      s.m.bind(m_.data() + e.offset, e.shape);
      s.v.bind(v_.data() + e.offset, e.shape);
      slots_.push_back(std::move(s));
    }
  }
  AdamW(const AdamW&) = delete;
  AdamW& operator=(const AdamW&) = delete;
  AdamW(AdamW&&) = default;
  AdamW& operator=(AdamW&&) = default;

  void step(double lr) {
    ++t_;
    const T bc1 = T(1 - std::pow(opt_.beta1, double(t_))), bc2 = T(1 - std::pow(opt_.beta2, double(t_)));
    if (arena_) {
      fused::adamw_update_segments<B>(arena_->values().data(), m_.data(), v_.data(), arena_->grads().data(),
                                      std::size_t(arena_->trainable_end()), std::size_t(arena_->decay_end()), T(lr),
                                      T(opt_.beta1), T(opt_.beta2), T(opt_.eps), T(opt_.weight_decay), bc1, bc2);
      return;
    }
    for (auto& s : slots_) {
      auto& p = *s.ref.param;
      if (p.value.numel() > 0)
        B::adamw_update(p.value.data(), s.m.data(), s.v.data(), p.grad.data(), std::size_t(p.value.numel()), T(lr),
                        T(opt_.beta1), T(opt_.beta2), T(opt_.eps), T(p.decay ? opt_.weight_decay : 0), bc1, bc2);
    }
  }
  void zero_grad() {
    if (arena_) return arena_->zero_grad();
    for (auto& s : slots_) s.ref.param->zero_grad();
  }
  // Optimizer state for checkpoints: f(name, tensor) for every moment, and the step count.
  // Over an arena the tensors are bound views into the flat moments, so loading writes there.
  template <class F>
  void visit_state(F&& f) {
    for (auto& s : slots_) {
      f("exp_avg." + s.ref.name, s.m);
      f("exp_avg_sq." + s.ref.name, s.v);
    }
  }
  ParameterArena<B>* arena() const { return arena_; }
  std::int64_t& steps() { return t_; }
  const std::vector<Slot>& slots() const { return slots_; }

 private:
  AdamWOptions opt_;
  ParameterArena<B>* arena_ = nullptr;
  Tensor<B> m_, v_;  // the flat moments over an arena (empty otherwise); slots_ hold views
  std::vector<Slot> slots_;
  std::int64_t t_ = 0;
};

// SGD with momentum (PyTorch's form: v = mu v + g + wd w; w -= lr v).
template <Backend B>
class Sgd {
 public:
  using T = typename B::Scalar;
  Sgd(std::vector<ParamRef<B>> params, double momentum = 0.9, double weight_decay = 0)
      : momentum_(momentum), wd_(weight_decay) {
    for (auto& r : params) {
      Tensor<B> v(r.param->value.shape());
      v.zero();
      slots_.push_back({r, std::move(v)});
    }
  }
  // Over an arena (which must outlive the optimizer): the momentum in the arena's layout, a
  // step is one pass per segment.
  Sgd(ParameterArena<B>& arena, double momentum = 0.9, double weight_decay = 0)
      : momentum_(momentum), wd_(weight_decay), arena_(&arena) {
    buf_.resize({arena.trainable_end()});
    buf_.zero();
    for (const auto& e : arena.entries()) {
      if (!e.trainable) continue;
      Tensor<B> v;
      v.bind(buf_.data() + e.offset, e.shape);
      slots_.push_back({{e.name, e.param}, std::move(v)});
    }
  }
  Sgd(const Sgd&) = delete;
  Sgd& operator=(const Sgd&) = delete;
  Sgd(Sgd&&) = default;
  Sgd& operator=(Sgd&&) = default;

  void step(double lr) {
    auto update = [&](T* w, T* v, const T* g, std::int64_t n, bool decay) {
      if (n <= 0) return;
      B::scale(v, T(momentum_), std::size_t(n));
      B::axpy(v, T(1), g, std::size_t(n));
      if (decay && wd_ > 0) B::axpy(v, T(wd_), w, std::size_t(n));
      B::axpy(w, T(-lr), v, std::size_t(n));
    };
    if (arena_) {
      T* w = arena_->values().data();
      const T* g = arena_->grads().data();
      const auto d = arena_->decay_end(), t = arena_->trainable_end();
      update(w, buf_.data(), g, d, true);
      update(w + d, buf_.data() + d, g + d, t - d, false);
      return;
    }
    for (auto& [ref, v] : slots_) {
      auto& p = *ref.param;
      update(p.value.data(), v.data(), p.grad.data(), p.value.numel(), p.decay);
    }
  }
  void zero_grad() {
    if (arena_) return arena_->zero_grad();
    for (auto& s : slots_) s.first.param->zero_grad();
  }
  template <class F>
  void visit_state(F&& f) {
    for (auto& [ref, v] : slots_) f("momentum." + ref.name, v);
  }

 private:
  double momentum_, wd_;
  ParameterArena<B>* arena_ = nullptr;
  Tensor<B> buf_;  // the flat momentum over an arena (empty otherwise); slots_ hold views
  std::vector<std::pair<ParamRef<B>, Tensor<B>>> slots_;
};

// Linear warmup from warmup_lr to base_lr over warmup_steps, then cosine decay to min_lr.
struct WarmupCosine {
  double base_lr = 5e-4, min_lr = 1e-5, warmup_lr = 1e-6;
  std::int64_t warmup_steps = 0, total_steps = 1;
  double at(std::int64_t step) const {
    if (step < warmup_steps) return warmup_lr + (base_lr - warmup_lr) * double(step) / double(warmup_steps);
    const double span = double(std::max<std::int64_t>(1, total_steps - warmup_steps));
    const double t = std::min(1.0, double(step - warmup_steps) / span);
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + std::cos(std::numbers::pi * t));
  }
};

}  // namespace hatch
