#pragma once
// Finite-difference gradient checks for layers, your own included:
//
//   hatch::Model<MyLayer, hatch::Cpu64> layer;          // double precision
//   hatch::testing::randomize_parameters(layer, 7);     // no check passes by symmetry
//   auto report = hatch::testing::gradcheck(layer, {2, 5, 16}, /*training=*/false);
//   if (!report.passed()) std::puts(report.worst.c_str());
//
// gradcheck compares the analytic gradients of sum(forward(x) * r), for a random x and r, with
// central differences, for the input and for every parameter that visit() shows. A layer
// passes when its backward() agrees with its forward() (relative error about 1e-8 in double
// precision; 1e-6 leaves room for kinks such as ReLU's). Backend-independent: it moves tensors
// through to_host/from_host only.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "hatch/core/aux_loss.hpp"
#include "hatch/core/parameter.hpp"
#include "hatch/tensor.hpp"

namespace hatch::testing {

template <Backend B>
Tensor<B> random_tensor(Shape s, std::mt19937_64& rng, double stddev = 1.0) {
  std::normal_distribution<double> nd(0.0, stddev);
  std::vector<typename B::Scalar> h(static_cast<std::size_t>(s.numel()));
  for (auto& v : h) v = static_cast<typename B::Scalar>(nd(rng));
  Tensor<B> t;
  t.from_host(h, s);
  return t;
}

// Every parameter random (norm weights around 1), so no check passes by symmetry.
template <class L>
void randomize_parameters(L& layer, std::uint64_t seed) {
  using B = typename L::backend;
  std::mt19937_64 rng(seed);
  layer.visit(
      [&](const std::string& name, Parameter<B>& p) {
        const bool norm_weight = name.find("norm") != std::string::npos && name.ends_with("weight");
        auto t = random_tensor<B>(p.value.shape(), rng, 0.3);
        auto h = t.to_host();
        if (norm_weight)
          for (auto& v : h) v += 1;
        p.value.from_host(h);
      },
      "");
}

template <class L>
void zero_grads(L& layer) {
  using B = typename L::backend;
  layer.visit([](const std::string&, Parameter<B>& p) { p.zero_grad(); }, "");
}

struct GradReport {
  double max_rel = 0;  // the worst relative error over every checked entry
  std::string worst;   // which entry: "<parameter or input>[index] numeric ... analytic ..."
  bool passed(double tolerance = 1e-6) const { return max_rel <= tolerance; }
};

// Central differences of loss() w.r.t. at most `samples` random entries of t against the analytic
// gradient; the worst relative error goes into rep.
template <class B, class Loss>
void compare_central_differences(const std::string& what, Tensor<B>& t, const std::vector<double>& analytic,
                                 Loss& loss, std::mt19937_64& rng, int samples, double h, GradReport& rep) {
  auto v = t.to_host();
  std::vector<std::size_t> idx(v.size());
  for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = i;
  std::shuffle(idx.begin(), idx.end(), rng);
  idx.resize(std::min<std::size_t>(idx.size(), std::size_t(samples)));
  for (auto i : idx) {
    const double orig = v[i];
    v[i] = orig + h;
    t.from_host(v);
    const double lp = loss();
    v[i] = orig - h;
    t.from_host(v);
    const double lm = loss();
    v[i] = orig;
    t.from_host(v);
    const double num = (lp - lm) / (2 * h);
    const double rel = std::abs(num - analytic[i]) / std::max({std::abs(num), std::abs(analytic[i]), 1e-3});
    if (rel > rep.max_rel) {
      rep.max_rel = rel;
      rep.worst = what + "[" + std::to_string(i) + "] numeric " + std::to_string(num) + " analytic " +
                  std::to_string(analytic[i]);
    }
  }
}

// Checks d(sum(forward(x) * r) + aux) against central differences, for the input and for every
// parameter (at most `samples` entries of each tensor, chosen at random). Double precision.
// aux is collect_aux_loss(layer), the auxiliary terms of a training forward (core/aux_loss.hpp),
// so a layer's aux_loss() and the gradient it adds for it are checked too.
template <class L>
GradReport gradcheck(L& layer, Shape in_shape, bool training, std::uint64_t seed = 1, int samples = 40,
                     double h = 1e-5) {
  using B = typename L::backend;
  static_assert(std::is_same_v<typename B::Scalar, double>, "gradient checks run in double precision");
  std::mt19937_64 rng(seed);
  Tensor<B> x = random_tensor<B>(in_shape, rng);
  auto make_ctx = [&] {
    Context c;
    c.training = training;
    c.seed = 1234;  // the same dropout masks on every evaluation
    return c;
  };
  Context ctx = make_ctx();
  const Tensor<B>& y0 = layer.forward(x, ctx);
  Tensor<B> r = random_tensor<B>(y0.shape(), rng);
  const auto rh = r.to_host();
  auto loss = [&] {
    Context c = make_ctx();
    const auto yh = layer.forward(x, c).to_host();
    double s = 0;
    for (std::size_t i = 0; i < yh.size(); ++i) s += yh[i] * rh[i];
    return s + collect_aux_loss(layer);
  };
  zero_grads(layer);
  ctx = make_ctx();
  // Backward through a gradient pool that poisons what is given back (core/grad_pool.hpp): a layer
  // that reads a gradient after it was released sees NaN, and the check fails.
  GradientPool<B> pool;
  pool.poison_released(true);
  ctx.use(pool);
  layer.forward(x, ctx);
  ctx.input_grad = true;
  const auto dx = layer.backward(r, ctx).to_host();
  pool.release_all();

  GradReport rep;
  auto check = [&](const std::string& what, Tensor<B>& t, const std::vector<double>& analytic) {
    compare_central_differences(what, t, analytic, loss, rng, samples, h, rep);
  };
  check("input", x, dx);
  layer.visit([&](const std::string& name, Parameter<B>& p) { check(name, p.value, p.grad.to_host()); }, "");
  return rep;
}

// Central differences of loss() against the gradients already in .grad, for every parameter
// module.visit shows (at most `samples` entries of each, chosen at random). Double precision.
template <class M, class Loss>
GradReport check_parameter_grads(M& module, Loss&& loss, std::mt19937_64& rng, int samples, double h = 1e-5) {
  using B = typename M::backend;
  static_assert(std::is_same_v<typename B::Scalar, double>, "gradient checks run in double precision");
  GradReport rep;
  module.visit(
      [&](const std::string& name, Parameter<B>& p) {
        compare_central_differences(name, p.value, p.grad.to_host(), loss, rng, samples, h, rep);
      },
      "");
  return rep;
}

}  // namespace hatch::testing
