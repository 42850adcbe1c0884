#pragma once
// A progress bar on stderr (redrawn in place on a terminal, one line per epoch otherwise) and
// metrics as JSON lines.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "hatch/core/error.hpp"
#include "hatch/io/atomic_file.hpp"

namespace hatch {

class ProgressBar {
 public:
  ProgressBar(std::string label, int total, bool enabled = true)
      : label_(std::move(label)), total_(total), enabled_(enabled), tty_(isatty(STDERR_FILENO)),
        start_(std::chrono::steady_clock::now()), last_(start_) {}

  // Redraws at most five times a second.
  void update(int done, double loss, double acc, double images_per_second) {
    if (!enabled_ || !tty_) return;
    const auto now = std::chrono::steady_clock::now();
    if (done < total_ && now - last_ < std::chrono::milliseconds(200)) return;
    last_ = now;
    draw(done, loss, acc, images_per_second, true);
  }
  void finish(double loss, double acc, double images_per_second, const std::string& extra) {
    if (!enabled_) return;
    draw(total_, loss, acc, images_per_second, false);
    std::fprintf(stderr, "%s\n", extra.c_str());
  }

 private:
  void draw(int done, double loss, double acc, double ips, bool in_place) {
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const double eta = done > 0 ? elapsed * (total_ - done) / done : 0;
    constexpr int width = 24;
    const int fill = total_ > 0 ? width * done / total_ : width;
    std::string bar(fill, '=');
    if (fill < width) bar += '>' + std::string(width - fill - 1, ' ');
    std::fprintf(stderr, "%s%s [%s] %d/%d loss %.4f acc %.4f %.0f img/s %s %02d:%02d%s", in_place ? "\r" : "",
                 label_.c_str(), bar.c_str(), done, total_, loss, acc, ips, done < total_ ? "ETA" : "in",
                 int(done < total_ ? eta : elapsed) / 60, int(done < total_ ? eta : elapsed) % 60,
                 in_place ? "\033[K" : " ");
    std::fflush(stderr);
  }
  std::string label_;
  int total_;
  bool enabled_, tty_;
  std::chrono::steady_clock::time_point start_, last_;
};

// <dir>/metrics.jsonl: one JSON object per line and epoch, each with its "phase" and "run".
// The file holds, per phase, the epochs of the run that produced that phase's current model:
// opening the log for a fresh run drops the phase's earlier lines, and opening it to resume
// after epoch E drops the lines after E (written by a run killed between its metrics line and
// its state). Other phases' lines are kept, so the parallel module jobs of an incubation share
// one file: every access holds an flock on it, and a rewrite is atomic (temporary, rename).
class MetricsLog {
 public:
  MetricsLog() = default;
  MetricsLog(const std::filesystem::path& dir, const std::string& phase, int keep_epochs) {
    if (dir.empty()) return;
    std::filesystem::create_directories(dir);
    path_ = dir / "metrics.jsonl";
    with_lock([&](int fd) {
      std::string text, kept;
      char buf[1 << 14];
      for (ssize_t n; (n = ::pread(fd, buf, sizeof buf, off_t(text.size()))) > 0;) text.append(buf, std::size_t(n));
      std::size_t at = 0;
      bool dropped = false;
      while (at < text.size()) {
        const auto end = std::min(text.find('\n', at), text.size());
        const std::string line = text.substr(at, end - at);
        at = end + 1;
        if (line.empty()) continue;
        const auto j = nlohmann::json::parse(line, nullptr, false);
        const bool ours = !j.is_discarded() && j.is_object() && j.value("phase", "") == phase;
        if (ours && !(j.contains("epoch") && j["epoch"].is_number_integer() && j["epoch"].get<int>() <= keep_epochs)) {
          dropped = true;
          continue;
        }
        kept += line + '\n';
      }
      if (dropped) io::write_file_atomically(path_, kept.data(), kept.size());
    });
  }
  void write(const nlohmann::json& j) {
    if (path_.empty()) return;
    const std::string line = j.dump() + '\n';
    with_lock([&](int fd) {
      require(::write(fd, line.data(), line.size()) == ssize_t(line.size()), path_.string(),
              std::string("cannot append a metrics line (") + std::strerror(errno) + ")");
    });
  }

 private:
  // f(fd) with fd open for appending and exclusively locked, and still the file at path_ (a
  // rewrite by another process replaces the file; then open the new one).
  template <class F>
  void with_lock(F&& f) {
    for (;;) {
      const int fd = ::open(path_.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      require(fd >= 0, path_.string(), std::string("cannot open for appending (") + std::strerror(errno) + ")");
      struct Closer {
        int fd;
        ~Closer() { ::close(fd); }  // also releases the lock
      } closer{fd};
      while (::flock(fd, LOCK_EX) != 0)
        require(errno == EINTR, path_.string(), std::string("cannot lock (") + std::strerror(errno) + ")");
      struct stat open_st {}, path_st {};
      if (::fstat(fd, &open_st) == 0 && ::stat(path_.c_str(), &path_st) == 0 && open_st.st_ino == path_st.st_ino &&
          open_st.st_dev == path_st.st_dev) {
        f(fd);
        return;
      }
    }
  }
  std::filesystem::path path_;
};

}  // namespace hatch
