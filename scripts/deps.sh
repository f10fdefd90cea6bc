#!/usr/bin/env bash
# Installs what hypertape needs on Debian (bookworm): a C compiler, CMake,
# BLIS, Check, zlib. Extra package names may be passed as arguments.
# Does nothing when everything is already installed. The fuzz stage
# (scripts/fuzz.sh, from .ci/run) passes: clang libclang-rt-14-dev.
set -euo pipefail
# The bench's PyTorch twin (python3-torch, libopenblas0-pthread, libjemalloc2) is
# installed by bench/run.py itself: building and testing do not need it.
pkgs=(gcc make cmake pkg-config libblis-dev check zlib1g-dev "$@")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
