// vit-deep (16 blocks): train_e2e and incubate.
#include "../instances.hpp"

namespace examples {
HATCH_EXAMPLE_VIT(VitDeep)
}  // namespace examples
