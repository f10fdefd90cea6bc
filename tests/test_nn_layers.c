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

/* ---------------------------------------------------------------- conv, pool */
static ad_tensor *f_conv_s1p1(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_conv2d(t, x[0], x[1], x[2], 1, 1)));
}
static ad_tensor *f_conv_s2p1(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_conv2d(t, x[0], x[1], NULL, 2, 1)));
}
/* 5x6 input, 3x3 filter, stride 2, no padding: the last column is unused. */
static ad_tensor *f_conv_s2p0(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_conv2d(t, x[0], x[1], x[2], 2, 0)));
}
static ad_tensor *f_conv_1x1(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_conv2d(t, x[0], x[1], x[2], 1, 0)));
}
static ad_tensor *f_conv_bwd_input(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_conv2d_backward_input(t, x[0], x[1], 5, 5, 2, 1)));
}
static ad_tensor *f_conv_bwd_weight(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_conv2d_backward_weight(t, x[0], x[1], 3, 3, 2, 1)));
}
static ad_tensor *f_maxpool(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_max_pool2d(t, x[0], 2, 2, 0)));
}
static ad_tensor *f_maxpool_overlap(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_max_pool2d(t, x[0], 3, 2, 1)));
}
static ad_tensor *f_avgpool(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_avg_pool2d(t, x[0], 2, 2, 0)));
}
static ad_tensor *f_avgpool_overlap(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_avg_pool2d(t, x[0], 3, 2, 1)));
}
static const int32_t CNN_LABELS[2] = {0, 2};
/* conv -> tanh -> max pool -> flatten -> linear -> cross-entropy: the
 * composition a CNN's loss is, with its HVP (what unrolled HPO needs). */
static ad_tensor *cnn_loss(ad_tape *t, ad_tensor *x, ad_tensor *w1, ad_tensor *b1, ad_tensor *w2,
                           const int32_t *labels) {
  ad_tensor *h = ad_tanh(t, nn_conv2d(t, x, w1, b1, 1, 1));   /* [2, 2, 5, 5] */
  ad_tensor *p = nn_flatten(t, nn_max_pool2d(t, h, 2, 2, 0)); /* [2, 8] */
  return ad_cross_entropy(t, nn_linear(t, p, w2, NULL), labels, 2);
}
static ad_tensor *f_cnn(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(cnn_loss(t, x[0], x[1], x[2], x[3], CNN_LABELS));
}
/* Unrolled HPO through the CNN: two SGD steps with learning rate x[0] on a
 * training batch, then the loss on a validation batch. Its gradient is the
 * hypergradient d L_val / d (lr, w0); its HVP is a third derivative through
 * conv2d and both companions. Recording is forced on inside, since the
 * inner gradients are part of the function even when gc_check evaluates it
 * value-only. */
static ad_tensor *f_cnn_hpo(ad_tape *t, ad_tensor *const *x, void *ctx) {
  ad_tensor *const *data = ctx; /* [0] train batch, [1] validation batch */
  int prev = ad_set_recording(t, 1);
  ad_tensor *w[3] = {x[1], x[2], x[3]}, *g[3];
  static const int32_t val_labels[2] = {1, 0};
  for (int step = 0; step < 2; step++) {
    ad_tensor *loss = cnn_loss(t, data[0], w[0], w[1], w[2], CNN_LABELS);
    if (!loss || ad_grad(t, 1, &loss, NULL, 3, w, g, AD_GRAD_RECORD) != AD_OK) return NULL;
    for (int i = 0; i < 3; i++) w[i] = ad_sub(t, w[i], ad_mul(t, x[0], g[i]));
  }
  ad_tensor *val = cnn_loss(t, data[1], w[0], w[1], w[2], val_labels);
  ad_set_recording(t, prev);
  return val;
}

/* ---------------------------------------------------------------- norms */
static ad_tensor *f_layer_norm(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(nn_layer_norm(t, x[0], x[1], x[2], 1e-5));
}
static ad_tensor *f_layer_norm_plain(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, nn_layer_norm(t, x[0], NULL, NULL, 1e-3), x[0]));
}
static ad_tensor *f_bn_train(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(nn_batch_norm(t, x[0], x[1], x[2], NULL, NN_BN_TRAIN));
}
static ad_tensor *f_bn_train_2d(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_mul(t, nn_batch_norm(t, x[0], NULL, NULL, NULL, NN_BN_TRAIN), x[0]));
}
/* Evaluation mode: an affine map of x with constant statistics. */
static ad_tensor *f_bn_eval(ad_tape *t, ad_tensor *const *x, void *ctx) {
  (void)ctx;
  nn_bn_state s;
  if (nn_bn_state_init(&s, AD_F64, 2, 0.1, 1e-5) != AD_OK) return NULL;
  ad_set(s.mean, 0, 0.3);
  ad_set(s.mean, 1, -0.2);
  ad_set(s.var, 0, 2.0);
  ad_set(s.var, 1, 0.5);
  ad_tensor *y = ad_tanh(t, nn_batch_norm(t, x[0], x[1], x[2], &s, NN_BN_EVAL));
  nn_bn_state_free(&s);
  return y;
}

#define C1(N, F, D, ...)                                                                           \
  { N, F, 1, {D}, {{__VA_ARGS__}}, {0}, {0}, 0 }
static const gc_case CASES[] = {
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
    {"conv2d_s1_p1_bias",
     f_conv_s1p1,
     3,
     {4, 4, 1},
     {{2, 2, 5, 5}, {3, 2, 3, 3}, {3}},
     {0},
     {0},
     0},
    {"conv2d_s2_p1", f_conv_s2p1, 2, {4, 4}, {{2, 2, 5, 5}, {3, 2, 3, 3}}, {0}, {0}, 0},
    {"conv2d_s2_p0_5x6", f_conv_s2p0, 3, {4, 4, 1}, {{1, 2, 5, 6}, {2, 2, 3, 3}, {2}}, {0}, {0}, 0},
    {"conv2d_1x1", f_conv_1x1, 3, {4, 4, 1}, {{2, 3, 4, 4}, {2, 3, 1, 1}, {2}}, {0}, {0}, 0},
    {"conv2d_backward_input",
     f_conv_bwd_input,
     2,
     {4, 4},
     {{2, 3, 3, 3}, {3, 2, 3, 3}},
     {0},
     {0},
     0},
    {"conv2d_backward_weight",
     f_conv_bwd_weight,
     2,
     {4, 4},
     {{2, 2, 5, 5}, {2, 3, 3, 3}},
     {0},
     {0},
     0},
    {"max_pool2d", f_maxpool, 1, {4}, {{2, 2, 4, 4}}, {0}, {0}, 0},
    {"max_pool2d_k3_s2_p1", f_maxpool_overlap, 1, {4}, {{1, 2, 5, 5}}, {0}, {0}, 0},
    {"avg_pool2d", f_avgpool, 1, {4}, {{2, 2, 4, 4}}, {0}, {0}, 0},
    {"avg_pool2d_k3_s2_p1", f_avgpool_overlap, 1, {4}, {{1, 2, 5, 5}}, {0}, {0}, 0},
    {"cnn", f_cnn, 4, {4, 4, 1, 2}, {{2, 1, 5, 5}, {2, 1, 3, 3}, {2}, {3, 8}}, {0}, {0}, 0},
    {"layer_norm", f_layer_norm, 3, {2, 1, 1}, {{3, 5}, {5}, {5}}, {0}, {0}, 0},
    {"layer_norm_3d_plain", f_layer_norm_plain, 1, {3}, {{2, 3, 4}}, {0}, {0}, 0},
    {"batch_norm_train_nchw", f_bn_train, 3, {4, 1, 1}, {{3, 2, 2, 2}, {2}, {2}}, {0}, {0}, 0},
    {"batch_norm_train_nc", f_bn_train_2d, 1, {2}, {{4, 3}}, {0}, {0}, 0},
    {"batch_norm_eval", f_bn_eval, 3, {4, 1, 1}, {{2, 2, 2, 3}, {2}, {2}}, {0}, {0}, 0},
};
#define N_CASES ((int)(sizeof CASES / sizeof CASES[0]))

START_TEST(test_layer_gradcheck) {
  char rep[512];
  double worst = gc_check_case(&CASES[_i], 1000 + (uint64_t)_i, rep, sizeof rep);
  ck_assert_msg(worst <= 1e-6, "%s", rep); /* bound: 1e-6 relative, f64 */
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

/* Geometry that overflows (issue 9): pad 2^30 made 2 * pad overflow an
 * int in conv2d and pool; pad INT_MAX and an input height near INT64_MAX
 * (the backward ops take it from the caller) overflow 64-bit sizes. Each
 * is an error on the tape naming the op, never a wrapped size or a
 * sanitizer report; h = 0 is a shape error. */
START_TEST(test_conv_pool_sizes_overflow) {
  ad_tape *t = tape();
  ad_tensor *x = ad_zeros(t, AD_F32, 4, S(1, 1, 4, 4)), *w = ad_zeros(t, AD_F32, 4, S(1, 1, 3, 3));
  const int pads[2] = {1 << 30, INT32_MAX};
  for (int i = 0; i < 2; i++) {
    ck_assert_ptr_null(nn_conv2d(t, x, w, NULL, 1, pads[i]));
    ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
    ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "nn_conv2d"));
    ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "overflow"));
    ad_tape_clear_error(t);
    ck_assert_ptr_null(nn_max_pool2d(t, x, 3, 1, pads[i]));
    ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "nn_max_pool2d"));
    ad_tape_clear_error(t);
    ck_assert_ptr_null(nn_avg_pool2d(t, x, 3, 1, pads[i]));
    ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
    ad_tape_clear_error(t);
  }
  /* a kernel as large as an int with a pad half of it is legal: 4 + 2 pad
   * - k = 3, so a 4x4 output, every window clipped to the whole input, so
   * every output is the global maximum */
  ad_set(x, 5, 3.0);
  ad_tensor *m = nn_max_pool2d(t, x, INT32_MAX, 1, INT32_MAX / 2);
  ck_assert_ptr_nonnull(m);
  ck_assert_int_eq(m->shape[2], 4);
  ck_assert_int_eq(m->shape[3], 4);
  for (int64_t i = 0; i < m->size; i++) ck_assert(ad_get(m, i) == 3.0);
  ad_set(x, 5, 0.0);
  ad_tensor *g = ad_zeros(t, AD_F32, 4, S(1, 1, 2, 2));
  ck_assert_ptr_null(nn_conv2d_backward_input(t, g, w, INT64_MAX, 4, 1, 1));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "overflow"));
  ad_tape_clear_error(t);
  ck_assert_ptr_null(nn_conv2d_backward_input(t, g, w, INT64_MAX / 2, INT64_MAX / 2, 1, 0));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "overflow"));
  ad_tape_clear_error(t);
  ck_assert_ptr_null(nn_conv2d_backward_input(t, g, w, 0, 4, 1, 1));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "at least 1x1"));
  ad_tape_clear_error(t);
  ck_assert_ptr_null(nn_conv2d_backward_weight(t, x, g, INT64_MAX, 3, 1, 1));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ad_tape_clear_error(t);
  /* the same calls at sane sizes still work: 4x4, 3x3, pad 1 -> 4x4 */
  ad_tensor *y = nn_conv2d(t, x, w, NULL, 1, 1);
  ck_assert_ptr_nonnull(y);
  ck_assert_int_eq(y->shape[2], 4);
  ad_tape_free(t);
}
END_TEST

/* Non-finite and degenerate hyperparameters (issue 9) are AD_ERR_ARG with
 * the function and the value in the message, uniformly: batch-norm
 * momentum and eps (at init, and in a state edited afterwards, which then
 * stays unchanged), leaky-ReLU slope (NaN, Inf, and 1e300, which is Inf in
 * f32), layer-norm eps, dropout p. */
START_TEST(test_nonfinite_hyperparameters) {
  const double nan = NAN, inf = INFINITY;
  nn_bn_state st;
  const double bad_m[4] = {nan, inf, -0.1, 1.5}, bad_e[3] = {nan, inf, -1.0};
  for (int i = 0; i < 4; i++) {
    ck_assert_int_eq(nn_bn_state_init(&st, AD_F64, 3, bad_m[i], 0), AD_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(ad_last_error(), "nn_bn_state_init"));
    ck_assert_ptr_null(st.mean);
  }
  ck_assert_ptr_nonnull(strstr(ad_last_error(), "momentum 1.5"));
  for (int i = 0; i < 3; i++) {
    ck_assert_int_eq(nn_bn_state_init(&st, AD_F64, 3, 0.1, bad_e[i]), AD_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(ad_last_error(), i == 0   ? "eps nan"
                                                  : i == 1 ? "eps inf"
                                                           : "eps -1"));
  }
  ck_assert_int_eq(nn_bn_state_init(&st, AD_F64, 3, 1.0, 0), AD_OK); /* momentum 1 is legal */
  ad_tape *t = tape();
  ad_rng r;
  ad_rng_seed(&r, 3);
  ad_tensor *x = ad_randn(t, AD_F64, 2, S(8, 3), &r);
  st.eps = nan;
  ck_assert_ptr_null(nn_batch_norm(t, x, NULL, NULL, &st, NN_BN_EVAL));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "nn_batch_norm: state eps nan"));
  ad_tape_clear_error(t);
  st.eps = 1e-5;
  st.momentum = nan;
  ck_assert_ptr_null(nn_batch_norm(t, x, NULL, NULL, &st, NN_BN_TRAIN | NN_BN_UPDATE));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "momentum nan"));
  ad_tape_clear_error(t);
  for (int c = 0; c < 3; c++) {
    ck_assert(ad_get(st.mean, c) == 0.0);
    ck_assert(ad_get(st.var, c) == 1.0);
  }
  ck_assert_int_eq(st.n_updates, 0);
  /* TRAIN alone does not use the momentum: still fine */
  ck_assert_ptr_nonnull(nn_batch_norm(t, x, NULL, NULL, &st, NN_BN_TRAIN));
  nn_bn_state_free(&st);

  ad_tensor *x32 = ad_randn(t, AD_F32, 1, S(6), &r), *g32 = ad_ones(t, AD_F32, 1, S(6));
  const double bad_slope[3] = {nan, -inf, 1e300};
  for (int i = 0; i < 3; i++) {
    ck_assert_ptr_null(nn_leaky_relu(t, x32, bad_slope[i]));
    ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "nn_leaky_relu: slope"));
    ad_tape_clear_error(t);
    ck_assert_ptr_null(nn_leaky_relu_backward(t, g32, x32, bad_slope[i]));
    ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "nn_leaky_relu_backward: slope"));
    ad_tape_clear_error(t);
  }
  ck_assert_ptr_nonnull(nn_leaky_relu(t, x, 1e300)); /* finite in f64 */
  ck_assert_ptr_null(nn_layer_norm(t, x, NULL, NULL, inf));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "nn_layer_norm: eps inf"));
  ad_tape_clear_error(t);
  ck_assert_ptr_null(nn_dropout(t, x, nan, &r, 1));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "nn_dropout: p = nan"));
  ad_tape_free(t);
}
END_TEST

/* The unrolled-HPO function through the CNN (see f_cnn_hpo): gradient =
 * hypergradient, HVP = third derivative, JVP; all within 1e-6 of finite
 * differences. */
START_TEST(test_cnn_unrolled_hpo) {
  ad_rng r;
  ad_rng_seed(&r, 77);
  ad_tensor *data[2] = {gc_leaf(4, S(2, 1, 5, 5), &r, 0, 0), gc_leaf(4, S(2, 1, 5, 5), &r, 0, 0)};
  ad_requires_grad(data[0], 0);
  ad_requires_grad(data[1], 0);
  ad_tensor *in[4] = {gc_leaf(1, S(1), &r, 0, 0), gc_leaf(4, S(2, 1, 3, 3), &r, 0, 0),
                      gc_leaf(1, S(2), &r, 0, 0), gc_leaf(2, S(3, 8), &r, 0, 0)};
  ad_set(in[0], 0, 0.3); /* learning rate */
  char rep[512];
  double worst =
      gc_check("cnn_unrolled_hpo", f_cnn_hpo, 4, in, data, (gc_opts){0}, rep, sizeof rep);
  fprintf(stderr, "%s\n", rep);
  ck_assert_msg(worst <= 1e-6, "%s", rep); /* bound: 1e-6 relative, f64 */
  for (int i = 0; i < 4; i++) ad_tensor_free(in[i]);
  ad_tensor_free(data[0]);
  ad_tensor_free(data[1]);
}
END_TEST

/* Direct convolution by the definition, for comparison. */
static double conv_ref(const ad_tensor *x, const ad_tensor *w, const ad_tensor *b, int st, int pad,
                       int64_t n, int64_t k, int64_t p, int64_t q) {
  int64_t C = x->shape[1], H = x->shape[2], W = x->shape[3], R = w->shape[2], Sw = w->shape[3];
  double acc = b ? ad_get(b, k) : 0;
  for (int64_t c = 0; c < C; c++)
    for (int64_t r = 0; r < R; r++)
      for (int64_t s = 0; s < Sw; s++) {
        int64_t ih = p * st + r - pad, iw = q * st + s - pad;
        if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
        acc +=
            ad_get(w, ((k * C + c) * R + r) * Sw + s) * ad_get(x, ((n * C + c) * H + ih) * W + iw);
      }
  return acc;
}

/* On an arena full of NaN bytes, conv2d equals the direct sum in f64
 * (1e-12) and f32 (1e-4) for several
 * geometries (padding larger than needed, stride 3, 1x1, non-square, the
 * same-width fast path with more output rows than input rows), and
 * the three ops are exact adjoints: <G, conv(x, w)> = <bwd_input(G, w), x>
 * = <bwd_weight(x, G), w> to 1e-10 relative. */
START_TEST(test_conv_values) {
  /* N C H W K R S stride pad; the last two take the same-width path with
   * 7 and 5 output rows for 5 and 7 input rows */
  const int geo[7][9] = {{2, 3, 7, 6, 4, 3, 3, 1, 1}, {1, 2, 8, 8, 3, 5, 5, 1, 2},
                         {2, 2, 9, 7, 3, 3, 2, 3, 2}, {3, 4, 5, 5, 2, 1, 1, 1, 0},
                         {1, 1, 6, 6, 2, 4, 4, 2, 0}, {2, 2, 5, 6, 3, 1, 3, 1, 1},
                         {1, 2, 7, 6, 2, 5, 3, 1, 1}};
  ad_tape *t = tape();
  ad_rng r;
  ad_rng_seed(&r, 21);
  for (int gi = 0; gi < 7; gi++) {
    const int *g = geo[gi];
    /* Poison the arena (all-ones bytes: NaN in f32 and f64) so that any
     * workspace element the kernels forget to write shows up as a NaN. */
    ad_marker m0 = ad_mark(t);
    ad_tensor *junk = ad_empty(t, AD_F64, 1, S(1 << 19));
    memset(junk->data, 0xFF, (size_t)junk->size * 8);
    ad_rewind(t, m0);
    ad_tensor *x = ad_randn(t, AD_F64, 4, S(g[0], g[1], g[2], g[3]), &r);
    ad_tensor *w = ad_randn(t, AD_F64, 4, S(g[4], g[1], g[5], g[6]), &r);
    ad_tensor *b = ad_randn(t, AD_F64, 1, S(g[4]), &r);
    ad_tensor *y = nn_conv2d(t, x, w, b, g[7], g[8]);
    ck_assert_ptr_nonnull(y);
    ck_assert_int_eq(y->shape[2], (g[2] + 2 * g[8] - g[5]) / g[7] + 1);
    ck_assert_int_eq(y->shape[3], (g[3] + 2 * g[8] - g[6]) / g[7] + 1);
    for (int64_t n = 0; n < y->shape[0]; n++)
      for (int64_t k = 0; k < y->shape[1]; k++)
        for (int64_t p = 0; p < y->shape[2]; p++)
          for (int64_t q = 0; q < y->shape[3]; q++) {
            int64_t i = ((n * y->shape[1] + k) * y->shape[2] + p) * y->shape[3] + q;
            ck_assert_double_eq_tol(ad_get(y, i), conv_ref(x, w, b, g[7], g[8], n, k, p, q), 1e-12);
          }
    ad_tensor *x32 = ad_empty(t, AD_F32, 4, x->shape), *w32 = ad_empty(t, AD_F32, 4, w->shape);
    ad_tensor *b32 = ad_empty(t, AD_F32, 1, b->shape);
    ad_copy_values(x32, x);
    ad_copy_values(w32, w);
    ad_copy_values(b32, b);
    ad_tensor *y32 = nn_conv2d(t, x32, w32, b32, g[7], g[8]);
    for (int64_t i = 0; i < y->size; i++)
      ck_assert_double_eq_tol(ad_get(y32, i), ad_get(y, i), 1e-4);
    ad_tensor *G = ad_randn(t, AD_F64, 4, y->shape, &r);
    double a = ad_item(ad_dot(t, G, nn_conv2d(t, x, w, NULL, g[7], g[8])));
    double bi = ad_item(
        ad_dot(t, nn_conv2d_backward_input(t, G, w, x->shape[2], x->shape[3], g[7], g[8]), x));
    double bw = ad_item(
        ad_dot(t, nn_conv2d_backward_weight(t, x, G, w->shape[2], w->shape[3], g[7], g[8]), w));
    ck_assert_double_le(fabs(a - bi), 1e-10 * (1 + fabs(a)));
    ck_assert_double_le(fabs(a - bw), 1e-10 * (1 + fabs(a)));
  }
  ck_assert_int_eq(ad_tape_status(t), AD_OK);
  /* Shape errors name the op. */
  ad_tensor *x = ad_zeros(t, AD_F64, 4, S(1, 2, 4, 4)), *w = ad_zeros(t, AD_F64, 4, S(3, 1, 3, 3));
  ck_assert_ptr_null(nn_conv2d(t, x, w, NULL, 1, 0));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "nn_conv2d"));
  ad_tape_clear_error(t);
  ck_assert_ptr_null(nn_conv2d(t, x, ad_zeros(t, AD_F64, 4, S(3, 2, 3, 3)), NULL, 0, 0));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ad_tape_free(t);
}
END_TEST

/* Pooling values against the definition: max over the clipped window and
 * its sum / k^2; the max-pool gradient lands on each window's maximum
 * (exactly g there, 0 elsewhere, for non-overlapping windows, including
 * the row no window covers); NaN propagates. */
START_TEST(test_pool_values) {
  ad_tape *t = tape();
  ad_marker m0 = ad_mark(t); /* NaN bytes where the results will go (see test_conv_values) */
  ad_tensor *junk = ad_empty(t, AD_F64, 1, S(1 << 19));
  memset(junk->data, 0xFF, (size_t)junk->size * 8);
  ad_rewind(t, m0);
  ad_rng r;
  ad_rng_seed(&r, 31);
  ad_tensor *x = NULL;
  ck_assert_int_eq(ad_tensor_new(&x, AD_F64, 4, S(2, 3, 7, 6)), AD_OK);
  ad_tensor_fill_normal(x, &r, 0, 1);
  ad_requires_grad(x, 1);
  const int cfg[3][3] = {{2, 2, 0}, {3, 2, 1}, {3, 3, 1}};
  for (int ci = 0; ci < 3; ci++) {
    int k = cfg[ci][0], st = cfg[ci][1], pad = cfg[ci][2];
    ad_tensor *mx = nn_max_pool2d(t, x, k, st, pad), *av = nn_avg_pool2d(t, x, k, st, pad);
    ck_assert_ptr_nonnull(mx);
    ck_assert_ptr_nonnull(av);
    for (int64_t nc = 0; nc < 6; nc++)
      for (int64_t p = 0; p < mx->shape[2]; p++)
        for (int64_t q = 0; q < mx->shape[3]; q++) {
          double m = -INFINITY, sum = 0;
          for (int64_t i = p * st - pad; i < p * st - pad + k; i++)
            for (int64_t j = q * st - pad; j < q * st - pad + k; j++) {
              if (i < 0 || i >= 7 || j < 0 || j >= 6) continue;
              double v = ad_get(x, nc * 42 + i * 6 + j);
              m = fmax(m, v);
              sum += v;
            }
          int64_t o = (nc * mx->shape[2] + p) * mx->shape[3] + q;
          ck_assert_double_eq(ad_get(mx, o), m);
          ck_assert_double_eq_tol(ad_get(av, o), sum / (k * k), 1e-14);
        }
  }
  ad_tensor *y = nn_max_pool2d(t, x, 2, 2, 0), *g = NULL;
  ad_tensor *gy = ad_randn(t, AD_F64, 4, y->shape, &r);
  ck_assert_int_eq(ad_grad(t, 1, &y, &gy, 1, &x, &g, 0), AD_OK);
  int64_t nonzero = 0;
  for (int64_t i = 0; i < g->size; i++) nonzero += ad_get(g, i) != 0;
  ck_assert_int_eq(nonzero, y->size);
  for (int64_t i = 0; i < g->size; i++) {
    if (ad_get(g, i) == 0) continue;
    int64_t nc = i / 42, h = i % 42 / 6, w = i % 6;
    if (h >= 6) continue; /* row 6 is outside every 2x2 window */
    int64_t o = (nc * 3 + h / 2) * 3 + w / 2;
    ck_assert_double_eq(ad_get(x, i), ad_get(y, o));
    ck_assert_double_eq(ad_get(g, i), ad_get(gy, o));
  }
  ck_assert_ptr_null(nn_max_pool2d(t, x, 2, 2, 2));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ad_tape_clear_error(t);
  /* A NaN in a window is that window's max (as the core's max_axis does),
   * on the 2x2 fast path and the general one, in f32 and f64. */
  for (int dt = 0; dt < 2; dt++) {
    ad_tensor *z = ad_zeros(t, dt ? AD_F64 : AD_F32, 4, S(1, 1, 4, 4));
    ad_set(z, 5, NAN); /* row 1, column 1 */
    ad_set(z, 4, 3.0);
    ad_tensor *m2 = nn_max_pool2d(t, z, 2, 2, 0), *m3 = nn_max_pool2d(t, z, 3, 1, 0);
    ck_assert(isnan(ad_get(m2, 0)) && ad_get(m2, 1) == 0 && ad_get(m2, 2) == 0);
    ck_assert(isnan(ad_get(m3, 0)) && isnan(ad_get(m3, 1)) && isnan(ad_get(m3, 2)));
  }
  ad_tensor_free(x);
  ad_tape_free(t);
}
END_TEST

/* Layer norm output rows have mean 0 (1e-12) and biased variance
 * var / (var + eps) (1e-10); gamma and beta apply per column. */
START_TEST(test_layer_norm_values) {
  ad_tape *t = tape();
  ad_rng r;
  ad_rng_seed(&r, 41);
  ad_tensor *x = ad_randn(t, AD_F64, 2, S(4, 6), &r);
  ad_tensor *y = nn_layer_norm(t, x, NULL, NULL, 1e-5);
  const double gam[6] = {1, 2, 3, 4, 5, 6}, bet[6] = {-1, 0, 1, 2, 3, 4};
  ad_tensor *ga = ad_const(t, AD_F64, 1, S(6), gam), *be = ad_const(t, AD_F64, 1, S(6), bet);
  ad_tensor *ya = nn_layer_norm(t, x, ga, be, 1e-5);
  for (int i = 0; i < 4; i++) {
    double mx = 0, vx = 0, my = 0, vy = 0;
    for (int j = 0; j < 6; j++) mx += ad_get(x, i * 6 + j) / 6, my += ad_get(y, i * 6 + j) / 6;
    for (int j = 0; j < 6; j++) {
      vx += pow(ad_get(x, i * 6 + j) - mx, 2) / 6;
      vy += pow(ad_get(y, i * 6 + j) - my, 2) / 6;
      ck_assert_double_eq_tol(ad_get(ya, i * 6 + j), ad_get(y, i * 6 + j) * gam[j] + bet[j], 1e-12);
    }
    ck_assert_double_eq_tol(my, 0, 1e-12);
    ck_assert_double_eq_tol(vy, vx / (vx + 1e-5), 1e-10);
  }
  ad_tape_free(t);
}
END_TEST

/* Running statistics: NN_BN_TRAIN alone leaves the state bit-identical;
 * TRAIN|UPDATE from (mean 0, var 1) with momentum 0.1 gives exactly
 * mean = 0.1 batch_mean and var = 0.9 + 0.1 unbiased_var (1e-14); EVAL
 * normalises with the running values; bad mode combinations fail. */
START_TEST(test_bn_running_stats) {
  ad_tape *t = tape();
  const double xv[8] = {1, 10, 2, 20, 4, 40, 5, 50}; /* [4, 2]: channel 0 = 1,2,4,5 */
  ad_tensor *x = ad_const(t, AD_F64, 2, S(4, 2), xv);
  nn_bn_state s;
  ck_assert_int_eq(nn_bn_state_init(&s, AD_F64, 2, 0.1, 1e-5), AD_OK);
  ad_tensor *y = nn_batch_norm(t, x, NULL, NULL, &s, NN_BN_TRAIN);
  ck_assert_ptr_nonnull(y);
  ck_assert_int_eq(s.n_updates, 0);
  ck_assert(ad_get(s.mean, 0) == 0 && ad_get(s.var, 0) == 1 && ad_get(s.mean, 1) == 0);
  /* batch: mean 3 and 30, biased var 2.5 and 250, unbiased 10/3 and 1000/3 */
  ck_assert_double_eq_tol(ad_get(y, 0), -2 / sqrt(2.5 + 1e-5), 1e-14);
  ck_assert_ptr_nonnull(nn_batch_norm(t, x, NULL, NULL, &s, NN_BN_TRAIN | NN_BN_UPDATE));
  ck_assert_int_eq(s.n_updates, 1);
  ck_assert_double_eq_tol(ad_get(s.mean, 0), 0.3, 1e-14);
  ck_assert_double_eq_tol(ad_get(s.mean, 1), 3.0, 1e-14);
  ck_assert_double_eq_tol(ad_get(s.var, 0), 0.9 + 0.1 * 10.0 / 3.0, 1e-14);
  ck_assert_double_eq_tol(ad_get(s.var, 1), 0.9 + 0.1 * 1000.0 / 3.0, 1e-12);
  ad_tensor *ye = nn_batch_norm(t, x, NULL, NULL, &s, NN_BN_EVAL);
  ck_assert_double_eq_tol(ad_get(ye, 3), (20 - 3.0) / sqrt(0.9 + 100.0 / 3.0 + 1e-5), 1e-14);
  ck_assert_ptr_null(nn_batch_norm(t, x, NULL, NULL, &s, NN_BN_UPDATE));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ad_tape_clear_error(t);
  ck_assert_ptr_null(nn_batch_norm(t, x, NULL, NULL, NULL, NN_BN_EVAL));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_NULL);
  nn_bn_state_free(&s);
  nn_bn_state_free(&s); /* twice is fine */
  ad_tape_free(t);
}
END_TEST

/* One unrolled inner loop: T = 3 SGD steps of a linear + batch-norm model
 * with learning rate lr, batch norm in TRAIN|UPDATE mode on a CLONE of the
 * evaluation state, then the validation loss with the original state in
 * EVAL mode, and d L_val / d lr. */
typedef struct {
  ad_tensor *xtr, *ytr, *xval, *yval;
  nn_bn_state *eval_state;
} bn_problem;

static ad_tensor *bn_model(ad_tape *t, ad_tensor *x, ad_tensor *w, ad_tensor *gamma, nn_bn_state *s,
                           unsigned mode) {
  return nn_batch_norm(t, nn_linear(t, x, w, NULL), gamma, NULL, s, mode);
}

static double bn_unrolled(ad_tape *t, const bn_problem *pb, ad_tensor *lr, ad_tensor *w0,
                          ad_tensor *g0, double *dlr) {
  nn_bn_state inner;
  ck_assert_int_eq(nn_bn_state_clone(&inner, pb->eval_state), AD_OK);
  ad_tensor *p[2] = {w0, g0}, *g[2];
  for (int step = 0; step < 3; step++) {
    ad_tensor *out = bn_model(t, pb->xtr, p[0], p[1], &inner, NN_BN_TRAIN | NN_BN_UPDATE);
    ad_tensor *loss = ad_mse(t, out, pb->ytr);
    ck_assert_int_eq(ad_grad(t, 1, &loss, NULL, 2, p, g, AD_GRAD_RECORD), AD_OK);
    for (int i = 0; i < 2; i++) p[i] = ad_sub(t, p[i], ad_mul(t, lr, g[i]));
  }
  ck_assert_int_eq(inner.n_updates, pb->eval_state->n_updates + 3);
  nn_bn_state_free(&inner);
  ad_tensor *val =
      ad_mse(t, bn_model(t, pb->xval, p[0], p[1], pb->eval_state, NN_BN_EVAL), pb->yval);
  if (dlr) {
    ad_tensor *h = NULL;
    ck_assert_int_eq(ad_grad(t, 1, &val, NULL, 1, &lr, &h, 0), AD_OK);
    *dlr = ad_item(h);
  }
  return ad_item(val);
}

/* The evaluation state is bit-identical after the unrolled loop (mean,
 * var, n_updates) and evaluation outputs are unchanged, while the clone
 * did take 3 updates; the hypergradient through the train-mode batch norm
 * matches central differences (each run on a fresh clone) to 1e-6
 * relative. */
START_TEST(test_bn_inner_loop_does_not_leak) {
  ad_tape *t = tape();
  ad_rng r;
  ad_rng_seed(&r, 51);
  nn_bn_state ev;
  ck_assert_int_eq(nn_bn_state_init(&ev, AD_F64, 3, 0.2, 1e-5), AD_OK);
  bn_problem pb = {ad_randn(t, AD_F64, 2, S(8, 4), &r), ad_randn(t, AD_F64, 2, S(8, 3), &r),
                   ad_randn(t, AD_F64, 2, S(6, 4), &r), ad_randn(t, AD_F64, 2, S(6, 3), &r), &ev};
  ad_tensor *w0 = NULL, *g0 = NULL, *lr = NULL;
  ck_assert_int_eq(ad_tensor_new(&w0, AD_F64, 2, S(3, 4)), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&g0, AD_F64, 1, S(3)), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&lr, AD_F64, 1, S(1)), AD_OK);
  ad_tensor_fill_normal(w0, &r, 0, 0.5);
  ad_tensor_fill_uniform(g0, &r, 0.5, 1.5);
  ad_set(lr, 0, 0.1);
  ad_requires_grad(w0, 1);
  ad_requires_grad(g0, 1);
  ad_requires_grad(lr, 1);
  /* Warm the evaluation statistics up with a few real updates. */
  for (int i = 0; i < 3; i++)
    ck_assert_ptr_nonnull(
        bn_model(t, ad_randn(t, AD_F64, 2, S(8, 4), &r), w0, g0, &ev, NN_BN_TRAIN | NN_BN_UPDATE));
  double mean0[3], var0[3];
  for (int c = 0; c < 3; c++) mean0[c] = ad_get(ev.mean, c), var0[c] = ad_get(ev.var, c);
  ad_tensor *e0 = bn_model(t, pb.xval, w0, g0, &ev, NN_BN_EVAL);
  double dlr = 0;
  ad_marker m = ad_mark(t);
  double v = bn_unrolled(t, &pb, lr, w0, g0, &dlr);
  ad_rewind(t, m);
  ck_assert_int_eq(ev.n_updates, 3);
  for (int c = 0; c < 3; c++) {
    ck_assert(ad_get(ev.mean, c) == mean0[c]);
    ck_assert(ad_get(ev.var, c) == var0[c]);
  }
  ad_tensor *e1 = bn_model(t, pb.xval, w0, g0, &ev, NN_BN_EVAL);
  for (int64_t i = 0; i < e0->size; i++) ck_assert(ad_get(e0, i) == ad_get(e1, i));
  const double h = 1e-6;
  ad_set(lr, 0, 0.1 + h);
  double vp = bn_unrolled(t, &pb, lr, w0, g0, NULL);
  ad_set(lr, 0, 0.1 - h);
  double vm = bn_unrolled(t, &pb, lr, w0, g0, NULL);
  double num = (vp - vm) / (2 * h);
  ck_assert_msg(fabs(dlr - num) <= 1e-6 * (1 + fabs(num)), "dL/dlr %.10g vs numeric %.10g", dlr,
                num);
  ck_assert(isfinite(v) && fabs(dlr) > 1e-6); /* a real signal, not a zero gradient */
  nn_bn_state_free(&ev);
  ad_tensor_free(w0);
  ad_tensor_free(g0);
  ad_tensor_free(lr);
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
  tcase_add_test(tv, test_conv_pool_sizes_overflow);
  tcase_add_test(tv, test_nonfinite_hyperparameters);
  tcase_add_test(tv, test_cnn_unrolled_hpo);
  tcase_add_test(tv, test_conv_values);
  tcase_add_test(tv, test_pool_values);
  tcase_add_test(tv, test_layer_norm_values);
  tcase_add_test(tv, test_bn_running_stats);
  tcase_add_test(tv, test_bn_inner_loop_does_not_leak);
  suite_add_tcase(s, tv);
  return s;
}

int main(void) {
  return gc_run_suite(nn_layers_suite());
}
