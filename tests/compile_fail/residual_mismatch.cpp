// Must NOT compile: a Residual around a layer that changes the width. Built with
// -DHATCH_CONTROL the wrapped layer keeps its width and it must compile.
#include <hatch/hatch.hpp>
using namespace hatch;
#ifdef HATCH_CONTROL
constexpr int kOut = 16;
#else
constexpr int kOut = 24;
#endif
using Bad = Sequential<Linear<8, 16>, Residual<Sequential<Named<"fc", Linear<16, kOut>>, Gelu>>>;
Model<Bad, Cpu> model;
int main() { return 0; }
