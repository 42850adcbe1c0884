// FrozenExcept, the view Deep Incubation trains module i through (modular/incubator.hpp,
// /work/shared/ALGORITHMS.md §1), in double precision: module i's gradients through the frozen
// suffix match central differences and a plain backward of the whole hybrid; the frozen stages
// get no parameter gradient; the suffix does no weight-gradient GEMM and the prefix no backward
// work at all (GEMMs counted by a Cpu64 that counts them).
//
// The hybrids are those of a vit-micro-width target deeper than its meta model (Depths<2,1,1,2>
// over Depths<1,1,1,1>), so module i is not the meta layer's architecture.
#include <hatch/modular/incubator.hpp>

#include <array>
#include <atomic>
#include <map>

#include <omp.h>

#include "support.hpp"

using namespace hatch;
using test::for_each_index;
using test::max_abs_grad;
using test::OneThread;

namespace {



// Cpu64 with a count of the layers' GEMM calls: beta != 0 is a weight-gradient GEMM (Linear and
// PatchEmbed accumulate into .grad; every other GEMM overwrites its output). A Linear's weight
// gradient goes through fused::linear_backward_params, which Cpu runs as one GEMM region of its
// own (not through gemm): counted here as the one weight-gradient GEMM it is.
struct CountingCpu64 : CpuBackend<double> {
  static inline std::atomic<std::int64_t> gemms{0}, weight_gemms{0}, batched{0};
  static void reset() { gemms = weight_gemms = batched = 0; }
  static void gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                   int ldb, double beta, double* c, int ldc) {
    ++gemms;
    if (beta != 0) ++weight_gemms;
    CpuBackend<double>::gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  static void linear_backward_params(double* dw, double* dbias, const double* dy, const double* x, int rows, int in,
                                     int out) {
    if (dw) {
      ++gemms;
      ++weight_gemms;
    }
    CpuBackend<double>::linear_backward_params(dw, dbias, dy, x, rows, in, out);
  }
  static void gemm_batched(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda,
                           std::size_t sa_o, std::size_t sa_i, const double* b, int ldb, std::size_t sb_o,
                           std::size_t sb_i, double beta, double* c, int ldc, std::size_t sc_o, std::size_t sc_i,
                           int outer, int inner) {
    ++batched;
    CpuBackend<double>::gemm_batched(ta, tb, m, n, k, alpha, a, lda, sa_o, sa_i, b, ldb, sb_o, sb_i, beta, c, ldc,
                                     sc_o, sc_i, outer, inner);
  }
};
static_assert(Backend<CountingCpu64>);

using DeepMicro = Vit<presets::micro, Depths<2, 1, 1, 2>>;
using DeepInc = Incubator<presets::MetaOf<DeepMicro>, DeepMicro, Cpu>;
constexpr std::size_t kStages = DeepInc::K;
template <std::size_t I>
using DeepHybrid = Model<typename DeepInc::template HybridArch<I>, CountingCpu64>;

}  // namespace

// ---- exact gradients of module i through the frozen suffix --------------------------------------
TEST_CASE("incubator: module i's gradients through the frozen suffix match finite differences") {
  OneThread one_thread;
  for_each_index<kStages>([&](auto ic) {
    constexpr std::size_t I = decltype(ic)::value;
    using B = CountingCpu64;
    CAPTURE(I);
    DeepHybrid<I> m;
    test::randomize_parameters(m, 21 + I);
    set_drop_path(m, 0.3);  // drop-path stays active in the frozen meta blocks
    FrozenExcept<DeepHybrid<I>, I> view(m);

    std::mt19937_64 rng(100 + I);
    const Tensor<B> x = test::random_tensor<B>({2, 1, 28, 28}, rng);
    auto make_ctx = [] {
      Context c;
      c.training = true;
      c.input_grad = false;  // as fit() calls it
      c.seed = 77;           // the same drop-path masks in every pass
      return c;
    };
    Context ctx = make_ctx();
    const Tensor<B> r = test::random_tensor<B>(view.forward(x, ctx).shape(), rng);
    const auto rh = r.to_host();
    auto loss = [&] {
      Context c = make_ctx();
      const auto y = m.forward(x, c).to_host();
      double s = 0;
      for (std::size_t k = 0; k < y.size(); ++k) s += y[k] * rh[k];
      return s;
    };

    test::zero_grads(m);
    ctx = make_ctx();
    view.forward(x, ctx);
    view.backward(r, ctx);

    // The frozen stages (prefix and suffix) get no parameter gradient at all; module I does.
    m.for_each_stage([&](auto& stage, std::size_t j) {
      CAPTURE(j);
      if (j == I) CHECK(max_abs_grad(stage) > 0);
      else CHECK(max_abs_grad(stage) == 0);
    });

    // Central differences of sum(logits * r) for what the view shows: module I's parameters.
    const auto rep = test::check_parameter_grads(view, loss, rng, 6);
    INFO("worst: " << rep.worst);
    CHECK(rep.max_rel <= 1e-6);

    // The same gradients as a plain backward of the whole hybrid (which also fills the others).
    std::map<std::string, std::vector<double>> frozen_view;
    view.visit([&](const std::string& n, Parameter<B>& p) { frozen_view[n] = p.grad.to_host(); }, "");
    test::zero_grads(m);
    ctx = make_ctx();
    m.forward(x, ctx);
    m.backward(r, ctx);
    double diff = 0;
    m.template stage<I>().visit(
        [&](const std::string& n, Parameter<B>& p) {
          const auto g = p.grad.to_host();
          const auto& f = frozen_view.at(n);
          for (std::size_t k = 0; k < g.size(); ++k) diff = std::max(diff, std::abs(g[k] - f[k]));
        },
        "");
    CHECK(diff <= 1e-12);
  });
}

// ---- the frozen stages cost no weight-gradient work, the prefix no backward work ----------------
TEST_CASE("incubator: FrozenExcept skips the prefix and the suffix's weight gradients") {
  OneThread one_thread;
  using B = CountingCpu64;
  std::mt19937_64 rng(7);
  const Tensor<B> x = test::random_tensor<B>({2, 1, 28, 28}, rng);
  for_each_index<kStages>([&](auto ic) {
    constexpr std::size_t I = decltype(ic)::value;
    CAPTURE(I);
    DeepHybrid<I> m;
    test::randomize_parameters(m, 3);
    FrozenExcept<DeepHybrid<I>, I> view(m);
    // Weight matrices (one weight-gradient GEMM each) and attention layers per stage.
    std::array<std::int64_t, kStages> matrices{}, attentions{};
    m.for_each_stage([&](auto& stage, std::size_t j) {
      stage.visit(
          [&](const std::string& n, Parameter<B>& p) {
            if (n.ends_with("weight") && p.value.shape().rank >= 2) ++matrices[j];
            if (n.ends_with("attn.qkv.weight")) ++attentions[j];
          },
          "");
    });
    auto run = [&](auto& model) {
      Context ctx;
      ctx.training = true;
      ctx.input_grad = false;
      const auto& y = model.forward(x, ctx);
      const Tensor<B> r = test::random_tensor<B>(y.shape(), rng);
      test::zero_grads(m);
      B::reset();
      model.backward(r, ctx);
    };

    run(view);
    std::int64_t suffix_matrices = 0, suffix_attn = 0;
    for (std::size_t j = I + 1; j < kStages; ++j) suffix_matrices += matrices[j], suffix_attn += attentions[j];
    // Weight gradients for module I's matrices only.
    CHECK(B::weight_gemms == matrices[I]);
    // Input gradients through the suffix and module I; nothing at all for the prefix (module 0
    // has no input gradient to compute for its patch embedding; in later modules the first
    // qkv input gradient is still needed, for norm1's parameter gradients).
    CHECK(B::gemms == suffix_matrices + 2 * matrices[I] - (I == 0 ? 1 : 0));
    CHECK(B::batched == 4 * (suffix_attn + attentions[I]));
    m.for_each_stage([&](auto& stage, std::size_t j) {
      CAPTURE(j);
      if (j == I) CHECK(max_abs_grad(stage) > 0);
      else CHECK(max_abs_grad(stage) == 0);
    });

    // For reference: everything trainable.
    run(m);
    std::int64_t all_matrices = 0;
    for (auto c : matrices) all_matrices += c;
    CHECK(B::weight_gemms == all_matrices);
    CHECK(B::gemms == 2 * all_matrices - 1);
  });
}
