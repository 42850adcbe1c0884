// The example programs' --device cuda paths (what the GPU bundle carries: train_e2e, incubate,
// distill), compiled by the host compiler against tests/cuda_on_cpu and run on CPU threads, for
// one preset: vit-micro (and distill's vit-micro > vit-micro), 33 s of CPU for g++ at -O1; the
// other eight presets are larger models, each of which every CI build would compile too. This
// one preset runs the same program bodies (examples/program_bodies.hpp), checkpoints and phases.
// The Cpu side of these programs is the ordinary presets library, every preset.
#include "../../examples/presets/vit_micro.cpp"  // vit-micro's programs on hatch::Cuda (instances.hpp)

namespace examples {
namespace {

// The presets of this build's Cuda side: vit-micro alone; any other is refused by name.
struct VitMicroOnly {
  static void expect_micro(const std::string& flag, const std::string& name) {
    hatch::require(name == "vit-micro", flag + " " + name,
                   "the on-CPU CUDA build of the programs (tests/cuda_on_cpu) has vit-micro only");
  }
  template <class F>
  static int e2e(const std::string& name, F&& f) {
    expect_micro("--preset", name);
    return f(std::type_identity<hatch::presets::VitMicro>{});
  }
  template <class F>
  static int vit(const std::string& name, F&& f) {
    return e2e(name, std::forward<F>(f));
  }
  template <class F>
  static int distill_pair(const std::string& teacher, const std::string& student, F&& f) {
    expect_micro("--preset", teacher);
    const auto s = student_preset(teacher, student);
    expect_micro("--student", s.empty() ? student : s);
    return f(std::type_identity<hatch::presets::VitMicro>{}, std::type_identity<hatch::presets::VitMicro>{}, s);
  }
};

}  // namespace

// What examples/cuda_<program>.cu define, with vit-micro's dispatch.
int train_e2e_cuda(const E2eOptions& a) {
  select_device(a.common);
  return train_e2e<hatch::Cuda, VitMicroOnly>(a);
}
int incubate_cuda(const IncubateOptions& a) {
  select_device(a.common);
  return incubate<hatch::Cuda, VitMicroOnly>(a);
}
int distill_cuda(const DistillOptions& a) {
  select_device(a.common);
  return distill<hatch::Cuda, VitMicroOnly>(a);
}

}  // namespace examples
