#pragma once
// ParameterArena: every parameter of a model in one flat buffer of values and one of gradients
// (llm.c's layout), so that zero-grad, the global gradient norm, clipping and an optimizer step
// are one pass each over a contiguous range, and a future all-reduce is one call.
//
// Layout, in elements, the same for values, gradients and an optimizer's moments:
//
//   [0, decay_end)               trainable parameters with weight decay, in visit order
//   [decay_end, trainable_end)   trainable parameters without weight decay, in visit order
//   [trainable_end, size)        frozen parameters (trainable = false): kept, never stepped
//
// Building the arena copies each parameter's value and gradient into its slice and binds the
// Parameter's tensors to that slice (Tensor::bind): the layers keep using p.value and p.grad and
// now read and write the arena. Names, shapes, visit order and so checkpoints are unchanged. A
// parameter reached twice (shared by several layers, the same object) gets one slice, under the
// first name visit gives it. The arena is a scope: its destructor gives every parameter its own
// buffer again (a copy of its slice), so the model must outlive it and must not move while it
// exists. The flags (decay, trainable) are read once, when the arena is built.
#include <cmath>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "hatch/core/error.hpp"
#include "hatch/core/host_device.hpp"
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

template <Backend B>
class ParameterArena {
 public:
  using T = typename B::Scalar;
  struct Entry {
    std::string name;
    Parameter<B>* param;
    std::int64_t offset;  // first element of its slice in values(), grads() and moment buffers
    Shape shape;
    bool decay, trainable;
    std::int64_t numel() const { return shape.numel(); }
  };

  // Every parameter that model.visit shows (trainable or frozen), names checked unique.
  template <class M>
    requires(!std::is_same_v<std::remove_cvref_t<M>, std::vector<ParamRef<B>>>)
  explicit ParameterArena(M& model) : ParameterArena(all_parameters(model)) {}

  // The given parameters (e.g. trainable_parameters(model)); a repeated pointer is laid out once.
  explicit ParameterArena(const std::vector<ParamRef<B>>& refs) {
    std::set<const Parameter<B>*> seen;
    std::vector<ParamRef<B>> unique;
    for (const auto& r : refs)
      if (seen.insert(r.param).second) unique.push_back(r);
    std::int64_t n = 0;
    for (int segment = 0; segment < 3; ++segment) {
      for (const auto& r : unique) {
        const auto& p = *r.param;
        const int s = !p.trainable ? 2 : p.decay ? 0 : 1;
        if (s != segment) continue;
        require(!p.value.is_view() && !p.grad.is_view(), "ParameterArena",
                "parameter '" + r.name + "' is already a view (in another arena?); a parameter lives in one arena at a time");
        require(p.grad.shape() == p.value.shape(), "ParameterArena",
                "parameter '" + r.name + "' has value " + p.value.shape().str() + " but gradient " + p.grad.shape().str());
        entries_.push_back({r.name, r.param, n, p.value.shape(), p.decay, p.trainable});
        n += p.value.numel();
      }
      (segment == 0 ? decay_end_ : segment == 1 ? trainable_end_ : size_) = n;
    }
    values_.resize({n});
    grads_.resize({n});
    for (auto& e : entries_) {
      auto& p = *e.param;
      const auto k = std::size_t(e.numel());
      if (k) {  // a never-allocated tensor (rank 0, no buffer) starts at zero
        if (p.value.data()) B::copy(values_.data() + e.offset, p.value.data(), k);
        else B::fill(values_.data() + e.offset, k, T(0));
        if (p.grad.data()) B::copy(grads_.data() + e.offset, p.grad.data(), k);
        else B::fill(grads_.data() + e.offset, k, T(0));
      }
      p.value.bind(values_.data() + e.offset, e.shape);
      p.grad.bind(grads_.data() + e.offset, e.shape);
    }
  }
  ParameterArena(const ParameterArena&) = delete;
  ParameterArena& operator=(const ParameterArena&) = delete;
  ~ParameterArena() {
    for (auto& e : entries_) {
      e.param->value.detach();
      e.param->grad.detach();
    }
  }

  Tensor<B>& values() { return values_; }
  Tensor<B>& grads() { return grads_; }
  const std::vector<Entry>& entries() const { return entries_; }
  std::int64_t size() const { return size_; }
  std::int64_t decay_end() const { return decay_end_; }
  std::int64_t trainable_end() const { return trainable_end_; }

  // One fill over the trainable gradients.
  void zero_grad() {
    if (trainable_end_) B::fill(grads_.data(), std::size_t(trainable_end_), T(0));
  }
  // The global L2 norm of the trainable gradients: one reduction.
  double grad_norm() const {
    return trainable_end_ ? std::sqrt(B::sum_squares(grads_.data(), std::size_t(trainable_end_))) : 0.0;
  }
  // Scales the trainable gradients so their global norm is at most max_norm (one scale); returns
  // the norm before. Same rule as clip_grad_norm over parameter lists.
  double clip_grad_norm(double max_norm) {
    const double norm = grad_norm(), f = clip_factor(norm, max_norm);
    if (f != 1.0) B::scale(grads_.data(), T(f), std::size_t(trainable_end_));
    return norm;
  }

 private:
  template <class M>
  static std::vector<ParamRef<B>> all_parameters(M& model) {
    require_unique_parameter_names(model);
    std::vector<ParamRef<B>> out;
    model.visit([&](const std::string& n, Parameter<B>& p) { out.push_back({n, &p}); }, "");
    return out;
  }

  std::vector<Entry> entries_;
  Tensor<B> values_, grads_;
  std::int64_t decay_end_ = 0, trainable_end_ = 0, size_ = 0;
};

}  // namespace hatch
