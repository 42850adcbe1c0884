#pragma once
// Model<Spec, B>: the layer that a spec binds to on backend B (Model<Vit<...>, Cpu>,
// Model<Linear<64, 10>, Cpu64>). Every spec, leaf or composite, has `template <Backend B> using
// bind`; this alias is the one place where an architecture meets its backend.
#include "hatch/core/parameter.hpp"

namespace hatch {

template <class Spec, Backend B>
using Model = typename Spec::template bind<B>;

}  // namespace hatch
