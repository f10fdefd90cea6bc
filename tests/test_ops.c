/* test_ops.c — every core op: gradient, Hessian-vector product and JVP
 * against central finite differences in f64 (tolerance 1e-6, relative to
 * 1 + |numeric|). */
#include "ad_internal.h" /* ad__log_softmax_backward */
#include "gradcheck.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define S(...) ((const int64_t[]){__VA_ARGS__})

static const int32_t LABELS[6] = {2, 0, 3, 1, 3, 0};

#define IN(x) ((void)ctx, (x))
static ad_tensor *f_add(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_add(t, x[0], x[1]));
}
static ad_tensor *f_add_bcast(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, ad_add(t, x[0], x[1]), x[0]));
}
static ad_tensor *f_sub(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, ad_sub(t, x[0], x[1]), x[1]));
}
static ad_tensor *f_mul(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, x[0], x[1]));
}
static ad_tensor *f_mul_bcast(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, x[1], ad_mul(t, x[0], x[1])));
}
static ad_tensor *f_div(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_div(t, x[0], x[1]));
}
static ad_tensor *f_div_bcast(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_div(t, x[1], x[0]));
}
static ad_tensor *f_neg(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, ad_neg(t, x[0]), x[0]));
}
static ad_tensor *f_scale(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, ad_scale(t, x[0], -2.5), x[0]));
}
static ad_tensor *f_add_scalar(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, ad_add_scalar(t, x[0], 0.7), x[0]));
}
static ad_tensor *f_axpy(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, ad_axpy(t, x[0], -0.3, x[1]), x[1]));
}
static ad_tensor *f_pow(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_pow_scalar(t, x[0], 2.7));
}
static ad_tensor *f_pow2(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_pow_scalar(t, x[0], 2.0));
}
static ad_tensor *f_exp(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_exp(t, x[0]));
}
static ad_tensor *f_log(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_log(t, x[0]));
}
static ad_tensor *f_sqrt(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_sqrt(t, x[0]));
}
static ad_tensor *f_tanh(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, x[0]));
}
static ad_tensor *f_sigmoid(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_sigmoid(t, x[0]));
}
static ad_tensor *f_softplus(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_softplus(t, x[0]));
}
/* relu is piecewise linear: multiply by x so its second order is not zero. */
static ad_tensor *f_relu(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, ad_relu(t, x[0]), x[0]));
}
static ad_tensor *f_relu_bw(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, ad_relu_backward(t, x[0], x[1]), x[0]));
}
static ad_tensor *f_abs(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, ad_abs(t, x[0]), x[0]));
}
static ad_tensor *f_matmul00(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, ad_matmul(t, x[0], x[1], 0, 0)));
}
static ad_tensor *f_matmul10(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, ad_matmul(t, x[0], x[1], 1, 0)));
}
static ad_tensor *f_matmul01(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, ad_matmul(t, x[0], x[1], 0, 1)));
}
static ad_tensor *f_matmul11(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, ad_matmul(t, x[0], x[1], 1, 1)));
}
static ad_tensor *f_transpose(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, ad_transpose(t, x[0]), x[1]));
}
static ad_tensor *f_reshape(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, ad_reshape(t, x[0], 2, S(4, 3)), x[1]));
}
static ad_tensor *f_rowvec(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, ad_add_rowvec(t, x[0], x[1])));
}
static ad_tensor *f_sum(ad_tape *t, ad_tensor *const *x, void *ctx) {
  ad_tensor *s = ad_sum(t, x[0]);
  return IN(ad_mul(t, s, s));
}
static ad_tensor *f_mean(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, x[0], ad_mean(t, x[0])));
}
static ad_tensor *f_sum_axis0(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, ad_sum_axis(t, x[0], 0, 0)));
}
static ad_tensor *f_sum_axis1k(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, ad_sum_axis(t, x[0], 1, 1)));
}
static ad_tensor *f_mean_axis(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, ad_mean_axis(t, x[0], 1, 0)));
}
static ad_tensor *f_max_axis(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, ad_max_axis(t, x[0], 1, 0)));
}
static ad_tensor *f_max_axis0k(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, ad_max_axis(t, x[0], 0, 1)));
}
static ad_tensor *f_bcast_axis(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, ad_broadcast_axis(t, x[0], 1, 3, 0)));
}
static ad_tensor *f_expand(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, ad_expand(t, x[0], x[1]), x[1]));
}
static ad_tensor *f_lse(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_logsumexp(t, x[0], 1, 0));
}
static ad_tensor *f_lse0(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_logsumexp(t, x[0], 0, 1));
}
static ad_tensor *f_softmax(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_softmax(t, x[0], 1));
}
static ad_tensor *f_softmax0(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_softmax(t, x[0], 0));
}
static ad_tensor *f_log_softmax(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_log_softmax(t, x[0], 1));
}
static ad_tensor *f_log_softmax0(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_log_softmax(t, x[0], 0));
}
/* log_softmax's fused backward with a differentiable cotangent: its rule
 * then takes the row sums from g by recorded ops, so the HVP sees dy's
 * dependence on g (with a constant g, as above, it reads the kept sums). */
static ad_tensor *f_lsb(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad__log_softmax_backward(t, x[0], ad_log_softmax(t, x[1], 1), 1));
}
static ad_tensor *f_lsb0(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad__log_softmax_backward(t, ad_tanh(t, x[0]), ad_log_softmax(t, x[1], 0), 0));
}
static ad_tensor *f_nll(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_nll(t, ad_log_softmax(t, x[0], 1), LABELS, 6));
}
static ad_tensor *f_nll_raw(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_nll(t, ad_mul(t, x[0], x[0]), LABELS, 6));
}
static ad_tensor *f_ce(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_cross_entropy(t, x[0], LABELS, 6));
}
static ad_tensor *f_mse(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mse(t, x[0], x[1]));
}
static ad_tensor *f_dot(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_dot(t, ad_tanh(t, x[0]), x[1]));
}
static ad_tensor *f_where(ad_tape *t, ad_tensor *const *x, void *ctx) {
  (void)ctx;
  double m[12] = {1, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 0};
  ad_tensor *mask = ad_const(t, AD_F64, 2, S(3, 4), m);
  return ad_mul(t, ad_where(t, mask, x[0], x[1]), x[0]);
}
static ad_tensor *f_concat(ad_tape *t, ad_tensor *const *x, void *ctx) {
  (void)ctx;
  ad_tensor *xs[2] = {x[0], ad_tanh(t, x[1])};
  return ad_mul(t, ad_concat(t, 2, xs, 1), ad_concat(t, 2, xs, 1));
}
static ad_tensor *f_concat0(ad_tape *t, ad_tensor *const *x, void *ctx) {
  (void)ctx;
  ad_tensor *xs[2] = {x[0], x[1]};
  return ad_tanh(t, ad_concat(t, 2, xs, 0));
}
static ad_tensor *f_slice(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, ad_slice(t, x[0], 1, 1, 2)));
}
static ad_tensor *f_slice0(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, ad_slice(t, x[0], 0, 2, 1)));
}
static ad_tensor *f_pad(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_exp(t, ad_pad_axis(t, x[0], 1, 1, 5)));
}
/* A small MLP: matmul, bias, relu, log_softmax, nll — the composition the
 * bench runs, checked the same way. */
static ad_tensor *f_mlp(ad_tape *t, ad_tensor *const *x, void *ctx) {
  (void)ctx;
  ad_tensor *h = ad_tanh(t, ad_add_rowvec(t, ad_matmul(t, x[0], x[1], 0, 0), x[2]));
  return ad_cross_entropy(t, ad_matmul(t, h, x[1], 0, 1), LABELS, 6);
}

#define C1(N, F, D, ...)                                                                           \
  { N, F, 1, {D}, {{__VA_ARGS__}}, {0}, {0}, 0 }
static const gc_case CASES[] = {
    {"add", f_add, 2, {2, 2}, {{3, 4}, {3, 4}}, {0, 0}, {0, 0}, 0},
    {"add_broadcast", f_add_bcast, 2, {2, 0}, {{3, 4}, {1}}, {0, 0}, {0, 0}, 0},
    {"sub", f_sub, 2, {2, 2}, {{3, 4}, {3, 4}}, {0, 0}, {0, 0}, 0},
    {"mul", f_mul, 2, {2, 2}, {{3, 4}, {3, 4}}, {0, 0}, {0, 0}, 0},
    {"mul_broadcast", f_mul_bcast, 2, {2, 1}, {{3, 4}, {1}}, {0, 0}, {0, 0}, 0},
    {"div", f_div, 2, {2, 2}, {{3, 4}, {3, 4}}, {0, 2}, {0, 0.5}, 0},
    {"div_broadcast", f_div_bcast, 2, {1, 2}, {{1}, {3, 4}}, {2, 0}, {0.5, 0}, 0},
    C1("neg", f_neg, 2, 3, 4),
    C1("scale", f_scale, 2, 3, 4),
    C1("add_scalar", f_add_scalar, 2, 3, 4),
    {"axpy", f_axpy, 2, {2, 2}, {{3, 4}, {3, 4}}, {0, 0}, {0, 0}, 0},
    {"pow_scalar", f_pow, 1, {2}, {{3, 4}}, {2}, {0.3}, 0},
    C1("pow_scalar_2", f_pow2, 2, 3, 4),
    C1("exp", f_exp, 2, 3, 4),
    {"log", f_log, 1, {2}, {{3, 4}}, {3}, {0.5}, 0},
    {"sqrt", f_sqrt, 1, {2}, {{3, 4}}, {3}, {0.5}, 0},
    C1("tanh", f_tanh, 2, 3, 4),
    C1("sigmoid", f_sigmoid, 2, 3, 4),
    C1("softplus", f_softplus, 2, 3, 4),
    {"relu", f_relu, 1, {2}, {{3, 4}}, {0}, {0.05}, 0},
    {"relu_backward", f_relu_bw, 2, {2, 2}, {{3, 4}, {3, 4}}, {0, 0}, {0, 0.05}, 0},
    {"abs", f_abs, 1, {2}, {{3, 4}}, {0}, {0.05}, 0},
    {"matmul", f_matmul00, 2, {2, 2}, {{3, 4}, {4, 5}}, {0, 0}, {0, 0}, 0},
    {"matmul_ta", f_matmul10, 2, {2, 2}, {{4, 3}, {4, 5}}, {0, 0}, {0, 0}, 0},
    {"matmul_tb", f_matmul01, 2, {2, 2}, {{3, 4}, {5, 4}}, {0, 0}, {0, 0}, 0},
    {"matmul_ta_tb", f_matmul11, 2, {2, 2}, {{4, 3}, {5, 4}}, {0, 0}, {0, 0}, 0},
    {"transpose", f_transpose, 2, {2, 2}, {{3, 4}, {4, 3}}, {0, 0}, {0, 0}, 0},
    {"reshape", f_reshape, 2, {2, 2}, {{3, 4}, {4, 3}}, {0, 0}, {0, 0}, 0},
    {"add_rowvec", f_rowvec, 2, {2, 1}, {{3, 4}, {4}}, {0, 0}, {0, 0}, 0},
    C1("sum", f_sum, 2, 3, 4),
    C1("mean", f_mean, 2, 3, 4),
    C1("sum_axis0", f_sum_axis0, 2, 3, 4),
    C1("sum_axis1_keepdim", f_sum_axis1k, 3, 2, 3, 4),
    C1("mean_axis", f_mean_axis, 2, 3, 4),
    C1("max_axis", f_max_axis, 2, 3, 4),
    C1("max_axis0_keepdim", f_max_axis0k, 3, 3, 2, 2),
    C1("broadcast_axis", f_bcast_axis, 2, 2, 4),
    {"expand", f_expand, 2, {0, 2}, {{1}, {3, 4}}, {0, 0}, {0, 0}, 0},
    C1("logsumexp", f_lse, 2, 3, 4),
    C1("logsumexp_axis0_keepdim", f_lse0, 2, 3, 4),
    C1("softmax", f_softmax, 2, 3, 4),
    C1("softmax_axis0", f_softmax0, 3, 3, 2, 2),
    C1("log_softmax", f_log_softmax, 2, 3, 4),
    C1("log_softmax_axis0", f_log_softmax0, 3, 3, 2, 2),
    {"log_softmax_backward", f_lsb, 2, {2, 2}, {{3, 4}, {3, 4}}, {0, 0}, {0, 0}, 0},
    {"log_softmax_backward_axis0", f_lsb0, 2, {3, 3}, {{3, 2, 2}, {3, 2, 2}}, {0, 0}, {0, 0}, 0},
    C1("nll", f_nll, 2, 6, 4),
    C1("nll_raw", f_nll_raw, 2, 6, 4),
    C1("cross_entropy", f_ce, 2, 6, 4),
    {"mse", f_mse, 2, {2, 2}, {{3, 4}, {3, 4}}, {0, 0}, {0, 0}, 0},
    {"dot", f_dot, 2, {2, 2}, {{3, 4}, {3, 4}}, {0, 0}, {0, 0}, 0},
    {"where", f_where, 2, {2, 2}, {{3, 4}, {3, 4}}, {0, 0}, {0, 0}, 0},
    {"concat", f_concat, 2, {2, 2}, {{3, 2}, {3, 3}}, {0, 0}, {0, 0}, 0},
    {"concat_axis0", f_concat0, 2, {2, 2}, {{2, 3}, {1, 3}}, {0, 0}, {0, 0}, 0},
    C1("slice", f_slice, 2, 3, 4),
    C1("slice_axis0", f_slice0, 2, 3, 4),
    C1("pad_axis", f_pad, 2, 3, 2),
    {"mlp", f_mlp, 3, {2, 2, 1}, {{6, 4}, {4, 4}, {4}}, {0, 0, 0}, {0, 0, 0}, 0},
};
#define N_CASES ((int)(sizeof CASES / sizeof CASES[0]))

START_TEST(test_op_gradcheck) {
  char rep[512];
  double worst = gc_check_case(&CASES[_i], 42 + (uint64_t)_i, rep, sizeof rep);
  ck_assert_msg(worst <= 1e-6, "%s", rep);
}
END_TEST

/* f32 forward agrees with f64 forward (same kernels, both dtypes). */
START_TEST(test_f32_matches_f64) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  ad_rng r;
  ad_rng_seed(&r, 7);
  ad_tensor *a64 = ad_randn(t, AD_F64, 2, S(5, 7), &r);
  ad_tensor *b64 = ad_randn(t, AD_F64, 2, S(7, 3), &r);
  ad_tensor *a32 = ad_empty(t, AD_F32, 2, S(5, 7)), *b32 = ad_empty(t, AD_F32, 2, S(7, 3));
  ad_copy_values(a32, a64);
  ad_copy_values(b32, b64);
  ad_tensor *y64 = ad_log_softmax(t, ad_tanh(t, ad_matmul(t, a64, b64, 0, 0)), 1);
  ad_tensor *y32 = ad_log_softmax(t, ad_tanh(t, ad_matmul(t, a32, b32, 0, 0)), 1);
  ck_assert_int_eq(ad_tape_status(t), AD_OK);
  for (int64_t i = 0; i < y64->size; i++)
    ck_assert_double_eq_tol(ad_get(y32, i), ad_get(y64, i), 1e-5);
  ad_tape_free(t);
}
END_TEST

/* The elementwise kernels run an AVX-512 clone where the CPU has it
 * (AD_WIDE_PASS); each element must still be the plain expression, rounded
 * as this file's scalar loop rounds it: bits compared, at sizes that end
 * in every vector tail and one above the threaded split, with NaN, signed
 * zeros and negatives among the values, at 1 and 2 threads. */
#define EW_REF(T, e, ...)                                                                          \
  do {                                                                                             \
    const T *A = e->a, *B = e->b;                                                                  \
    T *R = e->ref, c = (T)e->c;                                                                    \
    (void)c;                                                                                       \
    for (int64_t i = 0; i < e->n; i++) {                                                           \
      T u = A[i], v = B[i];                                                                        \
      (void)u;                                                                                     \
      R[i] = (__VA_ARGS__);                                                                        \
    }                                                                                              \
  } while (0)
typedef struct {
  const void *a, *b;
  void *ref;
  int64_t n;
  double c;
} ew_ref;

static void ew_reference(int op, ad_dtype dt, ew_ref *e) {
#define EW_OPS(T)                                                                                  \
  switch (op) {                                                                                    \
  case 0:                                                                                          \
    EW_REF(T, e, u + v);                                                                           \
    break;                                                                                         \
  case 1:                                                                                          \
    EW_REF(T, e, u - v);                                                                           \
    break;                                                                                         \
  case 2:                                                                                          \
    EW_REF(T, e, u *v);                                                                            \
    break;                                                                                         \
  case 3:                                                                                          \
    EW_REF(T, e, u / v);                                                                           \
    break;                                                                                         \
  case 4:                                                                                          \
    EW_REF(T, e, u + c * v);                                                                       \
    break;                                                                                         \
  case 5:                                                                                          \
    EW_REF(T, e, v > 0 ? u : v != v ? v : 0);                                                      \
    break;                                                                                         \
  case 6:                                                                                          \
    EW_REF(T, e, c *v);                                                                            \
    break;                                                                                         \
  case 7:                                                                                          \
    EW_REF(T, e, -v);                                                                              \
    break;                                                                                         \
  case 8:                                                                                          \
    EW_REF(T, e, sizeof(T) == 4 ? (T)sqrtf((float)v) : (T)sqrt((double)v));                        \
    break;                                                                                         \
  default:                                                                                         \
    EW_REF(T, e, v > 0 || v != v ? v : 0);                                                         \
    break;                                                                                         \
  }
  if (dt == AD_F32) {
    EW_OPS(float)
  } else {
    EW_OPS(double)
  }
#undef EW_OPS
}

static ad_tensor *ew_op(ad_tape *t, int op, ad_tensor *a, ad_tensor *b, double c) {
  switch (op) {
  case 0:
    return ad_add(t, a, b);
  case 1:
    return ad_sub(t, a, b);
  case 2:
    return ad_mul(t, a, b);
  case 3:
    return ad_div(t, a, b);
  case 4:
    return ad_axpy(t, a, c, b);
  case 5:
    return ad_relu_backward(t, a, b);
  case 6:
    return ad_scale(t, b, c);
  case 7:
    return ad_neg(t, b);
  case 8:
    return ad_sqrt(t, b);
  default:
    return ad_relu(t, b);
  }
}

START_TEST(test_elementwise_bits) {
  static const int64_t sizes[] = {1, 7, 15, 16, 17, 31, 33, 1001, 70001};
  for (int th = 1; th <= 2; th++) {
    ck_assert_int_eq(ad_set_threads(th), AD_OK);
    for (int d = 0; d < 2; d++) {
      ad_dtype dt = d ? AD_F64 : AD_F32;
      size_t es = d ? sizeof(double) : sizeof(float);
      for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++) {
        int64_t n = sizes[si];
        ad_tape *t = NULL;
        ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
        ad_rng r;
        ad_rng_seed(&r, 11 + (uint64_t)n);
        ad_tensor *a = ad_randn(t, dt, 1, S(n), &r), *b = ad_randn(t, dt, 1, S(n), &r);
        /* Specials in both operands: NaN, +-0, and values relu keeps. */
        for (int64_t i = 0; i < n; i += 5) ad_set(b, i, i % 3 == 0 ? -0.0 : 0.0);
        for (int64_t i = 3; i < n; i += 97) ad_set(b, i, NAN), ad_set(a, (i * 7) % n, NAN);
        void *ref = malloc((size_t)n * es);
        ck_assert_ptr_nonnull(ref);
        for (int op = 0; op < 10; op++) {
          /* sqrt of the magnitudes, so that its elements are numbers whose
           * bits are compared (a NaN is only checked to be NaN). */
          ad_tensor *bb = op == 8 ? ad_abs(t, b) : b;
          ad_tensor *y = ew_op(t, op, a, bb, -0.37);
          ck_assert_int_eq(ad_tape_status(t), AD_OK);
          ew_ref e = {a->data, bb->data, ref, n, -0.37};
          ew_reference(op, dt, &e);
          for (int64_t i = 0; i < n; i++) {
            double got = ad_get(y, i), want = d ? ((double *)ref)[i] : ((float *)ref)[i];
            if (isnan(want)) {
              ck_assert_msg(isnan(got), "op %d n %lld [%lld]: %g, want NaN", op, (long long)n,
                            (long long)i, got);
              continue;
            }
            ck_assert_msg(
                memcmp((char *)y->data + i * (int64_t)es, (char *)ref + i * (int64_t)es, es) == 0,
                "op %d %s n %lld threads %d [%lld]: %.17g, want %.17g", op, d ? "f64" : "f32",
                (long long)n, th, (long long)i, got, want);
          }
        }
        free(ref);
        ad_tape_free(t);
      }
    }
  }
  ck_assert_int_eq(ad_set_threads(1), AD_OK);
}
END_TEST

/* ad__exp against libm: within 2 ulp of exp over the range where the
 * result is normal, and its edges: overflow to +inf, underflow to 0, NaN. */
START_TEST(test_exp_accuracy) {
  double worst = 0;
  for (int64_t i = 0; i <= 2000000; i++) {
    const double x = -708.0 + 1417.0 * (double)i / 2000000.0; /* [-708, 709] */
    const double got = ad__exp(x), want = exp(x);
    const double ulp = nextafter(want, INFINITY) - want, err = fabs(got - want) / ulp;
    if (err > worst) worst = err;
    ck_assert_msg(err <= 2.0, "ad__exp(%.17g) = %.17g, exp = %.17g (%.2f ulp)", x, got, want, err);
  }
  ck_assert_msg(worst > 0.0, "ad__exp matched libm everywhere: the sweep read no result");
  const double edge[] = {0.0, -0.0, 709.78, 709.79, 710.0, 1e300, -745.0, -745.2, -746.0, -1e300};
  for (size_t i = 0; i < sizeof edge / sizeof *edge; i++)
    ck_assert_msg(ad__exp(edge[i]) == exp(edge[i]), "ad__exp(%.17g) = %.17g, exp = %.17g", edge[i],
                  ad__exp(edge[i]), exp(edge[i]));
  ck_assert(ad__exp(INFINITY) == INFINITY && ad__exp(-INFINITY) == 0.0);
  ck_assert(isnan(ad__exp(NAN)));
}
END_TEST

/* log_softmax and its backward take their exps in blocks (exp_array in
 * ops_reduce.c, 8 lanes at a time on AVX-512): the bits of the row-by-row
 * formula with the scalar ad__exp, in f64 (where every bit of the exp
 * shows) and f32, for rows that batch (n = 10, 3) and rows longer than a
 * block (n = 700), with a NaN row and -inf entries. The sum of g's row is
 * taken as ad_sum_axis takes it (8 lanes). */
#define LSM_REF(T, xd, gd, yd, bd, rows, n)                                                        \
  for (int64_t o = 0; o < rows; o++) {                                                             \
    const T *xo = xd + o * n;                                                                      \
    T m = xo[0];                                                                                   \
    for (int64_t k = 1; k < n; k++) m = xo[k] > m ? xo[k] : m;                                     \
    if (!isfinite(m)) m = 0;                                                                       \
    double sum = 0;                                                                                \
    for (int64_t k = 0; k < n; k++) sum += ad__exp((double)(xo[k] - m));                           \
    const double l = (double)m + log(sum);                                                         \
    T gs = 0, lane[8] = {0};                                                                       \
    int64_t k = 0;                                                                                 \
    for (; k + 8 <= n; k += 8)                                                                     \
      for (int q = 0; q < 8; q++) lane[q] += gd[o * n + k + q];                                    \
    for (int q = 0; q < 8; q++) gs += lane[q];                                                     \
    for (; k < n; k++) gs += gd[o * n + k];                                                        \
    for (k = 0; k < n; k++) {                                                                      \
      const T want_y = (T)((double)xo[k] - l);                                                     \
      const T want_b = gd[o * n + k] - (T)ad__exp((double)want_y) * gs;                            \
      const T got_y = yd[o * n + k], got_b = bd[o * n + k];                                        \
      ck_assert_msg(memcmp(&got_y, &want_y, sizeof got_y) == 0 || (isnan(got_y) && isnan(want_y)), \
                    #T " n %lld log_softmax[%lld][%lld] = %.17g, want %.17g", (long long)n,        \
                    (long long)o, (long long)k, (double)got_y, (double)want_y);                    \
      ck_assert_msg(memcmp(&got_b, &want_b, sizeof got_b) == 0 || (isnan(got_b) && isnan(want_b)), \
                    #T " n %lld backward[%lld][%lld] = %.17g, want %.17g", (long long)n,           \
                    (long long)o, (long long)k, (double)got_b, (double)want_b);                    \
    }                                                                                              \
  }

START_TEST(test_log_softmax_exp_bits) {
  static const int64_t ns[] = {10, 3, 700};
  for (int d = 0; d < 2; d++)
    for (size_t ni = 0; ni < sizeof ns / sizeof *ns; ni++) {
      const int64_t n = ns[ni], rows = 67;
      const ad_dtype dt = d ? AD_F64 : AD_F32;
      ad_tape *t = NULL;
      ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
      ad_rng r;
      ad_rng_seed(&r, 5 + (uint64_t)n);
      const int64_t shape[2] = {rows, n};
      ad_tensor *x = ad_randn(t, dt, 2, shape, &r), *g = ad_randn(t, dt, 2, shape, &r);
      ck_assert_ptr_nonnull(x);
      ck_assert_ptr_nonnull(g);
      for (int64_t i = 0; i < x->size; i++) ad_set(x, i, 4.0 * ad_get(x, i));
      ad_set(x, 3 * n + 1, NAN);
      ad_set(x, 5 * n, -INFINITY);
      ad_set(x, 5 * n + 2, -INFINITY);
      ad_tensor *y = ad_log_softmax(t, x, 1);
      ad_tensor *b = ad__log_softmax_backward(t, g, y, 1);
      ck_assert_ptr_nonnull(b);
      if (d) {
        const double *xd = x->data, *gd = g->data, *yd = y->data, *bd = b->data;
        LSM_REF(double, xd, gd, yd, bd, rows, n)
      } else {
        const float *xd = x->data, *gd = g->data, *yd = y->data, *bd = b->data;
        LSM_REF(float, xd, gd, yd, bd, rows, n)
      }
      ad_tape_free(t);
    }
}
END_TEST
#undef LSM_REF

Suite *ops_suite(void) {
  Suite *s = suite_create("ops");
  TCase *tc = tcase_create("gradcheck");
  tcase_add_loop_test(tc, test_op_gradcheck, 0, N_CASES);
  tcase_add_test(tc, test_f32_matches_f64);
  tcase_add_test(tc, test_elementwise_bits);
  tcase_add_test(tc, test_exp_accuracy);
  tcase_add_test(tc, test_log_softmax_exp_bits);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  return gc_run_suite(ops_suite());
}
