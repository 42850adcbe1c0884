// Builds a micro ViT from the installed headers, runs one forward and backward pass, and checks
// a layer's gradients with the installed finite-difference checker.
#include <cstdio>
#include <hatch/hatch.hpp>
#include <hatch/testing/gradcheck.hpp>

int main() {
  using namespace hatch;
  Model<presets::VitMicro, Cpu> model;
  Initializer init(42);
  model.reset_parameters(init);
  Tensor<Cpu> x({2, 1, 28, 28});
  x.fill(0.5f);
  Context ctx;
  const auto& logits = model.forward(x, ctx);
  Tensor<Cpu> dy(logits.shape());
  dy.fill(1.0f);
  ctx.input_grad = false;
  model.backward(dy, ctx);
  std::printf("logits %s ok\n", logits.shape().str().c_str());
  Model<Linear<6, 4>, Cpu64> linear;
  testing::randomize_parameters(linear, 1);
  const auto report = testing::gradcheck(linear, {3, 6}, false);
  std::printf("gradcheck Linear: %.2e\n", report.max_rel);
  return logits.shape() == Shape{2, 10} && report.passed() ? 0 : 1;
}
