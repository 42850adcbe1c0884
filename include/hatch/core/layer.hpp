#pragma once
// What every layer writes the same way, written once (docs/design.md, "Writing a layer").
//
//   LeafLayer<Self, B, In, Out>           backend, T (the scalar), in, out, and
//                                         for_each_layer (a leaf calls f on itself)
//   ParameterFreeLayer<Self, B, In, Out>  the same, plus reset_parameters and visit that do
//                                         nothing (In and Out default to kAnyWidth: keeps the width)
//   backward_inner(layer, dy, ctx)        a child's backward inside a composite: it always
//                                         produces its input gradient (another child needs it)
//
// A leaf layer derives from one of the two bases with itself as Self (so that for_each_layer
// hands visitors the layer's own type: set_drop_path finds set_rate, fit finds
// take_expert_load) and writes the rest of the contract: forward, backward, and, if it has
// parameters, reset_parameters and visit. Inside the layer, T is the base's member of a
// dependent base, so a layer that uses it says `using T = typename B::Scalar;` again.
#include <string>
#include <utility>

#include "hatch/core/parameter.hpp"

namespace hatch {

template <class Self, Backend B, int In, int Out>
struct LeafLayer {
  using backend = B;
  using T = typename B::Scalar;
  static constexpr int in = In, out = Out;
  template <class F>
  void for_each_layer(F&& f) { f(static_cast<Self&>(*this)); }
};

template <class Self, Backend B, int In = kAnyWidth, int Out = In>
struct ParameterFreeLayer : LeafLayer<Self, B, In, Out> {
  void reset_parameters(Initializer&) {}
  template <class F>
  void visit(F&&, const std::string&) {}
};

// Runs layer.backward(dy, ctx) with ctx.input_grad set, and restores ctx.input_grad after. For
// every child of a composite but its first: what the composite was asked for (ctx.input_grad
// false: the first trainable layer of a model) concerns only the gradient of the composite's own
// input, while its other children's input gradients are needed by the children before them.
template <class L, Backend B>
const Tensor<B>& backward_inner(L& layer, const Tensor<B>& dy, Context& ctx) {
  const bool outer = std::exchange(ctx.input_grad, true);
  const Tensor<B>& d = layer.backward(dy, ctx);
  ctx.input_grad = outer;
  return d;
}

}  // namespace hatch
