/* tensor.c — tensors on the heap and in the arena, element access, checks. */
#include "ad_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

size_t ad_dtype_size(ad_dtype dt) {
  return dt == AD_F64 ? 8 : 4;
}
const char *ad_dtype_name(ad_dtype dt) {
  return dt == AD_F32 ? "f32" : dt == AD_F64 ? "f64" : "bad-dtype";
}

int64_t ad__numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i]; /* only for shapes already validated */
  return n;
}

const char *ad__dims_str(int ndim, const int64_t *shape, char *buf, size_t len) {
  if (!buf || len == 0) return "";
  size_t k = (size_t)snprintf(buf, len, "[");
  for (int i = 0; i < ndim && k < len; i++)
    k += (size_t)snprintf(buf + k, len - k, i ? ", %lld" : "%lld", (long long)shape[i]);
  if (k < len) snprintf(buf + k, len - k, "]");
  return buf;
}

/* Validates a shape; returns its element count or -1 with a message. */
static int64_t shape_ok(const char *who, ad_dtype dt, int ndim, const int64_t *shape, ad_tape *t) {
  if (dt != AD_F32 && dt != AD_F64) {
    ad__fail(t, AD_ERR_DTYPE, "%s: dtype %d is neither AD_F32 nor AD_F64", who, (int)dt);
    return -1;
  }
  if (ndim < 0 || ndim > AD_MAX_DIMS) {
    ad__fail(t, AD_ERR_SHAPE, "%s: ndim %d outside 0..%d", who, ndim, AD_MAX_DIMS);
    return -1;
  }
  if (ndim > 0 && !shape) {
    ad__fail(t, AD_ERR_NULL, "%s: shape is NULL", who);
    return -1;
  }
  char sh[160];
  for (int i = 0; i < ndim; i++) {
    if (shape[i] <= 0) {
      ad__fail(t, AD_ERR_SHAPE, "%s: dimension %d of shape %s is %lld (must be >= 1)", who, i,
               ad__dims_str(ndim, shape, sh, sizeof sh), (long long)shape[i]);
      return -1;
    }
  }
  int64_t n;
  if (!ad__numel_ok(ndim, shape, &n)) {
    ad__fail(t, AD_ERR_SHAPE, "%s: shape %s has more than 2^40 elements", who,
             ad__dims_str(ndim, shape, sh, sizeof sh));
    return -1;
  }
  return n;
}

static void set_shape(ad_tensor *x, ad_dtype dt, int ndim, const int64_t *shape, int64_t n) {
  x->dtype = dt;
  x->ndim = ndim;
  for (int i = 0; i < AD_MAX_DIMS; i++) x->shape[i] = i < ndim ? shape[i] : 1;
  x->size = n;
}

static ad_status heap_new(ad_tensor **out, ad_dtype dt, int ndim, const int64_t *shape,
                          const void *src, void *borrow, const char *who) {
  if (!out) return ad__set_last(AD_ERR_NULL, "%s: out is NULL", who);
  *out = NULL;
  int64_t n = shape_ok(who, dt, ndim, shape, NULL);
  if (n < 0) return ad__last_status(); /* shape_ok set the message */
  ad_tensor *x = calloc(1, sizeof *x);
  if (!x) return ad__set_last(AD_ERR_NOMEM, "%s: out of memory", who);
  set_shape(x, dt, ndim, shape, n);
  x->flags = AD_FLAG_HEAP;
  if (borrow) {
    x->data = borrow;
  } else {
    x->data = calloc((size_t)n, ad_dtype_size(dt));
    if (!x->data) {
      free(x);
      return ad__set_last(AD_ERR_NOMEM, "%s: cannot allocate %lld elements", who, (long long)n);
    }
    x->flags |= AD_FLAG_OWNS;
    if (src) memcpy(x->data, src, (size_t)n * ad_dtype_size(dt));
  }
  *out = x;
  ad__clear_last();
  return AD_OK;
}

ad_status ad_tensor_new(ad_tensor **out, ad_dtype dt, int ndim, const int64_t *shape) {
  return heap_new(out, dt, ndim, shape, NULL, NULL, "ad_tensor_new");
}
ad_status ad_tensor_from(ad_tensor **out, ad_dtype dt, int ndim, const int64_t *shape,
                         const void *data) {
  if (!data) {
    if (out) *out = NULL;
    return ad__set_last(AD_ERR_NULL, "ad_tensor_from: data is NULL");
  }
  return heap_new(out, dt, ndim, shape, data, NULL, "ad_tensor_from");
}
ad_status ad_tensor_wrap(ad_tensor **out, ad_dtype dt, int ndim, const int64_t *shape, void *data) {
  if (!data) {
    if (out) *out = NULL;
    return ad__set_last(AD_ERR_NULL, "ad_tensor_wrap: data is NULL");
  }
  return heap_new(out, dt, ndim, shape, NULL, data, "ad_tensor_wrap");
}

void ad_tensor_free(ad_tensor *t) {
  if (!t || !(t->flags & AD_FLAG_HEAP)) return; /* arena tensors die with rewinds */
  ad_tensor_free(t->grad);
  if (t->flags & AD_FLAG_OWNS) free(t->data);
  free(t);
}

int ad_requires_grad(ad_tensor *t, int on) {
  if (!t || t->node) return -1;
  int prev = (t->flags & AD_FLAG_REQ) != 0;
  if (on)
    t->flags |= AD_FLAG_REQ;
  else
    t->flags &= ~AD_FLAG_REQ;
  return prev;
}
int ad_needs_grad(const ad_tensor *t) {
  return t && (t->node || (t->flags & AD_FLAG_REQ));
}
void ad__make_leaf(ad_tensor *x) {
  x->flags |= AD_FLAG_REQ;
}

void ad_zero_grad(ad_tensor *t) {
  if (t && t->grad) memset(t->grad->data, 0, (size_t)t->grad->size * ad_dtype_size(t->grad->dtype));
}

double ad_get(const ad_tensor *t, int64_t i) {
  if (!t || !t->data || i < 0 || i >= t->size) return NAN;
  return t->dtype == AD_F32 ? (double)AD_F(t)[i] : AD_D(t)[i];
}
void ad_set(ad_tensor *t, int64_t i, double v) {
  if (!t || !t->data || i < 0 || i >= t->size) return;
  if (t->dtype == AD_F32)
    AD_F(t)[i] = (float)v;
  else
    AD_D(t)[i] = v;
}
double ad_item(const ad_tensor *t) {
  return ad_get(t, 0);
}

ad_status ad_copy_values(ad_tensor *dst, const ad_tensor *src) {
  if (!dst || !src) return ad__set_last(AD_ERR_NULL, "ad_copy_values: NULL tensor");
  if (!dst->data || !src->data) /* values released by ad_tape_compact */
    return ad__set_last(AD_ERR_ARG,
                        "ad_copy_values: %s's values were released by "
                        "ad_tape_compact",
                        !src->data ? "src" : "dst");
  if (dst->size != src->size)
    return ad__set_last(AD_ERR_SHAPE, "ad_copy_values: %lld elements into %lld",
                        (long long)src->size, (long long)dst->size);
  if (dst->dtype == src->dtype) {
    memmove(dst->data, src->data, (size_t)src->size * ad_dtype_size(src->dtype));
  } else {
    for (int64_t i = 0; i < src->size; i++) ad_set(dst, i, ad_get(src, i));
  }
  ad__clear_last();
  return AD_OK;
}

int ad_same_shape(const ad_tensor *a, const ad_tensor *b) {
  if (!a || !b || a->ndim != b->ndim) return 0;
  for (int i = 0; i < a->ndim; i++)
    if (a->shape[i] != b->shape[i]) return 0;
  return 1;
}

const char *ad_shape_str(const ad_tensor *t, char *buf, size_t len) {
  if (!buf || len == 0) return "";
  if (!t) {
    snprintf(buf, len, "(null)");
    return buf;
  }
  size_t k = (size_t)snprintf(buf, len, "[");
  for (int i = 0; i < t->ndim && k < len; i++)
    k += (size_t)snprintf(buf + k, len - k, i ? ", %lld" : "%lld", (long long)t->shape[i]);
  if (k < len) snprintf(buf + k, len - k, "] %s", ad_dtype_name(t->dtype));
  return buf;
}

void ad_set_name(ad_tensor *x, const char *name) {
  if (x) x->name = name;
}

/* ---- arena tensors */

/* An arena tensor; `who` names the caller in messages. */
static ad_tensor *arena_tensor(ad_tape *t, const char *who, ad_dtype dt, int ndim,
                               const int64_t *shape, int zero) {
  if (!t) {
    ad__set_last(AD_ERR_NULL, "%s: tape is NULL", who);
    return NULL;
  }
  int64_t n = shape_ok(who, dt, ndim, shape, t);
  if (n < 0) return NULL;
  size_t head = (sizeof(ad_tensor) + 63) & ~(size_t)63, bytes, total;
  /* n <= 2^40 makes these exact; checked all the same, as every size is. */
  if (!ad__bytes_ok(n, ad_dtype_size(dt), &bytes) || !ad__add_size(head, bytes, &total)) {
    char sh[160];
    return ad__fail(t, AD_ERR_SHAPE, "%s: shape %s is too large", who,
                    ad__dims_str(ndim, shape, sh, sizeof sh));
  }
  char *p = ad_arena_alloc(t, total);
  if (!p) return NULL;
  ad_tensor *x = (ad_tensor *)p;
  memset(x, 0, sizeof *x);
  set_shape(x, dt, ndim, shape, n);
  x->data = p + head;
  x->flags = AD_FLAG_ARENA;
  x->tape_id = ad__tape_id(t);
  if (zero) memset(x->data, 0, bytes);
  return x;
}

ad_tensor *ad__alloc(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape, int zero) {
  ad_tensor *x = arena_tensor(t, "tensor", dt, ndim, shape, zero);
  if (x) x->flags |= AD_FLAG_OP;
  return x;
}

ad_tensor *ad__view(ad_tape *t, const ad_tensor *x, int ndim, const int64_t *shape) {
  ad_tensor *v = ad_arena_alloc(t, sizeof *v);
  if (!v) return NULL;
  memset(v, 0, sizeof *v);
  set_shape(v, x->dtype, ndim, shape, ad__numel(ndim, shape));
  v->data = x->data;
  v->flags = AD_FLAG_ARENA | AD_FLAG_OP;
  v->tape_id = ad__tape_id(t);
  return v;
}

ad_tensor *ad__like(ad_tape *t, const ad_tensor *x) {
  return ad__alloc(t, x->dtype, x->ndim, x->shape, 0);
}

ad_tensor *ad_empty(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape) {
  return arena_tensor(t, "ad_empty", dt, ndim, shape, 0);
}
ad_tensor *ad_zeros(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape) {
  return arena_tensor(t, "ad_zeros", dt, ndim, shape, 1);
}
/* Fills elements [lo, hi) of x with v (a part of ad__par_for). */
typedef struct {
  ad_tensor *x;
  double v;
} fill_ctx;

static void fill_part(void *vc, int part, int64_t lo, int64_t hi) {
  const fill_ctx *c = vc;
  (void)part;
  if (c->x->dtype == AD_F32) {
    float *p = AD_F(c->x), f = (float)c->v;
    for (int64_t i = lo; i < hi; i++) p[i] = f;
  } else {
    double *p = AD_D(c->x);
    for (int64_t i = lo; i < hi; i++) p[i] = c->v;
  }
}

/* Fills x with v, threaded above 32K elements per part (a store-only
 * loop: smaller parts cost less than waking a thread). */
static ad_tensor *fill(ad_tensor *x, double v) {
  if (!x) return NULL;
  fill_ctx c = {x, v};
  ad__par_for(x->size, 32768, fill_part, &c);
  return x;
}
ad_tensor *ad_full(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape, double v) {
  return fill(arena_tensor(t, "ad_full", dt, ndim, shape, 0), v);
}
ad_tensor *ad_ones(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape) {
  return fill(arena_tensor(t, "ad_ones", dt, ndim, shape, 0), 1.0);
}
ad_tensor *ad_scalar(ad_tape *t, ad_dtype dt, double v) {
  return fill(arena_tensor(t, "ad_scalar", dt, 0, NULL, 0), v);
}
ad_tensor *ad_const(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape, const void *data) {
  if (t && !data) return ad__fail(t, AD_ERR_NULL, "ad_const: data is NULL");
  ad_tensor *x = arena_tensor(t, "ad_const", dt, ndim, shape, 0);
  if (x) memcpy(x->data, data, (size_t)x->size * ad_dtype_size(dt));
  return x;
}
ad_tensor *ad_zeros_like(ad_tape *t, const ad_tensor *x) {
  if (!x) return ad__fail(t, AD_ERR_NULL, "ad_zeros_like: x is NULL");
  if (t && !ad__usable_shape(t, "ad_zeros_like", "input", 0, x)) return NULL;
  return arena_tensor(t, "ad_zeros_like", x->dtype, x->ndim, x->shape, 1);
}
ad_tensor *ad_ones_like(ad_tape *t, const ad_tensor *x) {
  if (!x) return ad__fail(t, AD_ERR_NULL, "ad_ones_like: x is NULL");
  if (t && !ad__usable_shape(t, "ad_ones_like", "input", 0, x)) return NULL;
  return fill(arena_tensor(t, "ad_ones_like", x->dtype, x->ndim, x->shape, 0), 1.0);
}
ad_tensor *ad_randn(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape, ad_rng *r) {
  if (t && !r) return ad__fail(t, AD_ERR_NULL, "ad_randn: rng is NULL");
  ad_tensor *x = arena_tensor(t, "ad_randn", dt, ndim, shape, 0);
  if (x) ad_tensor_fill_normal(x, r, 0.0, 1.0);
  return x;
}
ad_tensor *ad_rand_uniform(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape, ad_rng *r,
                           double lo, double hi) {
  if (t && !r) return ad__fail(t, AD_ERR_NULL, "ad_rand_uniform: rng is NULL");
  /* A NaN, infinite or reversed range would fill the tensor with NaN or
   * values outside it without a word: refuse it. */
  if (t && !(isfinite(lo) && isfinite(hi) && lo <= hi))
    return ad__fail(t, AD_ERR_ARG, "ad_rand_uniform: range [%g, %g) is not finite and ordered", lo,
                    hi);
  ad_tensor *x = arena_tensor(t, "ad_rand_uniform", dt, ndim, shape, 0);
  if (x) ad_tensor_fill_uniform(x, r, lo, hi);
  return x;
}

ad_tensor *ad_detach(ad_tape *t, const ad_tensor *x) {
  if (!t) {
    ad__set_last(AD_ERR_NULL, "ad_detach: tape is NULL");
    return NULL;
  }
  if (!x) return ad__fail(t, AD_ERR_NULL, "ad_detach: x is NULL");
  if (!ad__usable(t, "ad_detach", "input", 0, x)) return NULL;
  /* Arena tensors are never written after the op that made them, so a view
   * without history shares their data safely and costs nothing. A heap
   * tensor (a parameter) may be updated in place later: copy it, so the
   * detached value is the value now. */
  ad_tensor *c;
  if (x->flags & AD_FLAG_HEAP) {
    c = ad__alloc(t, x->dtype, x->ndim, x->shape, 0);
    if (c) memcpy(c->data, x->data, (size_t)x->size * ad_dtype_size(x->dtype));
  } else {
    c = ad__view(t, x, x->ndim, x->shape);
  }
  /* A detached value is a new constant: a leaf one may ad_requires_grad. */
  if (c) c->flags &= ~AD_FLAG_OP;
  return c;
}

/* ---- checks */

int ad__check(ad_tape *t, const char *op, int n, ad_tensor *const *xs) {
  if (!t) {
    ad__set_last(AD_ERR_NULL, "%s: tape is NULL", op);
    return 0;
  }
  for (int i = 0; i < n; i++) {
    if (!xs[i]) {
      ad__fail(t, AD_ERR_NULL, "%s: input %d is NULL", op, i);
      return 0;
    }
    if (!ad__usable(t, op, "input", i, xs[i])) return 0;
  }
  for (int i = 1; i < n; i++) {
    if (xs[i]->dtype != xs[0]->dtype) {
      ad__fail(t, AD_ERR_DTYPE, "%s: input 0 is %s but input %d is %s", op,
               ad_dtype_name(xs[0]->dtype), i, ad_dtype_name(xs[i]->dtype));
      return 0;
    }
  }
  ad__op_begin(t, op, n, xs);
  return 1;
}

int ad__check_binary(ad_tape *t, const char *op, const ad_tensor *a, const ad_tensor *b) {
  if (ad_same_shape(a, b) || a->size == 1 || b->size == 1) return 1;
  char sa[96], sb[96];
  ad__fail(t, AD_ERR_SHAPE, "%s: shapes %s and %s do not match (same shape or size 1)", op,
           ad_shape_str(a, sa, sizeof sa), ad_shape_str(b, sb, sizeof sb));
  return 0;
}

int ad__axis(ad_tape *t, const char *op, const ad_tensor *x, int axis) {
  if (axis < 0 || axis >= x->ndim) {
    char s[96];
    ad__fail(t, AD_ERR_ARG, "%s: axis %d out of range for %s", op, axis,
             ad_shape_str(x, s, sizeof s));
    return 0;
  }
  return 1;
}

void ad__split(const ad_tensor *x, int axis, int64_t *outer, int64_t *n, int64_t *inner) {
  int64_t o = 1, in = 1;
  for (int i = 0; i < axis; i++) o *= x->shape[i];
  for (int i = axis + 1; i < x->ndim; i++) in *= x->shape[i];
  *outer = o;
  *n = x->shape[axis];
  *inner = in;
}
