#pragma once
// An optional member of the layer contract, for expert layers (layers/moe.hpp):
//
//   ExpertLoad take_expert_load();   // what the router did in the training forwards since the
//                                    // last call; resets the counts
//
// fit walks for_each_layer once an epoch and writes, per such layer in model order, the experts'
// shares of the routed choices ("expert_load") and the share dropped for capacity
// ("dropped_fraction") into metrics.jsonl.
#include <concepts>
#include <vector>

namespace hatch {

struct ExpertLoad {
  std::vector<double> load;  // per expert: its share of the kept choices
  double dropped = 0;        // dropped choices / all choices
};

template <class L>
concept HasExpertLoad = requires(L& l) {
  { l.take_expert_load() } -> std::same_as<ExpertLoad>;
};

// NAC's propagators: the mean fraction of kernel pairs kept (Kmdpa, d <= tau) over the training
// forwards since the last call; fit reports it per epoch as "kept_fraction", in model order.
template <class L>
concept HasKeptFraction = requires(L& l) {
  { l.take_kept_fraction() } -> std::same_as<double>;
};

}  // namespace hatch
