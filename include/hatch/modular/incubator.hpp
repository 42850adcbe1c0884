#pragma once
// Deep Incubation (Ni et al., ICCV 2023) as a generic template over two staged models with the
// same number of stages K:
//   1. pretrain_meta  — train the small meta model end to end;
//   2. incubate(i)    — hybrid = meta with stage i replaced by a fresh target module i; only
//                       module i trains; the meta stages are frozen (gradients still flow
//                       through the stages after i); one independent job per module;
//   3. assemble       — load module i into stage i of the target;
//   4. finetune       — train the assembled target end to end.
// Every phase reads and writes per-stage safetensors files under one directory, so each can
// run as its own process (or machine) and one process can run them all.
#include <zlib.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <vector>
#include <map>
#include <string>
#include <utility>

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

// Where each phase keeps its per-stage files under the run directory.
struct IncubationLayout {
  std::filesystem::path root;
  std::filesystem::path meta(std::size_t i) const { return stage_file(root / "meta", i); }
  std::filesystem::path module(std::size_t i) const { return stage_file(root / "modules", i); }
  std::filesystem::path assembled(std::size_t i) const { return stage_file(root / "assembled", i); }
  std::filesystem::path finetuned(std::size_t i) const { return stage_file(root / "finetuned", i); }
};

template <class MetaArch, class TargetArch, Backend B>
class Incubator {
 public:
  static constexpr std::size_t K = MetaArch::num_stages;
  static_assert(K == TargetArch::num_stages,
                "hatch::Incubator: the meta model and the target must have the same number of stages");
  template <std::size_t I>
  using HybridArch = ReplaceStage<MetaArch, I, typename TargetArch::template stage<I>>;
  using Meta = Model<MetaArch, B>;
  using Target = Model<TargetArch, B>;

  struct Options {
    std::filesystem::path dir = "out/incubation";
    std::string tag = "model";        // written into every file; checked when a phase reads it
    std::uint64_t seed = 0;
    double hybrid_drop_path = 0.1;    // linspace(0, rate, hybrid depth), active in frozen meta blocks
    double target_drop_path = 0.1;    // for fine-tuning
  };

  explicit Incubator(Options o) : opt_(std::move(o)), files_{opt_.dir} {}
  const IncubationLayout& files() const { return files_; }

  // Phase 1: the meta model end to end; writes meta/stage<i>.safetensors.
  FitResult pretrain_meta(const data::Dataset& train, const data::Dataset& test, FitOptions fo) {
    auto meta = std::make_unique<Meta>();
    Initializer init(opt_.seed);
    meta->reset_parameters(init);
    fo.phase = "meta";
    const auto r = fit(*meta, train, test, fo);
    meta->for_each_stage([&](auto& stage, std::size_t i) { save(stage, files_.meta(i), "meta", i); });
    return r;
  }

  // Phase 2 for module i (chosen at run time): reads every meta stage, writes modules/stage<i>.
  FitResult incubate(std::size_t i, const data::Dataset& train, const data::Dataset& test, FitOptions fo) {
    require(i < K, "incubate", "module index " + std::to_string(i) + " is out of range [0, " + std::to_string(K) + ")");
    return dispatch(i, [&]<std::size_t I>(std::integral_constant<std::size_t, I>) {
      return incubate_module<I>(train, test, fo);
    });
  }

  // The hybrid of module I with the pretrained meta stages loaded and a fresh module I.
  template <std::size_t I>
  std::unique_ptr<Model<HybridArch<I>, B>> make_hybrid() {
    auto hybrid = std::make_unique<Model<HybridArch<I>, B>>();
    Initializer init(opt_.seed + 1000 + I);
    hybrid->template stage<I>().reset_parameters(init);  // fresh, not copied from the meta layer
    hybrid->for_each_stage([&](auto& stage, std::size_t j) {
      if (j != I) load(stage, files_.meta(j), "meta", j);
    });
    set_drop_path(*hybrid, opt_.hybrid_drop_path);
    return hybrid;
  }

  template <std::size_t I>
  FitResult incubate_module(const data::Dataset& train, const data::Dataset& test, FitOptions fo) {
    auto hybrid = make_hybrid<I>();
    FrozenExcept<Model<HybridArch<I>, B>, I> view(*hybrid);
    fo.phase = "module" + std::to_string(I);
    for (std::size_t j = 0; j < K; ++j)
      if (j != I) fo.inputs += fingerprint(files_.meta(j));
    const auto r = fit(view, train, test, fo);
    save(hybrid->template stage<I>(), files_.module(I), "module", I);
    return r;
  }

  // Phase 3: module i into stage i of the target; writes assembled/stage<i>. Every module file
  // is loaded (and checked) before any assembled file is written, so a missing or foreign
  // module leaves assembled/ as it was instead of half replaced.
  void assemble(Target& target) {
    target.for_each_stage([&](auto& stage, std::size_t i) { load(stage, files_.module(i), "module", i); });
    target.for_each_stage([&](auto& stage, std::size_t i) { save(stage, files_.assembled(i), "assembled", i); });
  }

  // Phase 4: reads assembled/stage<i>, trains end to end, writes finetuned/stage<i>.
  FitResult finetune(Target& target, const data::Dataset& train, const data::Dataset& test, FitOptions fo) {
    target.for_each_stage([&](auto& stage, std::size_t i) { load(stage, files_.assembled(i), "assembled", i); });
    set_drop_path(target, opt_.target_drop_path);
    fo.phase = "finetune";
    for (std::size_t i = 0; i < K; ++i) fo.inputs += fingerprint(files_.assembled(i));
    const auto r = fit(target, train, test, fo);
    target.for_each_stage([&](auto& stage, std::size_t i) { save(stage, files_.finetuned(i), "finetuned", i); });
    return r;
  }

 private:
  template <class F>
  static decltype(auto) dispatch(std::size_t i, F&& f) {
    return dispatch_impl<0>(i, f);
  }
  template <std::size_t I, class F>
  static decltype(auto) dispatch_impl(std::size_t i, F& f) {
    if constexpr (I + 1 == K) return f(std::integral_constant<std::size_t, I>{});
    else return i == I ? f(std::integral_constant<std::size_t, I>{}) : dispatch_impl<I + 1>(i, f);
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
    save_parameters(stage, file, {{"tag", opt_.tag}, {"phase", phase}, {"stage", std::to_string(i)}});
  }
  template <class S>
  void load(S& stage, const std::filesystem::path& file, const std::string& phase, std::size_t i) {
    require(std::filesystem::exists(file), file.string(),
            "missing: the " + phase + " phase must run first and write stage " + std::to_string(i) + " here");
    expect_metadata(file, "tag", opt_.tag);
    expect_metadata(file, "phase", phase);  // e.g. a meta file copied into modules/
    expect_metadata(file, "stage", std::to_string(i));
    load_parameters(stage, file);
  }

  Options opt_;
  IncubationLayout files_;
};

}  // namespace hatch
