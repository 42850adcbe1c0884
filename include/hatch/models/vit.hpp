#pragma once
// The Vision Transformer as a staged type: Vit<spec, Depths<d0, ..., dK-1>>. Stage 0 owns the
// patch and position embeddings and the class token; the last stage owns the final norm and
// the head; every stage maps tokens (B, N+1, D) to tokens of the same shape in between.
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "hatch/compose/stages.hpp"
#include "hatch/layers/block.hpp"
#include "hatch/layers/embed.hpp"
#include "hatch/layers/head.hpp"

namespace hatch {

struct VitSpec {
  int image = 28, channels = 1, patch = 7, dim = 64, heads = 4, mlp_ratio = 4, classes = 10;
  bool qkv_bias = true;
  constexpr int patches() const { return (image / patch) * (image / patch); }
  constexpr int tokens() const { return patches() + 1; }
};

template <int... D>
struct Depths {
  static constexpr int count = sizeof...(D);
  static constexpr int values[] = {D...};
  static constexpr int total = (0 + ... + D);
  static constexpr int offset(int stage) {
    int o = 0;
    for (int i = 0; i < stage; ++i) o += values[i];
    return o;
  }
};

template <VitSpec S, int Depth, int Offset>
using VitBlocks = Named<"blocks", Repeat<Depth, Block<S.dim, S.heads, S.mlp_ratio, S.qkv_bias>, Offset>>;
template <VitSpec S>
using VitEmbed = Sequential<Named<"patch_embed", PatchEmbed<S.channels, S.image, S.patch, S.dim>>,
                            ClassPos<S.patches(), S.dim>>;

// One stage of a ViT: [embeddings] blocks[Offset, Offset + Depth) [norm + head].
template <VitSpec S, int Depth, int Offset, bool First, bool Last>
struct VitStageImpl {
  using type = std::conditional_t<
      First,
      std::conditional_t<Last, Sequential<VitEmbed<S>, VitBlocks<S, Depth, Offset>, ClassHead<S.dim, S.classes>>,
                         Sequential<VitEmbed<S>, VitBlocks<S, Depth, Offset>>>,
      std::conditional_t<Last, Sequential<VitBlocks<S, Depth, Offset>, ClassHead<S.dim, S.classes>>,
                         Sequential<VitBlocks<S, Depth, Offset>>>>;
};
template <VitSpec S, int Depth, int Offset, bool First, bool Last>
using VitStage = typename VitStageImpl<S, Depth, Offset, First, Last>::type;

template <VitSpec S, class D, class Idx = std::make_index_sequence<D::count>>
struct VitImpl;
template <VitSpec S, class D, std::size_t... I>
struct VitImpl<S, D, std::index_sequence<I...>> {
  using type = Stages<VitStage<S, D::values[I], D::offset(int(I)), I == 0, I + 1 == D::count>...>;
};

// Depths<1, ..., 1> with K entries.
template <std::size_t K, class Idx = std::make_index_sequence<K>>
struct OneBlockPerStage;
template <std::size_t K, std::size_t... I>
struct OneBlockPerStage<K, std::index_sequence<I...>> {
  using type = Depths<(void(I), 1)...>;
};

template <VitSpec S, class D>
struct Vit : VitImpl<S, D>::type {
  static_assert(S.image % S.patch == 0, "hatch::Vit: image size must be a multiple of the patch size");
  static_assert(S.dim % S.heads == 0, "hatch::Vit: dim must be divisible by heads");
  static constexpr VitSpec spec = S;
  using depths = D;
  // Deep Incubation's meta model (MetaOf<Vit>): the same patch, width and heads, one block per
  // stage, as a Vit so that its parameter names are timm's.
  using meta_model = Vit<S, typename OneBlockPerStage<std::size_t(D::count)>::type>;
};

// A bound model: Model<Vit<...>, Cpu>.
template <class Spec, Backend B>
using Model = typename Spec::template bind<B>;

// Sets drop-path rates linspace(0, max_rate, number of DropPath layers) in forward order, as
// timm does per block (two DropPath layers per block share the block's rate).
template <class M>
void set_drop_path(M& model, double max_rate) {
  int n = 0;
  model.for_each_layer([&](auto& l) {
    if constexpr (requires { l.set_rate(0.0); }) ++n;
  });
  const int blocks = n / 2;
  int k = 0;
  model.for_each_layer([&](auto& l) {
    if constexpr (requires { l.set_rate(0.0); }) {
      const int block = k++ / 2;
      l.set_rate(blocks > 1 ? max_rate * block / (blocks - 1) : 0.0);
    }
  });
}

namespace presets {
inline constexpr VitSpec micro{.image = 28, .channels = 1, .patch = 7, .dim = 32, .heads = 2, .mlp_ratio = 4, .classes = 10};
inline constexpr VitSpec tiny{.image = 28, .channels = 1, .patch = 7, .dim = 64, .heads = 4, .mlp_ratio = 4, .classes = 10};
inline constexpr VitSpec small{.image = 28, .channels = 1, .patch = 7, .dim = 128, .heads = 4, .mlp_ratio = 4, .classes = 10};
inline constexpr VitSpec base{.image = 28, .channels = 1, .patch = 4, .dim = 192, .heads = 6, .mlp_ratio = 4, .classes = 10};

using VitMicro = Vit<micro, Depths<1, 1, 1, 1>>;
using VitTiny = Vit<tiny, Depths<1, 1, 1, 1>>;
using VitSmall = Vit<small, Depths<2, 2, 2, 2>>;
using VitBase = Vit<base, Depths<3, 3, 3, 3>>;
// ViT-B/16 on ImageNet-sized input (224x224x3, 1000 classes): the GPU benchmark's model, not a
// Fashion-MNIST preset, so with_preset leaves it out (no example instantiates it).
inline constexpr VitSpec b16{.image = 224, .channels = 3, .patch = 16, .dim = 768, .heads = 12, .mlp_ratio = 4, .classes = 1000};
using VitB16 = Vit<b16, Depths<3, 3, 3, 3>>;
// The meta model of a preset: same patch, width and heads, one block per stage (hatch::MetaOf).
template <class V>
using MetaOf = hatch::MetaOf<V>;

inline constexpr const char* names = "vit-micro, vit-tiny, vit-small, vit-base";
}  // namespace presets

// Presets chosen by name at run time, instantiated at compile time: f receives
// std::type_identity<Vit...>{} for the named preset.
template <class F>
decltype(auto) with_preset(std::string_view name, F&& f) {
  if (name == "vit-micro") return f(std::type_identity<presets::VitMicro>{});
  if (name == "vit-tiny") return f(std::type_identity<presets::VitTiny>{});
  if (name == "vit-small") return f(std::type_identity<presets::VitSmall>{});
  if (name == "vit-base") return f(std::type_identity<presets::VitBase>{});
  throw Error("--preset: unknown preset '" + std::string(name) + "', expected one of " + presets::names);
}

}  // namespace hatch
