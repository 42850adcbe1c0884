#pragma once
// Runs a CUDA kernel's source on the CPU, for testing its indexing and synchronisation on a
// machine without a GPU. Blocks run one after another, each with one std::thread per CUDA
// thread (warps are 32 consecutive linear thread indices, x fastest, as on the device):
// __syncthreads() is a barrier over the block's threads and __syncwarp() over the warp's;
// __shfl_xor_sync is a warp barrier around an exchange buffer; a thread that returns drops out
// of both barriers (as exited threads do on the device). Static __shared__ variables are
// function-local statics (one per kernel instantiation, reused by the next block, as
// uninitialised as the device's), dynamic shared memory is one zeroed buffer per block;
// atomicAdd is a std::atomic_ref, __threadfence a sequentially consistent fence.
// It proves a kernel computes the right values (every thread, every block, every tile edge, the
// "last block" logic of a grid-wide sum); it says nothing about speed, nor about concurrency
// between blocks, nor about the device's memory model beyond these barriers.
//
// Kernel headers written against this subset compile here (backend/cuda_attention.cuh,
// backend/cuda_kernels.cuh): include this file first, then the kernel header, and call
// hatch_emulation::launch(kernel, grid, block, shared_bytes, args...).
#ifndef HATCH_CUDA_EMULATION
#define HATCH_CUDA_EMULATION 1
#endif
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

namespace hatch_emulation {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct Block {
  dim3 dim, grid;
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<unsigned char> exchange;  // 8 bytes per thread for the shuffles
  std::vector<unsigned char> shared;
};
inline Block* current = nullptr;  // the block being run (blocks run one after another)
inline thread_local dim3 thread_index, block_index;
inline thread_local unsigned thread_linear = 0;

inline void syncthreads() { current->all->arrive_and_wait(); }
inline void syncwarp() { current->warps[thread_linear / 32]->arrive_and_wait(); }

template <class T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "hatch_emulation: shuffles of at most 8 bytes");
  const unsigned t = thread_linear, warp = t / 32, partner = warp * 32 + ((t % 32) ^ unsigned(lane_mask));
  std::memcpy(current->exchange.data() + 8 * t, &v, sizeof(T));
  current->warps[warp]->arrive_and_wait();
  T r;
  std::memcpy(&r, current->exchange.data() + 8 * partner, sizeof(T));
  current->warps[warp]->arrive_and_wait();  // nobody overwrites a slot before its partner read it
  return r;
}

template <class Kernel, class... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, std::size_t shared_bytes, Args... args) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads % 32 != 0) throw std::logic_error("hatch_emulation: blocks of whole warps");
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.dim = block;
        b.grid = grid;
        b.all = std::make_unique<std::barrier<>>(std::ptrdiff_t(threads));
        for (unsigned w = 0; w < threads / 32; ++w) b.warps.push_back(std::make_unique<std::barrier<>>(32));
        b.exchange.assign(8 * std::size_t(threads), 0);
        b.shared.assign(shared_bytes + 16, 0);
        current = &b;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            thread_linear = t;
            thread_index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            block_index = dim3(bx, by, bz);
            kernel(args...);
            // a finished thread no longer holds up its block's or its warp's barriers
            b.warps[t / 32]->arrive_and_drop();
            b.all->arrive_and_drop();
          });
        for (auto& th : pool) th.join();
        current = nullptr;
      }
}

template <class T>
T atomic_add(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}

// the block's dynamic shared memory, 16-byte aligned
inline unsigned char* dynamic_shared() {
  auto p = reinterpret_cast<std::uintptr_t>(current->shared.data());
  return reinterpret_cast<unsigned char*>((p + 15) & ~std::uintptr_t(15));
}

}  // namespace hatch_emulation

// CUDA's vector type, at global scope as there
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __restrict__
#define threadIdx (::hatch_emulation::thread_index)
#define blockIdx (::hatch_emulation::block_index)
#define blockDim (::hatch_emulation::current->dim)
#define gridDim (::hatch_emulation::current->grid)
#define __syncthreads() ::hatch_emulation::syncthreads()
#define __syncwarp() ::hatch_emulation::syncwarp()
#define __shfl_xor_sync(mask, v, lane_mask) ::hatch_emulation::shfl_xor((v), (lane_mask))
#define __threadfence() std::atomic_thread_fence(std::memory_order_seq_cst)
#define __ldcg(p) (*(p))
#define atomicAdd(p, v) ::hatch_emulation::atomic_add((p), (v))

#define HATCH_DYNAMIC_SHARED(name) unsigned char* name = ::hatch_emulation::dynamic_shared()
