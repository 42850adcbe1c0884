#pragma once
// The Cuda backend policy: cuBLAS for GEMMs, Thrust for whole-array reductions, the kernels of
// cuda_kernels.cuh for everything else. Semantics match backend/cpu.hpp primitive by primitive.
//
// Execution model: all work of a device is issued on one stream, Cuda::stream(): hatch's own
// (created on first use, a blocking stream, so it is also ordered with the legacy default stream
// that NCCL and plain cudaMemcpy calls use) or one the user set (Cuda::set_stream). Kernels,
// cuBLAS and cuBLASLt calls, Thrust and copies are therefore ordered with respect to each other.
// That ordering is what lets the caching allocator hand a block back for reuse as soon as the
// host is done with it, without events. Primitives that return a value to the host (download,
// sum_squares, all_finite, softmax_cross_entropy, read_scalars) wait for the stream and are
// counted (Cuda::host_waits()); the others return as soon as the work is enqueued.
//
// Include <hatch/cuda.hpp> from .cu files; this header never includes Eigen or the Cpu backend.
#if !defined(__CUDACC__) && !defined(HATCH_CUDA_ON_CPU)  // (tests/cuda_on_cpu runs it on the CPU)
#error "hatch/backend/cuda.hpp must be compiled by nvcc: include <hatch/cuda.hpp> from a .cu file"
#endif

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <thrust/functional.h>
#include <thrust/reduce.h>
#include <thrust/system/cuda/execution_policy.h>
#include <thrust/system_error.h>
#include <thrust/transform_reduce.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "hatch/backend/async.hpp"
#include "hatch/backend/concept.hpp"
#include "hatch/backend/cuda_attention.cuh"
#include "hatch/backend/cuda_kernels.cuh"
#include "hatch/backend/fused.hpp"
#include "hatch/backend/host_waits.hpp"
#include "hatch/backend/random.hpp"
#include "hatch/core/error.hpp"

namespace hatch {

// ---- error checking ----------------------------------------------------------------------------
namespace cuda_detail {

[[noreturn]] inline void throw_cuda_error(const char* what, const char* call, const char* file, int line) {
  throw Error(std::string(file) + ":" + std::to_string(line) + ": " + call + " failed: " + what);
}
inline void check_cuda(cudaError_t e, const char* call, const char* file, int line) {
  if (e == cudaSuccess) return;
  // Clear a non-sticky error so that the next, unrelated check does not report it again.
  (void)cudaGetLastError();
  throw_cuda_error((std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")").c_str(), call, file,
                   line);
}
inline void check_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  throw_cuda_error(cublasGetStatusString(s), call, file, line);
}

}  // namespace cuda_detail

// Throw hatch::Error("<file>:<line>: <call> failed: <error name> (<error string>)").
#define HATCH_CUDA_CHECK(call) ::hatch::cuda_detail::check_cuda((call), #call, __FILE__, __LINE__)
#define HATCH_CUBLAS_CHECK(call) ::hatch::cuda_detail::check_cublas((call), #call, __FILE__, __LINE__)
// Launch errors (bad configuration, no device) surface at the launch; faults inside a kernel
// surface at the next synchronising call, which is checked too.
// Kernels run on the backend's stream (cuda_detail::stream()).
#define HATCH_CUDA_LAUNCH(kernel, grid, block, ...) HATCH_CUDA_LAUNCH_SHARED(kernel, grid, block, 0, __VA_ARGS__)
// with `shared` bytes of dynamic shared memory
#if defined(HATCH_CUDA_ON_CPU)
#define HATCH_CUDA_LAUNCH_SHARED(kernel, grid, block, shared, ...)                                          \
  do {                                                                                                      \
    (void)::hatch_cuda_on_cpu::launch(kernel, (grid), (block), (shared), ::hatch::cuda_detail::stream(), __VA_ARGS__); \
    ::hatch::cuda_detail::check_cuda(cudaGetLastError(), "launch of " #kernel, __FILE__, __LINE__);              \
  } while (0)
#else
#define HATCH_CUDA_LAUNCH_SHARED(kernel, grid, block, shared, ...)                             \
  do {                                                                                         \
    kernel<<<(grid), (block), (shared), ::hatch::cuda_detail::stream()>>>(__VA_ARGS__);        \
    ::hatch::cuda_detail::check_cuda(cudaGetLastError(), "launch of " #kernel, __FILE__, __LINE__); \
  } while (0)
#endif

namespace cuda_detail {

// ---- the stream --------------------------------------------------------------------------------
// Per device: the stream set by Cuda::set_stream, else hatch's own, created on first use with
// cudaStreamCreate (a blocking stream: work on the legacy default stream waits for it and it for
// that, so code that uses stream 0 stays ordered with hatch's work). Never destroyed, like the
// cuBLAS handles below.
struct StreamTable {
  std::mutex mu;
  std::vector<cudaStream_t> own, chosen;
  std::vector<bool> user;  // chosen[d] was set by the user
  void fit(int device) {
    if (std::size_t(device) < own.size()) return;
    own.resize(std::size_t(device) + 1, nullptr);
    chosen.resize(std::size_t(device) + 1, nullptr);
    user.resize(std::size_t(device) + 1, false);
  }
};
inline StreamTable& stream_table() {
  static auto* t = new StreamTable;
  return *t;
}
inline cudaStream_t stream() {
  int device = 0;
  HATCH_CUDA_CHECK(cudaGetDevice(&device));
  auto& t = stream_table();
  std::lock_guard<std::mutex> lock(t.mu);
  t.fit(device);
  if (t.user[std::size_t(device)]) return t.chosen[std::size_t(device)];
  cudaStream_t& own = t.own[std::size_t(device)];
  if (!own) HATCH_CUDA_CHECK(cudaStreamCreate(&own));
  return own;
}

// Every time the host waits for the device: host_waits() (backend/host_waits.hpp).
inline void wait_for_stream() {
  ++host_waits();
  HATCH_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

// A switch from the environment: unset or empty is `fallback`, "0" off, "1" on, and anything else
// an error naming the variable (a misspelt "off" or "false" must not turn a switch on).
inline bool env_switch(const char* name, bool fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  if (std::strcmp(v, "0") == 0) return false;
  if (std::strcmp(v, "1") == 0) return true;
  throw Error(std::string(name) + "=" + v + ": expected 0 or 1");
}

// ---- caching allocator -------------------------------------------------------------------------
// cudaMalloc and cudaFree synchronise the device and cost tens of microseconds, so freed blocks
// are kept in free lists keyed by (device, rounded size) and handed out again. Rounding: 512-byte
// steps up to 1 MiB, then eight steps per power of two (at most 12.5% waste). Memory goes back to
// the driver only on release_cache() or when a cudaMalloc fails for lack of memory.
//
// Without caching (HATCH_CUDA_CACHING=0, or Cuda::set_memory_caching(false): PyTorch's
// PYTORCH_NO_CUDA_MEMORY_CACHING=1), every block is cudaMalloc'ed at its tensor's exact size and
// cudaFree'd when the tensor lets it go. Slow (every free waits for the device; those waits are
// not counted in host_waits), but a memory checker then sees what the cache hides from it: an
// access past a tensor's end that stays inside its rounded block, and an access to a tensor
// already freed whose block sits in a free list. bench/gpu-sanitize.sh runs compute-sanitizer's
// memcheck so, and tests/cuda_on_cpu/asan.sh the on-CPU suite under AddressSanitizer.
class DeviceCache {
 public:
  // Never destroyed: tensors with static storage may free their blocks after every other static
  // is gone, and freeing at exit would race the driver's own teardown.
  static DeviceCache& instance() {
    static DeviceCache* cache = new DeviceCache;
    return *cache;
  }

  // The size class of a request of `bytes` (what a cached block of it holds): up to 1 MiB, the
  // request as counted in use (512-byte steps); above, eight steps per power of two.
  static std::size_t round_size(std::size_t bytes) {
    constexpr std::size_t kSmall = std::size_t(1) << 20;
    if (bytes <= kSmall) return counted_size(bytes);
    const std::size_t step = std::bit_floor(bytes) / 8;
    return (bytes + step - 1) / step * step;
  }
  // What a request of `bytes` counts as in use: rounded up to 512 bytes (at least 512), as
  // PyTorch rounds.
  static std::size_t counted_size(std::size_t bytes) {
    constexpr std::size_t kStep = 512;
    return std::max<std::size_t>(1, (bytes + kStep - 1) / kStep) * kStep;
  }

  // Whether freed blocks are kept for reuse (see above). Turning caching off gives the cached
  // blocks back to the driver; blocks in use are freed when their tensors let them go.
  bool caching() const { return caching_.load(); }
  void set_caching(bool on) {
    std::lock_guard<std::mutex> lock(mu_);
    caching_ = on;
    if (!on) release_locked();
  }

  void* allocate(std::size_t bytes) {
    int device = 0;
    HATCH_CUDA_CHECK(cudaGetDevice(&device));
    std::lock_guard<std::mutex> lock(mu_);
    const bool cache = caching_.load();
    const std::size_t size = cache ? round_size(bytes) : std::max<std::size_t>(bytes, 1);
    const std::size_t counted = cache ? counted_size(bytes) : size;
    auto it = cache ? free_.find({device, size}) : free_.end();
    if (it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      cached_bytes_ -= size;
      track(p, Block{device, size, counted});
      in_use_bytes_ += counted;
      note_peaks();
      return p;
    }
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, size);
    if (e == cudaErrorMemoryAllocation) {
      // Blocks of other sizes may be what is missing: give them back and try once more.
      (void)cudaGetLastError();
      release_locked();
      e = cudaMalloc(&p, size);
    }
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      throw Error(std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": cudaMalloc(" + std::to_string(size) +
                  " bytes) failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + "); " +
                  std::to_string(live_bytes_) + " bytes in use by hatch on device " + std::to_string(device));
    }
    ++mallocs_;
    try {
      track(p, Block{device, size, counted});
    } catch (...) {
      (void)cudaFree(p);
      throw;
    }
    live_bytes_ += size;
    in_use_bytes_ += counted;
    note_peaks();
    return p;
  }

  // noexcept: called from destructors. A pointer this cache did not hand out is a caller bug;
  // it is reported and otherwise ignored rather than terminating the program from a destructor.
  void deallocate(void* p) noexcept {
    if (!p) return;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) {
      std::fprintf(stderr, "hatch::Cuda::deallocate: %p was not allocated by hatch::Cuda (ignored)\n", p);
      return;
    }
    auto node = live_.extract(it);
    const Block b = node.mapped();
    in_use_bytes_ -= b.counted;
    if (!caching_.load()) {
      give_back(p, b);
      return;
    }
    try {
      spare_nodes_.push_back(std::move(node));
      free_[{b.device, b.size}].push_back(p);
      cached_bytes_ += b.size;
    } catch (...) {
      // Out of host memory for the free list: the block is leaked, which is harmless.
    }
  }

  void release() {
    std::lock_guard<std::mutex> lock(mu_);
    release_locked();
  }

  std::atomic<std::int64_t>& malloc_count() { return mallocs_; }
  std::size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_bytes_;
  }
  std::size_t live_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return live_bytes_;
  }
  // Bytes handed out (in use), held from the driver (in use or cached), and the largest of each
  // since the start or the last reset_peaks(): PyTorch's memory_allocated, memory_reserved and
  // their max_ forms, counted as PyTorch counts them by default: in use, each request rounded up
  // to 512 bytes (counted_size), not to the size class of its block, which is up to 12.5% more;
  // held, the blocks themselves. Over all devices (PyTorch's are per device).
  struct Stats {
    std::size_t in_use = 0, reserved = 0, peak_in_use = 0, peak_reserved = 0;
  };
  Stats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {in_use_bytes_, live_bytes_, peak_in_use_, peak_reserved_};
  }
  void reset_peaks() {
    std::lock_guard<std::mutex> lock(mu_);
    peak_in_use_ = in_use_bytes_;
    peak_reserved_ = live_bytes_;
  }

 private:
  struct Block {
    int device;
    std::size_t size;     // the block held (its size class when caching)
    std::size_t counted;  // what it counts as in use (counted_size of the request)
  };
  using LiveMap = std::unordered_map<void*, Block>;

  // Records a block in use. Map nodes released by deallocate are recycled, so that in a steady
  // state (the same sizes allocated and freed every step) the cache makes no host allocation either.
  void track(void* p, Block b) {
    if (spare_nodes_.empty()) {
      live_.emplace(p, b);
      return;
    }
    LiveMap::node_type node = std::move(spare_nodes_.back());
    spare_nodes_.pop_back();
    node.key() = p;
    node.mapped() = b;
    live_.insert(std::move(node));
  }
  void note_peaks() {  // after a block is handed out (the only time either count grows)
    peak_in_use_ = std::max(peak_in_use_, in_use_bytes_);
    peak_reserved_ = std::max(peak_reserved_, live_bytes_);
  }
  // cudaFree(p) on the block's own device, the current device restored. Returns the error rather
  // than throwing: give_back runs inside the noexcept deallocate, release_locked throws it.
  static cudaError_t free_on_device(void* p, int device) noexcept {
    int current = 0;
    cudaError_t e = cudaGetDevice(&current);
    if (e == cudaSuccess && current != device) e = cudaSetDevice(device);
    if (e == cudaSuccess) e = cudaFree(p);
    if (current != device) (void)cudaSetDevice(current);
    return e;
  }
  // Frees one block not in use (uncached mode); a failure is reported, like deallocate's.
  void give_back(void* p, Block b) noexcept {
    if (const cudaError_t e = free_on_device(p, b.device); e != cudaSuccess) {
      (void)cudaGetLastError();
      std::fprintf(stderr, "hatch::Cuda::deallocate: cudaFree(%p) failed: %s (%s)\n", p, cudaGetErrorName(e),
                   cudaGetErrorString(e));
      return;  // (the block stays counted as held: nothing says the driver has it back)
    }
    live_bytes_ -= b.size;
  }
  // Frees every cached block; a failure throws (the blocks not yet freed stay cached).
  void release_locked() {
    for (auto& [key, blocks] : free_) {
      while (!blocks.empty()) {
        HATCH_CUDA_CHECK(free_on_device(blocks.back(), key.first));
        blocks.pop_back();
        live_bytes_ -= key.second;
        cached_bytes_ -= key.second;
      }
    }
  }

  std::mutex mu_;
  std::map<std::pair<int, std::size_t>, std::vector<void*>> free_;
  LiveMap live_;
  std::vector<LiveMap::node_type> spare_nodes_;
  std::size_t live_bytes_ = 0;    // held from the driver, in use or cached
  std::size_t cached_bytes_ = 0;  // of which in the free lists
  std::size_t in_use_bytes_ = 0;  // the handed-out blocks' counted sizes (Stats::in_use)
  std::size_t peak_in_use_ = 0, peak_reserved_ = 0;
  std::atomic<std::int64_t> mallocs_{0};
  std::atomic<bool> caching_{env_switch("HATCH_CUDA_CACHING", true)};
};

// Scratch memory for one primitive call, returned to the cache at scope exit. Reuse by the next
// call is safe because everything runs on one stream (see the top of this file).
template <class T>
class Scratch {
 public:
  explicit Scratch(std::size_t n) : p_(static_cast<T*>(DeviceCache::instance().allocate(n * sizeof(T)))) {}
  ~Scratch() { DeviceCache::instance().deallocate(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return p_; }

 private:
  T* p_;
};

// Thrust's temporary storage (reduction partials) comes from the cache too, so a reduction in
// a training step does not cudaMalloc either.
struct ThrustAllocator {
  using value_type = char;
  char* allocate(std::ptrdiff_t n) { return static_cast<char*>(DeviceCache::instance().allocate(std::size_t(n))); }
  void deallocate(char* p, std::size_t) noexcept { DeviceCache::instance().deallocate(p); }
};

// Functors of the Thrust reductions. They are public namespace-scope types because the launch
// stubs nvcc generates for the reduction kernels name them.
struct NotFinite {
  __host__ __device__ std::size_t operator()(float v) const { return isfinite(v) ? 0 : 1; }
};

// Runs a Thrust algorithm, turning its exceptions into hatch::Error like every other check.
template <class F>
auto thrust_call(const char* what, const char* file, int line, F&& f) {
  try {
    return f();
  } catch (const thrust::system_error& e) {
    (void)cudaGetLastError();
    throw_cuda_error(e.what(), what, file, line);
  }
}

// ---- cuBLAS handles ------------------------------------------------------------------------------
// How gemm, gemm_batched and the Linear layers' GEMMs multiply floats (Cuda::set_gemm_precision):
//  - fp32: IEEE float products (cuBLAS's SIMT kernels on the CUDA cores), the default; results
//    match the Cpu backend to float rounding;
//  - tf32: TF32 tensor cores, inputs rounded to 10 mantissa bits (about 1e-3 relative per product);
//  - tf32x3: three TF32 tensor-core GEMMs on split operands, x = hi + lo with hi = x rounded to
//    TF32: A B ~ hi_A hi_B + hi_A lo_B + lo_A hi_B (the dropped lo_A lo_B and the rounding of lo
//    are about 2^-21 of a product), so near-float accuracy at tensor-core speed, for a pass
//    that splits both operands into scratch (twice their size, held for the call).
// The default comes from HATCH_CUDA_GEMM (fp32, tf32 or tf32x3), else fp32.
enum class GemmPrecision { fp32, tf32, tf32x3 };
inline const char* name(GemmPrecision p) {
  return p == GemmPrecision::tf32 ? "tf32" : p == GemmPrecision::tf32x3 ? "tf32x3" : "fp32";
}
// HATCH_CUDA_GEMM: unset or empty is fp32; fp32, tf32 or tf32x3; anything else an error.
inline GemmPrecision env_gemm_precision() {
  const char* v = std::getenv("HATCH_CUDA_GEMM");
  if (!v || !*v) return GemmPrecision::fp32;
  for (const GemmPrecision p : {GemmPrecision::fp32, GemmPrecision::tf32, GemmPrecision::tf32x3})
    if (std::strcmp(v, name(p)) == 0) return p;
  throw Error(std::string("HATCH_CUDA_GEMM=") + v + ": expected fp32, tf32 or tf32x3");
}
inline std::atomic<GemmPrecision>& gemm_precision_setting() {
  static std::atomic<GemmPrecision> p{env_gemm_precision()};
  return p;
}
// Whether GEMMs run on TF32 tensor cores (tf32 and tf32x3).
inline bool tensor_cores() { return gemm_precision_setting().load() != GemmPrecision::fp32; }

// The GEMM workspace of a device: 32 MiB from the cache (NVIDIA's recommendation for Hopper),
// allocated on first use and never freed, shared by the cuBLAS handle and the cuBLASLt calls
// (everything runs on one stream, so they never use it at the same time).
inline constexpr std::size_t kGemmWorkspace = std::size_t(32) << 20;
inline void* gemm_workspace(int device) {
  static std::mutex mu;
  static auto* spaces = new std::vector<void*>;
  std::lock_guard<std::mutex> lock(mu);
  if (std::size_t(device) >= spaces->size()) spaces->resize(std::size_t(device) + 1, nullptr);
  void*& ws = (*spaces)[std::size_t(device)];
  if (!ws) ws = DeviceCache::instance().allocate(kGemmWorkspace);
  return ws;
}

// One handle per device, created on first use and never destroyed (see DeviceCache::instance).
// It gets the device's GEMM workspace, so cuBLAS does not allocate behind the allocator's back,
// and gets it again after every cublasSetStream, which resets a handle's workspace to cuBLAS's
// own pool (cuBLAS documentation, cublasSetStream; memory the cache would neither count nor free).
inline cublasHandle_t cublas_handle() {
  struct Entry {
    cublasHandle_t handle = nullptr;
    bool tf32 = false;
    cudaStream_t stream = nullptr;
  };
  static std::mutex mu;
  static auto* entries = new std::vector<Entry>;
  int device = 0;
  HATCH_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mu);
  if (std::size_t(device) >= entries->size()) entries->resize(std::size_t(device) + 1);
  Entry& e = (*entries)[std::size_t(device)];
  const bool want = tensor_cores();
  if (!e.handle) {
    cublasHandle_t h = nullptr;
    HATCH_CUBLAS_CHECK(cublasCreate(&h));
    HATCH_CUBLAS_CHECK(cublasSetWorkspace(h, gemm_workspace(device), kGemmWorkspace));
    HATCH_CUBLAS_CHECK(cublasSetMathMode(h, want ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    e.handle = h;
    e.tf32 = want;
  } else if (e.tf32 != want) {
    HATCH_CUBLAS_CHECK(cublasSetMathMode(e.handle, want ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    e.tf32 = want;
  }
  if (const cudaStream_t s = stream(); s != e.stream) {  // a new handle is on stream 0 until set
    HATCH_CUBLAS_CHECK(cublasSetStream(e.handle, s));
    HATCH_CUBLAS_CHECK(cublasSetWorkspace(e.handle, gemm_workspace(device), kGemmWorkspace));
    e.stream = s;
  }
  return e.handle;
}

// ---- cuBLASLt: planned (and autotuned) GEMMs, with fused epilogues ---------------------------------
// Every GEMM of `gemm` and of a Linear layer runs through cuBLASLt. A plan (descriptors plus an
// algorithm) is made once per shape, transposes, alignments, TF32 setting and epilogue, and kept:
//  - epilogues: the bias of a Linear layer is added in the forward GEMM (EPILOGUE_BIAS) and its
//    gradient reduced with the weight-gradient GEMM (EPILOGUE_BGRADB), instead of a separate
//    pass over the output each (add_bias_rows, sum_rows). GELU is not fused: cuBLASLt's GELU
//    epilogue is the tanh approximation, and hatch's GELU is the exact one;
//  - autotuning, off by default (HATCH_CUDA_AUTOTUNE=1 turns it on): the heuristic proposes up to
//    kCandidates algorithms; each is timed on the call's own operands (into scratch outputs, so
//    nothing the caller sees is touched) and the fastest is kept. It costs a few milliseconds per
//    shape on the first step, and two runs may then pick different algorithms and differ in the
//    last bits. On an H200 it gained nothing over the heuristic's first choice for ViT-B/16
//    (2026-11-27: 1.00x in fp32 and TF32), hence the default.
// Where cuBLASLt offers no algorithm (a bias not 16-byte aligned, say), the plan remembers it and
// the caller takes its unfused path. HATCH_CUDA_LT=0 turns all of this off (plain cublasSgemm and
// separate bias kernels); bench/gpu.sh times each switch.
enum class Epilogue { none, bias, bias_grad };

inline std::atomic<bool>& lt_flag() {
  static std::atomic<bool> on{env_switch("HATCH_CUDA_LT", true)};
  return on;
}
inline std::atomic<bool>& autotune_flag() {
  static std::atomic<bool> on{env_switch("HATCH_CUDA_AUTOTUNE", false)};
  return on;
}
inline bool lt_enabled() { return lt_flag().load(); }

// A pointer as an integer: ordering and overlap tests between ranges of different allocations.
inline std::uintptr_t address(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }
// The largest power of two (at most 256) that divides the address: cuBLASLt picks algorithms
// for the alignment it is told, and tensors bound into a parameter arena start at any float.
inline int alignment_of(const void* p) {
  const auto a = address(p);
  return a == 0 ? 256 : int(std::min<std::uintptr_t>(256, a & (~a + 1)));
}

class LtPlans {
 public:
  static LtPlans& instance() {
    static auto* plans = new LtPlans;  // never destroyed, like the handles
    return *plans;
  }

  // Column-major D = alpha op(A) op(B) + beta D (m x n, inner k) with the epilogue. For
  // Epilogue::bias, `bias` (length m) is added to every column; for Epilogue::bias_grad the sums
  // of op(B) over k (length n) are written to a buffer of the plans' and `sums(buffer)` is called
  // to take them, while no other thread can issue a call that writes the buffer again.
  // Returns false, having done nothing, when cuBLASLt has no algorithm for the call, or when a
  // plan's first call is refused (the heuristic does not see the bias pointer, for one): the plan
  // is then marked as having none, and the caller takes its unfused path.
  template <class Sums = void (*)(const float*)>
  bool run(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const float* a, int lda,
           const float* b, int ldb, float beta, float* d, int ldd, Epilogue epi, const float* bias = nullptr,
           Sums&& sums = nullptr) {
    int device = 0;
    HATCH_CUDA_CHECK(cudaGetDevice(&device));
    std::lock_guard<std::mutex> lock(mu_);
    void* vector = epi == Epilogue::bias ? const_cast<float*>(bias)
                   : epi == Epilogue::bias_grad ? static_cast<void*>(vector_buffer(device, std::size_t(n)))
                                                : nullptr;
    const Key key{device, int(ta), int(tb), m, n, k, lda, ldb, ldd, int(epi), tensor_cores(),
                  autotune_flag().load(), alignment_of(a), alignment_of(b), alignment_of(d),
                  epi == Epilogue::none || alignment_of(vector) >= 16};
    // A trial reads the real operands (and bias) and writes only scratch. The bias pointer must
    // stay unset for Epilogue::none: cuBLASLt refuses a plan without a bias epilogue that has one.
    Plan& plan = find_or_make(key, [&](const cublasLtMatmulAlgo_t& algo, Plan& p, float* scratch_d, void* scratch_v) {
      void* trial_vector = epi == Epilogue::none ? nullptr : epi == Epilogue::bias ? vector : scratch_v;
      return matmul(device, p, algo, alpha, a, b, beta, scratch_d, trial_vector);
    });
    if (!plan.ok) return false;
    const cublasStatus_t status = matmul(device, plan, plan.algo, alpha, a, b, beta, d, vector);
    if (status != CUBLAS_STATUS_SUCCESS && !plan.proven) {
      plan.ok = false;
      return false;
    }
    HATCH_CUBLAS_CHECK(status);
    plan.proven = true;
    ++calls_[int(epi)];
    if (epi == Epilogue::bias_grad) sums(static_cast<const float*>(vector));
    return true;
  }

  // Calls run through cuBLASLt so far, per epilogue (tests: the fast path is taken).
  std::int64_t calls(Epilogue epi) {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_[int(epi)];
  }

 private:
  static constexpr int kCandidates = 8;
  static constexpr int kTrials = 3;
  struct Key {
    int device, ta, tb, m, n, k, lda, ldb, ldd, epi;
    bool tf32, autotune;
    int align_a, align_b, align_d;
    bool vector_aligned;
    auto operator<=>(const Key&) const = default;
  };
  struct Plan {
    bool ok = false;      // an algorithm was found
    bool proven = false;  // and a call with it succeeded
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  // Shapes vary little in training (a few per layer), but a caller with ever-changing row counts
  // must not grow the cache without bound: past this many plans, all are dropped and remade.
  static constexpr std::size_t kMaxPlans = 512;

  cublasLtHandle_t handle(int device) {
    if (std::size_t(device) >= handles_.size()) handles_.resize(std::size_t(device) + 1, nullptr);
    cublasLtHandle_t& h = handles_[std::size_t(device)];
    if (!h) HATCH_CUBLAS_CHECK(cublasLtCreate(&h));
    return h;
  }
  // The bias-gradient output: one buffer per device, grown (geometrically) and never shrunk, so
  // a steady training step allocates nothing. One stream orders its uses.
  float* vector_buffer(int device, std::size_t n) {
    if (std::size_t(device) >= vectors_.size()) vectors_.resize(std::size_t(device) + 1);
    auto& [p, cap] = vectors_[std::size_t(device)];
    if (cap < n) {
      if (p) DeviceCache::instance().deallocate(p);
      p = nullptr;
      cap = std::max(n, 2 * cap);
      p = static_cast<float*>(DeviceCache::instance().allocate(cap * sizeof(float)));
    }
    return p;
  }
  cublasStatus_t matmul(int device, const Plan& p, const cublasLtMatmulAlgo_t& algo, float alpha, const float* a,
                        const float* b, float beta, float* d, void* vector) {
    if (vector) {
      const cublasStatus_t s =
          cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &vector, sizeof(vector));
      if (s != CUBLAS_STATUS_SUCCESS) return s;
    }
    return cublasLtMatmul(handle(device), p.op, &alpha, a, p.a, b, p.b, &beta, d, p.d, d, p.d, &algo,
                          gemm_workspace(device), kGemmWorkspace, stream());
  }

  template <class Trial>
  Plan& find_or_make(const Key& key, Trial&& trial) {
    auto it = plans_.find(key);
    if (it != plans_.end()) return it->second;
    if (plans_.size() >= kMaxPlans) {
      for (auto& [k, p] : plans_) destroy(p);
      plans_.clear();
    }
    Plan& plan = plans_[key];
    if (!key.vector_aligned) return plan;  // the epilogue reads or writes the vector 16 bytes at a time
    // Column-major layouts: A is m x k (k x m transposed), B is k x n (n x k transposed).
    const bool at = key.ta != int(CUBLAS_OP_N), bt = key.tb != int(CUBLAS_OP_N);
    HATCH_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.op, key.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F,
                                                CUDA_R_32F));
    const auto ta = cublasOperation_t(key.ta), tb = cublasOperation_t(key.tb);
    HATCH_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    HATCH_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    const cublasLtEpilogue_t epi = key.epi == int(Epilogue::bias)        ? CUBLASLT_EPILOGUE_BIAS
                                   : key.epi == int(Epilogue::bias_grad) ? CUBLASLT_EPILOGUE_BGRADB
                                                                         : CUBLASLT_EPILOGUE_DEFAULT;
    HATCH_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
    HATCH_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.a, CUDA_R_32F, at ? key.k : key.m, at ? key.m : key.k, key.lda));
    HATCH_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.b, CUDA_R_32F, bt ? key.n : key.k, bt ? key.k : key.n, key.ldb));
    HATCH_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.d, CUDA_R_32F, key.m, key.n, key.ldd));
    cublasLtMatmulPreference_t pref = nullptr;
    HATCH_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const std::uint64_t ws = kGemmWorkspace;
    const std::uint32_t align[3] = {std::uint32_t(key.align_a), std::uint32_t(key.align_b), std::uint32_t(key.align_d)};
    cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
    int found = 0;
    cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
    const cublasLtMatmulPreferenceAttributes_t align_attr[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4 && st == CUBLAS_STATUS_SUCCESS; ++i)
      st = cublasLtMatmulPreferenceSetAttribute(pref, align_attr[i], &align[std::min(i, 2)], sizeof(align[0]));
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatmulAlgoGetHeuristic(handle(key.device), plan.op, plan.a, plan.b, plan.d, plan.d, pref,
                                          key.autotune ? kCandidates : 1, results, &found);
    (void)cublasLtMatmulPreferenceDestroy(pref);
    std::vector<cublasLtMatmulAlgo_t> usable;
    if (st == CUBLAS_STATUS_SUCCESS)
      for (int i = 0; i < found; ++i)
        if (results[i].state == CUBLAS_STATUS_SUCCESS) usable.push_back(results[i].algo);
    if (usable.empty()) {
      destroy(plan);  // not supported here: the caller falls back, and the plan remembers that
      return plan;
    }
    plan.algo = usable.front();
    plan.ok = true;
    if (usable.size() > 1) plan.algo = fastest(key, plan, usable, trial);
    return plan;
  }

  // Times each candidate kTrials times (after one untimed run) into scratch outputs and returns
  // the fastest; a candidate that fails is skipped. Synchronises: this runs once per plan.
  template <class Trial>
  cublasLtMatmulAlgo_t fastest(const Key& key, Plan& plan, const std::vector<cublasLtMatmulAlgo_t>& algos,
                               Trial& trial) {
    // Scratch outputs of the call's sizes: D is ldd x n (column-major), the epilogue's vector at
    // most max(m, n) long.
    Scratch<float> d(std::size_t(std::max(key.ldd, 1)) * std::size_t(key.n));
    Scratch<float> v(std::size_t(std::max({key.m, key.n, 1})));
    cudaEvent_t start = nullptr, stop = nullptr;
    HATCH_CUDA_CHECK(cudaEventCreate(&start));
    HATCH_CUDA_CHECK(cudaEventCreate(&stop));
    cublasLtMatmulAlgo_t best = algos.front();
    float best_ms = 0;
    bool have = false;
    for (const auto& algo : algos) {
      if (trial(algo, plan, d.get(), v.get()) != CUBLAS_STATUS_SUCCESS) continue;
      HATCH_CUDA_CHECK(cudaEventRecord(start, stream()));
      bool ok = true;
      for (int t = 0; t < kTrials && ok; ++t) ok = trial(algo, plan, d.get(), v.get()) == CUBLAS_STATUS_SUCCESS;
      HATCH_CUDA_CHECK(cudaEventRecord(stop, stream()));
      ++host_waits();
      HATCH_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0;
      HATCH_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      if (ok && (!have || ms < best_ms)) {
        best = algo;
        best_ms = ms;
        have = true;
      }
    }
    (void)cudaEventDestroy(start);
    (void)cudaEventDestroy(stop);
    (void)cudaGetLastError();
    return best;
  }
  static void destroy(Plan& p) {
    if (p.a) (void)cublasLtMatrixLayoutDestroy(p.a);
    if (p.b) (void)cublasLtMatrixLayoutDestroy(p.b);
    if (p.d) (void)cublasLtMatrixLayoutDestroy(p.d);
    if (p.op) (void)cublasLtMatmulDescDestroy(p.op);
    p = Plan{};
  }

  std::mutex mu_;
  std::map<Key, Plan> plans_;
  std::vector<cublasLtHandle_t> handles_;
  std::vector<std::pair<float*, std::size_t>> vectors_;
  std::int64_t calls_[3] = {0, 0, 0};
};

// The row kernels keep a row in registers when it has at most 32 * N columns (cuda_kernels.cuh):
// calls f(std::integral_constant<int, N>) with the smallest N of 4, 8, 16, 32 that holds cols,
// or with N = 0 (the general kernels) for longer rows, or always with HATCH_CUDA_ROW_REGISTERS=0
// in the environment (bench/gpu.sh times both; the results are the same).
inline std::atomic<bool>& row_registers_flag() {
  static std::atomic<bool> on{env_switch("HATCH_CUDA_ROW_REGISTERS", true)};
  return on;
}
template <class F>
void with_row_registers(int cols, F&& f) {
  if (!row_registers_flag().load()) f(std::integral_constant<int, 0>{});
  else if (cols <= 128) f(std::integral_constant<int, 4>{});
  else if (cols <= 256) f(std::integral_constant<int, 8>{});
  else if (cols <= 512) f(std::integral_constant<int, 16>{});
  else if (cols <= cuda_kernels::kMaxRowRegisterCols) f(std::integral_constant<int, 32>{});
  else f(std::integral_constant<int, 0>{});
}

// The 128-bit element kernels apply: n a multiple of 4 and every pointer 16-byte aligned.
inline bool vectorizable(std::size_t n, const void* a, const void* b, const void* c) {
  return n % 4 == 0 && alignment_of(a) >= 16 && alignment_of(b) >= 16 && alignment_of(c) >= 16;
}
// The register row kernels' layout: calls f(N, W) (integral constants) with with_row_registers'
// N and W = 4 (128-bit loads and stores) when cols is a multiple of 4 and every pointer given is
// 16-byte aligned (so is every row), else W = 1. N = 0 (the general kernels) comes with W = 1.
template <class F>
void with_row_layout(int cols, std::initializer_list<const void*> pointers, F&& f) {
  with_row_registers(cols, [&](auto regs) {
    constexpr int N = decltype(regs)::value;
    bool wide = N != 0 && cols % 4 == 0;
    for (const void* p : pointers) wide = wide && alignment_of(p) >= 16;
    if constexpr (N == 0) f(regs, std::integral_constant<int, 1>{});
    else if (wide) f(regs, std::integral_constant<int, 4>{});
    else f(regs, std::integral_constant<int, 1>{});
  });
}

// Launch geometry. Element kernels loop grid-stride, so the grid is capped well below the limit.
inline unsigned element_blocks(std::size_t n) {
  return unsigned(std::min<std::size_t>((n + cuda_kernels::kThreads - 1) / cuda_kernels::kThreads, 1u << 16));
}
inline unsigned row_blocks(int rows) { return unsigned((rows + cuda_kernels::kRowsPerBlock - 1) / cuda_kernels::kRowsPerBlock); }
inline const dim3 kRowBlock{32, cuda_kernels::kRowsPerBlock};
inline const dim3 kColBlock{32, cuda_kernels::kColLanes};
// Column reductions split the rows into chunks of at least 256 and at most 64 chunks.
inline int rows_per_chunk(int rows) { return std::max(256, (rows + 63) / 64); }

// ---- tf32x3 splits (GemmPrecision::tf32x3) -----------------------------------------------------
// A split of the n floats at x: hi = x rounded to TF32 at `hi`, lo = x - hi at hi + lo (both start
// at a multiple of 64 floats, 256 bytes, as cuBLASLt picks algorithms by alignment).
struct SplitView {
  const float* hi = nullptr;
  std::size_t lo = 0;
  explicit operator bool() const { return hi != nullptr; }
  SplitView at(std::size_t offset) const { return {hi + offset, lo}; }  // the split of x + offset
};
inline std::atomic<std::int64_t>& split_launches() {  // split_tf32 launches so far (tests)
  static std::atomic<std::int64_t> n{0};
  return n;
}
inline std::atomic<std::int64_t>& split_floats() {  // the floats they split (bench/train_step)
  static std::atomic<std::int64_t> n{0};
  return n;
}
// Launches the split of x[0, n) into hi[0, n) and lo[0, n): 128-bit loads and stores where n is a
// multiple of 4 and the pointers are 16-byte aligned.
inline void launch_split_tf32(float* hi, float* lo, const float* x, std::size_t n) {
  if (vectorizable(n, hi, lo, x))
    HATCH_CUDA_LAUNCH(cuda_kernels::split_tf32_4<float4>, element_blocks(n / 4), cuda_kernels::kThreads,
                      reinterpret_cast<float4*>(hi), reinterpret_cast<float4*>(lo), reinterpret_cast<const float4*>(x),
                      n / 4);
  else
    HATCH_CUDA_LAUNCH(cuda_kernels::split_tf32<float>, element_blocks(n), cuda_kernels::kThreads, hi, lo, x, n);
  ++split_launches();
  split_floats() += std::int64_t(n);
}
// Splits x[0, n) into new scratch, which `owner` then holds.
inline SplitView split_into(std::unique_ptr<Scratch<float>>& owner, const float* x, std::size_t n) {
  const std::size_t padded = (n + 63) / 64 * 64;
  owner = std::make_unique<Scratch<float>>(2 * padded);
  launch_split_tf32(owner->get(), owner->get() + padded, x, n);
  return {owner->get(), padded};
}
// Whether SplitReuse scopes keep splits (HATCH_CUDA_SPLIT_REUSE, default on; Cuda::set_split_reuse):
// off, every GEMM splits its own operands, as before session 22 (for A/B timing).
inline std::atomic<bool>& split_reuse_flag() {
  static std::atomic<bool> on{env_switch("HATCH_CUDA_SPLIT_REUSE", true)};
  return on;
}

// Splits kept for the GEMMs that follow, while a scope of this type is open on the host thread: a
// Cuda member whose GEMMs read one operand more than once (a Linear's dy in its weight- and
// input-gradient GEMMs; attention's qkv, dout and dscores) opens one, and each range is split once
// instead of once per GEMM. A GEMM finds an operand inside any kept split (an operand is a flat
// range: attention's Q, K and V all lie inside a split of the whole qkv buffer) and its output
// drops every kept split it overlaps. The scope's owner promises that nothing else writes a kept
// range while it is open. The splits are freed (to the cache) when the outermost scope closes;
// inner scopes add to the outermost's.
class SplitReuse {
 public:
  SplitReuse() : owner_(!current() && split_reuse_flag().load()) {
    if (owner_) current() = this;
  }
  ~SplitReuse() {
    if (owner_) current() = nullptr;
  }
  SplitReuse(const SplitReuse&) = delete;
  SplitReuse& operator=(const SplitReuse&) = delete;

  // The open scope's store of splits (the outermost scope), or null.
  static SplitReuse* active() { return current(); }
  // Splits x[0, n) now (under tf32x3, unless a kept split holds it already), for later GEMMs that
  // read parts of it: attention splits its whole qkv buffer.
  void presplit(const float* x, std::size_t n) {
    SplitReuse* const store = active();
    if (store && gemm_precision_setting().load() == GemmPrecision::tf32x3 && n && !store->find(x, n)) store->keep(x, n);
  }
  SplitView find(const float* x, std::size_t n) const {
    for (const Entry& e : entries_)
      if (address(x) >= address(e.x) && address(x + n) <= address(e.x + e.n)) return e.split.at(std::size_t(x - e.x));
    return {};
  }
  SplitView keep(const float* x, std::size_t n) {
    Entry& e = entries_.emplace_back();
    e.x = x, e.n = n;
    e.split = split_into(e.owner, x, n);
    return e.split;
  }
  // A GEMM wrote y[0, n): a kept split of an overlapping range no longer holds what is there.
  void written(const float* y, std::size_t n) {
    std::erase_if(entries_,
                  [&](const Entry& e) { return address(y) < address(e.x + e.n) && address(e.x) < address(y + n); });
  }
  std::size_t kept() const { return entries_.size(); }

 private:
  struct Entry {
    const float* x = nullptr;
    std::size_t n = 0;
    std::unique_ptr<Scratch<float>> owner;
    SplitView split;
  };
  static SplitReuse*& current() {
    thread_local SplitReuse* open = nullptr;
    return open;
  }
  bool owner_;  // the outermost scope, with reuse switched on: the store
  std::vector<Entry> entries_;
};

// One GEMM D = alpha A B + beta D at the gemm precision: issue(a, b, beta, last) issues a GEMM of
// the same shape on the operands given. Once on A and B, or under GemmPrecision::tf32x3 three
// times on their TF32 splits (each operand split as the flat range of `span` floats that it and
// its leading dimension or batch strides cover, so pointers, strides and leading dimensions stay
// valid relative to the copies; overlapping operands, such as attention's queries and keys read
// in place from one qkv buffer, are split once over their union; inside a SplitReuse scope the
// splits are looked up and kept there, and D's range, d_span floats at d, drops those it
// overlaps): lo_A hi_B + beta D, then hi_A lo_B and hi_A hi_B added (the small terms first;
// `last` marks the pass for an epilogue).
template <class Issue>
void gemm_passes(const float* a, std::size_t a_span, const float* b, std::size_t b_span, float beta, const float* d,
                 std::size_t d_span, Issue&& issue) {
  if (gemm_precision_setting().load() != GemmPrecision::tf32x3 || !a_span || !b_span) return issue(a, b, beta, true);
  SplitReuse* const reuse = SplitReuse::active();
  SplitView sa = reuse ? reuse->find(a, a_span) : SplitView{};
  SplitView sb = reuse ? reuse->find(b, b_span) : SplitView{};
  std::unique_ptr<Scratch<float>> own_a, own_b;  // splits of this GEMM alone (no scope open)
  const auto split = [&](std::unique_ptr<Scratch<float>>& owner, const float* x, std::size_t n) {
    return reuse ? reuse->keep(x, n) : split_into(owner, x, n);
  };
  // Overlapping operands (neither kept): split their union once.
  if (!sa && !sb && address(a) < address(b + b_span) && address(b) < address(a + a_span)) {
    const float* const first = std::min(a, b);
    const SplitView u = split(own_a, first, std::size_t(std::max(a + a_span, b + b_span) - first));
    sa = u.at(std::size_t(a - first)), sb = u.at(std::size_t(b - first));
  }
  if (!sa) sa = split(own_a, a, a_span);
  if (!sb) sb = split(own_b, b, b_span);
  issue(sa.hi + sa.lo, sb.hi, beta, false);
  issue(sa.hi, sb.hi + sb.lo, 1.f, false);
  issue(sa.hi, sb.hi, 1.f, true);
  if (reuse && d_span) reuse->written(d, d_span);
}
// The floats a row-major operand covers: op(X) is rows x cols, X stored transposed when t.
inline std::size_t operand_span(bool t, int rows, int cols, int ld) {
  if (rows <= 0 || cols <= 0) return 0;
  return t ? std::size_t(ld) * std::size_t(cols - 1) + std::size_t(rows)
           : std::size_t(ld) * std::size_t(rows - 1) + std::size_t(cols);
}
// Row kernels that also sum across rows (LayerNorm's parameter gradients) run one wave: as many
// blocks of kRowBlock as the device holds at once (multiprocessors x resident blocks of this
// kernel), so every warp takes several rows and there are no more blocks' sums to add than that. Asked once
// per device and kernel (keyed by the kernel itself: the instantiations for each width share one
// type, and each has its own registers and so its own residency). The order of the sums, and so
// the last bits, depend on the shapes and the card, never on the run or on which ran first.
template <class Kernel>
unsigned resident_row_blocks(Kernel kernel) {
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, unsigned> blocks;
  int device = 0;
  HATCH_CUDA_CHECK(cudaGetDevice(&device));
  const std::pair<int, const void*> key{device, reinterpret_cast<const void*>(kernel)};
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = blocks.find(key); it != blocks.end()) return it->second;
  int sms = 0, per_sm = 0;
  HATCH_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  HATCH_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 32 * cuda_kernels::kRowsPerBlock, 0));
  return blocks[key] = unsigned(std::max(1, sms * per_sm));
}

// The chunks' sums of LayerNorm's parameter gradients ([dgamma's chunks][dbeta's chunks], each
// chunk `cols` wide) added into dgamma and dbeta (either may be null): 32 columns a block.
template <class T>
void layer_norm_param_finish(T* dgamma, T* dbeta, const T* partial, int chunks, int cols) {
  HATCH_CUDA_LAUNCH(cuda_kernels::layer_norm_param_finish<T>, unsigned((cols + 31) / 32), kColBlock, dgamma, dbeta,
                    partial, chunks, cols);
}
// LayerNorm backward's two forms (Cuda::layer_norm_backward picks one; bench/cuda_rows and the
// kernel tests call each directly). Either of dgamma, dbeta may be null; they accumulate.
// In one pass over dy and x (rows of at most kMaxRowRegisterCols, cuda_kernels::layer_norm_backward_regs):
// with parameter gradients on `blocks` blocks (0: one wave, resident_row_blocks), each block's
// sums in scratch memory, added by layer_norm_param_finish; without, a warp per row.
template <class T, int W, int N>
void layer_norm_backward_one_kernel(T* dx, T* dgamma, T* dbeta, const T* dy, const T* x, const T* mean,
                                    const T* rstd, const T* gamma, int rows, int cols, unsigned blocks = 0) {
  const auto kernel = cuda_kernels::layer_norm_backward_regs<T, W, N>;
  if (!dgamma && !dbeta) {
    HATCH_CUDA_LAUNCH(kernel, row_blocks(rows), kRowBlock, dx, nullptr, nullptr, nullptr, dy, x, mean, rstd, gamma,
                      rows, cols);
    return;
  }
  if (!blocks) blocks = std::min(row_blocks(rows), resident_row_blocks(kernel));
  Scratch<T> partial(blocks > 1 ? 2 * std::size_t(blocks) * std::size_t(cols) : 0);
  HATCH_CUDA_LAUNCH(kernel, blocks, kRowBlock, dx, dgamma, dbeta, partial.get(), dy, x, mean, rstd, gamma, rows,
                    cols);
  if (blocks > 1) layer_norm_param_finish(dgamma, dbeta, partial.get(), int(blocks), cols);
}
// The parameter gradients alone, by columns (any row length): chunks of rows per block, then
// layer_norm_param_finish adds the chunks. dx, if wanted, comes from layer_norm_backward_dx.
template <class T>
void layer_norm_params_by_columns(T* dgamma, T* dbeta, const T* dy, const T* x, const T* mean, const T* rstd,
                                  int rows, int cols) {
  if (!dgamma && !dbeta) return;
  const int rpc = rows_per_chunk(rows), chunks = (rows + rpc - 1) / rpc;
  const dim3 grid(unsigned((cols + 31) / 32), unsigned(chunks));
  if (chunks == 1) {
    HATCH_CUDA_LAUNCH(cuda_kernels::layer_norm_param_partial<T>, grid, kColBlock, dgamma, dbeta, nullptr, dy, x, mean,
                      rstd, rows, cols, rpc);
    return;
  }
  Scratch<T> partial(2 * std::size_t(chunks) * cols);
  HATCH_CUDA_LAUNCH(cuda_kernels::layer_norm_param_partial<T>, grid, kColBlock, dgamma, dbeta, partial.get(), dy, x,
                    mean, rstd, rows, cols, rpc);
  layer_norm_param_finish(dgamma, dbeta, partial.get(), chunks, cols);
}

// ---- fused attention (kernels in cuda_attention.cuh) -------------------------------------------
// Off by default until timed on a GPU against the GEMM path (bench/gpu.sh times both);
// HATCH_CUDA_FUSED_ATTENTION=1 or Cuda::set_fused_attention(true) turns it on. The tile (query
// rows per forward block, keys per backward block) is 32 or 64: HATCH_CUDA_ATTENTION_TILE=64 or
// Cuda::set_attention_tile. Change either between steps, never between a forward and its
// backward: the forward sizes what it saves, and the backward its scratch, by them.
inline std::atomic<bool>& fused_attention_flag() {
  static std::atomic<bool> on{env_switch("HATCH_CUDA_FUSED_ATTENTION", false)};
  return on;
}
// HATCH_CUDA_ATTENTION_TILE: unset or empty is the default tile; 32 or 64; anything else an error.
inline int env_attention_tile() {
  const char* v = std::getenv("HATCH_CUDA_ATTENTION_TILE");
  if (!v || !*v) return cuda_kernels::attention::kDefaultTile;
  if (std::strcmp(v, "32") == 0) return 32;
  if (std::strcmp(v, "64") == 0) return 64;
  throw Error(std::string("HATCH_CUDA_ATTENTION_TILE=") + v + ": expected 32 or 64");
}
inline std::atomic<int>& attention_tile_setting() {
  static std::atomic<int> tile{env_attention_tile()};
  return tile;
}
inline bool fused_attention_applies(int head_dim) { return fused_attention_flag().load() && head_dim == 64; }

// A kernel asking for more than 48 KiB of dynamic shared memory must say so once per device.
// Once per (device, kernel): the attribute belongs to the kernel, and kernels of one signature
// (the two backward tiles) share this function's instantiation, so the kernel is part of the key.
template <class Kernel>
void allow_shared_bytes(Kernel kernel, std::size_t bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, std::size_t> done;  // -> bytes allowed
  int device = 0;
  HATCH_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mu);
  std::size_t& allowed = done[{device, reinterpret_cast<const void*>(kernel)}];
  if (allowed >= bytes) return;
  HATCH_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  allowed = bytes;
}

// Calls f(std::integral_constant<int, Tile>) with the tile in use.
template <class F>
void with_attention_tile(F&& f) {
  if (attention_tile_setting().load() == 64) f(std::integral_constant<int, 64>{});
  else f(std::integral_constant<int, 32>{});
}

template <class T, int D, int Tile>
void attention_forward_fused(T* out, T* lse, const T* qkv, int batch, int n, int heads, T scale) {
  namespace ka = cuda_kernels::attention;
  constexpr std::size_t bytes = ka::forward_shared_bytes<T, D, Tile>();
  allow_shared_bytes(ka::forward<T, D, Tile>, bytes);
  const dim3 grid(unsigned(batch * heads), unsigned(ka::row_blocks(n, Tile)));  // (example, head) in x: no 65,535 limit
  HATCH_CUDA_LAUNCH_SHARED((ka::forward<T, D, Tile>), grid, ka::kFwdThreads, bytes, out, lse, qkv, n, heads, scale);
}
// scratch: delta (batch heads n), then the key blocks' dQ parts (row_blocks(n, Tile) batch heads n D)
inline std::size_t attention_scratch_values(int batch, int heads, int n, int dh, int tile) {
  const std::size_t rows = std::size_t(batch) * heads * n;
  return rows + std::size_t(cuda_kernels::attention::row_blocks(n, tile)) * rows * dh;
}
template <class T, int D, int Tile>
void attention_backward_fused(T* dqkv, T* scratch, const T* dout, const T* qkv, const T* out, const T* lse, int batch,
                              int n, int heads, T scale) {
  namespace ka = cuda_kernels::attention;
  const int bhs = batch * heads, rows = bhs * n, blocks = ka::row_blocks(n, Tile);
  T* delta = scratch;
  T* part = scratch + std::size_t(rows);
  HATCH_CUDA_LAUNCH((ka::delta<T, D>), unsigned((rows + ka::kDeltaThreads / 32 - 1) / (ka::kDeltaThreads / 32)),
                    ka::kDeltaThreads, delta, dout, out, rows, n, heads);
  using Bwd = ka::Backward<T, D, Tile>;
  allow_shared_bytes(Bwd::kernel(), Bwd::shared_bytes);
  HATCH_CUDA_LAUNCH_SHARED(Bwd::kernel(), dim3(unsigned(bhs), unsigned(blocks)), Bwd::threads, Bwd::shared_bytes, dqkv,
                           part, dout, qkv, lse, delta, n, heads, scale);
  const std::size_t values = std::size_t(rows) * D;
  HATCH_CUDA_LAUNCH((ka::dq_sum<T, D>), unsigned((values + 255) / 256), 256, dqkv, part, blocks, bhs, n, heads);
}

// Row-major C = alpha op(A) op(B) + beta C is column-major C^T = alpha op(B)^T op(A)^T + beta C^T:
// swap the operands and their dimensions, keep the transpose flags.
inline cublasOperation_t op(bool t) { return t ? CUBLAS_OP_T : CUBLAS_OP_N; }

}  // namespace cuda_detail

// ---- the policy --------------------------------------------------------------------------------
struct Cuda {
  using Scalar = float;
  using T = float;
  static constexpr const char* name = "cuda";

  // ---- device and settings -----------------------------------------------------------------------
  // True when a usable device and driver are present; never throws, so tests and programs can
  // decide to skip or fall back to Cpu.
  static bool device_available() noexcept {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    (void)cudaGetLastError();
    return e == cudaSuccess && n > 0;
  }
  static std::string device_name() {
    if (!device_available()) return "no CUDA device";
    int device = 0;
    HATCH_CUDA_CHECK(cudaGetDevice(&device));
    cudaDeviceProp prop{};
    HATCH_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    return prop.name;
  }
  // How gemm, gemm_batched and the Linear layers' GEMMs multiply floats: fp32 (the default,
  // results match the Cpu backend to float rounding), tf32 (TF32 tensor cores: ~10 mantissa bits
  // per product, several times faster on Ampere and later), or tf32x3 (three TF32 GEMMs on split
  // operands: near-float accuracy on the tensor cores); see cuda_detail::GemmPrecision. The
  // default comes from HATCH_CUDA_GEMM.
  using GemmPrecision = cuda_detail::GemmPrecision;
  static void set_gemm_precision(GemmPrecision p) { cuda_detail::gemm_precision_setting() = p; }
  static GemmPrecision gemm_precision() { return cuda_detail::gemm_precision_setting().load(); }
  // set_tf32(true) is set_gemm_precision(tf32), set_tf32(false) fp32.
  static void set_tf32(bool on) { set_gemm_precision(on ? GemmPrecision::tf32 : GemmPrecision::fp32); }
  static bool tf32() { return gemm_precision() == GemmPrecision::tf32; }
  // GEMMs through cuBLASLt plans with fused bias epilogues (on unless HATCH_CUDA_LT=0), and the
  // plans' algorithms autotuned (off unless HATCH_CUDA_AUTOTUNE=1); see cuda_detail::LtPlans.
  static void set_cublaslt(bool on) { cuda_detail::lt_flag() = on; }
  static bool cublaslt() { return cuda_detail::lt_flag().load(); }
  static void set_autotune(bool on) { cuda_detail::autotune_flag() = on; }
  static bool autotune() { return cuda_detail::autotune_flag().load(); }

  // Fused attention kernels for fused::attention_forward/backward (heads of width 64; others and
  // the default take the GEMM path); see cuda_detail::fused_attention_flag.
  static void set_fused_attention(bool on) { cuda_detail::fused_attention_flag() = on; }
  static bool fused_attention() { return cuda_detail::fused_attention_flag().load(); }
  // their tile, 32 or 64 (anything else is refused)
  static void set_attention_tile(int tile) {
    HATCH_CHECK(tile == 32 || tile == 64, "Cuda::set_attention_tile", "expected 32 or 64, got " + std::to_string(tile));
    cuda_detail::attention_tile_setting() = tile;
  }
  static int attention_tile() { return cuda_detail::attention_tile_setting().load(); }

  // ---- the stream ----------------------------------------------------------------------------------
  // Where hatch enqueues its work on the current device (see the top of this file).
  static cudaStream_t stream() { return cuda_detail::stream(); }
  // Runs hatch's work for the current device on `s` from now on (a caller's stream, such as the
  // one PyTorch or another library works on; nullptr is the legacy default stream). The stream
  // in use until now is synchronised first: memory freed by work still queued there must not be
  // handed to work on `s`. reset_stream() returns to hatch's own stream. Not to be called while
  // another host thread issues hatch work on the same device.
  static void set_stream(cudaStream_t s) { choose_stream(true, s); }
  static void reset_stream() { choose_stream(false, nullptr); }
  // Times the host waited for the device so far (stream or device synchronisations, copies to
  // pageable host memory, values returned to the host); fit waits once per training step.
  static std::int64_t host_waits() { return cuda_detail::host_waits().load(); }

  // ---- memory ------------------------------------------------------------------------------------
  // Real cudaMalloc calls (cache misses); a steady-state training step leaves it unchanged.
  static std::atomic<std::int64_t>& allocation_count() { return cuda_detail::DeviceCache::instance().malloc_count(); }
  // Frees every cached (unused) block back to the driver.
  static void release_cache() { cuda_detail::DeviceCache::instance().release(); }
  // Whether freed blocks are cached for reuse (on unless HATCH_CUDA_CACHING=0). Off, every block
  // is its tensor's exact size and freed at once: for memory checkers (compute-sanitizer), not
  // for speed; see cuda_detail::DeviceCache.
  static void set_memory_caching(bool on) { cuda_detail::DeviceCache::instance().set_caching(on); }
  static bool memory_caching() { return cuda_detail::DeviceCache::instance().caching(); }
  static std::size_t cached_bytes() { return cuda_detail::DeviceCache::instance().cached_bytes(); }
  // Device memory through hatch's cache, over all devices: in use, held from the driver, and
  // their peaks since the start or reset_peak_memory() (torch.cuda.max_memory_allocated and
  // max_memory_reserved, which bench/gpu.sh prints beside these).
  using MemoryStats = cuda_detail::DeviceCache::Stats;
  static MemoryStats memory_stats() { return cuda_detail::DeviceCache::instance().stats(); }
  static void reset_peak_memory() { cuda_detail::DeviceCache::instance().reset_peaks(); }

  static T* allocate(std::size_t n) {
    return static_cast<T*>(cuda_detail::DeviceCache::instance().allocate((n ? n : 1) * sizeof(T)));
  }
  static void deallocate(T* p, std::size_t) noexcept { cuda_detail::DeviceCache::instance().deallocate(p); }
  // From any host memory; src may be reused as soon as this returns (it waits for the copy).
  static void upload(T* dst, const T* src, std::size_t n) { upload_bytes(dst, src, n * sizeof(T)); }
  static void download(T* dst, const T* src, std::size_t n) { download_bytes(dst, src, n * sizeof(T)); }
  static void copy(T* dst, const T* src, std::size_t n) {
    if (n && dst != src)
      HATCH_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToDevice, cuda_detail::stream()));
  }
  static void fill(T* y, std::size_t n, T v) {
    if (n) HATCH_CUDA_LAUNCH(cuda_kernels::fill<T>, cuda_detail::element_blocks(n), cuda_kernels::kThreads, y, n, v);
  }
  static void synchronize() {
    ++cuda_detail::host_waits();
    HATCH_CUDA_CHECK(cudaDeviceSynchronize());
  }
  // int32 index buffers (routing tables), from the same cache.
  static std::int32_t* allocate_indices(std::size_t n) {
    return static_cast<std::int32_t*>(cuda_detail::DeviceCache::instance().allocate((n ? n : 1) * sizeof(std::int32_t)));
  }
  static void deallocate_indices(std::int32_t* p, std::size_t) noexcept { cuda_detail::DeviceCache::instance().deallocate(p); }
  static void upload_indices(std::int32_t* dst, const std::int32_t* src, std::size_t n) {
    upload_bytes(dst, src, n * sizeof(std::int32_t));
  }
  static void download_indices(std::int32_t* dst, const std::int32_t* src, std::size_t n) {
    download_bytes(dst, src, n * sizeof(std::int32_t));
  }

  // ---- staging and step scalars (backend/async.hpp): a training step waits once ------------------
  // Page-locked host memory: an upload from it is a DMA that returns at once (upload_async).
  static T* allocate_pinned(std::size_t n) {
    void* p = nullptr;
    HATCH_CUDA_CHECK(cudaMallocHost(&p, (n ? n : 1) * sizeof(T)));
    return static_cast<T*>(p);
  }
  // Waits for the device first: an upload from the buffer may still be queued (a staging buffer
  // grown or dropped right after its upload), and CUDA does not promise that cudaFreeHost waits.
  static void deallocate_pinned(T* p, std::size_t) noexcept {
    if (!p) return;
    ++cuda_detail::host_waits();  // a wait like any other (evaluate keeps its buffers to avoid it)
    (void)cudaDeviceSynchronize();
    (void)cudaFreeHost(p);
  }
  // src must be pinned (allocate_pinned) and must not change until the stream has passed the copy.
  static void upload_async(T* dst, const T* src, std::size_t n) {
    if (n)
      HATCH_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyHostToDevice, cuda_detail::stream()));
  }
  // Doubles in device memory, written by the *_into reductions below and read by the host together.
  static double* allocate_scalars(std::size_t n) {
    return static_cast<double*>(cuda_detail::DeviceCache::instance().allocate((n ? n : 1) * sizeof(double)));
  }
  static void deallocate_scalars(double* p, std::size_t) noexcept { cuda_detail::DeviceCache::instance().deallocate(p); }
  static void zero_scalars(double* p, std::size_t n) {
    if (n) HATCH_CUDA_CHECK(cudaMemsetAsync(p, 0, n * sizeof(double), cuda_detail::stream()));
  }
  static void read_scalars(double* host, const double* p, std::size_t n) { download_bytes(host, p, n * sizeof(double)); }
  // The copy of a step's scalars to pinned host memory, and an event after it: waiting for it
  // waits for that step only, not for the work queued since (fit queues the next step first).
  // The one wait of a training step.
  class ScalarFetch {
   public:
    explicit ScalarFetch(std::size_t n) : n_(n ? n : 1) {
      void* p = nullptr;
      HATCH_CUDA_CHECK(cudaMallocHost(&p, n_ * sizeof(double)));
      host_ = static_cast<double*>(p);
      if (const cudaError_t e = cudaEventCreateWithFlags(&done_, cudaEventDisableTiming); e != cudaSuccess) {
        (void)cudaFreeHost(host_);
        cuda_detail::check_cuda(e, "cudaEventCreateWithFlags(&done_, cudaEventDisableTiming)", __FILE__, __LINE__);
      }
    }
    ~ScalarFetch() {
      (void)cudaEventSynchronize(done_);  // a copy still in flight writes host_
      (void)cudaEventDestroy(done_);
      (void)cudaFreeHost(host_);
    }
    ScalarFetch(const ScalarFetch&) = delete;
    ScalarFetch& operator=(const ScalarFetch&) = delete;
    void start(const double* p) {
      const cudaStream_t s = cuda_detail::stream();
      HATCH_CUDA_CHECK(cudaMemcpyAsync(host_, p, n_ * sizeof(double), cudaMemcpyDeviceToHost, s));
      HATCH_CUDA_CHECK(cudaEventRecord(done_, s));
    }
    const double* wait() {
      ++cuda_detail::host_waits();
      HATCH_CUDA_CHECK(cudaEventSynchronize(done_));
      return host_;
    }

   private:
    std::size_t n_;
    double* host_ = nullptr;
    cudaEvent_t done_ = nullptr;
  };
  // *out = the summed loss / divisor; dz (may be null) = scale * the gradient. Deterministic: per-row
  // losses, then one block adds them in a fixed order.
  static void softmax_cross_entropy_into(double* out, T* dz, const T* z, const T* t, int rows, int cols, T scale,
                                         double divisor) {
    if (rows <= 0 || cols <= 0) return zero_scalars(out, 1);
    cuda_detail::Scratch<double> loss{std::size_t(rows)};
    HATCH_CUDA_LAUNCH(cuda_kernels::softmax_cross_entropy<T>, cuda_detail::row_blocks(rows), cuda_detail::kRowBlock,
                      loss.get(), dz, z, t, rows, cols, scale);
    sum_doubles(out, loss.get(), std::size_t(rows), divisor);
  }
  // *out = the number of rows whose largest logit is at their target's largest value (first on ties).
  static void argmax_matches_into(double* out, const T* z, const T* t, int rows, int cols) {
    if (rows <= 0 || cols <= 0) return zero_scalars(out, 1);
    cuda_detail::Scratch<double> hit{std::size_t(rows)};
    HATCH_CUDA_LAUNCH(cuda_kernels::argmax_matches<T>, cuda_detail::row_blocks(rows), cuda_detail::kRowBlock,
                      hit.get(), z, t, rows, cols);
    sum_doubles(out, hit.get(), std::size_t(rows), 1.0);
  }
  // *out = sum of x^2 in double: per-block partial sums (at most kReduceBlocks), then one block.
  static void sum_squares_into(double* out, const T* x, std::size_t n) {
    if (!n) return zero_scalars(out, 1);
    const unsigned blocks = std::min(cuda_detail::element_blocks(n), cuda_kernels::kReduceBlocks);
    cuda_detail::Scratch<double> partial{blocks};
    HATCH_CUDA_LAUNCH(cuda_kernels::sum_squares_partial<T>, blocks, cuda_kernels::kThreads, partial.get(), x, n);
    sum_doubles(out, partial.get(), blocks, 1.0);
  }
  // g *= max_norm / (norm + 1e-6) where norm = sqrt(*sumsq) > max_norm (clip_grad_norm's rule), read
  // on the device.
  static void clip_to_norm(T* g, std::size_t n, const double* sumsq, double max_norm) {
    if (n && max_norm > 0)
      HATCH_CUDA_LAUNCH(cuda_kernels::clip_to_norm<T>, cuda_detail::element_blocks(n), cuda_kernels::kThreads, g, n,
                        sumsq, max_norm);
  }

  // ---- GEMM --------------------------------------------------------------------------------------
  static void gemm(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta,
                   T* c, int ldc) {
    if (m <= 0 || n <= 0) return;
    // Valid leading dimensions go through a cuBLASLt plan (at the gemm precision); invalid ones
    // to cublasSgemm, which names the bad argument in its error.
    const bool valid = k > 0 && lda >= std::max(1, ta ? m : k) && ldb >= std::max(1, tb ? k : n) && ldc >= std::max(1, n);
    if (!valid) return gemm_once(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, false);
    cuda_detail::gemm_passes(a, cuda_detail::operand_span(ta, m, k, lda), b, cuda_detail::operand_span(tb, k, n, ldb),
                             beta, c, cuda_detail::operand_span(false, m, n, ldc), [&](const T* a_, const T* b_, T beta_, bool) {
                               gemm_once(ta, tb, m, n, k, alpha, a_, lda, b_, ldb, beta_, c, ldc, true);
                             });
  }

  // outer x inner GEMMs; matrix (o, i) of X starts at x + o * sx_outer + i * sx_inner. When the two
  // levels collapse into one stride (one level of size 1, or s_outer == inner * s_inner for A, B
  // and C) this is one strided-batched call. Otherwise (attention reading heads in place from the
  // fused qkv buffer) the matrix pointers are built on the device and cublasSgemmBatched runs all
  // outer * inner GEMMs in one call. (One strided-batched call per head was measured slower on an
  // H200, 2026-11-27: 9% of a ViT-B/16 TF32 step; docs/performance.md.)
  static void gemm_batched(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda,
                           std::size_t sa_outer, std::size_t sa_inner, const T* b, int ldb, std::size_t sb_outer,
                           std::size_t sb_inner, T beta, T* c, int ldc, std::size_t sc_outer,
                           std::size_t sc_inner, int outer, int inner) {
    if (m <= 0 || n <= 0 || outer <= 0 || inner <= 0) return;
    // Under tf32x3 each operand is split over the whole range its matrices cover.
    const auto span = [&](bool t, int rows, int cols, int ld, std::size_t s_outer, std::size_t s_inner) {
      const std::size_t one = cuda_detail::operand_span(t, rows, cols, ld);
      return one ? std::size_t(outer - 1) * s_outer + std::size_t(inner - 1) * s_inner + one : 0;
    };
    cuda_detail::gemm_passes(a, span(ta, m, k, lda, sa_outer, sa_inner), b, span(tb, k, n, ldb, sb_outer, sb_inner),
                             beta, c, span(false, m, n, ldc, sc_outer, sc_inner), [&](const T* a_, const T* b_, T beta_, bool) {
                               gemm_batched_once(ta, tb, m, n, k, alpha, a_, lda, sa_outer, sa_inner, b_, ldb,
                                                 sb_outer, sb_inner, beta_, c, ldc, sc_outer, sc_inner, outer, inner);
                             });
  }

  // ---- fused operations (backend/fused.hpp): cuBLASLt epilogues, else the unfused sequence --------
  static void linear_forward(T* y, const T* x, const T* w, const T* bias, int rows, int in, int out) {
    if (rows <= 0 || out <= 0) return;
    if (!bias || in <= 0 || !cuda_detail::lt_enabled())
      return fused::linear_forward_unfused<Cuda>(y, x, w, bias, rows, in, out);
    // Column-major: y^T (out x rows) = W (stored as in x out, transposed) x^T (in x rows) + bias,
    // the bias added by the (last) GEMM's epilogue, or after it where cuBLASLt has no plan for that.
    cuda_detail::gemm_passes(
        w, std::size_t(in) * std::size_t(out), x, std::size_t(in) * std::size_t(rows), 0.f, y,
        std::size_t(rows) * std::size_t(out), [&](const T* w_, const T* x_, T beta, bool last) {
          if (last && cuda_detail::LtPlans::instance().run(CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, 1.f, w_, in, x_, in,
                                                           beta, y, out, cuda_detail::Epilogue::bias, bias))
            return;
          gemm_once(false, true, rows, out, in, 1.f, x_, in, w_, in, beta, y, out, true);
          if (last) add_bias_rows(y, bias, rows, out);
        });
  }
  // Under tf32x3 the bias gradient is summed in float by sum_rows rather than by the TF32 GEMM's
  // epilogue (whose sums of dy would carry TF32's rounding).
  static void linear_backward_params(T* dw, T* dbias, const T* dy, const T* x, int rows, int in, int out) {
    if (dw && dbias && rows > 0 && in > 0 && out > 0 && cuda_detail::lt_enabled() &&
        gemm_precision() != GemmPrecision::tf32x3) {
      // Column-major: dW^T (in x out) += x^T (in x rows) dy (stored as out x rows, transposed); the
      // epilogue writes the sums of dy over rows to the plans' buffer, then added to dbias.
      if (cuda_detail::LtPlans::instance().run(
              CUBLAS_OP_N, CUBLAS_OP_T, in, out, rows, 1.f, x, in, dy, out, 1.f, dw, in, cuda_detail::Epilogue::bias_grad,
              nullptr, [&](const float* sums) { axpy(dbias, T(1), sums, std::size_t(out)); }))
        return;
    }
    fused::linear_backward_params_unfused<Cuda>(dw, dbias, dy, x, rows, in, out);
  }
  // A Linear layer's whole backward: its parameter gradients and, unless dx is null, its input
  // gradient dx (rows x in) = dy W. Under tf32x3 dy is split once for both GEMMs.
  static void linear_backward(T* dx, T* dw, T* dbias, const T* dy, const T* x, const T* w, int rows, int in, int out) {
    cuda_detail::SplitReuse reuse;
    fused::linear_backward_unfused<Cuda>(dx, dw, dbias, dy, x, w, rows, in, out);
  }
  // split_tf32 launches so far: each a split of one operand range for tf32x3 GEMMs (tests).
  static std::int64_t tf32_split_launches() { return cuda_detail::split_launches().load(); }
  // The floats those launches split (each read once, written twice: hi and lo).
  static std::int64_t tf32_split_floats() { return cuda_detail::split_floats().load(); }
  // Whether one call's GEMMs share the splits of an operand they all read (tf32x3; on by default,
  // HATCH_CUDA_SPLIT_REUSE=0 turns it off for A/B timing). Takes effect at the next call.
  static void set_split_reuse(bool on) { cuda_detail::split_reuse_flag() = on; }
  static bool split_reuse() { return cuda_detail::split_reuse_flag().load(); }
  // Calls that ran fused so far: linear_forward with the bias epilogue, linear_backward_params
  // with the bias-gradient epilogue (tests, and bench/gpu.sh's A/B check).
  static std::int64_t fused_bias_calls() { return cuda_detail::LtPlans::instance().calls(cuda_detail::Epilogue::bias); }
  static std::int64_t fused_bias_grad_calls() {
    return cuda_detail::LtPlans::instance().calls(cuda_detail::Epilogue::bias_grad);
  }
  // Plain GEMMs (gemm) that ran through a cuBLASLt plan.
  static std::int64_t planned_gemm_calls() { return cuda_detail::LtPlans::instance().calls(cuda_detail::Epilogue::none); }

  // ---- elementwise and reductions ----------------------------------------------------------------
  static void axpy(T* y, T a, const T* x, std::size_t n) {
    if (n) HATCH_CUDA_LAUNCH(cuda_kernels::axpy<T>, cuda_detail::element_blocks(n), cuda_kernels::kThreads, y, a, x, n);
  }
  static void add(T* y, const T* a, const T* b, std::size_t n) {
    if (!n) return;
    if (cuda_detail::vectorizable(n, y, a, b))
      HATCH_CUDA_LAUNCH(cuda_kernels::add4<float4>, cuda_detail::element_blocks(n / 4), cuda_kernels::kThreads,
                        reinterpret_cast<float4*>(y), reinterpret_cast<const float4*>(a),
                        reinterpret_cast<const float4*>(b), n / 4);
    else
      HATCH_CUDA_LAUNCH(cuda_kernels::add<T>, cuda_detail::element_blocks(n), cuda_kernels::kThreads, y, a, b, n);
  }
  static void mul(T* y, const T* a, const T* b, std::size_t n) {
    if (n) HATCH_CUDA_LAUNCH(cuda_kernels::mul<T>, cuda_detail::element_blocks(n), cuda_kernels::kThreads, y, a, b, n);
  }
  static void scale(T* y, T a, std::size_t n) {
    if (n) HATCH_CUDA_LAUNCH(cuda_kernels::scale<T>, cuda_detail::element_blocks(n), cuda_kernels::kThreads, y, a, n);
  }
  static void add_bias_rows(T* y, const T* bias, int rows, int cols) {
    const std::size_t total = std::size_t(std::max(rows, 0)) * std::size_t(std::max(cols, 0));
    if (total)
      HATCH_CUDA_LAUNCH(cuda_kernels::add_bias_rows<T>, cuda_detail::element_blocks(total), cuda_kernels::kThreads, y,
                        bias, total, cols);
  }
  static void sum_rows(T* out, const T* x, int rows, int cols, int ld, T beta) {
    if (cols <= 0) return;
    if (rows <= 0) return scale_or_zero(out, std::size_t(cols), beta);
    const int rpc = cuda_detail::rows_per_chunk(rows), chunks = (rows + rpc - 1) / rpc;
    const dim3 grid(unsigned((cols + 31) / 32), unsigned(chunks));
    if (chunks == 1) {
      HATCH_CUDA_LAUNCH(cuda_kernels::sum_rows_partial<T>, grid, cuda_detail::kColBlock, out, nullptr, x, rows, cols,
                        ld, beta, rpc);
      return;
    }
    cuda_detail::Scratch<T> partial(std::size_t(chunks) * cols);
    HATCH_CUDA_LAUNCH(cuda_kernels::sum_rows_partial<T>, grid, cuda_detail::kColBlock, out, partial.get(), x, rows,
                      cols, ld, beta, rpc);
    HATCH_CUDA_LAUNCH(cuda_kernels::sum_rows_finish<T>, cuda_detail::element_blocks(std::size_t(cols)),
                      cuda_kernels::kThreads, out, partial.get(), chunks, cols, beta);
  }
  static void copy_2d(T* dst, int ld_dst, const T* src, int ld_src, int rows, int cols) {
    const std::size_t total = std::size_t(std::max(rows, 0)) * std::size_t(std::max(cols, 0));
    if (total)
      HATCH_CUDA_LAUNCH(cuda_kernels::copy_2d<T>, cuda_detail::element_blocks(total), cuda_kernels::kThreads, dst,
                        ld_dst, src, ld_src, total, cols);
  }
  static void scale_rows(T* y, const T* x, const T* s, int rows, int cols) {
    const std::size_t total = std::size_t(std::max(rows, 0)) * std::size_t(std::max(cols, 0));
    if (total)
      HATCH_CUDA_LAUNCH(cuda_kernels::scale_rows<T>, cuda_detail::element_blocks(total), cuda_kernels::kThreads, y, x,
                        s, total, cols);
  }
  // Squares summed in double, as on the CPU (gradient-norm clipping over millions of values).
  static double sum_squares(const T* x, std::size_t n) {
    if (!n) return 0.0;
    return read_one([&](double* out) { sum_squares_into(out, x, n); });
  }
  static bool all_finite(const T* x, std::size_t n) {
    if (!n) return true;
    cuda_detail::ThrustAllocator alloc;
    ++cuda_detail::host_waits();  // the count comes back to the host
    const std::size_t bad = cuda_detail::thrust_call("thrust::transform_reduce (all_finite)", __FILE__, __LINE__, [&] {
      return thrust::transform_reduce(thrust::cuda::par(alloc).on(cuda_detail::stream()), x, x + n,
                                      cuda_detail::NotFinite{}, std::size_t(0), thrust::plus<std::size_t>());
    });
    return bad == 0;
  }

  // ---- activations, normalisation, softmax -------------------------------------------------------
  static void gelu_forward(T* y, const T* x, std::size_t n) {
    if (!n) return;
    if (cuda_detail::vectorizable(n, y, x, x))
      HATCH_CUDA_LAUNCH(cuda_kernels::gelu_forward4<float4>, cuda_detail::element_blocks(n / 4), cuda_kernels::kThreads,
                        reinterpret_cast<float4*>(y), reinterpret_cast<const float4*>(x), n / 4);
    else
      HATCH_CUDA_LAUNCH(cuda_kernels::gelu_forward<T>, cuda_detail::element_blocks(n), cuda_kernels::kThreads, y, x, n);
  }
  static void gelu_backward(T* dx, const T* dy, const T* x, std::size_t n) {
    if (!n) return;
    if (cuda_detail::vectorizable(n, dx, dy, x))
      HATCH_CUDA_LAUNCH(cuda_kernels::gelu_backward4<float4>, cuda_detail::element_blocks(n / 4), cuda_kernels::kThreads,
                        reinterpret_cast<float4*>(dx), reinterpret_cast<const float4*>(dy),
                        reinterpret_cast<const float4*>(x), n / 4);
    else
      HATCH_CUDA_LAUNCH(cuda_kernels::gelu_backward<T>, cuda_detail::element_blocks(n), cuda_kernels::kThreads, dx,
                        dy, x, n);
  }
  // User-defined element-wise functions (see concept.hpp). F must be a namespace-scope type (a
  // kernel cannot be instantiated with a function-local one) with a HATCH_HD operator().
  template <class F>
  static void map(T* y, const T* x, std::size_t n, F f) {
    if (n)
      HATCH_CUDA_LAUNCH((cuda_kernels::map<T, F>), cuda_detail::element_blocks(n), cuda_kernels::kThreads, y, x, n, f);
  }
  template <class F>
  static void map_binary(T* y, const T* a, const T* b, std::size_t n, F f) {
    if (n)
      HATCH_CUDA_LAUNCH((cuda_kernels::map_binary<T, F>), cuda_detail::element_blocks(n), cuda_kernels::kThreads, y, a,
                        b, n, f);
  }
  static void layer_norm_forward(T* y, T* mean, T* rstd, const T* x, const T* gamma, const T* beta, int rows,
                                 int cols, T eps) {
    if (rows <= 0 || cols <= 0) return;
    cuda_detail::with_row_layout(cols, {y, x, gamma, beta}, [&](auto regs, auto width) {
      constexpr int N = decltype(regs)::value, W = decltype(width)::value;
      if constexpr (N == 0)
        HATCH_CUDA_LAUNCH(cuda_kernels::layer_norm_forward<T>, cuda_detail::row_blocks(rows), cuda_detail::kRowBlock,
                          y, mean, rstd, x, gamma, beta, rows, cols, eps);
      else
        HATCH_CUDA_LAUNCH((cuda_kernels::layer_norm_forward_regs<T, W, N>), cuda_detail::row_blocks(rows),
                          cuda_detail::kRowBlock, y, mean, rstd, x, gamma, beta, rows, cols, eps);
    });
  }
  // dx, dgamma and dbeta may each be null; dgamma and dbeta accumulate. Rows of at most 1,024
  // columns: one kernel for all three (cuda_kernels::layer_norm_backward_regs); longer rows (or
  // HATCH_CUDA_ROW_REGISTERS=0): dx by rows, then the parameter gradients by columns.
  static void layer_norm_backward(T* dx, T* dgamma, T* dbeta, const T* dy, const T* x, const T* mean, const T* rstd,
                                  const T* gamma, int rows, int cols) {
    if (rows <= 0 || cols <= 0 || (!dx && !dgamma && !dbeta)) return;
    cuda_detail::with_row_layout(cols, {dx, dy, x, gamma}, [&](auto regs, auto width) {
      constexpr int N = decltype(regs)::value, W = decltype(width)::value;
      if constexpr (N != 0) {
        cuda_detail::layer_norm_backward_one_kernel<T, W, N>(dx, dgamma, dbeta, dy, x, mean, rstd, gamma, rows, cols);
      } else {
        if (dx)
          HATCH_CUDA_LAUNCH(cuda_kernels::layer_norm_backward_dx<T>, cuda_detail::row_blocks(rows),
                            cuda_detail::kRowBlock, dx, dy, x, mean, rstd, gamma, rows, cols);
        cuda_detail::layer_norm_params_by_columns(dgamma, dbeta, dy, x, mean, rstd, rows, cols);
      }
    });
  }
  // In place allowed (y == x).
  static void softmax_forward(T* y, const T* x, int rows, int cols, T scale) {
    if (rows <= 0 || cols <= 0) return;
    cuda_detail::with_row_layout(cols, {y, x}, [&](auto regs, auto width) {
      constexpr int N = decltype(regs)::value, W = decltype(width)::value;
      if constexpr (N == 0)
        HATCH_CUDA_LAUNCH(cuda_kernels::softmax_forward<T>, cuda_detail::row_blocks(rows), cuda_detail::kRowBlock, y,
                          x, rows, cols, scale);
      else
        HATCH_CUDA_LAUNCH((cuda_kernels::softmax_forward_regs<T, W, N>), cuda_detail::row_blocks(rows),
                          cuda_detail::kRowBlock, y, x, rows, cols, scale);
    });
  }
  // ---- fused attention (backend/fused.hpp's attention_*; cuda_attention.cuh) ----------------------
  // Fused: the forward saves one log-sum-exp per (example, head, row) instead of the n x n
  // probabilities; the backward's scratch is one value per row plus one dQ per block of keys.
  static std::size_t attention_saved_size(int batch, int heads, int n, int dh) {
    const std::size_t rows = std::size_t(batch) * heads * n;
    return cuda_detail::fused_attention_applies(dh) ? rows : rows * n;
  }
  static std::size_t attention_scratch_size(int batch, int heads, int n, int dh) {
    if (!cuda_detail::fused_attention_applies(dh)) return std::size_t(batch) * heads * n * n;
    return cuda_detail::attention_scratch_values(batch, heads, n, dh, cuda_detail::attention_tile_setting().load());
  }
  static void attention_forward(T* out, T* saved, const T* qkv, int batch, int n, int heads, int dh, T scale) {
    if (batch <= 0 || n <= 0) return;
    if (!cuda_detail::fused_attention_applies(dh)) {
      // Under tf32x3 the whole qkv buffer is split once for the queries, keys and values.
      cuda_detail::SplitReuse reuse;
      reuse.presplit(qkv, std::size_t(batch) * n * 3 * heads * dh);
      return fused::attention_forward_unfused<Cuda>(out, saved, qkv, batch, n, heads, dh, scale);
    }
    cuda_detail::with_attention_tile([&](auto tile) {
      cuda_detail::attention_forward_fused<T, 64, decltype(tile)::value>(out, saved, qkv, batch, n, heads, scale);
    });
  }
  static void attention_backward(T* dqkv, T* scratch, const T* dout, const T* qkv, const T* out, const T* saved,
                                 int batch, int n, int heads, int dh, T scale) {
    if (batch <= 0 || n <= 0) return;
    if (!cuda_detail::fused_attention_applies(dh)) {
      // Under tf32x3 qkv, dout and the score gradients are each split once (each is read by two GEMMs;
      // the score gradients are written, by a GEMM and the softmax, before their first read).
      cuda_detail::SplitReuse reuse;
      reuse.presplit(qkv, std::size_t(batch) * n * 3 * heads * dh);
      return fused::attention_backward_unfused<Cuda>(dqkv, scratch, dout, qkv, saved, batch, n, heads, dh, scale);
    }
    cuda_detail::with_attention_tile([&](auto tile) {
      cuda_detail::attention_backward_fused<T, 64, decltype(tile)::value>(dqkv, scratch, dout, qkv, out, saved, batch,
                                                                         n, heads, scale);
    });
  }

  // In place allowed (dx == dy).
  static void softmax_backward(T* dx, const T* dy, const T* y, int rows, int cols, T scale) {
    if (rows <= 0 || cols <= 0) return;
    cuda_detail::with_row_layout(cols, {dx, dy, y}, [&](auto regs, auto width) {
      constexpr int N = decltype(regs)::value, W = decltype(width)::value;
      if constexpr (N == 0)
        HATCH_CUDA_LAUNCH(cuda_kernels::softmax_backward<T>, cuda_detail::row_blocks(rows), cuda_detail::kRowBlock,
                          dx, dy, y, rows, cols, scale);
      else
        HATCH_CUDA_LAUNCH((cuda_kernels::softmax_backward_regs<T, W, N>), cuda_detail::row_blocks(rows),
                          cuda_detail::kRowBlock, dx, dy, y, rows, cols, scale);
    });
  }

  static void bernoulli_mask(T* mask, std::size_t n, T keep_prob, std::uint64_t seed, std::uint64_t offset) {
    if (n)
      HATCH_CUDA_LAUNCH(cuda_kernels::bernoulli_mask<T>, cuda_detail::element_blocks(n), cuda_kernels::kThreads, mask,
                        n, double(keep_prob), T(1) / keep_prob, seed, offset);
  }

  // ---- routing (mixture of experts) ----------------------------------------------------------------
  // Row kernels (cuda_kernels.cuh): one warp per output row, or per (token, slot) pair for
  // gather_dot_rows; no atomics, so the results are deterministic.
  static void gather_rows(T* y, const T* x, const std::int32_t* idx, const T* scale, int n, int cols) {
    if (n <= 0 || cols <= 0) return;
    HATCH_CUDA_LAUNCH(cuda_kernels::gather_rows<T>, cuda_detail::row_blocks(n), cuda_detail::kRowBlock, y, x, idx,
                      scale, n, cols);
  }
  static void combine_rows(T* y, const T* x, const std::int32_t* slots, const T* w, int rows, int k, int cols) {
    if (rows <= 0 || cols <= 0) return;
    HATCH_CUDA_LAUNCH(cuda_kernels::combine_rows<T>, cuda_detail::row_blocks(rows), cuda_detail::kRowBlock, y, x,
                      slots, w, rows, std::max(k, 0), cols);
  }
  static void gather_dot_rows(T* out, const T* a, const T* b, const std::int32_t* slots, int rows, int k, int cols) {
    if (rows <= 0 || k <= 0) return;
    const std::size_t pairs = std::size_t(rows) * std::size_t(k);
    if (cols <= 0) return fill(out, pairs, T(0));  // empty dot products, as on the CPU
    const std::size_t blocks = (pairs + cuda_kernels::kRowsPerBlock - 1) / cuda_kernels::kRowsPerBlock;
    HATCH_CUDA_LAUNCH(cuda_kernels::gather_dot_rows<T>, unsigned(blocks), cuda_detail::kRowBlock, out, a, b, slots,
                      rows, k, cols);
  }

  // ---- sparse attention (NAC): definitions in CpuBackend; one warp per (example, head, row) ----
  static void sparse_attention_forward(T* probs, T* o, int ld_o, const T* q, const T* k, const T* v, int ld,
                                       const std::int32_t* row_ptr, const std::int32_t* col, const T* bias,
                                       int ld_bias, int batch, int n, int heads, int dh, int nnz, T scale) {
    const int rows = batch * heads * n;
    if (rows <= 0 || dh <= 0) return;
    HATCH_CUDA_LAUNCH(cuda_kernels::sparse_attention_forward<T>, cuda_detail::row_blocks(rows), cuda_detail::kRowBlock,
                      probs, o, ld_o, q, k, v, ld, row_ptr, col, bias, ld_bias, batch, n, heads, dh, nnz, scale);
  }
  static void sparse_attention_backward_rows(T* dscores, T* dq, int ld_dq, const T* dout, int ld_o, const T* k,
                                             const T* v, int ld, const T* probs, const std::int32_t* row_ptr,
                                             const std::int32_t* col, int batch, int n, int heads, int dh, int nnz,
                                             T scale) {
    const int rows = batch * heads * n;
    if (rows <= 0 || dh <= 0) return;
    HATCH_CUDA_LAUNCH(cuda_kernels::sparse_attention_backward_rows<T>, cuda_detail::row_blocks(rows),
                      cuda_detail::kRowBlock, dscores, dq, ld_dq, dout, ld_o, k, v, ld, probs, row_ptr, col, batch, n,
                      heads, dh, nnz, scale);
  }
  static void sparse_attention_backward_cols(T* dk, T* dv, int ld_dkv, const T* q, int ld, const T* dout, int ld_o,
                                             const T* probs, const T* dscores, const std::int32_t* col_ptr,
                                             const std::int32_t* pair, const std::int32_t* pair_row, int batch,
                                             int n, int heads, int dh, int nnz, T scale) {
    const int rows = batch * heads * n;
    if (rows <= 0 || dh <= 0) return;
    HATCH_CUDA_LAUNCH(cuda_kernels::sparse_attention_backward_cols<T>, cuda_detail::row_blocks(rows),
                      cuda_detail::kRowBlock, dk, dv, ld_dkv, q, ld, dout, ld_o, probs, dscores, col_ptr, pair,
                      pair_row, batch, n, heads, dh, nnz, scale);
  }

  // ---- patch embedding ---------------------------------------------------------------------------
  static void im2patch(T* patches, const T* img, int batch, int ch, int h, int w, int p) {
    const std::size_t total = std::size_t(std::max(batch, 0)) * (h / p) * (w / p) * ch * p * p;
    if (total)
      HATCH_CUDA_LAUNCH(cuda_kernels::im2patch<T>, cuda_detail::element_blocks(total), cuda_kernels::kThreads, patches,
                        img, batch, ch, h, w, p);
  }
  static void patch2im(T* img, const T* patches, int batch, int ch, int h, int w, int p) {
    const std::size_t total = std::size_t(std::max(batch, 0)) * ch * h * w;
    if (total)
      HATCH_CUDA_LAUNCH(cuda_kernels::patch2im<T>, cuda_detail::element_blocks(total), cuda_kernels::kThreads, img,
                        patches, batch, ch, h, w, p);
  }

  // ---- loss and optimizer ------------------------------------------------------------------------
  // Returns the summed loss (copied to the host, so this waits); dz may be null.
  static double softmax_cross_entropy(T* dz, const T* z, const T* t, int rows, int cols, T scale) {
    if (rows <= 0 || cols <= 0) return 0.0;
    return read_one([&](double* out) { softmax_cross_entropy_into(out, dz, z, t, rows, cols, scale, 1.0); });
  }
  static void adamw_update(T* w, T* m, T* v, const T* g, std::size_t n, T lr, T beta1, T beta2, T eps,
                           T weight_decay, T bias_corr1, T bias_corr2) {
    adamw_update_segments(w, m, v, g, n, n, lr, beta1, beta2, eps, weight_decay, bias_corr1, bias_corr2);
  }
  // fused.hpp: the whole arena in one launch, decay on [0, decay_end) only.
  static void adamw_update_segments(T* w, T* m, T* v, const T* g, std::size_t n, std::size_t decay_end, T lr,
                                    T beta1, T beta2, T eps, T weight_decay, T bias_corr1, T bias_corr2) {
    if (n)
      HATCH_CUDA_LAUNCH(cuda_kernels::adamw_update<T>, cuda_detail::element_blocks(n), cuda_kernels::kThreads, w, m, v,
                        g, n, decay_end, lr, beta1, beta2, eps, weight_decay, bias_corr1, bias_corr2);
  }

 private:
  // One GEMM as the caller asked it (gemm, gemm_passes' passes): through a cuBLASLt plan where
  // `planned` and one exists, else cublasSgemm; either at the precision's TF32 setting.
  static void gemm_once(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb,
                        T beta, T* c, int ldc, bool planned) {
    using cuda_detail::op;
    if (planned && cuda_detail::lt_enabled() &&
        cuda_detail::LtPlans::instance().run(op(tb), op(ta), n, m, k, alpha, b, ldb, a, lda, beta, c, ldc,
                                             cuda_detail::Epilogue::none))
      return;
    HATCH_CUBLAS_CHECK(cublasSgemm(cuda_detail::cublas_handle(), op(tb), op(ta), n, m, k, &alpha, b, ldb, a, lda,
                                   &beta, c, ldc));
  }
  static void gemm_batched_once(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda,
                                std::size_t sa_outer, std::size_t sa_inner, const T* b, int ldb, std::size_t sb_outer,
                                std::size_t sb_inner, T beta, T* c, int ldc, std::size_t sc_outer,
                                std::size_t sc_inner, int outer, int inner) {
    using cuda_detail::op;
    const cublasHandle_t h = cuda_detail::cublas_handle();
    auto strided = [&](std::size_t sa, std::size_t sb, std::size_t sc, int count) {
      HATCH_CUBLAS_CHECK(cublasSgemmStridedBatched(h, op(tb), op(ta), n, m, k, &alpha, b, ldb, (long long)sb, a, lda,
                                                   (long long)sa, &beta, c, ldc, (long long)sc, count));
    };
    if (outer == 1) return strided(sa_inner, sb_inner, sc_inner, inner);
    if (inner == 1) return strided(sa_outer, sb_outer, sc_outer, outer);
    const std::size_t in = std::size_t(inner);
    if (sa_outer == in * sa_inner && sb_outer == in * sb_inner && sc_outer == in * sc_inner)
      return strided(sa_inner, sb_inner, sc_inner, outer * inner);
    const std::size_t total = std::size_t(outer) * in;
    cuda_detail::Scratch<const T*> ab(2 * total);
    cuda_detail::Scratch<T*> cs(total);
    const T** pa = ab.get();
    const T** pb = ab.get() + total;
    T** pc = cs.get();
    HATCH_CUDA_LAUNCH(cuda_kernels::batched_pointers<T>, cuda_detail::element_blocks(total), cuda_kernels::kThreads,
                      pa, pb, pc, a, sa_outer, sa_inner, b, sb_outer, sb_inner, c, sc_outer, sc_inner, outer, inner);
    HATCH_CUBLAS_CHECK(cublasSgemmBatched(h, op(tb), op(ta), n, m, k, &alpha, pb, ldb, pa, lda, &beta, pc, ldc,
                                          int(total)));
  }
  // From pageable memory: waits until the copy is done, so the caller may reuse src at once
  // whatever the driver does with pageable memory (staged uploads use upload_async instead).
  static void upload_bytes(void* dst, const void* src, std::size_t bytes) {
    if (!bytes) return;
    HATCH_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cuda_detail::stream()));
    cuda_detail::wait_for_stream();
  }
  static void download_bytes(void* dst, const void* src, std::size_t bytes) {
    if (!bytes) return;
    const cudaStream_t s = cuda_detail::stream();
    HATCH_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s));
    cuda_detail::wait_for_stream();
  }
  // The value a *_into reduction writes into one device double, returned to the host (waits).
  template <class Into>
  static double read_one(Into&& into) {
    cuda_detail::Scratch<double> out{1};
    into(out.get());
    double h = 0;
    read_scalars(&h, out.get(), 1);
    return h;
  }
  // out = (the sum of x[0, n)) / divisor, in a fixed order by one block.
  static void sum_doubles(double* out, const double* x, std::size_t n, double divisor) {
    HATCH_CUDA_LAUNCH(cuda_kernels::sum_doubles<double>, 1, cuda_kernels::kThreads, out, x, n, divisor);
  }
  static void choose_stream(bool user, cudaStream_t s) {
    const cudaStream_t before = cuda_detail::stream();
    ++cuda_detail::host_waits();
    HATCH_CUDA_CHECK(cudaStreamSynchronize(before));
    int device = 0;
    HATCH_CUDA_CHECK(cudaGetDevice(&device));
    auto& t = cuda_detail::stream_table();
    std::lock_guard<std::mutex> lock(t.mu);
    t.fit(device);
    t.user[std::size_t(device)] = user;
    t.chosen[std::size_t(device)] = s;
  }
  static void scale_or_zero(T* y, std::size_t n, T beta) {
    if (beta == T(0)) fill(y, n, T(0));
    else scale(y, beta, n);
  }
};

static_assert(Backend<Cuda>);
static_assert(HasBackendScalars<Cuda> && HasScalarFetch<Cuda> && HasPinnedStaging<Cuda>,
              "Cuda's step scalars or staging members do not match backend/async.hpp");

}  // namespace hatch
