#pragma once
// The Backend concept: the complete list of primitives a layer may call. A backend is an empty
// policy type (Cpu, Cpu64, Cuda) with static member functions over raw pointers into its own
// memory. Matrices are row-major; ld* are leading dimensions (elements between rows).
// Layers are written once against this list; everything device-specific lives in backend/.
#include <concepts>
#include <cstddef>
#include <cstdint>

#include "hatch/core/host_device.hpp"

namespace hatch {

namespace detail {
// Stands for a user's element-wise functor in the concept below: map and map_binary are
// templates over the functor type, so the concept checks them with this one.
struct MapProbe {
  template <class T> HATCH_HD T operator()(T x) const { return x; }
  template <class T> HATCH_HD T operator()(T a, T b) const { return a * b; }
};
}  // namespace detail

template <class B>
concept Backend = requires(typename B::Scalar* y, const typename B::Scalar* x, typename B::Scalar a,
                           std::size_t n, int i, bool t, std::uint64_t u, std::int32_t* ix,
                           const std::int32_t* cix) {
  typename B::Scalar;
  { B::name } -> std::convertible_to<const char*>;
  // memory
  { B::allocate(n) } -> std::same_as<typename B::Scalar*>;
  B::deallocate(y, n);
  B::upload(y, x, n);
  B::download(y, x, n);
  B::copy(y, x, n);
  B::fill(y, n, a);
  B::synchronize();
  // int32 index memory (routing tables), host <-> backend as for Scalar
  { B::allocate_indices(n) } -> std::same_as<std::int32_t*>;
  B::deallocate_indices(ix, n);
  B::upload_indices(ix, cix, n);
  B::download_indices(ix, cix, n);
  // C = alpha op(A) op(B) + beta C, and its two-level strided batched form (outer x inner)
  B::gemm(t, t, i, i, i, a, x, i, x, i, a, y, i);
  B::gemm_batched(t, t, i, i, i, a, x, i, n, n, x, i, n, n, a, y, i, n, n, i, i);
  // elementwise and reductions
  B::axpy(y, a, x, n);                       // y += a x
  B::add(y, x, x, n);                        // y = x1 + x2
  B::mul(y, x, x, n);                        // y = x1 * x2
  B::scale(y, a, n);                         // y *= a
  B::add_bias_rows(y, x, i, i);              // y[r, c] += b[c]
  B::sum_rows(y, x, i, i, i, a);             // y[c] = a y[c] + sum_r x[r, c] (rows at stride ld)
  B::copy_2d(y, i, x, i, i, i);              // rows x cols block copy; ld_src 0 broadcasts one row
  B::scale_rows(y, x, x, i, i);              // y[r, c] = x[r, c] * s[r]
  { B::sum_squares(x, n) } -> std::convertible_to<double>;
  { B::all_finite(x, n) } -> std::convertible_to<bool>;
  // user-defined element-wise maps: f is a copyable functor whose operator() is HATCH_HD
  // (core/host_device.hpp) and a namespace-scope type (nvcc instantiates kernels with it).
  // y may alias x (or a); these are how Elementwise<Fn> layers run on every backend.
  B::map(y, x, n, detail::MapProbe{});                 // y[j] = f(x[j])
  B::map_binary(y, x, x, n, detail::MapProbe{});       // y[j] = f(a[j], b[j]), e.g. dx = g(dy, x)
  // activations, normalisation, softmax
  B::gelu_forward(y, x, n);
  B::gelu_backward(y, x, x, n);              // dx = dy * gelu'(x)
  B::layer_norm_forward(y, y, y, x, x, x, i, i, a);   // y, mean, rstd <- x, gamma, beta
  B::layer_norm_backward(y, y, y, x, x, x, x, x, i, i);  // dx, dgamma, dbeta (nullable) <- dy, x, mean, rstd, gamma
  B::softmax_forward(y, x, i, i, a);         // y = softmax(a x) per row
  B::softmax_backward(y, x, x, i, i, a);     // dx = a * y * (dy - sum(dy y))
  // random masks: mask[j] = keep ? 1/keep_prob : 0, a counter-based hash of (seed, offset + j),
  // so every backend draws the same mask for the same seed
  B::bernoulli_mask(y, n, a, u, u);
  // patch embedding: images (B, C, H, W) <-> patches (B, H/p * W/p, C p p)
  B::im2patch(y, x, i, i, i, i, i);
  B::patch2im(y, x, i, i, i, i, i);
  // routing (mixture of experts): row gathers and weighted combines by int32 index, an index
  // < 0 meaning "none"; deterministic (one writer per output element), y never aliases x
  B::gather_rows(y, x, cix, x, i, i);        // y[r, :] = idx[r] < 0 ? 0 : (scale ? scale[r] : 1) x[idx[r], :]
  B::combine_rows(y, x, cix, x, i, i, i);    // y[t, :] = sum_{j < k, slot >= 0} (w ? w[t k + j] : 1) x[slots[t k + j], :]
  B::gather_dot_rows(y, x, x, cix, i, i, i); // out[t k + j] = slot < 0 ? 0 : dot(a[t, :], b[slots[t k + j], :])
  // sparse attention over a pair list (NAC's kernel-modulated attention): one CSR over query rows,
  // shared by every example and head; see CpuBackend for the exact definitions. Deterministic:
  // one writer per output element (the key-side gradients read a transposed pair list).
  B::sparse_attention_forward(y, y, i, x, x, x, i, cix, cix, x, i, i, i, i, i, i, a);
  B::sparse_attention_backward_rows(y, y, i, x, i, x, x, i, x, cix, cix, i, i, i, i, i, a);
  B::sparse_attention_backward_cols(y, y, i, x, i, x, i, x, x, cix, cix, cix, i, i, i, i, i, a);
  // losses over logits (rows x classes): returns the summed loss, writes dlogits = scale * grad
  { B::softmax_cross_entropy(y, x, x, i, i, a) } -> std::convertible_to<double>;
  // AdamW step on n values
  B::adamw_update(y, y, y, x, n, a, a, a, a, a, a, a);
};

// Whether a backend's buffers are host memory the host may read and write in place (Cpu, Cpu64:
// `static constexpr bool host_memory = true`); other backends' buffers go through download and
// upload (collectives, step scalars, staging).
template <Backend B>
constexpr bool host_memory_v = requires { requires B::host_memory; };

}  // namespace hatch
