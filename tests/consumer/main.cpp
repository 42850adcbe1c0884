// Builds a micro ViT from the installed headers, runs one forward and backward pass.
#include <cstdio>
#include <hatch/hatch.hpp>

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
  return logits.shape() == Shape{2, 10} ? 0 : 1;
}
