#pragma once
// The example programs' bodies, one function template per program and preset, declared in
// programs.hpp. Only the instance files (examples/presets/*.cpp) include this header: each
// instantiates the programs of one preset (instances.hpp), so that a parallel build compiles the
// presets side by side and a program's own translation unit instantiates none of them.
#include "programs.hpp"

namespace examples {

// End-to-end training of preset V (programs.hpp: train_e2e).
template <class B, class V>
int train_e2e_as(const E2eOptions& a, const Dataset& train, const Dataset& test) {
  using namespace hatch;
  const auto& c = a.common;
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
    std::printf("epochs=%d train_images=%d seconds=%.2f\n", result.epochs, train.n, result.seconds);
    c.print_ood(result);
    std::printf("test_accuracy=%.4f\n", result.test.accuracy);
  }
  return 0;
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

// The phases of Deep Incubation that `a.phase` names (programs.hpp).
template <class B, class V>
hatch::FitResult incubation_phases(const IncubateOptions& a, const Dataset& train, const Dataset& test,
                                   double* images_out, double* seconds_out) {
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
template <class B, class V>
int incubate_as(const IncubateOptions& a, const Dataset& train, const Dataset& test) {
  const auto& c = a.common;
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
}

// m2mKD (ALGORITHMS.md §2), one phase or all:
//   meta     — the teacher and its meta model from a finished Deep Incubation run (--teacher-dir,
//              or <out>/teacher-run, incubated here first when it is not there);
//   module   — distil student module --index (every module: -1);
//   assemble, finetune — as in Deep Incubation.
// Last stdout line: test_accuracy=0.XXXX (or, for --phase assemble, where the student went);
// with --ood, ood_accuracy=0.XXXX before it.
template <class B, class TV, class SV>
int distill_as(const DistillOptions& a, const Dataset& train, const Dataset& test, const std::string& student) {
  using namespace hatch;
  const auto& c = a.common;
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
}

}  // namespace examples
