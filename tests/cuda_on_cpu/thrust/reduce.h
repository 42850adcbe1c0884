#pragma once
// (Thrust's reduce header; the Cuda backend uses only transform_reduce: tests/cuda_on_cpu.)
#include "transform_reduce.h"
