#pragma once
// The collective operations data-parallel training needs, over the processes ("ranks") of one
// job, as an interface that fit() takes (FitOptions::collective) without knowing the engine.
// The engines are existing ones: Open MPI (distributed/mpi.hpp, MpiCollective) and, for CUDA
// device buffers, NCCL (distributed/nccl.hpp, NcclCollective); hatch has no transport of its
// own. A null collective, or one of size 1, is a single process and changes nothing.
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "hatch/backend/concept.hpp"
#include "hatch/core/error.hpp"

namespace hatch {

class Collective {
 public:
  virtual ~Collective() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // In-place sums over every rank of n values in host memory; every rank calls with the same n.
  virtual void allreduce_sum(float* data, std::size_t n) = 0;
  virtual void allreduce_sum(double* data, std::size_t n) = 0;
  // Rank 0's n bytes to every rank.
  virtual void broadcast(void* data, std::size_t bytes) = 0;
  virtual void barrier() = 0;
  // The same for buffers in device memory (the Cuda backend's), reduced where they are. An
  // engine that can (NcclCollective) does so and returns true; the default returns false, and
  // the caller goes through a host copy (allreduce_sum<B> and broadcast<B> below).
  virtual bool allreduce_sum_device(float*, std::size_t) { return false; }
  virtual bool allreduce_sum_device(double*, std::size_t) { return false; }
  virtual bool broadcast_device(void*, std::size_t) { return false; }
  // A hard stop of every rank (after one rank failed and the others may be inside a collective).
  virtual void abort(int code) = 0;
};

// How long an engine's collective may wait for the other ranks before it stops the job (MPI
// and NCCL alike): HATCH_COLLECTIVE_TIMEOUT (whole seconds, 0 = none) when set, else 600 s. A
// malformed value is a hatch::Error naming the variable.
inline std::chrono::seconds default_collective_timeout() {
  const char* env = std::getenv("HATCH_COLLECTIVE_TIMEOUT");
  if (!env || !*env) return std::chrono::seconds(600);
  char* end = nullptr;
  const long long s = std::strtoll(env, &end, 10);
  require(*end == '\0' && s >= 0, "HATCH_COLLECTIVE_TIMEOUT",
          std::string("expected a whole number of seconds >= 0 (0: no time-out), got '") + env + "'");
  return std::chrono::seconds(s);
}

// A time-out given in code, checked: whole seconds >= 0 (0: none). `who` names the setter.
inline std::chrono::seconds checked_timeout(std::chrono::seconds t, const char* who) {
  require(t.count() >= 0, who, "the time-out must be >= 0 seconds (0: none)");
  return t;
}

namespace detail {
// Polls ready() until it returns true: busily (yielding the core to anyone who wants it) for
// `spin`, so that polling adds no latency to a training step's all-reduce; then asleep between
// polls for 1% of the time waited so far (20 us to 10 ms), so that a long wait costs little
// CPU. Returns false once `limit` has passed (0: never).
template <class Ready>
bool poll_until(Ready&& ready, std::chrono::microseconds spin, std::chrono::seconds limit) {
  using namespace std::chrono;
  const auto start = steady_clock::now();
  while (!ready()) {
    const auto waited = duration_cast<microseconds>(steady_clock::now() - start);
    if (limit.count() > 0 && duration_cast<seconds>(waited) >= limit) return false;  // (no overflow)
    if (waited < spin)
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::clamp(waited / 100, microseconds(20), microseconds(10000)));
  }
  return true;
}
}  // namespace detail

// Sums a backend buffer over every rank in place: directly for host memory, in device memory
// when the collective can (NCCL), else through a host copy kept in `staging`.
template <Backend B>
void allreduce_sum(Collective& c, typename B::Scalar* data, std::size_t n,
                   std::vector<typename B::Scalar>& staging) {
  if constexpr (host_memory_v<B>) {
    c.allreduce_sum(data, n);
  } else if (!c.allreduce_sum_device(data, n)) {
    staging.resize(n);
    B::download(staging.data(), data, n);
    c.allreduce_sum(staging.data(), n);
    B::upload(data, staging.data(), n);
  }
}

// Rank 0's n values of a backend buffer to every rank, the same three ways.
template <Backend B>
void broadcast(Collective& c, typename B::Scalar* data, std::size_t n, std::vector<typename B::Scalar>& staging) {
  using T = typename B::Scalar;
  if constexpr (host_memory_v<B>) {
    c.broadcast(data, n * sizeof(T));
  } else if (!c.broadcast_device(data, n * sizeof(T))) {
    staging.resize(n);
    B::download(staging.data(), data, n);
    c.broadcast(staging.data(), n * sizeof(T));
    B::upload(data, staging.data(), n);
  }
}

}  // namespace hatch
