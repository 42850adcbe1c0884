#pragma once
// Checkpoints: a model's parameters (or one stage's, or parameters + optimizer state for
// resuming) in a safetensors file under their timm names, so a checkpoint moves between hatch
// and PyTorch (tests/fixtures/torch_interop.py loads one with strict=True). See
// docs/checkpoints.md.
//
// Saving downloads every tensor (Tensor::to_host) and writes the file atomically (temporary
// file, fsync, rename: SafeTensorsWriter::write), so a run killed mid-save keeps the previous
// checkpoint. Loading validates the whole file first -- every expected tensor present with
// exactly its shape, no unexpected ones, the metadata asked for -- into host buffers, and only
// then uploads; a file that fails any check leaves the model (and optimizer) untouched.
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <zlib.h>

#include "hatch/core/error.hpp"
#include "hatch/core/parameter.hpp"
#include "hatch/io/safetensors.hpp"
#include "hatch/models/vit.hpp"

namespace hatch {

// The "format" metadata entry of every file hatch writes.
inline constexpr const char* kCheckpointFormat = "hatch-1";

struct LoadOptions {
  // Tensors in the file that the model does not have are ignored instead of rejected
  // (e.g. loading only the parameters of a training-state file).
  bool allow_extra = false;
  // Metadata the file must carry with exactly these values (e.g. {"preset", "vit-small"});
  // checked before anything else, with expect_metadata's message.
  std::map<std::string, std::string> require_metadata;
};

// The JSON metadata keys of a ViT's configuration, the ones torch_interop.py builds its model
// from: image, channels, patch, dim, heads, mlp_ratio, classes, depth, depths ("1,1,1,1"),
// qkv_bias ("true"/"false"), ln_eps. V is the spec (presets::VitMicro, Vit<...>).
template <class V>
std::map<std::string, std::string> vit_metadata() {
  constexpr VitSpec s = V::spec;
  std::string depths;
  for (int i = 0; i < V::depths::count; ++i) depths += (i ? "," : "") + std::to_string(V::depths::values[i]);
  return {{"image", std::to_string(s.image)},
          {"channels", std::to_string(s.channels)},
          {"patch", std::to_string(s.patch)},
          {"dim", std::to_string(s.dim)},
          {"heads", std::to_string(s.heads)},
          {"mlp_ratio", std::to_string(s.mlp_ratio)},
          {"classes", std::to_string(s.classes)},
          {"depth", std::to_string(V::depths::total)},
          {"depths", depths},
          {"qkv_bias", s.qkv_bias ? "true" : "false"},
          {"ln_eps", "1e-06"}};
}

// The file of stage i in a checkpoint directory: dir/"stage<i>.safetensors".
inline std::filesystem::path stage_file(const std::filesystem::path& dir, std::size_t i) {
  return dir / ("stage" + std::to_string(i) + ".safetensors");
}

// A short fingerprint of a file's bytes (CRC-32, hex): ties a training state or a phase's
// output to the files it was made from.
inline std::string file_fingerprint(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  require(bool(in), file.string(), std::string("cannot open for reading (") + std::strerror(errno) + ")");
  std::vector<char> buf(1 << 16);
  uLong crc = crc32(0L, Z_NULL, 0);
  while (in) {
    in.read(buf.data(), std::streamsize(buf.size()));
    crc = crc32(crc, reinterpret_cast<const Bytef*>(buf.data()), uInt(in.gcount()));
  }
  char hex[16];
  std::snprintf(hex, sizeof hex, "%08lx", static_cast<unsigned long>(crc));
  return hex;
}

// ---- metadata --------------------------------------------------------------------------------

// The "__metadata__" map of a file, reading only its header (the tensors are not read or
// validated). Throws hatch::Error("<file>: ...") on a file that is not safetensors.
inline std::map<std::string, std::string> read_metadata(const std::filesystem::path& file) {
  const std::string where = file.string();
  std::ifstream in(file, std::ios::binary | std::ios::ate);
  require(static_cast<bool>(in), where, std::string("cannot open for reading (") + std::strerror(errno) + ")");
  const auto size = static_cast<std::uint64_t>(in.tellg());
  require(size >= 8, where,
          "file is " + std::to_string(size) + " bytes, expected at least 8 (the header length) for a safetensors file");
  in.seekg(0);
  std::uint64_t header_len = 0;
  in.read(reinterpret_cast<char*>(&header_len), 8);
  require(header_len <= io::detail::max_header_bytes && header_len <= size - 8, where,
          "header length " + std::to_string(header_len) + " is larger than the " + std::to_string(size - 8) +
              " bytes that follow it (or the limit)");
  std::string text(static_cast<std::size_t>(header_len), '\0');
  in.read(text.data(), static_cast<std::streamsize>(header_len));
  require(static_cast<bool>(in), where, "read error in the header");
  require(io::detail::json_depth(text) <= io::detail::max_json_depth, where, "header JSON nests too deeply");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error(where + ": header is not valid JSON (" + e.what() + ")");
  }
  require(header.is_object(), where, "header must be a JSON object");
  std::map<std::string, std::string> out;
  if (auto it = header.find("__metadata__"); it != header.end()) {
    require(it->is_object(), where, "__metadata__ must be an object of strings");
    for (const auto& [k, v] : it->items()) {
      require(v.is_string(), where, "__metadata__ value for '" + k + "' must be a string");
      out[k] = v.get<std::string>();
    }
  }
  return out;
}

namespace detail {
inline void expect_metadata_in(const std::string& where, const std::map<std::string, std::string>& meta,
                               const std::string& key, const std::string& value) {
  auto it = meta.find(key);
  require(it != meta.end(), where, "has no '" + key + "' metadata, expected " + key + " '" + value + "'");
  require(it->second == value, where, "was written for " + key + " '" + it->second + "', expected '" + value + "'");
}
inline std::map<std::string, std::string> metadata_of(const io::SafeTensorsFile& f) {
  std::map<std::string, std::string> out;
  for (const auto& [k, v] : f.metadata().items()) out[k] = v.get<std::string>();
  return out;
}
}  // namespace detail

// Throws hatch::Error("<file>: was written for preset 'vit-tiny', expected 'vit-small'") when
// the file's metadata `key` is not `value` (or "<file>: has no 'preset' metadata, ..." when
// it is absent).
inline void expect_metadata(const std::filesystem::path& file, const std::string& key, const std::string& value) {
  detail::expect_metadata_in(file.string(), read_metadata(file), key, value);
}
inline void expect_metadata(const io::SafeTensorsFile& file, const std::string& key, const std::string& value) {
  detail::expect_metadata_in(file.source(), detail::metadata_of(file), key, value);
}

// ---- the two phases shared by every load: validate into host buffers, then upload -------------
namespace detail {

template <Backend B>
struct TensorSlot {
  std::string name;
  Tensor<B>* tensor;
};

template <Backend B>
struct PendingUpload {
  Tensor<B>* tensor;
  std::vector<typename B::Scalar> host;
};

// Every parameter once, under the first name visit gives it: a parameter shared by several
// layers (tied weights, NAC's codes) is one tensor in the file, as it is one slice in the arena.
template <class M, class F>
void visit_unique(M& model, F&& f) {
  using B = typename M::backend;
  std::vector<const Parameter<B>*> seen;
  model.visit(
      [&](const std::string& name, Parameter<B>& p) {
        if (std::find(seen.begin(), seen.end(), &p) != seen.end()) return;
        seen.push_back(&p);
        f(name, p);
      },
      "");
}

template <class M>
std::vector<TensorSlot<typename M::backend>> parameter_slots(M& model) {
  using B = typename M::backend;
  std::vector<TensorSlot<B>> out;
  visit_unique(model, [&](const std::string& name, Parameter<B>& p) { out.push_back({name, &p.value}); });
  return out;
}

template <class Opt, Backend B>
void add_optimizer_slots(Opt& opt, std::vector<TensorSlot<B>>& out) {
  opt.visit_state([&](const std::string& name, Tensor<B>& t) { out.push_back({name, &t}); });
}

template <Backend B>
constexpr void check_scalar() {
  static_assert(std::is_same_v<typename B::Scalar, float> || std::is_same_v<typename B::Scalar, double>,
                "hatch checkpoints store float (F32) and double (F64) backends only");
}

template <Backend B>
void add_tensor(io::SafeTensorsWriter& w, const std::string& name, const Tensor<B>& t) {
  check_scalar<B>();
  const auto h = t.to_host();
  w.add(name, t.shape().vec(), std::span<const typename B::Scalar>(h));
}

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
  for (const auto& s : slots) {
    expected.insert(s.name);
    if (!f.contains(s.name)) missing.push_back("'" + s.name + "' " + s.tensor->shape().str());
  }
  if (!missing.empty())
    throw Error(f.source() + ": missing " + std::to_string(missing.size()) + " of the " +
                std::to_string(slots.size()) + " tensors the model expects: " + name_list(missing) + written_for);

  std::vector<PendingUpload<B>> out;
  out.reserve(slots.size());
  for (const auto& s : slots) {
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

// The caller's metadata plus the entries hatch owns; a caller's entry may repeat an owned one
// but not contradict it.
inline void set_metadata(io::SafeTensorsWriter& w, const std::filesystem::path& file,
                         const std::map<std::string, std::string>& caller,
                         const std::map<std::string, std::string>& owned) {
  for (const auto& [k, v] : owned)
    if (auto it = caller.find(k); it != caller.end())
      require(it->second == v, file.string(),
              "metadata '" + k + "' is written by hatch as '" + v + "', the caller gave '" + it->second + "'");
  for (const auto& [k, v] : caller) w.set_metadata(k, v);
  for (const auto& [k, v] : owned) w.set_metadata(k, v);
}

template <class M>
void check_stage_index(M&, std::size_t i, const std::string& where) {
  require(i < M::num_stages, where,
          "stage " + std::to_string(i) + " does not exist, the model has " + std::to_string(M::num_stages) +
              " stages");
}

template <class M>
void save_module(M& layer, const std::filesystem::path& file, const std::map<std::string, std::string>& metadata,
                 std::map<std::string, std::string> owned) {
  using B = typename M::backend;
  io::SafeTensorsWriter w;
  visit_unique(layer, [&](const std::string& name, Parameter<B>& p) { add_tensor(w, name, p.value); });
  owned["format"] = kCheckpointFormat;
  set_metadata(w, file, metadata, owned);
  w.write(file);
}

}  // namespace detail

// ---- whole models ----------------------------------------------------------------------------

// Every parameter under its timm name, PyTorch shape, F32 (F64 for double backends), with
// metadata {"format": "hatch-1", "content": "parameters"} plus the caller's (e.g. "preset",
// "phase", and vit_metadata<V>() for PyTorch). Atomic.
template <class M>
void save_parameters(M& model, const std::filesystem::path& file,
                     const std::map<std::string, std::string>& metadata = {}) {
  detail::save_module(model, file, metadata, {{"content", "parameters"}});
}

// Loads every parameter of `model` from `file`; see LoadOptions. Validates the whole file
// before changing anything: on a hatch::Error the model is untouched.
template <class M>
void load_parameters(M& model, const std::filesystem::path& file, const LoadOptions& options = {}) {
  const auto f = io::SafeTensorsFile::read(file);
  auto pending = detail::prepare(f, detail::parameter_slots(model), options);
  detail::commit(pending);
}

// ---- stages: one file per stage, named by global timm names (blocks.5.* stays blocks.5.*) ------

// Stage I's parameters, with metadata "stage": I and "stages": the model's stage count.
template <std::size_t I, class M>
  requires requires { M::num_stages; }
void save_stage(M& model, const std::filesystem::path& file, const std::map<std::string, std::string>& metadata = {}) {
  static_assert(I < M::num_stages, "hatch::save_stage: the stage index is past the last stage");
  detail::save_module(model.template stage<I>(), file, metadata,
                      {{"content", "stage"}, {"stage", std::to_string(I)}, {"stages", std::to_string(M::num_stages)}});
}
template <class M>
  requires requires { M::num_stages; }
void save_stage(M& model, std::size_t i, const std::filesystem::path& file,
                const std::map<std::string, std::string>& metadata = {}) {
  detail::check_stage_index(model, i, file.string());
  model.with_stage(i, [&](auto& s) {
    detail::save_module(s, file, metadata,
                        {{"content", "stage"}, {"stage", std::to_string(i)}, {"stages", std::to_string(M::num_stages)}});
  });
}

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

// Every stage to stage_file(dir, i); the directory must exist. Each file is written atomically
// (a crash between files can leave a mix of old and new stage files).
template <class M>
  requires requires { M::num_stages; }
void save_stages(M& model, const std::filesystem::path& dir, const std::map<std::string, std::string>& metadata = {}) {
  for (std::size_t i = 0; i < M::num_stages; ++i) save_stage(model, i, stage_file(dir, i), metadata);
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
