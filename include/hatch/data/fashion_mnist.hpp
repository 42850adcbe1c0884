#pragma once
// Fashion-MNIST as an in-memory Dataset of 8-bit pixels, normalised a sample at a time, plus
// deterministic subsets of it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "hatch/core/error.hpp"
#include "hatch/data/idx.hpp"

namespace hatch::data {

inline constexpr const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";
// The statistics the PyTorch reference normalises with, so both see the same inputs.
inline constexpr float kFashionMnistMean = 0.2860f;
inline constexpr float kFashionMnistStd = 0.3530f;
// A black pixel after normalisation: what zero padding must be to look like the background.
inline constexpr float kFashionMnistBlack = (0.0f - kFashionMnistMean) / kFashionMnistStd;

struct Dataset {
  int n = 0, channels = 1, height = 0, width = 0, classes = 10;
  // The n*C*H*W sample values, held in one of two forms (the other is empty):
  //  - pixels: the raw 8-bit pixels of a set read from files, a quarter of the memory of floats
  //    (the full training set: 47 MB rather than 188 MB). sample() normalises them when a batch
  //    is built, as (p / 255 - mean) / stddev, the same floats a normalised copy would hold.
  //  - images: normalised floats, for sets made in memory whose values are not 8-bit levels
  //    (synthetic sets in the tests, data::shifted's corrupted images).
  std::vector<std::uint8_t> pixels;
  float mean = kFashionMnistMean, stddev = kFashionMnistStd;  // of pixels / 255
  std::vector<float> images;
  std::vector<int> labels;    // n, each in [0, classes)
  std::string source;         // the images file, for messages ("" for sets made in memory)

  std::size_t sample_size() const {
    return static_cast<std::size_t>(channels) * height * width;
  }
  // How many sample values the set holds, in whichever form: n * sample_size() when well formed.
  std::size_t values() const { return pixels.empty() ? images.size() : pixels.size(); }
  // Writes sample i, normalised, to dst[0, sample_size()).
  void sample(std::size_t i, float* dst) const {
    const std::size_t s = sample_size();
    if (pixels.empty()) {
      std::copy_n(images.data() + i * s, s, dst);
      return;
    }
    const std::uint8_t* src = pixels.data() + i * s;
    for (std::size_t j = 0; j < s; ++j) dst[j] = (src[j] / 255.0f - mean) / stddev;
  }
};

// Every sample normalised, n*C*H*W floats in one vector (for small sets and tests; training
// normalises a batch at a time through Batcher).
inline std::vector<float> normalised(const Dataset& d) {
  std::vector<float> out(std::size_t(d.n) * d.sample_size());
  for (int i = 0; i < d.n; ++i) d.sample(std::size_t(i), out.data() + std::size_t(i) * d.sample_size());
  return out;
}

// "1x28x28" (channels x height x width).
inline std::string shape_string(const Dataset& d) {
  return std::to_string(d.channels) + "x" + std::to_string(d.height) + "x" + std::to_string(d.width);
}

// Throws hatch::Error("<images file>: images are 1x32x32 (channels x height x width), <model>
// expects 1x28x28") unless the set's images have the model's shape; call it before training,
// so a wrong file costs nothing.
inline void expect_image_shape(const Dataset& d, int channels, int height, int width, const std::string& model) {
  require(d.channels == channels && d.height == height && d.width == width, d.source.empty() ? "dataset" : d.source,
          "images are " + shape_string(d) + " (channels x height x width), " + model + " expects " +
              std::to_string(channels) + "x" + std::to_string(height) + "x" + std::to_string(width));
}

namespace detail {

// mt19937_64 and seed_seq are fully specified by the standard, unlike std::shuffle and the
// integer distributions, so these give the same streams with every standard library.
inline std::mt19937_64 make_rng(std::uint64_t seed, std::uint64_t a = 0, std::uint64_t b = 0) {
  std::seed_seq seq{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32),
                    static_cast<std::uint32_t>(a),    static_cast<std::uint32_t>(a >> 32),
                    static_cast<std::uint32_t>(b),    static_cast<std::uint32_t>(b >> 32)};
  return std::mt19937_64(seq);
}

// Unbiased integer in [0, n) by rejection.
inline std::uint64_t uniform_below(std::mt19937_64& rng, std::uint64_t n) {
  const std::uint64_t limit = UINT64_MAX - UINT64_MAX % n;
  std::uint64_t r;
  do r = rng();
  while (r >= limit);
  return r % n;
}

inline double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

inline void shuffle(std::vector<int>& v, std::mt19937_64& rng) {
  for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[uniform_below(rng, i)]);
}

inline std::filesystem::path find_idx(const std::filesystem::path& dir, const std::string& stem) {
  for (const auto& file : {stem + ".gz", stem})
    if (std::filesystem::exists(dir / file)) return dir / file;
  throw Error((dir / (stem + ".gz")).string() + ": no such file (nor " + stem +
              " without .gz); expected the Fashion-MNIST IDX files in " + dir.string());
}

inline Dataset gather(const Dataset& d, const std::vector<int>& indices) {
  Dataset out;
  out.n = static_cast<int>(indices.size());
  out.channels = d.channels, out.height = d.height, out.width = d.width, out.classes = d.classes;
  out.source = d.source;
  out.mean = d.mean, out.stddev = d.stddev;
  const std::size_t s = d.sample_size();
  // Copies whichever form d holds, so that a subset of 8-bit pixels stays 8-bit.
  auto copy = [&](const auto& from, auto& to) {
    to.resize(indices.size() * s);
    for (std::size_t i = 0; i < indices.size(); ++i)
      std::copy_n(from.begin() + std::size_t(indices[i]) * s, s, to.begin() + i * s);
  };
  if (d.pixels.empty())
    copy(d.images, out.images);
  else
    copy(d.pixels, out.pixels);
  out.labels.resize(indices.size());
  for (std::size_t i = 0; i < indices.size(); ++i) out.labels[i] = d.labels[indices[i]];
  return out;
}

}  // namespace detail

// Reads <dir>/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]. limit > 0 keeps the first
// `limit` samples (all of them if there are fewer).
inline Dataset load_fashion_mnist(const std::filesystem::path& dir = kFashionMnistDir,
                                  bool train = true, int limit = 0) {
  const std::string prefix = train ? "train" : "t10k";
  const auto images_path = detail::find_idx(dir, prefix + "-images-idx3-ubyte");
  const auto labels_path = detail::find_idx(dir, prefix + "-labels-idx1-ubyte");
  require(limit >= 0, "load_fashion_mnist",
          "limit is " + std::to_string(limit) + ", expected >= 0 (0 = all samples)");

  IdxArray images = read_idx(images_path);
  const IdxArray labels = read_idx(labels_path);
  require(images.dims.size() == 3, images_path.string(),
          "expected 3 dimensions (count x height x width), header has " +
              std::to_string(images.dims.size()));
  require(labels.dims.size() == 1, labels_path.string(),
          "expected 1 dimension (count), header has " + std::to_string(labels.dims.size()));
  require(images.dims[0] == labels.dims[0], images_path.string(),
          "has " + std::to_string(images.dims[0]) + " images but " + labels_path.string() +
              " has " + std::to_string(labels.dims[0]) + " labels; the counts must agree");

  Dataset d;
  d.n = images.dims[0], d.channels = 1, d.height = images.dims[1], d.width = images.dims[2];
  d.classes = 10;
  d.source = images_path.string();
  for (int i = 0; i < d.n; ++i)
    require(labels.data[i] < d.classes, labels_path.string(),
            "label " + std::to_string(labels.data[i]) + " at index " + std::to_string(i) +
                " is outside [0, " + std::to_string(d.classes) + ")");
  if (limit > 0) d.n = std::min(d.n, limit);

  // The file's bytes become the set's pixels without a copy; a limit gives back the rest (a copy
  // of the kept part, so only then).
  const std::size_t count = d.n * d.sample_size();
  d.pixels = std::move(images.data);
  if (count < d.pixels.size()) {
    d.pixels.resize(count);
    d.pixels.shrink_to_fit();
  }
  d.labels.assign(labels.data.begin(), labels.data.begin() + d.n);
  return d;
}

// Samples [first, first + count) in order.
inline Dataset subset(const Dataset& d, int first, int count) {
  require(first >= 0 && count >= 0 && first <= d.n - count, "subset",
          "samples [" + std::to_string(first) + ", " +
              std::to_string(std::int64_t{first} + count) + ") do not lie within the " +
              std::to_string(d.n) + " samples of the dataset");
  std::vector<int> indices(count);
  for (int i = 0; i < count; ++i) indices[i] = first + i;
  return detail::gather(d, indices);
}

// A class-balanced head of the set: the first count / classes samples of every class, in file
// order (the first count % classes classes take one more), so that "the first 3,000 images" has
// 300 of each class. Throws when a class has too few samples.
inline Dataset balanced_first(const Dataset& d, int count) {
  require(count >= 0 && count <= d.n, "balanced_first",
          "asked for " + std::to_string(count) + " samples of a set of " + std::to_string(d.n));
  std::vector<int> want(std::size_t(d.classes), count / std::max(1, d.classes));
  for (int c = 0; c < count % std::max(1, d.classes); ++c) ++want[std::size_t(c)];
  std::vector<int> indices;
  indices.reserve(std::size_t(count));
  for (int i = 0; i < d.n && int(indices.size()) < count; ++i)
    if (want[d.labels[std::size_t(i)]] > 0) {
      --want[d.labels[std::size_t(i)]];
      indices.push_back(i);
    }
  for (int c = 0; c < d.classes; ++c)
    require(want[std::size_t(c)] == 0, d.source.empty() ? "balanced_first" : d.source,
            "class " + std::to_string(c) + " has too few samples for a balanced subset of " + std::to_string(count));
  return detail::gather(d, indices);
}

// round(frac * n) samples (at least one) chosen by a shuffle seeded with `seed`, kept in
// their original order so that e.g. "25% of the training set" is the same set everywhere.
inline Dataset fraction(const Dataset& d, double frac, std::uint64_t seed) {
  require(frac > 0 && frac <= 1, "fraction",
          "fraction is " + std::to_string(frac) + ", expected a value in (0, 1]");
  const int count = d.n == 0 ? 0 : std::clamp(static_cast<int>(std::llround(frac * d.n)), 1, d.n);
  std::vector<int> indices(d.n);
  for (int i = 0; i < d.n; ++i) indices[i] = i;
  auto rng = detail::make_rng(seed);
  detail::shuffle(indices, rng);
  indices.resize(count);
  std::sort(indices.begin(), indices.end());
  return detail::gather(d, indices);
}

}  // namespace hatch::data
