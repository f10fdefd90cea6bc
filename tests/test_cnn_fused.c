/* test_cnn_fused.c — nn_relu_max_pool2d (relu and max pooling fused, with
 * its own scatter/gather rule) against the unfused compositions
 * nn_max_pool2d(ad_relu(x)) and ad_relu(nn_max_pool2d(x)), values and
 * first and second derivatives, plus finite-difference gradchecks and its
 * errors; nn_conv2d (bias in the GEMM, chunked im2col/col2im) against a
 * direct loop over the convolution's definition; and
 * nn_conv2d_relu_max_pool2d (conv, bias, relu and pool in one op) against
 * nn_relu_max_pool2d(nn_conv2d(...)) and ad_relu(nn_max_pool2d(nn_conv2d(...))). */
#include "gradcheck.h"
#include "nn/nn.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define S(...) ((const int64_t[]){__VA_ARGS__})
#define IN(x) ((void)ctx, (x))

static ad_tape *tape(void) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 8}), AD_OK);
  return t;
}

/* ---------------------------------------------------------------- gradchecks */
/* tanh after the pool: the HVP check then runs through the scatter's own
 * rule (the gather) and back, the second order of the fused op. */
static ad_tensor *f_rmp_2x2(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_relu_max_pool2d(t, x[0], 2, 2, 0)));
}
static ad_tensor *f_rmp_k3_s2_p1(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_relu_max_pool2d(t, x[0], 3, 2, 1)));
}
static ad_tensor *f_rmp_k3_s1_p1(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_relu_max_pool2d(t, x[0], 3, 1, 1)));
}
static ad_tensor *f_rmp_k2_s1(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_relu_max_pool2d(t, x[0], 2, 1, 0)));
}
static const int32_t LABELS[2] = {2, 0};
/* conv (bias) -> fused relu + pool -> linear -> cross-entropy: the bench's
 * net in small, its HVP a second order through conv and the fused op. */
static ad_tensor *f_cnn(ad_tape *t, ad_tensor *const *x, void *ctx) {
  ad_tensor *h = nn_relu_max_pool2d(t, nn_conv2d(t, x[0], x[1], x[2], 1, 1), 2, 2, 0);
  return IN(ad_cross_entropy(t, nn_linear(t, nn_flatten(t, h), x[3], NULL), LABELS, 2));
}
/* A strided, padded, non-square conv with bias: the general im2col/col2im. */
static ad_tensor *f_conv_s2(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_conv2d(t, x[0], x[1], x[2], 2, 1)));
}

/* conv + bias + relu + pool fused, a tanh after it so the HVP runs
 * through the scatter's rule (the gather) and conv's rules. */
static ad_tensor *f_crp_same(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_conv2d_relu_max_pool2d(t, x[0], x[1], x[2], 1, 1, 2, 2, 0)));
}
static ad_tensor *f_crp_s2_k3(ad_tape *t, ad_tensor *const *x, void *ctx) {
  return IN(ad_tanh(t, nn_conv2d_relu_max_pool2d(t, x[0], x[1], x[2], 2, 1, 3, 2, 1)));
}
/* The bench's net in small through the fused op, no bias on conv 2. */
static ad_tensor *f_cnn_crp(ad_tape *t, ad_tensor *const *x, void *ctx) {
  ad_tensor *h = nn_conv2d_relu_max_pool2d(t, x[0], x[1], x[2], 1, 1, 2, 2, 0);
  return IN(ad_cross_entropy(t, nn_linear(t, nn_flatten(t, h), x[3], NULL), LABELS, 2));
}

/* Offsets put part of the inputs below 0 (relu's kink), margins keep the
 * finite differences off it; the sizes are odd so windows leave rows and
 * columns over. */
static const gc_case CASES[] = {
    {"relu_max_pool2d_2x2", f_rmp_2x2, 1, {4}, {{2, 3, 5, 7}}, {0.3}, {0.05}, 0},
    {"relu_max_pool2d_2x2_wide", f_rmp_2x2, 1, {4}, {{1, 2, 4, 19}}, {0.1}, {0.05}, 0},
    {"relu_max_pool2d_k3_s2_p1", f_rmp_k3_s2_p1, 1, {4}, {{1, 2, 5, 6}}, {0.2}, {0.05}, 0},
    {"relu_max_pool2d_k3_s1_p1", f_rmp_k3_s1_p1, 1, {4}, {{1, 2, 4, 5}}, {-0.2}, {0.05}, 0},
    {"relu_max_pool2d_k2_s1", f_rmp_k2_s1, 1, {4}, {{2, 1, 3, 4}}, {0}, {0.05}, 0},
    {"cnn_fused",
     f_cnn,
     4,
     {4, 4, 1, 2},
     {{2, 1, 5, 5}, {2, 1, 3, 3}, {2}, {3, 8}},
     {0, 0, 0.1, 0},
     {0, 0, 0, 0},
     0},
    {"conv2d_relu_max_pool2d_same",
     f_crp_same,
     3,
     {4, 4, 1},
     {{2, 2, 5, 7}, {3, 2, 3, 3}, {3}},
     {0, 0, 0.1},
     {0, 0, 0},
     0},
    {"conv2d_relu_max_pool2d_s2_k3",
     f_crp_s2_k3,
     3,
     {4, 4, 1},
     {{1, 2, 7, 6}, {3, 2, 3, 2}, {3}},
     {0, 0, 0.1},
     {0, 0, 0},
     0},
    {"cnn_conv_relu_pool_fused",
     f_cnn_crp,
     4,
     {4, 4, 1, 2},
     {{2, 1, 5, 5}, {2, 1, 3, 3}, {2}, {3, 8}},
     {0, 0, 0.1, 0},
     {0, 0, 0, 0},
     0},
    {"conv2d_s2_p1_bias", f_conv_s2, 3, {4, 4, 1}, {{2, 3, 5, 6}, {4, 3, 3, 2}, {4}}, {0}, {0}, 0},
};
#define N_CASES ((int)(sizeof CASES / sizeof CASES[0]))

START_TEST(test_fused_gradcheck) {
  char rep[512];
  double worst = gc_check_case(&CASES[_i], 4000 + (uint64_t)_i, rep, sizeof rep);
  ck_assert_msg(worst <= 1e-6, "%s", rep); /* bound: 1e-6 relative, f64 */
}
END_TEST

/* ---------------------------------------------------------------- fused vs unfused */

typedef struct {
  int n, c, h, w, k, st, pad;
} geom;

static const geom GEOMS[] = {
    {2, 3, 6, 8, 2, 2, 0},  /* the tiled fast path */
    {2, 2, 7, 5, 2, 2, 0},  /* tiled, a row and a column left over */
    {2, 2, 6, 21, 2, 2, 0}, /* tiled, rows of 10 windows: 8 four at a time, 2 one by one */
    {1, 2, 5, 37, 2, 2, 0}, /* tiled, rows of 18 windows: 16 and 2 under a mask (AVX-512) */
    {1, 2, 7, 7, 3, 2, 1},  /* overlapping, padded */
    {2, 1, 5, 6, 3, 1, 1},  /* stride 1 */
    {1, 3, 4, 9, 2, 3, 1},  /* stride past the window, padded */
    {3, 2, 1, 1, 1, 1, 0},  /* 1x1 */
};
#define N_GEOMS ((int)(sizeof GEOMS / sizeof GEOMS[0]))

enum { FUSED, RELU_POOL, POOL_RELU };

static ad_tensor *pool_by(ad_tape *t, ad_tensor *x, const geom *g, int how) {
  if (how == FUSED) return nn_relu_max_pool2d(t, x, g->k, g->st, g->pad);
  if (how == RELU_POOL) return nn_max_pool2d(t, ad_relu(t, x), g->k, g->st, g->pad);
  return ad_relu(t, nn_max_pool2d(t, x, g->k, g->st, g->pad));
}

/* Inputs from a small set of integers (-2..2, scaled): plenty of ties,
 * windows all negative, all zero, mixed. */
static ad_tensor *tie_input(ad_dtype dt, const geom *g, ad_rng *r) {
  ad_tensor *x = NULL;
  ck_assert_int_eq(ad_tensor_new(&x, dt, 4, S(g->n, g->c, g->h, g->w)), AD_OK);
  for (int64_t i = 0; i < x->size; i++) ad_set(x, i, 0.5 * ((double)ad_rng_below(r, 5) - 2.0));
  ad_requires_grad(x, 1);
  return x;
}

static void fill_rand(ad_tensor *v, ad_rng *r) {
  for (int64_t i = 0; i < v->size; i++) ad_set(v, i, ad_rng_normal(r));
}

/* Values y, gradient dx of <tanh(y), u> (exact: <y y, u>, exact in f32 for
 * small integer data), and the HVP d<dx, v>/dx through
 * the recorded backward, for one way of computing the pool. */
static void run(ad_tape *t, ad_tensor *x, const geom *g, int how, int exact, ad_tensor *u,
                ad_tensor *v, ad_tensor **y, ad_tensor **dx, ad_tensor **hv) {
  *y = pool_by(t, x, g, how);
  ck_assert_ptr_nonnull(*y);
  ad_tensor *s = ad_dot(t, exact ? ad_mul(t, *y, *y) : ad_tanh(t, *y), u);
  ck_assert_int_eq(ad_grad(t, 1, &s, NULL, 1, &x, dx, AD_GRAD_RECORD), AD_OK);
  ad_tensor *s2 = ad_dot(t, *dx, v);
  ck_assert_int_eq(ad_grad(t, 1, &s2, NULL, 1, &x, hv, 0), AD_OK);
}

static void same(const char *what, const ad_tensor *a, const ad_tensor *b, int gi, int how) {
  ck_assert_int_eq(a->size, b->size);
  for (int64_t i = 0; i < a->size; i++) {
    double p = ad_get(a, i), q = ad_get(b, i);
    /* routing and masking: the very same numbers, not merely close */
    ck_assert_msg(p == q || (isnan(p) && isnan(q)), "%s geom %d vs %d: element %lld %.17g vs %.17g",
                  what, gi, how, (long long)i, p, q);
  }
}

/* The fused op against both orders, f32 and f64, every geometry: values,
 * gradients and second derivatives equal, ties included. */
START_TEST(test_fused_equals_unfused) {
  const ad_dtype dts[2] = {AD_F64, AD_F32};
  for (int d = 0; d < 2; d++)
    for (int gi = 0; gi < N_GEOMS; gi++) {
      const geom *g = &GEOMS[gi];
      ad_rng r;
      ad_rng_seed(&r, 77 + (uint64_t)gi);
      ad_tape *t = tape();
      ad_tensor *x = tie_input(dts[d], g, &r);
      ad_tensor *y0 = nn_max_pool2d(t, x, g->k, g->st, g->pad); /* for the output shape */
      ck_assert_ptr_nonnull(y0);
      ad_tensor *u = NULL, *v = NULL;
      ck_assert_int_eq(ad_tensor_new(&u, dts[d], 4, y0->shape), AD_OK);
      ck_assert_int_eq(ad_tensor_new(&v, dts[d], 4, x->shape), AD_OK);
      fill_rand(u, &r), fill_rand(v, &r);
      ad_tensor *y[3], *dx[3], *hv[3];
      for (int how = 0; how < 3; how++) run(t, x, g, how, 0, u, v, &y[how], &dx[how], &hv[how]);
      ck_assert_int_eq(ad_tape_status(t), AD_OK);
      double nz = 0;
      for (int64_t i = 0; i < dx[0]->size; i++) nz += fabs(ad_get(dx[0], i));
      if (gi < N_GEOMS - 1) ck_assert(nz > 0); /* some gradient reaches x: not all clipped */
      for (int how = 1; how < 3; how++) {
        same("value", y[0], y[how], gi, how);
        same("gradient", dx[0], dx[how], gi, how);
        same("hvp", hv[0], hv[how], gi, how);
      }
      ad_tensor_free(x), ad_tensor_free(u), ad_tensor_free(v);
      ad_tape_free(t);
    }
}
END_TEST

/* f32 (four windows at a time on x86-64) against f64 (one at a time) on
 * the same small-integer data, where every step is exact in both: the
 * same values, indices (ties!), gradients and HVPs, fused and plain. */
START_TEST(test_f32_equals_f64) {
  for (int gi = 0; gi < N_GEOMS; gi++)
    for (int how = FUSED; how <= RELU_POOL; how++) {
      const geom *g = &GEOMS[gi];
      ad_tape *t = tape();
      ad_tensor *y[2], *dx[2], *hv[2], *keep[6];
      for (int d = 0; d < 2; d++) {
        ad_rng r;
        ad_rng_seed(&r, 123 + (uint64_t)gi); /* the same draws for both */
        ad_dtype dt = d ? AD_F32 : AD_F64;
        ad_tensor *x = tie_input(dt, g, &r);
        int64_t ys[4] = {g->n, g->c, 0, 0};
        ad_tensor *y0 = nn_max_pool2d(t, x, g->k, g->st, g->pad);
        ck_assert_ptr_nonnull(y0);
        ys[2] = y0->shape[2], ys[3] = y0->shape[3];
        ad_tensor *u = NULL, *v = NULL;
        ck_assert_int_eq(ad_tensor_new(&u, dt, 4, ys), AD_OK);
        ck_assert_int_eq(ad_tensor_new(&v, dt, 4, x->shape), AD_OK);
        for (int64_t i = 0; i < u->size; i++) ad_set(u, i, (double)ad_rng_below(&r, 5) - 2.0);
        for (int64_t i = 0; i < v->size; i++) ad_set(v, i, (double)ad_rng_below(&r, 5) - 2.0);
        run(t, x, g, how, 1, u, v, &y[d], &dx[d], &hv[d]);
        keep[3 * d] = x, keep[3 * d + 1] = u, keep[3 * d + 2] = v;
      }
      ck_assert_int_eq(ad_tape_status(t), AD_OK);
      same("f32 value", y[0], y[1], gi, how);
      same("f32 gradient", dx[0], dx[1], gi, how);
      same("f32 hvp", hv[0], hv[1], gi, how);
      for (int i = 0; i < 6; i++) ad_tensor_free(keep[i]);
      ad_tape_free(t);
    }
}
END_TEST

/* Values against the definition on a hand-made input: max of the window,
 * clipped at 0; the gradient reaches the first maximum of windows above 0. */
START_TEST(test_fused_values) {
  ad_tape *t = tape();
  ad_tensor *x = NULL;
  ck_assert_int_eq(ad_tensor_new(&x, AD_F64, 4, S(1, 1, 2, 6)), AD_OK);
  /* windows (2x2, stride 2): {1, 3, 3, 0} {-1, -2, -3, -4} {0, 0, 0, 0} */
  const double xs[12] = {1, 3, -1, -2, 0, 0, 3, 0, -3, -4, 0, 0};
  for (int i = 0; i < 12; i++) ad_set(x, i, xs[i]);
  ad_requires_grad(x, 1);
  ad_tensor *y = nn_relu_max_pool2d(t, x, 2, 2, 0);
  ck_assert_ptr_nonnull(y);
  ck_assert_int_eq(y->size, 3);
  ck_assert(ad_get(y, 0) == 3 && ad_get(y, 1) == 0 && ad_get(y, 2) == 0);
  ad_tensor *dx, *s = ad_sum(t, y);
  ck_assert_int_eq(ad_grad(t, 1, &s, NULL, 1, &x, &dx, 0), AD_OK);
  for (int i = 0; i < 12; i++) /* first 3 (row 0, column 1) only */
    ck_assert_msg(ad_get(dx, i) == (i == 1 ? 1.0 : 0.0), "dx[%d] = %g", i, ad_get(dx, i));
  ad_tensor_free(x);
  ad_tape_free(t);
}
END_TEST

/* A NaN in a window: the output is NaN (relu keeps it, as ad_relu does)
 * and its gradient is NaN at the NaN, like ad_relu(nn_max_pool2d(x)). */
START_TEST(test_fused_nan) {
  for (int gi = 0; gi < 8; gi++) { /* f64, then f32 (the SIMD rows and planes) */
    const geom *g = &GEOMS[gi % 4];
    ad_rng r;
    ad_rng_seed(&r, 9);
    ad_tape *t = tape();
    ad_tensor *x = tie_input(gi < 4 ? AD_F64 : AD_F32, g, &r);
    ad_set(x, 3, NAN);
    ad_set(x, x->size - 2, NAN);
    ad_tensor *y[2], *dx[2];
    for (int k = 0; k < 2; k++) {
      y[k] = pool_by(t, x, g, k == 0 ? FUSED : POOL_RELU);
      ck_assert_ptr_nonnull(y[k]);
      ad_tensor *s = ad_sum(t, y[k]);
      ck_assert_int_eq(ad_grad(t, 1, &s, NULL, 1, &x, &dx[k], AD_GRAD_RECORD), AD_OK);
    }
    int nans = 0;
    for (int64_t i = 0; i < y[0]->size; i++) nans += isnan(ad_get(y[0], i));
    ck_assert_int_ge(nans, 1);
    same("nan value", y[0], y[1], gi, POOL_RELU);
    same("nan gradient", dx[0], dx[1], gi, POOL_RELU);
    /* and the second order: the gather carries the NaN the same way */
    ad_tensor *h[2];
    for (int k = 0; k < 2; k++) {
      ad_tensor *s2 = ad_sum(t, dx[k]);
      ck_assert_int_eq(ad_grad(t, 1, &s2, NULL, 1, &x, &h[k], 0), AD_OK);
    }
    same("nan hvp", h[0], h[1], gi, POOL_RELU);
    ad_tensor_free(x);
    ad_tape_free(t);
  }
}
END_TEST

/* Unrecorded (no gradient wanted): same values, no index kept. */
START_TEST(test_fused_unrecorded) {
  ad_rng r;
  ad_rng_seed(&r, 5);
  for (int gi = 0; gi < N_GEOMS; gi++) {
    ad_tape *t = tape();
    ad_tensor *x = tie_input(AD_F32, &GEOMS[gi], &r);
    ad_tensor *a = pool_by(t, x, &GEOMS[gi], RELU_POOL);
    int prev = ad_set_recording(t, 0);
    ad_tensor *b = pool_by(t, x, &GEOMS[gi], FUSED);
    ad_set_recording(t, prev);
    ck_assert_ptr_nonnull(b);
    same("unrecorded value", a, b, gi, FUSED);
    ad_tensor_free(x);
    ad_tape_free(t);
  }
}
END_TEST

START_TEST(test_fused_errors) {
  ad_tape *t = tape();
  ad_tensor *x3 = ad_zeros(t, AD_F64, 3, S(2, 4, 4)), *x = ad_zeros(t, AD_F64, 4, S(1, 1, 3, 3));
  struct {
    ad_tensor *x;
    int k, st, pad;
    ad_status want;
  } bad[] = {
      {x3, 2, 2, 0, AD_ERR_SHAPE}, /* not 4-D */
      {x, 0, 1, 0, AD_ERR_ARG},    /* kernel 0 */
      {x, 2, 0, 0, AD_ERR_ARG},    /* stride 0 */
      {x, 2, 2, 2, AD_ERR_ARG},    /* pad past k/2 */
      {x, 2, 2, -1, AD_ERR_ARG},   /* negative pad */
      {x, 5, 1, 0, AD_ERR_SHAPE},  /* window larger than the input */
      {NULL, 2, 2, 0, AD_ERR_NULL},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    ck_assert_ptr_null(nn_relu_max_pool2d(t, bad[i].x, bad[i].k, bad[i].st, bad[i].pad));
    ck_assert_int_eq(ad_tape_status(t), bad[i].want);
    ck_assert_msg(strstr(ad_tape_errmsg(t), "nn_relu_max_pool2d") != NULL, "case %zu: %s", i,
                  ad_tape_errmsg(t));
    ad_tape_clear_error(t);
  }
  ad_tape_free(t);
}
END_TEST

/* ---------------------------------------------------------------- conv + relu + pool fused */

typedef struct {
  int n, c, h, w, k, r, s, st, pad; /* conv: x [n, c, h, w], w [k, c, r, s] */
  int pk, pst, ppad, bias;          /* pool */
} cgeom;

static const cgeom CGEOMS[] = {
    {2, 1, 8, 8, 3, 3, 3, 1, 1, 2, 2, 0, 1},  /* the bench's kind: same width, tiled pool */
    {3, 2, 7, 5, 4, 3, 3, 1, 1, 2, 2, 0, 1},  /* odd sizes: a row and a column left over */
    {2, 3, 6, 21, 2, 3, 3, 1, 1, 2, 2, 0, 0}, /* rows of 10 windows, no bias */
    {2, 2, 9, 7, 3, 3, 2, 2, 1, 3, 2, 1, 1},  /* strided conv, overlapping padded pool */
    {1, 2, 6, 6, 3, 2, 2, 1, 0, 2, 1, 0, 1},  /* no padding, pool stride 1 */
    {2, 3, 4, 6, 2, 1, 1, 1, 0, 2, 2, 0, 1},  /* 1x1 conv (the unfused path) */
};
#define N_CGEOMS ((int)(sizeof CGEOMS / sizeof CGEOMS[0]))

enum { CRP_FUSED, CRP_RELU_POOL, CRP_POOL_RELU };

static ad_tensor *crp_by(ad_tape *t, ad_tensor *const *in, const cgeom *g, int how) {
  ad_tensor *b = g->bias ? in[2] : NULL;
  if (how == CRP_FUSED)
    return nn_conv2d_relu_max_pool2d(t, in[0], in[1], b, g->st, g->pad, g->pk, g->pst, g->ppad);
  ad_tensor *c = nn_conv2d(t, in[0], in[1], b, g->st, g->pad);
  if (how == CRP_RELU_POOL) return nn_relu_max_pool2d(t, c, g->pk, g->pst, g->ppad);
  return ad_relu(t, nn_max_pool2d(t, c, g->pk, g->pst, g->ppad));
}

/* x, w, b from small integers (x in -2..2, w and b in -1..1): the
 * convolution is exact in f32 and f64 and its outputs tie and sit at 0
 * often, so the pool's tie rule and relu's clip are both exercised. */
static void crp_inputs(ad_dtype dt, const cgeom *g, ad_rng *r, ad_tensor *in[3]) {
  ck_assert_int_eq(ad_tensor_new(&in[0], dt, 4, S(g->n, g->c, g->h, g->w)), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&in[1], dt, 4, S(g->k, g->c, g->r, g->s)), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&in[2], dt, 1, S(g->k)), AD_OK);
  for (int64_t i = 0; i < in[0]->size; i++) ad_set(in[0], i, (double)ad_rng_below(r, 5) - 2.0);
  for (int j = 1; j < 3; j++)
    for (int64_t i = 0; i < in[j]->size; i++) ad_set(in[j], i, (double)ad_rng_below(r, 3) - 1.0);
  for (int j = 0; j < 3; j++) ad_requires_grad(in[j], 1);
}

/* Value, the gradients of <tanh(y), u> in x, w, b unrecorded (d0: the
 * fused op's chunked backward) and recorded (d), and the HVP
 * d<(dx, dw, db), v>/d(x, w, b) through the recorded ones. */
static void crp_run(ad_tape *t, ad_tensor *const *in, const cgeom *g, int how, ad_tensor *u,
                    ad_tensor *const *v, ad_tensor **y, ad_tensor **d0, ad_tensor **d,
                    ad_tensor **hv) {
  *y = crp_by(t, in, g, how);
  ck_assert_ptr_nonnull(*y);
  const int n = g->bias ? 3 : 2;
  ad_tensor *s = ad_dot(t, ad_tanh(t, *y), u);
  ck_assert_int_eq(ad_grad(t, 1, &s, NULL, n, (ad_tensor **)in, d0, 0), AD_OK);
  ck_assert_int_eq(ad_grad(t, 1, &s, NULL, n, (ad_tensor **)in, d, AD_GRAD_RECORD), AD_OK);
  ad_tensor *s2 = ad_dot(t, d[0], v[0]);
  for (int j = 1; j < n; j++) s2 = ad_add(t, s2, ad_dot(t, d[j], v[j]));
  ck_assert_int_eq(ad_grad(t, 1, &s2, NULL, n, (ad_tensor **)in, hv, 0), AD_OK);
}

/* Fused against both unfused orders, f32 and f64, every geometry, on one
 * thread and on two (chunks of two images): values, gradients and HVPs bit
 * for bit (the same GEMMs on the same data, the same pool compares and
 * ties, the same scatter and conv rules). */
START_TEST(test_crp_equals_unfused) {
  const ad_dtype dts[2] = {AD_F64, AD_F32};
  const int threads0 = ad_threads();
  for (int d = 0; d < 4; d++)
    for (int gi = 0; gi < N_CGEOMS; gi++) {
      const cgeom *g = &CGEOMS[gi];
      ad_rng r;
      ad_rng_seed(&r, 300 + (uint64_t)gi);
      ck_assert_int_eq(ad_set_threads(d < 2 ? 1 : 2), AD_OK);
      ad_tape *t = tape();
      ad_tensor *in[3], *v[3], *u = NULL;
      crp_inputs(dts[d % 2], g, &r, in);
      ad_tensor *y0 = crp_by(t, in, g, CRP_RELU_POOL); /* for the output shape */
      ck_assert_ptr_nonnull(y0);
      ck_assert_int_eq(ad_tensor_new(&u, dts[d % 2], 4, y0->shape), AD_OK);
      fill_rand(u, &r);
      for (int j = 0; j < 3; j++) {
        ck_assert_int_eq(ad_tensor_new(&v[j], dts[d % 2], in[j]->ndim, in[j]->shape), AD_OK);
        fill_rand(v[j], &r);
      }
      ad_tensor *y[3], *d0[3][3], *dd[3][3], *hv[3][3];
      for (int how = 0; how < 3; how++)
        crp_run(t, in, g, how, u, v, &y[how], d0[how], dd[how], hv[how]);
      ck_assert_int_eq(ad_tape_status(t), AD_OK);
      double nz = 0, pos = 0, neg = 0;
      for (int64_t i = 0; i < dd[0][0]->size; i++) nz += fabs(ad_get(dd[0][0], i));
      for (int64_t i = 0; i < y[0]->size; i++) pos += ad_get(y[0], i) > 0;
      for (int64_t i = 0; i < y[0]->size; i++) neg += ad_get(y[0], i) == 0;
      ck_assert(nz > 0 && pos > 0 && neg > 0); /* some windows pass, some are clipped */
      for (int how = 1; how < 3; how++) {
        same("crp value", y[0], y[how], gi, how);
        for (int j = 0; j < (g->bias ? 3 : 2); j++) {
          same("crp gradient", dd[0][j], dd[how][j], gi, how);
          same("crp unrecorded gradient", d0[0][j], d0[how][j], gi, how);
          same("crp unrecorded vs recorded gradient", d0[0][j], dd[0][j], gi, how);
          same("crp hvp", hv[0][j], hv[how][j], gi, how);
        }
      }
      for (int j = 0; j < 3; j++) ad_tensor_free(in[j]), ad_tensor_free(v[j]);
      ad_tensor_free(u);
      ad_tape_free(t);
    }
  ck_assert_int_eq(ad_set_threads(threads0), AD_OK);
}
END_TEST

/* On two threads the fused op's forward and backward run whole images per
 * part of the worker pool (conv.c's fwd_part, bwd_part), with the sums
 * over images (dw, db) kept in image order on the caller: values,
 * gradients (recorded and not) and HVPs bit for bit those of one thread.
 * Five images too, so the parts are uneven and the chunks have a tail. */
START_TEST(test_crp_threads_bitwise) {
  /* the last one's images are big enough (1.5 MB of G_n and im2col slot in
   * f64) that on 2 threads the backward takes them in several chunks,
   * the last one short, on any L2 up to 2.5 MB (conv.c: bwd_chunk_of) */
  static const cgeom more[] = {{5, 1, 8, 8, 3, 3, 3, 1, 1, 2, 2, 0, 1},
                               {5, 2, 7, 5, 4, 3, 3, 1, 1, 2, 2, 0, 0},
                               {7, 8, 48, 48, 8, 3, 3, 1, 1, 2, 2, 0, 1}};
  const int n_geoms = N_CGEOMS + 3;
  const ad_dtype dts[2] = {AD_F64, AD_F32};
  const int threads0 = ad_threads();
  for (int d = 0; d < 2; d++)
    for (int gi = 0; gi < n_geoms; gi++) {
      const cgeom *g = gi < N_CGEOMS ? &CGEOMS[gi] : &more[gi - N_CGEOMS];
      const int nb = g->bias ? 3 : 2;
      ad_rng r;
      ad_rng_seed(&r, 700 + (uint64_t)gi);
      ad_tensor *in[3], *v[3], *u = NULL;
      crp_inputs(dts[d], g, &r, in);
      ad_tape *t[3];
      ad_tensor *y[3], *d0[3][3], *dd[3][3], *hv[3][3];
      for (int run = 0; run < 3; run++) { /* 1 thread, then 2 threads twice */
        ck_assert_int_eq(ad_set_threads(run == 0 ? 1 : 2), AD_OK);
        t[run] = tape();
        if (run == 0) {
          ad_tensor *y0 = crp_by(t[0], in, g, CRP_FUSED);
          ck_assert_ptr_nonnull(y0);
          ck_assert_int_eq(ad_tensor_new(&u, dts[d], 4, y0->shape), AD_OK);
          fill_rand(u, &r);
          for (int j = 0; j < 3; j++) {
            ck_assert_int_eq(ad_tensor_new(&v[j], dts[d], in[j]->ndim, in[j]->shape), AD_OK);
            fill_rand(v[j], &r);
          }
        }
        crp_run(t[run], in, g, CRP_FUSED, u, v, &y[run], d0[run], dd[run], hv[run]);
        ck_assert_int_eq(ad_tape_status(t[run]), AD_OK);
      }
      for (int run = 1; run < 3; run++) {
        same("crp value, 1 vs 2 threads", y[0], y[run], gi, run);
        for (int j = 0; j < nb; j++) {
          same("crp gradient, 1 vs 2 threads", dd[0][j], dd[run][j], gi, run);
          same("crp unrecorded gradient, 1 vs 2 threads", d0[0][j], d0[run][j], gi, run);
          same("crp hvp, 1 vs 2 threads", hv[0][j], hv[run][j], gi, run);
        }
      }
      for (int run = 0; run < 3; run++) ad_tape_free(t[run]);
      for (int j = 0; j < 3; j++) ad_tensor_free(in[j]), ad_tensor_free(v[j]);
      ad_tensor_free(u);
    }
  ck_assert_int_eq(ad_set_threads(threads0), AD_OK);
}
END_TEST

/* f32 against f64 on the integer data (every step exact but the tanh,
 * which is not taken here): the same values and gradients of <y y, u>. */
START_TEST(test_crp_f32_equals_f64) {
  for (int gi = 0; gi < N_CGEOMS; gi++) {
    const cgeom *g = &CGEOMS[gi];
    ad_tape *t = tape();
    ad_tensor *in[2][3], *y[2], *d[2][3], *u[2];
    for (int k = 0; k < 2; k++) {
      ad_rng r;
      ad_rng_seed(&r, 500 + (uint64_t)gi); /* the same draws for both */
      const ad_dtype dt = k ? AD_F32 : AD_F64;
      crp_inputs(dt, g, &r, in[k]);
      y[k] = crp_by(t, in[k], g, CRP_FUSED);
      ck_assert_ptr_nonnull(y[k]);
      ck_assert_int_eq(ad_tensor_new(&u[k], dt, 4, y[k]->shape), AD_OK);
      for (int64_t i = 0; i < u[k]->size; i++) ad_set(u[k], i, (double)ad_rng_below(&r, 5) - 2.0);
      ad_tensor *s = ad_dot(t, ad_mul(t, y[k], y[k]), u[k]);
      ck_assert_int_eq(ad_grad(t, 1, &s, NULL, g->bias ? 3 : 2, in[k], d[k], 0), AD_OK);
    }
    same("crp f32 value", y[0], y[1], gi, CRP_FUSED);
    for (int j = 0; j < (g->bias ? 3 : 2); j++)
      same("crp f32 gradient", d[0][j], d[1][j], gi, CRP_FUSED);
    for (int k = 0; k < 2; k++) {
      for (int j = 0; j < 3; j++) ad_tensor_free(in[k][j]);
      ad_tensor_free(u[k]);
    }
    ad_tape_free(t);
  }
}
END_TEST

/* Values against the definition: relu(max over the window of the conv),
 * the conv by conv_ref (below), on the first geometry. */
static double conv_ref(const ad_tensor *x, const ad_tensor *w, const ad_tensor *b, int st, int pad,
                       int64_t n, int64_t k, int64_t p, int64_t q);
START_TEST(test_crp_definition) {
  const cgeom *g = &CGEOMS[1];
  ad_rng r;
  ad_rng_seed(&r, 8);
  ad_tape *t = tape();
  ad_tensor *in[3];
  crp_inputs(AD_F64, g, &r, in);
  ad_tensor *y = crp_by(t, in, g, CRP_FUSED);
  ck_assert_ptr_nonnull(y);
  const int64_t P = (g->h + 2 * g->pad - g->r) / g->st + 1,
                Q = (g->w + 2 * g->pad - g->s) / g->st + 1;
  ck_assert_int_eq(y->shape[2], P / 2);
  ck_assert_int_eq(y->shape[3], Q / 2);
  for (int64_t n = 0; n < g->n; n++)
    for (int64_t k = 0; k < g->k; k++)
      for (int64_t p = 0; p < P / 2; p++)
        for (int64_t q = 0; q < Q / 2; q++) {
          double m = 0; /* relu: the max with 0 */
          for (int i = 0; i < 2; i++)
            for (int j = 0; j < 2; j++)
              m = fmax(m, conv_ref(in[0], in[1], in[2], g->st, g->pad, n, k, 2 * p + i, 2 * q + j));
          double got = ad_get(y, ((n * g->k + k) * (P / 2) + p) * (Q / 2) + q);
          ck_assert_msg(got == m, "y[%lld,%lld,%lld,%lld] = %g, want %g", (long long)n,
                        (long long)k, (long long)p, (long long)q, got, m);
        }
  for (int j = 0; j < 3; j++) ad_tensor_free(in[j]);
  ad_tape_free(t);
}
END_TEST

/* A NaN in x reaches pooled outputs: the fused op gives what the unfused
 * ops give, values and gradients (NaN where relu's rule puts it). */
START_TEST(test_crp_nan) {
  const cgeom *g = &CGEOMS[0];
  ad_rng r;
  ad_rng_seed(&r, 12);
  ad_tape *t = tape();
  ad_tensor *in[3];
  crp_inputs(AD_F32, g, &r, in);
  ad_set(in[0], 5, NAN);
  ad_tensor *y[2], *d[2][3];
  for (int k = 0; k < 2; k++) {
    y[k] = crp_by(t, in, g, k ? CRP_POOL_RELU : CRP_FUSED);
    ck_assert_ptr_nonnull(y[k]);
    ad_tensor *s = ad_sum(t, y[k]);
    ck_assert_int_eq(ad_grad(t, 1, &s, NULL, 3, in, d[k], 0), AD_OK);
  }
  int nans = 0;
  for (int64_t i = 0; i < y[0]->size; i++) nans += isnan(ad_get(y[0], i));
  ck_assert_int_ge(nans, 1);
  same("crp nan value", y[0], y[1], 0, CRP_POOL_RELU);
  for (int j = 0; j < 3; j++) same("crp nan gradient", d[0][j], d[1][j], 0, CRP_POOL_RELU);
  for (int j = 0; j < 3; j++) ad_tensor_free(in[j]);
  ad_tape_free(t);
}
END_TEST

/* Unrecorded, and with inputs that need no gradient: the same values. */
START_TEST(test_crp_unrecorded) {
  for (int gi = 0; gi < N_CGEOMS; gi++) {
    const cgeom *g = &CGEOMS[gi];
    ad_rng r;
    ad_rng_seed(&r, 40 + (uint64_t)gi);
    ad_tape *t = tape();
    ad_tensor *in[3];
    crp_inputs(AD_F32, g, &r, in);
    ad_tensor *a = crp_by(t, in, g, CRP_RELU_POOL);
    int prev = ad_set_recording(t, 0);
    ad_tensor *b = crp_by(t, in, g, CRP_FUSED);
    ad_set_recording(t, prev);
    ck_assert_ptr_nonnull(b);
    same("crp unrecorded value", a, b, gi, CRP_FUSED);
    for (int j = 0; j < 3; j++) ad_requires_grad(in[j], 0);
    ad_tensor *c = crp_by(t, in, g, CRP_FUSED);
    ck_assert_ptr_nonnull(c);
    same("crp constant value", a, c, gi, CRP_FUSED);
    for (int j = 0; j < 3; j++) ad_tensor_free(in[j]);
    ad_tape_free(t);
  }
}
END_TEST

START_TEST(test_crp_errors) {
  ad_tape *t = tape();
  ad_tensor *x = ad_zeros(t, AD_F64, 4, S(1, 2, 5, 5)), *x3 = ad_zeros(t, AD_F64, 3, S(2, 5, 5));
  ad_tensor *w = ad_zeros(t, AD_F64, 4, S(3, 2, 3, 3)), *w1 = ad_zeros(t, AD_F64, 4, S(3, 1, 3, 3));
  ad_tensor *b = ad_zeros(t, AD_F64, 1, S(3)), *b4 = ad_zeros(t, AD_F64, 1, S(4));
  ad_tensor *xf = ad_zeros(t, AD_F32, 4, S(1, 2, 5, 5));
  struct {
    ad_tensor *x, *w, *b;
    int st, pad, k, pst, ppad;
    ad_status want;
  } bad[] = {
      {x3, w, b, 1, 1, 2, 2, 0, AD_ERR_SHAPE}, /* x not 4-D */
      {x, w1, b, 1, 1, 2, 2, 0, AD_ERR_SHAPE}, /* channels differ */
      {x, w, b4, 1, 1, 2, 2, 0, AD_ERR_SHAPE}, /* bias size */
      {xf, w, b, 1, 1, 2, 2, 0, AD_ERR_DTYPE}, /* dtypes differ */
      {x, w, b, 0, 1, 2, 2, 0, AD_ERR_ARG},    /* conv stride 0 */
      {x, w, b, 1, -1, 2, 2, 0, AD_ERR_ARG},   /* negative conv pad */
      {x, w, b, 1, 1, 0, 2, 0, AD_ERR_ARG},    /* pool kernel 0 */
      {x, w, b, 1, 1, 2, 0, 0, AD_ERR_ARG},    /* pool stride 0 */
      {x, w, b, 1, 1, 2, 2, 2, AD_ERR_ARG},    /* pool pad past k/2 */
      {x, w, b, 1, 0, 4, 1, 0, AD_ERR_SHAPE},  /* window larger than the 3x3 conv output */
      {x, w, b, 1, 0, 9, 1, 0, AD_ERR_SHAPE},  /* and larger than the input */
      {NULL, w, b, 1, 1, 2, 2, 0, AD_ERR_NULL},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    ck_assert_ptr_null(nn_conv2d_relu_max_pool2d(t, bad[i].x, bad[i].w, bad[i].b, bad[i].st,
                                                 bad[i].pad, bad[i].k, bad[i].pst, bad[i].ppad));
    ck_assert_msg(ad_tape_status(t) == bad[i].want, "case %zu: status %d, want %d (%s)", i,
                  (int)ad_tape_status(t), (int)bad[i].want, ad_tape_errmsg(t));
    ck_assert_msg(strstr(ad_tape_errmsg(t), "nn_conv2d_relu_max_pool2d") != NULL, "case %zu: %s", i,
                  ad_tape_errmsg(t));
    ad_tape_clear_error(t);
  }
  ad_tape_free(t);
}
END_TEST

/* ---------------------------------------------------------------- conv against its definition */

/* y[n,k,p,q] = b[k] + sum_{c,r,s} w[k,c,r,s] x[n, c, p*st + r - pad, q*st + s - pad]. */
static double conv_ref(const ad_tensor *x, const ad_tensor *w, const ad_tensor *b, int st, int pad,
                       int64_t n, int64_t k, int64_t p, int64_t q) {
  const int64_t C = x->shape[1], H = x->shape[2], W = x->shape[3], R = w->shape[2],
                Sz = w->shape[3];
  double s = b ? ad_get(b, k) : 0;
  for (int64_t c = 0; c < C; c++)
    for (int64_t r = 0; r < R; r++)
      for (int64_t j = 0; j < Sz; j++) {
        int64_t ih = p * st + r - pad, iw = q * st + j - pad;
        if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
        s += ad_get(w, ((k * C + c) * R + r) * Sz + j) * ad_get(x, ((n * C + c) * H + ih) * W + iw);
      }
  return s;
}

/* Same-width (3x3 pad 1), strided, 1x1 and non-square convs, with and
 * without bias, f64 and f32, several images (the per-image chunks). */
START_TEST(test_conv_definition) {
  const struct {
    int n, c, h, w, k, r, s, st, pad;
  } cs[] = {{3, 2, 6, 5, 4, 3, 3, 1, 1},
            {2, 3, 7, 6, 2, 3, 2, 2, 1},
            {3, 4, 3, 5, 3, 1, 1, 1, 0},
            {2, 1, 5, 5, 3, 2, 3, 1, 2}};
  const ad_dtype dts[2] = {AD_F64, AD_F32};
  ad_rng r;
  ad_rng_seed(&r, 31);
  for (size_t ci = 0; ci < sizeof cs / sizeof cs[0]; ci++)
    for (int d = 0; d < 2; d++)
      for (int bias = 0; bias < 2; bias++) {
        ad_tape *t = tape();
        ad_tensor *x = ad_zeros(t, dts[d], 4, S(cs[ci].n, cs[ci].c, cs[ci].h, cs[ci].w));
        ad_tensor *w = ad_zeros(t, dts[d], 4, S(cs[ci].k, cs[ci].c, cs[ci].r, cs[ci].s));
        ad_tensor *b = bias ? ad_zeros(t, dts[d], 1, S(cs[ci].k)) : NULL;
        fill_rand(x, &r), fill_rand(w, &r);
        if (b) fill_rand(b, &r);
        ad_tensor *y = nn_conv2d(t, x, w, b, cs[ci].st, cs[ci].pad);
        ck_assert_ptr_nonnull(y);
        double tol = dts[d] == AD_F64 ? 1e-12 : 1e-5;
        for (int64_t n = 0; n < y->shape[0]; n++)
          for (int64_t k = 0; k < y->shape[1]; k++)
            for (int64_t p = 0; p < y->shape[2]; p++)
              for (int64_t q = 0; q < y->shape[3]; q++) {
                double want = conv_ref(x, w, b, cs[ci].st, cs[ci].pad, n, k, p, q);
                double got = ad_get(y, ((n * y->shape[1] + k) * y->shape[2] + p) * y->shape[3] + q);
                ck_assert_msg(fabs(got - want) <= tol * (1 + fabs(want)),
                              "case %zu dt %d bias %d: y[%lld,%lld,%lld,%lld] %.9g vs %.9g", ci, d,
                              bias, (long long)n, (long long)k, (long long)p, (long long)q, got,
                              want);
              }
        ad_tape_free(t);
      }
}
END_TEST

/* conv2d's rule computes dx, dw and db in one pass over the images; they
 * must be the very bits the three ops give one by one (db against a sum
 * in the same order: per image, per channel, in f64 to a tolerance). With
 * and without dx wanted, with and without bias, every geometry kind. */
START_TEST(test_conv_backward_one_pass) {
  const struct {
    int n, c, h, w, k, r, s, st, pad;
  } cs[] = {{3, 2, 6, 5, 4, 3, 3, 1, 1},
            {2, 3, 7, 6, 2, 3, 2, 2, 1},
            {3, 4, 3, 5, 3, 1, 1, 1, 0},
            {5, 1, 8, 8, 3, 3, 3, 1, 1}};
  const ad_dtype dts[2] = {AD_F64, AD_F32};
  ad_rng r;
  ad_rng_seed(&r, 57);
  for (size_t ci = 0; ci < sizeof cs / sizeof cs[0]; ci++)
    for (int d = 0; d < 2; d++)
      for (int variant = 0; variant < 4; variant++) {
        const int bias = variant & 1, want_x = variant >> 1;
        ad_tape *t = tape();
        ad_tensor *x = NULL, *w = NULL, *b = NULL;
        ck_assert_int_eq(ad_tensor_new(&x, dts[d], 4, S(cs[ci].n, cs[ci].c, cs[ci].h, cs[ci].w)),
                         AD_OK);
        ck_assert_int_eq(ad_tensor_new(&w, dts[d], 4, S(cs[ci].k, cs[ci].c, cs[ci].r, cs[ci].s)),
                         AD_OK);
        if (bias) ck_assert_int_eq(ad_tensor_new(&b, dts[d], 1, S(cs[ci].k)), AD_OK);
        fill_rand(x, &r), fill_rand(w, &r);
        if (b) fill_rand(b, &r);
        ad_requires_grad(x, want_x), ad_requires_grad(w, 1);
        if (b) ad_requires_grad(b, 1);
        ad_tensor *y = nn_conv2d(t, x, w, b, cs[ci].st, cs[ci].pad);
        ck_assert_ptr_nonnull(y);
        ad_tensor *u = ad_zeros_like(t, y);
        fill_rand(u, &r);
        ad_tensor *s = ad_dot(t, y, u), *wrt[3] = {w, b, x}, *gr[3] = {0};
        int nw = 1 + bias;
        if (want_x) wrt[nw++] = x;
        ck_assert_int_eq(ad_grad(t, 1, &s, NULL, nw, wrt, gr, 0), AD_OK);
        ad_tensor *gw =
            nn_conv2d_backward_weight(t, x, u, cs[ci].r, cs[ci].s, cs[ci].st, cs[ci].pad);
        same("dw", gr[0], gw, (int)ci, variant);
        if (want_x) {
          ad_tensor *gx =
              nn_conv2d_backward_input(t, u, w, cs[ci].h, cs[ci].w, cs[ci].st, cs[ci].pad);
          same("dx", gr[nw - 1], gx, (int)ci, variant);
        }
        if (bias) {
          const int64_t pq = y->shape[2] * y->shape[3];
          for (int64_t k = 0; k < cs[ci].k; k++) {
            double want = 0;
            for (int64_t n = 0; n < cs[ci].n; n++)
              for (int64_t i = 0; i < pq; i++) want += ad_get(u, (n * cs[ci].k + k) * pq + i);
            double tol = dts[d] == AD_F64 ? 1e-12 : 1e-5;
            ck_assert_msg(fabs(ad_get(gr[1], k) - want) <= tol * (1 + fabs(want)),
                          "db[%lld] %.9g vs %.9g", (long long)k, ad_get(gr[1], k), want);
          }
        }
        ck_assert_int_eq(ad_tape_status(t), AD_OK);
        ad_tensor_free(x), ad_tensor_free(w), ad_tensor_free(b);
        ad_tape_free(t);
      }
}
END_TEST

Suite *cnn_fused_suite(void) {
  Suite *s = suite_create("cnn_fused");
  TCase *tc = tcase_create("gradcheck");
  tcase_add_loop_test(tc, test_fused_gradcheck, 0, N_CASES);
  suite_add_tcase(s, tc);
  TCase *tv = tcase_create("values");
  tcase_add_test(tv, test_fused_equals_unfused);
  tcase_add_test(tv, test_f32_equals_f64);
  tcase_add_test(tv, test_fused_values);
  tcase_add_test(tv, test_fused_nan);
  tcase_add_test(tv, test_fused_unrecorded);
  tcase_add_test(tv, test_fused_errors);
  tcase_add_test(tv, test_conv_definition);
  tcase_add_test(tv, test_conv_backward_one_pass);
  tcase_add_test(tv, test_crp_equals_unfused);
  tcase_add_test(tv, test_crp_threads_bitwise);
  tcase_add_test(tv, test_crp_f32_equals_f64);
  tcase_add_test(tv, test_crp_definition);
  tcase_add_test(tv, test_crp_nan);
  tcase_add_test(tv, test_crp_unrecorded);
  tcase_add_test(tv, test_crp_errors);
  suite_add_tcase(s, tv);
  return s;
}

int main(void) {
  return gc_run_suite(cnn_fused_suite());
}
