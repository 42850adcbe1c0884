// Images per second of one full training step (forward, loss, backward, AdamW) of a preset ViT
// on random data; the peer of bench/torch_vit_step.py. Last line: images_per_second=N.
//   build/bench/train_step --preset vit-small --batch 128 --threads 2
//   build/bench/train_step --device cuda --preset vit-b16 --batch 64 [--tf32]
#include <CLI/CLI.hpp>
#include <cstdio>
#include <hatch/hatch.hpp>

#include "train_step.hpp"

int main(int argc, char** argv) {
  CLI::App app{"hatch training-step throughput"};
  bench::StepOptions o;
  std::string device = "cpu";
  int threads = 2;
  app.add_option("--preset", o.preset, std::string("model preset: ") + hatch::presets::names + ", vit-b16 (224x224x3)")
      ->check(CLI::IsMember([] {
        auto names = hatch::presets::name_list();
        names.push_back("vit-b16");
        return names;
      }()));
  app.add_option("--device", device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_flag("--tf32", o.tf32, "with --device cuda: TF32 tensor-core GEMMs");
  app.add_option("--batch", o.batch, "batch size")->check(CLI::Range(1, 1 << 16));
  app.add_option("--threads", threads, "OpenMP threads (cpu)")->check(CLI::Range(1, 1024));
  app.add_option("--steps", o.steps, "timed steps")->check(CLI::Range(1, 1 << 20));
  app.add_option("--warmup", o.warmup, "untimed steps first")->check(CLI::Range(0, 1 << 20));
  CLI11_PARSE(app, argc, argv);
  omp_set_num_threads(threads);
  try {
    if (device == "cuda") return bench::time_train_step_cuda(o);
    hatch::require(!o.tf32, "--tf32", "applies only to --device cuda");
    o.label = "hatch cpu threads=" + std::to_string(threads);
    return bench::time_train_step<hatch::Cpu>(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_step: %s\n", e.what());
    return 2;
  }
}

#if !defined(HATCH_BENCH_CUDA)
int bench::time_train_step_cuda(const StepOptions&) {
  throw hatch::Error("--device cuda: this build has no CUDA backend (configure with nvcc on PATH)");
}
#endif
