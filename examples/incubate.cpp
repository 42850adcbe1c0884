// Deep Incubation of a preset ViT on Fashion-MNIST. Each phase can run as its own process:
//   incubate --phase meta;  incubate --phase module --index i (i = 0..3, in parallel);
//   incubate --phase assemble;  incubate --phase finetune
// or all of them in one: incubate --phase all. Last stdout line: test_accuracy=0.XXXX
#include <hatch/modular/incubator.hpp>

#include "common.hpp"

int main(int argc, char** argv) {
  CLI::App app{"Deep Incubation of a ViT on Fashion-MNIST"};
  examples::CommonFlags flags;
  flags.preset = "vit-small";
  flags.train_limit = 10000;
  flags.lr = 2e-3;
  flags.warmup_epochs = 0.5;
  std::string phase = "all";
  int index = -1, epochs_meta = 2, epochs_module = 1, epochs_finetune = 2;
  double hybrid_drop_path = 0.1, finetune_drop_path = 0.1, finetune_clip = 1.0, finetune_lr = 5e-4;
  flags.add_to(app);
  app.add_option("--phase", phase, "meta, module, assemble, finetune or all")
      ->check(CLI::IsMember({"meta", "module", "assemble", "finetune", "all"}));
  app.add_option("--index", index, "the module to incubate (--phase module); -1 = every module in turn")
      ->check(CLI::Range(-1, 63));
  app.add_option("--epochs-meta", epochs_meta, "meta-model pre-training epochs")->check(CLI::Range(0, 100000));
  app.add_option("--epochs-module", epochs_module, "incubation epochs per module")->check(CLI::Range(0, 100000));
  app.add_option("--epochs-finetune", epochs_finetune, "fine-tuning epochs")->check(CLI::Range(0, 100000));
  app.add_option("--hybrid-drop-path", hybrid_drop_path, "max drop-path rate in the hybrid")->check(CLI::Range(0.0, 0.99));
  app.add_option("--finetune-drop-path", finetune_drop_path, "max drop-path rate when fine-tuning")
      ->check(CLI::Range(0.0, 0.99));
  app.add_option("--finetune-lr", finetune_lr, "peak learning rate when fine-tuning the assembled model")
      ->check(CLI::PositiveNumber);
  app.add_option("--finetune-clip", finetune_clip, "gradient clip when fine-tuning")->check(CLI::NonNegativeNumber);
  CLI11_PARSE(app, argc, argv);
  omp_set_num_threads(flags.threads);

  return examples::guarded("incubate", [&] {
    const bool needs_data = phase != "assemble";
    const auto train = needs_data ? flags.load(true) : hatch::data::Dataset{};
    const auto test = needs_data ? flags.load(false) : hatch::data::Dataset{};
    return hatch::with_preset(flags.preset, [&]<class V>(std::type_identity<V>) {
      using namespace hatch;
      using Inc = Incubator<presets::MetaOf<V>, V, Cpu>;
      Inc inc({.dir = std::filesystem::path(flags.out), .tag = flags.preset, .seed = flags.seed,
               .hybrid_drop_path = hybrid_drop_path, .target_drop_path = finetune_drop_path});
      double images = 0, seconds = 0;
      FitResult last;
      auto account = [&](const FitResult& r) {
        images += r.images;
        seconds += r.seconds;
        last = r;
      };
      auto options = [&](int epochs, bool finetune) {
        auto o = flags.fit_options(epochs, "");
        if (finetune) {
          o.lr = finetune_lr;
          o.warmup_epochs = 0;
          o.clip = finetune_clip;
        }
        o.images_before = images;
        o.seconds_before = seconds;
        return o;
      };
      if (phase == "meta" || phase == "all") account(inc.pretrain_meta(train, test, options(epochs_meta, false)));
      if (phase == "module" || phase == "all") {
        require(phase == "all" || index < int(Inc::K), "--index",
                "must be below the number of stages, " + std::to_string(Inc::K));
        for (std::size_t i = 0; i < Inc::K; ++i)
          if (index < 0 || std::size_t(index) == i) account(inc.incubate(i, train, test, options(epochs_module, false)));
      }
      if (phase == "assemble" || phase == "finetune" || phase == "all") {
        auto target = std::make_unique<Model<V, Cpu>>();
        if (phase != "finetune") inc.assemble(*target);
        if (phase != "assemble") account(inc.finetune(*target, train, test, options(epochs_finetune, true)));
      }
      std::printf("phase=%s train_images_processed=%.0f training_seconds=%.1f\n", phase.c_str(), images, seconds);
      if (phase == "assemble") {
        std::printf("assembled %zu modules into %s\n", Inc::K, (std::filesystem::path(flags.out) / "assembled").c_str());
        return 0;
      }
      std::printf("test_accuracy=%.4f\n", last.test.accuracy);
      return 0;
    });
  });
}
