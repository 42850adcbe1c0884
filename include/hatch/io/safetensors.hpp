#pragma once
// Reading and writing safetensors files (https://github.com/huggingface/safetensors), the
// checkpoint format shared with PyTorch/timm. Layout: an 8-byte little-endian header length
// N, N bytes of JSON header, then the raw little-endian tensor data. The header maps each
// tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the
// start of the data) plus an optional "__metadata__" map of string -> string.
//
// Host-only and independent of the backends: a backend copies the bytes into its own tensors.
// A file is a boundary, so parse() validates every field and every error is a hatch::Error
// whose message starts with the file name and says what was expected.
#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "hatch/core/error.hpp"
#include "hatch/io/atomic_file.hpp"

namespace hatch::io {

// The format stores little-endian data; hatch copies it verbatim, which is only right on a
// little-endian host (every machine hatch targets).
static_assert(std::endian::native == std::endian::little,
              "hatch::io::safetensors assumes a little-endian host");

// The element types hatch reads and writes; other safetensors dtypes (F16, BF16, I32, ...)
// are rejected with a message naming them, rather than silently converted.
enum class DType { F32, F64, I64 };

inline constexpr std::string_view dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::I64: return "I64";
  }
  return "?";
}

inline constexpr std::size_t dtype_size(DType d) {
  switch (d) {
    case DType::F32: return 4;
    case DType::F64: return 8;
    case DType::I64: return 8;
  }
  return 0;
}

// Returns false for names hatch does not support (including valid safetensors ones).
inline bool parse_dtype(std::string_view s, DType& out) {
  for (DType d : {DType::F32, DType::F64, DType::I64})
    if (s == dtype_name(d)) {
      out = d;
      return true;
    }
  return false;
}

struct TensorRecord {
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;   // [] is a scalar (one element)
  std::vector<std::uint8_t> bytes;   // little-endian, row-major, shape product * itemsize
};

namespace detail {

inline std::string shape_string(std::span<const std::int64_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// The reference implementation's limit; it keeps a hostile length from allocating gigabytes.
inline constexpr std::uint64_t max_header_bytes = 100'000'000;

// A valid header nests three levels deep (header -> tensor -> shape). Bounding the depth
// before handing the text to the JSON parser keeps a hostile "[[[[..." from costing memory
// and time proportional to its depth.
inline constexpr int max_json_depth = 16;

inline int json_depth(std::string_view text) {
  int depth = 0, max_depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    else if (c == '{' || c == '[') max_depth = std::max(max_depth, ++depth);
    else if (c == '}' || c == ']') --depth;
  }
  return max_depth;
}

// Element count of a shape, or false on a negative dimension or overflow past `limit`.
inline bool element_count(std::span<const std::int64_t> shape, std::uint64_t limit,
                          std::uint64_t& count) {
  count = 1;
  for (std::int64_t d : shape) {
    if (d < 0) return false;
    auto ud = static_cast<std::uint64_t>(d);
    if (ud != 0 && count > limit / ud) return false;
    count *= ud;
  }
  return true;
}

}  // namespace detail

class SafeTensorsFile {
 public:
  // Reads and validates a whole file. Throws hatch::Error("<path>: ...").
  static SafeTensorsFile read(const std::filesystem::path& path) {
    const std::string where = path.string();
    std::ifstream in(path, std::ios::binary);
    require(static_cast<bool>(in), where,
            std::string("cannot open for reading (") + std::strerror(errno) + ")");
    std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                                    std::istreambuf_iterator<char>());
    require(!in.bad(), where, "read error");
    return parse(bytes.data(), bytes.size(), where);
  }

  // Validates an in-memory file; `name` prefixes every error message. The fuzzer's entry.
  static SafeTensorsFile parse(const std::uint8_t* bytes, std::size_t n, const std::string& name) {
    SafeTensorsFile f;
    f.source_ = name;
    require(n >= 8, name,
            "file is " + std::to_string(n) +
                " bytes, expected at least 8 (the header length) for a safetensors file");
    std::uint64_t header_len = 0;
    std::memcpy(&header_len, bytes, 8);
    require(header_len <= detail::max_header_bytes, name,
            "header length " + std::to_string(header_len) + " exceeds the limit of " +
                std::to_string(detail::max_header_bytes) + " bytes");
    require(header_len <= n - 8, name,
            "header length " + std::to_string(header_len) + " is larger than the " +
                std::to_string(n - 8) + " bytes that follow it");
    require(header_len >= 2, name, "header length " + std::to_string(header_len) +
                                       ", expected a JSON object of at least 2 bytes");

    const std::string_view text(reinterpret_cast<const char*>(bytes) + 8, header_len);
    require(detail::json_depth(text) <= detail::max_json_depth, name,
            "header JSON nests deeper than " + std::to_string(detail::max_json_depth) +
                " levels, expected {name: {dtype, shape, data_offsets}}");
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      throw Error(name + ": header is not valid JSON (" + e.what() + ")");
    }
    require(header.is_object(), name, "header must be a JSON object, got " +
                                          std::string(header.type_name()));

    const std::uint8_t* data = bytes + 8 + header_len;
    const std::uint64_t data_len = n - 8 - header_len;

    struct Span {
      std::uint64_t begin, end;
      const std::string* name;
    };
    std::vector<Span> spans;
    f.metadata_ = nlohmann::json::object();

    for (const auto& [key, entry] : header.items()) {
      if (key == "__metadata__") {
        require(entry.is_object(), name, "__metadata__ must be an object of strings");
        for (const auto& [mk, mv] : entry.items())
          require(mv.is_string(), name,
                  "__metadata__ value for '" + mk + "' must be a string, got " +
                      std::string(mv.type_name()));
        f.metadata_ = entry;
        continue;
      }
      const std::string where = name + ": tensor '" + key + "'";
      require(entry.is_object(), where, "expected an object {dtype, shape, data_offsets}");

      auto dt = entry.find("dtype");
      require(dt != entry.end(), where, "missing 'dtype'");
      require(dt->is_string(), where, "'dtype' must be a string");
      TensorRecord rec;
      require(parse_dtype(dt->get_ref<const std::string&>(), rec.dtype), where,
              "unsupported dtype '" + dt->get<std::string>() + "', expected F32, F64 or I64");

      auto sh = entry.find("shape");
      require(sh != entry.end(), where, "missing 'shape'");
      require(sh->is_array(), where, "'shape' must be an array of non-negative integers");
      for (const auto& d : *sh) {
        require(d.is_number_integer(), where, "'shape' must be an array of non-negative integers");
        require(d.is_number_unsigned(), where,
                "negative dimension " + d.dump() + " in 'shape', expected >= 0");
        auto v = d.get<std::uint64_t>();
        require(v <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                where, "dimension " + d.dump() + " is too large");
        rec.shape.push_back(static_cast<std::int64_t>(v));
      }

      auto off = entry.find("data_offsets");
      require(off != entry.end(), where, "missing 'data_offsets'");
      require(off->is_array() && off->size() == 2 && (*off)[0].is_number_unsigned() &&
                  (*off)[1].is_number_unsigned(),
              where, "'data_offsets' must be [begin, end] with non-negative integers");
      const auto begin = (*off)[0].get<std::uint64_t>();
      const auto end = (*off)[1].get<std::uint64_t>();
      require(begin <= end, where,
              "data_offsets [" + std::to_string(begin) + "," + std::to_string(end) +
                  "] has begin > end");
      require(end <= data_len, where,
              "data_offsets [" + std::to_string(begin) + "," + std::to_string(end) +
                  "] run past the " + std::to_string(data_len) + " data bytes in the file");

      const std::size_t item = dtype_size(rec.dtype);
      std::uint64_t count = 0;
      require(detail::element_count(rec.shape, std::numeric_limits<std::uint64_t>::max() / 8,
                                    count),
              where, "shape " + detail::shape_string(rec.shape) + " overflows a 64-bit size");
      require(count * item == end - begin, where,
              "shape " + detail::shape_string(rec.shape) + " of " +
                  std::string(dtype_name(rec.dtype)) + " needs " + std::to_string(count * item) +
                  " bytes, but data_offsets [" + std::to_string(begin) + "," +
                  std::to_string(end) + "] cover " + std::to_string(end - begin));

      rec.bytes.assign(data + begin, data + end);
      auto [it, inserted] = f.tensors_.emplace(key, std::move(rec));
      spans.push_back({begin, end, &it->first});
    }

    // Like the reference implementation: tensors tile the data exactly, so no two share bytes
    // and no bytes are unaccounted for (a sign of truncation or a bad writer).
    std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    std::uint64_t cursor = 0;
    for (const Span& s : spans) {
      require(s.begin >= cursor, name,
              "tensor '" + *s.name + "' data_offsets [" + std::to_string(s.begin) + "," +
                  std::to_string(s.end) + "] overlap the previous tensor, which ends at " +
                  std::to_string(cursor));
      require(s.begin == cursor, name,
              "tensor '" + *s.name + "' starts at " + std::to_string(s.begin) +
                  ", expected " + std::to_string(cursor) + " (tensors must be contiguous)");
      cursor = s.end;
    }
    require(cursor == data_len, name,
            "tensors cover " + std::to_string(cursor) + " data bytes, but the file has " +
                std::to_string(data_len));
    return f;
  }

  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  const TensorRecord& at(const std::string& name) const {
    auto it = tensors_.find(name);
    require(it != tensors_.end(), source_, "no tensor named '" + name + "'");
    return it->second;
  }

  // Sorted by name.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& [k, v] : tensors_) out.push_back(k);
    return out;
  }

  // The "__metadata__" object (string -> string); empty when the file has none.
  const nlohmann::json& metadata() const { return metadata_; }

  // The file name given to read()/parse(), used in messages.
  const std::string& source() const { return source_; }

  // Convert an F32/F64 tensor after checking its shape against what the caller's layer expects.
  std::vector<float> to_float(const std::string& name,
                              const std::vector<std::int64_t>& expected_shape) const {
    return convert<float>(name, expected_shape);
  }
  std::vector<double> to_double(const std::string& name,
                                const std::vector<std::int64_t>& expected_shape) const {
    return convert<double>(name, expected_shape);
  }
  // Integer tensors (labels) are not converted from floats: I64 only.
  std::vector<std::int64_t> to_int64(const std::string& name,
                                     const std::vector<std::int64_t>& expected_shape) const {
    const TensorRecord& r = checked(name, expected_shape);
    require(r.dtype == DType::I64, source_,
            "tensor '" + name + "' has dtype " + std::string(dtype_name(r.dtype)) +
                ", expected I64");
    std::vector<std::int64_t> out(r.bytes.size() / 8);
    if (!out.empty()) std::memcpy(out.data(), r.bytes.data(), r.bytes.size());
    return out;
  }

 private:
  const TensorRecord& checked(const std::string& name,
                              const std::vector<std::int64_t>& expected_shape) const {
    const TensorRecord& r = at(name);
    require(r.shape == expected_shape, source_,
            "tensor '" + name + "' has shape " + detail::shape_string(r.shape) + ", expected " +
                detail::shape_string(expected_shape));
    return r;
  }

  template <class T>
  std::vector<T> convert(const std::string& name,
                         const std::vector<std::int64_t>& expected_shape) const {
    const TensorRecord& r = checked(name, expected_shape);
    require(r.dtype == DType::F32 || r.dtype == DType::F64, source_,
            "tensor '" + name + "' has dtype " + std::string(dtype_name(r.dtype)) +
                ", expected F32 or F64");
    const std::size_t count = r.bytes.size() / dtype_size(r.dtype);
    std::vector<T> out(count);
    // memcpy per element: the record's bytes carry no alignment guarantee for T.
    if (r.dtype == DType::F32) {
      for (std::size_t i = 0; i < count; ++i) {
        float v;
        std::memcpy(&v, r.bytes.data() + 4 * i, 4);
        out[i] = static_cast<T>(v);
      }
    } else {
      for (std::size_t i = 0; i < count; ++i) {
        double v;
        std::memcpy(&v, r.bytes.data() + 8 * i, 8);
        out[i] = static_cast<T>(v);
      }
    }
    return out;
  }

  std::string source_;
  std::map<std::string, TensorRecord> tensors_;
  nlohmann::json metadata_ = nlohmann::json::object();
};

class SafeTensorsWriter {
 public:
  // Copies shape-product * itemsize bytes from data. Names are unique; "__metadata__" is
  // reserved by the format.
  void add(const std::string& name, DType dtype, std::vector<std::int64_t> shape,
           const void* data) {
    require(!name.empty(), "safetensors writer", "tensor name must not be empty");
    require(name != "__metadata__", "safetensors writer",
            "'__metadata__' is reserved and cannot name a tensor");
    require(!tensors_.count(name), "safetensors writer",
            "tensor '" + name + "' was added twice");
    std::uint64_t count = 0;
    require(detail::element_count(shape, std::numeric_limits<std::uint64_t>::max() / 8, count),
            "safetensors writer",
            "tensor '" + name + "' has invalid shape " + detail::shape_string(shape));
    TensorRecord rec{dtype, std::move(shape), {}};
    const auto nbytes = static_cast<std::size_t>(count * dtype_size(dtype));
    require(nbytes == 0 || data != nullptr, "safetensors writer",
            "tensor '" + name + "' has null data");
    const auto* p = static_cast<const std::uint8_t*>(data);
    if (nbytes) rec.bytes.assign(p, p + nbytes);
    tensors_.emplace(name, std::move(rec));
  }

  void add(const std::string& name, std::vector<std::int64_t> shape, std::span<const float> data) {
    add_span(name, DType::F32, std::move(shape), data.data(), data.size());
  }
  void add(const std::string& name, std::vector<std::int64_t> shape,
           std::span<const double> data) {
    add_span(name, DType::F64, std::move(shape), data.data(), data.size());
  }
  void add(const std::string& name, std::vector<std::int64_t> shape,
           std::span<const std::int64_t> data) {
    add_span(name, DType::I64, std::move(shape), data.data(), data.size());
  }

  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  // The complete file image: header length, space-padded header, data in name order.
  std::vector<std::uint8_t> serialize() const {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) {
      nlohmann::ordered_json meta = nlohmann::ordered_json::object();
      for (const auto& [k, v] : metadata_) meta[k] = v;
      header["__metadata__"] = std::move(meta);
    }
    std::uint64_t offset = 0;
    for (const auto& [name, rec] : tensors_) {  // std::map: sorted by name
      nlohmann::ordered_json e = nlohmann::ordered_json::object();
      e["dtype"] = std::string(dtype_name(rec.dtype));
      e["shape"] = rec.shape;
      e["data_offsets"] = {offset, offset + rec.bytes.size()};
      header[name] = std::move(e);
      offset += rec.bytes.size();
    }
    std::string text = header.dump();
    // Pad so the data starts 8-byte aligned, as the reference writer does; readers that mmap
    // the file can then view F64/I64 data in place.
    text.append((8 - text.size() % 8) % 8, ' ');

    std::vector<std::uint8_t> out(8 + text.size() + offset);
    const std::uint64_t len = text.size();
    std::memcpy(out.data(), &len, 8);
    std::memcpy(out.data() + 8, text.data(), text.size());
    std::size_t pos = 8 + text.size();
    for (const auto& [name, rec] : tensors_) {
      if (!rec.bytes.empty()) std::memcpy(out.data() + pos, rec.bytes.data(), rec.bytes.size());
      pos += rec.bytes.size();
    }
    return out;
  }

  // Atomic: the file at `path` is either the old one or the complete new one, never a torn
  // write, so a run killed mid-checkpoint resumes from the previous checkpoint.
  void write(const std::filesystem::path& path) const {
    const std::vector<std::uint8_t> image = serialize();
    write_file_atomically(path, image.data(), image.size());
  }

 private:
  void add_span(const std::string& name, DType dtype, std::vector<std::int64_t> shape,
                const void* data, std::size_t size) {
    std::uint64_t count = 0;
    require(detail::element_count(shape, std::numeric_limits<std::uint64_t>::max() / 8, count) &&
                count == size,
            "safetensors writer",
            "tensor '" + name + "' has shape " + detail::shape_string(shape) + " but " +
                std::to_string(size) + " values were given");
    add(name, dtype, std::move(shape), data);
  }

  std::map<std::string, TensorRecord> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace hatch::io
