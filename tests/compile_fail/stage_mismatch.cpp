// Must NOT compile: replacing stage 1 of a width-64 ViT by a module of width 32.
#include <hatch/hatch.hpp>
using namespace hatch;
#ifdef HATCH_CONTROL
using Module = Block<64, 4>;
#else
using Module = Block<32, 4>;
#endif
using Meta = presets::VitTiny;
using Hybrid = ReplaceStage<Meta, 1, Module>;
Model<Hybrid, Cpu> model;
int main() { return 0; }
