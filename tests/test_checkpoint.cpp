// Checkpoints: round trips, per-stage files, every rejected file (the model untouched),
// metadata checks, atomic writes, bitwise-exact resume of AdamW training, and PyTorch interop
// (tests/fixtures/torch_interop.py loads hatch's checkpoint with strict=True and hands back
// its own).
#include <hatch/train/checkpoint.hpp>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include <sys/wait.h>
#include <unistd.h>

#include "support.hpp"
#include "files.hpp"

#ifndef HATCH_FIXTURE_DIR
#define HATCH_FIXTURE_DIR "tests/fixtures"
#endif

using namespace hatch;
using test::error_message;
using test::has;
using test::rel_error;
namespace fs = std::filesystem;

namespace {

using hatch_test::TempDir;


// Every parameter's bytes, by name: equality is bitwise.
template <class M>
std::map<std::string, std::vector<std::uint8_t>> snapshot(M& model) {
  using B = typename M::backend;
  std::map<std::string, std::vector<std::uint8_t>> out;
  model.visit(
      [&](const std::string& name, Parameter<B>& p) {
        const auto h = p.value.to_host();
        std::vector<std::uint8_t> bytes(h.size() * sizeof(h[0]));
        if (!h.empty()) std::memcpy(bytes.data(), h.data(), bytes.size());
        out[name] = std::move(bytes);
      },
      "");
  return out;
}

template <class M>
std::vector<float> forward(M& model, const Tensor<Cpu>& x) {
  Context ctx;
  return model.forward(x, ctx).to_host();
}


std::vector<std::uint8_t> file_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void put(const fs::path& p, const std::vector<std::uint8_t>& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}

using Micro = Model<presets::VitMicro, Cpu>;
using Micro3 = Model<Vit<presets::micro, Depths<1, 1, 1>>, Cpu>;  // no blocks.3
using Tiny = Model<presets::VitTiny, Cpu>;

}  // namespace

TEST_CASE("checkpoint: save then load reproduces every parameter bitwise") {
  TempDir dir;
  const fs::path file = dir.path / "model.safetensors";
  Micro a, b;
  test::randomize_parameters(a, 1);
  test::randomize_parameters(b, 2);
  save_parameters(a, file, {{"preset", "vit-micro"}, {"phase", "meta"}});
  CHECK(snapshot(a) != snapshot(b));
  load_parameters(b, file);
  CHECK(snapshot(a) == snapshot(b));

  const auto f = io::SafeTensorsFile::read(file);
  CHECK(f.metadata()["format"] == "hatch-1");
  CHECK(f.metadata()["preset"] == "vit-micro");
  CHECK(f.metadata()["phase"] == "meta");
  // timm names with PyTorch shapes, F32.
  CHECK(f.at("patch_embed.proj.weight").shape == std::vector<std::int64_t>{32, 1, 7, 7});
  CHECK(f.at("blocks.2.attn.qkv.weight").shape == std::vector<std::int64_t>{96, 32});
  CHECK(f.at("pos_embed").shape == std::vector<std::int64_t>{1, 17, 32});
  CHECK(f.at("head.weight").dtype == io::DType::F32);
  std::size_t params = 0;
  a.visit([&](const std::string&, Parameter<Cpu>&) { ++params; }, "");
  CHECK(f.names().size() == params);

  SUBCASE("double backends store F64") {
    Model<presets::VitMicro, Cpu64> c, d;
    test::randomize_parameters(c, 3);
    save_parameters(c, file);
    CHECK(io::SafeTensorsFile::read(file).at("head.weight").dtype == io::DType::F64);
    load_parameters(d, file);
    CHECK(snapshot(c) == snapshot(d));
  }
  SUBCASE("a caller's metadata may not contradict hatch's own") {
    CHECK(has(error_message([&] { save_parameters(a, file, {{"format", "mine"}}); }), "'format'"));
    save_parameters(a, file, {{"format", "hatch-1"}});  // repeating it is fine
  }
}

TEST_CASE("checkpoint: one file per stage, global names, assembly reproduces the forward pass") {
  TempDir dir;
  Micro a, b;
  test::randomize_parameters(a, 11);
  test::randomize_parameters(b, 12);
  std::mt19937_64 rng(5);
  const auto x = test::random_tensor<Cpu>({3, 1, 28, 28}, rng);
  const auto ya = forward(a, x);

  save_stage<0>(a, stage_file(dir.path, 0), {{"preset", "vit-micro"}});
  for (std::size_t i = 1; i < 4; ++i) save_stage(a, i, stage_file(dir.path, i), {{"preset", "vit-micro"}});
  CHECK(dir.entries() == std::vector<std::string>{"stage0.safetensors", "stage1.safetensors", "stage2.safetensors",
                                                  "stage3.safetensors"});
  const auto s0 = io::SafeTensorsFile::read(stage_file(dir.path, 0));
  CHECK(s0.contains("patch_embed.proj.weight"));
  CHECK(s0.contains("cls_token"));
  CHECK(s0.contains("blocks.0.norm1.weight"));
  CHECK_FALSE(s0.contains("blocks.1.norm1.weight"));
  CHECK(s0.metadata()["stage"] == "0");
  CHECK(s0.metadata()["stages"] == "4");
  const auto s2 = io::SafeTensorsFile::read(stage_file(dir.path, 2));
  CHECK(s2.names().front().starts_with("blocks.2."));
  CHECK(s2.names().back().starts_with("blocks.2."));
  const auto s3 = io::SafeTensorsFile::read(stage_file(dir.path, 3));
  CHECK(s3.contains("blocks.3.mlp.fc2.bias"));
  CHECK(s3.contains("norm.weight"));
  CHECK(s3.contains("head.bias"));

  SUBCASE("stage by stage, compile-time and run-time indices") {
    load_stage<0>(b, stage_file(dir.path, 0));
    load_stage<1>(b, stage_file(dir.path, 1));
    for (std::size_t i = 2; i < 4; ++i) load_stage(b, i, stage_file(dir.path, i));
    CHECK(snapshot(a) == snapshot(b));
    CHECK(forward(b, x) == ya);
  }
  SUBCASE("load_stages assembles the whole model; save_stages writes the same files") {
    load_stages(b, dir.path);
    CHECK(forward(b, x) == ya);
    TempDir dir2;
    save_stages(b, dir2.path);
    for (std::size_t i = 0; i < 4; ++i)
      CHECK(io::SafeTensorsFile::read(stage_file(dir2.path, i)).names() ==
            io::SafeTensorsFile::read(stage_file(dir.path, i)).names());
  }
  SUBCASE("a stage's file into another stage is rejected, the model untouched") {
    const auto before = snapshot(b);
    CHECK(error_message([&] { load_stage(b, 2, stage_file(dir.path, 1)); }) ==
          stage_file(dir.path, 1).string() + ": was written for stage '1', expected '2'");
    CHECK(has(error_message([&] { load_stage(b, 4, stage_file(dir.path, 1)); }), "stage 4 does not exist"));
    // load_stages validates every file before changing any stage.
    auto bytes = file_bytes(stage_file(dir.path, 3));
    bytes.resize(bytes.size() - 4);
    put(stage_file(dir.path, 3), bytes);
    CHECK(has(error_message([&] { load_stages(b, dir.path); }), stage_file(dir.path, 3).string() + ": "));
    CHECK(snapshot(b) == before);
  }
}

TEST_CASE("checkpoint: a file that does not fit is rejected before the model changes") {
  TempDir dir;
  const fs::path file = dir.path / "micro.safetensors";
  Micro micro;
  test::randomize_parameters(micro, 21);
  save_parameters(micro, file, {{"preset", "vit-micro"}});

  SUBCASE("wrong shapes: a vit-micro checkpoint into a vit-tiny") {
    Tiny tiny;
    test::randomize_parameters(tiny, 22);
    const auto before = snapshot(tiny);
    const std::string msg = error_message([&] { load_parameters(tiny, file); });
    INFO(msg);
    CHECK(msg.starts_with(file.string() + ": "));
    CHECK(has(msg, "tensor 'patch_embed.proj.weight' has shape [32,1,7,7], expected [64,1,7,7]"));
    CHECK(has(msg, "written for preset 'vit-micro'"));
    CHECK(snapshot(tiny) == before);
  }
  SUBCASE("missing tensors: a 3-block checkpoint into a 4-block model") {
    Micro3 three;
    test::randomize_parameters(three, 23);
    const fs::path small = dir.path / "three.safetensors";
    save_parameters(three, small);
    Micro m;
    test::randomize_parameters(m, 24);
    const auto before = snapshot(m);
    const std::string msg = error_message([&] { load_parameters(m, small); });
    INFO(msg);
    CHECK(msg.starts_with(small.string() + ": missing 12 of the "));
    CHECK(has(msg, "'blocks.3.norm1.weight' [32]"));
    CHECK(has(msg, "(7 more)"));
    CHECK(snapshot(m) == before);
  }
  SUBCASE("extra tensors: a 4-block checkpoint into a 3-block model, unless allowed") {
    Micro3 three;
    test::randomize_parameters(three, 25);
    const auto before = snapshot(three);
    const std::string msg = error_message([&] { load_parameters(three, file); });
    INFO(msg);
    CHECK(msg.starts_with(file.string() + ": 12 unexpected tensors that the model does not have: "
                                          "'blocks.3.attn.proj.bias', 'blocks.3.attn.proj.weight'"));
    CHECK(has(msg, "allow_extra"));
    CHECK(snapshot(three) == before);
    load_parameters(three, file, {.allow_extra = true});
    auto want = snapshot(micro);
    std::erase_if(want, [](const auto& kv) { return kv.first.starts_with("blocks.3."); });
    CHECK(snapshot(three) == want);
  }
  SUBCASE("truncated and corrupt files") {
    Micro m;
    test::randomize_parameters(m, 26);
    const auto before = snapshot(m);
    auto bytes = file_bytes(file);
    const fs::path bad = dir.path / "bad.safetensors";
    auto truncated = bytes;
    truncated.resize(truncated.size() / 2);
    put(bad, truncated);
    CHECK(error_message([&] { load_parameters(m, bad); }).starts_with(bad.string() + ": "));
    auto corrupt = bytes;
    for (std::size_t i = 8; i < 40; ++i) corrupt[i] = '#';  // the JSON header
    put(bad, corrupt);
    CHECK(has(error_message([&] { load_parameters(m, bad); }), bad.string() + ": header is not valid JSON"));
    put(bad, {1, 2, 3});
    CHECK(error_message([&] { load_parameters(m, bad); }).starts_with(bad.string() + ": file is 3 bytes"));
    CHECK(has(error_message([&] { load_parameters(m, dir.path / "none.safetensors"); }), "cannot open"));
    CHECK(snapshot(m) == before);
  }
  SUBCASE("a file of another hatch format version") {
    io::SafeTensorsWriter w;
    micro.visit([&](const std::string& n, Parameter<Cpu>& p) {
      const auto h = p.value.to_host();
      w.add(n, p.value.shape().vec(), std::span<const float>(h));
    }, "");
    w.set_metadata("format", "hatch-2");
    const fs::path v2 = dir.path / "v2.safetensors";
    w.write(v2);
    Micro m;
    CHECK(has(error_message([&] { load_parameters(m, v2); }), "format 'hatch-2' is not one this hatch reads"));
  }
}

TEST_CASE("checkpoint: metadata checks") {
  TempDir dir;
  const fs::path file = dir.path / "tiny.safetensors";
  Tiny tiny;
  test::randomize_parameters(tiny, 31);
  save_parameters(tiny, file, {{"preset", "vit-tiny"}});
  CHECK(read_metadata(file).at("preset") == "vit-tiny");
  CHECK(read_metadata(file).at("content") == "parameters");
  expect_metadata(file, "preset", "vit-tiny");
  CHECK(error_message([&] { expect_metadata(file, "preset", "vit-small"); }) ==
        file.string() + ": was written for preset 'vit-tiny', expected 'vit-small'");
  CHECK(error_message([&] { expect_metadata(file, "phase", "finetune"); }) ==
        file.string() + ": has no 'phase' metadata, expected phase 'finetune'");
  // The same check as a load option, before anything else is looked at.
  Tiny other;
  const auto before = snapshot(other);
  CHECK(error_message([&] { load_parameters(other, file, {.require_metadata = {{"preset", "vit-small"}}}); }) ==
        file.string() + ": was written for preset 'vit-tiny', expected 'vit-small'");
  CHECK(snapshot(other) == before);
  load_parameters(other, file, {.require_metadata = {{"preset", "vit-tiny"}}});
  CHECK(snapshot(other) == snapshot(tiny));
  CHECK(has(error_message([&] { (void)read_metadata(dir.path / "none"); }), "cannot open"));
}

TEST_CASE("checkpoint: writes are atomic") {
  TempDir dir;
  Micro a, b;
  test::randomize_parameters(a, 41);
  test::randomize_parameters(b, 42);
  const fs::path file = dir.path / "model.safetensors";
  save_parameters(a, file);
  save_parameters(b, file);  // an overwrite replaces the file whole
  CHECK(dir.entries() == std::vector<std::string>{"model.safetensors"});  // no .tmp left
  Micro c;
  load_parameters(c, file);
  CHECK(snapshot(c) == snapshot(b));

  SUBCASE("a missing directory") {
    const fs::path p = dir.path / "no_such_dir" / "m.safetensors";
    CHECK(error_message([&] { save_parameters(a, p); }).starts_with(p.string() + ": "));
    CHECK_FALSE(fs::exists(dir.path / "no_such_dir"));
  }
  SUBCASE("a parent that is a file") {
    const fs::path p = file / "m.safetensors";
    CHECK(error_message([&] { save_parameters(a, p); }).starts_with(p.string() + ": "));
  }
  SUBCASE("a read-only directory keeps the previous checkpoint") {
    fs::permissions(dir.path, fs::perms::owner_read | fs::perms::owner_exec, fs::perm_options::replace);
    if (::access(dir.path.c_str(), W_OK) == 0) {
      MESSAGE("skipped: running as root, permissions do not stop writes");
    } else {
      CHECK(error_message([&] { save_parameters(a, file); }).starts_with(file.string() + ": "));
      CHECK(error_message([&] { save_parameters(a, dir.path / "new.safetensors"); })
                .starts_with((dir.path / "new.safetensors").string() + ": "));
      fs::permissions(dir.path, fs::perms::owner_all, fs::perm_options::replace);
      load_parameters(c, file);
      CHECK(snapshot(c) == snapshot(b));
    }
    fs::permissions(dir.path, fs::perms::owner_all, fs::perm_options::replace);
    CHECK(dir.entries() == std::vector<std::string>{"model.safetensors"});
  }
}

namespace {
// A few AdamW steps on fixed data, drop-path on, randomness drawn per step from the seed.
struct Trainer {
  Micro model;
  AdamW<Cpu> opt;
  SoftTargetCrossEntropy<Cpu> ce;
  WarmupCosine schedule{.base_lr = 2e-3, .min_lr = 1e-5, .warmup_lr = 1e-4, .warmup_steps = 2, .total_steps = 6};
  explicit Trainer(std::uint64_t init_seed) : opt(trainable_parameters(model)) {
    Initializer init(init_seed);
    model.reset_parameters(init);
    set_drop_path(model, 0.1);
  }
  void steps(std::int64_t from, std::int64_t to, std::uint64_t seed, const Tensor<Cpu>& x, const Tensor<Cpu>& t) {
    for (std::int64_t s = from; s < to; ++s) {
      opt.zero_grad();
      Context ctx;
      ctx.training = true;
      ctx.seed = seed + std::uint64_t(s);
      ctx.input_grad = false;
      const auto& logits = model.forward(x, ctx);
      ce.forward_backward(logits, t);
      model.backward(ce.grad(), ctx);
      opt.step(schedule.at(s));
    }
  }
};
}  // namespace

TEST_CASE("checkpoint: a resumed AdamW run matches an uninterrupted one bitwise") {
  TempDir dir;
  std::mt19937_64 rng(7);
  const auto x = test::random_tensor<Cpu>({8, 1, 28, 28}, rng);
  std::vector<int> labels(8);
  for (auto& l : labels) l = int(rng() % 10);
  Tensor<Cpu> targets;
  targets.from_host(smoothed_one_hot(labels, 10, 0.1), {8, 10});
  const std::uint64_t seed = 99;

  Trainer a(1);
  a.steps(0, 6, seed, x, targets);

  const fs::path file = dir.path / "state.safetensors";
  {
    Trainer b(1);
    b.steps(0, 3, seed, x, targets);
    save_training_state(b.model, b.opt, file, {{"epoch", 0}, {"step", 3}, {"seed", seed}, {"best_acc", 0.25}},
                        {{"preset", "vit-micro"}});
  }
  CHECK(dir.entries() == std::vector<std::string>{"state.safetensors"});
  const auto f = io::SafeTensorsFile::read(file);
  CHECK(f.contains("exp_avg.blocks.1.attn.qkv.weight"));
  CHECK(f.contains("exp_avg_sq.head.bias"));
  CHECK(f.metadata()["optimizer_steps"] == "3");
  CHECK(f.metadata()["content"] == "training-state");

  Trainer c(2);  // another initialisation: everything must come from the file
  const auto state = load_training_state(c.model, c.opt, file);
  CHECK(state["step"] == 3);
  CHECK(state["best_acc"] == 0.25);
  CHECK(c.opt.steps() == 3);
  c.steps(state["step"].get<std::int64_t>(), 6, state["seed"].get<std::uint64_t>(), x, targets);
  CHECK(c.opt.steps() == a.opt.steps());
  CHECK(snapshot(c.model) == snapshot(a.model));

  SUBCASE("a training state also loads as parameters when extras are allowed") {
    Micro m;
    const std::string msg = error_message([&] { load_parameters(m, file); });
    CHECK(has(msg, "unexpected tensors"));
    CHECK(has(msg, "training state"));
    load_parameters(m, file, {.allow_extra = true});
  }
  SUBCASE("a parameters-only file is not a training state; nothing changes") {
    const fs::path params = dir.path / "params.safetensors";
    save_parameters(a.model, params);
    Trainer d(3);
    d.opt.steps() = 5;
    const auto before = snapshot(d.model);
    CHECK(has(error_message([&] { (void)load_training_state(d.model, d.opt, params); }), "has no 'state' metadata"));
    // Moments missing from the file: checked before anything is changed.
    io::SafeTensorsWriter w;
    a.model.visit([&](const std::string& n, Parameter<Cpu>& p) {
      const auto h = p.value.to_host();
      w.add(n, p.value.shape().vec(), std::span<const float>(h));
    }, "");
    w.set_metadata("state", "{}");
    w.set_metadata("optimizer_steps", "3");
    w.write(params);
    CHECK(has(error_message([&] { (void)load_training_state(d.model, d.opt, params); }), "'exp_avg."));
    CHECK(snapshot(d.model) == before);
    CHECK(d.opt.steps() == 5);
  }
}

TEST_CASE("checkpoint: PyTorch loads hatch's checkpoint and hands back its own" * doctest::test_suite("interop")) {
  if (!fs::exists("/usr/bin/python3")) {
    MESSAGE("skipped: there is no /usr/bin/python3");
    return;
  }
  TempDir dir;
  Micro m;
  test::randomize_parameters(m, 51);
  auto meta = vit_metadata<presets::VitMicro>();
  meta["preset"] = "vit-micro";
  const fs::path ckpt = dir.path / "hatch.safetensors", probe = dir.path / "probe.safetensors";
  save_parameters(m, ckpt, meta);
  std::mt19937_64 rng(9);
  const auto x = test::random_tensor<Cpu>({3, 1, 28, 28}, rng);
  {
    io::SafeTensorsWriter w;
    const auto h = x.to_host();
    w.add("input", x.shape().vec(), std::span<const float>(h));
    w.write(probe);
  }
  const std::string cmd = "/usr/bin/python3 '" HATCH_FIXTURE_DIR "/torch_interop.py' load-and-run '" + ckpt.string() +
                          "' '" + probe.string() + "' '" + dir.path.string() + "'";
  const int status = std::system(cmd.c_str());
  if (status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 77) {  // the script's "no torch"
    MESSAGE("skipped: /usr/bin/python3 cannot import torch");
    return;
  }
  REQUIRE_MESSAGE((status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0), cmd, " exited with status ",
                  status);

  const auto logits = io::SafeTensorsFile::read(dir.path / "logits.safetensors");
  // hatch's weights, PyTorch's forward pass.
  CHECK(rel_error(forward(m, x), logits.to_float("logits", {3, 10})) <= 1e-5);

  // PyTorch's modified state_dict, loaded strictly into hatch.
  const auto before = snapshot(m);
  std::map<std::string, std::vector<float>> expected;
  m.visit([&](const std::string& n, Parameter<Cpu>& p) {
    auto h = p.value.to_host();
    for (auto& v : h) v = v * 0.5f + 0.0625f;  // exact product: one rounding, as in PyTorch
    expected[n] = h;
  }, "");
  load_parameters(m, dir.path / "torch_checkpoint.safetensors");
  CHECK(snapshot(m) != before);
  m.visit([&](const std::string& n, Parameter<Cpu>& p) { CHECK_MESSAGE(p.value.to_host() == expected[n], n); }, "");
  CHECK(rel_error(forward(m, x), logits.to_float("logits_modified", {3, 10})) <= 1e-5);
  expect_metadata(dir.path / "torch_checkpoint.safetensors", "dim", "32");
}

TEST_CASE("checkpoint: non-finite values are refused, naming the tensor") {
  TempDir dir;
  Micro m;
  test::randomize_parameters(m, 51);
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Micro poisoned;
    test::randomize_parameters(poisoned, 52);
    poisoned.visit([&](const std::string& name, Parameter<Cpu>& p) {
      if (name == "blocks.2.mlp.fc1.bias") {
        auto h = p.value.to_host();
        h[3] = bad;
        p.value.from_host(h);
      }
    }, "");
    const fs::path file = dir.path / "poisoned.safetensors";
    save_parameters(poisoned, file);
    const auto before = snapshot(m);
    const std::string msg = error_message([&] { load_parameters(m, file); });
    INFO(msg);
    CHECK(msg.starts_with(file.string() + ": tensor 'blocks.2.mlp.fc1.bias' holds a non-finite value"));
    CHECK(has(msg, "flat index 3"));
    CHECK(snapshot(m) == before);
  }
}

TEST_CASE("checkpoint: temporaries of killed writers are cleaned up, live ones are kept") {
  TempDir dir;
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ::waitpid(child, nullptr, 0);  // a pid that is certainly dead now
  const std::string host = io::detail::host_name();
  const fs::path dead = dir.path / ("a.safetensors.tmp." + host + "." + std::to_string(child));
  const fs::path dead_old_style = dir.path / ("b.safetensors.tmp." + std::to_string(child));
  const fs::path dead_dir = dir.path / "sub" / ("meta.tmp." + host + "." + std::to_string(child));
  const fs::path live = io::temporary_path(dir.path / "c.safetensors");  // this process's own
  const fs::path other_host = dir.path / ("d.safetensors.tmp.some-other-host." + std::to_string(child));
  const fs::path not_temporary = dir.path / "e.tmp.notapid";
  fs::create_directories(dead_dir);
  for (const auto& p : {dead, dead_old_style, live, other_host, not_temporary, dead_dir / "stage0.safetensors"})
    put(p, {1, 2, 3});
  CHECK(io::remove_stale_temporaries(dir.path) == 3);
  CHECK_FALSE(fs::exists(dead));
  CHECK_FALSE(fs::exists(dead_old_style));
  CHECK_FALSE(fs::exists(dead_dir));
  CHECK(fs::exists(live));
  CHECK(fs::exists(other_host));  // it may be alive on the machine that wrote it
  CHECK(fs::exists(not_temporary));
}
