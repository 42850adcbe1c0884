#pragma once
// The count of host waits for a GPU: every time the host blocks until device work is done (a
// stream or device synchronisation, a copy to pageable host memory, a reduction returned to the
// host, an NCCL collective waited for). The Cuda backend counts its own (Cuda::host_waits());
// distributed/nccl.hpp counts each collective it waits for, and can include this header where
// the Cuda backend (which needs nvcc) cannot be. A training step through fit waits once on one
// GPU; tests count.
#include <atomic>
#include <cstdint>

namespace hatch::cuda_detail {

inline std::atomic<std::int64_t>& host_waits() {
  static std::atomic<std::int64_t> n{0};
  return n;
}

}  // namespace hatch::cuda_detail
