// The main of hatch_nccl_tests (run by ctest under `mpirun -np 1` and `-np 2`): MPI on the host
// compiler, the tests themselves in test_nccl.cu. NCCL needs a GPU per rank; with fewer, every
// rank prints why and exits 77 (ctest: skipped) -- or 1 when there is no GPU at all and
// HATCH_EXPECT_GPU=1 says one must be there (a GPU machine, where a skip would pass a run that
// tested nothing).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <hatch/distributed/mpi.hpp>
#include <memory>
#include <string>
#include <vector>

int run_nccl_tests(std::shared_ptr<hatch::Collective> host, int device);

int main(int argc, char** argv) {
  hatch::MpiSession mpi(argc, argv);
  const auto world = mpi.mpi_world();
  world->set_timeout(std::chrono::seconds(120));
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess) devices = 0;
  // Ranks per machine and GPUs per machine, agreed by every rank: the fewest GPUs any rank sees
  // against the most ranks on one machine.
  const int local = world->local_rank();
  // (each rank fills its own two slots; the sum gathers them)
  std::vector<double> all(2 * std::size_t(world->size()), 0.0);
  all[2 * std::size_t(world->rank())] = devices;
  all[2 * std::size_t(world->rank()) + 1] = local + 1;
  world->allreduce_sum(all.data(), all.size());
  int fewest_gpus = devices, most_local = local + 1;
  for (int r = 0; r < world->size(); ++r) {
    fewest_gpus = std::min(fewest_gpus, int(all[2 * std::size_t(r)]));
    most_local = std::max(most_local, int(all[2 * std::size_t(r) + 1]));
  }
  if (fewest_gpus < most_local) {
    // HATCH_EXPECT_GPU=1 says a GPU must be there: none is a failure; one GPU for two ranks
    // is a machine that cannot run this case (a skip).
    const char* expect = std::getenv("HATCH_EXPECT_GPU");
    const bool required = expect && std::strcmp(expect, "1") == 0 && fewest_gpus == 0;
    if (world->rank() == 0)
      std::fprintf(stderr, "hatch_nccl_tests: %s: %d CUDA device(s)%s, NCCL needs one per rank (%d ranks on a machine)\n",
                   required ? "FAILED (HATCH_EXPECT_GPU=1)" : "skipped", fewest_gpus,
                   e == cudaSuccess ? "" : (std::string(" (") + cudaGetErrorString(e) + ")").c_str(), most_local);
    return required ? 1 : 77;
  }
  const int failures = run_nccl_tests(world, local);
  double total = failures;
  world->allreduce_sum(&total, 1);
  if (world->rank() == 0) std::printf("%s: %d failed check(s) over %d rank(s)\n", total ? "FAILED" : "OK", int(total), world->size());
  return total ? 1 : 0;
}
