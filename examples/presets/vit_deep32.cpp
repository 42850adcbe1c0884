// vit-deep32 (32 blocks): train_e2e and incubate.
#include "../instances.hpp"

namespace examples {
HATCH_EXAMPLE_VIT(VitDeep32)
}  // namespace examples
