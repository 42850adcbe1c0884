#pragma once
// What the example programs do, written once for any backend. train_e2e.cpp and incubate.cpp
// parse flags into the option structs below and call the Cpu instantiation, or, for
// `--device cuda`, the Cuda one compiled by nvcc in cuda_<program>.cu. This header therefore
// includes only backend-independent parts of hatch (no Eigen, no CLI11).
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <type_traits>

#include <hatch/core.hpp>
#include <hatch/distributed/collective.hpp>
#include <hatch/modular/distiller.hpp>
#include <hatch/modular/incubator.hpp>
#include <hatch/train/fit.hpp>

namespace examples {

// Flags every example shares.
struct CommonOptions {
  std::string preset = "vit-tiny";
  std::string data = hatch::data::kFashionMnistDir;
  std::string out = "out";
  std::string device = "cpu";
  int batch = 128, threads = 0, train_limit = 0, test_limit = 0;  // threads 0: every usable core
  int eval_every = 1;
  double lr = 2e-3, min_lr = 1e-5, warmup_epochs = 1, weight_decay = 0.05, clip = 0;
  double label_smoothing = 0.1, drop_path = 0, mixup = 0, cutmix = 0, mix_prob = 1.0;
  int crop_padding = 0;
  bool hflip = false, no_progress = false, no_resume = false, tf32 = false, lr_per_epoch = false;
  bool balanced = false;  // --train-limit N takes the first N / 10 images of each class
  bool distributed = false;  // data-parallel over the MPI job's ranks
  bool ood = false;          // the final model also on data::shifted(test): ood_accuracy=
  std::shared_ptr<hatch::Collective> world;  // the MPI job (null: a build without MPI)
  int rank() const { return world ? world->rank() : 0; }
  int ranks() const { return world ? world->size() : 1; }
  // Several ranks without --distributed: each module phase's jobs are spread over the ranks,
  // the other phases run on rank 0 while the others wait.
  bool module_parallel() const { return ranks() > 1 && !distributed; }
  // Waits for every rank (module-parallel runs); nothing in a single process.
  void sync() const {
    if (ranks() > 1) world->barrier();
  }
  std::uint64_t seed = 0;

  hatch::FitOptions fit_options(int epochs, const std::string& phase) const {
    hatch::FitOptions o;
    o.epochs = epochs;
    o.batch = batch;
    o.lr = lr;
    o.min_lr = min_lr;
    o.warmup_epochs = warmup_epochs;
    o.lr_per_epoch = lr_per_epoch;
    o.eval_every = eval_every;
    if (distributed) o.collective = world;
    o.progress = !no_progress && rank() == 0;
    o.weight_decay = weight_decay;
    o.clip = clip;
    o.augment = {.crop_padding = crop_padding, .hflip = hflip, .mixup_alpha = float(mixup),
                 .cutmix_alpha = float(cutmix), .mix_prob = float(mix_prob),
                 .label_smoothing = float(label_smoothing)};
    o.seed = seed;
    o.phase = phase;
    o.out = out;
    o.resume = !no_resume;
    o.resume_hint = "pass --no-resume to start afresh (the state is overwritten)";
    o.recipe["preset"] = preset;
    if (balanced) o.recipe["balanced"] = true;
    return o;
  }
  hatch::data::Dataset load(bool train) const {
    if (train && balanced && train_limit > 0)
      return hatch::data::balanced_first(hatch::data::load_fashion_mnist(data, true, 0), train_limit);
    return hatch::data::load_fashion_mnist(data, train, train ? train_limit : test_limit);
  }
  // NAC models (--nac-prior, --nac-dense): the graph prior of the next reset and dense
  // attention; refused for a model without them. Call before reset and assembly.
  std::string nac_prior = "scale-free";
  bool nac_dense = false;
  template <class M>
  void configure(M& model, hatch::FitOptions* fo = nullptr) const {
    if constexpr (requires { model.use_prior(hatch::NacPrior::scale_free); }) {
      model.use_prior(hatch::nac_prior_from(nac_prior));
      model.use_dense_attention(nac_dense);
      if (fo) {
        fo->recipe["nac-prior"] = nac_prior;
        fo->recipe["nac-dense"] = nac_dense;
      }
    } else {
      hatch::require(nac_prior == "scale-free" && !nac_dense, nac_dense ? "--nac-dense" : "--nac-prior",
                     "applies to a NAC model only (train_e2e --preset nac-small, distill --student nac)");
    }
  }
  // With --ood, the out-of-distribution set made from the test set (data/shift.hpp); else null.
  std::shared_ptr<const hatch::data::Dataset> ood_set(const hatch::data::Dataset& test) const {
    return ood ? std::make_shared<const hatch::data::Dataset>(hatch::data::shifted(test)) : nullptr;
  }
  // --ood applies to the phases that end with the final model (and, with teacher_phase, to
  // distill's meta phase, which evaluates the teacher).
  void check_ood(const std::string& phase, bool teacher_phase = false) const {
    hatch::require(!ood || phase == "all" || phase == "finetune" || (teacher_phase && phase == "meta"), "--ood",
                   std::string("applies to --phase all or finetune, whose fine-tuned model it evaluates") +
                       (teacher_phase ? " (or meta, the teacher)" : "") + "; --phase " + phase + " has none");
  }
  // "ood_accuracy=0.XXXX" when the result has one: the line before test_accuracy=.
  static void print_ood(const hatch::FitResult& r) {
    if (r.ood) std::printf("ood_accuracy=%.4f\n", r.ood->accuracy);
  }
  // Before any training: a data set whose images are not the preset's is refused at once.
  template <class V>
  void check_images(const hatch::data::Dataset& set) const {
    if (set.n == 0) return;
    hatch::data::expect_image_shape(set, V::spec.channels, V::spec.image, V::spec.image, "preset " + preset);
  }
};

struct E2eOptions {
  CommonOptions common;
  int epochs = 3;
  std::string init;  // a model.safetensors to start from instead of a fresh initialisation
};

struct IncubateOptions {
  CommonOptions common;
  std::string phase = "all";
  int index = -1, epochs_meta = 2, epochs_module = 1, epochs_finetune = 2;
  double hybrid_drop_path = 0.1, finetune_drop_path = 0.1, finetune_clip = 1.0, finetune_lr = 5e-4;
};

// End-to-end training. Last stdout line: test_accuracy=0.XXXX (with --ood, ood_accuracy=0.XXXX
// before it).
template <class B>
int train_e2e(const E2eOptions& a) {
  const auto& c = a.common;
  hatch::require(!c.module_parallel(), "train_e2e",
                 "running as one of " + std::to_string(c.ranks()) +
                     " MPI ranks: pass --distributed to train data-parallel, or run a single process");
  const auto train = c.load(true), test = c.load(false);
  return hatch::with_e2e_preset(c.preset, [&]<class V>(std::type_identity<V>) {
    using namespace hatch;
    c.check_images<V>(train);
    c.check_images<V>(test);
    auto model = std::make_unique<Model<V, B>>();
    auto fo = c.fit_options(a.epochs, "e2e");
    c.configure(*model, &fo);
    Initializer init(c.seed);
    model->reset_parameters(init);
    if (!a.init.empty()) {
      expect_metadata(a.init, "preset", c.preset);
      load_parameters(*model, a.init);
      fo.recipe["init"] = a.init + " (crc32 " + file_fingerprint(a.init) + ")";
      std::fprintf(stderr, "e2e: starting from the weights in %s\n", a.init.c_str());
    }
    set_drop_path(*model, c.drop_path);
    fo.recipe["drop-path"] = c.drop_path;
    fo.ood = c.ood_set(test);
    const auto result = fit(*model, train, test, fo);
    if (c.rank() == 0) {
      save_parameters(*model, std::filesystem::path(c.out) / "model.safetensors", {{"preset", c.preset}});
      std::printf("epochs=%d train_images=%d seconds=%.1f\n", result.epochs, train.n, result.seconds);
      c.print_ood(result);
      std::printf("test_accuracy=%.4f\n", result.test.accuracy);
    }
    return 0;
  });
}

// What the phases of a modular program (incubate, distill) share: which rank runs what, the
// running totals of training images and seconds, and each phase's FitOptions. Module-parallel
// (several ranks, no --distributed): rank r takes modules r, r + R, ...; the other phases run on
// rank 0 while the others wait for their files.
struct ModularPhases {
  const CommonOptions& c;
  double finetune_lr, finetune_clip, finetune_drop_path, hybrid_drop_path;
  nlohmann::json recipe = nlohmann::json::object();         // the program's entries, every phase
  nlohmann::json module_recipe = nlohmann::json::object();  // ... and those of meta and module phases
  double images = 0, seconds = 0;
  hatch::FitResult last;
  std::shared_ptr<const hatch::data::Dataset> ood;  // --ood: evaluated after fine-tuning

  bool lead() const { return !c.module_parallel() || c.rank() == 0; }
  bool mine(std::size_t i) const { return !c.module_parallel() || int(i % std::size_t(c.ranks())) == c.rank(); }
  void account(const hatch::FitResult& r) {
    images += r.images;
    seconds += r.seconds;
    last = r;
  }
  // Fine-tuning: its own peak rate, no warmup, its clip (ALGORITHMS.md §1).
  hatch::FitOptions options(int epochs, bool finetune) const {
    auto o = c.fit_options(epochs, "");
    for (const auto& [k, v] : recipe.items()) o.recipe[k] = v;
    if (finetune) {
      o.lr = finetune_lr;
      o.warmup_epochs = 0;
      o.clip = finetune_clip;
      o.recipe["finetune-drop-path"] = finetune_drop_path;
      o.ood = ood;
    } else {
      o.recipe["hybrid-drop-path"] = hybrid_drop_path;
      for (const auto& [k, v] : module_recipe.items()) o.recipe[k] = v;
    }
    o.images_before = images;
    o.seconds_before = seconds;
    return o;
  }
};

// The phases of Deep Incubation that `a.phase` names, of preset V on train/test. Returns the
// last phase's result, with the training images and seconds of every phase run.
template <class B, class V>
hatch::FitResult incubation_phases(const IncubateOptions& a, const hatch::data::Dataset& train,
                                   const hatch::data::Dataset& test, double* images_out = nullptr,
                                   double* seconds_out = nullptr) {
  using namespace hatch;
  const auto& c = a.common;
  using Inc = Incubator<presets::MetaOf<V>, V, B>;
  Inc inc({.dir = std::filesystem::path(c.out), .tag = c.preset, .seed = c.seed,
           .hybrid_drop_path = a.hybrid_drop_path, .target_drop_path = a.finetune_drop_path,
           .collective = c.distributed ? c.world : nullptr});
  ModularPhases p{c, a.finetune_lr, a.finetune_clip, a.finetune_drop_path, a.hybrid_drop_path};
  const auto& phase = a.phase;
  if (phase == "meta" || phase == "all") {
    if (p.lead()) p.account(inc.pretrain_meta(train, test, p.options(a.epochs_meta, false)));
    c.sync();
  }
  if (phase == "module" || phase == "all") {
    require(phase == "all" || a.index < int(Inc::K), "--index",
            "must be below the number of stages, " + std::to_string(Inc::K));
    for (std::size_t i = 0; i < Inc::K; ++i)
      if ((a.index < 0 || std::size_t(a.index) == i) && p.mine(i))
        p.account(inc.incubate(i, train, test, p.options(a.epochs_module, false)));
    c.sync();
  }
  if ((phase == "assemble" || phase == "finetune" || phase == "all") && p.lead()) {
    auto target = std::make_unique<Model<V, B>>();
    if (phase != "finetune") inc.assemble(*target);
    if (phase != "assemble") p.ood = c.ood_set(test);
    if (phase != "assemble") p.account(inc.finetune(*target, train, test, p.options(a.epochs_finetune, true)));
  }
  if (images_out) *images_out = p.images;
  if (seconds_out) *seconds_out = p.seconds;
  return p.last;
}

// Deep Incubation, one phase or all. Last stdout line: test_accuracy=0.XXXX (or, for
// --phase assemble, where the assembled model went); with --ood, ood_accuracy=0.XXXX before it.
template <class B>
int incubate(const IncubateOptions& a) {
  const auto& c = a.common;
  c.check_ood(a.phase);
  const bool needs_data = a.phase != "assemble";
  const auto train = needs_data ? c.load(true) : hatch::data::Dataset{};
  const auto test = needs_data ? c.load(false) : hatch::data::Dataset{};
  return hatch::with_preset(c.preset, [&]<class V>(std::type_identity<V>) {
    c.check_images<V>(train);
    c.check_images<V>(test);
    double images = 0, seconds = 0;
    const auto last = incubation_phases<B, V>(a, train, test, &images, &seconds);
    if (c.rank() != 0) return 0;  // rank 0 reports for the job
    std::printf("phase=%s train_images_processed=%.0f training_seconds=%.1f\n", a.phase.c_str(), images, seconds);
    if (a.phase == "assemble") {
      std::printf("assembled %zu modules into %s\n", hatch::presets::MetaOf<V>::num_stages,
                  (std::filesystem::path(c.out) / "assembled").c_str());
      return 0;
    }
    c.print_ood(last);
    std::printf("test_accuracy=%.4f\n", last.test.accuracy);
    return 0;
  });
}

// ---- m2mKD -------------------------------------------------------------------------------------

struct DistillOptions {
  CommonOptions common;          // --preset is the teacher's
  std::string student = "moe";   // vit (the teacher's preset), moe (m2mKD's MoE student), or a preset
  std::string teacher_dir;       // a finished incubate run of --preset; empty: <out>/teacher-run
  std::string phase = "all";
  int index = -1, epochs_module = 1, epochs_finetune = 2;
  int teacher_epochs_meta = 2, teacher_epochs_module = 1, teacher_epochs_finetune = 2;
  double alpha = 0.5, temperature = 1.0, hybrid_drop_path = 0.1, finetune_drop_path = 0.1;
  double finetune_clip = 1.0, finetune_lr = 5e-4;
};

// The (teacher, student) presets the distill program instantiates: f receives
// std::type_identity<Teacher>{}, std::type_identity<Student>{} and the student's preset name.
inline std::string student_preset(const std::string& teacher, const std::string& student) {
  if (student == "vit") return teacher;
  if (student == "moe") return teacher == "vit-small" ? "moe-student-small" : "";
  if (student == "nac") return teacher == "vit-small" ? "nac-small" : "";
  return student;
}
inline constexpr const char* kDistillPairs =
    "vit-micro > vit-micro, vit-tiny > vit-tiny, vit-small > vit-small, vit-small > moe-student-small, "
    "vit-small > nac-small";
template <class F>
int with_distill_pair(const std::string& teacher, const std::string& student, F&& f) {
  using namespace hatch::presets;
  const auto s = student_preset(teacher, student);
  if (teacher == "vit-micro" && s == "vit-micro") return f(std::type_identity<VitMicro>{}, std::type_identity<VitMicro>{}, s);
  if (teacher == "vit-tiny" && s == "vit-tiny") return f(std::type_identity<VitTiny>{}, std::type_identity<VitTiny>{}, s);
  if (teacher == "vit-small" && s == "vit-small") return f(std::type_identity<VitSmall>{}, std::type_identity<VitSmall>{}, s);
  if (teacher == "vit-small" && s == "moe-student-small")
    return f(std::type_identity<VitSmall>{}, std::type_identity<MoeStudentSmall>{}, s);
  if (teacher == "vit-small" && s == "nac-small")
    return f(std::type_identity<VitSmall>{}, std::type_identity<NacSmall>{}, s);
  throw hatch::Error("--student " + student + ": " +
                     (s.empty() ? std::string("there is no ") + (student == "nac" ? "NAC" : "mixture-of-experts") +
                                      " student of the shape of --preset " + teacher
                                : "no student preset '" + s + "' staged like the teacher --preset " + teacher) +
                     " is built into this program (teacher > student: " + kDistillPairs + ")");
}

// m2mKD (ALGORITHMS.md §2), one phase or all:
//   meta     — the teacher and its meta model from a finished Deep Incubation run (--teacher-dir,
//              or <out>/teacher-run, incubated here first when it is not there);
//   module   — distil student module --index (every module: -1);
//   assemble, finetune — as in Deep Incubation.
// Last stdout line: test_accuracy=0.XXXX (or, for --phase assemble, where the student went);
// with --ood, ood_accuracy=0.XXXX before it.
template <class B>
int distill(const DistillOptions& a) {
  const auto& c = a.common;
  c.check_ood(a.phase, /*teacher_phase=*/true);
  const bool needs_data = a.phase != "assemble";
  const auto train = needs_data ? c.load(true) : hatch::data::Dataset{};
  const auto test = needs_data ? c.load(false) : hatch::data::Dataset{};
  return with_distill_pair(c.preset, a.student, [&]<class TV, class SV>(std::type_identity<TV>, std::type_identity<SV>,
                                                                        const std::string& student) {
    using namespace hatch;
    c.check_images<TV>(train);
    c.check_images<TV>(test);
    using Meta = presets::MetaOf<TV>;
    using Kd = ModuleDistiller<Meta, TV, SV, B>;
    const std::filesystem::path out(c.out);
    const std::filesystem::path run = a.teacher_dir.empty() ? out / "teacher-run" : std::filesystem::path(a.teacher_dir);
    Kd kd({.dir = out, .meta_dir = run / "meta", .meta_tag = c.preset, .tag = c.preset + ">" + student,
           .seed = c.seed, .alpha = a.alpha, .temperature = a.temperature, .hybrid_drop_path = a.hybrid_drop_path,
           .student_drop_path = a.finetune_drop_path, .collective = c.distributed ? c.world : nullptr});
    ModularPhases p{c, a.finetune_lr, a.finetune_clip, a.finetune_drop_path, a.hybrid_drop_path};
    p.recipe["student"] = student;
    p.module_recipe["alpha"] = a.alpha;
    p.module_recipe["temperature"] = a.temperature;
    const auto& phase = a.phase;
    if (phase == "meta" || phase == "all") {
      if (a.teacher_dir.empty() && !std::filesystem::exists(stage_file(run / "finetuned", 0))) {
        // No teacher given or trained yet: incubate one (its own phases resume as incubate's do).
        IncubateOptions t{.common = c, .phase = "all", .epochs_meta = a.teacher_epochs_meta,
                          .epochs_module = a.teacher_epochs_module, .epochs_finetune = a.teacher_epochs_finetune};
        t.common.out = run.string();
        t.finetune_lr = a.finetune_lr;
        t.finetune_clip = a.finetune_clip;
        t.finetune_drop_path = a.finetune_drop_path;
        t.hybrid_drop_path = a.hybrid_drop_path;
        double ti = 0, ts = 0;
        incubation_phases<B, TV>(t, train, test, &ti, &ts);
        if (c.rank() == 0)
          std::printf("teacher: incubated in %s, train_images_processed=%.0f training_seconds=%.1f\n", run.c_str(), ti,
                      ts);
      }
      if (p.lead()) {
        auto teacher = kd.take_teacher(run, c.preset);
        const int eval_batch = c.fit_options(0, "").evaluation_batch();
        const auto t = evaluate(*teacher, test, eval_batch);
        std::string ood_part;
        if (c.ood) {  // the teacher out of distribution too
          p.last.ood = evaluate(*teacher, *c.ood_set(test), eval_batch);
          char buf[48];
          std::snprintf(buf, sizeof buf, ", ood_accuracy=%.4f", p.last.ood->accuracy);
          ood_part = buf;
        }
        if (c.rank() == 0)
          std::printf("teacher: %s from %s%s, test_accuracy=%.4f\n", c.preset.c_str(), run.c_str(), ood_part.c_str(),
                      t.accuracy);
        p.last.test = t;
      }
      c.sync();
    }
    if (phase == "module" || phase == "all") {
      require(phase == "all" || a.index < int(Kd::K), "--index",
              "must be below the number of stages, " + std::to_string(Kd::K));
      for (std::size_t i = 0; i < Kd::K; ++i)
        if ((a.index < 0 || std::size_t(a.index) == i) && p.mine(i)) {
          p.account(kd.distill(i, train, test, p.options(a.epochs_module, false)));
          if (c.module_parallel() || c.rank() == 0)
            std::printf("module %zu: teacher_hybrid_accuracy=%s student_hybrid_accuracy=%.4f\n", i,
                      read_metadata(kd.files().module(i)).at("teacher_hybrid_accuracy").c_str(), p.last.test.accuracy);
        }
      c.sync();
    }
    if ((phase == "assemble" || phase == "finetune" || phase == "all") && p.lead()) {
      auto target = std::make_unique<typename Kd::Student>();
      if (phase != "assemble") p.ood = c.ood_set(test);
      auto fo = p.options(a.epochs_finetune, true);
      c.configure(*target, &fo);
      if (phase != "finetune") kd.assemble(*target);
      if (phase != "assemble") p.account(kd.finetune(*target, train, test, fo));
    }
    if (c.rank() != 0) return 0;  // rank 0 reports for the job (module lines: each rank its own)
    std::printf("phase=%s student=%s train_images_processed=%.0f training_seconds=%.1f\n", phase.c_str(),
                student.c_str(), p.images, p.seconds);
    if (phase == "assemble") {
      std::printf("assembled %zu modules into %s\n", Kd::K, kd.files().assembled_dir().c_str());
      return 0;
    }
    c.print_ood(p.last);
    std::printf("test_accuracy=%.4f\n", p.last.test.accuracy);
    return 0;
  });
}

// The Cuda instantiations, defined in cuda_<program>.cu; without a CUDA build (no_cuda.cpp) they
// throw a hatch::Error that says so.
int train_e2e_cuda(const E2eOptions& a);
int incubate_cuda(const IncubateOptions& a);
int distill_cuda(const DistillOptions& a);

}  // namespace examples
