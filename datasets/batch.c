/* batch.c — shuffled mini-batch iterator.
 *
 * One permutation array, allocated once; each epoch reshuffles it in place
 * with Fisher-Yates from the iterator's own ad_rng, and each batch copies
 * the selected rows into the caller's tensors. So a training loop that
 * reuses its batch tensors allocates nothing per step, and the sequence of
 * batches depends only on the seed. */
#include "datasets/ds_internal.h"

#include <stdlib.h>
#include <string.h>

struct ds_iter {
  const ad_tensor *x, *y; /* borrowed sources, [n, ...] */
  const int32_t *labels;  /* borrowed, n, or NULL */
  int64_t n;
  int64_t x_per, y_per; /* elements per example */
  ds_iter_opts o;
  ad_rng rng;
  int64_t *perm;        /* order of the current epoch */
  int64_t pos;          /* next position in perm */
  int64_t epoch, index; /* current epoch and batch number in it */
};

static void shuffle(ds_iter *it) {
  if (it->o.no_shuffle) return;
  for (int64_t i = it->n - 1; i > 0; i--) {
    int64_t j = (int64_t)ad_rng_below(&it->rng, (uint64_t)i + 1);
    int64_t t = it->perm[i];
    it->perm[i] = it->perm[j];
    it->perm[j] = t;
  }
}

void ds_iter_reset(ds_iter *it) {
  if (!it) return;
  ad_rng_seed(&it->rng, it->o.seed);
  for (int64_t i = 0; i < it->n; i++) it->perm[i] = i;
  it->pos = it->epoch = it->index = 0;
  shuffle(it);
}

static int64_t rows_of(const ad_tensor *t) {
  return t->ndim >= 1 ? t->shape[0] : 1;
}

ad_status ds_iter_new(ds_iter **out, const ad_tensor *x, const int32_t *labels, const ad_tensor *y,
                      const ds_iter_opts *opts) {
  ds_enter(__func__);
  if (!out) return ds_fail(AD_ERR_NULL, "ds_iter_new: out is NULL");
  *out = NULL;
  if (!x || !x->data || !opts) return ds_fail(AD_ERR_NULL, "ds_iter_new: x or opts is NULL");
  char a[64], b[64];
  int64_t n = rows_of(x);
  if (x->ndim < 1 || n < 1 || !ds_dtype_ok(x->dtype))
    return ds_fail(AD_ERR_ARG, "ds_iter_new: x %s must be [n, ...] with n >= 1",
                   ad_shape_str(x, a, sizeof a));
  if (y && (y->ndim < 1 || rows_of(y) != n || !y->data || !ds_dtype_ok(y->dtype)))
    return ds_fail(AD_ERR_SHAPE, "ds_iter_new: y %s must have %lld rows like x %s",
                   ad_shape_str(y, a, sizeof a), (long long)n, ad_shape_str(x, b, sizeof b));
  if (opts->batch < 1)
    return ds_fail(AD_ERR_ARG, "ds_iter_new: batch %lld; must be >= 1", (long long)opts->batch);
  if (!opts->keep_last && opts->batch > n)
    return ds_fail(AD_ERR_ARG,
                   "ds_iter_new: batch %lld is larger than the %lld examples and the partial "
                   "batch is dropped, so no batch would come (set keep_last)",
                   (long long)opts->batch, (long long)n);
  ds_iter *it = calloc(1, sizeof *it);
  if (it) it->perm = malloc((size_t)n * sizeof *it->perm);
  if (!it || !it->perm) {
    free(it);
    return ds_fail(AD_ERR_NOMEM, "ds_iter_new: out of memory for %lld indices", (long long)n);
  }
  it->x = x;
  it->y = y;
  it->labels = labels;
  it->n = n;
  it->x_per = x->size / n;
  it->y_per = y ? y->size / n : 0;
  it->o = *opts;
  ds_iter_reset(it);
  *out = it;
  return AD_OK;
}

void ds_iter_free(ds_iter *it) {
  if (!it) return;
  free(it->perm);
  free(it);
}

int64_t ds_iter_batches_per_epoch(const ds_iter *it) {
  if (!it) return 0;
  /* ceil(n / batch) without forming n + batch - 1, which wraps for a huge batch */
  int64_t full = it->n / it->o.batch;
  return it->o.keep_last && it->n % it->o.batch ? full + 1 : full;
}

/* A batch buffer must be [batch, ...] with per elements per example. */
static ad_status check_buf(const char *what, const ad_tensor *t, int64_t batch, int64_t per) {
  int64_t want;
  if (t->data && ds_dtype_ok(t->dtype) && t->ndim >= 1 && t->shape[0] == batch &&
      !ds_mul_overflow(batch, per, &want) && t->size == want)
    return AD_OK;
  char a[64];
  return ds_fail(AD_ERR_SHAPE,
                 "ds_iter_next: %s buffer is %s; expected %lld rows of %lld elements (f32/f64)",
                 what, ad_shape_str(t, a, sizeof a), (long long)batch, (long long)per);
}

/* Copies example src_row of src into row dst_row of dst, converting dtype. */
static void copy_row(ad_tensor *dst, int64_t dst_row, const ad_tensor *src, int64_t src_row,
                     int64_t per) {
  size_t ds = ad_dtype_size(dst->dtype), ss = ad_dtype_size(src->dtype);
  ds_convert((char *)dst->data + (size_t)(dst_row * per) * ds, dst->dtype,
             (const char *)src->data + (size_t)(src_row * per) * ss, src->dtype, per);
}

ad_status ds_iter_next(ds_iter *it, ad_tensor *xb, int32_t *lb, ad_tensor *yb, ds_batch *b) {
  ds_enter(__func__);
  if (!it || !xb) return ds_fail(AD_ERR_NULL, "ds_iter_next: iterator or x buffer is NULL");
  int64_t B = it->o.batch;
  ad_status s = check_buf("x", xb, B, it->x_per);
  if (s == AD_OK && yb && !it->y)
    s = ds_fail(AD_ERR_ARG, "ds_iter_next: a y buffer was given but the iterator has no y");
  if (s == AD_OK && yb) s = check_buf("y", yb, B, it->y_per);
  if (s == AD_OK && lb && !it->labels)
    s = ds_fail(AD_ERR_ARG, "ds_iter_next: a label buffer was given but the iterator has none");
  if (s != AD_OK) return s;

  int64_t size = it->n - it->pos < B ? it->n - it->pos : B;
  for (int64_t r = 0; r < size; r++) {
    int64_t src = it->perm[it->pos + r];
    copy_row(xb, r, it->x, src, it->x_per);
    if (yb) copy_row(yb, r, it->y, src, it->y_per);
    if (lb) lb[r] = it->labels[src];
  }
  /* Padding rows of a partial batch: zeros, and label -1 so a loss that
   * forgets to use only b.size rows fails its range check loudly. */
  if (size < B) {
    size_t xs = ad_dtype_size(xb->dtype);
    memset((char *)xb->data + (size_t)(size * it->x_per) * xs, 0,
           (size_t)((B - size) * it->x_per) * xs);
    if (yb) {
      size_t ys = ad_dtype_size(yb->dtype);
      memset((char *)yb->data + (size_t)(size * it->y_per) * ys, 0,
             (size_t)((B - size) * it->y_per) * ys);
    }
    if (lb)
      for (int64_t r = size; r < B; r++) lb[r] = -1;
  }
  it->pos += size;
  int end = it->o.keep_last ? it->pos >= it->n : it->n - it->pos < B;
  if (b) *b = (ds_batch){.size = size, .epoch = it->epoch, .index = it->index, .epoch_end = end};
  it->index++;
  if (end) { /* the next call starts a fresh, reshuffled epoch */
    it->epoch++;
    it->index = 0;
    it->pos = 0;
    shuffle(it);
  }
  return AD_OK;
}
