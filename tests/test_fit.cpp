// The fit loop: it learns, it resumes exactly after a kill, it stops clearly on divergence.
#include <hatch/train/fit.hpp>

#include <filesystem>
#include <fstream>
#include <set>

#include "files.hpp"
#include "support.hpp"

using namespace hatch;
using test::learnable_set;

namespace {

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
  const auto train = learnable_set(512, 1), test = learnable_set(200, 2);
  Model<presets::VitMicro, Cpu> model;
  Initializer init(3);
  model.reset_parameters(init);
  const hatch_test::TempDir tmp("hatch_test_fit_learn");
  const auto& dir = tmp.path;
  auto o = options(dir);
  o.augment = {};
  o.epochs = 4;
  const auto r = fit(model, train, test, o);
  CHECK(r.test.accuracy > 0.8);
  std::ifstream log(dir / "metrics.jsonl");
  int lines = 0;
  for (std::string l; std::getline(log, l); ++lines) CHECK(nlohmann::json::parse(l).contains("test_accuracy"));
  CHECK(lines == 4);
}

TEST_CASE("fit: eval_every evaluates every N-th epoch and the last; lr_per_epoch holds the rate for an epoch") {
  const auto train = learnable_set(256, 21), test = learnable_set(64, 22);
  auto lines_of = [](const std::filesystem::path& dir) {
    std::vector<nlohmann::json> lines;
    std::ifstream log(dir / "metrics.jsonl");
    for (std::string l; std::getline(log, l);) lines.push_back(nlohmann::json::parse(l));
    return lines;
  };
  auto run = [&](const std::string& name, int eval_every, bool per_epoch) {
    Model<presets::VitMicro, Cpu> model;
    Initializer init(23);
    model.reset_parameters(init);
    const hatch_test::TempDir tmp("hatch_test_fit_" + name);
    const auto& dir = tmp.path;
    auto o = options(dir);
    o.augment = {};
    o.epochs = 5;
    o.warmup_epochs = 0;
    o.eval_every = eval_every;
    o.lr_per_epoch = per_epoch;
    const auto r = fit(model, train, test, o);
    auto lines = lines_of(dir);
    return std::make_pair(r, lines);
  };
  const auto [every, all_lines] = run("every1", 1, false);
  const auto [sparse, sparse_lines] = run("every2", 2, false);
  REQUIRE(sparse_lines.size() == 5);
  for (int e = 0; e < 5; ++e) {
    CAPTURE(e);
    CHECK(sparse_lines[e].contains("test_accuracy") == (e == 1 || e == 3 || e == 4));
    CHECK(sparse_lines[e]["train_loss"] == all_lines[e]["train_loss"]);  // evaluation changes no training
  }
  CHECK(sparse.test.accuracy == every.test.accuracy);
  // Per epoch: epoch e trains at the cosine's value at its start, so epoch 1 at the peak rate.
  const auto [held, held_lines] = run("held", 1, true);
  CHECK(held_lines[0]["lr"].get<double>() == doctest::Approx(2e-3).epsilon(1e-12));
  CHECK(all_lines[0]["lr"].get<double>() < 2e-3 * 0.99);
  const WarmupCosine cos{2e-3, 1e-5, 1e-6, 0, 5};
  for (int e = 0; e < 5; ++e) CHECK(held_lines[e]["lr"].get<double>() == doctest::Approx(cos.at(e)).epsilon(1e-12));
  CHECK(held_lines[4]["train_loss"] != all_lines[4]["train_loss"]);
  CHECK_THROWS_AS(run("bad", 0, false), Error);
}

TEST_CASE("a run killed after an epoch and resumed ends with the same weights") {
  const auto train = learnable_set(256, 3), test = learnable_set(64, 4);
  auto fresh_model = [] {
    auto m = std::make_unique<Model<presets::VitMicro, Cpu>>();
    Initializer init(5);
    m->reset_parameters(init);
    set_drop_path(*m, 0.1);
    return m;
  };
  const hatch_test::TempDir tmp_a("hatch_test_fit_a"), tmp_b("hatch_test_fit_b");
  const auto &dir_a = tmp_a.path, &dir_b = tmp_b.path;
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
}

TEST_CASE("a diverging run stops with a clear message") {
  const auto train = learnable_set(128, 5), test = learnable_set(32, 6);
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
  CHECK_THROWS_WITH_AS(fit(model, train, test, o),
                       doctest::Contains("at the first step, before any update: the model's weights or the data"),
                       Error);
  Model<presets::VitMicro, Cpu> fine;  // finite weights, an absurd learning rate
  fine.reset_parameters(init);
  o.lr = 1e30;
  o.warmup_epochs = 0;
  CHECK_THROWS_WITH_AS(fit(fine, train, test, o), doctest::Contains("training diverged"), Error);
}

namespace {
std::vector<nlohmann::json> metrics_lines(const std::filesystem::path& dir) {
  std::vector<nlohmann::json> out;
  std::ifstream log(dir / "metrics.jsonl");
  for (std::string l; std::getline(log, l);) out.push_back(nlohmann::json::parse(l));
  return out;
}
std::unique_ptr<Model<presets::VitMicro, Cpu>> micro_model(std::uint64_t seed = 5) {
  auto m = std::make_unique<Model<presets::VitMicro, Cpu>>();
  Initializer init(seed);
  m->reset_parameters(init);
  return m;
}
}  // namespace

TEST_CASE("fit resumes only a run of the same recipe, and says so") {
  const auto train = learnable_set(128, 7), test = learnable_set(32, 8);
  const hatch_test::TempDir tmp("hatch_test_fit_recipe");
  const auto& dir = tmp.path;
  auto o = options(dir);
  o.epochs = 1;
  o.recipe["preset"] = "vit-micro";
  fit(*micro_model(), train, test, o);

  SUBCASE("another learning rate and seed") {
    auto changed = o;
    changed.lr = 1e-4;
    changed.seed = 3;
    const std::string msg = test::error_message([&] { fit(*micro_model(), train, test, changed); });
    INFO(msg);
    CHECK(msg.starts_with((dir / "train.state.safetensors").string() + ": a training state of another recipe"));
    CHECK(test::has(msg, "lr 0.002 in the state, 0.0001 now"));
    CHECK(test::has(msg, "seed 11 in the state, 3 now"));
    CHECK(test::has(msg, "FitOptions::resume = false"));
  }
  SUBCASE("fewer or more epochs") {
    auto changed = o;
    changed.epochs = 2;
    CHECK(test::has(test::error_message([&] { fit(*micro_model(), train, test, changed); }),
                    "epochs 1 in the state, 2 now"));
  }
  SUBCASE("another data set size, another caller entry") {
    auto changed = o;
    changed.recipe["preset"] = "vit-tiny";
    CHECK(test::has(test::error_message([&] { fit(*micro_model(), learnable_set(96, 7), test, changed); }),
                    "train-images 128 in the state, 96 now"));
    CHECK(test::has(test::error_message([&] { fit(*micro_model(), train, test, changed); }),
                    "preset \"vit-micro\" in the state, \"vit-tiny\" now"));
  }
  SUBCASE("the same recipe resumes (nothing left to train) and a fresh start overwrites") {
    const auto r = fit(*micro_model(), train, test, o);
    CHECK(r.epochs == 1);
    auto fresh = o;
    fresh.resume = false;
    fresh.lr = 1e-4;
    fit(*micro_model(), train, test, fresh);
    auto again = o;
    again.lr = 1e-4;
    CHECK_NOTHROW(fit(*micro_model(), train, test, again));  // the state is the new run's now
  }
}

TEST_CASE("fit refuses a hand-edited training state with the file's name") {
  const auto train = learnable_set(64, 9), test = learnable_set(32, 10);
  const hatch_test::TempDir tmp("hatch_test_fit_state");
  const auto& dir = tmp.path;
  auto o = options(dir);
  o.epochs = 1;
  fit(*micro_model(), train, test, o);
  const auto file = dir / "train.state.safetensors";
  auto rewrite_state = [&](const nlohmann::json& state) {
    const auto f = io::SafeTensorsFile::read(file);
    io::SafeTensorsWriter w;
    for (const auto& name : f.names()) {
      const auto shape = f.at(name).shape;
      const auto values = f.to_float(name, shape);
      w.add(name, shape, std::span<const float>(values));
    }
    for (const auto& [k, v] : f.metadata().items()) w.set_metadata(k, k == "state" ? state.dump() : v.get<std::string>());
    w.write(file);
  };
  const auto state = nlohmann::json::parse(read_metadata(file).at("state"));
  SUBCASE("a negative epoch") {
    auto bad = state;
    bad["epoch"] = -5;
    rewrite_state(bad);
    const std::string msg = test::error_message([&] { fit(*micro_model(), train, test, o); });
    CHECK(msg == file.string() + ": the training state's 'epoch' is -5, expected an integer in [0, 1]");
  }
  SUBCASE("no epoch") {
    auto bad = state;
    bad.erase("epoch");
    rewrite_state(bad);
    CHECK(test::error_message([&] { fit(*micro_model(), train, test, o); }) ==
          file.string() + ": the training state has no 'epoch' entry");
  }
}

TEST_CASE("metrics.jsonl holds one line per epoch of the run that made the model") {
  const auto train = learnable_set(64, 11), test = learnable_set(32, 12);
  const hatch_test::TempDir tmp("hatch_test_fit_metrics");
  const auto& dir = tmp.path;
  auto o = options(dir);
  o.epochs = 3;
  auto other = o;
  other.phase = "meta";  // another phase sharing the directory keeps its lines
  other.epochs = 1;
  fit(*micro_model(), train, test, other);

  struct Killed {};
  o.on_epoch_end = [](int epoch, const EvalResult&) {
    if (epoch == 1) throw Killed{};
  };
  CHECK_THROWS_AS(fit(*micro_model(), train, test, o), Killed);
  {  // killed after writing epoch 2's line, before saving its state
    std::ofstream log(dir / "metrics.jsonl", std::ios::app);
    log << nlohmann::json{{"phase", "train"}, {"epoch", 2}, {"test_accuracy", 0.5}}.dump() << '\n';
  }
  o.on_epoch_end = nullptr;
  fit(*micro_model(), train, test, o);
  auto epochs_of = [&](const std::string& phase) {
    std::vector<int> e;
    std::set<std::string> runs;
    for (const auto& j : metrics_lines(dir))
      if (j["phase"] == phase) {
        e.push_back(j["epoch"].get<int>());
        runs.insert(j["run"].get<std::string>());
      }
    CHECK(runs.size() == 1);  // one run id, kept across the resume
    return e;
  };
  CHECK(epochs_of("train") == std::vector<int>{1, 2, 3});
  CHECK(epochs_of("meta") == std::vector<int>{1});

  o.resume = false;  // a fresh run replaces the phase's lines
  o.epochs = 2;
  fit(*micro_model(), train, test, o);
  CHECK(epochs_of("train") == std::vector<int>{1, 2});
  CHECK(epochs_of("meta") == std::vector<int>{1});
}

TEST_CASE("fit refuses a test set whose images differ from the training set's before training") {
  const auto train = learnable_set(64, 13);
  auto test = learnable_set(32, 14);
  test.height = test.width = 32;
  test.images.resize(std::size_t(32) * 32 * 32);
  test.source = "/data/t10k-images-idx3-ubyte.gz";
  auto o = options({});
  bool trained = false;
  o.on_epoch_end = [&](int, const EvalResult&) { trained = true; };
  CHECK(test::error_message([&] { fit(*micro_model(), train, test, o); }) ==
        "/data/t10k-images-idx3-ubyte.gz: test images are 1x32x32, the training images 1x28x28; both sets must "
        "have the same image shape and classes");
  CHECK_FALSE(trained);
  CHECK(test::error_message([&] { data::expect_image_shape(test, 1, 28, 28, "preset vit-micro"); }) ==
        "/data/t10k-images-idx3-ubyte.gz: images are 1x32x32 (channels x height x width), preset vit-micro "
        "expects 1x28x28");
}
