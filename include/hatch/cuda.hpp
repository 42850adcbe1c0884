#pragma once
// The umbrella header for CUDA translation units (.cu files compiled by nvcc): the Cuda backend
// and the whole backend-independent library (hatch/core.hpp lists it: layers, composition,
// models, fit, data, checkpoints, Incubator and ModuleDistiller). It leaves out the Cpu backend
// so that Eigen never reaches nvcc; a program that needs both backends keeps the Cpu side in a
// .cpp file. Link the target hatch::cuda (find_package(hatch) provides it).
#include "hatch/backend/cuda.hpp"
#include "hatch/core.hpp"
