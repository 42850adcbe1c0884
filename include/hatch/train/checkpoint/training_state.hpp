#pragma once
// Training states, for resuming (part of hatch/train/checkpoint.hpp): the model's parameters and
// the optimizer's state (its visit_state slots) in one file, with the loop's own state as
// metadata.
#include <cstdint>
#include <exception>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "hatch/core/error.hpp"
#include "hatch/io/safetensors.hpp"
#include "hatch/train/checkpoint/load.hpp"
#include "hatch/train/checkpoint/save.hpp"

namespace hatch {

namespace detail {

template <class Opt, Backend B>
void add_optimizer_slots(Opt& opt, std::vector<TensorSlot<B>>& out) {
  opt.visit_state([&](const std::string& name, Tensor<B>& t) { out.push_back({name, &t}); });
}

}  // namespace detail

// ---- training state, for resuming ------------------------------------------------------------

// One file with the model's parameters, the optimizer's state under its visit_state names
// (AdamW: exp_avg.<name>, exp_avg_sq.<name>; Sgd: momentum.<name>) and metadata
// {"format", "content": "training-state", "state": state.dump(), "optimizer_steps"} plus the
// caller's. `state` is the loop's own: epoch, step, seed, best accuracy, ... Atomic, so a run
// killed while saving resumes from the previous state.
template <class M, class Opt>
void save_training_state(M& model, Opt& optimizer, const std::filesystem::path& file, const nlohmann::json& state,
                         const std::map<std::string, std::string>& metadata = {}) {
  using B = typename M::backend;
  io::SafeTensorsWriter w;
  for (const auto& s : detail::parameter_slots(model)) detail::add_tensor(w, s.name, *s.tensor);
  optimizer.visit_state([&](const std::string& name, Tensor<B>& t) { detail::add_tensor(w, name, t); });
  std::map<std::string, std::string> owned = {
      {"format", kCheckpointFormat}, {"content", "training-state"}, {"state", state.dump()}};
  if constexpr (requires { optimizer.steps(); }) owned["optimizer_steps"] = std::to_string(optimizer.steps());
  detail::set_metadata(w, file, metadata, owned);
  w.write(file);
}

// Restores what save_training_state wrote into `model` and `optimizer` (built over the same
// parameters) and returns the loop's state. Everything is validated first; on a hatch::Error
// neither the model nor the optimizer has changed.
template <class M, class Opt>
nlohmann::json load_training_state(M& model, Opt& optimizer, const std::filesystem::path& file,
                                   const LoadOptions& options = {}) {
  using B = typename M::backend;
  const auto f = io::SafeTensorsFile::read(file);
  const auto meta = detail::metadata_of(f);
  const std::string where = f.source();
  require(meta.count("state"), where, "has no 'state' metadata, expected a training state written by save_training_state");
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(meta.at("state"));
  } catch (const nlohmann::json::exception& e) {
    throw Error(where + ": metadata 'state' is not valid JSON (" + e.what() + ")");
  }
  std::int64_t steps = 0;
  if constexpr (requires { optimizer.steps(); }) {
    require(meta.count("optimizer_steps"), where, "has no 'optimizer_steps' metadata");
    const std::string& s = meta.at("optimizer_steps");
    std::size_t used = 0;
    try {
      steps = std::stoll(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    require(!s.empty() && used == s.size() && steps >= 0, where,
            "metadata 'optimizer_steps' is '" + s + "', expected a non-negative integer");
  }
  auto slots = detail::parameter_slots(model);
  detail::add_optimizer_slots<Opt, B>(optimizer, slots);
  auto pending = detail::prepare(f, slots, options);
  detail::commit(pending);
  if constexpr (requires { optimizer.steps(); }) optimizer.steps() = steps;
  return state;
}

}  // namespace hatch
