#pragma once
// Runs a CUDA kernel's source on the CPU, for testing its indexing and synchronisation on a
// machine without a GPU. Each block runs on its own, one std::thread per CUDA thread:
// __syncthreads() is a barrier over the block's threads, __shfl_xor_sync a barrier over the
// warp's 32 threads around an exchange buffer, dynamic shared memory one zeroed buffer per block.
// It proves a kernel computes the right values (every thread, every block, every tile edge); it
// says nothing about speed, and nothing about the device's memory model beyond barriers.
//
// A kernel header opts in by using only what is defined here when HATCH_CUDA_EMULATION is set
// (backend/cuda_attention.cuh does): include this file first, then the kernel header, and call
// hatch_emulation::launch(kernel, grid, block, shared_bytes, args...).
#ifndef HATCH_CUDA_EMULATION
#define HATCH_CUDA_EMULATION 1
#endif
#include <barrier>
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

inline void syncthreads() { current->all->arrive_and_wait(); }

template <class T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "hatch_emulation: shuffles of at most 8 bytes");
  const unsigned t = thread_index.x, warp = t / 32, partner = warp * 32 + ((t % 32) ^ unsigned(lane_mask));
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
  if (block.y != 1 || block.z != 1 || threads % 32 != 0) throw std::logic_error("hatch_emulation: 1-D blocks of whole warps");
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
            thread_index = dim3(t);
            block_index = dim3(bx, by, bz);
            kernel(args...);
          });
        for (auto& th : pool) th.join();
        current = nullptr;
      }
}

// the block's dynamic shared memory, 16-byte aligned
inline unsigned char* dynamic_shared() {
  auto p = reinterpret_cast<std::uintptr_t>(current->shared.data());
  return reinterpret_cast<unsigned char*>((p + 15) & ~std::uintptr_t(15));
}

}  // namespace hatch_emulation

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define threadIdx (::hatch_emulation::thread_index)
#define blockIdx (::hatch_emulation::block_index)
#define blockDim (::hatch_emulation::current->dim)
#define gridDim (::hatch_emulation::current->grid)
#define __syncthreads() ::hatch_emulation::syncthreads()
#define __shfl_xor_sync(mask, v, lane_mask) ::hatch_emulation::shfl_xor((v), (lane_mask))
#define HATCH_DYNAMIC_SHARED(name) unsigned char* name = ::hatch_emulation::dynamic_shared()
