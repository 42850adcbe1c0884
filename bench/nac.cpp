// NAC's kernel-modulated attention (Kmdpa) with the sparsity its signatures give, against the
// same attention dense (use_kernel(false): every pair, through the same kernels), training
// forward + backward at nac-small's width (D = 128, 4 heads, batch 128):
//   - U = 64 latents (nac-small's 16 + 32 + 16) and U = 384 (the paper's 64 + 256 + 64), every
//     latent querying every latent, signatures placed on a scale-free (Barabasi-Albert, m = 2)
//     or an Erdos-Renyi (p = 0.1) graph prior, as Nac's reset does;
//   - the counter `kept` is the fraction of query x key pairs the kernel keeps (d_uv <= tau);
//     the dense runs keep 1;
//   - for scale, hatch's GEMM self-attention block (Attention<128, 4>: qkv and output
//     projections included) over the same U tokens.
//   build/bench/nac --benchmark_min_time=0.2
// Threads: HATCH_THREADS (default 2). Items: examples per second.
#include <benchmark/benchmark.h>

#include "bench_main.hpp"

#include <hatch/hatch.hpp>
#include <random>
#include <vector>

namespace {
using namespace hatch;

constexpr int kD = 128, kHeads = 4, kSig = 64;
enum Mode { kScaleFree, kErdosRenyi, kDense };

Tensor<Cpu> random_input(std::int64_t rows, int cols, std::uint64_t seed, float scale) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> h(std::size_t(rows) * cols);
  for (auto& v : h) v = scale * nd(rng);
  Tensor<Cpu> t;
  t.from_host(h, {rows, cols});
  return t;
}

void kmdpa(benchmark::State& state) {
  const int u = int(state.range(0)), batch = int(state.range(1));
  const auto mode = Mode(state.range(2));
  KmdpaLayer<Cpu, kHeads, kD / kHeads, kSig> attn;
  LatentSignatures<Cpu, kSig> sig(u);
  const nac::Graph g = mode == kErdosRenyi ? nac::erdos_renyi_graph(u, 0.1, 3) : nac::barabasi_albert_graph(u, 2, 3);
  nac::init_signatures_from_graph(sig, g, 3);
  attn.use_signatures(sig);
  attn.use_kernel(mode != kDense);
  const auto x = random_input(std::int64_t(batch) * u, 3 * kD, 1, 1.0f);
  const auto dy = random_input(std::int64_t(batch) * u, kD, 2, 0.01f);
  Context ctx;
  ctx.training = true;
  std::uint64_t seed = 0;
  for (auto _ : state) {
    ctx.seed = ++seed;
    ctx.counter = 0;
    attn.forward(x, ctx);
    const Tensor<Cpu>& dx = attn.backward(dy, ctx);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  state.counters["kept"] = attn.kept_fraction();
  state.SetItemsProcessed(state.iterations() * batch);
}

void gemm_attention(benchmark::State& state) {
  const int u = int(state.range(0)), batch = int(state.range(1));
  AttentionLayer<Cpu, kD, kHeads> attn;
  Initializer init(0);
  attn.reset_parameters(init);
  auto x = random_input(std::int64_t(batch) * u, kD, 1, 1.0f), dy = random_input(std::int64_t(batch) * u, kD, 2, 0.01f);
  Tensor<Cpu> x3, dy3;
  x3.view_of(x, {batch, u, kD});
  dy3.view_of(dy, {batch, u, kD});
  Context ctx;
  ctx.training = true;
  for (auto _ : state) {
    attn.forward(x3, ctx);
    const Tensor<Cpu>& dx = attn.backward(dy3, ctx);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  state.counters["kept"] = 1.0;
  state.SetItemsProcessed(state.iterations() * batch);
}

void configure(benchmark::internal::Benchmark* b) { b->UseRealTime()->Unit(benchmark::kMillisecond); }
}  // namespace

BENCHMARK(kmdpa)->Name("Kmdpa/U=64/scale-free")->Args({64, 128, kScaleFree})->Apply(configure);
BENCHMARK(kmdpa)->Name("Kmdpa/U=64/erdos-renyi")->Args({64, 128, kErdosRenyi})->Apply(configure);
BENCHMARK(kmdpa)->Name("Kmdpa/U=64/dense")->Args({64, 128, kDense})->Apply(configure);
BENCHMARK(gemm_attention)->Name("Attention(GEMM, projections included)/U=64")->Args({64, 128})->Apply(configure);
BENCHMARK(kmdpa)->Name("Kmdpa/U=384/scale-free")->Args({384, 16, kScaleFree})->Apply(configure);
BENCHMARK(kmdpa)->Name("Kmdpa/U=384/erdos-renyi")->Args({384, 16, kErdosRenyi})->Apply(configure);
BENCHMARK(kmdpa)->Name("Kmdpa/U=384/dense")->Args({384, 16, kDense})->Apply(configure);
BENCHMARK(gemm_attention)->Name("Attention(GEMM, projections included)/U=384")->Args({384, 16})->Apply(configure);

int main(int argc, char** argv) { return bench::benchmark_main("nac", 128, argc, argv); }
