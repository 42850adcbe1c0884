// vit-small: train_e2e, incubate, and distill vit-small > vit-small.
#include "../instances.hpp"

namespace examples {
HATCH_EXAMPLE_VIT(VitSmall)
HATCH_EXAMPLE_DISTILL(VitSmall, VitSmall)
}  // namespace examples
