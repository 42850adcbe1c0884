#pragma once
// Command-line side of the example programs: the shared flags, the device dispatch and the
// error guard. What the programs do is in programs.hpp.
#include <omp.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <hatch/hatch.hpp>
#include <string>

#include "programs.hpp"

#ifdef HATCH_WITH_MPI
#include <hatch/distributed/mpi.hpp>
#endif
#ifdef HATCH_WITH_NCCL
#include <cuda_runtime.h>

#include <hatch/distributed/nccl.hpp>
#endif

namespace examples {

// The cores this process may use (its affinity mask, as OpenMP sees it).
inline int usable_cores() { return std::max(1, omp_get_num_procs()); }

// A finite number in [lo, hi]; the message prints the bounds readably (1e+06, not 300 digits)
// and refuses nan and inf, which CLI11's own range checks let through.
inline CLI::Validator finite_in(double lo, double hi) {
  char desc[96];
  std::snprintf(desc, sizeof desc, "NUMBER in [%g, %g]", lo, hi);
  return CLI::Validator(
      [lo, hi](std::string& s) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(s.c_str(), &end);
        char msg[160];
        if (s.empty() || end != s.c_str() + s.size() || !std::isfinite(v) || v < lo || v > hi) {
          std::snprintf(msg, sizeof msg, "expected a finite number in [%g, %g], got '%s'", lo, hi, s.c_str());
          return msg;
        }
        return {};
      },
      desc);
}
// An integer in [lo, hi] ("-1" for an unsigned seed is refused, not wrapped around).
inline CLI::Validator integer_in(long double lo, long double hi) {
  char desc[96];
  std::snprintf(desc, sizeof desc, "INTEGER in [%.0Lf, %.0Lf]", lo, hi);
  return CLI::Validator(
      [lo, hi](std::string& s) -> std::string {
        const bool digits = !s.empty() && s.find_first_not_of("0123456789", s[0] == '-' ? 1 : 0) == std::string::npos &&
                            s != "-";
        const long double v = digits ? std::strtold(s.c_str(), nullptr) : 0;
        if (!digits || v < lo || v > hi) {
          char msg[160];
          std::snprintf(msg, sizeof msg, "expected an integer in [%.0Lf, %.0Lf], got '%s'", lo, hi, s.c_str());
          return msg;
        }
        return {};
      },
      desc);
}
inline const CLI::Validator kNotEmpty(
    [](std::string& s) -> std::string { return s.empty() ? "expected a non-empty path" : std::string(); }, "PATH");

// e2e_presets: --preset also takes the NAC presets (train_e2e; incubate and distill do not
// instantiate them).
inline void add_common_flags(CLI::App& app, CommonOptions& o, bool e2e_presets = false) {
  app.option_defaults()->always_capture_default();  // --help shows every default: the recipe is visible
  if (o.threads <= 0) o.threads = usable_cores();
  constexpr double kBig = 1e6;
  app.add_option("--preset", o.preset,
                 std::string("model preset: ") + hatch::presets::names +
                     (e2e_presets ? std::string(", ") + hatch::presets::nac_names : std::string()))
      ->check(CLI::IsMember(e2e_presets ? hatch::presets::e2e_name_list() : hatch::presets::name_list()));
  app.add_option("--device", o.device, "cpu, or cuda (the first CUDA device)")->check(CLI::IsMember({"cpu", "cuda"}));
  auto* tf32 = app.add_flag("--tf32", o.tf32, "with --device cuda: TF32 tensor-core GEMMs");
  app.add_flag("--tf32x3", o.tf32x3,
               "with --device cuda: GEMMs as three TF32 tensor-core products of split operands (near-float accuracy)")
      ->excludes(tf32);
  app.add_option("--data", o.data, "directory with the Fashion-MNIST IDX files (.gz or plain)")->check(kNotEmpty);
  app.add_option("--out", o.out, "output directory: checkpoints, training states, metrics.jsonl")->check(kNotEmpty);
  app.add_option("--batch", o.batch, "batch size")->check(integer_in(1, 65536));
  app.add_option("--lr", o.lr, "peak learning rate (AdamW)")->check(finite_in(1e-12, 10));
  app.add_option("--min-lr", o.min_lr, "final learning rate of the cosine schedule")->check(finite_in(0, 10));
  app.add_option("--warmup-epochs", o.warmup_epochs, "linear warmup length in epochs")->check(finite_in(0, 1e5));
  app.add_flag("--lr-per-epoch", o.lr_per_epoch,
               "hold the learning rate for a whole epoch (timm's per-epoch schedule) instead of moving it every step");
  app.add_option("--eval-every", o.eval_every, "evaluate the test set after every N-th epoch (and the last)")
      ->check(integer_in(1, 1e6));
  app.add_option("--weight-decay", o.weight_decay, "AdamW weight decay")->check(finite_in(0, kBig));
  app.add_option("--clip", o.clip, "max global gradient norm (0 = off)")->check(finite_in(0, kBig));
  app.add_option("--label-smoothing", o.label_smoothing, "label smoothing")->check(finite_in(0, 0.99));
  app.add_option("--drop-path", o.drop_path, "max drop-path rate (linspace over blocks)")->check(finite_in(0, 0.99));
  app.add_option("--mixup", o.mixup, "mixup alpha (0 = off)")->check(finite_in(0, kBig));
  app.add_option("--cutmix", o.cutmix, "cutmix alpha (0 = off)")->check(finite_in(0, kBig));
  app.add_option("--mix-prob", o.mix_prob, "probability of mixing a batch")->check(finite_in(0, 1));
  app.add_option("--crop-padding", o.crop_padding, "random crop padding in pixels")->check(integer_in(0, 14));
  app.add_flag("--hflip", o.hflip, "random horizontal flips");
  app.add_option("--train-limit", o.train_limit, "use only the first N training images (0 = all)")
      ->check(integer_in(0, 1e9));
  app.add_flag("--balanced", o.balanced,
               "with --train-limit N: the first N / 10 training images of each class instead of the first N");
  app.add_option("--test-limit", o.test_limit, "use only the first N test images (0 = all)")->check(integer_in(0, 1e9));
  app.add_flag("--ood", o.ood,
               "also evaluate the final model on the out-of-distribution set made from the test images (each "
               "rotated, noisy, low in contrast, blurred or elastically deformed, with a fixed seed: docs/design.md) "
               "and print ood_accuracy= on the line before test_accuracy=");
  app.add_option("--threads", o.threads,
                 "CPU threads (at most the cores this process may use; the default is all of them)")
      ->check(integer_in(1, 1 << 20));
  app.add_option("--seed", o.seed, "random seed")->check(integer_in(0, 1.8446744073709551615e19L));
  app.add_flag("--no-progress", o.no_progress, "no progress bar on stderr");
  app.add_flag("--distributed", o.distributed,
               "data-parallel over the ranks of `mpirun -np R` (each rank a share of every batch); without it, "
               "R ranks of incubate and distill share out the module jobs");
  app.add_flag("--no-resume", o.no_resume,
               "start afresh even if a training state exists in --out (the state is overwritten)");
}

// The NAC model's options (train_e2e, distill): its signature graph prior and dense attention.
inline void add_nac_flags(CLI::App& app, CommonOptions& o) {
  app.add_option("--nac-prior", o.nac_prior,
                 std::string("NAC models: the signature graph prior drawn at initialisation and at assembly (") +
                     hatch::kNacPriorNames + ")")
      ->check(CLI::IsMember({"scale-free", "erdos-renyi", "planted-partition", "ring-of-cliques"}));
  app.add_flag("--nac-dense", o.nac_dense,
               "NAC models: dense attention without the kernel (the baseline without sparsity)");
}

// OpenMP threads that finish a parallel region spin for a while before sleeping; two such
// programs on the same cores (parallel module jobs) spin against each other and run many times
// slower. The wait policy is read when the OpenMP runtime loads, before main(), so the programs
// call this first: unless the user chose a policy, it re-executes the program once with
// OMP_WAIT_POLICY=passive (docs/performance.md has the measurements).
inline void share_cores_politely(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY")) return;
  ::setenv("OMP_WAIT_POLICY", "passive", 1);
  ::execv("/proc/self/exe", argv);  // returns only if it failed: then run with the default policy
}

// Runs the program on the device the flags name: cpu(options) or cuda(options).
template <class Options, class CpuRun, class CudaRun>
int on_device(const Options& o, CpuRun cpu, CudaRun cuda) {
  int threads = o.common.threads;
  if (threads > usable_cores()) {
    std::fprintf(stderr, "warning: --threads %d is more than the %d cores this process may use; using %d\n", threads,
                 usable_cores(), usable_cores());
    threads = usable_cores();
  }
  omp_set_num_threads(threads);  // host threads: data, and the Cpu backend
  if (o.common.device == "cuda") return cuda(o);
  hatch::require(!o.common.tf32, "--tf32", "applies only to --device cuda");
  hatch::require(!o.common.tf32x3, "--tf32x3", "applies only to --device cuda");
  return cpu(o);
}

// The MPI job this process is part of (a job of one without mpirun), for as long as main runs:
// MPI_Init_thread here, MPI_Finalize when it goes. A build without MPI has none, and
// --distributed is refused. With --device cuda --distributed, a build with NCCL sums the
// gradients on the GPUs (NcclCollective, rank r on its machine's GPU r) when every rank has a
// GPU of its own; otherwise they go through host memory and MPI.
class MpiJob {
 public:
  MpiJob(int& argc, char**& argv, CommonOptions& o) : options_(o) {
#ifdef HATCH_WITH_MPI
    session_ = std::make_unique<hatch::MpiSession>(argc, argv);
    o.world = session_->world();
#else
    (void)argc, (void)argv;
#endif
  }
  // After the flags are parsed.
  void check() {
#ifndef HATCH_WITH_MPI
    hatch::require(!options_.distributed, "--distributed",
                   "this build has no MPI (install libopenmpi-dev, the setup script does, and reconfigure)");
#endif
    hatch::require(!options_.distributed || options_.batch % options_.ranks() == 0, "--batch",
                   std::to_string(options_.batch) + " is not divisible by the " + std::to_string(options_.ranks()) +
                       " ranks of this job; each rank takes an equal share of every batch");
#ifdef HATCH_WITH_NCCL
    if (options_.distributed && options_.device == "cuda" && options_.ranks() > 1) use_nccl();
#endif
  }

 private:
#ifdef HATCH_WITH_NCCL
  void use_nccl() {
    const auto world = session_->mpi_world();
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
    const int local = world->local_rank();
    double without = local < devices ? 0 : 1;  // ranks without a GPU of their own
    world->allreduce_sum(&without, 1);
    if (without == 0) {
      options_.world = std::make_shared<hatch::NcclCollective>(world, hatch::NcclOptions{.device = local});
      if (world->rank() == 0) std::fprintf(stderr, "--distributed: gradients summed on the GPUs by NCCL\n");
    } else if (devices > 0 && world->rank() == 0) {
      std::fprintf(stderr, "--distributed: %d rank(s) without a GPU of their own: gradients summed in host memory by MPI\n",
                   int(without));
    }
  }
#endif
  CommonOptions& options_;
#ifdef HATCH_WITH_MPI
  std::unique_ptr<hatch::MpiSession> session_;
#endif
};

// Runs body(); a hatch::Error or other exception becomes one line on stderr and exit code 1. In
// a job of several ranks the failing rank stops the whole job (the others may be waiting for it
// in a collective).
template <class F>
int guarded(const char* program, F&& body, const CommonOptions* job = nullptr) {
  try {
    return body();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, e.what());
    if (job && job->ranks() > 1) {
      std::fflush(stderr);
      job->world->abort(1);
    }
    return 1;
  }
}

}  // namespace examples
