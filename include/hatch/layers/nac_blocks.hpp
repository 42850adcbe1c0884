#pragma once
// Neural Attentive Circuits (ALGORITHMS.md section 4, issue 10): the blocks of the model, built
// from the layers of nac.hpp.
//
//   PositionGrid<N, D>                          tokens (B, N, D) + a learnt position table (N, D)
//   NacReadIn<N, D, CodeDim>                    the seeder, then every latent reads the image
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

// Read-in. The seeder gives every latent its initial state theta0 from its code; then every latent
// u attends to the N image tokens of its example (dense attention, one head, no kernel):
//   t = LN_t(tokens);  q_u = ModFC_q(LN_l(theta0_u));  k_n = W_k t_n + b_k (Linear)
//   A_u = softmax_n(q_u . k_n / sqrt(D));   theta_u = theta0_u + ModFC_v(sum_n A_un t_n)
// ModFC_v on the pooled tokens is exactly the attention over per-latent ModFC values,
// sum_n A_un ModFC_v,u(t_n) (the softmax weights sum to 1 and ModFC is affine in its input),
// computed in U D^2 per example instead of U N D^2. Departure: the keys are one Linear shared
// by the latents (the reference modulates them per latent as well).
//   parameters: seeder.*, token_norm.*, latent_norm.*, q.*, k.*, v.* (q and v: ModFc's, with the
//   codes).
// Input: tokens (B, N, D); output (B U, D) with U the codes' rows.
template <Backend B, int N, int D, int CodeDim>
class NacReadInLayer : public LeafLayer<NacReadInLayer<B, N, D, CodeDim>, B, D, D> {
 public:
  using T = typename B::Scalar;
  void use_codes(LatentCodes<B, CodeDim>& codes) {
    seeder.use_codes(codes);
    q.use_codes(codes);
    v.use_codes(codes);
    u_ = codes.rows();
  }
  void reset_parameters(Initializer& init) {
    seeder.reset_parameters(init);
    token_norm.reset_parameters(init);
    latent_norm.reset_parameters(init);
    q.reset_parameters(init);
    k.reset_parameters(init);
    v.reset_parameters(init);
  }

  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    HATCH_CHECK(x.cols() == D && x.numel() % (std::int64_t(N) * D) == 0, "NacReadIn",
                "expected tokens (batch, " + std::to_string(N) + ", " + std::to_string(D) + "), got " + x.shape().str());
    nb_ = int(x.numel() / (std::int64_t(N) * D));
    x_ = &x;
    theta0_ = &seeder.forward(x, ctx);  // (B U, D)
    t_ = &token_norm.forward(x, ctx);   // (B, N, D)
    k_ = &k.forward(*t_, ctx);
    q_ = &q.forward(latent_norm.forward(*theta0_, ctx), ctx);  // (B U, D)
    s_.resize({std::int64_t(nb_) * u_, N});
    p_.resize({std::int64_t(nb_) * u_, N});
    pooled_.resize({std::int64_t(nb_) * u_, D});
    const std::size_t ud = std::size_t(u_) * D, nd = std::size_t(N) * D, un = std::size_t(u_) * N;
    for (int b = 0; b < nb_; ++b)
      B::gemm(false, true, u_, N, D, T(1), q_->data() + b * ud, D, k_->data() + b * nd, D, T(0), s_.data() + b * un, N);
    B::softmax_forward(p_.data(), s_.data(), nb_ * u_, N, scale());
    for (int b = 0; b < nb_; ++b)
      B::gemm(false, false, u_, D, N, T(1), p_.data() + b * un, N, t_->data() + b * nd, D, T(0),
              pooled_.data() + b * ud, D);
    const Tensor<B>& o = v.forward(pooled_, ctx);
    y_.resize({std::int64_t(nb_) * u_, D});
    B::add(y_.data(), theta0_->data(), o.data(), std::size_t(nb_) * ud);
    return y_;
  }

  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const std::size_t ud = std::size_t(u_) * D, nd = std::size_t(N) * D, un = std::size_t(u_) * N;
    const Tensor<B>& dpooled = backward_inner(v, dy, ctx);
    dp_.resize(p_.shape());
    dt_.resize(t_->shape());
    for (int b = 0; b < nb_; ++b) {
      B::gemm(false, true, u_, N, D, T(1), dpooled.data() + b * ud, D, t_->data() + b * nd, D, T(0),
              dp_.data() + b * un, N);
      B::gemm(true, false, N, D, u_, T(1), p_.data() + b * un, N, dpooled.data() + b * ud, D, T(0),
              dt_.data() + b * nd, D);
    }
    ds_.resize(s_.shape());
    B::softmax_backward(ds_.data(), dp_.data(), p_.data(), nb_ * u_, N, scale());
    dq_.resize(q_->shape());
    dk_.resize(k_->shape());
    for (int b = 0; b < nb_; ++b) {
      B::gemm(false, false, u_, D, N, T(1), ds_.data() + b * un, N, k_->data() + b * nd, D, T(0), dq_.data() + b * ud, D);
      B::gemm(true, false, N, D, u_, T(1), ds_.data() + b * un, N, q_->data() + b * ud, D, T(0), dk_.data() + b * nd, D);
    }
    B::axpy(dt_.data(), T(1), backward_inner(k, dk_, ctx).data(), std::size_t(nb_) * nd);
    const Tensor<B>& dln = backward_inner(q, dq_, ctx);
    dtheta_.resize({std::int64_t(nb_) * u_, D});
    B::add(dtheta_.data(), dy.data(), backward_inner(latent_norm, dln, ctx).data(), std::size_t(nb_) * ud);
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
    k.visit(f, prefix + "k.");
    v.visit(f, prefix + "v.");
  }

  LatentSeederLayer<B, D, CodeDim> seeder;
  LayerNormLayer<B, D> token_norm, latent_norm;
  ModFcLayer<B, D, D, CodeDim> q, v;
  LinearLayer<B, D, D> k;

 private:
  static T scale() { return T(1) / std::sqrt(T(D)); }
  const Tensor<B>*x_ = nullptr, *theta0_ = nullptr, *t_ = nullptr, *k_ = nullptr, *q_ = nullptr;
  int nb_ = 0, u_ = 0;
  Tensor<B> s_, p_, pooled_, y_, dp_, dt_, ds_, dq_, dk_, dtheta_;
};

template <int N, int D, int CodeDim>
struct NacReadIn {
  static constexpr int in = D, out = D;
  template <Backend B> using bind = NacReadInLayer<B, N, D, CodeDim>;
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

// Propagator block: one round of attention among the latents, then the code-conditioned FFN.
//   h = theta + LS_attn(ModFC_out(Kmdpa(ModFC_qkv(LN theta))));   y = ModFfn(h)
// ModFC_qkv is one ModFc D -> 3 D (the q, k and v projections side by side, modulated by the
// same code projection), ModFC_out a ModFc D -> D; LS_attn a per-channel LayerScale, 0.1 at reset.
// Every latent queries every latent (the pair list is the square one the signatures keep).
//   parameters: norm.*, qkv.*, attn.* (signatures, bandwidth), out.*, layer_scale.gamma, ffn.*
// Input and output (B U, D).
// take_kept_fraction(): the mean of Kmdpa's kept fraction over the training forwards since the
// last call (fit reports it per epoch); 0 if there was none.
template <Backend B, int D, int Heads, int Hidden, int CodeDim, int SigDim>
class NacPropagatorLayer : public LeafLayer<NacPropagatorLayer<B, D, Heads, Hidden, CodeDim, SigDim>, B, D, D> {
  static_assert(D % Heads == 0, "hatch::NacPropagator: D must be divisible by Heads");

 public:
  using T = typename B::Scalar;
  static constexpr double initial_layer_scale = 0.1;
  NacPropagatorLayer() : layer_scale({D}, false) { layer_scale.value.fill(T(initial_layer_scale)); }
  void use_codes(LatentCodes<B, CodeDim>& codes) {
    qkv.use_codes(codes);
    out.use_codes(codes);
    ffn.use_codes(codes);
  }
  void use_signatures(LatentSignatures<B, SigDim>& s) { attn.use_signatures(s); }
  void reset_parameters(Initializer& init) {
    norm.reset_parameters(init);
    qkv.reset_parameters(init);
    attn.reset_parameters(init);
    out.reset_parameters(init);
    init.constant(layer_scale, initial_layer_scale);
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
    const Tensor<B>& o = attn.forward(qkv.forward(norm.forward(x, ctx), ctx), ctx);
    if (ctx.training) {
      kept_sum_ += attn.kept_fraction();
      ++kept_n_;
    }
    f_ = &out.forward(o, ctx);
    nac_detail::layer_scale_rows(gamma_rows_, layer_scale, rows_, D);
    h_.resize({rows_, D});
    B::mul(h_.data(), f_->data(), gamma_rows_.data(), std::size_t(rows_) * D);
    B::add(h_.data(), h_.data(), x.data(), std::size_t(rows_) * D);
    const Tensor<B>& y = ffn.forward(h_, ctx);
    if (x.shape().rank == 2) return y;
    y_.view_of(y, x.shape());
    return y_;
  }

  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const std::size_t rd = std::size_t(rows_) * D;
    dyv_.view_of(dy, h_.shape());
    const Tensor<B>& dh = backward_inner(ffn, dyv_, ctx);
    if (wants_grad(layer_scale, ctx)) {
      tmp_.resize({rows_, D});
      B::mul(tmp_.data(), dh.data(), f_->data(), rd);
      B::sum_rows(layer_scale.grad.data(), tmp_.data(), rows_, D, D, T(1));
    }
    dbranch_.resize({rows_, D});
    B::mul(dbranch_.data(), dh.data(), gamma_rows_.data(), rd);
    const Tensor<B>& dqkv = backward_inner(attn, backward_inner(out, dbranch_, ctx), ctx);
    const Tensor<B>& dxn = norm.backward(backward_inner(qkv, dqkv, ctx), ctx);
    if (ctx.input_grad) {
      dx_.resize(x_->shape());
      B::add(dx_.data(), dh.data(), dxn.data(), rd);
    }
    return dx_;
  }

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    norm.visit(f, prefix + "norm.");
    qkv.visit(f, prefix + "qkv.");
    attn.visit(f, prefix + "attn.");
    out.visit(f, prefix + "out.");
    f(prefix + "layer_scale.gamma", layer_scale);
    ffn.visit(f, prefix + "ffn.");
  }

  LayerNormLayer<B, D> norm;
  ModFcLayer<B, D, 3 * D, CodeDim> qkv;
  KmdpaLayer<B, Heads, D / Heads, SigDim> attn;
  ModFcLayer<B, D, D, CodeDim> out;
  Parameter<B> layer_scale;
  ModFfnLayer<B, D, Hidden, CodeDim> ffn;

 private:
  const Tensor<B>* x_ = nullptr;
  const Tensor<B>* f_ = nullptr;
  int rows_ = 0;
  double kept_sum_ = 0;
  int kept_n_ = 0;
  Tensor<B> gamma_rows_, h_, y_, dyv_, tmp_, dbranch_, dx_;
};

template <int D, int Heads, int Hidden, int CodeDim, int SigDim>
struct NacPropagator {
  static constexpr int in = D, out = D;
  template <Backend B> using bind = NacPropagatorLayer<B, D, Heads, Hidden, CodeDim, SigDim>;
};

// Read-out: the output latents, the last UOut rows of the table, read from the mediators (rows
// [UIn, U - UOut)) and from themselves (so that every output latent keeps at least its own pair):
//   h = LN theta;  o = Kmdpa over queries [U - UOut, U), keys [UIn, U) of ModFC_qkv(h)
//   y_u = theta_u + LS(W_o o_u + b_o)       for the output latents only
// W_o is a plain Linear (a ModFc would need every latent's rows). Output (B UOut, D), the input
// to OutputPooling<UOut, D, Classes>.
//   parameters: norm.*, qkv.*, attn.*, out.*, layer_scale.gamma
template <Backend B, int D, int Heads, int UIn, int UOut, int CodeDim, int SigDim>
class NacReadOutLayer : public LeafLayer<NacReadOutLayer<B, D, Heads, UIn, UOut, CodeDim, SigDim>, B, D, D> {
  static_assert(D % Heads == 0, "hatch::NacReadOut: D must be divisible by Heads");

 public:
  using T = typename B::Scalar;
  static constexpr double initial_layer_scale = 0.1;
  NacReadOutLayer() : layer_scale({D}, false) { layer_scale.value.fill(T(initial_layer_scale)); }
  void use_codes(LatentCodes<B, CodeDim>& codes) {
    qkv.use_codes(codes);
    u_ = codes.rows();
    HATCH_CHECK(u_ > UIn + UOut, "NacReadOut",
                "the table has " + std::to_string(u_) + " latents, not more than the " + std::to_string(UIn) +
                    " input and " + std::to_string(UOut) + " output latents");
    attn.restrict_pairs(u_ - UOut, u_, UIn, u_);
  }
  void use_signatures(LatentSignatures<B, SigDim>& s) { attn.use_signatures(s); }
  void reset_parameters(Initializer& init) {
    norm.reset_parameters(init);
    qkv.reset_parameters(init);
    attn.reset_parameters(init);
    out.reset_parameters(init);
    init.constant(layer_scale, initial_layer_scale);
  }

  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    HATCH_CHECK(x.cols() == D, "NacReadOut", "input width " + std::to_string(x.cols()) + ", expected " + std::to_string(D));
    HATCH_CHECK(u_ > 0, "NacReadOut", "no codes: call use_codes(codes) before the first forward");
    x_ = &x;
    rows_ = int(x.rows());
    nb_ = rows_ / u_;
    const Tensor<B>& o = attn.forward(qkv.forward(norm.forward(x, ctx), ctx), ctx);  // (B UOut, D)
    f_ = &out.forward(o, ctx);
    const int ro = nb_ * UOut;
    nac_detail::layer_scale_rows(gamma_rows_, layer_scale, ro, D);
    y_.resize({ro, D});
    B::mul(y_.data(), f_->data(), gamma_rows_.data(), std::size_t(ro) * D);
    const std::size_t od = std::size_t(UOut) * D;
    for (int b = 0; b < nb_; ++b)
      B::add(y_.data() + b * od, y_.data() + b * od, x.data() + (std::size_t(b) * u_ + (u_ - UOut)) * D, od);
    return y_;
  }

  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const int ro = nb_ * UOut;
    const std::size_t od = std::size_t(UOut) * D;
    if (wants_grad(layer_scale, ctx)) {
      tmp_.resize({ro, D});
      B::mul(tmp_.data(), dy.data(), f_->data(), std::size_t(ro) * D);
      B::sum_rows(layer_scale.grad.data(), tmp_.data(), ro, D, D, T(1));
    }
    dbranch_.resize({ro, D});
    B::mul(dbranch_.data(), dy.data(), gamma_rows_.data(), std::size_t(ro) * D);
    const Tensor<B>& dqkv = backward_inner(attn, backward_inner(out, dbranch_, ctx), ctx);
    const Tensor<B>& dxn = norm.backward(backward_inner(qkv, dqkv, ctx), ctx);
    if (ctx.input_grad) {
      dx_.resize(x_->shape());
      B::copy(dx_.data(), dxn.data(), std::size_t(rows_) * D);
      for (int b = 0; b < nb_; ++b) {
        T* d = dx_.data() + (std::size_t(b) * u_ + (u_ - UOut)) * D;
        B::add(d, d, dy.data() + b * od, od);
      }
    }
    return dx_;
  }

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    norm.visit(f, prefix + "norm.");
    qkv.visit(f, prefix + "qkv.");
    attn.visit(f, prefix + "attn.");
    out.visit(f, prefix + "out.");
    f(prefix + "layer_scale.gamma", layer_scale);
  }

  LayerNormLayer<B, D> norm;
  ModFcLayer<B, D, 3 * D, CodeDim> qkv;
  KmdpaLayer<B, Heads, D / Heads, SigDim> attn;
  LinearLayer<B, D, D> out;
  Parameter<B> layer_scale;

 private:
  const Tensor<B>* x_ = nullptr;
  const Tensor<B>* f_ = nullptr;
  int rows_ = 0, nb_ = 0, u_ = 0;
  Tensor<B> gamma_rows_, y_, tmp_, dbranch_, dx_;
};

template <int D, int Heads, int UIn, int UOut, int CodeDim, int SigDim>
struct NacReadOut {
  static constexpr int in = D, out = D;
  template <Backend B> using bind = NacReadOutLayer<B, D, Heads, UIn, UOut, CodeDim, SigDim>;
};

}  // namespace hatch
