// One thread's GEMM at the shapes of a vit-small step (batch 128: 2176 token rows, width 128; and
// vit-base's per-head attention products, 50 tokens, head width 32),
// through Eigen's kernel (Cpu::gemm_eigen) and through OpenBLAS (Cpu::gemm_openblas), in GFLOP/s:
// why the Cpu backend sends its large GEMMs to OpenBLAS when built with it, unless OpenBLAS is held
// to narrower kernels than Eigen's and slower for it (Cpu::gemm_kernel, docs/performance.md).
//   OMP_NUM_THREADS=1 build/bench/gemm_shapes
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <hatch/hatch.hpp>
#include <vector>

#if !defined(HATCH_WITH_OPENBLAS)
#error "bench/gemm_shapes compares Eigen with OpenBLAS: build it with hatch::openblas"
#endif

int main() {
  using hatch::Cpu;
  struct Shape {
    int m, n, k;
    bool ta, tb;
    const char* what;
  };
  const Shape shapes[] = {{2176, 384, 128, false, true, "qkv forward"},  {2176, 512, 128, false, true, "fc1 forward"},
                          {2176, 128, 512, false, true, "fc2 forward"},  {2176, 128, 512, false, false, "fc1 input grad"},
                          {512, 128, 2176, true, false, "fc1 weight grad"}, {128, 512, 2176, true, false, "fc2 weight grad"},
                          {17, 17, 32, false, true, "attention scores"}, {17, 32, 17, false, false, "attention output"},
                          {50, 50, 32, false, true, "vit-base scores"},  {50, 32, 50, false, false, "vit-base output"},
                          {50, 32, 50, true, false, "vit-base dV, dK"},
                          {2048, 2048, 2048, false, false, "2048^3"}};
  std::printf("OpenBLAS core %s; Cpu::gemm runs the %s kernel here\n", openblas_get_corename(),
              hatch::detail::name(Cpu::gemm_kernel()));
  std::printf("%-18s %16s %12s %12s %7s\n", "GEMM", "m x n x k", "Eigen", "OpenBLAS", "ratio");
  for (const auto& s : shapes) {
    std::vector<float> a(std::size_t(s.m) * s.k, 0.5f), b(std::size_t(s.k) * s.n, 0.25f), c(std::size_t(s.m) * s.n);
    const int lda = s.ta ? s.m : s.k, ldb = s.tb ? s.k : s.n;
    const double flop = 2.0 * s.m * s.n * s.k;
    const int iters = std::max(1, int(4e8 / flop));  // about 0.4 GFLOP per timing
    auto rate = [&](auto gemm) {
      double best = 1e30;
      for (int rep = 0; rep < 6; ++rep) {  // the first is a warm-up
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) gemm(s.ta, s.tb, s.m, s.n, s.k, 1.0f, a.data(), lda, b.data(), ldb, 0.0f, c.data(), s.n);
        const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
        if (rep) best = std::min(best, t);
      }
      return flop / best / 1e9;
    };
    const double e = rate(Cpu::gemm_eigen), o = rate(Cpu::gemm_openblas);
    char dims[40];
    std::snprintf(dims, sizeof dims, "%dx%dx%d", s.m, s.n, s.k);
    std::printf("%-18s %16s %12.1f %12.1f %6.2fx\n", s.what, dims, e, o, o / e);
  }
}
