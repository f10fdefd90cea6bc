/* ops_loss.c — negative log-likelihood with integer labels, cross-entropy,
 * mean squared error. */
#include "ad_internal.h"

#include <string.h>

/* Shared by every op that takes integer labels against log-probabilities
 * [N, C] (here and nn/losses.c). */
int ad__check_labels(ad_tape *t, const char *op, ad_tensor *logp, const int32_t *labels,
                     int64_t n) {
  if (!ad__check(t, op, 1, &logp)) return 0;
  if (!labels) {
    ad__fail(t, AD_ERR_NULL, "%s: labels is NULL", op);
    return 0;
  }
  if (logp->ndim != 2 || logp->shape[0] != n) {
    char s[96];
    ad__fail(t, AD_ERR_SHAPE, "%s: log-probabilities %s do not fit %lld labels", op,
             ad_shape_str(logp, s, sizeof s), (long long)n);
    return 0;
  }
  int64_t c = logp->shape[1];
  for (int64_t i = 0; i < n; i++)
    if (labels[i] < 0 || labels[i] >= c) {
      ad__fail(t, AD_ERR_ARG, "%s: label %lld is %d, outside [0, %lld)", op, (long long)i,
               labels[i], (long long)c);
      return 0;
    }
  return 1;
}

int ad__record_labelled(ad_tape *t, const ad_op_def *op, ad_tensor *out, ad_tensor *logp,
                        const int32_t *labels, int64_t n) {
  if (!ad__recording(t) || !ad_needs_grad(logp)) {
    ad__record(t, op, out, 1, &logp); /* records nothing; marks out if unrecorded */
    return 1;
  }
  /* The rules' constant: onehot(labels), kept on the node. */
  ad_tensor *onehot = ad_zeros_like(t, logp);
  if (!onehot) return 0;
  int64_t c = logp->shape[1];
  for (int64_t i = 0; i < n; i++) ad_set(onehot, i * c + labels[i], 1.0);
  ad_node *nd = ad__record(t, op, out, 1, &logp);
  if (nd) nd->a.extra = onehot;
  return 1;
}

/* nll = -(1/N) sum_i logp[i, y_i]:  d logp = -(g/N) onehot(y). The onehot is
 * a constant kept on the node, so the rule is one mul (linear in g). */
static void vjp_nll(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  if (!need[0]) return;
  ad_tensor *onehot = n->a.extra;
  gin[0] = ad_mul(t, onehot, ad_scale(t, g, -1.0 / (double)n->in[0]->shape[0]));
}
static const ad_op_def OP_NLL = {
    "nll", vjp_nll, NULL, {.mask = AD_SAVES(0, 0, 0, 0) | AD_SAVES_EXTRA_TENSOR}};

ad_tensor *ad_nll(ad_tape *t, ad_tensor *logp, const int32_t *labels, int64_t n) {
  if (!ad__check_labels(t, "ad_nll", logp, labels, n)) return NULL;
  int64_t c = logp->shape[1];
  ad_tensor *out = ad__alloc(t, logp->dtype, 0, NULL, 0);
  if (!out) return NULL;
  double s = 0;
  for (int64_t i = 0; i < n; i++) s -= ad_get(logp, i * c + labels[i]);
  ad_set(out, 0, s / (double)n);
  if (!ad__record_labelled(t, &OP_NLL, out, logp, labels, n)) return NULL;
  return ad__done(t, out, "ad_nll");
}

ad_tensor *ad_cross_entropy(ad_tape *t, ad_tensor *logits, const int32_t *labels, int64_t n) {
  if (!ad__check(t, "ad_cross_entropy", 1, &logits)) return NULL;
  if (logits->ndim != 2) {
    char s[96];
    return ad__fail(t, AD_ERR_SHAPE, "ad_cross_entropy: logits must be [N, C], got %s",
                    ad_shape_str(logits, s, sizeof s));
  }
  /* Checked here too so a bad label is reported under this call's name,
   * not the internal ad_nll's (logits and log_softmax share a shape). */
  if (!ad__check_labels(t, "ad_cross_entropy", logits, labels, n)) return NULL;
  return ad_nll(t, ad_log_softmax(t, logits, 1), labels, n);
}

ad_tensor *ad_mse(ad_tape *t, ad_tensor *a, ad_tensor *b) {
  ad_tensor *in[2] = {a, b};
  if (!ad__check(t, "ad_mse", 2, in)) return NULL;
  if (!ad_same_shape(a, b)) { /* [3, 4] against [4, 3] is a bug, not a reshape */
    char sa[96], sb[96];
    return ad__fail(t, AD_ERR_SHAPE, "ad_mse: shapes %s and %s differ",
                    ad_shape_str(a, sa, sizeof sa), ad_shape_str(b, sb, sizeof sb));
  }
  ad_tensor *d = ad_sub(t, a, b);
  return ad_mean(t, ad_mul(t, d, d));
}
