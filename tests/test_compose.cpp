// Composition for a user's own staged model: Repeat copies numbered automatically across a
// Sequential and across Stages (the numbers become part of the stage types, so a stage keeps its
// names in a hybrid and in its file), the generic MetaOf, duplicate parameter names refused
// before training, and Deep Incubation of a non-ViT staged model end to end.
#include <hatch/modular/incubator.hpp>

#include <algorithm>
#include <set>

#include "modular_support.hpp"

using namespace hatch;
using namespace hatch::test;

namespace {

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}
bool unique(std::vector<std::string> v) {
  std::sort(v.begin(), v.end());
  return std::adjacent_find(v.begin(), v.end()) == v.end();
}

// A residual MLP block of width D, and a staged model of such blocks without any offsets.
template <int D>
using ResMlp = Residual<Sequential<Named<"norm", LayerNorm<D>>, Named<"fc1", Linear<D, 2 * D>>, Gelu,
                                   Named<"fc2", Linear<2 * D, D>>>>;
constexpr int kDim = 16;
using Blocks1 = Named<"blocks", Repeat<1, ResMlp<kDim>>>;
using Blocks2 = Named<"blocks", Repeat<2, ResMlp<kDim>>>;
// Tokens from 7x7 patches, four stages of residual MLP blocks (depths 1, 2, 2, 1), a head on the
// first token.
using Staged = Stages<Sequential<Named<"patch_embed", PatchEmbed<1, 28, 7, kDim>>, Blocks1>, Sequential<Blocks2>,
                      Sequential<Blocks2>, Sequential<Blocks1, ClassHead<kDim, 10>>>;

}  // namespace

TEST_CASE("numbering: Repeat copies are numbered across the stages of a model without offsets") {
  // The numbers are part of the stage types: stage 1 is blocks 1-2 wherever it goes.
  static_assert(std::is_same_v<Staged::stage<1>, Sequential<Named<"blocks", Repeat<2, ResMlp<kDim>, 1>>>>);
  static_assert(std::is_same_v<Staged::stage<2>, Sequential<Named<"blocks", Repeat<2, ResMlp<kDim>, 3>>>>);
  Model<Staged, Cpu> model;
  const auto names = names_of(model);
  CHECK(unique(names));
  for (int i = 0; i < 6; ++i) CHECK(contains(names, "blocks." + std::to_string(i) + ".fc1.weight"));
  CHECK_FALSE(contains(names, "blocks.6.fc1.weight"));
  CHECK(contains(names, "head.weight"));
  const auto stage2 = names_of(model.stage<2>());
  CHECK(stage2.front() == "blocks.3.norm.weight");
  CHECK(stage2.back() == "blocks.4.fc2.bias");
  // Saving the whole model works (it failed with "added twice" when every stage began at 0).
  TempRunDir dir;
  CHECK_NOTHROW(save_parameters(model, dir.path / "staged.safetensors"));
}

TEST_CASE("numbering: two Repeats under one name in a Sequential, and Repeats inside repeated layers") {
  using Twice = Sequential<Named<"blocks", Repeat<2, Linear<4, 4>>>, Gelu, Named<"blocks", Repeat<3, Linear<4, 4>>>>;
  Model<Twice, Cpu> twice;
  const auto names = names_of(twice);
  CHECK(unique(names));
  CHECK(contains(names, "blocks.4.weight"));
  // Each copy of an outer Repeat numbers its inner Repeat from 0.
  using Inner = Sequential<Named<"sub", Repeat<2, Linear<4, 4>>>>;
  using Nested = Sequential<Named<"layers", Repeat<2, Inner>>>;
  Model<Nested, Cpu> nested;
  const auto nested_names = names_of(nested);
  CHECK(unique(nested_names));
  CHECK(contains(nested_names, "layers.1.sub.1.weight"));
  CHECK_FALSE(contains(nested_names, "layers.1.sub.2.weight"));
}

TEST_CASE("numbering: explicit offsets and ViT names are as before") {
  // Vit's stages carry explicit offsets: blocks.4 and blocks.5 are stage 2 of vit-small.
  Model<presets::VitSmall::stage<2>, Cpu> stage2;
  const auto names = names_of(stage2);
  CHECK(names.front() == "blocks.4.norm1.weight");
  CHECK(contains(names, "blocks.5.mlp.fc2.bias"));
  using Explicit = Sequential<Named<"blocks", Repeat<2, Linear<4, 4>, 7>>>;
  Model<Explicit, Cpu> e;
  CHECK(names_of(e).front() == "blocks.7.weight");
}

TEST_CASE("MetaOf: one copy of every Repeat for any staged model; the ViT's meta model as before") {
  static_assert(std::is_same_v<MetaOf<presets::VitSmall>, Vit<presets::small, Depths<1, 1, 1, 1>>>);
  static_assert(std::is_same_v<presets::MetaOf<presets::VitTiny>, Vit<presets::tiny, Depths<1, 1, 1, 1>>>);
  // vit-deep and vit-deep32 (16 and 32 blocks) are incubated in exactly vit-tiny.
  static_assert(std::is_same_v<MetaOf<presets::VitDeep>, presets::VitTiny>);
  static_assert(std::is_same_v<MetaOf<presets::VitDeep32>, presets::VitTiny>);
  static_assert(std::is_same_v<MetaOf<Vit<presets::micro, Depths<2, 3>>>, Vit<presets::micro, Depths<1, 1>>>);
  using Meta = MetaOf<Staged>;
  static_assert(Meta::num_stages == 4);
  static_assert(std::is_same_v<Meta::stage<2>, Sequential<Named<"blocks", Repeat<1, ResMlp<kDim>, 2>>>>);
  Model<Meta, Cpu> meta;
  const auto names = names_of(meta);
  CHECK(unique(names));
  CHECK(contains(names, "blocks.3.fc2.bias"));
  CHECK_FALSE(contains(names, "blocks.4.fc2.bias"));
  // The hybrid keeps the target module's names (blocks 3-4 for module 2).
  using Hybrid = ReplaceStage<Meta, 2, Staged::stage<2>>;
  Model<Hybrid, Cpu> hybrid;
  CHECK(names_of(hybrid.stage<2>()).front() == "blocks.3.norm.weight");
  CHECK(names_of(hybrid.stage<3>()).front() == "blocks.3.norm.weight");  // the meta stage's own
}

TEST_CASE("parameter names: two parameters with one name are refused before training, with advice") {
  using Clash = Sequential<Linear<4, 4>, Gelu, Linear<4, 4>>;  // both are "weight" and "bias"
  Model<Clash, Cpu> model;
  const auto msg = error_message([&] { trainable_parameters(model); });
  CHECK(has(msg, "two parameters are named 'weight'"));
  CHECK(has(msg, "Named<"));
  const auto train = synthetic(8, 1);
  CHECK(has(error_message([&] { fit(model, train, train, quick()); }), "two parameters are named"));
}

TEST_CASE("incubator: a non-ViT staged model without offsets, with MetaOf, through every phase") {
  OneThread one_thread;
  TempRunDir dir;
  const auto train = synthetic(64, 41), test = synthetic(32, 42);
  using Inc = Incubator<MetaOf<Staged>, Staged, Cpu>;
  Inc inc({.dir = dir.path / "run", .tag = "staged-mlp", .seed = 2});
  inc.pretrain_meta(train, test, quick());
  for (std::size_t i = 0; i < Inc::K; ++i) inc.incubate(i, train, test, quick());
  auto target = std::make_unique<Inc::Target>();
  inc.assemble(*target);
  const auto r = inc.finetune(*target, train, test, quick());
  CHECK(r.test.accuracy >= 0.0);
  // Module 2's file holds blocks 3-4, exactly what stage 2 of the target is.
  const auto f = io::SafeTensorsFile::read(inc.files().module(2));
  CHECK(f.contains("blocks.3.fc1.weight"));
  CHECK(f.contains("blocks.4.fc1.weight"));
}

// ---- drop-path rates per block ------------------------------------------------------------------
namespace {
template <class M>
std::vector<double> drop_path_rates(M& model) {
  std::vector<double> rates;
  model.for_each_layer([&](auto& l) {
    if constexpr (is_drop_path<std::remove_cvref_t<decltype(l)>>::value) rates.push_back(l.rate());
  });
  return rates;
}
void expect_rates(const std::vector<double>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    CHECK(got[i] == doctest::Approx(want[i]).epsilon(1e-12));
  }
}
// A residual block with ONE DropPath, and one with none.
template <int D>
using OneDropBlock = AsBlock<Residual<Sequential<Named<"norm", LayerNorm<D>>, Named<"fc", Linear<D, D>>, DropPath>>>;
template <int D>
using NoDropBlock = AsBlock<Residual<Sequential<Named<"norm", LayerNorm<D>>, Named<"fc", Linear<D, D>>>>>;
}  // namespace

TEST_CASE("set_drop_path: linspace(0, max, blocks) per block, every DropPath of a block at its rate") {
  SUBCASE("a ViT (two DropPath per block): as timm, and as before") {
    auto vit = std::make_unique<Model<presets::VitSmall, Cpu>>();  // 8 blocks
    set_drop_path(*vit, 0.14);
    std::vector<double> want;
    for (int b = 0; b < 8; ++b) want.insert(want.end(), 2, 0.14 * b / 7);
    expect_rates(drop_path_rates(*vit), want);
    // The old rule (DropPath layers counted, two to a block) gave exactly these.
    std::vector<double> old;
    for (int k = 0; k < 16; ++k) old.push_back(0.14 * (k / 2) / (16 / 2 - 1));
    expect_rates(drop_path_rates(*vit), old);
    set_drop_path(*vit, 0.0);
    expect_rates(drop_path_rates(*vit), std::vector<double>(16, 0.0));
  }
  SUBCASE("blocks with one DropPath each") {
    Model<Sequential<Named<"blocks", Repeat<3, OneDropBlock<8>>>>, Cpu> m;
    set_drop_path(m, 0.2);
    expect_rates(drop_path_rates(m), {0.0, 0.1, 0.2});
  }
  SUBCASE("a mix: two-DropPath blocks, a lone DropPath, a one-DropPath block, a block without, a nested block") {
    using Mix = Sequential<Named<"a", Block<8, 2>>,                     // block 0: two DropPath
                           DropPath,                                     // block 1: on its own
                           Named<"b", OneDropBlock<8>>,                  // block 2
                           Named<"c", NoDropBlock<8>>,                   // block 3: counts, nothing to set
                           Named<"d", AsBlock<Sequential<Named<"x", OneDropBlock<8>>,
                                                         Named<"y", OneDropBlock<8>>>>>,  // block 4: one block
                           Named<"e", Block<8, 2>>>;                     // block 5
    Model<Mix, Cpu> m;
    set_drop_path(m, 0.5);
    expect_rates(drop_path_rates(m), {0.0, 0.0, 0.1, 0.2, 0.4, 0.4, 0.5, 0.5});
    // A single block (or a single DropPath) gets rate 0, as linspace(0, max, 1) does.
    Model<OneDropBlock<8>, Cpu> one;
    set_drop_path(one, 0.5);
    expect_rates(drop_path_rates(one), {0.0});
  }
  SUBCASE("Dropout is not a drop-path layer") {
    Model<Sequential<Dropout, Named<"b", OneDropBlock<8>>, Named<"c", OneDropBlock<8>>>, Cpu> m;
    set_drop_path(m, 0.3);
    double dropout = -1;
    m.get<0>().for_each_layer([&](auto& l) { dropout = l.rate(); });
    CHECK(dropout == 0.0);
    expect_rates(drop_path_rates(m), {0.0, 0.3});
  }
}

TEST_CASE("AsBlock is transparent: names, numbering, MetaOf and results are its inner spec's") {
  using Plain = Residual<Sequential<Named<"norm", LayerNorm<8>>, Named<"fc", Linear<8, 8>>, DropPath>>;
  Model<Sequential<Named<"blocks", Repeat<2, Plain>>, Named<"blocks", Repeat<1, Plain>>>, Cpu64> plain;
  Model<Sequential<Named<"blocks", Repeat<2, OneDropBlock<8>>>, Named<"blocks", Repeat<1, OneDropBlock<8>>>>, Cpu64> marked;
  CHECK(names_of(plain) == names_of(marked));
  CHECK(contains(names_of(marked), "blocks.2.fc.weight"));
  static_assert(std::is_same_v<MetaOf<Stages<Sequential<Named<"blocks", Repeat<3, OneDropBlock<8>>>>>>,
                               Stages<Sequential<Named<"blocks", Repeat<1, OneDropBlock<8>>>>>>);
  test::randomize_parameters(plain, 3);
  test::randomize_parameters(marked, 3);
  std::mt19937_64 rng(4);
  const auto x = test::random_tensor<Cpu64>({2, 3, 8}, rng);
  Context ctx;
  CHECK(plain.forward(x, ctx).to_host() == marked.forward(x, ctx).to_host());
}
