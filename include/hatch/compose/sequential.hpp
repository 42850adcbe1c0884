#pragma once
// Composition as types: Named, Sequential, Residual, Repeat, AsBlock. A spec is an empty type with
// `in`/`out` widths and `template <Backend B> using bind`; binding a composite binds its
// children. Widths are checked when a composite spec is instantiated.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#include "hatch/compose/model.hpp"
#include "hatch/core/layer.hpp"
#include "hatch/core/parameter.hpp"

namespace hatch {

// A string usable as a template argument: Named<"attn", Attention<...>>.
template <std::size_t N>
struct FixedString {
  char value[N]{};
  constexpr FixedString(const char (&s)[N]) { std::copy_n(s, N, value); }
  constexpr std::string_view view() const { return {value, N - 1}; }
};

// Gives a child its parameter-name prefix (timm names: "norm1", "attn", "mlp", ...).
template <FixedString Name, class Spec>
struct Named {
  static constexpr int in = Spec::in, out = Spec::out;
  static constexpr std::string_view name = Name.view();
  using named_spec = Spec;
  template <class S> using rename = Named<Name, S>;
  template <Backend B> using bind = typename Spec::template bind<B>;
};

template <class Spec>
std::string child_prefix(const std::string& prefix) {
  if constexpr (requires { Spec::name; }) return prefix + std::string(Spec::name) + ".";
  else return prefix;  // unnamed children are transparent
}

// ---- width checking --------------------------------------------------------------------------
struct WidthCheck {
  int index = -1, produced = kAnyWidth, expected = kAnyWidth;  // index -1: all widths agree
};
template <class... S>
constexpr WidthCheck check_widths() {
  constexpr std::array<int, sizeof...(S)> ins{S::in...}, outs{S::out...};
  int w = kAnyWidth;
  for (std::size_t i = 0; i < sizeof...(S); ++i) {
    if (ins[i] != kAnyWidth && w != kAnyWidth && ins[i] != w) return {int(i), w, ins[i]};
    if (outs[i] != kAnyWidth) w = outs[i];
  }
  return {};
}
template <class... S>
constexpr int first_width() {
  constexpr std::array<int, sizeof...(S)> ins{S::in...}, outs{S::out...};
  for (std::size_t i = 0; i < sizeof...(S); ++i)
    if (ins[i] != kAnyWidth) return ins[i];
    else if (outs[i] != kAnyWidth) return kAnyWidth;  // a width-keeping prefix then a change
  return kAnyWidth;
}
template <class... S>
constexpr int last_width() {
  constexpr std::array<int, sizeof...(S)> outs{S::out...};
  for (std::size_t i = sizeof...(S); i-- > 0;)
    if (outs[i] != kAnyWidth) return outs[i];
  return kAnyWidth;
}

// Composition errors as sentences. C++20 cannot put numbers into a static_assert message, so
// each error is a chain of nested templates whose names and arguments read as the sentence,
// e.g. g++'s first line about it is
//   In instantiation of 'struct hatch::width_error::layer<2, hatch::Linear<48, 10> >
//     ::expects_input_width<48>::but_the_layers_before_it_produce<64>'
// and the static_assert below it says what to do. Each is instantiated only on a mismatch, and
// `reported` is true so that the composite using it adds no second error.
namespace width_error {
template <std::size_t Index, class Layer>
struct layer {
  template <int Expected>
  struct expects_input_width {
    template <int Produced>
    struct but_the_layers_before_it_produce {
      static_assert(Produced == Expected,
                    "hatch::Sequential: a layer's input width differs from the output width of the "
                    "layers before it (layer index, layer type and both widths are on the 'In "
                    "instantiation of' line above). Make the widths agree, or insert "
                    "Linear<produced, expected> between the two layers.");
      static constexpr bool reported = true;
    };
  };
};
template <std::size_t Index>
struct stage {
  template <int Expected>
  struct expects_input_width {
    template <int Produced>
    struct but_the_stages_before_it_produce {
      static_assert(Produced == Expected,
                    "hatch::Stages: a stage's input width differs from the output width of the "
                    "stage before it (stage index and both widths are on the 'In instantiation "
                    "of' line above). Make the widths agree, or wrap the stage in "
                    "Stitched<Stage, produced> to adapt it.");
      static constexpr bool reported = true;
    };
  };
};
template <class Branch>
struct residual_branch {
  template <int In>
  struct maps_width {
    template <int Out>
    struct to {
      static_assert(In == Out,
                    "hatch::Residual: the wrapped layer changes the width (in and out are on the "
                    "'In instantiation of' line above), so its output cannot be added to its "
                    "input. Wrap only width-keeping layers in Residual.");
      static constexpr bool reported = true;
    };
  };
};
template <class Repeated>
struct repeated_layer {
  template <int In>
  struct maps_width {
    template <int Out>
    struct to {
      static_assert(In == Out,
                    "hatch::Repeat: the repeated layer changes the width (in and out are on the "
                    "'In instantiation of' line above), so copy i+1 cannot take copy i's output. "
                    "Repeat only width-keeping layers.");
      static constexpr bool reported = true;
    };
  };
};
}  // namespace width_error

template <class... S>
constexpr bool widths_agree() {
  constexpr WidthCheck c = check_widths<S...>();
  using Layer = std::tuple_element_t<std::size_t(c.index < 0 ? 0 : c.index), std::tuple<S...>>;
  if constexpr (c.index >= 0)
    return width_error::layer<std::size_t(c.index), Layer>::template expects_input_width<
        c.expected>::template but_the_layers_before_it_produce<c.produced>::reported;
  else return true;
}
template <class... S>
constexpr bool stage_widths_agree() {
  constexpr WidthCheck c = check_widths<S...>();
  if constexpr (c.index >= 0)
    return width_error::stage<std::size_t(c.index)>::template expects_input_width<
        c.expected>::template but_the_stages_before_it_produce<c.produced>::reported;
  else return true;
}
// True, after reporting the error when a width-keeping wrapper gets a width-changing layer.
template <class Spec, template <class> class Error>
constexpr bool keeps_width() {
  if constexpr (Spec::in != Spec::out && Spec::in != kAnyWidth && Spec::out != kAnyWidth)
    return Error<Spec>::template maps_width<Spec::in>::template to<Spec::out>::reported;
  else return true;
}

// ---- automatic numbering of Repeat copies ----------------------------------------------------
// Repeat<N, Spec> without a Start is numbered after the copies that come before it under the
// same parameter-name prefix in the enclosing Sequential or Stages: in
//   Stages<Sequential<Named<"blocks", Repeat<2, X>>>, Sequential<Named<"blocks", Repeat<3, X>>>>
// stage 0 holds blocks.0-1 and stage 1 blocks.2-4, as timm numbers a flat list of blocks. The
// numbers become part of the stage types (Stages::stage<I> is Repeat<3, X, 2>), so a stage keeps
// its names wherever it goes (a hybrid, a stage file). An explicit Start is kept as written.
inline constexpr int kAutoStart = -1;

template <int N, class Spec, int Start = kAutoStart>
struct Repeat;
template <class... Specs>
struct Sequential;

namespace numbering {
constexpr std::uint64_t extend(std::uint64_t path, std::string_view name) {
  std::uint64_t h = path ^ 0x2e;  // '.'
  h *= 0x100000001b3ULL;
  for (char c : name) h = (h ^ std::uint64_t(static_cast<unsigned char>(c))) * 0x100000001b3ULL;
  return h;
}
inline constexpr std::uint64_t kRoot = 0xcbf29ce484222325ULL;

// The next free copy number of every prefix seen so far (the last entry for a prefix wins).
template <std::uint64_t Path, int Next> struct Count {};
template <class... C> struct Counts {};

template <std::uint64_t Path, std::uint64_t... P, int... N>
constexpr int next(Counts<Count<P, N>...>) {
  int r = 0;
  ((r = P == Path ? N : r), ...);
  return r;
}
template <class C, std::uint64_t Path, int Next> struct Set;
template <class... C, std::uint64_t Path, int Next>
struct Set<Counts<C...>, Path, Next> {
  using type = Counts<C..., Count<Path, Next>>;
};

template <class... T> struct List {};

// Renumber<Spec, Path, C>: type = Spec with its automatic Repeats numbered; counts = C after it.
template <class Spec, std::uint64_t Path, class C>
struct Renumber {
  using type = Spec;
  using counts = C;
};
template <class Spec, std::uint64_t Path, class C>
  requires requires { typename Spec::named_spec; }
struct Renumber<Spec, Path, C> {
  using R = Renumber<typename Spec::named_spec, extend(Path, Spec::name), C>;
  using type = typename Spec::template rename<typename R::type>;
  using counts = typename R::counts;
};
template <class Spec, std::uint64_t Path, class C>
  requires requires { typename Spec::wrapped_spec; }
struct Renumber<Spec, Path, C> {
  using R = Renumber<typename Spec::wrapped_spec, Path, C>;
  using type = typename Spec::template rewrap<typename R::type>;
  using counts = typename R::counts;
};
template <int N, class S, int Start, std::uint64_t Path, class C>
struct Renumber<Repeat<N, S, Start>, Path, C> {
  static constexpr int first = Start == kAutoStart ? next<Path>(C{}) : Start;
  static constexpr int last = std::max(next<Path>(C{}), first + N);
  using type = Repeat<N, S, first>;
  using counts = typename Set<C, Path, last>::type;
};

// Numbers a list of siblings in order; done = List<numbered siblings...>.
template <std::uint64_t Path, class C, class Done, class... Rest>
struct RenumberList {
  using done = Done;
  using counts = C;
};
template <std::uint64_t Path, class C, class... Done, class S0, class... Rest>
struct RenumberList<Path, C, List<Done...>, S0, Rest...>
    : RenumberList<Path, typename Renumber<S0, Path, C>::counts, List<Done..., typename Renumber<S0, Path, C>::type>,
                   Rest...> {};

template <class... S, std::uint64_t Path, class C>
struct Renumber<Sequential<S...>, Path, C> {
  using R = RenumberList<Path, C, List<>, S...>;
  template <class L> struct Apply;
  template <class... T> struct Apply<List<T...>> { using type = Sequential<T...>; };
  using type = typename Apply<typename R::done>::type;
  using counts = typename R::counts;
};
}  // namespace numbering

// ---- Sequential ------------------------------------------------------------------------------
template <Backend B, class... Specs>
class SequentialLayer {
 public:
  using backend = B;
  static constexpr int in = first_width<Specs...>(), out = last_width<Specs...>();
  static constexpr std::size_t size = sizeof...(Specs);

  void reset_parameters(Initializer& init) {
    std::apply([&](auto&... l) { (l.reset_parameters(init), ...); }, layers_);
  }
  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    const Tensor<B>* h = &x;
    std::apply([&](auto&... l) { ((h = &l.forward(*h, ctx)), ...); }, layers_);
    return *h;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    return backward_from<size - 1>(dy, ctx);
  }
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    visit_children(f, prefix, std::index_sequence_for<Specs...>{});
  }
  template <class F>
  void for_each_layer(F&& f) {
    std::apply([&](auto&... l) { (l.for_each_layer(f), ...); }, layers_);
  }
  template <std::size_t I> auto& get() { return std::get<I>(layers_); }
  template <std::size_t I> const auto& get() const { return std::get<I>(layers_); }

 private:
  template <std::size_t I>
  const Tensor<B>& backward_from(const Tensor<B>& dy, Context& ctx) {
    // Only the first layer is asked what the Sequential was asked (ctx.input_grad); the others
    // always pass the gradient on.
    // Each child's gradient goes back to the pool (core/grad_pool.hpp) once the child before
    // it has read it.
    if constexpr (I == 0) {
      return std::get<0>(layers_).backward(dy, ctx);
    } else {
      const Tensor<B>& d = backward_inner(std::get<I>(layers_), dy, ctx);
      const Tensor<B>& r = backward_from<I - 1>(d, ctx);
      release_grad(ctx, d, dy, r);
      return r;
    }
  }
  template <class F, std::size_t... I>
  void visit_children(F& f, const std::string& prefix, std::index_sequence<I...>) {
    using List = std::tuple<Specs...>;
    (std::get<I>(layers_).visit(f, child_prefix<std::tuple_element_t<I, List>>(prefix)), ...);
  }
  std::tuple<typename Specs::template bind<B>...> layers_;
};

template <Backend B, class NumberedList>
struct SequentialLayerOf;
template <Backend B, class... S>
struct SequentialLayerOf<B, numbering::List<S...>> {
  using type = SequentialLayer<B, S...>;
};

template <class... Specs>
struct Sequential {
  static_assert(sizeof...(Specs) > 0, "hatch::Sequential needs at least one layer");
  static_assert(widths_agree<Specs...>());
  static constexpr int in = first_width<Specs...>(), out = last_width<Specs...>();
  // Binding numbers the automatic Repeats among the children (see numbering above).
  template <Backend B>
  using bind = typename SequentialLayerOf<
      B, typename numbering::RenumberList<numbering::kRoot, numbering::Counts<>, numbering::List<>,
                                          Specs...>::done>::type;
};

// ---- Residual: y = x + f(x) ------------------------------------------------------------------
template <Backend B, class Inner>
class ResidualLayer {
 public:
  using backend = B;
  static constexpr int in = Inner::in, out = Inner::out;

  void reset_parameters(Initializer& init) { inner_.reset_parameters(init); }
  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    const Tensor<B>& fx = inner_.forward(x, ctx);
    y_.resize(x.shape());
    B::add(y_.data(), x.data(), fx.data(), x.numel());
    return y_;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    // The branch's input gradient is needed exactly when the block's is: dx = dy + branch dx.
    // With a gradient pool the branch's gradient is ours: the sum is written into it.
    const bool outer = ctx.input_grad;
    const Tensor<B>& d = inner_.backward(dy, ctx);
    if (!outer) {
      release_grad(ctx, d, dy);
      return dx_;
    }
    if (Tensor<B>* w = writable_grad(ctx, d, dy)) {
      B::add(w->data(), w->data(), dy.data(), dy.numel());
      return *w;
    }
    Tensor<B>& dx = grad_buffer(ctx, dx_, dy.shape());
    B::add(dx.data(), dy.data(), d.data(), dy.numel());
    release_grad(ctx, d, dy, dx);
    return dx;
  }
  template <class F> void visit(F&& f, const std::string& prefix) { inner_.visit(f, prefix); }
  template <class F> void for_each_layer(F&& f) { inner_.for_each_layer(f); }
  Inner& inner() { return inner_; }

 private:
  Inner inner_;
  Tensor<B> y_, dx_;
};

template <class Spec>
struct Residual {
  static_assert(keeps_width<Spec, width_error::residual_branch>());
  static constexpr int in = Spec::in, out = Spec::out;
  using wrapped_spec = Spec;  // a transparent wrapper: numbering and MetaOf look inside
  template <class S> using rewrap = Residual<S>;
  template <Backend B> using bind = ResidualLayer<B, typename Spec::template bind<B>>;
};

// ---- Repeat: N copies of one layer, named Start, Start+1, ... (timm's "blocks.3") -----------
// Start = kAutoStart: numbered by the enclosing Sequential or Stages (0 when bound on its own).
template <Backend B, int N, int Start, class Layer>
class RepeatLayer {
 public:
  using backend = B;
  static constexpr int in = Layer::in, out = Layer::out;

  void reset_parameters(Initializer& init) {
    for (auto& l : layers_) l.reset_parameters(init);
  }
  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    const Tensor<B>* h = &x;
    for (auto& l : layers_) h = &l.forward(*h, ctx);
    return *h;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    if constexpr (N == 0) {
      return dy;
    } else {
      const Tensor<B>* d = &dy;
      for (int i = N - 1; i >= 0; --i) {
        // the first copy runs as the Repeat was asked; a copy's gradient goes back to the pool
        // once the copy before it has read it
        const Tensor<B>& next = i > 0 ? backward_inner(layers_[i], *d, ctx) : layers_[0].backward(*d, ctx);
        if (d != &dy) release_grad(ctx, *d, dy, next);
        d = &next;
      }
      return *d;
    }
  }
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    constexpr int first = Start == kAutoStart ? 0 : Start;
    for (int i = 0; i < N; ++i) layers_[i].visit(f, prefix + std::to_string(first + i) + ".");
  }
  template <class F>
  void for_each_layer(F&& f) {
    for (auto& l : layers_) l.for_each_layer(f);
  }
  Layer& operator[](int i) { return layers_[i]; }

 private:
  std::array<Layer, N> layers_;
};

template <int N, class Spec, int Start>
struct Repeat {
  static_assert(N >= 0, "hatch::Repeat: the count must not be negative");
  static_assert(Start >= 0 || Start == kAutoStart, "hatch::Repeat: Start must not be negative");
  static_assert(N == 0 || keeps_width<Spec, width_error::repeated_layer>());
  static constexpr int in = Spec::in, out = Spec::out;
  static constexpr int count = N, start = Start;
  template <Backend B> using bind = RepeatLayer<B, N, Start, typename Spec::template bind<B>>;
};

// ---- AsBlock: one block of a model's depth -----------------------------------------------------
// AsBlock<Spec> is Spec, marked as one block (a transformer block: Block and BlockWith are
// AsBlock<Sequential<...>>). The layer is Spec's own, with the same members, names and results;
// only for_each_layer differs: it tells a visitor that has them where the block begins and ends,
//   f.enter_block();  (Spec's leaves, each f(leaf))  f.leave_block();
// and a plain lambda, which has neither, sees the leaves as before. set_drop_path
// (layers/drop_path_schedule.hpp) uses this to give every DropPath of one block that block's
// rate. Like Residual it is transparent for names, automatic numbering and MetaOf.
template <class Layer>
class BlockLayer : public Layer {
 public:
  static constexpr bool is_block = true;
  template <class F>
  void for_each_layer(F&& f) {
    if constexpr (requires { f.enter_block(); }) f.enter_block();
    Layer::for_each_layer(f);
    if constexpr (requires { f.leave_block(); }) f.leave_block();
  }
};

template <class Spec>
struct AsBlock {
  static constexpr int in = Spec::in, out = Spec::out;
  using wrapped_spec = Spec;
  template <class S> using rewrap = AsBlock<S>;
  template <Backend B> using bind = BlockLayer<typename Spec::template bind<B>>;
};

}  // namespace hatch
