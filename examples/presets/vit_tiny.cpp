// vit-tiny: train_e2e, incubate, and distill vit-tiny > vit-tiny.
#include "../instances.hpp"

namespace examples {
HATCH_EXAMPLE_VIT(VitTiny)
HATCH_EXAMPLE_DISTILL(VitTiny, VitTiny)
}  // namespace examples
