#pragma once
// Mini-batches for one epoch at a time, with the augmentations of the DeiT/timm recipe:
// random crop with zero padding, horizontal flip, mixup / cutmix and label smoothing.
//
// Determinism: the order of an epoch comes from (seed, epoch) and the augmentation of batch b
// from (seed, epoch, b), so batch b is the same however the run got there (a resumed run can
// start_epoch(e, b) and continue exactly).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "hatch/core/error.hpp"
#include "hatch/data/fashion_mnist.hpp"

namespace hatch::data {

struct AugmentOptions {
  int crop_padding = 0;        // random crop of the image padded by this many pixels per side
  bool hflip = false;          // flip with probability 0.5
  float mixup_alpha = 0, cutmix_alpha = 0;  // Beta(alpha, alpha); 0 = off
  float mix_prob = 1.0f;       // probability that a batch is mixed at all
  float switch_prob = 0.5f;    // with both on: probability of cutmix rather than mixup
  float label_smoothing = 0;
  float pad_value = kFashionMnistBlack;  // what crop padding fills with (normalised black)
};

struct Batch {
  int size = 0;
  std::vector<float> images;   // size*C*H*W
  std::vector<float> targets;  // size*classes soft targets, each row sums to 1
  std::vector<int> labels;     // size, the unmixed labels
  float mix_lambda = 1;        // weight of a sample's own label in its target (1 = unmixed)
};

class Batcher {
 public:
  // `data` must outlive the Batcher. Starts at epoch 0.
  Batcher(const Dataset& data, int batch, bool shuffle, std::uint64_t seed,
          AugmentOptions aug = {}, bool drop_last = false)
      : data_(&data), batch_(batch), shuffle_(shuffle), drop_last_(drop_last), seed_(seed),
        aug_(aug) {
    const std::string where = "Batcher";
    require(batch >= 1, where, "batch size is " + std::to_string(batch) + ", expected >= 1");
    require(data.n >= 0 && data.channels >= 1 && data.height >= 1 && data.width >= 1 &&
                data.classes >= 1,
            where, "dataset shape is invalid (n, channels, height, width, classes)");
    require(data.values() == data.n * data.sample_size(), where,
            "dataset has " + std::to_string(data.values()) + " image values, expected " +
                std::to_string(data.n * data.sample_size()));
    require(data.labels.size() == static_cast<std::size_t>(data.n), where,
            "dataset has " + std::to_string(data.labels.size()) + " labels, expected " +
                std::to_string(data.n));
    for (int y : data.labels)
      require(y >= 0 && y < data.classes, where,
              "label " + std::to_string(y) + " is outside [0, " + std::to_string(data.classes) + ")");
    require(aug.crop_padding >= 0, where, "crop_padding must be >= 0");
    require(aug.mixup_alpha >= 0 && std::isfinite(aug.mixup_alpha), where, "mixup_alpha must be >= 0");
    require(aug.cutmix_alpha >= 0 && std::isfinite(aug.cutmix_alpha), where, "cutmix_alpha must be >= 0");
    require(aug.mix_prob >= 0 && aug.mix_prob <= 1, where, "mix_prob must lie in [0, 1]");
    require(aug.switch_prob >= 0 && aug.switch_prob <= 1, where, "switch_prob must lie in [0, 1]");
    require(aug.label_smoothing >= 0 && aug.label_smoothing < 1, where,
            "label_smoothing must lie in [0, 1)");
    start_epoch(0);
  }
  Batcher(Dataset&&, int, bool, std::uint64_t, AugmentOptions = {}, bool = false) = delete;

  int batches_per_epoch() const {
    const std::int64_t n = data_->n;
    return static_cast<int>(drop_last_ ? n / batch_ : (n + batch_ - 1) / batch_);
  }

  // Rewinds to batch `first_batch` of `epoch`.
  void start_epoch(int epoch, int first_batch = 0) {
    require(first_batch >= 0 && first_batch <= batches_per_epoch(), "Batcher::start_epoch",
            "first_batch is " + std::to_string(first_batch) + ", expected [0, " +
                std::to_string(batches_per_epoch()) + "]");
    epoch_ = epoch;
    order_.resize(data_->n);
    for (int i = 0; i < data_->n; ++i) order_[i] = i;
    if (shuffle_) {
      auto rng = detail::make_rng(seed_, static_cast<std::uint32_t>(epoch), 0);
      detail::shuffle(order_, rng);
    }
    batch_index_ = first_batch;
    cursor_ = static_cast<int>(std::min<std::int64_t>(data_->n, std::int64_t{first_batch} * batch_));
  }

  // Fills `out` with the next batch; false at the end of the epoch.
  bool next(Batch& out) {
    const Dataset& d = *data_;
    const int remaining = d.n - cursor_;
    if (remaining <= 0 || (drop_last_ && remaining < batch_)) return false;
    const int size = std::min(batch_, remaining);
    const std::size_t s = d.sample_size(), k = d.classes;
    // Room for a full batch up front, so the last, partial batch and later epochs reuse it.
    out.images.reserve(batch_ * s);
    out.targets.reserve(batch_ * k);
    out.labels.reserve(batch_);
    out.size = size;
    out.images.resize(size * s);
    out.targets.resize(size * k);
    out.labels.resize(size);

    // Epoch stream 0 is the order; batch b uses stream b + 1.
    auto rng = detail::make_rng(seed_, static_cast<std::uint32_t>(epoch_),
                                static_cast<std::uint64_t>(batch_index_) + 1);
    for (int i = 0; i < size; ++i) {
      const int idx = order_[cursor_ + i];
      out.labels[i] = d.labels[idx];
      copy_augmented(idx, &out.images[i * s], rng);
    }
    out.mix_lambda = mix(out, rng);
    write_targets(out);

    cursor_ += size;
    ++batch_index_;
    return true;
  }

 private:
  // Sample idx, normalised (Dataset::sample), cropped and flipped into dst.
  void copy_augmented(int idx, float* dst, std::mt19937_64& rng) {
    const int p = aug_.crop_padding;
    if (p == 0 && !aug_.hflip) {
      data_->sample(std::size_t(idx), dst);
      return;
    }
    // Crop and flip read the normalised sample, so padding is pad_value in normalised space.
    sample_.resize(data_->sample_size());
    data_->sample(std::size_t(idx), sample_.data());
    const float* src = sample_.data();
    // Crop offset within the padded image, relative to the unpadded origin.
    const int oy = p ? static_cast<int>(detail::uniform_below(rng, 2 * p + 1)) - p : 0;
    const int ox = p ? static_cast<int>(detail::uniform_below(rng, 2 * p + 1)) - p : 0;
    const bool flip = aug_.hflip && (rng() >> 63);
    const int h = data_->height, w = data_->width;
    for (int c = 0; c < data_->channels; ++c, src += h * w)
      for (int y = 0; y < h; ++y)
        for (int x = 0; x < w; ++x) {
          const int sy = y + oy, sx = (flip ? w - 1 - x : x) + ox;
          *dst++ = sy >= 0 && sy < h && sx >= 0 && sx < w ? src[sy * w + sx] : aug_.pad_value;
        }
  }

  static double sample_beta(double alpha, std::mt19937_64& rng) {
    std::gamma_distribution<double> gamma(alpha, 1.0);
    const double x = gamma(rng), y = gamma(rng);
    // Both draws underflow to 0 only for tiny alpha, where Beta sits at 0 or 1 anyway.
    if (!(x + y > 0)) return static_cast<double>(rng() >> 63);
    return x / (x + y);
  }

  // timm's Mixup in batch mode: sample i is mixed with sample size-1-i, one lambda per batch.
  // Returns lambda after cutmix's area correction.
  float mix(Batch& b, std::mt19937_64& rng) const {
    const float ma = aug_.mixup_alpha, ca = aug_.cutmix_alpha;
    if ((ma <= 0 && ca <= 0) || detail::uniform01(rng) >= aug_.mix_prob) return 1.0f;
    const bool cutmix = ca > 0 && (ma <= 0 || detail::uniform01(rng) < aug_.switch_prob);
    double lam = sample_beta(cutmix ? ca : ma, rng);

    const std::size_t s = data_->sample_size();
    const int n = b.size, h = data_->height, w = data_->width;
    if (cutmix) {
      const double ratio = std::sqrt(1.0 - lam);
      const int cut_h = static_cast<int>(h * ratio), cut_w = static_cast<int>(w * ratio);
      const int cy = static_cast<int>(detail::uniform_below(rng, h));
      const int cx = static_cast<int>(detail::uniform_below(rng, w));
      const int y0 = std::clamp(cy - cut_h / 2, 0, h), y1 = std::clamp(cy + cut_h / 2, 0, h);
      const int x0 = std::clamp(cx - cut_w / 2, 0, w), x1 = std::clamp(cx + cut_w / 2, 0, w);
      lam = 1.0 - static_cast<double>((y1 - y0) * (x1 - x0)) / (h * w);
      // Pasting j's box into i and i's into j is a swap; the middle sample keeps its own.
      float* img = b.images.data();
      for (int i = 0, j = n - 1; i < j; ++i, --j)
        for (int c = 0; c < data_->channels; ++c)
          for (int y = y0; y < y1; ++y) {
            const std::size_t row = static_cast<std::size_t>(c * h + y) * w;
            std::swap_ranges(img + i * s + row + x0, img + i * s + row + x1, img + j * s + row + x0);
          }
    } else {
      const float l = static_cast<float>(lam), r = 1.0f - l;
      for (int i = 0, j = n - 1; i < j; ++i, --j) {
        float* a = &b.images[i * s];
        float* c = &b.images[j * s];
        for (std::size_t t = 0; t < s; ++t) {
          const float u = a[t], v = c[t];
          a[t] = l * u + r * v;
          c[t] = l * v + r * u;
        }
      }
    }
    return static_cast<float>(lam);
  }

  void write_targets(Batch& b) const {
    const int k = data_->classes;
    const float off = aug_.label_smoothing / k, on = 1.0f - aug_.label_smoothing + off;
    const float lam = b.mix_lambda;
    std::fill(b.targets.begin(), b.targets.end(), off);
    for (int i = 0; i < b.size; ++i) {
      float* row = &b.targets[static_cast<std::size_t>(i) * k];
      row[b.labels[i]] += lam * (on - off);
      row[b.labels[b.size - 1 - i]] += (1.0f - lam) * (on - off);
    }
  }

  const Dataset* data_;
  int batch_;
  bool shuffle_, drop_last_;
  std::uint64_t seed_;
  AugmentOptions aug_;
  int epoch_ = 0, batch_index_ = 0, cursor_ = 0;
  std::vector<int> order_;
  std::vector<float> sample_;  // one normalised sample, for copy_augmented
};

}  // namespace hatch::data
