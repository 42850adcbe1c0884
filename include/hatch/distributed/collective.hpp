#pragma once
// The collective operations data-parallel training needs, over the processes ("ranks") of one
// job, as an interface that fit() takes (FitOptions::collective) without knowing the engine.
// The engines are existing ones: Open MPI (distributed/mpi.hpp, MpiCollective), NCCL for GPU
// buffers later; hatch has no transport of its own. A null collective, or one of size 1, is
// a single process and changes nothing.
#include <cstddef>
#include <type_traits>
#include <vector>

#include "hatch/backend/concept.hpp"

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
  // A hard stop of every rank (after one rank failed and the others may be inside a collective).
  virtual void abort(int code) = 0;
};

// Whether a backend's buffers are host memory that a collective can read in place (Cpu, Cpu64);
// other backends' buffers go through a host copy (or, with NCCL, stay on the device).
template <Backend B>
constexpr bool host_memory_v = requires { requires B::host_memory; };

// Sums a backend buffer over every rank in place: directly for host memory, else through a
// host copy kept in `staging`.
template <Backend B>
void allreduce_sum(Collective& c, typename B::Scalar* data, std::size_t n,
                   std::vector<typename B::Scalar>& staging) {
  if constexpr (host_memory_v<B>) {
    c.allreduce_sum(data, n);
  } else {
    staging.resize(n);
    B::download(staging.data(), data, n);
    c.allreduce_sum(staging.data(), n);
    B::upload(data, staging.data(), n);
  }
}

}  // namespace hatch
