#pragma once
// Device kernels of the Cuda backend. Each one mirrors a loop of backend/cpu.hpp with the same
// arithmetic, so the two backends agree to rounding. Every kernel is a template: templates may be
// defined in every translation unit that includes this header, so the library stays header-only.
//
// Two shapes of kernel recur:
//  - element kernels: a grid-stride loop over n values (any n, any grid);
//  - row kernels: one warp per row (blockDim (32, kRowsPerBlock)); a lane owns columns
//    lane, lane + 32, ... and reads each of its elements before it writes that element, which is
//    why the in-place forms (softmax y == x, softmax_backward dx == dy) are safe.
//  - column reductions (bias gradients, LayerNorm dgamma/dbeta): blocks of (32, kColLanes)
//    threads own 32 columns and a chunk of rows; chunks are summed in a fixed order by a second
//    kernel, so results are deterministic (no atomics).
#if !defined(__CUDACC__) && !defined(HATCH_CUDA_EMULATION)  // (tests/cuda_emulation.hpp runs them on the CPU)
#error "hatch/backend/cuda_kernels.cuh holds CUDA kernels: compile this translation unit with nvcc (a .cu file)"
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "hatch/backend/random.hpp"

// A kernel's statically sized shared memory: HATCH_STATIC_SHARED(float, tile, [32][33]) is
// `__shared__ float tile[32][33]`. (The emulator of tests/cuda_emulation.hpp gives each block it
// runs at once its own, which a plain `static` could not.)
#ifndef HATCH_CUDA_EMULATION
#define HATCH_STATIC_SHARED(T, name, extents) __shared__ T name extents
#endif
// A vector access of `bytes` bytes at p (a float4, an attention Vec) must be aligned to them: on a
// GPU a misaligned one ends the context. The launchers pick vector widths by alignment; the
// emulator checks every such access (tests/cuda_emulation.hpp), the device nothing.
#ifndef HATCH_CUDA_EMULATION
#define HATCH_ALIGNED_ACCESS(p, bytes) ((void)0)
#endif

namespace hatch::cuda_kernels {

inline constexpr int kThreads = 256;      // element kernels
inline constexpr int kRowsPerBlock = 8;   // row kernels: 8 warps, one row each
inline constexpr int kColLanes = 16;      // column reductions: 32 columns x 16 row lanes
inline constexpr unsigned kFullMask = 0xffffffffu;

// Overloads so the kernels read like the CPU code for float and double alike.
__device__ inline float d_sqrt(float v) { return sqrtf(v); }
__device__ inline double d_sqrt(double v) { return sqrt(v); }
__device__ inline float d_exp(float v) { return expf(v); }
__device__ inline double d_exp(double v) { return exp(v); }
__device__ inline float d_erf(float v) { return erff(v); }
__device__ inline double d_erf(double v) { return erf(v); }

template <class V>
__device__ inline V warp_sum(V v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
template <class V>
__device__ inline V warp_max(V v) {
  for (int o = 16; o > 0; o >>= 1) {
    const V u = __shfl_xor_sync(kFullMask, v, o);
    v = u > v ? u : v;
  }
  return v;
}

__device__ inline std::size_t global_index() { return std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ inline std::size_t global_stride() { return std::size_t(gridDim.x) * blockDim.x; }
// The row of a row kernel; the same for all 32 lanes of a warp, so a warp exits as a whole.
__device__ inline int warp_row() { return int(blockIdx.x) * kRowsPerBlock + int(threadIdx.y); }

// ---- elementwise ---------------------------------------------------------------------------------
template <class T>
__global__ void fill(T* y, std::size_t n, T v) {
  for (std::size_t j = global_index(); j < n; j += global_stride()) y[j] = v;
}
template <class T>
__global__ void axpy(T* y, T a, const T* x, std::size_t n) {
  for (std::size_t j = global_index(); j < n; j += global_stride()) y[j] += a * x[j];
}
template <class T>
__global__ void add(T* y, const T* a, const T* b, std::size_t n) {
  for (std::size_t j = global_index(); j < n; j += global_stride()) y[j] = a[j] + b[j];
}
template <class T>
__global__ void mul(T* y, const T* a, const T* b, std::size_t n) {
  for (std::size_t j = global_index(); j < n; j += global_stride()) y[j] = a[j] * b[j];
}
template <class T>
__global__ void scale(T* y, T a, std::size_t n) {
  for (std::size_t j = global_index(); j < n; j += global_stride()) y[j] *= a;
}
template <class T>
__global__ void add_bias_rows(T* y, const T* bias, std::size_t total, int cols) {
  for (std::size_t j = global_index(); j < total; j += global_stride()) y[j] += bias[j % cols];
}
template <class T>
__global__ void copy_2d(T* dst, int ld_dst, const T* src, int ld_src, std::size_t total, int cols) {
  for (std::size_t j = global_index(); j < total; j += global_stride()) {
    const std::size_t r = j / cols, c = j % cols;
    dst[r * ld_dst + c] = src[r * ld_src + c];  // ld_src 0: every row reads row 0
  }
}
template <class T>
__global__ void scale_rows(T* y, const T* x, const T* s, std::size_t total, int cols) {
  for (std::size_t j = global_index(); j < total; j += global_stride()) y[j] = x[j] * s[j / cols];
}
// Splits each float into hi = x rounded to TF32 (10 mantissa bits, to nearest) and lo = x - hi
// (exact in float), for GEMMs as three TF32 products (Cuda::GemmPrecision::tf32x3). A tensor
// core takes hi unchanged whether it rounds or truncates its inputs; lo loses at most 2^-10 of
// itself, 2^-21 of x. Where rounding would overflow, hi is x truncated; infinities and NaNs go
// whole into hi, with lo = 0. (T is float; templates like every kernel here. split_tf32_4 is the
// 128-bit form, four floats per load and store, for n a multiple of 4 and aligned pointers.)
template <class T>
__device__ inline void split_tf32_value(T v, T& hi, T& lo) {
  static_assert(sizeof(T) == sizeof(std::uint32_t));
  std::uint32_t u;
  memcpy(&u, &v, sizeof u);
  std::uint32_t h = u;
  if ((u & 0x7f800000u) != 0x7f800000u) {
    h = (u + 0x1000u) & ~0x1fffu;
    if ((h & 0x7f800000u) == 0x7f800000u) h = u & ~0x1fffu;  // rounded past the largest float
  }
  memcpy(&hi, &h, sizeof hi);
  lo = h == u ? T(0) : v - hi;
}
template <class T>
__global__ void split_tf32(T* hi, T* lo, const T* x, std::size_t n) {
  for (std::size_t j = global_index(); j < n; j += global_stride()) split_tf32_value(x[j], hi[j], lo[j]);
}
template <class V>
__global__ void split_tf32_4(V* hi, V* lo, const V* x, std::size_t n4) {
  for (std::size_t j = global_index(); j < n4; j += global_stride()) {
    const V v = x[j];
    V h, l;
    split_tf32_value(v.x, h.x, l.x);
    split_tf32_value(v.y, h.y, l.y);
    split_tf32_value(v.z, h.z, l.z);
    split_tf32_value(v.w, h.w, l.w);
    hi[j] = h;
    lo[j] = l;
  }
}
template <class T>
__device__ inline T gelu_value(T v) {
  return T(0.5) * v * (T(1) + d_erf(v * T(0.70710678118654752440)));
}
template <class T>
__device__ inline T gelu_grad(T dy, T v) {
  const T cdf = T(0.5) * (T(1) + d_erf(v * T(0.70710678118654752440)));
  const T pdf = d_exp(T(-0.5) * v * v) * T(0.3989422804014327);
  return dy * (cdf + v * pdf);
}
template <class T>
__global__ void gelu_forward(T* y, const T* x, std::size_t n) {
  for (std::size_t j = global_index(); j < n; j += global_stride()) y[j] = gelu_value(x[j]);
}
template <class T>
__global__ void gelu_backward(T* dx, const T* dy, const T* x, std::size_t n) {
  for (std::size_t j = global_index(); j < n; j += global_stride()) dx[j] = gelu_grad(dy[j], x[j]);
}
// 128-bit forms of the hottest element kernels (the MLP's GELU, the residual adds): four floats
// per load and store. The launcher uses them when n is a multiple of 4 and every pointer is
// 16-byte aligned; the arithmetic per element is the scalar kernels'.
// (Templates over the vector type, like every kernel here, so that any number of TUs may define them.)
template <class V>
__global__ void add4(V* y, const V* a, const V* b, std::size_t n4) {
  for (std::size_t j = global_index(); j < n4; j += global_stride()) {
    const V u = a[j], v = b[j];
    y[j] = make_float4(u.x + v.x, u.y + v.y, u.z + v.z, u.w + v.w);
  }
}
template <class V>
__global__ void gelu_forward4(V* y, const V* x, std::size_t n4) {
  for (std::size_t j = global_index(); j < n4; j += global_stride()) {
    const V v = x[j];
    y[j] = make_float4(gelu_value(v.x), gelu_value(v.y), gelu_value(v.z), gelu_value(v.w));
  }
}
template <class V>
__global__ void gelu_backward4(V* dx, const V* dy, const V* x, std::size_t n4) {
  for (std::size_t j = global_index(); j < n4; j += global_stride()) {
    const V g = dy[j], v = x[j];
    dx[j] = make_float4(gelu_grad(g.x, v.x), gelu_grad(g.y, v.y), gelu_grad(g.z, v.z), gelu_grad(g.w, v.w));
  }
}
// User functors (B::map, B::map_binary): F's operator() is __host__ __device__ (HATCH_HD); F is
// passed by value as a kernel argument, so it may carry parameters (a slope, a temperature).
template <class T, class F>
__global__ void map(T* y, const T* x, std::size_t n, F f) {
  for (std::size_t j = global_index(); j < n; j += global_stride()) y[j] = f(x[j]);
}
template <class T, class F>
__global__ void map_binary(T* y, const T* a, const T* b, std::size_t n, F f) {
  for (std::size_t j = global_index(); j < n; j += global_stride()) y[j] = f(a[j], b[j]);
}
// keep_prob is compared in double and inv computed on the host, exactly as the Cpu backend does,
// so both draw bit-identical masks.
template <class T>
__global__ void bernoulli_mask(T* mask, std::size_t n, double keep_prob, T inv, std::uint64_t seed,
                               std::uint64_t offset) {
  for (std::size_t j = global_index(); j < n; j += global_stride())
    mask[j] = uniform01(seed, offset + std::uint64_t(j)) < keep_prob ? inv : T(0);
}
// Weight decay applies to [0, decay_end) only (the flat arena keeps decayed parameters first).
template <class T>
__global__ void adamw_update(T* w, T* m, T* v, const T* g, std::size_t n, std::size_t decay_end, T lr, T beta1,
                             T beta2, T eps, T weight_decay, T bias_corr1, T bias_corr2) {
  for (std::size_t j = global_index(); j < n; j += global_stride()) {
    T wj = w[j];
    wj -= lr * (j < decay_end ? weight_decay : T(0)) * wj;
    const T mj = beta1 * m[j] + (T(1) - beta1) * g[j];
    const T vj = beta2 * v[j] + (T(1) - beta2) * g[j] * g[j];
    m[j] = mj;
    v[j] = vj;
    w[j] = wj - lr * (mj / bias_corr1) / (d_sqrt(vj / bias_corr2) + eps);
  }
}

// ---- patches -------------------------------------------------------------------------------------
// One thread per patch element (coalesced writes); the patch vector index is (c * p + ky) * p + kx.
template <class T>
__global__ void im2patch(T* patches, const T* img, int batch, int ch, int h, int w, int p) {
  const int gh = h / p, gw = w / p, pd = ch * p * p;
  const std::size_t total = std::size_t(batch) * gh * gw * pd;
  for (std::size_t j = global_index(); j < total; j += global_stride()) {
    const std::size_t r = j / pd;
    const int e = int(j % pd), c = e / (p * p), ky = (e / p) % p, kx = e % p;
    const std::size_t b = r / (std::size_t(gh) * gw);
    const int g = int(r % (std::size_t(gh) * gw)), py = g / gw, px = g % gw;
    patches[j] = img[((b * ch + c) * h + py * p + ky) * w + px * p + kx];
  }
}
// One thread per pixel (a gather): every pixel is written, so no separate zero fill is needed;
// pixels outside the patch grid (h or w not a multiple of p) get zero, as on the CPU.
template <class T>
__global__ void patch2im(T* img, const T* patches, int batch, int ch, int h, int w, int p) {
  const int gh = h / p, gw = w / p, pd = ch * p * p;
  const std::size_t total = std::size_t(batch) * ch * h * w;
  for (std::size_t j = global_index(); j < total; j += global_stride()) {
    const int x = int(j % w), y = int((j / w) % h), c = int((j / (std::size_t(w) * h)) % ch);
    const std::size_t b = j / (std::size_t(w) * h * ch);
    const int py = y / p, px = x / p;
    img[j] = (py < gh && px < gw)
                 ? patches[((b * gh + py) * gw + px) * pd + (c * p + y % p) * p + x % p]
                 : T(0);
  }
}

// ---- column reductions ---------------------------------------------------------------------------
// Sums a (rows_per_chunk x 32) tile of the block's columns; lanes of threadIdx.y take every
// kColLanes-th row, and the partial sums are combined in shared memory in a fixed order.
template <class T, class F>
__device__ inline T column_chunk_sum(F&& value, int rows, int rows_per_chunk, int c, bool in_range,
                                     T (&tile)[kColLanes][33]) {
  const int r0 = int(blockIdx.y) * rows_per_chunk;
  const int r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  T acc = T(0);
  if (in_range)
    for (int r = r0 + int(threadIdx.y); r < r1; r += kColLanes) acc += value(r);
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  T s = T(0);
  if (threadIdx.y == 0)
    for (int l = 0; l < kColLanes; ++l) s += tile[l][threadIdx.x];
  return s;  // meaningful in row lane 0 only
}

// out[c] = beta out[c] + sum_r x[r * ld + c]; with one chunk the result goes straight to out,
// otherwise partial[chunk * cols + c] is written and sum_rows_finish adds the chunks.
template <class T>
__global__ void sum_rows_partial(T* out, T* partial, const T* x, int rows, int cols, int ld, T beta,
                                 int rows_per_chunk) {
  HATCH_STATIC_SHARED(T, tile, [kColLanes][33]);
  const int c = int(blockIdx.x) * 32 + int(threadIdx.x);
  const bool in_range = c < cols;
  const T s = column_chunk_sum<T>([&](int r) { return x[std::size_t(r) * ld + c]; }, rows, rows_per_chunk, c,
                                  in_range, tile);
  if (threadIdx.y != 0 || !in_range) return;
  if (gridDim.y == 1)
    out[c] = (beta == T(0) ? T(0) : beta * out[c]) + s;
  else
    partial[std::size_t(blockIdx.y) * cols + c] = s;
}
template <class T>
__global__ void sum_rows_finish(T* out, const T* partial, int chunks, int cols, T beta) {
  // Grid-stride: the launch caps the grid (element_blocks), and cols may exceed it.
  for (std::size_t c = global_index(); c < std::size_t(cols); c += global_stride()) {
    T s = T(0);
    for (int k = 0; k < chunks; ++k) s += partial[std::size_t(k) * cols + c];
    out[c] = (beta == T(0) ? T(0) : beta * out[c]) + s;
  }
}

// dgamma[c] += sum_r dy xhat, dbeta[c] += sum_r dy (either may be null). Partials: the dgamma
// chunks at partial[0 .. chunks*cols), the dbeta chunks after them.
template <class T>
__global__ void layer_norm_param_partial(T* dgamma, T* dbeta, T* partial, const T* dy, const T* x, const T* mean,
                                         const T* rstd, int rows, int cols, int rows_per_chunk) {
  HATCH_STATIC_SHARED(T, tile, [kColLanes][33]);
  const int c = int(blockIdx.x) * 32 + int(threadIdx.x);
  const bool in_range = c < cols;
  T sg = T(0), sb = T(0);
  if (dgamma)
    sg = column_chunk_sum<T>(
        [&](int r) {
          const std::size_t j = std::size_t(r) * cols + c;
          return dy[j] * (x[j] - mean[r]) * rstd[r];
        },
        rows, rows_per_chunk, c, in_range, tile);
  __syncthreads();  // the tile is reused
  if (dbeta)
    sb = column_chunk_sum<T>([&](int r) { return dy[std::size_t(r) * cols + c]; }, rows, rows_per_chunk, c,
                             in_range, tile);
  if (threadIdx.y != 0 || !in_range) return;
  if (gridDim.y == 1) {
    if (dgamma) dgamma[c] += sg;
    if (dbeta) dbeta[c] += sb;
  } else {
    const std::size_t chunks = gridDim.y;
    partial[std::size_t(blockIdx.y) * cols + c] = sg;
    partial[(chunks + blockIdx.y) * cols + c] = sb;
  }
}
// Adds the chunks' sums: dgamma[c] += sum_k partial[k * cols + c], dbeta[c] += sum_k partial[(chunks
// + k) * cols + c] (either may be null). Launched on kColBlock blocks: 32 columns a block, its
// kColLanes row lanes taking every kColLanes-th chunk (column_chunk_sum with the whole range as
// one chunk), so many chunks (LayerNorm's one-kernel backward has one per block of a wave, some
// hundreds) are read by many threads at once, not one column by one thread. Grid-stride over the
// columns (the same count for a whole block: its barriers are reached by every thread).
template <class T>
__global__ void layer_norm_param_finish(T* dgamma, T* dbeta, const T* partial, int chunks, int cols) {
  HATCH_STATIC_SHARED(T, tile, [kColLanes][33]);
  for (int c0 = int(blockIdx.x) * 32; c0 < cols; c0 += int(gridDim.x) * 32) {
    const int c = c0 + int(threadIdx.x);
    const bool in_range = c < cols;
    const auto sum = [&](const T* chunk0) {
      return column_chunk_sum<T>([&](int k) { return chunk0[std::size_t(k) * cols + c]; }, chunks, chunks, c,
                                 in_range, tile);
    };
    if (dgamma) {
      const T s = sum(partial);
      if (threadIdx.y == 0 && in_range) dgamma[c] += s;
      __syncthreads();  // the tile is reused
    }
    if (dbeta) {
      const T s = sum(partial + std::size_t(chunks) * cols);
      if (threadIdx.y == 0 && in_range) dbeta[c] += s;
      __syncthreads();
    }
  }
}

// ---- row kernels ---------------------------------------------------------------------------------
template <class T>
__global__ void layer_norm_forward(T* y, T* mean, T* rstd, const T* x, const T* gamma, const T* beta, int rows,
                                   int cols, T eps) {
  const int row = warp_row();
  if (row >= rows) return;
  const int lane = int(threadIdx.x);
  const T* xr = x + std::size_t(row) * cols;
  T* yr = y + std::size_t(row) * cols;
  T s = T(0);
  for (int c = lane; c < cols; c += 32) s += xr[c];
  const T mu = warp_sum(s) / T(cols);
  T v = T(0);
  for (int c = lane; c < cols; c += 32) v += (xr[c] - mu) * (xr[c] - mu);
  // Two passes (mean, then centred squares) as on the CPU: no cancellation for large means.
  const T rs = T(1) / d_sqrt(warp_sum(v) / T(cols) + eps);
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
  for (int c = lane; c < cols; c += 32) yr[c] = (xr[c] - mu) * rs * gamma[c] + beta[c];
}
template <class T>
__global__ void layer_norm_backward_dx(T* dx, const T* dy, const T* x, const T* mean, const T* rstd,
                                       const T* gamma, int rows, int cols) {
  const int row = warp_row();
  if (row >= rows) return;
  const int lane = int(threadIdx.x);
  const std::size_t o = std::size_t(row) * cols;
  const T mu = mean[row], rs = rstd[row];
  T s1 = T(0), s2 = T(0);  // sums of g and of g * xhat, with g = dy * gamma
  for (int c = lane; c < cols; c += 32) {
    const T g = dy[o + c] * gamma[c];
    s1 += g;
    s2 += g * (x[o + c] - mu) * rs;
  }
  s1 = warp_sum(s1) / T(cols);
  s2 = warp_sum(s2) / T(cols);
  for (int c = lane; c < cols; c += 32) {
    const T xh = (x[o + c] - mu) * rs;
    dx[o + c] = rs * (dy[o + c] * gamma[c] - s1 - xh * s2);
  }
}
template <class T>
__global__ void softmax_forward(T* y, const T* x, int rows, int cols, T scale) {
  const int row = warp_row();
  if (row >= rows) return;
  const int lane = int(threadIdx.x);
  const T* xr = x + std::size_t(row) * cols;
  T* yr = y + std::size_t(row) * cols;
  T mx = xr[0];
  for (int c = lane; c < cols; c += 32) mx = xr[c] > mx ? xr[c] : mx;
  mx = warp_max(mx);
  T s = T(0);
  for (int c = lane; c < cols; c += 32) {
    const T e = d_exp(scale * (xr[c] - mx));
    yr[c] = e;
    s += e;
  }
  const T inv = T(1) / warp_sum(s);
  for (int c = lane; c < cols; c += 32) yr[c] *= inv;
}
template <class T>
__global__ void softmax_backward(T* dx, const T* dy, const T* y, int rows, int cols, T scale) {
  const int row = warp_row();
  if (row >= rows) return;
  const int lane = int(threadIdx.x);
  const std::size_t o = std::size_t(row) * cols;
  T dot = T(0);
  for (int c = lane; c < cols; c += 32) dot += dy[o + c] * y[o + c];
  dot = warp_sum(dot);
  for (int c = lane; c < cols; c += 32) dx[o + c] = scale * y[o + c] * (dy[o + c] - dot);
}
// ---- row kernels with the row in registers ---------------------------------------------------------
// The same arithmetic as the kernels above (results agree to float rounding: the order of the
// lane sums and FMA contraction differ), for rows of at most 32 * N columns: each lane keeps its
// N values in registers, so the row is read from memory once instead of two or three times.
// W is the width of each load and store: 4 (one 128-bit float4) when cols is a multiple of 4
// and every pointer is 16-byte aligned, else 1. A lane owns the packs lane, lane + 32, ... of W
// consecutive columns; its value j = i * W + c is column W * (lane + 32 i) + c. Rows of
// ViT-B/16: 197 (attention probabilities: N = 8, W = 1) and 768 (LayerNorm: N = 32, W = 4).
// The launcher picks N and W (cuda.hpp, with_row_layout).
template <class T, int W>
struct Pack {
  T v[W];
};
// Pack k of a row: row[W k, W k + W).
template <int W, class T>
__device__ inline Pack<T, W> load_pack(const T* row, int k) {
  Pack<T, W> p;
  if constexpr (W == 4) {
    static_assert(sizeof(T) == 4, "128-bit packs are four floats");
    HATCH_ALIGNED_ACCESS(row + 4 * k, 16);
    const float4 f = reinterpret_cast<const float4*>(row)[k];
    p.v[0] = f.x;
    p.v[1] = f.y;
    p.v[2] = f.z;
    p.v[3] = f.w;
  } else {
    static_assert(W == 1, "packs are 1 or 4 values wide");
    p.v[0] = row[k];
  }
  return p;
}
template <int W, class T>
__device__ inline void store_pack(T* row, int k, const Pack<T, W>& p) {
  if constexpr (W == 4) {
    HATCH_ALIGNED_ACCESS(row + 4 * k, 16);
    reinterpret_cast<float4*>(row)[k] = make_float4(p.v[0], p.v[1], p.v[2], p.v[3]);
  } else {
    row[k] = p.v[0];
  }
}

template <class T, int W, int N>
__global__ void softmax_forward_regs(T* y, const T* x, int rows, int cols, T scale) {
  constexpr int P = N / W;  // packs per lane
  const int row = warp_row();
  if (row >= rows) return;
  const int lane = int(threadIdx.x), packs = cols / W;
  const T* xr = x + std::size_t(row) * cols;
  T* yr = y + std::size_t(row) * cols;
  T v[N];
  T mx = xr[0];
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int k = lane + 32 * i;
    const Pack<T, W> p = k < packs ? load_pack<W>(xr, k) : Pack<T, W>{};
#pragma unroll
    for (int c = 0; c < W; ++c) {
      v[i * W + c] = p.v[c];
      if (k < packs) mx = p.v[c] > mx ? p.v[c] : mx;
    }
  }
  mx = warp_max(mx);
  T s = T(0);
#pragma unroll
  for (int i = 0; i < P; ++i)
    if (lane + 32 * i < packs)
#pragma unroll
      for (int c = 0; c < W; ++c) {
        v[i * W + c] = d_exp(scale * (v[i * W + c] - mx));
        s += v[i * W + c];
      }
  const T inv = T(1) / warp_sum(s);
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int k = lane + 32 * i;
    if (k >= packs) continue;
    Pack<T, W> p;
#pragma unroll
    for (int c = 0; c < W; ++c) p.v[c] = v[i * W + c] * inv;
    store_pack<W>(yr, k, p);
  }
}
template <class T, int W, int N>
__global__ void softmax_backward_regs(T* dx, const T* dy, const T* y, int rows, int cols, T scale) {
  constexpr int P = N / W;
  const int row = warp_row();
  if (row >= rows) return;
  const int lane = int(threadIdx.x), packs = cols / W;
  const std::size_t o = std::size_t(row) * cols;
  Pack<T, W> g[P], p[P];
  T dot = T(0);
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int k = lane + 32 * i;
    g[i] = k < packs ? load_pack<W>(dy + o, k) : Pack<T, W>{};
    p[i] = k < packs ? load_pack<W>(y + o, k) : Pack<T, W>{};
#pragma unroll
    for (int c = 0; c < W; ++c) dot += g[i].v[c] * p[i].v[c];
  }
  dot = warp_sum(dot);
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int k = lane + 32 * i;
    if (k >= packs) continue;
    Pack<T, W> d;
#pragma unroll
    for (int c = 0; c < W; ++c) d.v[c] = scale * p[i].v[c] * (g[i].v[c] - dot);
    store_pack<W>(dx + o, k, d);
  }
}
template <class T, int W, int N>
__global__ void layer_norm_forward_regs(T* y, T* mean, T* rstd, const T* x, const T* gamma, const T* beta, int rows,
                                        int cols, T eps) {
  constexpr int P = N / W;
  const int row = warp_row();
  if (row >= rows) return;
  const int lane = int(threadIdx.x), packs = cols / W;
  const T* xr = x + std::size_t(row) * cols;
  T* yr = y + std::size_t(row) * cols;
  Pack<T, W> v[P];
  T s = T(0);
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int k = lane + 32 * i;
    v[i] = k < packs ? load_pack<W>(xr, k) : Pack<T, W>{};
#pragma unroll
    for (int c = 0; c < W; ++c) s += v[i].v[c];
  }
  const T mu = warp_sum(s) / T(cols);
  T q = T(0);
#pragma unroll
  for (int i = 0; i < P; ++i)
    if (lane + 32 * i < packs)
#pragma unroll
      for (int c = 0; c < W; ++c) q += (v[i].v[c] - mu) * (v[i].v[c] - mu);
  const T rs = T(1) / d_sqrt(warp_sum(q) / T(cols) + eps);
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int k = lane + 32 * i;
    if (k >= packs) continue;
    const Pack<T, W> g = load_pack<W>(gamma, k), b = load_pack<W>(beta, k);
#pragma unroll
    for (int c = 0; c < W; ++c) v[i].v[c] = (v[i].v[c] - mu) * rs * g.v[c] + b.v[c];
    store_pack<W>(yr, k, v[i]);
  }
}

// LayerNorm backward in one kernel: dx (row by row, as layer_norm_backward_dx) and the parameter
// gradients dgamma += sum_r dy xhat, dbeta += sum_r dy, each of the three optional.
// Warp w of the grid takes rows w, w + warps, ... and sums its share of the parameter gradients
// in registers (a lane owns the same columns in every row); the warps of a block add theirs in
// shared memory in warp order, and each block writes its sums to partial (dgamma's block sums at
// partial[block * cols], dbeta's at partial[(blocks + block) * cols]), which layer_norm_param_finish
// then adds into dgamma and dbeta, many threads at once (a last block adding hundreds of blocks'
// sums alone, as before, kept one multiprocessor busy while the others idled). Every sum has a
// fixed order for a given grid: deterministic, no atomics. With one block the block adds its sums
// directly. dx may alias dy (a lane reads its packs of a row before it writes them).
inline constexpr int kMaxRowRegisterCols = 1024;  // the longest row a register kernel takes (N = 32)
template <class T, int W, int N>
__global__ void layer_norm_backward_regs(T* dx, T* dgamma, T* dbeta, T* partial, const T* dy, const T* x,
                                         const T* mean, const T* rstd, const T* gamma, int rows, int cols) {
  constexpr int P = N / W;
  const int lane = int(threadIdx.x), packs = cols / W;
  const bool params = dgamma != nullptr || dbeta != nullptr;
  T ag[N], ab[N];  // this warp's share of dgamma and dbeta, for the columns this lane owns
#pragma unroll
  for (int j = 0; j < N; ++j) ag[j] = ab[j] = T(0);
  const int warps = int(gridDim.x) * kRowsPerBlock;
  for (int row = warp_row(); row < rows; row += warps) {  // the same trip count for a whole warp
    const std::size_t o = std::size_t(row) * cols;
    const T mu = mean[row], rs = rstd[row];
    T g[N], xc[N];  // dy * gamma, and x centred
    T s1 = T(0), s2 = T(0);
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int k = lane + 32 * i;
      if (k >= packs) continue;
      const Pack<T, W> d = load_pack<W>(dy + o, k), xv = load_pack<W>(x + o, k), gm = load_pack<W>(gamma, k);
#pragma unroll
      for (int c = 0; c < W; ++c) {
        const int j = i * W + c;
        g[j] = d.v[c] * gm.v[c];
        xc[j] = xv.v[c] - mu;
        s1 += g[j];
        s2 += g[j] * xc[j] * rs;
        ag[j] += d.v[c] * xc[j] * rs;
        ab[j] += d.v[c];
      }
    }
    if (!dx) continue;
    s1 = warp_sum(s1) / T(cols);
    s2 = warp_sum(s2) / T(cols);
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int k = lane + 32 * i;
      if (k >= packs) continue;
      Pack<T, W> out;
#pragma unroll
      for (int c = 0; c < W; ++c) out.v[c] = rs * (g[i * W + c] - s1 - xc[i * W + c] * rs * s2);
      store_pack<W>(dx + o, k, out);
    }
  }
  if (!params) return;  // the same for every thread of the grid

  HATCH_STATIC_SHARED(T, sg, [kMaxRowRegisterCols]);
  HATCH_STATIC_SHARED(T, sb, [kMaxRowRegisterCols]);
  for (int w = 0; w < kRowsPerBlock; ++w) {  // the block's warps, in order
    if (int(threadIdx.y) == w)
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const int k = lane + 32 * i;
        if (k >= packs) continue;
#pragma unroll
        for (int c = 0; c < W; ++c) {
          const int col = W * k + c;
          sg[col] = (w == 0 ? T(0) : sg[col]) + ag[i * W + c];
          sb[col] = (w == 0 ? T(0) : sb[col]) + ab[i * W + c];
        }
      }
    __syncthreads();
  }
  const int tid = int(threadIdx.y) * 32 + lane, threads = 32 * kRowsPerBlock;
  if (gridDim.x == 1) {
    for (int col = tid; col < cols; col += threads) {
      if (dgamma) dgamma[col] += sg[col];
      if (dbeta) dbeta[col] += sb[col];
    }
    return;
  }
  T* gamma_sums = partial + std::size_t(blockIdx.x) * cols;
  T* beta_sums = partial + (std::size_t(gridDim.x) + blockIdx.x) * cols;
  for (int col = tid; col < cols; col += threads) {
    gamma_sums[col] = sg[col];
    beta_sums[col] = sb[col];
  }
}

// ---- routing (mixture of experts) ----------------------------------------------------------------
// Row kernels again: one warp per output row (gather_rows, combine_rows) or per (token, slot) pair
// (gather_dot_rows); every output element has one writer, so the results are deterministic.
// y[r, :] = idx[r] < 0 ? 0 : (scale ? scale[r] : 1) * x[idx[r], :]
template <class T>
__global__ void gather_rows(T* y, const T* x, const std::int32_t* idx, const T* scale, int n, int cols) {
  const int row = warp_row();
  if (row >= n) return;
  const int lane = int(threadIdx.x);
  T* yr = y + std::size_t(row) * cols;
  const std::int32_t src = idx[row];
  if (src < 0) {
    for (int c = lane; c < cols; c += 32) yr[c] = T(0);
    return;
  }
  const T* xr = x + std::size_t(src) * cols;
  if (scale) {
    const T s = scale[row];
    for (int c = lane; c < cols; c += 32) yr[c] = s * xr[c];
  } else {
    for (int c = lane; c < cols; c += 32) yr[c] = xr[c];
  }
}
// y[t, :] = sum over j < k with slots[t k + j] >= 0, in order of j, of (w ? w[t k + j] : 1) x[slot, :]
template <class T>
__global__ void combine_rows(T* y, const T* x, const std::int32_t* slots, const T* w, int rows, int k, int cols) {
  const int row = warp_row();
  if (row >= rows) return;
  const int lane = int(threadIdx.x);
  T* yr = y + std::size_t(row) * cols;
  const std::int32_t* sr = slots + std::size_t(row) * k;
  for (int c = lane; c < cols; c += 32) {
    T acc = T(0);
    for (int j = 0; j < k; ++j) {
      const std::int32_t src = sr[j];
      if (src < 0) continue;
      const T wj = w ? w[std::size_t(row) * k + j] : T(1);
      acc += wj * x[std::size_t(src) * cols + c];
    }
    yr[c] = acc;
  }
}
// out[p] = slots[p] < 0 ? 0 : dot(a[p / k, :], b[slots[p], :]) for p < rows * k
template <class T>
__global__ void gather_dot_rows(T* out, const T* a, const T* b, const std::int32_t* slots, int rows, int k,
                                int cols) {
  const std::size_t pair = std::size_t(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (pair >= std::size_t(rows) * k) return;
  const int lane = int(threadIdx.x);
  const std::int32_t src = slots[pair];  // the same for the whole warp
  if (src < 0) {
    if (lane == 0) out[pair] = T(0);
    return;
  }
  const T* ar = a + (pair / std::size_t(k)) * cols;
  const T* br = b + std::size_t(src) * cols;
  T s = T(0);
  for (int c = lane; c < cols; c += 32) s += ar[c] * br[c];
  s = warp_sum(s);
  if (lane == 0) out[pair] = s;
}

// ---- sparse attention (NAC's kernel-modulated attention), as in CpuBackend ----------------------
// One warp per (example, head, query) row r = (b heads + h) n + u, or per key for the key side.
// Dot products over a head's dh columns are lane-split and warp-summed (every lane gets the sum),
// and every lane keeps the same running values, so the row's pairs are walked in order by all.
template <class T>
__global__ void sparse_attention_forward(T* probs, T* o, int ld_o, const T* q, const T* k, const T* v, int ld,
                                         const std::int32_t* row_ptr, const std::int32_t* col, const T* bias,
                                         int ld_bias, int batch, int n, int heads, int dh, int nnz, T scale) {
  const int row = warp_row();
  if (row >= batch * heads * n) return;
  const int lane = int(threadIdx.x);
  const int u = row % n, h = (row / n) % heads, b = row / (n * heads);
  const std::int32_t p0 = row_ptr[u], p1 = row_ptr[u + 1];
  T* pr = probs + (std::size_t(b) * heads + h) * nnz;
  const T* qu = q + (std::size_t(b) * n + u) * ld + std::size_t(h) * dh;
  T* ou = o + (std::size_t(b) * n + u) * ld_o + std::size_t(h) * dh;
  T mx = T(0);
  for (std::int32_t p = p0; p < p1; ++p) {
    const T* kv = k + (std::size_t(b) * n + col[p]) * ld + std::size_t(h) * dh;
    T s = T(0);
    for (int c = lane; c < dh; c += 32) s += qu[c] * kv[c];
    s = scale * warp_sum(s) + bias[std::size_t(b) * ld_bias + p];
    if (lane == 0) pr[p] = s;
    mx = (p == p0 || s > mx) ? s : mx;
  }
  __syncwarp();
  T sum = T(0);
  for (std::int32_t p = p0 + lane; p < p1; p += 32) sum += (pr[p] = d_exp(pr[p] - mx));
  const T inv = T(1) / warp_sum(sum);
  for (std::int32_t p = p0 + lane; p < p1; p += 32) pr[p] *= inv;
  __syncwarp();
  for (int c = lane; c < dh; c += 32) {
    T acc = T(0);
    for (std::int32_t p = p0; p < p1; ++p) acc += pr[p] * v[(std::size_t(b) * n + col[p]) * ld + std::size_t(h) * dh + c];
    ou[c] = acc;
  }
}
template <class T>
__global__ void sparse_attention_backward_rows(T* dscores, T* dq, int ld_dq, const T* dout, int ld_o, const T* k,
                                               const T* v, int ld, const T* probs, const std::int32_t* row_ptr,
                                               const std::int32_t* col, int batch, int n, int heads, int dh, int nnz,
                                               T scale) {
  const int row = warp_row();
  if (row >= batch * heads * n) return;
  const int lane = int(threadIdx.x);
  const int u = row % n, h = (row / n) % heads, b = row / (n * heads);
  const std::int32_t p0 = row_ptr[u], p1 = row_ptr[u + 1];
  const T* pr = probs + (std::size_t(b) * heads + h) * nnz;
  T* ds = dscores + (std::size_t(b) * heads + h) * nnz;
  const T* du = dout + (std::size_t(b) * n + u) * ld_o + std::size_t(h) * dh;
  T* dqu = dq + (std::size_t(b) * n + u) * ld_dq + std::size_t(h) * dh;
  T dot = T(0);
  for (std::int32_t p = p0; p < p1; ++p) {
    const T* vv = v + (std::size_t(b) * n + col[p]) * ld + std::size_t(h) * dh;
    T s = T(0);
    for (int c = lane; c < dh; c += 32) s += du[c] * vv[c];
    s = warp_sum(s);
    if (lane == 0) ds[p] = s;
    dot += s * pr[p];
  }
  __syncwarp();
  for (std::int32_t p = p0 + lane; p < p1; p += 32) ds[p] = pr[p] * (ds[p] - dot);
  __syncwarp();
  for (int c = lane; c < dh; c += 32) {
    T acc = T(0);
    for (std::int32_t p = p0; p < p1; ++p) acc += scale * ds[p] * k[(std::size_t(b) * n + col[p]) * ld + std::size_t(h) * dh + c];
    dqu[c] = acc;
  }
}
template <class T>
__global__ void sparse_attention_backward_cols(T* dk, T* dv, int ld_dkv, const T* q, int ld, const T* dout, int ld_o,
                                               const T* probs, const T* dscores, const std::int32_t* col_ptr,
                                               const std::int32_t* pair, const std::int32_t* pair_row, int batch,
                                               int n, int heads, int dh, int nnz, T scale) {
  const int row = warp_row();
  if (row >= batch * heads * n) return;
  const int lane = int(threadIdx.x);
  const int vi = row % n, h = (row / n) % heads, b = row / (n * heads);
  const T* pr = probs + (std::size_t(b) * heads + h) * nnz;
  const T* ds = dscores + (std::size_t(b) * heads + h) * nnz;
  T* dkv = dk + (std::size_t(b) * n + vi) * ld_dkv + std::size_t(h) * dh;
  T* dvv = dv + (std::size_t(b) * n + vi) * ld_dkv + std::size_t(h) * dh;
  for (int c = lane; c < dh; c += 32) {
    T ak = T(0), av = T(0);
    for (std::int32_t j = col_ptr[vi]; j < col_ptr[vi + 1]; ++j) {
      const std::int32_t p = pair[j];
      const std::size_t r = std::size_t(b) * n + pair_row[j];
      ak += scale * ds[p] * q[r * ld + std::size_t(h) * dh + c];
      av += pr[p] * dout[r * ld_o + std::size_t(h) * dh + c];
    }
    dkv[c] = ak;
    dvv[c] = av;
  }
}

// Per-row soft-target cross-entropy in double, as on the CPU; the rows are summed afterwards.
template <class T>
__global__ void softmax_cross_entropy(double* loss, T* dz, const T* z, const T* t, int rows, int cols, T scale) {
  const int row = warp_row();
  if (row >= rows) return;
  const int lane = int(threadIdx.x);
  const std::size_t o = std::size_t(row) * cols;
  T mx = z[o];
  for (int c = lane; c < cols; c += 32) mx = z[o + c] > mx ? z[o + c] : mx;
  mx = warp_max(mx);
  double s = 0;
  for (int c = lane; c < cols; c += 32) s += exp(double(z[o + c] - mx));
  const double lse = log(warp_sum(s)) + double(mx);
  double l = 0, tsum = 0;
  for (int c = lane; c < cols; c += 32) {
    l -= double(t[o + c]) * (double(z[o + c]) - lse);
    tsum += double(t[o + c]);
  }
  l = warp_sum(l);
  tsum = warp_sum(tsum);
  if (dz)
    for (int c = lane; c < cols; c += 32) dz[o + c] = scale * T(exp(double(z[o + c]) - lse) * tsum - double(t[o + c]));
  if (lane == 0) loss[row] = l;
}

// ---- step scalars (whole-array reductions into one double, deterministic) -------------------------
inline constexpr unsigned kReduceBlocks = 1024;  // at most this many partial sums

// The sum of v over the block (blockDim.x a multiple of 32, at most 1024), valid in thread 0.
// Every thread of the block must call it, once per kernel.
template <class V>
__device__ V block_sum(V v) {
  HATCH_STATIC_SHARED(V, warp_sums, [32]);
  v = warp_sum(v);
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int warps = int(blockDim.x + 31) / 32;
  v = int(threadIdx.x) < warps ? warp_sums[threadIdx.x] : V(0);
  return warp == 0 ? warp_sum(v) : v;
}

// One block: *out = (x[0] + ... + x[n-1]) / divisor, in an order fixed by n and the block size.
template <class V>
__global__ void sum_doubles(V* out, const V* x, std::size_t n, V divisor) {
  V s = 0;
  for (std::size_t j = threadIdx.x; j < n; j += blockDim.x) s += x[j];
  s = block_sum(s);
  if (threadIdx.x == 0) *out = s / divisor;
}

// partial[block] = the sum of x^2 (in double) over the block's grid-stride share of x.
template <class T>
__global__ void sum_squares_partial(double* partial, const T* x, std::size_t n) {
  double s = 0;
  for (std::size_t j = global_index(); j < n; j += global_stride()) s += double(x[j]) * double(x[j]);
  s = block_sum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// Row kernel: hit[row] = 1 when the row's largest logit and its target's largest value are in
// the same column (the first such column on ties, as std::max_element), else 0.
template <class T>
__device__ inline int warp_argmax(const T* row, int cols, int lane) {
  T best = row[0];
  int at = 0;
  for (int c = lane; c < cols; c += 32)
    if (row[c] > best || (c < at && !(row[c] < best))) {
      best = row[c];
      at = c;
    }
  // at is this lane's first column holding its largest value (or column 0, read by every lane).
  for (int o = 16; o > 0; o >>= 1) {
    const T b = __shfl_xor_sync(kFullMask, best, o);
    const int a = __shfl_xor_sync(kFullMask, at, o);
    if (b > best || (!(b < best) && a < at)) {
      best = b;
      at = a;
    }
  }
  return at;
}
template <class T>
__global__ void argmax_matches(double* hit, const T* z, const T* t, int rows, int cols) {
  const int row = warp_row();
  if (row >= rows) return;
  const int lane = int(threadIdx.x);
  const std::size_t o = std::size_t(row) * cols;
  const int zi = warp_argmax(z + o, cols, lane), ti = warp_argmax(t + o, cols, lane);
  if (lane == 0) hit[row] = zi == ti ? 1.0 : 0.0;
}

// Gradient clipping with the norm read on the device: g *= max_norm / (norm + 1e-6) when
// norm = sqrt(*sumsq) > max_norm (the host rule of clip_grad_norm, with the same rounding).
template <class T>
__global__ void clip_to_norm(T* g, std::size_t n, const double* sumsq, double max_norm) {
  const double factor = clip_factor(sqrt(*sumsq), max_norm);  // core/host_device.hpp
  if (factor == 1.0) return;
  const T f = T(factor);
  for (std::size_t j = global_index(); j < n; j += global_stride()) g[j] *= f;
}

// ---- batched GEMM pointers -----------------------------------------------------------------------
// The pointer arrays of cublasSgemmBatched for the two-level (outer x inner) strided layout.
template <class T>
__global__ void batched_pointers(const T** pa, const T** pb, T** pc, const T* a, std::size_t sa_outer,
                                 std::size_t sa_inner, const T* b, std::size_t sb_outer, std::size_t sb_inner,
                                 T* c, std::size_t sc_outer, std::size_t sc_inner, int outer, int inner) {
  const std::size_t total = std::size_t(outer) * inner;
  for (std::size_t j = global_index(); j < total; j += global_stride()) {
    const std::size_t o = j / inner, i = j % inner;
    pa[j] = a + o * sa_outer + i * sa_inner;
    pb[j] = b + o * sb_outer + i * sb_inner;
    pc[j] = c + o * sc_outer + i * sc_inner;
  }
}

}  // namespace hatch::cuda_kernels
