// libFuzzer target for the safetensors parser, the boundary where untrusted checkpoint bytes
// enter hatch. Any input must either parse or throw hatch::Error; a crash, sanitizer report,
// other exception or runaway allocation is a bug.
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude \
//     tests/fuzz/fuzz_safetensors.cpp -o fuzz_safetensors && ./fuzz_safetensors -max_total_time=60
#include <cstddef>
#include <cstdint>

#include "hatch/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto f = hatch::io::SafeTensorsFile::parse(data, size, "fuzz");
    // Touch what a loader would: every tensor's record and a conversion of each.
    for (const auto& name : f.names()) {
      const auto& r = f.at(name);
      if (r.dtype == hatch::io::DType::I64) (void)f.to_int64(name, r.shape);
      else (void)f.to_double(name, r.shape);
    }
  } catch (const hatch::Error&) {
    // Rejected input: the expected outcome for almost all fuzz inputs.
  }
  return 0;
}
