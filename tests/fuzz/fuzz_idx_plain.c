/* fuzz_idx_plain.c — ds_idx_read on arbitrary bytes (the plain path when
 * they do not start with the gzip magic). Any input must give AD_OK with a
 * consistent array, or an error status with a message; never a crash, a
 * leak or a sanitizer report. */
#include "fuzz_util.h"

#include "datasets/ds.h"

#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  ds_idx *a = NULL;
  ad_status s = ds_idx_read(&a, fuzz_file(data, n));
  if (s == AD_OK) {
    /* A success must describe exactly the bytes it read. */
    int64_t count = 1;
    for (int i = 0; i < a->ndim; i++) count *= a->dims[i];
    size_t want = 4 + 4 * (size_t)a->ndim + (size_t)count * ds_idx_type_size(a->type);
    if (!a->data || count != a->count || (data[0] != 0x1f && want != n)) abort();
    /* touch every byte, so a short buffer shows up under ASan */
    volatile unsigned char sink = 0;
    for (size_t i = 0; i < (size_t)count * ds_idx_type_size(a->type); i++)
      sink ^= ((const unsigned char *)a->data)[i];
    (void)sink;
  } else if (a || ds_errmsg()[0] == '\0') {
    abort(); /* failures set *out to NULL and say why */
  }
  ds_idx_free(a);
  return 0;
}
