#pragma once
// Neural Attentive Circuits (ALGORITHMS.md section 4, issue 10): the blocks of the model, built
// from the layers of nac.hpp.
//
//   PositionGrid<N, D>                          tokens (B, N, D) + a learnt position table (N, D)
//   NacReadIn<N, D, UIn, CodeDim>               the seeder, then the input latents read the image
//                                               tokens: (B, N, D) tokens -> (B U, D) latents
//   NacPropagator<D, Heads, Hidden, Code, Sig>  theta += LS(ModFC_out(Kmdpa(ModFC_qkv(LN theta)))),
//                                               then ModFfn: (B U, D) -> (B U, D)
//   NacReadOut<D, Heads, UIn, UOut, Code, Sig>  the output latents (the last UOut of the table)
//                                               read from the mediators: (B U, D) -> (B UOut, D)
//
// Latent rows are batch-major (row b U + u is latent u of example b); the codes and signatures
// are the model's tables, handed over with use_codes / use_signatures (nac.hpp).
#include <string>

#include "hatch/layers/nac.hpp"

namespace hatch {

// A learnt position embedding added to the patch tokens (no class token): (B, N, D) -> (B, N, D).
// Parameter "pos_embed" (1, N, D), truncated normal 0.02 at reset (as the ViT's).
template <Backend B, int N, int D>
class PositionGridLayer : public LeafLayer<PositionGridLayer<B, N, D>, B, D, D> {
 public:
  using T = typename B::Scalar;
  PositionGridLayer() : pos({1, N, D}, false) {}
  void reset_parameters(Initializer& init) { init.trunc_normal(pos, 0.02); }
  const Tensor<B>& forward(const Tensor<B>& x, Context&) {
    HATCH_CHECK(x.numel() % (std::int64_t(N) * D) == 0, "PositionGrid",
                "input " + x.shape().str() + " is not a whole number of (" + std::to_string(N) + ", " +
                    std::to_string(D) + ") token grids");
    nb_ = int(x.numel() / (std::int64_t(N) * D));
    y_.resize(x.shape());
    const std::size_t nd = std::size_t(N) * D;
    for (int b = 0; b < nb_; ++b) B::add(y_.data() + b * nd, x.data() + b * nd, pos.value.data(), nd);
    return y_;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const std::size_t nd = std::size_t(N) * D;
    if (wants_grad(pos, ctx)) B::sum_rows(pos.grad.data(), dy.data(), nb_, int(nd), int(nd), T(1));
    return dy;  // the input gradient is the output's
  }
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "pos_embed", pos);
  }
  Parameter<B> pos;

 private:
  int nb_ = 0;
  Tensor<B> y_;
};

template <int N, int D>
struct PositionGrid {
  static constexpr int in = D, out = D;
  template <Backend B> using bind = PositionGridLayer<B, N, D>;
};

// Read-in. The seeder gives every latent its initial state theta0 from its code; then the input
// latents (the first UIn rows of the table) attend to the N image tokens of their example (dense
// attention, one head, no kernel), with per-latent ModFC keys and values:
//   t = LN_t(tokens);  q_u = ModFC_q(LN_l(theta0_u))
//   k_un = ModFC_k,u(t_n) = W_k (t_n * g_u) + b_k,   g_u = 1 + a_k LN(W_ck c_u)   (ModFc's gain)
//   A_u = softmax_n(q_u . k_un / sqrt(D));   theta_u = theta0_u + ModFC_v,u(sum_n A_un t_n)
// and the other latents keep theta0. Both per-latent projections are computed without forming
// the U x N keys or values: q_u . k_un = ((W_k^T q_u) * g_u) . t_n + q_u . b_k, and the last term,
// the same for every token, cancels in the softmax (so b_k is left out: it has no effect);
// sum_n A_un ModFC_v,u(t_n) = ModFC_v,u(sum_n A_un t_n) since the weights sum to 1 and ModFC is
// affine in its input. The cost is U D^2 + U N D per example, not U N D^2.
//   parameters: seeder.*, token_norm.*, latent_norm.*, q.* and v.* (ModFc's, with the codes),
//   k.weight (D, D), k.code_proj.weight (D, CodeDim), k.scale (1, 0.1 at reset).
// Input: tokens (B, N, D); output (B U, D) with U the codes' rows.
template <Backend B, int N, int D, int UIn, int CodeDim>
class NacReadInLayer : public LeafLayer<NacReadInLayer<B, N, D, UIn, CodeDim>, B, D, D> {
 public:
  using T = typename B::Scalar;
  static constexpr double ln_eps = 1e-5, initial_scale = 0.1;
  NacReadInLayer() : k_weight({D, D}, true), k_code_proj({D, CodeDim}, true), k_scale({1}, false) {
    k_scale.value.fill(T(initial_scale));
    ones_.resize({D});
    ones_.fill(T(1));
    zeros_.resize({D});
    zeros_.zero();
  }
  void use_codes(LatentCodes<B, CodeDim>& codes) {
    seeder.use_codes(codes);
    q.use_codes(codes);
    v.use_codes(codes);
    codes_ = &codes.param;
    u_ = codes.rows();
    HATCH_CHECK(u_ >= UIn, "NacReadIn",
                "the table has " + std::to_string(u_) + " latents, fewer than the " + std::to_string(UIn) + " input latents");
  }
  void reset_parameters(Initializer& init) {
    seeder.reset_parameters(init);
    token_norm.reset_parameters(init);
    latent_norm.reset_parameters(init);
    q.reset_parameters(init);
    init.trunc_normal(k_weight, 0.02);
    init.trunc_normal(k_code_proj, 0.02);
    init.constant(k_scale, initial_scale);
    v.reset_parameters(init);
  }

  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    HATCH_CHECK(codes_ != nullptr, "NacReadIn", "no codes: call use_codes(codes) before the first forward");
    HATCH_CHECK(x.cols() == D && x.numel() % (std::int64_t(N) * D) == 0, "NacReadIn",
                "expected tokens (batch, " + std::to_string(N) + ", " + std::to_string(D) + "), got " + x.shape().str());
    nb_ = int(x.numel() / (std::int64_t(N) * D));
    const int rows = nb_ * u_;
    const std::size_t ud = std::size_t(u_) * D, nd = std::size_t(N) * D, un = std::size_t(u_) * N;
    theta0_ = &seeder.forward(x, ctx);  // (B U, D)
    t_ = &token_norm.forward(x, ctx);   // (B, N, D)
    q_ = &q.forward(latent_norm.forward(*theta0_, ctx), ctx);  // (B U, D)
    // the keys' gain per latent, g = 1 + a LN(codes W_ck^T), as ModFc's
    gm_.resize({u_, D});
    gn_.resize({u_, D});
    gk_.resize({u_, D});
    gmean_.resize({u_});
    grstd_.resize({u_});
    B::gemm(false, true, u_, D, CodeDim, T(1), codes_->value.data(), CodeDim, k_code_proj.value.data(), CodeDim, T(0),
            gm_.data(), D);
    B::layer_norm_forward(gn_.data(), gmean_.data(), grstd_.data(), gm_.data(), ones_.data(), zeros_.data(), u_, D,
                          T(ln_eps));
    B::map(gk_.data(), gn_.data(), ud, nac_detail::OnePlusScaled<T>{k_scale.value.data()});
    // r = (q W_k) * g: the query in token space
    qw_.resize({rows, D});
    B::gemm(false, false, rows, D, D, T(1), q_->data(), D, k_weight.value.data(), D, T(0), qw_.data(), D);
    r_.resize({rows, D});
    for (int b = 0; b < nb_; ++b) B::mul(r_.data() + b * ud, qw_.data() + b * ud, gk_.data(), ud);
    s_.resize({rows, N});
    p_.resize({rows, N});
    pooled_.resize({rows, D});
    for (int b = 0; b < nb_; ++b)
      B::gemm(false, true, u_, N, D, T(1), r_.data() + b * ud, D, t_->data() + b * nd, D, T(0), s_.data() + b * un, N);
    B::softmax_forward(p_.data(), s_.data(), rows, N, scale());
    for (int b = 0; b < nb_; ++b)
      B::gemm(false, false, u_, D, N, T(1), p_.data() + b * un, N, t_->data() + b * nd, D, T(0),
              pooled_.data() + b * ud, D);
    const Tensor<B>& o = v.forward(pooled_, ctx);
    y_.resize({rows, D});
    B::copy(y_.data(), theta0_->data(), std::size_t(rows) * D);
    const std::size_t id = std::size_t(UIn) * D;
    for (int b = 0; b < nb_; ++b) B::add(y_.data() + b * ud, y_.data() + b * ud, o.data() + b * ud, id);
    return y_;
  }

  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const int rows = nb_ * u_;
    const std::size_t ud = std::size_t(u_) * D, nd = std::size_t(N) * D, un = std::size_t(u_) * N,
                      id = std::size_t(UIn) * D;
    dv_.resize({rows, D});  // the read-in's output gradient: the input latents' rows only
    dv_.zero();
    for (int b = 0; b < nb_; ++b) B::copy(dv_.data() + b * ud, dy.data() + b * ud, id);
    const Tensor<B>& dpooled = backward_inner(v, dv_, ctx);
    dp_.resize(p_.shape());
    dt_.resize(t_->shape());
    for (int b = 0; b < nb_; ++b) {
      B::gemm(false, true, u_, N, D, T(1), dpooled.data() + b * ud, D, t_->data() + b * nd, D, T(0),
              dp_.data() + b * un, N);
      B::gemm(true, false, N, D, u_, T(1), p_.data() + b * un, N, dpooled.data() + b * ud, D, T(0),
              dt_.data() + b * nd, D);
    }
    ds_.resize(s_.shape());
    B::softmax_backward(ds_.data(), dp_.data(), p_.data(), rows, N, scale());
    dr_.resize(r_.shape());
    for (int b = 0; b < nb_; ++b) {
      B::gemm(false, false, u_, D, N, T(1), ds_.data() + b * un, N, t_->data() + b * nd, D, T(0), dr_.data() + b * ud, D);
      B::gemm(true, false, N, D, u_, T(1), ds_.data() + b * un, N, r_.data() + b * ud, D, T(1), dt_.data() + b * nd, D);
    }
    // r = qw * g
    dqw_.resize(qw_.shape());
    for (int b = 0; b < nb_; ++b) B::mul(dqw_.data() + b * ud, dr_.data() + b * ud, gk_.data(), ud);
    const bool gain = wants_grad(k_scale, ctx) || wants_grad(k_code_proj, ctx) || wants_grad(*codes_, ctx);
    if (gain) {
      tmp_.resize(qw_.shape());
      B::mul(tmp_.data(), dr_.data(), qw_.data(), std::size_t(rows) * D);
      dg_.resize({u_, D});
      B::sum_rows(dg_.data(), tmp_.data(), nb_, int(ud), int(ud), T(0));
      if (wants_grad(k_scale, ctx))
        B::gemm(false, true, 1, 1, int(ud), T(1), dg_.data(), int(ud), gn_.data(), int(ud), T(1), k_scale.grad.data(), 1);
      if (wants_grad(k_code_proj, ctx) || wants_grad(*codes_, ctx)) {
        dgn_.resize({u_, D});
        dgm_.resize({u_, D});
        B::map(dgn_.data(), dg_.data(), ud, nac_detail::ScaledBy<T>{k_scale.value.data()});
        B::layer_norm_backward(dgm_.data(), nullptr, nullptr, dgn_.data(), gm_.data(), gmean_.data(), grstd_.data(),
                               ones_.data(), u_, D);
        if (wants_grad(k_code_proj, ctx))
          B::gemm(true, false, D, CodeDim, u_, T(1), dgm_.data(), D, codes_->value.data(), CodeDim, T(1),
                  k_code_proj.grad.data(), CodeDim);
        if (wants_grad(*codes_, ctx))
          B::gemm(false, false, u_, CodeDim, D, T(1), dgm_.data(), D, k_code_proj.value.data(), CodeDim, T(1),
                  codes_->grad.data(), CodeDim);
      }
    }
    if (wants_grad(k_weight, ctx))  // qw = q W_k: dW_k += q^T dqw
      B::gemm(true, false, D, D, rows, T(1), q_->data(), D, dqw_.data(), D, T(1), k_weight.grad.data(), D);
    dq_.resize(q_->shape());  // dq = dqw W_k^T
    B::gemm(false, true, rows, D, D, T(1), dqw_.data(), D, k_weight.value.data(), D, T(0), dq_.data(), D);
    const Tensor<B>& dln = backward_inner(q, dq_, ctx);
    dtheta_.resize({rows, D});
    B::add(dtheta_.data(), dy.data(), backward_inner(latent_norm, dln, ctx).data(), std::size_t(rows) * D);
    {
      const bool outer = std::exchange(ctx.input_grad, false);  // the seeder's input gradient is 0
      seeder.backward(dtheta_, ctx);
      ctx.input_grad = outer;
    }
    return token_norm.backward(dt_, ctx);
  }

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    seeder.visit(f, prefix + "seeder.");
    token_norm.visit(f, prefix + "token_norm.");
    latent_norm.visit(f, prefix + "latent_norm.");
    q.visit(f, prefix + "q.");
    f(prefix + "k.weight", k_weight);
    f(prefix + "k.code_proj.weight", k_code_proj);
    f(prefix + "k.scale", k_scale);
    v.visit(f, prefix + "v.");
  }

  LatentSeederLayer<B, D, CodeDim> seeder;
  LayerNormLayer<B, D> token_norm, latent_norm;
  ModFcLayer<B, D, D, CodeDim> q, v;
  Parameter<B> k_weight, k_code_proj, k_scale;

 private:
  static T scale() { return T(1) / std::sqrt(T(D)); }
  Parameter<B>* codes_ = nullptr;
  const Tensor<B>*theta0_ = nullptr, *t_ = nullptr, *q_ = nullptr;
  int nb_ = 0, u_ = 0;
  Tensor<B> ones_, zeros_, gm_, gn_, gk_, gmean_, grstd_, qw_, r_, s_, p_, pooled_, y_;
  Tensor<B> dv_, dp_, dt_, ds_, dr_, dqw_, tmp_, dg_, dgn_, dgm_, dq_, dtheta_;
};

template <int N, int D, int UIn, int CodeDim>
struct NacReadIn {
  static constexpr int in = D, out = D;
  template <Backend B> using bind = NacReadInLayer<B, N, D, UIn, CodeDim>;
};

namespace nac_detail {
// Per-channel LayerScale on rows: y = x + f * gamma (gamma broadcast over rows). Helpers shared
// by the propagator and the read-out.
template <Backend B>
void layer_scale_rows(Tensor<B>& gamma_rows, const Parameter<B>& gamma, int rows, int d) {
  gamma_rows.resize({rows, d});
  B::copy_2d(gamma_rows.data(), d, gamma.value.data(), 0, rows, d);
}
}  // namespace nac_detail

namespace nac_detail {
// The attention sub-block the propagator and the read-out share, a base of both (its members are
// theirs: norm, qkv, attn, out, layer_scale): for the receiving latents [qb, qe) of the table,
// reading the keys [kb, ke),
//   a = LS(ModFC_out(Kmdpa(ModFC_qkv(LN theta))))          (B Uq, D), the receiving rows only
// ModFC_qkv is one ModFc D -> 3 D over every latent (the q, k and v projections side by side,
// modulated by the same code projection), ModFC_out (D -> D) runs on the receiving latents'
// rows and codes only (ModFc::use_rows); LS per channel, 0.1 at reset.
//   parameters: norm.*, qkv.*, attn.* (signatures, bandwidth), out.*, layer_scale.gamma
template <Backend B, int D, int Heads, int CodeDim, int SigDim>
class LatentAttention {
  static_assert(D % Heads == 0, "hatch::NacPropagator / NacReadOut: D must be divisible by Heads");

 public:
  using T = typename B::Scalar;
  static constexpr double initial_layer_scale = 0.1;
  LatentAttention() : layer_scale({D}, false) { layer_scale.value.fill(T(initial_layer_scale)); }
  // Dense attention without the kernel (Kmdpa::use_kernel): m2mKD's students, the dense baseline.
  void use_kernel(bool on) { attn.use_kernel(on); }
  void use_signatures(LatentSignatures<B, SigDim>& s) { attn.use_signatures(s); }

  LayerNormLayer<B, D> norm;
  ModFcLayer<B, D, 3 * D, CodeDim> qkv;
  KmdpaLayer<B, Heads, D / Heads, SigDim> attn;
  ModFcLayer<B, D, D, CodeDim> out;
  Parameter<B> layer_scale;

 protected:
  void route(int q_begin, int q_end, int k_begin, int k_end) {
    attn.restrict_pairs(q_begin, q_end, k_begin, k_end);
    out.use_rows(q_begin, q_end);
  }
  void attention_codes(LatentCodes<B, CodeDim>& codes) {
    qkv.use_codes(codes);
    out.use_codes(codes);
  }
  void reset_attention(Initializer& init) {
    norm.reset_parameters(init);
    qkv.reset_parameters(init);
    attn.reset_parameters(init);
    out.reset_parameters(init);
    init.constant(layer_scale, initial_layer_scale);
  }
  template <class F>
  void visit_attention(F& f, const std::string& prefix) {
    norm.visit(f, prefix + "norm.");
    qkv.visit(f, prefix + "qkv.");
    attn.visit(f, prefix + "attn.");
    out.visit(f, prefix + "out.");
    f(prefix + "layer_scale.gamma", layer_scale);
  }
  // a for the receiving rows of x (B U, D).
  const Tensor<B>& attend(const Tensor<B>& x, Context& ctx) {
    const Tensor<B>& o = attn.forward(qkv.forward(norm.forward(x, ctx), ctx), ctx);  // (B Uq, D)
    f_ = &out.forward(o, ctx);
    const int rq = int(o.rows());
    layer_scale_rows(gamma_rows_, layer_scale, rq, D);
    a_.resize({rq, D});
    B::mul(a_.data(), f_->data(), gamma_rows_.data(), std::size_t(rq) * D);
    return a_;
  }
  // da -> d theta (B U, D) through LN (every row: keys and values too); parameter gradients as
  // ctx says. The result is valid when ctx.input_grad is set.
  const Tensor<B>& attend_backward(const Tensor<B>& da, Context& ctx) {
    const int rq = int(da.rows());
    if (wants_grad(layer_scale, ctx)) {
      tmp_.resize({rq, D});
      B::mul(tmp_.data(), da.data(), f_->data(), std::size_t(rq) * D);
      B::sum_rows(layer_scale.grad.data(), tmp_.data(), rq, D, D, T(1));
    }
    dbranch_.resize({rq, D});
    B::mul(dbranch_.data(), da.data(), gamma_rows_.data(), std::size_t(rq) * D);
    const Tensor<B>& dqkv = backward_inner(attn, backward_inner(out, dbranch_, ctx), ctx);
    return norm.backward(backward_inner(qkv, dqkv, ctx), ctx);
  }

 private:
  const Tensor<B>* f_ = nullptr;
  Tensor<B> gamma_rows_, a_, tmp_, dbranch_;
};
}  // namespace nac_detail

// Propagator block: one round of attention among the latents, then the code-conditioned FFN, for
// the receiving latents [QBegin, QEnd) of the table (a negative QEnd: to the last row), which read
// from every latent before QEnd (NAC: the mediators receive from the input and mediator latents;
// QBegin 0, QEnd -1, the default: every latent from every latent):
//   h_u = theta_u + a_u (LatentAttention above);   theta'_u = ModFfn(h)_u     u in [QBegin, QEnd)
//   theta'_u = theta_u                                                        the other latents
// The ModFfn runs on the receiving latents' rows and codes only (ModFc::use_rows). The receiving
// rows are gathered and scattered per example with `copy`.
//   parameters: norm.*, qkv.*, attn.* (signatures, bandwidth), out.*, layer_scale.gamma, ffn.*
// Input and output (B U, D) (or (B, U, D)).
// take_kept_fraction(): the mean of Kmdpa's kept fraction (of the query x key pairs) over the
// training forwards since the last call (fit reports it per epoch); 0 if there was none.
template <Backend B, int D, int Heads, int Hidden, int CodeDim, int SigDim, int QBegin = 0, int QEnd = -1>
class NacPropagatorLayer
    : public LeafLayer<NacPropagatorLayer<B, D, Heads, Hidden, CodeDim, SigDim, QBegin, QEnd>, B, D, D>,
      public nac_detail::LatentAttention<B, D, Heads, CodeDim, SigDim> {
  static_assert(QBegin >= 0 && (QEnd < 0 || QEnd > QBegin), "hatch::NacPropagator: empty receiving range");
  using Attention = nac_detail::LatentAttention<B, D, Heads, CodeDim, SigDim>;

 public:
  using T = typename B::Scalar;
  using Attention::attn;
  NacPropagatorLayer() { receive(QBegin, QEnd); }
  // The receiving latents at run time (the template's QBegin, QEnd by default); m2mKD's
  // distillation student receives on every row: receive(0, -1). Call before use_codes.
  void receive(int begin, int end) {
    HATCH_CHECK(begin >= 0 && (end < 0 || end > begin), "NacPropagator::receive",
                "empty receiving range [" + std::to_string(begin) + ", " + std::to_string(end) + ")");
    qb_ = begin;
    qe_ = end;
    this->route(begin, end, 0, end);
    ffn.use_rows(begin, end);
  }
  void use_codes(LatentCodes<B, CodeDim>& codes) {
    this->attention_codes(codes);
    ffn.use_codes(codes);
    u_ = codes.rows();
    HATCH_CHECK(qe_ <= u_ && qb_ < (qe_ < 0 ? u_ : qe_), "NacPropagator",
                "receiving latents [" + std::to_string(qb_) + ", " + std::to_string(qe_) + ") outside the table's " +
                    std::to_string(u_));
  }
  void reset_parameters(Initializer& init) {
    this->reset_attention(init);
    ffn.reset_parameters(init);
  }
  double take_kept_fraction() {
    const double r = kept_n_ > 0 ? kept_sum_ / kept_n_ : 0.0;
    kept_sum_ = 0;
    kept_n_ = 0;
    return r;
  }

  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    HATCH_CHECK(x.cols() == D, "NacPropagator", "input width " + std::to_string(x.cols()) + ", expected " + std::to_string(D));
    x_ = &x;
    rows_ = int(x.rows());
    const Tensor<B>& a = this->attend(x, ctx);  // (B Uq, D)
    q0_ = qb_;
    uq_ = (qe_ < 0 ? u_ : qe_) - qb_;
    nb_ = rows_ / u_;  // Kmdpa checked: a whole number of examples of u_ latents
    if (ctx.training) {
      kept_sum_ += attn.kept_fraction();
      ++kept_n_;
    }
    const int rq = int(a.rows());
    h_.resize({rq, D});  // h = theta (receiving rows) + a
    const std::size_t qd = std::size_t(uq_) * D, ud = std::size_t(u_) * D, off = std::size_t(q0_) * D;
    for (int b = 0; b < nb_; ++b) B::add(h_.data() + b * qd, a.data() + b * qd, x.data() + b * ud + off, qd);
    const Tensor<B>& z = ffn.forward(h_, ctx);
    y_.resize(x.shape());
    B::copy(y_.data(), x.data(), std::size_t(rows_) * D);
    for (int b = 0; b < nb_; ++b) B::copy(y_.data() + b * ud + off, z.data() + b * qd, qd);
    return y_;
  }

  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const int rq = nb_ * uq_;
    const std::size_t qd = std::size_t(uq_) * D, ud = std::size_t(u_) * D, off = std::size_t(q0_) * D;
    dz_.resize({rq, D});
    for (int b = 0; b < nb_; ++b) B::copy(dz_.data() + b * qd, dy.data() + b * ud + off, qd);
    const Tensor<B>& dh = backward_inner(ffn, dz_, ctx);
    const Tensor<B>& dxn = this->attend_backward(dh, ctx);
    if (ctx.input_grad) {  // dx = dxn + (dy on the other rows, dh on the receiving rows)
      dx_.resize(x_->shape());
      B::add(dx_.data(), dxn.data(), dy.data(), std::size_t(rows_) * D);
      for (int b = 0; b < nb_; ++b) {
        T* d = dx_.data() + b * ud + off;
        B::add(d, dxn.data() + b * ud + off, dh.data() + b * qd, qd);
      }
    }
    return dx_;
  }

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    this->visit_attention(f, prefix);
    ffn.visit(f, prefix + "ffn.");
  }

  ModFfnLayer<B, D, Hidden, CodeDim> ffn;

 private:
  const Tensor<B>* x_ = nullptr;
  int rows_ = 0, u_ = 0, nb_ = 0, q0_ = 0, uq_ = 0, qb_ = QBegin, qe_ = QEnd;
  double kept_sum_ = 0;
  int kept_n_ = 0;
  Tensor<B> h_, y_, dz_, dx_;
};

template <int D, int Heads, int Hidden, int CodeDim, int SigDim, int QBegin = 0, int QEnd = -1>
struct NacPropagator {
  static constexpr int in = D, out = D;
  template <Backend B> using bind = NacPropagatorLayer<B, D, Heads, Hidden, CodeDim, SigDim, QBegin, QEnd>;
};

// Read-out: the output latents, the last UOut rows of the table, read from the mediators (rows
// [UIn, U - UOut)) and from themselves (so that every output latent keeps at least its own pair):
//   y_u = a_u (LatentAttention above, queries [U - UOut, U), keys [UIn, U))
// No residual, as the reference's read-out (include_residual_in_latent_attention: false): the
// output latents' own states hold no image information (they receive in no propagator round),
// and with a residual the logits start as a function of the codes alone, the image's message
// scaled down by LayerScale 0.1 on top.
// Output (B UOut, D), the input to OutputPooling<UOut, D, Classes>.
//   parameters: norm.*, qkv.*, attn.*, out.*, layer_scale.gamma
template <Backend B, int D, int Heads, int UIn, int UOut, int CodeDim, int SigDim>
class NacReadOutLayer : public LeafLayer<NacReadOutLayer<B, D, Heads, UIn, UOut, CodeDim, SigDim>, B, D, D>,
                        public nac_detail::LatentAttention<B, D, Heads, CodeDim, SigDim> {
 public:
  using T = typename B::Scalar;
  void use_codes(LatentCodes<B, CodeDim>& codes) {
    this->attention_codes(codes);
    u_ = codes.rows();
    HATCH_CHECK(u_ > senders_ + UOut, "NacReadOut",
                "the table has " + std::to_string(u_) + " latents, not more than the " + std::to_string(senders_) +
                    " input and " + std::to_string(UOut) + " output latents");
    this->route(u_ - UOut, u_, senders_, u_);
  }
  // The first latent the output latents read from at run time (the template's UIn, skipping the
  // input latents, by default); m2mKD's distillation student reads every row before its output
  // latents: read_from(0). Call before use_codes.
  void read_from(int first) {
    HATCH_CHECK(first >= 0, "NacReadOut::read_from", "negative first latent");
    senders_ = first;
  }
  void reset_parameters(Initializer& init) { this->reset_attention(init); }

  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    HATCH_CHECK(x.cols() == D, "NacReadOut", "input width " + std::to_string(x.cols()) + ", expected " + std::to_string(D));
    HATCH_CHECK(u_ > 0, "NacReadOut", "no codes: call use_codes(codes) before the first forward");
    return this->attend(x, ctx);
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) { return this->attend_backward(dy, ctx); }

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    this->visit_attention(f, prefix);
  }

 private:
  int u_ = 0, senders_ = UIn;
};

template <int D, int Heads, int UIn, int UOut, int CodeDim, int SigDim>
struct NacReadOut {
  static constexpr int in = D, out = D;
  template <Backend B> using bind = NacReadOutLayer<B, D, Heads, UIn, UOut, CodeDim, SigDim>;
};

}  // namespace hatch
