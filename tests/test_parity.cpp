// Parity with PyTorch: each layer, run in float32 on fixtures written by
// tests/fixtures/make_fixtures.py, matches PyTorch's output and every gradient.
#include <hatch/io/safetensors.hpp>
#include <hatch/layers/moe.hpp>

#include "support.hpp"

#ifndef HATCH_FIXTURE_DIR
#define HATCH_FIXTURE_DIR "tests/fixtures"
#endif

using namespace hatch;
using test::rel_error;

namespace {
constexpr double kTol = 1e-5;


// ctx: the pass's mode (evaluation unless a fixture says otherwise, e.g. NAC's training noise).
template <class L>
void expect_parity(L& layer, const std::string& fixture, Context ctx = {}) {
  using B = typename L::backend;
  const auto file = io::SafeTensorsFile::read(std::string(HATCH_FIXTURE_DIR) + "/" + fixture + ".safetensors");
  auto load = [&](const std::string& name) {
    const auto& rec = file.at(name);
    Shape s;
    for (auto d : rec.shape) s.dims[s.rank++] = d;
    Tensor<B> t;
    t.from_host(file.to_float(name, rec.shape), s);
    return t;
  };
  int params = 0;
  layer.visit(
      [&](const std::string& name, Parameter<B>& p) {
        p.value.from_host(file.to_float("param." + name, p.value.shape().vec()));
        p.zero_grad();
        ++params;
      },
      "");
  const Tensor<B> x = load("input");
  const Tensor<B> dy = load("grad_output");
  const auto& y = layer.forward(x, ctx);
  REQUIRE(y.shape().vec() == file.at("output").shape);
  CHECK_MESSAGE(rel_error(y.to_host(), file.to_float("output", y.shape().vec())) <= kTol, fixture, ": output");
  ctx.input_grad = true;
  const auto& dx = layer.backward(dy, ctx);
  CHECK_MESSAGE(rel_error(dx.to_host(), file.to_float("grad_input", x.shape().vec())) <= kTol, fixture,
                ": grad_input");
  int grads = 0;
  layer.visit(
      [&](const std::string& name, Parameter<B>& p) {
        const double e = rel_error(p.grad.to_host(), file.to_float("grad." + name, p.grad.shape().vec()));
        CHECK_MESSAGE(e <= kTol, fixture, ": grad.", name, " relative error ", e);
        ++grads;
      },
      "");
  // Every parameter in the fixture was used: no name went unmatched.
  int in_file = 0;
  for (const auto& n : file.names()) in_file += n.starts_with("param.");
  CHECK(params == in_file);
  CHECK(grads == params);
}
}  // namespace

TEST_CASE("parity with PyTorch: layers") {
  LinearLayer<Cpu, 8, 12> linear;
  expect_parity(linear, "linear");
  LayerNormLayer<Cpu, 8> ln;
  expect_parity(ln, "layernorm");
  GeluLayer<Cpu> gelu;
  expect_parity(gelu, "gelu");
  SiluLayer<Cpu> silu;  // Elementwise<SiluFn> against torch.nn.functional.silu
  expect_parity(silu, "silu");
  AttentionLayer<Cpu, 8, 2, true> attn;
  expect_parity(attn, "attention");
  AttentionLayer<Cpu, 8, 2, false> attn_nobias;
  expect_parity(attn_nobias, "attention_nobias");
  Model<Mlp<8, 32>, Cpu> mlp;
  expect_parity(mlp, "mlp");
  Model<Block<8, 2>, Cpu> block;
  expect_parity(block, "block");
  PatchEmbedLayer<Cpu, 1, 28, 7, 16> pe;
  expect_parity(pe, "patch_embed");
  PatchEmbedLayer<Cpu, 3, 12, 4, 8> pe_rgb;
  expect_parity(pe_rgb, "patch_embed_rgb");
  ClassPosLayer<Cpu, 16, 8> cls_pos;
  expect_parity(cls_pos, "cls_pos");
  Model<ClassHead<8, 10>, Cpu> head;
  expect_parity(head, "head");
}

TEST_CASE("parity with PyTorch: expert blocks, each router, in evaluation (drops included)") {
  Model<BlockWith<8, 2, Moe<8, 4, TopKGate<2>, Mlp<8, 16>>>, Cpu> topk;
  expect_parity(topk, "moe_block_topk");
  // Capacity 100% in evaluation: ceil(2 * 10 * 1.0 / 4) = 5 places per expert; the fixture's
  // routing sends 7 choices to one expert, so two are dropped (one of them a top-1 choice).
  Model<BlockWith<8, 2, Moe<8, 4, VmoeRouter<2, 105, 100>, Mlp<8, 16>>>, Cpu> vmoe;
  expect_parity(vmoe, "moe_block_vmoe");
  int dropped = 0;
  vmoe.for_each_layer([&](auto& l) {
    if constexpr (requires { l.routing(); }) dropped = l.routing().dropped;
  });
  CHECK(dropped == 2);
}

TEST_CASE("parity with PyTorch: NAC layers (ModFc on its codes; Kmdpa all pairs kept, truncated, and in training)") {
  LatentCodes<Cpu, 4> codes(3);
  ModFcLayer<Cpu, 8, 6, 4> modfc;
  modfc.use_codes(codes);
  expect_parity(modfc, "nac_modfc");  // the codes are read as param.codes, their gradient checked
  LatentSignatures<Cpu, 8> sig(6);
  KmdpaLayer<Cpu, 2, 4, 8> kmdpa;
  kmdpa.use_signatures(sig);
  expect_parity(kmdpa, "nac_kmdpa");
  CHECK(kmdpa.kept_fraction() == 1.0);
  expect_parity(kmdpa, "nac_kmdpa_truncated");
  CHECK(kmdpa.kept_fraction() < 1.0);  // the fixture's config records the same kept_pairs
  const auto file = io::SafeTensorsFile::read(std::string(HATCH_FIXTURE_DIR) + "/nac_kmdpa_truncated.safetensors");
  const std::string config = file.metadata().at("config").get<std::string>();
  CHECK(config.find("\"kept_pairs\": " + std::to_string(kmdpa.kept_pairs()) + ",") != std::string::npos);
  // Training: the relaxed Bernoulli with hatch's noise, written out in the PyTorch twin.
  Context train;
  train.training = true;
  train.seed = 4242;  // the fixture's noise_seed
  expect_parity(kmdpa, "nac_kmdpa_train", train);
  CHECK(kmdpa.kept_fraction() < 1.0);
}

TEST_CASE("parity with PyTorch: ModFfn on shared codes; LatentSeeder and OutputPooling in training with hatch's noise; rectangular Kmdpa") {
  LatentCodes<Cpu, 4> codes(3);
  ModFfnLayer<Cpu, 6, 5, 4> ffn;
  ffn.use_codes(codes);
  expect_parity(ffn, "nac_modffn");  // fc1.codes and fc2.codes: one table, the summed gradient
  LatentCodes<Cpu, 5> seeds(4);
  LatentSeederLayer<Cpu, 6, 5> seeder;
  seeder.use_codes(seeds);
  Context train;
  train.training = true;
  train.seed = 515;  // the fixture's noise_seed
  expect_parity(seeder, "nac_seeder_train", train);
  OutputPoolingLayer<Cpu, 5, 6, 4> pool;
  Context train_pool;
  train_pool.training = true;
  train_pool.seed = 616;
  expect_parity(pool, "nac_pooling_train", train_pool);
  // Kmdpa over a rectangular pair list: latents [2, 6) query, all six are keys
  LatentSignatures<Cpu, 8> sig(6);
  KmdpaLayer<Cpu, 2, 4, 8> rect;
  rect.use_signatures(sig);
  rect.restrict_pairs(2, -1, 0, -1);
  expect_parity(rect, "nac_kmdpa_rect");
  CHECK(rect.kept_fraction() < 1.0);
  const auto file = io::SafeTensorsFile::read(std::string(HATCH_FIXTURE_DIR) + "/nac_kmdpa_rect.safetensors");
  const std::string config = file.metadata().at("config").get<std::string>();
  CHECK(config.find("\"kept_pairs\": " + std::to_string(rect.kept_pairs()) + ",") != std::string::npos);
}

TEST_CASE("parity with PyTorch: a 2-block ViT, in one stage and split into two stages") {
  constexpr VitSpec spec{.image = 28, .channels = 1, .patch = 7, .dim = 16, .heads = 2, .mlp_ratio = 4, .classes = 10};
  Model<Vit<spec, Depths<2>>, Cpu> one_stage;
  expect_parity(one_stage, "vit");
  Model<Vit<spec, Depths<1, 1>>, Cpu> two_stages;
  expect_parity(two_stages, "vit");
}
