// tests/cuda/test_cuda_kernels.cu, compiled by the host compiler against tests/cuda_on_cpu
// (hatch_cuda_on_cpu_tests).
#include "../cuda/test_cuda_kernels.cu"
