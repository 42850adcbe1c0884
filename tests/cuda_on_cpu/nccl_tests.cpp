// tests/cuda/test_nccl.cu, compiled by the host compiler against tests/cuda_on_cpu (nccl.h over
// MPI, the CUDA runtime on CPU threads): NcclCollective and data-parallel fit on Cuda, under
// mpirun, on a machine without a GPU (hatch_nccl_on_cpu_tests; main in tests/cuda/test_nccl_main.cpp).
#include "../cuda/test_nccl.cu"
