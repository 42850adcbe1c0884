// m2mKD's ModuleDistiller (modular/distiller.hpp, ALGORITHMS.md §2): the combined loss and its
// gradient; the student module's gradients through the frozen meta suffix under that loss match
// finite differences (double precision); the phases read and write the right files, leave the
// meta model and the teacher bitwise unchanged, train the student module towards the teacher,
// and assemble exactly; wrong or missing inputs stop with the file named.
//
// Teacher Vit<micro, Depths<1,2,1,1>> and student Vit<micro, Depths<2,1,1,1>> (each deeper
// than the meta model in another stage), on tiny synthetic data.
#include <hatch/modular/distiller.hpp>
#include <hatch/modular/incubator.hpp>

#include "modular_support.hpp"

using namespace hatch;
using namespace hatch::test;
namespace fs = std::filesystem;

namespace {

using Meta = presets::MetaOf<presets::VitMicro>;
using TeacherArch = Vit<presets::micro, Depths<1, 2, 1, 1>>;
using StudentArch = Vit<presets::micro, Depths<2, 1, 1, 1>>;
using Distiller = ModuleDistiller<Meta, TeacherArch, StudentArch, Cpu>;
constexpr std::size_t kStages = Distiller::K;

// KD term alone of a student hybrid against a teacher hybrid on a fixed batch.
template <class S, class T>
double distillation_term(S& student, T& teacher, const Tensor<Cpu>& x) {
  Context ctx;
  ctx.training = false;
  DistillationLoss<Cpu> kd(1.0);
  const Tensor<Cpu> zs = student.forward(x, ctx);  // a copy: the teacher's forward comes next
  Context tctx = ctx;
  return kd.forward_backward(zs, teacher.forward(x, tctx));
}

}  // namespace

TEST_CASE("distillation loss: (1 - a) CE + a KD, with the gradient of each part") {
  std::mt19937_64 rng(5);
  const auto z = random_tensor<Cpu64>({4, 10}, rng, 2.0), zt = random_tensor<Cpu64>({4, 10}, rng, 2.0);
  std::vector<int> labels{1, 7, 3, 3};
  Tensor<Cpu64> t;
  const auto th = smoothed_one_hot(labels, 10, 0.1);
  t.from_host(std::vector<double>(th.begin(), th.end()), {4, 10});
  SoftTargetCrossEntropy<Cpu64> ce;
  DistillationLoss<Cpu64> kd(2.0);
  const double l_ce = ce.forward_backward(z, t), l_kd = kd.forward_backward(z, zt);
  DistilledCrossEntropy<Cpu64> mixed(0.3, 2.0);
  CHECK(mixed.forward_backward(z, t, zt) == doctest::Approx(0.7 * l_ce + 0.3 * l_kd).epsilon(1e-14));
  CHECK(mixed.last_cross_entropy() == doctest::Approx(l_ce));
  CHECK(mixed.last_distillation() == doctest::Approx(l_kd));
  const auto g = mixed.grad().to_host(), gc = ce.grad().to_host(), gk = kd.grad().to_host();
  for (std::size_t i = 0; i < g.size(); ++i) CHECK(g[i] == doctest::Approx(0.7 * gc[i] + 0.3 * gk[i]).epsilon(1e-12));
  CHECK_THROWS_AS(DistilledCrossEntropy<Cpu64>(1.5), Error);
  CHECK_THROWS_AS(DistilledCrossEntropy<Cpu64>(0.5, 0.0), Error);
}

TEST_CASE("distiller: student module i's gradients under the distillation objective match finite differences") {
  OneThread one_thread;
  using D64 = ModuleDistiller<Meta, TeacherArch, StudentArch, Cpu64>;
  for_each_index<kStages>([&](auto ic) {
    constexpr std::size_t I = decltype(ic)::value;
    CAPTURE(I);
    Model<typename D64::template StudentHybridArch<I>, Cpu64> student;
    Model<typename D64::template TeacherHybridArch<I>, Cpu64> teacher;
    randomize_parameters(student, 40 + I);
    randomize_parameters(teacher, 50 + I);
    FrozenExcept<decltype(student), I> view(student);
    TeacherObjective objective(teacher, 0.5, 2.0);

    std::mt19937_64 rng(60 + I);
    const auto x = random_tensor<Cpu64>({3, 1, 28, 28}, rng);
    Tensor<Cpu64> t;
    const auto th = smoothed_one_hot({2, 9, 4}, 10, 0.1);
    t.from_host(std::vector<double>(th.begin(), th.end()), {3, 10});
    auto make_ctx = [] {
      Context c;
      c.training = true;
      c.input_grad = false;
      return c;
    };
    auto loss = [&] {
      Context c = make_ctx();
      return objective.forward_backward(view.forward(x, c), t, x);
    };
    zero_grads(student);
    zero_grads(teacher);
    Context ctx = make_ctx();
    objective.forward_backward(view.forward(x, ctx), t, x);
    view.backward(objective.grad(), ctx);
    // Only module I received gradients; the teacher none at all.
    student.for_each_stage([&](auto& stage, std::size_t j) {
      CAPTURE(j);
      if (j == I) CHECK(max_abs_grad(stage) > 0);
      else CHECK(max_abs_grad(stage) == 0);
    });
    CHECK(max_abs_grad(teacher) == 0);
    const auto rep = check_parameter_grads(view, loss, rng, 6);
    INFO("worst: " << rep.worst);
    CHECK(rep.max_rel <= 1e-6);
  });
}

TEST_CASE("distiller: the phases through their files") {
  OneThread one_thread;
  TempRunDir dir;
  const auto train = synthetic(96, 1), test_set = synthetic(64, 2);
  Distiller d({.dir = dir.path, .tag = "micro-kd", .seed = 4, .alpha = 1.0});

  // A teacher with confident, varied logits (a fresh ViT's are all near zero).
  auto teacher = std::make_unique<Model<TeacherArch, Cpu>>();
  randomize_parameters(*teacher, 11);
  const auto teacher_file = dir.path / "teacher.safetensors";
  save_parameters(*teacher, teacher_file);

  SUBCASE("distilling before the teacher is split names the missing file") {
    d.pretrain_meta(train, test_set, quick());
    const auto msg = error_message([&] { d.distill(1, train, test_set, quick()); });
    CHECK(has(msg, d.files().teacher(1).string()));
    CHECK(has(msg, "missing"));
  }
  SUBCASE("a teacher checkpoint of another architecture is refused, naming the file") {
    auto wrong = std::make_unique<Model<Meta, Cpu>>();  // four blocks where the teacher has five
    const auto wrong_file = dir.path / "meta_as_teacher.safetensors";
    save_parameters(*wrong, wrong_file);
    const auto msg = error_message([&] { d.split_teacher(wrong_file); });
    CHECK(has(msg, wrong_file.string()));
    CHECK_FALSE(fs::exists(d.files().teacher(0)));
  }
  SUBCASE("split, meta, distill every module, assemble, fine-tune") {
    d.split_teacher(teacher_file);
    teacher->for_each_stage([&](auto& stage, std::size_t i) {
      CAPTURE(i);
      CHECK(file_tensors(d.files().teacher(i)) == snapshot(stage));
      CHECK(meta_entry(d.files().teacher(i), "phase") == "teacher");
    });
    d.pretrain_meta(train, test_set, quick());
    std::vector<Bytes> before;
    for (std::size_t j = 0; j < kStages; ++j) {
      before.push_back(file_bytes(d.files().meta(j)));
      before.push_back(file_bytes(d.files().teacher(j)));
    }
    std::mt19937_64 rng(8);
    const auto probe = random_tensor<Cpu>({16, 1, 28, 28}, rng);
    for_each_index<kStages>([&](auto ic) {
      constexpr std::size_t I = decltype(ic)::value;
      CAPTURE(I);
      std::string inputs;
      auto fresh = d.template make_student_hybrid<I>(inputs);
      auto teacher_hybrid = d.template make_teacher_hybrid<I>(inputs);
      const double kd_before = distillation_term(*fresh, *teacher_hybrid, probe);

      auto o = quick(8);
      o.lr = 5e-3;
      const auto r = d.distill(I, train, test_set, o);
      CHECK(std::isfinite(r.test.loss));
      REQUIRE(fs::exists(d.files().module(I)));
      CHECK(meta_entry(d.files().module(I), "phase") == "module");
      CHECK(meta_entry(d.files().module(I), "tag") == "micro-kd");

      // The trained module, back in a student hybrid, is closer to the teacher.
      load_parameters(fresh->template stage<I>(), d.files().module(I));
      const double kd_after = distillation_term(*fresh, *teacher_hybrid, probe);
      INFO("KD before " << kd_before << ", after " << kd_after);
      CHECK(kd_after < 0.7 * kd_before);
    });
    for (std::size_t j = 0; j < kStages; ++j) {
      CHECK(file_bytes(d.files().meta(j)) == before[2 * j]);
      CHECK(file_bytes(d.files().teacher(j)) == before[2 * j + 1]);
    }

    auto student = std::make_unique<Distiller::Student>();
    d.assemble(*student);
    student->for_each_stage([&](auto& stage, std::size_t i) {
      CAPTURE(i);
      CHECK(snapshot(stage) == file_tensors(d.files().module(i)));
      CHECK(file_tensors(d.files().assembled(i)) == file_tensors(d.files().module(i)));
    });
    auto fresh_student = std::make_unique<Distiller::Student>();
    const auto r = d.finetune(*fresh_student, train, test_set, quick());
    CHECK(std::isfinite(r.test.loss));
    for (std::size_t i = 0; i < kStages; ++i) CHECK(fs::exists(d.files().finetuned(i)));
  }
}

TEST_CASE("distiller: the meta model of another run (Options::meta_dir) is read, not retrained") {
  OneThread one_thread;
  TempRunDir incubation, distillation;
  const auto train = synthetic(64, 3), test_set = synthetic(32, 4);
  Incubator<Meta, StudentArch, Cpu> inc({.dir = incubation.path, .tag = "shared", .seed = 1});
  inc.pretrain_meta(train, test_set, quick());
  Distiller d({.dir = distillation.path, .meta_dir = incubation.path / "meta", .tag = "shared", .seed = 2});
  CHECK(d.files().meta(0) == inc.files().meta(0));
  auto teacher = std::make_unique<Distiller::Teacher>();
  randomize_parameters(*teacher, 12);
  d.split_teacher(*teacher);
  d.distill(2, train, test_set, quick());
  CHECK(fs::exists(d.files().module(2)));
  CHECK_FALSE(fs::exists(distillation.path / "meta"));
}

TEST_CASE("distiller lineage: modules record the meta model and teacher split; assembly refuses another teacher's") {
  OneThread one_thread;
  TempRunDir dir;
  const auto train = synthetic(32, 5), test_set = synthetic(16, 6);
  Distiller d({.dir = dir.path, .tag = "micro-kd", .seed = 4});
  auto teacher = std::make_unique<Distiller::Teacher>();
  randomize_parameters(*teacher, 21);
  d.split_teacher(*teacher);
  const auto teacher_id = meta_entry(d.files().teacher(0), "lineage");
  CHECK(teacher_id.size() == 16);
  for (std::size_t i = 0; i < kStages; ++i) {
    CHECK(meta_entry(d.files().teacher(i), "lineage") == teacher_id);
    CHECK(meta_entry(d.files().teacher(i), "teacher_id") == teacher_id);
  }
  CHECK_FALSE(fs::exists(io::StagedDirectory::temp_name(dir.path / "teacher", ::getpid())));
  d.pretrain_meta(train, test_set, quick());
  const auto meta_id = meta_entry(d.files().meta(0), "lineage");
  for (std::size_t i = 0; i < kStages; ++i) {
    d.distill(i, train, test_set, quick());
    CHECK(meta_entry(d.files().module(i), "meta_id") == meta_id);
    CHECK(meta_entry(d.files().module(i), "teacher_id") == teacher_id);
  }
  auto student = std::make_unique<Distiller::Student>();
  d.assemble(*student);
  CHECK(meta_entry(d.files().assembled(0), "teacher_id") == teacher_id);
  CHECK(meta_entry(d.files().assembled(3), "meta_id") == meta_id);

  // The teacher split again from other weights: every module is stale.
  const auto assembled_before = file_bytes(d.files().assembled(0));
  auto other = std::make_unique<Distiller::Teacher>();
  randomize_parameters(*other, 22);
  d.split_teacher(*other);
  const auto other_id = meta_entry(d.files().teacher(0), "lineage");
  REQUIRE(other_id != teacher_id);
  {
    const auto msg = error_message([&] { d.assemble(*student); });
    INFO(msg);
    CHECK(has(msg, "teacher id"));
    CHECK(has(msg, teacher_id));
    CHECK(has(msg, other_id));
    CHECK(has(msg, d.files().module(0).string()));
    CHECK(has(msg, "distill(i)) for modules 0, 1, 2, 3"));
  }
  CHECK(file_bytes(d.files().assembled(0)) == assembled_before);

  // A teacher split mixed from the two teachers is refused by a module job and by assembly...
  Distiller e({.dir = dir.path / "e", .tag = "micro-kd", .seed = 4});
  e.split_teacher(*teacher);
  fs::copy_file(e.files().teacher(1), d.files().teacher(1), fs::copy_options::overwrite_existing);
  for (const auto& msg : {error_message([&] { d.distill(0, train, test_set, quick()); }),
                          error_message([&] { d.assemble(*student); })}) {
    INFO(msg);
    CHECK(has(msg, "mixed lineage in the teacher's stage files"));
    CHECK(has(msg, d.files().teacher(1).string()));
    CHECK(has(msg, d.files().teacher(0).string()));
    CHECK(has(msg, "split_teacher"));
  }
  // ... and a meta directory mixed from two runs by every distill job.
  d.split_teacher(*teacher);
  Distiller f({.dir = dir.path / "f", .tag = "micro-kd", .seed = 9});
  f.pretrain_meta(train, test_set, quick());
  fs::copy_file(f.files().meta(3), d.files().meta(3), fs::copy_options::overwrite_existing);
  const auto msg = error_message([&] { d.distill(0, train, test_set, quick()); });
  INFO(msg);
  CHECK(has(msg, "mixed lineage in the meta model's stage files"));
  CHECK(has(msg, d.files().meta(3).string()));
}

// ---- stitches only where the widths differ, dropped at assembly --------------------------------

namespace {
// A student twice as wide as the meta model (64 against 32): stitched at every inner boundary.
using WideStudent = Vit<presets::tiny, Depths<1, 1, 1, 1>>;
using WideDistiller = ModuleDistiller<Meta, TeacherArch, WideStudent, Cpu>;
using NormStitchDistiller = ModuleDistiller<Meta, TeacherArch, WideStudent, Cpu, NormLinearStitch>;

template <class M>
bool any_name_has(M& module, const std::string& part) {
  for (const auto& n : names_of(module))
    if (n.find(part) != std::string::npos) return true;
  return false;
}
template <class M>
std::vector<double> drop_path_rates(M& module) {
  std::vector<double> r;
  module.for_each_layer([&](auto& l) {
    if constexpr (requires { l.rate(); }) r.push_back(l.rate());
  });
  return r;
}
}  // namespace

// A student of the meta model's width gets no stitch at all; a wider one a stitch on exactly the
// sides that differ (the image input and the logits never do).
static_assert(std::is_same_v<Distiller::StudentStitch<1>::type, StudentArch::stage<1>>);
static_assert(Distiller::StudentStitch<0>::module_index == -1 && Distiller::StudentStitch<3>::module_index == -1);
static_assert(!WideDistiller::StudentStitch<0>::before && WideDistiller::StudentStitch<0>::after);
static_assert(WideDistiller::StudentStitch<1>::before && WideDistiller::StudentStitch<1>::after);
static_assert(WideDistiller::StudentStitch<3>::before && !WideDistiller::StudentStitch<3>::after);

TEST_CASE("distiller: a wider student is stitched in its hybrids and the stitches are not in its files") {
  OneThread one_thread;
  TempRunDir dir;
  const auto train = synthetic(64, 7), test_set = synthetic(32, 8);
  WideDistiller d({.dir = dir.path, .tag = "wide-kd", .seed = 3});
  auto teacher = std::make_unique<WideDistiller::Teacher>();
  randomize_parameters(*teacher, 13);
  d.split_teacher(*teacher);
  d.pretrain_meta(train, test_set, quick());
  auto reference = std::make_unique<WideDistiller::Student>();
  for_each_index<kStages>([&](auto ic) {
    constexpr std::size_t I = decltype(ic)::value;
    CAPTURE(I);
    std::string inputs;
    auto hybrid = d.template make_student_hybrid<I>(inputs);
    auto& stage = hybrid->template stage<I>();
    // The stitches are trained with the module (the optimizer's view holds them)...
    CHECK(any_name_has(stage, "stitch_in.") == (I != 0));
    CHECK(any_name_has(stage, "stitch_out.") == (I != kStages - 1));
    // ... and the module inside is the student's own stage, names and all.
    CHECK(names_of(WideDistiller::student_module<I>(*hybrid)) == names_of(reference->template stage<I>()));
    d.distill(I, train, test_set, quick());
    std::vector<std::string> saved;
    for (const auto& [name, bytes] : file_tensors(d.files().module(I))) saved.push_back(name);
    auto expected = names_of(reference->template stage<I>());
    std::sort(expected.begin(), expected.end());
    CHECK(saved == expected);
    CHECK_FALSE(meta_entry(d.files().module(I), "teacher_hybrid_accuracy").empty());
  });
  auto student = std::make_unique<WideDistiller::Student>();
  d.assemble(*student);  // strict: a stitch tensor in a module file would be refused here
  CHECK_FALSE(any_name_has(*student, "stitch"));
  student->for_each_stage([&](auto& stage, std::size_t i) {
    CAPTURE(i);
    CHECK(file_tensors(d.files().assembled(i)) == snapshot(stage));
  });
  const auto r = d.finetune(*student, train, test_set, quick());
  CHECK(std::isfinite(r.test.loss));
}

TEST_CASE("distiller: LayerNorm + Linear stitches (m2mKD's V-MoE runs) and drop-path only in the student module") {
  std::string inputs;
  TempRunDir dir;
  const auto train = synthetic(32, 9), test_set = synthetic(16, 10);
  NormStitchDistiller d({.dir = dir.path, .tag = "norm-kd", .seed = 5, .hybrid_drop_path = 0.2});
  d.pretrain_meta(train, test_set, quick());
  auto hybrid = d.template make_student_hybrid<1>(inputs);
  const auto names = names_of(hybrid->template stage<1>());
  CHECK(std::count(names.begin(), names.end(), "stitch_in.norm.weight") == 1);
  CHECK(std::count(names.begin(), names.end(), "stitch_in.proj.weight") == 1);
  CHECK(std::count(names.begin(), names.end(), "stitch_out.proj.bias") == 1);
  // Drop-path: linspace(0, 0.2) over the module's blocks; every meta stage keeps none.
  hybrid->for_each_stage([&](auto& stage, std::size_t j) {
    CAPTURE(j);
    const auto rates = drop_path_rates(stage);
    if (j != 1) CHECK(std::all_of(rates.begin(), rates.end(), [](double r) { return r == 0; }));
  });
  Distiller plain({.dir = dir.path / "plain", .tag = "micro-kd", .hybrid_drop_path = 0.2});
  plain.pretrain_meta(train, test_set, quick());
  auto deep = plain.template make_student_hybrid<0>(inputs);  // the student's stage 0 has two blocks
  const auto rates = drop_path_rates(deep->template stage<0>());
  REQUIRE(!rates.empty());
  CHECK(rates.front() == 0.0);
  CHECK(rates.back() == doctest::Approx(0.2));
}

TEST_CASE("distiller: the teacher and meta model of a finished Deep Incubation run (take_teacher)") {
  OneThread one_thread;
  TempRunDir incubation, distillation;
  const auto train = synthetic(64, 11), test_set = synthetic(32, 12);
  Incubator<Meta, TeacherArch, Cpu> inc({.dir = incubation.path, .tag = "teacher-run", .seed = 1});
  inc.pretrain_meta(train, test_set, quick());
  for (std::size_t i = 0; i < kStages; ++i) inc.incubate(i, train, test_set, quick());
  {
    auto target = std::make_unique<Model<TeacherArch, Cpu>>();
    inc.assemble(*target);
    inc.finetune(*target, train, test_set, quick());
  }
  Distiller d({.dir = distillation.path, .meta_dir = incubation.path / "meta", .meta_tag = "teacher-run",
               .tag = "kd-run", .seed = 2});

  SUBCASE("the fine-tuned stages become the teacher, and a module distils against them") {
    auto teacher = d.take_teacher(incubation.path, "teacher-run");
    for (std::size_t i = 0; i < kStages; ++i) {
      CHECK(file_tensors(d.files().teacher(i)) == file_tensors(inc.files().finetuned(i)));
      CHECK(meta_entry(d.files().teacher(i), "teacher_source") == meta_entry(inc.files().finetuned(i), "lineage"));
      CHECK(meta_entry(d.files().teacher(i), "tag") == "kd-run");
    }
    d.distill(2, train, test_set, quick());
    CHECK(meta_entry(d.files().module(2), "meta_id") == meta_entry(inc.files().meta(0), "lineage"));
    CHECK(meta_entry(d.files().module(2), "tag") == "kd-run");
    CHECK(meta_entry(inc.files().meta(0), "tag") == "teacher-run");  // read, not rewritten
  }
  SUBCASE("another run's tag is refused, naming the file and both tags") {
    const auto msg = error_message([&] { d.take_teacher(incubation.path, "other-run"); });
    CHECK(has(msg, inc.files().finetuned(0).string()));
    CHECK(has(msg, "other-run"));
    CHECK_FALSE(fs::exists(d.files().teacher(0)));
  }
  SUBCASE("a teacher fine-tuned from another meta model is refused") {
    Distiller own({.dir = distillation.path / "own", .tag = "teacher-run", .seed = 3});
    own.pretrain_meta(train, test_set, quick());  // a meta model of its own, not the teacher's
    const auto msg = error_message([&] { own.take_teacher(incubation.path, "teacher-run"); });
    INFO(msg);
    CHECK(has(msg, "meta id"));
    CHECK_FALSE(fs::exists(own.files().teacher(0)));
  }
  SUBCASE("an unfinished run (no fine-tuned stages) names the missing file") {
    fs::remove_all(inc.files().finetuned_dir());
    const auto msg = error_message([&] { d.take_teacher(incubation.path, "teacher-run"); });
    CHECK(has(msg, inc.files().finetuned(0).string()));
    CHECK(has(msg, "missing"));
  }
}
