#!/usr/bin/env bash
# Installs, from Debian's packages, whatever hatch needs that this machine lacks.
# The CUDA toolkit is not a Debian package here: when nvcc is present (PATH or /usr/local/cuda),
# the CUDA parts are built too.
set -euo pipefail
packages=(build-essential cmake libeigen3-dev doctest-dev libbenchmark-dev zlib1g-dev libcli11-dev
          nlohmann-json3-dev python3-torch libopenblas0-pthread libopenblas-dev dataset-fashion-mnist gnuplot-nox clang time
          libopenmpi-dev openmpi-bin)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
fi
