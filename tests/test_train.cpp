// The training stack: losses (PyTorch parity and finite differences), AdamW and SGD against
// reference formulas, clipping, freezing, and the warmup + cosine schedule.
#include <hatch/io/safetensors.hpp>

#include "support.hpp"

#ifndef HATCH_FIXTURE_DIR
#define HATCH_FIXTURE_DIR "tests/fixtures"
#endif

using namespace hatch;

namespace {
template <Backend B>
Tensor<B> tensor_of(const std::vector<float>& h, Shape s) {
  std::vector<typename B::Scalar> v(h.begin(), h.end());
  Tensor<B> t;
  t.from_host(v, s);
  return t;
}
double max_rel(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(double(a[i]) - b[i]));
    den = std::max(den, std::abs(double(b[i])));
  }
  return num / den;
}
}  // namespace

TEST_CASE("losses match PyTorch") {
  const auto f = io::SafeTensorsFile::read(std::string(HATCH_FIXTURE_DIR) + "/losses.safetensors");
  const auto logits = tensor_of<Cpu>(f.to_float("logits", {4, 10}), {4, 10});
  const auto labels64 = f.to_int64("labels", {4});
  const std::vector<int> labels(labels64.begin(), labels64.end());
  SoftTargetCrossEntropy<Cpu> ce;

  const auto hard = tensor_of<Cpu>(smoothed_one_hot(labels, 10, 0.1), {4, 10});
  CHECK(ce.forward_backward(logits, hard) == doctest::Approx(f.to_float("ce_hard_ls", {})[0]).epsilon(1e-6));
  CHECK(max_rel(ce.grad().to_host(), f.to_float("grad.ce_hard_ls", {4, 10})) <= 1e-5);

  const auto soft = tensor_of<Cpu>(f.to_float("targets", {4, 10}), {4, 10});
  CHECK(ce.forward_backward(logits, soft) == doctest::Approx(f.to_float("ce_soft", {})[0]).epsilon(1e-6));
  CHECK(max_rel(ce.grad().to_host(), f.to_float("grad.ce_soft", {4, 10})) <= 1e-5);

  const double temp = std::stod(nlohmann::json::parse(f.metadata()["config"].get<std::string>())["temperature"].dump());
  DistillationLoss<Cpu> kd(temp);
  const auto teacher = tensor_of<Cpu>(f.to_float("teacher_logits", {4, 10}), {4, 10});
  CHECK(kd.forward_backward(logits, teacher) == doctest::Approx(f.to_float("kd", {})[0]).epsilon(1e-5));
  CHECK(max_rel(kd.grad().to_host(), f.to_float("grad.kd", {4, 10})) <= 1e-5);
}

TEST_CASE("loss gradients: finite differences in double precision") {
  std::mt19937_64 rng(5);
  auto z = test::random_tensor<Cpu64>({3, 7}, rng, 2.0);
  auto zt = test::random_tensor<Cpu64>({3, 7}, rng, 2.0);
  std::vector<double> th(21);
  std::uniform_real_distribution<double> u(0.1, 1.0);
  for (int r = 0; r < 3; ++r) {
    double s = 0;
    for (int c = 0; c < 7; ++c) s += (th[r * 7 + c] = u(rng));
    for (int c = 0; c < 7; ++c) th[r * 7 + c] /= s;
  }
  Tensor<Cpu64> t;
  t.from_host(th, {3, 7});
  SoftTargetCrossEntropy<Cpu64> ce;
  DistillationLoss<Cpu64> kd(2.5);
  auto check = [&](auto&& loss_of, const std::vector<double>& analytic) {
    test::GradReport rep;
    std::mt19937_64 order(0);  // every entry is checked; the order does not matter
    test::compare_central_differences("logits", z, analytic, loss_of, order, int(analytic.size()), 1e-6, rep);
    INFO("worst: " << rep.worst);
    CHECK(rep.max_rel <= 1e-6);
  };
  ce.forward_backward(z, t);
  check([&] { return ce.forward_backward(z, t); }, ce.grad().to_host());
  kd.forward_backward(z, zt);
  check([&] { return kd.forward_backward(z, zt); }, kd.grad().to_host());
  // KL of a distribution with itself is zero.
  CHECK(kd.forward_backward(zt, zt) == doctest::Approx(0.0).epsilon(1e-12));
}

TEST_CASE("AdamW matches the reference update, decays only flagged parameters") {
  LinearLayer<Cpu64, 3, 2> lin;
  Initializer init(3);
  lin.reset_parameters(init);
  lin.bias.value.fill(0.5);
  AdamW<Cpu64> opt(trainable_parameters(lin), {.beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.1});
  auto w = lin.weight.value.to_host();
  auto b = lin.bias.value.to_host();
  std::vector<double> mw(w.size()), vw(w.size()), mb(b.size()), vb(b.size());
  const double lr = 0.01;
  for (int step = 1; step <= 3; ++step) {
    std::vector<double> gw(w.size()), gb(b.size());
    for (std::size_t i = 0; i < gw.size(); ++i) gw[i] = 0.1 * double(i + step) - 0.2;
    for (std::size_t i = 0; i < gb.size(); ++i) gb[i] = -0.3 * double(i + 1) * step;
    lin.weight.grad.from_host(gw);
    lin.bias.grad.from_host(gb);
    opt.step(lr);
    auto ref = [&](std::vector<double>& p, std::vector<double>& m, std::vector<double>& v, const std::vector<double>& g,
                   double wd) {
      for (std::size_t i = 0; i < p.size(); ++i) {
        p[i] *= 1 - lr * wd;
        m[i] = 0.9 * m[i] + 0.1 * g[i];
        v[i] = 0.99 * v[i] + 0.01 * g[i] * g[i];
        p[i] -= lr * (m[i] / (1 - std::pow(0.9, step))) / (std::sqrt(v[i] / (1 - std::pow(0.99, step))) + 1e-8);
      }
    };
    ref(w, mw, vw, gw, 0.1);
    ref(b, mb, vb, gb, 0.0);  // biases are not decayed
  }
  const auto wh = lin.weight.value.to_host(), bh = lin.bias.value.to_host();
  for (std::size_t i = 0; i < w.size(); ++i) CHECK(wh[i] == doctest::Approx(w[i]).epsilon(1e-12));
  for (std::size_t i = 0; i < b.size(); ++i) CHECK(bh[i] == doctest::Approx(b[i]).epsilon(1e-12));
}

TEST_CASE("SGD with momentum, clipping, freezing") {
  LinearLayer<Cpu64, 2, 2> lin;
  lin.weight.value.from_host(std::vector<double>{1, 2, 3, 4});
  lin.bias.value.from_host(std::vector<double>{0, 0});
  Sgd<Cpu64> sgd(trainable_parameters(lin), 0.5);
  lin.weight.grad.from_host(std::vector<double>{1, 1, 1, 1});
  lin.bias.grad.from_host(std::vector<double>{2, 2});
  sgd.step(0.1);  // v = g
  sgd.step(0.1);  // v = 0.5 g + g
  CHECK(lin.weight.value.to_host()[0] == doctest::Approx(1 - 0.1 - 0.15));
  CHECK(lin.bias.value.to_host()[1] == doctest::Approx(-0.2 - 0.3));

  auto params = trainable_parameters(lin);
  CHECK(global_grad_norm(params) == doctest::Approx(std::sqrt(4.0 + 8.0)));
  const double before = clip_grad_norm(params, 1.0);
  CHECK(before == doctest::Approx(std::sqrt(12.0)));
  CHECK(global_grad_norm(params) == doctest::Approx(1.0).epsilon(1e-5));

  // A frozen sub-module gets no gradient and is not handed to the optimizer.
  Model<Mlp<4, 8>, Cpu64> mlp;
  Initializer init(1);
  mlp.reset_parameters(init);
  set_trainable(mlp.get<0>(), false);
  CHECK(trainable_parameters(mlp).size() == 2);
  std::mt19937_64 rng(1);
  auto x = test::random_tensor<Cpu64>({3, 4}, rng);
  Context ctx;
  const auto& y = mlp.forward(x, ctx);
  Tensor<Cpu64> dy(y.shape());
  dy.fill(1);
  mlp.backward(dy, ctx);
  CHECK(mlp.get<0>().weight.grad.to_host() == std::vector<double>(32, 0.0));
  CHECK(Cpu64::sum_squares(mlp.get<2>().weight.grad.data(), 32) > 0);
}

TEST_CASE("warmup + cosine schedule") {
  WarmupCosine s{.base_lr = 1e-3, .min_lr = 1e-5, .warmup_lr = 1e-6, .warmup_steps = 10, .total_steps = 110};
  CHECK(s.at(0) == doctest::Approx(1e-6));
  CHECK(s.at(5) == doctest::Approx(1e-6 + 0.5 * (1e-3 - 1e-6)));
  CHECK(s.at(10) == doctest::Approx(1e-3));
  CHECK(s.at(60) == doctest::Approx(1e-5 + 0.5 * (1e-3 - 1e-5)));
  CHECK(s.at(110) == doctest::Approx(1e-5));
  CHECK(s.at(500) == doctest::Approx(1e-5));
}

// A frozen LayerNorm asks for neither parameter gradient, a half-frozen one for one of them:
// the concept lets dgamma and dbeta be null independently.
TEST_CASE("Cpu::layer_norm_backward honours a null dgamma or dbeta on its own") {
  constexpr int rows = 1000, cols = 40;  // above the parallel grain: the threaded path
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> x(rows * cols), dy(rows * cols), gamma(cols), mean(rows), rstd(rows);
  for (auto* v : {&x, &dy, &gamma})
    for (auto& e : *v) e = nd(rng);
  for (int r = 0; r < rows; ++r) {
    double m = 0, q = 0;
    for (int c = 0; c < cols; ++c) m += x[r * cols + c];
    m /= cols;
    for (int c = 0; c < cols; ++c) q += (x[r * cols + c] - m) * (x[r * cols + c] - m);
    mean[r] = float(m);
    rstd[r] = float(1 / std::sqrt(q / cols + 1e-6));
  }
  std::vector<float> dg_ref(cols, 0.5f), db_ref(cols, 0.25f);
  Cpu::layer_norm_backward(nullptr, dg_ref.data(), db_ref.data(), dy.data(), x.data(), mean.data(), rstd.data(),
                           gamma.data(), rows, cols);
  std::vector<float> dg(cols, 0.5f), db(cols, 0.25f);
  Cpu::layer_norm_backward(nullptr, dg.data(), nullptr, dy.data(), x.data(), mean.data(), rstd.data(), gamma.data(),
                           rows, cols);
  CHECK(dg == dg_ref);
  Cpu::layer_norm_backward(nullptr, nullptr, db.data(), dy.data(), x.data(), mean.data(), rstd.data(), gamma.data(),
                           rows, cols);
  CHECK(db == db_ref);
}

// The one-pass backward (per-thread shares of dgamma and dbeta, added up after a barrier) against
// the formulas in double: one thread's size and the threaded one, dx with and without the
// parameter gradients, which accumulate onto what is there.
TEST_CASE_TEMPLATE("Cpu::layer_norm_backward against a double reference, one thread and split", B, Cpu, Cpu64) {
  using T = typename B::Scalar;
  const test::TwoThreads two_threads;  // the split paths, even on a one-core machine
  for (const auto [rows, cols] : {std::array{3, 7}, std::array{1000, 40}, std::array{301, 130}}) {
    CAPTURE(rows); CAPTURE(cols);
    std::vector<T> x(std::size_t(rows) * cols), dy(x.size()), gamma(cols), mean(rows), rstd(rows);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = T(std::sin(0.37 * double(i)) + 0.1 * double(i % 5));
    for (std::size_t i = 0; i < dy.size(); ++i) dy[i] = T(std::cos(0.11 * double(i)));
    for (int c = 0; c < cols; ++c) gamma[c] = T(1 + 0.1 * std::sin(double(c)));
    std::vector<double> dx_ref(x.size()), dg_ref(cols, 0.5), db_ref(cols, 0.25);
    for (int r = 0; r < rows; ++r) {
      double m = 0, q = 0;
      for (int c = 0; c < cols; ++c) m += double(x[std::size_t(r) * cols + c]);
      m /= cols;
      for (int c = 0; c < cols; ++c) q += std::pow(double(x[std::size_t(r) * cols + c]) - m, 2);
      mean[r] = T(m);
      rstd[r] = T(1 / std::sqrt(q / cols + 1e-5));
      double s1 = 0, s2 = 0;
      for (int c = 0; c < cols; ++c) {
        const std::size_t i = std::size_t(r) * cols + c;
        const double xh = (double(x[i]) - double(mean[r])) * double(rstd[r]), g = double(dy[i]) * double(gamma[c]);
        s1 += g / cols;
        s2 += g * xh / cols;
        dg_ref[c] += double(dy[i]) * xh;
        db_ref[c] += double(dy[i]);
      }
      for (int c = 0; c < cols; ++c) {
        const std::size_t i = std::size_t(r) * cols + c;
        const double xh = (double(x[i]) - double(mean[r])) * double(rstd[r]);
        dx_ref[i] = double(rstd[r]) * (double(dy[i]) * double(gamma[c]) - s1 - xh * s2);
      }
    }
    const double tol = std::is_same_v<T, float> ? 2e-4 : 1e-10;
    for (const bool params : {true, false}) {
      CAPTURE(params);
      std::vector<T> dx(x.size(), T(7)), dg(cols, T(0.5)), db(cols, T(0.25));
      B::layer_norm_backward(dx.data(), params ? dg.data() : nullptr, params ? db.data() : nullptr, dy.data(),
                             x.data(), mean.data(), rstd.data(), gamma.data(), rows, cols);
      double worst = 0;
      for (std::size_t i = 0; i < dx.size(); ++i) worst = std::max(worst, std::abs(double(dx[i]) - dx_ref[i]));
      CHECK(worst < tol);
      worst = 0;
      for (int c = 0; c < cols; ++c)
        worst = std::max({worst, std::abs(double(dg[c]) - (params ? dg_ref[c] : 0.5)),
                          std::abs(double(db[c]) - (params ? db_ref[c] : 0.25))});
      CHECK(worst < (std::is_same_v<T, float> ? 4e-5 : 4e-12) * rows);  // sums of rows terms of size ~1
    }
  }
}
