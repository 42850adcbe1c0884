// Kernel-level checks that the primitive tests cannot reach through the Backend API: the
// column-reduction "finish" kernels must cover every column whatever grid the launch gets (the
// launch caps the grid at 65536 blocks, so wide outputs rely on the grid-stride loop). Here they
// run on a deliberately tiny grid. Without a device they skip, and fail if HATCH_EXPECT_GPU=1.
#include <doctest/doctest.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "hatch/cuda.hpp"

using hatch::Cuda;
using Dev = hatch::Tensor<Cuda>;

namespace {
bool have_device() {
  if (Cuda::device_available()) return true;
  const char* expect = std::getenv("HATCH_EXPECT_GPU");
  if (expect && std::string(expect) == "1") FAIL("HATCH_EXPECT_GPU=1 but no CUDA device is usable");
  MESSAGE("no CUDA device: skipped");
  return false;
}
Dev dev(const std::vector<float>& h) {
  Dev t;
  t.from_host(h, {std::int64_t(h.size())});
  return t;
}
}  // namespace

TEST_CASE("cuda kernels: the column-reduction finish kernels cover every column on a capped grid") {
  if (!have_device()) return;
  constexpr int chunks = 3, cols = 1000;  // one block of 32 threads: each thread owns ~31 columns
  std::vector<float> partial(2 * chunks * cols), start(cols, 1.0f);
  for (std::size_t i = 0; i < partial.size(); ++i) partial[i] = float(i % 7) - 3.0f;
  std::vector<float> sum_ref(cols), g_ref(cols), b_ref(cols);
  for (int c = 0; c < cols; ++c) {
    double s = 0, sb = 0;
    for (int k = 0; k < chunks; ++k) {
      s += partial[std::size_t(k) * cols + c];
      sb += partial[std::size_t(chunks + k) * cols + c];
    }
    sum_ref[c] = float(2.0 * 1.0 + s);  // beta = 2 times the old value
    g_ref[c] = float(1.0 + s);
    b_ref[c] = float(1.0 + sb);
  }
  Dev p = dev(partial), out = dev(start), dg = dev(start), db = dev(start);
  HATCH_CUDA_LAUNCH(hatch::cuda_kernels::sum_rows_finish<float>, 1, 32, out.data(), p.data(), chunks, cols, 2.0f);
  HATCH_CUDA_LAUNCH(hatch::cuda_kernels::layer_norm_param_finish<float>, 1, 32, dg.data(), db.data(), p.data(),
                    chunks, cols);
  Cuda::synchronize();
  CHECK(out.to_host() == sum_ref);
  CHECK(dg.to_host() == g_ref);
  CHECK(db.to_host() == b_ref);
}
