// m2mKD into NAC (issue 10 §3, ALGORITHMS.md §2): the distillation form of each NAC module
// (NacStudentModule, models/nac.hpp) and ModuleDistiller with a ViT teacher and a NAC student.
//   - Kmdpa without the kernel is dense softmax attention whatever the signatures;
//   - each form has exactly its stage's parameters under the stage's names (no table), maps the
//     meta model's tokens as documented, and its gradients match finite differences in double;
//   - the distiller distils every module of a NAC student (same width as the meta model, and a
//     narrower one, stitched), the module files hold no tables, and the assembly takes every
//     module's weights while the NAC's codes and signatures start fresh; fine-tuning runs.
#include <hatch/models/nac.hpp>
#include <hatch/modular/distiller.hpp>

#include "modular_support.hpp"

using namespace hatch;
using namespace hatch::test;
namespace fs = std::filesystem;

namespace {
using B64 = Cpu64;
inline constexpr NacSpec form_spec{.image = 4, .channels = 1, .patch = 2, .dim = 4, .heads = 2, .ffn_hidden = 3,
                                   .code_dim = 3, .sig_dim = 4, .inputs = 2, .mediators = 3, .outputs = 2,
                                   .classes = 3, .rounds = 2, .graph_m = 1};
using FormNac = Nac<form_spec>;

// A NAC student for VitMicro's meta model: 28 x 28 images, patch 7, the meta width (32) or a
// narrower one (16, stitched).
inline constexpr NacSpec micro_nac{.image = 28, .channels = 1, .patch = 7, .dim = 32, .heads = 2, .ffn_hidden = 32,
                                   .code_dim = 8, .sig_dim = 8, .inputs = 4, .mediators = 6, .outputs = 3,
                                   .classes = 10, .rounds = 2, .graph_m = 1};
inline constexpr NacSpec narrow_nac{.image = 28, .channels = 1, .patch = 7, .dim = 16, .heads = 2, .ffn_hidden = 16,
                                    .code_dim = 8, .sig_dim = 8, .inputs = 4, .mediators = 6, .outputs = 3,
                                    .classes = 10, .rounds = 2, .graph_m = 1};
using Meta = presets::MetaOf<presets::VitMicro>;
using Teacher = presets::VitMicro;

template <class M>
std::vector<std::string> unshared_names(M& m) {
  std::vector<std::string> out;
  m.visit([&](const std::string& n, Parameter<typename M::backend>& p) { if (!p.shared) out.push_back(n); }, "");
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}
}  // namespace

TEST_CASE("nac distill: Kmdpa without the kernel is dense attention, whatever the signatures") {
  constexpr int U = 5, H = 2, Dh = 3, Sig = 4;
  std::mt19937_64 rng(9);
  const auto x = random_tensor<B64>({2 * U, 3 * H * Dh}, rng);
  auto run = [&](bool random_signatures, bool training) {
    KmdpaLayer<B64, H, Dh, Sig> attn;
    attn.use_kernel(false);
    LatentSignatures<B64, Sig> sig(U);
    if (random_signatures) sig.param.value = random_tensor<B64>({U, Sig}, rng);
    else sig.param.value.fill(1.0);  // identical signatures: d = 0, log K = 0, every pair kept
    attn.use_signatures(sig);
    Context ctx;
    ctx.training = training;
    ctx.seed = 4;
    const auto y = attn.forward(x, ctx).to_host();
    CHECK(attn.kept_fraction() == 1.0);
    return y;
  };
  const auto ref = run(false, false);
  CHECK(run(true, false) == ref);
  CHECK(run(true, true) == ref);  // nothing sampled in training either
  // and it is the plain softmax attention of the kernel-free definition
  const auto xh = x.to_host();
  for (int b = 0; b < 2; ++b)
    for (int h = 0; h < H; ++h)
      for (int u = 0; u < U; ++u) {
        std::vector<double> s(U);
        double mx = -1e300, z = 0;
        for (int v = 0; v < U; ++v) {
          double d = 0;
          for (int c = 0; c < Dh; ++c)
            d += xh[(b * U + u) * 3 * H * Dh + h * Dh + c] * xh[(b * U + v) * 3 * H * Dh + H * Dh + h * Dh + c];
          s[v] = d / std::sqrt(double(Dh));
          mx = std::max(mx, s[v]);
        }
        for (auto& v : s) z += (v = std::exp(v - mx));
        for (int c = 0; c < Dh; ++c) {
          double o = 0;
          for (int v = 0; v < U; ++v) o += s[v] / z * xh[(b * U + v) * 3 * H * Dh + 2 * H * Dh + h * Dh + c];
          CHECK(ref[(b * U + u) * H * Dh + h * Dh + c] == doctest::Approx(o).epsilon(1e-12));
        }
      }
}

TEST_CASE("nac distill: each module's form has its stage's parameters and maps the meta model's tokens") {
  Model<FormNac, B64> model;
  for_each_index<FormNac::num_stages>([&](auto ic) {
    constexpr std::size_t I = decltype(ic)::value;
    CAPTURE(I);
    Model<typename FormNac::template distill_stage<I>, B64> form;
    Initializer init(5);
    form.reset_parameters(init);
    CHECK(unshared_names(form) == unshared_names(model.template stage<I>()));
    int shared = 0;
    form.visit([&](const std::string&, Parameter<B64>& p) { shared += p.shared; }, "");
    CHECK(shared == 0);  // the fixed code and signature are never trained or saved
    std::mt19937_64 rng(6 + I);
    Context ctx;
    if constexpr (I == 0) {
      const auto& y = form.forward(random_tensor<B64>({3, 1, 4, 4}, rng), ctx);
      CHECK(y.shape() == Shape{3, form_spec.inputs, form_spec.dim});
    } else if constexpr (I + 1 < FormNac::num_stages) {
      for (int t : {5, 7}) {  // any number of tokens, the tables follow
        const auto& y = form.forward(random_tensor<B64>({3, t, form_spec.dim}, rng), ctx);
        CHECK(y.shape() == Shape{3, t, form_spec.dim});
      }
      CHECK_THROWS_AS(form.forward(random_tensor<B64>({6, form_spec.dim}, rng), ctx), Error);
    } else {
      const auto& y = form.forward(random_tensor<B64>({3, 5, form_spec.dim}, rng), ctx);
      CHECK(y.shape() == Shape{3, form_spec.classes});
    }
  });
}

TEST_CASE("nac distill: the forms' gradients match finite differences (double, both modes)") {
  OneThread one_thread;
  for (bool training : {false, true}) {
    CAPTURE(training);
    {
      // h = 3e-6: at 1e-5 the truncation error of the central difference alone is 1.2e-6 of a
      // small patch_embed bias entry (it falls 100x from h = 1e-4 to 1e-5: h^2, not a wrong
      // gradient), at 1e-6 round-off reaches 1.2e-6 of a small read_in.k.weight entry in training)
      Model<FormNac::distill_stage<0>, B64> f;
      randomize_parameters(f, 7);
      const auto rep = gradcheck(f, {2, 1, 4, 4}, training, 3, 40, 3e-6);
      INFO("worst: " << rep.worst);
      CHECK(rep.max_rel <= 1e-6);
    }
    {
      Model<FormNac::distill_stage<1>, B64> f;
      expect_gradients(f, {2, 5, form_spec.dim}, training);
    }
    {
      Model<FormNac::distill_stage<3>, B64> f;
      expect_gradients(f, {2, 5, form_spec.dim}, training);
    }
  }
}

TEST_CASE_TEMPLATE("nac distill: a ViT teacher distilled into a NAC student, assembled with fresh tables", Student,
                   Nac<micro_nac>, Nac<narrow_nac>) {
  OneThread one_thread;
  TempRunDir dir;
  const auto train = synthetic(64, 1), test_set = synthetic(32, 2);
  using Kd = ModuleDistiller<Meta, Teacher, Student, Cpu>;
  constexpr bool stitched = Student::spec.dim != presets::micro.dim;
  static_assert(Kd::template StudentStitch<1>::before == stitched && Kd::template StudentStitch<1>::after == stitched);
  static_assert(!Kd::template StudentStitch<0>::before && Kd::template StudentStitch<0>::after == stitched);
  static_assert(Kd::template StudentStitch<3>::before == stitched && !Kd::template StudentStitch<3>::after);
  Kd kd({.dir = dir.path, .tag = "vit>nac", .seed = 3});
  auto teacher = std::make_unique<typename Kd::Teacher>();
  randomize_parameters(*teacher, 11);
  kd.split_teacher(*teacher);
  kd.pretrain_meta(train, test_set, quick());
  Model<Student, Cpu> reference;  // names and shapes of the NAC's stages
  for_each_index<Kd::K>([&](auto ic) {
    constexpr std::size_t I = decltype(ic)::value;
    CAPTURE(I);
    const auto r = kd.distill(I, train, test_set, quick());
    CHECK(std::isfinite(r.test.loss));
    REQUIRE(fs::exists(kd.files().module(I)));
    // the module file: the stage's own parameters, no table, no stitch
    std::vector<std::string> in_file;
    for (const auto& [name, bytes] : file_tensors(kd.files().module(I))) in_file.push_back(name);
    std::sort(in_file.begin(), in_file.end());
    CHECK(in_file == unshared_names(reference.template stage<I>()));
  });
  auto student = std::make_unique<typename Kd::Student>();
  kd.assemble(*student);
  // every module's weights, and tables as a fresh model's (the assembly's seed)
  auto fresh = std::make_unique<typename Kd::Student>();
  Initializer init(3 + 3000);
  fresh->reset_parameters(init);
  CHECK(student->codes.param.value.to_host() == fresh->codes.param.value.to_host());
  CHECK(student->signatures.param.value.to_host() == fresh->signatures.param.value.to_host());
  student->for_each_stage([&](auto& stage, std::size_t i) {
    CAPTURE(i);
    const auto have = snapshot(stage);
    for (const auto& [name, bytes] : file_tensors(kd.files().module(i))) CHECK(have.at(name) == bytes);
  });
  auto tuned = std::make_unique<typename Kd::Student>();
  const auto r = kd.finetune(*tuned, train, test_set, quick());
  CHECK(std::isfinite(r.test.loss));
  for (std::size_t i = 0; i < Kd::K; ++i) CHECK(fs::exists(kd.files().finetuned(i)));
  // a module file is still strict elsewhere: loading it as a whole stage misses the tables
  CHECK_THROWS_AS(load_stage<1>(*fresh, kd.files().module(1)), Error);
}

TEST_CASE("nac: graph priors by name, each drawn at reset; dense attention keeps every pair") {
  CHECK(nac_prior_from("scale-free") == NacPrior::scale_free);
  CHECK(nac_prior_from("erdos-renyi") == NacPrior::erdos_renyi);
  CHECK(nac_prior_from("planted-partition") == NacPrior::planted_partition);
  CHECK(nac_prior_from("ring-of-cliques") == NacPrior::ring_of_cliques);
  CHECK(has(error_message([] { nac_prior_from("small-world"); }), "small-world"));
  using L = Model<presets::NacSmall, Cpu>;
  const auto& S = presets::nac_small;
  // the priors' graphs differ, and a ring of cliques is the same graph for every seed
  const auto ba = L::prior_graph(1), er = L::prior_graph(1, NacPrior::erdos_renyi),
             pp = L::prior_graph(1, NacPrior::planted_partition), ring = L::prior_graph(1, NacPrior::ring_of_cliques);
  CHECK(ba.edges() != er.edges());
  CHECK(er.edges() != pp.edges());
  CHECK(ring.edges() == L::prior_graph(2, NacPrior::ring_of_cliques).edges());
  // planted partition: blocks of 8 in graph order, the mediators' blocks first
  int in_block = 0, across = 0;
  for (int u = S.inputs; u < S.inputs + S.mediators; ++u)
    for (int v = u + 1; v < S.inputs + S.mediators; ++v)
      ((u - S.inputs) / 8 == (v - S.inputs) / 8 ? in_block : across) += pp.has_edge(u, v);
  CHECK(in_block > 4 * across);
  // the model draws its signatures from the prior it is told
  auto a = std::make_unique<L>(), b = std::make_unique<L>();
  b->use_prior(NacPrior::erdos_renyi);
  CHECK(b->prior() == NacPrior::erdos_renyi);
  Initializer ia(4), ib(4);
  a->reset_parameters(ia);
  b->reset_parameters(ib);
  CHECK(a->codes.param.value.to_host() == b->codes.param.value.to_host());
  CHECK(a->signatures.param.value.to_host() != b->signatures.param.value.to_host());
  // dense: every propagator pair kept
  b->use_dense_attention(true);
  std::mt19937_64 rng(3);
  Context ctx;
  ctx.training = true;
  b->forward(random_tensor<Cpu>({2, 1, 28, 28}, rng), ctx);
  b->for_each_layer([&](auto& l) {
    if constexpr (requires { l.take_kept_fraction(); }) CHECK(l.take_kept_fraction() == 1.0);
  });
}
