// Mixture-of-experts layers (layers/moe.hpp): routing by hand-built cases (top-k, softmax over the
// chosen, capacity, Batch Priority Routing, top-1 before top-2, drops), the auxiliary losses, and
// finite differences in double for the whole layer with each router.
#include <doctest/doctest.h>

#include <hatch/hatch.hpp>
#include <hatch/layers/moe.hpp>
#include <hatch/testing/gradcheck.hpp>

#include "files.hpp"
#include "support.hpp"


#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <vector>

using namespace hatch;


namespace {
template <class Policy>
Routing route(Policy& p, const std::vector<double>& logits, int tokens, bool training = false) {
  Routing r;
  Context ctx;
  ctx.training = training;
  ctx.seed = 9;
  p.route(logits, tokens, training, ctx, r);
  return r;
}
}  // namespace

TEST_CASE("TopKGate: the k largest logits, a softmax over them, every choice placed") {
  TopKGate<2>::Policy<4> gate;
  // token 0 prefers experts 2 then 0; token 1 experts 1 then 3; token 2 experts 2 then 3.
  const std::vector<double> logits{1.0, -1.0, 2.0, 0.0,  //
                                   0.0, 3.0, -2.0, 1.0,  //
                                   0.0, 0.5, 4.0, 1.0};
  const Routing r = route(gate, logits, 3);
  CHECK(r.choice == std::vector<std::int32_t>{2, 0, 1, 3, 2, 3});
  const double w0 = 1 / (1 + std::exp(-1.0));  // softmax over the chosen two logits (2 and 1)
  CHECK(r.weight[0] == doctest::Approx(w0));
  CHECK(r.weight[1] == doctest::Approx(1 - w0));
  CHECK(r.dropped == 0);
  // Expert-major rows, tokens in order within an expert: e0 {0}, e1 {1}, e2 {0, 2}, e3 {1, 2}.
  CHECK(r.offset == std::vector<int>{0, 1, 2, 4, 6});
  CHECK(r.order == std::vector<std::int32_t>{0, 1, 0, 2, 1, 2});
  CHECK(r.slot == std::vector<std::int32_t>{2, 0, 1, 4, 3, 5});
  CHECK(gate.aux_loss() == 0.0);
}

TEST_CASE("VmoeRouter: capacity, Batch Priority Routing and drops") {
  // k = 1, E = 2, evaluation capacity 100%: ceil(1 * 4 * 1.0 / 2) = 2 places per expert. All four
  // tokens prefer expert 0; the two most confident keep their place, the other two are dropped.
  VmoeRouter<1, 105, 100>::Policy<2> router;
  const std::vector<double> logits{1.0, 0.0,   // p0 = 0.73
                                   3.0, 0.0,   // p0 = 0.95
                                   0.5, 0.0,   // p0 = 0.62
                                   2.0, 0.0};  // p0 = 0.88
  const Routing r = route(router, logits, 4);
  CHECK(r.dropped == 2);
  CHECK(r.offset == std::vector<int>{0, 2, 2});
  CHECK(r.order == std::vector<std::int32_t>{1, 3});  // by priority: token 1, then token 3
  CHECK(r.slot == std::vector<std::int32_t>{-1, 0, -1, 1});
  CHECK(r.weight[0] == 0.0);
  // Combine weights are the full-softmax probabilities, not renormalised.
  CHECK(r.weight[1] == doctest::Approx(1 / (1 + std::exp(-3.0))));
  CHECK(router.aux_loss() == 0.0);  // evaluation: no auxiliary terms
}

TEST_CASE("VmoeRouter: every top-1 choice is placed before any top-2 choice") {
  // k = 2, E = 2, capacity 50%: ceil(2 * 2 * 0.5 / 2) = 1 place per expert. Token 0: e0 (0.9) then e1;
  // token 1: e1 then e0. Token by token, token 0's second choice would take e1 before token 1's
  // first; top-1 first, both first choices are kept and both second choices dropped.
  VmoeRouter<2, 105, 50>::Policy<2> router;
  const double l = std::log(9.0);
  const std::vector<double> logits{l, 0.0, 0.0, 0.4};
  const Routing r = route(router, logits, 2);
  CHECK(r.choice == std::vector<std::int32_t>{0, 1, 1, 0});
  CHECK(r.slot == std::vector<std::int32_t>{0, -1, 1, -1});
  CHECK(r.dropped == 2);
}

TEST_CASE("VmoeRouter: noise and the auxiliary losses in training only; reproducible from the seed") {
  VmoeRouter<2>::Policy<4> a, b;
  std::mt19937_64 rng(3);
  std::normal_distribution<double> nd;
  std::vector<double> logits(4 * 32);
  for (auto& v : logits) v = nd(rng);
  const Routing ra = route(a, logits, 32, true), rb = route(b, logits, 32, true);
  CHECK(ra.choice == rb.choice);  // the same seed, the same noise
  CHECK(a.aux_loss() > 0.0);
  CHECK(a.aux_loss() == b.aux_loss());
  // Capacity ceil(2 * 32 * 1.05 / 4) = 17 per expert.
  for (int e = 0; e < 4; ++e) CHECK(ra.offset[std::size_t(e) + 1] - ra.offset[std::size_t(e)] <= 17);
  route(a, logits, 32, false);
  CHECK(a.aux_loss() == 0.0);
}

TEST_CASE("Moe: central differences in double, each router, evaluation and training") {
  // (test::expect_gradients: random parameters from the seed, then every entry within 1e-6.)
  SUBCASE("TopKGate<2>") {
    Model<Moe<6, 4, TopKGate<2>, Mlp<6, 8>>, Cpu64> moe;
    test::expect_gradients(moe, {2, 5, 6}, /*training=*/true, 40, 5, 1);
  }
  SUBCASE("TopKGate<1>") {
    Model<Moe<6, 3, TopKGate<1>, Mlp<6, 8>>, Cpu64> moe;
    test::expect_gradients(moe, {7, 6}, /*training=*/false, 40, 6, 1);
  }
  SUBCASE("VmoeRouter<2>, training: noise fixed by the seed, capacity, both auxiliary losses") {
    Model<Moe<6, 4, VmoeRouter<2>, Mlp<6, 8>>, Cpu64> moe;
    test::expect_gradients(moe, {3, 5, 6}, /*training=*/true, 40, 7, 1);
  }
  SUBCASE("VmoeRouter<2>, auxiliary losses large enough to matter") {
    // A weight of 0.5 instead of 0.005: the check then fails if their gradient is wrong.
    Model<Moe<6, 4, VmoeRouter<2, 105, 0, 500000>, Mlp<6, 8>>, Cpu64> moe;
    test::expect_gradients(moe, {3, 5, 6}, /*training=*/true, 40, 8, 1);
    CHECK(collect_aux_loss(moe) > 1e-3);
  }
  SUBCASE("VmoeRouter<1>, evaluation") {
    Model<Moe<6, 4, VmoeRouter<1>, Mlp<6, 8>>, Cpu64> moe;
    test::expect_gradients(moe, {10, 6}, /*training=*/false, 40, 9, 1);
  }
}

TEST_CASE("Moe: a token every expert dropped contributes nothing, and keeps its residual in a block") {
  // Evaluation capacity 25%: ceil(1 * 8 * 0.25 / 2) = 1 place per expert, so at most 2 of the 8
  // tokens are routed and every other output row is exactly zero.
  using Layer = Moe<4, 2, VmoeRouter<1, 105, 25>, Mlp<4, 8>>;
  Model<Layer, Cpu64> moe;
  test::randomize_parameters(moe, 11);
  std::mt19937_64 rng(4);
  auto x = test::random_tensor<Cpu64>({8, 4}, rng);
  Context ctx;
  const auto y = moe.forward(x, ctx).to_host();
  const Routing& r = moe.routing();
  CHECK(r.dropped >= 6);  // 8 tokens, one place at each of the 2 experts
  int zero_rows = 0;
  for (int t = 0; t < 8; ++t) {
    bool zero = true;
    for (int c = 0; c < 4; ++c) zero = zero && y[std::size_t(t) * 4 + c] == 0.0;
    zero_rows += zero;
    CHECK(zero == (r.slot[std::size_t(t)] < 0));
  }
  CHECK(zero_rows == r.dropped);
  // In a residual branch the dropped tokens pass through unchanged.
  Model<Residual<Layer>, Cpu64> res;
  test::randomize_parameters(res, 12);
  const auto xr = x.to_host(), yr = res.forward(x, ctx).to_host();
  int dropped = 0;
  res.for_each_layer([&](auto& l) {
    if constexpr (requires { l.routing(); }) dropped = l.routing().dropped;
  });
  int unchanged = 0;
  for (int t = 0; t < 8; ++t) {
    bool same = true;
    for (int c = 0; c < 4; ++c) same = same && yr[std::size_t(t) * 4 + c] == xr[std::size_t(t) * 4 + c];
    unchanged += same;
  }
  CHECK(dropped >= 6);
  CHECK(unchanged == dropped);
}

TEST_CASE("Moe in a block: parameters named mlp.gate.* and mlp.experts.<e>.*, expert compute grows with k") {
  Model<BlockWith<8, 2, Moe<8, 4, TopKGate<2>, Mlp<8, 16>>>, Cpu> block;
  std::vector<std::string> names;
  block.visit([&](const std::string& n, Parameter<Cpu>&) { names.push_back(n); }, "");
  CHECK(std::find(names.begin(), names.end(), "mlp.gate.weight") != names.end());
  CHECK(std::find(names.begin(), names.end(), "mlp.gate.bias") != names.end());
  CHECK(std::find(names.begin(), names.end(), "mlp.experts.3.fc2.bias") != names.end());
  Initializer init(2);
  block.reset_parameters(init);
  std::mt19937_64 rng(1);
  auto x = test::random_tensor<Cpu>({3, 7, 8}, rng);
  Context ctx;
  block.forward(x, ctx);
  // Every token reaches exactly k = 2 experts: 2 * 21 expert rows in all, whatever E is.
  int rows = 0;
  block.for_each_layer([&](auto& l) {
    if constexpr (requires { l.routing(); }) rows = l.routing().offset.back();
  });
  CHECK(rows == 2 * 21);
  // V-MoE's gate has no bias.
  Model<Moe<8, 4, VmoeRouter<2>>, Cpu> vmoe;
  names.clear();
  vmoe.visit([&](const std::string& n, Parameter<Cpu>&) { names.push_back(n); }, "");
  CHECK(std::find(names.begin(), names.end(), "gate.bias") == names.end());
  CHECK(std::find(names.begin(), names.end(), "experts.0.fc1.weight") != names.end());
}

TEST_CASE("Cpu GEMM workspaces stay bounded when row counts vary from call to call (per-expert GEMMs)") {
  // Single-threaded sizes: every call runs on this thread and uses its cache.
  const int n = 24, k = 16;
  std::vector<float> a(300 * k, 0.5f), b(std::size_t(k) * n, 0.25f), c(300 * n);
  for (int m = 1; m <= 300; ++m) {
    Cpu::gemm(false, false, m, n, k, 1.0f, a.data(), k, b.data(), n, 0.0f, c.data(), n);
    CHECK(c[std::size_t(m - 1) * n] == doctest::Approx(0.5 * 0.25 * k));  // a shared workspace still gives the product
  }
  CHECK(Cpu::gemm_workspace_count() <= 96);
  // Once the buckets exist, the same row counts again need no new workspace.
  const auto buffers = Cpu::gemm_workspace_count();
  for (int m = 1; m <= 300; m += 7) Cpu::gemm(false, false, m, n, k, 1.0f, a.data(), k, b.data(), n, 0.0f, c.data(), n);
  CHECK(Cpu::gemm_workspace_count() == buffers);
}

TEST_CASE("fit writes each expert layer's load and dropped fraction into metrics.jsonl, and trains") {
  // Two expert layers (a V-MoE router with capacity, then a top-2 gate) in a small classifier.
  using Net = Sequential<Flatten<784>, Named<"stem", Linear<784, 16>>,
                         Named<"moe1", Residual<Moe<16, 4, VmoeRouter<2>, Mlp<16, 32>>>>,
                         Named<"moe2", Residual<Moe<16, 3, TopKGate<2>, Mlp<16, 32>>>>, Named<"head", Linear<16, 10>>>;
  const auto train = test::learnable_set(256, 1), test_set = test::learnable_set(128, 2);
  const hatch_test::TempDir tmp("hatch_test_moe_fit");
  const auto& dir = tmp.path;
  Model<Net, Cpu> model;
  Initializer init(3);
  model.reset_parameters(init);
  FitOptions o;
  o.epochs = 3;
  o.batch = 32;
  o.lr = 3e-3;
  o.progress = false;
  o.out = dir;
  const auto r = fit(model, train, test_set, o);
  CHECK(r.test.accuracy > 0.5);  // ten well-separated classes: the routed model learns them
  std::ifstream log(dir / "metrics.jsonl");
  std::string line;
  int lines = 0;
  while (std::getline(log, line)) {
    ++lines;
    const auto j = nlohmann::json::parse(line);
    REQUIRE(j.contains("expert_load"));
    const auto load = j.at("expert_load");
    REQUIRE(load.size() == 2);
    CHECK(load[0].size() == 4);
    CHECK(load[1].size() == 3);
    for (const auto& layer : load) {
      double sum = 0;
      for (const auto& v : layer) sum += v.get<double>();
      CHECK(sum == doctest::Approx(1.0));
    }
    const auto dropped = j.at("dropped_fraction");
    CHECK(dropped[0].get<double>() >= 0.0);
    CHECK(dropped[0].get<double>() < 0.5);
    CHECK(dropped[1].get<double>() == 0.0);  // TopKGate drops nothing
    CHECK(j.at("aux_loss").get<double>() > 0.0);  // V-MoE's balance losses
  }
  CHECK(lines == 3);
}
