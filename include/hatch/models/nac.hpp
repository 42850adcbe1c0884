#pragma once
// Neural Attentive Circuits as a staged type: Nac<spec> (ALGORITHMS.md section 4, issue 10).
//
//   stage 0        image -> patch_embed (PatchEmbed) -> pos_embed (PositionGrid) -> read_in
//                  (seeder + dense read-in of the tokens): (B U, D) latent states
//   stages 1..R    propagators.<r>: one NacPropagator each (unshared weights; the mediators receive
//                  from the input and mediator latents), (B U, D) -> (B U, D)
//   stage R + 1    read_out (output latents from the mediators) -> repulsion (SignatureRepulsion,
//                  the table's one) -> pooling (OutputPooling): (B, classes)
//
// The latents are one table of U = inputs + mediators + outputs rows, in that order. The model
// owns the codes and the signatures (latents.codes, latents.signatures, visited first, so these
// are the names under which a checkpoint stores them once), hands them to every layer that
// takes them, and at reset draws the codes (truncated normal) and places the signatures on a
// Barabasi-Albert graph prior (m = spec.graph_m; init_signatures_from_graph) whose hubs are the
// mediators (prior_graph).
#include <random>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "hatch/compose/stages.hpp"
#include "hatch/layers/embed.hpp"
#include "hatch/layers/nac_blocks.hpp"
#include "hatch/layers/nac_graph.hpp"
#include "hatch/models/vit.hpp"

namespace hatch {

struct NacSpec {
  int image = 28, channels = 1, patch = 7, dim = 64, heads = 4, ffn_hidden = 128, code_dim = 32, sig_dim = 32;
  int inputs = 8, mediators = 16, outputs = 8, classes = 10;
  int rounds = 2;   // propagator rounds, one stage each
  int graph_m = 2;  // the Barabasi-Albert prior's links per new latent
  constexpr int patches() const { return (image / patch) * (image / patch); }
  constexpr int latents() const { return inputs + mediators + outputs; }
};

template <NacSpec S, class Idx>
struct NacStagesImpl;
template <NacSpec S, int... R>
struct NacStagesImpl<S, std::integer_sequence<int, R...>> {
  using type = Stages<
      Sequential<Named<"patch_embed", PatchEmbed<S.channels, S.image, S.patch, S.dim>>, PositionGrid<S.patches(), S.dim>,
                 Named<"read_in", NacReadIn<S.patches(), S.dim, S.inputs, S.code_dim>>>,
      Sequential<Named<"propagators",
                       Repeat<1, NacPropagator<S.dim, S.heads, S.ffn_hidden, S.code_dim, S.sig_dim, S.inputs, S.inputs + S.mediators>, R>>>...,
      Sequential<Named<"read_out", NacReadOut<S.dim, S.heads, S.inputs, S.outputs, S.code_dim, S.sig_dim>>,
                 Named<"repulsion", SignatureRepulsion<S.sig_dim>>,
                 Named<"pooling", OutputPooling<S.outputs, S.dim, S.classes>>>>;
};

// The signature graph prior a model draws at reset (nac_graph.hpp): scale-free (Barabasi-Albert,
// m = spec.graph_m, the default), Erdos-Renyi (p = 0.1), planted partition (blocks of 8 latents,
// p_in 0.9, p_out 0.05) or a ring of cliques of 8. Names as the programs' --nac-prior takes them.
enum class NacPrior { scale_free, erdos_renyi, planted_partition, ring_of_cliques };
inline constexpr const char* kNacPriorNames = "scale-free, erdos-renyi, planted-partition, ring-of-cliques";
inline NacPrior nac_prior_from(std::string_view name) {
  if (name == "scale-free") return NacPrior::scale_free;
  if (name == "erdos-renyi") return NacPrior::erdos_renyi;
  if (name == "planted-partition") return NacPrior::planted_partition;
  if (name == "ring-of-cliques") return NacPrior::ring_of_cliques;
  throw Error("NAC graph prior '" + std::string(name) + "': expected one of " + kNacPriorNames);
}

// The model: the stages, plus the tables they share.
template <Backend B, NacSpec S, class StagesSpec>
class NacModelLayer : public StagesLayerOf<B, typename StagesSpec::stage_list>::type {
  using Base = typename StagesLayerOf<B, typename StagesSpec::stage_list>::type;

 public:
  NacModelLayer() : codes(S.latents()), signatures(S.latents()) {
    this->for_each_layer([&](auto& l) {
      if constexpr (requires { l.use_codes(codes); }) l.use_codes(codes);
      if constexpr (requires { l.use_signatures(signatures); }) l.use_signatures(signatures);
    });
  }
  NacModelLayer(const NacModelLayer&) = delete;  // the layers point at this object's tables
  NacModelLayer& operator=(const NacModelLayer&) = delete;

  void reset_parameters(Initializer& init) {
    Base::reset_parameters(init);
    codes.reset_parameters(init);
    const std::uint64_t seed = init.rng();
    nac::init_signatures_from_graph(signatures, prior_graph(seed, prior_), seed);
  }
  // The graph prior of the next reset (default scale-free).
  void use_prior(NacPrior p) { prior_ = p; }
  NacPrior prior() const { return prior_; }
  // Dense attention everywhere (Kmdpa::use_kernel(false)): the baseline without the kernel's
  // sparsity; the signatures then get no gradient (the repulsion still pushes them apart).
  void use_dense_attention(bool dense) {
    this->for_each_layer([&](auto& l) {
      if constexpr (requires { l.attn.use_kernel(false); }) l.attn.use_kernel(!dense);
    });
  }
  // The signature prior's graph, whose first nodes are the mediators, then the input and the
  // output latents (graph node i is latent order[i]): in a scale-free graph the first nodes are
  // the hubs, so input and output latents attach to mediators (over the table's own order the
  // input latents would be the hubs, and output latents, which read only from mediators, would
  // mostly be left with their own pair); in a planted partition the first blocks are mediators.
  static nac::Graph prior_graph(std::uint64_t seed, NacPrior prior = NacPrior::scale_free) {
    constexpr int block = 8;
    const nac::Graph g =
        prior == NacPrior::erdos_renyi ? nac::erdos_renyi_graph(S.latents(), 0.1, seed)
        : prior == NacPrior::planted_partition
            ? nac::planted_partition_graph((S.latents() + block - 1) / block, block, 0.9, 0.05, seed)
        : prior == NacPrior::ring_of_cliques ? nac::ring_of_cliques_graph((S.latents() + block - 1) / block, block)
                                             : nac::barabasi_albert_graph(S.latents(), S.graph_m, seed);
    std::vector<int> order;
    for (int u = S.inputs; u < S.inputs + S.mediators; ++u) order.push_back(u);
    for (int u = 0; u < S.inputs; ++u) order.push_back(u);
    for (int u = S.inputs + S.mediators; u < S.latents(); ++u) order.push_back(u);
    nac::Graph out(S.latents());
    for (int i = 0; i < S.latents(); ++i)  // a planted partition or ring may have a few more nodes
      for (int j = i + 1; j < S.latents(); ++j)
        if (g.has_edge(i, j)) out.add_edge(order[i], order[j]);
    return out;
  }
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    codes.visit(f, prefix + "latents.codes");
    signatures.visit(f, prefix + "latents.signatures");
    Base::visit(f, prefix);
  }

  LatentCodes<B, S.code_dim> codes;
  LatentSignatures<B, S.sig_dim> signatures;

 private:
  NacPrior prior_ = NacPrior::scale_free;
};

// ---- m2mKD's distillation students (ALGORITHMS.md §2, issue 10 §3) ------------------------------
// In m2mKD a NAC module is distilled from a ViT teacher module inside the ViT meta model, so it
// must read and write the meta model's tokens, (B, T, D). Its distillation form is the NAC
// stage itself (the same layers under the same names, so its file loads into the NAC) run
// without the model's tables: every latent gets one fixed random code (and one signature), the
// attention is dense with no kernel (Kmdpa::use_kernel(false)), and the latents are the tokens:
//   read-in     image -> the stage -> (B, inputs, D): the input latents, seeded from the fixed
//               code, read the image; they are the tokens the meta stages after it see
//   propagator  (B, T, D) -> (B, T, D): every token receives from every token (receive(0, -1))
//   read-out    (B, T, D) -> (B, classes): `outputs` output latents with one fixed random state
//               read every token (read_from(0)), then the stage's pooling
// The fixed code, signature and state are drawn at reset and never trained or saved (visit
// leaves the tables out; they are Parameter::shared); at assembly the NAC's own tables start
// fresh (LoadOptions::keep_missing_shared) and the kernel bandwidth, which gets no gradient
// here, is still at its initial value. Stitches to the meta width are the distiller's
// (StitchTo), as for any student.
enum class NacModuleRole { read_in, propagator, read_out };

template <Backend B, NacSpec S, NacModuleRole Role, class StageSpec>
class NacStudentModuleLayer {
 public:
  using backend = B;
  using T = typename B::Scalar;
  using Inner = typename StageSpec::template bind<B>;
  static constexpr int in = StageSpec::in, out = StageSpec::out;

  NacStudentModuleLayer() : codes_(S.inputs), signatures_(S.inputs) {
    codes_.param.trainable = false;
    signatures_.param.trainable = false;
    inner.for_each_layer([&](auto& l) {
      if constexpr (requires { l.attn.use_kernel(false); }) l.attn.use_kernel(false);
      if constexpr (requires { l.receive(0, -1); }) l.receive(0, -1);
      if constexpr (requires { l.read_from(0); }) l.read_from(0);
    });
    code_.assign(std::size_t(S.code_dim), T(1));
    sig_.assign(std::size_t(S.sig_dim), T(1));
    state_.assign(std::size_t(S.dim), T(0));
    upload_states();
    set_rows(Role == NacModuleRole::read_in      ? S.inputs
             : Role == NacModuleRole::propagator ? 1
                                                 : 1 + S.outputs);  // until the first forward says
  }
  NacStudentModuleLayer(const NacStudentModuleLayer&) = delete;  // the layers point at its tables
  NacStudentModuleLayer& operator=(const NacStudentModuleLayer&) = delete;

  // The stage's parameters, then one fixed code, signature and (read-out) output-latent state,
  // standard normal.
  void reset_parameters(Initializer& init) {
    inner.reset_parameters(init);
    std::normal_distribution<double> n(0.0, 1.0);
    for (auto& v : code_) v = T(n(init.rng));
    for (auto& v : sig_) v = T(n(init.rng));
    for (auto& v : state_) v = T(n(init.rng));
    const int r = rows_;
    rows_ = 0;
    set_rows(r);  // the tables again, from the new vectors
    upload_states();
  }

  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    if constexpr (Role == NacModuleRole::read_in) {
      const Tensor<B>& z = inner.forward(x, ctx);  // (B inputs, D)
      y_.view_of(z, Shape{z.rows() / S.inputs, S.inputs, S.dim});
      return y_;
    } else {
      HATCH_CHECK(x.shape().rank == 3 && x.cols() == S.dim, "NacStudentModule",
                  "expected the meta model's tokens (batch, tokens, " + std::to_string(S.dim) + "), got " +
                      x.shape().str());
      nb_ = int(x.shape().dims[0]);
      t_ = int(x.shape().dims[1]);
      if constexpr (Role == NacModuleRole::propagator) {
        set_rows(t_);
        return inner.forward(x, ctx);
      } else {
        set_rows(t_ + S.outputs);  // per example: the T tokens, then the output latents
        const std::size_t td = std::size_t(t_) * S.dim, od = std::size_t(S.outputs) * S.dim;
        xin_.resize({nb_, t_ + S.outputs, S.dim});
        B::copy_2d(xin_.data(), int(td + od), x.data(), int(td), nb_, int(td));
        B::copy_2d(xin_.data() + td, int(td + od), states_.data(), 0, nb_, int(od));
        return inner.forward(xin_, ctx);
      }
    }
  }

  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    if constexpr (Role == NacModuleRole::read_in) {
      dy_.view_of(dy, Shape{dy.numel() / S.dim, S.dim});
      return inner.backward(dy_, ctx);
    } else if constexpr (Role == NacModuleRole::propagator) {
      return inner.backward(dy, ctx);
    } else {
      const Tensor<B>& d = inner.backward(dy, ctx);
      if (!ctx.input_grad) return d;
      const std::size_t td = std::size_t(t_) * S.dim, od = std::size_t(S.outputs) * S.dim;
      dx_.resize({nb_, t_, S.dim});
      B::copy_2d(dx_.data(), int(td), d.data(), int(td + od), nb_, int(td));
      return dx_;
    }
  }

  // The stage's parameters under the stage's names; the fixed tables are left out.
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    inner.visit([&](const std::string& name, Parameter<B>& p) { if (!p.shared) f(name, p); }, prefix);
  }
  template <class F>
  void for_each_layer(F&& f) { inner.for_each_layer(f); }

  Inner inner;

 private:
  // Tables of `rows` latents, every row the fixed code (signature), handed to the stage's layers.
  void set_rows(int rows) {
    if (rows == rows_) return;
    rows_ = rows;
    fill(codes_.param, code_, rows);
    fill(signatures_.param, sig_, rows);
    inner.for_each_layer([&](auto& l) {
      if constexpr (requires { l.use_codes(codes_); }) l.use_codes(codes_);
      if constexpr (requires { l.use_signatures(signatures_); }) l.use_signatures(signatures_);
    });
  }
  void upload_states() {  // the output latents' state, `outputs` rows of the fixed vector
    states_.resize({S.outputs, S.dim});
    for (int u = 0; u < S.outputs; ++u) B::upload(states_.data() + std::size_t(u) * S.dim, state_.data(), state_.size());
  }
  static void fill(Parameter<B>& p, const std::vector<T>& row, int rows) {
    const int cols = int(row.size());
    p.value.resize({rows, cols});
    p.grad.resize({rows, cols});
    p.grad.zero();
    std::vector<T> host(std::size_t(rows) * cols);
    for (int r = 0; r < rows; ++r) std::copy(row.begin(), row.end(), host.begin() + std::size_t(r) * cols);
    B::upload(p.value.data(), host.data(), host.size());
  }

  LatentCodes<B, S.code_dim> codes_;
  LatentSignatures<B, S.sig_dim> signatures_;
  std::vector<T> code_, sig_, state_;
  int rows_ = 0, nb_ = 0, t_ = 0;
  Tensor<B> states_, xin_, y_, dy_, dx_;
};

template <NacSpec S, NacModuleRole Role, class StageSpec>
struct NacStudentModule {
  static constexpr int in = StageSpec::in, out = StageSpec::out;
  template <Backend B> using bind = NacStudentModuleLayer<B, S, Role, StageSpec>;
};

template <NacSpec S>
struct Nac : NacStagesImpl<S, std::make_integer_sequence<int, S.rounds>>::type {
  static_assert(S.image % S.patch == 0, "hatch::Nac: image size must be a multiple of the patch size");
  static_assert(S.dim % S.heads == 0, "hatch::Nac: dim must be divisible by heads");
  static_assert(S.inputs > 0 && S.mediators > 0 && S.outputs > 0, "hatch::Nac: every latent group needs a latent");
  using stages_base = typename NacStagesImpl<S, std::make_integer_sequence<int, S.rounds>>::type;
  static constexpr NacSpec spec = S;
  template <Backend B> using bind = NacModelLayer<B, S, stages_base>;
  // Module I as m2mKD distils it (NacStudentModule above); ModuleDistiller uses it in place of
  // stage<I> in the student's hybrid, and assembles the modules into this model.
  template <std::size_t I>
  using distill_stage = NacStudentModule<S,
                                         I == 0                 ? NacModuleRole::read_in
                                         : I == std::size_t(S.rounds) + 1 ? NacModuleRole::read_out
                                                                : NacModuleRole::propagator,
                                         typename stages_base::template stage<I>>;
};

namespace presets {
// nac-small: 4 modules (read-in, two propagator rounds, read-out), 64 latents of vit-small's width
// (128); a training step costs about what vit-small's does (measured on 2 cores: docs/design.md).
inline constexpr NacSpec nac_small{.image = 28, .channels = 1, .patch = 7, .dim = 128, .heads = 4, .ffn_hidden = 256,
                                   .code_dim = 64, .sig_dim = 64, .inputs = 16, .mediators = 32, .outputs = 16,
                                   .classes = 10, .rounds = 2, .graph_m = 2};
using NacSmall = Nac<nac_small>;
inline constexpr const char* nac_names = "nac-small";
inline const std::vector<std::string>& e2e_name_list() {
  static const std::vector<std::string> list = [] {
    std::vector<std::string> l = name_list();
    l.push_back("nac-small");
    return l;
  }();
  return list;
}
}  // namespace presets

// train_e2e's presets: with_preset's ViTs and the NAC presets (which the incubation and
// distillation programs do not instantiate).
template <class F>
decltype(auto) with_e2e_preset(std::string_view name, F&& f) {
  if (name == "nac-small") return f(std::type_identity<presets::NacSmall>{});
  return with_preset(name, std::forward<F>(f));
}

}  // namespace hatch
