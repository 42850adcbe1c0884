// Kernel-level checks that the primitive tests cannot reach through the Backend API: the
// column-reduction "finish" kernels must cover every column whatever grid the launch gets (the
// launch caps the grid at 65536 blocks, so wide outputs rely on the grid-stride loop). Here they
// run on a deliberately tiny grid. Without a device they skip, and fail if HATCH_EXPECT_GPU=1.
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
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
  // One block: sum_rows_finish of 32 threads (each owns ~31 columns), layer_norm_param_finish of
  // 32 columns x kColLanes chunk lanes (~31 column groups, each lane 2 or 3 of the 40 chunks).
  constexpr int chunks = 40, cols = 1000;
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
  HATCH_CUDA_LAUNCH(hatch::cuda_kernels::layer_norm_param_finish<float>, 1, hatch::cuda_detail::kColBlock, dg.data(),
                    db.data(), p.data(), chunks, cols);
  Cuda::synchronize();
  CHECK(out.to_host() == sum_ref);
  CHECK(dg.to_host() == g_ref);
  CHECK(db.to_host() == b_ref);
}

namespace {
std::vector<float> noise(std::size_t n, unsigned seed) {
  std::vector<float> v(n);
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& x : v) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    x = float(int((s >> 33) % 2001) - 1000) / 250.0f;  // [-4, 4] in steps of 1/250
  }
  return v;
}
// max |a - b| / max(|b|, 1): the two kernels' results must agree to float rounding.
float max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  float d = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const float e = std::abs(a[i] - b[i]) / std::max(std::abs(b[i]), 1.0f);
    if (!(e <= d)) d = e;  // a NaN sticks
  }
  return d;
}
#define CHECK_SAME_TOL(x, y, tol)                        \
  do {                                                   \
    const auto hx_ = (x).to_host();                      \
    const auto hy_ = (y).to_host();                      \
    const float d_ = max_diff(hx_, hy_);                 \
    CHECK_MESSAGE(d_ <= (tol), #x " vs " #y ": " << d_); \
  } while (0)
// The N (values per lane) the launchers pick for a row of cols columns (cuda.hpp, with_row_registers).
template <class F>
void with_lane_values(int cols, F&& f) {
  if (cols <= 128) f(std::integral_constant<int, 4>{});
  else if (cols <= 256) f(std::integral_constant<int, 8>{});
  else if (cols <= 512) f(std::integral_constant<int, 16>{});
  else f(std::integral_constant<int, 32>{});
}
}  // namespace

// The row kernels that keep a row in registers (the launches pick them for up to 1024 columns)
// against the general kernels, with single-value loads (W = 1) and with 128-bit packs (W = 4,
// for column counts that are multiples of 4). With W = 1 the arithmetic is the general kernels'
// in the same order; they are still not bit-identical (an H200 run showed last-bit differences:
// the compiler contracts different products into FMAs in the two loops), so a difference above
// 1e-6 fails. With W = 4 the lane sums run in another order: 1e-5 (a wrong column or a lost row
// is off by far more). LayerNorm of one column is left out: its variance is zero, rstd is
// 1/sqrt(eps), and a last-bit difference is multiplied by 1000.
// LayerNorm's one-kernel backward also sums dgamma and dbeta across rows: on one block, on three
// (several rows per warp, the last block adds the blocks' sums) and on one block per 8 rows,
// against the column-reduction kernels.
TEST_CASE("cuda kernels: split_tf32 (scalar and 128-bit): hi a TF32 value nearest x, lo = x - hi exactly") {
  if (!have_device()) return;
  const auto bits = [](float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
  };
  const float inf = std::numeric_limits<float>::infinity(), big = std::numeric_limits<float>::max();
  std::vector<float> x = {0.f, -0.f, 1.f, 1.f + 0x1p-12f, 1.f + 0x1.8p-11f, -(1.f + 0x1.8p-11f), 1.f + 0x1p-11f,
                          3.14159265f, -2.71828183e-20f, 1e-40f /* subnormal */, big, -big, inf, -inf,
                          std::numeric_limits<float>::quiet_NaN(), 6.5e4f};
  for (int i = 0; i < 1000; ++i) x.push_back(std::ldexp(float(std::sin(0.37 * i + 0.1)), (i % 61) - 30));
  REQUIRE(x.size() % 4 == 0);
  const std::size_t n = x.size();
  Dev dx = dev(x), hi1 = dev(std::vector<float>(n)), lo1 = dev(std::vector<float>(n)), hi4 = dev(std::vector<float>(n)),
      lo4 = dev(std::vector<float>(n));
  HATCH_CUDA_LAUNCH(hatch::cuda_kernels::split_tf32<float>, 2, 64, hi1.data(), lo1.data(), dx.data(), n);
  HATCH_CUDA_LAUNCH(hatch::cuda_kernels::split_tf32_4<float4>, 2, 64, reinterpret_cast<float4*>(hi4.data()),
                    reinterpret_cast<float4*>(lo4.data()), reinterpret_cast<const float4*>(dx.data()), n / 4);
  Cuda::synchronize();
  const std::vector<float> hi = hi1.to_host(), lo = lo1.to_host(), h4 = hi4.to_host(), l4 = lo4.to_host();
  for (std::size_t j = 0; j < n; ++j) {
    CAPTURE(j);
    CAPTURE(x[j]);
    CHECK(bits(h4[j]) == bits(hi[j]));  // the 128-bit kernel is the scalar one, four at a time
    CHECK(bits(l4[j]) == bits(lo[j]));
    if (!std::isfinite(x[j])) {  // infinities and NaN whole in hi
      CHECK(bits(hi[j]) == bits(x[j]));
      CHECK(lo[j] == 0.f);
      continue;
    }
    CHECK((bits(hi[j]) & 0x1fffu) == 0u);  // a TF32 value: 10 mantissa bits
    CHECK(hi[j] + lo[j] == x[j]);          // exact
    CHECK(std::isfinite(hi[j]));
    // nearest: no TF32 neighbour of hi is closer to x (except past the largest float, truncated)
    if (std::abs(x[j]) < 0x1.ffep127f) {
      const float up = std::bit_cast<float>(bits(hi[j]) + 0x2000u), down = std::bit_cast<float>(bits(hi[j]) - 0x2000u);
      if (hi[j] != 0.f) {
        CHECK(std::abs(double(x[j]) - hi[j]) <= std::abs(double(x[j]) - up));
        CHECK(std::abs(double(x[j]) - hi[j]) <= std::abs(double(x[j]) - down));
      }
    }
  }
  CHECK(hi[3] == 1.f);               // 1 + 2^-12 rounds down
  CHECK(hi[4] == 1.f + 0x1p-10f);    // 1 + 2^-11 + 2^-12 rounds up
  CHECK(hi[5] == -(1.f + 0x1p-10f)); // and symmetrically
  CHECK(bits(hi[10]) == (bits(big) & ~0x1fffu));  // rounding would overflow: truncated
}

TEST_CASE("cuda kernels: row-in-registers softmax and LayerNorm agree with the general kernels") {
  if (!have_device()) return;
  namespace k = hatch::cuda_kernels;
  const dim3 block(32, k::kRowsPerBlock);
  for (const int cols : {1, 5, 31, 32, 33, 128, 197, 256, 300, 768, 1000, 1024}) {
    const int rows = 37;
    const unsigned grid = unsigned((rows + k::kRowsPerBlock - 1) / k::kRowsPerBlock);
    const std::size_t n = std::size_t(rows) * cols;
    Dev x = dev(noise(n, 1)), dy = dev(noise(n, 2)), gamma = dev(noise(std::size_t(cols), 3)),
        beta = dev(noise(std::size_t(cols), 4));
    auto zeros = [](std::size_t m) { return dev(std::vector<float>(m)); };
    // The general kernels, once.
    Dev y0 = zeros(n), d0 = zeros(n), p0 = zeros(n), dx0 = zeros(n), m0 = zeros(rows), r0 = zeros(rows),
        l0 = zeros(n), g0 = dev(noise(std::size_t(cols), 5)), b0 = dev(noise(std::size_t(cols), 6));
    const Dev g_start = dev(noise(std::size_t(cols), 5)), b_start = dev(noise(std::size_t(cols), 6));
    HATCH_CUDA_LAUNCH(k::softmax_forward<float>, grid, block, y0.data(), x.data(), rows, cols, 0.125f);
    HATCH_CUDA_LAUNCH(k::softmax_backward<float>, grid, block, d0.data(), dy.data(), y0.data(), rows, cols, 0.125f);
    HATCH_CUDA_LAUNCH(k::layer_norm_forward<float>, grid, block, l0.data(), m0.data(), r0.data(), x.data(),
                      gamma.data(), beta.data(), rows, cols, 1e-6f);
    HATCH_CUDA_LAUNCH(k::layer_norm_backward_dx<float>, grid, block, dx0.data(), dy.data(), x.data(), m0.data(),
                      r0.data(), gamma.data(), rows, cols);
    HATCH_CUDA_LAUNCH(k::layer_norm_param_partial<float>, dim3(unsigned((cols + 31) / 32), 1u),
                      dim3(32, k::kColLanes), g0.data(), b0.data(), nullptr, dy.data(), x.data(), m0.data(),
                      r0.data(), rows, cols, rows);
    Cuda::synchronize();
    auto check_width = [&](auto width) {
      constexpr int W = decltype(width)::value;
      const float tol = W == 1 ? 1e-6f : 1e-5f;
      CAPTURE(cols);
      CAPTURE(W);
      with_lane_values(cols, [&](auto values) {
        constexpr int N = decltype(values)::value;
        Dev y1 = zeros(n), d1 = zeros(n), l1 = zeros(n), m1 = zeros(rows), r1 = zeros(rows), dx1 = zeros(n);
        HATCH_CUDA_LAUNCH((k::softmax_forward_regs<float, W, N>), grid, block, y1.data(), x.data(), rows, cols,
                          0.125f);
        HATCH_CUDA_LAUNCH((k::softmax_backward_regs<float, W, N>), grid, block, d1.data(), dy.data(), y0.data(),
                          rows, cols, 0.125f);
        Cuda::synchronize();
        CHECK_SAME_TOL(y0, y1, tol);
        CHECK_SAME_TOL(d0, d1, tol);
        if (cols == 1) return;
        HATCH_CUDA_LAUNCH((k::layer_norm_forward_regs<float, W, N>), grid, block, l1.data(), m1.data(), r1.data(),
                          x.data(), gamma.data(), beta.data(), rows, cols, 1e-6f);
        // dx alone: a warp per row, no sums across rows.
        hatch::cuda_detail::layer_norm_backward_one_kernel<float, W, N>(dx1.data(), nullptr, nullptr, dy.data(),
                                                                        x.data(), m0.data(), r0.data(), gamma.data(),
                                                                        rows, cols);
        Cuda::synchronize();
        CHECK_SAME_TOL(l0, l1, tol);
        CHECK_SAME_TOL(m0, m1, tol);
        CHECK_SAME_TOL(r0, r1, tol);
        CHECK_SAME_TOL(dx0, dx1, tol);
        for (const unsigned blocks : {1u, 3u, grid}) {
          CAPTURE(blocks);
          auto backward = [&](float* dx, float* dg, float* db) {
            hatch::cuda_detail::layer_norm_backward_one_kernel<float, W, N>(dx, dg, db, dy.data(), x.data(), m0.data(),
                                                                            r0.data(), gamma.data(), rows, cols, blocks);
            Cuda::synchronize();
          };
          Dev dx2 = zeros(n), g1 = g_start, b1 = b_start;
          backward(dx2.data(), g1.data(), b1.data());
          CHECK_SAME_TOL(dx0, dx2, tol);
          CHECK_SAME_TOL(g0, g1, 1e-5f);  // sums of 37 rows in another order
          CHECK_SAME_TOL(b0, b1, 1e-5f);
          // dgamma alone, then dbeta alone (the other untouched).
          g1 = g_start;
          b1 = b_start;
          backward(nullptr, g1.data(), nullptr);
          CHECK_SAME_TOL(g0, g1, 1e-5f);
          CHECK(b1.to_host() == b_start.to_host());
          backward(nullptr, nullptr, b1.data());
          CHECK_SAME_TOL(b0, b1, 1e-5f);
        }
      });
    };
    check_width(std::integral_constant<int, 1>{});
    if (cols % 4 == 0) check_width(std::integral_constant<int, 4>{});
  }
}
