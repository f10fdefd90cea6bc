/* test_bmm.c — ad_bmm and ad_add_batch_rowvec: values against a loop of
 * ad_matmul / ad_add_rowvec over the batch (f32 and f64, every transpose
 * and broadcast case), gradients, Hessian-vector products and JVPs against
 * central finite differences (tests/gradcheck.h), and bad shapes refused
 * with a message. */
#include "autodiff/ad_internal.h"
#include "gradcheck.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define S(...) ((const int64_t[]){__VA_ARGS__})

/* ---------------------------------------------------------------- gradchecks
 * tanh around the product so the second derivative is not zero. */
#define BMM_F(NAME, TA, TB)                                                                        \
  static ad_tensor *NAME(ad_tape *t, ad_tensor *const *x, void *ctx) {                             \
    (void)ctx;                                                                                     \
    return ad_tanh(t, ad_bmm(t, x[0], x[1], TA, TB));                                              \
  }
BMM_F(f_bmm00, 0, 0)
BMM_F(f_bmm10, 1, 0)
BMM_F(f_bmm01, 0, 1)
BMM_F(f_bmm11, 1, 1)

static ad_tensor *f_rowvec(ad_tape *t, ad_tensor *const *x, void *ctx) {
  (void)ctx;
  return ad_tanh(t, ad_add_batch_rowvec(t, x[0], x[1]));
}
/* Both ops in one layer, as a batched MLP uses them: a product with the
 * output's own input (x[0] twice) so mixed second derivatives appear. */
static ad_tensor *f_layer(ad_tape *t, ad_tensor *const *x, void *ctx) {
  (void)ctx;
  ad_tensor *h = ad_tanh(t, ad_add_batch_rowvec(t, ad_bmm(t, x[0], x[1], 0, 0), x[2]));
  return ad_bmm(t, h, x[1], 0, 1);
}

static const gc_case CASES[] = {
    {"bmm", f_bmm00, 2, {3, 3}, {{2, 3, 4}, {2, 4, 5}}, {0, 0}, {0, 0}, 0},
    {"bmm_ta", f_bmm10, 2, {3, 3}, {{2, 4, 3}, {2, 4, 5}}, {0, 0}, {0, 0}, 0},
    {"bmm_tb", f_bmm01, 2, {3, 3}, {{2, 3, 4}, {2, 5, 4}}, {0, 0}, {0, 0}, 0},
    {"bmm_ta_tb", f_bmm11, 2, {3, 3}, {{2, 4, 3}, {2, 5, 4}}, {0, 0}, {0, 0}, 0},
    /* a shared right operand: the folded product, and the per-element loop */
    {"bmm_shared_b", f_bmm00, 2, {3, 2}, {{3, 2, 4}, {4, 5}}, {0, 0}, {0, 0}, 0},
    {"bmm_shared_b_tb", f_bmm01, 2, {3, 2}, {{3, 2, 4}, {5, 4}}, {0, 0}, {0, 0}, 0},
    {"bmm_shared_b_ta", f_bmm10, 2, {3, 2}, {{3, 4, 2}, {4, 5}}, {0, 0}, {0, 0}, 0},
    {"bmm_shared_b_ta_tb", f_bmm11, 2, {3, 2}, {{3, 4, 2}, {5, 4}}, {0, 0}, {0, 0}, 0},
    /* a shared left operand */
    {"bmm_shared_a", f_bmm00, 2, {2, 3}, {{2, 4}, {3, 4, 5}}, {0, 0}, {0, 0}, 0},
    {"bmm_shared_a_ta", f_bmm10, 2, {2, 3}, {{4, 2}, {3, 4, 5}}, {0, 0}, {0, 0}, 0},
    {"bmm_shared_a_tb", f_bmm01, 2, {2, 3}, {{2, 4}, {3, 5, 4}}, {0, 0}, {0, 0}, 0},
    {"add_batch_rowvec", f_rowvec, 2, {3, 2}, {{3, 2, 4}, {3, 4}}, {0, 0}, {0, 0}, 0},
    {"add_batch_rowvec_3d", f_rowvec, 2, {3, 3}, {{3, 2, 4}, {3, 1, 4}}, {0, 0}, {0, 0}, 0},
    {"batched_layer",
     f_layer,
     3,
     {3, 3, 2},
     {{2, 3, 4}, {2, 4, 5}, {2, 5}},
     {0, 0, 0},
     {0, 0, 0},
     0},
};
#define N_CASES ((int)(sizeof CASES / sizeof CASES[0]))

START_TEST(test_bmm_gradcheck) {
  char rep[512];
  double worst = gc_check_case(&CASES[_i], 1234 + (uint64_t)_i, rep, sizeof rep);
  ck_assert_msg(worst <= 1e-6, "%s", rep);
}
END_TEST

/* ---------------------------------------------------------------- values */

/* Batch element b of a [B, r, c] tensor as a 2-D arena view. */
static ad_tensor *elem(ad_tape *t, ad_tensor *x, int64_t b) {
  if (x->ndim == 2) return x;
  int64_t r = x->shape[1], c = x->shape[2];
  ad_tensor *s = ad_slice(t, x, 0, b, 1);
  return ad_reshape(t, s, 2, S(r, c));
}

/* autodiff/ops_bmm.c (tests only): force one build of the tiny loop (1
 * base, 2 AVX2, 3 AVX-512, 0 automatic); -1 when this CPU cannot run it. */
int ad__bmm_force_isa(int isa);

/* ad_bmm against ad_matmul per element, every transpose pair, both
 * dtypes, batched and shared operands, shapes from tiny to past the
 * tiny loop's sizes; the loop index is the build of the tiny loop forced
 * (0 automatic, 1 baseline, 2 AVX2, 3 AVX-512; one this CPU or
 * HYPERTAPE_BLIS_ARCH rules out is skipped). */
START_TEST(test_bmm_values) {
  if (ad__bmm_force_isa(_i) < 0) {
    fprintf(stderr, "test_bmm_values: build %d of the tiny loop not available here, skipped\n", _i);
    return;
  }
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  ad_rng r;
  ad_rng_seed(&r, 5);
  const int64_t dims[][4] = {{3, 10, 40, 40},
                             {4, 1, 7, 3},
                             {2, 17, 1, 9},
                             {5, 40, 1, 10},
                             {2, 70, 65, 33},
                             /* k = 1 (outer products, read in place), whole vectors */
                             {3, 10, 40, 1},
                             {2, 9, 16, 1},
                             {3, 16, 8, 5},
                             {2, 40, 1, 1}};
  for (int dt = 0; dt < 2; dt++)
    for (size_t d = 0; d < sizeof dims / sizeof dims[0]; d++)
      for (int mode = 0; mode < 3; mode++) /* both batched, shared a, shared b */
        for (int ta = 0; ta < 2; ta++)
          for (int tb = 0; tb < 2; tb++) {
            int64_t B = dims[d][0], m = dims[d][1], n = dims[d][2], k = dims[d][3];
            ad_marker mk = ad_mark(t);
            int64_t as[3] = {B, ta ? k : m, ta ? m : k}, bs[3] = {B, tb ? n : k, tb ? k : n};
            ad_tensor *a = mode == 1 ? ad_randn(t, (ad_dtype)dt, 2, as + 1, &r)
                                     : ad_randn(t, (ad_dtype)dt, 3, as, &r);
            ad_tensor *b = mode == 2 ? ad_randn(t, (ad_dtype)dt, 2, bs + 1, &r)
                                     : ad_randn(t, (ad_dtype)dt, 3, bs, &r);
            ad_tensor *c = ad_bmm(t, a, b, ta, tb);
            ck_assert_msg(c != NULL, "%s", ad_tape_errmsg(t));
            ck_assert_int_eq(c->ndim, 3);
            ck_assert(c->shape[0] == B && c->shape[1] == m && c->shape[2] == n);
            double tol = dt == AD_F32 ? 1e-5 : 1e-13;
            for (int64_t e = 0; e < B; e++) {
              ad_tensor *ref = ad_matmul(t, elem(t, a, e), elem(t, b, e), ta, tb);
              ck_assert_msg(ref != NULL, "%s", ad_tape_errmsg(t));
              for (int64_t i = 0; i < m * n; i++) {
                double want = ad_get(ref, i), got = ad_get(c, e * m * n + i);
                ck_assert_msg(fabs(got - want) <= tol * (1 + fabs(want)) * (double)k,
                              "dt %d dims %zu mode %d ta %d tb %d: element %lld of batch %lld is "
                              "%.17g, matmul gives %.17g",
                              dt, d, mode, ta, tb, (long long)i, (long long)e, got, want);
              }
            }
            ad_rewind(t, mk);
          }
  ck_assert_int_eq(ad_tape_status(t), AD_OK);
  ad_tape_free(t);
  ad__bmm_force_isa(0);
}
END_TEST

START_TEST(test_add_batch_rowvec_values) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  ad_rng r;
  ad_rng_seed(&r, 6);
  for (int dt = 0; dt < 2; dt++) {
    ad_tensor *x = ad_randn(t, (ad_dtype)dt, 3, S(4, 3, 5), &r);
    ad_tensor *v = ad_randn(t, (ad_dtype)dt, 2, S(4, 5), &r);
    ad_tensor *y = ad_add_batch_rowvec(t, x, v);
    ck_assert_msg(y != NULL, "%s", ad_tape_errmsg(t));
    for (int64_t b = 0; b < 4; b++) {
      ad_tensor *vb = ad_reshape(t, ad_slice(t, v, 0, b, 1), 1, S(5));
      ad_tensor *ref = ad_add_rowvec(t, elem(t, x, b), vb);
      for (int64_t i = 0; i < 15; i++)
        ck_assert_double_eq(ad_get(y, b * 15 + i), ad_get(ref, i)); /* one addition: exact */
    }
  }
  ck_assert_int_eq(ad_tape_status(t), AD_OK);
  ad_tape_free(t);
}
END_TEST

/* The gradient of a shared operand is the sum of the per-element ones:
 * the batched graph of B copies against B separate graphs. */
START_TEST(test_bmm_shared_grad_is_sum) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  ad_rng r;
  ad_rng_seed(&r, 8);
  ad_tensor *w = NULL;
  ck_assert_int_eq(ad_tensor_new(&w, AD_F64, 2, S(4, 3)), AD_OK);
  ad_tensor_fill_normal(w, &r, 0, 1);
  ad_requires_grad(w, 1);
  ad_tensor *x = ad_randn(t, AD_F64, 3, S(5, 2, 4), &r);
  for (int tb = 0; tb < 2; tb++) {
    ad_tensor *wt = tb ? ad_transpose(t, w) : w; /* [3, 4] for B^T */
    ad_tensor *L = ad_sum(t, ad_tanh(t, ad_bmm(t, x, wt, 0, tb)));
    ad_tensor *g = NULL;
    ck_assert_int_eq(ad_grad(t, 1, &L, NULL, 1, &w, &g, 0), AD_OK);
    ad_tensor *acc = ad_zeros_like(t, w);
    for (int64_t b = 0; b < 5; b++) {
      ad_tensor *Lb = ad_sum(t, ad_tanh(t, ad_matmul(t, elem(t, x, b), wt, 0, tb)));
      ad_tensor *gb = NULL;
      ck_assert_int_eq(ad_grad(t, 1, &Lb, NULL, 1, &w, &gb, 0), AD_OK);
      acc = ad_add(t, acc, gb);
    }
    for (int64_t i = 0; i < w->size; i++)
      ck_assert_double_eq_tol(ad_get(g, i), ad_get(acc, i), 1e-12);
  }
  ad_tensor_free(w);
  ad_tape_free(t);
}
END_TEST

/* ---------------------------------------------------------------- bad input */

static void expect_fail(ad_tape *t, ad_tensor *got, ad_status want, const char *needle) {
  ck_assert_ptr_null(got);
  ck_assert_int_eq(ad_tape_status(t), want);
  ck_assert_msg(strstr(ad_tape_errmsg(t), needle) != NULL, "message '%s' lacks '%s'",
                ad_tape_errmsg(t), needle);
  ad_tape_clear_error(t);
}

START_TEST(test_bmm_bad_input) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  ad_tensor *a3 = ad_zeros(t, AD_F64, 3, S(2, 3, 4)), *b3 = ad_zeros(t, AD_F64, 3, S(2, 4, 5));
  ad_tensor *a2 = ad_zeros(t, AD_F64, 2, S(3, 4)), *b2 = ad_zeros(t, AD_F64, 2, S(4, 5));
  ad_tensor *c3 = ad_zeros(t, AD_F64, 3, S(3, 4, 5)), *f3 = ad_zeros(t, AD_F32, 3, S(2, 4, 5));
  ad_tensor *v1 = ad_zeros(t, AD_F64, 1, S(4)), *a4 = ad_zeros(t, AD_F64, 4, S(1, 2, 3, 4));
  expect_fail(t, ad_bmm(t, a2, b2, 0, 0), AD_ERR_SHAPE, "ad_bmm: needs [B, m, k]");
  expect_fail(t, ad_bmm(t, a4, b3, 0, 0), AD_ERR_SHAPE, "[1, 2, 3, 4]");
  expect_fail(t, ad_bmm(t, v1, b3, 0, 0), AD_ERR_SHAPE, "ad_bmm: needs");
  expect_fail(t, ad_bmm(t, a3, c3, 0, 0), AD_ERR_SHAPE, "batch sizes differ");
  expect_fail(t, ad_bmm(t, a3, b3, 1, 0), AD_ERR_SHAPE, "inner dimensions differ");
  expect_fail(t, ad_bmm(t, a3, b2, 0, 1), AD_ERR_SHAPE, "inner dimensions differ");
  expect_fail(t, ad_bmm(t, a3, f3, 0, 0), AD_ERR_DTYPE, "ad_bmm");
  expect_fail(t, ad_bmm(t, NULL, b3, 0, 0), AD_ERR_NULL, "ad_bmm");
  expect_fail(t, ad_add_batch_rowvec(t, a3, ad_zeros(t, AD_F64, 2, S(2, 3))), AD_ERR_SHAPE,
              "ad_add_batch_rowvec: needs x [B, m, n]");
  expect_fail(t, ad_add_batch_rowvec(t, a3, ad_zeros(t, AD_F64, 2, S(4, 2))), AD_ERR_SHAPE,
              "ad_add_batch_rowvec");
  expect_fail(t, ad_add_batch_rowvec(t, a2, v1), AD_ERR_SHAPE, "ad_add_batch_rowvec");
  expect_fail(t, ad_add_batch_rowvec(t, NULL, v1), AD_ERR_NULL, "ad_add_batch_rowvec");
  ad_tape_free(t);
}
END_TEST

static Suite *bmm_suite(void) {
  Suite *s = suite_create("bmm");
  TCase *tc = tcase_create("bmm");
  tcase_set_timeout(tc, 60);
  tcase_add_loop_test(tc, test_bmm_gradcheck, 0, N_CASES);
  tcase_add_loop_test(tc, test_bmm_values, 0, 4);
  tcase_add_test(tc, test_add_batch_rowvec_values);
  tcase_add_test(tc, test_bmm_shared_grad_is_sum);
  tcase_add_test(tc, test_bmm_bad_input);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  return gc_run_suite(bmm_suite());
}
