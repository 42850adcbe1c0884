// Must NOT compile: Flatten<12> (a 3 x 4 sample) followed by a Linear<10, 5>. Built with
// -DHATCH_CONTROL the widths agree and it must compile: Flatten's width takes part in
// Sequential's compile-time check like a Linear's.
#include <hatch/hatch.hpp>

#ifdef HATCH_CONTROL
constexpr int kNextIn = 12;
#else
constexpr int kNextIn = 10;
#endif

using Bad = hatch::Sequential<hatch::Reshape<3, 4>, hatch::Flatten<12>, hatch::Silu, hatch::Linear<kNextIn, 5>>;
hatch::Model<Bad, hatch::Cpu> model;
int main() { return 0; }
