#pragma once
// The one exception type hatch throws at its boundaries (files, flags, shapes). The message
// always names what was being read (file, field or flag) and what was expected.
#include <stdexcept>
#include <string>

namespace hatch {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Throws hatch::Error("<where>: <what>") when cond is false.
inline void require(bool cond, const std::string& where, const std::string& what) {
  if (!cond) throw Error(where + ": " + what);
}

}  // namespace hatch

// require() for hot paths: the message is built only when the check fails.
#define HATCH_CHECK(cond, where, what)                   \
  do {                                                   \
    if (!(cond)) [[unlikely]]                            \
      throw ::hatch::Error(std::string(where) + ": " + (what)); \
  } while (0)
