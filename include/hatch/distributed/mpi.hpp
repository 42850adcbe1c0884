#pragma once
// Open MPI as hatch's collective engine (FindMPI's MPI::MPI_CXX; the C API only). Include this
// where a program is built with MPI (target hatch::mpi): the rest of hatch never includes it.
//
//   hatch::MpiSession mpi(argc, argv);          // MPI_Init_thread ... MPI_Finalize
//   auto world = mpi.world();                   // std::shared_ptr<Collective>, MPI_COMM_WORLD
//   fit_options.collective = world;             // data-parallel fit
//
// Errors: MPI's default handler aborts the whole job on a failed call; a rank that dies makes
// mpirun stop the others, so no rank waits forever in a collective.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <memory>
#include <string>

#include "hatch/core/error.hpp"
#include "hatch/distributed/collective.hpp"

namespace hatch {

class MpiCollective final : public Collective {
 public:
  explicit MpiCollective(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void allreduce_sum(float* data, std::size_t n) override { reduce(data, n, MPI_FLOAT); }
  void allreduce_sum(double* data, std::size_t n) override { reduce(data, n, MPI_DOUBLE); }
  void broadcast(void* data, std::size_t bytes) override {
    for (std::size_t done = 0; done < bytes;) {  // counts are int: chunks below 2^31
      const int chunk = int(std::min<std::size_t>(bytes - done, std::size_t(1) << 30));
      MPI_Bcast(static_cast<char*>(data) + done, chunk, MPI_BYTE, 0, comm_);
      done += std::size_t(chunk);
    }
  }
  // Waits without spinning: ranks that wait for another's phase (module-parallel incubation:
  // the others wait while rank 0 pre-trains the meta model) leave their cores to it.
  void barrier() override {
    MPI_Request request;
    MPI_Ibarrier(comm_, &request);
    for (int done = 0;;) {
      MPI_Test(&request, &done, MPI_STATUS_IGNORE);
      if (done) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  void abort(int code) override { MPI_Abort(comm_, code); }

 private:
  template <class T>
  void reduce(T* data, std::size_t n, MPI_Datatype type) {
    for (std::size_t done = 0; done < n;) {
      const int chunk = int(std::min<std::size_t>(n - done, std::size_t(1) << 30));
      MPI_Allreduce(MPI_IN_PLACE, data + done, chunk, type, MPI_SUM, comm_);
      done += std::size_t(chunk);
    }
  }
  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
};

// MPI_Init_thread on construction (funneled: only the main thread calls MPI; OpenMP threads do
// the arithmetic), MPI_Finalize on destruction. Run without mpirun, it is a job of one rank.
class MpiSession {
 public:
  MpiSession(int& argc, char**& argv) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    world_ = std::make_shared<MpiCollective>(MPI_COMM_WORLD);
  }
  ~MpiSession() { MPI_Finalize(); }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  std::shared_ptr<Collective> world() const { return world_; }

 private:
  std::shared_ptr<MpiCollective> world_;
};

}  // namespace hatch
