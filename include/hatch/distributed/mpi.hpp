#pragma once
// Open MPI as hatch's collective engine (FindMPI's MPI::MPI_CXX; the C API only). Include this
// where a program is built with MPI (target hatch::mpi): the rest of hatch never includes it.
//
//   hatch::MpiSession mpi(argc, argv);          // MPI_Init_thread ... MPI_Finalize
//   auto world = mpi.world();                   // std::shared_ptr<Collective>, MPI_COMM_WORLD
//   fit_options.collective = world;             // data-parallel fit
//
// Errors: MPI's default handler aborts the whole job on a failed call, and a rank that dies
// makes mpirun stop the others. A rank that stays alive but never joins a collective (stuck in
// I/O, a deadlock, a lost node that mpirun has not noticed) is caught by the time-out: every
// all-reduce and broadcast is a non-blocking MPI call completed with MPI_Test against a
// deadline, and a rank that waits longer than the time-out prints what it waited for and
// stops the job with MPI_Abort.
//
//   time-out   600 s by default; HATCH_COLLECTIVE_TIMEOUT=<seconds> in the environment changes
//              the default, set_timeout() (or the constructor) sets it for one collective.
//              0 waits forever, through the blocking MPI_Allreduce and MPI_Bcast: Open MPI
//              4.1's non-blocking all-reduce (coll/libnbc) is slower on large buffers than its
//              blocking one (docs/performance.md: 1.6 M floats over 2 ranks), so a job that
//              wants every microsecond and trusts its ranks sets 0. Barriers have their own
//              time-out, none by default: ranks of a module-parallel job wait at one while
//              rank 0 trains for hours.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>

#include "hatch/core/error.hpp"
#include "hatch/distributed/collective.hpp"

namespace hatch {

class MpiCollective final : public Collective {
 public:
  explicit MpiCollective(MPI_Comm comm = MPI_COMM_WORLD, std::optional<std::chrono::seconds> timeout = std::nullopt)
      : comm_(comm), timeout_(checked_timeout(timeout ? *timeout : default_collective_timeout(), "MpiCollective")) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  // How long an all-reduce or broadcast may wait for the other ranks before this rank stops the
  // job (0: forever, with the blocking MPI calls).
  void set_timeout(std::chrono::seconds t) { timeout_ = checked_timeout(t, "MpiCollective::set_timeout"); }
  std::chrono::seconds timeout() const { return timeout_; }
  // The same for barrier() (0, the default: forever).
  void set_barrier_timeout(std::chrono::seconds t) {
    barrier_timeout_ = checked_timeout(t, "MpiCollective::set_barrier_timeout");
  }
  // How long a wait polls without sleeping: a step's all-reduce normally completes within it,
  // at the speed of a blocking MPI_Allreduce; longer waits sleep between polls.
  void set_spin(std::chrono::microseconds s) { spin_ = s; }

  // This rank's index among the ranks on its own machine (MPI_COMM_TYPE_SHARED): the GPU it
  // should take when each machine has several. A collective call: every rank makes it.
  int local_rank() const {
    MPI_Comm node;
    MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node);
    int r = 0;
    MPI_Comm_rank(node, &r);
    MPI_Comm_free(&node);
    return r;
  }

  void allreduce_sum(float* data, std::size_t n) override { reduce(data, n, MPI_FLOAT, "floats"); }
  void allreduce_sum(double* data, std::size_t n) override { reduce(data, n, MPI_DOUBLE, "doubles"); }
  void broadcast(void* data, std::size_t bytes) override {
    for (std::size_t done = 0; done < bytes;) {  // counts are int: chunks below 2^31
      const int chunk = int(std::min<std::size_t>(bytes - done, std::size_t(1) << 30));
      if (timeout_.count() == 0) {
        MPI_Bcast(static_cast<char*>(data) + done, chunk, MPI_BYTE, 0, comm_);
      } else {
        MPI_Request request;
        MPI_Ibcast(static_cast<char*>(data) + done, chunk, MPI_BYTE, 0, comm_, &request);
        complete(request, "broadcast", bytes, "bytes", timeout_);
      }
      done += std::size_t(chunk);
    }
  }
  // Waits mostly asleep: ranks that wait for another's phase (module-parallel incubation: the
  // others wait while rank 0 pre-trains the meta model) leave their cores to it.
  void barrier() override {
    MPI_Request request;
    MPI_Ibarrier(comm_, &request);
    complete(request, "barrier", 0, "", barrier_timeout_);
  }
  void abort(int code) override { MPI_Abort(comm_, code); }

 private:
  template <class T>
  void reduce(T* data, std::size_t n, MPI_Datatype type, const char* unit) {
    for (std::size_t done = 0; done < n;) {
      const int chunk = int(std::min<std::size_t>(n - done, std::size_t(1) << 30));
      if (timeout_.count() == 0) {
        MPI_Allreduce(MPI_IN_PLACE, data + done, chunk, type, MPI_SUM, comm_);
      } else {
        MPI_Request request;
        MPI_Iallreduce(MPI_IN_PLACE, data + done, chunk, type, MPI_SUM, comm_, &request);
        complete(request, "all-reduce", n, unit, timeout_);
      }
      done += std::size_t(chunk);
    }
  }

  // Completes `request`, polling (detail::poll_until); past `limit` (when non-zero), stops the job.
  void complete(MPI_Request& request, const char* op, std::size_t count, const char* unit,
                std::chrono::seconds limit) {
    const bool done = detail::poll_until([&] {
      int flag = 0;
      MPI_Test(&request, &flag, MPI_STATUS_IGNORE);
      return flag != 0;
    }, spin_, limit);
    if (!done) timed_out(op, count, unit, limit);
  }

  [[noreturn]] void timed_out(const char* op, std::size_t count, const char* unit, std::chrono::seconds limit) {
    std::string what = op;
    if (*unit) what += " of " + std::to_string(count) + " " + unit;
    std::fprintf(stderr,
                 "hatch: MPI %s timed out on rank %d of %d after %lld s: not every rank joined it "
                 "(a rank is stuck or gone; the limit is HATCH_COLLECTIVE_TIMEOUT or "
                 "MpiCollective::set_timeout). Aborting the job.\n",
                 what.c_str(), rank_, size_, static_cast<long long>(limit.count()));
    std::fflush(stderr);
    MPI_Abort(comm_, 3);
    std::abort();  // MPI_Abort does not return
  }

  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
  std::chrono::seconds timeout_, barrier_timeout_{0};
  std::chrono::microseconds spin_{50000};
};

// MPI_Init_thread on construction (funneled: only the main thread calls MPI; OpenMP threads do
// the arithmetic), MPI_Finalize on destruction. Run without mpirun, it is a job of one rank.
// HATCH_COLLECTIVE_TIMEOUT is read (and a bad value refused) before MPI starts.
class MpiSession {
 public:
  MpiSession(int& argc, char**& argv) {
    const auto timeout = default_collective_timeout();
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    world_ = std::make_shared<MpiCollective>(MPI_COMM_WORLD, timeout);
  }
  ~MpiSession() { MPI_Finalize(); }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  std::shared_ptr<Collective> world() const { return world_; }
  // The same object with the MPI-only settings (time-outs, local rank).
  std::shared_ptr<MpiCollective> mpi_world() const { return world_; }

 private:
  std::shared_ptr<MpiCollective> world_;
};

}  // namespace hatch
