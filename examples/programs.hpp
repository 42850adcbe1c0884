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
  bool hflip = false, no_progress = false, no_resume = false, tf32 = false, tf32x3 = false, lr_per_epoch = false;
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
  // The data of a modular program's phase: none for --phase assemble, which reads only files.
  hatch::data::Dataset load_for_phase(bool train, const std::string& phase) const {
    return phase == "assemble" ? hatch::data::Dataset{} : load(train);
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
  // Before any training: a data set whose images are not the preset's is refused at once (an
  // empty one, as --phase assemble loads, is not checked).
  template <class V>
  void check_images(const hatch::data::Dataset& train, const hatch::data::Dataset& test) const {
    for (const auto* set : {&train, &test})
      if (set->n > 0)
        hatch::data::expect_image_shape(*set, V::spec.channels, V::spec.image, V::spec.image, "preset " + preset);
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

// ---- the programs, per preset ---------------------------------------------------------------
// Each program's body for one preset, defined in program_bodies.hpp and instantiated once per
// backend in that preset's instance file (examples/presets/, instances.hpp); the dispatchers
// below only declare them, so the programs' own translation units instantiate no model.
using hatch::data::Dataset;
template <class B, class V>
int train_e2e_as(const E2eOptions& a, const Dataset& train, const Dataset& test);
template <class B, class V>
int incubate_as(const IncubateOptions& a, const Dataset& train, const Dataset& test);
// The phases of Deep Incubation that `a.phase` names, of preset V on train/test. Returns the
// last phase's result, with the training images and seconds of every phase run (distill's meta
// phase incubates its teacher with it).
template <class B, class V>
hatch::FitResult incubation_phases(const IncubateOptions& a, const Dataset& train, const Dataset& test,
                                   double* images_out = nullptr, double* seconds_out = nullptr);
template <class B, class TV, class SV>
int distill_as(const DistillOptions& a, const Dataset& train, const Dataset& test, const std::string& student);

// The presets a program can run, chosen by name: every preset built into the programs. A build
// that instantiates fewer passes its own set with the same three members as the programs' second
// template argument (tests/cuda_on_cpu/programs_cuda.cpp: vit-micro alone, on the stand-ins).
struct BuiltInPresets {
  template <class F>
  static int e2e(const std::string& name, F&& f) {
    return hatch::with_e2e_preset(name, std::forward<F>(f));
  }
  template <class F>
  static int vit(const std::string& name, F&& f) {
    return hatch::with_preset(name, std::forward<F>(f));
  }
  template <class F>
  static int distill_pair(const std::string& teacher, const std::string& student, F&& f) {
    return with_distill_pair(teacher, student, std::forward<F>(f));
  }
};

// End-to-end training. Last stdout line: test_accuracy=0.XXXX (with --ood, ood_accuracy=0.XXXX
// before it).
template <class B, class Presets = BuiltInPresets>
int train_e2e(const E2eOptions& a) {
  const auto& c = a.common;
  hatch::require(!c.module_parallel(), "train_e2e",
                 "running as one of " + std::to_string(c.ranks()) +
                     " MPI ranks: pass --distributed to train data-parallel, or run a single process");
  const auto train = c.load(true), test = c.load(false);
  return Presets::e2e(c.preset, [&]<class V>(std::type_identity<V>) {
    c.check_images<V>(train, test);
    return train_e2e_as<B, V>(a, train, test);
  });
}

// Deep Incubation, one phase or all. Last stdout line: test_accuracy=0.XXXX (or, for
// --phase assemble, where the assembled model went); with --ood, ood_accuracy=0.XXXX before it.
template <class B, class Presets = BuiltInPresets>
int incubate(const IncubateOptions& a) {
  const auto& c = a.common;
  c.check_ood(a.phase);
  const auto train = c.load_for_phase(true, a.phase), test = c.load_for_phase(false, a.phase);
  return Presets::vit(c.preset, [&]<class V>(std::type_identity<V>) {
    c.check_images<V>(train, test);
    return incubate_as<B, V>(a, train, test);
  });
}

// m2mKD (ALGORITHMS.md §2), one phase or all (program_bodies.hpp, distill_as, says what each does).
template <class B, class Presets = BuiltInPresets>
int distill(const DistillOptions& a) {
  const auto& c = a.common;
  c.check_ood(a.phase, /*teacher_phase=*/true);
  const auto train = c.load_for_phase(true, a.phase), test = c.load_for_phase(false, a.phase);
  return Presets::distill_pair(c.preset, a.student, [&]<class TV, class SV>(std::type_identity<TV>, std::type_identity<SV>,
                                                                            const std::string& student) {
    c.check_images<TV>(train, test);
    return distill_as<B, TV, SV>(a, train, test, student);
  });
}

// The Cuda instantiations, defined in cuda_<program>.cu; without a CUDA build (no_cuda.cpp) they
// throw a hatch::Error that says so.
int train_e2e_cuda(const E2eOptions& a);
int incubate_cuda(const IncubateOptions& a);
int distill_cuda(const DistillOptions& a);

}  // namespace examples
