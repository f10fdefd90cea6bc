/* ds_internal.h — helpers shared by the datasets/ files; not installed. */
#ifndef HYPERTAPE_DS_INTERNAL_H
#define HYPERTAPE_DS_INTERNAL_H

#include "datasets/ds.h"

#if defined(__GNUC__)
#define DS_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define DS_PRINTF(a, b)
#endif

/* Records a message for ds_errmsg() and returns s, so a failure reads
 * `return ds_fail(AD_ERR_IO, "%s: cannot open", path);`. */
ad_status ds_fail(ad_status s, const char *fmt, ...) DS_PRINTF(2, 3);

/* Clears the message: called on entry by every fallible public function,
 * so ds_errmsg() is "" after a success. */
void ds_clear_error(void);

/* Copies n elements between raw buffers of the two dtypes (f32/f64). */
void ds_convert(void *dst, ad_dtype dt_dst, const void *src, ad_dtype dt_src, int64_t n);

/* A heap tensor with a status message in ds_errmsg() when it fails. */
ad_status ds_tensor_new(ad_tensor **out, ad_dtype dt, int ndim, const int64_t *shape);

/* 1 if dt is a dtype the tensors know. */
int ds_dtype_ok(ad_dtype dt);

/* Element i of a heap tensor as double, and back: the generators' loops are
 * short, and these skip the checks ad_get/ad_set make per call. */
static inline double ds_at(const ad_tensor *t, int64_t i) {
  return t->dtype == AD_F32 ? (double)((const float *)t->data)[i] : ((const double *)t->data)[i];
}
static inline void ds_put(ad_tensor *t, int64_t i, double v) {
  if (t->dtype == AD_F32)
    ((float *)t->data)[i] = (float)v;
  else
    ((double *)t->data)[i] = v;
}

#endif
