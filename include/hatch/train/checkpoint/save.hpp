#pragma once
// Saving (part of hatch/train/checkpoint.hpp): save_parameters, save_stage and save_stages.
// Every tensor is downloaded (Tensor::to_host) and the file written atomically (temporary file,
// fsync, rename), so a run killed mid-save keeps the previous file.
#include <cstddef>
#include <filesystem>
#include <map>
#include <span>
#include <string>

#include "hatch/core/error.hpp"
#include "hatch/io/safetensors.hpp"
#include "hatch/train/checkpoint/metadata.hpp"
#include "hatch/train/checkpoint/slots.hpp"

namespace hatch {

namespace detail {

template <Backend B>
void add_tensor(io::SafeTensorsWriter& w, const std::string& name, const Tensor<B>& t) {
  check_scalar<B>();
  const auto h = t.to_host();
  w.add(name, t.shape().vec(), std::span<const typename B::Scalar>(h));
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

// ---- whole models ----------------------------------------------------------------------------

// Every parameter under its timm name, PyTorch shape, F32 (F64 for double backends), with
// metadata {"format": "hatch-1", "content": "parameters"} plus the caller's (e.g. "preset",
// "phase", and vit_metadata<V>() for PyTorch). Atomic.
template <class M>
void save_parameters(M& model, const std::filesystem::path& file,
                     const std::map<std::string, std::string>& metadata = {}) {
  detail::save_module(model, file, metadata, {{"content", "parameters"}});
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

// Every stage to stage_file(dir, i); the directory must exist. Each file is written atomically
// (a crash between files can leave a mix of old and new stage files).
template <class M>
  requires requires { M::num_stages; }
void save_stages(M& model, const std::filesystem::path& dir, const std::map<std::string, std::string>& metadata = {}) {
  for (std::size_t i = 0; i < M::num_stages; ++i) save_stage(model, i, stage_file(dir, i), metadata);
}

}  // namespace hatch
