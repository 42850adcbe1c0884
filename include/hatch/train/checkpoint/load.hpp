#pragma once
// Loading (part of hatch/train/checkpoint.hpp): the two phases every load shares -- validate the
// whole file into host buffers (prepare), then upload (commit) -- and load_parameters,
// load_stage and load_stages on top of them. A file that fails any check leaves the model
// untouched.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "hatch/core/error.hpp"
#include "hatch/io/safetensors.hpp"
#include "hatch/train/checkpoint/metadata.hpp"
#include "hatch/train/checkpoint/slots.hpp"

namespace hatch {

struct LoadOptions {
  // Tensors in the file that the model does not have are ignored instead of rejected
  // (e.g. loading only the parameters of a training-state file).
  bool allow_extra = false;
  // A model's shared tables (Parameter::shared: NAC's codes and signatures) that the file does
  // not hold keep their values instead of being reported missing: modules distilled or
  // incubated without the tables assemble into a model whose tables start fresh.
  bool keep_missing_shared = false;
  // Metadata the file must carry with exactly these values (e.g. {"preset", "vit-small"});
  // checked before anything else, with expect_metadata's message.
  std::map<std::string, std::string> require_metadata;
};

// ---- the two phases shared by every load: validate into host buffers, then upload -------------
namespace detail {

template <Backend B>
struct PendingUpload {
  Tensor<B>* tensor;
  std::vector<typename B::Scalar> host;
};

// The first few entries, then how many more.
inline std::string name_list(const std::vector<std::string>& names, std::size_t shown = 5) {
  std::string s;
  for (std::size_t i = 0; i < names.size() && i < shown; ++i) s += (i ? ", " : "") + names[i];
  if (names.size() > shown) s += ", ... (" + std::to_string(names.size() - shown) + " more)";
  return s;
}

// Metadata checks common to every load: a hatch format this version reads, and what the
// caller requires.
inline void check_file_metadata(const io::SafeTensorsFile& f, const LoadOptions& opt) {
  const auto meta = metadata_of(f);
  if (auto it = meta.find("format"); it != meta.end() && it->second.starts_with("hatch-"))
    require(it->second == kCheckpointFormat, f.source(),
            "format '" + it->second + "' is not one this hatch reads, expected '" + kCheckpointFormat + "'");
  for (const auto& [k, v] : opt.require_metadata) expect_metadata_in(f.source(), meta, k, v);
}

// Validates that `slots` are all in the file with their exact shapes and dtype F32/F64, and
// (unless allow_extra) that the file has nothing else, converting into host buffers. Touches
// no slot.
template <Backend B>
std::vector<PendingUpload<B>> prepare(const io::SafeTensorsFile& f, const std::vector<TensorSlot<B>>& slots,
                                      const LoadOptions& opt) {
  check_scalar<B>();
  check_file_metadata(f, opt);
  const auto meta = metadata_of(f);
  const std::string written_for =
      meta.count("preset") ? " (the file was written for preset '" + meta.at("preset") + "')" : std::string();

  std::vector<std::string> missing;
  std::set<std::string> expected;
  auto kept = [&](const TensorSlot<B>& s) { return opt.keep_missing_shared && s.shared && !f.contains(s.name); };
  for (const auto& s : slots) {
    expected.insert(s.name);
    if (!f.contains(s.name) && !kept(s)) missing.push_back("'" + s.name + "' " + s.tensor->shape().str());
  }
  if (!missing.empty())
    throw Error(f.source() + ": missing " + std::to_string(missing.size()) + " of the " +
                std::to_string(slots.size()) + " tensors the model expects: " + name_list(missing) + written_for);

  std::vector<PendingUpload<B>> out;
  out.reserve(slots.size());
  for (const auto& s : slots) {
    if (kept(s)) continue;
    const auto shape = s.tensor->shape().vec();
    try {
      if constexpr (std::is_same_v<typename B::Scalar, float>) out.push_back({s.tensor, f.to_float(s.name, shape)});
      else out.push_back({s.tensor, f.to_double(s.name, shape)});
    } catch (const Error& e) {
      throw Error(std::string(e.what()) + written_for);
    }
    const auto& h = out.back().host;
    if (auto bad = std::find_if(h.begin(), h.end(), [](auto v) { return !std::isfinite(v); }); bad != h.end())
      throw Error(f.source() + ": tensor '" + s.name + "' holds a non-finite value (" + std::to_string(*bad) +
                  " at flat index " + std::to_string(bad - h.begin()) +
                  "); a checkpoint must hold finite numbers: retrain or restore it from a good copy");
  }

  if (!opt.allow_extra) {
    std::vector<std::string> extra;
    for (const auto& n : f.names())
      if (!expected.count(n)) extra.push_back("'" + n + "'");
    if (!extra.empty()) {
      std::string hint = " (LoadOptions{.allow_extra = true} ignores them";
      if (meta.count("content") && meta.at("content") == "training-state")
        hint += "; this file is a training state, which also holds the optimizer's moments";
      throw Error(f.source() + ": " + std::to_string(extra.size()) + " unexpected tensor" +
                  (extra.size() == 1 ? "" : "s") + " that the model does not have: " + name_list(extra) + hint + ")");
    }
  }
  return out;
}

template <Backend B>
void commit(std::vector<PendingUpload<B>>& pending) {
  for (auto& p : pending) p.tensor->from_host(p.host);
}

}  // namespace detail

// ---- whole models ----------------------------------------------------------------------------

// Loads every parameter of `model` from `file`; see LoadOptions. Validates the whole file
// before changing anything: on a hatch::Error the model is untouched.
template <class M>
void load_parameters(M& model, const std::filesystem::path& file, const LoadOptions& options = {}) {
  const auto f = io::SafeTensorsFile::read(file);
  auto pending = detail::prepare(f, detail::parameter_slots(model), options);
  detail::commit(pending);
}

// ---- stages: one file per stage, named by global timm names (blocks.5.* stays blocks.5.*) ------

// Loads stage I from a file. A file that says it holds another stage ("stage" metadata) is
// rejected; a file without that entry (a module saved by save_parameters) is accepted when
// its names and shapes fit.
template <std::size_t I, class M>
  requires requires { M::num_stages; }
void load_stage(M& model, const std::filesystem::path& file, const LoadOptions& options = {}) {
  static_assert(I < M::num_stages, "hatch::load_stage: the stage index is past the last stage");
  const auto f = io::SafeTensorsFile::read(file);
  if (f.metadata().contains("stage")) expect_metadata(f, "stage", std::to_string(I));
  auto pending = detail::prepare(f, detail::parameter_slots(model.template stage<I>()), options);
  detail::commit(pending);
}
template <class M>
  requires requires { M::num_stages; }
void load_stage(M& model, std::size_t i, const std::filesystem::path& file, const LoadOptions& options = {}) {
  detail::check_stage_index(model, i, file.string());
  const auto f = io::SafeTensorsFile::read(file);
  if (f.metadata().contains("stage")) expect_metadata(f, "stage", std::to_string(i));
  model.with_stage(i, [&](auto& s) {
    auto pending = detail::prepare(f, detail::parameter_slots(s), options);
    detail::commit(pending);
  });
}

// Assembles a model from stage_file(dir, 0 .. K-1). Every file is read and validated before
// any stage is changed.
template <class M>
  requires requires { M::num_stages; }
void load_stages(M& model, const std::filesystem::path& dir, const LoadOptions& options = {}) {
  using B = typename M::backend;
  std::vector<std::vector<detail::PendingUpload<B>>> pending;
  model.for_each_stage([&](auto& s, std::size_t i) {
    const auto f = io::SafeTensorsFile::read(stage_file(dir, i));
    if (f.metadata().contains("stage")) expect_metadata(f, "stage", std::to_string(i));
    pending.push_back(detail::prepare(f, detail::parameter_slots(s), options));
  });
  for (auto& p : pending) detail::commit(p);
}

}  // namespace hatch
