#pragma once
// The MLP and the pre-norm transformer block, composed from smaller specs:
//   x += DropPath(Attn(LN x));  x += DropPath(MLP(LN x))
#include "hatch/compose/sequential.hpp"
#include "hatch/layers/activation.hpp"
#include "hatch/layers/attention.hpp"
#include "hatch/layers/norm.hpp"

namespace hatch {

template <int D, int Hidden>
using Mlp = Sequential<Named<"fc1", Linear<D, Hidden>>, Gelu, Named<"fc2", Linear<Hidden, D>>>;

template <int D, int Heads, int MlpRatio = 4, bool QkvBias = true>
using Block = Sequential<
    Residual<Sequential<Named<"norm1", LayerNorm<D>>, Named<"attn", Attention<D, Heads, QkvBias>>, DropPath>>,
    Residual<Sequential<Named<"norm2", LayerNorm<D>>, Named<"mlp", Mlp<D, D * MlpRatio>>, DropPath>>>;

}  // namespace hatch
