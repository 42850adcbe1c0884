// The fit loop: it learns, it resumes exactly after a kill, it stops clearly on divergence.
#include <hatch/train/fit.hpp>

#include <filesystem>

#include "support.hpp"

using namespace hatch;

namespace {
// A learnable synthetic set: the class is encoded in which image row is bright.
data::Dataset synthetic(int n, std::uint64_t seed) {
  data::Dataset d;
  d.n = n;
  d.height = d.width = 28;
  d.images.resize(std::size_t(n) * 28 * 28);
  d.labels.resize(n);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> noise(0.f, 0.3f);
  for (int i = 0; i < n; ++i) {
    const int c = int(rng() % 10);
    d.labels[i] = c;
    for (int p = 0; p < 28 * 28; ++p) d.images[std::size_t(i) * 784 + p] = noise(rng) + ((p / 28) / 3 == c ? 2.f : 0.f);
  }
  return d;
}

std::filesystem::path fresh_dir(const std::string& name) {
  auto p = std::filesystem::temp_directory_path() / ("hatch_test_fit_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(p);
  return p;
}

template <class M>
std::vector<float> all_values(M& m) {
  std::vector<float> out;
  m.visit([&](const std::string&, Parameter<Cpu>& p) {
    auto h = p.value.to_host();
    out.insert(out.end(), h.begin(), h.end());
  }, "");
  return out;
}

FitOptions options(const std::filesystem::path& out) {
  FitOptions o;
  o.epochs = 3;
  o.batch = 32;
  o.lr = 2e-3;
  o.warmup_epochs = 0.5;
  o.out = out;
  o.progress = false;
  o.seed = 11;
  o.augment = {.crop_padding = 2, .hflip = true, .mixup_alpha = 0.8f, .cutmix_alpha = 1.0f, .mix_prob = 0.5f,
               .label_smoothing = 0.1f};
  return o;
}
}  // namespace

TEST_CASE("fit learns a learnable task and writes one metrics line per epoch") {
  const auto train = synthetic(512, 1), test = synthetic(200, 2);
  Model<presets::VitMicro, Cpu> model;
  Initializer init(3);
  model.reset_parameters(init);
  const auto dir = fresh_dir("learn");
  auto o = options(dir);
  o.augment = {};
  o.epochs = 4;
  const auto r = fit(model, train, test, o);
  CHECK(r.test.accuracy > 0.8);
  std::ifstream log(dir / "metrics.jsonl");
  int lines = 0;
  for (std::string l; std::getline(log, l); ++lines) CHECK(nlohmann::json::parse(l).contains("test_accuracy"));
  CHECK(lines == 4);
  std::filesystem::remove_all(dir);
}

TEST_CASE("a run killed after an epoch and resumed ends with the same weights") {
  const auto train = synthetic(256, 3), test = synthetic(64, 4);
  auto fresh_model = [] {
    auto m = std::make_unique<Model<presets::VitMicro, Cpu>>();
    Initializer init(5);
    m->reset_parameters(init);
    set_drop_path(*m, 0.1);
    return m;
  };
  const auto dir_a = fresh_dir("a"), dir_b = fresh_dir("b");
  auto a = fresh_model();
  fit(*a, train, test, options(dir_a));

  struct Killed {};
  auto b = fresh_model();
  auto o = options(dir_b);
  o.on_epoch_end = [](int epoch, const EvalResult&) {
    if (epoch == 1) throw Killed{};  // the process dies right after epoch 1
  };
  CHECK_THROWS_AS(fit(*b, train, test, o), Killed);
  auto resumed = fresh_model();  // a new process: fresh weights, fresh optimizer
  o.on_epoch_end = nullptr;
  const auto r = fit(*resumed, train, test, o);
  CHECK(r.epochs == 3);
  CHECK(all_values(*resumed) == all_values(*a));
  std::filesystem::remove_all(dir_a);
  std::filesystem::remove_all(dir_b);
}

TEST_CASE("a diverging run stops with a clear message") {
  const auto train = synthetic(128, 5), test = synthetic(32, 6);
  Model<presets::VitMicro, Cpu> model;
  Initializer init(1);
  model.reset_parameters(init);
  model.visit([](const std::string& name, Parameter<Cpu>& p) {
    if (name == "head.weight") p.value.fill(std::numeric_limits<float>::infinity());
  }, "");
  FitOptions o;
  o.epochs = 1;
  o.batch = 32;
  o.progress = false;
  CHECK_THROWS_WITH_AS(fit(model, train, test, o), doctest::Contains("training diverged"), Error);
}
