/* test_nn_layers.c — nn/ layers, activations and losses: every op's
 * gradient, Hessian-vector product and JVP against central finite
 * differences in f64 (gc_check; bound 1e-6 relative to 1 + |numeric|, the
 * core ops' bound), plus value checks against closed forms. */
#include "gradcheck.h"
#include "nn/nn.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define S(...) ((const int64_t[]){__VA_ARGS__})

static const int32_t LABELS[6] = {2, 0, 3, 1, 3, 0};

typedef struct {
  const char *name;
  gc_fn f;
  int n;
  int ndim[4];
  int64_t shape[4][4];
  double offset[4], margin[4];
  int no_hvp;
} layer_case;

#define IN(x) ((void)ctx, (x))

/* ---------------------------------------------------------------- activations */
static ad_tensor *f_gelu(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(nn_gelu(t, x[0]));
}
static ad_tensor *f_gelu_bw(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(nn_gelu_backward(t, x[0], x[1]));
}
/* leaky relu is piecewise linear: times x so its second order is not zero. */
static ad_tensor *f_leaky(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, nn_leaky_relu(t, x[0], 0.1), x[0]));
}
static ad_tensor *f_leaky_bw(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, nn_leaky_relu_backward(t, x[0], x[1], 0.2), x[0]));
}

/* ---------------------------------------------------------------- layers */
static ad_tensor *f_linear(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_linear(t, x[0], x[1], x[2])));
}
static ad_tensor *f_linear_nobias(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_linear(t, x[0], x[1], NULL)));
}
static ad_tensor *f_flatten(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_linear(t, nn_flatten(t, x[0]), x[1], NULL)));
}
/* The rng is re-seeded on every call so every evaluation draws the same
 * mask: the function checked is x -> tanh(x) * m for one fixed m. */
static ad_tensor *f_dropout(ad_tape *t, ad_tensor *const *x, void *ctx) {
  (void)ctx;
  ad_rng r;
  ad_rng_seed(&r, 99);
  return ad_mul(t, nn_dropout(t, ad_tanh(t, x[0]), 0.4, &r, 1), x[0]);
}

/* ---------------------------------------------------------------- losses */
static ad_tensor *f_nll_each(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(nn_nll_each(t, ad_mul(t, x[0], x[0]), LABELS, 6));
}
static ad_tensor *f_ce_each(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(nn_cross_entropy_each(t, x[0], LABELS, 6));
}
static ad_tensor *f_mse_each(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(nn_mse_each(t, x[0], x[1]));
}
static ad_tensor *f_bce_each(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(nn_bce_with_logits_each(t, x[0], ad_sigmoid(t, x[1])));
}
static ad_tensor *f_bce(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(nn_bce_with_logits(t, x[0], ad_sigmoid(t, x[1])));
}
/* Weighted per-example loss, the data-reweighting objective. */
static ad_tensor *f_weighted_ce(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_dot(t, ad_sigmoid(t, x[1]), nn_cross_entropy_each(t, x[0], LABELS, 6)));
}

#define C1(N, F, D, ...)                                                                           \
  { N, F, 1, {D}, {{__VA_ARGS__}}, {0}, {0}, 0 }
static const layer_case CASES[] = {
    C1("gelu", f_gelu, 2, 3, 4),
    {"gelu_backward", f_gelu_bw, 2, {2, 2}, {{3, 4}, {3, 4}}, {0, 0}, {0, 0}, 0},
    {"leaky_relu", f_leaky, 1, {2}, {{3, 4}}, {0}, {0.05}, 0},
    {"leaky_relu_backward", f_leaky_bw, 2, {2, 2}, {{3, 4}, {3, 4}}, {0, 0}, {0, 0.05}, 0},
    {"linear", f_linear, 3, {2, 2, 1}, {{5, 4}, {3, 4}, {3}}, {0}, {0}, 0},
    {"linear_nobias", f_linear_nobias, 2, {2, 2}, {{5, 4}, {3, 4}}, {0}, {0}, 0},
    {"flatten", f_flatten, 2, {4, 2}, {{2, 2, 2, 3}, {3, 12}}, {0}, {0}, 0},
    C1("dropout", f_dropout, 2, 4, 5),
    C1("nll_each", f_nll_each, 2, 6, 4),
    C1("cross_entropy_each", f_ce_each, 2, 6, 4),
    {"mse_each", f_mse_each, 2, {3, 3}, {{3, 2, 2}, {3, 2, 2}}, {0}, {0}, 0},
    {"bce_with_logits_each", f_bce_each, 2, {2, 2}, {{4, 3}, {4, 3}}, {0}, {0}, 0},
    {"bce_with_logits", f_bce, 2, {1, 1}, {{7}, {7}}, {0}, {0}, 0},
    {"weighted_cross_entropy", f_weighted_ce, 2, {2, 1}, {{6, 4}, {6}}, {0}, {0}, 0},
};
#define N_CASES ((int)(sizeof CASES / sizeof CASES[0]))

START_TEST(test_layer_gradcheck) {
  const layer_case *c = &CASES[_i];
  ad_rng r;
  ad_rng_seed(&r, 1000 + (uint64_t)_i);
  ad_tensor *in[4] = {0};
  for (int i = 0; i < c->n; i++) {
    int64_t shape[4];
    for (int d = 0; d < 4; d++) shape[d] = c->shape[i][d];
    in[i] = gc_leaf(c->ndim[i], shape, &r, c->offset[i], c->margin[i]);
    ck_assert_ptr_nonnull(in[i]);
  }
  char rep[512];
  double worst =
      gc_check(c->name, c->f, c->n, in, NULL, (gc_opts){.no_hvp = c->no_hvp}, rep, sizeof rep);
  fprintf(stderr, "%s\n", rep);
  ck_assert_msg(worst <= 1e-6, "%s", rep); /* bound: 1e-6 relative, f64 */
  for (int i = 0; i < c->n; i++) ad_tensor_free(in[i]);
}
END_TEST

static ad_tape *tape(void) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 8}), AD_OK);
  return t;
}

/* GELU values against the erf closed form computed independently (table
 * from x Phi(x)), in f64 and f32. */
START_TEST(test_gelu_values) {
  ad_tape *t = tape();
  const double xs[5] = {-3.0, -1.0, 0.0, 0.5, 2.0};
  /* x * 0.5 * (1 + erf(x / sqrt(2))) */
  const double want[5] = {-0.00404969409489031, -0.15865525393145707, 0.0, 0.34573123063700656,
                          1.9544997361036416};
  ad_tensor *x64 = ad_const(t, AD_F64, 1, S(5), xs);
  ad_tensor *x32 = ad_empty(t, AD_F32, 1, S(5));
  ad_copy_values(x32, x64);
  ad_tensor *y64 = nn_gelu(t, x64), *y32 = nn_gelu(t, x32);
  ck_assert_int_eq(ad_tape_status(t), AD_OK);
  for (int i = 0; i < 5; i++) {
    ck_assert_double_eq_tol(ad_get(y64, i), want[i], 1e-14); /* f64: last digits */
    ck_assert_double_eq_tol(ad_get(y32, i), want[i], 1e-6);  /* f32 rounding */
  }
  ad_tape_free(t);
}
END_TEST

/* The stable BCE stays finite and exact at |z| = 1000 where log(sigma(z))
 * underflows: l(1000, 0) = 1000, l(-1000, 1) = 1000, l(1000, 1) = 0 and
 * the gradient sigma(z) - y is exactly 1, -1, 0. */
START_TEST(test_bce_stable) {
  ad_tape *t = tape();
  const double z[4] = {1000, -1000, 1000, 0};
  const double y[4] = {0, 1, 1, 0.25};
  ad_tensor *zt = NULL;
  ck_assert_int_eq(ad_tensor_from(&zt, AD_F64, 1, S(4), z), AD_OK);
  ad_requires_grad(zt, 1);
  ad_tensor *yt = ad_const(t, AD_F64, 1, S(4), y);
  ad_tensor *l = nn_bce_with_logits_each(t, zt, yt);
  ad_tensor *g = NULL;
  ad_tensor *s = ad_sum(t, l);
  ck_assert_int_eq(ad_grad(t, 1, &s, NULL, 1, &zt, &g, 0), AD_OK);
  ck_assert_double_eq_tol(ad_get(l, 0), 1000.0, 1e-12);
  ck_assert_double_eq_tol(ad_get(l, 1), 1000.0, 1e-12);
  ck_assert_double_eq_tol(ad_get(l, 2), 0.0, 1e-12);
  ck_assert_double_eq_tol(ad_get(l, 3), log(2.0), 1e-15); /* z = 0: log 2 for any y */
  ck_assert_double_eq_tol(ad_get(g, 0), 1.0, 1e-15);
  ck_assert_double_eq_tol(ad_get(g, 1), -1.0, 1e-15);
  ck_assert_double_eq_tol(ad_get(g, 2), 0.0, 1e-15);
  ck_assert_double_eq_tol(ad_get(g, 3), 0.25, 1e-15); /* sigma(0) - 0.25 */
  /* f32 too: no Inf/NaN at |z| = 1000. */
  ad_tensor *z32 = ad_empty(t, AD_F32, 1, S(4)), *y32 = ad_empty(t, AD_F32, 1, S(4));
  ad_copy_values(z32, zt);
  ad_copy_values(y32, yt);
  ad_tensor *m = nn_bce_with_logits(t, z32, y32);
  ck_assert_double_eq_tol(ad_item(m), (2000.0 + log(2.0)) / 4.0, 1e-4);
  ad_tensor_free(zt);
  ad_tape_free(t);
}
END_TEST

/* Per-example losses average to the core's mean losses (same math, two
 * code paths): |mean(ce_each) - ad_cross_entropy| <= 1e-14, and so for MSE;
 * ce_each[i] = logsumexp(row i) - logits[i, y_i] by hand. */
START_TEST(test_per_example_means) {
  ad_tape *t = tape();
  ad_rng r;
  ad_rng_seed(&r, 5);
  ad_tensor *z = ad_randn(t, AD_F64, 2, S(6, 4), &r);
  ad_tensor *each = nn_cross_entropy_each(t, z, LABELS, 6);
  ck_assert_int_eq(each->ndim, 1);
  ck_assert_int_eq(each->shape[0], 6);
  ck_assert_double_eq_tol(ad_item(ad_mean(t, each)), ad_item(ad_cross_entropy(t, z, LABELS, 6)),
                          1e-14);
  for (int i = 0; i < 6; i++) {
    double m = -INFINITY, s = 0;
    for (int c = 0; c < 4; c++) m = fmax(m, ad_get(z, i * 4 + c));
    for (int c = 0; c < 4; c++) s += exp(ad_get(z, i * 4 + c) - m);
    ck_assert_double_eq_tol(ad_get(each, i), m + log(s) - ad_get(z, i * 4 + LABELS[i]), 1e-14);
  }
  ad_tensor *a = ad_randn(t, AD_F64, 3, S(3, 2, 5), &r),
            *b = ad_randn(t, AD_F64, 3, S(3, 2, 5), &r);
  ad_tensor *me = nn_mse_each(t, a, b);
  ck_assert_int_eq(me->shape[0], 3);
  ck_assert_double_eq_tol(ad_item(ad_mean(t, me)), ad_item(ad_mse(t, a, b)), 1e-14);
  ck_assert_int_eq(ad_tape_status(t), AD_OK);
  ad_tape_free(t);
}
END_TEST

/* Dropout: evaluation is the identity (the same tensor); training zeroes a
 * fraction within 4 standard deviations of p (n = 20000: sd = 0.0035) and
 * scales survivors by exactly 1/(1-p); the same seed gives the same mask. */
START_TEST(test_dropout_stats) {
  ad_tape *t = tape();
  ad_tensor *x = ad_ones(t, AD_F32, 2, S(100, 200));
  ck_assert_ptr_eq(nn_dropout(t, x, 0.3, NULL, 0), x);
  ad_rng r1, r2;
  ad_rng_seed(&r1, 11);
  ad_rng_seed(&r2, 11);
  ad_tensor *y1 = nn_dropout(t, x, 0.3, &r1, 1), *y2 = nn_dropout(t, x, 0.3, &r2, 1);
  int64_t zeros = 0;
  for (int64_t i = 0; i < y1->size; i++) {
    double v = ad_get(y1, i);
    ck_assert(v == 0.0 || fabs(v - 1.0 / 0.7) < 1e-6);
    zeros += v == 0.0;
    ck_assert(v == ad_get(y2, i));
  }
  ck_assert_double_le(fabs((double)zeros / 20000.0 - 0.3), 4 * sqrt(0.3 * 0.7 / 20000.0));
  ck_assert_ptr_null(nn_dropout(t, x, 1.0, &r1, 1));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ad_tape_free(t);
}
END_TEST

/* Bad input: NULL or mismatched shapes return NULL and record the first
 * error on the tape with the op's name in the message. */
START_TEST(test_layer_errors) {
  ad_tape *t = tape();
  ad_tensor *x = ad_zeros(t, AD_F64, 2, S(5, 4)), *w = ad_zeros(t, AD_F64, 2, S(3, 5));
  ck_assert_ptr_null(nn_linear(t, x, w, NULL));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "nn_linear"));
  ad_tape_clear_error(t);
  int32_t bad[5] = {0, 1, 2, 9, 0};
  ck_assert_ptr_null(nn_cross_entropy_each(t, x, bad, 5));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ad_tape_clear_error(t);
  ck_assert_ptr_null(nn_mse_each(t, x, w));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ad_tape_clear_error(t);
  ck_assert_ptr_null(nn_gelu(t, NULL));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_NULL);
  ad_tape_clear_error(t);
  ck_assert_ptr_null(nn_gelu_backward(t, x, w));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ad_tape_free(t);
}
END_TEST

Suite *nn_layers_suite(void) {
  Suite *s = suite_create("nn_layers");
  TCase *tc = tcase_create("gradcheck");
  tcase_add_loop_test(tc, test_layer_gradcheck, 0, N_CASES);
  suite_add_tcase(s, tc);
  TCase *tv = tcase_create("values");
  tcase_add_test(tv, test_gelu_values);
  tcase_add_test(tv, test_bce_stable);
  tcase_add_test(tv, test_per_example_means);
  tcase_add_test(tv, test_dropout_stats);
  tcase_add_test(tv, test_layer_errors);
  suite_add_tcase(s, tv);
  return s;
}

int main(void) {
  SRunner *sr = srunner_create(nn_layers_suite());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
