/* ds_internal.h — helpers shared by the datasets/ files; not installed. */
#ifndef HYPERTAPE_DS_INTERNAL_H
#define HYPERTAPE_DS_INTERNAL_H

#include "autodiff/ad_internal.h"
#include "datasets/ds.h"

#if defined(__GNUC__)
#define DS_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define DS_PRINTF(a, b)
#endif

/* Records a message for ds_errmsg() and returns s, so a failure reads
 * `return ds_fail(AD_ERR_IO, "%s: cannot open", path);`. The message is
 * prefixed with the public function being run ("ds_idx_read: t.idx:
 * cannot open"), unless it starts with that name already, so every message
 * names the call that failed. */
ad_status ds_fail(ad_status s, const char *fmt, ...) DS_PRINTF(2, 3);

/* Called on entry by every fallible public function as
 * ds_enter(__func__): clears the message, so ds_errmsg() is "" after a
 * success, and names the function for ds_fail's prefix. */
void ds_enter(const char *fn);

/* After a public function called another (ds_mnist_load -> ds_idx_read):
 * names fn again for later failures, and prefixes a message the inner call
 * left with fn too ("ds_mnist_load: ds_idx_read: ..."). */
void ds_resume(const char *fn);

/* Copies n elements between raw buffers of the two dtypes (f32/f64). */
void ds_convert(void *dst, ad_dtype dt_dst, const void *src, ad_dtype dt_src, int64_t n);

/* A heap tensor with a status message in ds_errmsg() when it fails. */
ad_status ds_tensor_new(ad_tensor **out, ad_dtype dt, int ndim, const int64_t *shape);

/* 1 if dt is a dtype the tensors know. */
int ds_dtype_ok(ad_dtype dt);

/* Checked size arithmetic: autodiff's one implementation (ad__mul_i64 /
 * ad__add_i64 in autodiff/ad_internal.h), in the builtins' convention the
 * loaders read best: returns 1 when a * b or a + b does not fit an int64_t,
 * else 0 with the result in *r. Every size, count and byte computation on
 * values that come from a file or a caller goes through these, so a huge
 * dimension is an error message instead of a wrapped product. */
static inline int ds_mul_overflow(int64_t a, int64_t b, int64_t *r) {
  return !ad__mul_i64(a, b, r);
}
static inline int ds_add_overflow(int64_t a, int64_t b, int64_t *r) {
  return !ad__add_i64(a, b, r);
}
/* Product of n sizes, each >= 0, times esize (pass 1 for a count): 1 on
 * overflow, else 0 with the product in *r. */
static inline int ds_prod_overflow(int n, const int64_t *dims, int64_t esize, int64_t *r) {
  int64_t p = esize;
  for (int i = 0; i < n; i++)
    if (ds_mul_overflow(p, dims[i], &p)) return 1;
  *r = p;
  return 0;
}

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
