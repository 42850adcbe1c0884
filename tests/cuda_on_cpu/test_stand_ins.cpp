// The stand-ins of tests/cuda_on_cpu refuse what a GPU refuses: each rule the CUDA suite relies on
// them to enforce, broken on purpose here. (hatch_cuda_on_cpu_tests)
#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "hatch/cuda.hpp"

using hatch::Cuda;

namespace {

template <int Tag>
__global__ void write_shared(float* out) {
  HATCH_DYNAMIC_SHARED(smem);
  auto* s = reinterpret_cast<float*>(smem);
  s[threadIdx.x] = float(threadIdx.x + Tag);
  __syncthreads();
  out[threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}

// Half of warp 0 waits at the block barrier, the other half at the warp barrier: neither can
// complete (on a GPU: a hang, or undefined behaviour).
__global__ void divergent_barriers(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  else __syncwarp();
  out[threadIdx.x] = 1.f;
}

// Undefined on a GPU, and refused by the emulator: a shuffle whose warp lost a lane that returned,
// a shuffle whose mask leaves lanes out, a __syncthreads after some (not all) threads returned,
// and a __syncwarp in a warp of fewer than 32 threads.
__global__ void shuffle_after_return(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}
__global__ void shuffle_half_mask(float* out) { out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, float(threadIdx.x), 1); }
__global__ void barrier_after_return(float* out) {
  if (threadIdx.x >= 40) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}
__global__ void syncwarp_partial(float* out) {
  __syncwarp();
  out[threadIdx.x] = 1.f;
}
// Defined: a whole block returns before a barrier (its threads never meet it), whole warps return
// before a shuffle.
__global__ void uniform_returns(float* out) {
  if (blockIdx.x == 1) return;
  if (threadIdx.x >= 32) return;
  __syncwarp();
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

// Wrong on a GPU: each block reads what the block before it wrote (blocks run in no fixed order).
__global__ void chain_blocks(float* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = blockIdx.x == 0 ? 1.f : out[blockIdx.x - 1] + 1.f;
}

__global__ void copy_floats(const float* src, float* dst, int n) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) dst[i] = src[i];
}

// Wrong on a GPU: no barrier between each thread's write to shared memory and its read of a
// neighbour's slot (`step` threads on, wrapping). Which wrong values show depends on the order the
// threads run in.
__global__ void read_neighbour_unsynced(float* out, int step) {
  HATCH_DYNAMIC_SHARED(smem);
  auto* s = reinterpret_cast<float*>(smem);
  s[threadIdx.x] = float(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + blockDim.x + step) % blockDim.x];  // __syncthreads() missing
}

// A grid-wide sum whose last block adds the blocks' partial sums (the pattern of LayerNorm's
// one-kernel backward), with or without the barrier that makes every thread's partial written
// before the block is counted.
__global__ void last_block_sum(float* partial, unsigned* counter, float* out, int cols, bool barrier) {
  const int tid = int(threadIdx.x);
  for (int c = tid; c < cols; c += int(blockDim.x)) partial[std::size_t(blockIdx.x) * cols + c] = 1.f;
  __threadfence();
  if (barrier) __syncthreads();
  HATCH_STATIC_SHARED(bool, last, );
  if (tid == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  for (int c = tid; c < cols; c += int(blockDim.x)) {
    float s = 0.f;
    for (unsigned b = 0; b < gridDim.x; ++b) s += partial[std::size_t(b) * cols + c];
    out[c] = s;
  }
}

// Wrong on a GPU: every thread adds to one shared total without an atomic (updates get lost). One
// thread at a time, as the emulator runs them, adds up right in every order. With `atomic`, right.
__global__ void count_unsynced(float* out, bool atomic) {
  HATCH_STATIC_SHARED(float, total, );
  if (threadIdx.x == 0) total = 0.f;
  __syncthreads();
  if (atomic) atomicAdd(&total, 1.f);
  else total += 1.f;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = total;
}

// Thread 0 writes a shared slot, then thread `second` does, a barrier between them: a block barrier
// orders them, a warp barrier only if both are in its warp.
__global__ void write_in_turn(float* out, int second, bool block_barrier) {
  HATCH_DYNAMIC_SHARED(smem);
  auto* slot = reinterpret_cast<float*>(smem);
  if (threadIdx.x == 0) slot[0] = 1.5f;
  if (block_barrier) __syncthreads();
  else __syncwarp();
  if (int(threadIdx.x) == second) slot[0] = 2.75f;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = slot[0];
}

// Sets an environment variable for a scope, then puts back what was there.
class ScopedEnv {
 public:
  explicit ScopedEnv(const char* name) : name_(name) {
    if (const char* v = std::getenv(name)) saved_ = v;
  }
  void set(const char* value) {
    if (value) setenv(name_, value, 1);
    else unsetenv(name_);
  }
  ~ScopedEnv() { set(saved_ ? saved_->c_str() : nullptr); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> saved_;
};

std::string error_of(auto&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("cuda_on_cpu: more than 48 KiB of dynamic shared memory needs the kernel's own opt-in") {
  float* out = Cuda::allocate(64);
  constexpr std::size_t big = 64 * 1024;
  CHECK(error_of([&] { HATCH_CUDA_LAUNCH_SHARED(write_shared<0>, 1, 64, big, out); }).find("cudaErrorInvalidValue") !=
        std::string::npos);
  hatch::cuda_detail::allow_shared_bytes(write_shared<0>, big);  // cudaFuncSetAttribute for this kernel
  HATCH_CUDA_LAUNCH_SHARED(write_shared<0>, 1, 64, big, out);
  std::vector<float> host(64);
  Cuda::download(host.data(), out, 64);
  CHECK(host[0] == 63.f);
  CHECK(host[63] == 0.f);
  // Another kernel of the same signature has not been allowed anything, and allow_shared_bytes
  // must allow it too (the fault it once had: one opt-in per signature instead of per kernel).
  CHECK(error_of([&] { HATCH_CUDA_LAUNCH_SHARED(write_shared<1>, 1, 64, big, out); }).find("cudaErrorInvalidValue") !=
        std::string::npos);
  hatch::cuda_detail::allow_shared_bytes(write_shared<1>, big);
  HATCH_CUDA_LAUNCH_SHARED(write_shared<1>, 1, 64, big, out);
  Cuda::deallocate(out, 64);
}

TEST_CASE("cuda_on_cpu: launch limits, barriers no thread can pass, copies, GEMM operands, cuBLASLt epilogues") {
  float* out = Cuda::allocate(2048);
  CHECK(error_of([&] { HATCH_CUDA_LAUNCH(divergent_barriers, 1, 1025, out); }).find("cudaErrorInvalidConfiguration") !=
        std::string::npos);
  CHECK(error_of([&] { HATCH_CUDA_LAUNCH(divergent_barriers, dim3(1, 65536), 32, out); })
            .find("cudaErrorInvalidConfiguration") != std::string::npos);
  // (a kernel runs when the host waits for it: the deadlock shows at the wait, as a GPU would hang there)
  CHECK(error_of([&] {
          HATCH_CUDA_LAUNCH(divergent_barriers, 1, 32, out);
          Cuda::synchronize();
        }).find("deadlock") != std::string::npos);

  // shuffles and barriers that lanes which returned (or never existed) cannot join
  const auto launched = [&](auto kernel, unsigned blocks, unsigned threads) {
    return error_of([&] {
      HATCH_CUDA_LAUNCH(kernel, blocks, threads, out);
      Cuda::synchronize();
    });
  };
  // (which message depends on the order the threads ran in: a shuffle reached after the lane
  // returned, or the lane returning while others wait at the shuffle)
  const auto undefined_in = [](const std::string& err, const std::string& where) {
    return err.find("undefined on a GPU") != std::string::npos && err.find(where) != std::string::npos;
  };
  CHECK(undefined_in(launched(shuffle_after_return, 1, 64), "block (0, 0, 0), warp 0"));
  CHECK(launched(shuffle_half_mask, 1, 64).find("with 32 of 32 lanes present and mask 65535") != std::string::npos);
  CHECK(undefined_in(launched(barrier_after_return, 1, 64), "__syncthreads"));
  CHECK(launched(syncwarp_partial, 1, 48).find("__syncwarp in block (0, 0, 0), warp 1 with 16 of 32 lanes") !=
        std::string::npos);
  CHECK(launched(uniform_returns, 2, 64).empty());
  CHECK(launched(syncwarp_partial, 1, 64).empty());

  // 128-bit accesses at addresses that are not multiples of 16 (a GPU stops the context there;
  // the host would just read): hatch's own kernels, given misaligned pointers on purpose. The
  // launchers never do this: they pick 4-wide forms only for aligned pointers (below).
  const auto misaligned = [](const std::string& err) { return err.find("misaligned address") != std::string::npos; };
  // add4 with its output `skew` floats past a multiple of 4; a register LayerNorm (128-bit packs)
  // with its output and input rows so
  const auto add4_skewed = [&](int skew) {
    const auto as4 = [](float* p) { return reinterpret_cast<float4*>(p); };
    return error_of([&] {
      HATCH_CUDA_LAUNCH(hatch::cuda_kernels::add4<float4>, 1, 32, as4(out + skew), as4(out + 512), as4(out + 1024),
                        std::size_t(64));
      Cuda::synchronize();
    });
  };
  const auto layer_norm_skewed = [&](int skew) {
    return error_of([&] {
      HATCH_CUDA_LAUNCH((hatch::cuda_kernels::layer_norm_forward_regs<float, 4, 4>), 1, hatch::cuda_detail::kRowBlock,
                        out + skew, out + 600, out + 700, out + 800 + skew, out + 900, out + 1000, 4, 64, 1e-6f);
      Cuda::synchronize();
    });
  };
  CHECK(misaligned(add4_skewed(1)));
  CHECK(misaligned(layer_norm_skewed(1)));
  CHECK(add4_skewed(0).empty());  // the same launches, aligned: no complaint
  CHECK(layer_norm_skewed(0).empty());
  // what the launchers do with misaligned pointers: the 1-wide forms, and right values
  {
    const std::vector<float> a(257, 1.5f), b(257, 2.f);
    (void)cudaMemcpy(out + 1, a.data(), 257 * sizeof(float), cudaMemcpyHostToDevice);
    (void)cudaMemcpy(out + 513, b.data(), 257 * sizeof(float), cudaMemcpyHostToDevice);
    Cuda::add(out + 1025, out + 1, out + 513, 256);  // a multiple of 4, every pointer 4 bytes past 16
    std::vector<float> sum(256);
    (void)cudaMemcpy(sum.data(), out + 1025, 256 * sizeof(float), cudaMemcpyDeviceToHost);
    CHECK(sum == std::vector<float>(256, 3.5f));
  }

  std::vector<float> host(2048, 1.f);
  // a copy "to the device" whose destination is host memory, and one that runs past its block
  CHECK(error_of([&] { (void)cudaMemcpy(host.data(), host.data() + 1024, 16, cudaMemcpyHostToDevice); })
            .find("illegal address") != std::string::npos);
  CHECK(error_of([&] { (void)cudaMemcpy(out + 2000, host.data(), 49 * sizeof(float), cudaMemcpyHostToDevice); })
            .find("illegal address") != std::string::npos);
  CHECK(cudaMemcpy(out, out + 100, 16, cudaMemcpyHostToDevice) == cudaErrorInvalidValue);  // the source is device memory
  (void)cudaGetLastError();

  // a GEMM on a handle without a workspace of the caller's (cuBLAS would allocate one itself), and
  // cublasSetStream taking the workspace away again, as cuBLAS documents (what hatch's handle met)
  cublasHandle_t h = nullptr;
  REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
  const float one = 1.f, zero = 0.f;
  const auto gemm_8x8 = [&] {
    (void)cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 8, 8, 8, &one, out, 8, out + 64, 8, &zero, out + 128, 8);
  };
  CHECK(error_of(gemm_8x8).find("without the caller's workspace") != std::string::npos);
  float* workspace = Cuda::allocate(1024);
  REQUIRE(cublasSetWorkspace(h, workspace, 1024 * sizeof(float)) == CUBLAS_STATUS_SUCCESS);
  CHECK(error_of(gemm_8x8).empty());
  REQUIRE(cublasSetStream(h, Cuda::stream()) == CUBLAS_STATUS_SUCCESS);
  CHECK(error_of(gemm_8x8).find("without the caller's workspace") != std::string::npos);
  REQUIRE(cublasSetWorkspace(h, workspace, 1024 * sizeof(float)) == CUBLAS_STATUS_SUCCESS);
  Cuda::synchronize();
  // a GEMM whose C, 32 x 64 with ld 32, does not fit the 2048 floats it starts in at out + 1
  CHECK(error_of([&] {
          (void)cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 32, 64, 1, &one, out, 32, out, 1, &zero, out + 1, 32);
        }).find("GEMM operand C") != std::string::npos);
  CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 32, 64, 1, &one, out, 16, out, 1, &zero, out, 32) ==
        CUBLAS_STATUS_INVALID_VALUE);  // lda < m
  (void)cublasDestroy(h);
  Cuda::deallocate(workspace, 1024);

  // cuBLASLt: a bias pointer on a plan without a bias epilogue is refused (what run 3a hit on an H200)
  cublasLtHandle_t lt = nullptr;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
  REQUIRE(cublasLtCreate(&lt) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, 8, 4, 8) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, 4, 8, 4) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatrixLayoutCreate(&ld, CUDA_R_32F, 8, 8, 8) == CUBLAS_STATUS_SUCCESS);
  cublasLtMatmulAlgo_t algo{};
  float* d = out + 1024;
  CHECK(cublasLtMatmul(lt, desc, &one, out, la, out + 256, lb, &zero, d, ld, d, ld, &algo, nullptr, 0, nullptr) ==
        CUBLAS_STATUS_SUCCESS);
  void* bias = out + 512;
  REQUIRE(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias) ==
          CUBLAS_STATUS_SUCCESS);
  CHECK(cublasLtMatmul(lt, desc, &one, out, la, out + 256, lb, &zero, d, ld, d, ld, &algo, nullptr, 0, nullptr) ==
        CUBLAS_STATUS_INVALID_VALUE);
  (void)cublasLtMatrixLayoutDestroy(la);
  (void)cublasLtMatrixLayoutDestroy(lb);
  (void)cublasLtMatrixLayoutDestroy(ld);
  (void)cublasLtMatmulDescDestroy(desc);
  (void)cublasLtDestroy(lt);
  Cuda::deallocate(out, 2048);
}

#if !defined(HATCH_CUDA_ON_CPU_EXACT_BLOCKS)
// Runs `body` in a child process and returns what it wrote to stderr, and whether a signal ended it.
template <class F>
std::pair<std::string, bool> in_child(F body) {
  int pipe_fd[2];
  REQUIRE(pipe(pipe_fd) == 0);
  std::fflush(nullptr);
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    dup2(pipe_fd[1], 2);
    close(pipe_fd[0]);
    signal(SIGSEGV, SIG_DFL);  // no test framework's report in the child: the stand-in's message, then the signal
    hatch_cuda_on_cpu::ensure_segv_handler();
    body();
    _exit(0);
  }
  close(pipe_fd[1]);
  std::string err;
  char buf[512];
  for (ssize_t n; (n = read(pipe_fd[0], buf, sizeof buf)) > 0;) err.append(buf, std::size_t(n));
  close(pipe_fd[0]);
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  return {err, WIFSIGNALED(status)};
}

TEST_CASE("cuda_on_cpu: host code that touches device memory stops with a message naming the address") {
  float* p = Cuda::allocate(16);
  Cuda::synchronize();
  const auto [err, signalled] = in_child([p] {
    volatile float* v = p;
    v[3] = 1.f;  // what a GPU program cannot do
  });
  CHECK(signalled);
  CHECK(err.find("host code touched device memory") != std::string::npos);
  // device work on the same memory is fine
  Cuda::fill(p, 16, 2.f);
  std::vector<float> host(16);
  Cuda::download(host.data(), p, 16);
  CHECK(host[3] == 2.f);
  Cuda::deallocate(p, 16);
}

// A kernel handed a tensor already freed reads whatever its block holds now. With the cache (the
// default) that block is still hatch's, so nothing can tell; without it (HATCH_CUDA_CACHING=0) the
// block is the driver's again, and the read faults: on a GPU under compute-sanitizer memcheck, here
// at once.
TEST_CASE("cuda_on_cpu: without caching, a kernel that reads a freed tensor stops with a message") {
  const bool was = Cuda::memory_caching();
  auto read_freed = [](bool caching) {
    return in_child([caching] {
      Cuda::set_memory_caching(caching);
      float* dst = Cuda::allocate(64);
      float* src = Cuda::allocate(64);
      Cuda::fill(src, 64, 1.f);
      Cuda::deallocate(src, 64);
      HATCH_CUDA_LAUNCH(copy_floats, 1, 64, src, dst, 64);
      Cuda::synchronize();
    });
  };
  CHECK_FALSE(read_freed(true).second);  // the cache hides it
  const auto [err, signalled] = read_freed(false);
  CHECK(signalled);
  CHECK(err.find("device work touched device memory") != std::string::npos);
  CHECK(err.find("a freed one") != std::string::npos);
  CHECK(Cuda::memory_caching() == was);  // (the child's setting stayed there)
}
#endif

TEST_CASE("cuda_on_cpu: HATCH_EMULATION_BLOCK_ORDER=reverse runs a grid's blocks last to first") {
  ScopedEnv order_env("HATCH_EMULATION_BLOCK_ORDER"), at_once_env("HATCH_EMULATION_BLOCKS_AT_ONCE");
  at_once_env.set(nullptr);  // one block after another
  float* out = Cuda::allocate(8);
  std::vector<float> host(8);
  auto run = [&](const char* order) {
    Cuda::fill(out, 8, 0.f);
    order_env.set(order);
    HATCH_CUDA_LAUNCH(chain_blocks, 8, 32, out);
    Cuda::download(host.data(), out, 8);
    return host[7];
  };
  CHECK(run(nullptr) == 8.f);    // in order, the chain happens to hold
  CHECK(run("reverse") == 1.f);  // last to first, block 7 reads block 6's value before it exists
  Cuda::deallocate(out, 8);
}

// A missing __syncthreads shows only when a thread reads a slot before its writer ran: reading
// the next thread's slot fails in thread order, the previous thread's only in reverse order, and
// both fail in a shuffled order (each round of the scheduler draws a new one).
TEST_CASE("cuda_on_cpu: HATCH_EMULATION_THREAD_ORDER runs a block's threads in order, reversed or shuffled") {
  ScopedEnv order_env("HATCH_EMULATION_THREAD_ORDER");
  constexpr int kThreads = 64;
  float* out = Cuda::allocate(kThreads);
  std::vector<float> host(kThreads);
  // how many threads read their neighbour's value (`step` on) as it should be
  auto right = [&](const char* order, int step) {
    order_env.set(order);
    HATCH_CUDA_LAUNCH_SHARED(read_neighbour_unsynced, 1, kThreads, kThreads * sizeof(float), out, step);
    Cuda::download(host.data(), out, kThreads);
    int n = 0;
    for (int t = 0; t < kThreads; ++t) n += host[t] == float((t + kThreads + step) % kThreads);
    return n;
  };
  // In order, thread t reads thread t + 1's slot before it was written: uninitialised (NaN), except
  // for the last thread, which reads thread 0's.
  CHECK(right(nullptr, +1) == 1);
  CHECK(std::isnan(host[0]));  // dynamic shared memory starts uninitialised: 0xff bytes, NaN
  CHECK(right("forward", -1) == kThreads - 1);  // and the first thread reads the last's: not written yet
  CHECK(right("reverse", +1) == kThreads - 1);
  CHECK(right("reverse", -1) == 1);
  const int next = right("shuffle", +1), previous = right("shuffle", -1);
  CHECK(next < kThreads - 8);
  CHECK(previous < kThreads - 8);
  CHECK(next > 8);  // a random order, not one of the two above
  CHECK(previous > 8);
  order_env.set("backwards");
  CHECK(error_of([] { (void)hatch_emulation::thread_order(); }) ==
        "HATCH_EMULATION_THREAD_ORDER=backwards: expected forward, reverse or shuffle");
  Cuda::deallocate(out, kThreads);
}

// A fault in device work ends a GPU's context: what was queued behind it never runs. Here too, or
// a copy queued behind a failed kernel would run at some later wait and write into host memory
// its caller has long given up.
TEST_CASE("cuda_on_cpu: after device work fails, the work queued behind it never runs") {
  float* out = Cuda::allocate(32);
  float* pinned = nullptr;
  REQUIRE(cudaMallocHost(reinterpret_cast<void**>(&pinned), 32 * sizeof(float)) == cudaSuccess);
  Cuda::fill(out, 32, 1.f);
  HATCH_CUDA_LAUNCH(divergent_barriers, 1, 32, out);
  REQUIRE(cudaMemcpyAsync(pinned, out, 32 * sizeof(float), cudaMemcpyDeviceToHost, Cuda::stream()) == cudaSuccess);
  CHECK(error_of([] { Cuda::synchronize(); }).find("deadlock") != std::string::npos);
  // The copy behind the kernel was dropped: its destination keeps what issuing it left there
  // (0xff bytes, NaN: a copy into pinned memory is not done until it runs), not the 1s of `out`,
  // also after the next wait.
  CHECK(std::isnan(pinned[0]));
  Cuda::synchronize();
  CHECK(std::isnan(pinned[0]));
  REQUIRE(cudaFreeHost(pinned) == cudaSuccess);
  Cuda::deallocate(out, 32);
}

// Threads run one at a time from barrier to barrier, so a lost update cannot happen here and no
// order shows it; HATCH_EMULATION_RACECHECK=1 sees two threads change the same shared bytes
// between barriers and stops the kernel with both named.
TEST_CASE("cuda_on_cpu: HATCH_EMULATION_RACECHECK=1 reports two threads writing shared memory between barriers") {
  ScopedEnv race_env("HATCH_EMULATION_RACECHECK"), order_env("HATCH_EMULATION_THREAD_ORDER"),
      block_order_env("HATCH_EMULATION_BLOCK_ORDER"), at_once_env("HATCH_EMULATION_BLOCKS_AT_ONCE");
  block_order_env.set(nullptr);  // (the threads named below are those of the first block, run first)
  at_once_env.set(nullptr);
  float* out = Cuda::allocate(1);
  auto total = [&](const char* racecheck, bool atomic, const char* order = nullptr) {
    race_env.set(racecheck);
    order_env.set(order);
    HATCH_CUDA_LAUNCH(count_unsynced, 2, 64, out, atomic);
    float v = 0;
    Cuda::download(&v, out, 1);
    return v;
  };
  for (const char* order : {"forward", "reverse", "shuffle"}) {
    CAPTURE(order);
    CHECK(total(nullptr, false, order) == 64.f);  // the blind spot: right in every order
    const std::string err = error_of([&] { (void)total("1", false, order); });
    CHECK(err.find("hatch_emulation: racecheck: threads (") != std::string::npos);
    CHECK(err.find("of block (") != std::string::npos);
    CHECK(err.find("both wrote byte") != std::string::npos);
    CHECK(err.find("of a static shared variable with no barrier between them") != std::string::npos);
    CHECK(total("1", true, order) == 64.f);  // atomic additions race with nobody
  }
  // in order, the last thread to arrive at the barrier goes on first: it adds, then thread 0
  CHECK(error_of([&] { (void)total("1", false); }).find("threads (63,0,0) and (0,0,0) of block (0,0,0)") !=
        std::string::npos);
  auto in_turn = [&](int second, bool block_barrier) {
    race_env.set("1");
    order_env.set(nullptr);
    return error_of([&] {
      HATCH_CUDA_LAUNCH_SHARED(write_in_turn, 1, 64, sizeof(float), out, second, block_barrier);
      float v = 0;
      Cuda::download(&v, out, 1);
      CHECK(v == 2.75f);
    });
  };
  CHECK(in_turn(1, false) == "");   // one warp: its barrier orders the two writes
  CHECK(in_turn(32, true) == "");   // two warps, a block barrier
  CHECK(in_turn(32, false).find("threads (0,0,0) and (32,0,0) of block (0,0,0) both wrote byte") !=
        std::string::npos);  // a warp barrier does not order two warps
  CHECK(in_turn(32, false).find("of dynamic shared memory") != std::string::npos);
  race_env.set("yes");
  CHECK(error_of([] { (void)hatch_emulation::racecheck_on(); }) == "HATCH_EMULATION_RACECHECK=yes: expected 0 or 1");
  Cuda::deallocate(out, 1);
}

// With several blocks resident and threads shuffled, a block stops at its atomic addition until
// the others cannot go on, and the last to stop goes on first: the last block then reads the
// other blocks' partial sums before their unsynchronised threads wrote them.
TEST_CASE("cuda_on_cpu: HATCH_EMULATION_BLOCKS_AT_ONCE interleaves blocks: a last-block sum without its barrier shows") {
  ScopedEnv order_env("HATCH_EMULATION_THREAD_ORDER"), at_once_env("HATCH_EMULATION_BLOCKS_AT_ONCE"),
      block_order_env("HATCH_EMULATION_BLOCK_ORDER");
  constexpr int kBlocks = 3, kThreads = 64, kCols = 100;
  float* partial = Cuda::allocate(kBlocks * kCols);
  float* out = Cuda::allocate(kCols);
  unsigned* counter = nullptr;
  REQUIRE(cudaMalloc(&counter, sizeof(unsigned)) == cudaSuccess);
  std::vector<float> host(kCols);
  auto sums_right = [&](const char* order, const char* at_once, bool barrier) {
    order_env.set(order);
    at_once_env.set(at_once);
    REQUIRE(cudaMemset(counter, 0, sizeof(unsigned)) == cudaSuccess);
    Cuda::fill(partial, kBlocks * kCols, 0.f);
    HATCH_CUDA_LAUNCH(last_block_sum, kBlocks, kThreads, partial, counter, out, kCols, barrier);
    Cuda::download(host.data(), out, kCols);
    bool right = true;
    for (float v : host) right = right && v == float(kBlocks);
    return right;
  };
  for (const char* blocks_order : {"forward", "reverse"}) {
    block_order_env.set(blocks_order);
    CHECK(sums_right(nullptr, nullptr, false));  // one block after another hides the fault
    CHECK(sums_right("shuffle", "1", false));
    CHECK(sums_right("shuffle", "4", true));     // with the barrier: right in every schedule
    CHECK(sums_right("forward", "4", false));    // interleaved in order: every thread of a round runs
    for (int i = 0; i < 5; ++i) CHECK_FALSE(sums_right("shuffle", "4", false));  // shown every time
  }
  at_once_env.set("0");
  CHECK(error_of([] { (void)hatch_emulation::blocks_at_once(); }) ==
        "HATCH_EMULATION_BLOCKS_AT_ONCE=0: expected 1 to 32");
  REQUIRE(cudaFree(counter) == cudaSuccess);
  Cuda::deallocate(out, kCols);
  Cuda::deallocate(partial, kBlocks * kCols);
}

TEST_CASE("cuda_on_cpu: out of device memory, the caching allocator gives its cached blocks back and tries again") {
  const bool was = Cuda::memory_caching();
  Cuda::set_memory_caching(true);
  Cuda::release_cache();
  ScopedEnv memory_env("HATCH_CUDA_ON_CPU_MEMORY_MIB");
  // what hatch holds now, plus 3 MiB: room for a cached 2 MiB block or a new 2.5 MiB one, not both
  const std::size_t held = hatch::cuda_detail::DeviceCache::instance().live_bytes();
  memory_env.set(std::to_string((held >> 20) + 4).c_str());
  float* a = Cuda::allocate((std::size_t(2) << 20) / sizeof(float));
  Cuda::deallocate(a, 0);
  CHECK(Cuda::cached_bytes() >= (std::size_t(2) << 20));
  const std::int64_t before = Cuda::allocation_count();
  float* b = nullptr;
  CHECK_NOTHROW(b = Cuda::allocate((std::size_t(5) << 19) / sizeof(float)));  // 2.5 MiB
  CHECK(Cuda::allocation_count() == before + 1);
  CHECK(Cuda::cached_bytes() == 0);  // the 2 MiB block went back to make room
  // More than the device has: a clear error, nothing left half done.
  CHECK(error_of([] { (void)Cuda::allocate(std::size_t(64) << 20); }).find("cudaErrorMemoryAllocation") !=
        std::string::npos);
  Cuda::deallocate(b, 0);
  Cuda::release_cache();
  Cuda::set_memory_caching(was);
}

// A cudaFree that fails while the cache gives its blocks back (a broken context) throws, and the
// cache then lists only the blocks still held: none it freed may be handed out again, or freed twice.
TEST_CASE("cuda_on_cpu: a cudaFree failing part-way through release_cache leaves only unfreed blocks cached") {
  const bool was = Cuda::memory_caching();
  Cuda::set_memory_caching(true);
  Cuda::release_cache();
  auto& cache = hatch::cuda_detail::DeviceCache::instance();
  const std::size_t held = cache.live_bytes(), mib = std::size_t(1) << 20, n = mib / sizeof(float);
  float* p[3] = {Cuda::allocate(n), Cuda::allocate(n), Cuda::allocate(n)};
  for (float* q : p) Cuda::deallocate(q, n);
  REQUIRE(Cuda::cached_bytes() == 3 * mib);
  hatch_cuda_on_cpu::fail_free_after(1);  // the first block is freed, the second is not
  const std::string e = error_of([] { Cuda::release_cache(); });
  CHECK(e.find("cudaErrorIllegalAddress") != std::string::npos);
  CHECK(e.find("free_on_device") != std::string::npos);
  CHECK(Cuda::cached_bytes() == 2 * mib);
  CHECK(cache.live_bytes() == held + 2 * mib);
  // The two cached blocks come back without a cudaMalloc, and both are still the device's.
  const std::int64_t before = Cuda::allocation_count();
  float* a = Cuda::allocate(n);
  float* b = Cuda::allocate(n);
  CHECK(Cuda::allocation_count() == before);
  {
    auto& s = hatch_cuda_on_cpu::state();
    std::lock_guard<std::mutex> lock(s.mu);
    CHECK(s.device.count(reinterpret_cast<std::uintptr_t>(a)) == 1);
    CHECK(s.device.count(reinterpret_cast<std::uintptr_t>(b)) == 1);
  }
  Cuda::deallocate(a, n);
  Cuda::deallocate(b, n);
  CHECK_NOTHROW(Cuda::release_cache());  // each block freed once: no cudaErrorInvalidValue
  CHECK(Cuda::cached_bytes() == 0);
  CHECK(cache.live_bytes() == held);
  Cuda::set_memory_caching(was);
}

// Device work runs when the host waits for it, as on a GPU, so reading its results too early shows.
TEST_CASE("cuda_on_cpu: device work runs when the host waits for it; pinned copies read and write when they run") {
  if (hatch_cuda_on_cpu::run_at_issue()) {
    MESSAGE("HATCH_CUDA_ON_CPU_IMMEDIATE is set: device work runs when issued, nothing to check here");
    return;
  }
  Cuda::synchronize();
  float* d = Cuda::allocate(256);
  float* pinned = Cuda::allocate_pinned(256);
  std::vector<float> h(256, 3.f);
  Cuda::upload(d, h.data(), 256);  // pageable: waits

  // a fill, then a copy into pinned memory: nothing has run yet, the destination holds NaN
  Cuda::fill(d, 256, 7.f);
  REQUIRE(cudaMemcpyAsync(pinned, d, 256 * sizeof(float), cudaMemcpyDeviceToHost, hatch::cuda_detail::stream()) ==
          cudaSuccess);
  CHECK(std::isnan(pinned[0]));
  CHECK(cudaStreamQuery(hatch::cuda_detail::stream()) == cudaErrorNotReady);  // ... and now it has run
  CHECK(cudaStreamQuery(hatch::cuda_detail::stream()) == cudaSuccess);
  CHECK(pinned[0] == 7.f);
  CHECK(pinned[255] == 7.f);

  // an upload from pinned memory takes its source when it runs: overwriting it too early uploads
  // the new values (a staging buffer must not be reused before its copy has run)
  for (int i = 0; i < 256; ++i) pinned[i] = 1.f;
  Cuda::upload_async(d, pinned, 256);
  for (int i = 0; i < 256; ++i) pinned[i] = 2.f;
  Cuda::download(h.data(), d, 256);  // pageable: waits
  CHECK(h[0] == 2.f);

  // an event waits for the work before it, and only that
  cudaEvent_t e = nullptr;
  REQUIRE(cudaEventCreate(&e) == cudaSuccess);
  Cuda::fill(d, 256, 5.f);
  REQUIRE(cudaMemcpyAsync(pinned, d, 128 * sizeof(float), cudaMemcpyDeviceToHost, hatch::cuda_detail::stream()) ==
          cudaSuccess);
  REQUIRE(cudaEventRecord(e, hatch::cuda_detail::stream()) == cudaSuccess);
  Cuda::fill(d, 256, 6.f);
  REQUIRE(cudaMemcpyAsync(pinned + 128, d, 128 * sizeof(float), cudaMemcpyDeviceToHost, hatch::cuda_detail::stream()) ==
          cudaSuccess);
  CHECK(cudaEventQuery(e) == cudaErrorNotReady);
  REQUIRE(cudaEventSynchronize(e) == cudaSuccess);
  CHECK(pinned[0] == 5.f);
  CHECK(std::isnan(pinned[128]));  // the copy after the event has not run
  Cuda::synchronize();
  CHECK(pinned[128] == 6.f);
  (void)cudaEventDestroy(e);

  // HATCH_CUDA_ON_CPU_IMMEDIATE=1: work runs when it is issued
  {
    ScopedEnv immediate("HATCH_CUDA_ON_CPU_IMMEDIATE");
    immediate.set("1");
    Cuda::fill(d, 256, 9.f);
    REQUIRE(cudaMemcpyAsync(pinned, d, 256 * sizeof(float), cudaMemcpyDeviceToHost, hatch::cuda_detail::stream()) ==
            cudaSuccess);
    CHECK(pinned[0] == 9.f);
  }
  Cuda::deallocate_pinned(pinned, 256);
  Cuda::deallocate(d, 256);
}

TEST_CASE("cuda_on_cpu: new device memory holds NaN, not zeros (reads of memory nothing wrote show)") {
  float* p = nullptr;
  REQUIRE(cudaMalloc(&p, 100 * sizeof(float)) == cudaSuccess);
  std::vector<float> h(100, 0.f);
  REQUIRE(cudaMemcpy(h.data(), p, 100 * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(std::isnan(h[0]));
  CHECK(std::isnan(h[99]));
  REQUIRE(cudaFree(p) == cudaSuccess);
}

// The fused attention grid holds the (example, head) pairs in x, which has no 65,535 limit; their
// values at this size are checked on a GPU ("on a GPU only": emulated, 65,538 blocks take many
// minutes), here only that every launch is accepted (with the pairs in y, the first one was not).
TEST_CASE("cuda_on_cpu: fused attention launches over more (example, head) pairs than a grid's y holds") {
  const bool was = Cuda::fused_attention();
  Cuda::set_fused_attention(true);
  const int batch = 21846, heads = 3, n = 2, dh = 64;  // 65,538 pairs
  const std::size_t nout = std::size_t(batch) * n * heads * dh;
  const std::size_t saved_n = hatch::fused::attention_saved_size<Cuda>(batch, heads, n, dh);
  const std::size_t scratch_n = hatch::fused::attention_scratch_size<Cuda>(batch, heads, n, dh);
  float* qkv = Cuda::allocate(3 * nout);
  float* dqkv = Cuda::allocate(3 * nout);
  float* out = Cuda::allocate(nout);
  float* dout = Cuda::allocate(nout);
  float* saved = Cuda::allocate(saved_n);
  float* scratch = Cuda::allocate(scratch_n);
  CHECK_NOTHROW(hatch::fused::attention_forward<Cuda>(out, saved, qkv, batch, n, heads, dh, 0.125f));
  CHECK_NOTHROW(
      hatch::fused::attention_backward<Cuda>(dqkv, scratch, dout, qkv, out, saved, batch, n, heads, dh, 0.125f));
  hatch_cuda_on_cpu::discard_queued();
  for (auto [p, k] : {std::pair{qkv, 3 * nout}, {dqkv, 3 * nout}, {out, nout}, {dout, nout}, {saved, saved_n},
                      {scratch, scratch_n}})
    Cuda::deallocate(p, k);
  Cuda::set_fused_attention(was);
}

// Between streams, only the orderings CUDA promises: the legacy default stream (a synchronous
// cudaMemcpy) waits for blocking streams, not for non-blocking ones.
TEST_CASE("cuda_on_cpu: work on a non-blocking stream is not ordered before the legacy stream's") {
  if (hatch_cuda_on_cpu::run_at_issue()) {
    MESSAGE("HATCH_CUDA_ON_CPU_IMMEDIATE is set: device work runs when issued, nothing to check here");
    return;
  }
  Cuda::synchronize();
  float* d = Cuda::allocate(64);
  Cuda::fill(d, 64, 1.f);
  Cuda::synchronize();
  cudaStream_t nb = nullptr, bl = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&nb, cudaStreamNonBlocking) == cudaSuccess);
  REQUIRE(cudaStreamCreate(&bl) == cudaSuccess);
  float h = 0.f;
  const float two = 2.f, three = 3.f;
  // (a 4-byte copy from pinned memory stands for a kernel on that stream)
  float* pinned = Cuda::allocate_pinned(2);
  pinned[0] = two;
  pinned[1] = three;
  REQUIRE(cudaMemcpyAsync(d, pinned, 4, cudaMemcpyHostToDevice, nb) == cudaSuccess);
  REQUIRE(cudaMemcpy(&h, d, 4, cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(h == 1.f);  // the legacy stream did not wait for the non-blocking one: the old value
  REQUIRE(cudaStreamSynchronize(nb) == cudaSuccess);
  REQUIRE(cudaMemcpy(&h, d, 4, cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(h == two);
  REQUIRE(cudaMemcpyAsync(d, pinned + 1, 4, cudaMemcpyHostToDevice, bl) == cudaSuccess);
  REQUIRE(cudaMemcpy(&h, d, 4, cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(h == three);  // it waits for a blocking stream
  (void)cudaStreamDestroy(nb);
  (void)cudaStreamDestroy(bl);
  Cuda::deallocate_pinned(pinned, 2);
  Cuda::deallocate(d, 64);
}

TEST_CASE("cuda_on_cpu: a cuBLASLt plan refused at its first call falls back to the unfused path; later, it is an error") {
  // Shapes no other test plans: the plan is new, so its first call here is its first call at all.
  constexpr int rows = 13, in = 44, out = 28;
  std::vector<float> x(rows * in), w(out * in), bias(out), dy(rows * out);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(int(i % 7) - 3) / 4;
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = float(int(i % 5) - 2) / 8;
  for (std::size_t i = 0; i < bias.size(); ++i) bias[i] = float(i) / 16;
  for (std::size_t i = 0; i < dy.size(); ++i) dy[i] = float(int(i % 9) - 4) / 8;
  // The references, exact in float (small multiples of powers of two).
  std::vector<float> y(rows * out), dw(out * in, 0.f), db(out, 0.f);
  for (int r = 0; r < rows; ++r)
    for (int o = 0; o < out; ++o) {
      float s = bias[o];
      for (int i = 0; i < in; ++i) s += x[r * in + i] * w[o * in + i];
      y[r * out + o] = s;
      db[o] += dy[r * out + o];
      for (int i = 0; i < in; ++i) dw[o * in + i] += dy[r * out + o] * x[r * in + i];
    }
  hatch::Tensor<Cuda> tx, tw, tb, tdy, ty({rows, out}), tdw({out, in}), tdb({out});
  tx.from_host(x, {rows, in});
  tw.from_host(w, {out, in});
  tb.from_host(bias, {out});
  tdy.from_host(dy, {rows, out});
  auto& refused = hatch_cuda_on_cpu::refused_epilogue();
  const auto forward = [&] {
    hatch::fused::linear_forward<Cuda>(ty.data(), tx.data(), tw.data(), tb.data(), rows, in, out);
    return ty.to_host();
  };
  const auto backward = [&] {
    Cuda::fill(tdw.data(), tdw.numel(), 0.f);
    Cuda::fill(tdb.data(), tdb.numel(), 0.f);
    hatch::fused::linear_backward_params<Cuda>(tdw.data(), tdb.data(), tdy.data(), tx.data(), rows, in, out);
    return std::make_pair(tdw.to_host(), tdb.to_host());
  };
  const auto fwd0 = Cuda::fused_bias_calls(), bwd0 = Cuda::fused_bias_grad_calls();
  refused = int(CUBLASLT_EPILOGUE_BIAS);
  CHECK(forward() == y);  // the separate bias kernel ran instead
  refused = int(CUBLASLT_EPILOGUE_BGRADB);
  CHECK(backward() == std::make_pair(dw, db));
  refused = -1;
  CHECK(Cuda::fused_bias_calls() == fwd0);
  CHECK(Cuda::fused_bias_grad_calls() == bwd0);
  CHECK(forward() == y);  // the plan stays marked as having no algorithm
  CHECK(Cuda::fused_bias_calls() == fwd0);

  // A plan that has run once and is refused later: that is a fault to report, not to hide.
  constexpr int rows2 = 11;
  hatch::Tensor<Cuda> y2({rows2, out});
  hatch::fused::linear_forward<Cuda>(y2.data(), tx.data(), tw.data(), tb.data(), rows2, in, out);
  Cuda::synchronize();
  CHECK(Cuda::fused_bias_calls() == fwd0 + 1);
  refused = int(CUBLASLT_EPILOGUE_BIAS);
  CHECK(error_of([&] { hatch::fused::linear_forward<Cuda>(y2.data(), tx.data(), tw.data(), tb.data(), rows2, in, out); })
            .find("CUBLAS_STATUS_NOT_SUPPORTED") != std::string::npos);
  refused = -1;
}

TEST_CASE("cuda_on_cpu: each LayerNorm backward kernel runs as many blocks as the device holds of it, whichever asked first") {
  // Two instantiations no other test launches (their residency is asked here first), with the
  // different answers a GPU gives kernels of different registers. Before, the first kernel's
  // answer was kept for every instantiation (they share one type).
  const auto narrow = hatch::cuda_kernels::layer_norm_backward_regs<float, 1, 3>;
  const auto wide = hatch::cuda_kernels::layer_norm_backward_regs<float, 1, 5>;
  hatch_cuda_on_cpu::set_resident_blocks(narrow, 3);
  hatch_cuda_on_cpu::set_resident_blocks(wide, 5);
  CHECK(hatch::cuda_detail::resident_row_blocks(narrow) == 3u * hatch_cuda_on_cpu::kSms);
  CHECK(hatch::cuda_detail::resident_row_blocks(wide) == 5u * hatch_cuda_on_cpu::kSms);
  CHECK(hatch::cuda_detail::resident_row_blocks(narrow) == 3u * hatch_cuda_on_cpu::kSms);
}

TEST_CASE("cuda_on_cpu: pinned memory freed while a queued copy uses it stops the program; hatch's staging waits first") {
  // The stand-in's rule, in a child process: an upload from pinned memory, queued, then cudaFreeHost.
  const auto [err, signalled] = in_child([] {
    signal(SIGABRT, SIG_DFL);  // the stand-in's message, then the signal (no test framework's report)
    float* pinned = nullptr;
    (void)cudaMallocHost(&pinned, 256 * sizeof(float));
    float* d = Cuda::allocate(256);
    (void)cudaMemcpyAsync(d, pinned, 256 * sizeof(float), cudaMemcpyHostToDevice, Cuda::stream());
    (void)cudaFreeHost(pinned);
  });
  CHECK(signalled);
  CHECK(err.find("while a queued copy still uses") != std::string::npos);
  // hatch's staging buffer dropped (and grown) right after an upload: the uploads land intact.
  hatch::Tensor<Cuda> a, b;
  const std::vector<float> small(100, 2.f), large(5000, 3.f);
  {
    hatch::HostStaging<Cuda> staging;
    staging.upload(small.begin(), small.end(), a, {100});
    staging.upload(large.begin(), large.end(), b, {5000});  // grows: the first buffer goes while its copy is queued
  }
  CHECK(a.to_host() == small);
  CHECK(b.to_host() == large);
}
