/* parallel.c — the split of a loop into parts (ad__par_parts/ad__par_for,
 * see ad_internal.h). This version runs the parts one after another on the
 * caller's thread; the split is already the one a threaded run uses, so
 * callers written against it (per-part partial sums) keep their results. */
#include "ad_internal.h"

int ad__par_parts(int64_t n, int64_t grain) {
  int th = ad_blas_threads();
  if (grain < 1) grain = 1;
  int64_t by_size = n / grain;
  int parts = by_size < th ? (int)by_size : th;
  return parts < 1 ? 1 : parts;
}

void ad__par_for(int64_t n, int64_t grain, ad__range_fn fn, void *ctx) {
  if (n <= 0) return;
  int parts = ad__par_parts(n, grain);
  for (int p = 0; p < parts; p++) fn(ctx, p, n * p / parts, n * (p + 1) / parts);
}
