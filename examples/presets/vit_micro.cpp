// vit-micro: train_e2e, incubate, and distill vit-micro > vit-micro.
#include "../instances.hpp"

namespace examples {
HATCH_EXAMPLE_VIT(VitMicro)
HATCH_EXAMPLE_DISTILL(VitMicro, VitMicro)
}  // namespace examples
