/* fuzz_params.c — the parameter-file loader (nn_params_load_new, and
 * nn_params_load into a fixed destination) on arbitrary bytes. The CRC-32
 * at the end would stop almost every mutation at "checksum mismatch", so
 * when the first byte is odd the target rewrites the last four bytes of the
 * rest with its real CRC: the table and size checks behind the checksum
 * get fuzzed too. A failed load must leave the destination untouched. */
#include "fuzz_util.h"

#include "nn/nn.h"

#include <string.h>
#include <zlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n);

static nn_params *dst; /* the layout of the seed files: "w" [2, 3], "b" [3] */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  if (n < 1) return 0;
  if (!dst) {
    nn_param_spec specs[2] = {{"w", 2, {2, 3}}, {"b", 1, {3}}};
    if (nn_params_new(&dst, AD_F32, 2, specs) != AD_OK) abort();
    for (int64_t i = 0; i < 9; i++) ad_set(nn_params_values(dst), i, (double)i + 0.5);
  }
  size_t len = n - 1;
  uint8_t *b = malloc(len ? len : 1);
  memcpy(b, data + 1, len);
  if ((data[0] & 1) && len >= 4) {
    uLong c = crc32(crc32(0L, Z_NULL, 0), b, (uInt)(len - 4));
    for (int i = 0; i < 4; i++) b[len - 4 + i] = (unsigned char)(c >> (8 * i));
  }
  const char *path = fuzz_file(b, len);
  nn_params *p = NULL;
  ad_status s = nn_params_load_new(&p, path);
  if (s == AD_OK) {
    if (!p || nn_params_count(p) < 1) abort();
    ad_tensor *v = nn_params_values(p);
    for (int64_t i = 0; i < v->size; i++) (void)ad_get(v, i);
  } else if (p || ad_last_error()[0] == '\0') {
    abort();
  }
  nn_params_free(p);
  float before[9];
  memcpy(before, nn_params_values(dst)->data, sizeof before);
  if (nn_params_load(dst, path) != AD_OK &&
      memcmp(before, nn_params_values(dst)->data, sizeof before) != 0)
    abort(); /* a failed load wrote into the destination */
  free(b);
  return 0;
}
