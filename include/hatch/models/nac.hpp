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
    nac::init_signatures_from_graph(signatures, prior_graph(seed), seed);
  }
  // The signature prior: a Barabasi-Albert graph whose first nodes, its hubs, are the mediators,
  // then the input and the output latents (graph node i is latent order[i]), so that input and
  // output latents attach to mediators: a BA graph over the table's own order would make the
  // input latents the hubs, and output latents, which read only from mediators, would mostly be
  // left with their own pair.
  static nac::Graph prior_graph(std::uint64_t seed) {
    const nac::Graph g = nac::barabasi_albert_graph(S.latents(), S.graph_m, seed);
    std::vector<int> order;
    for (int u = S.inputs; u < S.inputs + S.mediators; ++u) order.push_back(u);
    for (int u = 0; u < S.inputs; ++u) order.push_back(u);
    for (int u = S.inputs + S.mediators; u < S.latents(); ++u) order.push_back(u);
    nac::Graph out(S.latents());
    for (int i = 0; i < g.n; ++i)
      for (int j = i + 1; j < g.n; ++j)
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
};

template <NacSpec S>
struct Nac : NacStagesImpl<S, std::make_integer_sequence<int, S.rounds>>::type {
  static_assert(S.image % S.patch == 0, "hatch::Nac: image size must be a multiple of the patch size");
  static_assert(S.dim % S.heads == 0, "hatch::Nac: dim must be divisible by heads");
  static_assert(S.inputs > 0 && S.mediators > 0 && S.outputs > 0, "hatch::Nac: every latent group needs a latent");
  using stages_base = typename NacStagesImpl<S, std::make_integer_sequence<int, S.rounds>>::type;
  static constexpr NacSpec spec = S;
  template <Backend B> using bind = NacModelLayer<B, S, stages_base>;
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
