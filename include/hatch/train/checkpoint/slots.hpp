#pragma once
// A model's tensors under their checkpoint names (part of hatch/train/checkpoint.hpp): every
// parameter once, in visit order, as the slots that saving reads and loading fills.
#include <algorithm>
#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

#include "hatch/core/error.hpp"
#include "hatch/core/parameter.hpp"

namespace hatch {

namespace detail {

template <Backend B>
struct TensorSlot {
  std::string name;
  Tensor<B>* tensor;
  bool shared = false;  // a model's shared table (Parameter::shared)
};

// Every parameter once, under the first name visit gives it: a parameter shared by several
// layers (tied weights, NAC's codes) is one tensor in the file, as it is one slice in the arena.
template <class M, class F>
void visit_unique(M& model, F&& f) {
  using B = typename M::backend;
  std::vector<const Parameter<B>*> seen;
  model.visit(
      [&](const std::string& name, Parameter<B>& p) {
        if (std::find(seen.begin(), seen.end(), &p) != seen.end()) return;
        seen.push_back(&p);
        f(name, p);
      },
      "");
}

template <class M>
std::vector<TensorSlot<typename M::backend>> parameter_slots(M& model) {
  using B = typename M::backend;
  std::vector<TensorSlot<B>> out;
  visit_unique(model, [&](const std::string& name, Parameter<B>& p) { out.push_back({name, &p.value, p.shared}); });
  return out;
}

template <Backend B>
constexpr void check_scalar() {
  static_assert(std::is_same_v<typename B::Scalar, float> || std::is_same_v<typename B::Scalar, double>,
                "hatch checkpoints store float (F32) and double (F64) backends only");
}

template <class M>
void check_stage_index(M&, std::size_t i, const std::string& where) {
  require(i < M::num_stages, where,
          "stage " + std::to_string(i) + " does not exist, the model has " + std::to_string(M::num_stages) +
              " stages");
}

}  // namespace detail

}  // namespace hatch
