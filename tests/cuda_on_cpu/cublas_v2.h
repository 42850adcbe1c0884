#pragma once
// cuBLAS on the host (tests/cuda_on_cpu/cuda_on_cpu.hpp): the handle calls and the single-precision
// GEMMs the Cuda backend makes, with cuBLAS's argument rules. A GEMM is device work on the
// handle's stream: its arguments are checked, and alpha and beta read, when it is issued; it runs
// when the host waits for it.
#include "cuda_on_cpu.hpp"

enum cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_ALLOC_FAILED = 3,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_ARCH_MISMATCH = 8,
  CUBLAS_STATUS_MAPPING_ERROR = 11,
  CUBLAS_STATUS_EXECUTION_FAILED = 13,
  CUBLAS_STATUS_INTERNAL_ERROR = 14,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum cublasMath_t { CUBLAS_DEFAULT_MATH = 0, CUBLAS_TENSOR_OP_MATH = 1, CUBLAS_TF32_TENSOR_OP_MATH = 3 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_TF32 = 77 };
struct cublasContext {
  cudaStream_t stream = nullptr;
  cublasMath_t math = CUBLAS_DEFAULT_MATH;
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
};
using cublasHandle_t = cublasContext*;

inline const char* cublasGetStatusString(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}
inline cublasStatus_t cublasCreate(cublasHandle_t* h) {
  *h = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy(cublasHandle_t h) {
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
// As cuBLAS documents: setting the stream also resets the workspace to the library's own pool.
inline cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->stream = s;
  h->workspace = nullptr;
  h->workspace_bytes = 0;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasGetStream(cublasHandle_t h, cudaStream_t* s) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  *s = h->stream;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->math = m;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void* ws, std::size_t bytes) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (bytes && !hatch_cuda_on_cpu::on_device(ws, bytes)) return CUBLAS_STATUS_INVALID_VALUE;
  h->workspace = ws;
  h->workspace_bytes = bytes;
  return CUBLAS_STATUS_SUCCESS;
}

namespace hatch_cuda_on_cpu {
// A GEMM on a handle without a workspace of the caller's would run, on a GPU, on memory cuBLAS
// allocates itself, outside hatch's cache (uncounted, never given back on out-of-memory): hatch
// gives every handle its device's GEMM workspace, so here that is refused.
inline cublasStatus_t check_gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                 int lda, int ldb, int ldc) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!h->workspace)
    throw std::runtime_error(
        "cuda_on_cpu: a cuBLAS GEMM on a handle without the caller's workspace (cuBLAS would allocate its own; "
        "cublasSetStream resets it)");
  if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if ((ta != CUBLAS_OP_N && ta != CUBLAS_OP_T) || (tb != CUBLAS_OP_N && tb != CUBLAS_OP_T))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (lda < std::max(1, ta == CUBLAS_OP_N ? m : k) || ldb < std::max(1, tb == CUBLAS_OP_N ? k : n) ||
      ldc < std::max(1, m))
    return CUBLAS_STATUS_INVALID_VALUE;
  return CUBLAS_STATUS_SUCCESS;
}
}  // namespace hatch_cuda_on_cpu

inline cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                  const float* alpha, const float* a, int lda, const float* b, int ldb,
                                  const float* beta, float* c, int ldc) {
  if (auto s = hatch_cuda_on_cpu::check_gemm(h, ta, tb, m, n, k, lda, ldb, ldc); s != CUBLAS_STATUS_SUCCESS) return s;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  const bool t_a = ta == CUBLAS_OP_T, t_b = tb == CUBLAS_OP_T, tf32 = h->math == CUBLAS_TF32_TENSOR_OP_MATH;
  hatch_cuda_on_cpu::check_sgemm(t_a, t_b, m, n, k, a, lda, b, ldb, c, ldc);
  hatch_cuda_on_cpu::issue(h->stream, [=, al = *alpha, be = *beta] {
    hatch_cuda_on_cpu::sgemm(t_a, t_b, m, n, k, al, a, lda, b, ldb, be, c, ldc, tf32);
  });
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                int n, int k, const float* alpha, const float* a, int lda,
                                                long long sa, const float* b, int ldb, long long sb,
                                                const float* beta, float* c, int ldc, long long sc, int count) {
  if (auto s = hatch_cuda_on_cpu::check_gemm(h, ta, tb, m, n, k, lda, ldb, ldc); s != CUBLAS_STATUS_SUCCESS) return s;
  if (count < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  const bool t_a = ta == CUBLAS_OP_T, t_b = tb == CUBLAS_OP_T, tf32 = h->math == CUBLAS_TF32_TENSOR_OP_MATH;
  for (int i = 0; i < count; ++i)
    hatch_cuda_on_cpu::check_sgemm(t_a, t_b, m, n, k, a + i * sa, lda, b + i * sb, ldb, c + i * sc, ldc);
  hatch_cuda_on_cpu::issue(h->stream, [=, al = *alpha, be = *beta] {
    for (int i = 0; i < count; ++i)
      hatch_cuda_on_cpu::sgemm(t_a, t_b, m, n, k, al, a + i * sa, lda, b + i * sb, ldb, be, c + i * sc, ldc, tf32);
  });
  return CUBLAS_STATUS_SUCCESS;
}
// The pointer arrays live in device memory, as cuBLAS requires.
inline cublasStatus_t cublasSgemmBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                         int k, const float* alpha, const float* const a[], int lda,
                                         const float* const b[], int ldb, const float* beta, float* const c[],
                                         int ldc, int count) {
  if (auto s = hatch_cuda_on_cpu::check_gemm(h, ta, tb, m, n, k, lda, ldb, ldc); s != CUBLAS_STATUS_SUCCESS) return s;
  if (count < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (m == 0 || n == 0 || count == 0) return CUBLAS_STATUS_SUCCESS;
  hatch_cuda_on_cpu::require_device(a, count * sizeof(float*), "cublasSgemmBatched: the A pointer array");
  hatch_cuda_on_cpu::require_device(b, count * sizeof(float*), "cublasSgemmBatched: the B pointer array");
  hatch_cuda_on_cpu::require_device(c, count * sizeof(float*), "cublasSgemmBatched: the C pointer array");
  const bool t_a = ta == CUBLAS_OP_T, t_b = tb == CUBLAS_OP_T, tf32 = h->math == CUBLAS_TF32_TENSOR_OP_MATH;
  // The pointers are read (and each GEMM's operands checked) when the GEMMs run: a kernel queued
  // before may be what writes them.
  hatch_cuda_on_cpu::issue(h->stream, [=, al = *alpha, be = *beta] {
    hatch_cuda_on_cpu::DeviceAccess open{a, b, c};  // the pointer arrays are device memory
    for (int i = 0; i < count; ++i) {
      hatch_cuda_on_cpu::check_sgemm(t_a, t_b, m, n, k, a[i], lda, b[i], ldb, c[i], ldc);
      hatch_cuda_on_cpu::sgemm(t_a, t_b, m, n, k, al, a[i], lda, b[i], ldb, be, c[i], ldc, tf32);
    }
  });
  return CUBLAS_STATUS_SUCCESS;
}
