// A rank that never joins a collective (run by tests/mpi_timeout.sh under `mpirun -np 2`).
//   hatch_mpi_timeout allreduce   rank 1 sleeps; rank 0's all-reduce (time-out 2 s by set_timeout)
//                                 must stop the job with the time-out message
//   hatch_mpi_timeout broadcast   the same for a broadcast
//   hatch_mpi_timeout env         the same, the time-out from HATCH_COLLECTIVE_TIMEOUT alone
//   hatch_mpi_timeout ok          both ranks join (rank 1 late, after 0.3 s): exit 0
//   hatch_mpi_timeout ok0         the same with time-out 0 (the blocking MPI calls)
#include <hatch/distributed/mpi.hpp>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

int main(int argc, char** argv) {
  using namespace std::chrono_literals;
  hatch::MpiSession mpi(argc, argv);
  const auto world = mpi.mpi_world();
  const std::string mode = argc > 1 ? argv[1] : "allreduce";
  if (mode != "env") world->set_timeout(mode == "ok0" ? 0s : 2s);
  std::printf("rank %d: time-out %lld s\n", world->rank(), static_cast<long long>(world->timeout().count()));
  std::fflush(stdout);
  std::vector<float> values(1000, 1.0f);
  if (mode == "ok" || mode == "ok0") {
    if (world->rank() == 1) std::this_thread::sleep_for(300ms);  // late, within the time-out
    world->allreduce_sum(values.data(), values.size());
    char byte = world->rank() == 0 ? 'h' : 0;
    world->broadcast(&byte, 1);
    const bool right = values[999] == float(world->size()) && byte == 'h';
    if (!right) std::fprintf(stderr, "rank %d: wrong result %g %c\n", world->rank(), values[999], byte);
    world->barrier();
    return right ? 0 : 1;
  }
  if (world->rank() == 1) {  // never joins: only the job's abort ends it
    std::this_thread::sleep_for(60s);
    return 0;
  }
  if (mode == "broadcast")
    world->broadcast(values.data(), values.size() * sizeof(float));
  else
    world->allreduce_sum(values.data(), values.size());
  std::fprintf(stderr, "rank 0: the collective returned without rank 1\n");
  return 0;
}
