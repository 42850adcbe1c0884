#pragma once
// Flags shared by the example programs, and their mapping onto FitOptions.
#include <omp.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <hatch/hatch.hpp>
#include <hatch/train/fit.hpp>
#include <string>

namespace examples {

struct CommonFlags {
  std::string preset = "vit-tiny";
  std::string data = hatch::data::kFashionMnistDir;
  std::string out = "out";
  int batch = 128, threads = 2, train_limit = 0, test_limit = 0;
  double lr = 2e-3, min_lr = 1e-5, warmup_epochs = 1, weight_decay = 0.05, clip = 0;
  double label_smoothing = 0.1, drop_path = 0, mixup = 0, cutmix = 0, mix_prob = 1.0;
  int crop_padding = 0;
  bool hflip = false, no_progress = false, no_resume = false;
  std::uint64_t seed = 0;

  void add_to(CLI::App& app) {
    app.add_option("--preset", preset, std::string("model preset: ") + hatch::presets::names)
        ->check(CLI::IsMember({"vit-micro", "vit-tiny", "vit-small", "vit-base"}));
    app.add_option("--data", data, "directory with the Fashion-MNIST IDX files (.gz or plain)");
    app.add_option("--out", out, "output directory: checkpoints, metrics.jsonl");
    app.add_option("--batch", batch, "batch size")->check(CLI::Range(1, 65536));
    app.add_option("--lr", lr, "peak learning rate (AdamW)")->check(CLI::PositiveNumber);
    app.add_option("--min-lr", min_lr, "final learning rate of the cosine schedule")->check(CLI::NonNegativeNumber);
    app.add_option("--warmup-epochs", warmup_epochs, "linear warmup length in epochs")->check(CLI::NonNegativeNumber);
    app.add_option("--weight-decay", weight_decay, "AdamW weight decay")->check(CLI::NonNegativeNumber);
    app.add_option("--clip", clip, "max global gradient norm (0 = off)")->check(CLI::NonNegativeNumber);
    app.add_option("--label-smoothing", label_smoothing, "label smoothing")->check(CLI::Range(0.0, 0.99));
    app.add_option("--drop-path", drop_path, "max drop-path rate (linspace over blocks)")->check(CLI::Range(0.0, 0.99));
    app.add_option("--mixup", mixup, "mixup alpha (0 = off)")->check(CLI::NonNegativeNumber);
    app.add_option("--cutmix", cutmix, "cutmix alpha (0 = off)")->check(CLI::NonNegativeNumber);
    app.add_option("--mix-prob", mix_prob, "probability of mixing a batch")->check(CLI::Range(0.0, 1.0));
    app.add_option("--crop-padding", crop_padding, "random crop padding in pixels")->check(CLI::Range(0, 14));
    app.add_flag("--hflip", hflip, "random horizontal flips");
    app.add_option("--train-limit", train_limit, "use only the first N training images (0 = all)")
        ->check(CLI::NonNegativeNumber);
    app.add_option("--test-limit", test_limit, "use only the first N test images (0 = all)")->check(CLI::NonNegativeNumber);
    app.add_option("--threads", threads, "CPU threads")->check(CLI::Range(1, 1024));
    app.add_option("--seed", seed, "random seed");
    app.add_flag("--no-progress", no_progress, "no progress bar on stderr");
    app.add_flag("--no-resume", no_resume, "start afresh even if a training state exists in --out");
  }

  hatch::FitOptions fit_options(int epochs, const std::string& phase) const {
    hatch::FitOptions o;
    o.epochs = epochs;
    o.batch = batch;
    o.lr = lr;
    o.min_lr = min_lr;
    o.warmup_epochs = warmup_epochs;
    o.weight_decay = weight_decay;
    o.clip = clip;
    o.augment = {.crop_padding = crop_padding, .hflip = hflip, .mixup_alpha = float(mixup),
                 .cutmix_alpha = float(cutmix), .mix_prob = float(mix_prob),
                 .label_smoothing = float(label_smoothing)};
    o.seed = seed;
    o.phase = phase;
    o.out = out;
    o.resume = !no_resume;
    o.progress = !no_progress;
    return o;
  }
  hatch::data::Dataset load(bool train) const {
    return hatch::data::load_fashion_mnist(data, train, train ? train_limit : test_limit);
  }
};

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
