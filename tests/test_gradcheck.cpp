// Finite-difference gradient checks in double precision: every layer, a ViT stage, a whole ViT.
#include "support.hpp"

using namespace hatch;
using hatch::test::expect_gradients;
using hatch::test::gradcheck;
using hatch::test::randomize_parameters;
using B = Cpu64;

namespace {
constexpr VitSpec kSpec{.image = 8, .channels = 2, .patch = 4, .dim = 8, .heads = 2, .mlp_ratio = 2, .classes = 3};
}  // namespace

TEST_CASE("gradcheck: Linear") {
  LinearLayer<B, 6, 5> with_bias;
  expect_gradients(with_bias, {2, 3, 6});
  LinearLayer<B, 6, 5, false> no_bias;
  expect_gradients(no_bias, {4, 6});
}
TEST_CASE("gradcheck: LayerNorm") {
  LayerNormLayer<B, 7> l;
  expect_gradients(l, {2, 3, 7});
}
TEST_CASE("gradcheck: GELU") {
  GeluLayer<B> l;
  expect_gradients(l, {3, 11});
}
TEST_CASE("gradcheck: SiLU (Elementwise<SiluFn>)") {
  SiluLayer<B> l;
  expect_gradients(l, {3, 11});
}
TEST_CASE("gradcheck: Flatten and Reshape between layers") {
  Model<Sequential<Flatten<12>, Named<"fc", Linear<12, 5>>>, B> flat;
  expect_gradients(flat, {2, 3, 4});
  Model<Sequential<Named<"fc1", Linear<6, 6>>, Reshape<2, 3>, Silu, Flatten<6>, Named<"fc2", Linear<6, 4>>>, B> re;
  expect_gradients(re, {4, 6});
}
TEST_CASE("gradcheck: Dropout and DropPath in training") {
  DropoutLayer<B> d;
  d.set_rate(0.3);
  expect_gradients(d, {4, 9}, true);
  DropPathLayer<B> p;
  p.set_rate(0.5);
  expect_gradients(p, {6, 3, 4}, true);
}
TEST_CASE("gradcheck: Attention") {
  AttentionLayer<B, 8, 2, true> with_bias;
  expect_gradients(with_bias, {2, 5, 8});
  AttentionLayer<B, 12, 3, false> no_bias;
  expect_gradients(no_bias, {2, 4, 12});
}
TEST_CASE("gradcheck: MLP") {
  Model<Mlp<6, 12>, B> l;
  expect_gradients(l, {2, 3, 6});
}
TEST_CASE("gradcheck: Block with drop-path") {
  Model<Block<8, 2>, B> l;
  set_drop_path(l, 0.0);
  expect_gradients(l, {2, 5, 8});
  Model<Block<8, 2>, B> dropping;
  dropping.for_each_layer([](auto& x) {
    if constexpr (requires { x.set_rate(0.0); }) x.set_rate(0.4);
  });
  expect_gradients(dropping, {4, 5, 8}, true);
}
TEST_CASE("gradcheck: PatchEmbed, ClassPos, ClassHead") {
  PatchEmbedLayer<B, 2, 8, 4, 6> pe;
  expect_gradients(pe, {2, 2, 8, 8});
  ClassPosLayer<B, 4, 6> cp;
  expect_gradients(cp, {3, 4, 6});
  Model<ClassHead<6, 3>, B> head;
  expect_gradients(head, {2, 5, 6});
}
TEST_CASE("gradcheck: ViT stages and a whole ViT") {
  using V = Vit<kSpec, Depths<1, 2, 1>>;
  Model<V::stage<0>, B> first;
  expect_gradients(first, {2, 2, 8, 8});
  Model<V::stage<1>, B> middle;
  expect_gradients(middle, {2, 5, 8});
  Model<V::stage<2>, B> last;
  expect_gradients(last, {2, 5, 8});
  Model<V, B> whole;
  expect_gradients(whole, {2, 2, 8, 8}, false, 12);
}
