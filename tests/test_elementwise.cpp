// User-defined element-wise functions (B::map, B::map_binary, Elementwise<Fn>, Silu) and the
// zero-copy shape layers (Tensor::view_of, Flatten, Reshape).
#include <fstream>

#include "support.hpp"

using namespace hatch;
using test::error_message;
using test::has;

namespace {
// A functor with state: the primitives take it by value, the layer holds one (fn()).
struct AffineFn {
  double a = 2, b = 1;
  template <class T> HATCH_HD T operator()(T x) const { return T(a) * x + T(b); }
  template <class T> HATCH_HD T operator()(T u, T v) const { return u * v - T(b); }
};
struct LeakyReluFn {
  double slope = 0.01;
  template <class T> HATCH_HD T f(T x) const { return x > T(0) ? x : T(slope) * x; }
  template <class T> HATCH_HD T df(T x) const { return x > T(0) ? T(1) : T(slope); }
};

// The README's example, verbatim.
struct SoftplusFn {
  template <class T> HATCH_HD static T f(T x) { return hd::log1p(hd::exp(x)); }
  template <class T> HATCH_HD static T df(T x) { return hd::sigmoid(x); }
};
using Softplus = Elementwise<SoftplusFn>;  // a spec like Gelu; hatch's Silu is written this way
using Net = Sequential<Flatten<28 * 28>, Named<"fc1", Linear<784, 256>>, Softplus,
                       Named<"fc2", Linear<256, 10>>>;  // Flatten and Reshape<...> copy nothing

template <class B>
Tensor<B> tensor_of(std::vector<typename B::Scalar> v, Shape s) {
  Tensor<B> t;
  t.from_host(v, s);
  return t;
}
}  // namespace

TEST_CASE_TEMPLATE("Backend::map and map_binary apply a functor to every element", B, Cpu, Cpu64) {
  using T = typename B::Scalar;
  // Large enough for the OpenMP path as well as the serial one.
  for (std::size_t n : {std::size_t(5), std::size_t(1) << 16}) {
    std::vector<T> a(n), b(n);
    for (std::size_t j = 0; j < n; ++j) a[j] = T(j % 97) - T(40), b[j] = T(j % 13) * T(0.5);
    auto x = tensor_of<B>(a, {std::int64_t(n)}), u = tensor_of<B>(b, {std::int64_t(n)});
    Tensor<B> y({std::int64_t(n)});
    B::map(y.data(), x.data(), n, AffineFn{3, -1});
    auto yh = y.to_host();
    for (std::size_t j = 0; j < n; ++j) REQUIRE(yh[j] == T(3) * a[j] - T(1));
    B::map_binary(y.data(), x.data(), u.data(), n, AffineFn{0, 2});
    yh = y.to_host();
    for (std::size_t j = 0; j < n; ++j) REQUIRE(yh[j] == a[j] * b[j] - T(2));
    B::map(x.data(), x.data(), n, AffineFn{});  // in place
    yh = x.to_host();
    for (std::size_t j = 0; j < n; ++j) REQUIRE(yh[j] == T(2) * a[j] + T(1));
  }
  B::map(nullptr, nullptr, 0, AffineFn{});  // n = 0 touches nothing
}

TEST_CASE_TEMPLATE("fused::linear_forward on Cpu: x W^T + bias, on Eigen's and OpenBLAS's sizes, with no bias and k = 0",
                   B, Cpu, Cpu64) {
  using T = typename B::Scalar;
  // rows, in, out: small; above Cpu::kBlasMinWork multiply-adds (OpenBLAS's kernel when it is the
  // one in use), split across threads by rows (rows >= out) and by columns (rows < out: each thread
  // writes the bias of its own columns); an empty inner dimension (y = bias)
  const test::TwoThreads two_threads;  // the split paths, even on a one-core machine
  for (const auto kernel : test::gemm_kernels())  // each kernel the build has
  for (const auto [rows, in, out] : {std::array{5, 7, 3}, std::array{300, 96, 80}, std::array{40, 96, 300},
                                     std::array{4, 0, 6}}) {
    const test::WithGemmKernel with(kernel);
    CAPTURE(int(kernel));
    CAPTURE(rows);
    CAPTURE(in);
    std::vector<T> x(std::size_t(rows) * in), w(std::size_t(out) * in), bias(out);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = T(std::sin(0.37 * double(i)));
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = T(std::cos(0.11 * double(i)));
    for (int j = 0; j < out; ++j) bias[j] = T(0.5 - 0.25 * j);
    for (const bool with_bias : {true, false}) {
      std::vector<T> y(std::size_t(rows) * out, T(7));  // stale contents must not leak through
      fused::linear_forward<B>(y.data(), x.data(), w.data(), with_bias ? bias.data() : nullptr, rows, in, out);
      double worst = 0;
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < out; ++j) {
          double ref = with_bias ? double(bias[j]) : 0.0;
          for (int k = 0; k < in; ++k) ref += double(x[std::size_t(r) * in + k]) * double(w[std::size_t(j) * in + k]);
          worst = std::max(worst, std::abs(double(y[std::size_t(r) * out + j]) - ref));
        }
      CHECK(worst < (std::is_same_v<T, float> ? 1e-4 : 1e-12));
    }
  }
}

TEST_CASE_TEMPLATE("Cpu::gemm_batched: each (outer, inner) GEMM as Cpu::gemm computes it, strided operands, its work counted once",
                   B, Cpu, Cpu64) {
  using T = typename B::Scalar;
  // attention's layout: A's matrices interleaved by inner index inside each outer block; one
  // matrix (total = 1, split over threads like gemm) and many (one per thread each)
  for (const auto [m, n, k, outer, inner] : {std::array{17, 17, 32, 6, 4}, std::array{300, 96, 80, 1, 1}}) {
    CAPTURE(m); CAPTURE(outer);
    const int lda = inner * k, ldb = inner * n, ldc = inner * n;
    const std::size_t sa_o = std::size_t(m) * lda, sb_o = std::size_t(k) * ldb, sc_o = std::size_t(m) * ldc;
    std::vector<T> a(sa_o * outer), b(sb_o * outer), c(sc_o * outer, T(7)), ref(c.size(), T(7));
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = T(std::sin(0.37 * double(i)));
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = T(std::cos(0.11 * double(i)));
    const std::int64_t before = B::flop_count().load();
    B::gemm_batched(false, false, m, n, k, T(1), a.data(), lda, sa_o, k, b.data(), ldb, sb_o, n, T(0), c.data(), ldc,
                    sc_o, n, outer, inner);
    CHECK(B::flop_count().load() - before == 2 * std::int64_t(m) * n * k * outer * inner);
    for (int o = 0; o < outer; ++o)
      for (int i = 0; i < inner; ++i)
        B::gemm(false, false, m, n, k, T(1), a.data() + o * sa_o + i * k, lda, b.data() + o * sb_o + i * n, ldb, T(0),
                ref.data() + o * sc_o + i * n, ldc);
    double worst = 0;
    for (std::size_t i = 0; i < c.size(); ++i) worst = std::max(worst, std::abs(double(c[i]) - double(ref[i])));
    CHECK(worst < (std::is_same_v<T, float> ? 1e-5 : 1e-12));
  }
}

TEST_CASE_TEMPLATE("fused::linear_backward_params on Cpu: dW += dY^T X and dbias += column sums, either null, every split",
                   B, Cpu, Cpu64) {
  using T = typename B::Scalar;
  // rows, in, out: tiny (one thread); more rows than dW has rows or columns, so the threads split
  // the rows (split-K: partial products and partial bias sums added up after a barrier), also with
  // an odd row count; fewer rows, so dW splits by its rows (out >= in: each thread sums the
  // columns of dY its GEMM read) and by its columns (out < in: the sums split evenly); no rows;
  // and no inputs (dW empty, dbias still summed)
  const test::TwoThreads two_threads;  // the split paths, even on a one-core machine
  for (const auto kernel : test::gemm_kernels())  // each kernel the build has
  for (const auto [rows, in, out] : {std::array{5, 7, 3}, std::array{300, 64, 160}, std::array{301, 160, 48},
                                     std::array{120, 64, 160}, std::array{120, 160, 48}, std::array{0, 16, 8},
                                     std::array{6, 0, 4}}) {
    const test::WithGemmKernel with(kernel);
    CAPTURE(int(kernel)); CAPTURE(rows); CAPTURE(in); CAPTURE(out);
    std::vector<T> x(std::size_t(rows) * in), dy(std::size_t(rows) * out);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = T(std::sin(0.37 * double(i)));
    for (std::size_t i = 0; i < dy.size(); ++i) dy[i] = T(std::cos(0.11 * double(i)));
    for (const bool with_dw : {true, false})
      for (const bool with_dbias : {true, false}) {
        CAPTURE(with_dw); CAPTURE(with_dbias);
        // the gradients accumulate onto what is there
        std::vector<T> dw(std::max<std::size_t>(1, std::size_t(out) * in)), dbias(out);  // never null
        for (std::size_t i = 0; i < dw.size(); ++i) dw[i] = T(0.5 * std::sin(0.05 * double(i)));
        for (int j = 0; j < out; ++j) dbias[j] = T(0.25 * j - 1);
        const std::vector<T> dw0 = dw, dbias0 = dbias;
        fused::linear_backward_params<B>(with_dw ? dw.data() : nullptr, with_dbias ? dbias.data() : nullptr,
                                         dy.data(), x.data(), rows, in, out);
        double worst_w = 0, worst_b = 0;
        for (int j = 0; j < out; ++j) {
          double sb = dbias0[j];
          for (int r = 0; r < rows; ++r) sb += double(dy[std::size_t(r) * out + j]);
          worst_b = std::max(worst_b, std::abs(double(dbias[j]) - (with_dbias ? sb : double(dbias0[j]))));
          for (int i = 0; i < in; ++i) {
            double sw = dw0[std::size_t(j) * in + i];
            for (int r = 0; r < rows; ++r) sw += double(dy[std::size_t(r) * out + j]) * double(x[std::size_t(r) * in + i]);
            worst_w = std::max(worst_w, std::abs(double(dw[std::size_t(j) * in + i]) -
                                                     (with_dw ? sw : double(dw0[std::size_t(j) * in + i]))));
          }
        }
        CHECK(worst_w < (std::is_same_v<T, float> ? 2e-4 : 1e-11));
        CHECK(worst_b < (std::is_same_v<T, float> ? 2e-4 : 1e-11));
      }
  }
}

TEST_CASE_TEMPLATE("Cpu::sum_rows and softmax_forward against double references: padded rows, beta, widths that leave a tail",
                   B, Cpu, Cpu64) {
  using T = typename B::Scalar;
  const test::TwoThreads two_threads;  // the split paths, even on a one-core machine
  // sum_rows: out[c] = beta out[c] + sum_r x[r ld + c], rows at a padded stride, over and under
  // the parallel grain, widths over and under its 64-column accumulator block
  for (const auto [rows, cols] : {std::array{7, 5}, std::array{700, 150}, std::array{3000, 17}}) {
    const int ld = cols + 3;
    std::vector<T> x(std::size_t(rows) * ld);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = T(std::sin(0.37 * double(i)));
    for (const double beta : {0.0, 1.0, -0.5}) {
      CAPTURE(rows); CAPTURE(cols); CAPTURE(beta);
      std::vector<T> out(cols);
      for (int c = 0; c < cols; ++c) out[c] = beta == 0.0 ? std::numeric_limits<T>::quiet_NaN() : T(0.5 * c);
      const std::vector<T> out0 = out;
      B::sum_rows(out.data(), x.data(), rows, cols, ld, T(beta));
      double worst = 0;
      for (int c = 0; c < cols; ++c) {
        double ref = beta == 0.0 ? 0.0 : beta * double(out0[c]);
        for (int r = 0; r < rows; ++r) ref += double(x[std::size_t(r) * ld + c]);
        worst = std::max(worst, std::isfinite(double(out[c])) ? std::abs(double(out[c]) - ref) : 1e30);
      }
      CHECK(worst < (std::is_same_v<T, float> ? 1e-3 : 1e-10));
    }
  }
  // softmax_forward: rows of 17 (attention's, whose 17th value had a scalar exp of its own),
  // 1, 64 and 300 (a row wider than a block), a row count that leaves a partial last block;
  // into another buffer and in place
  for (const auto [rows, cols] : {std::array{2176, 17}, std::array{5, 1}, std::array{333, 64}, std::array{9, 300}}) {
    std::vector<T> x(std::size_t(rows) * cols);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = T(8 * std::sin(0.37 * double(i)) + (i % 7 == 0 ? 30 : 0));
    for (const bool in_place : {false, true}) {
      CAPTURE(rows); CAPTURE(cols); CAPTURE(in_place);
      const double scale = 0.7;
      std::vector<T> y = in_place ? x : std::vector<T>(x.size(), T(7));
      B::softmax_forward(y.data(), in_place ? y.data() : x.data(), rows, cols, T(scale));
      double worst = 0;
      for (int r = 0; r < rows; ++r) {
        double mx = -1e300, sum = 0;
        for (int c = 0; c < cols; ++c) mx = std::max(mx, double(x[std::size_t(r) * cols + c]));
        for (int c = 0; c < cols; ++c) sum += std::exp(scale * (double(x[std::size_t(r) * cols + c]) - mx));
        for (int c = 0; c < cols; ++c) {
          const double ref = std::exp(scale * (double(x[std::size_t(r) * cols + c]) - mx)) / sum;
          worst = std::max(worst, std::abs(double(y[std::size_t(r) * cols + c]) - ref));
        }
      }
      CHECK(worst < (std::is_same_v<T, float> ? 1e-6 : 1e-14));
    }
  }
}

TEST_CASE("Cpu's GEMM kernel: OpenBLAS where its kernels are as wide as Eigen's, from the build, CPU and environment alone") {
  using K = detail::GemmKernel;
  auto choose = [](const char* setting, const char* core, int eigen_floats, bool splits_512bit = false) {
    return detail::choose_gemm_kernel(setting, core, eigen_floats, splits_512bit);
  };
  // OpenBLAS's kernels as wide or wider (the core names as OpenBLAS spells them, in any case): OpenBLAS
  CHECK(choose(nullptr, "SkylakeX", 16) == K::openblas);
  CHECK(choose(nullptr, "COOPERLAKE", 16) == K::openblas);
  CHECK(choose("auto", "sapphirerapids", 8) == K::openblas);
  CHECK(choose("", "Haswell", 8) == K::openblas);
  CHECK(choose(nullptr, "Nehalem", 4) == K::openblas);
  // narrower (OPENBLAS_CORETYPE=Haswell on an AVX-512 Zen 5): Eigen's AVX-512 kernel
  CHECK(choose(nullptr, "Haswell", 16) == K::eigen);
  CHECK(choose(nullptr, "Zen", 16) == K::eigen);
  CHECK(choose(nullptr, "Nehalem", 8) == K::eigen);
  CHECK(choose(nullptr, "Unknown", 16) == K::eigen);
  // ... but not where AVX-512 runs on 256-bit units (Zen 4): there it is as wide as AVX2
  CHECK(choose(nullptr, "Haswell", 16, true) == K::openblas);
  CHECK(choose(nullptr, "Nehalem", 16, true) == K::eigen);
  CHECK(choose(nullptr, "Nehalem", 8, true) == K::eigen);
  // the override wins either way; anything else is an error naming the variable
  CHECK(choose("openblas", "Haswell", 16) == K::openblas);
  CHECK(choose("eigen", "SkylakeX", 16) == K::eigen);
  const auto message = error_message([&] { choose("mkl", "SkylakeX", 16); });
  CHECK(has(message, "HATCH_CPU_GEMM"));
  CHECK(has(message, "expected eigen, openblas or auto, got 'mkl'"));
#if !defined(HATCH_WITH_OPENBLAS)
  CHECK(Cpu::gemm_kernel() == K::eigen);  // nothing else to run
#endif
}

TEST_CASE("detail::cpu_model reads the vendor and family that Linux reports in /proc/cpuinfo") {
  std::ifstream in("/proc/cpuinfo");
  if (!in) return;  // not Linux: nothing to compare with
  std::string line, vendor;
  unsigned family = 0;
  while (std::getline(in, line) && (vendor.empty() || family == 0)) {
    const auto colon = line.find(':');
    if (colon == std::string::npos || colon + 2 > line.size()) continue;
    const std::string value = line.substr(colon + 2);
    if (line.rfind("vendor_id", 0) == 0) vendor = value;
    if (line.rfind("cpu family", 0) == 0) family = unsigned(std::stoul(value));
  }
  if (vendor.empty()) return;  // not x86: cpuid has nothing to say
  const auto m = detail::cpu_model();
  CHECK(m.vendor == vendor);
  CHECK(m.family == family);
  CHECK(detail::cpu_splits_512bit() == (vendor == "AuthenticAMD" && family == 25));
}

TEST_CASE_TEMPLATE("Cpu::gemm against a double reference: every transposition, beta 0 / 1 / other, padded strides, serial and split over threads",
                   B, Cpu, Cpu64) {
  using T = typename B::Scalar;
  // Shapes for each of gemm's paths: tiny (Eigen's kernel, or OpenBLAS's small-matrix kernels
  // when beta = 0), attention's per-head size, above Cpu::kBlasMinWork and split over threads by
  // rows (m >= n) and by columns (m < n), and k = 0 (C = beta C).
  // Through each kernel the build has (Eigen's, OpenBLAS's), whichever this machine would choose.
  const test::TwoThreads two_threads;  // the split paths, even on a one-core machine
  for (const auto kernel : test::gemm_kernels())
  for (const auto [m, n, k] : {std::array{3, 5, 7}, std::array{50, 50, 32}, std::array{50, 32, 50},
                               std::array{300, 96, 80}, std::array{80, 300, 96}, std::array{6, 4, 0}}) {
    const test::WithGemmKernel with(kernel);
    CAPTURE(int(kernel));
    for (const bool ta : {false, true})
      for (const bool tb : {false, true})
        for (const double beta : {0.0, 1.0, -0.5}) {
          CAPTURE(m); CAPTURE(n); CAPTURE(k); CAPTURE(ta); CAPTURE(tb); CAPTURE(beta);
          // op(A) is m x k, op(B) is k x n; every leading dimension padded by 3
          const int a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
          const int lda = a_cols + 3, ldb = b_cols + 3, ldc = n + 3;
          std::vector<T> a(std::size_t(std::max(a_rows, 1)) * lda), b(std::size_t(std::max(b_rows, 1)) * ldb),
              c(std::size_t(m) * ldc);
          for (std::size_t i = 0; i < a.size(); ++i) a[i] = T(std::sin(0.37 * double(i)));
          for (std::size_t i = 0; i < b.size(); ++i) b[i] = T(std::cos(0.11 * double(i)));
          for (std::size_t i = 0; i < c.size(); ++i) c[i] = T(0.25 * std::sin(0.05 * double(i)));
          const std::vector<T> c0 = c;
          if (beta == 0.0)  // C's old contents must not leak through, not even a NaN
            for (int r = 0; r < m; ++r) c[std::size_t(r) * ldc] = std::numeric_limits<T>::quiet_NaN();
          const double alpha = 1.5;
          B::gemm(ta, tb, m, n, k, T(alpha), a.data(), lda, b.data(), ldb, T(beta), c.data(), ldc);
          double worst = 0;
          for (int r = 0; r < m; ++r)
            for (int j = 0; j < n; ++j) {
              double ref = 0;
              for (int p = 0; p < k; ++p)
                ref += double(ta ? a[std::size_t(p) * lda + r] : a[std::size_t(r) * lda + p]) *
                       double(tb ? b[std::size_t(j) * ldb + p] : b[std::size_t(p) * ldb + j]);
              ref = alpha * ref + (beta == 0.0 ? 0.0 : beta * double(c0[std::size_t(r) * ldc + j]));
              const double got = double(c[std::size_t(r) * ldc + j]);
              worst = std::max(worst, std::isfinite(got) ? std::abs(got - ref) : 1e30);
            }
          // the padding between rows of C is never written
          bool padding_kept = true;
          for (int r = 0; r < m; ++r)
            for (int j = n; j < ldc; ++j) padding_kept = padding_kept && c[std::size_t(r) * ldc + j] == c0[std::size_t(r) * ldc + j];
          CHECK(worst < (std::is_same_v<T, float> ? 2e-4 : 1e-11));
          CHECK(padding_kept);
        }
  }
}

TEST_CASE("SiLU: f and f' against the definition and central differences, tails included") {
  for (double x = -40; x <= 40; x += 0.125) {
    const double s = 1 / (1 + std::exp(-x));
    INFO("x = " << x);
    CHECK(SiluFn::f(x) == doctest::Approx(x * s).epsilon(1e-14));
    const double h = 1e-6 * std::max(1.0, std::abs(x));
    const double fd = (SiluFn::f(x + h) - SiluFn::f(x - h)) / (2 * h);
    CHECK(SiluFn::df(x) == doctest::Approx(fd).epsilon(1e-7).scale(1));
  }
  // No overflow to NaN far out, in float as in double.
  CHECK(SiluFn::f(-1000.0f) == 0.0f);
  CHECK(SiluFn::f(1000.0f) == 1000.0f);
  CHECK(SiluFn::df(-1000.0f) == 0.0f);
  CHECK(SiluFn::df(1000.0f) == 1.0f);
}

TEST_CASE("Elementwise<Fn>: forward and backward through the layer, with a parameterised functor") {
  ElementwiseLayer<Cpu64, LeakyReluFn> l;
  l.fn().slope = 0.1;
  auto x = tensor_of<Cpu64>({-2, -0.5, 0.5, 3}, {2, 2});
  auto dy = tensor_of<Cpu64>({1, 2, 3, 4}, {2, 2});
  Context ctx;
  const auto& y = l.forward(x, ctx);
  CHECK(y.shape() == Shape{2, 2});
  CHECK(y.to_host() == std::vector<double>{-0.2, -0.05, 0.5, 3});
  const auto& dx = l.backward(dy, ctx);
  CHECK(dx.to_host() == std::vector<double>{0.1, 0.2, 3, 4});
  auto wrong = tensor_of<Cpu64>({1, 2}, {2});
  CHECK(has(error_message([&] { l.backward(wrong, ctx); }), "expected shape [2,2], got [2]"));
  // A spec composes like Gelu, on any width.
  static_assert(Silu::in == kAnyWidth && Silu::out == kAnyWidth);
  static_assert(std::is_same_v<Silu::bind<Cpu>, SiluLayer<Cpu>>);
}

TEST_CASE("Tensor::view_of: a new shape over the same elements; resize and copy detach") {
  auto src = tensor_of<Cpu>({1, 2, 3, 4, 5, 6}, {2, 3});
  const auto allocations = Cpu::allocation_count().load();
  Tensor<Cpu> v;
  v.view_of(src, {3, 2});
  CHECK(Cpu::allocation_count().load() == allocations);
  CHECK(v.is_view());
  CHECK(v.data() == src.data());
  CHECK(v.shape() == Shape{3, 2});
  v.data()[5] = 60;  // writes through to the source
  CHECK(src.to_host()[5] == 60);
  CHECK(has(error_message([&] { v.view_of(src, {4, 2}); }), "shape [4,2] has 8 elements, the source [2,3] has 6"));

  Tensor<Cpu> copy = v;  // a copy owns its elements
  CHECK(!copy.is_view());
  CHECK(copy.data() != src.data());
  CHECK(copy.to_host() == v.to_host());

  v.resize({3, 2});  // detaches: writes after a resize never reach the source
  CHECK(!v.is_view());
  CHECK(v.data() != src.data());
  v.fill(-1);
  CHECK(src.to_host() == std::vector<float>{1, 2, 3, 4, 5, 60});

  Tensor<Cpu> w;
  w.view_of(src, {6});
  w = copy;  // assignment detaches too
  CHECK(w.data() != src.data());
  CHECK(src.to_host()[0] == 1);

  src.view_of(src, {6, 1});  // a reshape in place
  CHECK(!src.is_view());
  CHECK(src.shape() == Shape{6, 1});

  {
    Tensor<Cpu> moved;
    moved.view_of(copy, {6});
    Tensor<Cpu> other(std::move(moved));
    CHECK(other.is_view());
  }  // destroying a view frees nothing (ASan / double free would show it)
  CHECK(copy.to_host()[0] == 1);
}

TEST_CASE("Flatten and Reshape: zero-copy forward and backward") {
  const auto allocations = Cpu::allocation_count().load();
  auto x = tensor_of<Cpu>(std::vector<float>(24, 1.5f), {2, 3, 4});
  auto dy = tensor_of<Cpu>(std::vector<float>(24, 0.5f), {2, 12});
  FlattenLayer<Cpu, 12> flat;
  Context ctx;
  for (int i = 0; i < 2; ++i) {
    const auto& y = flat.forward(x, ctx);
    CHECK(y.shape() == Shape{2, 12});
    CHECK(y.data() == x.data());
    const auto& dx = flat.backward(dy, ctx);
    CHECK(dx.shape() == Shape{2, 3, 4});
    CHECK(dx.data() == dy.data());
  }
  ReshapeLayer<Cpu, 3, 2, 2> re;
  const auto& r = re.forward(x, ctx);
  CHECK(r.shape() == Shape{2, 3, 2, 2});
  CHECK(r.data() == x.data());
  auto dr = tensor_of<Cpu>(std::vector<float>(24, 0.25f), {2, 3, 2, 2});
  CHECK(re.backward(dr, ctx).shape() == Shape{2, 3, 4});
  CHECK(re.backward(dr, ctx).data() == dr.data());
  CHECK(Cpu::allocation_count().load() == allocations + 3);  // only the three tensors made here

  // Errors name the layer and the numbers.
  auto odd = tensor_of<Cpu>(std::vector<float>(10, 0), {2, 5});
  CHECK(has(error_message([&] { flat.forward(odd, ctx); }), "Flatten<12>: input [2,5] flattens to width 5"));
  CHECK(has(error_message([&] { re.forward(odd, ctx); }), "Reshape: input [2,5] has 10 elements, not a multiple of 12"));
  FlattenLayer<Cpu, 5> five;
  CHECK(five.forward(odd, ctx).shape() == Shape{2, 5});
  CHECK(five.forward(odd, ctx).data() == odd.data());

  // Widths for Sequential's compile-time checks: Flatten<W> and Reshape<..., W> produce W.
  static_assert(Flatten<12>::in == kAnyWidth && Flatten<12>::out == 12);
  static_assert(Reshape<3, 2, 2>::out == 2);
  using Net = Sequential<Reshape<4, 3>, Flatten<12>, Named<"fc", Linear<12, 5>>, Silu>;
  static_assert(Net::in == kAnyWidth && Net::out == 5);
}

TEST_CASE("a small model with Reshape, Flatten and SiLU trains a step on Cpu") {
  Model<Sequential<Reshape<4, 3>, Named<"fc1", Linear<3, 6>>, Silu, Flatten<24>, Named<"fc2", Linear<24, 2>>>, Cpu> m;
  Initializer init(3);
  m.reset_parameters(init);
  std::mt19937_64 rng(5);
  auto x = test::random_tensor<Cpu>({8, 12}, rng);
  Context ctx;
  const auto& y = m.forward(x, ctx);
  CHECK(y.shape() == Shape{8, 2});
  auto dy = test::random_tensor<Cpu>(y.shape(), rng);
  ctx.input_grad = true;
  const auto& dx = m.backward(dy, ctx);
  CHECK(dx.shape() == Shape{8, 12});
  CHECK(Cpu::all_finite(dx.data(), std::size_t(dx.numel())));
}

TEST_CASE("the README's Softplus and Flatten network: gradients match central differences") {
  Model<Net, Cpu64> net;
  test::randomize_parameters(net, 11);
  const auto rep = test::gradcheck(net, {2, 1, 28, 28}, false, 3, 20);
  INFO("worst: " << rep.worst);
  CHECK(rep.max_rel <= 1e-6);
  CHECK(SoftplusFn::f(0.0) == doctest::Approx(std::log(2.0)));
}
