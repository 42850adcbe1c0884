#pragma once
// The CUDA runtime, cuBLAS, cuBLASLt and the one Thrust algorithm the Cuda backend uses,
// implemented on the host, so that the whole Cuda backend (backend/cuda.hpp: its allocator,
// stream, cuBLAS and cuBLASLt calls, kernel launches and the kernels themselves, run on CPU
// threads by tests/cuda_emulation.hpp) compiles with g++ and runs on a machine without a GPU.
// The headers beside this one (cuda_runtime.h, cublas_v2.h, cublasLt.h, thrust/...) take the
// real ones' place on the include path of such a build (tests/CMakeLists.txt, hatch_cuda_on_cpu_tests).
//
// What it checks that a GPU would also refuse, so that a fault shows here and not first on a
// lent GPU: launch configurations (block and grid limits, dynamic shared memory above 48 KiB
// without cudaFuncSetAttribute), copies and GEMM operands that leave the device allocation they
// start in, copies whose direction does not match where their pointers live, cuBLAS argument
// rules (leading dimensions), cuBLASLt plans (a bias pointer without a bias epilogue, and the
// reverse), bad device ordinals. TF32 is emulated by rounding GEMM inputs to 10 mantissa bits.
//
// What it cannot show: speed, concurrency between streams or between blocks (everything runs
// in issue order, at once, so a missing synchronisation goes unnoticed), the device's memory
// model, out-of-bounds accesses inside kernels beyond what AddressSanitizer sees.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../cuda_emulation.hpp"

using dim3 = hatch_emulation::dim3;
using std::isfinite;

// ---- runtime types ---------------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorIllegalAddress = 700,
};
using cudaError = cudaError_t;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
enum cudaDeviceAttr { cudaDevAttrMaxThreadsPerBlock = 1, cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct CUstream_st {
  bool non_blocking = false;
};
struct CUevent_st {
  bool timing = true, recorded = false;
  std::chrono::steady_clock::time_point at{};
};
using cudaStream_t = CUstream_st*;
using cudaEvent_t = CUevent_st*;
inline constexpr unsigned cudaStreamDefault = 0, cudaStreamNonBlocking = 1;
inline constexpr unsigned cudaEventDefault = 0, cudaEventDisableTiming = 2;
struct cudaDeviceProp {
  char name[256];
  std::size_t totalGlobalMem, sharedMemPerBlock, sharedMemPerBlockOptin;
  int major, minor, multiProcessorCount, maxThreadsPerBlock, warpSize;
};

namespace hatch_cuda_on_cpu {

// The emulated card: an H200's limits (132 SMs, 227 KiB of opt-in shared memory per block);
// memory is capped well below the host's so that a runaway allocation fails like on a device.
inline constexpr int kSms = 132;
inline constexpr std::size_t kDefaultShared = 48 * 1024, kOptinShared = 227 * 1024;
inline std::size_t memory_limit() {
  const char* v = std::getenv("HATCH_CUDA_ON_CPU_MEMORY_MIB");
  return (v && *v ? std::size_t(std::strtoull(v, nullptr, 10)) : std::size_t(8192)) << 20;
}
inline int device_count() {
  const char* v = std::getenv("HATCH_CUDA_ON_CPU_DEVICES");
  return v && *v ? std::atoi(v) : 1;
}

struct State {
  std::mutex mu;
  std::map<std::uintptr_t, std::size_t> device, pinned;  // base -> bytes
  std::size_t device_bytes = 0;
  std::map<const void*, std::size_t> shared_limit;  // kernel -> cudaFuncSetAttribute value
  std::mutex launch_mu;                             // blocks run one launch at a time
};
inline State& state() {
  static auto* s = new State;
  return *s;
}
inline thread_local cudaError_t last_error = cudaSuccess;
inline thread_local int current_device = 0;

inline cudaError_t fail(cudaError_t e) {
  last_error = e;
  return e;
}

// [p, p + bytes) inside one live allocation of `map`?
inline bool inside(const std::map<std::uintptr_t, std::size_t>& map, const void* p, std::size_t bytes) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  auto it = map.upper_bound(a);
  if (it == map.begin()) return false;
  --it;
  return a >= it->first && a + bytes <= it->first + it->second;
}
inline bool on_device(const void* p, std::size_t bytes) {
  std::lock_guard<std::mutex> lock(state().mu);
  return inside(state().device, p, bytes ? bytes : 1);
}
// A fault the device would report as an illegal address (and the caller's test as a crash).
[[noreturn]] inline void illegal(const std::string& what) {
  throw std::runtime_error("cuda_on_cpu: illegal address: " + what);
}
inline void require_device(const void* p, std::size_t bytes, const char* what) {
  if (bytes && !on_device(p, bytes))
    illegal(std::string(what) + ": " + std::to_string(bytes) + " bytes at " +
            std::to_string(reinterpret_cast<std::uintptr_t>(p)) + " are not inside one device allocation");
}

template <class Kernel, class... Args>
cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, std::size_t shared, cudaStream_t, Args&&... args) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return fail(cudaErrorInvalidConfiguration);
  std::size_t limit = kDefaultShared;
  {
    std::lock_guard<std::mutex> lock(state().mu);
    auto it = state().shared_limit.find(reinterpret_cast<const void*>(kernel));
    if (it != state().shared_limit.end()) limit = it->second;
  }
  if (shared > limit) return fail(cudaErrorInvalidValue);
  std::lock_guard<std::mutex> lock(state().launch_mu);
  hatch_emulation::launch(kernel, grid, block, shared, std::forward<Args>(args)...);
  return cudaSuccess;
}

inline float tf32(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & ~0x1fffu;  // round to 10 mantissa bits
  std::memcpy(&v, &u, 4);
  return v;
}
// Column-major C (m x n, ldc) = alpha op(A) op(B) + beta C; C is not read when beta == 0.
inline void sgemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                  int ldb, float beta, float* c, int ldc, bool round_tf32) {
  const std::size_t ea = ta ? std::size_t(lda) * (m - 1) + k : std::size_t(lda) * (k - 1) + m;
  const std::size_t eb = tb ? std::size_t(ldb) * (k - 1) + n : std::size_t(ldb) * (n - 1) + k;
  if (k > 0) {
    require_device(a, ea * sizeof(float), "GEMM operand A");
    require_device(b, eb * sizeof(float), "GEMM operand B");
  }
  require_device(c, (std::size_t(ldc) * (n - 1) + m) * sizeof(float), "GEMM operand C");
  auto in = [&](float v) { return round_tf32 ? tf32(v) : v; };
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      float s = 0.f;
      for (int p = 0; p < k; ++p) {
        const float x = ta ? a[std::size_t(i) * lda + p] : a[std::size_t(p) * lda + i];
        const float y = tb ? b[std::size_t(p) * ldb + j] : b[std::size_t(j) * ldb + p];
        s = std::fma(in(x), in(y), s);
      }
      float& out = c[std::size_t(j) * ldc + i];
      out = beta == 0.f ? alpha * s : alpha * s + beta * out;
    }
}

}  // namespace hatch_cuda_on_cpu

// ---- runtime API -----------------------------------------------------------------------------------
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
  }
  return "unknown error";
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = hatch_cuda_on_cpu::last_error;
  hatch_cuda_on_cpu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return hatch_cuda_on_cpu::last_error; }

inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = hatch_cuda_on_cpu::device_count();
  return *n > 0 ? cudaSuccess : hatch_cuda_on_cpu::fail(cudaErrorNoDevice);
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = hatch_cuda_on_cpu::current_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= hatch_cuda_on_cpu::device_count()) return hatch_cuda_on_cpu::fail(cudaErrorInvalidDevice);
  hatch_cuda_on_cpu::current_device = d;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (d < 0 || d >= hatch_cuda_on_cpu::device_count()) return hatch_cuda_on_cpu::fail(cudaErrorInvalidDevice);
  *p = {};
  std::snprintf(p->name, sizeof p->name, "hatch cuda_on_cpu (the CUDA API emulated on CPU threads)");
  p->totalGlobalMem = hatch_cuda_on_cpu::memory_limit();
  p->sharedMemPerBlock = hatch_cuda_on_cpu::kDefaultShared;
  p->sharedMemPerBlockOptin = hatch_cuda_on_cpu::kOptinShared;
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = hatch_cuda_on_cpu::kSms;
  p->maxThreadsPerBlock = 1024;
  p->warpSize = 32;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int d) {
  if (d < 0 || d >= hatch_cuda_on_cpu::device_count()) return hatch_cuda_on_cpu::fail(cudaErrorInvalidDevice);
  if (attr == cudaDevAttrMultiProcessorCount) *v = hatch_cuda_on_cpu::kSms;
  else if (attr == cudaDevAttrMaxThreadsPerBlock) *v = 1024;
  else return hatch_cuda_on_cpu::fail(cudaErrorInvalidValue);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

inline cudaError_t cudaMalloc(void** p, std::size_t bytes) {
  auto& s = hatch_cuda_on_cpu::state();
  std::lock_guard<std::mutex> lock(s.mu);
  *p = nullptr;
  if (bytes == 0) return cudaSuccess;
  if (s.device_bytes + bytes > hatch_cuda_on_cpu::memory_limit())
    return hatch_cuda_on_cpu::fail(cudaErrorMemoryAllocation);
  // exactly `bytes`, so that AddressSanitizer sees an access past the end of the allocation
  void* q = ::operator new(bytes, std::align_val_t(256), std::nothrow);
  if (!q) return hatch_cuda_on_cpu::fail(cudaErrorMemoryAllocation);
  s.device[reinterpret_cast<std::uintptr_t>(q)] = bytes;
  s.device_bytes += bytes;
  *p = q;
  return cudaSuccess;
}
template <class T>
cudaError_t cudaMalloc(T** p, std::size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
inline cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  auto& s = hatch_cuda_on_cpu::state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.device.find(reinterpret_cast<std::uintptr_t>(p));
  if (it == s.device.end()) return hatch_cuda_on_cpu::fail(cudaErrorInvalidValue);
  s.device_bytes -= it->second;
  s.device.erase(it);
  ::operator delete(p, std::align_val_t(256));
  return cudaSuccess;
}
inline cudaError_t cudaMallocHost(void** p, std::size_t bytes) {
  auto& s = hatch_cuda_on_cpu::state();
  std::lock_guard<std::mutex> lock(s.mu);
  *p = std::aligned_alloc(256, (std::max<std::size_t>(bytes, 1) + 255) / 256 * 256);
  if (!*p) return hatch_cuda_on_cpu::fail(cudaErrorMemoryAllocation);
  s.pinned[reinterpret_cast<std::uintptr_t>(*p)] = bytes;
  return cudaSuccess;
}
template <class T>
cudaError_t cudaMallocHost(T** p, std::size_t bytes) {
  return cudaMallocHost(reinterpret_cast<void**>(p), bytes);
}
inline cudaError_t cudaFreeHost(void* p) {
  if (!p) return cudaSuccess;
  auto& s = hatch_cuda_on_cpu::state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.pinned.find(reinterpret_cast<std::uintptr_t>(p));
  if (it == s.pinned.end()) return hatch_cuda_on_cpu::fail(cudaErrorInvalidValue);
  s.pinned.erase(it);
  std::free(p);
  return cudaSuccess;
}

inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  using hatch_cuda_on_cpu::on_device;
  if (bytes == 0) return cudaSuccess;
  const bool dst_dev = on_device(dst, bytes), src_dev = on_device(src, bytes);
  const bool want_dst = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool want_src = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (kind != cudaMemcpyDefault) {
    if (want_dst && !dst_dev) hatch_cuda_on_cpu::illegal("cudaMemcpy: the destination is not device memory of that size");
    if (want_src && !src_dev) hatch_cuda_on_cpu::illegal("cudaMemcpy: the source is not device memory of that size");
    if (!want_dst && dst_dev) return hatch_cuda_on_cpu::fail(cudaErrorInvalidValue);
    if (!want_src && src_dev) return hatch_cuda_on_cpu::fail(cudaErrorInvalidValue);
  }
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind,
                                   cudaStream_t = nullptr) {
  return cudaMemcpy(dst, src, bytes, kind);
}
inline cudaError_t cudaMemset(void* p, int v, std::size_t bytes) {
  hatch_cuda_on_cpu::require_device(p, bytes, "cudaMemset");
  std::memset(p, v, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, std::size_t bytes, cudaStream_t = nullptr) {
  return cudaMemset(p, v, bytes);
}

inline cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = new CUstream_st;
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  *s = new CUstream_st{(flags & cudaStreamNonBlocking) != 0};
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete s;
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new CUevent_st;
  return cudaSuccess;
}
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
  *e = new CUevent_st;
  (*e)->timing = (flags & cudaEventDisableTiming) == 0;
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = nullptr) {
  if (!e) return hatch_cuda_on_cpu::fail(cudaErrorInvalidResourceHandle);
  e->recorded = true;
  e->at = std::chrono::steady_clock::now();
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  return e ? cudaSuccess : hatch_cuda_on_cpu::fail(cudaErrorInvalidResourceHandle);
}
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  if (!a || !b || !a->timing || !b->timing || !a->recorded || !b->recorded)
    return hatch_cuda_on_cpu::fail(cudaErrorInvalidResourceHandle);
  *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
  return cudaSuccess;
}

template <class Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      std::size_t(value) > hatch_cuda_on_cpu::kOptinShared)
    return hatch_cuda_on_cpu::fail(cudaErrorInvalidValue);
  auto& s = hatch_cuda_on_cpu::state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.shared_limit[reinterpret_cast<const void*>(kernel)] = std::size_t(value);
  return cudaSuccess;
}
template <class Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int block_size, std::size_t) {
  if (block_size <= 0 || block_size > 1024) return hatch_cuda_on_cpu::fail(cudaErrorInvalidValue);
  *blocks = std::max(1, std::min(32, 2048 / block_size));
  return cudaSuccess;
}

// ---- the library-type enum cuBLAS and cuBLASLt take ------------------------------------------------
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_64F = 1 };
using cudaDataType = cudaDataType_t;
