/* norm.c — layer norm and batch norm, composed of core ops (mean, centre,
 * scale by (var + eps)^-1/2, affine), so their derivatives of every order
 * come from those ops' rules.
 *
 * Batch norm keeps running statistics in an nn_bn_state owned by the
 * caller, and touches them only when asked (NN_BN_UPDATE). An inner loop
 * unrolled for a hypergradient therefore runs with NN_BN_TRAIN alone, or
 * with NN_BN_UPDATE on a copy of the state (nn_bn_state_clone): the
 * statistics used for evaluation never see the inner steps. */
#include "nn.h"

#include "autodiff/ad_internal.h"

#include <math.h>
#include <string.h>

/* ------------------------------------------------------------------ layer norm */

/* x viewed as [M, D]: y = (x - mean) (var + eps)^-1/2 * gamma + beta, the
 * statistics per row (biased variance, as PyTorch). */
ad_tensor *nn_layer_norm(ad_tape *t, ad_tensor *x, ad_tensor *gamma, ad_tensor *beta, double eps) {
  if (!ad__check(t, "nn_layer_norm", 1, &x)) return NULL;
  if (x->ndim < 1) return ad__fail(t, AD_ERR_SHAPE, "nn_layer_norm: x is a scalar");
  int64_t d = x->shape[x->ndim - 1], m = x->size / d;
  if ((gamma && (gamma->size != d || gamma->dtype != x->dtype)) ||
      (beta && (beta->size != d || beta->dtype != x->dtype))) {
    char sx[96], sg[96], sb[96];
    return ad__fail(t, AD_ERR_SHAPE, "nn_layer_norm: gamma %s and beta %s must be [%lld] for x %s",
                    gamma ? ad_shape_str(gamma, sg, sizeof sg) : "none",
                    beta ? ad_shape_str(beta, sb, sizeof sb) : "none", (long long)d,
                    ad_shape_str(x, sx, sizeof sx));
  }
  if (!(eps > 0) || !isfinite(eps))
    return ad__fail(t, AD_ERR_ARG, "nn_layer_norm: eps %g must be finite and > 0", eps);
  int sc = ad__scope_push(t, "nn_layer_norm"); /* errors of the ops below name the layer */
  int64_t shape[2] = {m, d};
  ad_tensor *x2 = ad_reshape(t, x, 2, shape);
  ad_tensor *mu = ad_mean_axis(t, x2, 1, 1);                        /* [M, 1] */
  ad_tensor *xc = ad_sub(t, x2, ad_broadcast_axis(t, mu, 1, d, 1)); /* [M, D] */
  ad_tensor *var = ad_mean_axis(t, ad_mul(t, xc, xc), 1, 1);        /* [M, 1] */
  ad_tensor *rstd = ad_pow_scalar(t, ad_add_scalar(t, var, eps), -0.5);
  ad_tensor *y = ad_mul(t, xc, ad_broadcast_axis(t, rstd, 1, d, 1));
  if (gamma) {
    ad_tensor *g = ad_reshape(t, gamma, 1, &d);
    y = ad_mul(t, y, ad_broadcast_axis(t, g, 0, m, 0));
  }
  if (beta) y = ad_add_rowvec(t, y, beta);
  y = y ? ad_reshape(t, y, x->ndim, x->shape) : NULL;
  ad__scope_pop(t, sc);
  return y;
}

/* ------------------------------------------------------------------ batch norm state */

ad_status nn_bn_state_init(nn_bn_state *s, ad_dtype dt, int64_t channels, double momentum,
                           double eps) {
  if (!s) return ad__set_last(AD_ERR_NULL, "nn_bn_state_init: s is NULL");
  memset(s, 0, sizeof *s);
  /* Written so NaN fails: every comparison with NaN is false. */
  if (channels < 1 || !(momentum >= 0 && momentum <= 1) || !(eps >= 0 && isfinite(eps)))
    return ad__set_last(AD_ERR_ARG,
                        "nn_bn_state_init: channels %lld (>= 1), momentum %g (in [0, 1]), eps %g "
                        "(finite, >= 0)",
                        (long long)channels, momentum, eps);
  s->channels = channels;
  s->momentum = momentum == 0 ? 0.1 : momentum;
  s->eps = eps == 0 ? 1e-5 : eps;
  ad_status st = ad_tensor_new(&s->mean, dt, 1, &channels);
  if (st == AD_OK) st = ad_tensor_new(&s->var, dt, 1, &channels);
  if (st != AD_OK) {
    nn_bn_state_free(s);
    return st;
  }
  for (int64_t c = 0; c < channels; c++) ad_set(s->var, c, 1.0);
  return AD_OK;
}

void nn_bn_state_free(nn_bn_state *s) {
  if (!s) return;
  ad_tensor_free(s->mean);
  ad_tensor_free(s->var);
  s->mean = s->var = NULL;
}

ad_status nn_bn_state_clone(nn_bn_state *dst, const nn_bn_state *src) {
  if (!dst || !src || !src->mean || !src->var)
    return ad__set_last(AD_ERR_NULL, "nn_bn_state_clone: NULL or uninitialised state");
  ad_status st = nn_bn_state_init(dst, src->mean->dtype, src->channels, src->momentum, src->eps);
  if (st != AD_OK) return st;
  ad_copy_values(dst->mean, src->mean);
  ad_copy_values(dst->var, src->var);
  dst->n_updates = src->n_updates;
  return AD_OK;
}

ad_status nn_bn_state_copy(nn_bn_state *dst, const nn_bn_state *src) {
  if (!dst || !src || !src->mean || !dst->mean)
    return ad__set_last(AD_ERR_NULL, "nn_bn_state_copy: NULL or uninitialised state");
  if (dst->channels != src->channels)
    return ad__set_last(AD_ERR_SHAPE, "nn_bn_state_copy: %lld channels into %lld",
                        (long long)src->channels, (long long)dst->channels);
  ad_copy_values(dst->mean, src->mean);
  ad_copy_values(dst->var, src->var);
  dst->n_updates = src->n_updates;
  dst->momentum = src->momentum;
  dst->eps = src->eps;
  return AD_OK;
}

/* ------------------------------------------------------------------ batch norm */

/* v [C] -> [N, C, L], repeated over examples and positions. */
static ad_tensor *per_channel(ad_tape *t, ad_tensor *v, int64_t n, int64_t c, int64_t l) {
  ad_tensor *v1 = ad_reshape(t, v, 1, &c);
  return ad_broadcast_axis(t, ad_broadcast_axis(t, v1, 1, l, 0), 0, n, 0);
}

/* [N, C, L] -> [C]: sum over examples and positions. */
static ad_tensor *sum_nl(ad_tape *t, ad_tensor *x3) {
  return ad_sum_axis(t, ad_sum_axis(t, x3, 2, 0), 0, 0);
}

ad_tensor *nn_batch_norm(ad_tape *t, ad_tensor *x, ad_tensor *gamma, ad_tensor *beta,
                         nn_bn_state *s, unsigned mode) {
  const char *op = "nn_batch_norm";
  if (!ad__check(t, op, 1, &x)) return NULL;
  if (x->ndim != 2 && x->ndim != 4) {
    char sx[96];
    return ad__fail(t, AD_ERR_SHAPE, "%s: x must be [N, C] or [N, C, H, W], got %s", op,
                    ad_shape_str(x, sx, sizeof sx));
  }
  int64_t n = x->shape[0], c = x->shape[1], l = x->size / (n * c);
  int train = (mode & NN_BN_TRAIN) != 0, update = (mode & NN_BN_UPDATE) != 0;
  if (mode & ~(unsigned)(NN_BN_TRAIN | NN_BN_UPDATE))
    return ad__fail(t, AD_ERR_ARG, "%s: unknown mode bits 0x%x", op, mode);
  if (update && !train)
    return ad__fail(t, AD_ERR_ARG, "%s: NN_BN_UPDATE needs NN_BN_TRAIN (batch statistics)", op);
  if ((update || !train) && (!s || !s->mean || !s->var))
    return ad__fail(t, AD_ERR_NULL, "%s: %s needs a running-statistics state", op,
                    train ? "NN_BN_UPDATE" : "evaluation");
  if (s && s->mean && (s->channels != c || s->mean->dtype != x->dtype))
    return ad__fail(t, AD_ERR_SHAPE, "%s: state has %lld %s channels, x has %lld %s", op,
                    (long long)s->channels, ad_dtype_name(s->mean->dtype), (long long)c,
                    ad_dtype_name(x->dtype));
  if ((gamma && (gamma->size != c || gamma->dtype != x->dtype)) ||
      (beta && (beta->size != c || beta->dtype != x->dtype)))
    return ad__fail(t, AD_ERR_SHAPE, "%s: gamma and beta must be [%lld] %s", op, (long long)c,
                    ad_dtype_name(x->dtype));
  if (train && n * l < 2)
    return ad__fail(t, AD_ERR_SHAPE, "%s: batch statistics need more than one value per channel",
                    op);
  /* The state is a plain struct the caller may have edited since init. */
  if (s && s->mean && (!(s->eps > 0) || !isfinite(s->eps)))
    return ad__fail(t, AD_ERR_ARG, "%s: state eps %g must be finite and > 0", op, s->eps);
  if (update && !(s->momentum >= 0 && s->momentum <= 1))
    return ad__fail(t, AD_ERR_ARG, "%s: state momentum %g must be in [0, 1]", op, s->momentum);
  double eps = s && s->mean ? s->eps : 1e-5;
  int64_t shape3[3] = {n, c, l};
  ad_tensor *x3 = ad_reshape(t, x, 3, shape3);
  ad_tensor *xc, *rstd;
  if (train) {
    ad_tensor *mu = ad_scale(t, sum_nl(t, x3), 1.0 / (double)(n * l)); /* [C] */
    xc = ad_sub(t, x3, per_channel(t, mu, n, c, l));
    ad_tensor *var = ad_scale(t, sum_nl(t, ad_mul(t, xc, xc)), 1.0 / (double)(n * l));
    rstd = ad_pow_scalar(t, ad_add_scalar(t, var, eps), -0.5);
    if (update && var) {
      /* running = (1 - m) running + m batch, with the unbiased variance
       * (PyTorch's convention); values only, nothing recorded. */
      double m = s->momentum, unb = (double)(n * l) / (double)(n * l - 1);
      for (int64_t k = 0; k < c; k++) {
        ad_set(s->mean, k, (1 - m) * ad_get(s->mean, k) + m * ad_get(mu, k));
        ad_set(s->var, k, (1 - m) * ad_get(s->var, k) + m * unb * ad_get(var, k));
      }
      s->n_updates++;
    }
  } else {
    /* The running statistics are constants here: copies in the arena, so a
     * later update of the state cannot change what this graph computed. */
    ad_tensor *mean = ad_zeros_like(t, s->mean), *var = ad_zeros_like(t, s->var);
    if (!mean || !var) return NULL;
    ad_copy_values(mean, s->mean);
    ad_copy_values(var, s->var);
    xc = ad_sub(t, x3, per_channel(t, mean, n, c, l));
    rstd = ad_pow_scalar(t, ad_add_scalar(t, var, eps), -0.5);
  }
  ad_tensor *scale = gamma ? ad_mul(t, rstd, ad_reshape(t, gamma, 1, &c)) : rstd;
  ad_tensor *y = ad_mul(t, xc, per_channel(t, scale, n, c, l));
  if (beta) y = ad_add(t, y, per_channel(t, beta, n, c, l));
  return y ? ad_reshape(t, y, x->ndim, x->shape) : NULL;
}
