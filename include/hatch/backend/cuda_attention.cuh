#pragma once
// Fused scaled-dot-product self-attention for the Cuda backend: softmax(scale Q K^T) V per
// (example, head) without writing the tokens x tokens probabilities to memory.
//
// Layouts are the attention layer's (layers/attention.hpp): qkv (batch, n, 3, heads, D) rows of
// 3 heads D values, read in place; out and dout (batch, n, heads, D); lse and delta (batch heads, n).
//
//  - forward (FlashAttention's online softmax): a block takes Tile query rows of one (example,
//    head), walks the keys 32 at a time through shared memory, keeps each row's running maximum
//    m, sum l and output in registers, and writes out = O / l and lse = m + log l, the row's
//    log-sum-exp of the scaled scores, which is all the backward needs of the probabilities;
//  - backward: attention_delta writes delta = rowsum(dout * out); a block of the backward kernel
//    takes 64 keys, walks the queries 32 at a time, recomputes P = exp(scale S - lse), forms
//    dS = scale P (dP - delta) with dP = dout V^T, and accumulates dK = dS^T Q and dV = P^T dout
//    in registers. dQ = dS K needs a sum over key blocks: each block writes its part to its own
//    slice of a scratch buffer and attention_dq_sum adds the slices in block order. So the result
//    is the same on every run (no atomics), at the price of (key blocks) x dQ's size in scratch.
//
// Head widths D = 64 and 128 (the ViT presets' is 64; the Cuda backend takes the GEMM path for
// others); Tile = 32 or 64. Work per thread: Tile/16 rows x 4 keys of scores and Tile/16 x D/8
// outputs in the forward; in the backward 1 key x 4 queries of scores and 1 x D/8 of dK and dV
// over 256 threads (tile 32, backward_narrow), or 4 keys x 4 queries and 4 x D/8 over 128
// threads (tile 64, backward_wide, which keeps keys and values transposed too). Small tiles waste less on the last, partial tile (197 tokens: 224 rows computed
// with 32, 256 with 64), large ones reuse each value loaded from shared memory more; which wins
// is measured (bench/cuda_rows). Shared-memory tiles are stored transposed where a thread reads
// consecutive rows at one column, padded by 4 values.
//
// The file compiles without nvcc too (tests/cuda_emulation.hpp runs these kernels on CPU threads
// to test them where no GPU is), so it uses only threadIdx, blockIdx, __syncthreads,
// __shfl_xor_sync, dynamic shared memory through HATCH_DYNAMIC_SHARED, HATCH_ALIGNED_ACCESS (a
// vector access's alignment, which the emulator checks) and hatch::hd maths.
#include <cmath>
#include <cstddef>

#include "hatch/core/host_device.hpp"

#ifndef HATCH_CUDA_EMULATION
#define HATCH_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#define HATCH_ALIGNED_ACCESS(p, bytes) ((void)0)  // as in cuda_kernels.cuh: checked by the emulator only
#endif

namespace hatch::cuda_kernels::attention {

inline constexpr int kPad = 4;
// forward: Tile query rows per block (16 threads' rows of Tile / 16 each), keys 32 at a time,
// 128 threads
inline constexpr int kFwdKeys = 32, kFwdThreads = 128;
// backward: Tile keys per block, queries 32 at a time; tile 32: 256 threads (backward_narrow),
// tile 64: 128 threads (backward_wide)
inline constexpr int kBwdRows = 32, kBwdThreads = 256, kBwdWideThreads = 128;
// the tile sizes the launchers offer (bench/cuda_rows times both; Cuda picks by
// HATCH_CUDA_ATTENTION_TILE, default kDefaultTile)
inline constexpr int kDefaultTile = 32;
template <int Tile>
constexpr bool supported_tile = Tile == 32 || Tile == 64;
// delta: one warp per row, 8 rows per block
inline constexpr int kDeltaThreads = 256;

template <int D>
constexpr bool supported_width = D == 64 || D == 128;

template <class T, int D, int Tile>
constexpr std::size_t forward_shared_bytes() {
  return sizeof(T) * (std::size_t(D) * (Tile + kPad) + std::size_t(D) * (kFwdKeys + kPad) + std::size_t(kFwdKeys) * D +
                      std::size_t(kFwdKeys) * (Tile + kPad));
}
inline int row_blocks(int n, int tile) { return (n + tile - 1) / tile; }  // forward blocks / backward key blocks

// N consecutive values, loaded at once (one 64- or 128-bit load for floats)
template <class T, int N>
struct alignas(N * sizeof(T) < 16 ? N * sizeof(T) : 16) Vec {
  T v[N];
};
template <int N, class T>
__device__ __forceinline__ Vec<T, N> load(const T* p) {
  HATCH_ALIGNED_ACCESS(p, alignof(Vec<T, N>));
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <int N, class T>
__device__ __forceinline__ void store(T* p, const Vec<T, N>& v) {
  HATCH_ALIGNED_ACCESS(p, alignof(Vec<T, N>));
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// The grid of the forward and backward kernels is (batch heads, row blocks): blockIdx.x is the
// (example, head), which may number more than a grid's y dimension allows (65,535), blockIdx.y
// the block of query rows (forward) or keys (backward) of it.
//
// The (example, head) of this block (blockIdx.x = example * heads + head) and where its rows are:
// in a qkv-like tensor (batch, n, 3, heads, D), rows `row` values apart, and in an out-like one
// (batch, n, heads, D), rows `orow` apart.
template <int D>
struct Head {
  int bh, b, h, n;
  std::size_t row, orow;
  __device__ Head(int n_, int heads)
      : bh(int(blockIdx.x)), b(bh / heads), h(bh % heads), n(n_), row(std::size_t(3) * heads * D),
        orow(std::size_t(heads) * D) {}
  // this head's queries (row 0) in qkv; its keys and values follow at + heads D and + 2 heads D
  template <class T>
  __device__ T* in_qkv(T* qkv) const {
    return qkv + std::size_t(b) * n * row + std::size_t(h) * D;
  }
  template <class T>
  __device__ T* in_out(T* out) const {  // this head's row 0 in out
    return out + std::size_t(b) * n * orow + std::size_t(h) * D;
  }
  __device__ std::size_t heads_d() const { return orow; }  // from a head's queries to its keys, keys to values
  // this head's row 0 of queries, keys and values in qkv
  template <class T>
  struct Slots {
    T *q, *k, *v;
  };
  template <class T>
  __device__ Slots<T> slots(T* qkv) const {
    T* q = in_qkv(qkv);
    return {q, q + heads_d(), q + 2 * heads_d()};
  }
  // the backward kernels' part of dQ for this head and this block of keys (blockIdx.y): rows of D
  template <class T>
  __device__ T* dq_part(T* parts) const {
    return parts + (std::size_t(blockIdx.y) * gridDim.x + bh) * n * D;
  }
};

// grid (batch heads, row_blocks(n, Tile)), kFwdThreads threads, forward_shared_bytes<T, D, Tile>() bytes
template <class T, int D, int Tile>
__global__ void forward(T* __restrict__ out, T* __restrict__ lse, const T* __restrict__ qkv, int n, int heads,
                        T scale) {
  static_assert(supported_width<D>, "hatch::cuda_kernels::attention: head width 64 or 128");
  static_assert(supported_tile<Tile>, "hatch::cuda_kernels::attention: tiles of 32 or 64");
  constexpr int BR = Tile, BC = kFwdKeys, RT = Tile / 16, LQ = BR + kPad, LK = BC + kPad, DV = D / 8;
  HATCH_DYNAMIC_SHARED(smem);
  T* Qt = reinterpret_cast<T*>(smem);  // [D][LQ]  queries, transposed
  T* Kt = Qt + D * LQ;                 // [D][LK]  keys, transposed
  T* Vs = Kt + D * LK;                 // [BC][D]  values
  T* Pt = Vs + BC * D;                 // [BC][LQ] probabilities, transposed
  const int t = int(threadIdx.x), ty = t / 8, tx = t % 8;  // rows ty*RT + r, keys tx*4 + j, dims tx*DV + c
  const int q0 = int(blockIdx.y) * BR;
  const Head<D> head(n, heads);
  const std::size_t row = head.row;
  const auto [qb, kb, vb] = head.slots(qkv);
  for (int e = t; e < BR * D; e += kFwdThreads) {
    const int i = e / D, d = e % D;
    Qt[d * LQ + i] = q0 + i < n ? qb[std::size_t(q0 + i) * row + d] : T(0);
  }
  const T kNegInf = -T(INFINITY);
  T m[RT], l[RT], o[RT][DV];
  for (int r = 0; r < RT; ++r) {
    m[r] = kNegInf;
    l[r] = T(0);
    for (int c = 0; c < DV; ++c) o[r][c] = T(0);
  }
  for (int k0 = 0; k0 < n; k0 += BC) {
    __syncthreads();  // the previous tile's readers are done (and the queries are in place)
    for (int e = t; e < BC * D; e += kFwdThreads) {
      const int j = e / D, d = e % D;
      const bool in = k0 + j < n;
      Kt[d * LK + j] = in ? kb[std::size_t(k0 + j) * row + d] : T(0);
      Vs[j * D + d] = in ? vb[std::size_t(k0 + j) * row + d] : T(0);
    }
    __syncthreads();
    T s[RT][4] = {};
    for (int d = 0; d < D; ++d) {
      const Vec<T, RT> a = load<RT>(Qt + d * LQ + ty * RT);
      const Vec<T, 4> c = load<4>(Kt + d * LK + tx * 4);
      for (int r = 0; r < RT; ++r)
        for (int j = 0; j < 4; ++j) s[r][j] += a.v[r] * c.v[j];
    }
    for (int r = 0; r < RT; ++r) {
      T mx = kNegInf;
      for (int j = 0; j < 4; ++j) {
        s[r][j] = k0 + tx * 4 + j < n ? s[r][j] * scale : kNegInf;
        mx = s[r][j] > mx ? s[r][j] : mx;
      }
      for (int w = 1; w < 8; w *= 2) {  // the 8 threads of a row group are 8 consecutive lanes
        const T other = __shfl_xor_sync(0xffffffffu, mx, w);
        mx = other > mx ? other : mx;
      }
      const T m_new = m[r] > mx ? m[r] : mx;  // finite: every tile has a key
      const T alpha = hd::exp(m[r] - m_new);  // 0 on the first tile
      T sum = T(0);
      for (int j = 0; j < 4; ++j) {
        s[r][j] = hd::exp(s[r][j] - m_new);
        sum += s[r][j];
      }
      for (int w = 1; w < 8; w *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, w);
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
      for (int c = 0; c < DV; ++c) o[r][c] *= alpha;
      for (int j = 0; j < 4; ++j) Pt[(tx * 4 + j) * LQ + ty * RT + r] = s[r][j];
    }
    __syncthreads();
    const int keys = n - k0 < BC ? n - k0 : BC;
    for (int j = 0; j < keys; ++j) {
      const Vec<T, RT> p = load<RT>(Pt + j * LQ + ty * RT);
      for (int c4 = 0; c4 < DV; c4 += 4) {
        const Vec<T, 4> v = load<4>(Vs + j * D + tx * DV + c4);
        for (int r = 0; r < RT; ++r)
          for (int c = 0; c < 4; ++c) o[r][c4 + c] += p.v[r] * v.v[c];
      }
    }
  }
  for (int r = 0; r < RT; ++r) {
    const int i = q0 + ty * RT + r;
    if (i >= n) continue;
    T* dst = head.in_out(out) + std::size_t(i) * head.orow + tx * DV;
    for (int c = 0; c < DV; ++c) dst[c] = o[r][c] / l[r];
    if (tx == 0) lse[std::size_t(head.bh) * n + i] = m[r] + hd::log(l[r]);
  }
}

// delta[bh n + i] = sum_d dout[b, i, h, d] out[b, i, h, d]: one warp per row, grid of
// ceil(batch heads n / 8) blocks of kDeltaThreads
template <class T, int D>
__global__ void delta(T* __restrict__ dst, const T* __restrict__ dout, const T* __restrict__ out, int rows, int n,
                      int heads) {
  const int warp = int(blockIdx.x) * (kDeltaThreads / 32) + int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const bool in = warp < rows;
  T sum = T(0);
  if (in) {
    const int bh = warp / n, i = warp % n, b = bh / heads, h = bh % heads;
    const std::size_t at = (std::size_t(b) * n + i) * heads * D + std::size_t(h) * D;
    for (int d = lane; d < D; d += 32) sum += dout[at + d] * out[at + d];
  }
  for (int w = 16; w > 0; w /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, w);
  if (in && lane == 0) dst[warp] = sum;
}

// ---- the backward kernels' common steps ---------------------------------------------------------
// backward_narrow and backward_wide differ in how their threads share the scores; loading a step
// of queries, accumulating dK and dV, this block's part of dQ and the final stores are the same.

// The shared memory of one step of kBwdRows queries against a block of BC keys, carved from `at`
// (values in all): the queries and output gradients by rows (Qs, dOs) and transposed (Qt, dOt),
// the step's probabilities and score gradients by (query, key) (Ps, dSs), and each query's
// log-sum-exp and delta.
template <class T, int D, int BC>
struct QueryStep {
  static constexpr int BR = kBwdRows, LD = D + kPad, LQ = BR + kPad, LB = BC + kPad;
  static constexpr std::size_t values = 2 * std::size_t(D) * LQ + 2 * std::size_t(BR) * LD + 2 * std::size_t(BR) * LB +
                                        2 * std::size_t(BR);
  T *Qt, *dOt, *Qs, *dOs, *Ps, *dSs, *lse, *del;
  __device__ explicit QueryStep(T* at)
      : Qt(at), dOt(Qt + D * LQ), Qs(dOt + D * LQ), dOs(Qs + BR * LD), Ps(dOs + BR * LD), dSs(Ps + BR * LB),
        lse(dSs + BR * LB), del(lse + BR) {}
  // Queries q0 .. q0 + BR of the block's (example, head): rows of its queries qb and output
  // gradient ob, its log-sum-exps and deltas (lse, delta: batch heads rows of n); rows past n are zeros.
  template <int Threads>
  __device__ void load(const Head<D>& head, const T* qb, const T* ob, const T* lse_rows, const T* delta_rows,
                       int q0) {
    const int t = int(threadIdx.x), n = head.n;
    const std::size_t row = head.row, orow = head.orow;
    const T* lse_bh = lse_rows + std::size_t(head.bh) * n;
    const T* delta_bh = delta_rows + std::size_t(head.bh) * n;
    for (int e = t; e < BR * D; e += Threads) {
      const int i = e / D, d = e % D;
      const bool in = q0 + i < n;
      const T q = in ? qb[std::size_t(q0 + i) * row + d] : T(0);
      const T g = in ? ob[std::size_t(q0 + i) * orow + d] : T(0);
      Qt[d * LQ + i] = q;
      Qs[i * LD + d] = q;
      dOt[d * LQ + i] = g;
      dOs[i * LD + d] = g;
    }
    if (t < BR) {
      const bool in = q0 + t < n;
      lse[t] = in ? lse_bh[q0 + t] : T(0);
      del[t] = in ? delta_bh[q0 + t] : T(0);
    }
  }
};

template <class T, int D>
constexpr std::size_t backward_narrow_shared_bytes() {  // keys and values by rows, then a query step
  return sizeof(T) * (2 * std::size_t(32) * (D + kPad) + QueryStep<T, D, 32>::values);
}
template <class T, int D>
constexpr std::size_t backward_wide_shared_bytes() {  // keys and values transposed, keys by rows, then a query step
  return sizeof(T) * (2 * std::size_t(D) * (64 + kPad) + std::size_t(64) * (D + kPad) + QueryStep<T, D, 64>::values);
}

// dV[key] += sum_i P[i][key] dout[i] and dK[key] += sum_i dS[i][key] q[i] over the step's query
// rows, for this thread's K keys from key0 and D/8 dims from d0.
template <class T, int D, int BC, int K>
__device__ __forceinline__ void accumulate_dk_dv(T (&dk)[K][D / 8], T (&dv)[K][D / 8], const QueryStep<T, D, BC>& step,
                                                 int key0, int d0) {
  constexpr int LD = D + kPad, LB = BC + kPad, DV = D / 8;
  for (int i = 0; i < kBwdRows; ++i) {
    const Vec<T, K> p = load<K>(step.Ps + i * LB + key0), g = load<K>(step.dSs + i * LB + key0);
    for (int c4 = 0; c4 < DV; c4 += 4) {
      const Vec<T, 4> o = load<4>(step.dOs + i * LD + d0 + c4), q = load<4>(step.Qs + i * LD + d0 + c4);
      for (int r = 0; r < K; ++r)
        for (int c = 0; c < 4; ++c) {
          dv[r][c4 + c] += p.v[r] * o.v[c];
          dk[r][c4 + c] += g.v[r] * q.v[c];
        }
    }
  }
}

// This block's part of dQ (the sum over its first `keys` keys of dS K) for query rows q0 + r0 and
// q0 + r0 + 1 and C dims from d0, written to part[i][D] (rows past n are skipped).
template <class T, int D, int BC, int C>
__device__ __forceinline__ void write_dq_part(T* part, const QueryStep<T, D, BC>& step, const T* Ks, int keys, int n,
                                              int q0, int r0, int d0) {
  constexpr int LD = D + kPad, LB = BC + kPad;
  T dq[2][C] = {};
  for (int k = 0; k < keys; ++k) {
    const T g0 = step.dSs[r0 * LB + k], g1 = step.dSs[(r0 + 1) * LB + k];
    for (int c4 = 0; c4 < C; c4 += 4) {
      const Vec<T, 4> kv = load<4>(Ks + k * LD + d0 + c4);
      for (int c = 0; c < 4; ++c) {
        dq[0][c4 + c] += g0 * kv.v[c];
        dq[1][c4 + c] += g1 * kv.v[c];
      }
    }
  }
  for (int r = 0; r < 2; ++r) {
    const int i = q0 + r0 + r;
    if (i >= n) continue;
    T* dst = part + std::size_t(i) * D + d0;
    for (int c = 0; c < C; ++c) dst[c] = dq[r][c];
  }
}

// dK and dV of this thread's K keys from key (absolute) into dqkv's key and value slots; kslot is
// the key slot of the example's row 0 for this head (dqkv + b n row + heads D + h D).
template <class T, int D, int K>
__device__ __forceinline__ void store_dk_dv(T* kslot, const T (&dk)[K][D / 8], const T (&dv)[K][D / 8],
                                            std::size_t row, int heads, int key, int n, int d0) {
  for (int r = 0; r < K; ++r) {
    if (key + r >= n) continue;
    T* dst = kslot + std::size_t(key + r) * row + d0;
    for (int c = 0; c < D / 8; ++c) {
      dst[c] = dk[r][c];
      dst[std::size_t(heads) * D + c] = dv[r][c];
    }
  }
}

// Tile 32: grid (batch heads, row_blocks(n, 32)), kBwdThreads threads,
// backward_narrow_shared_bytes<T, D>() bytes. One key and 4 queries of scores per thread.
// Writes dK and dV into dqkv's key and value slots and this block's part of dQ into
// dq_part[(blockIdx.y batch heads + bh) n + i][D].
template <class T, int D>
__global__ void backward_narrow(T* __restrict__ dqkv, T* __restrict__ dq_part, const T* __restrict__ dout,
                                const T* __restrict__ qkv, const T* __restrict__ lse, const T* __restrict__ delta_rows,
                                int n, int heads, T scale) {
  static_assert(supported_width<D>, "hatch::cuda_kernels::attention: head width 64 or 128");
  constexpr int BC = 32, BR = kBwdRows, KT = 1, LD = D + kPad, LQ = BR + kPad, LB = BC + kPad;
  constexpr int DV = D / 8, DQ = D / 16;
  HATCH_DYNAMIC_SHARED(smem);
  T* Ks = reinterpret_cast<T*>(smem);  // [BC][LD] this block's keys
  T* Vs = Ks + BC * LD;                // [BC][LD] and values
  QueryStep<T, D, BC> step(Vs + BC * LD);
  const int t = int(threadIdx.x), ty = t / 8, tx = t % 8;  // key ty; queries tx*4 + c; dims tx*DV + c
  const int qy = t / 16, qx = t % 16;                       // dQ: queries qy*2 + {0,1}, dims qx*DQ + c
  const int k0 = int(blockIdx.y) * BC;
  const Head<D> head(n, heads);
  const std::size_t row = head.row;
  const auto [qb, kb, vb] = head.slots(qkv);
  const T* ob = head.in_out(dout);
  T* part = head.dq_part(dq_part);
  for (int e = t; e < BC * D; e += kBwdThreads) {
    const int j = e / D, d = e % D;
    const bool in = k0 + j < n;
    Ks[j * LD + d] = in ? kb[std::size_t(k0 + j) * row + d] : T(0);
    Vs[j * LD + d] = in ? vb[std::size_t(k0 + j) * row + d] : T(0);
  }
  T dk[KT][DV] = {}, dv[KT][DV] = {};
  for (int q0 = 0; q0 < n; q0 += BR) {
    __syncthreads();  // the previous step's readers are done (and the keys are in place)
    step.template load<kBwdThreads>(head, qb, ob, lse, delta_rows, q0);
    __syncthreads();
    T s[KT][4] = {}, dp[KT][4] = {};
    for (int d = 0; d < D; ++d) {
      const Vec<T, 4> q = load<4>(step.Qt + d * LQ + tx * 4), g = load<4>(step.dOt + d * LQ + tx * 4);
      for (int r = 0; r < KT; ++r) {
        const T kv = Ks[(ty * KT + r) * LD + d], vv = Vs[(ty * KT + r) * LD + d];
        for (int c = 0; c < 4; ++c) {
          s[r][c] += kv * q.v[c];
          dp[r][c] += vv * g.v[c];
        }
      }
    }
    for (int r = 0; r < KT; ++r)
      for (int c = 0; c < 4; ++c) {
        const int key = ty * KT + r, qi = tx * 4 + c;
        const bool in = k0 + key < n && q0 + qi < n;
        const T p = in ? hd::exp(s[r][c] * scale - step.lse[qi]) : T(0);
        step.Ps[qi * LB + key] = p;
        step.dSs[qi * LB + key] = p * (dp[r][c] - step.del[qi]) * scale;
      }
    __syncthreads();
    accumulate_dk_dv<T, D, BC, KT>(dk, dv, step, ty * KT, tx * DV);
    write_dq_part<T, D, BC, DQ>(part, step, Ks, n - k0 < BC ? n - k0 : BC, n, q0, qy * 2, qx * DQ);
  }
  store_dk_dv<T, D, KT>(head.in_qkv(dqkv) + head.heads_d(), dk, dv, row, heads, k0 + ty * KT, n, tx * DV);
}

// Tile 64: grid (batch heads, row_blocks(n, 64)), kBwdWideThreads threads,
// backward_wide_shared_bytes<T, D>() bytes. The same outputs as backward_narrow, with 4 keys x 4
// queries of scores and 4 keys x D/8 of dK and dV per thread: keys and values are also kept
// transposed, so that every shared-memory read in the inner loops is a 128-bit load feeding 8
// (scores), 10 (dK, dV) or 4 (dQ) multiply-adds.
template <class T, int D>
__global__ void backward_wide(T* __restrict__ dqkv, T* __restrict__ dq_part, const T* __restrict__ dout,
                              const T* __restrict__ qkv, const T* __restrict__ lse, const T* __restrict__ delta_rows,
                              int n, int heads, T scale) {
  static_assert(supported_width<D>, "hatch::cuda_kernels::attention: head width 64 or 128");
  constexpr int BC = 64, BR = kBwdRows, LD = D + kPad, LQ = BR + kPad, LB = BC + kPad, DV = D / 8;
  HATCH_DYNAMIC_SHARED(smem);
  T* Kt = reinterpret_cast<T*>(smem);  // [D][LB]  this block's keys, transposed
  T* Vt = Kt + D * LB;                 // [D][LB]  and values, transposed
  T* Ks = Vt + D * LB;                 // [BC][LD] the keys again, by rows (for dQ)
  QueryStep<T, D, BC> step(Ks + BC * LD);
  // keys ty*4 + r; queries tx*4 + c (scores); dims tx*DV + c (dK, dV, dQ); dQ rows ty*2 + r
  const int t = int(threadIdx.x), ty = t / 8, tx = t % 8;
  const int k0 = int(blockIdx.y) * BC;
  const Head<D> head(n, heads);
  const std::size_t row = head.row;
  const auto [qb, kb, vb] = head.slots(qkv);
  const T* ob = head.in_out(dout);
  T* part = head.dq_part(dq_part);
  for (int e = t; e < BC * D; e += kBwdWideThreads) {
    const int j = e / D, d = e % D;
    const bool in = k0 + j < n;
    const T k = in ? kb[std::size_t(k0 + j) * row + d] : T(0);
    Kt[d * LB + j] = k;
    Ks[j * LD + d] = k;
    Vt[d * LB + j] = in ? vb[std::size_t(k0 + j) * row + d] : T(0);
  }
  T dk[4][DV] = {}, dv[4][DV] = {};
  for (int q0 = 0; q0 < n; q0 += BR) {
    __syncthreads();  // the previous step's readers are done (and the keys are in place)
    step.template load<kBwdWideThreads>(head, qb, ob, lse, delta_rows, q0);
    __syncthreads();
    T s[4][4] = {}, dp[4][4] = {};
    for (int d = 0; d < D; ++d) {
      const Vec<T, 4> k = load<4>(Kt + d * LB + ty * 4), v = load<4>(Vt + d * LB + ty * 4);
      const Vec<T, 4> q = load<4>(step.Qt + d * LQ + tx * 4), g = load<4>(step.dOt + d * LQ + tx * 4);
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) {
          s[r][c] += k.v[r] * q.v[c];
          dp[r][c] += v.v[r] * g.v[c];
        }
    }
    for (int c = 0; c < 4; ++c) {
      const int qi = tx * 4 + c;
      Vec<T, 4> p4, g4;
      for (int r = 0; r < 4; ++r) {
        const bool in = k0 + ty * 4 + r < n && q0 + qi < n;
        p4.v[r] = in ? hd::exp(s[r][c] * scale - step.lse[qi]) : T(0);
        g4.v[r] = p4.v[r] * (dp[r][c] - step.del[qi]) * scale;
      }
      store<4>(step.Ps + qi * LB + ty * 4, p4);
      store<4>(step.dSs + qi * LB + ty * 4, g4);
    }
    __syncthreads();
    accumulate_dk_dv<T, D, BC, 4>(dk, dv, step, ty * 4, tx * DV);
    write_dq_part<T, D, BC, DV>(part, step, Ks, n - k0 < BC ? n - k0 : BC, n, q0, ty * 2, tx * DV);
  }
  store_dk_dv<T, D, 4>(head.in_qkv(dqkv) + head.heads_d(), dk, dv, row, heads, k0 + ty * 4, n, tx * DV);
}

// The backward kernel of each tile, its block size and shared memory: what a launcher needs.
template <class T, int D, int Tile>
struct Backward;
template <class T, int D>
struct Backward<T, D, 32> {
  static constexpr auto kernel() { return &backward_narrow<T, D>; }
  static constexpr int threads = kBwdThreads;
  static constexpr std::size_t shared_bytes = backward_narrow_shared_bytes<T, D>();
};
template <class T, int D>
struct Backward<T, D, 64> {
  static constexpr auto kernel() { return &backward_wide<T, D>; }
  static constexpr int threads = kBwdWideThreads;
  static constexpr std::size_t shared_bytes = backward_wide_shared_bytes<T, D>();
};

// dqkv's query slots = the sum of the key blocks' parts, in block order: one thread per value,
// grid of ceil(batch heads n D / 256) blocks of 256
template <class T, int D>
__global__ void dq_sum(T* __restrict__ dqkv, const T* __restrict__ dq_part, int blocks, int bhs, int n, int heads) {
  const std::size_t e = std::size_t(blockIdx.x) * 256 + threadIdx.x, per = std::size_t(bhs) * n * D;
  if (e >= per) return;
  T sum = dq_part[e];
  for (int k = 1; k < blocks; ++k) sum += dq_part[std::size_t(k) * per + e];
  const std::size_t rowi = e / D;
  const int d = int(e % D), i = int(rowi % n), bh = int(rowi / n), b = bh / heads, h = bh % heads;
  dqkv[(std::size_t(b) * n + i) * 3 * heads * D + std::size_t(h) * D + d] = sum;
}

}  // namespace hatch::cuda_kernels::attention
