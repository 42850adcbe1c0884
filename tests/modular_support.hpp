#pragma once
// Helpers shared by the tests of the modular methods (test_incubator.cpp, test_distiller.cpp):
// a temporary run directory, synthetic data, a quick fit recipe, bitwise parameter snapshots and
// file contents (error messages: error_message.hpp).
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <hatch/train/checkpoint.hpp>
#include <hatch/train/fit.hpp>

#include "support.hpp"
#include "files.hpp"

namespace hatch::test {

using TempRunDir = hatch_test::TempDir;


// The names a module's visit gives, in order.
template <class M>
std::vector<std::string> names_of(M& module) {
  std::vector<std::string> out;
  module.visit([&](const std::string& n, Parameter<typename M::backend>&) { out.push_back(n); }, "");
  return out;
}

// n random 28x28 single-channel "images" in 10 classes.
inline data::Dataset synthetic(int n, std::uint64_t seed) {
  data::Dataset d;
  d.n = n;
  d.channels = 1;
  d.height = d.width = 28;
  d.classes = 10;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  d.images.resize(std::size_t(n) * d.sample_size());
  for (auto& v : d.images) v = nd(rng);
  d.labels.resize(n);
  for (auto& l : d.labels) l = int(rng() % 10);
  return d;
}

inline FitOptions quick(int epochs = 1) {
  FitOptions o;
  o.epochs = epochs;
  o.batch = 32;
  o.eval_batch = 64;
  o.lr = 2e-3;
  o.warmup_epochs = 0;
  o.augment.label_smoothing = 0.1f;
  o.progress = false;
  o.seed = 3;
  return o;
}

using Bytes = std::vector<std::uint8_t>;
using TensorBytes = std::map<std::string, Bytes>;

// Every parameter's bytes by name (host float = the file's little-endian F32): equality is bitwise.
template <class M>
TensorBytes snapshot(M& module) {
  using B = typename M::backend;
  TensorBytes out;
  module.visit(
      [&](const std::string& name, Parameter<B>& p) {
        const auto h = p.value.to_host();
        Bytes bytes(h.size() * sizeof(h[0]));
        if (!h.empty()) std::memcpy(bytes.data(), h.data(), bytes.size());
        out[name] = std::move(bytes);
      },
      "");
  return out;
}
inline TensorBytes file_tensors(const std::filesystem::path& file) {
  const auto f = io::SafeTensorsFile::read(file);
  TensorBytes out;
  for (const auto& n : f.names()) out[n] = f.at(n).bytes;
  return out;
}
using hatch_test::file_bytes;
inline std::string meta_entry(const std::filesystem::path& file, const std::string& key) {
  const auto m = read_metadata(file);
  auto it = m.find(key);
  return it == m.end() ? "(absent)" : it->second;
}

}  // namespace hatch::test
