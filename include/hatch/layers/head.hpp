#pragma once
// The classification head: final LayerNorm and a linear classifier on the class token. timm
// normalises every token and then takes token 0; normalising only token 0 gives the same output
// and gradients at a fraction of the work.
#include "hatch/compose/sequential.hpp"
#include "hatch/layers/embed.hpp"
#include "hatch/layers/linear.hpp"
#include "hatch/layers/norm.hpp"

namespace hatch {

template <int D, int Classes>
using ClassHead = Sequential<ClassToken<D>, Named<"norm", LayerNorm<D>>, Named<"head", Linear<D, Classes>>>;

}  // namespace hatch
