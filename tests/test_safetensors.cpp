// safetensors reader/writer: round trip, atomic writes, every rejected corruption, and files
// written by PyTorch (tests/fixtures/make_fixtures.py).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "error_message.hpp"
#include "hatch/io/safetensors.hpp"
#include "files.hpp"

#ifndef HATCH_FIXTURE_DIR
#define HATCH_FIXTURE_DIR "tests/fixtures"
#endif

namespace fs = std::filesystem;
using hatch::io::DType;
using hatch::test::error_message;
using hatch::test::has;
using hatch::io::SafeTensorsFile;
using hatch::io::SafeTensorsWriter;

namespace {

using hatch_test::TempDir;


std::vector<std::uint8_t> raw_file(const std::string& header, std::size_t data_bytes,
                                   std::uint64_t header_len) {
  std::vector<std::uint8_t> out(8 + header.size() + data_bytes, 0);
  std::memcpy(out.data(), &header_len, 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  return out;
}
std::vector<std::uint8_t> raw_file(const std::string& header, std::size_t data_bytes) {
  return raw_file(header, data_bytes, header.size());
}

void put(const fs::path& p, const std::vector<std::uint8_t>& bytes) {
  std::ofstream out(p, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

std::vector<std::uint8_t> get(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Writes bytes to a file, reads it back, returns the error message.
std::string read_error(const TempDir& dir, const std::vector<std::uint8_t>& bytes) {
  const fs::path p = dir.path / "bad.safetensors";
  put(p, bytes);
  return error_message([&] { (void)SafeTensorsFile::read(p); });
}

}  // namespace

TEST_CASE("safetensors: round trip of F32, F64, I64, scalars, empty tensors and metadata") {
  TempDir dir;
  const std::vector<float> w = {1.5f, -2.0f, 3.25f, 0.0f, -0.125f, 1e-8f};
  const std::vector<double> d = {3.141592653589793, -1e300, 2.5e-300, 0.0};
  const std::vector<std::int64_t> labels = {0, 9, -3, 1LL << 40};
  const float scalar = 0.75f;

  SafeTensorsWriter wr;
  wr.add("weight", {2, 3}, std::span<const float>(w));
  wr.add("double", {4}, std::span<const double>(d));
  wr.add("labels", {4}, std::span<const std::int64_t>(labels));
  wr.add("loss", DType::F32, {}, &scalar);
  wr.add("empty", DType::F32, {0, 3}, nullptr);
  wr.set_metadata("config", R"({"dim": 8})");
  wr.set_metadata("format", "pt");
  const fs::path p = dir.path / "model.safetensors";
  wr.write(p);

  const auto f = SafeTensorsFile::read(p);
  CHECK(f.names() == std::vector<std::string>{"double", "empty", "labels", "loss", "weight"});
  CHECK(f.contains("weight"));
  CHECK_FALSE(f.contains("bias"));
  CHECK(f.metadata().at("config") == R"({"dim": 8})");
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.at("weight").dtype == DType::F32);
  CHECK(f.at("weight").shape == std::vector<std::int64_t>{2, 3});
  CHECK(f.to_float("weight", {2, 3}) == w);
  CHECK(f.to_double("double", {4}) == d);
  CHECK(f.to_int64("labels", {4}) == labels);
  CHECK(f.at("loss").shape.empty());
  CHECK(f.to_float("loss", {}) == std::vector<float>{0.75f});
  CHECK(f.to_float("empty", {0, 3}).empty());
  // F32 widens to double exactly; F64 narrows to float.
  CHECK(f.to_double("weight", {2, 3})[2] == 3.25);
  CHECK(f.to_float("double", {4})[0] == static_cast<float>(d[0]));

  // The layout the reference writer produces: header padded to 8, tensors in name order,
  // contiguous.
  const auto bytes = get(p);
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  CHECK(n % 8 == 0);
  const auto header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + n);
  std::uint64_t cursor = 0;
  for (const auto& name : f.names()) {
    const auto& off = header.at(name).at("data_offsets");
    CHECK(off[0].get<std::uint64_t>() == cursor);
    cursor = off[1].get<std::uint64_t>();
  }
  CHECK(8 + n + cursor == bytes.size());
}

TEST_CASE("safetensors: lookups and conversions name the file, tensor and expectation") {
  TempDir dir;
  const std::vector<float> w(96 * 32, 0.5f);
  const std::vector<std::int64_t> labels = {1, 2};
  SafeTensorsWriter wr;
  wr.add("blocks.0.attn.qkv.weight", {96, 32}, std::span<const float>(w));
  wr.add("labels", {2}, std::span<const std::int64_t>(labels));
  const fs::path p = dir.path / "ckpt.safetensors";
  wr.write(p);
  const auto f = SafeTensorsFile::read(p);
  CHECK(f.metadata().empty());

  CHECK(error_message([&] { (void)f.at("x"); }) == p.string() + ": no tensor named 'x'");
  CHECK(error_message([&] { (void)f.to_float("blocks.0.attn.qkv.weight", {48, 16}); }) ==
        p.string() + ": tensor 'blocks.0.attn.qkv.weight' has shape [96,32], expected [48,16]");
  CHECK(error_message([&] { (void)f.to_float("labels", {2}); }) ==
        p.string() + ": tensor 'labels' has dtype I64, expected F32 or F64");
  CHECK(error_message([&] { (void)f.to_int64("blocks.0.attn.qkv.weight", {96, 32}); }) ==
        p.string() + ": tensor 'blocks.0.attn.qkv.weight' has dtype F32, expected I64");
}

TEST_CASE("safetensors: writer rejects bad input before touching the disk") {
  const std::vector<float> v = {1, 2, 3};
  SafeTensorsWriter wr;
  wr.add("a", {3}, std::span<const float>(v));
  CHECK(has(error_message([&] { wr.add("a", {3}, std::span<const float>(v)); }), "added twice"));
  CHECK(has(error_message([&] { wr.add("b", {2, 2}, std::span<const float>(v)); }),
                 "shape [2,2] but 3 values"));
  CHECK(has(error_message([&] { wr.add("c", DType::F32, {-1}, v.data()); }), "invalid shape"));
  CHECK(has(error_message([&] { wr.add("__metadata__", {3}, std::span<const float>(v)); }),
                 "reserved"));
}

TEST_CASE("safetensors: writes are atomic") {
  TempDir dir;
  const std::vector<float> v = {1, 2, 3};
  SafeTensorsWriter wr;
  wr.add("a", {3}, std::span<const float>(v));

  SUBCASE("a missing directory throws, names the path and leaves nothing behind") {
    const fs::path p = dir.path / "no_such_dir" / "a.safetensors";
    const std::string msg = error_message([&] { wr.write(p); });
    CHECK(msg.rfind(p.string() + ": ", 0) == 0);
    CHECK_FALSE(fs::exists(dir.path / "no_such_dir"));
    CHECK(dir.entries().empty());
  }
  SUBCASE("a successful write leaves only the file, and overwrites replace it whole") {
    const fs::path p = dir.path / "a.safetensors";
    wr.write(p);
    CHECK(dir.entries() == std::vector<std::string>{"a.safetensors"});
    SafeTensorsWriter wr2;
    const std::vector<double> d = {4, 5};
    wr2.add("b", {2}, std::span<const double>(d));
    wr2.write(p);
    CHECK(dir.entries() == std::vector<std::string>{"a.safetensors"});
    const auto f = SafeTensorsFile::read(p);
    CHECK(f.names() == std::vector<std::string>{"b"});
    CHECK(f.to_double("b", {2}) == d);
  }
  SUBCASE("a failed rename removes the temporary file") {
    // Renaming a file onto a non-empty directory fails after the temporary file was written.
    const fs::path p = dir.path / "taken";
    fs::create_directories(p / "inside");
    const std::string msg = error_message([&] { wr.write(p); });
    CHECK(msg.rfind(p.string() + ": ", 0) == 0);
    CHECK(has(msg, "rename"));
    CHECK(dir.entries() == std::vector<std::string>{"taken"});
  }
}

TEST_CASE("safetensors: every corruption is a hatch::Error naming the file") {
  TempDir dir;
  const std::string file = (dir.path / "bad.safetensors").string();
  auto check = [&](const std::vector<std::uint8_t>& bytes, const std::string& expect) {
    const std::string msg = read_error(dir, bytes);
    INFO("message: " << msg);
    CHECK(msg.rfind(file + ": ", 0) == 0);
    CHECK(has(msg, expect));
  };
  const std::string ok_entry = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";

  SUBCASE("sanity: the well-formed base case parses") {
    put(file, raw_file("{" + ok_entry + "}", 8));
    CHECK(SafeTensorsFile::read(file).to_float("t", {2}).size() == 2);
  }
  SUBCASE("missing file") {
    CHECK(error_message([&] { (void)SafeTensorsFile::read(dir.path / "nope.safetensors"); })
              .rfind((dir.path / "nope.safetensors").string() + ": cannot open", 0) == 0);
  }
  SUBCASE("shorter than 8 bytes") { check({1, 2, 3, 4, 5}, "expected at least 8"); }
  SUBCASE("empty file") { check({}, "expected at least 8"); }
  SUBCASE("header length larger than the file") {
    check(raw_file("{" + ok_entry + "}", 8, 4096), "larger than the");
  }
  SUBCASE("header length over 100 MB") {
    check(raw_file("{" + ok_entry + "}", 8, 200'000'000), "exceeds the limit");
  }
  SUBCASE("header length of 2^64-1") {
    check(raw_file("{}", 0, ~std::uint64_t{0}), "exceeds the limit");
  }
  SUBCASE("invalid JSON") { check(raw_file("{\"t\": nope}", 0), "not valid JSON"); }
  SUBCASE("invalid UTF-8 in the header") { check(raw_file("{\"\xff\":1}", 0), "not valid JSON"); }
  SUBCASE("header not an object") { check(raw_file("[1,2]", 0), "must be a JSON object"); }
  SUBCASE("absurdly deep nesting") {
    check(raw_file(std::string(5000, '[') + std::string(5000, ']'), 0), "nests deeper");
  }
  SUBCASE("tensor entry not an object") { check(raw_file(R"({"t":3})", 0), "tensor 't'"); }
  SUBCASE("missing dtype") {
    check(raw_file(R"({"t":{"shape":[2],"data_offsets":[0,8]}})", 8), "missing 'dtype'");
  }
  SUBCASE("missing shape") {
    check(raw_file(R"({"t":{"dtype":"F32","data_offsets":[0,8]}})", 8), "missing 'shape'");
  }
  SUBCASE("missing data_offsets") {
    check(raw_file(R"({"t":{"dtype":"F32","shape":[2]}})", 8), "missing 'data_offsets'");
  }
  SUBCASE("unsupported dtype") {
    check(raw_file(R"({"t":{"dtype":"F16","shape":[4],"data_offsets":[0,8]}})", 8),
          "unsupported dtype 'F16', expected F32, F64 or I64");
  }
  SUBCASE("dtype not a string") {
    check(raw_file(R"({"t":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", 8), "'dtype'");
  }
  SUBCASE("negative dimension") {
    check(raw_file(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
          "negative dimension -2");
  }
  SUBCASE("fractional dimension") {
    check(raw_file(R"({"t":{"dtype":"F32","shape":[1.5],"data_offsets":[0,8]}})", 8),
          "non-negative integers");
  }
  SUBCASE("shape product overflows") {
    check(raw_file(
              R"({"t":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,8]}})",
              8),
          "overflows");
  }
  SUBCASE("data_offsets malformed") {
    check(raw_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8), "[begin, end]");
    check(raw_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 8),
          "[begin, end]");
  }
  SUBCASE("data_offsets begin > end") {
    check(raw_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8), "begin > end");
  }
  SUBCASE("data_offsets past the end of the file") {
    check(raw_file(R"({"t":{"dtype":"F32","shape":[100],"data_offsets":[0,400]}})", 8),
          "run past the 8 data bytes");
  }
  SUBCASE("data_offsets do not match shape * itemsize") {
    check(raw_file(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
          "needs 12 bytes, but data_offsets [0,8] cover 8");
    check(raw_file(R"({"t":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}})", 8), "needs 16");
  }
  SUBCASE("overlapping tensors") {
    check(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                   R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                   12),
          "overlap");
  }
  SUBCASE("gap between tensors") {
    check(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                   R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
                   20),
          "contiguous");
  }
  SUBCASE("trailing bytes after the last tensor") {
    check(raw_file("{" + ok_entry + "}", 16), "tensors cover 8 data bytes, but the file has 16");
  }
  SUBCASE("metadata value not a string") {
    check(raw_file(R"({"__metadata__":{"epoch":3},)" + ok_entry + "}", 8),
          "__metadata__ value for 'epoch' must be a string");
    check(raw_file(R"({"__metadata__":[1],)" + ok_entry + "}", 8), "__metadata__ must be");
  }
  SUBCASE("a truncated real file") {
    const std::vector<float> v(64, 1.0f);
    SafeTensorsWriter wr;
    wr.add("a", {8, 8}, std::span<const float>(v));
    auto bytes = wr.serialize();
    bytes.erase(bytes.end() - 4, bytes.end());
    check(bytes, "run past");
  }
  SUBCASE("parse() uses the given name") {
    const std::uint8_t tiny[3] = {0, 0, 0};
    CHECK(error_message([&] { (void)SafeTensorsFile::parse(tiny, 3, "memory"); })
              .rfind("memory: ", 0) == 0);
  }
}

TEST_CASE("safetensors: reads the PyTorch-written fixtures") {
  const fs::path dir = HATCH_FIXTURE_DIR;
  const auto f = SafeTensorsFile::read(dir / "linear.safetensors");
  CHECK(f.metadata().at("layer") == "linear");
  const auto config = nlohmann::json::parse(f.metadata().at("config").get<std::string>());
  CHECK(config.at("in") == 8);
  CHECK(config.at("out") == 12);

  // Recompute Linear with PyTorch's (out, in) weight layout: this checks the reader's byte
  // order and the fixture's conventions together.
  const int rows = 2 * 5, in = 8, out = 12;
  const auto x = f.to_double("input", {2, 5, in});
  const auto w = f.to_double("param.weight", {out, in});
  const auto b = f.to_double("param.bias", {out});
  const auto y = f.to_double("output", {2, 5, out});
  const auto gy = f.to_double("grad_output", {2, 5, out});
  const auto gx = f.to_double("grad_input", {2, 5, in});
  const auto gw = f.to_double("grad.weight", {out, in});
  const auto gb = f.to_double("grad.bias", {out});
  double err = 0;
  for (int r = 0; r < rows; ++r)
    for (int o = 0; o < out; ++o) {
      double s = b[o];
      for (int i = 0; i < in; ++i) s += x[r * in + i] * w[o * in + i];
      err = std::max(err, std::abs(s - y[r * out + o]));
    }
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < in; ++i) {
      double s = 0;
      for (int o = 0; o < out; ++o) s += gy[r * out + o] * w[o * in + i];
      err = std::max(err, std::abs(s - gx[r * in + i]));
    }
  for (int o = 0; o < out; ++o) {
    double sb = 0;
    for (int r = 0; r < rows; ++r) sb += gy[r * out + o];
    err = std::max(err, std::abs(sb - gb[o]));
    for (int i = 0; i < in; ++i) {
      double s = 0;
      for (int r = 0; r < rows; ++r) s += gy[r * out + o] * x[r * in + i];
      err = std::max(err, std::abs(s - gw[o * in + i]));
    }
  }
  CHECK(err < 1e-5);

  const auto losses = SafeTensorsFile::read(dir / "losses.safetensors");
  const auto labels = losses.to_int64("labels", {4});
  for (auto l : labels) CHECK((l >= 0 && l < 10));
  CHECK(losses.to_float("ce_hard_ls", {}).size() == 1);
  CHECK(losses.to_float("grad.kd", {4, 10}).size() == 40);
}

TEST_CASE("safetensors: every fixture is complete and consistent") {
  int files = 0;
  for (const auto& e : fs::directory_iterator(HATCH_FIXTURE_DIR)) {
    if (e.path().extension() != ".safetensors") continue;
    ++files;
    INFO("fixture: " << e.path().string());
    const auto f = SafeTensorsFile::read(e.path());
    CHECK(f.metadata().contains("config"));
    if (e.path().filename() == "losses.safetensors") continue;
    for (const char* name : {"input", "output", "grad_output", "grad_input"})
      CHECK(f.contains(name));
    CHECK(f.at("grad_output").shape == f.at("output").shape);
    CHECK(f.at("grad_input").shape == f.at("input").shape);
    for (const auto& name : f.names()) {
      CHECK(f.at(name).dtype == DType::F32);
      if (name.rfind("param.", 0) == 0) {
        const std::string grad = "grad." + name.substr(6);
        REQUIRE(f.contains(grad));
        CHECK(f.at(grad).shape == f.at(name).shape);
      }
    }
  }
  CHECK(files == 24);  // the 14 of make_fixtures.py before 2026-11-27, the two expert blocks,
                       // the four NAC files (nac_modfc, nac_kmdpa[_truncated], nac_kmdpa_train) and
                       // four more (nac_modffn, nac_seeder_train, nac_pooling_train, nac_kmdpa_rect)
}
