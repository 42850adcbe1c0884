// A steady-state forward + backward step of a Block allocates nothing: no tensor buffer, no
// operator new, no malloc (Eigen's GEMM workspace included). malloc is interposed here, which
// is why this test is a program of its own.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <hatch/hatch.hpp>
#include <hatch/layers/moe.hpp>
#include <new>

namespace {
std::atomic<bool> counting{false};
std::atomic<long> mallocs{0}, news{0};
}  // namespace

extern "C" void* __libc_malloc(std::size_t);
extern "C" void* malloc(std::size_t n) {
  if (counting) ++mallocs;
  return __libc_malloc(n);
}
void* operator new(std::size_t n) {
  if (counting) ++news;
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

using namespace hatch;

template <class L>
void step(L& block, const Tensor<Cpu>& x, const Tensor<Cpu>& dy, std::uint64_t seed,
          GradientPool<Cpu>* pool = nullptr) {
  Context ctx;
  ctx.training = true;
  ctx.seed = seed;
  if (pool) ctx.use(*pool);
  block.forward(x, ctx);
  block.backward(dy, ctx);
  if (pool) pool->release_all();
}

TEST_CASE("a steady-state Block step allocates nothing") {
  Model<Block<128, 4>, Cpu> block;
  Initializer init(1);
  block.reset_parameters(init);
  set_drop_path(block, 0.1);
  block.for_each_layer([](auto& l) {
    if constexpr (requires { l.set_rate(0.0); }) l.set_rate(0.1);
  });
  Tensor<Cpu> x({64, 17, 128}), dy({64, 17, 128});
  x.fill(0.1f);
  dy.fill(0.01f);
  for (int i = 0; i < 3; ++i) step(block, x, dy, i);  // warm-up: buffers grow, threads start
  const auto buffers = Cpu::allocation_count().load();
  counting = true;
  for (int i = 3; i < 8; ++i) step(block, x, dy, i);
  counting = false;
  CHECK(Cpu::allocation_count().load() == buffers);
  CHECK(news.load() == 0);
  CHECK(mallocs.load() == 0);
  // A smaller batch reuses the grown buffers.
  Tensor<Cpu> xs({16, 17, 128}), dys({16, 17, 128});
  xs.fill(0.2f);
  dys.fill(0.02f);
  step(block, xs, dys, 9);
  CHECK(Cpu::allocation_count().load() == buffers + 2);  // only the two new input tensors
}

TEST_CASE("a steady-state step through Silu, Reshape and Flatten allocates nothing") {
  Model<Sequential<Reshape<8, 16>, Named<"fc1", Linear<16, 32>>, Silu, Flatten<256>, Named<"fc2", Linear<256, 10>>>,
        Cpu>
      net;
  Initializer init(2);
  net.reset_parameters(init);
  Tensor<Cpu> x({32, 128}), dy({32, 10});
  x.fill(0.3f);
  dy.fill(0.01f);
  for (int i = 0; i < 3; ++i) step(net, x, dy, i);
  const auto buffers = Cpu::allocation_count().load();
  counting = true;
  for (int i = 3; i < 8; ++i) step(net, x, dy, i);
  counting = false;
  CHECK(Cpu::allocation_count().load() == buffers);
  CHECK(news.load() == 0);
  CHECK(mallocs.load() == 0);
}

TEST_CASE("a steady-state training step over a parameter arena allocates nothing") {
  Model<Block<128, 4>, Cpu> block;
  Initializer init(3);
  block.reset_parameters(init);
  ParameterArena<Cpu> arena(trainable_parameters(block));
  AdamW<Cpu> opt(arena, {.weight_decay = 0.05});
  Tensor<Cpu> x({32, 17, 128}), dy({32, 17, 128});
  x.fill(0.1f);
  dy.fill(0.01f);
  auto train_step = [&](int i) {
    opt.zero_grad();
    step(block, x, dy, std::uint64_t(i));
    arena.clip_grad_norm(0.5);
    opt.step(1e-3);
  };
  for (int i = 0; i < 3; ++i) train_step(i);
  const auto buffers = Cpu::allocation_count().load();
  mallocs = 0;
  news = 0;
  counting = true;
  for (int i = 3; i < 8; ++i) train_step(i);
  counting = false;
  CHECK(Cpu::allocation_count().load() == buffers);
  CHECK(news.load() == 0);
  CHECK(mallocs.load() == 0);
}

TEST_CASE("a steady-state step with an auxiliary loss allocates nothing, collecting the term included") {
  Model<Sequential<Named<"fc1", Linear<16, 32>>, ActivationPenalty<1e-3>,
                   Residual<Sequential<ActivationPenalty<1e-2>, Named<"fc2", Linear<32, 32>>>>>,
        Cpu>
      net;
  Initializer init(3);
  net.reset_parameters(init);
  Tensor<Cpu> x({32, 16}), dy({32, 32});
  x.fill(0.3f);
  dy.fill(0.01f);
  for (int i = 0; i < 3; ++i) step(net, x, dy, i);
  const auto buffers = Cpu::allocation_count().load();
  double aux = 0;
  mallocs = 0;
  news = 0;
  counting = true;
  for (int i = 3; i < 8; ++i) {
    step(net, x, dy, i);
    aux += collect_aux_loss(net);
  }
  counting = false;
  CHECK(aux > 0);
  CHECK(Cpu::allocation_count().load() == buffers);
  CHECK(news.load() == 0);
  CHECK(mallocs.load() == 0);
}

TEST_CASE("a steady-state expert block step allocates nothing (host routing included)") {
  // Routing depends on the input; the same input routes the same way, so after the warm-up every
  // buffer, index buffer and host vector has its size.
  Model<BlockWith<128, 4, Moe<128, 8, VmoeRouter<2, 105, 105>>>, Cpu> block;
  Initializer init(1);
  block.reset_parameters(init);
  Tensor<Cpu> x({8, 17, 128}), dy({8, 17, 128});
  std::vector<float> h(std::size_t(x.numel()));
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = float((i * 7919) % 101) / 101.0f - 0.5f;
  x.from_host(h);
  dy.fill(0.01f);
  auto eval_step = [&] {
    Context ctx;  // evaluation: no router noise, so every step routes alike
    block.forward(x, ctx);
    block.backward(dy, ctx);
  };
  for (int i = 0; i < 3; ++i) eval_step();
  const auto buffers = Cpu::allocation_count().load();
  news = 0;
  mallocs = 0;
  counting = true;
  for (int i = 0; i < 4; ++i) eval_step();
  counting = false;
  CHECK(Cpu::allocation_count().load() == buffers);
  CHECK(news.load() == 0);
  CHECK(mallocs.load() == 0);
}

TEST_CASE("a steady-state NAC step (Kmdpa in training, then ModFc) allocates nothing (host pair list included)") {
  // The pair list depends only on the signatures, which a step does not change: after the
  // warm-up every buffer, index buffer and host vector has its size.
  LatentSignatures<Cpu, 16> sig(32);
  LatentCodes<Cpu, 8> codes(32);
  KmdpaLayer<Cpu, 2, 16, 16> attn;
  ModFcLayer<Cpu, 32, 32, 8> out;
  attn.use_signatures(sig);
  out.use_codes(codes);
  Initializer init(2);
  sig.reset_parameters(init);
  codes.reset_parameters(init);
  attn.reset_parameters(init);
  out.reset_parameters(init);
  Tensor<Cpu> x({8 * 32, 96}), dy({8 * 32, 32});
  std::vector<float> h(std::size_t(x.numel()));
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = float((i * 7919) % 101) / 101.0f - 0.5f;
  x.from_host(h);
  dy.fill(0.01f);
  auto step = [&](std::uint64_t seed) {
    Context ctx;
    ctx.training = true;
    ctx.seed = seed;
    out.forward(attn.forward(x, ctx), ctx);
    attn.backward(out.backward(dy, ctx), ctx);
  };
  for (int i = 0; i < 3; ++i) step(i);
  REQUIRE(attn.kept_fraction() < 1.0);
  const auto buffers = Cpu::allocation_count().load();
  news = 0;
  mallocs = 0;
  counting = true;
  for (int i = 3; i < 7; ++i) step(i);
  counting = false;
  CHECK(Cpu::allocation_count().load() == buffers);
  CHECK(news.load() == 0);
  CHECK(mallocs.load() == 0);
}

// With a gradient pool (core/grad_pool.hpp) the blocks share their backward buffers: a steady-state
// step still allocates nothing, and the model keeps far fewer bytes than with one set per layer.
TEST_CASE("a gradient pool: no allocation in steady state, and the blocks share their backward buffers") {
  using Net = Sequential<Repeat<6, Block<128, 4>>>;
  auto measure = [](bool pooled, long& allocations, std::int64_t& bytes, std::vector<float>& dx) {
    const auto before = Cpu::live_bytes().load();
    {
      Model<Net, Cpu> net;
      Initializer init(3);
      net.reset_parameters(init);
      set_drop_path(net, 0.1);
      GradientPool<Cpu> pool;
      Tensor<Cpu> x({32, 17, 128}), dy({32, 17, 128});
      x.fill(0.1f);
      dy.fill(0.01f);
      for (int i = 0; i < 2; ++i) step(net, x, dy, i, pooled ? &pool : nullptr);  // sizes the pool
      const auto count = Cpu::allocation_count().load();
      mallocs = 0;
      news = 0;
      counting = true;
      for (int i = 2; i < 5; ++i) step(net, x, dy, i, pooled ? &pool : nullptr);
      counting = false;
      allocations = long(Cpu::allocation_count().load() - count) + mallocs.load() + news.load();
      bytes = Cpu::live_bytes().load() - before;
      Context ctx;
      ctx.training = true;
      ctx.seed = 7;
      if (pooled) ctx.use(pool);
      net.forward(x, ctx);
      dx = net.backward(dy, ctx).to_host();
    }
    CHECK(Cpu::live_bytes().load() == before);  // every buffer given back when the model goes
  };
  long alloc_own = -1, alloc_pool = -1;
  std::int64_t bytes_own = 0, bytes_pool = 0;
  std::vector<float> dx_own, dx_pool;
  measure(false, alloc_own, bytes_own, dx_own);
  measure(true, alloc_pool, bytes_pool, dx_pool);
  CHECK(alloc_own == 0);
  CHECK(alloc_pool == 0);
  MESSAGE("6 blocks, batch 32: " << bytes_own / 1024 << " KiB with per-layer buffers, " << bytes_pool / 1024
                                 << " KiB with a gradient pool");
  CHECK(bytes_pool < bytes_own * 7 / 10);  // the backward half of the buffers is shared
  REQUIRE(dx_own.size() == dx_pool.size());
  for (std::size_t i = 0; i < dx_own.size(); ++i) REQUIRE(dx_own[i] == dx_pool[i]);  // same arithmetic
}
