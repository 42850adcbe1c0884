#pragma once
// Optimizers over the trainable parameters of a model (collected once, by visit), gradient
// clipping by global norm, freezing, and the warmup + cosine schedule.
#include <cmath>
#include <functional>
#include <map>
#include <numbers>
#include <string>
#include <vector>

#include "hatch/core/error.hpp"
#include "hatch/core/parameter.hpp"

namespace hatch {

template <Backend B>
struct ParamRef {
  std::string name;
  Parameter<B>* param;
};

// Throws when two different parameters of a model have the same name: such a model trains but
// cannot be saved, so say so before training, with the name and what usually causes it.
template <class M>
void require_unique_parameter_names(M& model) {
  using B = typename M::backend;
  std::map<std::string, const Parameter<B>*> seen;
  model.visit([&](const std::string& n, Parameter<B>& p) {
    const auto [it, fresh] = seen.emplace(n, &p);
    require(fresh || it->second == &p, "model",
            "two parameters are named '" + n +
                "', so the model could not be saved or loaded. Give the two layers different "
                "Named<\"...\"> prefixes; copies of a Repeat are numbered automatically inside one "
                "Sequential or Stages, but a Repeat inside a layer of your own needs its Start set "
                "(Repeat<N, Spec, Start>)");
  }, "");
}

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
  const double norm = global_grad_norm(params);
  if (max_norm > 0 && norm > max_norm) {
    const auto f = typename B::Scalar(max_norm / (norm + 1e-6));
    for (auto& r : params) B::scale(r.param->grad.data(), f, r.param->grad.numel());
  }
  return norm;
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
  void step(double lr) {
    ++t_;
    const T bc1 = T(1 - std::pow(opt_.beta1, double(t_))), bc2 = T(1 - std::pow(opt_.beta2, double(t_)));
    for (auto& s : slots_) {
      auto& p = *s.ref.param;
      B::adamw_update(p.value.data(), s.m.data(), s.v.data(), p.grad.data(), p.value.numel(), T(lr), T(opt_.beta1),
                      T(opt_.beta2), T(opt_.eps), T(p.decay ? opt_.weight_decay : 0), bc1, bc2);
    }
  }
  void zero_grad() {
    for (auto& s : slots_) s.ref.param->zero_grad();
  }
  // Optimizer state for checkpoints: f(name, tensor) for every moment, and the step count.
  template <class F>
  void visit_state(F&& f) {
    for (auto& s : slots_) {
      f("exp_avg." + s.ref.name, s.m);
      f("exp_avg_sq." + s.ref.name, s.v);
    }
  }
  std::int64_t& steps() { return t_; }
  const std::vector<Slot>& slots() const { return slots_; }

 private:
  AdamWOptions opt_;
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
  void step(double lr) {
    for (auto& [ref, v] : slots_) {
      auto& p = *ref.param;
      const auto n = p.value.numel();
      B::scale(v.data(), T(momentum_), n);
      B::axpy(v.data(), T(1), p.grad.data(), n);
      if (p.decay && wd_ > 0) B::axpy(v.data(), T(wd_), p.value.data(), n);
      B::axpy(p.value.data(), T(-lr), v.data(), n);
    }
  }
  void zero_grad() {
    for (auto& s : slots_) s.first.param->zero_grad();
  }
  template <class F>
  void visit_state(F&& f) {
    for (auto& [ref, v] : slots_) f("momentum." + ref.name, v);
  }

 private:
  double momentum_, wd_;
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
