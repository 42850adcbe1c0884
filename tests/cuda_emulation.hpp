#pragma once
// Runs a CUDA kernel's source on the CPU, for testing its indexing and synchronisation on a
// machine without a GPU. Blocks run one after another (or a few at once, interleaved:
// HATCH_EMULATION_BLOCKS_AT_ONCE); within a block every CUDA thread is a
// fiber (its own stack, switched cooperatively on one OS thread; warps are 32 consecutive
// linear thread indices, x fastest, as on the device). __syncthreads() is a barrier over the
// block's threads and __syncwarp() over the warp's: a thread that arrives gives way to the next
// until every thread has arrived; __shfl_xor_sync is a warp barrier around an exchange buffer; a
// thread that returns drops out of both barriers (as exited threads do on the device). Threads
// that wait at barriers no other thread can reach (a __syncthreads in divergent code) are
// reported as a deadlock (std::logic_error) instead of hanging. Static shared variables
// (HATCH_STATIC_SHARED) and dynamic shared memory are buffers of each resident block, 0xff bytes
// (NaN as floats: uninitialised, as on the device) when made; a static one keeps its last block's
// values for the next block run in its slot (as uninitialised as the device's);
// atomicAdd is a std::atomic_ref, __threadfence a sequentially consistent fence.
// It proves a kernel computes the right values (every thread, every block, every tile edge, the
// "last block" logic of a grid-wide sum); it says nothing about speed, nor about the device's
// memory model beyond these barriers (memory here is sequentially consistent). A missing barrier
// shows when some thread reads a value before its writer ran; which threads run first is up to
// HATCH_EMULATION_THREAD_ORDER (forward, reverse, shuffle; below), which blocks, up to
// HATCH_EMULATION_BLOCK_ORDER, and whether one block's threads run between another's, up to
// HATCH_EMULATION_BLOCKS_AT_ONCE. Two threads writing the same shared memory between two
// barriers (a lost update on a GPU) show in no order, since a thread runs from one barrier to the
// next without giving way; HATCH_EMULATION_RACECHECK=1 reports them (racecheck_commit below).
//
// Kernel headers written against this subset compile here (backend/cuda_attention.cuh,
// backend/cuda_kernels.cuh): include this file first, then the kernel header, and call
// hatch_emulation::launch(kernel, grid, block, shared_bytes, args...). tests/cuda_on_cpu runs the
// whole Cuda backend this way.
#ifndef HATCH_CUDA_EMULATION
#define HATCH_CUDA_EMULATION 1
#endif
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace hatch_emulation {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---- fibers --------------------------------------------------------------------------------------
// x86-64: a context is a stack pointer; switch_to saves the callee-saved registers and the
// floating-point control words on the old stack and restores them from the new one. Elsewhere
// ucontext (slower: it saves the signal mask with a system call on every switch).
#if defined(__x86_64__)
extern "C" void hatch_emulation_switch(void** save_sp, void* next_sp);
asm(R"(
  .text
  .weak hatch_emulation_switch
  .type hatch_emulation_switch, @function
hatch_emulation_switch:
  .cfi_startproc
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .cfi_endproc
  .size hatch_emulation_switch, .-hatch_emulation_switch
)");
struct Context {
  void* sp = nullptr;
};
#else
struct Context {
  ucontext_t uc;
};
#endif

inline constexpr std::size_t kFiberStack = std::size_t(256) << 10;

struct Fiber {
  Context ctx;
  std::unique_ptr<unsigned char[]> stack;
  unsigned linear = 0;
  dim3 index;  // threadIdx
  bool done = false;
  std::uint64_t idle_at = ~std::uint64_t(0);  // `progress` when it last gave way
};

// A barrier over `expected` fibers; arrive_and_drop lowers the count (an exited thread).
struct Barrier {
  unsigned expected = 0, arrived = 0;
  std::uint64_t phase = 0;
};

struct Watched;  // a shared buffer under racecheck (below)

// One block being run: its threads, barriers and shared memory. Several may be resident at once
// (HATCH_EMULATION_BLOCKS_AT_ONCE); a slot takes the next block of the grid when its block ends.
struct Block {
  dim3 dim, grid, index;  // blockDim, gridDim, blockIdx
  Barrier all;
  std::vector<Barrier> warps;
  std::vector<unsigned char> exchange;  // 8 bytes per thread for the shuffles
  std::vector<unsigned char> shared;    // dynamic shared memory
  // HATCH_STATIC_SHARED variables, by declaration; kept for the slot's next block (as
  // uninitialised as the device's)
  struct Static {
    const void* key;  // where it is declared
    std::unique_ptr<unsigned char[]> bytes;
    std::size_t size;
  };
  std::vector<Static> statics;
  std::vector<Fiber> fibers;
  std::vector<Watched> watched;  // its shared buffers, under HATCH_EMULATION_RACECHECK=1
  bool racecheck = false;
  unsigned live = 0;  // threads not yet returned; 0: the slot is empty
  std::uint64_t held = 0;       // >0: waits since the held-th atomic (see launch)
  bool hold_on_atomic = false;  // shuffled, several blocks resident
  Context scheduler;
  std::exception_ptr error;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
};
// ---- racecheck (HATCH_EMULATION_RACECHECK=1) ------------------------------------------------------
// A thread here runs from one barrier to the next without giving way, so two threads that write
// the same shared memory between two barriers leave the value of whichever ran last, and no order
// of threads shows the race (a non-atomic `s[0] += v` by every thread adds up right). What the
// emulator can see is what each thread changed: every time a thread arrives at a barrier or
// returns, each shared buffer of its block is compared with a copy of it as it was, and every
// changed byte is recorded with its writer and the barrier phases then (the block's, the writer's
// warp's). A byte changed by a second thread while those phases are the same (no __syncthreads
// since, nor a __syncwarp or shuffle both took part in) is a write-after-write hazard, as
// compute-sanitizer's racecheck reports it: the block ends with an error naming both threads.
// (A write of the value already there changes nothing and is not seen; neither are reads.)
struct Watched {
  unsigned char* data = nullptr;
  std::size_t size = 0;
  const char* what = "";       // "dynamic shared memory" or "a static shared variable"
  std::vector<unsigned char> seen;  // the contents as last compared
  struct Write {
    std::uint32_t writer = ~std::uint32_t(0);
    std::uint64_t block_phase = 0, warp_phase = 0;
  };
  std::vector<Write> last;
  Watched(unsigned char* d, std::size_t n, const char* w) : data(d), size(n), what(w), seen(d, d + n), last(n) {}
};
inline bool racecheck_on() {
  const char* v = std::getenv("HATCH_EMULATION_RACECHECK");
  if (!v || !*v || std::strcmp(v, "0") == 0) return false;
  if (std::strcmp(v, "1") == 0) return true;
  throw std::invalid_argument(std::string("HATCH_EMULATION_RACECHECK=") + v + ": expected 0 or 1");
}
inline std::string index_name(const dim3& d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}
// What thread `t` of block `b` changed since the last comparison (see above).
inline void racecheck_commit(Block& b, unsigned t) {
  const std::uint64_t block_phase = b.all.phase, warp_phase = b.warps[t / 32].phase;
  for (Watched& w : b.watched) {
    constexpr std::size_t kChunk = 64;
    for (std::size_t c = 0; c < w.size; c += kChunk) {
      const std::size_t n = std::min(kChunk, w.size - c);
      if (std::memcmp(w.data + c, w.seen.data() + c, n) == 0) continue;
      for (std::size_t i = c; i < c + n; ++i) {
        if (w.data[i] == w.seen[i]) continue;
        Watched::Write& l = w.last[i];
        const bool synced = l.writer == ~std::uint32_t(0) || l.writer == t || l.block_phase != block_phase ||
                            (l.writer / 32 == t / 32 && l.warp_phase != warp_phase);
        if (!synced && !b.error) {
          b.error = std::make_exception_ptr(std::logic_error(
              "hatch_emulation: racecheck: threads " + index_name(b.fibers[l.writer].index) + " and " +
              index_name(b.fibers[t].index) + " of block " + index_name(b.index) + " both wrote byte " + std::to_string(i) +
              " of " + w.what + " with no barrier between them (a write-after-write hazard)"));
        }
        l = {t, block_phase, warp_phase};
        w.seen[i] = w.data[i];
      }
    }
  }
}

inline Block* current = nullptr;  // the block of the thread being run
inline std::uint64_t progress = 0;  // arrivals, exits and block starts (see Fiber::idle_at)
inline thread_local dim3 thread_index, block_index;
inline thread_local unsigned thread_linear = 0;
inline Fiber* running = nullptr;
#if defined(__SANITIZE_ADDRESS__)
inline const void* scheduler_stack_bottom = nullptr;
inline std::size_t scheduler_stack_size = 0;
#endif

inline void switch_context(Context& from, Context& to, const void* to_stack, std::size_t to_size) {
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, to_stack, to_size);
#else
  (void)to_stack;
  (void)to_size;
#endif
#if defined(__x86_64__)
  hatch_emulation_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// From a thread (fiber) back to the block's scheduler.
inline void yield() {
  Fiber* f = running;
#if defined(__SANITIZE_ADDRESS__)
  switch_context(f->ctx, current->scheduler, scheduler_stack_bottom, scheduler_stack_size);
#else
  switch_context(f->ctx, current->scheduler, nullptr, 0);
#endif
}

inline void arrive_and_wait(Barrier& b) {
  if (current->racecheck) racecheck_commit(*current, running->linear);
  ++progress;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.phase;
    return;
  }
  const std::uint64_t phase = b.phase;
  while (b.phase == phase) yield();
}
inline void arrive_and_drop(Barrier& b) {
  --b.expected;
  if (b.arrived > 0 && b.arrived == b.expected) {
    b.arrived = 0;
    ++b.phase;
  }
}

// What a GPU leaves undefined and a fiber would get away with, refused (std::logic_error, reported
// by launch as the kernel's failure): a __syncthreads that some of the block's threads can never
// reach because they returned (legal only when the whole block returns, which never meets the
// barrier), and a warp-wide __syncwarp or shuffle in a warp that lacks lanes (one returned, or the
// block is not a whole number of warps) or, for the shuffle, whose mask leaves lanes out (hatch's
// kernels use full warps only; the emulator models nothing else).
inline unsigned block_threads(const Block& b) { return b.dim.x * b.dim.y * b.dim.z; }
inline std::string block_name(const Block& b) {
  return "block (" + std::to_string(b.index.x) + ", " + std::to_string(b.index.y) + ", " + std::to_string(b.index.z) +
         ")";
}
inline void require_whole_block(const char* what) {
  const Block& b = *current;
  if (b.all.expected != block_threads(b))
    throw std::logic_error(std::string("hatch_emulation: ") + what + " in " + block_name(b) + " after " +
                           std::to_string(block_threads(b) - b.all.expected) + " of its " +
                           std::to_string(block_threads(b)) +
                           " threads returned: undefined on a GPU unless the whole block returns");
}
inline void require_whole_warp(const char* what, unsigned mask) {
  const Barrier& w = current->warps[thread_linear / 32];
  if (mask != 0xffffffffu || w.expected != 32)
    throw std::logic_error(std::string("hatch_emulation: ") + what + " in " + block_name(*current) + ", warp " +
                           std::to_string(thread_linear / 32) + " with " + std::to_string(w.expected) +
                           " of 32 lanes present and mask " + std::to_string(mask) +
                           ": undefined on a GPU (full warps and the full mask only: a lane that returned, or a "
                           "block that is not a whole number of warps, never arrives)");
}
// A thread returning while others of its warp or block wait at a barrier it will never reach.
inline void require_no_waiters(const Block& b, unsigned linear) {
  const Barrier &warp = b.warps[linear / 32], &all = b.all;
  if (warp.arrived == 0 && all.arrived == 0) return;
  throw std::logic_error("hatch_emulation: thread " + std::to_string(linear) + " of " + block_name(b) +
                         ", warp " + std::to_string(linear / 32) + " returned while " +
                         (warp.arrived ? std::to_string(warp.arrived) + " threads of its warp wait at a __syncwarp "
                                                                         "or __shfl_xor_sync"
                                       : std::to_string(all.arrived) + " threads of its block wait at a "
                                                                        "__syncthreads") +
                         ": undefined on a GPU (a barrier that threads which returned never reach)");
}
// Checked on arrival (a thread returned before) and when a thread returns (threads wait for it at
// a barrier: fiber_main), so whichever order the threads run in.
inline void syncthreads() {
  require_whole_block("__syncthreads");
  arrive_and_wait(current->all);
}
inline void syncwarp() {
  require_whole_warp("__syncwarp", 0xffffffffu);
  arrive_and_wait(current->warps[thread_linear / 32]);
}

template <class T>
T shfl_xor(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "hatch_emulation: shuffles of at most 8 bytes");
  require_whole_warp("__shfl_xor_sync", mask);
  const unsigned t = thread_linear, warp = t / 32, partner = warp * 32 + ((t % 32) ^ unsigned(lane_mask));
  std::memcpy(current->exchange.data() + 8 * t, &v, sizeof(T));
  arrive_and_wait(current->warps[warp]);
  T r;
  std::memcpy(&r, current->exchange.data() + 8 * partner, sizeof(T));
  arrive_and_wait(current->warps[warp]);  // nobody overwrites a slot before its partner read it
  return r;
}

// A vector access (HATCH_ALIGNED_ACCESS in the kernels), or a kernel's pointer argument, that is
// not aligned to its size: a misaligned address on a GPU, which ends the context; on the host
// the access would just work. The error names the kernel's thread and the address.
inline void require_aligned(const void* p, std::size_t bytes, const char* file, int line) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  if (a % bytes == 0) return;
  throw std::logic_error("hatch_emulation: misaligned address: a " + std::to_string(bytes) + "-byte access at " +
                         std::to_string(a) + " (" + std::to_string(a % bytes) + " bytes past a multiple) by thread " +
                         index_name(thread_index) + " of block " + index_name(block_index) + ", " + file + ":" +
                         std::to_string(line) + ": a GPU stops the context there");
}
template <class A>
void require_aligned_argument(const A& a, std::size_t index) {
  if constexpr (std::is_pointer_v<A> && !std::is_void_v<std::remove_pointer_t<A>>) {
    constexpr std::size_t align = alignof(std::remove_cv_t<std::remove_pointer_t<A>>);
    const auto v = reinterpret_cast<std::uintptr_t>(a);
    if (v % align != 0)
      throw std::logic_error("hatch_emulation: misaligned address: kernel argument " + std::to_string(index) +
                             " points to a type aligned to " + std::to_string(align) + " bytes at " +
                             std::to_string(v) + ": a GPU stops the context at its first access");
  }
}

// Where every fiber starts: runs the kernel for its thread, then leaves both barriers for good.
inline void fiber_main() {
  Block& b = *current;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &scheduler_stack_bottom, &scheduler_stack_size);
#endif
  try {
    b.body(b.body_arg);
  } catch (...) {
    if (!b.error) b.error = std::current_exception();
  }
  Fiber* f = running;
  if (b.racecheck) racecheck_commit(b, f->linear);
  if (!b.error) {
    try {
      require_no_waiters(b, f->linear);
    } catch (...) {
      b.error = std::current_exception();
    }
  }
  f->done = true;
  ++progress;
  arrive_and_drop(b.warps[f->linear / 32]);
  arrive_and_drop(b.all);
  yield();  // never resumed
  std::terminate();
}
inline void start_fiber(Fiber& f) {
#if defined(__SANITIZE_ADDRESS__)
  // the previous block's thread left its frames' red zones poisoned (it never returned)
  __asan_unpoison_memory_region(f.stack.get(), kFiberStack);
#endif
#if defined(__x86_64__)
  auto top = reinterpret_cast<std::uintptr_t>(f.stack.get() + kFiberStack) & ~std::uintptr_t(15);
  auto* w = reinterpret_cast<std::uint64_t*>(top);
  std::uint32_t csr[2] = {0, 0};
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  w[-1] = 0;                                                                   // no caller
  w[-2] = reinterpret_cast<std::uint64_t>(&fiber_main);  // `ret` lands here
  for (int r = 3; r <= 8; ++r) w[-r] = 0;                                       // rbp, rbx, r12-r15
  std::memcpy(&w[-9], csr, 8);                                                  // mxcsr, x87 control word
  f.ctx.sp = &w[-9];
#else
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = f.stack.get();
  f.ctx.uc.uc_stack.ss_size = kFiberStack;
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, &fiber_main, 0);
#endif
}

// Blocks run one after another, first to last, unless HATCH_EMULATION_BLOCK_ORDER=reverse: a
// kernel whose blocks depend on each other's order (which a GPU does not keep) then shows it.
inline bool blocks_in_reverse() {
  const char* v = std::getenv("HATCH_EMULATION_BLOCK_ORDER");
  return v && std::strcmp(v, "reverse") == 0;
}

// Within a block, threads run in the order of their linear index unless
// HATCH_EMULATION_THREAD_ORDER says otherwise: "reverse" (last to first) or "shuffle" (a new
// random order in every round of the scheduler, from HATCH_EMULATION_SEED, default 1). A thread
// runs until it waits at a barrier, so with one order a missing barrier shows only when a thread
// reads what a later thread writes (or overwrites what a later thread still has to read); the
// other orders show the rest, as a GPU's warps, which keep no order, would now and then. With
// several blocks resident (HATCH_EMULATION_BLOCKS_AT_ONCE) the order runs over all their threads,
// and shuffled, a block stops at an atomic addition (see launch).
enum class ThreadOrder { forward, reverse, shuffle };
inline ThreadOrder thread_order() {
  const char* v = std::getenv("HATCH_EMULATION_THREAD_ORDER");
  if (!v || !*v || std::strcmp(v, "forward") == 0) return ThreadOrder::forward;
  if (std::strcmp(v, "reverse") == 0) return ThreadOrder::reverse;
  if (std::strcmp(v, "shuffle") == 0) return ThreadOrder::shuffle;
  throw std::invalid_argument(std::string("HATCH_EMULATION_THREAD_ORDER=") + v +
                              ": expected forward, reverse or shuffle");
}
inline std::uint64_t shuffle_seed() {
  const char* v = std::getenv("HATCH_EMULATION_SEED");
  if (!v || !*v) return 1;
  char* end = nullptr;
  const unsigned long long s = std::strtoull(v, &end, 10);
  if (*end != '\0') throw std::invalid_argument(std::string("HATCH_EMULATION_SEED=") + v + ": expected an integer");
  return s;
}

// splitmix64, one stream per process (every kernel, every round draws from it)
inline std::uint64_t next_random() {
  static std::uint64_t state = shuffle_seed() * 0x9E3779B97F4A7C15ull + 1;
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Fiber stacks, kept from one launch to the next.
inline std::vector<std::unique_ptr<unsigned char[]>>& stack_pool() {
  static std::vector<std::unique_ptr<unsigned char[]>> pool;
  return pool;
}

// How many blocks are resident at once, their threads interleaved by one scheduler
// (HATCH_EMULATION_BLOCKS_AT_ONCE, default 1: one block after another). With several, and threads
// shuffled, one block's threads run between another's, so a block that reads what another block
// has not written yet (a missing barrier before a "last block" counter, say) shows it.
inline unsigned blocks_at_once() {
  const char* v = std::getenv("HATCH_EMULATION_BLOCKS_AT_ONCE");
  if (!v || !*v) return 1;
  char* end = nullptr;
  const unsigned long n = std::strtoul(v, &end, 10);
  if (*end != '\0' || n < 1 || n > 32)
    throw std::invalid_argument(std::string("HATCH_EMULATION_BLOCKS_AT_ONCE=") + v + ": expected 1 to 32");
  return unsigned(n);
}

// a block's dynamic shared memory, 16-byte aligned
inline unsigned char* dynamic_shared_of(Block& b) {
  auto p = reinterpret_cast<std::uintptr_t>(b.shared.data());
  return reinterpret_cast<unsigned char*>((p + 15) & ~std::uintptr_t(15));
}

template <class Kernel, class... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, std::size_t shared_bytes, Args... args) {
  static std::mutex mu;  // one launch at a time: `current` and `running` are process-wide
  std::lock_guard<std::mutex> lock(mu);
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0) throw std::logic_error("hatch_emulation: a block of no threads");
  {
    std::size_t index = 0;
    (require_aligned_argument(args, index++), ...);
  }
  auto call = [&] { kernel(args...); };
  using Call = decltype(call);
  const std::uint64_t blocks = std::uint64_t(grid.x) * grid.y * grid.z;
  const unsigned slots = unsigned(std::min<std::uint64_t>(blocks_at_once(), blocks));
  auto& pool = stack_pool();
  while (pool.size() < std::size_t(slots) * threads) pool.push_back(std::make_unique<unsigned char[]>(kFiberStack));
  std::vector<Block> res(slots);
  for (unsigned s = 0; s < slots; ++s) {
    Block& b = res[s];
    b.dim = block;
    b.grid = grid;
    b.body = [](void* p) { (*static_cast<Call*>(p))(); };
    b.body_arg = &call;
    b.fibers.resize(threads);
    for (unsigned t = 0; t < threads; ++t) {
      b.fibers[t].stack = std::move(pool[std::size_t(s) * threads + t]);
      b.fibers[t].linear = t;
      b.fibers[t].index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    }
  }
  struct Restore {  // the stacks go back to the pool whatever happens
    std::vector<Block>& res;
    std::vector<std::unique_ptr<unsigned char[]>>& pool;
    ~Restore() {
      for (std::size_t s = 0; s < res.size(); ++s)
        for (std::size_t t = 0; t < res[s].fibers.size(); ++t)
          pool[s * res[s].fibers.size() + t] = std::move(res[s].fibers[t].stack);
      current = nullptr;
      running = nullptr;
    }
  } restore{res, pool};
  const bool reverse = blocks_in_reverse();
  const ThreadOrder order = thread_order();
  const bool racecheck = racecheck_on();
  const bool shuffle = order == ThreadOrder::shuffle;
  std::uint64_t next_block = 0;
  auto start_block = [&](Block& b) {  // the grid's next block into slot b, if any is left
    b.live = 0;
    if (next_block == blocks) return;
    const std::uint64_t l = reverse ? blocks - 1 - next_block : next_block;
    ++next_block;
    b.index = dim3(unsigned(l % grid.x), unsigned((l / grid.x) % grid.y),
                   unsigned(l / (std::uint64_t(grid.x) * grid.y)));  // the same for all its fibers
    b.all = Barrier{threads};
    b.warps.assign((threads + 31) / 32, Barrier{});
    for (unsigned w = 0; w < b.warps.size(); ++w) b.warps[w].expected = std::min(32u, threads - 32 * w);
    b.exchange.assign(8 * std::size_t(threads), 0);
    b.shared.assign(shared_bytes + 16, 0xff);  // uninitialised, as on the device: NaN as floats
    b.racecheck = racecheck;
    b.watched.clear();
    if (racecheck) {
      if (shared_bytes) b.watched.emplace_back(dynamic_shared_of(b), shared_bytes, "dynamic shared memory");
      for (auto& v : b.statics) b.watched.emplace_back(v.bytes.get(), v.size, "a static shared variable");
    }
    b.held = 0;
    b.hold_on_atomic = shuffle && slots > 1;
    for (auto& f : b.fibers) {
      f.done = false;
      f.idle_at = ~std::uint64_t(0);
      start_fiber(f);
    }
    b.live = threads;
    ++progress;
  };
  for (auto& b : res) start_block(b);
  // the order of (slot, thread) in a round of the scheduler: slot by slot, threads by index
  std::vector<std::pair<unsigned, unsigned>> turn;
  for (unsigned s = 0; s < slots; ++s)
    for (unsigned t = 0; t < threads; ++t) turn.emplace_back(s, t);
  if (order == ThreadOrder::reverse) std::reverse(turn.begin(), turn.end());
  // Shuffled, with several blocks resident: a block whose thread makes an atomic addition stops
  // there, its other threads wherever they were, until no other resident block can run; then the
  // one that stopped last goes on first. A "last block" counter raised before the block's sums
  // were all written then shows: the block that raises it last reads the others' sums first.
  for (;;) {
    if (shuffle)
      for (std::size_t i = turn.size(); i > 1; --i) std::swap(turn[i - 1], turn[next_random() % i]);
    Block* latest = nullptr;
    bool others = false;
    for (auto& b : res) {
      if (b.live == 0) continue;
      others = others || b.held == 0;
      if (b.held > 0 && (!latest || b.held > latest->held)) latest = &b;
    }
    if (!others && latest) latest->held = 0;
    bool any = false;
    for (const auto& [s, t] : turn) {
      Block& b = res[s];
      Fiber& f = b.fibers[t];
      if (b.live == 0 || f.done) continue;
      any = true;
      if (b.held > 0) continue;
      current = &b;
      running = &f;
      thread_linear = f.linear;
      thread_index = f.index;
      block_index = b.index;
      switch_context(b.scheduler, f.ctx, f.stack.get(), kFiberStack);
      f.idle_at = progress;  // it waits at a barrier (or has returned)
      if (f.done && --b.live == 0) {
        if (b.error) std::rethrow_exception(b.error);
        start_block(b);
      }
    }
    if (!any) break;
    // a deadlock: every waiting thread has run since anything last moved, and none got further
    bool live = false, stuck = true;
    for (const auto& b : res) {
      live = live || b.live > 0;
      for (const auto& f : b.fibers) stuck = stuck && (b.live == 0 || f.done || f.idle_at == progress);
    }
    if (live && stuck) {
      for (auto& b : res)
        if (b.error) std::rethrow_exception(b.error);
      throw std::logic_error("hatch_emulation: deadlock: threads wait at barriers the others never reach");
    }
  }
}

// The storage of a HATCH_STATIC_SHARED variable of type A (declared at `key`) for the block of
// the thread that runs: one per resident block, 0xff bytes (NaN as floats) when first made.
template <class A>
A& static_shared(const void* key) {
  Block& b = *current;
  for (auto& v : b.statics)
    if (v.key == key) return *reinterpret_cast<A*>(v.bytes.get());
  auto bytes = std::make_unique<unsigned char[]>(sizeof(A));  // aligned as operator new[] aligns
  std::memset(bytes.get(), 0xff, sizeof(A));
  unsigned char* p = bytes.get();
  b.statics.push_back({key, std::move(bytes), sizeof(A)});
  if (b.racecheck) b.watched.emplace_back(p, sizeof(A), "a static shared variable");
  return *reinterpret_cast<A*>(p);
}

inline std::uint64_t atomics_made = 0;  // numbers the atomic additions that stop a block
template <class T>
T atomic_add(T* p, T v) {
  if (current && current->hold_on_atomic) current->held = ++atomics_made;
  const T old = std::atomic_ref<T>(*p).fetch_add(v);
  if (current && current->racecheck) {  // an atomic addition to shared memory races with nobody
    const auto* b = reinterpret_cast<const unsigned char*>(p);
    for (Watched& w : current->watched)
      if (b >= w.data && b + sizeof(T) <= w.data + w.size) std::memcpy(w.seen.data() + (b - w.data), b, sizeof(T));
  }
  return old;
}

// the block's dynamic shared memory
inline unsigned char* dynamic_shared() { return dynamic_shared_of(*current); }

}  // namespace hatch_emulation

// CUDA's vector type, at global scope as there
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

#define __global__
#define __device__
#define __host__
// Static shared memory is declared with HATCH_STATIC_SHARED (backend/cuda_kernels.cuh), so that
// each resident block has its own; a plain __shared__ variable would be one for all of them.
#define __shared__ hatch_emulation_declare_static_shared_memory_with_HATCH_STATIC_SHARED
#define HATCH_STATIC_SHARED(T, name, extents)      \
  static char name##_hatch_static_shared_key = 0; \
  auto& name = ::hatch_emulation::static_shared<T extents>(&name##_hatch_static_shared_key)
#define __forceinline__ inline
#define __restrict__
#define threadIdx (::hatch_emulation::thread_index)
#define blockIdx (::hatch_emulation::block_index)
#define blockDim (::hatch_emulation::current->dim)
#define gridDim (::hatch_emulation::current->grid)
#define __syncthreads() ::hatch_emulation::syncthreads()
#define __syncwarp() ::hatch_emulation::syncwarp()
#define __shfl_xor_sync(mask, v, lane_mask) ::hatch_emulation::shfl_xor(unsigned(mask), (v), (lane_mask))
#define __threadfence() std::atomic_thread_fence(std::memory_order_seq_cst)
#define __ldcg(p) (*(p))
#define HATCH_ALIGNED_ACCESS(p, bytes) ::hatch_emulation::require_aligned((p), (bytes), __FILE__, __LINE__)
#define atomicAdd(p, v) ::hatch_emulation::atomic_add((p), (v))

#define HATCH_DYNAMIC_SHARED(name) unsigned char* name = ::hatch_emulation::dynamic_shared()
