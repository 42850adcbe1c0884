#pragma once
// Backend-generic runners for the CPU-vs-CUDA parity tests. The same template is instantiated
// for Cpu in cpu_side.cpp (g++, Eigen) and for Cuda in test_cuda_backend.cu (nvcc), so both
// sides run literally the same steps; only plain std::vector<float> results cross between them.
//
// Every input is drawn on the host from the case's seed, parameters are initialised on the host
// (Initializer) and then perturbed on the host (so LayerNorm gains are not all one and biases not
// all zero), and gradients start from non-zero values (so accumulation is checked too).
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "hatch/core.hpp"
#include "hatch/layers/moe.hpp"
#include "hatch/modular/incubator.hpp"
#include "hatch/train/fit.hpp"

#include "../files.hpp"

namespace hatch_test {

using Results = std::map<std::string, std::vector<float>>;

struct RunOptions {
  bool training = false;
  bool param_grads = true;
  bool input_grad = true;
  double drop = 0;        // rate for every Dropout / DropPath in the layer
  std::string frozen{};   // a parameter name to mark trainable = false
  double input_scale = 1; // standard deviation of the random input
  // Routing that differs between the two steps (a noisy router in training) sends other row
  // counts to the experts, whose buffers may then grow: no steady state, no "allocs.steady".
  bool routing_varies = false;
};

// Keys that are properties of one run, expected to be zero on each backend instead of compared
// across them: allocations in a steady step, bytes that must not change.
inline bool is_run_property(const std::string& key) {
  return key.rfind("allocs.", 0) == 0 || key.rfind("changed.", 0) == 0;
}

template <class Scalar>
std::vector<Scalar> normal_values(std::mt19937_64& rng, std::size_t n, double mean, double stddev) {
  std::normal_distribution<double> nd(mean, stddev);
  std::vector<Scalar> v(n);
  for (auto& x : v) x = static_cast<Scalar>(nd(rng));
  return v;
}

template <class Scalar>
std::vector<float> as_float(const std::vector<Scalar>& v) {
  return std::vector<float>(v.begin(), v.end());
}

template <hatch::Backend B>
hatch::Tensor<B> random_tensor(std::mt19937_64& rng, hatch::Shape s, double stddev = 1.0) {
  hatch::Tensor<B> t;
  t.from_host(normal_values<typename B::Scalar>(rng, std::size_t(s.numel()), 0.0, stddev), s);
  return t;
}

// Perturbs values and gradients of every parameter in visit order; marks one as frozen.
template <hatch::Backend B, class L>
void prepare_parameters(L& layer, std::mt19937_64& rng, const RunOptions& o) {
  using S = typename B::Scalar;
  layer.visit(
      [&](const std::string& name, hatch::Parameter<B>& p) {
        auto v = p.value.to_host();
        const auto noise = normal_values<S>(rng, v.size(), 0.0, 0.1);
        for (std::size_t j = 0; j < v.size(); ++j) v[j] += noise[j];
        p.value.from_host(v);
        p.grad.from_host(normal_values<S>(rng, v.size(), 0.0, 0.1));
        if (name == o.frozen) p.trainable = false;
      },
      "");
}

template <class L>
void set_drop_rates(L& layer, double rate) {
  layer.for_each_layer([&](auto& l) {
    if constexpr (requires { l.set_rate(0.0); }) l.set_rate(rate);
  });
}

template <hatch::Backend B>
std::int64_t allocations() {
  if constexpr (requires { B::allocation_count(); }) return std::int64_t(B::allocation_count());
  else return 0;
}

// Two forward/backward steps of one layer spec. Results: "y" and "dx" of the second step, every
// "grad.<name>" after both (gradients accumulate), and "allocs.steady": allocations made by the
// backend during the second step (zero in a steady state).
template <hatch::Backend B, class Spec>
Results run_layer(std::uint64_t seed, hatch::Shape in_shape, const RunOptions& o = {}) {
  using L = typename Spec::template bind<B>;
  auto layer = std::make_unique<L>();
  hatch::Initializer init(seed);
  layer->reset_parameters(init);
  std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ULL + 1);
  prepare_parameters<B>(*layer, rng, o);
  if (o.drop > 0) set_drop_rates(*layer, o.drop);

  const hatch::Tensor<B> x = random_tensor<B>(rng, in_shape, o.input_scale);
  hatch::Context ctx{.training = o.training, .param_grads = o.param_grads, .input_grad = o.input_grad,
                     .seed = seed + 17};
  Results r;
  hatch::Tensor<B> dy;
  for (int step = 0; step < 2; ++step) {
    const std::int64_t before = allocations<B>();
    const hatch::Tensor<B>& y = layer->forward(x, ctx);
    if (step == 0) dy = random_tensor<B>(rng, y.shape());
    const hatch::Tensor<B>& dx = layer->backward(dy, ctx);
    B::synchronize();
    if (step == 1) {
      if (!o.routing_varies) r["allocs.steady"] = {float(allocations<B>() - before)};
      r["y"] = as_float(y.to_host());
      if (o.input_grad) r["dx"] = as_float(dx.to_host());
    }
  }
  layer->visit([&](const std::string& name, hatch::Parameter<B>& p) { r["grad." + name] = as_float(p.grad.to_host()); },
               "");
  return r;
}

// A whole Model<VitMicro, B> training step, twice: forward in training mode with drop path,
// soft-target cross-entropy, backward, gradient norm, AdamW on every parameter. Results: the
// logits, loss, input gradient, gradient norm of the second step, and every parameter's
// gradient and value after the two steps.
template <hatch::Backend B>
Results run_vit_micro(std::uint64_t seed, bool training) {
  using S = typename B::Scalar;
  using M = hatch::Model<hatch::presets::VitMicro, B>;
  constexpr int batch = 3, classes = hatch::presets::micro.classes;
  auto model = std::make_unique<M>();
  hatch::Initializer init(seed);
  model->reset_parameters(init);
  std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ULL + 2);
  prepare_parameters<B>(*model, rng, {});
  if (training) hatch::set_drop_path(*model, 0.2);

  const hatch::Tensor<B> images = random_tensor<B>(rng, {batch, 1, 28, 28});
  std::vector<S> t(std::size_t(batch) * classes);
  std::uniform_real_distribution<double> ud(0.05, 1.0);
  for (int b = 0; b < batch; ++b) {  // soft targets, each row summing to one
    double s = 0;
    for (int c = 0; c < classes; ++c) s += double(t[std::size_t(b) * classes + c] = S(ud(rng)));
    for (int c = 0; c < classes; ++c) t[std::size_t(b) * classes + c] = S(double(t[std::size_t(b) * classes + c]) / s);
  }
  hatch::Tensor<B> targets, dlogits;
  targets.from_host(t, {batch, classes});
  std::vector<hatch::Tensor<B>> m1, m2;  // AdamW moments, in visit order
  model->visit(
      [&](const std::string&, hatch::Parameter<B>& p) {
        m1.emplace_back(p.value.shape()).zero();
        m2.emplace_back(p.value.shape()).zero();
      },
      "");

  hatch::Context ctx{.training = training, .seed = seed + 23};
  Results r;
  for (int step = 1; step <= 2; ++step) {
    const std::int64_t before = allocations<B>();
    const hatch::Tensor<B>& logits = model->forward(images, ctx);
    dlogits.resize(logits.shape());
    const double loss = B::softmax_cross_entropy(dlogits.data(), logits.data(), targets.data(), batch, classes,
                                                 S(1.0 / batch));
    const hatch::Tensor<B>& dx = model->backward(dlogits, ctx);
    double norm2 = 0;
    bool finite = true;
    std::size_t k = 0;
    const double bc1 = 1 - std::pow(0.9, step), bc2 = 1 - std::pow(0.999, step);
    model->visit(
        [&](const std::string&, hatch::Parameter<B>& p) {
          const auto n = std::size_t(p.value.numel());
          norm2 += B::sum_squares(p.grad.data(), n);
          finite = finite && B::all_finite(p.grad.data(), n);
          B::adamw_update(p.value.data(), m1[k].data(), m2[k].data(), p.grad.data(), n, S(1e-3), S(0.9), S(0.999),
                          S(1e-8), S(p.decay ? 0.05 : 0.0), S(bc1), S(bc2));
          ++k;
        },
        "");
    B::synchronize();
    if (step == 2) {
      r["allocs.steady"] = {float(allocations<B>() - before)};
      r["logits"] = as_float(logits.to_host());
      r["dx"] = as_float(dx.to_host());
      r["loss"] = {float(loss)};
      r["grad_norm2"] = {float(norm2)};
      r["all_finite"] = {finite ? 1.0f : 0.0f};
    }
  }
  model->visit(
      [&](const std::string& name, hatch::Parameter<B>& p) {
        r["grad." + name] = as_float(p.grad.to_host());
        r["value." + name] = as_float(p.value.to_host());
      },
      "");
  return r;
}

// A small labelled data set drawn from the seed: each class has its own mean image, so a few
// epochs of training move accuracy well above chance.
inline hatch::data::Dataset synthetic_images(std::uint64_t seed, int n) {
  hatch::data::Dataset d;
  d.n = n;
  d.height = d.width = 28;
  std::mt19937_64 rng(seed);
  const auto means = normal_values<float>(rng, std::size_t(d.classes) * d.sample_size(), 0.0, 1.0);
  const auto noise = normal_values<float>(rng, std::size_t(n) * d.sample_size(), 0.0, 1.0);
  d.images.resize(noise.size());
  for (int i = 0; i < n; ++i) {
    const int label = int(rng() % std::uint64_t(d.classes));
    d.labels.push_back(label);
    for (std::size_t j = 0; j < d.sample_size(); ++j)
      d.images[std::size_t(i) * d.sample_size() + j] =
          0.5f * means[std::size_t(label) * d.sample_size() + j] + noise[std::size_t(i) * d.sample_size() + j];
  }
  return d;
}

inline hatch::FitOptions small_fit(int epochs) {
  hatch::FitOptions o;
  o.epochs = epochs;
  o.batch = 32;
  o.eval_batch = 50;
  o.lr = 1e-3;
  o.warmup_epochs = 0.5;
  o.clip = 1.0;
  o.progress = false;
  o.augment = {.crop_padding = 2, .hflip = true, .mixup_alpha = 0.8f, .mix_prob = 0.5f, .label_smoothing = 0.1f};
  return o;
}

template <hatch::Backend B, class M>
void record_parameters(Results& r, M& model, const std::string& prefix) {
  model.visit([&](const std::string& name, hatch::Parameter<B>& p) { r[prefix + name] = as_float(p.value.to_host()); },
              "");
}

// The fit loop (augmentation, mixup, drop path, AdamW, schedule, clipping, evaluation) for two
// epochs of a vit-micro: final parameters and test loss.
template <hatch::Backend B>
Results run_fit(std::uint64_t seed) {
  const auto train = synthetic_images(seed, 128), test = synthetic_images(seed + 1, 100);
  auto model = std::make_unique<hatch::Model<hatch::presets::VitMicro, B>>();
  hatch::Initializer init(seed);
  model->reset_parameters(init);
  hatch::set_drop_path(*model, 0.1);
  auto o = small_fit(2);
  o.seed = seed;
  const auto result = hatch::fit(*model, train, test, o);
  Results r;
  r["test_loss"] = {float(result.test.loss)};  // not accuracy: one flipped argmax is 1 point
  record_parameters<B>(r, *model, "value.");
  return r;
}

// The Incubator's four phases on a micro target (2 blocks in stage 1) and its meta model, each
// phase one epoch, through its files in a fresh directory: the fine-tuned target's parameters and
// test loss, and the frozen meta model's check (the meta files are unchanged by incubation).
template <hatch::Backend B>
Results run_incubator(std::uint64_t seed) {
  using Target = hatch::Vit<hatch::presets::micro, hatch::Depths<1, 2, 1, 1>>;
  using Meta = hatch::presets::MetaOf<Target>;
  const hatch_test::TempDir dir("hatch_parity_incubator_" + std::string(B::name) + "_" + std::to_string(seed));
  const auto train = synthetic_images(seed, 96), test = synthetic_images(seed + 1, 50);
  hatch::Incubator<Meta, Target, B> inc({.dir = dir.path, .tag = "parity", .seed = seed});
  auto o = small_fit(1);
  o.seed = seed;
  o.augment = {};
  inc.pretrain_meta(train, test, o);
  const auto meta_file = inc.files().meta(0);
  const auto meta_before = file_bytes(meta_file);
  for (std::size_t i = 0; i < Target::num_stages; ++i) inc.incubate(i, train, test, o);
  auto target = std::make_unique<hatch::Model<Target, B>>();
  inc.assemble(*target);
  const auto result = inc.finetune(*target, train, test, o);
  Results r;
  r["changed.meta_file"] = {file_bytes(meta_file) == meta_before ? 0.0f : 1.0f};
  r["test_loss"] = {float(result.test.loss)};
  record_parameters<B>(r, *target, "value.");
  return r;
}

// NAC layers own no shared table; these test layers own one each (codes, signatures), so that
// run_layer can build, perturb and step them like any layer (the table is visited first).
template <hatch::Backend B>
struct NacModFcCase : hatch::ModFcLayer<B, 24, 40, 12> {
  hatch::LatentCodes<B, 12> codes{6};
  NacModFcCase() { this->use_codes(codes); }
  void reset_parameters(hatch::Initializer& init) {
    codes.reset_parameters(init);
    hatch::ModFcLayer<B, 24, 40, 12>::reset_parameters(init);
  }
};
struct NacModFc {
  static constexpr int in = 24, out = 40;
  template <hatch::Backend B> using bind = NacModFcCase<B>;
};
template <hatch::Backend B>
struct NacKmdpaCase : hatch::KmdpaLayer<B, 3, 16, 8> {
  hatch::LatentSignatures<B, 8> signatures{10};
  NacKmdpaCase() { this->use_signatures(signatures); }
  void reset_parameters(hatch::Initializer& init) {
    signatures.reset_parameters(init);
    hatch::KmdpaLayer<B, 3, 16, 8>::reset_parameters(init);
  }
};
struct NacKmdpa {
  static constexpr int in = 3 * 48, out = 48;
  template <hatch::Backend B> using bind = NacKmdpaCase<B>;
};

// Mediators [4, 10) attending to every latent: the rectangular pair list.
template <hatch::Backend B>
struct NacKmdpaRectCase : NacKmdpaCase<B> {
  NacKmdpaRectCase() { this->restrict_pairs(4, -1, 0, -1); }
};
struct NacKmdpaRect {
  static constexpr int in = 3 * 48, out = 48;
  template <hatch::Backend B> using bind = NacKmdpaRectCase<B>;
};
template <hatch::Backend B>
struct NacModFfnCase : hatch::ModFfnLayer<B, 24, 32, 12> {
  hatch::LatentCodes<B, 12> codes{6};
  NacModFfnCase() { this->use_codes(codes); }
  void reset_parameters(hatch::Initializer& init) {
    codes.reset_parameters(init);
    hatch::ModFfnLayer<B, 24, 32, 12>::reset_parameters(init);
  }
};
struct NacModFfn {
  static constexpr int in = 24, out = 24;
  template <hatch::Backend B> using bind = NacModFfnCase<B>;
};
template <hatch::Backend B>
struct NacSeederCase : hatch::LatentSeederLayer<B, 24, 12> {
  hatch::LatentCodes<B, 12> codes{6};
  NacSeederCase() { this->use_codes(codes); }
  void reset_parameters(hatch::Initializer& init) {
    codes.reset_parameters(init);
    hatch::LatentSeederLayer<B, 24, 12>::reset_parameters(init);
  }
};
struct NacSeeder {
  static constexpr int in = hatch::kAnyWidth, out = 24;
  template <hatch::Backend B> using bind = NacSeederCase<B>;
};
// Signatures in 3 dimensions: among 10 latents several pairs are closer than the 0.4 margin.
template <hatch::Backend B>
struct NacRepulsionCase : hatch::SignatureRepulsionLayer<B, 3> {
  hatch::LatentSignatures<B, 3> signatures{10};
  NacRepulsionCase() { this->use_signatures(signatures); }
  void reset_parameters(hatch::Initializer& init) { signatures.reset_parameters(init); }
};
struct NacRepulsion {
  static constexpr int in = hatch::kAnyWidth, out = hatch::kAnyWidth;
  template <hatch::Backend B> using bind = NacRepulsionCase<B>;
};

// The parity cases, by name; both sides dispatch through run_case so they cannot drift apart.
inline const std::vector<std::string>& case_names() {
  static const std::vector<std::string> names{
      "linear",          "linear_nobias",      "linear_many_rows", "linear_frozen_suffix",
      "layernorm",       "layernorm_many_rows", "layernorm_bias_frozen", "layernorm_no_input_grad",
      "gelu",            "dropout",            "attention",        "attention_nobias",
      "block",           "block_train",        "patch_embed",      "patch_embed_rgb",
      "class_pos",       "class_head",         "vit_micro",        "vit_micro_train",
      "fit",             "incubator",          "silu",             "reshape_flatten",
      "moe_block_topk",  "moe_block_vmoe_train", "nac_modfc",   "nac_kmdpa",
      "nac_kmdpa_train", "nac_modffn",         "nac_seeder_train", "nac_repulsion_train",
      "nac_pooling_train", "nac_kmdpa_rect_train", "attention_heads64", "block_heads64_train"};
  return names;
}

template <hatch::Backend B>
Results run_case(const std::string& name, std::uint64_t seed) {
  using namespace hatch;
  if (name == "linear") return run_layer<B, Linear<37, 53>>(seed, {3, 7, 37});
  if (name == "linear_nobias") return run_layer<B, Linear<64, 32, false>>(seed, {5, 64});
  // 1000 rows: the bias gradient is reduced in several row chunks.
  if (name == "linear_many_rows") return run_layer<B, Linear<16, 40>>(seed, {1000, 16});
  if (name == "linear_frozen_suffix") return run_layer<B, Linear<37, 53>>(seed, {3, 7, 37}, {.param_grads = false});
  if (name == "layernorm") return run_layer<B, LayerNorm<45>>(seed, {4, 9, 45});
  if (name == "layernorm_many_rows") return run_layer<B, LayerNorm<96>>(seed, {700, 96});
  if (name == "layernorm_bias_frozen") return run_layer<B, LayerNorm<45>>(seed, {4, 9, 45}, {.frozen = "bias"});
  if (name == "layernorm_no_input_grad")
    return run_layer<B, LayerNorm<45>>(seed, {4, 9, 45}, {.input_grad = false});
  if (name == "gelu") return run_layer<B, Gelu>(seed, {3, 50});
  // Elementwise<SiluFn>: the user-functor path (B::map / B::map_binary, a CUDA kernel per functor).
  if (name == "silu") return run_layer<B, Silu>(seed, {3, 50}, {.input_scale = 4});
  // Views: Reshape and Flatten pass the same memory on; gradients flow back through them.
  if (name == "reshape_flatten")
    return run_layer<B, Sequential<Reshape<5, 8>, Named<"fc1", Linear<8, 8>>, Silu, Flatten<40>,
                                   Named<"fc2", Linear<40, 12>>>>(seed, {6, 40});
  if (name == "dropout") return run_layer<B, Dropout>(seed, {4, 33}, {.training = true, .drop = 0.3});
  if (name == "attention") return run_layer<B, Attention<32, 2>>(seed, {2, 17, 32});
  if (name == "attention_nobias") return run_layer<B, Attention<48, 3, false>>(seed, {3, 10, 48});
  // heads of width 64 (the ViT presets'), where Cuda's fused attention kernels apply when enabled;
  // 197 tokens (ViT-B/16's) cross every tile edge of those kernels
  if (name == "attention_heads64") return run_layer<B, Attention<128, 2>>(seed, {3, 197, 128});
  if (name == "block_heads64_train")
    return run_layer<B, Block<128, 2>>(seed, {2, 70, 128}, {.training = true, .drop = 0.25});
  if (name == "block") return run_layer<B, Block<32, 2>>(seed, {2, 17, 32});
  if (name == "block_train") return run_layer<B, Block<32, 2>>(seed, {4, 17, 32}, {.training = true, .drop = 0.25});
  // Expert blocks: routing on the host from the backend's logits, the same choices on both sides.
  if (name == "moe_block_topk") return run_layer<B, BlockWith<32, 2, Moe<32, 4, TopKGate<2>, Mlp<32, 64>>>>(seed, {2, 17, 32});
  // Training: router noise (a function of the seed), capacity drops, the auxiliary losses' gradients.
  if (name == "moe_block_vmoe_train")
    return run_layer<B, BlockWith<32, 2, Moe<32, 4, VmoeRouter<2>, Mlp<32, 64>>>>(seed, {4, 17, 32},
                                                                                   {.training = true, .routing_varies = true});
  if (name == "nac_modfc") return run_layer<B, NacModFc>(seed, {4 * 6, 24});
  if (name == "nac_kmdpa") return run_layer<B, NacKmdpa>(seed, {3 * 10, 3 * 48});
  if (name == "nac_kmdpa_train") return run_layer<B, NacKmdpa>(seed, {4 * 10, 3 * 48}, {.training = true});
  if (name == "nac_kmdpa_rect_train") return run_layer<B, NacKmdpaRect>(seed, {4 * 10, 3 * 48}, {.training = true});
  if (name == "nac_modffn") return run_layer<B, NacModFfn>(seed, {4 * 6, 24});
  if (name == "nac_seeder_train") return run_layer<B, NacSeeder>(seed, {5, 7}, {.training = true});
  if (name == "nac_repulsion_train") return run_layer<B, NacRepulsion>(seed, {4, 9}, {.training = true});
  if (name == "nac_pooling_train") return run_layer<B, OutputPooling<6, 24, 10>>(seed, {4 * 6, 24}, {.training = true});
  if (name == "patch_embed") return run_layer<B, PatchEmbed<1, 28, 7, 32>>(seed, {2, 1, 28, 28});
  if (name == "patch_embed_rgb") return run_layer<B, PatchEmbed<3, 12, 4, 20>>(seed, {2, 3, 12, 12});
  if (name == "class_pos") return run_layer<B, ClassPos<16, 32>>(seed, {2, 16, 32});
  if (name == "class_head") return run_layer<B, ClassHead<32, 10>>(seed, {2, 17, 32});
  if (name == "vit_micro") return run_vit_micro<B>(seed, false);
  if (name == "vit_micro_train") return run_vit_micro<B>(seed, true);
  if (name == "fit") return run_fit<B>(seed);
  if (name == "incubator") return run_incubator<B>(seed);
  throw hatch::Error("run_case: unknown case '" + name + "'");
}

}  // namespace hatch_test
