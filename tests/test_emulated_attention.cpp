// The Cuda backend's fused attention kernels (backend/cuda_attention.cuh), run on CPU threads
// through tests/cuda_emulation.hpp, against the unfused definition (fused::attention_*_unfused on
// Cpu64): every thread's tile, the tile edges (n not a multiple of the 64/32-row tiles), the
// log-sum-exp, the per-key-block dQ parts and their sum. In double the kernels agree with the
// definition to rounding; in float to float rounding. The same kernels run on a GPU in
// tests/cuda/test_cuda_backend.cu ("fused attention").
#include <hatch/backend/cpu.hpp>
#include <hatch/backend/fused.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "support.hpp"

#include "cuda_emulation.hpp"
// after the emulation's definitions
#include <hatch/backend/cuda_attention.cuh>

namespace {

namespace ka = hatch::cuda_kernels::attention;
using hatch_emulation::dim3;

template <class T>
struct Result {
  std::vector<T> out, lse, dqkv;
};

// what Cuda::attention_forward / attention_backward launch, in the same order
template <class T, int D, int Tile>
Result<T> emulate(const std::vector<T>& qkv, const std::vector<T>& dout, int batch, int n, int heads, T scale) {
  const int bhs = batch * heads;
  const T nan = std::numeric_limits<T>::quiet_NaN();  // anything a kernel fails to write shows
  Result<T> r;
  r.out.assign(std::size_t(batch) * n * heads * D, nan);
  r.lse.assign(std::size_t(bhs) * n, nan);
  r.dqkv.assign(std::size_t(batch) * n * 3 * heads * D, nan);
  const int blocks = ka::row_blocks(n, Tile);
  hatch_emulation::launch(ka::forward<T, D, Tile>, dim3(unsigned(bhs), unsigned(blocks)), dim3(ka::kFwdThreads),
                          ka::forward_shared_bytes<T, D, Tile>(), r.out.data(), r.lse.data(), qkv.data(), n, heads,
                          scale);
  std::vector<T> delta(std::size_t(bhs) * n, nan), part(std::size_t(blocks) * bhs * n * D, nan);
  hatch_emulation::launch(ka::delta<T, D>, dim3(unsigned((bhs * n + 7) / 8)), dim3(ka::kDeltaThreads), 0,
                          delta.data(), dout.data(), const_cast<const T*>(r.out.data()), bhs * n, n, heads);
  using Bwd = ka::Backward<T, D, Tile>;
  hatch_emulation::launch(Bwd::kernel(), dim3(unsigned(bhs), unsigned(blocks)), dim3(Bwd::threads),
                          Bwd::shared_bytes, r.dqkv.data(), part.data(),
                          dout.data(), qkv.data(), const_cast<const T*>(r.lse.data()),
                          const_cast<const T*>(delta.data()), n, heads, scale);
  hatch_emulation::launch(ka::dq_sum<T, D>, dim3(unsigned((std::size_t(bhs) * n * D + 255) / 256)), dim3(256), 0,
                          r.dqkv.data(), const_cast<const T*>(part.data()), blocks, bhs, n, heads);
  return r;
}

struct Reference {
  std::vector<double> out, lse, dqkv;
};
Reference reference(const std::vector<double>& qkv, const std::vector<double>& dout, int batch, int n, int heads,
                    int dh, double scale) {
  using B = hatch::Cpu64;
  Reference r;
  const int d = heads * dh;
  r.out.assign(std::size_t(batch) * n * d, 0);
  r.dqkv.assign(std::size_t(batch) * n * 3 * d, 0);
  std::vector<double> probs(hatch::fused::attention_saved_size<B>(batch, heads, n, dh));
  std::vector<double> dprobs(hatch::fused::attention_scratch_size<B>(batch, heads, n, dh));
  hatch::fused::attention_forward_unfused<B>(r.out.data(), probs.data(), qkv.data(), batch, n, heads, dh, scale);
  hatch::fused::attention_backward_unfused<B>(r.dqkv.data(), dprobs.data(), dout.data(), qkv.data(), probs.data(),
                                              batch, n, heads, dh, scale);
  // lse = log sum_j exp(scale q_i . k_j), straight from the definition
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < n; ++i) {
        std::vector<double> s(n);
        for (int j = 0; j < n; ++j) {
          double dot = 0;
          for (int c = 0; c < dh; ++c)
            dot += qkv[(std::size_t(b) * n + i) * 3 * d + std::size_t(h) * dh + c] *
                   qkv[(std::size_t(b) * n + j) * 3 * d + d + std::size_t(h) * dh + c];
          s[j] = scale * dot;
        }
        const double m = *std::max_element(s.begin(), s.end());
        double sum = 0;
        for (double v : s) sum += std::exp(v - m);
        r.lse.push_back(m + std::log(sum));  // (b, h, i) order = (bh, i)
      }
  return r;
}

template <class T, int D, int Tile>
void check(int batch, int n, int heads, double tolerance, unsigned seed) {
  CAPTURE(batch);
  CAPTURE(n);
  CAPTURE(heads);
  CAPTURE(D);
  CAPTURE(Tile);
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  // scores of a few units, as in training: some rows peaked, none flat
  std::vector<double> qkv(std::size_t(batch) * n * 3 * heads * D), dout(std::size_t(batch) * n * heads * D);
  for (auto& v : qkv) v = 1.5 * normal(rng);
  for (auto& v : dout) v = normal(rng);
  const double scale = 1.0 / std::sqrt(double(D));
  const std::vector<T> qkv_t(qkv.begin(), qkv.end()), dout_t(dout.begin(), dout.end());
  const Result<T> got = emulate<T, D, Tile>(qkv_t, dout_t, batch, n, heads, T(scale));
  // the reference sees the same (rounded) inputs
  const Reference want = reference(std::vector<double>(qkv_t.begin(), qkv_t.end()),
                                   std::vector<double>(dout_t.begin(), dout_t.end()), batch, n, heads, D, scale);
  CHECK(hatch::test::max_error_vs(got.out, want.out) < tolerance);
  CHECK(hatch::test::max_error_vs(got.lse, want.lse) < tolerance);
  CHECK(hatch::test::max_error_vs(got.dqkv, want.dqkv) < tolerance);
}

}  // namespace

TEST_CASE("fused attention kernels (emulated on the CPU): double, against the unfused definition") {
  for (int tile : {32, 64}) {
    auto run = [&]<int Tile>() {
      check<double, 64, Tile>(1, 5, 2, 1e-12, 1);    // one partial tile everywhere
      check<double, 64, Tile>(2, 70, 1, 1e-12, 2);   // crosses every tile edge (32, 64 rows and keys)
      check<double, 64, Tile>(1, 197, 1, 1e-12, 3);  // ViT-B/16's 197 tokens
      check<double, 128, Tile>(1, 33, 1, 1e-12, 4);  // the other supported head width
    };
    if (tile == 32) run.template operator()<32>();
    else run.template operator()<64>();
  }
}

TEST_CASE("fused attention kernels (emulated on the CPU): float, to float rounding") {
  check<float, 64, 32>(2, 97, 2, 2e-5, 5);
  check<float, 64, 64>(2, 97, 2, 2e-5, 5);
}
