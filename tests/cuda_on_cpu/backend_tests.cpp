// tests/cuda/test_cuda_backend.cu, compiled by the host compiler against tests/cuda_on_cpu: the
// Cuda backend's whole test suite on CPU threads (hatch_cuda_on_cpu_tests).
#include "../cuda/test_cuda_backend.cu"
