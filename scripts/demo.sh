#!/usr/bin/env bash
# The README's first command: install dependencies, build everything, and
# train the MNIST MLP on the digits embedded in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
./build/examples/mnist_mlp "$@"
