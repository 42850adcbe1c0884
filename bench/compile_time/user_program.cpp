// A user's program for bench/compile_time/run.sh: include hatch, train one model (vit-small) on
// Fashion-MNIST with fit. Its compile time is what issue 14 bounds (<= 20 s at -O2).
#include <cstdio>
#include <memory>
#include <hatch/hatch.hpp>
#include <hatch/train/fit.hpp>
int main() {
  using namespace hatch;
  const auto train = data::load_fashion_mnist(data::kFashionMnistDir, true, 1024);
  const auto test = data::load_fashion_mnist(data::kFashionMnistDir, false, 512);
  auto model = std::make_unique<Model<presets::VitSmall, Cpu>>();
  Initializer init(0);
  model->reset_parameters(init);
  FitOptions fo;
  fo.epochs = 1;
  const auto r = fit(*model, train, test, fo);
  std::printf("test accuracy %.4f\n", r.test.accuracy);
}
