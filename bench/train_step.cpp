// Images per second of one full training step (forward, loss, backward, AdamW) of a preset ViT
// on random data; the peer of bench/torch_vit_step.py. Last line: images_per_second=N.
//   build/bench/train_step --preset vit-small --batch 128 --threads 2
//   build/bench/train_step --device cuda --preset vit-b16 --batch 64 [--tf32 | --tf32x3]
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <hatch/hatch.hpp>

#include "train_step.hpp"

namespace {
// The best of 5 timings of C = A B at 2048^3 in float, in GFLOP/s: through Cpu::gemm (hatch's
// threads, OpenBLAS or Eigen's kernel as built) and through Eigen's product expression (its own
// threads). Printed as gemm_gflops= and eigen_gemm_gflops=.
void gemm_ceiling() {
  constexpr int n = 2048;
  Eigen::MatrixXf a = Eigen::MatrixXf::Random(n, n), b = Eigen::MatrixXf::Random(n, n), c(n, n);
  auto best_of = [&](auto&& f) {
    f();  // warm-up
    double best = 1e30;
    for (int r = 0; r < 5; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      f();
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return 2.0 * n * n * double(n) / best / 1e9;
  };
  Eigen::setNbThreads(omp_get_max_threads());
  const double hatch_rate = best_of([&] {
    hatch::Cpu::gemm(false, false, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
  });
  const double eigen_rate = best_of([&] { c.noalias() = a * b; });
  std::printf("gemm_gflops=%.1f\neigen_gemm_gflops=%.1f\n", hatch_rate, eigen_rate);
}
}  // namespace

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
  auto* tf32 = app.add_flag("--tf32", o.tf32, "with --device cuda: TF32 tensor-core GEMMs");
  app.add_flag("--tf32x3", o.tf32x3,
               "with --device cuda: GEMMs as three TF32 tensor-core products of split operands (near-float accuracy)")
      ->excludes(tf32);
  app.add_option("--batch", o.batch, "batch size")->check(CLI::Range(1, 1 << 16));
  app.add_option("--threads", threads, "OpenMP threads (cpu)")->check(CLI::Range(1, 1024));
  app.add_option("--steps", o.steps, "timed steps")->check(CLI::Range(1, 1 << 20));
  app.add_option("--warmup", o.warmup, "untimed steps first")->check(CLI::Range(0, 1 << 20));
  bool ceiling = false;
  app.add_flag("--ceiling", ceiling,
               "cpu: also time a 2048^3 sgemm through hatch's Cpu::gemm and through Eigen's own product "
               "(the machine's GEMM rate, for the fraction of it a step reaches)");
  CLI11_PARSE(app, argc, argv);
  omp_set_num_threads(threads);
  try {
    if (device == "cuda") return bench::time_train_step_cuda(o);
    hatch::require(!o.tf32, "--tf32", "applies only to --device cuda");
    hatch::require(!o.tf32x3, "--tf32x3", "applies only to --device cuda");
    o.label = "hatch cpu threads=" + std::to_string(threads);
    if (ceiling) gemm_ceiling();
    const int rc = bench::time_train_step<hatch::Cpu>(o);
    // Which kernel ran the GEMMs (Cpu::gemm_kernel: OpenBLAS's unless held to narrower kernels than Eigen's)
#if defined(HATCH_WITH_OPENBLAS)
    std::printf("cpu_gemm_kernel=%s (OpenBLAS core %s)\n", hatch::detail::name(hatch::Cpu::gemm_kernel()),
                openblas_get_corename());
#else
    std::printf("cpu_gemm_kernel=eigen\n");
#endif
    return rc;
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
