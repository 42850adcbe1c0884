// Images per second of one full training step (forward, loss, backward, AdamW) of a preset ViT
// on random data; the peer of bench/torch_vit_step.py. Last line: images_per_second=N.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <hatch/hatch.hpp>
#include <random>
#include <vector>

int main(int argc, char** argv) {
  CLI::App app{"hatch training-step throughput"};
  std::string preset = "vit-small";
  int batch = 128, threads = 2, steps = 20, warmup = 3;
  app.add_option("--preset", preset, std::string("model preset: ") + hatch::presets::names);
  app.add_option("--batch", batch, "batch size")->check(CLI::Range(1, 1 << 16));
  app.add_option("--threads", threads, "OpenMP threads")->check(CLI::Range(1, 1024));
  app.add_option("--steps", steps, "timed steps")->check(CLI::Range(1, 1 << 20));
  app.add_option("--warmup", warmup, "untimed steps first")->check(CLI::Range(0, 1 << 20));
  CLI11_PARSE(app, argc, argv);
  omp_set_num_threads(threads);
  using namespace hatch;
  try {
    return with_preset(preset, [&]<class V>(std::type_identity<V>) {
      Model<V, Cpu> model;
      Initializer init(0);
      model.reset_parameters(init);
      AdamW<Cpu> opt(trainable_parameters(model), {});
      SoftTargetCrossEntropy<Cpu> loss;
      std::mt19937_64 rng(0);
      std::normal_distribution<float> nd;
      std::vector<float> xh(std::size_t(batch) * V::spec.channels * V::spec.image * V::spec.image);
      for (auto& v : xh) v = nd(rng);
      std::vector<int> labels(batch);
      for (auto& l : labels) l = int(rng() % V::spec.classes);
      Tensor<Cpu> x, t;
      x.from_host(xh, {batch, V::spec.channels, V::spec.image, V::spec.image});
      t.from_host(smoothed_one_hot(labels, V::spec.classes, 0.0), {batch, V::spec.classes});
      auto step = [&] {
        Context ctx;
        ctx.training = true;
        ctx.input_grad = false;
        opt.zero_grad();
        const auto& logits = model.forward(x, ctx);
        loss.forward_backward(logits, t);
        model.backward(loss.grad(), ctx);
        opt.step(1e-3);
      };
      for (int i = 0; i < warmup; ++i) step();
      std::vector<double> times;
      for (int i = 0; i < steps; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        step();
        times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(times.begin(), times.end());
      const double median = times[times.size() / 2];
      std::printf("hatch %s batch=%d threads=%d: median %.1f ms/step (min %.1f)\n", preset.c_str(), batch, threads,
                  median * 1e3, times.front() * 1e3);
      std::printf("images_per_second=%.1f\n", batch / median);
      return 0;
    });
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_step: %s\n", e.what());
    return 2;
  }
}
