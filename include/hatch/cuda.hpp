#pragma once
// The umbrella header for CUDA translation units (.cu files compiled by nvcc): the Cuda backend
// and everything backend-independent. It leaves out the Cpu backend so that Eigen never reaches
// nvcc; a program that needs both backends keeps the Cpu side in a .cpp file.
#include "hatch/backend/cuda.hpp"
#include "hatch/core.hpp"
