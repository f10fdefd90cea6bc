/* dataset.c — the ds_dataset container: freeing and slicing. */
#include "datasets/ds_internal.h"

#include <stdlib.h>
#include <string.h>

void ds_dataset_free(ds_dataset *d) {
  if (!d) return;
  ad_tensor_free(d->x);
  ad_tensor_free(d->y);
  ad_tensor_free(d->w_true);
  free(d->labels);
  free(d);
}

/* Rows [start, start+count) of a [n, ...] tensor into a new tensor. */
static ad_status slice_rows(ad_tensor **out, const ad_tensor *t, int64_t start, int64_t count) {
  int64_t shape[AD_MAX_DIMS];
  for (int i = 0; i < t->ndim; i++) shape[i] = t->shape[i];
  shape[0] = count;
  ad_status s = ds_tensor_new(out, t->dtype, t->ndim, shape);
  if (s != AD_OK) return s;
  int64_t per = t->size / t->shape[0];
  size_t es = ad_dtype_size(t->dtype);
  memcpy((*out)->data, (const char *)t->data + (size_t)(start * per) * es,
         (size_t)(count * per) * es);
  return AD_OK;
}

ad_status ds_dataset_slice(ds_dataset **out, const ds_dataset *d, int64_t start, int64_t count) {
  ds_enter(__func__);
  if (!out) return ds_fail(AD_ERR_NULL, "ds_dataset_slice: out is NULL");
  *out = NULL;
  if (!d || !d->x) return ds_fail(AD_ERR_NULL, "ds_dataset_slice: data set is NULL");
  int64_t end;
  if (ds_add_overflow(start, count, &end)) /* the message must not form start + count */
    return ds_fail(AD_ERR_ARG, "ds_dataset_slice: start %lld + count %lld overflows 64 bits",
                   (long long)start, (long long)count);
  if (start < 0 || count < 1 || start > d->n - count)
    return ds_fail(AD_ERR_ARG, "ds_dataset_slice: rows [%lld, %lld) are not inside [0, %lld)",
                   (long long)start, (long long)end, (long long)d->n);
  ds_dataset *r = calloc(1, sizeof *r);
  if (!r) return ds_fail(AD_ERR_NOMEM, "ds_dataset_slice: out of memory");
  *r = *d;
  r->x = r->y = r->w_true = NULL;
  r->labels = NULL;
  r->n = count;
  ad_status s = slice_rows(&r->x, d->x, start, count);
  if (s == AD_OK && d->y) s = slice_rows(&r->y, d->y, start, count);
  if (s == AD_OK && d->w_true) s = slice_rows(&r->w_true, d->w_true, 0, d->w_true->shape[0]);
  if (s == AD_OK && d->labels) {
    r->labels = malloc((size_t)count * sizeof *r->labels);
    if (!r->labels)
      s = ds_fail(AD_ERR_NOMEM, "ds_dataset_slice: out of memory");
    else
      memcpy(r->labels, d->labels + start, (size_t)count * sizeof *r->labels);
  }
  if (s != AD_OK) {
    ds_dataset_free(r);
    return s;
  }
  *out = r;
  return AD_OK;
}
