#pragma once
// The Vision Transformer as a staged type: Vit<spec, Depths<d0, ..., dK-1>>. Stage 0 owns the
// patch and position embeddings and the class token; the last stage owns the final norm and
// the head; every stage maps tokens (B, N+1, D) to tokens of the same shape in between.
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "hatch/compose/stages.hpp"
#include "hatch/layers/block.hpp"
#include "hatch/layers/drop_path_schedule.hpp"
#include "hatch/layers/embed.hpp"
#include "hatch/layers/head.hpp"
#include "hatch/layers/moe.hpp"

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

// Which block stands at each index of a ViT: DenseBlocks (the ViT's own), or MoeBlocks, which
// puts an expert layer in place of the MLP of every Every-th block (V-MoE: every second block,
// the odd ones; m2mKD's student: every block).
struct DenseBlocks {
  template <VitSpec S, int I>
  using at = Block<S.dim, S.heads, S.mlp_ratio, S.qkv_bias>;
};
template <int E, class Router, int Every = 2>
struct MoeBlocks {
  static_assert(Every >= 1, "hatch::MoeBlocks<E, Router, Every>: Every must be at least 1");
  template <VitSpec S, int I>
  using at = std::conditional_t<I % Every == Every - 1,
                                BlockWith<S.dim, S.heads, Moe<S.dim, E, Router, Mlp<S.dim, S.dim * S.mlp_ratio>>, S.qkv_bias>,
                                Block<S.dim, S.heads, S.mlp_ratio, S.qkv_bias>>;
};

// Blocks [Offset, Offset + Depth) of a ViT, named blocks.<index> as timm names them: one Repeat
// of the dense block, or (other block policies) one named block per index.
template <VitSpec S, int Offset, class Blocks, class Idx>
struct VitBlocksEach;
template <VitSpec S, int Offset, class Blocks, int... I>
struct VitBlocksEach<S, Offset, Blocks, std::integer_sequence<int, I...>> {
  using type = Sequential<Named<"blocks", Repeat<1, typename Blocks::template at<S, Offset + I>, Offset + I>>...>;
};
template <VitSpec S, int Depth, int Offset, class Blocks>
struct VitBlocksImpl {
  using type = typename VitBlocksEach<S, Offset, Blocks, std::make_integer_sequence<int, Depth>>::type;
};
template <VitSpec S, int Depth, int Offset>
struct VitBlocksImpl<S, Depth, Offset, DenseBlocks> {
  using type = Named<"blocks", Repeat<Depth, Block<S.dim, S.heads, S.mlp_ratio, S.qkv_bias>, Offset>>;
};
template <VitSpec S, int Depth, int Offset, class Blocks = DenseBlocks>
using VitBlocks = typename VitBlocksImpl<S, Depth, Offset, Blocks>::type;
template <VitSpec S>
using VitEmbed = Sequential<Named<"patch_embed", PatchEmbed<S.channels, S.image, S.patch, S.dim>>,
                            ClassPos<S.patches(), S.dim>>;

// One stage of a ViT: [embeddings] blocks[Offset, Offset + Depth) [norm + head].
template <VitSpec S, int Depth, int Offset, bool First, bool Last, class Blocks = DenseBlocks>
struct VitStageImpl {
  using Bl = VitBlocks<S, Depth, Offset, Blocks>;
  using type = std::conditional_t<
      First,
      std::conditional_t<Last, Sequential<VitEmbed<S>, Bl, ClassHead<S.dim, S.classes>>, Sequential<VitEmbed<S>, Bl>>,
      std::conditional_t<Last, Sequential<Bl, ClassHead<S.dim, S.classes>>, Sequential<Bl>>>;
};
template <VitSpec S, int Depth, int Offset, bool First, bool Last, class Blocks = DenseBlocks>
using VitStage = typename VitStageImpl<S, Depth, Offset, First, Last, Blocks>::type;

template <VitSpec S, class D, class Blocks, class Idx = std::make_index_sequence<D::count>>
struct VitImpl;
template <VitSpec S, class D, class Blocks, std::size_t... I>
struct VitImpl<S, D, Blocks, std::index_sequence<I...>> {
  using type = Stages<VitStage<S, D::values[I], D::offset(int(I)), I == 0, I + 1 == D::count, Blocks>...>;
};

// Depths<1, ..., 1> with K entries.
template <std::size_t K, class Idx = std::make_index_sequence<K>>
struct OneBlockPerStage;
template <std::size_t K, std::size_t... I>
struct OneBlockPerStage<K, std::index_sequence<I...>> {
  using type = Depths<(void(I), 1)...>;
};

template <VitSpec S, class D, class Blocks = DenseBlocks>
struct Vit : VitImpl<S, D, Blocks>::type {
  static_assert(S.image % S.patch == 0, "hatch::Vit: image size must be a multiple of the patch size");
  static_assert(S.dim % S.heads == 0, "hatch::Vit: dim must be divisible by heads");
  static constexpr VitSpec spec = S;
  using depths = D;
  using blocks = Blocks;
  // Deep Incubation's meta model (MetaOf<Vit>): the same patch, width and heads, one dense block
  // per stage, as a Vit so that its parameter names are timm's. An expert ViT shares its dense
  // twin's meta model (vmoe-small's is vit-small's).
  using meta_model = Vit<S, typename OneBlockPerStage<std::size_t(D::count)>::type>;
};

namespace presets {
inline constexpr VitSpec micro{.image = 28, .channels = 1, .patch = 7, .dim = 32, .heads = 2, .mlp_ratio = 4, .classes = 10};
inline constexpr VitSpec tiny{.image = 28, .channels = 1, .patch = 7, .dim = 64, .heads = 4, .mlp_ratio = 4, .classes = 10};
inline constexpr VitSpec small{.image = 28, .channels = 1, .patch = 7, .dim = 128, .heads = 4, .mlp_ratio = 4, .classes = 10};
inline constexpr VitSpec base{.image = 28, .channels = 1, .patch = 4, .dim = 192, .heads = 6, .mlp_ratio = 4, .classes = 10};

using VitMicro = Vit<micro, Depths<1, 1, 1, 1>>;
using VitTiny = Vit<tiny, Depths<1, 1, 1, 1>>;
using VitSmall = Vit<small, Depths<2, 2, 2, 2>>;
using VitBase = Vit<base, Depths<3, 3, 3, 3>>;
// Expert ViTs of vit-small's shape (DESIGN.md's presets): V-MoE (VmoeRouter, top-2 of 8 experts,
// in every second block) and m2mKD's student (TopKGate, top-2 of 8, in every block).
using VmoeSmall = Vit<small, Depths<2, 2, 2, 2>, MoeBlocks<8, VmoeRouter<2>, 2>>;
using MoeStudentSmall = Vit<small, Depths<2, 2, 2, 2>, MoeBlocks<8, TopKGate<2>, 1>>;
// Deep, narrow targets for Deep Incubation (issue 11): vit-tiny's width, patch and heads, 16
// and 32 blocks in four modules. Their meta model, MetaOf<...>, is exactly vit-tiny.
using VitDeep = Vit<tiny, Depths<4, 4, 4, 4>>;
using VitDeep32 = Vit<tiny, Depths<8, 8, 8, 8>>;
// ViT-B/16 on ImageNet-sized input (224x224x3, 1000 classes): the GPU benchmark's model, not a
// Fashion-MNIST preset, so with_preset leaves it out (no example instantiates it).
inline constexpr VitSpec b16{.image = 224, .channels = 3, .patch = 16, .dim = 768, .heads = 12, .mlp_ratio = 4, .classes = 1000};
using VitB16 = Vit<b16, Depths<3, 3, 3, 3>>;
// The meta model of a preset: same patch, width and heads, one block per stage (hatch::MetaOf).
template <class V>
using MetaOf = hatch::MetaOf<V>;

inline constexpr const char* names =
    "vit-micro, vit-tiny, vit-small, vit-base, vmoe-small, moe-student-small, vit-deep, vit-deep32";
// The same names, one by one (command-line checks take these).
inline const std::vector<std::string>& name_list() {
  static const std::vector<std::string> list{"vit-micro", "vit-tiny", "vit-small", "vit-base", "vmoe-small",
                                             "moe-student-small", "vit-deep", "vit-deep32"};
  return list;
}
}  // namespace presets

// Presets chosen by name at run time, instantiated at compile time: f receives
// std::type_identity<Vit...>{} for the named preset.
template <class F>
decltype(auto) with_preset(std::string_view name, F&& f) {
  if (name == "vit-micro") return f(std::type_identity<presets::VitMicro>{});
  if (name == "vit-tiny") return f(std::type_identity<presets::VitTiny>{});
  if (name == "vit-small") return f(std::type_identity<presets::VitSmall>{});
  if (name == "vit-base") return f(std::type_identity<presets::VitBase>{});
  if (name == "vmoe-small") return f(std::type_identity<presets::VmoeSmall>{});
  if (name == "moe-student-small") return f(std::type_identity<presets::MoeStudentSmall>{});
  if (name == "vit-deep") return f(std::type_identity<presets::VitDeep>{});
  if (name == "vit-deep32") return f(std::type_identity<presets::VitDeep32>{});
  throw Error("--preset: unknown preset '" + std::string(name) + "', expected one of " + presets::names);
}

}  // namespace hatch
