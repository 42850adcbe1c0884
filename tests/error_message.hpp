#pragma once
// The message of the error a statement throws, for tests that check what a user would read.
#include <exception>
#include <string>

#include "hatch/core/error.hpp"

namespace hatch::test {

// The message of the hatch::Error that f throws; a marker string if it throws nothing or
// something else, so CHECKs on the message fail readably.
template <class F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<not a hatch::Error: ") + e.what() + ">";
  }
  return "<no hatch::Error thrown>";
}

inline bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace hatch::test
