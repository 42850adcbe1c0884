// Deep Incubation of a preset ViT on Fashion-MNIST, on the CPU or with --device cuda on a GPU.
// Each phase can run as its own process:
//   incubate --phase meta;  incubate --phase module --index i (i = 0..3, in parallel);
//   incubate --phase assemble;  incubate --phase finetune
// or all of them in one: incubate --phase all. Last stdout line: test_accuracy=0.XXXX
#include "common.hpp"

int main(int argc, char** argv) {
  examples::share_cores_politely(argv);
  CLI::App app{"Deep Incubation of a ViT on Fashion-MNIST"};
  examples::IncubateOptions o;
  examples::MpiJob job(argc, argv, o.common);
  auto& c = o.common;
  c.preset = "vit-small";
  c.train_limit = 10000;
  c.lr = 2e-3;
  c.warmup_epochs = 0.5;
  examples::add_common_flags(app, c);
  app.add_option("--phase", o.phase, "meta, module, assemble, finetune or all")
      ->check(CLI::IsMember({"meta", "module", "assemble", "finetune", "all"}));
  app.add_option("--index", o.index, "the module to incubate (--phase module); -1 = every module in turn")
      ->check(examples::integer_in(-1, 63));
  app.add_option("--epochs-meta", o.epochs_meta, "meta-model pre-training epochs")->check(examples::integer_in(0, 100000));
  app.add_option("--epochs-module", o.epochs_module, "incubation epochs per module")->check(examples::integer_in(0, 100000));
  app.add_option("--epochs-finetune", o.epochs_finetune, "fine-tuning epochs")->check(examples::integer_in(0, 100000));
  app.add_option("--hybrid-drop-path", o.hybrid_drop_path, "max drop-path rate in the hybrid")
      ->check(examples::finite_in(0, 0.99));
  app.add_option("--finetune-drop-path", o.finetune_drop_path, "max drop-path rate when fine-tuning")
      ->check(examples::finite_in(0, 0.99));
  app.add_option("--finetune-lr", o.finetune_lr,
                 "peak learning rate when fine-tuning the assembled model (our measured default for short "
                 "schedules; the paper fine-tunes at the rate of its other phases, --lr: docs/results.md)")
      ->check(examples::finite_in(1e-12, 10));
  app.add_option("--finetune-clip", o.finetune_clip, "gradient clip when fine-tuning")->check(examples::finite_in(0, 1e6));
  CLI11_PARSE(app, argc, argv);
  return examples::guarded(
      "incubate",
      [&] {
        job.check();
        return examples::on_device(o, examples::incubate<hatch::Cpu>, examples::incubate_cuda);
      },
      &o.common);
}
