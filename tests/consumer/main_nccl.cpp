// The NCCL consumer (hatch::nccl + hatch::mpi, a host compiler: nccl.hpp needs no nvcc): a job of
// one rank sums a device buffer with NCCL. Without a GPU it only says so (exit 0).
#include <cuda_runtime.h>

#include <cstdio>
#include <hatch/distributed/mpi.hpp>
#include <hatch/distributed/nccl.hpp>

int main(int argc, char** argv) {
  hatch::MpiSession mpi(argc, argv);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("nccl: no CUDA device: built only\n");
    return 0;
  }
  hatch::NcclCollective nccl(mpi.world(), {.device = 0});
  float* d = nullptr;
  const float h[3] = {1, 2, 3};
  float back[3] = {};
  cudaMalloc(&d, sizeof h);
  cudaMemcpy(d, h, sizeof h, cudaMemcpyHostToDevice);
  const bool device_path = nccl.allreduce_sum_device(d, 3);
  cudaMemcpy(back, d, sizeof back, cudaMemcpyDeviceToHost);
  cudaFree(d);
  std::printf("nccl: %g %g %g\n", back[0], back[1], back[2]);
  return device_path && back[0] == 1 && back[1] == 2 && back[2] == 3 ? 0 : 1;
}
