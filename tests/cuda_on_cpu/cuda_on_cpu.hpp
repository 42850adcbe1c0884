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
// reverse), bad device ordinals, and -- the fault a CPU run would otherwise hide -- host code that
// reads or writes device memory (and kernels that read device memory nothing wrote: new
// allocations hold 0xff bytes, NaN as floats): device memory lies in one reserved range whose allocations are
// inaccessible (PROT_NONE) except while a kernel (those its pointer arguments name), copy, GEMM
// or reduction that uses them runs, so such an access stops the program with a message naming
// the address. (Under HATCH_CUDA_ON_CPU_EXACT_BLOCKS, the
// AddressSanitizer build, blocks come from the heap at their exact sizes instead.) TF32 is
// emulated by rounding GEMM inputs to 10 mantissa bits.
//
// Device work is asynchronous, as on a GPU: kernels, asynchronous copies and memsets, GEMMs and
// event records are queued when issued and run only when the host waits for them, each after
// exactly the work CUDA orders it before it (see Queue below). The host waits at a stream, event or
// device synchronisation, a stream or event query, a synchronous copy, cudaFree, a value returned
// to the host. So host code that reads what device work writes without
// waiting for it reads it too early: a copy into pinned host memory leaves NaN bytes (0xff) there
// until it runs, and a copy from pinned memory reads its source when it runs, not when it was
// issued (overwriting the source too early uploads the new contents). HATCH_CUDA_ON_CPU_IMMEDIATE=1
// runs each piece of work when it is issued instead (a fault inside a kernel then stops at the
// launching call, which a debugger shows).
//
// What it cannot show: speed, concurrency between blocks, cudaStreamWaitEvent (not stood in for:
// the backend does not use it), the device's memory model, out-of-bounds accesses inside kernels
// beyond what AddressSanitizer sees.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <csignal>
#include <cstdio>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../cuda_emulation.hpp"

#if !defined(HATCH_CUDA_ON_CPU_EXACT_BLOCKS)
#include <sys/mman.h>
#include <unistd.h>
#endif

using dim3 = hatch_emulation::dim3;
using std::isfinite;

// ---- runtime types ---------------------------------------------------------------------------------
// name, value, message (the runtime's own strings)
#define HATCH_CUDA_ON_CPU_ERRORS(X)                                              \
  X(cudaSuccess, 0, "no error")                                                  \
  X(cudaErrorInvalidValue, 1, "invalid argument")                                \
  X(cudaErrorMemoryAllocation, 2, "out of memory")                               \
  X(cudaErrorInvalidConfiguration, 9, "invalid configuration argument")          \
  X(cudaErrorNoDevice, 100, "no CUDA-capable device is detected")                \
  X(cudaErrorInvalidDevice, 101, "invalid device ordinal")                       \
  X(cudaErrorInvalidResourceHandle, 400, "invalid resource handle")              \
  X(cudaErrorNotReady, 600, "device not ready")                                  \
  X(cudaErrorIllegalAddress, 700, "an illegal memory access was encountered")
#define HATCH_CUDA_ON_CPU_ENUM(name, value, message) name = value,
enum cudaError_t { HATCH_CUDA_ON_CPU_ERRORS(HATCH_CUDA_ON_CPU_ENUM) };
#undef HATCH_CUDA_ON_CPU_ENUM
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
  struct State {  // shared with the queued record, which may run after the event is destroyed
    std::uint64_t seq = 0;  // the record's place in the device's queue (0: nothing to wait for)
    bool recorded = false, ran = false;
    std::chrono::steady_clock::time_point at{};
  };
  bool timing = true;
  std::shared_ptr<State> state = std::make_shared<State>();
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
// (read at every allocation, so a test can lower it for a while)
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
  std::uint64_t pinned_allocations = 0;                    // cudaMallocHost calls that succeeded
  std::size_t device_bytes = 0;
  std::map<const void*, std::size_t> shared_limit;  // kernel -> cudaFuncSetAttribute value
  std::map<const void*, int> resident_blocks;       // kernel -> occupancy answer (tests: set_resident_blocks)
  // Queued copies to or from pinned memory: (work number, pinned address, bytes), so that freeing
  // pinned memory a queued copy still uses is caught (cudaFreeHost).
  using PinnedCopy = std::tuple<std::uint64_t, std::uintptr_t, std::size_t>;
  std::vector<PinnedCopy> pinned_in_flight;
  int frees_before_failure = -1;  // fail_free_after: cudaFree calls that succeed before one fails
#if !defined(HATCH_CUDA_ON_CPU_EXACT_BLOCKS)
  std::map<std::uintptr_t, int> open;  // allocations open for device work -> how many holders
  unsigned char* arena = nullptr;  // kArenaBytes reserved, [arena, arena + used) handed out
  std::size_t used = 0;
  std::multimap<std::size_t, std::uintptr_t> free_chunks;  // bytes (whole pages) -> address
#endif
};
inline State& state() {
  static auto* s = new State;
  return *s;
}
// The cudaFree after the next n fails (cudaErrorIllegalAddress, the block not freed), once: what a
// broken context does to the caching allocator's release, which no correct call can provoke.
inline void fail_free_after(int n) {
  std::lock_guard<std::mutex> lock(state().mu);
  state().frees_before_failure = n;
}
// The allocation of `map` (base -> bytes) that holds address p, or map.end().
inline auto allocation_of(const std::map<std::uintptr_t, std::size_t>& map, const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  auto it = map.upper_bound(a);
  if (it == map.begin()) return map.end();
  --it;
  return a < it->first + std::max<std::size_t>(it->second, 1) ? it : map.end();
}

// How many emulated device operations (kernels, copies, GEMMs) run now: a fault inside the device
// range while one runs is that operation reaching memory it was not given.
inline int device_work_running = 0;
#if !defined(HATCH_CUDA_ON_CPU_EXACT_BLOCKS)
// Address space reserved for device memory (no memory is committed until used); what may be in
// use at once is memory_limit().
inline constexpr std::size_t kArenaBytes = std::size_t(64) << 30;
inline std::size_t page_size() {
  static const std::size_t p = std::size_t(sysconf(_SC_PAGESIZE));
  return p;
}
// What a device block of `bytes` takes of the arena: whole pages (at least one).
inline std::size_t whole_pages(std::size_t bytes) {
  return (std::max<std::size_t>(bytes, 1) + page_size() - 1) / page_size() * page_size();
}
inline struct sigaction& previous_segv() {
  static struct sigaction old {};
  return old;
}
// A fault inside the device range is host code touching device memory, or device work touching
// memory none of its arguments names (another tensor, a freed one): say which, then let the
// previous handler (doctest's, which names the test) or the default one report the crash.
inline void on_segv(int sig, siginfo_t* info, void* ctx) {
  State& s = state();
  const auto a = reinterpret_cast<std::uintptr_t>(info->si_addr), base = reinterpret_cast<std::uintptr_t>(s.arena);
  if (s.arena && a >= base && a < base + kArenaBytes) {
    const bool device = device_work_running > 0;
    char msg[300];
    const int n = std::snprintf(msg, sizeof msg, "cuda_on_cpu: %s touched device memory at %p (offset %zu of the device range)%s\n",
                                device ? "device work" : "host code", info->si_addr, std::size_t(a - base),
                                device ? " that none of its arguments names (another tensor, or a freed one): on a "
                                         "GPU this is an illegal address, or a silent read of whatever is there"
                                       : ": on a GPU this is an invalid host access");
    if (n > 0) (void)!write(2, msg, std::size_t(n));
  }
  struct sigaction& old = previous_segv();
  if (old.sa_flags & SA_SIGINFO) {
    if (old.sa_sigaction) return old.sa_sigaction(sig, info, ctx);
  } else if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN && old.sa_handler) {
    return old.sa_handler(sig);
  }
  signal(sig, SIG_DFL);
  raise(sig);
}
// Puts on_segv in front of whatever handler is installed now (test frameworks install theirs
// per test case), so that the message comes first and their report after it.
inline void ensure_segv_handler() {
  struct sigaction cur {};
  sigaction(SIGSEGV, nullptr, &cur);
  if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == &on_segv) return;
  struct sigaction sa {};
  sa.sa_sigaction = &on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &previous_segv());
}
#endif

// Opens the device allocations an emulated device operation touches (readable and writable by
// this process) until it ends; every other allocation stays closed, so host code that reads or
// writes device memory faults, while kernels run. Opening an allocation is one mprotect of its
// pages, and nested or repeated opens of one allocation are counted.
class DeviceAccess {
 public:
  DeviceAccess() { ++device_work_running; }
  DeviceAccess(std::initializer_list<const void*> ps) : DeviceAccess() {
    for (const void* p : ps) add(p);
  }
  void add(const void* p) {
#if defined(HATCH_CUDA_ON_CPU_EXACT_BLOCKS)
    (void)p;
#else
    ensure_segv_handler();
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    const auto it = allocation_of(s.device, p);
    if (it == s.device.end()) return;  // not device memory
    if (s.open[it->first]++ == 0) set(it->first, it->second, PROT_READ | PROT_WRITE);
    opened_.push_back(it->first);
#endif
  }
  // A kernel argument: a pointer, or a struct (a functor) whose words may hold device pointers,
  // found conservatively: every aligned word that points into a device allocation opens it.
  template <class A>
  void add_argument(const A& a) {
    if constexpr (std::is_pointer_v<A>) {
      add(static_cast<const void*>(a));
    } else if constexpr (std::is_class_v<A> && std::is_trivially_copyable_v<A> && sizeof(A) >= sizeof(void*)) {
      for (std::size_t o = 0; o + sizeof(void*) <= sizeof(A); o += alignof(void*)) {
        const void* p;
        std::memcpy(&p, reinterpret_cast<const unsigned char*>(&a) + o, sizeof p);
        add(p);
      }
    }
  }
  ~DeviceAccess() {
    --device_work_running;
#if !defined(HATCH_CUDA_ON_CPU_EXACT_BLOCKS)
    if (opened_.empty()) return;
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    for (std::uintptr_t base : opened_) {
      auto it = s.open.find(base);
      if (--it->second == 0) {
        s.open.erase(it);
        if (auto d = s.device.find(base); d != s.device.end()) set(base, d->second, PROT_NONE);
      }
    }
#endif
  }
  DeviceAccess(const DeviceAccess&) = delete;
  DeviceAccess& operator=(const DeviceAccess&) = delete;

 private:
#if !defined(HATCH_CUDA_ON_CPU_EXACT_BLOCKS)
  static void set(std::uintptr_t base, std::size_t bytes, int prot) {
    if (mprotect(reinterpret_cast<void*>(base), whole_pages(bytes), prot) != 0) {
      std::perror("cuda_on_cpu: mprotect");
      std::abort();
    }
  }
  std::vector<std::uintptr_t> opened_;
#endif
};

// A block of `bytes` of device memory, 256-byte aligned, or nullptr. Called with state().mu held.
inline void* device_block(State& s, std::size_t bytes) {
#if defined(HATCH_CUDA_ON_CPU_EXACT_BLOCKS)
  (void)s;
  // exactly `bytes`, so that AddressSanitizer sees an access past the end of the allocation
  return ::operator new(bytes, std::align_val_t(256), std::nothrow);
#else
  if (!s.arena) {
    void* r = mmap(nullptr, kArenaBytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED) return nullptr;
    s.arena = static_cast<unsigned char*>(r);
  }
  const std::size_t size = whole_pages(bytes);
  void* p = nullptr;
  if (auto it = s.free_chunks.find(size); it != s.free_chunks.end()) {
    p = reinterpret_cast<void*>(it->second);
    s.free_chunks.erase(it);
  } else {
    if (s.used + size > kArenaBytes) return nullptr;
    p = s.arena + s.used;
    s.used += size;
  }
  return p;
#endif
}
// New device memory holds whatever was there, not zeros: 0xff bytes (NaN as floats and doubles),
// so that a kernel reading memory nothing wrote yet shows it. Called with state().mu held.
inline void poison(void* p, std::size_t bytes) {
#if defined(HATCH_CUDA_ON_CPU_EXACT_BLOCKS)
  std::memset(p, 0xff, bytes);
#else
  const std::size_t span = whole_pages(bytes);
  if (mprotect(p, span, PROT_READ | PROT_WRITE) != 0 || (std::memset(p, 0xff, bytes), false) ||
      mprotect(p, span, PROT_NONE) != 0) {
    std::perror("cuda_on_cpu: mprotect");
    std::abort();
  }
#endif
}
inline void free_device_block(State& s, void* p, std::size_t bytes) {
#if defined(HATCH_CUDA_ON_CPU_EXACT_BLOCKS)
  (void)s;
  (void)bytes;
  ::operator delete(p, std::align_val_t(256));
#else
  s.free_chunks.emplace(whole_pages(bytes), reinterpret_cast<std::uintptr_t>(p));
#endif
}
inline thread_local cudaError_t last_error = cudaSuccess;
inline thread_local int current_device = 0;

inline cudaError_t fail(cudaError_t e) {
  last_error = e;
  return e;
}

// ---- the device's queue ------------------------------------------------------------------------------
// Work issued and not yet run, with the ordering CUDA promises between streams and no more: work
// on one stream runs in issue order; the legacy default stream (0) waits for the earlier work of
// every blocking stream (cudaStreamCreate), and a blocking stream for the earlier work of the
// legacy stream; a non-blocking stream (cudaStreamNonBlocking) waits for nothing else. When the
// host waits for a piece of work, that work runs, after exactly what it depends on: other work
// stays queued, so a missing ordering between two streams leaves its reader with stale data.
struct Queue {
  enum Kind { legacy, blocking, non_blocking };
  struct Work {
    const void* stream;
    Kind kind;
    std::function<void()> run;
  };
  std::recursive_mutex mu;
  std::map<std::uint64_t, Work> pending;  // by issue number
  std::uint64_t issued = 0;
  std::map<const void*, std::uint64_t> last;  // stream -> its last work's number
};
inline Queue& queue() {
  static auto* q = new Queue;
  return *q;
}
inline bool run_at_issue() {  // read at every issue, so that a test can switch it
  const char* v = std::getenv("HATCH_CUDA_ON_CPU_IMMEDIATE");
  return v && *v && *v != '0';
}
// Issues device work on stream s; returns its number in the queue.
template <class F>
std::uint64_t issue(cudaStream_t s, F&& f) {
  Queue& q = queue();
  std::lock_guard<std::recursive_mutex> lock(q.mu);
  const std::uint64_t seq = ++q.issued;
  q.last[s] = seq;
  const Queue::Kind kind = !s ? Queue::legacy : s->non_blocking ? Queue::non_blocking : Queue::blocking;
  if (run_at_issue() && q.pending.empty()) f();
  else q.pending.emplace(seq, Queue::Work{s, kind, std::function<void()>(std::forward<F>(f))});
  return seq;
}
// Runs one piece of work taken from the queue. If it fails (a kernel's deadlock, a race the
// emulator's racecheck saw, a GEMM operand out of its allocation), nothing queued runs any more, as
// on a GPU, where such a fault ends the context: work queued after it would otherwise run at some
// later wait and write, say, into the host variable of a copy whose caller has long returned.
inline void run_queued(Queue& q, std::map<std::uint64_t, Queue::Work>::node_type w) {
  try {
    w.mapped().run();
  } catch (...) {
    q.pending.clear();
    throw;
  }
}
// Runs work number seq (the host waits for it) and the queued work it depends on, in issue order.
inline void run_until(std::uint64_t seq) {
  Queue& q = queue();
  std::lock_guard<std::recursive_mutex> lock(q.mu);
  auto it = q.pending.find(seq);
  if (it == q.pending.end()) return;
  // Walking back from seq: earlier work is needed when needed later work is on its stream, or is
  // legacy work after it (when it is on a blocking stream), or blocking work after it (when legacy).
  std::vector<std::uint64_t> needed{seq};
  std::map<const void*, bool> streams{{it->second.stream, true}};
  bool any_legacy = it->second.kind == Queue::legacy, any_blocking = it->second.kind == Queue::blocking;
  for (auto r = std::make_reverse_iterator(it); r != q.pending.rend(); ++r) {
    const Queue::Work& w = r->second;
    const bool need = streams.count(w.stream) || (w.kind == Queue::blocking && any_legacy) ||
                      (w.kind == Queue::legacy && any_blocking);
    if (!need) continue;
    needed.push_back(r->first);
    streams[w.stream] = true;
    any_legacy = any_legacy || w.kind == Queue::legacy;
    any_blocking = any_blocking || w.kind == Queue::blocking;
  }
  for (auto n = needed.rbegin(); n != needed.rend(); ++n) run_queued(q, q.pending.extract(*n));
}
// Runs everything queued (a device synchronisation).
inline void run_all() {
  Queue& q = queue();
  std::lock_guard<std::recursive_mutex> lock(q.mu);
  while (!q.pending.empty()) run_queued(q, q.pending.extract(q.pending.begin()));
}
// Drops the queued work that has not run (for a test that checks only that work is accepted and
// would otherwise wait minutes for its emulation); its results are never written.
inline void discard_queued() {
  Queue& q = queue();
  std::lock_guard<std::recursive_mutex> lock(q.mu);
  q.pending.clear();
}
inline std::uint64_t last_of(cudaStream_t s) {
  Queue& q = queue();
  std::lock_guard<std::recursive_mutex> lock(q.mu);
  const auto it = q.last.find(s);
  return it == q.last.end() ? 0 : it->second;
}
inline bool ran(std::uint64_t seq) {
  Queue& q = queue();
  std::lock_guard<std::recursive_mutex> lock(q.mu);
  return !q.pending.count(seq);
}
// Issues work on stream s and waits for it (a call that is synchronous for the host).
template <class F>
void run_now(cudaStream_t s, F&& f) {
  run_until(issue(s, std::forward<F>(f)));
}

// [p, p + bytes) inside one live device allocation?
inline bool on_device(const void* p, std::size_t bytes) {
  std::lock_guard<std::mutex> lock(state().mu);
  const auto& map = state().device;
  const auto it = allocation_of(map, p);
  return it != map.end() && reinterpret_cast<std::uintptr_t>(p) + (bytes ? bytes : 1) <= it->first + it->second;
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
cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, std::size_t shared, cudaStream_t stream, Args&&... args) {
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
  issue(stream, [kernel, grid, block, shared, as = std::make_tuple(std::decay_t<Args>(args)...)] {
    std::apply(
        [&](const auto&... a) {
          DeviceAccess open;  // what the kernel's arguments point to (memory reached through others faults)
          (open.add_argument(a), ...);
          hatch_emulation::launch(kernel, grid, block, shared, a...);
        },
        as);
  });
  return cudaSuccess;
}

inline float tf32(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & ~0x1fffu;  // round to 10 mantissa bits
  std::memcpy(&v, &u, 4);
  return v;
}
// Each operand inside one device allocation (checked when a GEMM is issued, and for pointer-array
// GEMMs, whose pointers the device reads, when it runs).
inline void check_sgemm(bool ta, bool tb, int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                        const float* c, int ldc) {
  const std::size_t ea = ta ? std::size_t(lda) * (m - 1) + k : std::size_t(lda) * (k - 1) + m;
  const std::size_t eb = tb ? std::size_t(ldb) * (k - 1) + n : std::size_t(ldb) * (n - 1) + k;
  if (k > 0) {
    require_device(a, ea * sizeof(float), "GEMM operand A");
    require_device(b, eb * sizeof(float), "GEMM operand B");
  }
  require_device(c, (std::size_t(ldc) * (n - 1) + m) * sizeof(float), "GEMM operand C");
}
// Column-major C (m x n, ldc) = alpha op(A) op(B) + beta C; C is not read when beta == 0 (the
// caller checks the operands first, check_sgemm).
inline void sgemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                  int ldb, float beta, float* c, int ldc, bool round_tf32) {
  DeviceAccess open{a, b, c};
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
#define HATCH_CUDA_ON_CPU_NAME(name, value, message) \
  case name:                                         \
    return #name;
  switch (e) { HATCH_CUDA_ON_CPU_ERRORS(HATCH_CUDA_ON_CPU_NAME) }
#undef HATCH_CUDA_ON_CPU_NAME
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
#define HATCH_CUDA_ON_CPU_MESSAGE(name, value, message) \
  case name:                                            \
    return message;
  switch (e) { HATCH_CUDA_ON_CPU_ERRORS(HATCH_CUDA_ON_CPU_MESSAGE) }
#undef HATCH_CUDA_ON_CPU_MESSAGE
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
inline cudaError_t cudaDeviceSynchronize() {
  hatch_cuda_on_cpu::run_all();
  return cudaSuccess;
}

inline cudaError_t cudaMalloc(void** p, std::size_t bytes) {
  auto& s = hatch_cuda_on_cpu::state();
  std::lock_guard<std::mutex> lock(s.mu);
  *p = nullptr;
  if (bytes == 0) return cudaSuccess;
  if (s.device_bytes + bytes > hatch_cuda_on_cpu::memory_limit())
    return hatch_cuda_on_cpu::fail(cudaErrorMemoryAllocation);
  void* q = hatch_cuda_on_cpu::device_block(s, bytes);
  if (!q) return hatch_cuda_on_cpu::fail(cudaErrorMemoryAllocation);
  s.device[reinterpret_cast<std::uintptr_t>(q)] = bytes;
  s.device_bytes += bytes;
  hatch_cuda_on_cpu::poison(q, bytes);
  *p = q;
  return cudaSuccess;
}
template <class T>
cudaError_t cudaMalloc(T** p, std::size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
inline cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  hatch_cuda_on_cpu::run_all();  // cudaFree waits for the device
  auto& s = hatch_cuda_on_cpu::state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.device.find(reinterpret_cast<std::uintptr_t>(p));
  if (it == s.device.end()) return hatch_cuda_on_cpu::fail(cudaErrorInvalidValue);
  if (s.frees_before_failure >= 0 && s.frees_before_failure-- == 0)
    return hatch_cuda_on_cpu::fail(cudaErrorIllegalAddress);
  s.device_bytes -= it->second;
  hatch_cuda_on_cpu::free_device_block(s, p, it->second);
  s.device.erase(it);
  return cudaSuccess;
}
namespace hatch_cuda_on_cpu {
// Pinned allocations so far (tests: how often a path page-locks memory, which costs milliseconds
// and a wait for the device on a GPU).
inline std::uint64_t pinned_allocations() {
  std::lock_guard<std::mutex> lock(state().mu);
  return state().pinned_allocations;
}
// (ran() takes the queue's lock, and queued work takes the state's while the queue's is held: the
// list is therefore read under the state's lock and asked about outside it, never both at once.)
inline void note_pinned_in_flight(std::uint64_t seq, const void* p, std::size_t bytes) {
  std::vector<State::PinnedCopy> pending;
  {
    std::lock_guard<std::mutex> lock(state().mu);
    pending.swap(state().pinned_in_flight);
  }
  std::erase_if(pending, [](const auto& c) { return ran(std::get<0>(c)); });  // (keeps the list short)
  pending.emplace_back(seq, reinterpret_cast<std::uintptr_t>(p), bytes);
  std::lock_guard<std::mutex> lock(state().mu);
  state().pinned_in_flight.insert(state().pinned_in_flight.end(), pending.begin(), pending.end());
}
inline void require_no_pinned_in_flight(const void* p, std::size_t bytes) {
  std::vector<State::PinnedCopy> pending;
  {
    std::lock_guard<std::mutex> lock(state().mu);
    pending = state().pinned_in_flight;
  }
  const auto lo = reinterpret_cast<std::uintptr_t>(p), hi = lo + bytes;
  for (const auto& [seq, at, n] : pending)
    if (at < hi && lo < at + n && !ran(seq)) {
      std::fprintf(stderr,
                   "cuda_on_cpu: cudaFreeHost(%p) while a queued copy still uses %zu bytes at %p of it "
                   "(wait for the stream, or an event after the copy, before freeing pinned memory)\n",
                   p, n, reinterpret_cast<void*>(at));
      std::fflush(stderr);
      std::abort();
    }
}
}  // namespace hatch_cuda_on_cpu
inline cudaError_t cudaMallocHost(void** p, std::size_t bytes) {
  auto& s = hatch_cuda_on_cpu::state();
  std::lock_guard<std::mutex> lock(s.mu);
  *p = std::aligned_alloc(256, (std::max<std::size_t>(bytes, 1) + 255) / 256 * 256);
  if (!*p) return hatch_cuda_on_cpu::fail(cudaErrorMemoryAllocation);
  s.pinned[reinterpret_cast<std::uintptr_t>(*p)] = bytes;
  ++s.pinned_allocations;
  return cudaSuccess;
}
template <class T>
cudaError_t cudaMallocHost(T** p, std::size_t bytes) {
  return cudaMallocHost(reinterpret_cast<void**>(p), bytes);
}
// CUDA does not promise that cudaFreeHost waits for queued copies that use the memory (it does in
// practice, but a caller that relies on that reads or writes freed memory where it does not). Here
// it does not wait: freeing pinned memory that a queued copy still reads or writes stops the
// program with a message, as a host access to device memory does.
inline cudaError_t cudaFreeHost(void* p) {
  if (!p) return cudaSuccess;
  auto& s = hatch_cuda_on_cpu::state();
  std::size_t bytes = 0;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.pinned.find(reinterpret_cast<std::uintptr_t>(p));
    if (it == s.pinned.end()) return hatch_cuda_on_cpu::fail(cudaErrorInvalidValue);
    bytes = it->second;
  }
  hatch_cuda_on_cpu::require_no_pinned_in_flight(p, bytes);
  std::lock_guard<std::mutex> lock(s.mu);
  s.pinned.erase(reinterpret_cast<std::uintptr_t>(p));
  std::free(p);
  return cudaSuccess;
}

namespace hatch_cuda_on_cpu {
// Where a copy's two ends are (device memory, or host memory: pinned or pageable), checked against
// its kind; cudaErrorInvalidValue when a host end is device memory, an illegal address when a
// device end is not.
struct CopyEnds {
  bool dst_device, src_device, dst_pinned, src_pinned;
};
inline cudaError_t copy_ends(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind, const char* call,
                             CopyEnds& e) {
  e.dst_device = on_device(dst, bytes);
  e.src_device = on_device(src, bytes);
  {
    std::lock_guard<std::mutex> lock(state().mu);
    e.dst_pinned = allocation_of(state().pinned, dst) != state().pinned.end();
    e.src_pinned = allocation_of(state().pinned, src) != state().pinned.end();
  }
  if (kind == cudaMemcpyDefault) return cudaSuccess;
  const bool want_dst = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool want_src = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (want_dst && !e.dst_device) illegal(std::string(call) + ": the destination is not device memory of that size");
  if (want_src && !e.src_device) illegal(std::string(call) + ": the source is not device memory of that size");
  if (!want_dst && e.dst_device) return fail(cudaErrorInvalidValue);
  if (!want_src && e.src_device) return fail(cudaErrorInvalidValue);
  return cudaSuccess;
}
inline void copy_now(void* dst, const void* src, std::size_t bytes) {
  DeviceAccess open{dst, src};
  std::memmove(dst, src, bytes);
}
}  // namespace hatch_cuda_on_cpu

// Synchronous for the host.
inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  if (bytes == 0) return cudaSuccess;
  hatch_cuda_on_cpu::CopyEnds e;
  if (const cudaError_t r = hatch_cuda_on_cpu::copy_ends(dst, src, bytes, kind, "cudaMemcpy", e); r != cudaSuccess)
    return r;
  // on the legacy stream: after it and the blocking streams, not after non-blocking ones
  hatch_cuda_on_cpu::run_now(nullptr, [dst, src, bytes] { hatch_cuda_on_cpu::copy_now(dst, src, bytes); });
  return cudaSuccess;
}
// As CUDA does: from pageable host memory the source is taken when the call is made; into
// pageable host memory the call returns when the copy is done (after the stream's earlier work);
// copies between device and pinned memory, and within the device, run when the stream gets to
// them, and a pinned destination holds 0xff bytes (NaN) until then.
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind,
                                   cudaStream_t stream = nullptr) {
  namespace c = hatch_cuda_on_cpu;
  if (bytes == 0) return cudaSuccess;
  c::CopyEnds e;
  if (const cudaError_t r = c::copy_ends(dst, src, bytes, kind, "cudaMemcpyAsync", e); r != cudaSuccess) return r;
  if (!e.dst_device && !e.dst_pinned) {  // into pageable memory: synchronous
    c::run_now(stream, [dst, src, bytes] { c::copy_now(dst, src, bytes); });
  } else if (!e.src_device && !e.src_pinned) {  // from pageable memory: the source as it is now
    auto taken = std::make_shared<std::vector<unsigned char>>(static_cast<const unsigned char*>(src),
                                                              static_cast<const unsigned char*>(src) + bytes);
    c::issue(stream, [dst, taken] { c::copy_now(dst, taken->data(), taken->size()); });
  } else {
    if (e.dst_pinned) std::memset(dst, 0xff, bytes);  // not there yet
    const std::uint64_t seq = c::issue(stream, [dst, src, bytes] { c::copy_now(dst, src, bytes); });
    if (e.dst_pinned || e.src_pinned) c::note_pinned_in_flight(seq, e.dst_pinned ? dst : src, bytes);
  }
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int v, std::size_t bytes) {
  hatch_cuda_on_cpu::require_device(p, bytes, "cudaMemset");
  hatch_cuda_on_cpu::run_now(nullptr, [p, v, bytes] {
    hatch_cuda_on_cpu::DeviceAccess open{p};
    std::memset(p, v, bytes);
  });
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, std::size_t bytes, cudaStream_t stream = nullptr) {
  hatch_cuda_on_cpu::require_device(p, bytes, "cudaMemsetAsync");
  hatch_cuda_on_cpu::issue(stream, [p, v, bytes] {
    hatch_cuda_on_cpu::DeviceAccess open{p};
    std::memset(p, v, bytes);
  });
  return cudaSuccess;
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
inline cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  hatch_cuda_on_cpu::run_until(hatch_cuda_on_cpu::last_of(s));
  return cudaSuccess;
}
// Not ready while the stream has queued work (which then runs: the next query finds it done).
inline cudaError_t cudaStreamQuery(cudaStream_t s) {
  const std::uint64_t last = hatch_cuda_on_cpu::last_of(s);
  if (hatch_cuda_on_cpu::ran(last)) return cudaSuccess;
  hatch_cuda_on_cpu::run_until(last);
  return cudaErrorNotReady;
}
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
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t stream = nullptr) {
  if (!e) return hatch_cuda_on_cpu::fail(cudaErrorInvalidResourceHandle);
  auto st = e->state;
  st->recorded = true;
  st->ran = false;
  st->seq = hatch_cuda_on_cpu::issue(stream, [st] {
    st->at = std::chrono::steady_clock::now();
    st->ran = true;
  });
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  if (!e) return hatch_cuda_on_cpu::fail(cudaErrorInvalidResourceHandle);
  hatch_cuda_on_cpu::run_until(e->state->seq);
  return cudaSuccess;
}
inline cudaError_t cudaEventQuery(cudaEvent_t e) {
  if (!e) return hatch_cuda_on_cpu::fail(cudaErrorInvalidResourceHandle);
  if (hatch_cuda_on_cpu::ran(e->state->seq)) return cudaSuccess;
  hatch_cuda_on_cpu::run_until(e->state->seq);
  return cudaErrorNotReady;
}
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  if (!a || !b || !a->timing || !b->timing || !a->state->recorded || !b->state->recorded)
    return hatch_cuda_on_cpu::fail(cudaErrorInvalidResourceHandle);
  if (!a->state->ran || !b->state->ran) return hatch_cuda_on_cpu::fail(cudaErrorNotReady);
  *ms = std::chrono::duration<float, std::milli>(b->state->at - a->state->at).count();
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
// Blocks of a kernel resident on one multiprocessor: what set_resident_blocks said for this kernel
// (a GPU's answer differs between kernels, by their registers and shared memory), else as many as
// 2,048 threads allow, at most 32.
template <class Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel kernel, int block_size, std::size_t) {
  if (block_size <= 0 || block_size > 1024) return hatch_cuda_on_cpu::fail(cudaErrorInvalidValue);
  *blocks = std::max(1, std::min(32, 2048 / block_size));
  auto& s = hatch_cuda_on_cpu::state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (auto it = s.resident_blocks.find(reinterpret_cast<const void*>(kernel)); it != s.resident_blocks.end())
    *blocks = it->second;
  return cudaSuccess;
}
namespace hatch_cuda_on_cpu {
template <class Kernel>
void set_resident_blocks(Kernel kernel, int blocks) {
  std::lock_guard<std::mutex> lock(state().mu);
  state().resident_blocks[reinterpret_cast<const void*>(kernel)] = blocks;
}
}  // namespace hatch_cuda_on_cpu

// ---- the library-type enum cuBLAS and cuBLASLt take ------------------------------------------------
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_64F = 1 };
using cudaDataType = cudaDataType_t;
