// The flat parameter arena (core/arena.hpp): layout (every parameter a bound view, segments in
// order, no overlaps, sizes sum), shared parameters laid out once, AdamW and SGD over the arena
// bitwise equal to the per-parameter reference, zero-grad and clipping, checkpoints unchanged,
// and the model's own buffers back when the arena goes.
#include <filesystem>
#include <fstream>
#include <hatch/io/safetensors.hpp>
#include <iterator>
#include <random>


#include "support.hpp"
#include "files.hpp"

using namespace hatch;
using test::error_message;
namespace fs = std::filesystem;

namespace {
using Micro = Model<presets::VitMicro, Cpu>;

using hatch_test::TempDir;

template <class M>
Parameter<Cpu>& param(M& model, const std::string& name) {
  Parameter<Cpu>* out = nullptr;
  model.visit([&](const std::string& n, Parameter<Cpu>& p) { if (n == name) out = &p; }, "");
  REQUIRE(out != nullptr);
  return *out;
}
// Freezes the patch embedding: a third (frozen) segment.
template <class M>
void freeze_embedding(M& model) {
  model.visit([&](const std::string& n, Parameter<Cpu>& p) { if (n.starts_with("patch_embed.")) p.trainable = false; }, "");
}

template <class M>
std::vector<float> all_values(M& model) {
  std::vector<float> out;
  model.visit([&](const std::string&, Parameter<Cpu>& p) {
    const auto h = p.value.to_host();
    out.insert(out.end(), h.begin(), h.end());
  }, "");
  return out;
}

// Random gradients for every parameter (a fixed function of the seed and visit order).
template <class M>
void fill_grads(M& model, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  model.visit([&](const std::string&, Parameter<Cpu>& p) {
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<float> g(std::size_t(p.grad.numel()));
    for (auto& v : g) v = nd(rng);
    p.grad.from_host(g);
  }, "");
}

// The per-parameter AdamW that the arena must reproduce bitwise: one adamw_update per parameter,
// as hatch did before the arena.
struct ReferenceAdamW {
  struct Slot {
    Parameter<Cpu>* p;
    Tensor<Cpu> m, v;
  };
  std::vector<Slot> slots;
  AdamWOptions o;
  std::int64_t t = 0;
  template <class M>
  ReferenceAdamW(M& model, AdamWOptions opt) : o(opt) {
    model.visit([&](const std::string&, Parameter<Cpu>& p) {
      if (!p.trainable) return;
      Slot s{&p, Tensor<Cpu>(p.value.shape()), Tensor<Cpu>(p.value.shape())};
      s.m.zero();
      s.v.zero();
      slots.push_back(std::move(s));
    }, "");
  }
  void step(double lr) {
    ++t;
    const float bc1 = float(1 - std::pow(o.beta1, double(t))), bc2 = float(1 - std::pow(o.beta2, double(t)));
    for (auto& s : slots)
      Cpu::adamw_update(s.p->value.data(), s.m.data(), s.v.data(), s.p->grad.data(), s.p->value.numel(), float(lr),
                        float(o.beta1), float(o.beta2), float(o.eps), float(s.p->decay ? o.weight_decay : 0), bc1, bc2);
  }
};

// A layer of one's own that uses one parameter twice (tied weights): visit shows it twice.
struct Tied {
  using backend = Cpu;
  Parameter<Cpu> w{{3, 2}, true}, b{{2}, false};
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "a.weight", w);
    f(prefix + "b.weight", w);
    f(prefix + "bias", b);
  }
};
}  // namespace

TEST_CASE("arena: every parameter is a bound view, decayed then not decayed then frozen, no gaps or overlaps") {
  Micro m;
  Initializer init(5);
  m.reset_parameters(init);
  freeze_embedding(m);
  fill_grads(m, 3);
  const auto before = all_values(m);
  std::vector<std::vector<float>> grads_before;
  m.visit([&](const std::string&, Parameter<Cpu>& p) { grads_before.push_back(p.grad.to_host()); }, "");

  ParameterArena<Cpu> arena(m);
  std::int64_t expect = 0, count = 0, frozen = 0;
  int last_segment = 0;
  for (const auto& e : arena.entries()) {
    CHECK(e.offset == expect);  // contiguous, in segment order: no overlaps, no gaps
    expect += e.numel();
    const int segment = !e.trainable ? 2 : e.decay ? 0 : 1;
    CHECK(segment >= last_segment);
    last_segment = segment;
    CHECK(e.param->value.is_bound());
    CHECK(e.param->grad.is_bound());
    CHECK(e.param->value.data() == arena.values().data() + e.offset);
    CHECK(e.param->grad.data() == arena.grads().data() + e.offset);
    CHECK(e.param->value.shape() == e.shape);
    if (!e.trainable) frozen += e.numel();
  }
  m.visit([&](const std::string&, Parameter<Cpu>&) { ++count; }, "");
  CHECK(std::int64_t(arena.entries().size()) == count);
  CHECK(expect == arena.size());
  CHECK(arena.values().numel() == arena.size());
  CHECK(arena.size() - arena.trainable_end() == frozen);
  CHECK(frozen > 0);
  CHECK(arena.decay_end() > 0);
  CHECK(arena.trainable_end() > arena.decay_end());
  // values and gradients were copied in; names and visit order unchanged
  CHECK(all_values(m) == before);
  std::size_t i = 0;
  m.visit([&](const std::string&, Parameter<Cpu>& p) { CHECK(p.grad.to_host() == grads_before[i++]); }, "");

  // writes through a parameter (a checkpoint load, a re-initialisation) stay in the arena
  auto& w = param(m, "patch_embed.proj.weight");
  const float* slot = w.value.data();
  std::vector<float> ones(std::size_t(w.value.numel()), 1.f);
  w.value.from_host(ones);
  CHECK(w.value.data() == slot);
  w.value = Tensor<Cpu>(w.value.shape());
  CHECK(w.value.data() == slot);
  CHECK(error_message([&] { w.value.resize({1}); }).find("parameter arena") != std::string::npos);

  SUBCASE("a parameter cannot be in two arenas") {
    CHECK(error_message([&] { ParameterArena<Cpu> second(m); }).find("another arena") != std::string::npos);
  }
}

TEST_CASE("arena: the model gets its own buffers back, with the trained values") {
  Micro m;
  Initializer init(2);
  m.reset_parameters(init);
  std::vector<float> inside;
  {
    ParameterArena<Cpu> arena(trainable_parameters(m));
    fill_grads(m, 1);
    AdamW<Cpu> opt(arena);
    opt.step(1e-2);
    inside = all_values(m);
  }
  CHECK(all_values(m) == inside);
  m.visit([&](const std::string&, Parameter<Cpu>& p) {
    CHECK_FALSE(p.value.is_view());
    CHECK_FALSE(p.grad.is_view());
  }, "");
}

TEST_CASE("arena: a parameter used twice gets one slice and one update") {
  Tied t;
  t.w.value.fill(1.f);
  ParameterArena<Cpu> arena(t);
  REQUIRE(arena.entries().size() == 2);
  CHECK(arena.entries()[0].name == "a.weight");  // the first name visit gives it
  CHECK(arena.size() == 6 + 2);
  t.w.grad.fill(1.f);
  Sgd<Cpu> sgd(arena, 0.0);
  sgd.step(0.5);
  const auto w = t.w.value.to_host();
  for (auto v : w) CHECK(v == 0.5f);  // stepped once, not twice
  std::vector<std::string> names;
  sgd.visit_state([&](const std::string& n, Tensor<Cpu>&) { names.push_back(n); });
  CHECK(names == std::vector<std::string>{"momentum.a.weight", "momentum.bias"});
}

TEST_CASE("arena: AdamW over the arena is bitwise the per-parameter AdamW, frozen parameters untouched") {
  const AdamWOptions o{.beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.1};
  Micro a, b;
  Initializer ia(4), ib(4);
  a.reset_parameters(ia);
  b.reset_parameters(ib);
  freeze_embedding(a);
  freeze_embedding(b);
  const auto frozen_before = param(a, "patch_embed.proj.weight").value.to_host();
  ReferenceAdamW ref(a, o);
  ParameterArena<Cpu> arena(b);
  AdamW<Cpu> opt(arena, o);
  for (int s = 0; s < 4; ++s) {
    fill_grads(a, 10 + s);
    fill_grads(b, 10 + s);
    ref.step(1e-2 * (s + 1));
    opt.step(1e-2 * (s + 1));
    CHECK(all_values(a) == all_values(b));
  }
  Micro fresh;
  Initializer ifresh(4);
  fresh.reset_parameters(ifresh);
  CHECK(all_values(a) != all_values(fresh));  // it did move
  CHECK(param(b, "patch_embed.proj.weight").value.to_host() == frozen_before);
  // the moments match too, under the same names
  std::map<std::string, std::vector<float>> mom;
  opt.visit_state([&](const std::string& n, Tensor<Cpu>& t) { mom[n] = t.to_host(); });
  std::size_t i = 0;
  a.visit([&](const std::string& n, Parameter<Cpu>& p) {
    if (!p.trainable) {
      CHECK(mom.count("exp_avg." + n) == 0);
      return;
    }
    CHECK(mom.at("exp_avg." + n) == ref.slots[i].m.to_host());
    CHECK(mom.at("exp_avg_sq." + n) == ref.slots[i].v.to_host());
    ++i;
  }, "");
  CHECK(i == ref.slots.size());
}

TEST_CASE("arena: SGD over the arena is bitwise the per-parameter SGD") {
  Micro a, b;
  Initializer ia(6), ib(6);
  a.reset_parameters(ia);
  b.reset_parameters(ib);
  Sgd<Cpu> ref(trainable_parameters(a), 0.9, 0.01);
  ParameterArena<Cpu> arena(b);
  Sgd<Cpu> opt(arena, 0.9, 0.01);
  for (int s = 0; s < 3; ++s) {
    fill_grads(a, 20 + s);
    fill_grads(b, 20 + s);
    ref.step(0.05);
    opt.step(0.05);
  }
  CHECK(all_values(a) == all_values(b));
}

TEST_CASE("arena: zero-grad is one fill, clipping matches the per-parameter norm") {
  Micro a, b;
  Initializer ia(8), ib(8);
  a.reset_parameters(ia);
  b.reset_parameters(ib);
  fill_grads(a, 30);
  fill_grads(b, 30);
  ParameterArena<Cpu> arena(b);
  const auto params = trainable_parameters(a);
  const double norm = global_grad_norm(params);
  CHECK(arena.grad_norm() == doctest::Approx(norm).epsilon(1e-12));
  CHECK(clip_grad_norm(arena, 1.0) == doctest::Approx(clip_grad_norm(params, 1.0)).epsilon(1e-12));
  CHECK(arena.grad_norm() == doctest::Approx(1.0).epsilon(1e-5));
  std::vector<float> ga, gb;
  a.visit([&](const std::string&, Parameter<Cpu>& p) { auto h = p.grad.to_host(); ga.insert(ga.end(), h.begin(), h.end()); }, "");
  b.visit([&](const std::string&, Parameter<Cpu>& p) { auto h = p.grad.to_host(); gb.insert(gb.end(), h.begin(), h.end()); }, "");
  REQUIRE(ga.size() == gb.size());
  for (std::size_t i = 0; i < ga.size(); ++i) REQUIRE(gb[i] == doctest::Approx(ga[i]).epsilon(1e-6));
  CHECK(clip_grad_norm(arena, 10.0) == doctest::Approx(1.0).epsilon(1e-5));  // under the bound: unchanged

  AdamW<Cpu> opt(arena);
  opt.zero_grad();
  CHECK(arena.grad_norm() == 0.0);
  b.visit([&](const std::string&, Parameter<Cpu>& p) {
    for (auto v : p.grad.to_host()) REQUIRE(v == 0.f);
  }, "");
}

TEST_CASE("arena: a training state saved over the arena is byte-identical and loads back") {
  TempDir dir;
  Micro a, b;
  Initializer ia(9), ib(9);
  a.reset_parameters(ia);
  b.reset_parameters(ib);
  AdamW<Cpu> ref(trainable_parameters(a));
  ParameterArena<Cpu> arena(b);
  AdamW<Cpu> opt(arena);
  for (int s = 0; s < 2; ++s) {
    fill_grads(a, 40 + s);
    fill_grads(b, 40 + s);
    ref.step(1e-3);
    opt.step(1e-3);
  }
  const fs::path fa = dir.path / "a.safetensors", fb = dir.path / "b.safetensors";
  save_training_state(a, ref, fa, {{"step", 2}});
  save_training_state(b, opt, fb, {{"step", 2}});
  auto bytes = [](const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::vector<char>(std::istreambuf_iterator<char>(in), {});
  };
  CHECK(bytes(fa) == bytes(fb));

  // load into a fresh model in an arena: the values land in the arena, the moments in the flat
  // buffers, and the next step still matches the reference bitwise
  Micro c;
  ParameterArena<Cpu> arena_c(c);
  AdamW<Cpu> opt_c(arena_c);
  load_training_state(c, opt_c, fb);
  CHECK(opt_c.steps() == 2);
  CHECK(all_values(c) == all_values(a));
  c.visit([&](const std::string&, Parameter<Cpu>& p) { CHECK(p.value.is_bound()); }, "");
  fill_grads(a, 50);
  fill_grads(c, 50);
  ref.step(1e-3);
  opt_c.step(1e-3);
  CHECK(all_values(c) == all_values(a));
}

TEST_CASE("checkpoints hold a shared parameter once, under its first name, and load it back") {
  namespace fs = std::filesystem;
  const TempDir dir("hatch_tied");
  const fs::path file = dir.path / "tied.safetensors";
  Tied a;
  a.w.value.from_host(std::vector<float>{1, 2, 3, 4, 5, 6});
  a.b.value.from_host(std::vector<float>{7, 8});
  save_parameters(a, file);
  const auto f = io::SafeTensorsFile::read(file);
  CHECK(f.names() == std::vector<std::string>{"a.weight", "bias"});  // not b.weight again
  Tied b;
  load_parameters(b, file);
  CHECK(b.w.value.to_host() == a.w.value.to_host());
  CHECK(b.b.value.to_host() == a.b.value.to_host());
}
