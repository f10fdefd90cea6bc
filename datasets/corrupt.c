/* corrupt.c — label noise for data hyper-cleaning (Franceschi et al. 2017):
 * a known fraction of training labels replaced by wrong classes, with the
 * set of flipped indices kept so a method's learned weights can be scored. */
#include "datasets/ds_internal.h"

#include <math.h>
#include <string.h>

ad_status ds_corrupt_labels(int32_t *labels, int64_t n, int n_classes, double frac, ad_rng *r,
                            uint8_t *flipped, int64_t *n_flipped) {
  ds_enter(__func__);
  if (n_flipped) *n_flipped = 0;
  if (!labels || !r) return ds_fail(AD_ERR_NULL, "ds_corrupt_labels: NULL argument");
  if (n < 0 || n_classes < 2 || !(frac >= 0 && frac <= 1))
    return ds_fail(AD_ERR_ARG,
                   "ds_corrupt_labels: bad arguments (n %lld, n_classes %d, frac %g); need "
                   "n >= 0, n_classes >= 2, 0 <= frac <= 1",
                   (long long)n, n_classes, frac);
  for (int64_t i = 0; i < n; i++)
    if (labels[i] < 0 || labels[i] >= n_classes)
      return ds_fail(AD_ERR_ARG, "ds_corrupt_labels: label %lld is %d, outside [0, %d)",
                     (long long)i, (int)labels[i], n_classes);
  if (flipped) memset(flipped, 0, (size_t)n);

  /* Selection sampling (Knuth, TAOCP vol. 2, Algorithm S): index i is taken
   * with probability (still needed) / (still left), which picks exactly k
   * of n, every k-subset equally likely, in one pass and no memory. */
  int64_t k = (int64_t)llround(frac * (double)n), need = k;
  for (int64_t i = 0; i < n && need > 0; i++) {
    if ((int64_t)ad_rng_below(r, (uint64_t)(n - i)) >= need) continue;
    need--;
    /* old + 1 + U{0..C-2} (mod C) is uniform over the C-1 other classes. */
    labels[i] =
        (int32_t)((labels[i] + 1 + (int64_t)ad_rng_below(r, (uint64_t)n_classes - 1)) % n_classes);
    if (flipped) flipped[i] = 1;
  }
  if (n_flipped) *n_flipped = k;
  return AD_OK;
}
