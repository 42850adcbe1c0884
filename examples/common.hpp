#pragma once
// Command-line side of the example programs: the shared flags, the device dispatch and the
// error guard. What the programs do is in programs.hpp.
#include <omp.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <hatch/hatch.hpp>
#include <string>

#include "programs.hpp"

namespace examples {

inline void add_common_flags(CLI::App& app, CommonOptions& o) {
  app.add_option("--preset", o.preset, std::string("model preset: ") + hatch::presets::names)
      ->check(CLI::IsMember({"vit-micro", "vit-tiny", "vit-small", "vit-base"}));
  app.add_option("--device", o.device, "cpu, or cuda (the first CUDA device)")->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_flag("--tf32", o.tf32, "with --device cuda: TF32 tensor-core GEMMs");
  app.add_option("--data", o.data, "directory with the Fashion-MNIST IDX files (.gz or plain)");
  app.add_option("--out", o.out, "output directory: checkpoints, metrics.jsonl");
  app.add_option("--batch", o.batch, "batch size")->check(CLI::Range(1, 65536));
  app.add_option("--lr", o.lr, "peak learning rate (AdamW)")->check(CLI::PositiveNumber);
  app.add_option("--min-lr", o.min_lr, "final learning rate of the cosine schedule")->check(CLI::NonNegativeNumber);
  app.add_option("--warmup-epochs", o.warmup_epochs, "linear warmup length in epochs")->check(CLI::NonNegativeNumber);
  app.add_option("--weight-decay", o.weight_decay, "AdamW weight decay")->check(CLI::NonNegativeNumber);
  app.add_option("--clip", o.clip, "max global gradient norm (0 = off)")->check(CLI::NonNegativeNumber);
  app.add_option("--label-smoothing", o.label_smoothing, "label smoothing")->check(CLI::Range(0.0, 0.99));
  app.add_option("--drop-path", o.drop_path, "max drop-path rate (linspace over blocks)")->check(CLI::Range(0.0, 0.99));
  app.add_option("--mixup", o.mixup, "mixup alpha (0 = off)")->check(CLI::NonNegativeNumber);
  app.add_option("--cutmix", o.cutmix, "cutmix alpha (0 = off)")->check(CLI::NonNegativeNumber);
  app.add_option("--mix-prob", o.mix_prob, "probability of mixing a batch")->check(CLI::Range(0.0, 1.0));
  app.add_option("--crop-padding", o.crop_padding, "random crop padding in pixels")->check(CLI::Range(0, 14));
  app.add_flag("--hflip", o.hflip, "random horizontal flips");
  app.add_option("--train-limit", o.train_limit, "use only the first N training images (0 = all)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--test-limit", o.test_limit, "use only the first N test images (0 = all)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--threads", o.threads, "CPU threads")->check(CLI::Range(1, 1024));
  app.add_option("--seed", o.seed, "random seed");
  app.add_flag("--no-progress", o.no_progress, "no progress bar on stderr");
  app.add_flag("--no-resume", o.no_resume, "start afresh even if a training state exists in --out");
}

// Runs the program on the device the flags name: cpu(options) or cuda(options).
template <class Options, class CpuRun, class CudaRun>
int on_device(const Options& o, CpuRun cpu, CudaRun cuda) {
  omp_set_num_threads(o.common.threads);  // host threads: data, and the Cpu backend
  if (o.common.device == "cuda") return cuda(o);
  hatch::require(!o.common.tf32, "--tf32", "applies only to --device cuda");
  return cpu(o);
}

// Runs body(); a hatch::Error or other exception becomes one line on stderr and exit code 1.
template <class F>
int guarded(const char* program, F&& body) {
  try {
    return body();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, e.what());
    return 1;
  }
}

}  // namespace examples
