#pragma once
// set_drop_path(model, max_rate): stochastic depth's rates, as timm sets them. The rate grows
// linearly with depth, per block: linspace(0, max_rate, number of blocks) in forward order, and
// every DropPath inside one block gets that block's rate. A block is a layer that says it is one
// (AsBlock<Spec>, compose/sequential.hpp: Block and BlockWith are), whatever number of DropPath
// layers it holds (the ViT's block has two, one per residual branch; a block with none still
// counts in the depth); a block inside a block is part of the outer one. A DropPath outside any
// block counts as a block of its own. Other layers with a rate (Dropout) are left alone.
#include <type_traits>

#include "hatch/layers/activation.hpp"

namespace hatch {

template <class L>
struct is_drop_path : std::false_type {};
template <Backend B>
struct is_drop_path<DropLayer<B, true>> : std::true_type {};

namespace detail {
// Walks for_each_layer once, numbering blocks in forward order; calls on_drop_path(layer, block).
template <class OnDropPath>
struct DropPathBlocks {
  OnDropPath on_drop_path;
  int blocks = 0;  // blocks seen so far (the index of the next one)
  int depth = 0;   // how many AsBlock layers the walk is inside

  void enter_block() {
    if (depth++ == 0) ++blocks;
  }
  void leave_block() { --depth; }
  template <class L>
  void operator()(L& layer) {
    if constexpr (is_drop_path<std::remove_cvref_t<L>>::value) {
      if (depth == 0) ++blocks;  // a DropPath of its own
      on_drop_path(layer, blocks - 1);
    }
  }
};
template <class M, class F>
int walk_drop_path_blocks(M& model, F f) {
  DropPathBlocks<F> walk{f};
  model.for_each_layer(walk);
  return walk.blocks;
}
}  // namespace detail

template <class M>
void set_drop_path(M& model, double max_rate) {
  const int blocks = detail::walk_drop_path_blocks(model, [](auto&, int) {});
  detail::walk_drop_path_blocks(model, [&](auto& layer, int block) {
    layer.set_rate(blocks > 1 ? max_rate * block / (blocks - 1) : 0.0);
  });
}

}  // namespace hatch
