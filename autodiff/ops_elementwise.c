/* ops_elementwise.c — elementwise ops and their derivative rules.
 * Binary ops take same-shape operands or one operand of size 1, broadcast. */
#include "ad_internal.h"
#include "ad_simd.h"

#include <tgmath.h> /* exp(v) is expf for float v: one loop body, two dtypes */

/* ---------------------------------------------------------------- threaded loops
 * Every op's loop runs through ad__par_for: large tensors are split into
 * parts run on the library's threads (ad_set_threads), small ones run on
 * the caller's thread. Each element is computed by the same expression on
 * the same types whichever part it falls in, so the result is bit-identical
 * at every thread count. A kernel is one function per expression (C has no
 * closures), written once for both dtypes: `c` is the op's constant in the
 * element type (as (float)c was for f32 before), `v` the element (unary) or
 * `u`, `v` the two operands (binary). */

/* Elements per part: below this a part costs less than waking a thread
 * (~1 us spinning, 10-30 us from sleep on the 2-core test machine; a cheap
 * op does ~4-8 elements per ns). Transcendental ops cost ~10x more per
 * element, so a smaller part pays. */
#define EW_GRAIN 32768
#define EW_GRAIN_HEAVY 4096

typedef struct {
  const ad_tensor *a, *b;
  ad_tensor *out;
  double c;
} ew_ctx;

#define EW_KERNEL_U(NAME, EXPR)                                                                    \
  AD_WIDE_PASS(                                                                                    \
      NAME, const ew_ctx *k_ = ctx; (void)part; if (k_->out->dtype == AD_F32) {                    \
        const float *X_ = AD_F(k_->a);                                                             \
        float *Y_ = AD_F(k_->out);                                                                 \
        const float c = (float)k_->c;                                                              \
        (void)c;                                                                                   \
        for (int64_t i = lo; i < hi; i++) {                                                        \
          float v = X_[i];                                                                         \
          Y_[i] = (EXPR);                                                                          \
        }                                                                                          \
      } else {                                                                                     \
        const double *X_ = AD_D(k_->a);                                                            \
        double *Y_ = AD_D(k_->out);                                                                \
        const double c = k_->c;                                                                    \
        (void)c;                                                                                   \
        for (int64_t i = lo; i < hi; i++) {                                                        \
          double v = X_[i];                                                                        \
          Y_[i] = (EXPR);                                                                          \
        }                                                                                          \
      })

/* One typed binary loop over [lo, hi); SA/SB are 0 (elementwise) or 1
 * (broadcast scalar), known at compile time so each of the three loops
 * vectorizes. */
#define EW_RANGE(T, k_, lo, hi, SA, SB, EXPR)                                                      \
  do {                                                                                             \
    const T *A_ = (const T *)(k_)->a->data, *B_ = (const T *)(k_)->b->data;                        \
    T *Y_ = (T *)(k_)->out->data;                                                                  \
    const T c = (T)(k_)->c;                                                                        \
    (void)c;                                                                                       \
    for (int64_t i = (lo); i < (hi); i++) {                                                        \
      T u = A_[(SA) ? 0 : i], v = B_[(SB) ? 0 : i];                                                \
      Y_[i] = (EXPR);                                                                              \
    }                                                                                              \
  } while (0)

#define EW_RANGE_T(T, k_, lo, hi, EXPR)                                                            \
  do {                                                                                             \
    if ((k_)->a->size == (k_)->out->size && (k_)->b->size == (k_)->out->size)                      \
      EW_RANGE(T, k_, lo, hi, 0, 0, EXPR);                                                         \
    else if ((k_)->a->size == 1)                                                                   \
      EW_RANGE(T, k_, lo, hi, 1, 0, EXPR);                                                         \
    else                                                                                           \
      EW_RANGE(T, k_, lo, hi, 0, 1, EXPR);                                                         \
  } while (0)

#define EW_KERNEL_B(NAME, EXPR)                                                                    \
  AD_WIDE_PASS(NAME, const ew_ctx *k_ = ctx; (void)part;                                           \
               if (k_->out->dtype == AD_F32) EW_RANGE_T(float, k_, lo, hi, EXPR);                  \
               else EW_RANGE_T(double, k_, lo, hi, EXPR);)

/* Runs kernel FN over out (operands a, b, constant c) in parts of GRAIN. */
#define EW_RUN(FN, out, a_, b_, c_, GRAIN)                                                         \
  do {                                                                                             \
    ew_ctx k_ = {(a_), (b_), (out), (c_)};                                                         \
    ad__par_for((out)->size, (GRAIN), FN, &k_);                                                    \
  } while (0)

EW_KERNEL_B(k_add, u + v)
EW_KERNEL_B(k_sub, u - v)
EW_KERNEL_B(k_mul, u *v)
EW_KERNEL_B(k_div, u / v)
EW_KERNEL_B(k_axpy, u + c * v)
EW_KERNEL_B(k_relu_backward, v > 0 ? u : v != v ? v : 0) /* like relu: NaN at x = NaN */
EW_KERNEL_U(k_neg, -v)
EW_KERNEL_U(k_scale, c *v)
EW_KERNEL_U(k_add_scalar, v + c)
EW_KERNEL_U(k_square, v *v)
EW_KERNEL_U(k_sqrt, sqrt(v))
EW_KERNEL_U(k_pow, pow(v, c))
EW_KERNEL_U(k_exp, exp(v))
EW_KERNEL_U(k_log, log(v))
EW_KERNEL_U(k_tanh, tanh(v))
/* Split by sign so exp never overflows: for v < 0, e^v / (1 + e^v). */
EW_KERNEL_U(k_sigmoid, v >= 0 ? 1 / (1 + exp(-v)) : exp(v) / (1 + exp(v)))
/* max(v, 0) + log1p(e^-|v|): exact for large |v| where log(1+e^v) overflows. */
EW_KERNEL_U(k_softplus, (v > 0 ? v : 0) + log1p(exp(-fabs(v))))
EW_KERNEL_U(k_relu, v > 0 || v != v ? v : 0) /* relu(NaN) = NaN: a NaN is not clipped away */
EW_KERNEL_U(k_abs, fabs(v))
EW_KERNEL_U(k_sign, (v > 0) - (v < 0))

/* Gradient of a broadcast operand: sum over the broadcast (d/da of f(a,...)
 * where a was repeated is the sum of the repeated contributions). */
static ad_tensor *unbroadcast(ad_tape *t, ad_tensor *g, const ad_tensor *like) {
  if (!g || g->size == like->size) return g;
  return ad_reshape(t, ad_sum(t, g), like->ndim, like->shape);
}

static ad_tensor *binary_out(ad_tape *t, const char *op, ad_tensor *a, ad_tensor *b) {
  ad_tensor *in[2] = {a, b};
  if (!ad__check(t, op, 2, in) || !ad__check_binary(t, op, a, b)) return NULL;
  return ad__like(t, a->size >= b->size ? a : b);
}

static ad_tensor *unary_out(ad_tape *t, const char *op, ad_tensor *x) {
  if (!ad__check(t, op, 1, &x)) return NULL;
  return ad__like(t, x);
}

/* A number an op applies to every element (ad_scale's c, ad_pow_scalar's
 * p, ...) must be finite in the dtype it is used in (ad__finite_in): else
 * the output is NaN or Inf with no error. Names the op and the argument. */
static int const_ok(ad_tape *t, const char *op, const char *arg, double c, ad_dtype dt) {
  if (ad__finite_in(c, dt)) return 1;
  ad__fail(t, AD_ERR_ARG, "%s: %s = %g must be finite (in %s)", op, arg, c, ad_dtype_name(dt));
  return 0;
}

static void attr_c(const ad_node *n, char *buf, size_t len) {
  snprintf(buf, len, "c=%g", n->a.c);
}

/* ---------------------------------------------------------------- add */
/* d(a+b) = da + db */
static void vjp_add(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  if (need[0]) gin[0] = unbroadcast(t, g, n->in[0]);
  if (need[1]) gin[1] = unbroadcast(t, g, n->in[1]);
}
static const ad_op_def OP_ADD = {"add", vjp_add, NULL, {.mask = AD_SAVES(0, 0, 0, 0)}};

ad_tensor *ad_add(ad_tape *t, ad_tensor *a, ad_tensor *b) {
  ad_tensor *out = binary_out(t, "ad_add", a, b);
  if (!out) return NULL;
  EW_RUN(k_add, out, a, b, 0.0, EW_GRAIN);
  ad_tensor *in[2] = {a, b};
  ad__record(t, &OP_ADD, out, 2, in);
  return ad__done(t, out, "ad_add");
}

/* ---------------------------------------------------------------- sub */
/* d(a-b) = da - db */
static void vjp_sub(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  if (need[0]) gin[0] = unbroadcast(t, g, n->in[0]);
  if (need[1]) gin[1] = unbroadcast(t, ad_neg(t, g), n->in[1]);
}
static const ad_op_def OP_SUB = {"sub", vjp_sub, NULL, {.mask = AD_SAVES(0, 0, 0, 0)}};

ad_tensor *ad_sub(ad_tape *t, ad_tensor *a, ad_tensor *b) {
  ad_tensor *out = binary_out(t, "ad_sub", a, b);
  if (!out) return NULL;
  EW_RUN(k_sub, out, a, b, 0.0, EW_GRAIN);
  ad_tensor *in[2] = {a, b};
  ad__record(t, &OP_SUB, out, 2, in);
  return ad__done(t, out, "ad_sub");
}

/* ---------------------------------------------------------------- mul */
/* d(ab) = b da + a db */
static void vjp_mul(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  if (need[0]) gin[0] = unbroadcast(t, ad_mul(t, g, n->in[1]), n->in[0]);
  if (need[1]) gin[1] = unbroadcast(t, ad_mul(t, g, n->in[0]), n->in[1]);
}
static const ad_op_def OP_MUL = {
    "mul", vjp_mul, NULL, {.mask = AD_SAVES(AD_S_IN(1), AD_S_IN(0), 0, 0)}};

ad_tensor *ad_mul(ad_tape *t, ad_tensor *a, ad_tensor *b) {
  ad_tensor *out = binary_out(t, "ad_mul", a, b);
  if (!out) return NULL;
  EW_RUN(k_mul, out, a, b, 0.0, EW_GRAIN);
  ad_tensor *in[2] = {a, b};
  ad__record(t, &OP_MUL, out, 2, in);
  return ad__done(t, out, "ad_mul");
}

/* ---------------------------------------------------------------- div */
/* d(a/b) = da/b - (a/b) db/b */
static void vjp_div(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  ad_tensor *gb = ad_div(t, g, n->in[1]);
  if (need[0]) gin[0] = unbroadcast(t, gb, n->in[0]);
  if (need[1]) gin[1] = unbroadcast(t, ad_neg(t, ad_mul(t, gb, n->out)), n->in[1]);
}
static const ad_op_def OP_DIV = {
    "div", vjp_div, NULL, {.mask = AD_SAVES(AD_S_IN(1), AD_S_IN(1) | AD_S_OUT, 0, 0)}};

ad_tensor *ad_div(ad_tape *t, ad_tensor *a, ad_tensor *b) {
  ad_tensor *out = binary_out(t, "ad_div", a, b);
  if (!out) return NULL;
  EW_RUN(k_div, out, a, b, 0.0, EW_GRAIN);
  ad_tensor *in[2] = {a, b};
  ad__record(t, &OP_DIV, out, 2, in);
  return ad__done(t, out, "ad_div");
}

/* ---------------------------------------------------------------- neg, scale, add_scalar */
/* d(-x) = -dx */
static void vjp_neg(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  (void)n;
  if (need[0]) gin[0] = ad_neg(t, g);
}
static const ad_op_def OP_NEG = {"neg", vjp_neg, NULL, {.mask = AD_SAVES(0, 0, 0, 0)}};

ad_tensor *ad_neg(ad_tape *t, ad_tensor *x) {
  ad_tensor *out = unary_out(t, "ad_neg", x);
  if (!out) return NULL;
  EW_RUN(k_neg, out, x, NULL, 0.0, EW_GRAIN);
  ad__record(t, &OP_NEG, out, 1, &x);
  return out;
}

/* d(c x) = c dx */
static void vjp_scale(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                      const int *need) {
  if (need[0]) gin[0] = ad_scale(t, g, n->a.c);
}
static const ad_op_def OP_SCALE = {"scale", vjp_scale, attr_c, {.mask = AD_SAVES(0, 0, 0, 0)}};

ad_tensor *ad_scale(ad_tape *t, ad_tensor *x, double c) {
  ad_tensor *out = unary_out(t, "ad_scale", x);
  if (!out || !const_ok(t, "ad_scale", "c", c, x->dtype)) return NULL;
  EW_RUN(k_scale, out, x, NULL, c, EW_GRAIN);
  ad_node *n = ad__record(t, &OP_SCALE, out, 1, &x);
  if (n) n->a.c = c;
  return ad__done(t, out, "ad_scale");
}

/* d(x + c) = dx */
static void vjp_add_scalar(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                           const int *need) {
  (void)t, (void)n;
  if (need[0]) gin[0] = g;
}
static const ad_op_def OP_ADD_SCALAR = {
    "add_scalar", vjp_add_scalar, attr_c, {.mask = AD_SAVES(0, 0, 0, 0)}};

ad_tensor *ad_add_scalar(ad_tape *t, ad_tensor *x, double c) {
  ad_tensor *out = unary_out(t, "ad_add_scalar", x);
  if (!out || !const_ok(t, "ad_add_scalar", "c", c, x->dtype)) return NULL;
  EW_RUN(k_add_scalar, out, x, NULL, c, EW_GRAIN);
  ad_node *n = ad__record(t, &OP_ADD_SCALAR, out, 1, &x);
  if (n) n->a.c = c;
  return ad__done(t, out, "ad_add_scalar");
}

/* d(a + c b) = da + c db */
static void vjp_axpy(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  if (need[0]) gin[0] = unbroadcast(t, g, n->in[0]);
  if (need[1]) gin[1] = unbroadcast(t, ad_scale(t, g, n->a.c), n->in[1]);
}
static const ad_op_def OP_AXPY = {"axpy", vjp_axpy, attr_c, {.mask = AD_SAVES(0, 0, 0, 0)}};

ad_tensor *ad_axpy(ad_tape *t, ad_tensor *a, double c, ad_tensor *b) {
  ad_tensor *out = binary_out(t, "ad_axpy", a, b);
  if (!out || !const_ok(t, "ad_axpy", "c", c, out->dtype)) return NULL;
  EW_RUN(k_axpy, out, a, b, c, EW_GRAIN);
  ad_tensor *in[2] = {a, b};
  ad_node *n = ad__record(t, &OP_AXPY, out, 2, in);
  if (n) n->a.c = c;
  return ad__done(t, out, "ad_axpy");
}

/* ---------------------------------------------------------------- pow */
/* d(x^p) = p x^(p-1) dx */
static void vjp_pow(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  double p = n->a.c;
  if (!need[0]) return;
  if (p == 1.0) {
    gin[0] = g;
  } else if (p == 2.0) {
    gin[0] = ad_mul(t, g, ad_scale(t, n->in[0], 2.0));
  } else {
    gin[0] = ad_mul(t, g, ad_scale(t, ad_pow_scalar(t, n->in[0], p - 1.0), p));
  }
}
static const ad_op_def OP_POW = {"pow", vjp_pow, attr_c, {.mask = AD_SAVES(AD_S_IN(0), 0, 0, 0)}};

ad_tensor *ad_pow_scalar(ad_tape *t, ad_tensor *x, double p) {
  ad_tensor *out = unary_out(t, "ad_pow_scalar", x);
  if (!out || !const_ok(t, "ad_pow_scalar", "p", p, x->dtype)) return NULL;
  if (p == 2.0)
    EW_RUN(k_square, out, x, NULL, 0.0, EW_GRAIN);
  else if (p == 0.5)
    EW_RUN(k_sqrt, out, x, NULL, 0.0, EW_GRAIN_HEAVY);
  else
    EW_RUN(k_pow, out, x, NULL, p, EW_GRAIN_HEAVY);
  ad_node *n = ad__record(t, &OP_POW, out, 1, &x);
  if (n) n->a.c = p;
  return ad__done(t, out, "ad_pow_scalar");
}

/* ---------------------------------------------------------------- exp, log, sqrt */
/* d exp(x) = exp(x) dx */
static void vjp_exp(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  if (need[0]) gin[0] = ad_mul(t, g, n->out);
}
static const ad_op_def OP_EXP = {"exp", vjp_exp, NULL, {.mask = AD_SAVES(AD_S_OUT, 0, 0, 0)}};

ad_tensor *ad_exp(ad_tape *t, ad_tensor *x) {
  ad_tensor *out = unary_out(t, "ad_exp", x);
  if (!out) return NULL;
  EW_RUN(k_exp, out, x, NULL, 0.0, EW_GRAIN_HEAVY);
  ad__record(t, &OP_EXP, out, 1, &x);
  return ad__done(t, out, "ad_exp");
}

/* d log(x) = dx / x */
static void vjp_log(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  if (need[0]) gin[0] = ad_div(t, g, n->in[0]);
}
static const ad_op_def OP_LOG = {"log", vjp_log, NULL, {.mask = AD_SAVES(AD_S_IN(0), 0, 0, 0)}};

ad_tensor *ad_log(ad_tape *t, ad_tensor *x) {
  ad_tensor *out = unary_out(t, "ad_log", x);
  if (!out) return NULL;
  EW_RUN(k_log, out, x, NULL, 0.0, EW_GRAIN_HEAVY);
  ad__record(t, &OP_LOG, out, 1, &x);
  return ad__done(t, out, "ad_log");
}

/* d sqrt(x) = dx / (2 sqrt(x)) */
static void vjp_sqrt(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  if (need[0]) gin[0] = ad_div(t, ad_scale(t, g, 0.5), n->out);
}
static const ad_op_def OP_SQRT = {"sqrt", vjp_sqrt, NULL, {.mask = AD_SAVES(AD_S_OUT, 0, 0, 0)}};

ad_tensor *ad_sqrt(ad_tape *t, ad_tensor *x) {
  ad_tensor *out = unary_out(t, "ad_sqrt", x);
  if (!out) return NULL;
  EW_RUN(k_sqrt, out, x, NULL, 0.0, EW_GRAIN_HEAVY);
  ad__record(t, &OP_SQRT, out, 1, &x);
  return ad__done(t, out, "ad_sqrt");
}

/* ---------------------------------------------------------------- tanh, sigmoid, softplus */
/* d tanh(x) = (1 - tanh^2 x) dx */
static void vjp_tanh(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  if (!need[0]) return;
  ad_tensor *y = n->out;
  gin[0] = ad_mul(t, g, ad_add_scalar(t, ad_neg(t, ad_mul(t, y, y)), 1.0));
}
static const ad_op_def OP_TANH = {"tanh", vjp_tanh, NULL, {.mask = AD_SAVES(AD_S_OUT, 0, 0, 0)}};

ad_tensor *ad_tanh(ad_tape *t, ad_tensor *x) {
  ad_tensor *out = unary_out(t, "ad_tanh", x);
  if (!out) return NULL;
  EW_RUN(k_tanh, out, x, NULL, 0.0, EW_GRAIN_HEAVY);
  ad__record(t, &OP_TANH, out, 1, &x);
  return ad__done(t, out, "ad_tanh");
}

/* d sigma(x) = sigma(x) (1 - sigma(x)) dx */
static void vjp_sigmoid(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                        const int *need) {
  if (!need[0]) return;
  ad_tensor *y = n->out;
  gin[0] = ad_mul(t, g, ad_mul(t, y, ad_add_scalar(t, ad_neg(t, y), 1.0)));
}
static const ad_op_def OP_SIGMOID = {
    "sigmoid", vjp_sigmoid, NULL, {.mask = AD_SAVES(AD_S_OUT, 0, 0, 0)}};

ad_tensor *ad_sigmoid(ad_tape *t, ad_tensor *x) {
  ad_tensor *out = unary_out(t, "ad_sigmoid", x);
  if (!out) return NULL;
  EW_RUN(k_sigmoid, out, x, NULL, 0.0, EW_GRAIN_HEAVY);
  ad__record(t, &OP_SIGMOID, out, 1, &x);
  return ad__done(t, out, "ad_sigmoid");
}

/* d softplus(x) = sigma(x) dx,  softplus(x) = log(1 + e^x) */
static void vjp_softplus(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                         const int *need) {
  if (need[0]) gin[0] = ad_mul(t, g, ad_sigmoid(t, n->in[0]));
}
static const ad_op_def OP_SOFTPLUS = {
    "softplus", vjp_softplus, NULL, {.mask = AD_SAVES(AD_S_IN(0), 0, 0, 0)}};

ad_tensor *ad_softplus(ad_tape *t, ad_tensor *x) {
  ad_tensor *out = unary_out(t, "ad_softplus", x);
  if (!out) return NULL;
  EW_RUN(k_softplus, out, x, NULL, 0.0, EW_GRAIN_HEAVY);
  ad__record(t, &OP_SOFTPLUS, out, 1, &x);
  return ad__done(t, out, "ad_softplus");
}

/* ---------------------------------------------------------------- relu, abs, sign */
/* d relu(x) = [x > 0] dx, as the fused relu_backward(g, y) with y = relu(x):
 * y > 0 exactly where x > 0 and y is NaN exactly where x is, so the mask
 * is the same bits, and reading the output instead of the input lets
 * ad_tape_compact drop x (the output is kept anyway by the next matmul). */
static void vjp_relu(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  if (need[0]) gin[0] = ad_relu_backward(t, g, n->out);
}
static const ad_op_def OP_RELU = {"relu", vjp_relu, NULL, {.mask = AD_SAVES(AD_S_OUT, 0, 0, 0)}};

ad_tensor *ad_relu(ad_tape *t, ad_tensor *x) {
  ad_tensor *out = unary_out(t, "ad_relu", x);
  if (!out) return NULL;
  EW_RUN(k_relu, out, x, NULL, 0.0, EW_GRAIN);
  ad__record(t, &OP_RELU, out, 1, &x);
  return ad__done(t, out, "ad_relu");
}

/* relu_backward(g, x) = g [x > 0] is linear in g with the same mask, and
 * piecewise constant in x (zero derivative almost everywhere). At x = NaN
 * it is NaN, as relu is. */
static void vjp_relu_backward(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                              const int *need) {
  if (need[0]) gin[0] = ad_relu_backward(t, g, n->in[1]);
}
static const ad_op_def OP_RELU_BACKWARD = {
    "relu_backward", vjp_relu_backward, NULL, {.mask = AD_SAVES(AD_S_IN(1), 0, 0, 0)}};

ad_tensor *ad_relu_backward(ad_tape *t, ad_tensor *g, ad_tensor *x) {
  ad_tensor *out = binary_out(t, "ad_relu_backward", g, x);
  if (!out) return NULL;
  if (!ad_same_shape(g, x)) {
    char sa[96], sb[96];
    return ad__fail(t, AD_ERR_SHAPE, "ad_relu_backward: g is %s but x is %s",
                    ad_shape_str(g, sa, sizeof sa), ad_shape_str(x, sb, sizeof sb));
  }
  EW_RUN(k_relu_backward, out, g, x, 0.0, EW_GRAIN);
  ad_tensor *in[2] = {g, x};
  ad__record(t, &OP_RELU_BACKWARD, out, 2, in);
  return ad__done(t, out, "ad_relu_backward");
}

/* d|x| = sign(x) dx (0 at 0: the subgradient PyTorch picks too). */
static void vjp_abs(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  if (need[0]) gin[0] = ad_mul(t, g, ad_sign(t, n->in[0]));
}
static const ad_op_def OP_ABS = {"abs", vjp_abs, NULL, {.mask = AD_SAVES(AD_S_IN(0), 0, 0, 0)}};

ad_tensor *ad_abs(ad_tape *t, ad_tensor *x) {
  ad_tensor *out = unary_out(t, "ad_abs", x);
  if (!out) return NULL;
  EW_RUN(k_abs, out, x, NULL, 0.0, EW_GRAIN);
  ad__record(t, &OP_ABS, out, 1, &x);
  return ad__done(t, out, "ad_abs");
}

ad_tensor *ad_sign(ad_tape *t, ad_tensor *x) {
  ad_tensor *out = unary_out(t, "ad_sign", x);
  if (!out) return NULL;
  EW_RUN(k_sign, out, x, NULL, 0.0, EW_GRAIN);
  return out; /* piecewise constant: nothing to record */
}

/* ---------------------------------------------------------------- where */
/* d where(m, a, b) = where(m, da, 0) + where(m, 0, db) */
static void vjp_where(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                      const int *need) {
  const ad_tensor *m = n->a.extra;
  ad_tensor *z = ad_zeros(t, g->dtype, 0, NULL);
  if (need[0]) gin[0] = unbroadcast(t, ad_where(t, m, g, z), n->in[0]);
  if (need[1]) gin[1] = unbroadcast(t, ad_where(t, m, z, g), n->in[1]);
}
static const ad_op_def OP_WHERE = {
    "where", vjp_where, NULL, {.mask = AD_SAVES(0, 0, 0, 0) | AD_SAVES_EXTRA_TENSOR}};

ad_tensor *ad_where(ad_tape *t, const ad_tensor *mask, ad_tensor *a, ad_tensor *b) {
  if (t && !mask) return ad__fail(t, AD_ERR_NULL, "ad_where: mask is NULL");
  if (t && !ad__usable(t, "ad_where", "mask", 0, mask)) return NULL;
  ad_tensor *out = binary_out(t, "ad_where", a, b);
  if (!out) return NULL;
  if (mask->size != out->size) {
    char sm[96], so[96];
    return ad__fail(t, AD_ERR_SHAPE, "ad_where: mask is %s but operands are %s",
                    ad_shape_str(mask, sm, sizeof sm), ad_shape_str(out, so, sizeof so));
  }
  /* The mask may be of either dtype; read it through ad_get only when it
   * differs from the operands (rare), else typed. */
  if (mask->dtype == out->dtype) {
    if (out->dtype == AD_F32) {
      const float *M = AD_F(mask), *A = AD_F(a), *B = AD_F(b);
      float *Y = AD_F(out);
      int64_t sa = a->size == 1 ? 0 : 1, sb = b->size == 1 ? 0 : 1;
      for (int64_t i = 0; i < out->size; i++) Y[i] = M[i] != 0 ? A[i * sa] : B[i * sb];
    } else {
      const double *M = AD_D(mask), *A = AD_D(a), *B = AD_D(b);
      double *Y = AD_D(out);
      int64_t sa = a->size == 1 ? 0 : 1, sb = b->size == 1 ? 0 : 1;
      for (int64_t i = 0; i < out->size; i++) Y[i] = M[i] != 0 ? A[i * sa] : B[i * sb];
    }
  } else {
    for (int64_t i = 0; i < out->size; i++)
      ad_set(out, i,
             ad_get(mask, i) != 0 ? ad_get(a, a->size == 1 ? 0 : i)
                                  : ad_get(b, b->size == 1 ? 0 : i));
  }
  ad_tensor *in[2] = {a, b};
  ad_node *n = ad__record(t, &OP_WHERE, out, 2, in);
  if (n) {
    /* Keep the mask alive on the tape: the caller's copy may be reused. */
    ad_tensor *mc = ad__alloc(t, mask->dtype, mask->ndim, mask->shape, 0);
    if (!mc) return NULL;
    ad_copy_values(mc, mask);
    n->a.extra = mc;
  }
  return ad__done(t, out, "ad_where");
}
