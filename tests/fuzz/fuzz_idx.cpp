// libFuzzer target for the IDX parser: any input must parse or throw hatch::Error, never crash
// or read out of bounds. Build: clang++ -std=c++20 -fsanitize=fuzzer,address,undefined
//   -Iinclude tests/fuzz/fuzz_idx.cpp -lz
#include <cstddef>
#include <cstdint>

#include "hatch/data/idx.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    // A small cap keeps gzip bombs from exhausting the fuzzer's memory limit.
    const auto a = hatch::data::parse_idx(data, size, "fuzz", std::size_t{64} << 20);
    std::size_t total = 1;
    for (int d : a.dims) total *= static_cast<std::size_t>(d);
    if (a.dims.empty() || total != a.data.size()) __builtin_trap();
  } catch (const hatch::Error&) {
  }
  return 0;
}
