#pragma once
// Stages<S0, ..., SK-1>: a model split into K modules. Each stage is a layer; a stage's
// parameters keep their model-wide names (blocks.5.* stays blocks.5.* wherever stage 2 goes).
// ReplaceStage<Model, I, Module> is the type-level operation behind Deep Incubation and m2mKD.
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#include "hatch/compose/sequential.hpp"
#include "hatch/layers/linear.hpp"
#include "hatch/layers/norm.hpp"

namespace hatch {

template <Backend B, class... Specs>
class StagesLayer : public SequentialLayer<B, Specs...> {
  using Base = SequentialLayer<B, Specs...>;

 public:
  static constexpr std::size_t num_stages = sizeof...(Specs);
  template <std::size_t I> auto& stage() { return this->template get<I>(); }

  // Calls f(stage, index) for every stage, in order.
  template <class F>
  void for_each_stage(F&& f) {
    for_each_stage_impl(f, std::index_sequence_for<Specs...>{});
  }
  // Runs one stage chosen at run time (the Incubator's modules are chosen by flag).
  template <class F>
  decltype(auto) with_stage(std::size_t i, F&& f) {
    return with_stage_impl<0>(i, f);
  }

 private:
  template <class F, std::size_t... I>
  void for_each_stage_impl(F& f, std::index_sequence<I...>) {
    (f(stage<I>(), I), ...);
  }
  template <std::size_t I, class F>
  decltype(auto) with_stage_impl(std::size_t i, F& f) {
    if constexpr (I + 1 == num_stages) return f(stage<I>());
    else return i == I ? f(stage<I>()) : with_stage_impl<I + 1>(i, f);
  }
};

template <Backend B, class NumberedList>
struct StagesLayerOf;
template <Backend B, class... S>
struct StagesLayerOf<B, numbering::List<S...>> {
  using type = StagesLayer<B, S...>;
};

template <std::size_t I, class List>
struct StageAt;
template <std::size_t I, class... S>
struct StageAt<I, numbering::List<S...>> {
  using type = std::tuple_element_t<I, std::tuple<S...>>;
};

// The stages' automatic Repeats are numbered across the whole model (stage 1's blocks continue
// where stage 0's stop), and stage<I> is the numbered type: see "automatic numbering" in
// sequential.hpp.
template <class... Specs>
struct Stages {
  static_assert(sizeof...(Specs) > 0, "hatch::Stages needs at least one stage");
  static_assert((!requires { Specs::name; } && ...),
                "hatch::Stages: a stage cannot be Named: stage files are saved and loaded without a "
                "prefix, so the stage's own layers must carry their full names");
  static_assert(stage_widths_agree<Specs...>());
  static constexpr std::size_t num_stages = sizeof...(Specs);
  static constexpr int in = first_width<Specs...>(), out = last_width<Specs...>();
  using stages_type = Stages;
  using stage_list = typename numbering::RenumberList<numbering::kRoot, numbering::Counts<>, numbering::List<>,
                                                      Specs...>::done;
  template <Backend B> using bind = typename StagesLayerOf<B, stage_list>::type;
  template <std::size_t I> using stage = typename StageAt<I, stage_list>::type;
};
// ---- ReplaceStage ----------------------------------------------------------------------------
namespace width_error {
template <std::size_t Index>
struct replaced_stage {
  template <int StageIn, int StageOut>
  struct maps_widths {
    template <int ModuleIn, int ModuleOut>
    struct but_the_module_maps {
      static_assert(StageIn == ModuleIn && StageOut == ModuleOut,
                    "hatch::ReplaceStage: the module's widths (in, out) differ from the widths of "
                    "the stage it replaces (stage index and both pairs of widths are on the 'In "
                    "instantiation of' line above). Wrap the module in "
                    "Stitched<Module, stage in, stage out> to adapt it.");
      static constexpr bool reported = true;
    };
  };
};
}  // namespace width_error

template <class StageList, std::size_t I, class Module, class Model>
struct ReplaceStageIn;
template <class... S, std::size_t I, class Module, class Model>
struct ReplaceStageIn<numbering::List<S...>, I, Module, Model> {
  static_assert(I < sizeof...(S), "hatch::ReplaceStage: the stage index is past the last stage");
  using Old = std::tuple_element_t<(I < sizeof...(S) ? I : 0), std::tuple<S...>>;
  static constexpr bool same_widths = Old::in == Module::in && Old::out == Module::out;
  static constexpr bool check() {
    if constexpr (same_widths) return true;
    else return width_error::replaced_stage<I>::template maps_widths<Old::in, Old::out>::
        template but_the_module_maps<Module::in, Module::out>::reported;
  }
  static_assert(check());
  template <std::size_t... J>
  static auto make(std::index_sequence<J...>) -> Stages<std::conditional_t<J == I, Module, S>...>;
  // On a mismatch (already reported) the model itself, so that no error follows from it.
  using type = std::conditional_t<same_widths && I < sizeof...(S),
                                  decltype(make(std::index_sequence_for<S...>{})), Model>;
};

// Works on Stages and on models derived from it (Vit), with the stages numbered as in Model.
template <class Model, std::size_t I, class Module>
using ReplaceStage = typename ReplaceStageIn<typename Model::stage_list, I, Module, Model>::type;

// ---- MetaOf ----------------------------------------------------------------------------------
// The meta model of Deep Incubation for a staged target: the same stages with every Repeat cut
// to one copy (the "one block per module" meta model of the paper), numbered afresh. A model
// that wants another meta model says so with a member `using meta_model = ...;` (Vit keeps its
// Depths<1, ..., 1>), or by specialising MetaFor<Target>.
namespace shallow {
template <class Spec>
struct Cut {
  using type = Spec;
};
template <class Spec>
  requires requires { typename Spec::named_spec; }
struct Cut<Spec> {
  using type = typename Spec::template rename<typename Cut<typename Spec::named_spec>::type>;
};
template <class Spec>
  requires requires { typename Spec::wrapped_spec; }
struct Cut<Spec> {
  using type = typename Spec::template rewrap<typename Cut<typename Spec::wrapped_spec>::type>;
};
template <int N, class S, int Start>
struct Cut<Repeat<N, S, Start>> {
  using type = Repeat<(N > 0 ? 1 : 0), S>;
};
template <class... S>
struct Cut<Sequential<S...>> {
  using type = Sequential<typename Cut<S>::type...>;
};
template <class StageList>
struct CutStages;
template <class... S>
struct CutStages<numbering::List<S...>> {
  using type = Stages<typename Cut<S>::type...>;
};
}  // namespace shallow

template <class Target>
struct MetaFor {
  using type = typename shallow::CutStages<typename Target::stage_list>::type;
};
template <class Target>
  requires requires { typename Target::meta_model; }
struct MetaFor<Target> {
  using type = typename Target::meta_model;
};
template <class Target>
using MetaOf = typename MetaFor<Target>::type;

// A module of another width made to fit a stage: Linear stitches on both sides, named
// stitch_in / stitch_out. A stage of a user's own model may be Stitched for good; m2mKD's
// distiller instead stitches only where it must (StitchTo below) and drops the stitches.
template <class Module, int In, int Out = In>
using Stitched = Sequential<Named<"stitch_in", Linear<In, Module::in>>, Module,
                            Named<"stitch_out", Linear<Module::out, Out>>>;

// ---- stitches that come and go (m2mKD, ALGORITHMS.md §2) ----------------------------------------
// A stitch policy maps width From to width To: a Linear (m2mKD's NAC runs), or LayerNorm and a
// Linear (its V-MoE runs).
template <int From, int To>
using LinearStitch = Linear<From, To>;
template <int From, int To>
using NormLinearStitch = Sequential<Named<"norm", LayerNorm<From>>, Named<"proj", Linear<From, To>>>;

// StitchTo<Module, In, Out, Stitch>: Module made to map In -> Out, with a stitch only on a side
// whose width differs (stitch_in before it, stitch_out after it); Module itself where both
// agree. ::type is the spec, ::module_index where Module sits in it (-1: it is Module), and
// StitchTo::module(layer) gives the bound Module inside a bound ::type, the part that is kept.
template <class Module, int In, int Out, template <int, int> class Stitch = LinearStitch>
struct StitchTo {
  static constexpr bool before = In != Module::in, after = Out != Module::out;
  using In_ = Named<"stitch_in", Stitch<In, Module::in>>;
  using Out_ = Named<"stitch_out", Stitch<Module::out, Out>>;
  using type = std::conditional_t<
      before, std::conditional_t<after, Sequential<In_, Module, Out_>, Sequential<In_, Module>>,
      std::conditional_t<after, Sequential<Module, Out_>, Module>>;
  static constexpr int module_index = before ? 1 : after ? 0 : -1;
  template <class Layer>
  static auto& module(Layer& layer) {
    if constexpr (module_index < 0) return layer;
    else return layer.template get<std::size_t(module_index)>();
  }
};

}  // namespace hatch
