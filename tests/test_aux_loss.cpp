// Auxiliary losses (core/aux_loss.hpp) with ActivationPenalty (layers/regularize.hpp): the term
// and its gradient are right (central differences in double), it passes through every composite
// unchanged, FrozenExcept counts only the trainable stage's terms and its frozen stages add no
// gradient, fit reports it (train_loss, aux_loss in metrics.jsonl) and stops on a non-finite
// one, and evaluation never adds it.
#include <hatch/modular/incubator.hpp>

#include <filesystem>
#include <fstream>
#include <limits>

#include "files.hpp"
#include "support.hpp"

using namespace hatch;
using test::learnable_set;
using test::for_each_index;
using test::max_abs_grad;

namespace {
constexpr int D = 4;

// Every penalty below sees the same activations when every Linear is the identity (and the
// residual branch's Linear is zero): the model's input. Their weights are distinct powers of
// two, so a term counted twice or not at all changes the sum.
using Inner = Sequential<Named<"a", ActivationPenalty<1.0>>,
                         Named<"res", Residual<Sequential<ActivationPenalty<2.0>, Named<"fc", Linear<D, D>>>>>,
                         Named<"rep", Repeat<2, ActivationPenalty<4.0>>>>;
using Module1 = Sequential<Named<"m", Linear<D, D>>, ActivationPenalty<16.0>>;
using Net = Stages<Inner, Stitched<Module1, D>, Sequential<Named<"last", Linear<D, D>>, ActivationPenalty<32.0>>>;

template <class M>
void identity_linears(M& m) {
  m.visit(
      [](const std::string& name, Parameter<Cpu64>& p) {
        std::vector<double> h(std::size_t(p.value.numel()), 0.0);
        if (name.ends_with("weight") && name.find("res.") == std::string::npos)
          for (int i = 0; i < D; ++i) h[std::size_t(i) * D + i] = 1.0;
        p.value.from_host(h);
      },
      "");
}

double mean_square_norm(const Tensor<Cpu64>& x) {
  double s = 0;
  for (double v : x.to_host()) s += v * v;
  return s / double(x.dim(0));
}

// A layer whose auxiliary term is not finite (a broken balance loss, say).
template <Backend B>
struct NanAuxLayer {
  using backend = B;
  static constexpr int in = kAnyWidth, out = kAnyWidth;
  void reset_parameters(Initializer&) {}
  const Tensor<B>& forward(const Tensor<B>& x, Context&) { return x; }
  const Tensor<B>& backward(const Tensor<B>& dy, Context&) { return dy; }
  double aux_loss() const { return std::numeric_limits<double>::quiet_NaN(); }
  template <class F> void visit(F&&, const std::string&) {}
  template <class F> void for_each_layer(F&& f) { f(*this); }
};
struct NanAux {
  static constexpr int in = kAnyWidth, out = kAnyWidth;
  template <Backend B> using bind = NanAuxLayer<B>;
};


template <double W>
using Classifier = Sequential<Flatten<784>, Named<"fc1", Linear<784, 32>>, Gelu, ActivationPenalty<W>,
                              Named<"fc2", Linear<32, 10>>>;
using PlainClassifier = Sequential<Flatten<784>, Named<"fc1", Linear<784, 32>>, Gelu, Named<"fc2", Linear<32, 10>>>;
}  // namespace

TEST_CASE("ActivationPenalty: identity forward, its term in training only, its gradient in backward") {
  Model<ActivationPenalty<0.25>, Cpu64> p;
  std::mt19937_64 rng(1);
  auto x = test::random_tensor<Cpu64>({3, 5}, rng);
  auto dy = test::random_tensor<Cpu64>({3, 5}, rng);
  Context eval;
  CHECK(&p.forward(x, eval) == &x);
  CHECK(p.aux_loss() == 0);
  Context train;
  train.training = true;
  p.forward(x, train);
  CHECK(p.aux_loss() == doctest::Approx(0.25 * mean_square_norm(x)).epsilon(1e-12));
  const auto dx = p.backward(dy, train).to_host();
  const auto xh = x.to_host(), dyh = dy.to_host();
  for (std::size_t i = 0; i < dx.size(); ++i) CHECK(dx[i] == doctest::Approx(dyh[i] + 2 * 0.25 * xh[i] / 3));
  Context frozen = train;
  frozen.param_grads = false;  // a frozen layer adds no gradient
  p.forward(x, frozen);
  CHECK(&p.backward(dy, frozen) == &dy);
}

TEST_CASE("the auxiliary term's gradient reaches the parameters before it (central differences)") {
  Model<Sequential<Named<"fc1", Linear<6, 5>>, ActivationPenalty<0.5>, Gelu, Named<"fc2", Linear<5, 3>>,
                   ActivationPenalty<0.125>>,
        Cpu64>
      net;
  test::randomize_parameters(net, 3);
  const auto rep = test::gradcheck(net, {4, 6}, /*training=*/true);
  INFO(rep.worst);
  CHECK(rep.passed());
  // gradcheck's loss includes the terms, and they are not negligible here, so a missing or wrong
  // gradient for them fails the check above.
  Context ctx;
  ctx.training = true;
  std::mt19937_64 rng(5);
  auto x = test::random_tensor<Cpu64>({4, 6}, rng);
  net.forward(x, ctx);
  CHECK(collect_aux_loss(net) > 1e-3);
}

TEST_CASE("auxiliary terms pass through Sequential, Residual, Repeat, Named, Stages and Stitched unchanged") {
  Model<Net, Cpu64> model;
  identity_linears(model);
  std::mt19937_64 rng(2);
  auto x = test::random_tensor<Cpu64>({5, D}, rng);
  const double s = mean_square_norm(x);
  Context ctx;
  ctx.training = true;
  const auto y = model.forward(x, ctx).to_host();
  CHECK(y == x.to_host());  // the identity set-up holds
  CHECK(collect_aux_loss(model) == doctest::Approx((1 + 2 + 8 + 16 + 32) * s).epsilon(1e-12));
  CHECK(collect_aux_loss(model.stage<1>()) == doctest::Approx(16 * s).epsilon(1e-12));
  // A model without auxiliary layers reports 0; so does an evaluation forward.
  Model<presets::VitMicro, Cpu> vit;
  CHECK(collect_aux_loss(vit) == 0);
  Context eval;
  model.forward(x, eval);
  CHECK(collect_aux_loss(model) == 0);
}

TEST_CASE("FrozenExcept: only the trainable stage's terms count, frozen stages add no gradient") {
  using M = Model<Net, Cpu64>;
  for_each_index<3>([&](auto I) {
    constexpr std::size_t i = decltype(I)::value;
    CAPTURE(i);
    M model;
    identity_linears(model);
    FrozenExcept<M, i> view(model);
    std::mt19937_64 rng(4);
    auto x = test::random_tensor<Cpu64>({5, D}, rng);
    Context ctx;
    ctx.training = true;
    view.forward(x, ctx);
    const double s = mean_square_norm(x);
    const double expected[] = {11 * s, 16 * s, 32 * s};
    CHECK(view.aux_loss() == doctest::Approx(expected[i]).epsilon(1e-12));
    CHECK(collect_aux_loss(view) == doctest::Approx(expected[i]).epsilon(1e-12));

    // Gradients of sum(y * r) + the view's aux with random weights: the trainable stage's match
    // central differences (so the frozen suffix's penalty adds no gradient and the trainable
    // stage's does), and no frozen stage gets any.
    test::randomize_parameters(model, 9 + i);
    auto r = test::random_tensor<Cpu64>({5, D}, rng);
    const auto rh = r.to_host();
    auto loss = [&] {
      Context c;
      c.training = true;
      const auto yh = view.forward(x, c).to_host();
      double l = 0;
      for (std::size_t k = 0; k < yh.size(); ++k) l += yh[k] * rh[k];
      return l + collect_aux_loss(view);
    };
    model.visit([](const std::string&, Parameter<Cpu64>& p) { p.zero_grad(); }, "");
    Context c;
    c.training = true;
    c.input_grad = false;
    view.forward(x, c);
    view.backward(r, c);
    const auto rep = test::check_parameter_grads(model.template stage<i>(), loss, rng, 30);
    INFO(rep.worst);
    CHECK(rep.passed());
    for_each_index<3>([&](auto J) {
      if constexpr (decltype(J)::value != i) CHECK(max_abs_grad(model.template stage<decltype(J)::value>()) == 0);
    });
  });
}

TEST_CASE("fit: the term is in the reported loss and in metrics.jsonl, evaluation leaves it out") {
  const auto train = learnable_set(128, 1), test_set = learnable_set(64, 2);
  const hatch_test::TempDir tmp("hatch_test_aux");
  const auto& dir = tmp.path;
  Model<Classifier<0.05>, Cpu> model;
  Initializer init(3);
  model.reset_parameters(init);
  FitOptions o;
  o.epochs = 1;
  o.batch = 32;
  o.lr = o.min_lr = o.warmup_lr = 0;  // the weights stay as they are, so the epoch's loss is known
  o.progress = false;
  o.out = dir;
  const auto r = fit(model, train, test_set, o);

  // What the epoch must have reported: cross-entropy plus 0.05 * mean ||h||^2 over the set.
  const auto ce = evaluate(model, train, 128).loss;
  Tensor<Cpu> x;
  x.from_host(std::vector<float>(train.images.begin(), train.images.end()), {train.n, 1, 28, 28});
  Context ctx;
  ctx.training = true;
  model.forward(x, ctx);
  const double aux = collect_aux_loss(model);
  CHECK(aux > 0.01);
  std::ifstream log(dir / "metrics.jsonl");
  std::string line;
  REQUIRE(std::getline(log, line));
  const auto j = nlohmann::json::parse(line);
  CHECK(j.at("aux_loss").get<double>() == doctest::Approx(aux).epsilon(1e-4));
  CHECK(j.at("train_loss").get<double>() == doctest::Approx(ce + aux).epsilon(1e-4));

  // Evaluation is the cross-entropy alone: the same weights without the penalty layer agree.
  Model<PlainClassifier, Cpu> plain;
  std::vector<std::vector<float>> values;
  model.visit([&](const std::string&, Parameter<Cpu>& p) { values.push_back(p.value.to_host()); }, "");
  std::size_t k = 0;
  plain.visit([&](const std::string&, Parameter<Cpu>& p) { p.value.from_host(values[k++]); }, "");
  const auto e = evaluate(plain, test_set, 64);
  CHECK(r.test.loss == doctest::Approx(e.loss).epsilon(1e-6));
  CHECK(evaluate(model, test_set, 64).loss == doctest::Approx(e.loss).epsilon(1e-6));
}

TEST_CASE("fit: training moves the penalised activations down") {
  const auto train = learnable_set(256, 3), test_set = learnable_set(64, 4);
  auto run = [&](auto& model) {
    Initializer init(7);
    model.reset_parameters(init);
    FitOptions o;
    o.epochs = 2;
    o.batch = 32;
    o.lr = 2e-3;
    o.progress = false;
    fit(model, train, test_set, o);
    Tensor<Cpu> x;
    x.from_host(std::vector<float>(train.images.begin(), train.images.end()), {train.n, 1, 28, 28});
    Context ctx;
    ctx.training = true;
    model.forward(x, ctx);
    return collect_aux_loss(model);
  };
  Model<Classifier<1e-6>, Cpu> weak;  // ~ no pressure; its term measures ||h||^2 scaled by 1e-6
  Model<Classifier<0.05>, Cpu> strong;
  const double weak_norm = run(weak) / 1e-6, strong_norm = run(strong) / 0.05;
  CHECK(strong_norm < 0.5 * weak_norm);  // the gradient of the term reached fc1
}

TEST_CASE("fit stops on a non-finite auxiliary loss and says so") {
  const auto train = learnable_set(64, 5), test_set = learnable_set(32, 6);
  Model<Sequential<Flatten<784>, NanAux, Named<"fc", Linear<784, 10>>>, Cpu> model;
  Initializer init(1);
  model.reset_parameters(init);
  FitOptions o;
  o.epochs = 1;
  o.batch = 32;
  o.progress = false;
  CHECK_THROWS_WITH_AS(fit(model, train, test_set, o),
                       doctest::Contains("the auxiliary loss (the sum of the layers' aux_loss() terms) is nan"),
                       Error);
}
