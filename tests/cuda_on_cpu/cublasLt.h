#pragma once
// cuBLASLt on the host (tests/cuda_on_cpu/cuda_on_cpu.hpp): descriptors, layouts, preferences, the
// heuristic (up to three candidates) and cublasLtMatmul with the DEFAULT, BIAS and BGRADB epilogues.
// As the library does, it refuses a bias pointer on a plan without a bias epilogue, and a bias
// epilogue without a pointer.
#include <atomic>
#include <cstdint>

#include "cublas_v2.h"

enum cublasLtEpilogue_t { CUBLASLT_EPILOGUE_DEFAULT = 1, CUBLASLT_EPILOGUE_BIAS = 4, CUBLASLT_EPILOGUE_BGRADB = 512 };
enum cublasLtMatmulDescAttributes_t {
  CUBLASLT_MATMUL_DESC_TRANSA = 3,
  CUBLASLT_MATMUL_DESC_TRANSB = 4,
  CUBLASLT_MATMUL_DESC_EPILOGUE = 7,
  CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8,
};
enum cublasLtMatmulPreferenceAttributes_t {
  CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8,
};
struct cublasLtContext {};
struct cublasLtMatmulDescOpaque_t {
  cublasComputeType_t compute;
  cublasOperation_t ta = CUBLAS_OP_N, tb = CUBLAS_OP_N;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  void* bias = nullptr;
};
struct cublasLtMatrixLayoutOpaque_t {
  std::uint64_t rows, cols;
  std::int64_t ld;
};
struct cublasLtMatmulPreferenceOpaque_t {
  std::uint64_t workspace = 0;
  std::uint32_t align[4] = {256, 256, 256, 256};
};
struct cublasLtMatmulAlgo_t {
  std::uint64_t data[8];
};
struct cublasLtMatmulHeuristicResult_t {
  cublasLtMatmulAlgo_t algo;
  std::size_t workspaceSize;
  cublasStatus_t state;
  float wavesCount;
  int reserved[4];
};
using cublasLtHandle_t = cublasLtContext*;
using cublasLtMatmulDesc_t = cublasLtMatmulDescOpaque_t*;
using cublasLtMatrixLayout_t = cublasLtMatrixLayoutOpaque_t*;
using cublasLtMatmulPreference_t = cublasLtMatmulPreferenceOpaque_t*;

inline cublasStatus_t cublasLtCreate(cublasLtHandle_t* h) {
  *h = new cublasLtContext;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* d, cublasComputeType_t compute,
                                               cudaDataType_t scale) {
  if (scale != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  *d = new cublasLtMatmulDescOpaque_t{compute};
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
  delete d;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr,
                                                     const void* v, std::size_t bytes) {
  if (!d) return CUBLAS_STATUS_INVALID_VALUE;
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
    case CUBLASLT_MATMUL_DESC_TRANSB: {
      if (bytes != sizeof(std::int32_t)) return CUBLAS_STATUS_INVALID_VALUE;
      std::int32_t t;
      std::memcpy(&t, v, 4);
      (attr == CUBLASLT_MATMUL_DESC_TRANSA ? d->ta : d->tb) = cublasOperation_t(t);
      return CUBLAS_STATUS_SUCCESS;
    }
    case CUBLASLT_MATMUL_DESC_EPILOGUE: {
      if (bytes != sizeof(std::uint32_t)) return CUBLAS_STATUS_INVALID_VALUE;
      std::uint32_t e;
      std::memcpy(&e, v, 4);
      d->epilogue = cublasLtEpilogue_t(e);
      return CUBLAS_STATUS_SUCCESS;
    }
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER:
      if (bytes != sizeof(void*)) return CUBLAS_STATUS_INVALID_VALUE;
      std::memcpy(&d->bias, v, sizeof(void*));
      return CUBLAS_STATUS_SUCCESS;
  }
  return CUBLAS_STATUS_INVALID_VALUE;
}
inline cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* l, cudaDataType_t type, std::uint64_t rows,
                                                 std::uint64_t cols, std::int64_t ld) {
  if (type != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (ld < std::int64_t(std::max<std::uint64_t>(1, rows))) return CUBLAS_STATUS_INVALID_VALUE;
  *l = new cublasLtMatrixLayoutOpaque_t{rows, cols, ld};
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
  delete l;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* p) {
  *p = new cublasLtMatmulPreferenceOpaque_t;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
  delete p;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                           cublasLtMatmulPreferenceAttributes_t attr, const void* v,
                                                           std::size_t bytes) {
  if (!p) return CUBLAS_STATUS_INVALID_VALUE;
  if (attr == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES) {
    if (bytes != sizeof(std::uint64_t)) return CUBLAS_STATUS_INVALID_VALUE;
    std::memcpy(&p->workspace, v, 8);
    return CUBLAS_STATUS_SUCCESS;
  }
  const int i = int(attr) - int(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES);
  if (i < 0 || i > 3 || bytes != sizeof(std::uint32_t)) return CUBLAS_STATUS_INVALID_VALUE;
  std::memcpy(&p->align[i], v, 4);
  return CUBLAS_STATUS_SUCCESS;
}

namespace hatch_cuda_on_cpu {
// op(A) is m x k, op(B) k x n, D m x n: the layouts must agree with the descriptor's transposes.
inline bool shapes_agree(cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                         cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dl) {
  if (!d || !a || !b || !c || !dl) return false;
  const std::uint64_t m = dl->rows, n = dl->cols;
  const std::uint64_t am = d->ta == CUBLAS_OP_N ? a->rows : a->cols, ak = d->ta == CUBLAS_OP_N ? a->cols : a->rows;
  const std::uint64_t bk = d->tb == CUBLAS_OP_N ? b->rows : b->cols, bn = d->tb == CUBLAS_OP_N ? b->cols : b->rows;
  return am == m && bn == n && ak == bk && c->rows == m && c->cols == n;
}
// Tests: cublasLtMatmul refuses (CUBLAS_STATUS_NOT_SUPPORTED) every call with this epilogue,
// although the heuristic offered an algorithm for it, as a real library may at the call (the
// heuristic does not see the bias pointer); -1, the default, refuses nothing.
inline std::atomic<int>& refused_epilogue() {
  static std::atomic<int> epilogue{-1};
  return epilogue;
}
}  // namespace hatch_cuda_on_cpu

// Candidates when the shapes agree and the epilogue is one this emulation runs. A bias
// epilogue needs a 16-byte-aligned vector on the device too, but that is checked at the call.
inline cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t d,
                                                     cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                                     cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dl,
                                                     cublasLtMatmulPreference_t p, int requested,
                                                     cublasLtMatmulHeuristicResult_t* results, int* found) {
  if (!h || !p || requested <= 0) return CUBLAS_STATUS_INVALID_VALUE;
  *found = 0;
  if (!hatch_cuda_on_cpu::shapes_agree(d, a, b, c, dl)) return CUBLAS_STATUS_INVALID_VALUE;
  if (d->epilogue != CUBLASLT_EPILOGUE_DEFAULT && d->epilogue != CUBLASLT_EPILOGUE_BIAS &&
      d->epilogue != CUBLASLT_EPILOGUE_BGRADB)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  // Up to three candidates (one computation under three ids), so that a caller's autotuning
  // trials run here too, as they do against the library.
  *found = std::min(requested, 3);
  for (int i = 0; i < *found; ++i) {
    results[i] = {};
    results[i].algo.data[0] = std::uint64_t(i);
    results[i].state = CUBLAS_STATUS_SUCCESS;
    results[i].wavesCount = 1.f;
  }
  return CUBLAS_STATUS_SUCCESS;
}

// D = alpha op(A) op(B) + beta C (+ bias per row of D; or the sums of op(B) over k into the bias
// pointer for BGRADB). This emulation needs C == D with the same layout, as the backend uses it.
inline cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void* alpha, const void* a,
                                     cublasLtMatrixLayout_t al, const void* b, cublasLtMatrixLayout_t bl,
                                     const void* beta, const void* c, cublasLtMatrixLayout_t cl, void* dout,
                                     cublasLtMatrixLayout_t dl, const cublasLtMatmulAlgo_t* algo, void* workspace,
                                     std::size_t workspace_bytes, cudaStream_t stream) {
  if (!h || !algo || !hatch_cuda_on_cpu::shapes_agree(d, al, bl, cl, dl)) return CUBLAS_STATUS_INVALID_VALUE;
  if (c != dout || cl->ld != dl->ld) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (workspace_bytes && !hatch_cuda_on_cpu::on_device(workspace, workspace_bytes)) return CUBLAS_STATUS_INVALID_VALUE;
  const bool wants_vector = d->epilogue != CUBLASLT_EPILOGUE_DEFAULT;
  if (wants_vector != (d->bias != nullptr)) return CUBLAS_STATUS_INVALID_VALUE;
  if (wants_vector && reinterpret_cast<std::uintptr_t>(d->bias) % 16) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (int(d->epilogue) == hatch_cuda_on_cpu::refused_epilogue().load()) return CUBLAS_STATUS_NOT_SUPPORTED;
  const int m = int(dl->rows), n = int(dl->cols), k = int(d->ta == CUBLAS_OP_N ? al->cols : al->rows);
  const bool ta = d->ta == CUBLAS_OP_T, tb = d->tb == CUBLAS_OP_T;
  const float al_v = *static_cast<const float*>(alpha), be_v = *static_cast<const float*>(beta);
  auto* out = static_cast<float*>(dout);
  const auto* fa = static_cast<const float*>(a);
  const auto* fb = static_cast<const float*>(b);
  const int lda = int(al->ld), ldb = int(bl->ld), ldd = int(dl->ld);
  const bool tf32 = d->compute == CUBLAS_COMPUTE_32F_FAST_TF32;
  const cublasLtEpilogue_t epi = d->epilogue;
  auto* vec = static_cast<float*>(d->bias);
  hatch_cuda_on_cpu::check_sgemm(ta, tb, m, n, k, fa, lda, fb, ldb, out, ldd);
  if (epi == CUBLASLT_EPILOGUE_BIAS)
    hatch_cuda_on_cpu::require_device(vec, std::size_t(m) * sizeof(float), "cublasLtMatmul: the bias vector");
  else if (epi == CUBLASLT_EPILOGUE_BGRADB)
    hatch_cuda_on_cpu::require_device(vec, std::size_t(n) * sizeof(float), "cublasLtMatmul: the bias-gradient vector");
  // (the descriptor's state is taken now, as the library reads it at the call)
  hatch_cuda_on_cpu::issue(stream, [=] {
    hatch_cuda_on_cpu::DeviceAccess open{fa, fb, out, vec};  // the epilogue is device work too
    hatch_cuda_on_cpu::sgemm(ta, tb, m, n, k, al_v, fa, lda, fb, ldb, be_v, out, ldd, tf32);
    if (epi == CUBLASLT_EPILOGUE_BIAS) {
      for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) out[std::size_t(j) * ldd + i] += vec[i];
    } else if (epi == CUBLASLT_EPILOGUE_BGRADB) {
      for (int j = 0; j < n; ++j) {
        float s = 0.f;
        for (int p = 0; p < k; ++p) s += tb ? fb[std::size_t(p) * ldb + j] : fb[std::size_t(j) * ldb + p];
        vec[j] = s;
      }
    }
  });
  return CUBLAS_STATUS_SUCCESS;
}
