// Step scalars and staging (backend/async.hpp). On Cpu they compute what the primitives they
// stand for compute. A backend with its own scalars is modelled here by DeviceLikeCpu: Cpu's
// arithmetic, the reductions kept in "device" doubles until read_scalars, and every call that
// makes Cuda wait for its stream counted. fit through it must train exactly as through Cpu and
// wait once per step (tests/cuda counts Cuda's real waits the same way on a GPU).
#include <hatch/backend/async.hpp>
#include <hatch/modular/distiller.hpp>
#include <hatch/train/fit.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include "files.hpp"
#include "support.hpp"

using namespace hatch;

namespace {

struct DeviceLikeCpu : Cpu {
  using T = float;
  static inline std::int64_t waits = 0;
  // What Cuda counts as a wait (Cuda::host_waits).
  static void upload(T* d, const T* s, std::size_t n) { ++waits, Cpu::upload(d, s, n); }
  static void download(T* d, const T* s, std::size_t n) { ++waits, Cpu::download(d, s, n); }
  static void upload_indices(std::int32_t* d, const std::int32_t* s, std::size_t n) {
    ++waits, Cpu::upload_indices(d, s, n);
  }
  static void download_indices(std::int32_t* d, const std::int32_t* s, std::size_t n) {
    ++waits, Cpu::download_indices(d, s, n);
  }
  static void synchronize() { ++waits; }
  static double sum_squares(const T* x, std::size_t n) { return ++waits, Cpu::sum_squares(x, n); }
  static bool all_finite(const T* x, std::size_t n) { return ++waits, Cpu::all_finite(x, n); }
  static double softmax_cross_entropy(T* dz, const T* z, const T* t, int rows, int cols, T scale) {
    return ++waits, Cpu::softmax_cross_entropy(dz, z, t, rows, cols, scale);
  }
  // backend/async.hpp's members, none of which waits but read_scalars.
  static double* allocate_scalars(std::size_t n) { return new double[n](); }
  static void deallocate_scalars(double* p, std::size_t) noexcept { delete[] p; }
  static void zero_scalars(double* p, std::size_t n) { std::fill(p, p + n, 0.0); }
  static void read_scalars(double* h, const double* p, std::size_t n) { ++waits, std::copy(p, p + n, h); }
  static inline std::int64_t losses = 0;  // softmax_cross_entropy_into calls: a step queued, or a batch evaluated
  static void softmax_cross_entropy_into(double* out, T* dz, const T* z, const T* t, int rows, int cols, T scale,
                                         double divisor) {
    ++losses;
    *out = Cpu::softmax_cross_entropy(dz, z, t, rows, cols, scale) / divisor;
  }
  // A copy of the slots taken where start() is called (as a copy queued on a stream reads them
  // when the stream reaches it); wait() logs how many losses had been queued by then.
  static inline std::vector<std::int64_t> losses_at_wait;
  struct ScalarFetch {
    std::vector<double> host;
    explicit ScalarFetch(std::size_t n) : host(n) {}
    void start(const double* p) { std::copy(p, p + host.size(), host.begin()); }
    const double* wait() {
      ++waits;
      losses_at_wait.push_back(losses);
      return host.data();
    }
  };
  static void argmax_matches_into(double* out, const T* z, const T* t, int rows, int cols) {
    double hits = 0;
    for (int r = 0; r < rows; ++r)
      hits += argmax_row(z + std::size_t(r) * cols, cols) == argmax_row(t + std::size_t(r) * cols, cols);
    *out = hits;
  }
  static void sum_squares_into(double* out, const T* x, std::size_t n) { *out = Cpu::sum_squares(x, n); }
  static void clip_to_norm(T* g, std::size_t n, const double* sumsq, double max_norm) {
    const double norm = std::sqrt(*sumsq);
    if (norm > max_norm) Cpu::scale(g, T(max_norm / (norm + 1e-6)), n);
  }
  static inline std::int64_t pinned_uploads = 0;
  static T* allocate_pinned(std::size_t n) { return new T[n]; }
  static void deallocate_pinned(T* p, std::size_t) noexcept { delete[] p; }
  static void upload_async(T* d, const T* s, std::size_t n) { ++pinned_uploads, Cpu::upload(d, s, n); }
};
static_assert(Backend<DeviceLikeCpu> && HasBackendScalars<DeviceLikeCpu> && HasScalarFetch<DeviceLikeCpu> &&
              HasPinnedStaging<DeviceLikeCpu>);
static_assert(!HasBackendScalars<Cpu> && !HasScalarFetch<Cpu> && !HasPinnedStaging<Cpu>);

// Logits with ties (row 1: two equal maxima; row 3: all equal) and soft targets with ties too.
struct Case {
  int rows = 6, cols = 7;
  std::vector<float> z, t;
  Case() {
    std::mt19937 g(3);
    std::normal_distribution<float> n;
    z.resize(std::size_t(rows) * cols);
    t.assign(z.size(), 0.f);
    for (auto& v : z) v = n(g);
    z[7 + 2] = z[7 + 5] = 9.f;                        // row 1: largest at 2 and 5 -> 2
    std::fill(z.begin() + 21, z.begin() + 28, 0.5f);  // row 3: all equal -> 0
    for (int r = 0; r < rows; ++r) {
      t[std::size_t(r) * cols + std::size_t(r * 3 % cols)] = 0.9f;
      t[std::size_t(r) * cols + std::size_t((r * 3 + 1) % cols)] = 0.1f;
    }
    std::fill(t.begin() + 7, t.begin() + 14, 0.f);    // row 1: 0.45 at 2 and 3 -> 2
    t[7 + 2] = t[7 + 3] = 0.45f, t[7 + 4] = 0.1f;
    std::fill(t.begin() + 21, t.begin() + 28, 0.f);   // row 3: 0.5 at 0 and 1 -> 0
    t[21 + 0] = t[21 + 1] = 0.5f;
  }
  int expected_hits() const {
    int hits = 0;
    for (int r = 0; r < rows; ++r)
      hits += argmax_row(z.data() + std::size_t(r) * cols, cols) == argmax_row(t.data() + std::size_t(r) * cols, cols);
    return hits;
  }
};

template <class B>
std::vector<double> scalars_of(const Case& c, std::vector<float>& dz, std::vector<float>& g, double max_norm) {
  Tensor<B> z, t, d, grad;
  z.from_host(c.z, {c.rows, c.cols});
  t.from_host(c.t, {c.rows, c.cols});
  d.resize({c.rows, c.cols});
  grad.from_host(g, {std::int64_t(g.size())});
  StepScalars<B> s(4);
  s.softmax_cross_entropy(0, d.data(), z.data(), t.data(), c.rows, c.cols, 0.25f, c.rows);
  s.argmax_matches(1, z.data(), t.data(), c.rows, c.cols);
  s.sum_squares(2, grad.data(), g.size());
  s.clip_to_norm(grad.data(), g.size(), 2, max_norm);
  s.set(3, 42.5);
  auto v = s.read();
  dz = d.to_host();
  g = grad.to_host();
  return v;
}

}  // namespace

TEST_CASE("step scalars: on Cpu and on a backend with its own, the values of the primitives they stand for") {
  const Case c;
  REQUIRE(c.expected_hits() >= 2);  // rows 1 and 3 are ties that match
  std::vector<float> grads(1000);
  std::mt19937 gen(5);
  std::normal_distribution<float> n;
  for (auto& v : grads) v = n(gen);
  for (double max_norm : {0.5, 1e6}) {
    CAPTURE(max_norm);
    // The reference: the primitives, and clip_grad_norm's rule, called directly.
    std::vector<float> dz_ref(c.z.size()), g_ref = grads;
    const double ce = Cpu::softmax_cross_entropy(dz_ref.data(), c.z.data(), c.t.data(), c.rows, c.cols, 0.25f) / c.rows;
    const double ss = Cpu::sum_squares(g_ref.data(), g_ref.size());
    if (std::sqrt(ss) > max_norm) Cpu::scale(g_ref.data(), float(max_norm / (std::sqrt(ss) + 1e-6)), g_ref.size());
    CHECK((max_norm < 1 ? g_ref != grads : g_ref == grads));

    std::vector<float> dz_cpu, g_cpu = grads, dz_dev, g_dev = grads;
    const auto cpu = scalars_of<Cpu>(c, dz_cpu, g_cpu, max_norm);
    DeviceLikeCpu::waits = 0;
    const auto dev = scalars_of<DeviceLikeCpu>(c, dz_dev, g_dev, max_norm);
    for (const auto* v : {&cpu, &dev}) {
      CHECK((*v)[0] == ce);
      CHECK((*v)[1] == c.expected_hits());
      CHECK((*v)[2] == ss);
      CHECK((*v)[3] == 42.5);
    }
    CHECK(dz_cpu == dz_ref);
    CHECK(dz_dev == dz_ref);
    CHECK(g_cpu == g_ref);
    CHECK(g_dev == g_ref);
    // scalars_of's three uploads and two tensors read back, and the one read of the scalars.
    CHECK(DeviceLikeCpu::waits == 3 + 2 + 1);
  }
}

TEST_CASE("step scalars: a value set on the host wins over the backend's, until the slot is computed again") {
  StepScalars<DeviceLikeCpu> s(2);
  Tensor<DeviceLikeCpu> x;
  x.from_host(std::vector<float>{3, 4}, {2});
  s.sum_squares(0, x.data(), 2);
  s.set(1, 7);
  CHECK(s.read() == std::vector<double>{25, 7});
  s.set(0, -1);
  CHECK(s.read()[0] == -1);
  s.sum_squares(0, x.data(), 1);
  CHECK(s.read()[0] == 9);
  CHECK_THROWS_AS(s.set(2, 0), Error);
}

TEST_CASE("host staging: uploads through pinned memory where the backend has it, grows, checks the count") {
  HostStaging<DeviceLikeCpu> st;
  Tensor<DeviceLikeCpu> x;
  const std::vector<std::uint8_t> bytes{1, 2, 3, 4, 5, 6};
  DeviceLikeCpu::pinned_uploads = 0;
  st.upload(bytes.begin(), bytes.end(), x, {2, 3});
  CHECK(x.to_host() == std::vector<float>{1, 2, 3, 4, 5, 6});
  CHECK(x.shape() == Shape{2, 3});
  CHECK(DeviceLikeCpu::pinned_uploads == 1);
  const auto cap = st.capacity();
  st.upload(bytes.begin(), bytes.begin() + 2, x, {2});
  CHECK(st.capacity() == cap);  // no new allocation for a smaller batch
  CHECK(x.to_host() == std::vector<float>{1, 2});
  CHECK_THROWS_WITH_AS(st.upload(bytes.begin(), bytes.end(), x, {4}), doctest::Contains("got 6 values for shape"), Error);
  HostStaging<Cpu> plain;
  Tensor<Cpu> y;
  plain.upload(bytes.begin(), bytes.end(), y, {6});
  CHECK(y.to_host() == std::vector<float>{1, 2, 3, 4, 5, 6});
}

namespace {
template <class B>
struct FitRun {
  FitResult result;
  std::vector<float> values;
  std::int64_t waits = 0;
  std::vector<double> train_losses;  // each epoch's, from metrics.jsonl
};
// With distill, the objective is the distiller's (TeacherObjective: a second, fixed ViT as the
// teacher, alpha 0.5, temperature 2); with returned_loss, its loss comes back from
// forward_backward instead of going through step scalars (the objective before 2026-11-28).
template <class Teacher>
struct ReturnedLoss {  // TeacherObjective without forward_backward_into
  TeacherObjective<Teacher> inner;
  double forward_backward(const auto& z, const auto& t, const auto& x) { return inner.forward_backward(z, t, x); }
  const auto& grad() const { return inner.grad(); }
};
template <class B>
FitRun<B> fit_micro(int train_n, const std::string& name, bool distill = false, bool returned_loss = false) {
  const auto train = test::learnable_set(train_n, 31), test_set = test::learnable_set(48, 32);
  Model<presets::VitMicro, B> model, teacher;
  Initializer init(9), teacher_init(10);
  model.reset_parameters(init);
  teacher.reset_parameters(teacher_init);
  FitOptions o;
  o.epochs = 2;
  o.batch = 32;
  o.lr = 2e-3;
  o.clip = 0.05;  // small enough to clip every step
  o.progress = false;
  o.seed = 4;
  o.augment = {.crop_padding = 2, .hflip = true, .mixup_alpha = 0.8f, .mix_prob = 0.5f, .label_smoothing = 0.1f};
  const hatch_test::TempDir tmp("hatch_test_async_" + name);
  o.out = tmp.path;
  FitRun<B> run;
  DeviceLikeCpu::waits = 0;
  DeviceLikeCpu::losses = 0;
  DeviceLikeCpu::losses_at_wait.clear();
  if (!distill) {
    run.result = fit(model, train, test_set, o);
  } else if (!returned_loss) {
    TeacherObjective<Model<presets::VitMicro, B>> objective(teacher, 0.5, 2.0);
    run.result = fit(model, train, test_set, o, objective);
  } else {
    ReturnedLoss<Model<presets::VitMicro, B>> objective{{teacher, 0.5, 2.0}};
    run.result = fit(model, train, test_set, o, objective);
  }
  run.waits = DeviceLikeCpu::waits;
  model.visit([&](const std::string&, Parameter<B>& p) {
    auto h = p.value.to_host();
    run.values.insert(run.values.end(), h.begin(), h.end());
  }, "");
  std::ifstream metrics(o.out / "metrics.jsonl");
  for (std::string line; std::getline(metrics, line);)
    run.train_losses.push_back(nlohmann::json::parse(line).at("train_loss").get<double>());
  return run;
}
}  // namespace

TEST_CASE("fit through a backend with its own step scalars: the same training, one wait per step") {
  const auto cpu = fit_micro<Cpu>(128, "cpu");
  const auto dev = fit_micro<DeviceLikeCpu>(128, "dev");
  CHECK(dev.values == cpu.values);  // bit for bit: the same arithmetic, only where values wait differs
  CHECK(dev.result.test.loss == cpu.result.test.loss);
  CHECK(dev.result.test.accuracy == cpu.result.test.accuracy);
  CHECK(dev.result.images == cpu.result.images);
  // Step i's values are waited for after step i + 1 was queued: the first epoch's four steps
  // are read when 2, 3, 4 and (at the epoch's end) 4 losses had been queued, then the two
  // evaluation batches each read their own; the second epoch likewise.
  CHECK(DeviceLikeCpu::losses_at_wait == std::vector<std::int64_t>{2, 3, 4, 4, 5, 6, 8, 9, 10, 10, 11, 12});
  // 2 epochs of 4 and of 2 steps, the same evaluation and setup: the difference is 4 steps' waits.
  const auto fewer = fit_micro<DeviceLikeCpu>(64, "dev64");
  CHECK(dev.waits - fewer.waits == 4);
}

TEST_CASE("fit with the distiller's objective: the loss through step scalars, the same training, one wait per step") {
  const auto returned = fit_micro<Cpu>(128, "kd_ret", true, true);
  const auto cpu = fit_micro<Cpu>(128, "kd_cpu", true);
  const auto dev = fit_micro<DeviceLikeCpu>(128, "kd_dev", true);
  CHECK(cpu.values == returned.values);  // the gradients do not depend on how the loss is read
  CHECK(dev.values == cpu.values);
  CHECK(dev.result.test.loss == cpu.result.test.loss);
  REQUIRE(cpu.train_losses.size() == 2);
  REQUIRE(returned.train_losses.size() == 2);
  for (int e = 0; e < 2; ++e)  // the loss combined from its parts: the same to rounding
    CHECK(cpu.train_losses[std::size_t(e)] == doctest::Approx(returned.train_losses[std::size_t(e)]).epsilon(1e-12));
  CHECK(dev.train_losses == cpu.train_losses);
  // One wait per training step as with cross-entropy; returned, the loss cost three more (the
  // cross-entropy and the two distillation sums, each read back on its own).
  const auto fewer = fit_micro<DeviceLikeCpu>(64, "kd_dev64", true);
  CHECK(dev.waits - fewer.waits == 4);
  const auto dev_returned = fit_micro<DeviceLikeCpu>(128, "kd_dev_ret", true, true);
  const auto fewer_returned = fit_micro<DeviceLikeCpu>(64, "kd_dev_ret64", true, true);
  CHECK(dev_returned.waits - fewer_returned.waits == 4 * 4);
}

TEST_CASE("step scalars: a slot combined from others when read; the distillation loss through it") {
  StepScalars<DeviceLikeCpu> s(4);
  Tensor<DeviceLikeCpu> x;
  x.from_host(std::vector<float>{3, 4}, {2});
  s.sum_squares(1, x.data(), 2);  // 25
  s.set(2, 2);
  s.combine(0, {{1, 0.5}, {2, -3}});
  DeviceLikeCpu::waits = 0;
  CHECK(s.read()[0] == 0.5 * 25 - 3 * 2);
  CHECK(DeviceLikeCpu::waits == 1);
  s.set(2, 4);
  CHECK(s.read()[0] == 0.5 * 25 - 3 * 4);  // formed again at every read
  s.set(0, 1);  // written otherwise: no longer combined
  CHECK(s.read()[0] == 1);
  CHECK_THROWS_AS(s.combine(0, {{0, 1.0}}), Error);
  CHECK_THROWS_AS(s.combine(0, {{1, 1.0}, {2, 1.0}, {3, 1.0}, {1, 1.0}, {2, 1.0}}), Error);
  CHECK_THROWS_AS(s.combine(0, {{4, 1.0}}), Error);

  // DistilledCrossEntropy: its loss through four slots equals the returned one, its gradient is
  // the same bit for bit, on Cpu and on the device-like backend.
  const Case c;
  std::mt19937 g(8);
  std::normal_distribution<float> n;
  std::vector<float> zt(c.z.size());
  for (auto& v : zt) v = n(g);
  auto check = [&](auto backend) {
    using B = decltype(backend);
    Tensor<B> z, t, teacher;
    z.from_host(c.z, {c.rows, c.cols});
    t.from_host(c.t, {c.rows, c.cols});
    teacher.from_host(zt, {c.rows, c.cols});
    DistilledCrossEntropy<B> returned(0.3, 2.0), into(0.3, 2.0);
    const double loss = returned.forward_backward(z, t, teacher);
    StepScalars<B> sc(1 + DistilledCrossEntropy<B>::scalar_slots);
    into.forward_backward_into(z, t, teacher, sc, 1);
    CHECK(sc.read()[1] == doctest::Approx(loss).epsilon(1e-12));
    CHECK(into.grad().to_host() == returned.grad().to_host());
  };
  check(Cpu{});
  check(DeviceLikeCpu{});
}
