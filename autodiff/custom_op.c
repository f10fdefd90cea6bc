/* custom_op.c — user ops (ad.h, "user ops"): an op defined outside
 * autodiff/ that records and differentiates like a built-in one.
 *
 * A built-in op is an ad_op_def (name, rule, printer) shared by all its
 * nodes, with the attributes in the node. A user op brings its own name
 * and rule, so each application copies onto the tape a small record: an
 * ad_op_def whose name is the user's and whose rule is the trampoline
 * below, the user's definition, and the attributes. The node points at the
 * record's ad_op_def (printing and ad_grad's messages read the name from
 * there) and keeps the record in a.extra (the trampoline finds the user's
 * rule there). Nothing else in autodiff/ knows user ops exist: ad_grad runs
 * the trampoline like any rule, and since the user's rule is made of public
 * ops, a recorded backward records it and second derivatives follow. */
#include "ad_internal.h"

#include <stddef.h>
#include <string.h>

typedef struct {
  ad_op_def def;     /* what the node points at: name, trampoline, printer */
  ad_custom_op op;   /* the user's definition, copied */
  const void *attrs; /* copied into the arena, or the user's pointer */
} custom_rec;

ad_status ad_custom_fail(ad_tape *t, ad_status s, const char *fmt, ...) {
  char buf[640];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  ad__fail(t, s, "%s", buf);
  return s;
}

/* The VJP of every user op: runs the user's rule, then holds it to the
 * contract (each requested gradient shaped like its input, same dtype), so
 * a wrong rule is an error naming the op instead of a wrong answer. */
static void custom_vjp(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                       const int *need) {
  const custom_rec *r = n->a.extra;
  ad_status s = r->op.vjp(t, n->n_in, n->in, n->out, g, need, gin, r->attrs);
  if (s != AD_OK && ad_tape_status(t) == AD_OK)
    ad__fail(t, s, "%s (user op): derivative rule failed (%s) without saying why", r->def.name,
             ad_status_str(s));
  if (ad_tape_status(t) != AD_OK) {
    for (int i = 0; i < n->n_in; i++) gin[i] = NULL;
    return;
  }
  for (int i = 0; i < n->n_in; i++) {
    if (!need[i]) {
      gin[i] = NULL; /* not asked for: ignored */
      continue;
    }
    ad_tensor *x = n->in[i], *gx = gin[i];
    if (gx && (!ad_same_shape(gx, x) || gx->dtype != x->dtype)) {
      char a[96], b[96];
      ad__fail(t, AD_ERR_SHAPE,
               "%s (user op): derivative rule returned %s for input %d, which is %s (a "
               "gradient has its input's shape and dtype)",
               r->def.name, ad_shape_str(gx, a, sizeof a), i, ad_shape_str(x, b, sizeof b));
      for (int k = 0; k < n->n_in; k++) gin[k] = NULL;
      return;
    }
  }
}

static void custom_attr(const ad_node *n, char *buf, size_t len) {
  const custom_rec *r = n->a.extra;
  if (r->op.describe) r->op.describe(r->attrs, buf, len);
}

/* The output's shape: the user's callback, checked, or in[0]'s. */
static int out_shape(ad_tape *t, const ad_custom_op *op, int n_in, ad_tensor *const *in,
                     const void *attrs, int *ndim, int64_t *shape) {
  if (!op->shape) {
    *ndim = in[0]->ndim;
    memcpy(shape, in[0]->shape, sizeof in[0]->shape);
    return 1;
  }
  *ndim = -1;
  for (int d = 0; d < AD_MAX_DIMS; d++) shape[d] = 1;
  ad_status s = op->shape(t, n_in, in, attrs, ndim, shape);
  if (ad_tape_status(t) != AD_OK) return 0;
  if (s != AD_OK) {
    ad__fail(t, s, "%s (user op): shape callback failed (%s)", op->name, ad_status_str(s));
    return 0;
  }
  if (*ndim < 0 || *ndim > AD_MAX_DIMS) {
    ad__fail(t, AD_ERR_SHAPE, "%s (user op): shape callback gave %d dimensions (0..%d allowed)",
             op->name, *ndim, AD_MAX_DIMS);
    return 0;
  }
  for (int d = 0; d < *ndim; d++)
    if (shape[d] < 1) {
      ad__fail(t, AD_ERR_SHAPE, "%s (user op): shape callback gave extent %lld for dimension %d",
               op->name, (long long)shape[d], d);
      return 0;
    }
  return 1;
}

ad_tensor *ad_custom(ad_tape *t, const ad_custom_op *op, int n_in, ad_tensor *const *in,
                     const void *attrs, size_t attrs_size) {
  if (!t) {
    ad__set_last(AD_ERR_NULL, "ad_custom: tape is NULL");
    return NULL;
  }
  if (ad_tape_status(t) != AD_OK) return NULL;
  if (!op) return ad__fail(t, AD_ERR_NULL, "ad_custom: op definition is NULL");
  const char *nm = op->name ? op->name : "(unnamed)";
  if (!op->name || !op->forward || !op->vjp)
    return ad__fail(t, AD_ERR_NULL, "ad_custom: op %s has no %s", nm,
                    !op->name      ? "name"
                    : !op->forward ? "forward"
                                   : "derivative rule (vjp)");
  if (n_in < 1 || !in)
    return ad__fail(t, n_in < 1 ? AD_ERR_ARG : AD_ERR_NULL, "%s (user op): %d inputs%s", nm, n_in,
                    in ? "; at least 1 needed" : " and the input array is NULL");
  if (attrs_size > 0 && !attrs)
    return ad__fail(t, AD_ERR_NULL, "%s (user op): attrs is NULL but attrs_size is %zu", nm,
                    attrs_size);
  if (!ad__check(t, nm, n_in, in)) return NULL;
  int ndim;
  int64_t shape[AD_MAX_DIMS];
  if (!out_shape(t, op, n_in, in, attrs, &ndim, shape)) return NULL;

  /* Only a recorded application needs the record; the attributes are
   * copied before the forward runs so the forward and the rule see the same
   * bytes. */
  int any = 0;
  for (int i = 0; i < n_in; i++) any |= ad_needs_grad(in[i]);
  int record = ad__recording(t) && any;
  custom_rec *rec = NULL;
  const void *at = attrs;
  if (record) {
    /* One block: the record, the attributes (aligned for any type, as a
     * stack struct of the user's was), then the name. */
    size_t al = _Alignof(max_align_t), at_off = (sizeof *rec + al - 1) / al * al;
    size_t name_len = strlen(op->name) + 1;
    char *block = ad_arena_alloc(t, at_off + attrs_size + name_len);
    if (!block) return NULL;
    rec = (custom_rec *)block;
    char *name = block + at_off + attrs_size;
    memcpy(name, op->name, name_len);
    rec->op = *op;
    rec->op.name = name;
    rec->def = (ad_op_def){name, custom_vjp, custom_attr, {0}}; /* reads: undeclared */
    if (attrs_size > 0) {
      memcpy(block + at_off, attrs, attrs_size);
      at = block + at_off;
    }
    rec->attrs = at;
  }

  ad_tensor *out = ad_empty(t, in[0]->dtype, ndim, shape);
  if (!out) return NULL;
  int prev = ad_set_recording(t, 0);
  ad_status s = op->forward(t, n_in, in, out, at);
  ad_set_recording(t, prev);
  if (ad_tape_status(t) != AD_OK) return NULL;
  if (s != AD_OK)
    return ad__fail(t, s, "%s (user op): forward failed (%s) without saying why", nm,
                    ad_status_str(s));
  if (record) {
    ad_node *n = ad__record(t, &rec->def, out, n_in, in);
    if (!n) return NULL;
    n->a.extra = rec;
  }
  return ad__done(t, out, nm);
}
