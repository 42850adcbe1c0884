// End-to-end training of a preset ViT on Fashion-MNIST (the baseline Deep Incubation is
// compared with), on the CPU or with --device cuda on a GPU. Last stdout line:
// test_accuracy=0.XXXX
#include "common.hpp"

int main(int argc, char** argv) {
  examples::share_cores_politely(argv);
  CLI::App app{"Train a ViT (or a NAC) end to end on Fashion-MNIST"};
  examples::E2eOptions o;
  examples::MpiJob job(argc, argv, o.common);
  examples::add_common_flags(app, o.common, /*e2e_presets=*/true);
  examples::add_nac_flags(app, o.common);
  app.add_option("--epochs", o.epochs, "training epochs")->check(examples::integer_in(0, 100000));
  app.add_option("--init", o.init, "start from this model.safetensors (written by train_e2e for the same preset)");
  CLI11_PARSE(app, argc, argv);
  return examples::guarded(
      "train_e2e",
      [&] {
        job.check();
        return examples::on_device(o, examples::train_e2e<hatch::Cpu>, examples::train_e2e_cuda);
      },
      &o.common);
}
