// The Cpu side of the parity tests: the same runners as the .cu side, bound to Cpu / Cpu64.
#include "cpu_side.hpp"

#include "hatch/hatch.hpp"
#include "layer_runners.hpp"

namespace hatch_test {

std::map<std::string, std::vector<float>> run_case_cpu(const std::string& name, std::uint64_t seed) {
  return run_case<hatch::Cpu>(name, seed);
}
std::map<std::string, std::vector<float>> run_case_cpu64(const std::string& name, std::uint64_t seed) {
  return run_case<hatch::Cpu64>(name, seed);
}

}  // namespace hatch_test
