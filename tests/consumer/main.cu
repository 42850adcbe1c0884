// The CUDA consumer: a micro ViT step and a user-defined activation on hatch::Cuda, from the
// installed headers through the hatch::cuda target. Without a GPU it only says so (exit 0).
#include <cstdio>
#include <hatch/cuda.hpp>

struct Softsign {  // an activation written as its maths, run by a CUDA kernel
  template <class T> HATCH_HD static T f(T x) { return x / (T(1) + hatch::hd::fabs(x)); }
  template <class T> HATCH_HD static T df(T x) {
    const T d = T(1) + hatch::hd::fabs(x);
    return T(1) / (d * d);
  }
};

int main() {
  using namespace hatch;
  if (!Cuda::device_available()) {
    std::printf("no CUDA device: built only\n");
    return 0;
  }
  Model<presets::VitMicro, Cuda> model;
  Initializer init(42);
  model.reset_parameters(init);
  Tensor<Cuda> x({2, 1, 28, 28});
  x.fill(0.5f);
  Context ctx;
  const auto& logits = model.forward(x, ctx);
  Model<Elementwise<Softsign>, Cuda> act;
  const auto& y = act.forward(logits, ctx);
  Tensor<Cuda> dy(y.shape());
  dy.fill(1.0f);
  model.backward(act.backward(dy, ctx), ctx);
  const auto h = y.to_host();
  for (float v : h)
    if (!(v > -1 && v < 1)) return 1;
  std::printf("logits %s ok\n", logits.shape().str().c_str());
  return logits.shape() == Shape{2, 10} ? 0 : 1;
}
