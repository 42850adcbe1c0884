#pragma once
// The CPU half of the CPU-vs-CUDA parity tests, compiled by g++ (cpu_side.cpp) because the Cpu
// backend needs Eigen, which stays out of nvcc translation units. Only standard types cross.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace hatch_test {

// Runs parity case `name` (see case_names() in layer_runners.hpp) on hatch::Cpu.
std::map<std::string, std::vector<float>> run_case_cpu(const std::string& name, std::uint64_t seed);
// The same case on hatch::Cpu64, for calibrating how far float32 rounding moves each result.
std::map<std::string, std::vector<float>> run_case_cpu64(const std::string& name, std::uint64_t seed);

}  // namespace hatch_test
