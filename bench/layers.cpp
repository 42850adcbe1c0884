// Forward and backward of every ViT layer at each preset's sizes (batch 128; 17 tokens for patch 7,
// 50 for patch 4), plus the whole vit-small model. Throughput is in images (items) per second of
// wall time. Threads: HATCH_THREADS (default 2).
//   build/bench/layers --benchmark_filter='vit-small' --benchmark_min_time=0.05
//
// One templated function per direction, instantiated per (case, preset): a case says which spec
// it binds, what input it takes and whether its backward must produce an input gradient.
#include <benchmark/benchmark.h>

#include "bench_main.hpp"

#include <cstdio>
#include <cstdlib>
#include <hatch/hatch.hpp>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace hatch;
using presets::VitBase;
using presets::VitMicro;
using presets::VitSmall;
using presets::VitTiny;

constexpr int kBatch = 128;

template <class V> constexpr const char* preset_name = "?";
template <> constexpr const char* preset_name<VitMicro> = "vit-micro";
template <> constexpr const char* preset_name<VitTiny> = "vit-tiny";
template <> constexpr const char* preset_name<VitSmall> = "vit-small";
template <> constexpr const char* preset_name<VitBase> = "vit-base";

template <class V> constexpr int D = V::spec.dim;
template <class V> constexpr int N = V::spec.tokens();
template <class V> constexpr int Img = V::spec.image;

// ---- the cases ---------------------------------------------------------------------------------
// Spec: the layer; in(): its input shape; input_grad: whether backward must return dx (false only
// where the real step does not need it: the patch embedding and the whole model).
template <class V> struct Qkv {
  static constexpr const char* name = "Linear.qkv";
  using Spec = Linear<D<V>, 3 * D<V>>;
  static Shape in() { return {kBatch, N<V>, D<V>}; }
  static constexpr bool input_grad = true;
};
template <class V> struct Fc1 {
  static constexpr const char* name = "Linear.fc1";
  using Spec = Linear<D<V>, 4 * D<V>>;
  static Shape in() { return {kBatch, N<V>, D<V>}; }
  static constexpr bool input_grad = true;
};
template <class V> struct Norm {
  static constexpr const char* name = "LayerNorm";
  using Spec = LayerNorm<D<V>>;
  static Shape in() { return {kBatch, N<V>, D<V>}; }
  static constexpr bool input_grad = true;
};
// GELU runs on the MLP's hidden width (4 D) in the model, so that is the size measured.
template <class V> struct Act {
  static constexpr const char* name = "GELU.4D";
  using Spec = Gelu;
  static Shape in() { return {kBatch, N<V>, 4 * D<V>}; }
  static constexpr bool input_grad = true;
};
template <class V> struct Attn {
  static constexpr const char* name = "Attention";
  using Spec = Attention<D<V>, V::spec.heads, V::spec.qkv_bias>;
  static Shape in() { return {kBatch, N<V>, D<V>}; }
  static constexpr bool input_grad = true;
};
template <class V> struct Blk {
  static constexpr const char* name = "Block";
  using Spec = Block<D<V>, V::spec.heads, V::spec.mlp_ratio, V::spec.qkv_bias>;
  static Shape in() { return {kBatch, N<V>, D<V>}; }
  static constexpr bool input_grad = true;
};
template <class V> struct Embed {
  static constexpr const char* name = "PatchEmbed";
  using Spec = PatchEmbed<V::spec.channels, Img<V>, V::spec.patch, D<V>>;
  static Shape in() { return {kBatch, V::spec.channels, Img<V>, Img<V>}; }
  static constexpr bool input_grad = false;
};
template <class V> struct Head {
  static constexpr const char* name = "ClassHead";
  using Spec = ClassHead<D<V>, V::spec.classes>;
  static Shape in() { return {kBatch, N<V>, D<V>}; }
  static constexpr bool input_grad = true;
};
template <class V> struct Whole {
  static constexpr const char* name = "Model";
  using Spec = V;
  static Shape in() { return {kBatch, V::spec.channels, Img<V>, Img<V>}; }
  static constexpr bool input_grad = false;
};

// ---- the harness -------------------------------------------------------------------------------
Tensor<Cpu> random_tensor(Shape s, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> h(static_cast<std::size_t>(s.numel()));
  for (auto& v : h) v = nd(rng);
  Tensor<Cpu> t;
  t.from_host(h, s);
  return t;
}

template <class C>
struct Fixture {
  typename C::Spec::template bind<Cpu> layer;
  Tensor<Cpu> x = random_tensor(C::in(), 1), dy;
  Context ctx;
  Fixture() {
    Initializer init(0);
    layer.reset_parameters(init);
    ctx.training = true;
    ctx.input_grad = C::input_grad;
    const Tensor<Cpu>& y = layer.forward(x, ctx);  // sizes every buffer before timing
    dy = random_tensor(y.shape(), 2);
  }
};

template <template <class> class Case, class V>
void forward(benchmark::State& state) {
  Fixture<Case<V>> f;
  for (auto _ : state) {
    const Tensor<Cpu>& y = f.layer.forward(f.x, f.ctx);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}

// Backward alone, repeated after one forward: every layer keeps what backward reads, and
// backward only accumulates into parameter gradients, so the repetition is a fair sample.
template <template <class> class Case, class V>
void backward(benchmark::State& state) {
  Fixture<Case<V>> f;
  for (auto _ : state) {
    const Tensor<Cpu>& dx = f.layer.backward(f.dy, f.ctx);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}

template <template <class> class Case, class V>
void forward_backward(benchmark::State& state) {
  Fixture<Case<V>> f;
  for (auto _ : state) {
    f.layer.forward(f.x, f.ctx);
    const Tensor<Cpu>& dx = f.layer.backward(f.dy, f.ctx);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}

template <template <class> class Case, class V>
std::string bench_name(const char* direction) {
  return std::string(Case<V>::name) + "/" + preset_name<V> + "/" + direction;
}

// OpenMP threads do the work, so throughput is measured against wall time.
void configure(benchmark::internal::Benchmark* b) { b->UseRealTime()->Unit(benchmark::kMicrosecond); }

}  // namespace

#define HATCH_BENCH(Case, V)                                                                    \
  BENCHMARK_TEMPLATE(forward, Case, V)->Name(bench_name<Case, V>("forward"))->Apply(configure); \
  BENCHMARK_TEMPLATE(backward, Case, V)->Name(bench_name<Case, V>("backward"))->Apply(configure)
#define HATCH_BENCH_PRESETS(Case) \
  HATCH_BENCH(Case, VitMicro);    \
  HATCH_BENCH(Case, VitTiny);     \
  HATCH_BENCH(Case, VitSmall);    \
  HATCH_BENCH(Case, VitBase)

HATCH_BENCH_PRESETS(Qkv);
HATCH_BENCH_PRESETS(Fc1);
HATCH_BENCH_PRESETS(Norm);
HATCH_BENCH_PRESETS(Act);
HATCH_BENCH_PRESETS(Attn);
HATCH_BENCH_PRESETS(Blk);
HATCH_BENCH_PRESETS(Embed);
HATCH_BENCH_PRESETS(Head);
BENCHMARK_TEMPLATE(forward, Whole, VitSmall)->Name(bench_name<Whole, VitSmall>("forward"))->Apply(configure);
BENCHMARK_TEMPLATE(forward_backward, Whole, VitSmall)
    ->Name(bench_name<Whole, VitSmall>("forward_backward"))
    ->Apply(configure);

int main(int argc, char** argv) { return bench::benchmark_main("layers", kBatch, argc, argv); }
