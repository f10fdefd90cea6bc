/* fuzz_idx_gzip.c — ds_idx_read through the gzip path. The first byte
 * picks how the rest is used:
 *   even: written as is behind the gzip magic 1f 8b, so inflate sees
 *         arbitrary (mostly corrupt) streams, members and trailers;
 *   odd:  compressed here into a valid gzip member, optionally followed by
 *         the last (byte & 0x0e) / 2 input bytes again as trailing bytes,
 *         so the IDX parser behind a valid stream is fuzzed too.
 * The invariants are those of fuzz_idx_plain. */
#include "fuzz_util.h"

#include "datasets/ds.h"

#include <string.h>
#include <zlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  if (n < 1) return 0;
  unsigned mode = data[0];
  const uint8_t *rest = data + 1;
  size_t m = n - 1;
  uint8_t *buf = NULL;
  size_t len = 0;
  if (!(mode & 1)) {
    buf = malloc(m + 2);
    buf[0] = 0x1f;
    buf[1] = 0x8b;
    memcpy(buf + 2, rest, m);
    len = m + 2;
  } else {
    size_t tail = (mode & 0x0e) / 2;
    if (tail > m) tail = m;
    z_stream z;
    memset(&z, 0, sizeof z);
    if (deflateInit2(&z, 6, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY) != Z_OK) abort();
    size_t cap = deflateBound(&z, (uLong)m) + tail;
    buf = malloc(cap);
    z.next_in = (Bytef *)rest;
    z.avail_in = (uInt)m;
    z.next_out = buf;
    z.avail_out = (uInt)cap;
    if (deflate(&z, Z_FINISH) != Z_STREAM_END) abort();
    len = cap - z.avail_out;
    deflateEnd(&z);
    memcpy(buf + len, rest + m - tail, tail);
    len += tail;
  }
  ds_idx *a = NULL;
  ad_status s = ds_idx_read(&a, fuzz_file(buf, len));
  if (s == AD_OK) {
    int64_t count = 1;
    for (int i = 0; i < a->ndim; i++) count *= a->dims[i];
    if (!a->data || count != a->count) abort();
    volatile unsigned char sink = 0;
    for (size_t i = 0; i < (size_t)count * ds_idx_type_size(a->type); i++)
      sink ^= ((const unsigned char *)a->data)[i];
    (void)sink;
    /* a valid member with trailing bytes must have been rejected */
    if ((mode & 1) && (mode & 0x0e) && m > 0) abort();
  } else if (a || ds_errmsg()[0] == '\0') {
    abort();
  }
  ds_idx_free(a);
  free(buf);
  return 0;
}
