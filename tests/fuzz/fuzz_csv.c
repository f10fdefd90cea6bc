/* fuzz_csv.c — ds_csv_parse (the in-memory CSV reader behind ds_csv_read)
 * on arbitrary text. The first byte picks the options: bits 0-1 the header
 * mode (-1, 0, 1), bit 2 the dtype, bits 3-4 the delimiter (',', ';', tab,
 * space). A success must be a [rows, cols] tensor of finite-or-parsed
 * values; a failure a NULL tensor and a message. */
#include <stdint.h>
#include <stdlib.h>

#include "datasets/ds.h"

#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  if (n < 1) return 0;
  static const char delims[4] = {',', ';', '\t', ' '};
  ds_csv_opts o = {.header = (int)(data[0] & 3) % 3 - 1,
                   .dtype = (data[0] & 4) ? AD_F64 : AD_F32,
                   .delim = delims[(data[0] >> 3) & 3]};
  /* a copy of exactly the text, so ASan sees any read past its end */
  size_t len = n - 1;
  char *text = malloc(len ? len : 1);
  memcpy(text, data + 1, len);
  ad_tensor *t = NULL;
  ad_status s = ds_csv_parse(&t, text, len, "fuzz.csv", &o);
  if (s == AD_OK) {
    if (!t || t->ndim != 2 || t->shape[0] < 1 || t->shape[1] < 1 ||
        t->size != t->shape[0] * t->shape[1] || memchr(text, '\0', len))
      abort();
    for (int64_t i = 0; i < t->size; i++) (void)ad_get(t, i);
  } else if (t || ds_errmsg()[0] == '\0') {
    abort();
  }
  ad_tensor_free(t);
  free(text);
  return 0;
}
