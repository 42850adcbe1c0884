#pragma once
// Stages<S0, ..., SK-1>: a model split into K modules. Each stage is a layer; a stage's
// parameters keep their model-wide names (blocks.5.* stays blocks.5.* wherever stage 2 goes).
// ReplaceStage<Model, I, Module> is the type-level operation behind Deep Incubation and m2mKD.
#include <cstddef>
#include <tuple>
#include <utility>

#include "hatch/compose/sequential.hpp"
#include "hatch/layers/linear.hpp"

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

template <class... Specs>
struct Stages {
  static_assert(sizeof...(Specs) > 0, "hatch::Stages needs at least one stage");
  static_assert((!requires { Specs::name; } && ...),
                "hatch::Stages: a stage cannot be Named: stage files are saved and loaded without a "
                "prefix, so the stage's own layers must carry their full names");
  static_assert(widths_agree<Specs...>());
  static constexpr std::size_t num_stages = sizeof...(Specs);
  static constexpr int in = first_width<Specs...>(), out = last_width<Specs...>();
  using stages_type = Stages;
  template <Backend B> using bind = StagesLayer<B, Specs...>;
  template <std::size_t I> using stage = std::tuple_element_t<I, std::tuple<Specs...>>;
};

// ---- ReplaceStage ----------------------------------------------------------------------------
template <std::size_t Stage, int ModuleIn, int ModuleOut, int StageIn, int StageOut>
struct StageWidthMismatch {
  static_assert(Stage > 1000000,
                "hatch::ReplaceStage: the module's widths <ModuleIn -> ModuleOut> differ from the "
                "widths of the stage it replaces <StageIn -> StageOut>. Wrap the module in "
                "Stitched<Module, StageIn, StageOut> to adapt it.");
  using type = void;
};

// Models derived from Stages (Vit) are handled as the Stages they are.
template <class Model, std::size_t I, class Module>
struct ReplaceStageImpl : ReplaceStageImpl<typename Model::stages_type, I, Module> {};

template <class... S, std::size_t I, class Module>
struct ReplaceStageImpl<Stages<S...>, I, Module> {
  static_assert(I < sizeof...(S), "hatch::ReplaceStage: the stage index is past the last stage");
  using Old = std::tuple_element_t<I, std::tuple<S...>>;
  static constexpr bool same_widths = Old::in == Module::in && Old::out == Module::out;
  template <std::size_t... J>
  static auto make(std::index_sequence<J...>) -> Stages<std::conditional_t<J == I, Module, S>...>;
  using type = typename std::conditional_t<
      same_widths, std::type_identity<decltype(make(std::index_sequence_for<S...>{}))>,
      StageWidthMismatch<I, Module::in, Module::out, Old::in, Old::out>>::type;
};

template <class Model, std::size_t I, class Module>
using ReplaceStage = typename ReplaceStageImpl<Model, I, Module>::type;

// A module of another width made to fit a stage: Linear stitches on both sides (m2mKD).
// The stitches are named stitch_in / stitch_out and dropped at assembly.
template <class Module, int In, int Out = In>
using Stitched = Sequential<Named<"stitch_in", Linear<In, Module::in>>, Module,
                            Named<"stitch_out", Linear<Module::out, Out>>>;

}  // namespace hatch
