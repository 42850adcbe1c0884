// The MPI consumer (hatch::mpi from find_package(hatch COMPONENTS mpi)): a job of one rank
// (run without mpirun) whose collective sums, broadcasts and reports its time-out.
#include <cstdio>
#include <hatch/distributed/mpi.hpp>

#ifndef HATCH_WITH_MPI
#error "hatch::mpi did not define HATCH_WITH_MPI"
#endif

int main(int argc, char** argv) {
  hatch::MpiSession mpi(argc, argv);
  const auto world = mpi.mpi_world();
  world->set_timeout(std::chrono::seconds(30));
  float v[2] = {1.5f, 2.5f};
  world->allreduce_sum(v, 2);
  world->broadcast(v, sizeof v);
  world->barrier();
  std::printf("mpi: rank %d of %d, sum %g %g, time-out %lld s\n", world->rank(), world->size(), v[0], v[1],
              static_cast<long long>(world->timeout().count()));
  return world->size() == 1 && v[0] == 1.5f && v[1] == 2.5f ? 0 : 1;
}
