// Must NOT compile: a stage of width 16 followed by a stage that takes width 32. Built with
// -DHATCH_CONTROL the widths agree and it must compile.
#include <hatch/hatch.hpp>
using namespace hatch;
#ifdef HATCH_CONTROL
constexpr int kSecondIn = 16;
#else
constexpr int kSecondIn = 32;
#endif
using Bad = Stages<Sequential<Linear<8, 16>, Gelu>, Sequential<Linear<kSecondIn, 4>>>;
Model<Bad, Cpu> model;
int main() { return 0; }
