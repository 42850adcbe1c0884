#pragma once
// One full training step (forward, loss, backward, AdamW) of a ViT on random data, timed; the
// body of build/bench/train_step for any backend. Backend-independent headers only, so that the
// Cuda instantiation (train_step_cuda.cu) compiles under nvcc.
#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <hatch/core.hpp>

namespace bench {

struct StepOptions {
  std::string preset = "vit-small";
  int batch = 128, steps = 20, warmup = 3;
  bool tf32 = false, tf32x3 = false;  // --device cuda: the GEMM precision (neither: the default)
  std::string label = "hatch";  // first word of the report line, e.g. "hatch cuda"
};

// Names the bench accepts: the Fashion-MNIST presets, plus ViT-B/16 at 224x224x3 for GPUs.
template <class F>
decltype(auto) with_bench_preset(const std::string& name, F&& f) {
  if (name == "vit-b16") return f(std::type_identity<hatch::presets::VitB16>{});
  return hatch::with_preset(name, std::forward<F>(f));
}

// The backend's count of GEMM work so far (Cpu::flop_count), or -1 where it keeps none. A function
// of its own: nvcc checks a discarded `if constexpr` branch inside the generic lambda below.
template <class B>
std::int64_t gemm_flops() {
  if constexpr (requires { B::flop_count(); })
    return B::flop_count().load();
  else
    return -1;
}

template <class B>
int time_train_step(const StepOptions& o) {
  using namespace hatch;
  return with_bench_preset(o.preset, [&]<class V>(std::type_identity<V>) {
    constexpr auto s = V::spec;
    auto model = std::make_unique<Model<V, B>>();
    Initializer init(0);
    model->reset_parameters(init);
    ParameterArena<B> arena(trainable_parameters(*model));  // as fit does: one pass per step
    AdamW<B> opt(arena, {});
    SoftTargetCrossEntropy<B> loss;
    std::mt19937_64 rng(0);
    std::normal_distribution<float> nd;
    std::vector<float> xh(std::size_t(o.batch) * s.channels * s.image * s.image);
    for (auto& v : xh) v = nd(rng);
    std::vector<int> labels(o.batch);
    for (auto& l : labels) l = int(rng() % s.classes);
    Tensor<B> x, t;
    x.from_host(xh, {o.batch, s.channels, s.image, s.image});
    t.from_host(smoothed_one_hot(labels, s.classes, 0.0), {o.batch, s.classes});
    double first_loss = -1, last_loss = 0;
    GradientPool<B> grads;
    StepScalars<B> scalars(1);  // as fit does: the loss is read once, after the update is enqueued
    auto step = [&] {
      Context ctx;
      ctx.training = true;
      ctx.input_grad = false;
      ctx.use(grads);
      opt.zero_grad();
      const auto& logits = model->forward(x, ctx);
      loss.forward_backward_into(logits, t, scalars, 0);
      model->backward(loss.grad(), ctx);
      grads.release_all();
      opt.step(1e-3);
      last_loss = scalars.read()[0];  // the step's one wait for the device
      if (first_loss < 0) first_loss = last_loss;
      B::synchronize();
    };
    for (int i = 0; i < o.warmup; ++i) step();
    double step_flops = 0;  // the GEMM work of one step, where the backend counts it
    if (const auto before = gemm_flops<B>(); before >= 0) {
      step();
      step_flops = double(gemm_flops<B>() - before);
    }
    std::vector<double> times;
    std::int64_t waits = 0, split = 0;
    if constexpr (requires { B::host_waits(); }) waits = -B::host_waits();
    if constexpr (requires { B::tf32_split_floats(); }) split = -B::tf32_split_floats();
    for (int i = 0; i < o.steps; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      step();
      times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    if constexpr (requires { B::tf32_split_floats(); }) {
      // tf32x3: the operand floats split for the GEMMs (each read once and written twice)
      split += B::tf32_split_floats();
      if (split > 0) std::printf("tf32x3_split_mfloats_per_step=%.1f\n", double(split) / 1e6 / std::max(1, o.steps));
    }
    if constexpr (requires { B::host_waits(); }) {
      waits += B::host_waits();
      // the step's own (reading the loss) and the synchronize that ends each timed step
      std::printf("host_waits_per_step=%.2f (the loss read and the timing's synchronize)\n",
                  double(waits) / std::max(1, o.steps));
    }
    std::sort(times.begin(), times.end());
    const double median = times[times.size() / 2];
    std::printf("%s %s batch=%d: median %.1f ms/step (min %.1f)\n", o.label.c_str(), o.preset.c_str(), o.batch,
                median * 1e3, times.front() * 1e3);
    // A sanity check of the timed work: about ln(classes) at the start, finite, falling.
    std::printf("first_loss=%.4f last_loss=%.4f (ln %d = %.4f)\n", first_loss, last_loss, s.classes,
                std::log(double(s.classes)));
    if (step_flops > 0) std::printf("gemm_gflop_per_step=%.3f\n", step_flops / 1e9);
    if constexpr (requires { B::memory_stats(); }) {
      // device memory since the start: the model, its optimizer state and the step's peak
      // (torch_vit_step.py prints torch.cuda.max_memory_allocated / max_memory_reserved alike)
      const auto m = B::memory_stats();
      std::printf("peak_device_mib=%.1f reserved_device_mib=%.1f\n", double(m.peak_in_use) / (1 << 20),
                  double(m.peak_reserved) / (1 << 20));
    }
    std::printf("images_per_second=%.1f\n", o.batch / median);
    return 0;
  });
}

int time_train_step_cuda(const StepOptions& o);  // train_step_cuda.cu, when built with CUDA

}  // namespace bench
