/* ops_shape.c — ops that move elements without arithmetic: reshape,
 * broadcast along an axis, expand a scalar, concat, slice and its adjoint
 * pad. Their rules are each other: slice <-> pad, concat -> slices,
 * sum_axis <-> broadcast_axis. Copies go through memcpy, so one code path
 * serves both dtypes. */
#include "ad_internal.h"

#include <string.h>

/* ---------------------------------------------------------------- threaded copies
 * The copies here are `outer` blocks of `block` bytes each, block o going
 * from src + (o / rep) * src_stride + src_off to dst + o * dst_stride +
 * dst_off (rep > 1 repeats each source block, for broadcasts). A part of
 * ad__par_for takes a range of the bytes of all blocks laid end to end, so
 * one large block is split as well as many small ones. Copies give the same
 * bytes however they are split. */

/* Bytes per part: a part smaller than this costs less than waking a thread. */
#define COPY_GRAIN 131072

typedef struct {
  char *dst;
  const char *src;
  int64_t block, dst_stride, dst_off, src_stride, src_off, rep;
} copy_ctx;

static void copy_part(void *vc, int part, int64_t lo, int64_t hi) {
  const copy_ctx *c = vc;
  (void)part;
  int64_t o = lo / c->block, off = lo % c->block;
  while (lo < hi) {
    int64_t chunk = c->block - off < hi - lo ? c->block - off : hi - lo;
    memcpy(c->dst + o * c->dst_stride + c->dst_off + off,
           c->src + o / c->rep * c->src_stride + c->src_off + off, (size_t)chunk);
    lo += chunk;
    o++;
    off = 0;
  }
}

/* ---------------------------------------------------------------- reshape */
/* d reshape(x) = reshape(g, shape of x) */
static void vjp_reshape(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                        const int *need) {
  if (need[0]) gin[0] = ad_reshape(t, g, n->in[0]->ndim, n->in[0]->shape);
}
static const ad_op_def OP_RESHAPE = {"reshape", vjp_reshape, NULL, {.mask = AD_SAVES(0, 0, 0, 0)}};

ad_tensor *ad_reshape(ad_tape *t, ad_tensor *x, int ndim, const int64_t *shape) {
  if (!ad__check(t, "ad_reshape", 1, &x)) return NULL;
  if (ndim < 0 || ndim > AD_MAX_DIMS || (ndim > 0 && !shape))
    return ad__fail(t, AD_ERR_ARG, "ad_reshape: bad ndim %d or NULL shape", ndim);
  int64_t n;
  char s[96], sh[160];
  for (int i = 0; i < ndim; i++)
    if (shape[i] <= 0)
      return ad__fail(t, AD_ERR_SHAPE, "ad_reshape: dimension %d of %s is %lld", i,
                      ad__dims_str(ndim, shape, sh, sizeof sh), (long long)shape[i]);
  if (!ad__numel_ok(ndim, shape, &n) || n != x->size)
    return ad__fail(t, AD_ERR_SHAPE, "ad_reshape: %s has %lld elements, shape %s does not",
                    ad_shape_str(x, s, sizeof s), (long long)x->size,
                    ad__dims_str(ndim, shape, sh, sizeof sh));
  ad_tensor *out = ad__view(t, x, ndim, shape);
  if (!out) return NULL;
  ad__record(t, &OP_RESHAPE, out, 1, &x);
  return out;
}

/* ---------------------------------------------------------------- broadcast_axis */
/* y repeats x n times along `axis`; its adjoint sums them back. */
static void vjp_broadcast_axis(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                               const int *need) {
  if (!need[0]) return;
  ad_tensor *s = ad_sum_axis(t, g, n->a.axis, n->a.keepdim);
  gin[0] = s ? ad_reshape(t, s, n->in[0]->ndim, n->in[0]->shape) : NULL;
}
static void attr_axis(const ad_node *n, char *buf, size_t len) {
  snprintf(buf, len, "axis=%d", n->a.axis);
}
static const ad_op_def OP_BROADCAST_AXIS = {
    "broadcast_axis", vjp_broadcast_axis, attr_axis, {.mask = AD_SAVES(0, 0, 0, 0)}};

ad_tensor *ad_broadcast_axis(ad_tape *t, ad_tensor *x, int axis, int64_t n, int keepdim) {
  if (!ad__check(t, "ad_broadcast_axis", 1, &x)) return NULL;
  int nd = keepdim ? x->ndim : x->ndim + 1;
  if (axis < 0 || axis >= nd || nd > AD_MAX_DIMS || n <= 0 || (keepdim && x->shape[axis] != 1))
    return ad__fail(t, AD_ERR_ARG,
                    "ad_broadcast_axis: cannot repeat a %d-dim tensor %lld times along axis %d "
                    "(keepdim %d)",
                    x->ndim, (long long)n, axis, keepdim);
  int64_t shape[AD_MAX_DIMS];
  /* The output shape is x's with `axis` set (keepdim) or inserted as n. */
  for (int i = 0, j = 0; i < nd; i++) {
    if (i == axis) {
      shape[i] = n;
      if (keepdim) j++;
    } else {
      shape[i] = x->shape[j++];
    }
  }
  int64_t numel;
  if (!ad__numel_ok(nd, shape, &numel)) {
    char s[96];
    return ad__fail(t, AD_ERR_SHAPE,
                    "ad_broadcast_axis: repeating %s %lld times along axis %d gives more than "
                    "2^40 elements",
                    ad_shape_str(x, s, sizeof s), (long long)n, axis);
  }
  ad_tensor *out = ad__alloc(t, x->dtype, nd, shape, 0);
  if (!out) return NULL;
  int64_t outer = 1, inner = 1;
  for (int i = 0; i < axis; i++) outer *= shape[i];
  for (int i = axis + 1; i < nd; i++) inner *= shape[i];
  size_t es = ad_dtype_size(x->dtype), row = (size_t)inner * es;
  const char *X = x->data;
  char *Y = out->data;
  /* Output row o * n + k is input row o. */
  copy_ctx c = {Y, X, (int64_t)row, (int64_t)row, 0, (int64_t)row, 0, n};
  ad__par_for(outer * n * c.block, COPY_GRAIN, copy_part, &c);
  ad_node *nd_ = ad__record(t, &OP_BROADCAST_AXIS, out, 1, &x);
  if (nd_) {
    nd_->a.axis = axis;
    nd_->a.keepdim = keepdim;
    nd_->a.i0 = n;
  }
  return out;
}

/* ---------------------------------------------------------------- expand */
/* y = x (size 1) everywhere in `like`'s shape:  dx = sum(g) */
static void vjp_expand(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                       const int *need) {
  if (need[0]) gin[0] = ad_reshape(t, ad_sum(t, g), n->in[0]->ndim, n->in[0]->shape);
}
static const ad_op_def OP_EXPAND = {"expand", vjp_expand, NULL, {.mask = AD_SAVES(0, 0, 0, 0)}};

ad_tensor *ad_expand(ad_tape *t, ad_tensor *x, const ad_tensor *like) {
  if (!ad__check(t, "ad_expand", 1, &x)) return NULL;
  if (!like) return ad__fail(t, AD_ERR_NULL, "ad_expand: like is NULL");
  if (!ad__usable_shape(t, "ad_expand", "like", 0, like)) return NULL;
  if (x->size != 1) {
    char s[96];
    return ad__fail(t, AD_ERR_SHAPE, "ad_expand: needs a size-1 tensor, got %s",
                    ad_shape_str(x, s, sizeof s));
  }
  ad_tensor *out = ad_full(t, x->dtype, like->ndim, like->shape, ad_item(x));
  if (!out) return NULL;
  ad__record(t, &OP_EXPAND, out, 1, &x);
  return out;
}

/* ---------------------------------------------------------------- slice / pad */
/* Copies a block: for every outer index, `len` rows of `inner` elements from
 * src (axis length ns, offset os) to dst (axis length nd, offset od). */
static void copy_block(char *dst, int64_t nd, int64_t od, const char *src, int64_t ns, int64_t os,
                       int64_t outer, int64_t len, int64_t inner, size_t es) {
  size_t row = (size_t)inner * es;
  copy_ctx c = {dst,
                src,
                (int64_t)row * len,
                (int64_t)row * nd,
                (int64_t)row * od,
                (int64_t)row * ns,
                (int64_t)row * os,
                1};
  ad__par_for(outer * c.block, COPY_GRAIN, copy_part, &c);
}

static void vjp_slice(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                      const int *need) {
  if (need[0]) gin[0] = ad_pad_axis(t, g, n->a.axis, n->a.i0, n->in[0]->shape[n->a.axis]);
}
static void attr_slice(const ad_node *n, char *buf, size_t len) {
  snprintf(buf, len, "axis=%d start=%lld len=%lld", n->a.axis, (long long)n->a.i0,
           (long long)n->a.i1);
}
static const ad_op_def OP_SLICE = {"slice", vjp_slice, attr_slice, {.mask = AD_SAVES(0, 0, 0, 0)}};

ad_tensor *ad_slice(ad_tape *t, ad_tensor *x, int axis, int64_t start, int64_t len) {
  if (!ad__check(t, "ad_slice", 1, &x) || !ad__axis(t, "ad_slice", x, axis)) return NULL;
  if (len <= 0 || !ad__range_ok(start, len, x->shape[axis])) {
    char s[96];
    return ad__fail(t, AD_ERR_ARG, "ad_slice: start %lld, length %lld is not inside axis %d of %s",
                    (long long)start, (long long)len, axis, ad_shape_str(x, s, sizeof s));
  }
  int64_t shape[AD_MAX_DIMS];
  memcpy(shape, x->shape, sizeof shape);
  shape[axis] = len;
  ad_tensor *out = ad__alloc(t, x->dtype, x->ndim, shape, 0);
  if (!out) return NULL;
  int64_t outer, n, inner;
  ad__split(x, axis, &outer, &n, &inner);
  copy_block(out->data, len, 0, x->data, n, start, outer, len, inner, ad_dtype_size(x->dtype));
  ad_node *nd = ad__record(t, &OP_SLICE, out, 1, &x);
  if (nd) {
    nd->a.axis = axis;
    nd->a.i0 = start;
    nd->a.i1 = len;
  }
  return out;
}

static void vjp_pad(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  if (need[0]) gin[0] = ad_slice(t, g, n->a.axis, n->a.i0, n->in[0]->shape[n->a.axis]);
}
static const ad_op_def OP_PAD = {"pad_axis", vjp_pad, attr_slice, {.mask = AD_SAVES(0, 0, 0, 0)}};

ad_tensor *ad_pad_axis(ad_tape *t, ad_tensor *x, int axis, int64_t start, int64_t full_len) {
  if (!ad__check(t, "ad_pad_axis", 1, &x) || !ad__axis(t, "ad_pad_axis", x, axis)) return NULL;
  if (!ad__range_ok(start, x->shape[axis], full_len))
    return ad__fail(t, AD_ERR_ARG, "ad_pad_axis: %lld elements at %lld do not fit in %lld",
                    (long long)x->shape[axis], (long long)start, (long long)full_len);
  int64_t shape[AD_MAX_DIMS], numel;
  memcpy(shape, x->shape, sizeof shape);
  shape[axis] = full_len;
  if (!ad__numel_ok(x->ndim, shape, &numel)) {
    char s[96];
    return ad__fail(t, AD_ERR_SHAPE,
                    "ad_pad_axis: padding axis %d of %s to %lld gives more than 2^40 elements",
                    axis, ad_shape_str(x, s, sizeof s), (long long)full_len);
  }
  ad_tensor *out = ad__alloc(t, x->dtype, x->ndim, shape, 1);
  if (!out) return NULL;
  int64_t outer, n, inner;
  ad__split(x, axis, &outer, &n, &inner);
  copy_block(out->data, full_len, start, x->data, n, 0, outer, n, inner, ad_dtype_size(x->dtype));
  ad_node *nd = ad__record(t, &OP_PAD, out, 1, &x);
  if (nd) {
    nd->a.axis = axis;
    nd->a.i0 = start;
    nd->a.i1 = full_len;
  }
  return out;
}

/* ---------------------------------------------------------------- concat */
/* d concat(x_0..x_k) splits g back into the pieces. */
static void vjp_concat(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                       const int *need) {
  int64_t off = 0;
  for (int i = 0; i < n->n_in; i++) {
    int64_t len = n->in[i]->shape[n->a.axis];
    if (need[i]) gin[i] = ad_slice(t, g, n->a.axis, off, len);
    off += len;
  }
}
static const ad_op_def OP_CONCAT = {"concat", vjp_concat, attr_axis, {0}};

ad_tensor *ad_concat(ad_tape *t, int n, ad_tensor *const *xs, int axis) {
  if (t && (n <= 0 || !xs)) return ad__fail(t, AD_ERR_ARG, "ad_concat: no inputs");
  if (!ad__check(t, "ad_concat", n, xs) || !ad__axis(t, "ad_concat", xs[0], axis)) return NULL;
  int64_t shape[AD_MAX_DIMS];
  memcpy(shape, xs[0]->shape, sizeof shape);
  shape[axis] = 0;
  for (int i = 0; i < n; i++) {
    int ok = xs[i]->ndim == xs[0]->ndim;
    for (int d = 0; ok && d < xs[0]->ndim; d++)
      if (d != axis && xs[i]->shape[d] != xs[0]->shape[d]) ok = 0;
    if (!ok) {
      char a[96], b[96];
      return ad__fail(t, AD_ERR_SHAPE, "ad_concat: input %d is %s, input 0 is %s (axis %d)", i,
                      ad_shape_str(xs[i], a, sizeof a), ad_shape_str(xs[0], b, sizeof b), axis);
    }
    if (!ad__add_i64(shape[axis], xs[i]->shape[axis], &shape[axis]))
      return ad__fail(t, AD_ERR_SHAPE, "ad_concat: the lengths along axis %d overflow", axis);
  }
  int64_t numel;
  if (!ad__numel_ok(xs[0]->ndim, shape, &numel)) {
    char sh[160];
    return ad__fail(t, AD_ERR_SHAPE, "ad_concat: the result %s has more than 2^40 elements",
                    ad__dims_str(xs[0]->ndim, shape, sh, sizeof sh));
  }
  ad_tensor *out = ad__alloc(t, xs[0]->dtype, xs[0]->ndim, shape, 0);
  if (!out) return NULL;
  int64_t off = 0;
  for (int i = 0; i < n; i++) {
    int64_t outer, len, inner;
    ad__split(xs[i], axis, &outer, &len, &inner);
    copy_block(out->data, shape[axis], off, xs[i]->data, len, 0, outer, len, inner,
               ad_dtype_size(out->dtype));
    off += len;
  }
  ad_node *nd = ad__record(t, &OP_CONCAT, out, n, xs);
  if (nd) nd->a.axis = axis;
  return out;
}
