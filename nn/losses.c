/* losses.c — per-example losses (one value per example, for data
 * reweighting and per-example weighting schemes) and binary cross-entropy
 * with logits. The means over examples live in the core (ad_cross_entropy,
 * ad_mse) or are one ad_mean away. */
#include "nn.h"

#include "autodiff/ad_internal.h"

/* ---------------------------------------------------------------- nll per example */
/* y[i] = -logp[i, label_i]:  d logp = -onehot(label) * h[i] on row i. The
 * onehot is a constant kept on the node, so the rule is linear in h. */
static void vjp_nll_each(ad_tape *t, const ad_node *n, ad_tensor *h, ad_tensor **gin,
                         const int *need) {
  if (!need[0]) return;
  ad_tensor *onehot = n->a.extra;
  ad_tensor *hb = ad_broadcast_axis(t, ad_neg(t, h), 1, n->in[0]->shape[1], 0);
  gin[0] = ad_mul(t, onehot, hb);
}
static const ad_op_def OP_NLL_EACH = {"nll_each", vjp_nll_each, NULL, {0}};

ad_tensor *nn_nll_each(ad_tape *t, ad_tensor *logp, const int32_t *labels, int64_t n) {
  if (!ad__check_labels(t, "nn_nll_each", logp, labels, n)) return NULL;
  int64_t c = logp->shape[1];
  ad_tensor *out = ad__alloc(t, logp->dtype, 1, &n, 0);
  if (!out) return NULL;
  if (logp->dtype == AD_F32) {
    const float *L = AD_F(logp);
    float *Y = AD_F(out);
    for (int64_t i = 0; i < n; i++) Y[i] = -L[i * c + labels[i]];
  } else {
    const double *L = AD_D(logp);
    double *Y = AD_D(out);
    for (int64_t i = 0; i < n; i++) Y[i] = -L[i * c + labels[i]];
  }
  if (!ad__record_labelled(t, &OP_NLL_EACH, out, logp, labels, n)) return NULL;
  return ad__done(t, out, "nll_each");
}

ad_tensor *nn_cross_entropy_each(ad_tape *t, ad_tensor *logits, const int32_t *labels, int64_t n) {
  if (!ad__check(t, "nn_cross_entropy_each", 1, &logits)) return NULL;
  if (logits->ndim != 2) {
    char s[96];
    return ad__fail(t, AD_ERR_SHAPE, "nn_cross_entropy_each: logits must be [N, C], got %s",
                    ad_shape_str(logits, s, sizeof s));
  }
  /* Checked here too, so the message names the function the user called. */
  if (!ad__check_labels(t, "nn_cross_entropy_each", logits, labels, n)) return NULL;
  return nn_nll_each(t, ad_log_softmax(t, logits, 1), labels, n);
}

/* ---------------------------------------------------------------- per-example means */
/* Mean of x [N, ...] over everything but the first axis: [N]. */
static ad_tensor *mean_per_row(ad_tape *t, ad_tensor *x) {
  if (!x) return NULL;
  int64_t n = x->ndim ? x->shape[0] : 1;
  if (x->ndim == 1) return x;
  int64_t shape[2] = {n, x->size / n};
  return ad_mean_axis(t, ad_reshape(t, x, 2, shape), 1, 0);
}

static int same_size_batch(ad_tape *t, const char *op, ad_tensor *a, ad_tensor *b) {
  ad_tensor *in[2] = {a, b};
  if (!ad__check(t, op, 2, in)) return 0;
  if (a->ndim < 1 || a->size != b->size || (b->ndim >= 1 && b->shape[0] != a->shape[0])) {
    char sa[96], sb[96];
    ad__fail(t, AD_ERR_SHAPE, "%s: %s and %s must have the same size and first axis", op,
             ad_shape_str(a, sa, sizeof sa), ad_shape_str(b, sb, sizeof sb));
    return 0;
  }
  return 1;
}

ad_tensor *nn_mse_each(ad_tape *t, ad_tensor *a, ad_tensor *b) {
  if (!same_size_batch(t, "nn_mse_each", a, b)) return NULL;
  if (!ad_same_shape(a, b)) b = ad_reshape(t, b, a->ndim, a->shape);
  ad_tensor *d = ad_sub(t, a, b);
  return mean_per_row(t, ad_mul(t, d, d));
}

/* ---------------------------------------------------------------- bce with logits */
/* l(z, y) = -y log sigma(z) - (1-y) log(1 - sigma(z)) = softplus(z) - y z.
 * ad_softplus is max(z, 0) + log1p(e^-|z|), exact for any |z| where the
 * textbook form overflows or loses everything to log(0). Its derivative is
 * sigma(z) - y, computed with the sign-split sigmoid. */
static ad_tensor *bce_elems(ad_tape *t, const char *op, ad_tensor *z, ad_tensor *y) {
  if (!same_size_batch(t, op, z, y)) return NULL;
  if (!ad_same_shape(z, y)) y = ad_reshape(t, y, z->ndim, z->shape);
  return ad_sub(t, ad_softplus(t, z), ad_mul(t, y, z));
}

ad_tensor *nn_bce_with_logits_each(ad_tape *t, ad_tensor *z, ad_tensor *y) {
  return mean_per_row(t, bce_elems(t, "nn_bce_with_logits_each", z, y));
}

ad_tensor *nn_bce_with_logits(ad_tape *t, ad_tensor *z, ad_tensor *y) {
  ad_tensor *l = bce_elems(t, "nn_bce_with_logits", z, y);
  return l ? ad_mean(t, l) : NULL;
}
