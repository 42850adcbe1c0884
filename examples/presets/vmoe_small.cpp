// vmoe-small: train_e2e and incubate.
#include "../instances.hpp"

namespace examples {
HATCH_EXAMPLE_VIT(VmoeSmall)
}  // namespace examples
