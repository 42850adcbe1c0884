#pragma once
// The umbrella header for CPU programs: the Cpu and Cpu64 backends and the whole
// backend-independent library (hatch/core.hpp lists it: layers, composition, models, fit,
// data, checkpoints, Incubator and ModuleDistiller). CUDA translation units include
// <hatch/cuda.hpp> instead, which keeps Eigen out of nvcc's way.
#include "hatch/backend/cpu.hpp"
#include "hatch/core.hpp"
