#pragma once
// The Cpu backend policy: Eigen 3.4 for GEMMs, OpenMP for everything else. Cpu trains in
// float32; Cpu64 is the same code in double precision, for finite-difference gradient checks.
//
// Built with HATCH_WITH_OPENBLAS (CMake target hatch::openblas, Debian's libopenblas-dev), the
// GEMMs that overwrite their output (beta = 0) and those above kBlasMinWork multiply-adds go to
// OpenBLAS's sgemm/dgemm instead of Eigen's kernel: 14-25% faster per thread at a ViT's layer
// shapes, 1.15-1.9x at its attention's per-head shapes, on an AVX-512 machine (docs/performance.md)
// -- when OpenBLAS's kernels are as wide as Eigen's (detail::choose_gemm_kernel).
// The threading stays hatch's: OpenBLAS is set to one thread and each OpenMP thread calls it on
// its own panel of the output. Every translation unit of a program must agree on the macro.
#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(HATCH_WITH_OPENBLAS)
#if __has_include(<cblas-openblas.h>)
#include <cblas-openblas.h>
#else
#include <cblas.h>
#endif
#endif

#include <Eigen/Core>
#include <unsupported/Eigen/SpecialFunctions>
#include <algorithm>
#include <bit>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "hatch/backend/concept.hpp"
#include "hatch/core/error.hpp"
#include "hatch/backend/random.hpp"

namespace hatch {

namespace detail {
// Loops with fewer elements than this run on one thread: a parallel region costs microseconds.
inline constexpr std::int64_t kParallelGrain = 1 << 15;

// ---- which GEMM kernel a thread runs: Eigen's or OpenBLAS's --------------------------------------
// OpenBLAS is faster than Eigen's kernel when its kernels are as wide as the ones Eigen was
// compiled with (1.14-1.25x per thread at a ViT's layer shapes on an earlier machine of this
// project; 1.3-1.5x on a Zen 5 with both on AVX-512). But OpenBLAS runs the kernels of the core it
// detects or is given, and OPENBLAS_CORETYPE can hold it to narrower ones than the CPU has: some
// machines set OPENBLAS_CORETYPE=Haswell (AVX2) on AVX-512 processors because older OpenBLAS
// builds misbehave on them, and on a Zen 5 so configured Eigen's AVX-512 kernel is 1.2-1.5x faster
// than OpenBLAS's at every ViT shape (docs/performance.md, "OpenBLAS held to AVX2"). So OpenBLAS
// gets the GEMMs when its vectors are at least as wide as Eigen's, counting AVX-512 as 256 bits
// on a CPU that executes it on 256-bit units (AMD's Zen 4, family 19h), where it buys Eigen no
// throughput. The choice is a pure function of the build, the CPU model and the environment, never
// of a timing: the same program on the same machine always runs the same kernel, so its results
// are reproducible to the bit (tests/mpi_programs.sh compares files byte for byte across runs).
// HATCH_CPU_GEMM=eigen|openblas overrides; auto (or unset) is the rule.
enum class GemmKernel { eigen, openblas };
inline const char* name(GemmKernel k) { return k == GemmKernel::eigen ? "eigen" : "openblas"; }

// Floats per vector register of an OpenBLAS core (its names as openblas_get_corename reports them).
inline int openblas_core_floats(std::string_view core) {
  std::string c(core);
  for (auto& ch : c) ch = char(std::tolower(static_cast<unsigned char>(ch)));
  for (const char* wide : {"skylakex", "cooperlake", "sapphirerapids"})
    if (c == wide) return 16;
  for (const char* avx : {"sandybridge", "haswell", "zen", "bulldozer", "piledriver", "steamroller", "excavator"})
    if (c == avx) return 8;
  return 4;
}
// Floats per vector register of the Eigen kernel this translation unit was compiled with.
inline constexpr int eigen_kernel_floats() {
#if defined(EIGEN_VECTORIZE_AVX512)
  return 16;
#elif defined(EIGEN_VECTORIZE_AVX)
  return 8;
#elif defined(EIGEN_VECTORIZE_SSE) || defined(EIGEN_VECTORIZE_NEON)
  return 4;
#else
  return 1;
#endif
}
// The CPU's vendor string ("AuthenticAMD", "GenuineIntel") and family (with the extended family
// added, as the kernel's /proc/cpuinfo reports it); empty and 0 where cpuid is not available.
struct CpuModel {
  std::string vendor;
  unsigned family = 0;
};
inline CpuModel cpu_model() {
  CpuModel m;
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return m;
  char v[13] = {};
  std::memcpy(v, &ebx, 4);
  std::memcpy(v + 4, &edx, 4);
  std::memcpy(v + 8, &ecx, 4);
  m.vendor = v;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return m;
  const unsigned base = (eax >> 8) & 0xFu;
  m.family = base == 0xFu ? base + ((eax >> 20) & 0xFFu) : base;
#endif
  return m;
}
// Whether this CPU runs 512-bit vector instructions on 256-bit units (AMD family 19h: Zen 4).
inline bool cpu_splits_512bit() {
  const CpuModel m = cpu_model();
  return m.vendor == "AuthenticAMD" && m.family == 0x19u;
}
// The rule above. `setting` is HATCH_CPU_GEMM's value (null, "" or "auto": the rule decides).
inline GemmKernel choose_gemm_kernel(const char* setting, std::string_view openblas_core, int eigen_floats,
                                     bool splits_512bit) {
  const std::string_view v = setting ? setting : "";
  if (v == "eigen") return GemmKernel::eigen;
  if (v == "openblas") return GemmKernel::openblas;
  require(v.empty() || v == "auto", "HATCH_CPU_GEMM", "expected eigen, openblas or auto, got '" + std::string(v) + "'");
  const int eigen_effective = (eigen_floats > 8 && splits_512bit) ? 8 : eigen_floats;
  return openblas_core_floats(openblas_core) >= eigen_effective ? GemmKernel::openblas : GemmKernel::eigen;
}
}  // namespace detail

template <class T>
struct CpuBackend {
  using Scalar = T;
  static constexpr const char* name = std::is_same_v<T, float> ? "cpu" : "cpu64";
  static constexpr bool host_memory = true;  // collectives read its buffers in place

  // ---- memory ------------------------------------------------------------------------------
  // Counts allocations so tests can prove a steady-state step allocates nothing.
  static std::atomic<std::int64_t>& allocation_count() {
    static std::atomic<std::int64_t> c{0};
    return c;
  }
  // Bytes of tensor buffers alive now (Scalar buffers; index tables not counted), so tests can
  // compare what a configuration keeps.
  static std::atomic<std::int64_t>& live_bytes() {
    static std::atomic<std::int64_t> c{0};
    return c;
  }
  static T* allocate(std::size_t n) {
    ++allocation_count();
    live_bytes() += std::int64_t(n * sizeof(T));
    const std::size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
    void* p = std::aligned_alloc(64, bytes ? bytes : 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  static void deallocate(T* p, std::size_t n) {
    live_bytes() -= std::int64_t(n * sizeof(T));
    std::free(p);
  }
  static void upload(T* dst, const T* src, std::size_t n) { std::memcpy(dst, src, n * sizeof(T)); }
  static void download(T* dst, const T* src, std::size_t n) { std::memcpy(dst, src, n * sizeof(T)); }
  static void copy(T* dst, const T* src, std::size_t n) { std::memcpy(dst, src, n * sizeof(T)); }
  static void fill(T* y, std::size_t n, T v) { std::fill(y, y + n, v); }
  static void synchronize() {}
  // int32 index buffers (routing tables): host memory, aligned like allocate's, counted too.
  static std::int32_t* allocate_indices(std::size_t n) {
    ++allocation_count();
    const std::size_t bytes = ((n * sizeof(std::int32_t) + 63) / 64) * 64;
    void* p = std::aligned_alloc(64, bytes ? bytes : 64);
    if (!p) throw std::bad_alloc();
    return static_cast<std::int32_t*>(p);
  }
  static void deallocate_indices(std::int32_t* p, std::size_t) noexcept { std::free(p); }
  static void upload_indices(std::int32_t* dst, const std::int32_t* src, std::size_t n) {
    if (n) std::memcpy(dst, src, n * sizeof(std::int32_t));
  }
  static void download_indices(std::int32_t* dst, const std::int32_t* src, std::size_t n) {
    if (n) std::memcpy(dst, src, n * sizeof(std::int32_t));
  }

  // ---- GEMM --------------------------------------------------------------------------------
  // Floating-point operations (2 m n k) of every GEMM so far: the benchmarks read a step's work
  // from it and report the fraction of the machine's GEMM rate that a step reaches.
  static std::atomic<std::int64_t>& flop_count() {
    static std::atomic<std::int64_t> c{0};
    return c;
  }
  // Row-major C(m x n) = alpha op(A) op(B) + beta C. Threads split C into row or column panels,
  // each multiplied by the single-threaded gemm_serial; inside a parallel region (batched
  // attention) it runs on the calling thread alone.
  static void gemm(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
                   int ldb, T beta, T* c, int ldc) {
    gemm_panels(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, [](const Panel&) {}, [](const Panel&) {});
  }

  // The part of C that one thread of gemm_panels computes: rows [lo, hi) of C (by_rows) or its
  // columns [lo, hi), as thread t of nth. On one thread, all the rows.
  struct Panel {
    bool by_rows;
    int lo, hi, t, nth;
  };
  // Thread t of nth's even share [lo, hi) of n items (rows or columns).
  struct Share {
    int lo, hi;
  };
  static Share share(std::int64_t n, int t, int nth) { return {int(n * t / nth), int(n * (t + 1) / nth)}; }
  // gemm with work of the caller's on each thread's panel in the same parallel region: pre(panel)
  // just before the thread's GEMM (e.g. writing the bias where it accumulates), post(panel) just
  // after it, while the panel is still in cache (e.g. an activation, or column sums of an operand).
  // A fused epilogue without a GEMM kernel of our own, and one fork/join fewer per fused pass.
  // pre and post run on every thread, also where its panel is empty.
  template <class Pre, class Post>
  static void gemm_panels(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
                          int ldb, T beta, T* c, int ldc, Pre&& pre, Post&& post) {
    if (m <= 0 || n <= 0) return;
    gemm_kernel();  // decided here, outside the parallel region: a bad HATCH_CPU_GEMM throws
    const std::int64_t work = std::int64_t(m) * n * k;
    flop_count().fetch_add(2 * work, std::memory_order_relaxed);
    const int nt = (work < (1 << 18) || omp_in_parallel()) ? 1 : std::min(omp_get_max_threads(), std::max(m, n) / 16);
    if (nt <= 1) {
      const Panel p{true, 0, m, 0, 1};
      pre(p);
      gemm_serial(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      post(p);
      return;
    }
    const bool by_rows = m >= n;
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num(), nth = omp_get_num_threads();
      const int total = by_rows ? m : n;
      // panel edges on multiples of 16 keep the kernels' register blocks whole
      const int lo = int(std::int64_t(total / 16) * t / nth) * 16;
      const int hi = t + 1 == nth ? total : int(std::int64_t(total / 16) * (t + 1) / nth) * 16;
      const Panel p{by_rows, lo, std::max(lo, hi), t, nth};
      pre(p);
      if (hi > lo) {
        if (by_rows)
          gemm_serial(ta, tb, hi - lo, n, k, alpha, ta ? a + lo : a + std::int64_t(lo) * lda, lda, b, ldb, beta,
                      c + std::int64_t(lo) * ldc, ldc);
        else
          gemm_serial(ta, tb, m, hi - lo, k, alpha, a, lda, tb ? b + std::int64_t(lo) * ldb : b + lo, ldb, beta,
                      c + lo, ldc);
      }
      post(p);
    }
  }

  // One thread's GEMM: OpenBLAS's when built with it and the GEMM overwrites C or is large, else
  // gemm_eigen, Eigen's blocked kernel with a packing workspace cached per shape, so that a
  // steady-state step never allocates (Eigen's own product allocates it per call).
  static void gemm_serial(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
                          int ldb, T beta, T* c, int ldc) {
#if defined(HATCH_WITH_OPENBLAS)
    if (gemm_kernel() == detail::GemmKernel::openblas && k > 0 &&
        (beta == T(0) || std::int64_t(m) * n * k > kBlasMinWork))
      return gemm_openblas(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#endif
    gemm_eigen(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  // The kernel gemm_serial runs: detail::choose_gemm_kernel's, decided on first use. Tests store
  // the other one to cover both paths on any machine (without OpenBLAS it is always Eigen's).
  static std::atomic<detail::GemmKernel>& gemm_kernel_choice() {
#if defined(HATCH_WITH_OPENBLAS)
    static std::atomic<detail::GemmKernel> k{detail::choose_gemm_kernel(
        std::getenv("HATCH_CPU_GEMM"), openblas_get_corename(), detail::eigen_kernel_floats(),
        detail::cpu_splits_512bit())};
#else
    static std::atomic<detail::GemmKernel> k{detail::GemmKernel::eigen};
#endif
    return k;
  }
  static detail::GemmKernel gemm_kernel() { return gemm_kernel_choice().load(std::memory_order_relaxed); }
#if defined(HATCH_WITH_OPENBLAS)
  static void gemm_openblas(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
                            int ldb, T beta, T* c, int ldc) {
    static const bool one_thread = (openblas_set_num_threads(1), true);  // hatch's threads call it
    (void)one_thread;
    const auto opa = ta ? CblasTrans : CblasNoTrans, opb = tb ? CblasTrans : CblasNoTrans;
    if constexpr (std::is_same_v<T, float>)
      cblas_sgemm(CblasRowMajor, opa, opb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    else
      cblas_dgemm(CblasRowMajor, opa, opb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
#endif
  static void gemm_eigen(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
                         int ldb, T beta, T* c, int ldc) {
    if (beta == T(0))
      for (int r = 0; r < m; ++r) std::fill(c + std::int64_t(r) * ldc, c + std::int64_t(r) * ldc + n, T(0));
    else if (beta != T(1))
      for (int r = 0; r < m; ++r)
        for (int j = 0; j < n; ++j) c[std::int64_t(r) * ldc + j] *= beta;
    if (k <= 0) return;
    auto& blocking = blocking_for(m, n, k);
    using namespace Eigen;
    using Eigen::internal::general_matrix_matrix_product;
    if (!ta && !tb)
      general_matrix_matrix_product<Index, T, RowMajor, false, T, RowMajor, false, RowMajor, 1>::run(
          m, n, k, a, lda, b, ldb, c, 1, ldc, alpha, blocking, nullptr);
    else if (ta && !tb)
      general_matrix_matrix_product<Index, T, ColMajor, false, T, RowMajor, false, RowMajor, 1>::run(
          m, n, k, a, lda, b, ldb, c, 1, ldc, alpha, blocking, nullptr);
    else if (!ta && tb)
      general_matrix_matrix_product<Index, T, RowMajor, false, T, ColMajor, false, RowMajor, 1>::run(
          m, n, k, a, lda, b, ldb, c, 1, ldc, alpha, blocking, nullptr);
    else
      general_matrix_matrix_product<Index, T, ColMajor, false, T, ColMajor, false, RowMajor, 1>::run(
          m, n, k, a, lda, b, ldb, c, 1, ldc, alpha, blocking, nullptr);
  }

  // With OpenBLAS, GEMMs that accumulate (beta != 0) with at most this many multiply-adds stay on
  // Eigen's kernel: OpenBLAS sends them to its small-matrix kernels, some of which allocate on
  // every call (OpenBLAS 0.3.21: a NAC step's small accumulating GEMMs, tests/test_alloc.cpp), and
  // a training step must not allocate. Its beta = 0 kernels allocated nothing in the Block, MoE
  // and NAC steps of tests/test_alloc.cpp, so attention's per-head products (all beta = 0) go to
  // OpenBLAS whatever their size. The small-matrix path starts at 100^3.
  static constexpr std::int64_t kBlasMinWork = std::int64_t(1) << 21;
  using Blocking = Eigen::internal::gemm_blocking_space<Eigen::RowMajor, T, T, Eigen::Dynamic, Eigen::Dynamic,
                                                         Eigen::Dynamic>;
  // Shapes seen by this thread, each with its workspace. A model has a few GEMM shapes, but an
  // expert layer's per-expert GEMMs see a different row count every step: past kExactShapes
  // entries a new shape shares the entry of its row count rounded up to a power of two (a
  // blocking made for more rows serves fewer: Eigen clips its row blocks), and past kMaxShapes
  // the oldest entry is dropped. So the cache is bounded and, once the buckets exist, a step
  // allocates nothing.
  static constexpr std::size_t kExactShapes = 48, kMaxShapes = 96;
  struct BlockingEntry {
    int m, n, k;
    std::unique_ptr<Blocking> blocking;
  };
  static std::vector<BlockingEntry>& blocking_cache() {
    thread_local std::vector<BlockingEntry> cache;
    return cache;
  }
  static Blocking& blocking_for(int m, int n, int k) {
    auto& cache = blocking_cache();
    for (auto& e : cache)
      if (e.m == m && e.n == n && e.k == k) return *e.blocking;
    if (cache.size() >= kExactShapes) {
      m = int(std::bit_ceil(unsigned(m)));
      for (auto& e : cache)
        if (e.m == m && e.n == n && e.k == k) return *e.blocking;
    }
    if (cache.size() >= kMaxShapes) cache.erase(cache.begin());
    auto bl = std::make_unique<Blocking>(m, n, k, 1, true);
    bl->allocateAll();
    cache.push_back({m, n, k, std::move(bl)});
    return *cache.back().blocking;
  }

  // GEMM workspaces cached by the calling thread (tests: bounded however shapes vary).
  static std::size_t gemm_workspace_count() { return blocking_cache().size(); }

  // outer x inner independent GEMMs; matrix (o, i) of X starts at x + o * sx_outer + i * sx_inner.
  // Attention uses the two levels as (batch, head) and reads heads in place from the fused qkv
  // buffer, so no permute is ever materialised.
  static void gemm_batched(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda,
                           std::size_t sa_outer, std::size_t sa_inner, const T* b, int ldb,
                           std::size_t sb_outer, std::size_t sb_inner, T beta, T* c, int ldc,
                           std::size_t sc_outer, std::size_t sc_inner, int outer, int inner) {
    const int total = outer * inner;
    if (total <= 0 || m <= 0 || n <= 0) return;
    if (total == 1) return gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);  // split over threads
    gemm_kernel();  // as in gemm_panels
    // The work is counted once here: an atomic add per small GEMM from both threads would bounce
    // the counter's cache line between the cores (attention makes thousands of these per step).
    flop_count().fetch_add(2 * std::int64_t(m) * n * k * total, std::memory_order_relaxed);
#pragma omp parallel for schedule(static) if (std::int64_t(m) * n * k * total > detail::kParallelGrain)
    for (int j = 0; j < total; ++j) {
      const int o = j / inner, i = j % inner;
      gemm_serial(ta, tb, m, n, k, alpha, a + o * sa_outer + i * sa_inner, lda, b + o * sb_outer + i * sb_inner,
                  ldb, beta, c + o * sc_outer + i * sc_inner, ldc);
    }
  }

  // ---- elementwise and reductions ----------------------------------------------------------
  template <class F>
  static void parallel_for(std::int64_t n, F&& f) {
#pragma omp parallel for schedule(static) if (n > detail::kParallelGrain)
    for (std::int64_t j = 0; j < n; ++j) f(j);
  }
  template <class F>
  static void parallel_rows(std::int64_t rows, std::int64_t cols, F&& f) {
#pragma omp parallel for schedule(static) if (rows > 1 && rows * cols > detail::kParallelGrain)
    for (std::int64_t r = 0; r < rows; ++r) f(r);
  }

  static void axpy(T* y, T a, const T* x, std::size_t n) {
    parallel_for(n, [&](std::int64_t j) { y[j] += a * x[j]; });
  }
  static void add(T* y, const T* a, const T* b, std::size_t n) {
    parallel_for(n, [&](std::int64_t j) { y[j] = a[j] + b[j]; });
  }
  static void mul(T* y, const T* a, const T* b, std::size_t n) {
    parallel_for(n, [&](std::int64_t j) { y[j] = a[j] * b[j]; });
  }
  static void scale(T* y, T a, std::size_t n) {
    parallel_for(n, [&](std::int64_t j) { y[j] *= a; });
  }
  // y (rows x out) = x W^T + bias (fused::linear_forward). Each thread writes the bias where its
  // panel's GEMM would write zeros, and the GEMM accumulates onto it (beta = 1): no pass over y
  // of its own, and no fork/join of its own.
  static void linear_forward(T* y, const T* x, const T* w, const T* bias, int rows, int in, int out) {
    gemm_panels(false, true, rows, out, in, T(1), x, in, w, in, bias ? T(1) : T(0), y, out,
                [&](const Panel& p) {
                  if (!bias) return;
                  const int r0 = p.by_rows ? p.lo : 0, r1 = p.by_rows ? p.hi : rows;
                  const int c0 = p.by_rows ? 0 : p.lo, c1 = p.by_rows ? out : p.hi;
                  for (int r = r0; r < r1; ++r) std::copy(bias + c0, bias + c1, y + std::int64_t(r) * out + c0);
                },
                [](const Panel&) {});
  }
  // dw (out x in) += dy^T x and dbias (out) += the column sums of dy, either may be null
  // (fused::linear_backward_params). Its inner dimension is the batch's rows, far larger than dw
  // (vit-small: 2176 rows against dw's 512 x 128), so the threads split the rows (split-K): each
  // multiplies its own rows of dy and x, thread 0 onto dw and the others into a workspace, and
  // after a barrier the threads add the partial products into dw by rows of dw. Split by dw's
  // panels, as gemm does, every thread would pack the whole of one operand (x, or dy) for its
  // panel: the same 2176-row matrix packed once per thread. The bias gradient: each thread sums
  // the columns of its own rows of dy, added up the same way. With fewer rows than dw has rows or
  // columns, or on one thread, dw's panels (gemm_panels) as before, the column sums of dy on each
  // thread after its panel.
  static void linear_backward_params(T* dw, T* dbias, const T* dy, const T* x, int rows, int in, int out) {
    if (!dw || in <= 0) {  // (gemm_panels does nothing, not even post, for an empty dw)
      if (dbias) sum_rows(dbias, dy, rows, out, out, T(1));
      return;
    }
    const std::int64_t work = std::int64_t(out) * in * rows;
    const int nt = (work < (1 << 18) || omp_in_parallel() || rows < std::max(in, out))
                       ? 1
                       : std::min(omp_get_max_threads(), rows / 64);
    if (nt <= 1) {
      gemm_panels(true, false, out, in, rows, T(1), dy, out, x, in, T(1), dw, in, [](const Panel&) {},
                  [&](const Panel& p) {
                    if (!dbias) return;
                    const Share c = p.by_rows ? Share{p.lo, p.hi} : share(out, p.t, p.nth);
                    column_sums(dbias, dy, rows, c.lo, c.hi, out, T(1));
                  });
      return;
    }
    gemm_kernel();  // as in gemm_panels: decided outside the parallel region
    flop_count().fetch_add(2 * work, std::memory_order_relaxed);
    // partial products of threads 1..nt-1, then their partial bias sums; kept by the calling thread
    const std::size_t dw_size = std::size_t(out) * in;
    thread_local std::vector<T> workspace;
    if (workspace.size() < std::size_t(nt - 1) * (dw_size + out)) workspace.resize(std::size_t(nt - 1) * (dw_size + out));
    T* ws = workspace.data();
    T* ws_bias = ws + std::size_t(nt - 1) * dw_size;
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num(), nth = omp_get_num_threads();
      const Share r = share(rows, t, nth);
      T* part = t == 0 ? dw : ws + std::size_t(t - 1) * dw_size;
      gemm_serial(true, false, out, in, r.hi - r.lo, T(1), dy + std::int64_t(r.lo) * out, out,
                  x + std::int64_t(r.lo) * in, in, t == 0 ? T(1) : T(0), part, in);
      if (dbias)
        column_sums(t == 0 ? dbias : ws_bias + std::size_t(t - 1) * out, dy + std::int64_t(r.lo) * out, r.hi - r.lo, 0,
                    out, out, t == 0 ? T(1) : T(0));
#pragma omp barrier
      const Share o = share(out, t, nth);  // this thread's rows of dw (and entries of dbias)
      for (int j = 1; j < nth; ++j) {
        const T* pj = ws + std::size_t(j - 1) * dw_size;
        for (int row = o.lo; row < o.hi; ++row) {
          T* dst = dw + std::int64_t(row) * in;
          const T* src = pj + std::int64_t(row) * in;
          for (int c = 0; c < in; ++c) dst[c] += src[c];
        }
        if (dbias)
          for (int c = o.lo; c < o.hi; ++c) dbias[c] += ws_bias[std::size_t(j - 1) * out + c];
      }
    }
  }
  static void add_bias_rows(T* y, const T* bias, int rows, int cols) {
    parallel_rows(rows, cols, [&](std::int64_t r) {
      T* yr = y + r * cols;
      for (int c = 0; c < cols; ++c) yr[c] += bias[c];
    });
  }
  static void sum_rows(T* out, const T* x, int rows, int cols, int ld, T beta) {
    // Columns are split across threads so that each thread owns its outputs.
    const int nt = (std::int64_t(rows) * cols > detail::kParallelGrain) ? omp_get_max_threads() : 1;
#pragma omp parallel num_threads(nt)
    {
      const Share c = share(cols, omp_get_thread_num(), omp_get_num_threads());
      column_sums(out, x, rows, c.lo, c.hi, ld, beta);
    }
  }
  // out[c] = beta out[c] + sum_r x[r ld + c] for c in [c0, c1), on the calling thread: the sums go
  // through a local block of kSumCols accumulators (vectorised: they alias nothing), row by row.
  static void column_sums(T* out, const T* x, int rows, int c0, int c1, int ld, T beta) {
    constexpr int kSumCols = 64;
    for (int cb = c0; cb < c1; cb += kSumCols) {
      const int w = std::min(kSumCols, c1 - cb);
      alignas(64) T acc[kSumCols] = {};
      for (int r = 0; r < rows; ++r) {
        const T* xr = x + std::int64_t(r) * ld + cb;
        for (int c = 0; c < w; ++c) acc[c] += xr[c];
      }
      for (int c = 0; c < w; ++c) out[cb + c] = (beta == T(0) ? T(0) : beta * out[cb + c]) + acc[c];
    }
  }
  static void copy_2d(T* dst, int ld_dst, const T* src, int ld_src, int rows, int cols) {
    parallel_rows(rows, cols, [&](std::int64_t r) {
      std::memcpy(dst + r * ld_dst, src + r * ld_src, sizeof(T) * cols);
    });
  }
  static void scale_rows(T* y, const T* x, const T* s, int rows, int cols) {
    parallel_rows(rows, cols, [&](std::int64_t r) {
      const T sr = s[r];
      for (int c = 0; c < cols; ++c) y[r * cols + c] = x[r * cols + c] * sr;
    });
  }
  static double sum_squares(const T* x, std::size_t n) {
    double s = 0;
#pragma omp parallel for reduction(+ : s) if (n > std::size_t(detail::kParallelGrain))
    for (std::int64_t j = 0; j < std::int64_t(n); ++j) s += double(x[j]) * double(x[j]);
    return s;
  }
  static bool all_finite(const T* x, std::size_t n) {
    int bad = 0;
#pragma omp parallel for reduction(+ : bad) if (n > std::size_t(detail::kParallelGrain))
    for (std::int64_t j = 0; j < std::int64_t(n); ++j) bad += !std::isfinite(x[j]);
    return bad == 0;
  }

  // ---- activations, normalisation, softmax -------------------------------------------------
  // GELU through Eigen's vectorised erf and exp, in chunks across threads.
  using Arr = Eigen::Array<T, Eigen::Dynamic, 1>;
  using RowArr = Eigen::Array<T, 1, Eigen::Dynamic>;
  template <class F>
  static void chunked(std::size_t n, F&& f) {
    constexpr std::int64_t chunk = 4096;
    const std::int64_t chunks = (std::int64_t(n) + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) if (std::int64_t(n) > detail::kParallelGrain)
    for (std::int64_t c = 0; c < chunks; ++c) f(c * chunk, std::min<std::int64_t>(chunk, std::int64_t(n) - c * chunk));
  }
  static void gelu_forward(T* y, const T* x, std::size_t n) {
    chunked(n, [&](std::int64_t off, std::int64_t len) {
      Eigen::Map<const Arr> xv(x + off, len);
      Eigen::Map<Arr> yv(y + off, len);
      yv = T(0.5) * xv * (T(1) + (xv * T(M_SQRT1_2)).erf());
    });
  }
  static void gelu_backward(T* dx, const T* dy, const T* x, std::size_t n) {
    chunked(n, [&](std::int64_t off, std::int64_t len) {
      Eigen::Map<const Arr> xv(x + off, len), dyv(dy + off, len);
      Eigen::Map<Arr> dxv(dx + off, len);
      dxv = dyv * (T(0.5) * (T(1) + (xv * T(M_SQRT1_2)).erf()) +
                   xv * (T(-0.5) * xv.square()).exp() * T(0.3989422804014327));
    });
  }
  // User-defined element-wise functions (see concept.hpp): a plain loop the compiler can inline
  // the functor into, split across threads for large n.
  template <class F>
  static void map(T* y, const T* x, std::size_t n, F f) {
    parallel_for(std::int64_t(n), [&](std::int64_t j) { y[j] = f(x[j]); });
  }
  template <class F>
  static void map_binary(T* y, const T* a, const T* b, std::size_t n, F f) {
    parallel_for(std::int64_t(n), [&](std::int64_t j) { y[j] = f(a[j], b[j]); });
  }
  static void layer_norm_forward(T* y, T* mean, T* rstd, const T* x, const T* gamma, const T* beta,
                                 int rows, int cols, T eps) {
    // Row sums through Eigen, which vectorises reductions (a plain loop's sum is one serial chain).
    const Eigen::Map<const RowArr> g(gamma, cols), b(beta, cols);
    parallel_rows(rows, cols, [&](std::int64_t r) {
      const Eigen::Map<const RowArr> xr(x + r * cols, cols);
      const T mu = xr.sum() / T(cols);
      const T var = (xr - mu).square().sum();
      const T rs = T(1) / std::sqrt(var / T(cols) + eps);
      mean[r] = mu;
      rstd[r] = rs;
      Eigen::Map<RowArr>(y + r * cols, cols) = (xr - mu) * rs * g + b;
    });
  }
  // dgamma/dbeta (accumulated) may be null when the parameters are frozen. One pass over x and dy:
  // each thread takes a block of rows, writes their dx and sums its share of dgamma and dbeta
  // into a workspace of its own; after a barrier the threads add the shares up, by columns.
  static void layer_norm_backward(T* dx, T* dgamma, T* dbeta, const T* dy, const T* x, const T* mean,
                                  const T* rstd, const T* gamma, int rows, int cols) {
    const bool params = dgamma || dbeta;  // either may be null (the concept's contract)
    if (!dx && !params) return;
    const int nt = (std::int64_t(rows) * cols > detail::kParallelGrain) ? omp_get_max_threads() : 1;
    // per thread: cols sums for dgamma, then cols for dbeta; the calling thread's cache, so that
    // a steady-state step allocates nothing (grown on the first call of a shape)
    thread_local std::vector<T> workspace;
    if (workspace.size() < std::size_t(nt) * 2 * cols) workspace.resize(std::size_t(nt) * 2 * cols);
    T* ws = workspace.data();
    const Eigen::Map<const RowArr> gam(gamma, cols);
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num(), nth = omp_get_num_threads();
      const Share own = share(rows, t, nth);
      Eigen::Map<RowArr> pg(ws + std::size_t(t) * 2 * cols, cols), pb(ws + std::size_t(t) * 2 * cols + cols, cols);
      pg.setZero();  // this thread's shares of dgamma and dbeta
      pb.setZero();
      for (std::int64_t r = own.lo; r < own.hi; ++r) {
        const Eigen::Map<const RowArr> xr(x + r * cols, cols), dyr(dy + r * cols, cols);
        const T mu = mean[r], rs = rstd[r];
        const auto xh = (xr - mu) * rs;  // the normalised input
        if (params) {
          pg += dyr * xh;
          pb += dyr;
        }
        if (dx) {
          const auto g = dyr * gam;               // dy * gamma
          const T s1 = g.sum() / T(cols);         // mean of g
          const T s2 = (g * xh).sum() / T(cols);  // mean of g * xhat
          Eigen::Map<RowArr>(dx + r * cols, cols) = rs * (g - s1 - xh * s2);
        }
      }
      if (params) {
#pragma omp barrier
        const Share c = share(cols, t, nth);
        for (int u = 0; u < nth; ++u) {
          const T* g = ws + std::size_t(u) * 2 * cols;
          const T* b = g + cols;
          if (dgamma)
            for (int j = c.lo; j < c.hi; ++j) dgamma[j] += g[j];
          if (dbeta)
            for (int j = c.lo; j < c.hi; ++j) dbeta[j] += b[j];
        }
      }
    }
  }
  static void softmax_forward(T* y, const T* x, int rows, int cols, T scale) {
    // Eigen's vectorised exp and reductions; y may be x (coefficient-wise, so in place is safe).
    // Rows go in blocks of about kSoftmaxBlock values: each row's max subtracted, then one exp
    // over the whole block (a row of 17 would leave a scalar exp for its 17th value), then each
    // row normalised.
    constexpr std::int64_t kSoftmaxBlock = 4096;
    const std::int64_t per = std::max<std::int64_t>(1, kSoftmaxBlock / std::max(cols, 1));
    const std::int64_t blocks = (rows + per - 1) / per;
#pragma omp parallel for schedule(static) if (blocks > 1 && std::int64_t(rows) * cols > detail::kParallelGrain)
    for (std::int64_t bi = 0; bi < blocks; ++bi) {
      const std::int64_t r0 = bi * per, r1 = std::min<std::int64_t>(rows, r0 + per);
      for (std::int64_t r = r0; r < r1; ++r) {
        const Eigen::Map<const RowArr> xr(x + r * cols, cols);
        Eigen::Map<RowArr>(y + r * cols, cols) = scale * (xr - xr.maxCoeff());
      }
      Eigen::Map<Arr> block(y + r0 * cols, (r1 - r0) * cols);
      block = block.exp();
      for (std::int64_t r = r0; r < r1; ++r) {
        Eigen::Map<RowArr> yr(y + r * cols, cols);
        yr *= T(1) / yr.sum();
      }
    }
  }
  static void softmax_backward(T* dx, const T* dy, const T* y, int rows, int cols, T scale) {
    parallel_rows(rows, cols, [&](std::int64_t r) {
      const Eigen::Map<const RowArr> yr(y + r * cols, cols), dyr(dy + r * cols, cols);
      const T dot = (dyr * yr).sum();
      Eigen::Map<RowArr>(dx + r * cols, cols) = scale * yr * (dyr - dot);
    });
  }

  static void bernoulli_mask(T* mask, std::size_t n, T keep_prob, std::uint64_t seed, std::uint64_t offset) {
    const T inv = T(1) / keep_prob;
    parallel_for(n, [&](std::int64_t j) {
      mask[j] = uniform01(seed, offset + std::uint64_t(j)) < double(keep_prob) ? inv : T(0);
    });
  }

  // ---- routing (mixture of experts) ---------------------------------------------------------
  // One writer per output element (rows split across threads), so results are deterministic.
  // y[i, :] = idx[i] < 0 ? 0 : (scale ? scale[i] : 1) * x[idx[i], :]
  static void gather_rows(T* y, const T* x, const std::int32_t* idx, const T* scale, int n, int cols) {
    if (n <= 0 || cols <= 0) return;
    parallel_rows(n, cols, [&](std::int64_t r) {
      T* yr = y + r * cols;
      const std::int32_t src = idx[r];
      if (src < 0) {
        std::fill(yr, yr + cols, T(0));
        return;
      }
      const T* xr = x + std::int64_t(src) * cols;
      if (scale) {
        const T s = scale[r];
        for (int c = 0; c < cols; ++c) yr[c] = s * xr[c];
      } else {
        std::memcpy(yr, xr, sizeof(T) * cols);
      }
    });
  }
  // y[t, :] = sum over j < k with slots[t k + j] >= 0, in order of j, of (w ? w[t k + j] : 1) x[slot, :]
  static void combine_rows(T* y, const T* x, const std::int32_t* slots, const T* w, int rows, int k, int cols) {
    if (rows <= 0 || cols <= 0) return;
    parallel_rows(rows, std::int64_t(cols) * std::max(k, 1), [&](std::int64_t t) {
      T* yr = y + t * cols;
      std::fill(yr, yr + cols, T(0));
      for (int j = 0; j < k; ++j) {
        const std::int32_t src = slots[t * k + j];
        if (src < 0) continue;
        const T wj = w ? w[t * k + j] : T(1);
        const T* xr = x + std::int64_t(src) * cols;
        for (int c = 0; c < cols; ++c) yr[c] += wj * xr[c];
      }
    });
  }
  // out[t k + j] = slots[t k + j] < 0 ? 0 : dot(a[t, :], b[slots[t k + j], :]), summed in T
  static void gather_dot_rows(T* out, const T* a, const T* b, const std::int32_t* slots, int rows, int k,
                              int cols) {
    if (rows <= 0 || k <= 0) return;
    parallel_rows(rows, std::int64_t(std::max(cols, 1)) * k, [&](std::int64_t t) {
      const T* ar = a + t * std::max(cols, 0);
      for (int j = 0; j < k; ++j) {
        const std::int32_t src = slots[t * k + j];
        T s = T(0);
        if (src >= 0) {
          const T* br = b + std::int64_t(src) * cols;
          for (int c = 0; c < cols; ++c) s += ar[c] * br[c];
        }
        out[t * k + j] = s;
      }
    });
  }

  // ---- sparse attention (NAC's kernel-modulated attention) ---------------------------------
  // A pair list in CSR form over query rows, shared by every example b < batch and head h < heads:
  // query u attends to the keys col[p], p in [row_ptr[u], row_ptr[u + 1]) (nnz = row_ptr[n]).
  // Row r = b n + u of q, k, v (and of their gradients) starts at r * ld, head h is the columns
  // [h dh, (h + 1) dh). Scores, probabilities and their gradients are laid out
  // [(b heads + h) nnz + p]. A query with no pair gets output 0.
  //
  // forward:  s_p = scale q_u . k_col[p] + bias[b ld_bias + p]  (ld_bias 0: one bias for all b)
  //           probs_p = softmax of s over the row's pairs;  o_u = sum_p probs_p v_col[p]
  static void sparse_attention_forward(T* probs, T* o, int ld_o, const T* q, const T* k, const T* v, int ld,
                                       const std::int32_t* row_ptr, const std::int32_t* col, const T* bias,
                                       int ld_bias, int batch, int n, int heads, int dh, int nnz, T scale) {
    const std::int64_t rows = std::int64_t(batch) * heads * n;
    parallel_rows(rows, std::int64_t(dh) * std::max(1, nnz / std::max(n, 1)), [&](std::int64_t r) {
      const int u = int(r % n), h = int((r / n) % heads), b = int(r / (std::int64_t(n) * heads));
      const std::int32_t p0 = row_ptr[u], p1 = row_ptr[u + 1];
      T* pr = probs + (std::int64_t(b) * heads + h) * nnz;
      const T* qu = q + (std::int64_t(b) * n + u) * ld + std::int64_t(h) * dh;
      T* ou = o + (std::int64_t(b) * n + u) * ld_o + std::int64_t(h) * dh;
      std::fill(ou, ou + dh, T(0));
      if (p1 <= p0) return;
      T mx = T(0);
      for (std::int32_t p = p0; p < p1; ++p) {
        const T* kv = k + (std::int64_t(b) * n + col[p]) * ld + std::int64_t(h) * dh;
        T s = T(0);
        for (int c = 0; c < dh; ++c) s += qu[c] * kv[c];
        s = scale * s + bias[std::int64_t(b) * ld_bias + p];
        pr[p] = s;
        mx = p == p0 ? s : std::max(mx, s);
      }
      T sum = T(0);
      for (std::int32_t p = p0; p < p1; ++p) sum += (pr[p] = std::exp(pr[p] - mx));
      const T inv = T(1) / sum;
      for (std::int32_t p = p0; p < p1; ++p) {
        pr[p] *= inv;
        const T* vv = v + (std::int64_t(b) * n + col[p]) * ld + std::int64_t(h) * dh;
        for (int c = 0; c < dh; ++c) ou[c] += pr[p] * vv[c];
      }
    });
  }
  // Query side of the backward, one writer per (b, h, u):
  //   dP_p = dout_u . v_col[p];  dscores_p = probs_p (dP_p - sum_p' probs_p' dP_p')  (d/ds_p)
  //   dq_u = scale sum_p dscores_p k_col[p]   (overwritten; dq rows ld_dq apart)
  static void sparse_attention_backward_rows(T* dscores, T* dq, int ld_dq, const T* dout, int ld_o, const T* k,
                                             const T* v, int ld, const T* probs, const std::int32_t* row_ptr,
                                             const std::int32_t* col, int batch, int n, int heads, int dh, int nnz,
                                             T scale) {
    const std::int64_t rows = std::int64_t(batch) * heads * n;
    parallel_rows(rows, std::int64_t(dh) * std::max(1, nnz / std::max(n, 1)), [&](std::int64_t r) {
      const int u = int(r % n), h = int((r / n) % heads), b = int(r / (std::int64_t(n) * heads));
      const std::int32_t p0 = row_ptr[u], p1 = row_ptr[u + 1];
      const T* pr = probs + (std::int64_t(b) * heads + h) * nnz;
      T* ds = dscores + (std::int64_t(b) * heads + h) * nnz;
      const T* du = dout + (std::int64_t(b) * n + u) * ld_o + std::int64_t(h) * dh;
      T* dqu = dq + (std::int64_t(b) * n + u) * ld_dq + std::int64_t(h) * dh;
      std::fill(dqu, dqu + dh, T(0));
      T dot = T(0);
      for (std::int32_t p = p0; p < p1; ++p) {
        const T* vv = v + (std::int64_t(b) * n + col[p]) * ld + std::int64_t(h) * dh;
        T s = T(0);
        for (int c = 0; c < dh; ++c) s += du[c] * vv[c];
        ds[p] = s;
        dot += s * pr[p];
      }
      for (std::int32_t p = p0; p < p1; ++p) {
        ds[p] = pr[p] * (ds[p] - dot);
        const T* kv = k + (std::int64_t(b) * n + col[p]) * ld + std::int64_t(h) * dh;
        const T w = scale * ds[p];
        for (int c = 0; c < dh; ++c) dqu[c] += w * kv[c];
      }
    });
  }
  // Key side of the backward, one writer per (b, h, key v), over the transposed pair list: the
  // pairs pair[j], j in [col_ptr[v], col_ptr[v + 1]), are those with key v, in increasing order,
  // and pair_row[j] is the query of pair[j]. dk and dv are overwritten (rows ld_dkv apart):
  //   dk_v = scale sum_j dscores_pair[j] q_pair_row[j];   dv_v = sum_j probs_pair[j] dout_pair_row[j]
  static void sparse_attention_backward_cols(T* dk, T* dv, int ld_dkv, const T* q, int ld, const T* dout, int ld_o,
                                             const T* probs, const T* dscores, const std::int32_t* col_ptr,
                                             const std::int32_t* pair, const std::int32_t* pair_row, int batch,
                                             int n, int heads, int dh, int nnz, T scale) {
    const std::int64_t rows = std::int64_t(batch) * heads * n;
    parallel_rows(rows, std::int64_t(dh) * std::max(1, nnz / std::max(n, 1)), [&](std::int64_t r) {
      const int vi = int(r % n), h = int((r / n) % heads), b = int(r / (std::int64_t(n) * heads));
      const T* pr = probs + (std::int64_t(b) * heads + h) * nnz;
      const T* ds = dscores + (std::int64_t(b) * heads + h) * nnz;
      T* dkv = dk + (std::int64_t(b) * n + vi) * ld_dkv + std::int64_t(h) * dh;
      T* dvv = dv + (std::int64_t(b) * n + vi) * ld_dkv + std::int64_t(h) * dh;
      std::fill(dkv, dkv + dh, T(0));
      std::fill(dvv, dvv + dh, T(0));
      for (std::int32_t j = col_ptr[vi]; j < col_ptr[vi + 1]; ++j) {
        const std::int32_t p = pair[j];
        const std::int64_t row = std::int64_t(b) * n + pair_row[j];
        const T* qu = q + row * ld + std::int64_t(h) * dh;
        const T* du = dout + row * ld_o + std::int64_t(h) * dh;
        const T ws = scale * ds[p], wp = pr[p];
        for (int c = 0; c < dh; ++c) {
          dkv[c] += ws * qu[c];
          dvv[c] += wp * du[c];
        }
      }
    });
  }

  // ---- patch embedding ---------------------------------------------------------------------
  // patch vector index = (c * p + ky) * p + kx, the layout of a Conv2d weight (D, C, p, p).
  static void im2patch(T* patches, const T* img, int batch, int ch, int h, int w, int p) {
    const int gh = h / p, gw = w / p, pd = ch * p * p;
    parallel_rows(std::int64_t(batch) * gh * gw, pd, [&](std::int64_t r) {
      const int b = int(r / (gh * gw)), g = int(r % (gh * gw)), py = g / gw, px = g % gw;
      T* out = patches + r * pd;
      for (int c = 0; c < ch; ++c)
        for (int ky = 0; ky < p; ++ky)
          std::memcpy(out + (c * p + ky) * p,
                      img + ((std::int64_t(b) * ch + c) * h + py * p + ky) * w + px * p, sizeof(T) * p);
    });
  }
  static void patch2im(T* img, const T* patches, int batch, int ch, int h, int w, int p) {
    const int gh = h / p, gw = w / p, pd = ch * p * p;
    // Non-overlapping patches: each pixel is written by exactly one patch (rest stays zero).
    std::fill(img, img + std::int64_t(batch) * ch * h * w, T(0));
    parallel_rows(std::int64_t(batch) * gh * gw, pd, [&](std::int64_t r) {
      const int b = int(r / (gh * gw)), g = int(r % (gh * gw)), py = g / gw, px = g % gw;
      const T* in = patches + r * pd;
      for (int c = 0; c < ch; ++c)
        for (int ky = 0; ky < p; ++ky)
          std::memcpy(img + ((std::int64_t(b) * ch + c) * h + py * p + ky) * w + px * p,
                      in + (c * p + ky) * p, sizeof(T) * p);
    });
  }

  // ---- loss and optimizer --------------------------------------------------------------------
  // Soft-target cross-entropy: returns sum_r -sum_c t log softmax(z); dz = scale (softmax(z) - t)
  // (targets summing to one per row).
  static double softmax_cross_entropy(T* dz, const T* z, const T* t, int rows, int cols, T scale) {
    double total = 0;
    for (int r = 0; r < rows; ++r) {
      const T* zr = z + std::int64_t(r) * cols;
      const T* tr = t + std::int64_t(r) * cols;
      T mx = zr[0];
      for (int c = 1; c < cols; ++c) mx = std::max(mx, zr[c]);
      double s = 0;
      for (int c = 0; c < cols; ++c) s += std::exp(double(zr[c] - mx));
      const double lse = std::log(s) + mx;
      double tsum = 0;
      for (int c = 0; c < cols; ++c) {
        total -= double(tr[c]) * (double(zr[c]) - lse);
        tsum += tr[c];
      }
      if (dz)
        for (int c = 0; c < cols; ++c)
          dz[std::int64_t(r) * cols + c] = scale * T(std::exp(double(zr[c]) - lse) * tsum - tr[c]);
    }
    return total;
  }
  static void adamw_update(T* w, T* m, T* v, const T* g, std::size_t n, T lr, T beta1, T beta2, T eps,
                           T weight_decay, T bias_corr1, T bias_corr2) {
    // One pass, vectorised by Eigen (the per-element lambda loop was not: 4 ns a parameter).
    chunked(n, [&](std::int64_t off, std::int64_t len) {
      Eigen::Map<Arr> wv(w + off, len), mv(m + off, len), vv(v + off, len);
      const Eigen::Map<const Arr> gv(g + off, len);
      wv -= lr * weight_decay * wv;
      mv = beta1 * mv + (T(1) - beta1) * gv;
      vv = beta2 * vv + (T(1) - beta2) * gv * gv;
      wv -= lr * (mv / bias_corr1) / ((vv / bias_corr2).sqrt() + eps);
    });
  }
};

using Cpu = CpuBackend<float>;
using Cpu64 = CpuBackend<double>;
static_assert(Backend<Cpu> && Backend<Cpu64>);

}  // namespace hatch
