#pragma once
// Composition as types: Named, Sequential, Residual, Repeat. A spec is an empty type with
// `in`/`out` widths and `template <Backend B> using bind`; binding a composite binds its
// children. Widths are checked when a composite spec is instantiated.
#include <algorithm>
#include <array>
#include <cstddef>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

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

// Instantiated only on a mismatch; the compiler prints its arguments next to the message.
template <int LayerIndex, int ProducedWidth, int ExpectedWidth>
struct SequentialWidthMismatch {
  static_assert(LayerIndex < 0,
                "hatch::Sequential: layer <LayerIndex> expects input width <ExpectedWidth> but the "
                "layers before it produce <ProducedWidth>. Fix the widths or insert a Linear "
                "stitch between them.");
  static constexpr bool ok = false;
};
template <class... S>
constexpr bool widths_agree() {
  constexpr WidthCheck c = check_widths<S...>();
  if constexpr (c.index >= 0) return SequentialWidthMismatch<c.index, c.produced, c.expected>::ok;
  else return true;
}

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
    if constexpr (I == 0) {
      return std::get<0>(layers_).backward(dy, ctx);
    } else {
      const bool outer = ctx.input_grad;
      ctx.input_grad = true;  // inner layers always pass the gradient on
      const Tensor<B>& d = std::get<I>(layers_).backward(dy, ctx);
      ctx.input_grad = outer;
      return backward_from<I - 1>(d, ctx);
    }
  }
  template <class F, std::size_t... I>
  void visit_children(F& f, const std::string& prefix, std::index_sequence<I...>) {
    using List = std::tuple<Specs...>;
    (std::get<I>(layers_).visit(f, child_prefix<std::tuple_element_t<I, List>>(prefix)), ...);
  }
  std::tuple<typename Specs::template bind<B>...> layers_;
};

template <class... Specs>
struct Sequential {
  static_assert(sizeof...(Specs) > 0, "hatch::Sequential needs at least one layer");
  static_assert(widths_agree<Specs...>());
  static constexpr int in = first_width<Specs...>(), out = last_width<Specs...>();
  template <Backend B> using bind = SequentialLayer<B, Specs...>;
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
    const bool outer = ctx.input_grad;
    const Tensor<B>& d = inner_.backward(dy, ctx);
    if (outer) {
      dx_.resize(dy.shape());
      B::add(dx_.data(), dy.data(), d.data(), dy.numel());
    }
    return dx_;
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
  static_assert(Spec::in == Spec::out || Spec::in == kAnyWidth || Spec::out == kAnyWidth,
                "hatch::Residual: the wrapped layer must keep its width (in == out) to be added "
                "to its input");
  static constexpr int in = Spec::in, out = Spec::out;
  template <Backend B> using bind = ResidualLayer<B, typename Spec::template bind<B>>;
};

// ---- Repeat: N copies of one layer, named Start, Start+1, ... (timm's "blocks.3") -----------
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
    const bool outer = ctx.input_grad;
    ctx.input_grad = true;
    const Tensor<B>* d = &dy;
    for (int i = N - 1; i >= 0; --i) {
      if (i == 0) ctx.input_grad = outer;
      d = &layers_[i].backward(*d, ctx);
    }
    ctx.input_grad = outer;
    return *d;
  }
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    for (int i = 0; i < N; ++i) layers_[i].visit(f, prefix + std::to_string(Start + i) + ".");
  }
  template <class F>
  void for_each_layer(F&& f) {
    for (auto& l : layers_) l.for_each_layer(f);
  }
  Layer& operator[](int i) { return layers_[i]; }

 private:
  std::array<Layer, N> layers_;
};

template <int N, class Spec, int Start = 0>
struct Repeat {
  static_assert(N >= 0, "hatch::Repeat: the count must not be negative");
  static_assert(N == 0 || Spec::in == Spec::out || Spec::in == kAnyWidth || Spec::out == kAnyWidth,
                "hatch::Repeat: a repeated layer must keep its width (in == out)");
  static constexpr int in = Spec::in, out = Spec::out;
  template <Backend B> using bind = RepeatLayer<B, N, Start, typename Spec::template bind<B>>;
};

}  // namespace hatch
