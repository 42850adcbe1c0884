// nac-small: train_e2e, and distill vit-small > nac-small (m2mKD's NAC student).
#include "../instances.hpp"

namespace examples {
HATCH_EXAMPLE_E2E(NacSmall)
HATCH_EXAMPLE_TEACHER_ELSEWHERE(VitSmall)
HATCH_EXAMPLE_DISTILL(VitSmall, NacSmall)
}  // namespace examples
