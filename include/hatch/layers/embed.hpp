#pragma once
// Patch embedding (patchify + linear, the same map as a stride-p convolution), and the class
// token + position embedding.
#include <string>

#include "hatch/core/layer.hpp"
#include "hatch/core/parameter.hpp"

namespace hatch {

// Images (B, C, Img, Img) -> tokens (B, (Img/P)^2, D). The weight is stored as PyTorch's
// Conv2d weight (D, C, P, P), which read as a matrix is (D, C P P).
template <Backend B, int C, int Img, int P, int D>
class PatchEmbedLayer : public LeafLayer<PatchEmbedLayer<B, C, Img, P, D>, B, C * Img * Img, D> {
  static_assert(Img % P == 0, "hatch::PatchEmbed: the image size must be a multiple of the patch size");

 public:
  static constexpr int patches = (Img / P) * (Img / P), patch_dim = C * P * P;

  PatchEmbedLayer() : weight({D, C, P, P}, true), bias({D}, false) {}
  void reset_parameters(Initializer& init) {
    init.trunc_normal(weight, 0.02);
    bias.value.zero();
  }
  const Tensor<B>& forward(const Tensor<B>& x, Context&) {
    HATCH_CHECK(x.shape().rank == 4 && x.dim(1) == C && x.dim(2) == Img && x.dim(3) == Img, "PatchEmbed",
            "expected images (batch, " + std::to_string(C) + ", " + std::to_string(Img) + ", " +
                std::to_string(Img) + "), got " + x.shape().str());
    batch_ = int(x.dim(0));
    cols_.resize({batch_, patches, patch_dim});
    B::im2patch(cols_.data(), x.data(), batch_, C, Img, Img, P);
    y_.resize({batch_, patches, D});
    B::gemm(false, true, batch_ * patches, D, patch_dim, 1, cols_.data(), patch_dim, weight.value.data(),
            patch_dim, 0, y_.data(), D);
    B::add_bias_rows(y_.data(), bias.value.data(), batch_ * patches, D);
    return y_;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const int rows = batch_ * patches;
    if (wants_grad(weight, ctx))
      B::gemm(true, false, D, patch_dim, rows, 1, dy.data(), D, cols_.data(), patch_dim, 1, weight.grad.data(),
              patch_dim);
    if (wants_grad(bias, ctx)) B::sum_rows(bias.grad.data(), dy.data(), rows, D, D, 1);
    if (!ctx.input_grad) return dx_;
    Tensor<B>& dcols = grad_buffer(ctx, dcols_, cols_.shape());
    B::gemm(false, false, rows, patch_dim, D, 1, dy.data(), D, weight.value.data(), patch_dim, 0, dcols.data(),
            patch_dim);
    Tensor<B>& dx = grad_buffer(ctx, dx_, Shape{batch_, C, Img, Img});
    B::patch2im(dx.data(), dcols.data(), batch_, C, Img, Img, P);
    release_grad(ctx, dcols);
    return dx;
  }
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "proj.weight", weight);
    f(prefix + "proj.bias", bias);
  }

  Parameter<B> weight, bias;

 private:
  int batch_ = 0;
  Tensor<B> cols_, y_, dcols_, dx_;
};

// Tokens (B, N, D) -> (B, N + 1, D): prepend the class token, add the position embedding.
template <Backend B, int N, int D>
class ClassPosLayer : public LeafLayer<ClassPosLayer<B, N, D>, B, D, D> {
 public:
  ClassPosLayer() : cls_token({1, 1, D}, false), pos_embed({1, N + 1, D}, false) {}
  void reset_parameters(Initializer& init) {
    init.trunc_normal(cls_token, 1e-6);
    init.trunc_normal(pos_embed, 0.02);
  }
  const Tensor<B>& forward(const Tensor<B>& x, Context&) {
    HATCH_CHECK(x.shape().rank == 3 && x.dim(1) == N && x.dim(2) == D, "ClassPos",
            "expected tokens (batch, " + std::to_string(N) + ", " + std::to_string(D) + "), got " + x.shape().str());
    batch_ = int(x.dim(0));
    y_.resize({batch_, N + 1, D});
    B::copy_2d(y_.data(), (N + 1) * D, cls_token.value.data(), 0, batch_, D);
    B::copy_2d(y_.data() + D, (N + 1) * D, x.data(), N * D, batch_, N * D);
    B::add_bias_rows(y_.data(), pos_embed.value.data(), batch_, (N + 1) * D);
    return y_;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    if (wants_grad(cls_token, ctx)) B::sum_rows(cls_token.grad.data(), dy.data(), batch_, D, (N + 1) * D, 1);
    if (wants_grad(pos_embed, ctx))
      B::sum_rows(pos_embed.grad.data(), dy.data(), batch_, (N + 1) * D, (N + 1) * D, 1);
    if (!ctx.input_grad) return dx_;
    Tensor<B>& dx = grad_buffer(ctx, dx_, Shape{batch_, N, D});
    B::copy_2d(dx.data(), N * D, dy.data() + D, (N + 1) * D, batch_, N * D);
    return dx;
  }
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "cls_token", cls_token);
    f(prefix + "pos_embed", pos_embed);
  }

  Parameter<B> cls_token, pos_embed;

 private:
  int batch_ = 0;
  Tensor<B> y_, dx_;
};

// Tokens (B, N, D) -> (B, D): the class token (token 0).
template <Backend B, int D>
class ClassTokenLayer : public ParameterFreeLayer<ClassTokenLayer<B, D>, B, D, D> {
 public:
  const Tensor<B>& forward(const Tensor<B>& x, Context&) {
    HATCH_CHECK(x.shape().rank == 3 && x.dim(2) == D, "ClassToken", "expected tokens (batch, tokens, " +
                                                                    std::to_string(D) + "), got " + x.shape().str());
    in_shape_ = x.shape();
    y_.resize({x.dim(0), D});
    B::copy_2d(y_.data(), D, x.data(), int(x.dim(1)) * D, int(x.dim(0)), D);
    return y_;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    if (!ctx.input_grad) return dx_;
    Tensor<B>& dx = grad_buffer(ctx, dx_, in_shape_);
    dx.zero();
    B::copy_2d(dx.data(), int(in_shape_[1]) * D, dy.data(), D, int(in_shape_[0]), D);
    return dx;
  }

 private:
  Shape in_shape_;
  Tensor<B> y_, dx_;
};

template <int C, int Img, int P, int D>
struct PatchEmbed {
  static constexpr int in = C * Img * Img, out = D;
  template <Backend B> using bind = PatchEmbedLayer<B, C, Img, P, D>;
};
template <int N, int D>
struct ClassPos {
  static constexpr int in = D, out = D;
  template <Backend B> using bind = ClassPosLayer<B, N, D>;
};
template <int D>
struct ClassToken {
  static constexpr int in = D, out = D;
  template <Backend B> using bind = ClassTokenLayer<B, D>;
};

}  // namespace hatch
