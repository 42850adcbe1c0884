// Must NOT compile: a Linear<32, 64> followed by a Linear<48, 10>. Built with
// -DHATCH_CONTROL the widths agree and it must compile, which proves the failure above comes
// from the width check and not from anything else in this file.
#include <hatch/hatch.hpp>

#ifdef HATCH_CONTROL
constexpr int kSecondIn = 64;
#else
constexpr int kSecondIn = 48;
#endif

using Bad = hatch::Sequential<hatch::Linear<32, 64>, hatch::Gelu, hatch::Linear<kSecondIn, 10>>;
hatch::Model<Bad, hatch::Cpu> model;
int main() { return 0; }
