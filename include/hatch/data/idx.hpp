#pragma once
// IDX files (the MNIST container): plain or gzipped, unsigned-byte payload only.
//
// Layout: 00 00 <type> <ndims>, then ndims big-endian int32 sizes, then the payload in
// row-major order. Every defect is answered with hatch::Error("<file>: <what was expected>");
// the parser never reads past the buffer it is given.
#include <zlib.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>
#include <vector>

#include "hatch/core/error.hpp"

namespace hatch::data {

struct IdxArray {
  std::vector<int> dims;
  std::vector<std::uint8_t> data;
};

// No IDX file we read comes near this (Fashion-MNIST's largest is 47 MB); the cap keeps a
// corrupt header or a gzip bomb from allocating without bound.
inline constexpr std::size_t kMaxIdxBytes = std::size_t{1} << 30;

namespace detail {

inline std::string idx_type_name(std::uint8_t code) {
  switch (code) {
    case 0x08: return "unsigned byte";
    case 0x09: return "signed byte";
    case 0x0B: return "int16";
    case 0x0C: return "int32";
    case 0x0D: return "float32";
    case 0x0E: return "float64";
    default: return "not an IDX type";
  }
}

inline std::string hex_byte(std::uint8_t b) {
  const char* digits = "0123456789abcdef";
  return std::string("0x") + digits[b >> 4] + digits[b & 15];
}

inline std::string dims_string(const std::vector<std::uint32_t>& dims) {
  std::string s;
  for (std::size_t i = 0; i < dims.size(); ++i) s += (i ? "x" : "") + std::to_string(dims[i]);
  return s;
}

inline bool is_gzip(const std::uint8_t* bytes, std::size_t n) {
  return n >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b;
}

// Streams through zlib (gzip wrapper, concatenated members allowed) into a buffer that grows
// by doubling up to max_bytes.
inline std::vector<std::uint8_t> gunzip(const std::uint8_t* bytes, std::size_t n,
                                        const std::string& name, std::size_t max_bytes) {
  z_stream zs{};
  require(inflateInit2(&zs, 16 + MAX_WBITS) == Z_OK, name, "zlib could not start inflating");
  struct End {
    z_stream* zs;
    ~End() { inflateEnd(zs); }
  } end{&zs};

  // zlib counts in uInt, so feed and drain in pieces that fit.
  constexpr std::size_t kPiece = std::size_t{1} << 30;
  // The first guess is the size the gzip trailer records (of the last member, modulo 2^32), one
  // byte over so that the end of the stream fits without growing: the buffer is zero-filled, so
  // a generous guess (it was 4x the compressed size: 106 MB for a 47 MB file) costs resident
  // memory. Deflate expands at most ~1032:1, which bounds what a corrupt trailer can ask for.
  std::size_t guess = 0;
  if (n >= 18)
    guess = std::size_t{bytes[n - 4]} | std::size_t{bytes[n - 3]} << 8 | std::size_t{bytes[n - 2]} << 16 |
            std::size_t{bytes[n - 1]} << 24;
  guess = std::min(guess, 1032 * n);
  std::vector<std::uint8_t> out(std::min(max_bytes + 1, std::max<std::size_t>(guess + 1, 1 << 16)));
  std::size_t fed = 0, produced = 0;
  for (;;) {
    if (zs.avail_in == 0 && fed < n) {
      const std::size_t piece = std::min(n - fed, kPiece);
      zs.next_in = const_cast<Bytef*>(bytes + fed);
      zs.avail_in = static_cast<uInt>(piece);
      fed += piece;
    }
    if (produced == out.size()) {
      require(out.size() <= max_bytes, name,
              "gzip data decompresses to more than " + std::to_string(max_bytes) +
                  " bytes; not a plausible IDX file");
      out.resize(std::min(2 * out.size(), max_bytes + 1));
    }
    zs.next_out = out.data() + produced;
    zs.avail_out = static_cast<uInt>(std::min(out.size() - produced, kPiece));
    const int rc = inflate(&zs, Z_NO_FLUSH);
    produced = static_cast<std::size_t>(zs.next_out - out.data());

    if (rc == Z_STREAM_END) {
      const std::size_t left = zs.avail_in + (n - fed);
      if (left == 0) break;
      const std::uint8_t* rest = zs.avail_in ? zs.next_in : bytes + fed;
      const std::size_t rest_here = zs.avail_in ? zs.avail_in : n - fed;
      require(is_gzip(rest, rest_here), name,
              "trailing garbage: " + std::to_string(left) +
                  " bytes after the end of the gzip stream");
      inflateReset(&zs);
      continue;
    }
    if (rc == Z_BUF_ERROR) {
      // No progress possible: either the output is full (grown above) or the input is spent.
      require(!(zs.avail_in == 0 && fed == n && zs.avail_out != 0), name,
              "truncated gzip stream: input ends after " + std::to_string(n) +
                  " compressed bytes (" + std::to_string(produced) +
                  " decompressed) before the end-of-stream marker");
      continue;
    }
    require(rc == Z_OK, name,
            std::string("corrupt gzip data: ") + (zs.msg ? zs.msg : "zlib error " + std::to_string(rc)));
  }
  out.resize(produced);
  return out;
}

// Checks the IDX image in `bytes` and returns it with the payload in the same buffer, the header
// cut off in place, so that a file's bytes are not held twice.
inline IdxArray parse_idx_plain(std::vector<std::uint8_t> bytes, const std::string& name,
                                std::size_t max_bytes, const char* has) {
  const std::uint8_t* p = bytes.data();
  const std::size_t n = bytes.size();
  require(n >= 4, name,
          "too short for an IDX header: " + std::to_string(n) + " bytes, expected at least 4");
  require(p[0] == 0 && p[1] == 0, name,
          "bad magic " + hex_byte(p[0]) + " " + hex_byte(p[1]) + " " + hex_byte(p[2]) + " " +
              hex_byte(p[3]) + ": an IDX file starts with 0x00 0x00 <type> <ndims>");
  require(p[2] == 0x08, name,
          "unsupported element type " + hex_byte(p[2]) + " (" + idx_type_name(p[2]) +
              "): only 0x08 (unsigned byte) is supported");
  const std::size_t ndims = p[3];
  require(ndims >= 1, name, "header declares 0 dimensions, expected at least 1");
  const std::size_t header = 4 + 4 * ndims;
  require(n >= header, name,
          "truncated header: " + std::to_string(ndims) + " dimensions need " +
              std::to_string(header) + " bytes, " + has + " " + std::to_string(n));

  std::vector<std::uint32_t> dims(ndims);
  std::uint64_t total = 1;
  for (std::size_t i = 0; i < ndims; ++i) {
    const std::uint8_t* q = p + 4 + 4 * i;
    dims[i] = std::uint32_t{q[0]} << 24 | std::uint32_t{q[1]} << 16 | std::uint32_t{q[2]} << 8 | q[3];
    require(dims[i] != 0, name, "dimension " + std::to_string(i) + " is 0, expected >= 1");
    require(dims[i] <= 0x7fffffffu, name,
            "dimension " + std::to_string(i) + " is negative as a signed int32 (" +
                std::to_string(static_cast<std::int64_t>(dims[i]) - (std::int64_t{1} << 32)) + ")");
    // total <= max_bytes <= 2^32 and dims[i] < 2^31, so this cannot overflow.
    total *= dims[i];
    require(total <= max_bytes, name,
            "header dimensions " + dims_string({dims.begin(), dims.begin() + i + 1}) +
                " exceed " + std::to_string(max_bytes) + " bytes; the header looks corrupt");
  }
  const std::size_t payload = n - header;
  const std::string says = "header says " + dims_string(dims) + " = " + std::to_string(total) +
                           " bytes of data, " + has + " " + std::to_string(payload);
  require(payload >= total, name, "truncated: " + says);
  require(payload == total, name,
          "trailing garbage: " + says + " (" + std::to_string(payload - total) + " extra)");

  IdxArray a;
  a.dims.assign(dims.begin(), dims.end());
  bytes.erase(bytes.begin(), bytes.begin() + std::ptrdiff_t(header));
  a.data = std::move(bytes);
  return a;
}

}  // namespace detail

// Parses an IDX image already in memory; `name` is only used in error messages. Payloads
// (and decompressed files) over max_bytes are refused.
inline IdxArray parse_idx(const std::uint8_t* bytes, std::size_t n, const std::string& name,
                          std::size_t max_bytes = kMaxIdxBytes) {
  if (bytes == nullptr) n = 0;
  max_bytes = std::min<std::size_t>(max_bytes, std::uint64_t{1} << 32);
  if (detail::is_gzip(bytes, n))
    return detail::parse_idx_plain(detail::gunzip(bytes, n, name, max_bytes), name, max_bytes,
                                   "decompressed file has");
  return detail::parse_idx_plain({bytes, bytes + n}, name, max_bytes, "file has");
}

inline IdxArray read_idx(const std::filesystem::path& path) {
  const std::string name = path.string();
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  require(std::filesystem::exists(status), name, "no such file");
  require(std::filesystem::is_regular_file(status), name, "not a regular file");
  const auto size = std::filesystem::file_size(path, ec);
  require(!ec, name, "cannot read file size: " + ec.message());
  require(size <= kMaxIdxBytes, name,
          "file is " + std::to_string(size) + " bytes, more than the " +
              std::to_string(kMaxIdxBytes) + "-byte limit for IDX files");

  std::ifstream in(path, std::ios::binary);
  require(in.is_open(), name, "cannot open for reading");
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(size));
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  require(static_cast<std::size_t>(in.gcount()) == bytes.size(), name,
          "read " + std::to_string(in.gcount()) + " of " + std::to_string(size) + " bytes");
  // As parse_idx, but the file's buffer is handed on (plain) or dropped (gzip) rather than copied.
  if (!detail::is_gzip(bytes.data(), bytes.size()))
    return detail::parse_idx_plain(std::move(bytes), name, kMaxIdxBytes, "file has");
  auto raw = detail::gunzip(bytes.data(), bytes.size(), name, kMaxIdxBytes);
  bytes = {};
  return detail::parse_idx_plain(std::move(raw), name, kMaxIdxBytes, "decompressed file has");
}

}  // namespace hatch::data
