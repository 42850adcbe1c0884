#pragma once
// m2mKD, module-to-module knowledge distillation (ALGORITHMS.md §2), as a generic template over
// three staged models with the same number of stages K: a small meta model, a trained
// monolithic teacher and a modular student.
//   0. the teacher — take_teacher: the fine-tuned stages of a finished Deep Incubation run
//                    with that run's meta model, as the reference does (teacher module i then
//                    already works inside those meta stages); or split_teacher: any trained
//                    teacher, split into per-stage files teacher/stage<i>;
//   1. pretrain_meta — the meta model end to end (or reuse another run's, Options::meta_dir);
//   2. distill(i)    — two hybrids share the frozen meta stages: the teacher's with teacher
//                      module i, the student's with a fresh student module i. On each batch the
//                      teacher hybrid runs in evaluation mode, and only student module i trains,
//                      on (1 - a) CE(z_S, y) + a T^2 KL(p_T || p_S); gradients flow through the
//                      frozen meta stages after i. Where the student module's width differs from
//                      the meta model's at a boundary, a stitch (Stitch policy: a Linear, or
//                      LayerNorm + Linear) adapts it, trained with the module and never saved:
//                      modules/stage<i> holds the student module alone. One job per module;
//   3. assemble      — the student modules into the student (no stitches: there are none to drop);
//   4. finetune      — the assembled student end to end.
// The files, their tags and checks are ModularRun's (modular_run.hpp), as in Deep Incubation.
#include "hatch/modular/modular_run.hpp"

namespace hatch {

// fit's objective for distillation: runs the teacher (evaluation mode, no gradients) on the
// batch the student saw and applies DistilledCrossEntropy to the two sets of logits.
template <class TeacherModel>
class TeacherObjective {
 public:
  using B = typename TeacherModel::backend;
  TeacherObjective(TeacherModel& teacher, double alpha, double temperature)
      : teacher_(teacher), loss_(alpha, temperature) {}
  double forward_backward(const Tensor<B>& logits, const Tensor<B>& targets, const Tensor<B>& images) {
    Context ctx;
    ctx.training = false;
    ctx.param_grads = false;
    ctx.input_grad = false;
    return loss_.forward_backward(logits, targets, teacher_.forward(images, ctx));
  }
  // fit's one-wait form (fit.hpp): the loss into step scalar `slot`, from the scalar_slots slots
  // that start there.
  static constexpr int scalar_slots = DistilledCrossEntropy<B>::scalar_slots;
  void forward_backward_into(const Tensor<B>& logits, const Tensor<B>& targets, const Tensor<B>& images,
                             StepScalars<B>& s, int slot) {
    Context ctx;
    ctx.training = false;
    ctx.param_grads = false;
    ctx.input_grad = false;
    loss_.forward_backward_into(logits, targets, teacher_.forward(images, ctx), s, slot);
  }
  const Tensor<B>& grad() const { return loss_.grad(); }
  const DistilledCrossEntropy<B>& loss() const { return loss_; }

 private:
  TeacherModel& teacher_;
  DistilledCrossEntropy<B> loss_;
};

// What the student's hybrid holds for module I: StudentArch::distill_stage<I> where the student
// says how its modules are distilled (a NAC: NacStudentModule, models/nac.hpp), else its stage I.
// Either way the module's parameters carry the names of stage I, so its file assembles.
template <class StudentArch, std::size_t I>
struct DistilledModule {
  using type = typename StudentArch::template stage<I>;
};
template <class StudentArch, std::size_t I>
  requires requires { typename StudentArch::template distill_stage<I>; }
struct DistilledModule<StudentArch, I> {
  using type = typename StudentArch::template distill_stage<I>;
};

template <class MetaArch, class TeacherArch, class StudentArch, Backend B,
          template <int, int> class Stitch = LinearStitch>
class ModuleDistiller : public ModularRun<MetaArch, B> {
  using Base = ModularRun<MetaArch, B>;
  using Base::files_;
  using Base::seed_;

 public:
  static constexpr std::size_t K = Base::K;
  static_assert(K == TeacherArch::num_stages && K == StudentArch::num_stages,
                "hatch::ModuleDistiller: the meta model, the teacher and the student must have the same "
                "number of stages");
  // The teacher's modules must fit the meta stages as they are (the teacher was incubated in
  // them); a student module of another width is stitched to its meta stage (StitchTo).
  template <std::size_t I>
  using TeacherHybridArch = ReplaceStage<MetaArch, I, typename TeacherArch::template stage<I>>;
  template <std::size_t I>
  using StudentStitch = StitchTo<typename DistilledModule<StudentArch, I>::type, MetaArch::template stage<I>::in,
                                 MetaArch::template stage<I>::out, Stitch>;
  template <std::size_t I>
  using StudentHybridArch = ReplaceStage<MetaArch, I, typename StudentStitch<I>::type>;
  // Student module I inside its hybrid (the stitches left out).
  template <std::size_t I, class Hybrid>
  static auto& student_module(Hybrid& hybrid) {
    return StudentStitch<I>::module(hybrid.template stage<I>());
  }
  using Teacher = Model<TeacherArch, B>;
  using Student = Model<StudentArch, B>;

  struct Options {
    std::filesystem::path dir = "out/distillation";
    std::filesystem::path meta_dir{};  // a meta model trained elsewhere; empty: dir / "meta"
    std::string meta_tag{};            // the tag of the meta model's files (another run's); empty: tag
    std::string tag = "model";         // written into every file; checked when a phase reads it
    std::uint64_t seed = 0;
    double alpha = 0.5;                // weight of the distillation term
    double temperature = 1.0;
    double hybrid_drop_path = 0.1;     // in the student module of its hybrid (the frozen meta: none)
    double student_drop_path = 0.1;    // for fine-tuning the assembled student
    std::shared_ptr<Collective> collective{};  // a data-parallel job's ranks: rank 0 writes (Incubator's)
  };

  explicit ModuleDistiller(Options o) : Base(o.dir, o.meta_dir, o.tag, o.seed), opt_(std::move(o)) {
    this->module_phase_ = "distill";
    this->has_teacher_ = true;
    this->meta_tag_ = opt_.meta_tag;
    this->collective_ = opt_.collective;
  }

  // Phase 0 from a finished Deep Incubation run of the teacher (the reference's teacher): its
  // fine-tuned stages, run/finetuned/stage<i> tagged `run_tag`, become teacher/stage<i>. They
  // must be one fine-tuning of modules incubated in the meta model this distiller reads
  // (Options::meta_dir = run/"meta", Options::meta_tag = run_tag): otherwise teacher module i
  // would sit among meta stages it was never trained with. Returns the teacher, loaded.
  std::unique_ptr<Model<TeacherArch, B>> take_teacher(const std::filesystem::path& run, const std::string& run_tag) {
    auto teacher = std::make_unique<Teacher>();
    const ModularLayout from{run};
    std::vector<LineageEntry> parts, metas;
    teacher->for_each_stage([&](auto& stage, std::size_t i) {
      const auto m = this->load(stage, from.finetuned(i), "finetuned", i, {"meta_id"}, run_tag);
      parts.push_back({from.finetuned(i), i, m.at("lineage")});
      metas.push_back({from.finetuned(i), i, m.at("meta_id")});
    });
    auto refit = [](const std::vector<std::size_t>&) {
      return std::string("Fine-tune the teacher's incubation run again (incubate --phase finetune).");
    };
    require_one_lineage(from.finetuned_dir().string(), "the teacher's fine-tuned stage files", "fine-tuning id",
                        parts, "", "", refit);
    require_one_lineage(from.finetuned_dir().string(), "the teacher's fine-tuned stage files", "meta id", metas,
                        this->current_lineage("meta"), "the meta model in " + files_.meta_dir().string(), refit);
    split_teacher(*teacher, parts.front().id);
    return teacher;
  }

  // Phase 0: the teacher's stages to teacher/stage<i>, all K at once, with the teacher id
  // ("lineage", "teacher_id") of these weights.
  // `source`: the lineage of the files the teacher was read from, recorded when given.
  void split_teacher(Teacher& teacher, const std::string& source = {}) {
    LineageHash h;
    h.add("teacher").add(this->tag_);
    teacher.for_each_stage([&](auto& stage, std::size_t) { h.parameters(stage); });
    const std::string id = h.hex();
    std::map<std::string, std::string> lineage{{"lineage", id}, {"teacher_id", id}};
    if (!source.empty()) lineage["teacher_source"] = source;
    this->write_stages(teacher, files_.teacher_dir(), "teacher", lineage);
  }
  // ... from a whole-model checkpoint (as train_e2e writes it), checked strictly.
  void split_teacher(const std::filesystem::path& checkpoint) {
    auto teacher = std::make_unique<Teacher>();
    load_parameters(*teacher, checkpoint);
    split_teacher(*teacher);
  }

  // Phase 2 for module i (chosen at run time): reads the meta stages and teacher stage i, writes
  // modules/stage<i>.
  FitResult distill(std::size_t i, const data::Dataset& train, const data::Dataset& test, FitOptions fo) {
    require(i < K, "distill", "module index " + std::to_string(i) + " is out of range [0, " + std::to_string(K) + ")");
    return Base::dispatch(i, [&]<std::size_t I>(std::integral_constant<std::size_t, I>) {
      return distill_module<I>(train, test, fo);
    });
  }

  // The ids of the files a hybrid was loaded from (optional out-parameter).
  struct Sources {
    std::string meta_id, teacher_id;
  };
  // The teacher's hybrid for module I: meta stages with teacher module I. Every teacher stage
  // file present must be of one split.
  template <std::size_t I>
  std::unique_ptr<Model<TeacherHybridArch<I>, B>> make_teacher_hybrid(std::string& inputs, Sources* from = nullptr) {
    auto hybrid = std::make_unique<Model<TeacherHybridArch<I>, B>>();
    std::string meta_id;
    inputs += this->template load_meta_except<I>(*hybrid, &meta_id);
    const auto m = this->load(hybrid->template stage<I>(), files_.teacher(I), "teacher", I);
    inputs += this->fingerprint(files_.teacher(I));
    this->current_lineage("teacher");  // the other teacher stage files, when present, are of the same split
    if (from) *from = {meta_id, m.at("lineage")};
    return hybrid;
  }
  // The student's hybrid for module I: meta stages (no drop-path) with a fresh student module I
  // (and its stitches), drop-path linspace(0, Options::hybrid_drop_path) over the module's blocks.
  template <std::size_t I>
  std::unique_ptr<Model<StudentHybridArch<I>, B>> make_student_hybrid(std::string& inputs, Sources* from = nullptr) {
    auto hybrid = std::make_unique<Model<StudentHybridArch<I>, B>>();
    Initializer init(seed_ + 2000 + I);
    hybrid->template stage<I>().reset_parameters(init);
    set_drop_path(student_module<I>(*hybrid), opt_.hybrid_drop_path);
    std::string meta_id;
    inputs += this->template load_meta_except<I>(*hybrid, &meta_id);
    if (from) from->meta_id = meta_id;
    return hybrid;
  }

  // Writes modules/stage<I> (the student module without its stitches) with its module id
  // ("lineage"), the meta id, the teacher id and the teacher hybrid's test accuracy, measured
  // before distilling (it should be near the teacher's own: else the teacher's module does not
  // fit these meta stages, and there is little to distil).
  template <std::size_t I>
  FitResult distill_module(const data::Dataset& train, const data::Dataset& test, FitOptions fo) {
    Sources t, s;
    auto teacher = make_teacher_hybrid<I>(fo.inputs, &t);
    const double teacher_accuracy = test.n > 0 ? evaluate(*teacher, test, fo.evaluation_batch()).accuracy : 0.0;
    if (fo.progress)
      std::fprintf(stderr, "distill%zu: the teacher's hybrid (meta stages, teacher module %zu) has test accuracy %.4f\n",
                   I, I, teacher_accuracy);
    char acc[32];
    std::snprintf(acc, sizeof acc, "%.4f", teacher_accuracy);
    auto student = make_student_hybrid<I>(fo.inputs, &s);
    // The two hybrids read the meta files one after the other: a meta phase that finished in
    // between would give them different meta models.
    require(t.meta_id == s.meta_id, files_.meta_dir().string(),
            "the meta model changed while module " + std::to_string(I) + " was being set up (meta id " + t.meta_id +
                " for the teacher's hybrid, " + s.meta_id + " for the student's); run distill(" +
                std::to_string(I) + ") again");
    FrozenExcept<Model<StudentHybridArch<I>, B>, I> view(*student);
    TeacherObjective objective(*teacher, opt_.alpha, opt_.temperature);
    fo.phase = "distill" + std::to_string(I);
    const auto r = fit(view, train, test, fo, objective);
    LineageHash h;
    h.add("module").add(this->tag_).add(seed_).add(std::uint64_t(I)).add(t.meta_id).add(t.teacher_id);
    h.add(lineage_recipe(fo)).add(std::to_string(opt_.alpha)).add(std::to_string(opt_.temperature));
    auto& module = student_module<I>(*student);
    h.parameters(module);
    this->save(module, files_.module(I), "module", I,
               {{"lineage", h.hex()}, {"meta_id", t.meta_id}, {"teacher_id", t.teacher_id},
                {"teacher_hybrid_accuracy", acc}});
    return r;
  }

  // Phase 4: reads assembled/stage<i>, trains the student end to end, writes finetuned/stage<i>.
  FitResult finetune(Student& student, const data::Dataset& train, const data::Dataset& test, FitOptions fo) {
    return this->finetune_target(student, train, test, std::move(fo), opt_.student_drop_path);
  }

 private:
  Options opt_;
};

}  // namespace hatch
