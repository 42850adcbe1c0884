// moe-student-small: train_e2e, incubate, and distill vit-small > moe-student-small (m2mKD's student).
#include "../instances.hpp"

namespace examples {
HATCH_EXAMPLE_VIT(MoeStudentSmall)
HATCH_EXAMPLE_TEACHER_ELSEWHERE(VitSmall)
HATCH_EXAMPLE_DISTILL(VitSmall, MoeStudentSmall)
}  // namespace examples
