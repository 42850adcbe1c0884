// End-to-end training of a preset ViT on Fashion-MNIST (the baseline Deep Incubation is
// compared with). Last stdout line: test_accuracy=0.XXXX
#include "common.hpp"

int main(int argc, char** argv) {
  CLI::App app{"Train a ViT end to end on Fashion-MNIST"};
  examples::CommonFlags flags;
  int epochs = 3;
  flags.add_to(app);
  app.add_option("--epochs", epochs, "training epochs")->check(CLI::Range(0, 100000));
  CLI11_PARSE(app, argc, argv);
  omp_set_num_threads(flags.threads);
  return examples::guarded("train_e2e", [&] {
    const auto train = flags.load(true), test = flags.load(false);
    return hatch::with_preset(flags.preset, [&]<class V>(std::type_identity<V>) {
      using namespace hatch;
      Model<V, Cpu> model;
      Initializer init(flags.seed);
      model.reset_parameters(init);
      set_drop_path(model, flags.drop_path);
      const auto result = fit(model, train, test, flags.fit_options(epochs, "e2e"));
      save_parameters(model, std::filesystem::path(flags.out) / "model.safetensors", {{"preset", flags.preset}});
      std::printf("epochs=%d train_images=%d seconds=%.1f\n", result.epochs, train.n, result.seconds);
      std::printf("test_accuracy=%.4f\n", result.test.accuracy);
      return 0;
    });
  });
}
