#pragma once
// A learnable synthetic set for training tests: the class is encoded in which image row is
// bright. Only the Dataset type is needed, so CUDA test units (nvcc, no Eigen) include it too.
#include <cstdint>
#include <random>

#include <hatch/data/fashion_mnist.hpp>

namespace hatch::test {

inline data::Dataset learnable_set(int n, std::uint64_t seed) {
  data::Dataset d;
  d.n = n;
  d.height = d.width = 28;
  d.images.resize(std::size_t(n) * 28 * 28);
  d.labels.resize(n);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> noise(0.f, 0.3f);
  for (int i = 0; i < n; ++i) {
    const int c = int(rng() % 10);
    d.labels[i] = c;
    for (int p = 0; p < 28 * 28; ++p) d.images[std::size_t(i) * 784 + p] = noise(rng) + ((p / 28) / 3 == c ? 2.f : 0.f);
  }
  return d;
}

}  // namespace hatch::test
