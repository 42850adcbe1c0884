// What incubating one module costs against training the same network end to end: for vit-small
// (Depths<2,2,2,2>), vit-deep (Depths<4,4,4,4>) and vit-deep32 (Depths<8,8,8,8>) over their meta
// models (Depths<1,1,1,1>), for each module i,
//   module<i>/incubate  one incubation step of the hybrid (meta stages, module i of the target):
//                       FrozenExcept<Hybrid, i> forward, cross-entropy, backward (the prefix does
//                       no backward work, the suffix only input gradients), AdamW on module i only;
//   module<i>/e2e       the same hybrid with everything trainable: plain forward, backward, AdamW
//                       on all of its parameters;
// plus one end-to-end step of the full target and of the meta model, for reference: the
// per-image costs of every phase that docs/results.md counts compute with.
// Batch 128 of random images; items = images, per second of wall time (UseRealTime). Drop-path
// as in the Incubator: linspace(0, 0.1) over the hybrid's and the target's blocks, none in the
// meta model (its pre-training runs without). Threads: HATCH_THREADS (default 2).
//   build/bench/incubation --benchmark_min_time=0.2 [--benchmark_filter=vit-deep/]
#include <benchmark/benchmark.h>

#include "bench_main.hpp"

#include <cstdio>
#include <cstdlib>
#include <hatch/hatch.hpp>
#include <hatch/modular/incubator.hpp>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace hatch;
constexpr int kBatch = 128;
constexpr VitSpec kSpec = presets::VitSmall::spec;  // image, channels and classes: every preset's

// Random images and random one-hot targets, made once.
struct Batch {
  Tensor<Cpu> x, t;
  Batch() {
    std::mt19937_64 rng(0);
    std::normal_distribution<float> nd;
    std::vector<float> xh(std::size_t(kBatch) * kSpec.channels * kSpec.image * kSpec.image);
    for (auto& v : xh) v = nd(rng);
    std::vector<int> labels(kBatch);
    for (auto& l : labels) l = int(rng() % kSpec.classes);
    x.from_host(xh, {kBatch, kSpec.channels, kSpec.image, kSpec.image});
    t.from_host(smoothed_one_hot(labels, kSpec.classes, 0.1f), {kBatch, kSpec.classes});
  }
};
const Batch& batch() {
  static const Batch b;
  return b;
}

// One training step as fit() takes it, on `net` (a model or a FrozenExcept view of one): the
// optimizer holds what net.visit shows.
template <class Net>
struct Stepper {
  Net& net;
  AdamW<Cpu> opt;
  SoftTargetCrossEntropy<Cpu> loss;
  std::int64_t step = 0;
  explicit Stepper(Net& n) : net(n), opt(trainable_parameters(n), {.weight_decay = 0.05}) {}
  void operator()() {
    Context ctx;
    ctx.training = true;
    ctx.input_grad = false;
    ctx.seed = step_seed(0, step++);
    opt.zero_grad();
    const auto& logits = net.forward(batch().x, ctx);
    loss.forward_backward(logits, batch().t);
    net.backward(loss.grad(), ctx);
    opt.step(1e-4);
  }
};

template <class Net>
void run(benchmark::State& state, Net& net, std::size_t parameters) {
  Stepper<Net> step(net);
  step();  // sizes every buffer before timing
  for (auto _ : state) {
    step();
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
  state.counters["trained_params"] = double(parameters);
}

template <class M>
std::size_t count_parameters(M& m) {
  std::size_t n = 0;
  m.visit([&](const std::string&, Parameter<Cpu>& p) { n += std::size_t(p.value.numel()); }, "");
  return n;
}

template <class Arch>
std::unique_ptr<Model<Arch, Cpu>> make_model(double drop_path) {
  auto m = std::make_unique<Model<Arch, Cpu>>();
  Initializer init(0);
  m->reset_parameters(init);
  set_drop_path(*m, drop_path);
  return m;
}

template <class Target, std::size_t I>
void incubate(benchmark::State& state) {
  using Inc = Incubator<presets::MetaOf<Target>, Target, Cpu>;
  auto hybrid = make_model<typename Inc::template HybridArch<I>>(0.1);
  FrozenExcept<Model<typename Inc::template HybridArch<I>, Cpu>, I> view(*hybrid);
  run(state, view, count_parameters(view));
}

// A hybrid with every stage trainable. Its meta stages and module share parameter names (meta
// stage 1 and module 0 both hold a blocks.1), so the optimizer sees each stage under its own
// prefix.
template <class Hybrid>
struct AllStages {
  using backend = typename Hybrid::backend;
  Hybrid& model;
  const Tensor<backend>& forward(const Tensor<backend>& x, Context& ctx) { return model.forward(x, ctx); }
  const Tensor<backend>& backward(const Tensor<backend>& dy, Context& ctx) { return model.backward(dy, ctx); }
  template <class F>
  void visit(F&& f, const std::string& prefix) {
    model.for_each_stage([&](auto& stage, std::size_t j) { stage.visit(f, prefix + "stage" + std::to_string(j) + "."); });
  }
};

template <class Target, std::size_t I>
void hybrid_e2e(benchmark::State& state) {
  using Inc = Incubator<presets::MetaOf<Target>, Target, Cpu>;
  auto hybrid = make_model<typename Inc::template HybridArch<I>>(0.1);
  AllStages<Model<typename Inc::template HybridArch<I>, Cpu>> all{*hybrid};
  run(state, all, count_parameters(all));
}

template <class Arch>
void e2e(benchmark::State& state, double drop_path) {
  auto m = make_model<Arch>(drop_path);
  run(state, *m, count_parameters(*m));
}
template <class Target>
void target_e2e(benchmark::State& state) { e2e<Target>(state, 0.1); }
template <class Target>
void meta_e2e(benchmark::State& state) { e2e<presets::MetaOf<Target>>(state, 0.0); }

// OpenMP threads do the work, so throughput is measured against wall time.
void configure(benchmark::internal::Benchmark* b) { b->UseRealTime()->Unit(benchmark::kMillisecond); }

}  // namespace

#define HATCH_INCUBATION_MODULE(T, NAME, I)                                                          \
  BENCHMARK_TEMPLATE(incubate, T, I)->Name(NAME "/module" #I "/incubate")->Apply(configure); \
  BENCHMARK_TEMPLATE(hybrid_e2e, T, I)->Name(NAME "/module" #I "/e2e")->Apply(configure)
#define HATCH_INCUBATION_BENCH(T, NAME)                                                 \
  HATCH_INCUBATION_MODULE(T, NAME, 0);                                                  \
  HATCH_INCUBATION_MODULE(T, NAME, 1);                                                  \
  HATCH_INCUBATION_MODULE(T, NAME, 2);                                                  \
  HATCH_INCUBATION_MODULE(T, NAME, 3);                                                  \
  BENCHMARK_TEMPLATE(target_e2e, T)->Name(NAME "/target/e2e")->Apply(configure); \
  BENCHMARK_TEMPLATE(meta_e2e, T)->Name(NAME "/meta/e2e")->Apply(configure)
HATCH_INCUBATION_BENCH(hatch::presets::VitSmall, "vit-small");
HATCH_INCUBATION_BENCH(hatch::presets::VitDeep, "vit-deep");
HATCH_INCUBATION_BENCH(hatch::presets::VitDeep32, "vit-deep32");

int main(int argc, char** argv) { return bench::benchmark_main("incubation", kBatch, argc, argv); }
