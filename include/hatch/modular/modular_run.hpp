#pragma once
// What Deep Incubation (incubator.hpp) and m2mKD (distiller.hpp) share: the view that trains one
// stage of a hybrid through frozen meta stages, the per-stage file layout of a run, and the base
// class with the phases they have in common (meta pre-training, assembly, fine-tuning).
#include <zlib.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "hatch/compose/stages.hpp"
#include "hatch/core/aux_loss.hpp"
#include "hatch/io/staged_dir.hpp"
#include "hatch/modular/lineage.hpp"
#include "hatch/train/checkpoint.hpp"
#include "hatch/train/fit.hpp"

namespace hatch {

// A staged model seen with every stage frozen except Trainable: the frozen prefix runs forward
// only, the frozen suffix back-propagates input gradients but computes no weight gradients, and
// the trainable stage needs no input gradient. visit() shows only the trainable stage, so an
// optimizer built on this view holds exactly that module's parameters, and aux_loss() sums only
// that stage's auxiliary terms (core/aux_loss.hpp): a frozen stage's layers add nothing.
template <class StagesModel, std::size_t Trainable>
class FrozenExcept {
 public:
  using backend = typename StagesModel::backend;
  static constexpr std::size_t K = StagesModel::num_stages;
  static_assert(Trainable < K, "hatch::FrozenExcept: the trainable stage index is past the last stage");

  explicit FrozenExcept(StagesModel& m) : model_(m) {}

  const Tensor<backend>& forward(const Tensor<backend>& x, Context& ctx) { return model_.forward(x, ctx); }
  const Tensor<backend>& backward(const Tensor<backend>& dy, Context& ctx) { return backward_from<K - 1>(dy, ctx); }
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    model_.template stage<Trainable>().visit(f, prefix);
  }
  template <class F>
  void for_each_layer(F&& f) { model_.for_each_layer(f); }
  double aux_loss() { return collect_aux_loss(model_.template stage<Trainable>()); }
  StagesModel& model() { return model_; }

 private:
  template <std::size_t J>
  const Tensor<backend>& backward_from(const Tensor<backend>& dy, Context& ctx) {
    Context c = ctx;
    if constexpr (J == Trainable) {
      c.input_grad = false;  // nothing before the module trains
      return model_.template stage<J>().backward(dy, c);
    } else {
      c.param_grads = false;  // frozen suffix: input gradients only
      c.input_grad = true;
      const Tensor<backend>& d = model_.template stage<J>().backward(dy, c);
      const Tensor<backend>& r = backward_from<J - 1>(d, ctx);
      release_grad(ctx, d, dy, r);
      return r;
    }
  }
  StagesModel& model_;
};

// Where each phase keeps its per-stage files under the run directory. The meta model may live
// elsewhere (meta_root), so that distillation can reuse an incubation run's meta model.
struct ModularLayout {
  std::filesystem::path root;
  std::filesystem::path meta_root{};  // empty: root / "meta"
  std::filesystem::path meta_dir() const { return meta_root.empty() ? root / "meta" : meta_root; }
  std::filesystem::path teacher_dir() const { return root / "teacher"; }
  std::filesystem::path modules_dir() const { return root / "modules"; }
  std::filesystem::path assembled_dir() const { return root / "assembled"; }
  std::filesystem::path finetuned_dir() const { return root / "finetuned"; }
  std::filesystem::path meta(std::size_t i) const { return stage_file(meta_dir(), i); }
  std::filesystem::path teacher(std::size_t i) const { return stage_file(teacher_dir(), i); }
  std::filesystem::path module(std::size_t i) const { return stage_file(modules_dir(), i); }
  std::filesystem::path assembled(std::size_t i) const { return stage_file(assembled_dir(), i); }
  std::filesystem::path finetuned(std::size_t i) const { return stage_file(finetuned_dir(), i); }
};
using IncubationLayout = ModularLayout;

// The phases every modular method has: (1) pretrain the meta model end to end, (3) assemble
// the trained modules into the target, (4) fine-tune it. Phase (2), training module i inside
// the frozen meta model, is the derived class's. Every file is tagged with the run's tag, the
// phase that wrote it, its stage and its lineage (modular/lineage.hpp), and checked against
// them when read: a phase refuses inputs that come from different runs of an earlier phase.
// The phases that write K files (meta, assembly, fine-tuning, the teacher split) write them
// into a temporary directory that replaces the old one in one step (io/staged_dir.hpp), so a
// phase killed half-way leaves the previous complete set.
template <class MetaArch, Backend B>
class ModularRun {
 public:
  static constexpr std::size_t K = MetaArch::num_stages;
  using Meta = Model<MetaArch, B>;

  const ModularLayout& files() const { return files_; }

  // Called after each stage file of a K-file phase has been written into the phase's temporary
  // directory, before that directory replaces the visible one: (phase, stage, file). For
  // progress reports; an exception thrown here abandons the phase and leaves the previous files.
  std::function<void(const std::string& phase, std::size_t stage, const std::filesystem::path& file)>
      on_stage_written;

  // Phase 1: the meta model end to end; writes meta/stage<i>.safetensors, all K at once, with
  // the meta id ("lineage", "meta_id") of this model and recipe.
  FitResult pretrain_meta(const data::Dataset& train, const data::Dataset& test, FitOptions fo) {
    auto meta = std::make_unique<Meta>();
    Initializer init(seed_);
    meta->reset_parameters(init);
    fo.phase = "meta";
    const auto r = fit(*meta, train, test, fo);
    LineageHash h;
    h.add("meta").add(tag_).add(seed_).add(lineage_recipe(fo));
    meta->for_each_stage([&](auto& stage, std::size_t) { h.parameters(stage); });
    const std::string id = h.hex();
    write_stages(*meta, files_.meta_dir(), "meta", {{"lineage", id}, {"meta_id", id}});
    return r;
  }

  // Phase 3: module i into stage i of the target; writes assembled/stage<i>, all K at once.
  // Every module file is loaded and checked before anything is written: a missing or foreign
  // module, modules made against different meta models (or teachers), or against another meta
  // model than the one now in meta/, leave assembled/ as it was.
  template <class Target>
  void assemble(Target& target) {
    static_assert(Target::num_stages == K, "hatch: the target must have as many stages as the meta model");
    std::vector<LineageEntry> by_meta, by_teacher;
    std::string module_ids;
    std::vector<std::string> required = {"meta_id"};
    if (has_teacher_) required.push_back("teacher_id");
    // Tables the modules leave out (a NAC's codes and signatures, which its distillation
    // students never see) start fresh, drawn as a new model's would be.
    Initializer init(seed_ + 3000);
    target.reset_parameters(init);
    target.for_each_stage([&](auto& stage, std::size_t i) {
      const auto m = load(stage, files_.module(i), "module", i, required, {}, LoadOptions{.keep_missing_shared = true});
      by_meta.push_back({files_.module(i), i, m.at("meta_id")});
      if (has_teacher_) by_teacher.push_back({files_.module(i), i, m.at("teacher_id")});
      module_ids += (i ? "," : "") + m.at("lineage");
    });
    auto rerun = [&](const std::vector<std::size_t>& stages) { return rerun_hint("module", stages); };
    const std::string meta_now = current_lineage("meta");
    require_one_lineage(files_.modules_dir().string(), "the modules", "meta id", by_meta, meta_now,
                        "the meta model now in " + files_.meta_dir().string(), rerun);
    std::map<std::string, std::string> lineage = {{"meta_id", by_meta.front().id}, {"module_ids", module_ids}};
    LineageHash h;
    h.add("assembled").add(tag_).add(by_meta.front().id).add(module_ids);
    if (has_teacher_) {
      const std::string teacher_now = current_lineage("teacher");
      require_one_lineage(files_.modules_dir().string(), "the modules", "teacher id", by_teacher, teacher_now,
                          "the teacher split now in " + files_.teacher_dir().string(), rerun);
      lineage["teacher_id"] = by_teacher.front().id;
      h.add(by_teacher.front().id);
    }
    lineage["lineage"] = h.hex();
    write_stages(target, files_.assembled_dir(), "assembled", lineage);
  }

 protected:
  ModularRun(std::filesystem::path dir, std::filesystem::path meta_dir, std::string tag, std::uint64_t seed)
      : files_{std::move(dir), std::move(meta_dir)}, tag_(std::move(tag)), seed_(seed) {}

  // Phase 4: reads assembled/stage<i> (one assembly), trains end to end, writes
  // finetuned/stage<i>, all K at once.
  template <class Target>
  FitResult finetune_target(Target& target, const data::Dataset& train, const data::Dataset& test, FitOptions fo,
                            double drop_path) {
    std::vector<LineageEntry> parts;
    std::map<std::string, std::string> from;
    target.for_each_stage([&](auto& stage, std::size_t i) {
      auto m = load(stage, files_.assembled(i), "assembled", i, {"meta_id", "module_ids"});
      parts.push_back({files_.assembled(i), i, m.at("lineage")});
      if (i == 0) from = std::move(m);
    });
    require_one_lineage(files_.assembled_dir().string(), "the assembled model's stage files", "assembly id", parts,
                        "", "", [&](const std::vector<std::size_t>& s) { return rerun_hint("assembled", s); });
    set_drop_path(target, drop_path);
    fo.phase = "finetune";
    for (std::size_t i = 0; i < K; ++i) fo.inputs += fingerprint(files_.assembled(i));
    const auto r = fit(target, train, test, fo);
    LineageHash h;
    h.add("finetuned").add(tag_).add(seed_).add(from.at("lineage")).add(lineage_recipe(fo));
    target.for_each_stage([&](auto& stage, std::size_t) { h.parameters(stage); });
    std::map<std::string, std::string> lineage = {{"lineage", h.hex()},
                                                  {"meta_id", from.at("meta_id")},
                                                  {"module_ids", from.at("module_ids")},
                                                  {"assembly_id", from.at("lineage")}};
    if (auto it = from.find("teacher_id"); it != from.end()) lineage["teacher_id"] = it->second;
    write_stages(target, files_.finetuned_dir(), "finetuned", lineage);
    return r;
  }

  // Every meta stage except stage I into a hybrid; their fingerprints for the resume check. The
  // meta stage files must be of one meta model (stage I's too, when it is there, although it is
  // not loaded); *meta_id receives its id.
  template <std::size_t I, class Hybrid>
  std::string load_meta_except(Hybrid& hybrid, std::string* meta_id = nullptr) {
    std::string inputs;
    std::vector<LineageEntry> entries;
    hybrid.for_each_stage([&](auto& stage, std::size_t j) {
      if (j == I) return;
      entries.push_back({files_.meta(j), j, load(stage, files_.meta(j), "meta", j).at("lineage")});
      inputs += fingerprint(files_.meta(j));
    });
    if (std::filesystem::exists(files_.meta(I)))
      entries.insert(entries.begin() + std::ptrdiff_t(I),
                     {files_.meta(I), I, inspect(read_metadata(files_.meta(I)), files_.meta(I), "meta", I).at("lineage")});
    require_one_lineage(files_.meta_dir().string(), "the meta model's stage files", "meta id", entries, "", "",
                        [&](const std::vector<std::size_t>& s) { return rerun_hint("meta", s); });
    if (meta_id) *meta_id = entries.empty() ? std::string() : entries.front().id;
    return inputs;
  }

  // Writes every stage of `model` to dir/stage<i> through a StagedDirectory: the K files appear
  // together, replacing the previous ones, or not at all.
  template <class M>
  void write_stages(M& model, const std::filesystem::path& dir, const std::string& phase,
                    const std::map<std::string, std::string>& lineage) {
    if (writer()) {
      io::StagedDirectory staged(dir);
      model.for_each_stage([&](auto& stage, std::size_t i) {
        const auto file = stage_file(staged.dir(), i);
        save_file(stage, file, phase, i, lineage);
        if (on_stage_written) on_stage_written(phase, i, file);
      });
      staged.commit();
    }
    written();
  }

  // The id shared by the files of `phase` ("meta" or "teacher") that are present now, or ""
  // when there are none; their lineage must agree.
  std::string current_lineage(const std::string& phase) {
    std::vector<LineageEntry> entries;
    for (std::size_t i = 0; i < K; ++i) {
      const auto file = phase == "meta" ? files_.meta(i) : files_.teacher(i);
      if (std::filesystem::exists(file))
        entries.push_back({file, i, inspect(read_metadata(file), file, phase, i).at("lineage")});
    }
    const auto dir = phase == "meta" ? files_.meta_dir() : files_.teacher_dir();
    require_one_lineage(dir.string(), phase == "meta" ? "the meta model's stage files" : "the teacher's stage files",
                        phase + " id", entries, "", "",
                        [&](const std::vector<std::size_t>& s) { return rerun_hint(phase, s); });
    return entries.empty() ? std::string() : entries.front().id;
  }

  // What to run again to replace the files of `phase` for these stages.
  std::string rerun_hint(const std::string& phase, const std::vector<std::size_t>& stages) const {
    if (phase == "meta") return "Rerun the meta phase (pretrain_meta) to write all " + std::to_string(K) + " stage files again.";
    if (phase == "teacher") return "Split the teacher again (split_teacher) to write all its stage files.";
    if (phase == "assembled") return "Rerun the assembly (assemble).";
    if (phase == "module")
      return "Rerun the module phase (" + module_phase_ + "(i)) for module" + (stages.size() == 1 ? " " : "s ") +
             detail::stage_list(stages) + " on the current inputs.";
    return "Rerun the " + phase + " phase.";
  }

  // f(std::integral_constant<std::size_t, I>{}) for the run-time index i < K.
  template <class F>
  static decltype(auto) dispatch(std::size_t i, F&& f) {
    return dispatch_impl<0>(i, f);
  }

  // CRC-32 of a file's bytes: ties a resumable training state to the files it started from.
  static std::string fingerprint(const std::filesystem::path& file) { return file_fingerprint(file); }
  // Writes one stage file with the run's tag, the phase, the stage and its lineage entries.
  // (In a data-parallel job every rank holds the same weights: rank 0 writes, the others wait
  // until it has.)
  template <class S>
  void save(S& stage, const std::filesystem::path& file, const std::string& phase, std::size_t i,
            const std::map<std::string, std::string>& lineage) {
    if (writer()) save_file(stage, file, phase, i, lineage);
    written();
  }
  template <class S>
  void save_file(S& stage, const std::filesystem::path& file, const std::string& phase, std::size_t i,
                 const std::map<std::string, std::string>& lineage) {
    std::filesystem::create_directories(file.parent_path());
    auto meta = lineage;
    meta["tag"] = tag_for(phase);
    meta["phase"] = phase;
    meta["stage"] = std::to_string(i);
    save_parameters(stage, file, meta);
  }
  // Checks a file's metadata: this run's tag, `phase`, stage i, a lineage and the `required`
  // entries. Returns the metadata.
  // `tag` empty: the tag this run gives `phase`'s files (tag_for).
  std::map<std::string, std::string> inspect(std::map<std::string, std::string> meta, const std::filesystem::path& file,
                                             const std::string& phase, std::size_t i,
                                             const std::vector<std::string>& required = {},
                                             const std::string& tag = {}) const {
    detail::expect_metadata_in(file.string(), meta, "tag", tag.empty() ? tag_for(phase) : tag);
    detail::expect_metadata_in(file.string(), meta, "phase", phase);  // e.g. a meta file copied into modules/
    detail::expect_metadata_in(file.string(), meta, "stage", std::to_string(i));
    std::vector<std::string> keys = {"lineage"};
    keys.insert(keys.end(), required.begin(), required.end());
    for (const auto& key : keys)
      require(meta.count(key) && !meta.at(key).empty(), file.string(),
              "has no '" + key + "' metadata, which records what the file was made from (written by an " +
                  "earlier version of hatch, or not by a modular run). " + rerun_hint(phase, {i}));
    return meta;
  }
  // Loads stage i of `phase` from `file` after inspect()'s checks, reading the file once (the
  // metadata returned is that of the tensors loaded).
  template <class S>
  std::map<std::string, std::string> load(S& stage, const std::filesystem::path& file, const std::string& phase,
                                          std::size_t i, const std::vector<std::string>& required = {},
                                          const std::string& tag = {}, const LoadOptions& options = {}) {
    require(std::filesystem::exists(file), file.string(),
            "missing: the " + phase + " phase must run first and write stage " + std::to_string(i) + " here");
    const auto f = io::SafeTensorsFile::read(file);
    auto meta = inspect(detail::metadata_of(f), file, phase, i, required, tag);
    auto pending = detail::prepare(f, detail::parameter_slots(stage), options);
    detail::commit(pending);
    return meta;
  }

  // The tag of `phase`'s files: the run's, except for a meta model taken from another run.
  const std::string& tag_for(const std::string& phase) const {
    return phase == "meta" && !meta_tag_.empty() ? meta_tag_ : tag_;
  }

  // Data-parallel runs (every rank trains every phase together): only rank 0 writes files.
  bool writer() const { return !collective_ || collective_->rank() == 0; }
  void written() {
    if (collective_ && collective_->size() > 1) collective_->barrier();
  }

  ModularLayout files_;
  std::shared_ptr<Collective> collective_;  // set by the derived class's Options
  std::string tag_;
  std::string meta_tag_;  // the meta files' tag when they come from another run (empty: tag_)
  std::uint64_t seed_;
  std::string module_phase_ = "incubate";  // the derived class's phase 2, for messages
  bool has_teacher_ = false;               // modules carry a teacher_id (m2mKD)

 private:
  template <std::size_t I, class F>
  static decltype(auto) dispatch_impl(std::size_t i, F& f) {
    if constexpr (I + 1 == K) return f(std::integral_constant<std::size_t, I>{});
    else return i == I ? f(std::integral_constant<std::size_t, I>{}) : dispatch_impl<I + 1>(i, f);
  }
};

}  // namespace hatch
