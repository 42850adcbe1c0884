// NAC layers (layers/nac.hpp, nac_graph.hpp): ModFc, Kmdpa (square and rectangular pair lists),
// ModFfn, SignatureRepulsion, LatentSeeder, OutputPooling, the signature graph priors. Finite
// differences in double for every input and parameter, the truncation and its straight-through
// rule against a dense computation, the kept fraction, a shared codes table stored once, the
// forward maths written out, the graphs' properties and the signatures' realised edges. The
// blocks (nac_blocks.hpp: position grid, read-in, propagator, read-out) and the model Nac<spec>
// (models/nac.hpp): finite differences, tables stored once, Cpu against Cpu64, the graph prior.

#include <filesystem>

#include "files.hpp"
#include "support.hpp"
#include "hatch/models/nac.hpp"

using namespace hatch;
using test::gradcheck;
using test::randomize_parameters;

namespace {

using B64 = Cpu64;

// Two ModFc layers in a row on the same codes: the codes' gradient is the sum of both layers'.
template <Backend B>
struct TwoModFc {
  using backend = B;
  static constexpr int in = 5, out = 3;
  LatentCodes<B, 4> codes{3};
  ModFcLayer<B, 5, 6, 4> first;
  ModFcLayer<B, 6, 3, 4> second;
  TwoModFc() {
    first.use_codes(codes);
    second.use_codes(codes);
  }
  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) { return second.forward(first.forward(x, ctx), ctx); }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    return first.backward(backward_inner(second, dy, ctx), ctx);
  }
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    codes.visit(f, prefix + "codes");  // the owner first: the table's name is the model's
    first.visit(f, prefix + "first.");
    second.visit(f, prefix + "second.");
  }
  template <class F>
  void for_each_layer(F&& f) {
    f(first);
    f(second);
  }
};

// log K of example e and pair (a, b) in training, written out from layers/nac.hpp's comment.
double relaxed_log_kernel(double dist, double eps, std::uint64_t seed, std::uint64_t counter) {
  const double xs = std::max(dist / eps, 1e-6);
  const double k = std::exp(-xs);
  const double w = uniform01(seed, counter) + std::ldexp(1.0, -54);
  const double y = (std::log(k) - std::log(1 - k) + std::log(w) - std::log(1 - w)) / 0.5;
  return std::log(1 / (1 + std::exp(-y)));
}

// The dense KMDPA of layers/nac.hpp's comment, in double on the host: every pair scored,
// truncated pairs (d > tau) given weight 0. Training: the relaxed Bernoulli drawn at
// (seed, (e U + a) U + b), the counter starting at 0.
std::vector<double> dense_kmdpa(const std::vector<double>& x, const std::vector<double>& sig, double eps, int u,
                                int s, int heads, int dh, bool training = false, std::uint64_t seed = 0) {
  const int d = heads * dh, rows = int(x.size()) / (3 * d), nb = rows / u;
  std::vector<double> dist(std::size_t(u) * u);
  for (int a = 0; a < u; ++a)
    for (int b = 0; b < u; ++b) {
      double ab = 0, aa = 0, bb = 0;
      for (int c = 0; c < s; ++c) {
        ab += sig[a * s + c] * sig[b * s + c];
        aa += sig[a * s + c] * sig[a * s + c];
        bb += sig[b * s + c] * sig[b * s + c];
      }
      dist[a * u + b] = 1 - ab / (std::sqrt(aa) * std::sqrt(bb));
    }
  std::vector<double> o(std::size_t(rows) * d, 0.0);
  for (int e = 0; e < nb; ++e)
    for (int h = 0; h < heads; ++h)
      for (int a = 0; a < u; ++a) {
        std::vector<double> w(u, 0.0);
        double mx = -1e300;
        for (int b = 0; b < u; ++b) {
          if (dist[a * u + b] > 0.9) continue;
          double qk = 0;
          for (int c = 0; c < dh; ++c)
            qk += x[(e * u + a) * 3 * d + h * dh + c] * x[(e * u + b) * 3 * d + d + h * dh + c];
          const double logk = training ? relaxed_log_kernel(dist[a * u + b], eps, seed, std::uint64_t((e * u + a) * u + b))
                                       : -dist[a * u + b] / eps;
          w[b] = qk / std::sqrt(double(dh)) + logk;
          mx = std::max(mx, w[b]);
        }
        double sum = 0;
        for (int b = 0; b < u; ++b) sum += (w[b] = dist[a * u + b] > 0.9 ? 0.0 : std::exp(w[b] - mx));
        for (int b = 0; b < u; ++b)
          for (int c = 0; c < dh; ++c)
            o[(e * u + a) * d + h * dh + c] += w[b] / sum * x[(e * u + b) * 3 * d + 2 * d + h * dh + c];
      }
  return o;
}

// Randomises a Kmdpa's parameters (signatures included) and sets a positive bandwidth.
template <class L>
void randomize_kmdpa(L& layer, std::uint64_t seed, double bandwidth) {
  randomize_parameters(layer, seed);
  layer.bandwidth.value.fill(typename L::T(bandwidth));
}

}  // namespace

TEST_CASE("nac: ModFc gradients (input, weight, bias, code_proj, scale, codes)") {
  LatentCodes<B64, 4> codes(3);
  ModFcLayer<B64, 5, 6, 4> layer;
  layer.use_codes(codes);
  int seen = 0;
  layer.visit([&](const std::string&, Parameter<B64>&) { ++seen; }, "");
  CHECK(seen == 5);
  randomize_parameters(layer, 7);
  auto rep = gradcheck(layer, {2 * 3, 5}, false, 3, 40);
  INFO(rep.worst);
  CHECK(rep.max_rel <= 1e-6);
  auto rep3 = gradcheck(layer, {4, 3, 5}, true, 5, 40);  // (B, U, In) input; no randomness
  INFO(rep3.worst);
  CHECK(rep3.max_rel <= 1e-6);
}

TEST_CASE("nac: ModFc computes W (x * (1 + a LN(W_c c))) + b; scale 0.1 after reset") {
  LatentCodes<B64, 2> codes(2);
  ModFcLayer<B64, 3, 2, 2> layer;
  layer.use_codes(codes);
  Initializer init(4);
  layer.reset_parameters(init);
  codes.reset_parameters(init);
  CHECK(layer.scale.value.to_host()[0] == doctest::Approx(0.1));
  randomize_parameters(layer, 9);
  std::mt19937_64 rng(2);
  auto x = test::random_tensor<B64>({4, 3}, rng);
  Context ctx;
  const auto y = layer.forward(x, ctx).to_host();
  const auto xh = x.to_host(), w = layer.weight.value.to_host(), bi = layer.bias.value.to_host(),
             wc = layer.code_proj.value.to_host(), c = codes.param.value.to_host();
  const double a = layer.scale.value.to_host()[0];
  for (int r = 0; r < 4; ++r) {
    const int u = r % 2;
    double m[3], mu = 0, var = 0;
    for (int i = 0; i < 3; ++i) {
      m[i] = wc[i * 2] * c[u * 2] + wc[i * 2 + 1] * c[u * 2 + 1];
      mu += m[i] / 3;
    }
    for (int i = 0; i < 3; ++i) var += (m[i] - mu) * (m[i] - mu) / 3;
    for (int o = 0; o < 2; ++o) {
      double s = bi[o];
      for (int i = 0; i < 3; ++i) s += w[o * 3 + i] * xh[r * 3 + i] * (1 + a * (m[i] - mu) / std::sqrt(var + 1e-5));
      CHECK(y[r * 2 + o] == doctest::Approx(s).epsilon(1e-12));
    }
  }
}

TEST_CASE("nac: two ModFc on shared codes: gradients add up, the table is stored once") {
  TwoModFc<B64> model;
  randomize_parameters(model, 11);
  auto rep = gradcheck(model, {2 * 3, 5}, false, 4, 40);
  INFO(rep.worst);
  CHECK(rep.max_rel <= 1e-6);

  int reached = 0;
  model.visit(
      [&](const std::string&, Parameter<B64>& p) { reached += &p == &model.codes.param; }, "");
  CHECK(reached == 3);  // the model and both layers visit it
  {
    ParameterArena<B64> arena(model);
    int codes_entries = 0;
    std::int64_t total = 0;
    for (const auto& e : arena.entries()) {
      codes_entries += e.param == &model.codes.param;
      total += e.numel();
      if (e.param == &model.codes.param) CHECK(e.name == "codes");
    }
    CHECK(codes_entries == 1);
    CHECK(arena.entries().size() == 9);  // codes + 4 per layer
    CHECK(total == 3 * 4 + (30 + 6 + 20 + 1) + (18 + 3 + 24 + 1));
    CHECK(arena.size() == total);
  }
  const hatch_test::TempDir dir("hatch_nac_shared");
  const auto file = dir.path / "model.safetensors";
  save_parameters(model, file);
  const auto st = io::SafeTensorsFile::read(file.string());
  int codes_tensors = 0;
  for (const auto& n : st.names()) codes_tensors += n.ends_with("codes");
  CHECK(codes_tensors == 1);
  CHECK(st.names().size() == 9);
}

TEST_CASE("nac: Kmdpa gradients in evaluation and training (q, k, v, signatures, bandwidth)") {
  LatentSignatures<B64, 4> sig(5);
  KmdpaLayer<B64, 2, 3, 4> layer;
  layer.use_signatures(sig);
  int seen = 0;
  layer.visit([&](const std::string&, Parameter<B64>&) { ++seen; }, "");
  CHECK(seen == 2);
  randomize_kmdpa(layer, 7, 0.8);
  Context probe;
  Tensor<B64> x0({2 * 5, 18});
  x0.zero();
  layer.forward(x0, probe);
  INFO("kept fraction " << layer.kept_fraction());
  CHECK(layer.kept_fraction() < 1.0);  // some pairs are truncated
  CHECK(layer.kept_fraction() > 0.2);
  auto eval = gradcheck(layer, {2 * 5, 18}, false, 3, 60);
  INFO(eval.worst);
  CHECK(eval.max_rel <= 1e-6);
  auto train = gradcheck(layer, {3 * 5, 18}, true, 5, 60);  // the noise is a function of the seed
  INFO(train.worst);
  CHECK(train.max_rel <= 1e-6);
  // Nothing truncated, in both modes (signatures close together).
  randomize_kmdpa(layer, 8, 1.3);
  auto h = sig.param.value.to_host();
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = 0.2 * h[i] + (i % 4 == 0 ? 1.0 : 0.0);
  sig.param.value.from_host(h);
  auto dense = gradcheck(layer, {2 * 5, 18}, true, 6, 60);
  CHECK(layer.kept_fraction() == 1.0);
  INFO(dense.worst);
  CHECK(dense.max_rel <= 1e-6);
}

TEST_CASE("nac: Kmdpa keeps exactly the pairs with d <= tau and matches a dense masked computation (both modes)") {
  constexpr int U = 6, S = 5, H = 2, DH = 4, D = H * DH;
  LatentSignatures<B64, S> sig(U);
  KmdpaLayer<B64, H, DH, S> layer;
  layer.use_signatures(sig);
  for (std::uint64_t seed = 1; seed <= 4; ++seed) {
    randomize_kmdpa(layer, seed, 0.6);
    std::mt19937_64 rng(seed);
    auto x = test::random_tensor<B64>({3 * U, 3 * D}, rng);
    Context ctx;
    const auto o = layer.forward(x, ctx).to_host();
    const auto sh = sig.param.value.to_host();
    // kept_fraction: the share of pairs with d <= tau
    int kept = 0;
    for (int a = 0; a < U; ++a)
      for (int b = 0; b < U; ++b) {
        double ab = 0, aa = 0, bb = 0;
        for (int c = 0; c < S; ++c) {
          ab += sh[a * S + c] * sh[b * S + c];
          aa += sh[a * S + c] * sh[a * S + c];
          bb += sh[b * S + c] * sh[b * S + c];
        }
        kept += 1 - ab / std::sqrt(aa * bb) <= 0.9;
      }
    CHECK(layer.kept_pairs() == kept);
    CHECK(layer.kept_fraction() == doctest::Approx(double(kept) / (U * U)));
    CHECK(layer.row_ptr().back() == kept);
    const auto ref = dense_kmdpa(x.to_host(), sh, 0.6, U, S, H, DH);
    REQUIRE(ref.size() == o.size());
    double err = 0;
    for (std::size_t i = 0; i < o.size(); ++i) err = std::max(err, std::abs(o[i] - ref[i]));
    CHECK(err < 1e-12);
    // training: the same with the relaxed Bernoulli of the documented draws
    Context train;
    train.training = true;
    train.seed = 100 + seed;
    const auto ot = layer.forward(x, train).to_host();
    const auto reft = dense_kmdpa(x.to_host(), sh, 0.6, U, S, H, DH, true, 100 + seed);
    double errt = 0, moved = 0;
    for (std::size_t i = 0; i < ot.size(); ++i) {
      errt = std::max(errt, std::abs(ot[i] - reft[i]));
      moved = std::max(moved, std::abs(ot[i] - o[i]));
    }
    CHECK(errt < 1e-10);
    CHECK(moved > 1e-3);  // the noise does something
  }
}

TEST_CASE("nac: Kmdpa straight-through truncation: a latent cut off from all others gets no signature gradient") {
  // s_2 points away from s_0 and s_1 (d = 2 > tau): latent 2 keeps only its own pair, in both
  // modes. Its output is its own value row, and, truncated pairs passing a zero gradient, its
  // signature's gradient is exactly zero (its self distance is constant), while the others' is not.
  constexpr int U = 3, S = 2, H = 1, DH = 2, D = H * DH;
  LatentSignatures<B64, S> sig(U);
  KmdpaLayer<B64, H, DH, S> layer;
  layer.use_signatures(sig);
  sig.param.value.from_host(std::vector<double>{1.0, 0.2, 0.9, -0.3, -1.0, -0.1}, {U, S});
  std::mt19937_64 rng(5);
  auto x = test::random_tensor<B64>({2 * U, 3 * D}, rng);
  auto dy = test::random_tensor<B64>({2 * U, D}, rng);
  for (bool training : {false, true}) {
    Context ctx;
    ctx.training = training;
    ctx.seed = 77;
    sig.param.zero_grad();
    layer.bandwidth.zero_grad();
    const auto o = layer.forward(x, ctx).to_host();
    CHECK(layer.kept_pairs() == 5);  // (0,0) (0,1) (1,0) (1,1) (2,2)
    const auto xh = x.to_host();
    for (int e = 0; e < 2; ++e)
      for (int c = 0; c < D; ++c) CHECK(o[(e * U + 2) * D + c] == xh[(e * U + 2) * 3 * D + 2 * D + c]);
    layer.backward(dy, ctx);
    const auto g = sig.param.grad.to_host();
    CHECK(std::abs(g[4]) < 1e-12);  // rounding of the self distance 1 - n.n only
    CHECK(std::abs(g[5]) < 1e-12);
    CHECK(std::abs(g[0]) + std::abs(g[1]) > 1e-6);
  }
}

TEST_CASE("nac: Kmdpa training noise depends on the seed only; evaluation uses K as is") {
  LatentSignatures<B64, 4> sig(4);
  KmdpaLayer<B64, 2, 2, 4> layer;
  layer.use_signatures(sig);
  randomize_kmdpa(layer, 3, 1.0);
  std::mt19937_64 rng(1);
  auto x = test::random_tensor<B64>({2 * 4, 12}, rng);
  auto run = [&](bool training, std::uint64_t seed) {
    Context ctx;
    ctx.training = training;
    ctx.seed = seed;
    auto o = layer.forward(x, ctx).to_host();
    if (training) CHECK(ctx.counter == 2 * 4 * 4);
    return o;
  };
  CHECK(run(true, 5) == run(true, 5));
  CHECK(run(true, 5) != run(true, 6));
  CHECK(run(false, 5) == run(false, 6));
  CHECK(run(false, 5) != run(true, 5));
}

TEST_CASE("nac: a steady-state Kmdpa + ModFc step allocates no backend buffer") {
  LatentSignatures<Cpu, 8> sig(6);
  LatentCodes<Cpu, 4> codes(6);
  KmdpaLayer<Cpu, 2, 4, 8> attn;
  ModFcLayer<Cpu, 8, 8, 4> out;
  attn.use_signatures(sig);
  out.use_codes(codes);
  Initializer init(3);
  sig.reset_parameters(init);
  codes.reset_parameters(init);
  attn.reset_parameters(init);
  out.reset_parameters(init);
  std::mt19937_64 rng(1);
  auto x = test::random_tensor<Cpu>({4 * 6, 24}, rng);
  auto dy = test::random_tensor<Cpu>({4 * 6, 8}, rng);
  auto step = [&](std::uint64_t seed) {
    Context ctx;
    ctx.training = true;
    ctx.seed = seed;
    out.forward(attn.forward(x, ctx), ctx);
    attn.backward(out.backward(dy, ctx), ctx);
  };
  for (int i = 0; i < 3; ++i) step(i);
  const auto before = Cpu::allocation_count().load();
  for (int i = 3; i < 6; ++i) step(i);
  CHECK(Cpu::allocation_count().load() == before);
}

TEST_CASE("nac: ModFc and Kmdpa refuse to run without their shared table") {
  ModFcLayer<B64, 3, 2, 2> fc;
  KmdpaLayer<B64, 1, 2, 2> attn;
  Tensor<B64> x({2, 3}), q({2, 6});
  x.zero();
  q.zero();
  Context ctx;
  CHECK_THROWS_WITH_AS(fc.forward(x, ctx), doctest::Contains("use_codes"), Error);
  CHECK_THROWS_WITH_AS(attn.forward(q, ctx), doctest::Contains("use_signatures"), Error);
}

TEST_CASE("nac: sparse attention primitives: a query without pairs gets output 0, a full row is dense softmax") {
  // 3 latents, one example, one head, dh 2: query 0 keeps keys 0..2, queries 1 and 2 none.
  Indices<B64> row_ptr, col;
  row_ptr.from_host({0, 3, 3, 3});
  col.from_host({0, 1, 2});
  const int n = 3;
  std::vector<double> x{0.5, -1.0, 0.2, 0.3, 1.0, 2.0,    // latent 0: q, k, v
                        1.5, 0.5, -0.4, 0.8, -1.0, 0.5,   // latent 1
                        0.0, 0.0, 1.0, -0.7, 3.0, -2.0};  // latent 2
  const std::vector<double> bias{0.1, -0.2, 0.3};
  std::vector<double> probs(3, -1.0), o(n * 2, 9.0);
  B64::sparse_attention_forward(probs.data(), o.data(), 2, x.data(), x.data() + 2, x.data() + 4, 6, row_ptr.data(),
                                col.data(), bias.data(), 0, 1, n, 1, 2, 3, 0.5);
  for (int j = 2; j < 6; ++j) CHECK(o[j] == 0.0);
  double s[3], mx = -1e9, sum = 0;
  for (int v = 0; v < 3; ++v) mx = std::max(mx, s[v] = 0.5 * (x[0] * x[v * 6 + 2] + x[1] * x[v * 6 + 3]) + bias[v]);
  for (int v = 0; v < 3; ++v) sum += std::exp(s[v] - mx);
  double o0 = 0;
  for (int v = 0; v < 3; ++v) {
    CHECK(probs[v] == doctest::Approx(std::exp(s[v] - mx) / sum).epsilon(1e-14));
    o0 += probs[v] * x[v * 6 + 4];
  }
  CHECK(o[0] == doctest::Approx(o0).epsilon(1e-14));
}

// ---- ModFfn ------------------------------------------------------------------------------------

TEST_CASE("nac: ModFfn gradients (input, norm, both ModFc, layer scale, shared codes)") {
  LatentCodes<B64, 3> codes(4);
  ModFfnLayer<B64, 5, 6, 3> layer;
  layer.use_codes(codes);
  std::vector<std::string> names;
  layer.visit([&](const std::string& n, Parameter<B64>&) { names.push_back(n); }, "");
  CHECK(names.size() == 2 + 5 + 5 + 1);
  CHECK(names.back() == "layer_scale.gamma");
  CHECK(names[0] == "norm.weight");
  test::expect_gradients(layer, {2 * 4, 5}, false, 60);
  test::expect_gradients(layer, {3, 4, 5}, true, 60, 9, 5);  // (B, U, D) input
}

TEST_CASE("nac: ModFfn is theta + gamma * ModFc(a * gelu(g)) with [a | g] = ModFc(LN theta); gamma 0.1 at reset") {
  constexpr int U = 3, D = 4, H = 5, C = 2;
  LatentCodes<B64, C> codes(U);
  ModFfnLayer<B64, D, H, C> ffn;
  ffn.use_codes(codes);
  Initializer init(5);
  ffn.reset_parameters(init);
  codes.reset_parameters(init);
  for (double g : ffn.layer_scale.value.to_host()) CHECK(g == doctest::Approx(0.1));
  randomize_parameters(ffn, 13);
  // the same maths from the parts: a separate LayerNorm and two ModFc with the same parameters
  LayerNormLayer<B64, D> norm;
  ModFcLayer<B64, D, 2 * H, C> fc1;
  ModFcLayer<B64, H, D, C> fc2;
  fc1.use_codes(codes);
  fc2.use_codes(codes);
  auto copy_params = [](auto& dst, auto& src) {
    std::vector<Parameter<B64>*> d, s;
    dst.visit([&](const std::string&, Parameter<B64>& p) { d.push_back(&p); }, "");
    src.visit([&](const std::string&, Parameter<B64>& p) { s.push_back(&p); }, "");
    REQUIRE(d.size() == s.size());
    for (std::size_t i = 0; i < d.size(); ++i) d[i]->value.from_host(s[i]->value.to_host(), s[i]->value.shape());
  };
  copy_params(norm, ffn.norm);
  copy_params(fc1, ffn.fc1);
  copy_params(fc2, ffn.fc2);
  std::mt19937_64 rng(3);
  auto x = test::random_tensor<B64>({2 * U, D}, rng);
  Context ctx;
  const auto y = ffn.forward(x, ctx).to_host();
  const auto h = fc1.forward(norm.forward(x, ctx), ctx).to_host();
  std::vector<double> act(std::size_t(2 * U) * H);
  for (int r = 0; r < 2 * U; ++r)
    for (int c = 0; c < H; ++c) {
      const double g = h[r * 2 * H + H + c];
      act[r * H + c] = h[r * 2 * H + c] * 0.5 * g * (1 + std::erf(g / std::sqrt(2.0)));
    }
  Tensor<B64> at;
  at.from_host(act, {2 * U, H});
  const auto f = fc2.forward(at, ctx).to_host();
  const auto xh = x.to_host(), gamma = ffn.layer_scale.value.to_host();
  for (int r = 0; r < 2 * U; ++r)
    for (int c = 0; c < D; ++c) CHECK(y[r * D + c] == doctest::Approx(xh[r * D + c] + gamma[c] * f[r * D + c]).epsilon(1e-12));
}

// ---- signature graph priors ----------------------------------------------------------------------

TEST_CASE("nac: Barabasi-Albert graph: m (m + 1) / 2 + (n - m - 1) m edges, minimum degree m, heavy tail; seeded") {
  const int n = 400, m = 2;
  const auto g = nac::barabasi_albert_graph(n, m, 5);
  CHECK(g.edges() == m * (m + 1) / 2 + (n - m - 1) * m);
  int min_deg = n, max_deg = 0, hubs = 0;
  const double mean = 2.0 * double(g.edges()) / n;
  for (int u = 0; u < n; ++u) {
    min_deg = std::min(min_deg, g.degree(u));
    max_deg = std::max(max_deg, g.degree(u));
    hubs += g.degree(u) >= 3 * mean;
  }
  INFO("mean degree " << mean << ", max " << max_deg << ", hubs " << hubs);
  CHECK(min_deg == m);
  CHECK(max_deg >= 5 * mean);  // an ER graph of this density has max degree about 2.5 mean
  CHECK(hubs >= 3);
  for (int u = 0; u < n; ++u) CHECK(!g.has_edge(u, u));
  CHECK(nac::barabasi_albert_graph(n, m, 5).adjacency == g.adjacency);
  CHECK(nac::barabasi_albert_graph(n, m, 6).adjacency != g.adjacency);
}

TEST_CASE("nac: Erdos-Renyi density is p; planted partition has dense blocks; ring of cliques is exact") {
  const auto er = nac::erdos_renyi_graph(300, 0.1, 2);
  CHECK(er.density() == doctest::Approx(0.1).epsilon(0.08));  // sd 0.0014
  const auto pp = nac::planted_partition_graph(8, 32, 0.9, 0.05, 4);
  std::int64_t in = 0, in_pairs = 0, out = 0, out_pairs = 0;
  for (int u = 0; u < 256; ++u)
    for (int v = u + 1; v < 256; ++v) {
      const bool same = u / 32 == v / 32;
      (same ? in : out) += pp.has_edge(u, v);
      (same ? in_pairs : out_pairs) += 1;
    }
  CHECK(double(in) / in_pairs == doctest::Approx(0.9).epsilon(0.03));
  CHECK(double(out) / out_pairs == doctest::Approx(0.05).epsilon(0.1));
  const auto rc = nac::ring_of_cliques_graph(5, 4);
  CHECK(rc.edges() == 5 * 6 + 5);
  for (int u = 0; u < 20; ++u) CHECK(rc.degree(u) == (u % 4 == 0 || u % 4 == 3 ? 4 : 3));
  CHECK(rc.has_edge(19, 0));
}

TEST_CASE("nac: signatures placed from a graph realise its edges as the Kmdpa kept pairs") {
  constexpr int U = 64, S = 32;
  const std::vector<std::pair<const char*, nac::Graph>> graphs{
      {"scale-free", nac::barabasi_albert_graph(U, 2, 1)},
      {"erdos-renyi", nac::erdos_renyi_graph(U, 0.1, 1)},
      {"planted-partition", nac::planted_partition_graph(8, 8, 0.9, 0.05, 1)},
      {"ring-of-cliques", nac::ring_of_cliques_graph(8, 8)}};
  LatentSignatures<B64, S> sig(U);
  KmdpaLayer<B64, 1, 2, S> attn;
  attn.use_signatures(sig);
  for (const auto& [name, g] : graphs) {
    const auto rep = nac::init_signatures_from_graph(sig, g, 7);
    INFO(std::string(name) << ": edge recall " << rep.edge_recall << ", non-edge separation " << rep.non_edge_separation
              << " after " << rep.iterations << " steps");
    CHECK(rep.edge_recall >= 0.98);
    CHECK(rep.non_edge_separation >= 0.98);
    const auto h = sig.param.value.to_host();
    for (int u = 0; u < U; ++u) {
      double q = 0;
      for (int k = 0; k < S; ++k) q += h[u * S + k] * h[u * S + k];
      CHECK(q == doctest::Approx(1.0));
    }
    // the layer's pair list: the graph's edges that it keeps, and the non-edges it truncates
    Tensor<B64> x({U, 6});
    x.zero();
    Context ctx;
    attn.forward(x, ctx);
    std::int64_t edges_kept = 0, non_edges_cut = 0, non_edges = 0;
    for (int u = 0; u < U; ++u) {
      std::vector<bool> kept(U, false);
      for (int p = attn.row_ptr()[u]; p < attn.row_ptr()[u + 1]; ++p) kept[attn.col()[p]] = true;
      CHECK(kept[u]);
      for (int v = 0; v < U; ++v) {
        if (v == u) continue;
        if (g.has_edge(u, v)) edges_kept += kept[v];
        else {
          ++non_edges;
          non_edges_cut += !kept[v];
        }
      }
    }
    CHECK(double(edges_kept) / (2.0 * g.edges()) == doctest::Approx(rep.edge_recall));
    CHECK(double(non_edges_cut) / non_edges == doctest::Approx(rep.non_edge_separation));
    // deterministic from the seed
    const auto again = sig.param.value.to_host();
    nac::init_signatures_from_graph(sig, g, 7);
    CHECK(sig.param.value.to_host() == again);
  }
}

// ---- signature repulsion -------------------------------------------------------------------------

namespace {
// Signatures around one direction, so that several pairs are closer than the 0.4 margin.
template <int S>
void clustered_signatures(LatentSignatures<B64, S>& sig, std::uint64_t seed, double spread) {
  std::mt19937_64 rng(seed);
  auto t = test::random_tensor<B64>({sig.rows(), S}, rng);
  auto h = t.to_host();
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = spread * h[i] + (i % S == 0 ? 1.0 : 0.0);
  sig.param.value.from_host(h);
}

// Two Kmdpa on one signatures table, summed, and one repulsion for the table: the term counts once.
struct SharedSignatureNet {
  using backend = B64;
  static constexpr int in = 3 * 4, out = 4;
  LatentSignatures<B64, 3> sig{5};
  SignatureRepulsionLayer<B64, 3> repulsion;
  KmdpaLayer<B64, 2, 2, 3> first, second;
  Tensor<B64> y, dx;
  SharedSignatureNet() {
    repulsion.use_signatures(sig);
    first.use_signatures(sig);
    second.use_signatures(sig);
  }
  const Tensor<B64>& forward(const Tensor<B64>& x, Context& ctx) {
    const auto& r = repulsion.forward(x, ctx);
    y.resize({r.rows(), 4});
    B64::add(y.data(), first.forward(r, ctx).data(), second.forward(r, ctx).data(), std::size_t(y.numel()));
    return y;
  }
  const Tensor<B64>& backward(const Tensor<B64>& dy, Context& ctx) {
    const auto& a = backward_inner(first, dy, ctx);
    dx.resize(a.shape());
    B64::copy(dx.data(), a.data(), std::size_t(a.numel()));
    const auto& b = backward_inner(second, dy, ctx);
    B64::add(dx.data(), dx.data(), b.data(), std::size_t(b.numel()));
    return repulsion.backward(dx, ctx);
  }
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    sig.visit(f, prefix + "signatures");
    repulsion.visit(f, prefix + "repulsion.");
    first.visit(f, prefix + "first.");
    second.visit(f, prefix + "second.");
  }
  template <class F>
  void for_each_layer(F&& f) {
    f(repulsion);
    f(first);
    f(second);
  }
};
}  // namespace

TEST_CASE("nac: SignatureRepulsion is 0.1 (-sum_{u<v, d<0.4} d), gradient checked; 0 in evaluation") {
  constexpr int U = 7, S = 4;
  LatentSignatures<B64, S> sig(U);
  SignatureRepulsionLayer<B64, S> rep;
  rep.use_signatures(sig);
  clustered_signatures(sig, 3, 0.5);
  std::mt19937_64 rng(1);
  auto x = test::random_tensor<B64>({2, 9}, rng);
  Context train;
  train.training = true;
  const auto& y = rep.forward(x, train);
  CHECK(&y == &x);  // the input passes through
  const auto h = sig.param.value.to_host();
  double sum = 0;
  int close = 0;
  for (int u = 0; u < U; ++u)
    for (int v = u + 1; v < U; ++v) {
      double ab = 0, aa = 0, bb = 0;
      for (int k = 0; k < S; ++k) {
        ab += h[u * S + k] * h[v * S + k];
        aa += h[u * S + k] * h[u * S + k];
        bb += h[v * S + k] * h[v * S + k];
      }
      const double d = 1 - ab / std::sqrt(aa * bb);
      if (d < 0.4) {
        sum += d;
        ++close;
      }
    }
  INFO(close << " close pairs of " << U * (U - 1) / 2);
  CHECK(close >= 3);
  CHECK(close < U * (U - 1) / 2);
  CHECK(rep.close_pairs() == close);
  CHECK(rep.aux_loss() == doctest::Approx(-0.1 * sum).epsilon(1e-12));
  CHECK(collect_aux_loss(rep) == rep.aux_loss());
  auto g = gradcheck(rep, {2, 9}, true, 4, 40);  // loss includes the auxiliary term
  INFO(g.worst);
  CHECK(g.max_rel <= 1e-6);
  // frozen: no gradient; evaluation: no term
  sig.param.zero_grad();
  Context frozen = train;
  frozen.param_grads = false;
  rep.forward(x, frozen);
  rep.backward(x, frozen);
  for (double v : sig.param.grad.to_host()) CHECK(v == 0.0);
  Context eval;
  rep.forward(x, eval);
  CHECK(rep.aux_loss() == 0.0);
}

TEST_CASE("nac: a signatures table shared by two Kmdpa is repelled once; gradients add up") {
  SharedSignatureNet net;
  randomize_parameters(net, 5);
  net.first.bandwidth.value.fill(0.7);
  net.second.bandwidth.value.fill(1.2);
  clustered_signatures(net.sig, 8, 0.6);
  std::mt19937_64 rng(2);
  auto x = test::random_tensor<B64>({2 * 5, 12}, rng);
  Context ctx;
  ctx.training = true;
  net.forward(x, ctx);
  CHECK(net.repulsion.close_pairs() > 0);
  CHECK(collect_aux_loss(net) == net.repulsion.aux_loss());
  CHECK(net.repulsion.aux_loss() < 0);
  auto g = gradcheck(net, {2 * 5, 12}, true, 6, 60);
  INFO(g.worst);
  CHECK(g.max_rel <= 1e-6);
  ParameterArena<B64> arena(net);
  CHECK(arena.entries().size() == 3);  // signatures once, two bandwidths
}

// ---- latent seeder -------------------------------------------------------------------------------

TEST_CASE("nac: LatentSeeder gradients (norm, mean, log_var, codes) in training and evaluation") {
  LatentCodes<B64, 4> codes(3);
  LatentSeederLayer<B64, 5, 4> seeder;
  seeder.use_codes(codes);
  int seen = 0;
  seeder.visit([&](const std::string&, Parameter<B64>&) { ++seen; }, "");
  CHECK(seen == 7);
  test::expect_gradients(seeder, {2, 6}, true, 40);   // noise fixed by the seed
  test::expect_gradients(seeder, {3, 6}, false, 40);  // the mean only
}

TEST_CASE("nac: LatentSeeder draws mean + exp(log_var / 2) z, z standard normal from the seed; evaluation is the mean") {
  constexpr int U = 4, D = 8, C = 3, NB = 500;
  LatentCodes<B64, C> codes(U);
  LatentSeederLayer<B64, D, C> seeder;
  seeder.use_codes(codes);
  Initializer init(2);
  codes.reset_parameters(init);
  seeder.reset_parameters(init);
  for (double b : seeder.log_var.bias.value.to_host()) CHECK(b == -5.0);
  // std = exp(0.5 * 0.8) everywhere: zero log_var weights, bias 0.8
  seeder.log_var.weight.value.zero();
  seeder.log_var.bias.value.fill(0.8);
  Tensor<B64> x({NB, 2});
  x.zero();
  Context eval;
  const auto mu = seeder.forward(x, eval).to_host();
  CHECK(mu.size() == std::size_t(NB) * U * D);
  bool same = true;
  for (int b = 1; b < NB; ++b)
    for (int i = 0; i < U * D; ++i) same = same && mu[b * U * D + i] == mu[i];
  CHECK(same);
  Context train;
  train.training = true;
  train.seed = 9;
  const auto y = seeder.forward(x, train).to_host();
  CHECK(train.counter == 2ull * NB * U * D);
  const double sd = std::exp(0.4);
  double m1 = 0, m2 = 0;
  for (std::size_t i = 0; i < y.size(); ++i) {
    const double z = (y[i] - mu[i]) / sd;
    m1 += z / y.size();
    m2 += z * z / y.size();
  }
  CHECK(std::abs(m1) < 0.03);  // 16000 draws: sd of the mean 0.008
  CHECK(m2 == doctest::Approx(1.0).epsilon(0.05));
  // entry i is normal01(seed, 2 i)
  CHECK((y[5] - mu[5]) / sd == doctest::Approx(nac_detail::normal01(9, 10)).epsilon(1e-12));
  Context again = train;
  again.counter = 0;
  CHECK(seeder.forward(x, again).to_host() == y);
}

// ---- output pooling ------------------------------------------------------------------------------

TEST_CASE("nac: OutputPooling gradients (input, score, classifier) in evaluation and training") {
  OutputPoolingLayer<B64, 4, 5, 3> pool;
  test::expect_gradients(pool, {2 * 4, 5}, false, 40);
  test::expect_gradients(pool, {3, 4, 5}, true, 40, 8, 4);
}

TEST_CASE("nac: OutputPooling is softmax((s + gumbel) / 1)-weighted latents then a Linear; evaluation without noise") {
  constexpr int U = 3, D = 4, K = 2, NB = 2;
  OutputPoolingLayer<B64, U, D, K> pool;
  randomize_parameters(pool, 3);
  std::mt19937_64 rng(4);
  auto x = test::random_tensor<B64>({NB * U, D}, rng);
  const auto xh = x.to_host(), sw = pool.score.weight.value.to_host(),
             cw = pool.classifier.weight.value.to_host(), cb = pool.classifier.bias.value.to_host();
  for (bool training : {false, true}) {
    Context ctx;
    ctx.training = training;
    ctx.seed = 21;
    const auto y = pool.forward(x, ctx).to_host();
    REQUIRE(y.size() == std::size_t(NB * K));
    CHECK(ctx.counter == (training ? std::uint64_t(NB * U) : 0));
    for (int b = 0; b < NB; ++b) {
      double z[U], mx = -1e300, sum = 0;
      for (int u = 0; u < U; ++u) {
        z[u] = 0;
        for (int c = 0; c < D; ++c) z[u] += sw[c] * xh[(b * U + u) * D + c];
        if (training) z[u] += -std::log(-std::log(uniform01(21, b * U + u) + std::ldexp(1.0, -54)));
        mx = std::max(mx, z[u]);
      }
      for (int u = 0; u < U; ++u) sum += std::exp(z[u] - mx);
      double pooled[D] = {};
      for (int u = 0; u < U; ++u)
        for (int c = 0; c < D; ++c) pooled[c] += std::exp(z[u] - mx) / sum * xh[(b * U + u) * D + c];
      for (int k = 0; k < K; ++k) {
        double o = cb[k];
        for (int c = 0; c < D; ++c) o += cw[k * D + c] * pooled[c];
        CHECK(y[b * K + k] == doctest::Approx(o).epsilon(1e-12));
      }
    }
  }
}

// ---- Kmdpa over a rectangular pair list --------------------------------------------------------

TEST_CASE("nac: Kmdpa with a rectangular pair list (queries from one latent range, keys from another)") {
  constexpr int U = 7, S = 3, H = 2, DH = 2, D = H * DH, NB = 2;
  LatentSignatures<B64, S> sig(U);
  KmdpaLayer<B64, H, DH, S> layer;
  layer.use_signatures(sig);
  struct Case {
    int q0, q1, k0, k1;
  };
  // mediators [3, 7) attending to inputs and mediators; outputs [5, 7) reading mediators [2, 5)
  for (const Case c : {Case{3, 7, 0, 7}, Case{5, 7, 2, 5}, Case{0, 3, 0, 7}}) {
    CAPTURE(c.q0);
    CAPTURE(c.k0);
    layer.restrict_pairs(c.q0, c.q1 == U ? -1 : c.q1, c.k0, c.k1 == U ? -1 : c.k1);
    randomize_kmdpa(layer, 5, 0.7);
    const int uq = c.q1 - c.q0;
    std::mt19937_64 rng(6);
    auto x = test::random_tensor<B64>({NB * U, 3 * D}, rng);
    const auto xh = x.to_host(), sh = sig.param.value.to_host();
    for (bool training : {false, true}) {
      Context ctx;
      ctx.training = training;
      ctx.seed = 31;
      const auto y = layer.forward(x, ctx).to_host();
      REQUIRE(y.size() == std::size_t(NB) * uq * D);
      // dense reference over the rectangle, truncated pairs masked
      int kept = 0;
      double err = 0;
      for (int e = 0; e < NB; ++e)
        for (int a = c.q0; a < c.q1; ++a)
          for (int h = 0; h < H; ++h) {
            std::vector<double> w(U, 0.0);
            std::vector<bool> in(U, false);
            double mx = -1e300;
            for (int b = c.k0; b < c.k1; ++b) {
              double ab = 0, aa = 0, bb = 0;
              for (int k = 0; k < S; ++k) {
                ab += sh[a * S + k] * sh[b * S + k];
                aa += sh[a * S + k] * sh[a * S + k];
                bb += sh[b * S + k] * sh[b * S + k];
              }
              const double d = 1 - ab / std::sqrt(aa * bb);
              if (d > 0.9) continue;
              in[b] = true;
              kept += e == 0 && h == 0;
              double qk = 0;
              for (int k = 0; k < DH; ++k) qk += xh[(e * U + a) * 3 * D + h * DH + k] * xh[(e * U + b) * 3 * D + D + h * DH + k];
              const double logk = training ? relaxed_log_kernel(d, 0.7, 31, std::uint64_t((e * U + a) * U + b)) : -d / 0.7;
              w[b] = qk / std::sqrt(double(DH)) + logk;
              mx = std::max(mx, w[b]);
            }
            double sum = 0;
            for (int b = 0; b < U; ++b) sum += in[b] ? std::exp(w[b] - mx) : 0.0;
            for (int k = 0; k < DH; ++k) {
              double o = 0;
              for (int b = 0; b < U; ++b)
                if (in[b]) o += std::exp(w[b] - mx) / sum * xh[(e * U + b) * 3 * D + 2 * D + h * DH + k];
              err = std::max(err, std::abs(o - y[(e * uq + a - c.q0) * D + h * DH + k]));
            }
          }
      CHECK(err < 1e-10);
      CHECK(layer.kept_pairs() == kept);
      CHECK(layer.kept_fraction() == doctest::Approx(double(kept) / (uq * (c.k1 - c.k0))));
      for (int u = 0; u < U; ++u)
        if (u < c.q0 || u >= c.q1) CHECK(layer.row_ptr()[u + 1] == layer.row_ptr()[u]);
      for (int col : layer.col()) CHECK((col >= c.k0 && col < c.k1));
    }
    auto ev = gradcheck(layer, {NB * U, 3 * D}, false, 3, 60);
    INFO(ev.worst);
    CHECK(ev.max_rel <= 1e-6);
    auto tr = gradcheck(layer, {NB, U, 3 * D}, true, 4, 60);  // (B, U, 3D) in, (B, Uq, D) out
    INFO(tr.worst);
    CHECK(tr.max_rel <= 1e-6);
  }
  layer.restrict_pairs(0, U + 1, 0, -1);
  Tensor<B64> x({U, 3 * D});
  x.zero();
  Context ctx;
  CHECK_THROWS_AS(layer.forward(x, ctx), Error);
}

TEST_CASE("nac: a steady-state step of the new layers (seeder, rectangular Kmdpa, ModFfn, repulsion, pooling) allocates no backend buffer") {
  constexpr int U = 6, C = 4, S = 8, D = 8;
  LatentCodes<Cpu, C> codes(U);
  LatentSignatures<Cpu, S> sig(U);
  LatentSeederLayer<Cpu, 3 * D, C> seeder;
  KmdpaLayer<Cpu, 2, 4, S> attn;
  ModFfnLayer<Cpu, D, 16, C> ffn;
  SignatureRepulsionLayer<Cpu, S> repulsion;
  OutputPoolingLayer<Cpu, 4, D, 5> pool;
  seeder.use_codes(codes);
  ffn.use_codes(codes);
  attn.use_signatures(sig);
  attn.restrict_pairs(2, -1, 0, -1);  // 4 query latents
  repulsion.use_signatures(sig);
  Initializer init(3);
  codes.reset_parameters(init);
  sig.reset_parameters(init);
  seeder.reset_parameters(init);
  attn.reset_parameters(init);
  ffn.reset_parameters(init);
  pool.reset_parameters(init);
  Tensor<Cpu> x({3, 2});
  x.zero();
  std::mt19937_64 rng(1);
  auto dy = test::random_tensor<Cpu>({3, 5}, rng);
  auto step = [&](std::uint64_t seed) {
    Context ctx;
    ctx.training = true;
    ctx.seed = seed;
    pool.forward(ffn.forward(attn.forward(repulsion.forward(seeder.forward(x, ctx), ctx), ctx), ctx), ctx);
    seeder.backward(repulsion.backward(attn.backward(ffn.backward(pool.backward(dy, ctx), ctx), ctx), ctx), ctx);
  };
  for (int i = 0; i < 3; ++i) step(i);
  const auto before = Cpu::allocation_count().load();
  for (int i = 3; i < 6; ++i) step(i);
  CHECK(Cpu::allocation_count().load() == before);
}

// ---- Blocks (layers/nac_blocks.hpp) and the model (models/nac.hpp) ----------------------------
namespace {
// A block with the tables it reads, owned here (visited first), as the model does.
template <class L, int CodeDim, int SigDim>
struct WithTables {
  using backend = typename L::backend;
  static constexpr int in = L::in, out = L::out;
  LatentCodes<backend, CodeDim> codes;
  LatentSignatures<backend, SigDim> sig;
  L layer;
  explicit WithTables(int u) : codes(u), sig(u) {
    if constexpr (requires { layer.use_codes(codes); }) layer.use_codes(codes);
    if constexpr (requires { layer.use_signatures(sig); }) layer.use_signatures(sig);
  }
  const Tensor<backend>& forward(const Tensor<backend>& x, Context& ctx) { return layer.forward(x, ctx); }
  const Tensor<backend>& backward(const Tensor<backend>& dy, Context& ctx) { return layer.backward(dy, ctx); }
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    codes.visit(f, prefix + "codes");
    sig.visit(f, prefix + "signatures");
    layer.visit(f, prefix + "layer.");
  }
  template <class F>
  void for_each_layer(F&& f) {
    layer.for_each_layer(f);
  }
};
}  // namespace

TEST_CASE("nac: PositionGrid gradients") {
  PositionGridLayer<B64, 3, 4> grid;
  test::expect_gradients(grid, {2, 3, 4}, false, 30);
}

TEST_CASE("nac: NacPropagator gradients (evaluation and training; codes, signatures, bandwidth)") {
  WithTables<NacPropagatorLayer<B64, 6, 2, 5, 3, 4>, 3, 4> net(5);
  for (std::uint64_t seed : {3, 4}) {
    randomize_parameters(net, seed);
    net.layer.attn.bandwidth.value.fill(0.8);
    auto ev = gradcheck(net, {2 * 5, 6}, false, 3, 60);
    INFO(ev.worst);
    CHECK(ev.max_rel <= 1e-6);
    auto tr = gradcheck(net, {2, 5, 6}, true, 5, 60);  // (B, U, D) input too
    INFO(tr.worst);
    CHECK(tr.max_rel <= 1e-6);
  }
  CHECK(net.layer.take_kept_fraction() > 0);
  CHECK(net.layer.take_kept_fraction() == 0);  // taken
}

TEST_CASE("nac: NacPropagator with receiving latents [1, 4) of 5: gradients; the other latents pass unchanged") {
  constexpr int U = 5;
  WithTables<NacPropagatorLayer<B64, 6, 2, 5, 3, 4, 1, 4>, 3, 4> net(U);
  randomize_parameters(net, 6);
  net.layer.attn.bandwidth.value.fill(0.8);
  auto ev = gradcheck(net, {2 * U, 6}, false, 3, 60);
  INFO(ev.worst);
  CHECK(ev.max_rel <= 1e-6);
  auto tr = gradcheck(net, {2, U, 6}, true, 5, 60);
  INFO(tr.worst);
  CHECK(tr.max_rel <= 1e-6);
  std::mt19937_64 rng(2);
  auto x = test::random_tensor<B64>({2 * U, 6}, rng);
  Context ctx;
  ctx.training = true;
  const auto y = net.forward(x, ctx).to_host();
  const auto xh = x.to_host();
  for (int b = 0; b < 2; ++b)
    for (int u : {0, 4})
      for (int c = 0; c < 6; ++c) CHECK(y[(b * U + u) * 6 + c] == xh[(b * U + u) * 6 + c]);
  // the pair list: queries 1..3 only, keys below 4
  const auto& rp = net.layer.attn.row_ptr();
  const auto& col = net.layer.attn.col();
  CHECK(rp[1] == 0);
  CHECK(rp[5] == rp[4]);
  for (int p = 0; p < rp[U]; ++p) CHECK(col[p] < 4);
}

TEST_CASE("nac: ModFc on a latent range of the table (use_rows): gradients reach those codes only") {
  WithTables<ModFcLayer<B64, 5, 4, 3>, 3, 2> net(6);
  net.layer.use_rows(2, 5);
  randomize_parameters(net, 8);
  auto rep = gradcheck(net, {2 * 3, 5}, false, 3, 60);
  INFO(rep.worst);
  CHECK(rep.max_rel <= 1e-6);
  net.codes.param.grad.zero();
  std::mt19937_64 rng(1);
  auto x = test::random_tensor<B64>({2 * 3, 5}, rng);
  auto dy = test::random_tensor<B64>({2 * 3, 4}, rng);
  Context ctx;
  net.forward(x, ctx);
  net.backward(dy, ctx);
  const auto g = net.codes.param.grad.to_host();
  for (int u = 0; u < 6; ++u) {
    double m = 0;
    for (int c = 0; c < 3; ++c) m = std::max(m, std::abs(g[u * 3 + c]));
    if (u >= 2 && u < 5) CHECK(m > 0);
    else CHECK(m == 0);
  }
}

TEST_CASE("nac: NacReadIn gradients (tokens, seeder, norms, q, k, v, codes)") {
  WithTables<NacReadInLayer<B64, 3, 6, 3, 4>, 4, 2> net(5);
  randomize_parameters(net, 9);
  auto ev = gradcheck(net, {2, 3, 6}, false, 3, 60);
  INFO(ev.worst);
  CHECK(ev.max_rel <= 1e-6);
  auto tr = gradcheck(net, {2, 3, 6}, true, 4, 60);
  INFO(tr.worst);
  CHECK(tr.max_rel <= 1e-6);
}

TEST_CASE("nac: NacReadIn is dense attention of the input latents over per-latent ModFC keys and values") {
  constexpr int N = 3, D = 4, U = 3, UIn = 2, NB = 2, C = 3;
  WithTables<NacReadInLayer<B64, N, D, UIn, C>, C, 2> net(U);
  randomize_parameters(net, 12);
  std::mt19937_64 rng(1);
  Tensor<B64> x = test::random_tensor<B64>({NB, N, D}, rng);
  Context ctx;
  const auto y = net.forward(x, ctx).to_host();
  auto& L = net.layer;
  // written out: theta0 (the seeder's mean), t = LN tokens, q = ModFc_q(LN theta0),
  // k_un = W_k (t_n * g_u) + b (b = 0: it cancels), g_u = 1 + a LN(W_ck c_u), v by running ModFc_v
  const auto th = L.seeder.forward(x, ctx).to_host();
  const auto t = L.token_norm.forward(x, ctx).to_host();
  const auto q = L.q.forward(L.latent_norm.forward(L.seeder.forward(x, ctx), ctx), ctx).to_host();
  const auto wk = L.k_weight.value.to_host(), wc = L.k_code_proj.value.to_host(), codes = net.codes.param.value.to_host();
  const double a = L.k_scale.value.to_host()[0];
  std::vector<double> g(U * D);
  for (int u = 0; u < U; ++u) {
    std::vector<double> m(D);
    double mean = 0, var = 0;
    for (int i = 0; i < D; ++i) {
      m[i] = 0;
      for (int c = 0; c < C; ++c) m[i] += wc[i * C + c] * codes[u * C + c];
      mean += m[i] / D;
    }
    for (int i = 0; i < D; ++i) var += (m[i] - mean) * (m[i] - mean) / D;
    for (int i = 0; i < D; ++i) g[u * D + i] = 1 + a * (m[i] - mean) / std::sqrt(var + 1e-5);
  }
  Tensor<B64> one({U, D});
  for (int b = 0; b < NB; ++b)
    for (int u = 0; u < U; ++u) {
      if (u >= UIn) {  // not an input latent: theta0 as is
        for (int c = 0; c < D; ++c) CHECK(y[(b * U + u) * D + c] == th[(b * U + u) * D + c]);
        continue;
      }
      std::vector<double> s(N);
      double mx = -1e300, sum = 0;
      for (int n = 0; n < N; ++n) {
        s[n] = 0;
        for (int i = 0; i < D; ++i) {
          double k = 0;
          for (int j = 0; j < D; ++j) k += wk[i * D + j] * t[(b * N + n) * D + j] * g[u * D + j];
          s[n] += q[(b * U + u) * D + i] * k;
        }
        s[n] /= std::sqrt(double(D));
        mx = std::max(mx, s[n]);
      }
      for (auto& e : s) sum += (e = std::exp(e - mx));
      std::vector<double> o(D, 0.0);
      for (int n = 0; n < N; ++n) {
        std::vector<double> rows(std::size_t(U) * D);
        for (int w = 0; w < U; ++w)
          for (int c = 0; c < D; ++c) rows[w * D + c] = t[(b * N + n) * D + c];
        one.from_host(rows);
        const auto vn = L.v.forward(one, ctx).to_host();  // row u: ModFC_v,u(t_n)
        for (int c = 0; c < D; ++c) o[c] += s[n] / sum * vn[u * D + c];
      }
      for (int c = 0; c < D; ++c)
        CHECK(y[(b * U + u) * D + c] == doctest::Approx(th[(b * U + u) * D + c] + o[c]).epsilon(1e-10));
    }
}

TEST_CASE("nac: NacReadOut gradients; output latents read from mediators and themselves") {
  constexpr int U = 7, UIn = 2, UOut = 2;
  WithTables<NacReadOutLayer<B64, 4, 2, UIn, UOut, 3, 4>, 3, 4> net(U);
  randomize_parameters(net, 5);
  net.layer.attn.bandwidth.value.fill(0.7);
  auto ev = gradcheck(net, {2 * U, 4}, false, 3, 60);
  INFO(ev.worst);
  CHECK(ev.max_rel <= 1e-6);
  auto tr = gradcheck(net, {2 * U, 4}, true, 4, 60);
  INFO(tr.worst);
  CHECK(tr.max_rel <= 1e-6);
  // the pair list: queries are the last UOut latents only, keys never input latents
  const auto& rp = net.layer.attn.row_ptr();
  const auto& col = net.layer.attn.col();
  for (int u = 0; u < U; ++u) {
    if (u < U - UOut) CHECK(rp[u + 1] == rp[u]);
    for (int p = rp[u]; p < rp[u + 1]; ++p) CHECK(col[p] >= UIn);
  }
}

namespace {
inline constexpr NacSpec tiny_nac{.image = 4, .channels = 1, .patch = 2, .dim = 4, .heads = 2, .ffn_hidden = 3,
                                  .code_dim = 3, .sig_dim = 4, .inputs = 2, .mediators = 3, .outputs = 2,
                                  .classes = 3, .rounds = 2, .graph_m = 1};
using TinyNac = Nac<tiny_nac>;
}  // namespace

TEST_CASE("nac: the Nac model: 4 stages, tables wired and stored once, gradients end to end") {
  static_assert(TinyNac::num_stages == 4);
  Model<TinyNac, B64> model;
  Initializer init(3);
  model.reset_parameters(init);
  int codes_seen = 0, sig_seen = 0;
  std::vector<std::string> names;
  model.visit(
      [&](const std::string& n, Parameter<B64>& p) {
        codes_seen += &p == &model.codes.param;
        sig_seen += &p == &model.signatures.param;
        names.push_back(n);
      },
      "");
  CHECK(names[0] == "latents.codes");
  CHECK(names[1] == "latents.signatures");
  CHECK(codes_seen > 2);
  CHECK(sig_seen == 1 + 2 + 1 + 1);  // the model, two propagators, the read-out, the repulsion
  // a forward after reset: (B, classes)
  {
    std::mt19937_64 rng(2);
    Tensor<B64> x = test::random_tensor<B64>({3, 1, 4, 4}, rng);
    Context ctx;
    ctx.training = true;
    const auto& y = model.forward(x, ctx);
    CHECK(y.dim(0) == 3);
    CHECK(y.cols() == 3);
    CHECK(collect_aux_loss(model) <= 0);
  }
  // finite differences, every parameter and the image, both modes
  randomize_parameters(model, 21);
  model.for_each_layer([](auto& l) {
    if constexpr (requires { l.attn.bandwidth; }) l.attn.bandwidth.value.fill(0.9);
  });
  auto ev = gradcheck(model, {2, 1, 4, 4}, false, 3, 80);
  INFO(ev.worst);
  CHECK(ev.max_rel <= 1e-6);
  auto tr = gradcheck(model, {2, 1, 4, 4}, true, 4, 80);
  INFO(tr.worst);
  CHECK(tr.max_rel <= 1e-6);

  // save / load: each table once, under the model's name; a round trip restores every value
  const hatch_test::TempDir dir("hatch_nac_model");
  const auto file = dir.path / "model.safetensors";
  save_parameters(model, file);
  const auto st = io::SafeTensorsFile::read(file.string());
  int codes_tensors = 0, sig_tensors = 0;
  for (const auto& n : st.names()) {
    codes_tensors += n.ends_with("codes");
    sig_tensors += n.ends_with("signatures");
  }
  CHECK(codes_tensors == 1);
  CHECK(sig_tensors == 1);
  auto loaded = std::make_unique<Model<TinyNac, B64>>();
  load_parameters(*loaded, file.string());
  CHECK(loaded->codes.param.value.to_host() == model.codes.param.value.to_host());
  CHECK(loaded->signatures.param.value.to_host() == model.signatures.param.value.to_host());
  std::mt19937_64 rng(5);
  Tensor<B64> x = test::random_tensor<B64>({2, 1, 4, 4}, rng);
  Context ctx;
  const auto a = model.forward(x, ctx).to_host();
  const auto b = loaded->forward(x, ctx).to_host();
  CHECK(a == b);
}

TEST_CASE("nac: the Nac model on Cpu agrees with Cpu64 and a steady-state training step allocates no backend buffer") {
  Model<TinyNac, B64> ref;
  Model<TinyNac, Cpu> model;
  Initializer init(4);
  ref.reset_parameters(init);
  std::vector<std::vector<double>> values;
  ref.visit([&](const std::string&, Parameter<B64>& p) { values.push_back(p.value.to_host()); }, "");
  std::size_t i = 0;
  model.visit(
      [&](const std::string&, Parameter<Cpu>& p) {
        const auto& v = values[i++];
        p.value.from_host(std::vector<float>(v.begin(), v.end()));
      },
      "");
  std::mt19937_64 rng(3);
  auto x64 = test::random_tensor<B64>({3, 1, 4, 4}, rng);
  const auto xh = x64.to_host();
  Tensor<Cpu> x({3, 1, 4, 4});
  x.from_host(std::vector<float>(xh.begin(), xh.end()));
  for (bool training : {false, true}) {
    Context c64, c32;
    c64.training = c32.training = training;
    c64.seed = c32.seed = 9;
    const auto a = ref.forward(x64, c64).to_host();
    const auto b = model.forward(x, c32).to_host();
    REQUIRE(a.size() == b.size());
    for (std::size_t k = 0; k < a.size(); ++k) CHECK(b[k] == doctest::Approx(a[k]).epsilon(1e-4));
  }
  auto dy = test::random_tensor<Cpu>({3, 3}, rng);
  auto step = [&](std::uint64_t seed) {
    Context ctx;
    ctx.training = true;
    ctx.seed = seed;
    model.forward(x, ctx);
    model.backward(dy, ctx);
  };
  for (int s = 0; s < 3; ++s) step(s);
  const auto before = Cpu::allocation_count().load();
  for (int s = 3; s < 6; ++s) step(s);
  CHECK(Cpu::allocation_count().load() == before);
}

TEST_CASE("nac: the model's graph prior makes the mediators the hubs: output latents have mediator keys") {
  using L = Model<presets::NacSmall, Cpu>;
  const auto& S = presets::nac_small;
  for (std::uint64_t seed : {1, 2, 3}) {
    const nac::Graph g = L::prior_graph(seed);
    CHECK(g.edges() == nac::barabasi_albert_graph(S.latents(), S.graph_m, seed).edges());
    int best = 0;
    for (int u = 1; u < g.n; ++u) best = g.degree(u) > g.degree(best) ? u : best;
    CHECK(best >= S.inputs);  // the largest hub is a mediator
    CHECK(best < S.inputs + S.mediators);
    int outputs_reached = 0, inputs_reached = 0;
    for (int u = 0; u < g.n; ++u) {
      const bool output = u >= S.inputs + S.mediators, input = u < S.inputs;
      if (!output && !input) continue;
      bool any = false;
      for (int v = S.inputs; v < S.inputs + S.mediators; ++v) any = any || g.has_edge(u, v);
      (output ? outputs_reached : inputs_reached) += any;
    }
    INFO("seed " << seed << ": outputs with a mediator neighbour " << outputs_reached << ", inputs " << inputs_reached);
    CHECK(outputs_reached >= S.outputs * 3 / 4);
    CHECK(inputs_reached >= S.inputs * 3 / 4);
  }
}
