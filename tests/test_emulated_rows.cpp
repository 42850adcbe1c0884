// The Cuda backend's row kernels (backend/cuda_kernels.cuh: softmax and LayerNorm, the general
// kernels and the register variants with 1- and 4-wide loads, LayerNorm's backward in one kernel
// with its last-block sum, the column reductions, the step-scalar kernels, AdamW over an arena,
// and NAC's sparse attention, a warp per row or key), run on CPU threads through
// tests/cuda_emulation.hpp against a double-precision reference. The launch geometry is the
// Cuda backend's (blocks of 32 x kRowsPerBlock threads, a warp per row; 32 x kColLanes for the
// column sums). These kernels are the defaults of the Cuda backend; here they are checked on
// every machine, and on a GPU by tests/cuda/test_cuda_kernels.cu.
#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "support.hpp"

#include "cuda_emulation.hpp"
// after the emulation's definitions
#include <hatch/backend/cuda_kernels.cuh>

namespace {

namespace k = hatch::cuda_kernels;
using hatch_emulation::dim3;
using Vec = std::vector<float>;
using Ref = std::vector<double>;

const dim3 kRowBlock(32, k::kRowsPerBlock);
dim3 row_grid(int rows) { return dim3(unsigned((rows + k::kRowsPerBlock - 1) / k::kRowsPerBlock)); }

Vec randn(std::size_t n, unsigned seed, double sd = 1.0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, sd);
  Vec v(n);
  for (auto& x : v) x = float(normal(rng));
  return v;
}

using hatch::test::max_error_vs;
constexpr double kTol = 2e-6;

Ref softmax_ref(const Vec& x, int rows, int cols, double scale) {
  Ref y(x.size());
  for (int r = 0; r < rows; ++r) {
    const float* xr = x.data() + std::size_t(r) * cols;
    const double mx = *std::max_element(xr, xr + cols);
    double s = 0;
    for (int c = 0; c < cols; ++c) s += y[std::size_t(r) * cols + c] = std::exp(scale * (xr[c] - mx));
    for (int c = 0; c < cols; ++c) y[std::size_t(r) * cols + c] /= s;
  }
  return y;
}
Ref softmax_backward_ref(const Vec& dy, const Vec& y, int rows, int cols, double scale) {
  Ref dx(dy.size());
  for (int r = 0; r < rows; ++r) {
    const std::size_t o = std::size_t(r) * cols;
    double dot = 0;
    for (int c = 0; c < cols; ++c) dot += double(dy[o + c]) * y[o + c];
    for (int c = 0; c < cols; ++c) dx[o + c] = scale * y[o + c] * (dy[o + c] - dot);
  }
  return dx;
}

struct Norm {
  Ref y, mean, rstd;
};
Norm layer_norm_ref(const Vec& x, const Vec& gamma, const Vec& beta, int rows, int cols, double eps) {
  Norm n{Ref(x.size()), Ref(rows), Ref(rows)};
  for (int r = 0; r < rows; ++r) {
    const std::size_t o = std::size_t(r) * cols;
    double mu = 0, v = 0;
    for (int c = 0; c < cols; ++c) mu += x[o + c];
    mu /= cols;
    for (int c = 0; c < cols; ++c) v += (x[o + c] - mu) * (x[o + c] - mu);
    const double rs = 1.0 / std::sqrt(v / cols + eps);
    n.mean[r] = mu;
    n.rstd[r] = rs;
    for (int c = 0; c < cols; ++c) n.y[o + c] = (x[o + c] - mu) * rs * gamma[c] + beta[c];
  }
  return n;
}
struct NormGrad {
  Ref dx, dgamma, dbeta;
};
// from the kernels' float mean and rstd, with dgamma and dbeta accumulating onto dgamma0, dbeta0
NormGrad layer_norm_backward_ref(const Vec& dy, const Vec& x, const Vec& mean, const Vec& rstd, const Vec& gamma,
                                 const Vec& dgamma0, const Vec& dbeta0, int rows, int cols) {
  NormGrad g{Ref(x.size()), Ref(dgamma0.begin(), dgamma0.end()), Ref(dbeta0.begin(), dbeta0.end())};
  for (int r = 0; r < rows; ++r) {
    const std::size_t o = std::size_t(r) * cols;
    double s1 = 0, s2 = 0;
    for (int c = 0; c < cols; ++c) {
      const double xh = (x[o + c] - double(mean[r])) * rstd[r], gg = double(dy[o + c]) * gamma[c];
      s1 += gg;
      s2 += gg * xh;
      g.dgamma[c] += double(dy[o + c]) * xh;
      g.dbeta[c] += dy[o + c];
    }
    s1 /= cols;
    s2 /= cols;
    for (int c = 0; c < cols; ++c) {
      const double xh = (x[o + c] - double(mean[r])) * rstd[r];
      g.dx[o + c] = rstd[r] * (double(dy[o + c]) * gamma[c] - s1 - xh * s2);
    }
  }
  return g;
}

template <class Kernel>
void softmax_forward_case(Kernel kernel, int rows, int cols, bool in_place) {
  CAPTURE(rows);
  CAPTURE(cols);
  CAPTURE(in_place);
  const Vec x = randn(std::size_t(rows) * cols, 11, 2.0);
  const float scale = 0.7f;
  Vec y(x.size(), std::numeric_limits<float>::quiet_NaN()), xin = x;
  float* out = in_place ? xin.data() : y.data();
  hatch_emulation::launch(kernel, row_grid(rows), kRowBlock, 0, out, const_cast<const float*>(xin.data()), rows, cols,
                          scale);
  CHECK(max_error_vs(in_place ? xin : y, softmax_ref(x, rows, cols, scale)) < kTol);
}
template <class Kernel>
void softmax_backward_case(Kernel kernel, int rows, int cols, bool in_place) {
  CAPTURE(rows);
  CAPTURE(cols);
  CAPTURE(in_place);
  const Ref yr = softmax_ref(randn(std::size_t(rows) * cols, 12, 2.0), rows, cols, 1.0);
  const Vec y(yr.begin(), yr.end()), dy = randn(y.size(), 13);
  const float scale = 0.7f;
  Vec dx(y.size(), std::numeric_limits<float>::quiet_NaN()), dyin = dy;
  float* out = in_place ? dyin.data() : dx.data();
  hatch_emulation::launch(kernel, row_grid(rows), kRowBlock, 0, out, const_cast<const float*>(dyin.data()), y.data(),
                          rows, cols, scale);
  CHECK(max_error_vs(in_place ? dyin : dx, softmax_backward_ref(dy, y, rows, cols, scale)) < kTol);
}
template <class Kernel>
void layer_norm_forward_case(Kernel kernel, int rows, int cols) {
  CAPTURE(rows);
  CAPTURE(cols);
  const Vec x = randn(std::size_t(rows) * cols, 21, 3.0), gamma = randn(cols, 22), beta = randn(cols, 23);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Vec y(x.size(), nan), mean(rows, nan), rstd(rows, nan);
  hatch_emulation::launch(kernel, row_grid(rows), kRowBlock, 0, y.data(), mean.data(), rstd.data(), x.data(),
                          gamma.data(), beta.data(), rows, cols, 1e-6f);
  const Norm want = layer_norm_ref(x, gamma, beta, rows, cols, 1e-6);
  CHECK(max_error_vs(y, want.y) < kTol);
  CHECK(max_error_vs(mean, want.mean) < kTol);
  CHECK(max_error_vs(rstd, want.rstd) < kTol);
}

// LayerNorm backward in one pass on `blocks` blocks (1: the block adds its sums directly; more:
// each block writes its sums, and layer_norm_param_finish adds them), with each output optional
struct BackwardInputs {
  int rows, cols;
  Vec dy, x, mean, rstd, gamma, dgamma0, dbeta0;
};
BackwardInputs backward_inputs(int rows, int cols) {
  BackwardInputs in{rows, cols, randn(std::size_t(rows) * cols, 31), randn(std::size_t(rows) * cols, 32, 2.0),
                    {}, {}, randn(cols, 33), randn(cols, 34), randn(cols, 35)};
  const Norm n = layer_norm_ref(in.x, in.gamma, Vec(cols, 0.0f), rows, cols, 1e-6);
  in.mean.assign(n.mean.begin(), n.mean.end());
  in.rstd.assign(n.rstd.begin(), n.rstd.end());
  return in;
}
template <int W, int N>
void layer_norm_backward_one_kernel_case(const BackwardInputs& in, unsigned blocks, bool want_dx, bool want_dgamma,
                                         bool want_dbeta, bool dx_in_place) {
  CAPTURE(in.rows);
  CAPTURE(in.cols);
  CAPTURE(W);
  CAPTURE(blocks);
  CAPTURE(want_dx);
  CAPTURE(want_dgamma);
  CAPTURE(want_dbeta);
  CAPTURE(dx_in_place);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Vec dx(in.dy.size(), nan), dyin = in.dy, dgamma = in.dgamma0, dbeta = in.dbeta0;
  Vec partial(std::size_t(blocks) * 2 * in.cols, nan);
  float* dxp = !want_dx ? nullptr : dx_in_place ? dyin.data() : dx.data();
  float* const dg = want_dgamma ? dgamma.data() : nullptr;
  float* const db = want_dbeta ? dbeta.data() : nullptr;
  hatch_emulation::launch(k::layer_norm_backward_regs<float, W, N>, dim3(blocks), kRowBlock, 0, dxp, dg, db,
                          partial.data(), const_cast<const float*>(dyin.data()), in.x.data(), in.mean.data(),
                          in.rstd.data(), in.gamma.data(), in.rows, in.cols);
  if (blocks > 1 && (dg || db)) {  // the blocks' sums, added as the launcher adds them (every one was written)
    CHECK(std::none_of(partial.begin(), partial.end(), [](float v) { return std::isnan(v); }));
    hatch_emulation::launch(k::layer_norm_param_finish<float>, dim3(unsigned((in.cols + 31) / 32)),
                            dim3(32, k::kColLanes), 0, dg, db, const_cast<const float*>(partial.data()), int(blocks),
                            in.cols);
  }
  const NormGrad want =
      layer_norm_backward_ref(in.dy, in.x, in.mean, in.rstd, in.gamma, in.dgamma0, in.dbeta0, in.rows, in.cols);
  if (want_dx) CHECK(max_error_vs(dx_in_place ? dyin : dx, want.dx) < kTol);
  CHECK(max_error_vs(dgamma, want_dgamma ? want.dgamma : Ref(in.dgamma0.begin(), in.dgamma0.end())) < 1e-5);
  CHECK(max_error_vs(dbeta, want_dbeta ? want.dbeta : Ref(in.dbeta0.begin(), in.dbeta0.end())) < 1e-5);
}

}  // namespace

TEST_CASE("Cuda row kernels (emulated on the CPU): softmax forward, general and in registers, 1- and 4-wide") {
  for (bool in_place : {false, true}) {
    softmax_forward_case(k::softmax_forward<float>, 37, 197, in_place);
    softmax_forward_case(k::softmax_forward_regs<float, 1, 8>, 37, 197, in_place);  // the attention's rows
    softmax_forward_case(k::softmax_forward_regs<float, 4, 8>, 37, 196, in_place);
    softmax_forward_case(k::softmax_forward_regs<float, 4, 4>, 13, 20, in_place);   // fewer packs than lanes
  }
}

TEST_CASE("Cuda row kernels (emulated on the CPU): softmax backward, general and in registers, 1- and 4-wide") {
  for (bool in_place : {false, true}) {
    softmax_backward_case(k::softmax_backward<float>, 37, 197, in_place);
    softmax_backward_case(k::softmax_backward_regs<float, 1, 8>, 37, 197, in_place);
    softmax_backward_case(k::softmax_backward_regs<float, 4, 8>, 37, 196, in_place);
  }
}

TEST_CASE("Cuda row kernels (emulated on the CPU): LayerNorm forward, general and in registers") {
  layer_norm_forward_case(k::layer_norm_forward<float>, 19, 768);
  layer_norm_forward_case(k::layer_norm_forward_regs<float, 4, 32>, 19, 768);  // ViT-B/16's rows
  layer_norm_forward_case(k::layer_norm_forward_regs<float, 1, 4>, 19, 45);
}

TEST_CASE("Cuda row kernels (emulated on the CPU): LayerNorm backward in one kernel, every output optional") {
  const BackwardInputs wide = backward_inputs(45, 768), narrow = backward_inputs(30, 45);
  for (unsigned blocks : {1u, 3u, 6u, 37u}) {  // one block; several, each taking rows w, w + warps, ...; more blocks'
                                              // sums than the finishing kernel has row lanes
    layer_norm_backward_one_kernel_case<4, 32>(wide, blocks, true, true, true, false);
    layer_norm_backward_one_kernel_case<1, 4>(narrow, blocks, true, true, true, false);
  }
  layer_norm_backward_one_kernel_case<4, 32>(wide, 3, true, true, false, true);   // dx in place of dy, dgamma only
  layer_norm_backward_one_kernel_case<4, 32>(wide, 3, false, false, true, false);  // dbeta only
  layer_norm_backward_one_kernel_case<4, 32>(wide, 6, true, false, false, false);  // dx only: no sums at all
}

TEST_CASE("Cuda column kernels (emulated on the CPU): LayerNorm's parameter sums and sum_rows over row chunks") {
  const int rows = 37, cols = 45, rows_per_chunk = 10, chunks = 4;
  const BackwardInputs in = backward_inputs(rows, cols);
  const NormGrad want =
      layer_norm_backward_ref(in.dy, in.x, in.mean, in.rstd, in.gamma, in.dgamma0, in.dbeta0, rows, cols);
  const dim3 col_block(32, k::kColLanes), col_grid(unsigned((cols + 31) / 32), unsigned(chunks));
  Vec dgamma = in.dgamma0, dbeta = in.dbeta0, partial(std::size_t(2) * chunks * cols);
  hatch_emulation::launch(k::layer_norm_param_partial<float>, col_grid, col_block, 0, dgamma.data(), dbeta.data(),
                          partial.data(), in.dy.data(), in.x.data(), in.mean.data(), in.rstd.data(), rows, cols,
                          rows_per_chunk);
  // a grid smaller than the columns: the finishing kernel's grid-stride loop covers the rest
  hatch_emulation::launch(k::layer_norm_param_finish<float>, dim3(1), col_block, 0, dgamma.data(), dbeta.data(),
                          const_cast<const float*>(partial.data()), chunks, cols);
  CHECK(max_error_vs(dgamma, want.dgamma) < 1e-5);
  CHECK(max_error_vs(dbeta, want.dbeta) < 1e-5);

  // sum_rows: out = beta out + column sums, rows at a leading dimension wider than the row
  const int ld = 50;
  const Vec x = randn(std::size_t(rows) * ld, 41), out0 = randn(cols, 42);
  Vec out = out0, part(std::size_t(chunks) * cols);
  hatch_emulation::launch(k::sum_rows_partial<float>, col_grid, col_block, 0, out.data(), part.data(), x.data(), rows,
                          cols, ld, 0.5f, rows_per_chunk);
  hatch_emulation::launch(k::sum_rows_finish<float>, dim3(1), dim3(32), 0, out.data(),
                          const_cast<const float*>(part.data()), chunks, cols, 0.5f);
  Ref want_out(cols);
  for (int c = 0; c < cols; ++c) {
    want_out[c] = 0.5 * out0[c];
    for (int r = 0; r < rows; ++r) want_out[c] += x[std::size_t(r) * ld + c];
  }
  CHECK(max_error_vs(out, want_out) < 1e-5);
}

TEST_CASE("Cuda step-scalar kernels (emulated on the CPU): cross-entropy rows, argmax with ties, sums, clipping") {
  const int rows = 37, cols = 10;
  const Vec z = randn(std::size_t(rows) * cols, 51, 2.0);
  Vec t(z.size(), 0.0f);  // soft targets (mixup-like) summing to 1, and one-hot rows
  for (int r = 0; r < rows; ++r) {
    t[std::size_t(r) * cols + r % cols] = r % 3 == 0 ? 0.7f : 1.0f;
    if (r % 3 == 0) t[std::size_t(r) * cols + (r + 4) % cols] = 0.3f;
  }
  SUBCASE("softmax_cross_entropy: per-row loss and scaled gradient") {
    std::vector<double> loss(rows, std::numeric_limits<double>::quiet_NaN());
    Vec dz(z.size(), std::numeric_limits<float>::quiet_NaN());
    const float scale = 1.0f / rows;
    hatch_emulation::launch(k::softmax_cross_entropy<float>, row_grid(rows), kRowBlock, 0, loss.data(), dz.data(),
                            z.data(), t.data(), rows, cols, scale);
    Ref want_loss(rows), want_dz(z.size());
    for (int r = 0; r < rows; ++r) {
      const std::size_t o = std::size_t(r) * cols;
      const double mx = *std::max_element(z.begin() + o, z.begin() + o + cols);
      double s = 0, tsum = 0, l = 0;
      for (int c = 0; c < cols; ++c) s += std::exp(double(z[o + c]) - mx);
      const double lse = std::log(s) + mx;
      for (int c = 0; c < cols; ++c) {
        l -= double(t[o + c]) * (double(z[o + c]) - lse);
        tsum += t[o + c];
      }
      want_loss[r] = l;
      for (int c = 0; c < cols; ++c) want_dz[o + c] = scale * (std::exp(double(z[o + c]) - lse) * tsum - t[o + c]);
    }
    for (int r = 0; r < rows; ++r) CHECK(loss[r] == doctest::Approx(want_loss[r]).epsilon(1e-6));  // z - max in float, as on the device
    CHECK(max_error_vs(dz, want_dz) < kTol);
  }
  SUBCASE("argmax_matches: the first largest column on ties, as std::max_element") {
    Vec zt = z, tt = t;
    // ties: row 0 all equal (column 0), row 1 a tie between columns 3 and 35 of a 40-column row
    const int wide = 40;
    Vec zw(std::size_t(3) * wide, 0.0f), tw(zw.size(), 0.0f);
    zw[wide + 3] = zw[wide + 35] = 5.0f;          // row 1: first largest is column 3
    tw[wide + 3] = 1.0f;                          //        target 3: a hit
    zw[2 * wide + 33] = zw[2 * wide + 1] = 2.0f;  // row 2: first largest is column 1
    tw[2 * wide + 33] = 1.0f;                     //        target 33: a miss
    tw[0] = 1.0f;                                 // row 0: all logits 0, first is column 0; target 0: a hit
    std::vector<double> hit(3, -1.0);
    hatch_emulation::launch(k::argmax_matches<float>, row_grid(3), kRowBlock, 0, hit.data(), zw.data(), tw.data(), 3,
                            wide);
    CHECK(hit == std::vector<double>{1.0, 1.0, 0.0});
    std::vector<double> hits(rows, -1.0);
    hatch_emulation::launch(k::argmax_matches<float>, row_grid(rows), kRowBlock, 0, hits.data(), zt.data(), tt.data(),
                            rows, cols);
    for (int r = 0; r < rows; ++r) {
      const std::size_t o = std::size_t(r) * cols;
      const bool same = std::max_element(zt.begin() + o, zt.begin() + o + cols) - (zt.begin() + o) ==
                        std::max_element(tt.begin() + o, tt.begin() + o + cols) - (tt.begin() + o);
      CHECK(hits[r] == (same ? 1.0 : 0.0));
    }
  }
  SUBCASE("sum_squares_partial + sum_doubles over a grid, and clip_to_norm reading the norm") {
    const std::size_t n = 5000;
    const Vec x = randn(n, 61);
    const unsigned blocks = 3;
    std::vector<double> partial(blocks, std::numeric_limits<double>::quiet_NaN());
    double sumsq = -1;
    hatch_emulation::launch(k::sum_squares_partial<float>, dim3(blocks), dim3(k::kThreads), 0, partial.data(),
                            x.data(), n);
    hatch_emulation::launch(k::sum_doubles<double>, dim3(1), dim3(256), 0, &sumsq,
                            const_cast<const double*>(partial.data()), std::size_t(blocks), 1.0);
    double want = 0;
    for (float v : x) want += double(v) * v;
    CHECK(sumsq == doctest::Approx(want).epsilon(1e-13));
    for (double max_norm : {0.5 * std::sqrt(want), 2.0 * std::sqrt(want)}) {
      Vec g = x;
      hatch_emulation::launch(k::clip_to_norm<float>, dim3(2), dim3(k::kThreads), 0, g.data(), n,
                              const_cast<const double*>(&sumsq), max_norm);
      const float f = float(hatch::clip_factor(std::sqrt(sumsq), max_norm));
      for (std::size_t j = 0; j < n; j += 97) CHECK(g[j] == x[j] * f);  // the host rule, bit for bit
    }
  }
}

TEST_CASE("Cuda AdamW kernel (emulated on the CPU): one pass over an arena, weight decay on its first segment only") {
  const std::size_t n = 3000, decay_end = 1234;
  const Vec w0 = randn(n, 71), g = randn(n, 72), m0 = randn(n, 73, 0.1);
  Vec v0 = randn(n, 74, 0.1);
  for (auto& x : v0) x = x * x;
  Vec w = w0, m = m0, v = v0;
  const float lr = 1e-2f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.05f, c1 = 0.19f, c2 = 0.002f;
  // a grid smaller than n: the grid-stride loop covers the rest
  hatch_emulation::launch(k::adamw_update<float>, dim3(2), dim3(k::kThreads), 0, w.data(), m.data(), v.data(),
                          g.data(), n, decay_end, lr, b1, b2, eps, wd, c1, c2);
  Ref ww(n), wm(n), wv(n);
  for (std::size_t j = 0; j < n; ++j) {
    const double wj = w0[j] - double(lr) * (j < decay_end ? wd : 0.0) * w0[j];
    wm[j] = double(b1) * m0[j] + (1.0 - double(b1)) * g[j];
    wv[j] = double(b2) * v0[j] + (1.0 - double(b2)) * double(g[j]) * g[j];
    ww[j] = wj - double(lr) * (wm[j] / c1) / (std::sqrt(wv[j] / c2) + eps);
  }
  CHECK(max_error_vs(w, ww) < 1e-6);
  CHECK(max_error_vs(m, wm) < 1e-6);
  CHECK(max_error_vs(v, wv) < 1e-6);
}

// NAC's sparse attention (a warp per (example, head, query), or per key on the key side; pairs in
// CSR order, the key side over the transposed list), against the Cpu backend's definition in
// double. Rows with no pair, one, and more pairs than a warp has lanes; a head of 40 columns (not
// a multiple of 32); row strides wider than the heads. Each kernel gets the float image of the
// reference's inputs, so that every output is checked on its own. Probabilities, score gradients,
// dk and dv start as NaN; o and dq as 0, as on the reference side (their padding columns are
// nobody's to write).
TEST_CASE("Cuda sparse attention kernels (emulated on the CPU): forward, query side and key side of the backward") {
  const int batch = 2, n = 40, heads = 2, dh = 40, width = heads * dh;
  const int ld = width + 8, ld_o = width + 4, ld_dq = width + 12, ld_dkv = width;
  const int pattern[] = {0, 1, 3, 35, 8};
  std::vector<std::int32_t> row_ptr{0}, col;
  std::mt19937 rng(81);
  for (int u = 0; u < n; ++u) {
    std::vector<std::int32_t> keys(n);
    for (int v = 0; v < n; ++v) keys[std::size_t(v)] = v;
    std::shuffle(keys.begin(), keys.end(), rng);
    keys.resize(std::size_t(pattern[u % 5]));
    std::sort(keys.begin(), keys.end());
    col.insert(col.end(), keys.begin(), keys.end());
    row_ptr.push_back(std::int32_t(col.size()));
  }
  const int nnz = int(col.size());
  // the transposed list: for each key, its pairs in increasing order, with their queries
  std::vector<std::int32_t> col_ptr(std::size_t(n) + 1, 0), pair, pair_row;
  for (int v = 0; v < n; ++v) {
    for (int u = 0; u < n; ++u)
      for (std::int32_t p = row_ptr[u]; p < row_ptr[u + 1]; ++p)
        if (col[std::size_t(p)] == v) {
          pair.push_back(p);
          pair_row.push_back(u);
        }
    col_ptr[std::size_t(v) + 1] = std::int32_t(pair.size());
  }
  REQUIRE(int(pair.size()) == nnz);
  const float scale = 1.0f / std::sqrt(float(dh));
  const Vec q = randn(std::size_t(batch) * n * ld, 82), kk = randn(std::size_t(batch) * n * ld, 83),
            v = randn(std::size_t(batch) * n * ld, 84), bias = randn(std::size_t(batch) * nnz, 85, 0.5),
            dout = randn(std::size_t(batch) * n * ld_o, 86);
  auto wide = [](const Vec& x) { return Ref(x.begin(), x.end()); };
  auto narrow = [](const Ref& x) { return Vec(x.begin(), x.end()); };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  using C = hatch::Cpu64;
  const Ref qd = wide(q), kd = wide(kk), vd = wide(v), bd = wide(bias), dd = wide(dout);
  const dim3 grid = row_grid(batch * heads * n);

  Ref probs_ref(std::size_t(batch) * heads * nnz), o_ref(std::size_t(batch) * n * ld_o, 0.0);
  C::sparse_attention_forward(probs_ref.data(), o_ref.data(), ld_o, qd.data(), kd.data(), vd.data(), ld,
                              row_ptr.data(), col.data(), bd.data(), nnz, batch, n, heads, dh, nnz, double(scale));
  Vec probs(probs_ref.size(), nan), o(o_ref.size(), 0.0f);
  hatch_emulation::launch(k::sparse_attention_forward<float>, grid, kRowBlock, 0, probs.data(), o.data(), ld_o,
                          q.data(), kk.data(), v.data(), ld, row_ptr.data(), col.data(), bias.data(), nnz, batch, n,
                          heads, dh, nnz, scale);
  CHECK(max_error_vs(probs, probs_ref) < 1e-5);
  CHECK(max_error_vs(o, o_ref) < 1e-5);

  const Vec probs_in = narrow(probs_ref);
  const Ref probs_in_d = wide(probs_in);
  Ref ds_ref(probs_ref.size()), dq_ref(std::size_t(batch) * n * ld_dq, 0.0);
  C::sparse_attention_backward_rows(ds_ref.data(), dq_ref.data(), ld_dq, dd.data(), ld_o, kd.data(), vd.data(), ld,
                                    probs_in_d.data(), row_ptr.data(), col.data(), batch, n, heads, dh, nnz,
                                    double(scale));
  Vec ds(ds_ref.size(), nan), dq(dq_ref.size(), 0.0f);
  hatch_emulation::launch(k::sparse_attention_backward_rows<float>, grid, kRowBlock, 0, ds.data(), dq.data(), ld_dq,
                          dout.data(), ld_o, kk.data(), v.data(), ld, probs_in.data(), row_ptr.data(), col.data(),
                          batch, n, heads, dh, nnz, scale);
  CHECK(max_error_vs(ds, ds_ref) < 1e-5);
  CHECK(max_error_vs(dq, dq_ref) < 1e-5);

  const Vec ds_in = narrow(ds_ref);
  Ref dk_ref(std::size_t(batch) * n * ld_dkv), dv_ref(dk_ref.size());
  C::sparse_attention_backward_cols(dk_ref.data(), dv_ref.data(), ld_dkv, qd.data(), ld, dd.data(), ld_o,
                                    probs_in_d.data(), wide(ds_in).data(), col_ptr.data(), pair.data(),
                                    pair_row.data(), batch, n, heads, dh, nnz, double(scale));
  Vec dk(dk_ref.size(), nan), dv(dv_ref.size(), nan);
  hatch_emulation::launch(k::sparse_attention_backward_cols<float>, grid, kRowBlock, 0, dk.data(), dv.data(), ld_dkv,
                          q.data(), ld, dout.data(), ld_o, probs_in.data(), ds_in.data(), col_ptr.data(), pair.data(),
                          pair_row.data(), batch, n, heads, dh, nnz, scale);
  CHECK(max_error_vs(dk, dk_ref) < 1e-5);
  CHECK(max_error_vs(dv, dv_ref) < 1e-5);
}
