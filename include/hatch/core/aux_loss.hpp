#pragma once
// Auxiliary losses: a layer may add a term to the training loss (a MoE balance loss, an
// activation or weight penalty). The contract is one optional member,
//
//   double aux_loss() const;   // the term of the last training forward, already weighted
//                              // (0 after an evaluation forward)
//
// and the rule that the layer adds the term's gradient itself, in backward, when
// ctx.param_grads is set, i.e. when the layer is trained: a frozen layer adds no gradient.
// collect_aux_loss(model) sums the terms of the layers that train: it walks for_each_layer, so
// composites (Sequential, Residual, Repeat, Stages, Stitched, Named) need nothing for it, and a
// view that freezes part of a model (FrozenExcept) defines aux_loss() itself and reports only the
// terms of what it trains. fit adds the sum to the loss it reports, checks it for NaN/Inf and
// writes its epoch mean to metrics.jsonl; evaluate() never adds it.
#include <concepts>
#include <type_traits>

namespace hatch {

template <class L>
concept HasAuxLoss = requires(L& l) {
  { l.aux_loss() } -> std::convertible_to<double>;
};

// The sum of the auxiliary terms of every layer of `model` that trains (0 if none has one).
template <class M>
double collect_aux_loss(M& model) {
  if constexpr (HasAuxLoss<M>) {
    return double(model.aux_loss());  // a leaf layer, or a view that decides what trains
  } else {
    double total = 0;
    model.for_each_layer([&](auto& layer) {
      if constexpr (HasAuxLoss<std::remove_cvref_t<decltype(layer)>>) total += double(layer.aux_loss());
    });
    return total;
  }
}

}  // namespace hatch
