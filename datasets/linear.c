/* linear.c — linear and logistic regression data with known weights: the
 * closed-form problems against which hypergradients and solvers are
 * checked, so the generating w and b are returned with the data. */
#include "datasets/ds_internal.h"

#include <math.h>
#include <stdlib.h>

/* x ~ N(0, I) [n, dim] and the true weights; z[i] = x_i . w + b. The caller
 * turns z into targets. z is malloc'd (n doubles). */
static ad_status make_linear(ds_dataset **out, double **z, const char *fn, const ds_linear_opts *o,
                             ad_rng *r) {
  *out = NULL;
  *z = NULL;
  if (!o || !r) return ds_fail(AD_ERR_NULL, "%s: NULL argument", fn);
  if (o->n < 1 || o->dim < 1 || !(o->noise >= 0) || !isfinite(o->noise) || !isfinite(o->bias) ||
      !ds_dtype_ok(o->dtype))
    return ds_fail(AD_ERR_ARG, "%s: bad options (n %lld, dim %lld, noise %g, dtype %d)", fn,
                   (long long)o->n, (long long)o->dim, o->noise, (int)o->dtype);
  int64_t nd;
  if (ds_mul_overflow(o->n, o->dim, &nd) || ds_mul_overflow(nd, 8, &nd))
    return ds_fail(AD_ERR_ARG, "%s: n %lld x dim %lld overflows 64 bits", fn, (long long)o->n,
                   (long long)o->dim);
  for (int64_t j = 0; o->w && j < o->dim; j++)
    if (!isfinite(o->w[j]))
      return ds_fail(AD_ERR_ARG, "%s: w[%lld] is %g; the weights must be finite", fn, (long long)j,
                     o->w[j]);
  ds_dataset *d = calloc(1, sizeof *d);
  if (!d) return ds_fail(AD_ERR_NOMEM, "%s: out of memory", fn);
  d->n = o->n;
  d->dim = o->dim;
  d->b_true = o->bias;
  ad_status s = ds_tensor_new(&d->w_true, AD_F64, 1, (int64_t[]){o->dim});
  if (s == AD_OK) s = ds_tensor_new(&d->x, o->dtype, 2, (int64_t[]){o->n, o->dim});
  if (s == AD_OK) s = ds_tensor_new(&d->y, o->dtype, 2, (int64_t[]){o->n, 1});
  if (s == AD_OK && !(*z = malloc((size_t)o->n * sizeof **z)))
    s = ds_fail(AD_ERR_NOMEM, "%s: out of memory", fn);
  if (s != AD_OK) {
    ds_dataset_free(d);
    return s;
  }
  double *w = d->w_true->data;
  for (int64_t j = 0; j < o->dim; j++) w[j] = o->w ? o->w[j] : ad_rng_normal(r);
  for (int64_t i = 0; i < o->n; i++) {
    double acc = o->bias;
    for (int64_t j = 0; j < o->dim; j++) {
      int64_t k = i * o->dim + j;
      ds_put(d->x, k, ad_rng_normal(r));
      acc += ds_at(d->x, k) * w[j]; /* from the stored value: exact in f32 too */
    }
    (*z)[i] = acc;
  }
  *out = d;
  return AD_OK;
}

ad_status ds_linear_regression(ds_dataset **out, const ds_linear_opts *opts, ad_rng *r) {
  ds_enter(__func__);
  if (!out) return ds_fail(AD_ERR_NULL, "ds_linear_regression: out is NULL");
  double *z = NULL;
  ad_status s = make_linear(out, &z, "ds_linear_regression", opts, r);
  if (s != AD_OK) return s;
  for (int64_t i = 0; i < opts->n; i++) ds_put((*out)->y, i, z[i] + opts->noise * ad_rng_normal(r));
  free(z);
  return AD_OK;
}

ad_status ds_logistic_regression(ds_dataset **out, const ds_linear_opts *opts, ad_rng *r) {
  ds_enter(__func__);
  if (!out) return ds_fail(AD_ERR_NULL, "ds_logistic_regression: out is NULL");
  double *z = NULL;
  ad_status s = make_linear(out, &z, "ds_logistic_regression", opts, r);
  if (s != AD_OK) return s;
  ds_dataset *d = *out;
  d->labels = malloc((size_t)d->n * sizeof *d->labels);
  if (!d->labels) {
    free(z);
    ds_dataset_free(d);
    *out = NULL;
    return ds_fail(AD_ERR_NOMEM, "ds_logistic_regression: out of memory");
  }
  d->n_classes = 2;
  for (int64_t i = 0; i < d->n; i++) {
    double p = 1.0 / (1.0 + exp(-z[i]));
    d->labels[i] = ad_rng_uniform(r) < p;
    ds_put(d->y, i, d->labels[i]);
  }
  free(z);
  return AD_OK;
}
