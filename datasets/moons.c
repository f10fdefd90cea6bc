/* moons.c — two interleaving half circles, the small nonlinear
 * classification set of scikit-learn's make_moons, drawn from an ad_rng. */
#include "datasets/ds_internal.h"

#include <math.h>
#include <stdlib.h>

static const double ds_pi = 3.14159265358979323846;

ad_status ds_two_moons(ds_dataset **out, int64_t n, double noise, ad_dtype dt, ad_rng *r) {
  ds_enter(__func__);
  if (!out) return ds_fail(AD_ERR_NULL, "ds_two_moons: out is NULL");
  *out = NULL;
  if (!r) return ds_fail(AD_ERR_NULL, "ds_two_moons: rng is NULL");
  if (n < 2 || !(noise >= 0) || !isfinite(noise) || !ds_dtype_ok(dt))
    return ds_fail(AD_ERR_ARG, "ds_two_moons: bad arguments (n %lld, noise %g, dtype %d)",
                   (long long)n, noise, (int)dt);
  ds_dataset *d = calloc(1, sizeof *d);
  if (!d) return ds_fail(AD_ERR_NOMEM, "ds_two_moons: out of memory");
  ad_status s = ds_tensor_new(&d->x, dt, 2, (int64_t[]){n, 2});
  if (s == AD_OK && !(d->labels = malloc((size_t)n * sizeof *d->labels)))
    s = ds_fail(AD_ERR_NOMEM, "ds_two_moons: out of memory");
  if (s != AD_OK) {
    ds_dataset_free(d);
    return s;
  }
  d->n = n;
  d->dim = 2;
  d->n_classes = 2;

  /* Points in place, in a random order: row perm[i] gets point i. The
   * shuffle comes first so each point's noise is drawn in point order. */
  int64_t n_out = n / 2, n_in = n - n_out;
  int64_t *perm = malloc((size_t)n * sizeof *perm);
  if (!perm) {
    ds_dataset_free(d);
    return ds_fail(AD_ERR_NOMEM, "ds_two_moons: out of memory");
  }
  for (int64_t i = 0; i < n; i++) perm[i] = i;
  for (int64_t i = n - 1; i > 0; i--) {
    int64_t j = (int64_t)ad_rng_below(r, (uint64_t)i + 1);
    int64_t t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
  for (int64_t i = 0; i < n; i++) {
    int outer = i < n_out;
    int64_t k = outer ? i : i - n_out, m = outer ? n_out : n_in;
    double t = m > 1 ? ds_pi * (double)k / (double)(m - 1) : 0.0;
    /* upper moon: (cos t, sin t); lower: (1 - cos t, 0.5 - sin t) */
    double px = outer ? cos(t) : 1.0 - cos(t);
    double py = outer ? sin(t) : 0.5 - sin(t);
    px += noise * ad_rng_normal(r);
    py += noise * ad_rng_normal(r);
    int64_t row = perm[i];
    ds_put(d->x, 2 * row, px);
    ds_put(d->x, 2 * row + 1, py);
    d->labels[row] = outer ? 0 : 1;
  }
  free(perm);
  *out = d;
  return AD_OK;
}
