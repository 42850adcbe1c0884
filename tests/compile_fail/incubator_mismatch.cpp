// Must NOT compile: incubating a width-128 target inside a width-64 meta model. Built with
// -DHATCH_CONTROL the meta model is MetaOf<Target> and it must compile.
#include <hatch/hatch.hpp>
#include <hatch/modular/incubator.hpp>
using namespace hatch;
using Target = presets::VitSmall;
#ifdef HATCH_CONTROL
using Meta = MetaOf<Target>;
#else
using Meta = presets::VitTiny;
#endif
int main() {
  Incubator<Meta, Target, Cpu> incubator({});
  data::Dataset train, test;
  incubator.pretrain_meta(train, test, {});
  incubator.incubate(1, train, test, {});
  Model<Target, Cpu> target;
  incubator.assemble(target);
  return 0;
}
