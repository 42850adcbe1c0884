#pragma once
// A directory whose files become visible together: StagedDirectory collects a set of files in
// a temporary sibling directory (<target>.tmp.<host>.<pid>) and commit() swaps it in for <target>
// with one rename. A reader of <target> sees the complete old set or the complete new set,
// never a mix; a process killed (or an exception thrown) before commit() leaves <target> as it
// was. The modular phases that write one file per stage (meta, teacher split, assembly,
// fine-tuning) write through it.
//
// On Linux the swap with an existing <target> is renameat2(RENAME_EXCHANGE), atomic; the old
// set then sits under the temporary name and is removed. Where the exchange is not available
// (another OS, a file system without it) the old directory is renamed aside first, which
// leaves a moment in which <target> does not exist (a reader then reports it missing; it never
// sees a mix).
//
// A temporary directory left by a process that no longer runs (killed mid-phase) is removed
// by the next StagedDirectory for the same target; readers never look at it.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>

#include "hatch/core/error.hpp"
#include "hatch/io/atomic_file.hpp"

namespace hatch::io {

class StagedDirectory {
 public:
  // Prepares <target>.tmp.<host>.<pid> (empty), after removing the temporaries of dead processes.
  explicit StagedDirectory(std::filesystem::path target) : target_(std::move(target)) {
    namespace fs = std::filesystem;
    require(!target_.filename().empty(), target_.string(), "a staged directory needs a name (not a path ending in '/')");
    std::error_code ec;
    // A symbolic link (e.g. meta/ pointing at shared storage) stays one: the set is swapped in
    // where it points.
    if (fs::is_symlink(fs::symlink_status(target_, ec))) {
      const auto real = fs::canonical(target_, ec);
      require(!ec, target_.string(), "is a symbolic link that cannot be resolved (" + ec.message() + ")");
      target_ = real;
    }
    const auto parent = target_.parent_path();
    if (!parent.empty()) fs::create_directories(parent, ec);
    require(!ec, parent.string(), "cannot create directory (" + ec.message() + ")");
    remove_stale(target_);
    temp_ = temporary_path(target_);
    fs::remove_all(temp_, ec);  // our own leftover from an earlier attempt in this process
    fs::create_directory(temp_, ec);
    require(!ec, temp_.string(), "cannot create temporary directory (" + ec.message() + ")");
  }
  StagedDirectory(const StagedDirectory&) = delete;
  StagedDirectory& operator=(const StagedDirectory&) = delete;

  // Not committed: the temporary directory goes, <target> stays as it was.
  ~StagedDirectory() {
    if (committed_) return;
    std::error_code ec;
    std::filesystem::remove_all(temp_, ec);
  }

  // Where to write the files.
  const std::filesystem::path& dir() const { return temp_; }
  const std::filesystem::path& target() const { return target_; }
  // The file that will be <target>/<name> after commit().
  std::filesystem::path file(const std::string& name) const { return temp_ / name; }

  // Makes the written files durable and swaps them in for <target> as one step.
  void commit() {
    namespace fs = std::filesystem;
    require(!committed_, target_.string(), "StagedDirectory::commit called twice");
    sync_directory(temp_);
    std::error_code ec;
    const bool exists = fs::exists(fs::symlink_status(target_, ec));
    bool swapped = false;
    if (!exists) {
      swapped = ::rename(temp_.c_str(), target_.c_str()) == 0;
      const int err = errno;
      // Another writer created <target> in the meantime: exchange with it below.
      if (!swapped && err != EEXIST && err != ENOTEMPTY) fail("rename", err);
    }
    if (!swapped) {
#if defined(__linux__) && defined(RENAME_EXCHANGE)
      if (::renameat2(AT_FDCWD, temp_.c_str(), AT_FDCWD, target_.c_str(), RENAME_EXCHANGE) == 0) {
        swapped = true;
      } else if (const int err = errno; err != EINVAL && err != ENOSYS && err != EOPNOTSUPP) {
        fail("renameat2(RENAME_EXCHANGE)", err);
      }
#endif
      if (swapped) {
        committed_ = true;
        fs::remove_all(temp_, ec);  // the old set, now under the temporary name
      } else {
        // No atomic exchange here: move the old set aside, then the new one in.
        const fs::path old = fs::path(temp_.string() + ".old");
        fs::remove_all(old, ec);
        if (::rename(target_.c_str(), old.c_str()) != 0) fail("rename of the old directory", errno);
        if (::rename(temp_.c_str(), target_.c_str()) != 0) {
          const int err = errno;
          ::rename(old.c_str(), target_.c_str());  // put the old set back
          fail("rename", err);
        }
        committed_ = true;
        fs::remove_all(old, ec);
      }
    }
    committed_ = true;
    const auto parent = target_.parent_path();
    sync_directory(parent.empty() ? fs::path(".") : parent);
  }

  // <target>.tmp.<host>.<pid>: the temporary name of `target` for process `pid` on this host
  // (the naming of atomic_file.hpp, so remove_stale_temporaries() recognises it too).
  static std::filesystem::path temp_name(const std::filesystem::path& target, long pid) {
    return std::filesystem::path(target.string() + ".tmp." + detail::host_name() + "." + std::to_string(pid));
  }

  // Removes the temporaries of `target` left by processes of this host that no longer run;
  // returns how many. A temporary of a running process (another job writing the same phase)
  // or of another host sharing the directory is left alone.
  static int remove_stale(const std::filesystem::path& target) {
    namespace fs = std::filesystem;
    const fs::path parent = target.parent_path().empty() ? fs::path(".") : target.parent_path();
    const std::string prefix = target.filename().string() + ".tmp.";
    std::error_code ec;
    int removed = 0;
    for (fs::directory_iterator it(parent, ec), end; !ec && it != end; it.increment(ec)) {
      const std::string name = it->path().filename().string();
      if (!name.starts_with(prefix) || name.ends_with(".old") || !is_stale_temporary(name)) continue;
      std::error_code rec;
      fs::remove_all(it->path(), rec);
      removed += !rec;
    }
    return removed;
  }

 private:
  static void sync_directory(const std::filesystem::path& dir) {
    // Best effort: the files themselves were fsynced by their writer.
    const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return;
    ::fsync(fd);
    ::close(fd);
  }

  [[noreturn]] void fail(const char* what, int err) const {
    throw Error(target_.string() + ": " + what + " from '" + temp_.string() + "' failed (" + std::strerror(err) +
                "); the previous contents are unchanged");
  }

  std::filesystem::path target_, temp_;
  bool committed_ = false;
};

}  // namespace hatch::io
