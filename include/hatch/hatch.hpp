#pragma once
// The umbrella header for CPU programs. CUDA translation units include <hatch/cuda.hpp>
// instead, which keeps Eigen out of nvcc's way.
#include "hatch/backend/cpu.hpp"
#include "hatch/core.hpp"
