#pragma once
// Stands in for the CUDA runtime's header in builds that run the Cuda backend on the CPU
// (tests/cuda_on_cpu/cuda_on_cpu.hpp).
#include "cuda_on_cpu.hpp"
