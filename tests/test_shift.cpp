// The out-of-distribution test set (data/shift.hpp): deterministic, shape- and label-preserving,
// and each corruption doing what its name says.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <set>
#include <vector>

#include "error_message.hpp"
#include "hatch/data/fashion_mnist.hpp"
#include "hatch/data/shift.hpp"

using namespace hatch::data;

namespace {

constexpr int kSide = 28;

float normalise(double p) { return float((p - kFashionMnistMean) / kFashionMnistStd); }

// A set of n 28x28 images, each a bright rectangle (a different one per image) on black, with
// a gradient inside so that every corruption has something to act on.
Dataset synthetic(int n, int channels = 1) {
  Dataset d;
  d.n = n, d.channels = channels, d.height = kSide, d.width = kSide, d.classes = 10;
  d.images.assign(std::size_t(n) * d.sample_size(), normalise(0));
  for (int i = 0; i < n; ++i) {
    d.labels.push_back(i % 10);
    const int top = 4 + i % 7, left = 3 + (i * 3) % 8, bottom = top + 10 + i % 5, right = left + 12 + i % 4;
    for (int c = 0; c < channels; ++c)
      for (int y = top; y < bottom; ++y)
        for (int x = left; x < right; ++x)
          d.images[std::size_t(i) * d.sample_size() + std::size_t(c) * kSide * kSide + std::size_t(y) * kSide + x] =
              normalise(0.5 + 0.5 * (x - left) / (right - left) - 0.1 * c);
  }
  return d;
}

Plane plane_of(const std::vector<double>& p) { return Plane{kSide, kSide, p}; }

// A horizontal bar, 3 rows high and 20 wide, through the centre.
Plane horizontal_bar() {
  Plane p{kSide, kSide, std::vector<double>(kSide * kSide, 0.0)};
  for (int y = 13; y <= 15; ++y)
    for (int x = 4; x < 24; ++x) p.at(y, x) = 1.0;
  return p;
}

double total(const Plane& p) {
  double s = 0;
  for (double v : p.p) s += v;
  return s;
}
// Sum of |differences| between neighbouring pixels, across and down.
double total_variation(const Plane& p) {
  double tv = 0;
  for (int y = 0; y < p.h; ++y)
    for (int x = 0; x < p.w; ++x) {
      if (x + 1 < p.w) tv += std::abs(p.at(y, x + 1) - p.at(y, x));
      if (y + 1 < p.h) tv += std::abs(p.at(y + 1, x) - p.at(y, x));
    }
  return tv;
}
double spread(const Plane& p) {
  const auto [lo, hi] = std::minmax_element(p.p.begin(), p.p.end());
  return *hi - *lo;
}
// Mass-weighted mean row and column, and the mass outside rows 13..15.
struct Moments {
  double row = 0, col = 0, off_bar = 0;
};
Moments moments(const Plane& p) {
  Moments m;
  const double t = total(p);
  for (int y = 0; y < p.h; ++y)
    for (int x = 0; x < p.w; ++x) {
      m.row += y * p.at(y, x) / t;
      m.col += x * p.at(y, x) / t;
      if (y < 13 || y > 15) m.off_bar += p.at(y, x) / t;
    }
  return m;
}
// Mass in the top-left and bottom-right quarters minus that in the other two.
double diagonal_balance(const Plane& p) {
  double b = 0;
  for (int y = 0; y < p.h; ++y)
    for (int x = 0; x < p.w; ++x) b += ((y < p.h / 2) == (x < p.w / 2) ? 1 : -1) * p.at(y, x);
  return b;
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

bool image_differs(const Dataset& a, const Dataset& b, int i) {
  const std::size_t s = a.sample_size();
  std::vector<float> x(s), y(s);  // either set may hold 8-bit pixels (a loaded one) or floats
  a.sample(std::size_t(i), x.data());
  b.sample(std::size_t(i), y.data());
  for (std::size_t j = 0; j < s; ++j)
    if (std::abs(x[j] - y[j]) > 1e-3f) return true;
  return false;
}

}  // namespace

TEST_CASE("shifted: the same seed gives the same set, bit for bit; labels and shape are kept") {
  const auto d = synthetic(23, 2);
  const auto a = shifted(d), b = shifted(d);
  CHECK(bitwise_equal(a.images, b.images));
  CHECK(a.n == d.n);
  CHECK(a.channels == 2);
  CHECK(a.height == kSide);
  CHECK(a.width == kSide);
  CHECK(a.classes == d.classes);
  CHECK(a.images.size() == d.images.size());
  CHECK(a.labels == d.labels);
  CHECK_FALSE(bitwise_equal(a.images, d.images));
}

TEST_CASE("shifted: another seed gives another set") {
  const auto d = synthetic(10);
  const auto a = shifted(d), b = shifted(d, kOodSeed + 1);
  CHECK(a.labels == b.labels);
  int differing = 0;
  for (int i = 0; i < d.n; ++i) differing += image_differs(a, b, i);
  CHECK(differing == d.n);  // every kind draws its parameters from the seed
}

TEST_CASE("shifted: every corruption kind is used, a fifth of the images each, and changes the image") {
  const auto d = synthetic(25);
  const auto s = shifted(d);
  std::set<Corruption> used;
  int per_kind[kCorruptions] = {};
  for (int i = 0; i < d.n; ++i) {
    used.insert(corruption_of(i));
    ++per_kind[int(corruption_of(i))];
    INFO("image " << i << ", corruption " << int(corruption_of(i)));
    CHECK(image_differs(d, s, i));
  }
  CHECK(used.size() == std::size_t(kCorruptions));
  for (int k = 0; k < kCorruptions; ++k) CHECK(per_kind[k] == d.n / kCorruptions);
}

TEST_CASE("shifted: values stay within the normalised image of [0, 1]") {
  const auto s = shifted(synthetic(30, 3));
  const float lo = normalise(0), hi = normalise(1);
  const auto [mn, mx] = std::minmax_element(s.images.begin(), s.images.end());
  CHECK(*mn >= lo - 1e-6f);
  CHECK(*mx <= hi + 1e-6f);
  // The noise reaches both bounds on a set this size: the clamp is what keeps them.
  CHECK(*mn == doctest::Approx(lo).epsilon(1e-6));
  CHECK(*mx == doctest::Approx(hi).epsilon(1e-6));
}

TEST_CASE("shifted: a set whose sizes disagree is refused") {
  auto d = synthetic(3);
  d.labels.pop_back();
  CHECK(hatch::test::error_message([&] { (void)shifted(d); }).find("2 labels for 3 images of 1x28x28") !=
        std::string::npos);
}

TEST_CASE("rotate: a horizontal bar turns out of the horizontal, about the centre, the right way") {
  const Plane bar = horizontal_bar();
  const Moments before = moments(bar);
  CHECK(before.off_bar == doctest::Approx(0));
  for (double degrees : {30.0, -30.0, 15.0}) {
    INFO(degrees << " degrees");
    const Plane r = corrupt::rotate(bar, degrees);
    const Moments after = moments(r);
    CHECK(after.off_bar > 0.4);                                // most rows of the bar left rows 13..15
    CHECK(after.row == doctest::Approx(before.row).epsilon(0.02));  // centre stays
    CHECK(after.col == doctest::Approx(before.col).epsilon(0.02));
    CHECK(total(r) == doctest::Approx(total(bar)).epsilon(0.05));   // bilinear keeps the mass inside
    // Anticlockwise on screen (rows downwards): the right end rises, into the top-right quarter.
    if (degrees > 0) CHECK(diagonal_balance(r) < -0.2 * total(r));
    else CHECK(diagonal_balance(r) > 0.2 * total(r));
  }
  // A turn by 0 is the identity.
  const Plane same = corrupt::rotate(bar, 0);
  for (std::size_t j = 0; j < bar.p.size(); ++j) REQUIRE(same.p[j] == doctest::Approx(bar.p[j]));
}

TEST_CASE("blur: total variation falls, the mass stays, a constant image stays constant") {
  const Plane bar = horizontal_bar();
  const Plane b = corrupt::blur(bar, 1.2);
  CHECK(total_variation(b) < 0.9 * total_variation(bar));  // its edges keep their steps, the thin rows fade
  Plane checker{kSide, kSide, std::vector<double>(kSide * kSide)};
  for (int y = 0; y < kSide; ++y)
    for (int x = 0; x < kSide; ++x) checker.at(y, x) = (x + y) % 2;
  CHECK(total_variation(corrupt::blur(checker, 1.0)) < 0.05 * total_variation(checker));
  CHECK(total(b) == doctest::Approx(total(bar)).epsilon(1e-9));
  const Plane flat = plane_of(std::vector<double>(kSide * kSide, 0.3));
  for (double v : corrupt::blur(flat, 1.5).p) REQUIRE(v == doctest::Approx(0.3));
}

TEST_CASE("reduce_contrast: the spread shrinks by the factor, the mean stays") {
  const Plane bar = horizontal_bar();
  const Plane c = corrupt::reduce_contrast(bar, 0.4);
  CHECK(spread(c) == doctest::Approx(0.4 * spread(bar)));
  CHECK(total(c) == doctest::Approx(total(bar)));
}

TEST_CASE("add_noise: zero-mean, of the asked deviation, reproducible from the generator") {
  const Plane grey = plane_of(std::vector<double>(kSide * kSide, 0.5));
  auto rng = detail::make_rng(1, 2);
  const Plane n = corrupt::add_noise(grey, 0.15, rng);
  double mean = 0, var = 0;
  for (double v : n.p) mean += (v - 0.5) / n.p.size();
  for (double v : n.p) var += (v - 0.5 - mean) * (v - 0.5 - mean) / n.p.size();
  CHECK(std::abs(mean) < 0.02);
  CHECK(std::sqrt(var) == doctest::Approx(0.15).epsilon(0.1));
  auto again = detail::make_rng(1, 2);
  CHECK(corrupt::add_noise(grey, 0.15, again).p == n.p);
}

TEST_CASE("elastic: the field is smooth and as large as asked; displacing by it moves the bar") {
  auto rng = detail::make_rng(7);
  const auto f = corrupt::elastic_field(kSide, kSide, 2.0, rng);
  double peak = 0, step = 0;
  for (int y = 0; y < kSide; ++y)
    for (int x = 0; x < kSide; ++x) {
      peak = std::max({peak, std::abs(f.dy.at(y, x)), std::abs(f.dx.at(y, x))});
      if (x + 1 < kSide) step = std::max(step, std::abs(f.dx.at(y, x + 1) - f.dx.at(y, x)));
    }
  CHECK(peak == doctest::Approx(2.0));
  CHECK(step < 0.5);  // neighbours move nearly alike: a deformation, not noise
  const Plane bar = horizontal_bar();
  const Plane moved = corrupt::displace(bar, f);
  CHECK(moments(moved).off_bar > 0.05);
  // No displacement is the identity.
  const corrupt::Displacement none{plane_of(std::vector<double>(kSide * kSide)),
                                   plane_of(std::vector<double>(kSide * kSide))};
  CHECK(corrupt::displace(bar, none).p == bar.p);
}

TEST_CASE("shifted on the real Fashion-MNIST test set: deterministic, and no image left as it was") {
  if (!std::filesystem::exists(std::filesystem::path(kFashionMnistDir) / "t10k-labels-idx1-ubyte.gz")) {
    MESSAGE("skipping: " << kFashionMnistDir << " not found");
    return;
  }
  const auto test = load_fashion_mnist(kFashionMnistDir, false, 200);
  const auto a = shifted(test), b = shifted(test);
  CHECK(bitwise_equal(a.images, b.images));
  CHECK(a.labels == test.labels);
  int changed = 0;
  for (int i = 0; i < test.n; ++i) changed += image_differs(test, a, i);
  CHECK(changed == test.n);
}
