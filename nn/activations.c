/* activations.c — GELU (erf form) and leaky ReLU, each a fused op with a
 * fused backward op, the way the core pairs relu with relu_backward: the
 * first derivative runs as one flat loop, and the backward op's own rule
 * (public ops only) gives exact second and higher derivatives. */
#include "nn.h"

#include "autodiff/ad_internal.h"

#include <math.h>

#define INV_SQRT2 0.70710678118654752440
#define INV_SQRT_2PI 0.39894228040143267794

/* Two typed loops over n elements with `v` the input (and `u` = g[i] for the
 * binary form), so each vectorizes as far as its math calls allow. */
#define LOOP1(out, x, EXPR)                                                                        \
  do {                                                                                             \
    if ((x)->dtype == AD_F32) {                                                                    \
      const float *X_ = AD_F(x);                                                                   \
      float *Y_ = AD_F(out);                                                                       \
      for (int64_t i = 0; i < (x)->size; i++) {                                                    \
        float v = X_[i];                                                                           \
        Y_[i] = (float)(EXPR);                                                                     \
      }                                                                                            \
    } else {                                                                                       \
      const double *X_ = AD_D(x);                                                                  \
      double *Y_ = AD_D(out);                                                                      \
      for (int64_t i = 0; i < (x)->size; i++) {                                                    \
        double v = X_[i];                                                                          \
        Y_[i] = (EXPR);                                                                            \
      }                                                                                            \
    }                                                                                              \
  } while (0)

#define LOOP2(out, g, x, EXPR)                                                                     \
  do {                                                                                             \
    if ((x)->dtype == AD_F32) {                                                                    \
      const float *G_ = AD_F(g), *X_ = AD_F(x);                                                    \
      float *Y_ = AD_F(out);                                                                       \
      for (int64_t i = 0; i < (x)->size; i++) {                                                    \
        float u = G_[i], v = X_[i];                                                                \
        Y_[i] = (float)(EXPR);                                                                     \
      }                                                                                            \
    } else {                                                                                       \
      const double *G_ = AD_D(g), *X_ = AD_D(x);                                                   \
      double *Y_ = AD_D(out);                                                                      \
      for (int64_t i = 0; i < (x)->size; i++) {                                                    \
        double u = G_[i], v = X_[i];                                                               \
        Y_[i] = (EXPR);                                                                            \
      }                                                                                            \
    }                                                                                              \
  } while (0)

/* Checks (g, x) for a fused backward op: same dtype and shape. */
static ad_tensor *backward_out(ad_tape *t, const char *op, ad_tensor *g, ad_tensor *x) {
  ad_tensor *in[2] = {g, x};
  if (!ad__check(t, op, 2, in)) return NULL;
  if (!ad_same_shape(g, x)) {
    char sg[96], sx[96];
    return ad__fail(t, AD_ERR_SHAPE, "%s: g is %s but x is %s", op, ad_shape_str(g, sg, sizeof sg),
                    ad_shape_str(x, sx, sizeof sx));
  }
  return ad__like(t, x);
}

static void attr_slope(const ad_node *n, char *buf, size_t len) {
  snprintf(buf, len, "slope=%g", n->a.c);
}

/* ---------------------------------------------------------------- gelu */
/* gelu(x) = x Phi(x), Phi the standard normal CDF = (1 + erf(x/sqrt2)) / 2.
 * gelu'(x)  = Phi(x) + x phi(x),          phi(x) = exp(-x^2/2) / sqrt(2 pi)
 * gelu''(x) = 2 phi(x) - x^2 phi(x) = phi(x) (2 - x^2). */
static void vjp_gelu(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  if (need[0]) gin[0] = nn_gelu_backward(t, g, n->in[0]);
}
static const ad_op_def OP_GELU = {"gelu", vjp_gelu, NULL, {0}};

ad_tensor *nn_gelu(ad_tape *t, ad_tensor *x) {
  if (!ad__check(t, "nn_gelu", 1, &x)) return NULL;
  ad_tensor *out = ad__like(t, x);
  if (!out) return NULL;
  if (x->dtype == AD_F32)
    LOOP1(out, x, 0.5f * v * (1.0f + erff(v * (float)INV_SQRT2)));
  else
    LOOP1(out, x, 0.5 * v * (1.0 + erf(v * INV_SQRT2)));
  ad__record(t, &OP_GELU, out, 1, &x);
  return ad__done(t, out, "gelu");
}

/* gelu_backward(g, x) = g gelu'(x): linear in g, so d/dg is the same op;
 * d/dx = h g gelu''(x), composed of public ops so it differentiates again. */
static void vjp_gelu_backward(ad_tape *t, const ad_node *n, ad_tensor *h, ad_tensor **gin,
                              const int *need) {
  ad_tensor *g = n->in[0], *x = n->in[1];
  if (need[0]) gin[0] = nn_gelu_backward(t, h, x);
  if (need[1]) {
    ad_tensor *x2 = ad_mul(t, x, x);
    ad_tensor *phi = ad_scale(t, ad_exp(t, ad_scale(t, x2, -0.5)), INV_SQRT_2PI);
    ad_tensor *g2 = ad_mul(t, phi, ad_add_scalar(t, ad_neg(t, x2), 2.0));
    gin[1] = ad_mul(t, ad_mul(t, h, g), g2);
  }
}
static const ad_op_def OP_GELU_BACKWARD = {"gelu_backward", vjp_gelu_backward, NULL, {0}};

ad_tensor *nn_gelu_backward(ad_tape *t, ad_tensor *g, ad_tensor *x) {
  ad_tensor *out = backward_out(t, "nn_gelu_backward", g, x);
  if (!out) return NULL;
  if (x->dtype == AD_F32)
    LOOP2(out, g, x,
          u * (0.5f * (1.0f + erff(v * (float)INV_SQRT2)) +
               v * (float)INV_SQRT_2PI * expf(-0.5f * v * v)));
  else
    LOOP2(out, g, x, u * (0.5 * (1.0 + erf(v * INV_SQRT2)) + v * INV_SQRT_2PI * exp(-0.5 * v * v)));
  ad_tensor *in[2] = {g, x};
  ad__record(t, &OP_GELU_BACKWARD, out, 2, in);
  return ad__done(t, out, "gelu_backward");
}

/* ---------------------------------------------------------------- leaky relu */
/* leaky(x) = x (x > 0), a x (x <= 0):  d leaky = [x > 0 ? 1 : a] dx. */
static void vjp_leaky(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                      const int *need) {
  if (need[0]) gin[0] = nn_leaky_relu_backward(t, g, n->in[0], n->a.c);
}
static const ad_op_def OP_LEAKY = {"leaky_relu", vjp_leaky, attr_slope, {0}};

/* A slope must be a finite number in the dtype it is used in: a NaN or Inf
 * slope would turn every negative input into NaN or Inf with no error. */
static int slope_ok(ad_tape *t, const char *op, double slope, ad_dtype dt) {
  if (ad__finite_in(slope, dt)) return 1;
  ad__fail(t, AD_ERR_ARG, "%s: slope %g must be finite (in %s)", op, slope, ad_dtype_name(dt));
  return 0;
}

ad_tensor *nn_leaky_relu(ad_tape *t, ad_tensor *x, double slope) {
  if (!ad__check(t, "nn_leaky_relu", 1, &x)) return NULL;
  if (!slope_ok(t, "nn_leaky_relu", slope, x->dtype)) return NULL;
  ad_tensor *out = ad__like(t, x);
  if (!out) return NULL;
  if (x->dtype == AD_F32) {
    float a = (float)slope;
    LOOP1(out, x, v > 0 ? v : a * v);
  } else {
    LOOP1(out, x, v > 0 ? v : slope * v);
  }
  ad_node *n = ad__record(t, &OP_LEAKY, out, 1, &x);
  if (n) n->a.c = slope;
  return ad__done(t, out, "leaky_relu");
}

/* leaky_backward(g, x) = g [x > 0 ? 1 : a]: linear in g with the same
 * factor; piecewise constant in x (zero derivative almost everywhere). */
static void vjp_leaky_backward(ad_tape *t, const ad_node *n, ad_tensor *h, ad_tensor **gin,
                               const int *need) {
  if (need[0]) gin[0] = nn_leaky_relu_backward(t, h, n->in[1], n->a.c);
}
static const ad_op_def OP_LEAKY_BACKWARD = {
    "leaky_relu_backward", vjp_leaky_backward, attr_slope, {0}};

ad_tensor *nn_leaky_relu_backward(ad_tape *t, ad_tensor *g, ad_tensor *x, double slope) {
  ad_tensor *in[2] = {g, x};
  if (!ad__check(t, "nn_leaky_relu_backward", 2, in)) return NULL;
  if (!slope_ok(t, "nn_leaky_relu_backward", slope, x->dtype)) return NULL;
  ad_tensor *out = backward_out(t, "nn_leaky_relu_backward", g, x);
  if (!out) return NULL;
  if (x->dtype == AD_F32) {
    float a = (float)slope;
    LOOP2(out, g, x, v > 0 ? u : a * u);
  } else {
    LOOP2(out, g, x, v > 0 ? u : slope * u);
  }
  ad_node *n = ad__record(t, &OP_LEAKY_BACKWARD, out, 2, in);
  if (n) n->a.c = slope;
  return ad__done(t, out, "leaky_relu_backward");
}
