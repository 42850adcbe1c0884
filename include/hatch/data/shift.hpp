#pragma once
// A deterministic out-of-distribution test set: every image of a Fashion-MNIST test set
// corrupted by one of five corruptions, in the role Tiny-ImageNet-R plays in the m2mKD paper
// (docs/design.md, "Out-of-distribution test set").
//
// Definition. Image i (0-based) of the set gets corruption i mod 5, so each kind corrupts a
// fifth of the images; its parameters come from detail::make_rng(seed, i) (std::mt19937_64 over a
// std::seed_seq, both fully specified by the standard), read as uniform doubles
// u = (rng() >> 11) * 2^-53 and, for the noise, standard normals by Box-Muller. The seed is
// kOodSeed unless given. The corruptions act on the pixel intensities p in [0, 1] (the set's
// normalised values x give p = x * kFashionMnistStd + kFashionMnistMean), each channel alike:
//   0 rotation  — by a in [15, 30] degrees, either sign (u for a, then one bit for the sign),
//                 about the image centre, bilinear sampling; outside the image is black (0).
//   1 noise     — plus sigma * N(0, 1) per pixel, sigma in [0.10, 0.20].
//   2 contrast  — m + c * (p - m), m the image's mean intensity, c in [0.30, 0.50].
//   3 blur      — Gaussian of sigma in [1.0, 1.5] pixels, radius ceil(3 sigma), separable, the
//                 borders extended by their edge pixels.
//   4 elastic   — moved along a displacement field (Simard et al. 2003): per pixel and axis a
//                 uniform value in [-1, 1], Gaussian-smoothed with sigma 4 pixels (as the blur),
//                 scaled so that its largest component is A in [1.5, 2.5] pixels; the image is
//                 sampled at p + field bilinearly, outside is black.
// The results are clamped to [0, 1] and normalised again as load_fashion_mnist does. Same seed,
// same set: bit for bit with the same standard library (the sampling and blurs use only + - *
// / in double; the rotation's cos/sin, the noise's log/sqrt/cos and exp in the Gaussian
// weights come from <cmath>).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <random>
#include <vector>

#include "hatch/core/error.hpp"
#include "hatch/data/fashion_mnist.hpp"

namespace hatch::data {

inline constexpr std::uint64_t kOodSeed = 0x4f4f44;  // "OOD"

enum class Corruption { rotation, noise, contrast, blur, elastic };
inline constexpr int kCorruptions = 5;

// The corruption image `index` of a shifted set gets.
inline Corruption corruption_of(std::int64_t index) { return Corruption(index % kCorruptions); }

// One channel of an image: h x w intensities, row-major, in double for the arithmetic.
struct Plane {
  int h = 0, w = 0;
  std::vector<double> p;
  double at(int y, int x) const { return p[std::size_t(y) * w + x]; }
  double& at(int y, int x) { return p[std::size_t(y) * w + x]; }
};

namespace corrupt {

inline double uniform(std::mt19937_64& rng, double lo, double hi) { return lo + (hi - lo) * detail::uniform01(rng); }

// Box-Muller from two uniforms (the first moved to (0, 1] for the log); std::normal_distribution
// is not used because its output differs between standard libraries.
inline double normal(std::mt19937_64& rng) {
  const double u1 = 1.0 - detail::uniform01(rng), u2 = detail::uniform01(rng);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

// The plane at (y, x), bilinearly between the four pixels around it; pixels outside are black.
inline double sample(const Plane& in, double y, double x) {
  const double fy = std::floor(y), fx = std::floor(x);
  const int y0 = int(fy), x0 = int(fx);
  const double dy = y - fy, dx = x - fx;
  auto px = [&](int yy, int xx) { return yy >= 0 && yy < in.h && xx >= 0 && xx < in.w ? in.at(yy, xx) : 0.0; };
  return (1 - dy) * ((1 - dx) * px(y0, x0) + dx * px(y0, x0 + 1)) + dy * ((1 - dx) * px(y0 + 1, x0) + dx * px(y0 + 1, x0 + 1));
}

// Rotation by `degrees` (positive: anticlockwise as the image is shown, rows downwards) about the centre.
inline Plane rotate(const Plane& in, double degrees) {
  const double r = degrees * std::numbers::pi / 180, c = std::cos(r), s = std::sin(r);
  const double cy = (in.h - 1) / 2.0, cx = (in.w - 1) / 2.0;
  Plane out{in.h, in.w, std::vector<double>(in.p.size())};
  for (int y = 0; y < in.h; ++y)
    for (int x = 0; x < in.w; ++x) {
      // The source of (x, y): the inverse rotation. With rows downwards, an anticlockwise turn on
      // screen maps (dx, dy) to (c dx + s dy, -s dx + c dy); its inverse is the transpose.
      const double dx = x - cx, dy = y - cy;
      out.at(y, x) = sample(in, cy + s * dx + c * dy, cx + c * dx - s * dy);
    }
  return out;
}

inline Plane add_noise(const Plane& in, double sigma, std::mt19937_64& rng) {
  Plane out = in;
  for (auto& v : out.p) v += sigma * normal(rng);
  return out;
}

// Every pixel `factor` of its former distance from the image's mean.
inline Plane reduce_contrast(const Plane& in, double factor) {
  double mean = 0;
  for (double v : in.p) mean += v;
  mean /= double(std::max<std::size_t>(1, in.p.size()));
  Plane out = in;
  for (auto& v : out.p) v = mean + factor * (v - mean);
  return out;
}

// Separable Gaussian blur, radius ceil(3 sigma), borders extended by their edge pixels.
inline Plane blur(const Plane& in, double sigma) {
  const int radius = int(std::ceil(3 * sigma));
  std::vector<double> k(std::size_t(2 * radius + 1));
  double sum = 0;
  for (int i = -radius; i <= radius; ++i) sum += k[std::size_t(i + radius)] = std::exp(-i * i / (2 * sigma * sigma));
  for (auto& v : k) v /= sum;
  Plane rows{in.h, in.w, std::vector<double>(in.p.size())}, out = rows;
  for (int y = 0; y < in.h; ++y)
    for (int x = 0; x < in.w; ++x) {
      double a = 0;
      for (int i = -radius; i <= radius; ++i) a += k[std::size_t(i + radius)] * in.at(y, std::clamp(x + i, 0, in.w - 1));
      rows.at(y, x) = a;
    }
  for (int y = 0; y < in.h; ++y)
    for (int x = 0; x < in.w; ++x) {
      double a = 0;
      for (int i = -radius; i <= radius; ++i) a += k[std::size_t(i + radius)] * rows.at(std::clamp(y + i, 0, in.h - 1), x);
      out.at(y, x) = a;
    }
  return out;
}

// A smooth random displacement field (dy, dx per pixel) whose largest component is `amplitude` pixels.
struct Displacement {
  Plane dy, dx;
};
inline Displacement elastic_field(int h, int w, double amplitude, std::mt19937_64& rng, double smoothing = 4.0) {
  Plane dy{h, w, std::vector<double>(std::size_t(h) * w)}, dx = dy;
  for (auto& v : dy.p) v = uniform(rng, -1, 1);
  for (auto& v : dx.p) v = uniform(rng, -1, 1);
  dy = blur(dy, smoothing);
  dx = blur(dx, smoothing);
  double peak = 0;
  for (double v : dy.p) peak = std::max(peak, std::abs(v));
  for (double v : dx.p) peak = std::max(peak, std::abs(v));
  const double scale = peak > 0 ? amplitude / peak : 0;
  for (auto& v : dy.p) v *= scale;
  for (auto& v : dx.p) v *= scale;
  return {std::move(dy), std::move(dx)};
}
inline Plane displace(const Plane& in, const Displacement& f) {
  Plane out{in.h, in.w, std::vector<double>(in.p.size())};
  for (int y = 0; y < in.h; ++y)
    for (int x = 0; x < in.w; ++x) out.at(y, x) = sample(in, y + f.dy.at(y, x), x + f.dx.at(y, x));
  return out;
}

}  // namespace corrupt

// Image `index` of a set (its C planes of intensities in [0, 1]) corrupted as the header comment defines,
// with parameters from seed and index.
inline std::vector<Plane> corrupt_image(std::vector<Plane> planes, std::int64_t index, std::uint64_t seed) {
  auto rng = detail::make_rng(seed, std::uint64_t(index));
  if (planes.empty()) return planes;
  const int h = planes[0].h, w = planes[0].w;
  switch (corruption_of(index)) {
    case Corruption::rotation: {
      const double a = corrupt::uniform(rng, 15, 30), degrees = (rng() >> 63) ? -a : a;
      for (auto& p : planes) p = corrupt::rotate(p, degrees);
      break;
    }
    case Corruption::noise: {
      const double sigma = corrupt::uniform(rng, 0.10, 0.20);
      for (auto& p : planes) p = corrupt::add_noise(p, sigma, rng);
      break;
    }
    case Corruption::contrast: {
      const double c = corrupt::uniform(rng, 0.30, 0.50);
      for (auto& p : planes) p = corrupt::reduce_contrast(p, c);
      break;
    }
    case Corruption::blur: {
      const double sigma = corrupt::uniform(rng, 1.0, 1.5);
      for (auto& p : planes) p = corrupt::blur(p, sigma);
      break;
    }
    case Corruption::elastic: {
      const double amplitude = corrupt::uniform(rng, 1.5, 2.5);
      const auto field = corrupt::elastic_field(h, w, amplitude, rng);
      for (auto& p : planes) p = corrupt::displace(p, field);
      break;
    }
  }
  for (auto& p : planes)
    for (auto& v : p.p) v = std::clamp(v, 0.0, 1.0);
  return planes;
}

// The shifted copy of a test set normalised as load_fashion_mnist normalises: same size, shape
// and labels, image i corrupted by corruption_of(i) with parameters drawn from (seed, i).
inline Dataset shifted(const Dataset& test, std::uint64_t seed = kOodSeed) {
  const std::size_t s = test.sample_size(), plane = std::size_t(test.height) * test.width;
  require(test.values() == std::size_t(test.n) * s && test.labels.size() == std::size_t(test.n),
          test.source.empty() ? "shifted" : test.source,
          "the set has " + std::to_string(test.values()) + " pixel values and " +
              std::to_string(test.labels.size()) + " labels for " + std::to_string(test.n) + " images of " +
              shape_string(test));
  // The corrupted images are held as floats: blur, noise and contrast land between 8-bit levels,
  // and rounding them to 8 bits would change the set (and every OOD number measured on it).
  Dataset out = test;
  out.pixels = {};
  out.images.resize(std::size_t(test.n) * s);
  std::vector<float> src(s);
  for (int i = 0; i < test.n; ++i) {
    std::vector<Plane> planes(std::size_t(test.channels), Plane{test.height, test.width, std::vector<double>(plane)});
    test.sample(std::size_t(i), src.data());
    for (int c = 0; c < test.channels; ++c)
      for (std::size_t j = 0; j < plane; ++j)
        planes[std::size_t(c)].p[j] =
            std::clamp(double(src[std::size_t(c) * plane + j]) * kFashionMnistStd + kFashionMnistMean, 0.0, 1.0);
    planes = corrupt_image(std::move(planes), i, seed);
    float* dst = out.images.data() + std::size_t(i) * s;
    for (int c = 0; c < test.channels; ++c)
      for (std::size_t j = 0; j < plane; ++j)
        dst[std::size_t(c) * plane + j] = float((planes[std::size_t(c)].p[j] - kFashionMnistMean) / kFashionMnistStd);
  }
  return out;
}

}  // namespace hatch::data
