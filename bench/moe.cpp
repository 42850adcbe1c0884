// An expert block's training step (forward + backward) against the dense block, at vit-small's
// width (D = 128, 4 heads, 17 tokens, batch 128), with E = 4, 8 and 32 experts and k = 2:
// TopKGate routes every token to exactly k experts, so the expert compute is k MLPs' worth
// whatever E is, and the time should grow with k, not with E (the gate, E x D, and the
// per-expert launches are what E adds). VmoeRouter (capacity 1.05) is shown at E = 8.
//   build/bench/moe --benchmark_min_time=0.2
// Threads: HATCH_THREADS (default 2). Items: images per second.
#include <benchmark/benchmark.h>

#include "bench_main.hpp"

#include <hatch/hatch.hpp>
#include <random>
#include <vector>

namespace {
using namespace hatch;

constexpr int kBatch = 128, kTokens = 17, kD = 128, kHeads = 4;

template <class Spec>
void step(benchmark::State& state) {
  typename Spec::template bind<Cpu> layer;
  Initializer init(0);
  layer.reset_parameters(init);
  std::mt19937_64 rng(1);
  std::normal_distribution<float> nd;
  std::vector<float> h(std::size_t(kBatch) * kTokens * kD);
  for (auto& v : h) v = nd(rng);
  Tensor<Cpu> x, dy;
  x.from_host(h, {kBatch, kTokens, kD});
  for (auto& v : h) v = 0.01f * nd(rng);
  dy.from_host(h, {kBatch, kTokens, kD});
  Context ctx;
  ctx.training = true;
  std::uint64_t seed = 0;
  for (auto _ : state) {
    ctx.seed = ++seed;
    ctx.counter = 0;
    layer.forward(x, ctx);
    const Tensor<Cpu>& dx = layer.backward(dy, ctx);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}

template <int E>
using TopK = BlockWith<kD, kHeads, Moe<kD, E, TopKGate<2>>>;
using Dense = Block<kD, kHeads>;
using Vmoe8 = BlockWith<kD, kHeads, Moe<kD, 8, VmoeRouter<2>>>;

void configure(benchmark::internal::Benchmark* b) { b->UseRealTime()->Unit(benchmark::kMillisecond); }
}  // namespace

BENCHMARK_TEMPLATE(step, Dense)->Name("Block/dense/step")->Apply(configure);
BENCHMARK_TEMPLATE(step, TopK<4>)->Name("Block/moe-top2/E=4/step")->Apply(configure);
BENCHMARK_TEMPLATE(step, TopK<8>)->Name("Block/moe-top2/E=8/step")->Apply(configure);
BENCHMARK_TEMPLATE(step, TopK<32>)->Name("Block/moe-top2/E=32/step")->Apply(configure);
BENCHMARK_TEMPLATE(step, Vmoe8)->Name("Block/vmoe-top2/E=8/step")->Apply(configure);

int main(int argc, char** argv) { return bench::benchmark_main("moe", kBatch, argc, argv); }
