#pragma once
// A progress bar on stderr (redrawn in place on a terminal, one line per epoch otherwise) and
// metrics as JSON lines.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "hatch/core/error.hpp"

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

// Appends one JSON object per line to <dir>/metrics.jsonl (flushed per line, so a killed run
// keeps every finished epoch).
class MetricsLog {
 public:
  MetricsLog() = default;
  explicit MetricsLog(const std::filesystem::path& dir) {
    if (dir.empty()) return;
    std::filesystem::create_directories(dir);
    path_ = dir / "metrics.jsonl";
    out_.open(path_, std::ios::app);
    require(bool(out_), path_.string(), "cannot open for appending");
  }
  void write(const nlohmann::json& j) {
    if (!out_.is_open()) return;
    out_ << j.dump() << '\n';
    out_.flush();
  }

 private:
  std::filesystem::path path_;
  std::ofstream out_;
};

}  // namespace hatch
