// Bring your own model (docs/guide.md walks through this file):
//   1. a custom layer, LayerScale, written against the backend primitives;
//   2. checked with the public finite-difference checker (hatch/testing/gradcheck.hpp);
//   3. a 4-stage residual MLP on Fashion-MNIST, composed without any hand-set offsets;
//   4. trained end to end with fit;
//   5. trained again by Deep Incubation with Incubator and the generic MetaOf.
//
//   custom_model --train-limit 512 --test-limit 256 --epochs 1     # a few seconds
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <hatch/hatch.hpp>
#include <hatch/modular/incubator.hpp>
#include <hatch/testing/gradcheck.hpp>
#include <hatch/train/fit.hpp>
#include <omp.h>

namespace mine {
using namespace hatch;

// ---- 1. A custom layer ----------------------------------------------------------------------
// LayerScale (CaiT): y[r, c] = x[r, c] * gamma[c], one learnt scale per channel, started small so
// that a residual branch begins close to the identity.
//
// The layer contract: `backend`, `in`/`out` widths, reset_parameters, forward (caches what
// backward needs and returns a reference to a buffer it owns), backward (accumulates parameter
// gradients when wants_grad says so; writes the input gradient when ctx.input_grad), visit (every
// parameter with its name) and for_each_layer. The base LeafLayer<Self, B, In, Out>
// (hatch/core/layer.hpp) provides backend, in, out and for_each_layer; the layer writes the rest.
template <Backend B, int D>
class LayerScaleLayer : public LeafLayer<LayerScaleLayer<B, D>, B, D, D> {  // backend, in, out, for_each_layer
 public:
  LayerScaleLayer() : gamma({D}, /*decay=*/false) {}
  void reset_parameters(Initializer& init) { init.constant(gamma, 0.1); }

  const Tensor<B>& forward(const Tensor<B>& x, Context&) {
    HATCH_CHECK(x.cols() == D, "LayerScale", "input width " + std::to_string(x.cols()) + ", expected " + std::to_string(D));
    x_ = &x;
    const int rows = int(x.rows());
    g_.resize({rows, D});
    B::copy_2d(g_.data(), D, gamma.value.data(), 0, rows, D);  // gamma broadcast to every row
    y_.resize(x.shape());
    B::mul(y_.data(), x.data(), g_.data(), x.numel());
    return y_;
  }
  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const int rows = int(dy.rows());
    if (wants_grad(gamma, ctx)) {  // dgamma[c] += sum_r dy[r, c] x[r, c]
      t_.resize(dy.shape());
      B::mul(t_.data(), dy.data(), x_->data(), dy.numel());
      B::sum_rows(gamma.grad.data(), t_.data(), rows, D, D, 1);
    }
    if (ctx.input_grad) {  // dx = dy * gamma
      dx_.resize(dy.shape());
      B::mul(dx_.data(), dy.data(), g_.data(), dy.numel());
    }
    return dx_;
  }
  template <class F>
  void visit(F&& f, const std::string& prefix) { f(prefix + "gamma", gamma); }

  Parameter<B> gamma;

 private:
  const Tensor<B>* x_ = nullptr;  // owned by the layer before; alive until backward
  Tensor<B> g_, y_, t_, dx_;
};

// The spec: an empty type with the widths and the binding to a backend.
template <int D>
struct LayerScale {
  static constexpr int in = D, out = D;
  template <Backend B> using bind = LayerScaleLayer<B, D>;
};

// ---- 3. A staged model ----------------------------------------------------------------------
// A pre-norm residual MLP block with LayerScale on its branch.
template <int D>
using ResBlock = Residual<Sequential<Named<"norm", LayerNorm<D>>, Named<"fc1", Linear<D, 4 * D>>, Gelu,
                                     Named<"fc2", Linear<4 * D, D>>, Named<"ls", LayerScale<D>>>>;

// Four stages of Depth blocks each. No offsets anywhere: Stages numbers the blocks across the
// stages (stage 1 holds blocks.2 and blocks.3 for Depth = 2), and MetaOf<ResMlp> cuts every
// Repeat to one block.
template <int D, int Depth>
using ResMlp = Stages<
    Sequential<Flatten<28 * 28>, Named<"stem", Linear<28 * 28, D>>, Named<"blocks", Repeat<Depth, ResBlock<D>>>>,
    Sequential<Named<"blocks", Repeat<Depth, ResBlock<D>>>>,
    Sequential<Named<"blocks", Repeat<Depth, ResBlock<D>>>>,
    Sequential<Named<"blocks", Repeat<Depth, ResBlock<D>>>, Named<"norm", LayerNorm<D>>,
               Named<"head", Linear<D, 10>>>>;

using Target = ResMlp<64, 2>;
using Meta = MetaOf<Target>;  // ResMlp<64, 1>, numbered blocks.0 ... blocks.3

}  // namespace mine

namespace {

// ---- 2. Checking gradients --------------------------------------------------------------------
bool check_gradients() {
  using namespace hatch;
  Model<mine::LayerScale<16>, Cpu64> ls;
  testing::randomize_parameters(ls, 1);
  const auto a = testing::gradcheck(ls, {4, 3, 16}, /*training=*/false);
  std::printf("gradcheck LayerScale: max relative error %.2e %s\n", a.max_rel, a.passed() ? "ok" : a.worst.c_str());
  Model<mine::ResBlock<16>, Cpu64> block;
  testing::randomize_parameters(block, 2);
  const auto b = testing::gradcheck(block, {4, 16}, /*training=*/false);
  std::printf("gradcheck ResBlock:   max relative error %.2e %s\n", b.max_rel, b.passed() ? "ok" : b.worst.c_str());
  return a.passed() && b.passed();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"A custom layer and a staged residual MLP, trained with fit and by Deep Incubation"};
  std::string data = hatch::data::kFashionMnistDir, out = "out/custom_model";
  int train_limit = 10000, test_limit = 2000, epochs = 2, threads = 2;
  app.add_option("--data", data, "directory with the Fashion-MNIST IDX files")->capture_default_str();
  app.add_option("--out", out, "directory for the incubation's stage files")->capture_default_str();
  app.add_option("--train-limit", train_limit, "first N training images (0 = all)")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--test-limit", test_limit, "first N test images (0 = all)")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--epochs", epochs, "epochs of every training phase")->capture_default_str()->check(CLI::Range(1, 1000));
  app.add_option("--threads", threads, "CPU threads")->capture_default_str()->check(CLI::Range(1, 256));
  CLI11_PARSE(app, argc, argv);
  omp_set_num_threads(threads);

  try {
    using namespace hatch;
    if (!check_gradients()) return 1;

    const auto train = data::load_fashion_mnist(data, true, train_limit);
    const auto test = data::load_fashion_mnist(data, false, test_limit);
    FitOptions fo;
    fo.epochs = epochs;
    fo.batch = 64;
    fo.lr = 1e-3;
    fo.progress = false;

    // ---- 4. End to end with fit -------------------------------------------------------------
    auto model = std::make_unique<Model<mine::Target, Cpu>>();
    Initializer init(0);
    model->reset_parameters(init);
    const auto e2e = fit(*model, train, test, fo);
    std::printf("end to end: test accuracy %.4f\n", e2e.test.accuracy);

    // ---- 5. Deep Incubation -------------------------------------------------------------------
    Incubator<mine::Meta, mine::Target, Cpu> incubator({.dir = std::filesystem::path(out) / "incubation",
                                                        .tag = "res-mlp", .seed = 0});
    incubator.pretrain_meta(train, test, fo);
    for (std::size_t i = 0; i < 4; ++i) {  // independent jobs: one process each would do
      const auto r = incubator.incubate(i, train, test, fo);
      std::printf("module %zu incubated: hybrid test accuracy %.4f\n", i, r.test.accuracy);
    }
    auto target = std::make_unique<Model<mine::Target, Cpu>>();
    incubator.assemble(*target);
    const auto tuned = incubator.finetune(*target, train, test, fo);
    std::printf("incubated and fine-tuned: test accuracy %.4f\n", tuned.test.accuracy);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "custom_model: error: %s\n", e.what());
    return 1;
  }
}
