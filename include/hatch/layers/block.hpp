#pragma once
// The MLP and the pre-norm transformer block, composed from smaller specs:
//   x += DropPath(Attn(LN x));  x += DropPath(MLP(LN x))
// BlockWith takes the MLP as a parameter (layers/moe.hpp's Moe fits there). Both are AsBlock<...>:
// one block of depth, for set_drop_path's per-block rates (layers/drop_path_schedule.hpp).
#include "hatch/compose/sequential.hpp"
#include "hatch/layers/activation.hpp"
#include "hatch/layers/attention.hpp"
#include "hatch/layers/norm.hpp"

namespace hatch {

template <int D, int Hidden>
using Mlp = Sequential<Named<"fc1", Linear<D, Hidden>>, Gelu, Named<"fc2", Linear<Hidden, D>>>;

// A block whose MLP is any spec of width D -> D (a Moe<...> for an expert layer); its parameters
// are named "mlp.*" either way.
template <int D, int Heads, class MlpSpec, bool QkvBias = true>
using BlockWith = AsBlock<Sequential<
    Residual<Sequential<Named<"norm1", LayerNorm<D>>, Named<"attn", Attention<D, Heads, QkvBias>>, DropPath>>,
    Residual<Sequential<Named<"norm2", LayerNorm<D>>, Named<"mlp", MlpSpec>, DropPath>>>>;

template <int D, int Heads, int MlpRatio = 4, bool QkvBias = true>
using Block = BlockWith<D, Heads, Mlp<D, D * MlpRatio>, QkvBias>;

}  // namespace hatch
