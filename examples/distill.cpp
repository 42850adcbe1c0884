// m2mKD (module-to-module knowledge distillation) on Fashion-MNIST, on the CPU or with
// --device cuda: a ViT teacher trained by Deep Incubation is distilled, module by module inside
// that run's frozen meta model, into a student (a ViT, m2mKD's mixture-of-experts student, or a
// Neural Attentive Circuit),
// which is then assembled and fine-tuned. Each phase can run as its own process:
//   distill --phase meta;  distill --phase module --index i (i = 0..3, in parallel);
//   distill --phase assemble;  distill --phase finetune
// or all of them in one: distill --phase all. Without --teacher-dir the meta phase incubates a
// teacher into <out>/teacher-run first. Last stdout line: test_accuracy=0.XXXX
#include "common.hpp"

int main(int argc, char** argv) {
  examples::share_cores_politely(argv);
  CLI::App app{"m2mKD: distil a ViT teacher into a modular student on Fashion-MNIST"};
  examples::DistillOptions o;
  examples::MpiJob job(argc, argv, o.common);
  auto& c = o.common;
  c.preset = "vit-small";
  c.train_limit = 10000;
  c.lr = 2e-3;
  c.warmup_epochs = 0.5;
  examples::add_common_flags(app, c);
  examples::add_nac_flags(app, o.common);
  app.get_option("--preset")->description("the teacher's preset (its meta model is MetaOf<preset>)");
  app.add_option("--student", o.student,
                 std::string("vit (the teacher's preset), moe (m2mKD's mixture-of-experts student of the "
                             "teacher's shape), nac (a Neural Attentive Circuit: read-in, propagators, read-out) "
                             "or a preset; teacher > student pairs: ") +
                     examples::kDistillPairs)
      ->check(examples::kNotEmpty);
  app.add_option("--teacher-dir", o.teacher_dir,
                 "a finished `incubate` run of --preset (its finetuned/ stages are the teacher, its meta/ the meta "
                 "model); empty: <out>/teacher-run, incubated by the meta phase when missing");
  app.add_option("--phase", o.phase, "meta, module, assemble, finetune or all")
      ->check(CLI::IsMember({"meta", "module", "assemble", "finetune", "all"}));
  app.add_option("--index", o.index, "the module to distil (--phase module); -1 = every module in turn")
      ->check(examples::integer_in(-1, 63));
  app.add_option("--epochs-module", o.epochs_module, "distillation epochs per module")
      ->check(examples::integer_in(0, 100000));
  app.add_option("--epochs-finetune", o.epochs_finetune, "fine-tuning epochs of the assembled student")
      ->check(examples::integer_in(0, 100000));
  app.add_option("--teacher-epochs-meta", o.teacher_epochs_meta, "without --teacher-dir: the teacher's meta epochs")
      ->check(examples::integer_in(0, 100000));
  app.add_option("--teacher-epochs-module", o.teacher_epochs_module,
                 "without --teacher-dir: the teacher's incubation epochs per module")
      ->check(examples::integer_in(0, 100000));
  app.add_option("--teacher-epochs-finetune", o.teacher_epochs_finetune,
                 "without --teacher-dir: the teacher's fine-tuning epochs")
      ->check(examples::integer_in(0, 100000));
  app.add_option("--alpha", o.alpha, "weight of the distillation term (1 - alpha: cross-entropy)")
      ->check(examples::finite_in(0, 1));
  app.add_option("--temperature", o.temperature, "distillation temperature")->check(examples::finite_in(1e-3, 100));
  app.add_option("--hybrid-drop-path", o.hybrid_drop_path,
                 "max drop-path rate in the student module of its hybrid (the frozen meta model has none)")
      ->check(examples::finite_in(0, 0.99));
  app.add_option("--finetune-drop-path", o.finetune_drop_path, "max drop-path rate when fine-tuning")
      ->check(examples::finite_in(0, 0.99));
  app.add_option("--finetune-lr", o.finetune_lr,
                 "peak learning rate when fine-tuning the assembled student (as incubate's --finetune-lr)")
      ->check(examples::finite_in(1e-12, 10));
  app.add_option("--finetune-clip", o.finetune_clip, "gradient clip when fine-tuning")->check(examples::finite_in(0, 1e6));
  CLI11_PARSE(app, argc, argv);
  return examples::guarded(
      "distill",
      [&] {
        job.check();
        return examples::on_device(o, examples::distill<hatch::Cpu>, examples::distill_cuda);
      },
      &o.common);
}
