#pragma once
// The fit loop: epochs of mini-batch training with augmentation, AdamW, warmup + cosine
// schedule, clipping; evaluation after each epoch; metrics; a stop with a clear message on a
// non-finite loss; a training state after each epoch from which a killed run resumes exactly.
//
// Works on anything with the layer contract (forward, backward, visit): a whole model, or the
// Incubator's hybrid with its frozen stages. The loss it minimises and reports is the
// objective's plus the auxiliary terms of the layers that train (collect_aux_loss); those terms
// are also written on their own ("aux_loss", the epoch mean) into metrics.jsonl.
#include <array>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>

#include "hatch/backend/random.hpp"
#include "hatch/core/aux_loss.hpp"
#include "hatch/core/expert_load.hpp"
#include "hatch/data/batcher.hpp"
#include "hatch/data/fashion_mnist.hpp"
#include "hatch/io/atomic_file.hpp"
#include "hatch/train/checkpoint.hpp"
#include "hatch/train/loss.hpp"
#include "hatch/train/optimizer.hpp"
#include "hatch/train/progress.hpp"
#include "hatch/distributed/collective.hpp"

namespace hatch {

struct EvalResult {
  double loss = 0, accuracy = 0;
};

struct FitOptions {
  int epochs = 10, batch = 128;
  int eval_batch = 0;                    // 0: the training batch, so that evaluation never grows
                                         // the buffers the layers sized for training
  int evaluation_batch() const { return eval_batch > 0 ? eval_batch : batch; }
  double lr = 5e-4, min_lr = 1e-5, warmup_lr = 1e-6;
  double warmup_epochs = 0;
  bool lr_per_epoch = false;             // the rate held for a whole epoch (timm's per-epoch steps);
                                         // false: warmup and cosine move every step
  int eval_every = 1;                    // evaluate the test set after every N-th epoch and the last
                                         // (metrics lines of other epochs carry no test entries)
  double weight_decay = 0.05, clip = 0;  // clip: max global gradient norm, 0 = off
  data::AugmentOptions augment{};
  std::uint64_t seed = 0;
  std::string phase = "train";           // written into every metrics line
  std::filesystem::path out;             // metrics.jsonl and <phase>.state.safetensors; empty = none
  bool resume = true;                    // continue from out/<phase>.state.safetensors if present
  std::string inputs;                    // fingerprint of the phase's input files; a state saved
                                         // for other inputs is refused instead of resumed
  nlohmann::json recipe = nlohmann::json::object();  // the caller's part of the recipe (preset,
                                         // --init file, drop-path, ...): with fit's own part
                                         // (fit_recipe) it is saved in the state, and a state
                                         // saved with another recipe is refused, not resumed
  std::string resume_hint = "set FitOptions::resume = false to start afresh";  // said on a refusal
  bool progress = true;
  double images_before = 0;              // training images seen by earlier phases (for compute plots)
  double seconds_before = 0;             // training seconds spent by earlier phases
  std::function<void(int epoch, const EvalResult& test)> on_epoch_end;  // after the state is saved
  // A second held-out set (such as data::shifted(test), the out-of-distribution set), evaluated
  // like the test set after the last epoch only: FitResult::ood, and ood_loss / ood_accuracy in
  // the last epoch's metrics line. Not part of the recipe: it changes nothing that is trained.
  std::shared_ptr<const data::Dataset> ood;
  // Data-parallel training (distributed/collective.hpp; null or one rank: a single process).
  // Every rank makes the same global batch (same order and augmentation as one process) and
  // trains on its contiguous share of the rows; the gradients, weighted by each share, are
  // summed with one all-reduce over the flat gradient arena, so every rank takes the same step
  // and holds the same weights (rank 0's are broadcast at the start). Dropout and drop-path
  // draw per rank. Rank 0 alone writes metrics, states and progress; the test set is split
  // between the ranks. Not part of the recipe: a run resumes with any number of ranks.
  std::shared_ptr<Collective> collective;
};

struct FitResult {
  EvalResult test;
  std::optional<EvalResult> ood;  // FitOptions::ood's, when it was given
  int epochs = 0;
  double seconds = 0, images = 0;
};

// The options that change what a fit run computes, as flag-like names -> values, with the
// caller's own entries (FitOptions::recipe); not where it writes, nor progress or resume.
inline nlohmann::json options_recipe(const FitOptions& o) {
  nlohmann::json r = {{"epochs", o.epochs},
                      {"batch", o.batch},
                      {"lr", o.lr},
                      {"min-lr", o.min_lr},
                      {"warmup-lr", o.warmup_lr},
                      {"warmup-epochs", o.warmup_epochs},
                      {"weight-decay", o.weight_decay},
                      {"clip", o.clip},
                      {"crop-padding", o.augment.crop_padding},
                      {"hflip", o.augment.hflip},
                      {"mixup", o.augment.mixup_alpha},
                      {"cutmix", o.augment.cutmix_alpha},
                      {"mix-prob", o.augment.mix_prob},
                      {"switch-prob", o.augment.switch_prob},
                      {"label-smoothing", o.augment.label_smoothing},
                      {"pad-value", o.augment.pad_value},
                      {"seed", o.seed},
                      {"inputs", o.inputs}};
  if (o.lr_per_epoch) r["lr-per-epoch"] = true;  // only when set: states of earlier runs still resume
  for (const auto& [k, v] : o.recipe.items()) r[k] = v;
  return r;
}

// Everything that changes what a fit run computes: options_recipe and the sizes of the data. A
// saved training state records it; resuming with any entry changed is refused.
inline nlohmann::json fit_recipe(const FitOptions& o, const data::Dataset& train, const data::Dataset& test) {
  auto r = options_recipe(o);
  r["train-images"] = train.n;
  r["test-images"] = test.n;
  return r;
}

namespace detail {
// "lr 0.002 (saved) -> 0.0001 (now), seed 0 -> 3" for the entries that differ; empty if none.
inline std::string recipe_difference(const nlohmann::json& saved, const nlohmann::json& now) {
  std::string out;
  auto value = [](const nlohmann::json& j, const std::string& k) {
    return j.contains(k) ? j.at(k).dump() : std::string("(none)");
  };
  std::set<std::string> keys;
  for (const auto& [k, v] : saved.items()) keys.insert(k);
  for (const auto& [k, v] : now.items()) keys.insert(k);
  for (const auto& k : keys) {
    if (saved.contains(k) && now.contains(k) && saved.at(k) == now.at(k)) continue;
    out += (out.empty() ? "" : ", ") + k + " " + value(saved, k) + " in the state, " + value(now, k) + " now";
  }
  return out;
}

// The loop's own entries of a state file, checked: a hand-edited or foreign state is refused
// with the file's name instead of training with, say, a negative epoch.
struct ResumePoint {
  int epoch = 0;
  double seconds = 0, images = 0;
  std::string run;
};
inline ResumePoint resume_point(const nlohmann::json& st, const std::string& where, int epochs) {
  ResumePoint p;
  auto field = [&](const char* key) -> const nlohmann::json& {
    require(st.is_object() && st.contains(key), where, std::string("the training state has no '") + key + "' entry");
    return st.at(key);
  };
  const auto& e = field("epoch");
  require(e.is_number_integer() && e.get<std::int64_t>() >= 0 && e.get<std::int64_t>() <= epochs, where,
          "the training state's 'epoch' is " + e.dump() + ", expected an integer in [0, " + std::to_string(epochs) +
              "]");
  p.epoch = e.get<int>();
  for (auto [key, out] : {std::pair{"seconds", &p.seconds}, std::pair{"images", &p.images}}) {
    const auto& v = field(key);
    require(v.is_number() && std::isfinite(v.get<double>()) && v.get<double>() >= 0, where,
            std::string("the training state's '") + key + "' is " + v.dump() + ", expected a number >= 0");
    *out = v.get<double>();
  }
  if (st.contains("run") && st.at("run").is_string()) p.run = st.at("run").get<std::string>();
  return p;
}

inline std::string new_run_id() {
  const auto now = std::chrono::system_clock::now().time_since_epoch().count();
  char id[17];
  std::snprintf(id, sizeof id, "%016llx",
                static_cast<unsigned long long>(mix64(std::uint64_t(now) ^ (std::uint64_t(::getpid()) << 32))));
  return id;
}
}  // namespace detail

inline std::uint64_t step_seed(std::uint64_t seed, std::int64_t step) {
  return mix64(seed * 0x9e3779b97f4a7c15ULL + std::uint64_t(step));
}

// What evaluate() stages its batches in and reads its sums through: page-locked host memory on a
// GPU, whose allocation and release cost milliseconds and a wait for the device each. One kept
// across evaluations (fit keeps one for all of its own) allocates once.
template <Backend B>
struct EvalBuffers {
  HostStaging<B> images, targets;
  StepScalars<B> scalars{2};  // the batch's mean loss and its correct predictions
};

template <class M>
EvalResult evaluate(M& model, const data::Dataset& set, int batch, EvalBuffers<typename M::backend>& buffers) {
  using B = typename M::backend;
  data::Batcher batches(set, batch, false, 0);
  data::Batch b;
  Tensor<B> x, t;
  SoftTargetCrossEntropy<B> ce;
  // One wait per batch, as in fit: the loss and the correct predictions are read together (so
  // the staging is free again at the next batch). Without augmentation a batch's targets are its
  // labels one-hot (smoothed at most), so their argmax is the label.
  StepScalars<B>& scalars = buffers.scalars;
  double loss = 0;
  std::int64_t correct = 0;
  while (batches.next(b)) {
    buffers.images.upload(b.images.begin(), b.images.end(), x, {b.size, set.channels, set.height, set.width});
    buffers.targets.upload(b.targets.begin(), b.targets.end(), t, {b.size, set.classes});
    Context ctx;
    ctx.training = false;
    const auto& logits = model.forward(x, ctx);
    ce.forward_backward_into(logits, t, scalars, 0);
    scalars.argmax_matches(1, logits.data(), t.data(), b.size, set.classes);
    const auto& v = scalars.read();
    loss += v[0] * b.size;
    correct += std::int64_t(v[1]);
  }
  return {loss / set.n, double(correct) / set.n};
}
template <class M>
EvalResult evaluate(M& model, const data::Dataset& set, int batch) {
  EvalBuffers<typename M::backend> buffers;
  return evaluate(model, set, batch, buffers);
}

// What fit minimises. An objective maps the model's logits for a training batch to a loss and
// its gradient w.r.t. the logits:
//   double forward_backward(const Tensor<B>& logits, const Tensor<B>& targets, const Tensor<B>& images);
//   const Tensor<B>& grad() const;
// images is the (augmented) batch the logits came from, for objectives that run another model on
// it, such as a distillation teacher. The default is soft-target cross-entropy.
// An objective may also have
//   void forward_backward_into(logits, targets, images, StepScalars<B>& s, int slot);
// writing the loss into a step scalar (backend/async.hpp) instead of returning it; fit then
// need not wait for the device before the step's end. Without it fit calls forward_backward.
// An objective that needs more slots for its parts (the distiller's: a cross-entropy and two
// sums, StepScalars::combine'd into the loss) says how many with `static constexpr int
// scalar_slots = n;`: the slots slot .. slot + n - 1 are its own.
template <Backend B>
struct CrossEntropyObjective {
  SoftTargetCrossEntropy<B> ce;
  double forward_backward(const Tensor<B>& logits, const Tensor<B>& targets, const Tensor<B>&) {
    return ce.forward_backward(logits, targets);
  }
  void forward_backward_into(const Tensor<B>& logits, const Tensor<B>& targets, const Tensor<B>&, StepScalars<B>& s,
                             int slot) {
    ce.forward_backward_into(logits, targets, s, slot);
  }
  const Tensor<B>& grad() const { return ce.grad(); }
};

template <class M, class Objective>
FitResult fit(M& model, const data::Dataset& train, const data::Dataset& test, const FitOptions& o,
              Objective& objective);

template <class M>
FitResult fit(M& model, const data::Dataset& train, const data::Dataset& test, const FitOptions& o) {
  CrossEntropyObjective<typename M::backend> objective;
  return fit(model, train, test, o, objective);
}

namespace detail {
// The step scalars an objective writes (fit.hpp's objective contract above): 1 unless it says.
template <class Objective>
constexpr int objective_scalar_slots() {
  if constexpr (requires { Objective::scalar_slots; }) {
    static_assert(Objective::scalar_slots >= 1, "an objective's scalar_slots must be at least 1");
    return Objective::scalar_slots;
  } else {
    return 1;
  }
}
// Rows [lo, hi) of n for `rank` of `ranks`: contiguous shares that differ by at most one row.
inline std::pair<int, int> share(int n, int rank, int ranks) {
  return {int(std::int64_t(n) * rank / ranks), int(std::int64_t(n) * (rank + 1) / ranks)};
}
}  // namespace detail

// evaluate() of a data-parallel job: each rank evaluates its share of `set`, and the sums meet
// in one all-reduce. `share` is this rank's part of `set` (detail::share), made once by the caller.
template <class M>
EvalResult evaluate_shared(M& model, const data::Dataset& set, const data::Dataset& share, int batch,
                           Collective* c, EvalBuffers<typename M::backend>& buffers) {
  if (!c || c->size() == 1) return evaluate(model, set, batch, buffers);
  const EvalResult mine = share.n > 0 ? evaluate(model, share, batch, buffers) : EvalResult{};
  double sums[2] = {mine.loss * share.n, mine.accuracy * share.n};
  c->allreduce_sum(sums, 2);
  return set.n > 0 ? EvalResult{sums[0] / set.n, sums[1] / set.n} : EvalResult{};
}
template <class M>
EvalResult evaluate_shared(M& model, const data::Dataset& set, const data::Dataset& share, int batch,
                           Collective* c) {
  EvalBuffers<typename M::backend> buffers;
  return evaluate_shared(model, set, share, batch, c, buffers);
}

template <class M, class Objective>
FitResult fit(M& model, const data::Dataset& train, const data::Dataset& test, const FitOptions& o,
              Objective& objective) {
  using B = typename M::backend;
  using T = typename B::Scalar;
  Collective* const coll = o.collective && o.collective->size() > 1 ? o.collective.get() : nullptr;
  const int ranks = coll ? coll->size() : 1, rank = coll ? coll->rank() : 0;
  const bool writer = rank == 0;  // metrics, states, progress
  require(o.epochs >= 0 && o.batch > 0 && o.eval_every >= 1, "fit",
          "epochs must be >= 0, batch > 0 and eval_every >= 1");
  // One flat arena over the trainable parameters (names checked unique): zero-grad, clipping
  // and the AdamW step below are one pass each. Frozen parameters stay where they are; the
  // arena gives the model its own buffers back when fit returns.
  ParameterArena<B> arena(trainable_parameters(model));
  AdamW<B> opt(arena, {.weight_decay = o.weight_decay});
  data::Batcher batches(train, o.batch, true, o.seed, o.augment);
  const std::int64_t per_epoch = batches.batches_per_epoch();
  WarmupCosine schedule{o.lr, o.min_lr, o.warmup_lr, std::int64_t(o.warmup_epochs * per_epoch),
                        std::max<std::int64_t>(1, per_epoch * o.epochs)};
  require(train.n > 0, "fit", "the training set is empty");
  require(test.n == 0 || (test.channels == train.channels && test.height == train.height &&
                          test.width == train.width && test.classes == train.classes),
          test.source.empty() ? "fit" : test.source,
          "test images are " + data::shape_string(test) + ", the training images " + data::shape_string(train) +
              "; both sets must have the same image shape and classes");
  require(!o.ood || (o.ood->channels == train.channels && o.ood->height == train.height &&
                     o.ood->width == train.width && o.ood->classes == train.classes),
          "fit", "the out-of-distribution images are " + (o.ood ? data::shape_string(*o.ood) : std::string()) +
                     ", the training images " + data::shape_string(train) +
                     "; both sets must have the same image shape and classes");
  const auto state_file = o.out.empty() ? std::filesystem::path() : o.out / (o.phase + ".state.safetensors");
  if (!o.out.empty() && writer) {
    std::filesystem::create_directories(o.out);
    if (const int n = io::remove_stale_temporaries(o.out))
      std::fprintf(stderr, "%s: removed %d temporary file(s) left by killed runs in %s\n", o.phase.c_str(), n,
                   o.out.string().c_str());
  }

  const nlohmann::json recipe = fit_recipe(o, train, test);
  int first_epoch = 0;
  std::string run = detail::new_run_id();
  FitResult result;
  if (o.resume && !state_file.empty() && std::filesystem::exists(state_file)) {
    const std::string where = state_file.string();
    const auto meta = read_metadata(state_file);
    require(meta.count("recipe"), where,
            "has no recipe (written by an older hatch), so whether it belongs to this run is unknown; " +
                o.resume_hint);
    nlohmann::json saved;
    try {
      saved = nlohmann::json::parse(meta.at("recipe"));
    } catch (const nlohmann::json::exception& e) {
      throw Error(where + ": metadata 'recipe' is not valid JSON (" + e.what() + ")");
    }
    if (const auto diff = detail::recipe_difference(saved, recipe); !diff.empty())
      throw Error(where + ": a training state of another recipe is in the way (" + diff +
                  "); rerun with the state's settings to resume it, or " + o.resume_hint);
    const auto point = detail::resume_point(load_training_state(model, opt, state_file), where, o.epochs);
    first_epoch = point.epoch;
    result.seconds = point.seconds;
    result.images = point.images;
    if (!point.run.empty()) run = point.run;
    if (writer)
      std::fprintf(stderr, "%s: resuming after epoch %d of %d from %s%s\n", o.phase.c_str(), first_epoch, o.epochs,
                   where.c_str(), first_epoch == o.epochs ? " (already complete: evaluating only)" : "");
  }
  MetricsLog log(writer ? o.out : std::filesystem::path(), o.phase, first_epoch);
  std::vector<T> staging;
  data::Dataset test_share, ood_share;
  EvalBuffers<B> eval_buffers;  // every evaluation of this fit stages through the same buffers
  if (coll) {
    // One set of weights for every rank: rank 0's. (The optimizer's moments are zero, or read
    // from the one state file every rank resumed from.)
    if (arena.size() > 0) broadcast<B>(*coll, arena.values().data(), std::size_t(arena.size()), staging);
    const auto [lo, hi] = detail::share(test.n, rank, ranks);
    test_share = data::subset(test, lo, hi - lo);
    if (o.ood) {
      const auto [olo, ohi] = detail::share(o.ood->n, rank, ranks);
      ood_share = data::subset(*o.ood, olo, ohi - olo);
    }
  }
  auto evaluate_ood = [&] {
    if (o.ood) result.ood = evaluate_shared(model, *o.ood, ood_share, o.evaluation_batch(), coll, eval_buffers);
  };

  data::Batch b;
  Tensor<B> x, t;
  GradientPool<B> grads;  // the layers' backward buffers, shared (core/grad_pool.hpp)
  // The host waits for the backend once per step, and not for the step it has just queued: the
  // loss, the correct predictions and the gradient norm are reduced into step scalars, and step
  // i's are read after step i + 1 is queued (so the device has work while the host waits and
  // stages the next batch). Batches are uploaded from staging memory (pinned on a GPU) without
  // waiting. Two of each alternate: step i writes set i % 2, whose last user, step i - 2, has
  // been read by then (backend/async.hpp). In a data-parallel job each step's values are read at
  // once, for the all-reduce of the losses.
  enum Slot { kRight, kNormSq, kLoss };  // the objective's slots start at kLoss
  constexpr int kSlots = kLoss + detail::objective_scalar_slots<Objective>();
  std::array<StepScalars<B>, 2> sets{StepScalars<B>(kSlots), StepScalars<B>(kSlots)};
  HostStaging<B> stage_x[2], stage_t[2];
  struct Queued {  // a step whose values are yet to be read
    std::int64_t step;
    int size;
    double aux, lr_before;
  };
  for (int epoch = first_epoch; epoch < o.epochs; ++epoch) {
    const auto t0 = std::chrono::steady_clock::now();
    batches.start_epoch(epoch);
    ProgressBar bar(o.phase + " " + std::to_string(epoch + 1) + "/" + std::to_string(o.epochs), int(per_epoch),
                    o.progress && writer);
    double loss_sum = 0, aux_sum = 0, seen = 0, correct = 0, lr = 0;
    // Reads a queued step's values, stops the run on a non-finite loss, adds them to the epoch's.
    // The checks see a step's values after its update (and the next step) were queued; they stop
    // the run either way, and the state on disk is the last epoch's.
    auto finish = [&](const Queued& q) {
      const auto& v = sets[q.step % 2].values();
      const double loss = v[kLoss], aux = q.aux;
      const bool first = q.step == std::int64_t(first_epoch) * per_epoch;
      const std::int64_t index = q.step - std::int64_t(epoch) * per_epoch;  // in the epoch, from 0
      const std::string at = " at epoch " + std::to_string(epoch + 1) + ", step " + std::to_string(index + 1);
      if (!std::isfinite(loss) && first)
        throw Error(o.phase + ": the loss is " + std::to_string(loss) +
                    " at the first step, before any update: the model's weights or the data hold non-finite values");
      if (!std::isfinite(loss))
        throw Error(o.phase + ": training diverged: the loss is " + std::to_string(loss) + at + " (lr " +
                    std::to_string(q.lr_before) + "); lower --lr or set a gradient clip");
      if (!std::isfinite(aux))
        throw Error(o.phase + ": the auxiliary loss (the sum of the layers' aux_loss() terms) is " +
                    std::to_string(aux) + at +
                    (first ? std::string(", the first step, before any update: a layer's auxiliary term is not finite")
                           : " (lr " + std::to_string(q.lr_before) + "); lower --lr or set a gradient clip"));
      const double total = loss + aux;
      if (!std::isfinite(total))
        throw Error(o.phase + ": training diverged: the loss is " + std::to_string(loss) + " plus an auxiliary loss of " +
                    std::to_string(aux) + at + "; lower --lr or set a gradient clip");
      correct += double(std::int64_t(v[kRight]));
      loss_sum += total * q.size;
      aux_sum += aux * q.size;
      seen += q.size;
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      bar.update(int(index + 1), loss_sum / seen, correct / seen, seen / secs);
    };
    std::optional<Queued> queued;
    std::int64_t step = std::int64_t(epoch) * per_epoch;
    for (; batches.next(b); ++step) {
      // This rank's rows of the global batch (all of them in a single process).
      const auto [lo, hi] = detail::share(b.size, rank, ranks);
      const int rows = hi - lo;
      const std::size_t sample = train.sample_size(), classes = std::size_t(train.classes);
      StepScalars<B>& scalars = sets[step % 2];
      Context ctx;
      ctx.training = true;
      ctx.input_grad = false;
      ctx.seed = step_seed(o.seed + std::uint64_t(rank) * 0xd1b54a32d192ed03ULL, step);
      ctx.use(grads);
      opt.zero_grad();
      double aux = 0;
      if (rows > 0) {
        stage_x[step % 2].upload(b.images.begin() + std::ptrdiff_t(lo * sample),
                                 b.images.begin() + std::ptrdiff_t(hi * sample), x,
                                 {rows, train.channels, train.height, train.width});
        stage_t[step % 2].upload(b.targets.begin() + std::ptrdiff_t(lo * classes),
                                 b.targets.begin() + std::ptrdiff_t(hi * classes), t, {rows, train.classes});
        const auto& logits = model.forward(x, ctx);
        if constexpr (requires { objective.forward_backward_into(logits, t, x, scalars, int(kLoss)); })
          objective.forward_backward_into(logits, t, x, scalars, kLoss);
        else
          scalars.set(kLoss, objective.forward_backward(logits, t, x));
        aux = collect_aux_loss(model);  // the layers add its gradient in backward
        scalars.argmax_matches(kRight, logits.data(), t.data(), rows, train.classes);
        model.backward(objective.grad(), ctx);
        grads.release_all();
      } else {
        scalars.set(kLoss, 0);
        scalars.set(kRight, 0);
      }
      if (coll) {
        // The global batch's mean gradient: each rank's mean weighted by its share of the rows,
        // summed in one all-reduce; the losses and counts in a second, tiny one.
        if (rows != b.size) B::scale(arena.grads().data(), T(double(rows) / b.size), std::size_t(arena.size()));
        allreduce_sum<B>(*coll, arena.grads().data(), std::size_t(arena.size()), staging);
        const auto& mine = scalars.read();
        double sums[3] = {mine[kLoss] * rows, aux * rows, mine[kRight]};
        coll->allreduce_sum(sums, 3);
        scalars.set(kLoss, sums[0] / b.size);
        aux = sums[1] / b.size;
        scalars.set(kRight, sums[2]);
      }
      // Clipping reads the norm where it was reduced.
      const double lr_before = lr;
      if (o.clip > 0) {
        scalars.sum_squares(kNormSq, arena.grads().data(), std::size_t(arena.trainable_end()));
        scalars.clip_to_norm(arena.grads().data(), std::size_t(arena.trainable_end()), kNormSq, o.clip);
      }
      lr = schedule.at(o.lr_per_epoch ? std::int64_t(epoch) * per_epoch : step);
      opt.step(lr);
      scalars.fetch();
      if (queued) finish(*queued);  // the previous step, while this one runs
      queued = Queued{step, b.size, aux, lr_before};
      if (coll) {
        finish(*queued);
        queued.reset();
      }
    }
    if (queued) finish(*queued);
    const double train_secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    result.seconds += train_secs;
    result.images += seen;
    const bool evaluated = (epoch + 1) % o.eval_every == 0 || epoch + 1 == o.epochs;
    if (evaluated) result.test = evaluate_shared(model, test, test_share, o.evaluation_batch(), coll, eval_buffers);
    if (epoch + 1 == o.epochs) evaluate_ood();
    result.epochs = epoch + 1;
    char extra[128];
    if (evaluated) std::snprintf(extra, sizeof extra, "| test loss %.4f acc %.4f", result.test.loss, result.test.accuracy);
    else extra[0] = '\0';
    bar.finish(loss_sum / seen, correct / seen, seen / train_secs, extra);
    nlohmann::json line{{"phase", o.phase}, {"run", run}, {"epoch", epoch + 1}, {"train_loss", loss_sum / seen},
                        {"aux_loss", aux_sum / seen},
                        {"train_accuracy", correct / seen}, {"lr", lr}, {"images_per_second", seen / train_secs},
                        {"seconds", result.seconds}, {"total_seconds", o.seconds_before + result.seconds},
                        {"images", o.images_before + result.images}};
    if (evaluated) {
      line["test_loss"] = result.test.loss;
      line["test_accuracy"] = result.test.accuracy;
    }
    if (epoch + 1 == o.epochs && result.ood) {
      line["ood_loss"] = result.ood->loss;
      line["ood_accuracy"] = result.ood->accuracy;
    }
    // Expert layers, in model order: each expert's share of the epoch's routed tokens, and the
    // share of choices dropped for capacity.
    // NAC propagators, in model order: the epoch's mean fraction of kernel pairs kept.
    nlohmann::json load = nlohmann::json::array(), dropped = nlohmann::json::array(), kept = nlohmann::json::array();
    if constexpr (requires { model.for_each_layer([](auto&) {}); })
    model.for_each_layer([&](auto& l) {
      if constexpr (HasExpertLoad<std::remove_cvref_t<decltype(l)>>) {
        const ExpertLoad e = l.take_expert_load();
        load.push_back(e.load);
        dropped.push_back(e.dropped);
      }
      if constexpr (HasKeptFraction<std::remove_cvref_t<decltype(l)>>) kept.push_back(l.take_kept_fraction());
    });
    if (!kept.empty()) line["kept_fraction"] = kept;
    if (!load.empty()) {
      line["expert_load"] = load;
      line["dropped_fraction"] = dropped;
    }
    log.write(line);
    if (!state_file.empty() && writer)
      save_training_state(model, opt, state_file,
                          {{"epoch", epoch + 1}, {"seconds", result.seconds}, {"images", result.images},
                           {"phase", o.phase}, {"run", run}},
                          {{"recipe", recipe.dump()}});
    if (o.on_epoch_end) o.on_epoch_end(epoch + 1, result.test);
  }
  if (result.epochs == 0 || first_epoch == o.epochs) {
    result.test = evaluate_shared(model, test, test_share, o.evaluation_batch(), coll, eval_buffers);
    evaluate_ood();
    result.epochs = o.epochs;
  }
  return result;
}

}  // namespace hatch
