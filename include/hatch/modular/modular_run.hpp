#pragma once
// What Deep Incubation (incubator.hpp) and m2mKD (distiller.hpp) share: the view that trains one
// stage of a hybrid through frozen meta stages, the per-stage file layout of a run, and the base
// class with the phases they have in common (meta pre-training, assembly, fine-tuning).
#include <zlib.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "hatch/compose/stages.hpp"
#include "hatch/train/checkpoint.hpp"
#include "hatch/train/fit.hpp"

namespace hatch {

// A staged model seen with every stage frozen except Trainable: the frozen prefix runs forward
// only, the frozen suffix back-propagates input gradients but computes no weight gradients, and
// the trainable stage needs no input gradient. visit() shows only the trainable stage, so an
// optimizer built on this view holds exactly that module's parameters.
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
      return backward_from<J - 1>(d, ctx);
    }
  }
  StagesModel& model_;
};

// Where each phase keeps its per-stage files under the run directory. The meta model may live
// elsewhere (meta_root), so that distillation can reuse an incubation run's meta model.
struct ModularLayout {
  std::filesystem::path root;
  std::filesystem::path meta_root{};  // empty: root / "meta"
  std::filesystem::path meta(std::size_t i) const {
    return stage_file(meta_root.empty() ? root / "meta" : meta_root, i);
  }
  std::filesystem::path teacher(std::size_t i) const { return stage_file(root / "teacher", i); }
  std::filesystem::path module(std::size_t i) const { return stage_file(root / "modules", i); }
  std::filesystem::path assembled(std::size_t i) const { return stage_file(root / "assembled", i); }
  std::filesystem::path finetuned(std::size_t i) const { return stage_file(root / "finetuned", i); }
};
using IncubationLayout = ModularLayout;

// The phases every modular method has: (1) pretrain the meta model end to end, (3) assemble
// the trained modules into the target, (4) fine-tune it. Phase (2), training module i inside
// the frozen meta model, is the derived class's. Every file is tagged with the run's tag, the
// phase that wrote it and its stage, and checked against them when read.
template <class MetaArch, Backend B>
class ModularRun {
 public:
  static constexpr std::size_t K = MetaArch::num_stages;
  using Meta = Model<MetaArch, B>;

  const ModularLayout& files() const { return files_; }

  // Phase 1: the meta model end to end; writes meta/stage<i>.safetensors.
  FitResult pretrain_meta(const data::Dataset& train, const data::Dataset& test, FitOptions fo) {
    auto meta = std::make_unique<Meta>();
    Initializer init(seed_);
    meta->reset_parameters(init);
    fo.phase = "meta";
    const auto r = fit(*meta, train, test, fo);
    meta->for_each_stage([&](auto& stage, std::size_t i) { save(stage, files_.meta(i), "meta", i); });
    return r;
  }

  // Phase 3: module i into stage i of the target; writes assembled/stage<i>. Every module file
  // is loaded (and checked) before any assembled file is written, so a missing or foreign
  // module leaves assembled/ as it was instead of half replaced.
  template <class Target>
  void assemble(Target& target) {
    static_assert(Target::num_stages == K, "hatch: the target must have as many stages as the meta model");
    target.for_each_stage([&](auto& stage, std::size_t i) { load(stage, files_.module(i), "module", i); });
    target.for_each_stage([&](auto& stage, std::size_t i) { save(stage, files_.assembled(i), "assembled", i); });
  }

 protected:
  ModularRun(std::filesystem::path dir, std::filesystem::path meta_dir, std::string tag, std::uint64_t seed)
      : files_{std::move(dir), std::move(meta_dir)}, tag_(std::move(tag)), seed_(seed) {}

  // Phase 4: reads assembled/stage<i>, trains end to end, writes finetuned/stage<i>.
  template <class Target>
  FitResult finetune_target(Target& target, const data::Dataset& train, const data::Dataset& test, FitOptions fo,
                            double drop_path) {
    target.for_each_stage([&](auto& stage, std::size_t i) { load(stage, files_.assembled(i), "assembled", i); });
    set_drop_path(target, drop_path);
    fo.phase = "finetune";
    for (std::size_t i = 0; i < K; ++i) fo.inputs += fingerprint(files_.assembled(i));
    const auto r = fit(target, train, test, fo);
    target.for_each_stage([&](auto& stage, std::size_t i) { save(stage, files_.finetuned(i), "finetuned", i); });
    return r;
  }

  // Every meta stage except stage I into a hybrid; their fingerprints for the resume check.
  template <std::size_t I, class Hybrid>
  std::string load_meta_except(Hybrid& hybrid) {
    std::string inputs;
    hybrid.for_each_stage([&](auto& stage, std::size_t j) {
      if (j == I) return;
      load(stage, files_.meta(j), "meta", j);
      inputs += fingerprint(files_.meta(j));
    });
    return inputs;
  }

  // f(std::integral_constant<std::size_t, I>{}) for the run-time index i < K.
  template <class F>
  static decltype(auto) dispatch(std::size_t i, F&& f) {
    return dispatch_impl<0>(i, f);
  }

  // CRC-32 of a file's bytes: ties a resumable training state to the files it started from.
  static std::string fingerprint(const std::filesystem::path& file) {
    std::ifstream in(file, std::ios::binary);
    require(bool(in), file.string(), "cannot open for reading");
    std::vector<char> buf(1 << 16);
    uLong crc = crc32(0L, Z_NULL, 0);
    while (in) {
      in.read(buf.data(), std::streamsize(buf.size()));
      crc = crc32(crc, reinterpret_cast<const Bytef*>(buf.data()), uInt(in.gcount()));
    }
    char hex[16];
    std::snprintf(hex, sizeof hex, "%08lx", static_cast<unsigned long>(crc));
    return hex;
  }
  template <class S>
  void save(S& stage, const std::filesystem::path& file, const std::string& phase, std::size_t i) {
    std::filesystem::create_directories(file.parent_path());
    save_parameters(stage, file, {{"tag", tag_}, {"phase", phase}, {"stage", std::to_string(i)}});
  }
  template <class S>
  void load(S& stage, const std::filesystem::path& file, const std::string& phase, std::size_t i) {
    require(std::filesystem::exists(file), file.string(),
            "missing: the " + phase + " phase must run first and write stage " + std::to_string(i) + " here");
    expect_metadata(file, "tag", tag_);
    expect_metadata(file, "phase", phase);  // e.g. a meta file copied into modules/
    expect_metadata(file, "stage", std::to_string(i));
    load_parameters(stage, file);
  }

  ModularLayout files_;
  std::string tag_;
  std::uint64_t seed_;

 private:
  template <std::size_t I, class F>
  static decltype(auto) dispatch_impl(std::size_t i, F& f) {
    if constexpr (I + 1 == K) return f(std::integral_constant<std::size_t, I>{});
    else return i == I ? f(std::integral_constant<std::size_t, I>{}) : dispatch_impl<I + 1>(i, f);
  }
};

}  // namespace hatch
