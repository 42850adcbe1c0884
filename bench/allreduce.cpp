// The cost of the collective time-out (issue 12): MpiCollective's all-reduce with a time-out
// (MPI_Iallreduce, completed by polling MPI_Test against a deadline) against a plain blocking
// MPI_Allreduce of the same buffer and against MpiCollective with time-out 0 (which calls the
// blocking one), alternating in one run so that all three see the same machine.
//   mpirun -np 2 build/bench/allreduce [floats (default 1.6 M: vit-small's gradient)] [rounds]
// Prints, on rank 0, the median and mean time of each per call.
#include <hatch/distributed/mpi.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <vector>

int main(int argc, char** argv) {
  hatch::MpiSession mpi(argc, argv);
  const auto world = mpi.mpi_world();
  const std::size_t n = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1600000;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 200;
  std::vector<float> buffer(n, 1.0f);
  std::vector<double> blocking, polled, untimed;
  auto timed = [&](auto&& call) {
    MPI_Barrier(MPI_COMM_WORLD);
    const auto t0 = std::chrono::steady_clock::now();
    call();
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    std::fill(buffer.begin(), buffer.end(), 1.0f);
    return us;
  };
  for (int i = 0; i < rounds + 10; ++i) {  // the first 10 warm up
    const double b = timed([&] { MPI_Allreduce(MPI_IN_PLACE, buffer.data(), int(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD); });
    world->set_timeout(std::chrono::seconds(600));
    const double p = timed([&] { world->allreduce_sum(buffer.data(), n); });
    world->set_timeout(std::chrono::seconds(0));
    const double u = timed([&] { world->allreduce_sum(buffer.data(), n); });
    if (i >= 10) blocking.push_back(b), polled.push_back(p), untimed.push_back(u);
  }
  if (world->rank() == 0) {
    auto report = [&](const char* name, std::vector<double>& v) {
      std::sort(v.begin(), v.end());
      std::printf("%-30s median %8.1f us   mean %8.1f us\n", name, v[v.size() / 2],
                  std::accumulate(v.begin(), v.end(), 0.0) / double(v.size()));
    };
    std::printf("%d ranks, %zu floats, %d rounds\n", world->size(), n, rounds);
    report("MPI_Allreduce (blocking)", blocking);
    report("MpiCollective, time-out 600 s", polled);
    report("MpiCollective, time-out 0", untimed);
  }
  return 0;
}
