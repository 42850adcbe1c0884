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
// run as its own process (or machine) and one process can run them all. Phases 1, 3 and 4 are
// ModularRun's (modular_run.hpp), shared with m2mKD's ModuleDistiller. Each file records its
// lineage (modular/lineage.hpp): a module the meta model it was incubated on, and so on.
#include "hatch/modular/modular_run.hpp"

namespace hatch {

namespace width_error {
template <std::size_t Index>
struct incubated_stage {
  template <int MetaIn, int MetaOut>
  struct of_the_meta_model_maps_widths {
    template <int TargetIn, int TargetOut>
    struct but_the_target_module_maps {
      static_assert(MetaIn == TargetIn && MetaOut == TargetOut,
                    "hatch::Incubator: a target module does not fit the meta model (stage index and "
                    "both pairs of widths are on the 'In instantiation of' line above). Incubation "
                    "trains module i in place of stage i of the meta model, so their widths must "
                    "agree: use a meta model of the target's width (MetaOf<Target>: the target with "
                    "one block per stage), or give the target a Stitched<Stage, in, out> stage.");
      static constexpr bool reported = true;
    };
  };
};
}  // namespace width_error

// Whether every target module fits its meta stage; reports the first that does not.
template <class MetaArch, class TargetArch>
struct IncubationFit {
  static constexpr std::size_t K = MetaArch::num_stages;
  static constexpr bool same_count = K == TargetArch::num_stages;
  template <std::size_t I>
  static constexpr bool fits() {
    using M = typename MetaArch::template stage<I>;
    using T = typename TargetArch::template stage<I>;
    return M::in == T::in && M::out == T::out;
  }
  static constexpr int first_misfit() {
    if constexpr (!same_count) return -1;  // reported by the stage-count check
    else
      return []<std::size_t... I>(std::index_sequence<I...>) {
        int r = -1;
        ((r = r < 0 && !fits<I>() ? int(I) : r), ...);
        return r;
      }(std::make_index_sequence<K>{});
  }
  static constexpr int misfit = first_misfit();
  static constexpr bool report() {
    if constexpr (misfit < 0) return true;
    else {
      using M = typename MetaArch::template stage<std::size_t(misfit)>;
      using T = typename TargetArch::template stage<std::size_t(misfit)>;
      return width_error::incubated_stage<std::size_t(misfit)>::template of_the_meta_model_maps_widths<
          M::in, M::out>::template but_the_target_module_maps<T::in, T::out>::reported;
    }
  }
  static constexpr bool ok = same_count && misfit < 0;
};

// The hybrid of module I; on a misfit (already reported) the meta model, so no error follows.
template <bool Ok, class MetaArch, class TargetArch, std::size_t I>
struct IncubationHybrid {
  using type = MetaArch;
};
template <class MetaArch, class TargetArch, std::size_t I>
struct IncubationHybrid<true, MetaArch, TargetArch, I> {
  using type = ReplaceStage<MetaArch, I, typename TargetArch::template stage<I>>;
};

template <class MetaArch, class TargetArch, Backend B>
class Incubator : public ModularRun<MetaArch, B> {
  using Base = ModularRun<MetaArch, B>;
  using Base::files_;
  using Base::seed_;
  using Fit = IncubationFit<MetaArch, TargetArch>;

 public:
  static constexpr std::size_t K = Base::K;
  static_assert(Fit::same_count,
                "hatch::Incubator: the meta model and the target must have the same number of stages "
                "(MetaOf<Target> has the target's)");
  static_assert(Fit::report());
  template <std::size_t I>
  using HybridArch = typename IncubationHybrid<Fit::ok, MetaArch, TargetArch, I>::type;
  using Meta = typename Base::Meta;
  using Target = Model<TargetArch, B>;

  struct Options {
    std::filesystem::path dir = "out/incubation";
    std::string tag = "model";        // written into every file; checked when a phase reads it
    std::uint64_t seed = 0;
    double hybrid_drop_path = 0.1;    // linspace(0, rate, hybrid depth), active in frozen meta blocks
    double target_drop_path = 0.1;    // for fine-tuning
    // A data-parallel job's ranks (the FitOptions::collective of its phases): rank 0 writes the
    // files. Null for one process, and for module-parallel jobs (one module per process).
    std::shared_ptr<Collective> collective{};
  };

  explicit Incubator(Options o) : Base(o.dir, {}, o.tag, o.seed), opt_(std::move(o)) {
    this->collective_ = opt_.collective;
  }

  // Phase 2 for module i (chosen at run time): reads every meta stage, writes modules/stage<i>.
  FitResult incubate(std::size_t i, const data::Dataset& train, const data::Dataset& test, FitOptions fo) {
    require(i < K, "incubate", "module index " + std::to_string(i) + " is out of range [0, " + std::to_string(K) + ")");
    return Base::dispatch(i, [&]<std::size_t I>(std::integral_constant<std::size_t, I>) {
      return incubate_module<I>(train, test, fo);
    });
  }

  // The hybrid of module I with the pretrained meta stages loaded and a fresh module I.
  template <std::size_t I>
  std::unique_ptr<Model<HybridArch<I>, B>> make_hybrid() {
    std::string unused, meta_id;
    return make_hybrid<I>(unused, meta_id);
  }

  // Writes modules/stage<I> with its module id ("lineage") and the meta id it was trained on.
  template <std::size_t I>
  FitResult incubate_module(const data::Dataset& train, const data::Dataset& test, FitOptions fo) {
    std::string meta_id;
    auto hybrid = make_hybrid<I>(fo.inputs, meta_id);
    FrozenExcept<Model<HybridArch<I>, B>, I> view(*hybrid);
    fo.phase = "module" + std::to_string(I);
    const auto r = fit(view, train, test, fo);
    LineageHash h;
    h.add("module").add(this->tag_).add(seed_).add(std::uint64_t(I)).add(meta_id).add(lineage_recipe(fo));
    h.parameters(hybrid->template stage<I>());
    this->save(hybrid->template stage<I>(), files_.module(I), "module", I,
               {{"lineage", h.hex()}, {"meta_id", meta_id}});
    return r;
  }

  // Phase 4: reads assembled/stage<i>, trains end to end, writes finetuned/stage<i>.
  FitResult finetune(Target& target, const data::Dataset& train, const data::Dataset& test, FitOptions fo) {
    return this->finetune_target(target, train, test, std::move(fo), opt_.target_drop_path);
  }

 private:
  template <std::size_t I>
  std::unique_ptr<Model<HybridArch<I>, B>> make_hybrid(std::string& inputs, std::string& meta_id) {
    auto hybrid = std::make_unique<Model<HybridArch<I>, B>>();
    Initializer init(seed_ + 1000 + I);
    hybrid->template stage<I>().reset_parameters(init);  // fresh, not copied from the meta layer
    inputs += this->template load_meta_except<I>(*hybrid, &meta_id);
    set_drop_path(*hybrid, opt_.hybrid_drop_path);
    return hybrid;
  }

  Options opt_;
};

}  // namespace hatch
