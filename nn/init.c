/* init.c — weight initialisers (Kaiming / He, Xavier / Glorot), normal and
 * uniform, drawn from the caller's seeded ad_rng so a run is reproducible
 * on every machine. */
#include "nn.h"

#include "autodiff/ad_internal.h"

#include <math.h>

/* PyTorch's convention: w [out, in, k...]: fan_in = in * prod(k),
 * fan_out = out * prod(k). */
ad_status nn_init_fans(const ad_tensor *w, int64_t *fan_in, int64_t *fan_out) {
  if (!w) return ad__set_last(AD_ERR_NULL, "nn_init_fans: w is NULL");
  if (w->ndim < 2) {
    char s[96];
    return ad__set_last(AD_ERR_SHAPE, "nn_init_fans: needs a weight of 2+ dims, got %s",
                        ad_shape_str(w, s, sizeof s));
  }
  int64_t rf = 1;
  for (int i = 2; i < w->ndim; i++) rf *= w->shape[i];
  if (fan_in) *fan_in = w->shape[1] * rf;
  if (fan_out) *fan_out = w->shape[0] * rf;
  return AD_OK;
}

/* A zero-mean draw of standard deviation std: normal, or uniform on
 * [-sqrt(3) std, sqrt(3) std] (the variance of U[-a, a] is a^2 / 3). */
static ad_status fill(ad_tensor *w, ad_rng *r, nn_init_dist dist, double std, const char *who) {
  if (!r) return ad__set_last(AD_ERR_NULL, "%s: rng is NULL", who);
  if (!isfinite(std)) /* a NaN or Inf gain: every weight would be NaN or Inf */
    return ad__set_last(AD_ERR_ARG, "%s: gain gives std %g; it must be finite", who, std);
  if (dist == NN_INIT_NORMAL) {
    ad_tensor_fill_normal(w, r, 0.0, std);
  } else if (dist == NN_INIT_UNIFORM) {
    double a = sqrt(3.0) * std;
    ad_tensor_fill_uniform(w, r, -a, a);
  } else {
    return ad__set_last(AD_ERR_ARG, "%s: unknown distribution %d", who, (int)dist);
  }
  return AD_OK;
}

/* nn_init_fans' error, renamed to the initialiser the user called. */
static ad_status fans_failed(ad_status s, const char *who) {
  char why[256];
  snprintf(why, sizeof why, "%s", ad_last_error());
  return ad__set_last(s, "%s: %s", who, why);
}

/* He et al. 2015, fan_in mode: std = gain / sqrt(fan_in), gain sqrt(2) for
 * ReLU keeps the forward variance constant through the layers. */
ad_status nn_init_kaiming(ad_tensor *w, ad_rng *r, nn_init_dist dist, double gain) {
  int64_t fi = 0;
  ad_status s = nn_init_fans(w, &fi, NULL);
  if (s != AD_OK) return fans_failed(s, "nn_init_kaiming");
  if (gain == 0) gain = sqrt(2.0);
  return fill(w, r, dist, gain / sqrt((double)fi), "nn_init_kaiming");
}

/* Glorot & Bengio 2010: std = gain sqrt(2 / (fan_in + fan_out)). */
ad_status nn_init_xavier(ad_tensor *w, ad_rng *r, nn_init_dist dist, double gain) {
  int64_t fi = 0, fo = 0;
  ad_status s = nn_init_fans(w, &fi, &fo);
  if (s != AD_OK) return fans_failed(s, "nn_init_xavier");
  if (gain == 0) gain = 1.0;
  return fill(w, r, dist, gain * sqrt(2.0 / (double)(fi + fo)), "nn_init_xavier");
}

ad_status nn_init_constant(ad_tensor *w, double v) {
  if (!w) return ad__set_last(AD_ERR_NULL, "nn_init_constant: w is NULL");
  if (!isfinite(v)) return ad__set_last(AD_ERR_ARG, "nn_init_constant: value %g is not finite", v);
  for (int64_t i = 0; i < w->size; i++) ad_set(w, i, v);
  return AD_OK;
}
