#pragma once
// Neural Attentive Circuits (ALGORITHMS.md section 4, issue 10): the layers built so far.
//
//   LatentParameter<B, Cols>     a (U, Cols) table owned by the model and shared by many layers:
//                                LatentCodes (the codes c_u) and LatentSignatures (s_u)
//   ModFc<In, Out, CodeDim>      code-conditioned linear over U latents
//   Kmdpa<Heads, HeadDim, Sig>   kernel-modulated dot-product attention among U latents, computed
//                                only over the pairs that the signatures keep
//   ModFfn<D, Hidden, CodeDim>   theta + LS(ModFC(GEGLU(ModFC(LN theta))))
//   SignatureRepulsion<SigDim>   the hinge repulsion of the signatures, an auxiliary loss, once
//                                per table
//   (nac_graph.hpp: the signature graph priors, init_signatures_from_graph; nac_blocks.hpp: the
//   read-in, propagator and read-out blocks; models/nac.hpp: the model Nac<spec>)
//   LatentSeeder<D, CodeDim>     the initial latent states from the codes, (B U, D)
//   OutputPooling<UOut, D, Cls>  gumbel-softmax pooling over the output latents, then a linear
//                                classifier: (B UOut, D) -> (B, Cls)
//
// Latent rows are batch-major: row b U + u of an input is latent u of example b.
//
// Shared parameters. A layer is handed the model's table once, after construction
// (`layer.use_codes(codes)`, `layer.use_signatures(signatures)`), keeps a pointer to its Parameter,
// adds its gradient into it in backward, and shows it in visit() under prefix + "codes" (or
// "signatures"). Several layers thus visit the same Parameter object: ParameterArena and the
// checkpoint slots store and step it once, under the first name visit gives it (the model should
// visit its table first, so that the name is the model's). A layer does not reset the table:
// its owner does (LatentParameter::reset_parameters).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "hatch/backend/fused.hpp"
#include "hatch/backend/random.hpp"
#include "hatch/core/error.hpp"
#include "hatch/core/indices.hpp"
#include "hatch/core/layer.hpp"
#include "hatch/core/parameter.hpp"
#include "hatch/layers/linear.hpp"
#include "hatch/layers/nac_graph.hpp"
#include "hatch/layers/norm.hpp"

namespace hatch {

// A (rows, Cols) parameter table shared by layers (codes, signatures). Not weight-decayed.
template <Backend B, int Cols>
struct LatentParameter {
  static constexpr int cols = Cols;
  explicit LatentParameter(int rows) : param({rows, Cols}, /*decay=*/false) { param.shared = true; }
  int rows() const { return int(param.value.shape()[0]); }
  // Standard normal entries, cut at two standard deviations (scale does not matter to a cosine or
  // to the LayerNorm of a ModFc).
  void reset_parameters(Initializer& init) { init.trunc_normal(param, 1.0); }
  template <class F>
  void visit(F&& f, const std::string& name) { f(name, param); }
  Parameter<B> param;
};
template <Backend B, int CodeDim> using LatentCodes = LatentParameter<B, CodeDim>;
template <Backend B, int SigDim> using LatentSignatures = LatentParameter<B, SigDim>;

namespace nac_detail {
// Element-wise maps reading a scalar parameter from the backend's memory (no host round trip).
template <class T>
struct OnePlusScaled {  // 1 + a x
  const T* a;
  HATCH_HD T operator()(T x) const { return T(1) + a[0] * x; }
};
template <class T>
struct ScaledBy {  // a x
  const T* a;
  HATCH_HD T operator()(T x) const { return a[0] * x; }
};
}  // namespace nac_detail

// ModFC: y_u = W (x_u * (1 + a LN(W_c c_u))) + b for every latent u of every example.
//   parameters: weight (Out, In), bias (Out), code_proj.weight (In, CodeDim) (no bias), scale (1)
//   (the scalar a, 0.1 at reset), and the shared codes (U, CodeDim), visited as "codes".
//   LN has no affine parameters and eps 1e-5 (PyTorch's F.layer_norm default).
// Input (B U, In) (or (B, U, In)); output the same rows with Out columns.
template <Backend B, int In, int Out, int CodeDim>
class ModFcLayer : public LeafLayer<ModFcLayer<B, In, Out, CodeDim>, B, In, Out> {
 public:
  using T = typename B::Scalar;
  static constexpr double ln_eps = 1e-5;
  static constexpr double initial_scale = 0.1;

  ModFcLayer() : weight({Out, In}, true), bias({Out}, false), code_proj({In, CodeDim}, true), scale({1}, false) {
    scale.value.fill(T(initial_scale));
    ones_.resize({In});
    ones_.fill(T(1));
    zeros_.resize({In});
    zeros_.zero();
  }
  void use_codes(LatentCodes<B, CodeDim>& codes) { codes_ = &codes.param; }
  bool has_codes() const { return codes_ != nullptr; }
  // Runs on latents [begin, end) of the table only (a negative end: to the last row): an example
  // is then end - begin input rows, modulated by those latents' codes. Default: every latent.
  void use_rows(int begin, int end) {
    HATCH_CHECK(begin >= 0, "ModFc::use_rows", "negative range start");
    row_begin_ = begin;
    row_end_ = end;
  }

  void reset_parameters(Initializer& init) {
    init.trunc_normal(weight, 0.02);
    init.constant(bias, 0.0);
    init.trunc_normal(code_proj, 0.02);
    init.constant(scale, initial_scale);
  }

  const Tensor<B>& forward(const Tensor<B>& x, Context&) {
    HATCH_CHECK(codes_ != nullptr, "ModFc", "no codes: call use_codes(codes) before the first forward");
    HATCH_CHECK(x.cols() == In, "ModFc", "input width " + std::to_string(x.cols()) + ", expected " + std::to_string(In));
    {
      const int table = int(codes_->value.shape()[0]), end = row_end_ < 0 ? table : row_end_;
      HATCH_CHECK(row_begin_ < end && end <= table, "ModFc",
                  "latents [" + std::to_string(row_begin_) + ", " + std::to_string(end) + ") outside the table's " +
                      std::to_string(table));
      u_ = end - row_begin_;
    }
    rows_ = int(x.rows());
    HATCH_CHECK(u_ > 0 && rows_ % u_ == 0, "ModFc",
                std::to_string(rows_) + " input rows are not a whole number of examples of " + std::to_string(u_) +
                    " latents");
    x_ = &x;
    const std::size_t ui = std::size_t(u_) * In;
    // g = 1 + a LN(codes W_c^T), one row per latent
    m_.resize({u_, In});
    nrm_.resize({u_, In});
    g_.resize({u_, In});
    mean_.resize({u_});
    rstd_.resize({u_});
    B::gemm(false, true, u_, In, CodeDim, T(1), codes_->value.data() + std::size_t(row_begin_) * CodeDim, CodeDim,
            code_proj.value.data(), CodeDim, T(0), m_.data(), In);
    B::layer_norm_forward(nrm_.data(), mean_.data(), rstd_.data(), m_.data(), ones_.data(), zeros_.data(), u_, In,
                          T(ln_eps));
    B::map(g_.data(), nrm_.data(), ui, nac_detail::OnePlusScaled<T>{scale.value.data()});
    // xm = x * g (g broadcast over the examples), y = xm W^T + b
    xm_.resize({rows_, In});
    for (int b = 0; b < rows_ / u_; ++b) B::mul(xm_.data() + b * ui, x.data() + b * ui, g_.data(), ui);
    Shape s = x.shape();
    s.dims[s.rank - 1] = Out;
    y_.resize(s);
    fused::linear_forward<B>(y_.data(), xm_.data(), weight.value.data(), bias.value.data(), rows_, In, Out);
    return y_;
  }

  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const std::size_t ui = std::size_t(u_) * In;
    const int nb = rows_ / u_;
    const bool code_path = wants_grad(scale, ctx) || wants_grad(code_proj, ctx) || wants_grad(*codes_, ctx);
    const bool to_xm = ctx.input_grad || code_path;
    if (to_xm) dxm_.resize({rows_, In});  // d/d xm = dy W
    fused::linear_backward<B>(to_xm ? dxm_.data() : nullptr, wants_grad(weight, ctx) ? weight.grad.data() : nullptr,
                              wants_grad(bias, ctx) ? bias.grad.data() : nullptr, dy.data(), xm_.data(),
                              weight.value.data(), rows_, In, Out);
    if (!to_xm) return dx_;
    if (ctx.input_grad) {
      dx_.resize(x_->shape());
      for (int b = 0; b < nb; ++b) B::mul(dx_.data() + b * ui, dxm_.data() + b * ui, g_.data(), ui);
    }
    if (!code_path) return dx_;
    // dg = sum over examples of dxm * x
    tmp_.resize({rows_, In});
    B::mul(tmp_.data(), dxm_.data(), x_->data(), std::size_t(rows_) * In);
    dg_.resize({u_, In});
    B::sum_rows(dg_.data(), tmp_.data(), nb, int(ui), int(ui), T(0));
    if (wants_grad(scale, ctx))  // da += dg . LN(m): a 1 x 1 GEMM is the dot product
      B::gemm(false, true, 1, 1, int(ui), T(1), dg_.data(), int(ui), nrm_.data(), int(ui), T(1), scale.grad.data(), 1);
    if (wants_grad(code_proj, ctx) || wants_grad(*codes_, ctx)) {
      dn_.resize({u_, In});
      dm_.resize({u_, In});
      B::map(dn_.data(), dg_.data(), ui, nac_detail::ScaledBy<T>{scale.value.data()});
      B::layer_norm_backward(dm_.data(), nullptr, nullptr, dn_.data(), m_.data(), mean_.data(), rstd_.data(),
                             ones_.data(), u_, In);
      if (wants_grad(code_proj, ctx))  // dW_c += dm^T codes
        B::gemm(true, false, In, CodeDim, u_, T(1), dm_.data(), In,
                codes_->value.data() + std::size_t(row_begin_) * CodeDim, CodeDim, T(1), code_proj.grad.data(), CodeDim);
      if (wants_grad(*codes_, ctx))  // dcodes += dm W_c
        B::gemm(false, false, u_, CodeDim, In, T(1), dm_.data(), In, code_proj.value.data(), CodeDim, T(1),
                codes_->grad.data() + std::size_t(row_begin_) * CodeDim, CodeDim);
    }
    return dx_;
  }

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    if (codes_) f(prefix + "codes", *codes_);
    f(prefix + "weight", weight);
    f(prefix + "bias", bias);
    f(prefix + "code_proj.weight", code_proj);
    f(prefix + "scale", scale);
  }

  Parameter<B> weight, bias, code_proj, scale;

 private:
  Parameter<B>* codes_ = nullptr;
  const Tensor<B>* x_ = nullptr;
  int u_ = 0, rows_ = 0;
  int row_begin_ = 0, row_end_ = -1;  // as set by use_rows
  Tensor<B> ones_, zeros_, m_, nrm_, g_, mean_, rstd_, xm_, y_, dxm_, dx_, tmp_, dg_, dn_, dm_;
};

template <int In, int Out, int CodeDim>
struct ModFc {
  static constexpr int in = In, out = Out;
  template <Backend B> using bind = ModFcLayer<B, In, Out, CodeDim>;
};

// KMDPA: kernel-modulated dot-product attention among the U latents of each example.
//
// Input: q, k, v side by side, (B U, 3 H dh) (columns [q | k | v], head h of each at h dh);
// output (B U, H dh). Parameters: the shared signatures (U, SigDim), visited as "signatures", and
// the kernel bandwidth eps, "bandwidth" (1), 1 at reset, used as is (as in the reference's Kernel;
// it must stay positive). tau = 0.9, sampling temperature 0.5.
//
//   d_uv = 1 - cos(s_u, s_v)                 (s / max(|s|, 1e-12), as F.normalize)
//   kept pairs: d_uv <= tau                  (the same for every example and head)
//   evaluation:  log K_uv = -d_uv / eps
//   training:    log K_uv = log sigmoid((logit(k_uv) + L_buv) / 0.5), k_uv = exp(-d_uv / eps) with
//                d_uv / eps clamped below at 1e-6 (so k <= 1 - 1e-6, zero gradient where clamped),
//                logit(k) = log k - log(1 - k), L = log w - log(1 - w) logistic noise, w uniform
//                from (ctx.seed, counter + (b U + u) U + v) (backend/random.hpp): one draw per
//                example and pair, the same for every head; ctx.draw(B U U) per training forward
//   A_uv = softmax over kept v of (q_u . k_v / sqrt(dh) + log K_uv);   o_u = sum_v A_uv v_v
//
// Truncation, straight-through: a pair with d_uv > tau is not in the pair list (K = 0, weight
// exactly 0). Its gradient is what the reference's straight-through truncation gives in the
// log-kernel path: the gradient reaching log K_uv of a truncated pair is A_uv (...) = 0, and the
// straight-through passes that 0 to d_uv, so signatures and eps get gradient only through kept
// pairs. The threshold itself (d <= tau) carries no gradient.
//
// Sparsity is real: the pair list (CSR over queries, and its transpose for the key-side
// gradients) is built once per forward on the host from the signatures, and the scores, softmax,
// output and every gradient are computed over kept pairs only (B::sparse_attention_*). The
// kernel's own maths (U x U cosines, the noise, the gradients to signatures and eps) run on the
// host in double: one download of the signatures per forward and of d(log K) per backward, as
// routing in the MoE layer.
template <Backend B, int Heads, int HeadDim, int SigDim>
class KmdpaLayer : public LeafLayer<KmdpaLayer<B, Heads, HeadDim, SigDim>, B, 3 * Heads * HeadDim, Heads * HeadDim> {
 public:
  using T = typename B::Scalar;
  static constexpr int D = Heads * HeadDim;
  static constexpr double tau = 0.9, temperature = 0.5, min_scaled_distance = 1e-6;

  KmdpaLayer() : bandwidth({1}, false) { bandwidth.value.fill(T(1)); }
  void use_signatures(LatentSignatures<B, SigDim>& s) { sig_ = &s.param; }
  void reset_parameters(Initializer& init) { init.constant(bandwidth, 1.0); }

  // A rectangular pair list: only latents [query_begin, query_end) of the table query, and they
  // attend only to latents [key_begin, key_end) (a negative end: up to the table's last row).
  // E.g. mediators attending to input and mediator latents, one table [input; mediators]:
  // restrict_pairs(U_in, -1, 0, -1). The input still holds all U rows of each example (q read
  // for query rows, k and v for key rows; the other columns are unused and get gradient 0); the
  // output holds the query rows only, (B Uq, H dh), in order. Default: every latent both.
  void restrict_pairs(int query_begin, int query_end, int key_begin, int key_end) {
    HATCH_CHECK(query_begin >= 0 && key_begin >= 0, "Kmdpa::restrict_pairs", "negative range start");
    q_begin_ = query_begin;
    q_end_ = query_end;
    k_begin_ = key_begin;
    k_end_ = key_end;
  }
  // Without the kernel (m2mKD's distillation students, ALGORITHMS.md §2): dense attention over
  // the pair ranges, log K = 0 for every pair, nothing sampled, no gradient to the signatures or
  // the bandwidth (which then only give the table's row count). Default: with the kernel.
  void use_kernel(bool on) { kernel_ = on; }
  bool uses_kernel() const { return kernel_; }
  // The fraction of the query x key pairs kept by the last forward (d_uv <= tau).
  double kept_fraction() const {
    const double pairs = double(q1_ - q0_) * double(k1_ - k0_);
    return pairs > 0 ? double(nnz_) / pairs : 0.0;
  }
  int kept_pairs() const { return nnz_; }
  // The last forward's pair list on the host: queries' CSR offsets and keys.
  const std::vector<std::int32_t>& row_ptr() const { return row_ptr_h_; }
  const std::vector<std::int32_t>& col() const { return col_h_; }

  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    HATCH_CHECK(sig_ != nullptr, "Kmdpa", "no signatures: call use_signatures(signatures) before the first forward");
    HATCH_CHECK(x.cols() == 3 * D, "Kmdpa",
                "input width " + std::to_string(x.cols()) + ", expected " + std::to_string(3 * D) + " (q, k, v)");
    u_ = int(sig_->value.shape()[0]);
    rows_ = int(x.rows());
    HATCH_CHECK(u_ > 0 && rows_ % u_ == 0, "Kmdpa",
                std::to_string(rows_) + " input rows are not a whole number of examples of " + std::to_string(u_) +
                    " latents");
    nb_ = rows_ / u_;
    x_ = &x;
    training_ = ctx.training;
    q0_ = q_begin_;
    q1_ = q_end_ < 0 ? u_ : q_end_;
    k0_ = k_begin_;
    k1_ = k_end_ < 0 ? u_ : k_end_;
    HATCH_CHECK(q0_ < q1_ && q1_ <= u_ && k0_ < k1_ && k1_ <= u_, "Kmdpa",
                "query latents [" + std::to_string(q0_) + ", " + std::to_string(q1_) + ") or key latents [" +
                    std::to_string(k0_) + ", " + std::to_string(k1_) + ") outside the table's " + std::to_string(u_));
    build_pairs();
    // log K per kept pair: one row shared by the batch in evaluation, one per example in training
    const int lrows = training_ && kernel_ ? nb_ : 1;
    logk_h_.resize(std::size_t(lrows) * nnz_);
    dlogk_dx_.resize(std::size_t(lrows) * nnz_);
    const std::uint64_t base = training_ && kernel_ ? ctx.draw(std::uint64_t(nb_) * u_ * u_) : 0;
    if (!kernel_) {
      std::fill(logk_h_.begin(), logk_h_.end(), T(0));
      std::fill(dlogk_dx_.begin(), dlogk_dx_.end(), 0.0);
    }
    for (int b = 0; b < (kernel_ ? lrows : 0); ++b)
      for (int u = 0; u < u_; ++u)
        for (int p = row_ptr_h_[u]; p < row_ptr_h_[u + 1]; ++p) {
          const double xs = dist_h_[p] / eps_;
          const std::size_t i = std::size_t(b) * nnz_ + p;
          if (!training_) {
            logk_h_[i] = T(-xs);
            dlogk_dx_[i] = -1.0;
            continue;
          }
          const bool clamped = xs < min_scaled_distance;
          const double xc = clamped ? min_scaled_distance : xs;
          const double logit = -xc - std::log(-std::expm1(-xc));
          double w = uniform01(ctx.seed, base + (std::uint64_t(b) * u_ + u) * u_ + std::uint64_t(col_h_[p]));
          w += 1.0 / 18014398509481984.0;  // 2^-54: never 0, still below 1
          const double y = (logit + std::log(w) - std::log1p(-w)) / temperature;
          const double logz = -(std::max(-y, 0.0) + std::log1p(std::exp(-std::abs(y))));  // log sigmoid(y)
          const double one_minus_z = -std::expm1(logz);
          logk_h_[i] = T(logz);
          dlogk_dx_[i] = clamped ? 0.0 : one_minus_z / temperature * (-1.0 / -std::expm1(-xc));
        }
    std::vector<T>& lk = logk_host_scalar_;
    lk.assign(logk_h_.begin(), logk_h_.end());
    lk.push_back(T(0));
    logk_.resize({std::int64_t(lk.size())});  // +1: never an empty tensor; resize + upload, as
    B::upload(logk_.data(), lk.data(), lk.size());  // from_host builds a message string per call
    probs_.resize({std::int64_t(nb_) * Heads * nnz_ + 1});
    Shape s = x.shape();
    s.dims[s.rank - 1] = D;
    const int uq = q1_ - q0_;
    restricted_ = uq != u_;
    Tensor<B>& full = restricted_ ? y_full_ : y_;
    full.resize(s);
    B::sparse_attention_forward(probs_.data(), full.data(), D, x.data(), x.data() + D, x.data() + 2 * D, 3 * D,
                                row_ptr_.data(), col_.data(), logk_.data(), training_ && kernel_ ? nnz_ : 0, nb_, u_, Heads,
                                HeadDim, nnz_, scale());
    if (!restricted_) return y_;
    if (s.rank >= 3) s.dims[s.rank - 2] = uq;  // (B, U, 3D) in: (B, Uq, D) out
    else s.dims[0] = std::int64_t(nb_) * uq;
    y_.resize(s);
    for (int b = 0; b < nb_; ++b)  // the query rows of example b are contiguous
      B::copy(y_.data() + std::size_t(b) * uq * D, full.data() + (std::size_t(b) * u_ + q0_) * D, std::size_t(uq) * D);
    return y_;
  }

  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const bool kernel_grads = kernel_ && (wants_grad(*sig_, ctx) || wants_grad(bandwidth, ctx));
    if (!ctx.input_grad && !kernel_grads) return dx_;
    const T* base = x_->data();
    dscores_.resize(probs_.shape());
    dx_.resize(x_->shape());
    const T* dout = dy.data();
    if (restricted_) {  // the query rows back in place, the other rows' output gradient 0
      const int uq = q1_ - q0_;
      dy_full_.resize({std::int64_t(rows_), D});
      dy_full_.zero();
      for (int b = 0; b < nb_; ++b)
        B::copy(dy_full_.data() + (std::size_t(b) * u_ + q0_) * D, dy.data() + std::size_t(b) * uq * D,
                std::size_t(uq) * D);
      dout = dy_full_.data();
    }
    B::sparse_attention_backward_rows(dscores_.data(), dx_.data(), 3 * D, dout, D, base + D, base + 2 * D, 3 * D,
                                      probs_.data(), row_ptr_.data(), col_.data(), nb_, u_, Heads, HeadDim, nnz_,
                                      scale());
    if (ctx.input_grad)
      B::sparse_attention_backward_cols(dx_.data() + D, dx_.data() + 2 * D, 3 * D, base, 3 * D, dout, D,
                                        probs_.data(), dscores_.data(), col_ptr_.data(), pair_.data(),
                                        pair_row_.data(), nb_, u_, Heads, HeadDim, nnz_, scale());
    if (kernel_grads && nnz_ > 0) kernel_backward(ctx);
    return dx_;
  }

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    if (sig_) f(prefix + "signatures", *sig_);
    f(prefix + "bandwidth", bandwidth);
  }

  Parameter<B> bandwidth;

 private:
  static T scale() { return T(1) / std::sqrt(T(HeadDim)); }

  // Distances from the signatures, the kept pairs (CSR and its transpose), on the host.
  void build_pairs() {
    const std::size_t us = std::size_t(u_) * SigDim;
    sig_host_.resize(us);
    B::download(sig_host_.data(), sig_->value.data(), us);
    T e;
    B::download(&e, bandwidth.value.data(), 1);
    eps_ = double(e);
    HATCH_CHECK(eps_ > 0 && std::isfinite(eps_), "Kmdpa", "the kernel bandwidth is " + std::to_string(eps_) +
                                                              ", it must be positive");
    unit_.resize(us);
    norm_.resize(u_);
    for (int u = 0; u < u_; ++u) {
      double s = 0;
      for (int c = 0; c < SigDim; ++c) s += double(sig_host_[std::size_t(u) * SigDim + c]) * sig_host_[std::size_t(u) * SigDim + c];
      norm_[u] = std::max(std::sqrt(s), 1e-12);
      for (int c = 0; c < SigDim; ++c) unit_[std::size_t(u) * SigDim + c] = sig_host_[std::size_t(u) * SigDim + c] / norm_[u];
    }
    row_ptr_h_.assign(std::size_t(u_) + 1, 0);
    col_h_.clear();
    dist_h_.clear();
    for (int u = 0; u < u_; ++u) {
      const bool queries = u >= q0_ && u < q1_;
      for (int v = queries ? k0_ : u_; v < (queries ? k1_ : u_); ++v) {
        double d = 0.0;  // without the kernel every pair is kept: no distance to compute
        if (kernel_) {
          double c = 0;
          for (int k = 0; k < SigDim; ++k) c += unit_[std::size_t(u) * SigDim + k] * unit_[std::size_t(v) * SigDim + k];
          d = 1.0 - c;
        }
        if (d <= tau) {
          col_h_.push_back(v);
          dist_h_.push_back(d);
        }
      }
      row_ptr_h_[u + 1] = std::int32_t(col_h_.size());
    }
    nnz_ = int(col_h_.size());
    // transpose: pairs grouped by key, in increasing pair order
    col_ptr_h_.assign(std::size_t(u_) + 1, 0);
    for (int p = 0; p < nnz_; ++p) ++col_ptr_h_[col_h_[p] + 1];
    for (int v = 0; v < u_; ++v) col_ptr_h_[v + 1] += col_ptr_h_[v];
    pair_h_.resize(nnz_);
    pair_row_h_.resize(nnz_);
    fill_.assign(col_ptr_h_.begin(), col_ptr_h_.end() - 1);
    for (int u = 0; u < u_; ++u)
      for (int p = row_ptr_h_[u]; p < row_ptr_h_[u + 1]; ++p) {
        const int j = fill_[col_h_[p]]++;
        pair_h_[j] = p;
        pair_row_h_[j] = u;
      }
    row_ptr_.from_host(row_ptr_h_);
    col_ptr_.from_host(col_ptr_h_);
    // never empty buffers (a pointer is passed even when nothing is kept)
    col_h_.push_back(0);
    pair_h_.push_back(0);
    pair_row_h_.push_back(0);
    col_.from_host(col_h_);
    pair_.from_host(pair_h_);
    pair_row_.from_host(pair_row_h_);
    col_h_.pop_back();
    pair_h_.pop_back();
    pair_row_h_.pop_back();
  }

  // d(loss)/d(log K) summed over heads, then through the kernel to the signatures and eps.
  void kernel_backward(Context& ctx) {
    const int lrows = training_ ? nb_ : 1;
    dlogk_.resize({std::int64_t(nb_) * nnz_});
    for (int b = 0; b < nb_; ++b)
      B::sum_rows(dlogk_.data() + std::size_t(b) * nnz_, dscores_.data() + std::size_t(b) * Heads * nnz_, Heads, nnz_,
                  nnz_, T(0));
    dlogk_host_.resize(std::size_t(nb_) * nnz_);
    B::download(dlogk_host_.data(), dlogk_.data(), dlogk_host_.size());
    // gx[p] = d loss / d (d_p / eps)
    gx_.assign(nnz_, 0.0);
    for (int b = 0; b < nb_; ++b)
      for (int p = 0; p < nnz_; ++p)
        gx_[p] += double(dlogk_host_[std::size_t(b) * nnz_ + p]) * dlogk_dx_[std::size_t(b % lrows) * nnz_ + p];
    if (wants_grad(bandwidth, ctx)) {
      double de = 0;
      for (int p = 0; p < nnz_; ++p) de -= gx_[p] * dist_h_[p] / (eps_ * eps_);
      grad_host_.assign(1, T(de));
      upload_grad();
      B::axpy(bandwidth.grad.data(), T(1), grad_up_.data(), 1);
    }
    if (wants_grad(*sig_, ctx)) {
      // d = 1 - n_u . n_v:  dd/ds_u = -(n_v - cos n_u) / |s_u|, and symmetrically for s_v
      dsig_.assign(std::size_t(u_) * SigDim, 0.0);
      for (int u = 0; u < u_; ++u)
        for (int p = row_ptr_h_[u]; p < row_ptr_h_[u + 1]; ++p) {
          const int v = col_h_[p];
          const double gd = gx_[p] / eps_, c = 1.0 - dist_h_[p];
          const double* nu = &unit_[std::size_t(u) * SigDim];
          const double* nv = &unit_[std::size_t(v) * SigDim];
          double* du = &dsig_[std::size_t(u) * SigDim];
          double* dv = &dsig_[std::size_t(v) * SigDim];
          for (int k = 0; k < SigDim; ++k) {
            du[k] -= gd * (nv[k] - c * nu[k]) / norm_[u];
            dv[k] -= gd * (nu[k] - c * nv[k]) / norm_[v];
          }
        }
      grad_host_.assign(dsig_.begin(), dsig_.end());
      upload_grad();
      B::axpy(sig_->grad.data(), T(1), grad_up_.data(), std::size_t(u_) * SigDim);
    }
  }

  void upload_grad() {
    grad_up_.resize({std::int64_t(grad_host_.size())});
    B::upload(grad_up_.data(), grad_host_.data(), grad_host_.size());
  }

  Parameter<B>* sig_ = nullptr;
  const Tensor<B>* x_ = nullptr;
  int u_ = 0, rows_ = 0, nb_ = 0, nnz_ = 0;
  int q_begin_ = 0, q_end_ = -1, k_begin_ = 0, k_end_ = -1;  // as set by restrict_pairs
  int q0_ = 0, q1_ = 0, k0_ = 0, k1_ = 0;                    // resolved for the last forward
  bool restricted_ = false;
  bool training_ = false;
  double eps_ = 1;
  bool kernel_ = true;
  // host side of the kernel
  std::vector<T> sig_host_, logk_host_scalar_, dlogk_host_, grad_host_;
  std::vector<double> unit_, norm_, dist_h_, logk_h_, dlogk_dx_, gx_, dsig_;
  std::vector<std::int32_t> row_ptr_h_, col_h_, col_ptr_h_, pair_h_, pair_row_h_, fill_;
  // backend side
  Indices<B> row_ptr_, col_, col_ptr_, pair_, pair_row_;
  Tensor<B> logk_, probs_, y_, y_full_, dy_full_, dscores_, dx_, dlogk_, grad_up_;
};

template <int Heads, int HeadDim, int SigDim>
struct Kmdpa {
  static constexpr int in = 3 * Heads * HeadDim, out = Heads * HeadDim;
  template <Backend B> using bind = KmdpaLayer<B, Heads, HeadDim, SigDim>;
};

// ModFFN: y = theta + LS(ModFC_2(GEGLU(ModFC_1(LN theta)))) for every latent of every example.
//   LN: the project's LayerNorm (affine, eps 1e-6); ModFC_1: D -> 2 Hidden; GEGLU(h) = h[:, :Hidden] *
//   gelu(h[:, Hidden:]) (exact erf GELU); ModFC_2: Hidden -> D; LS: LayerScale, one learnt scale
//   per channel (D), 0.1 at reset (timm's LayerScale with init_values 0.1; the library has no
//   LayerScale layer in include/, so the gain lives here). Both ModFCs read the shared codes.
//   parameters: norm.weight, norm.bias, fc1.* and fc2.* (ModFc's: weight, bias, code_proj.weight,
//   scale, and the codes), layer_scale.gamma (D).
// Input (B U, D) (or (B, U, D)); output the same shape.
template <Backend B, int D, int Hidden, int CodeDim>
class ModFfnLayer : public LeafLayer<ModFfnLayer<B, D, Hidden, CodeDim>, B, D, D> {
 public:
  using T = typename B::Scalar;
  static constexpr double initial_layer_scale = 0.1;

  ModFfnLayer() : layer_scale({D}, /*decay=*/false) { layer_scale.value.fill(T(initial_layer_scale)); }
  void use_codes(LatentCodes<B, CodeDim>& codes) {
    fc1.use_codes(codes);
    fc2.use_codes(codes);
  }
  // Latents [begin, end) of the table only (ModFc::use_rows).
  void use_rows(int begin, int end) {
    fc1.use_rows(begin, end);
    fc2.use_rows(begin, end);
  }
  void reset_parameters(Initializer& init) {
    norm.reset_parameters(init);
    fc1.reset_parameters(init);
    fc2.reset_parameters(init);
    init.constant(layer_scale, initial_layer_scale);
  }

  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    HATCH_CHECK(x.cols() == D, "ModFfn", "input width " + std::to_string(x.cols()) + ", expected " + std::to_string(D));
    x_ = &x;
    rows_ = int(x.rows());
    const Tensor<B>& h = fc1.forward(norm.forward(x, ctx), ctx);  // (rows, 2 Hidden)
    a_.resize({rows_, Hidden});
    g_.resize({rows_, Hidden});
    gelu_.resize({rows_, Hidden});
    act_.resize({rows_, Hidden});
    B::copy_2d(a_.data(), Hidden, h.data(), 2 * Hidden, rows_, Hidden);
    B::copy_2d(g_.data(), Hidden, h.data() + Hidden, 2 * Hidden, rows_, Hidden);
    B::gelu_forward(gelu_.data(), g_.data(), std::size_t(rows_) * Hidden);
    B::mul(act_.data(), a_.data(), gelu_.data(), std::size_t(rows_) * Hidden);
    f_ = &fc2.forward(act_, ctx);  // (rows, D)
    gamma_rows_.resize({rows_, D});
    B::copy_2d(gamma_rows_.data(), D, layer_scale.value.data(), 0, rows_, D);
    y_.resize(x.shape());
    B::mul(y_.data(), f_->data(), gamma_rows_.data(), std::size_t(rows_) * D);
    B::add(y_.data(), y_.data(), x.data(), std::size_t(rows_) * D);
    return y_;
  }

  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const std::size_t rd = std::size_t(rows_) * D, rh = std::size_t(rows_) * Hidden;
    if (wants_grad(layer_scale, ctx)) {  // dgamma[c] += sum_r dy[r, c] f[r, c]
      tmp_.resize({rows_, D});
      B::mul(tmp_.data(), dy.data(), f_->data(), rd);
      B::sum_rows(layer_scale.grad.data(), tmp_.data(), rows_, D, D, T(1));
    }
    dbranch_.resize({rows_, D});
    B::mul(dbranch_.data(), dy.data(), gamma_rows_.data(), rd);
    const Tensor<B>& dact = backward_inner(fc2, dbranch_, ctx);
    da_.resize({rows_, Hidden});
    dgl_.resize({rows_, Hidden});
    dh_.resize({rows_, 2 * Hidden});
    B::mul(da_.data(), dact.data(), gelu_.data(), rh);
    B::mul(dgl_.data(), dact.data(), a_.data(), rh);
    dg_.resize({rows_, Hidden});
    B::gelu_backward(dg_.data(), dgl_.data(), g_.data(), rh);
    B::copy_2d(dh_.data(), 2 * Hidden, da_.data(), Hidden, rows_, Hidden);
    B::copy_2d(dh_.data() + Hidden, 2 * Hidden, dg_.data(), Hidden, rows_, Hidden);
    const Tensor<B>& dn = backward_inner(fc1, dh_, ctx);
    const Tensor<B>& dxn = norm.backward(dn, ctx);
    if (ctx.input_grad) {
      dx_.resize(x_->shape());
      B::add(dx_.data(), dy.data(), dxn.data(), rd);
    }
    return dx_;
  }

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    norm.visit(f, prefix + "norm.");
    fc1.visit(f, prefix + "fc1.");
    fc2.visit(f, prefix + "fc2.");
    f(prefix + "layer_scale.gamma", layer_scale);
  }

  LayerNormLayer<B, D> norm;
  ModFcLayer<B, D, 2 * Hidden, CodeDim> fc1;
  ModFcLayer<B, Hidden, D, CodeDim> fc2;
  Parameter<B> layer_scale;

 private:
  const Tensor<B>* x_ = nullptr;
  const Tensor<B>* f_ = nullptr;
  int rows_ = 0;
  Tensor<B> a_, g_, gelu_, act_, gamma_rows_, y_, tmp_, dbranch_, da_, dgl_, dg_, dh_, dx_;
};

template <int D, int Hidden, int CodeDim>
struct ModFfn {
  static constexpr int in = D, out = D;
  template <Backend B> using bind = ModFfnLayer<B, D, Hidden, CodeDim>;
};

// Signature repulsion, the NAC regulariser (ALGORITHMS.md section 4), as an auxiliary loss:
//   aux = Weight * ( - sum_{u < v, d_uv < Margin} d_uv ),   d_uv = 1 - cos(s_u, s_v)
// (Weight 0.1, Margin 0.4): pairs closer than the margin are pushed apart, the others feel
// nothing (the hinge's corner at d = Margin carries no gradient).
//
// The signatures are one table shared by every Kmdpa; the term must be counted once per table,
// not once per layer that reads it. So it is its own layer, placed once in the model per table
// (anywhere: the output is the input, unchanged, of any width), handed the table with
// use_signatures(). It follows the auxiliary-loss contract (core/aux_loss.hpp): a training
// forward computes the term (reported by aux_loss(), already weighted; 0 after an evaluation
// forward), and backward adds its gradient to the table's grad when the table trains
// (wants_grad), then passes dy through. visit shows the table as "signatures", as Kmdpa does.
// Host maths in double (U x U cosines; one download per forward, one upload per backward).
template <Backend B, int SigDim, double Weight = 0.1, double Margin = 0.4>
class SignatureRepulsionLayer
    : public LeafLayer<SignatureRepulsionLayer<B, SigDim, Weight, Margin>, B, kAnyWidth, kAnyWidth> {
 public:
  using T = typename B::Scalar;
  static constexpr double weight = Weight, margin = Margin;

  void use_signatures(LatentSignatures<B, SigDim>& s) { sig_ = &s.param; }
  void reset_parameters(Initializer&) {}

  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    HATCH_CHECK(sig_ != nullptr, "SignatureRepulsion", "no signatures: call use_signatures(signatures) before the first forward");
    active_ = ctx.training && Weight != 0;
    aux_ = 0;
    if (!active_) return x;
    u_ = int(sig_->value.shape()[0]);
    host_.resize(std::size_t(u_) * SigDim);
    B::download(host_.data(), sig_->value.data(), host_.size());
    unit_.resize(host_.size());
    norm_.resize(u_);
    for (int u = 0; u < u_; ++u) {
      double q = 0;
      for (int k = 0; k < SigDim; ++k) q += double(host_[std::size_t(u) * SigDim + k]) * host_[std::size_t(u) * SigDim + k];
      norm_[u] = std::max(std::sqrt(q), 1e-12);
      for (int k = 0; k < SigDim; ++k) unit_[std::size_t(u) * SigDim + k] = host_[std::size_t(u) * SigDim + k] / norm_[u];
    }
    close_.clear();
    double sum = 0;
    for (int u = 0; u < u_; ++u)
      for (int v = u + 1; v < u_; ++v) {
        double c = 0;
        for (int k = 0; k < SigDim; ++k) c += unit_[std::size_t(u) * SigDim + k] * unit_[std::size_t(v) * SigDim + k];
        const double d = 1.0 - c;
        if (d < Margin) {
          sum += d;
          close_.push_back({u, v, c});
        }
      }
    aux_ = -Weight * sum;
    return x;
  }

  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    if (!active_ || !wants_grad(*sig_, ctx) || close_.empty()) return dy;
    // d aux / d d_uv = -Weight;  dd/ds_u = -(n_v - cos n_u) / |s_u|
    grad_.assign(std::size_t(u_) * SigDim, 0.0);
    for (const auto& p : close_) {
      const double* nu = &unit_[std::size_t(p.u) * SigDim];
      const double* nv = &unit_[std::size_t(p.v) * SigDim];
      for (int k = 0; k < SigDim; ++k) {
        grad_[std::size_t(p.u) * SigDim + k] += Weight * (nv[k] - p.cos * nu[k]) / norm_[p.u];
        grad_[std::size_t(p.v) * SigDim + k] += Weight * (nu[k] - p.cos * nv[k]) / norm_[p.v];
      }
    }
    grad_host_.assign(grad_.begin(), grad_.end());
    up_.resize({std::int64_t(grad_host_.size())});
    B::upload(up_.data(), grad_host_.data(), grad_host_.size());
    B::axpy(sig_->grad.data(), T(1), up_.data(), grad_host_.size());
    return dy;
  }

  // The weighted term of the last training forward; 0 after an evaluation forward.
  double aux_loss() const { return aux_; }
  // Pairs u < v with d_uv < Margin in the last training forward.
  int close_pairs() const { return int(close_.size()); }

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    if (sig_) f(prefix + "signatures", *sig_);
  }

 private:
  struct Close {
    int u, v;
    double cos;
  };
  Parameter<B>* sig_ = nullptr;
  bool active_ = false;
  double aux_ = 0;
  int u_ = 0;
  std::vector<T> host_, grad_host_;
  std::vector<double> unit_, norm_, grad_;
  std::vector<Close> close_;
  Tensor<B> up_;
};

template <int SigDim, double Weight = 0.1, double Margin = 0.4>
struct SignatureRepulsion {
  static_assert(Weight >= 0 && Margin > 0, "hatch::SignatureRepulsion: weight >= 0, margin > 0");
  static constexpr int in = kAnyWidth, out = kAnyWidth;
  template <Backend B> using bind = SignatureRepulsionLayer<B, SigDim, Weight, Margin>;
};

namespace nac_detail {
template <class T>
struct ExpHalf {  // exp(x / 2): a standard deviation from a log variance
  HATCH_HD T operator()(T x) const { return hd::exp(T(0.5) * x); }
};
template <class T>
struct HalfTimes {  // (dstd, std) -> dstd * std / 2, the gradient of exp(x / 2)
  HATCH_HD T operator()(T g, T sd) const { return T(0.5) * g * sd; }
};
// A standard normal at (seed, counter, counter + 1): Box-Muller, sqrt(-2 log(1 - w1)) cos(2 pi w2).
inline double normal01(std::uint64_t seed, std::uint64_t counter) {
  const double w1 = uniform01(seed, counter), w2 = uniform01(seed, counter + 1);
  return std::sqrt(-2.0 * std::log1p(-w1)) * std::cos(6.283185307179586 * w2);
}
}  // namespace nac_detail

// The latent seeder: the initial states of the U latents of every example, from their codes.
//   theta_bu = mean(LN c_u) + exp(0.5 log_var(LN c_u)) * z_bu     (training)
//   theta_bu = mean(LN c_u)                                       (evaluation: the mean only)
// LN: the project's LayerNorm (affine, eps 1e-6; the reference's nn.LayerNorm has eps 1e-5);
// mean, log_var: Linear CodeDim -> D with bias; log_var.bias is -5 at reset (as the reference's
// seeder: the noise starts small, std exp(-2.5) ~ 0.08). z_bu is a standard normal per example,
// latent and channel, drawn by Box-Muller from the pass's counter-based stream (as Kmdpa's noise):
// entry i = (b U + u) D + c uses uniform01(ctx.seed, base + 2 i) and (.., base + 2 i + 1), with
// base = ctx.draw(2 B U D) once per training forward, so every backend and a rerun draw the same
// (drawn on the host and uploaded). The reference also adds the noise in evaluation; hatch uses
// the mean there, so that evaluation is deterministic.
//   parameters: norm.weight, norm.bias, mean.weight (D, CodeDim), mean.bias, log_var.weight,
//   log_var.bias, and the shared codes (visited as "codes").
// Input: any tensor whose first dimension is the batch B (its values are not read, e.g. the image
// tokens); output (B U, D), batch-major. The input's gradient is zero.
template <Backend B, int D, int CodeDim>
class LatentSeederLayer : public LeafLayer<LatentSeederLayer<B, D, CodeDim>, B, kAnyWidth, D> {
 public:
  using T = typename B::Scalar;
  static constexpr double initial_log_var_bias = -5.0;

  LatentSeederLayer() { log_var.bias.value.fill(T(initial_log_var_bias)); }
  void use_codes(LatentCodes<B, CodeDim>& codes) { codes_ = &codes.param; }
  void reset_parameters(Initializer& init) {
    norm.reset_parameters(init);
    mean.reset_parameters(init);
    log_var.reset_parameters(init);
    init.constant(log_var.bias, initial_log_var_bias);
  }

  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    HATCH_CHECK(codes_ != nullptr, "LatentSeeder", "no codes: call use_codes(codes) before the first forward");
    x_ = &x;
    nb_ = int(x.dim(0));
    u_ = int(codes_->value.shape()[0]);
    training_ = ctx.training;
    const std::size_t ud = std::size_t(u_) * D, n = std::size_t(nb_) * ud;
    const Tensor<B>& nrm = norm.forward(codes_->value, ctx);
    mu_ = &mean.forward(nrm, ctx);
    y_.resize({std::int64_t(nb_) * u_, D});
    if (!training_) {
      for (int b = 0; b < nb_; ++b) B::copy(y_.data() + b * ud, mu_->data(), ud);
      return y_;
    }
    const Tensor<B>& lv = log_var.forward(nrm, ctx);
    sd_.resize({u_, D});
    B::map(sd_.data(), lv.data(), ud, nac_detail::ExpHalf<T>{});
    const std::uint64_t base = ctx.draw(2 * std::uint64_t(n));
    z_host_.resize(n);
    for (std::size_t i = 0; i < n; ++i) z_host_[i] = T(nac_detail::normal01(ctx.seed, base + 2 * i));
    z_.resize({std::int64_t(nb_) * u_, D});
    B::upload(z_.data(), z_host_.data(), n);
    for (int b = 0; b < nb_; ++b) {
      B::mul(y_.data() + b * ud, z_.data() + b * ud, sd_.data(), ud);
      B::add(y_.data() + b * ud, y_.data() + b * ud, mu_->data(), ud);
    }
    return y_;
  }

  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const std::size_t ud = std::size_t(u_) * D, n = std::size_t(nb_) * ud;
    if (ctx.input_grad) {
      dx_.resize(x_->shape());
      dx_.zero();
    }
    const bool any = wants_grad(norm.weight, ctx) || wants_grad(norm.bias, ctx) || wants_grad(mean.weight, ctx) ||
                     wants_grad(mean.bias, ctx) || wants_grad(log_var.weight, ctx) || wants_grad(log_var.bias, ctx) ||
                     wants_grad(*codes_, ctx);
    if (!any) return dx_;
    dmu_.resize({u_, D});  // sum over examples
    B::sum_rows(dmu_.data(), dy.data(), nb_, int(ud), int(ud), T(0));
    const bool codes_grad = wants_grad(*codes_, ctx);
    Context inner = ctx;
    inner.input_grad = true;  // the normalised codes' gradient feeds the norm
    dn_.resize({u_, CodeDim});
    B::copy(dn_.data(), mean.backward(dmu_, inner).data(), std::size_t(u_) * CodeDim);
    if (training_) {
      tmp_.resize({std::int64_t(nb_) * u_, D});  // dstd = sum over examples of dy * z
      B::mul(tmp_.data(), dy.data(), z_.data(), n);
      dsd_.resize({u_, D});
      B::sum_rows(dsd_.data(), tmp_.data(), nb_, int(ud), int(ud), T(0));
      B::map_binary(dsd_.data(), dsd_.data(), sd_.data(), ud, nac_detail::HalfTimes<T>{});  // d log_var
      B::axpy(dn_.data(), T(1), log_var.backward(dsd_, inner).data(), std::size_t(u_) * CodeDim);
    }
    inner.input_grad = codes_grad;
    const Tensor<B>& dc = norm.backward(dn_, inner);
    if (codes_grad) B::axpy(codes_->grad.data(), T(1), dc.data(), std::size_t(u_) * CodeDim);
    return dx_;
  }

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    if (codes_) f(prefix + "codes", *codes_);
    norm.visit(f, prefix + "norm.");
    mean.visit(f, prefix + "mean.");
    log_var.visit(f, prefix + "log_var.");
  }

  LayerNormLayer<B, CodeDim> norm;
  LinearLayer<B, CodeDim, D> mean, log_var;

 private:
  Parameter<B>* codes_ = nullptr;
  const Tensor<B>* x_ = nullptr;
  const Tensor<B>* mu_ = nullptr;
  int nb_ = 0, u_ = 0;
  bool training_ = false;
  std::vector<T> z_host_;
  Tensor<B> y_, sd_, z_, dx_, dmu_, dn_, tmp_, dsd_;
};

template <int D, int CodeDim>
struct LatentSeeder {
  static constexpr int in = kAnyWidth, out = D;
  template <Backend B> using bind = LatentSeederLayer<B, D, CodeDim>;
};

// Output pooling: the output latents of each example pooled into one vector, then classified.
//   s_bu = score(theta_bu)                              Linear D -> 1, weight (1, D), no bias (a
//                                                       shared shift would not change the softmax)
//   training:   p_b = softmax_u((s_bu + g_bu) / temperature),  g = -log(-log w) Gumbel noise,
//               w = uniform01(ctx.seed, base + b U + u) + 2^-54, base = ctx.draw(B U)
//   evaluation: p_b = softmax_u(s_bu / temperature)     (no noise)
//   pooled_b = sum_u p_bu theta_bu;   y_b = classifier(pooled_b)   Linear D -> Classes
// temperature 1 (PyTorch's F.gumbel_softmax default), soft weights (no straight-through hard
// sample). The reference configures OutputLatentPooling with softmax_type "gumbel" but its class
// is not in the published code; the per-latent score from the latent's state is hatch's choice.
//   parameters: score.weight, classifier.weight (Classes, D), classifier.bias.
// Input (B U, D) (or (B, U, D)), U = UOut output latents per example; output (B, Classes).
template <Backend B, int UOut, int D, int Classes>
class OutputPoolingLayer : public LeafLayer<OutputPoolingLayer<B, UOut, D, Classes>, B, D, Classes> {
 public:
  using T = typename B::Scalar;
  static constexpr double temperature = 1.0;

  void reset_parameters(Initializer& init) {
    score.reset_parameters(init);
    classifier.reset_parameters(init);
  }
  // The pooling weights of the last forward, (B, U) row-major on the backend.
  const Tensor<B>& weights() const { return p_; }

  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    HATCH_CHECK(x.cols() == D, "OutputPooling", "input width " + std::to_string(x.cols()) + ", expected " + std::to_string(D));
    const int rows = int(x.rows());
    HATCH_CHECK(rows % UOut == 0, "OutputPooling",
                std::to_string(rows) + " input rows are not a whole number of examples of " + std::to_string(UOut) +
                    " output latents");
    x_ = &x;
    nb_ = rows / UOut;
    const Tensor<B>& s = score.forward(x, ctx);  // (B U, 1)
    z_.resize({nb_, UOut});
    B::copy(z_.data(), s.data(), std::size_t(rows));
    if (ctx.training) {
      const std::uint64_t base = ctx.draw(std::uint64_t(rows));
      noise_host_.resize(rows);
      for (int i = 0; i < rows; ++i) {
        const double w = uniform01(ctx.seed, base + std::uint64_t(i)) + 1.0 / 18014398509481984.0;  // + 2^-54
        noise_host_[i] = T(-std::log(-std::log(w)));
      }
      noise_.resize({nb_, UOut});
      B::upload(noise_.data(), noise_host_.data(), std::size_t(rows));
      B::add(z_.data(), z_.data(), noise_.data(), std::size_t(rows));
    }
    p_.resize({nb_, UOut});
    B::softmax_forward(p_.data(), z_.data(), nb_, UOut, T(1.0 / temperature));
    pooled_.resize({nb_, D});  // pooled_b = p_b (1 x U) theta_b (U x D)
    for (int b = 0; b < nb_; ++b)
      B::gemm(false, false, 1, D, UOut, T(1), p_.data() + b * UOut, UOut, x.data() + std::size_t(b) * UOut * D, D,
              T(0), pooled_.data() + std::size_t(b) * D, D);
    return classifier.forward(pooled_, ctx);
  }

  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const Tensor<B>& dpooled = backward_inner(classifier, dy, ctx);
    const int rows = nb_ * UOut;
    dp_.resize({nb_, UOut});  // dp_bu = dpooled_b . theta_bu
    for (int b = 0; b < nb_; ++b)
      B::gemm(false, true, 1, UOut, D, T(1), dpooled.data() + std::size_t(b) * D, D,
              x_->data() + std::size_t(b) * UOut * D, D, T(0), dp_.data() + b * UOut, UOut);
    ds_.resize({rows, 1});
    B::softmax_backward(ds_.data(), dp_.data(), p_.data(), nb_, UOut, T(1.0 / temperature));
    const Tensor<B>& dxs = score.backward(ds_, ctx);
    if (!ctx.input_grad) return dx_;
    dx_.resize(x_->shape());  // dx_bu = p_bu dpooled_b + the score's input gradient
    for (int b = 0; b < nb_; ++b)
      B::gemm(false, false, UOut, D, 1, T(1), p_.data() + b * UOut, 1, dpooled.data() + std::size_t(b) * D, D, T(0),
              dx_.data() + std::size_t(b) * UOut * D, D);
    B::axpy(dx_.data(), T(1), dxs.data(), std::size_t(rows) * D);
    return dx_;
  }

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    score.visit(f, prefix + "score.");
    classifier.visit(f, prefix + "classifier.");
  }

  LinearLayer<B, D, 1, false> score;
  LinearLayer<B, D, Classes> classifier;

 private:
  const Tensor<B>* x_ = nullptr;
  int nb_ = 0;
  std::vector<T> noise_host_;
  Tensor<B> z_, noise_, p_, pooled_, dp_, ds_, dx_;
};

template <int UOut, int D, int Classes>
struct OutputPooling {
  static constexpr int in = D, out = Classes;
  template <Backend B> using bind = OutputPoolingLayer<B, UOut, D, Classes>;
};

}  // namespace hatch
