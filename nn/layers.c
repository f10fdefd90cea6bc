/* layers.c — the simple layers: linear, flatten, dropout. Each is a short
 * composition of core ops, so its derivatives of every order come from
 * theirs. */
#include "nn.h"

#include "autodiff/ad_internal.h"

/* y = x w^T + b with w [out, in] (PyTorch's layout): the transpose is a
 * BLIS stride flag, never a copy. */
ad_tensor *nn_linear(ad_tape *t, ad_tensor *x, ad_tensor *w, ad_tensor *b) {
  ad_tensor *in[2] = {x, w};
  if (!ad__check(t, "nn_linear", 2, in)) return NULL;
  if (x->ndim != 2 || w->ndim != 2 || x->shape[1] != w->shape[1] ||
      (b && (b->size != w->shape[0] || b->dtype != w->dtype))) {
    char sx[96], sw[96], sb[96];
    return ad__fail(t, AD_ERR_SHAPE,
                    "nn_linear: x %s, w %s, b %s do not fit (x [N, in], w [out, in], b [out])",
                    ad_shape_str(x, sx, sizeof sx), ad_shape_str(w, sw, sizeof sw),
                    b ? ad_shape_str(b, sb, sizeof sb) : "none");
  }
  ad_tensor *y = ad_matmul(t, x, w, 0, 1);
  return b ? ad_add_rowvec(t, y, b) : y;
}

ad_tensor *nn_flatten(ad_tape *t, ad_tensor *x) {
  if (!ad__check(t, "nn_flatten", 1, &x)) return NULL;
  if (x->ndim < 1) return ad__fail(t, AD_ERR_SHAPE, "nn_flatten: needs at least one axis");
  int64_t shape[2] = {x->shape[0], x->size / x->shape[0]};
  return ad_reshape(t, x, 2, shape);
}

/* Inverted dropout: y = x * m with m = [u >= p] / (1 - p), u ~ U[0, 1) per
 * element, so E[y] = x and evaluation needs no rescaling. m is a constant:
 * d y = m dx, and every higher derivative follows from mul's rule. */
ad_tensor *nn_dropout(ad_tape *t, ad_tensor *x, double p, ad_rng *r, int train) {
  if (!ad__check(t, "nn_dropout", 1, &x)) return NULL;
  if (!(p >= 0.0 && p < 1.0))
    return ad__fail(t, AD_ERR_ARG, "nn_dropout: p = %g outside [0, 1)", p);
  if (!train || p == 0.0) return x;
  if (!r) return ad__fail(t, AD_ERR_NULL, "nn_dropout: rng is NULL in training mode");
  ad_tensor *m = ad__like(t, x);
  if (!m) return NULL;
  double keep = 1.0 / (1.0 - p);
  if (x->dtype == AD_F32) {
    float *M = AD_F(m), k = (float)keep;
    for (int64_t i = 0; i < m->size; i++) M[i] = ad_rng_uniform(r) >= p ? k : 0.0f;
  } else {
    double *M = AD_D(m);
    for (int64_t i = 0; i < m->size; i++) M[i] = ad_rng_uniform(r) >= p ? keep : 0.0;
  }
  return ad_mul(t, x, m);
}
