#pragma once
// Counter-based randomness shared by every backend: the value at (seed, counter) is a pure
// function, so CPU and GPU draw identical dropout masks and a resumed run replays the same masks.
#include <cstdint>

#include "hatch/core/host_device.hpp"

namespace hatch {

HATCH_HD inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
// Uniform in [0, 1) with 53 random bits.
HATCH_HD inline double uniform01(std::uint64_t seed, std::uint64_t counter) {
  const std::uint64_t h = mix64(mix64(seed + 0x9e3779b97f4a7c15ULL) ^ (counter * 0xd1b54a32d192ed03ULL));
  return double(h >> 11) * (1.0 / 9007199254740992.0);
}

}  // namespace hatch
