#pragma once
// Files that appear whole or not at all: every file hatch writes goes to a temporary sibling
// `<name>.tmp.<host>.<pid>` first and is renamed over its final name after an fsync. A process
// killed mid-write leaves the temporary behind; remove_stale_temporaries() deletes those whose
// writer is gone, and only those: the host name in the temporary's name keeps a run on one
// machine from deleting what a live process on another machine sharing the directory writes.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "hatch/core/error.hpp"

namespace hatch::io {

namespace detail {
inline std::string host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0 || !buf[0]) return "localhost";
  std::string s(buf);
  for (auto& ch : s)
    if (ch == '.' || ch == '/') ch = '_';  // keep ".tmp.<host>.<pid>" parseable
  return s;
}

inline bool all_digits(std::string_view s) {
  if (s.empty() || s.size() > 10) return false;
  for (char c : s)
    if (c < '0' || c > '9') return false;
  return true;
}

inline bool process_alive(long pid) { return pid > 0 && (::kill(pid_t(pid), 0) == 0 || errno != ESRCH); }
}  // namespace detail

// The temporary sibling a write of `path` goes through.
inline std::filesystem::path temporary_path(const std::filesystem::path& path) {
  return std::filesystem::path(path.string() + ".tmp." + detail::host_name() + "." + std::to_string(::getpid()));
}

// True for a name written by temporary_path() on this host by a process that no longer exists
// (and for the older "<name>.tmp.<pid>" form when that pid is not alive here).
inline bool is_stale_temporary(const std::string& name) {
  const auto at = name.rfind(".tmp.");
  if (at == std::string::npos) return false;
  const std::string rest = name.substr(at + 5);
  const auto dot = rest.rfind('.');
  const std::string pid = dot == std::string::npos ? rest : rest.substr(dot + 1);
  if (!detail::all_digits(pid)) return false;
  if (dot != std::string::npos && rest.substr(0, dot) != detail::host_name()) return false;
  return !detail::process_alive(std::stol(pid));
}

// Removes the stale temporaries (files or directories) under `dir`, recursively; returns how
// many. Errors (a directory that vanished, no permission) are ignored: this is housekeeping.
inline int remove_stale_temporaries(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (dir.empty() || !fs::is_directory(dir, ec)) return 0;
  int removed = 0;
  std::vector<fs::path> stale;
  for (auto it = fs::recursive_directory_iterator(dir, fs::directory_options::skip_permission_denied, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (is_stale_temporary(it->path().filename().string())) {
      stale.push_back(it->path());
      if (it->is_directory(ec)) it.disable_recursion_pending();
    }
  }
  for (const auto& p : stale)
    if (fs::remove_all(p, ec) > 0 && !ec) ++removed;
  return removed;
}

// Writes `size` bytes to `path` atomically: the file at `path` is the old one or the complete
// new one, never a torn write. Throws hatch::Error naming `path`; the temporary is removed on
// every error path.
inline void write_file_atomically(const std::filesystem::path& path, const void* data, std::size_t size) {
  const std::string where = path.string();
  const std::string tmp = temporary_path(path).string();
  auto fail = [&](const std::string& what) {
    const int err = errno;
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    throw Error(where + ": " + what + " (" + std::strerror(err) + ")");
  };
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw Error(where + ": cannot create temporary file '" + tmp + "' (" + std::strerror(errno) + ")");
  const auto* bytes = static_cast<const std::uint8_t*>(data);
  std::size_t done = 0;
  while (done < size) {
    const ssize_t w = ::write(fd, bytes + done, size - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      errno = err;
      fail("write to temporary file '" + tmp + "' failed");
    }
    done += static_cast<std::size_t>(w);
  }
  // fsync before rename: otherwise a crash can leave the renamed file with no data in it.
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    errno = err;
    fail("fsync of temporary file '" + tmp + "' failed");
  }
  if (::close(fd) != 0) fail("close of temporary file '" + tmp + "' failed");
  if (::rename(tmp.c_str(), where.c_str()) != 0) fail("rename from '" + tmp + "' failed");
  // Make the rename itself durable; best effort, the data is already safe in the file.
  const auto dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace hatch::io
