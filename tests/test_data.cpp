// The data layer: IDX parsing (real files and damaged copies), Fashion-MNIST, batching.
#include <doctest/doctest.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "error_message.hpp"
#include "hatch/data/batcher.hpp"
#include "hatch/data/fashion_mnist.hpp"
#include "hatch/data/idx.hpp"
#include "files.hpp"

namespace fs = std::filesystem;
using namespace hatch::data;
using hatch::test::error_message;
using Bytes = std::vector<std::uint8_t>;

namespace {

bool have_real_data() {
  const bool ok = fs::exists(fs::path(kFashionMnistDir) / "t10k-labels-idx1-ubyte.gz");
  if (!ok) MESSAGE("skipping real-data checks: " << kFashionMnistDir << " not found");
  return ok;
}

const Dataset& real_train() {
  static const Dataset d = load_fashion_mnist(kFashionMnistDir, true);
  return d;
}

// A temporary directory (tests/files.hpp) that also writes files into itself.
struct TempDir : hatch_test::TempDir {
  fs::path write(const std::string& name, const Bytes& bytes) const {
    std::ofstream out(path / name, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    return path / name;
  }
};

Bytes read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), {});
}

Bytes gzip(const Bytes& raw) {
  z_stream zs{};
  REQUIRE(deflateInit2(&zs, 6, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY) == Z_OK);
  Bytes out(deflateBound(&zs, raw.size()) + 64);
  zs.next_in = const_cast<Bytef*>(raw.data());
  zs.avail_in = static_cast<uInt>(raw.size());
  zs.next_out = out.data();
  zs.avail_out = static_cast<uInt>(out.size());
  REQUIRE(deflate(&zs, Z_FINISH) == Z_STREAM_END);
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}

Bytes idx_bytes(const std::vector<std::uint32_t>& dims, const Bytes& payload) {
  Bytes b{0, 0, 0x08, static_cast<std::uint8_t>(dims.size())};
  for (auto d : dims)
    for (int shift = 24; shift >= 0; shift -= 8) b.push_back(static_cast<std::uint8_t>(d >> shift));
  b.insert(b.end(), payload.begin(), payload.end());
  return b;
}

// The raw (ungzipped) bytes of a real IDX file, rebuilt from what read_idx returns.
Bytes raw_real(const std::string& file) {
  const IdxArray a = read_idx(fs::path(kFashionMnistDir) / file);
  return idx_bytes({a.dims.begin(), a.dims.end()}, a.data);
}


// The message must start with `where` and contain every one of `phrases`.
template <class F>
void check_error(F&& f, const std::string& where, std::initializer_list<std::string> phrases) {
  const std::string msg = error_message(f);
  INFO("message: " << msg);
  CHECK(msg.rfind(where, 0) == 0);
  for (const auto& p : phrases) CHECK(msg.find(p) != std::string::npos);
}

// Sample k's pixel (c, y, x) holds k*1000 + (c*H + y)*W + x, so any output pixel names its source.
Dataset numbered_dataset(int n, int c, int h, int w, int classes = 10) {
  Dataset d;
  d.n = n, d.channels = c, d.height = h, d.width = w, d.classes = classes;
  d.images.resize(static_cast<std::size_t>(n) * c * h * w);
  for (std::size_t i = 0; i < d.images.size(); ++i)
    d.images[i] = static_cast<float>(i / d.sample_size() * 1000 + i % d.sample_size());
  for (int k = 0; k < n; ++k) d.labels.push_back((k * 7) % classes);
  return d;
}

int sample_of(const Batch& b, int i, std::size_t s) {
  return static_cast<int>(b.images[i * s] / 1000);
}

}  // namespace

// ---------------------------------------------------------------------------------- idx

TEST_CASE("idx: parses plain, gzipped and multi-member gzip buffers") {
  const Bytes payload{1, 2, 3, 4, 5, 6};
  const Bytes raw = idx_bytes({2, 3}, payload);
  for (const Bytes& b : {raw, gzip(raw)}) {
    const IdxArray a = parse_idx(b.data(), b.size(), "mem");
    CHECK(a.dims == std::vector<int>{2, 3});
    CHECK(a.data == payload);
  }
  // gzip -c a b > c produces concatenated members, which gunzip accepts.
  Bytes two = gzip(Bytes(raw.begin(), raw.begin() + 9));
  const Bytes second = gzip(Bytes(raw.begin() + 9, raw.end()));
  two.insert(two.end(), second.begin(), second.end());
  CHECK(parse_idx(two.data(), two.size(), "mem").data == payload);
}

TEST_CASE("idx: defects in synthetic buffers") {
  auto parse = [](Bytes b) { return [b] { parse_idx(b.data(), b.size(), "buf"); }; };
  check_error(parse({}), "buf: ", {"too short"});
  check_error(parse({0, 0, 8}), "buf: ", {"too short"});
  check_error(parse({0, 0, 8, 0}), "buf: ", {"0 dimensions"});
  check_error(parse({0, 0, 8, 2, 0, 0, 0, 1}), "buf: ", {"truncated header", "need 12 bytes"});
  check_error(parse(idx_bytes({2, 0, 3}, {})), "buf: ", {"dimension 1 is 0"});
  check_error(parse(idx_bytes({0xffffffffu}, {})), "buf: ", {"dimension 0 is negative", "(-1)"});
  check_error(parse(idx_bytes({65536, 65536}, {})), "buf: ", {"65536x65536", "header looks corrupt"});
  check_error(parse(idx_bytes({2, 3}, {1, 2})), "buf: ",
              {"truncated: header says 2x3 = 6 bytes of data, file has 2"});
  check_error(parse(idx_bytes({2}, {1, 2, 3})), "buf: ", {"trailing garbage", "(1 extra)"});
  check_error(parse(gzip(idx_bytes({2}, {1}))), "buf: ",
              {"truncated: header says 2 = 2 bytes of data, decompressed file has 1"});
  Bytes gz = gzip(idx_bytes({4}, {1, 2, 3, 4}));
  gz[gz.size() - 6] ^= 0xff;  // inside the CRC32 trailer
  check_error(parse(gz), "buf: ", {"corrupt gzip data"});
  check_error(parse({0x1f, 0x8b}), "buf: ", {"truncated gzip stream"});
  CHECK_THROWS_AS(parse_idx(nullptr, 10, "null"), hatch::Error);
}

TEST_CASE("idx: a gzip bomb stops at the size cap") {
  const Bytes gz = gzip(Bytes(4 << 20, 0));  // 4 MiB of zeros in about 4 KiB
  CHECK(gz.size() < 10000u);
  check_error([&] { parse_idx(gz.data(), gz.size(), "bomb", 1 << 20); }, "bomb: ",
              {"decompresses to more than 1048576 bytes"});
  check_error([&] { parse_idx(gz.data(), gz.size(), "bomb", 4 << 20); }, "bomb: ",
              {"unsupported element type 0x00"});
  const Bytes big = idx_bytes({1024, 1025}, {});
  check_error([&] { parse_idx(big.data(), big.size(), "big", 1 << 20); }, "big: ",
              {"1024x1025 exceed 1048576 bytes"});
}

TEST_CASE("idx: the real files") {
  if (!have_real_data()) return;
  const fs::path dir = kFashionMnistDir;
  const IdxArray images = read_idx(dir / "train-images-idx3-ubyte.gz");
  CHECK(images.dims == std::vector<int>{60000, 28, 28});
  CHECK(images.data.size() == 47040000u);
  // The payload stays in the gunzip buffer, sized from the gzip trailer: no 4x over-allocation.
  CHECK(images.data.capacity() <= images.data.size() + 64);
  const IdxArray labels = read_idx(dir / "t10k-labels-idx1-ubyte.gz");
  CHECK(labels.dims == std::vector<int>{10000});
}

TEST_CASE("idx: damaged copies of the real files") {
  if (!have_real_data()) return;
  const fs::path dir = kFashionMnistDir;
  const TempDir tmp;
  const Bytes gz = read_bytes(dir / "t10k-images-idx3-ubyte.gz");
  const Bytes raw = raw_real("t10k-images-idx3-ubyte.gz");
  REQUIRE(raw.size() == 16u + 10000u * 28 * 28);
  auto check_file = [&](const std::string& name, const Bytes& bytes,
                        std::initializer_list<std::string> phrases) {
    const fs::path p = tmp.write(name, bytes);
    check_error([&] { read_idx(p); }, p.string() + ": ", phrases);
  };

  check_file("half.gz", Bytes(gz.begin(), gz.begin() + gz.size() / 2), {"truncated gzip stream"});
  check_file("short", Bytes(raw.begin(), raw.end() - 1000),
             {"truncated: header says 10000x28x28 = 7840000 bytes of data, file has 7839000"});
  check_file("short.gz", gzip(Bytes(raw.begin(), raw.end() - 1000)),
             {"truncated", "decompressed file has 7839000"});
  Bytes bad = raw;
  bad[0] = 0x12;
  check_file("magic", bad, {"bad magic 0x12 0x00 0x08 0x03"});
  bad = raw;
  bad[2] = 0x0d;
  check_file("type", bad, {"unsupported element type 0x0d (float32)", "only 0x08"});
  bad = raw;
  std::reverse(bad.begin() + 4, bad.begin() + 8);  // 10000 written little-endian
  check_file("swapped", bad, {"header looks corrupt"});
  bad = raw;
  bad.insert(bad.end(), {'j', 'u', 'n', 'k'});
  check_file("trailing", bad, {"trailing garbage", "(4 extra)"});
  bad = gz;
  bad.insert(bad.end(), {'j', 'u', 'n', 'k'});
  check_file("trailing.gz", bad, {"trailing garbage: 4 bytes after the end of the gzip stream"});
  bad = gz;
  for (std::size_t i = gz.size() / 3; i < gz.size() / 3 + 64; ++i) bad[i] ^= 0x5a;
  check_file("corrupt.gz", bad, {"corrupt gzip data"});
  Bytes garbage(4096);
  for (std::size_t i = 0; i < garbage.size(); ++i) garbage[i] = static_cast<std::uint8_t>(i * 131 + 7);
  check_file("garbage", garbage, {"bad magic"});
  check_file("empty", {}, {"too short"});

  check_error([&] { read_idx(tmp.path / "missing.gz"); }, (tmp.path / "missing.gz").string(),
              {"no such file"});
  check_error([&] { read_idx(tmp.path); }, tmp.path.string(), {"not a regular file"});
}

// -------------------------------------------------------------------------- fashion-mnist

TEST_CASE("fashion_mnist: loads train and test sets") {
  if (!have_real_data()) return;
  const Dataset& train = real_train();
  const Dataset test = load_fashion_mnist(kFashionMnistDir, false);
  for (const Dataset* d : {&train, &test}) {
    CHECK(d->channels == 1);
    CHECK(d->height == 28);
    CHECK(d->width == 28);
    CHECK(d->classes == 10);
    CHECK(d->pixels.size() == static_cast<std::size_t>(d->n) * 28 * 28);  // held as 8-bit pixels
    CHECK(d->images.empty());
    CHECK(d->labels.size() == static_cast<std::size_t>(d->n));
    CHECK(std::all_of(d->labels.begin(), d->labels.end(), [](int y) { return y >= 0 && y < 10; }));
  }
  CHECK(train.n == 60000);
  CHECK(test.n == 10000);
  // The normalisation constants are the training set's statistics.
  const std::vector<float> values = normalised(train);
  const double mean = std::accumulate(values.begin(), values.end(), 0.0) / values.size();
  double var = 0;
  for (float v : values) var += (v - mean) * (v - mean);
  CHECK(std::abs(mean) < 0.01);
  CHECK(std::sqrt(var / values.size()) == doctest::Approx(1.0).epsilon(0.01));
  CHECK(*std::min_element(values.begin(), values.end()) == kFashionMnistBlack);
  // Normalising a sample gives what the loader used to store: (p / 255 - mean) / std in float.
  std::vector<float> first(train.sample_size());
  train.sample(0, first.data());
  for (std::size_t j = 0; j < first.size(); ++j)
    CHECK(first[j] == (train.pixels[j] / 255.0f - kFashionMnistMean) / kFashionMnistStd);
  std::vector<int> per_class(10);
  for (int y : train.labels) ++per_class[y];
  CHECK(per_class == std::vector<int>(10, 6000));
}

TEST_CASE("fashion_mnist: plain files, limit, subset and fraction") {
  if (!have_real_data()) return;
  const TempDir tmp;
  tmp.write("t10k-images-idx3-ubyte", raw_real("t10k-images-idx3-ubyte.gz"));
  tmp.write("t10k-labels-idx1-ubyte", raw_real("t10k-labels-idx1-ubyte.gz"));
  const Dataset plain = load_fashion_mnist(tmp.path, false, 100);
  const Dataset gz = load_fashion_mnist(kFashionMnistDir, false);
  CHECK(plain.n == 100);
  CHECK(plain.pixels.size() == 100u * 784);
  CHECK(plain.pixels.capacity() == 100u * 784);  // the rest of the file is given back
  CHECK(std::equal(plain.pixels.begin(), plain.pixels.end(), gz.pixels.begin()));
  CHECK(std::equal(plain.labels.begin(), plain.labels.end(), gz.labels.begin()));
  CHECK(load_fashion_mnist(tmp.path, false, 20000).n == 10000);

  const Dataset mid = subset(gz, 10, 5);
  CHECK(mid.n == 5);
  CHECK(mid.images.empty());  // a subset of 8-bit pixels stays 8-bit
  CHECK(std::equal(mid.pixels.begin(), mid.pixels.end(), gz.pixels.begin() + 10 * 784));
  CHECK_THROWS_AS(subset(gz, 9999, 2), hatch::Error);

  const Dataset quarter = fraction(real_train(), 0.25, 7);
  CHECK(quarter.n == 15000);
  CHECK(quarter.pixels == fraction(real_train(), 0.25, 7).pixels);
  CHECK(quarter.labels != fraction(real_train(), 0.25, 8).labels);
  CHECK_THROWS_AS(fraction(gz, 0.0, 1), hatch::Error);
  CHECK_THROWS_AS(fraction(gz, 1.5, 1), hatch::Error);
}

TEST_CASE("fashion_mnist: damaged data sets") {
  if (!have_real_data()) return;
  const Bytes images = raw_real("t10k-images-idx3-ubyte.gz");
  const Bytes labels = raw_real("t10k-labels-idx1-ubyte.gz");

  {  // a label file one entry short, with a header that agrees with it
    const TempDir tmp;
    const auto ip = tmp.write("t10k-images-idx3-ubyte", images);
    const auto lp = tmp.write("t10k-labels-idx1-ubyte",
                              idx_bytes({9999}, Bytes(labels.begin() + 8, labels.end() - 1)));
    check_error([&] { load_fashion_mnist(tmp.path, false); }, ip.string(),
                {"10000 images but " + lp.string() + " has 9999 labels"});
  }
  {  // image dimensions in the wrong order: consistent as IDX, not as a data set
    const TempDir tmp;
    Bytes swapped = images;
    std::swap_ranges(swapped.begin() + 4, swapped.begin() + 8, swapped.begin() + 8);
    const auto ip = tmp.write("t10k-images-idx3-ubyte", swapped);
    tmp.write("t10k-labels-idx1-ubyte", labels);
    check_error([&] { load_fashion_mnist(tmp.path, false); }, ip.string(),
                {"28 images but", "10000 labels"});
  }
  {
    const TempDir tmp;
    Bytes bad = labels;
    bad[8 + 42] = 10;
    tmp.write("t10k-images-idx3-ubyte", images);
    const auto lp = tmp.write("t10k-labels-idx1-ubyte", bad);
    check_error([&] { load_fashion_mnist(tmp.path, false); }, lp.string(),
                {"label 10 at index 42 is outside [0, 10)"});
  }
  {
    const TempDir tmp;
    tmp.write("t10k-images-idx3-ubyte", Bytes(images.begin(), images.begin() + 12));
    tmp.write("t10k-labels-idx1-ubyte", labels);
    check_error([&] { load_fashion_mnist(tmp.path, false); }, (tmp.path / "t10k-images-idx3-ubyte").string(),
                {"truncated header"});
  }
  {
    const TempDir tmp;
    tmp.write("train-images-idx3-ubyte.gz", gzip(images));
    check_error([&] { load_fashion_mnist(tmp.path, true); },
                (tmp.path / "train-labels-idx1-ubyte.gz").string(), {"no such file"});
  }
  CHECK_THROWS_AS(load_fashion_mnist(kFashionMnistDir, false, -1), hatch::Error);
}

TEST_CASE("fashion_mnist: subset and fraction of a synthetic set") {
  const Dataset d = numbered_dataset(100, 1, 2, 3);
  const std::size_t s = d.sample_size();
  const Dataset part = fraction(d, 0.3, 42);
  CHECK(part.n == 30);
  CHECK(part.images.size() == 30 * s);
  std::vector<int> ids;
  for (int i = 0; i < part.n; ++i) {
    ids.push_back(static_cast<int>(part.images[i * s] / 1000));
    CHECK(part.labels[i] == d.labels[ids.back()]);
  }
  CHECK(std::is_sorted(ids.begin(), ids.end()));
  CHECK(std::adjacent_find(ids.begin(), ids.end()) == ids.end());
  CHECK(ids.back() - ids.front() > 30);  // spread out, not a prefix
  CHECK(fraction(d, 0.001, 1).n == 1);
  CHECK(fraction(d, 1.0, 1).images == d.images);
  const Dataset tail = subset(d, 95, 5);
  CHECK(tail.n == 5);
  CHECK(tail.images[0] == 95000.0f);
  CHECK(subset(d, 100, 0).n == 0);
  CHECK_THROWS_WITH_AS(subset(d, 96, 5), doctest::Contains("[96, 101)"), hatch::Error);
  CHECK_THROWS_AS(subset(d, -1, 5), hatch::Error);
}

TEST_CASE("fashion_mnist: balanced_first takes the first images of each class, in file order") {
  const Dataset full = load_fashion_mnist(kFashionMnistDir, true, 0);
  const Dataset b = balanced_first(full, 3000);
  REQUIRE(b.n == 3000);
  std::vector<int> per(10, 0);
  for (int i = 0; i < b.n; ++i) ++per[b.labels[i]];
  for (int c = 0; c < 10; ++c) CHECK(per[c] == 300);
  // The plain first 3,000 are not balanced; the balanced head keeps file order.
  const Dataset head = load_fashion_mnist(kFashionMnistDir, true, 3000);
  std::vector<int> head_per(10, 0);
  for (int i = 0; i < head.n; ++i) ++head_per[head.labels[i]];
  CHECK(*std::max_element(head_per.begin(), head_per.end()) > 300);
  CHECK(std::equal(b.pixels.begin(), b.pixels.begin() + b.sample_size(), full.pixels.begin()));
  const Dataset odd = balanced_first(full, 25);  // 3 of classes 0-4, 2 of the others
  std::vector<int> odd_per(10, 0);
  for (int i = 0; i < odd.n; ++i) ++odd_per[odd.labels[i]];
  CHECK(odd_per[0] == 3);
  CHECK(odd_per[9] == 2);
  CHECK_THROWS_WITH_AS(balanced_first(head, 3000), doctest::Contains("too few samples"), hatch::Error);
  CHECK_THROWS_AS(balanced_first(head, 4000), hatch::Error);
}

// -------------------------------------------------------------------------------- batcher

TEST_CASE("batcher: every sample once per epoch, deterministic per (seed, epoch)") {
  const Dataset d = numbered_dataset(37, 1, 4, 5);
  const std::size_t s = d.sample_size();
  auto epoch_order = [&](std::uint64_t seed, int epoch, bool shuffle = true) {
    Batcher b(d, 8, shuffle, seed);
    b.start_epoch(epoch);
    Batch batch;
    std::vector<int> order, sizes;
    while (b.next(batch)) {
      sizes.push_back(batch.size);
      for (int i = 0; i < batch.size; ++i) {
        order.push_back(sample_of(batch, i, s));
        CHECK(batch.labels[i] == d.labels[order.back()]);
      }
    }
    CHECK(sizes == std::vector<int>{8, 8, 8, 8, 5});
    return order;
  };
  const auto a = epoch_order(1, 3);
  std::vector<int> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int> all(37);
  std::iota(all.begin(), all.end(), 0);
  CHECK(sorted == all);
  CHECK(epoch_order(1, 3) == a);
  CHECK(epoch_order(1, 4) != a);
  CHECK(epoch_order(2, 3) != a);
  CHECK(epoch_order(1, 3, false) == all);

  Batcher dropping(d, 8, true, 1, {}, true);
  CHECK(dropping.batches_per_epoch() == 4);
  Batch batch;
  int count = 0;
  while (dropping.next(batch)) {
    CHECK(batch.size == 8);
    ++count;
  }
  CHECK(count == 4);
}

TEST_CASE("batcher: batch buffers are allocated once") {
  const Dataset d = numbered_dataset(37, 1, 4, 5);
  Batcher b(d, 8, true, 5, {.crop_padding = 1, .hflip = true, .mixup_alpha = 0.8f, .cutmix_alpha = 1.0f});
  Batch batch;
  REQUIRE(b.next(batch));
  const float* images = batch.images.data();
  const float* targets = batch.targets.data();
  for (int epoch = 0; epoch < 3; ++epoch) {
    b.start_epoch(epoch);
    while (b.next(batch)) {
      CHECK(batch.images.data() == images);
      CHECK(batch.targets.data() == targets);
      CHECK(batch.images.size() == batch.size * d.sample_size());
      CHECK(batch.targets.size() == batch.size * 10u);
    }
  }
}

TEST_CASE("batcher: resuming mid-epoch gives the same batches") {
  const Dataset d = numbered_dataset(50, 2, 6, 6);
  const AugmentOptions aug{.crop_padding = 2, .hflip = true, .mixup_alpha = 0.8f,
                           .cutmix_alpha = 1.0f, .label_smoothing = 0.1f};
  Batcher full(d, 8, true, 11, aug);
  full.start_epoch(2);
  std::vector<Batch> batches;
  for (Batch b; full.next(b);) batches.push_back(b);
  REQUIRE(batches.size() == 7u);

  Batcher resumed(d, 8, true, 11, aug);
  resumed.start_epoch(2, 4);
  Batch b;
  for (std::size_t i = 4; i < batches.size(); ++i) {
    REQUIRE(resumed.next(b));
    CHECK(b.images == batches[i].images);
    CHECK(b.targets == batches[i].targets);
    CHECK(b.labels == batches[i].labels);
  }
  CHECK_FALSE(resumed.next(b));
}

TEST_CASE("batcher: label smoothing") {
  const Dataset d = numbered_dataset(10, 1, 2, 2);
  Batcher b(d, 10, false, 0, {.label_smoothing = 0.1f});
  Batch batch;
  REQUIRE(b.next(batch));
  CHECK(batch.mix_lambda == 1.0f);
  for (int i = 0; i < batch.size; ++i)
    for (int c = 0; c < 10; ++c)
      CHECK(batch.targets[i * 10 + c] == doctest::Approx(c == batch.labels[i] ? 0.91 : 0.01));

  Batcher plain(d, 10, false, 0);
  REQUIRE(plain.next(batch));
  for (int i = 0; i < batch.size; ++i)
    for (int c = 0; c < 10; ++c) CHECK(batch.targets[i * 10 + c] == (c == batch.labels[i] ? 1.0f : 0.0f));
}

TEST_CASE("batcher: mixup blends each sample with its mirror in the batch") {
  const Dataset d = numbered_dataset(20, 1, 3, 3);
  const std::size_t s = d.sample_size();
  Batcher b(d, 7, false, 3, {.mixup_alpha = 0.8f, .label_smoothing = 0.1f});
  Batch batch;
  std::set<float> lambdas;
  for (int first = 0; b.next(batch); first += batch.size) {
    const float lam = batch.mix_lambda;
    CHECK(lam >= 0.0f);
    CHECK(lam <= 1.0f);
    lambdas.insert(lam);
    for (int i = 0; i < batch.size; ++i) {
      const int j = batch.size - 1 - i;
      for (std::size_t t = 0; t < s; ++t)
        CHECK(batch.images[i * s + t] ==
              doctest::Approx(lam * d.images[(first + i) * s + t] + (1 - lam) * d.images[(first + j) * s + t]));
      float sum = 0;
      for (int c = 0; c < 10; ++c) {
        CHECK(batch.targets[i * 10 + c] >= 0.01f - 1e-6f);
        sum += batch.targets[i * 10 + c];
      }
      CHECK(sum == doctest::Approx(1.0));
      if (batch.labels[i] != batch.labels[j]) {
        CHECK(batch.targets[i * 10 + batch.labels[i]] == doctest::Approx(0.01 + 0.9 * lam));
        CHECK(batch.targets[i * 10 + batch.labels[j]] == doctest::Approx(0.01 + 0.9 * (1 - lam)));
      }
    }
  }
  CHECK(lambdas.size() > 1);

  Batcher never(d, 7, false, 3, {.mixup_alpha = 0.8f, .mix_prob = 0.0f});
  while (never.next(batch)) CHECK(batch.mix_lambda == 1.0f);
}

TEST_CASE("batcher: cutmix pastes a box from the mirror sample, lambda is its complement") {
  const Dataset d = numbered_dataset(64, 2, 8, 8);
  const std::size_t s = d.sample_size();
  Batcher b(d, 7, false, 9, {.cutmix_alpha = 1.0f});
  Batch batch;
  int mixed = 0;
  for (int epoch = 0; epoch < 4; ++epoch) {
    b.start_epoch(epoch);
    for (int first = 0; b.next(batch); first += batch.size) {
      const float lam = batch.mix_lambda;
      CHECK(lam >= 0.0f);
      CHECK(lam <= 1.0f);
      mixed += lam < 1.0f;
      for (int i = 0; i < batch.size; ++i) {
        const int j = batch.size - 1 - i;
        int from_other = 0;
        for (std::size_t t = 0; t < s; ++t) {
          const float v = batch.images[i * s + t];
          const bool own = v == d.images[(first + i) * s + t];
          from_other += !own;
          CHECK((own || v == d.images[(first + j) * s + t]));
        }
        if (i != j) CHECK(static_cast<double>(from_other) / s == doctest::Approx(1.0 - lam));
        float sum = 0;
        for (int c = 0; c < 10; ++c) sum += batch.targets[i * 10 + c];
        CHECK(sum == doctest::Approx(1.0));
      }
    }
  }
  CHECK(mixed > 10);
}

TEST_CASE("batcher: crop and flip keep shapes and only move or pad pixels") {
  const Dataset d = numbered_dataset(16, 2, 5, 7);
  const std::size_t s = d.sample_size();
  const int h = 5, w = 7, p = 2;
  Batcher b(d, 16, false, 4, {.crop_padding = p, .hflip = true});
  Batch batch;
  REQUIRE(b.next(batch));
  CHECK(batch.size == 16);
  CHECK(batch.images.size() == 16 * s);
  // Each output must be exactly one of the (2p+1)^2 crops of the padded image, maybe mirrored.
  std::set<int> offsets;
  int flipped = 0;
  for (int i = 0; i < batch.size; ++i) {
    int matches = 0;
    for (int flip = 0; flip < 2; ++flip)
      for (int oy = -p; oy <= p; ++oy)
        for (int ox = -p; ox <= p; ++ox) {
          bool same = true;
          for (int c = 0; c < 2; ++c)
            for (int y = 0; y < h; ++y)
              for (int x = 0; x < w; ++x) {
                const int sy = y + oy, sx = (flip ? w - 1 - x : x) + ox;
                const float want = sy >= 0 && sy < h && sx >= 0 && sx < w
                                       ? d.images[i * s + (c * h + sy) * w + sx]
                                       : kFashionMnistBlack;
                same = same && batch.images[i * s + (c * h + y) * w + x] == want;
              }
          if (same) {
            ++matches;
            flipped += flip;
            offsets.insert(oy * 10 + ox);
          }
        }
    CHECK(matches == 1);
  }
  CHECK(flipped > 0);
  CHECK(flipped < 16);
  CHECK(offsets.size() > 3);
}

TEST_CASE("batcher: invalid settings are rejected") {
  const Dataset d = numbered_dataset(4, 1, 2, 2);
  CHECK_THROWS_AS(Batcher(d, 0, true, 0), hatch::Error);
  CHECK_THROWS_AS(Batcher(d, 2, true, 0, {.crop_padding = -1}), hatch::Error);
  CHECK_THROWS_AS(Batcher(d, 2, true, 0, {.mixup_alpha = -1}), hatch::Error);
  CHECK_THROWS_AS(Batcher(d, 2, true, 0, {.mix_prob = 2}), hatch::Error);
  CHECK_THROWS_AS(Batcher(d, 2, true, 0, {.label_smoothing = 1}), hatch::Error);
  Dataset broken = d;
  broken.labels[1] = 10;
  CHECK_THROWS_WITH_AS(Batcher(broken, 2, true, 0), doctest::Contains("label 10"), hatch::Error);
  broken = d;
  broken.images.pop_back();
  CHECK_THROWS_AS(Batcher(broken, 2, true, 0), hatch::Error);
  Batcher ok(d, 3, true, 0);
  CHECK_THROWS_AS(ok.start_epoch(0, 3), hatch::Error);
}

TEST_CASE("batcher: 8-bit pixels normalised per batch give the floats of a normalised copy, bit for bit") {
  if (!have_real_data()) return;
  const Dataset bytes = load_fashion_mnist(kFashionMnistDir, false, 300);
  Dataset floats = bytes;
  floats.images = normalised(bytes);
  floats.pixels = {};
  for (const AugmentOptions aug : {AugmentOptions{}, AugmentOptions{.crop_padding = 4, .hflip = true, .mixup_alpha = 0.8f,
                                                                   .cutmix_alpha = 1.0f, .label_smoothing = 0.1f}}) {
    Batcher a(bytes, 64, true, 5, aug), b(floats, 64, true, 5, aug);
    Batch x, y;
    int batches = 0;
    while (a.next(x)) {
      REQUIRE(b.next(y));
      CHECK(std::memcmp(x.images.data(), y.images.data(), x.images.size() * sizeof(float)) == 0);
      CHECK(x.targets == y.targets);
      ++batches;
    }
    CHECK_FALSE(b.next(y));
    CHECK(batches == 5);
  }
}

TEST_CASE("batcher: an augmented epoch over the real test set") {
  if (!have_real_data()) return;
  const Dataset test = load_fashion_mnist(kFashionMnistDir, false);
  Batcher b(test, 256, true, 1,
            {.crop_padding = 4, .hflip = true, .mixup_alpha = 0.8f, .cutmix_alpha = 1.0f,
             .label_smoothing = 0.1f});
  Batch batch;
  int seen = 0;
  bool finite = true;
  while (b.next(batch)) {
    seen += batch.size;
    finite = finite && std::all_of(batch.images.begin(), batch.images.end(),
                                   [](float v) { return std::isfinite(v); });
  }
  CHECK(seen == 10000);
  CHECK(finite);
}
