#pragma once
// Checkpoint files' metadata (part of hatch/train/checkpoint.hpp, which includes it): the format
// tag, a ViT's configuration for PyTorch, stage file names, file fingerprints, and reading and
// checking the "__metadata__" of a file without reading its tensors.
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <zlib.h>

#include "hatch/core/error.hpp"
#include "hatch/io/safetensors.hpp"
#include "hatch/models/vit.hpp"

namespace hatch {

// The "format" metadata entry of every file hatch writes.
inline constexpr const char* kCheckpointFormat = "hatch-1";

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

}  // namespace hatch
