#define _POSIX_C_SOURCE 200809L /* open_memstream */
/* test_tape.c — the tape itself: the header's worked example, third-order
 * derivatives, closed forms (Rosenbrock HVP, unrolled gradient descent),
 * arena marks and growth, bad input, strictness, accumulation, detach,
 * printing, the NaN guard. */
#include "autodiff/ad.h"
#include "gradcheck.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define S(...) ((const int64_t[]){__VA_ARGS__})

static ad_tape *new_tape(size_t mb) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = mb}), AD_OK);
  return t;
}

/* The example at the top of ad.h, verbatim: df/dx = 2*a*x = 12. */
START_TEST(test_header_example) {
  ad_tape *tape = NULL;
  ad_tape_new(&tape, NULL);
  ad_tensor *x = ad_scalar(tape, AD_F64, 3.0);
  ad_requires_grad(x, 1);
  ad_tensor *f = ad_add_scalar(tape, ad_scale(tape, ad_mul(tape, x, x), 2.0), 1.0);
  ad_tensor *df = NULL;
  ad_grad(tape, 1, &f, NULL, 1, &x, &df, 0);
  ck_assert_double_eq(ad_item(f), 19.0);
  ck_assert_double_eq(ad_item(df), 12.0);
  ad_tape_free(tape);
}
END_TEST

/* Third order: f(x) = x^5 e^x has f''' = e^x (x^5 + 15x^4 + 60x^3 + 60x^2),
 * checked to 1e-12 relative at x = 0.7; and sigmoid's third derivative
 * s(1-s)(1-6s+6s^2) at x = -0.4. */
START_TEST(test_third_order) {
  ad_tape *t = new_tape(4);
  ad_tensor *x = ad_scalar(t, AD_F64, 0.7);
  ad_requires_grad(x, 1);
  ad_tensor *f = ad_mul(t, ad_pow_scalar(t, x, 5), ad_exp(t, x));
  ad_tensor *d1, *d2, *d3;
  ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 1, &x, &d1, AD_GRAD_RECORD), AD_OK);
  ck_assert_int_eq(ad_grad(t, 1, &d1, NULL, 1, &x, &d2, AD_GRAD_RECORD), AD_OK);
  ck_assert_int_eq(ad_grad(t, 1, &d2, NULL, 1, &x, &d3, 0), AD_OK);
  double v = 0.7, want = exp(v) * (pow(v, 5) + 15 * pow(v, 4) + 60 * pow(v, 3) + 60 * v * v);
  ck_assert_double_eq_tol(ad_item(d3), want, 1e-12 * fabs(want));

  ad_tensor *y = ad_scalar(t, AD_F64, -0.4);
  ad_requires_grad(y, 1);
  ad_tensor *g = ad_sigmoid(t, y);
  ck_assert_int_eq(ad_grad(t, 1, &g, NULL, 1, &y, &d1, AD_GRAD_RECORD), AD_OK);
  ck_assert_int_eq(ad_grad(t, 1, &d1, NULL, 1, &y, &d2, AD_GRAD_RECORD), AD_OK);
  ck_assert_int_eq(ad_grad(t, 1, &d2, NULL, 1, &y, &d3, 0), AD_OK);
  double s = 1 / (1 + exp(0.4));
  ck_assert_double_eq_tol(ad_item(d3), s * (1 - s) * (1 - 6 * s + 6 * s * s), 1e-14);
  ad_tape_free(t);
}
END_TEST

/* Rosenbrock f = (1-x)^2 + 100 (y - x^2)^2, Hessian
 *   [[2 - 400 (y - x^2) + 800 x^2, -400 x], [-400 x, 200]]:
 * the HVP equals H v to 1e-12 relative. */
START_TEST(test_rosenbrock_hvp) {
  ad_tape *t = new_tape(4);
  const double xv = -1.2, yv = 1.0, v0 = 0.3, v1 = -0.8;
  ad_tensor *p = ad_const(t, AD_F64, 1, S(2), (double[]){xv, yv});
  ad_requires_grad(p, 1);
  ad_tensor *x = ad_slice(t, p, 0, 0, 1), *y = ad_slice(t, p, 0, 1, 1);
  ad_tensor *a = ad_add_scalar(t, ad_neg(t, x), 1.0);
  ad_tensor *b = ad_sub(t, y, ad_mul(t, x, x));
  ad_tensor *f = ad_add(t, ad_mul(t, a, a), ad_scale(t, ad_mul(t, b, b), 100.0));
  f = ad_sum(t, f);
  ad_tensor *v = ad_const(t, AD_F64, 1, S(2), (double[]){v0, v1}), *hv;
  ck_assert_int_eq(ad_hvp(t, f, 1, &p, &v, &hv, 0), AD_OK);
  double h00 = 2 - 400 * (yv - xv * xv) + 800 * xv * xv, h01 = -400 * xv, h11 = 200;
  double e0 = h00 * v0 + h01 * v1, e1 = h01 * v0 + h11 * v1;
  ck_assert_double_eq_tol(ad_get(hv, 0), e0, 1e-12 * fabs(e0));
  ck_assert_double_eq_tol(ad_get(hv, 1), e1, 1e-12 * fabs(e1));
  ad_tape_free(t);
}
END_TEST

/* T steps of gradient descent on L(w) = 1/2 w^T A w - b^T w + lam/2 |w|^2:
 *   w_{t+1} = M w_t + eta b,  M = I - eta (A + lam I),
 *   w_T = M^T w_0 + sum_{k<T} M^k eta b,
 *   d w_T / d lam = -eta T M^{T-1} w_0 - sum_{k<T} eta^2 k M^{k-1} b
 * (M commutes with dM/dlam = -eta I). Through ad_grad on the recorded loop,
 * each component of d w_T/d lam within 1e-12 of the closed form. */
#define DIM 3
static void matvec(double M[DIM][DIM], const double *x, double *y) {
  for (int i = 0; i < DIM; i++) {
    y[i] = 0;
    for (int j = 0; j < DIM; j++) y[i] += M[i][j] * x[j];
  }
}
START_TEST(test_unrolled_gd_closed_form) {
  const double A[DIM][DIM] = {{2.0, 0.3, 0.1}, {0.3, 1.5, -0.2}, {0.1, -0.2, 1.0}};
  const double b[DIM] = {1.0, -0.5, 0.25}, w0v[DIM] = {0.2, 0.1, -0.3};
  const double eta = 0.1, lamv = 0.05;
  const int T = 25;
  ad_tape *t = new_tape(8);
  ad_tensor *Am = ad_const(t, AD_F64, 2, S(DIM, DIM), A);
  ad_tensor *bt = ad_const(t, AD_F64, 2, S(DIM, 1), b);
  ad_tensor *w = ad_const(t, AD_F64, 2, S(DIM, 1), w0v);
  ad_tensor *lam = ad_scalar(t, AD_F64, lamv);
  ad_requires_grad(lam, 1);
  ad_requires_grad(w, 1);
  for (int s = 0; s < T; s++) {
    ad_tensor *L =
        ad_add(t,
               ad_sub(t, ad_scale(t, ad_sum(t, ad_mul(t, w, ad_matmul(t, Am, w, 0, 0))), 0.5),
                      ad_dot(t, bt, w)),
               ad_mul(t, ad_scale(t, lam, 0.5), ad_dot(t, w, w)));
    ad_tensor *g;
    ck_assert_int_eq(ad_grad(t, 1, &L, NULL, 1, &w, &g, AD_GRAD_RECORD), AD_OK);
    w = ad_axpy(t, w, -eta, g);
  }
  /* closed form */
  double M[DIM][DIM], P[T + 1][DIM][DIM];
  for (int i = 0; i < DIM; i++)
    for (int j = 0; j < DIM; j++) M[i][j] = (i == j) - eta * (A[i][j] + (i == j) * lamv);
  for (int i = 0; i < DIM; i++)
    for (int j = 0; j < DIM; j++) P[0][i][j] = i == j;
  for (int k = 1; k <= T; k++)
    for (int i = 0; i < DIM; i++)
      for (int j = 0; j < DIM; j++) {
        P[k][i][j] = 0;
        for (int l = 0; l < DIM; l++) P[k][i][j] += P[k - 1][i][l] * M[l][j];
      }
  double want[DIM], tmp[DIM];
  matvec(P[T - 1], w0v, want);
  for (int i = 0; i < DIM; i++) want[i] *= -eta * T;
  for (int k = 1; k < T; k++) {
    matvec(P[k - 1], b, tmp);
    for (int i = 0; i < DIM; i++) want[i] -= eta * eta * k * tmp[i];
  }
  for (int i = 0; i < DIM; i++) {
    ad_tensor *e = ad_zeros(t, AD_F64, 2, S(DIM, 1)), *d;
    ad_set(e, i, 1.0);
    ck_assert_int_eq(ad_grad(t, 1, &w, &e, 1, &lam, &d, 0), AD_OK);
    ck_assert_msg(fabs(ad_item(d) - want[i]) <= 1e-12, "dw_T[%d]/dlam %.15g vs %.15g", i,
                  ad_item(d), want[i]);
  }
  ad_tape_free(t);
}
END_TEST

/* A training loop with mark/rewind reserves memory only in its first step:
 * the arena's system allocations and bytes in use are the same after 1 and
 * after 50 steps; a growing arena (arena_max_mb > arena_mb) grows once. */
START_TEST(test_arena_no_growth) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 1, .arena_max_mb = 64}), AD_OK);
  ad_rng r;
  ad_rng_seed(&r, 3);
  ad_tensor *w = NULL;
  ck_assert_int_eq(ad_tensor_new(&w, AD_F32, 2, S(256, 128)), AD_OK);
  ad_tensor_fill_normal(w, &r, 0, 0.1);
  ad_requires_grad(w, 1);
  ad_tensor *x = NULL;
  ck_assert_int_eq(ad_tensor_new(&x, AD_F32, 2, S(512, 256)), AD_OK);
  ad_tensor_fill_normal(x, &r, 0, 1);
  int32_t labels[512];
  for (int i = 0; i < 512; i++) labels[i] = i % 128;
  ad_arena_stats s0, s1, s2;
  ad_arena_stats_get(t, &s0);
  ad_marker m = ad_mark(t);
  for (int step = 0; step < 50; step++) {
    ad_tensor *L = ad_cross_entropy(t, ad_relu(t, ad_matmul(t, x, w, 0, 0)), labels, 512), *g;
    ck_assert_int_eq(ad_grad(t, 1, &L, NULL, 1, &w, &g, AD_GRAD_RECORD), AD_OK);
    ad_tensor *hv;
    ck_assert_int_eq(ad_hvp(t, L, 1, &w, &g, &hv, 0), AD_OK);
    ad_rewind(t, m);
    if (step == 0) ad_arena_stats_get(t, &s1);
  }
  ad_arena_stats_get(t, &s2);
  ck_assert_uint_gt(s1.n_grows, s0.n_grows); /* 1 MiB was too small: it grew once */
  ck_assert_uint_eq(s2.n_grows, s1.n_grows); /* ...and never again */
  ck_assert_uint_eq(s2.capacity, s1.capacity);
  ck_assert_uint_eq(s2.used, s0.used);
  ck_assert_uint_eq(s2.n_nodes, 0);
  ck_assert_uint_gt(s2.peak, 1u << 20);
  ad_tensor_free(w);
  ad_tensor_free(x);
  ad_tape_free(t);
}
END_TEST

/* Bad input: each returns NULL/an error with a message naming the problem. */
START_TEST(test_bad_input) {
  ad_tape *t = NULL; /* a fixed 1 MiB arena, to see it exhausted below */
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 1, .arena_max_mb = 1}), AD_OK);
  ad_tensor *a = ad_zeros(t, AD_F64, 2, S(3, 4)), *b = ad_zeros(t, AD_F64, 2, S(5, 4));
  ad_tensor *c = ad_zeros(t, AD_F32, 2, S(3, 4));
  /* wrong shapes: the message names the op and both shapes */
  ck_assert_ptr_null(ad_add(t, a, b));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "ad_add"));
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "[3, 4] f64"));
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "[5, 4] f64"));
  ad_tape_clear_error(t);
  ck_assert_ptr_null(ad_matmul(t, a, a, 0, 0));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "inner dimensions"));
  ad_tape_clear_error(t);
  /* wrong dtypes */
  ck_assert_ptr_null(ad_mul(t, a, c));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_DTYPE);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "f32"));
  ad_tape_clear_error(t);
  /* NULL: the first error sticks, later NULLs do not overwrite it */
  ck_assert_ptr_null(ad_exp(t, NULL));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_NULL);
  ck_assert_ptr_null(ad_log(t, ad_sum_axis(t, a, 7, 0)));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_NULL);
  ad_tape_clear_error(t);
  ck_assert_ptr_null(ad_add(NULL, a, a));
  ck_assert_ptr_nonnull(strstr(ad_last_error(), "tape is NULL"));
  ck_assert_int_eq(ad_grad(NULL, 1, &a, NULL, 1, &a, &b, 0), AD_ERR_NULL);
  /* bad axis, labels out of range, bad reshape */
  ck_assert_ptr_null(ad_sum_axis(t, a, 2, 0));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ad_tape_clear_error(t);
  int32_t lab[3] = {0, 4, 1};
  ck_assert_ptr_null(ad_nll(t, a, lab, 3));
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "label 1 is 4"));
  ad_tape_clear_error(t);
  ck_assert_ptr_null(ad_reshape(t, a, 2, S(5, 2)));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ad_tape_clear_error(t);
  /* exhausted arena: says how much was asked and how much is left */
  ck_assert_ptr_null(ad_zeros(t, AD_F64, 2, S(1024, 1024)));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARENA);
  /* 8 MiB of data plus the tensor's 128-byte header */
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "asked for 8388736 bytes"));
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "left"));
  ad_tape_clear_error(t);
  /* heap constructors: status + NULL out */
  ad_tensor *h = (ad_tensor *)1;
  ck_assert_int_eq(ad_tensor_new(&h, AD_F64, 5, S(1, 1, 1, 1, 1)), AD_ERR_SHAPE);
  ck_assert_ptr_null(h);
  ck_assert_int_eq(ad_tensor_new(&h, (ad_dtype)9, 1, S(3)), AD_ERR_DTYPE);
  ck_assert_int_eq(ad_tensor_new(&h, AD_F32, 1, S(-2)), AD_ERR_SHAPE);
  ck_assert_int_eq(ad_tensor_from(&h, AD_F32, 1, S(2), NULL), AD_ERR_NULL);
  ck_assert_int_eq(ad_tape_new(NULL, NULL), AD_ERR_NULL);
  ad_tensor_free(NULL);
  ad_tape_free(NULL);
  /* a bad seed shape for ad_grad */
  ad_tensor *x = ad_zeros(t, AD_F64, 1, S(3)), *g;
  ad_requires_grad(x, 1);
  ad_tensor *y = ad_exp(t, x), *seed = ad_zeros(t, AD_F64, 1, S(4));
  ck_assert_int_eq(ad_grad(t, 1, &y, &seed, 1, &x, &g, 0), AD_ERR_SHAPE);
  ad_tape_free(t);
}
END_TEST

/* Unreachable inputs get zeros, or AD_ERR_GRAD when strict. */
START_TEST(test_unreachable) {
  ad_tape *t = new_tape(1);
  ad_tensor *x = ad_full(t, AD_F64, 1, S(3), 2.0), *z = ad_full(t, AD_F64, 1, S(2), 1.0);
  ad_requires_grad(x, 1);
  ad_requires_grad(z, 1);
  ad_tensor *f = ad_sum(t, ad_mul(t, x, x)), *in[2] = {x, z}, *g[2];
  ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 2, in, g, 0), AD_OK);
  ck_assert_double_eq(ad_get(g[0], 1), 4.0);
  ck_assert_int_eq(g[1]->size, 2);
  ck_assert_double_eq(ad_get(g[1], 0), 0.0);
  ck_assert_double_eq(ad_get(g[1], 1), 0.0);
  ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 2, in, g, AD_GRAD_STRICT), AD_ERR_GRAD);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "input 1"));
  ad_tape_clear_error(t);
  /* A leaf that never asked for a gradient had none of its uses recorded:
   * an error, not a silent zero. */
  ad_tensor *plain = ad_full(t, AD_F64, 1, S(3), 1.0);
  ad_tensor *f2 = ad_sum(t, ad_mul(t, plain, x));
  ck_assert_int_eq(ad_grad(t, 1, &f2, NULL, 1, &plain, g, 0), AD_ERR_GRAD);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "ad_requires_grad"));
  ad_tape_free(t);
}
END_TEST

/* ad_backward accumulates into leaf->grad across calls; detach cuts the
 * path: d/dx [x * detach(x)] = detach(x) = x, not 2x. */
START_TEST(test_backward_and_detach) {
  ad_tape *t = new_tape(1);
  ad_tensor *x = NULL;
  ck_assert_int_eq(ad_tensor_from(&x, AD_F64, 1, S(2), (double[]){1.5, -2.0}), AD_OK);
  ad_requires_grad(x, 1);
  for (int k = 0; k < 2; k++) {
    ad_marker m = ad_mark(t);
    ad_tensor *f = ad_sum(t, ad_mul(t, x, ad_detach(t, x)));
    ck_assert_int_eq(ad_backward(t, f, NULL), AD_OK);
    ad_rewind(t, m);
  }
  /* detaching a heap tensor snapshots it: later in-place updates of the
   * parameter do not change the detached value */
  ad_tensor *snap = ad_detach(t, x);
  ad_set(x, 0, 99.0);
  ck_assert_double_eq(ad_item(snap), 1.5);
  ad_set(x, 0, 1.5);
  ck_assert_ptr_null(ad_detach(NULL, x));
  ck_assert_ptr_nonnull(strstr(ad_last_error(), "ad_detach: tape is NULL"));
  ck_assert_ptr_nonnull(x->grad);
  ck_assert_double_eq(ad_get(x->grad, 0), 3.0);  /* 2 calls x 1.5 */
  ck_assert_double_eq(ad_get(x->grad, 1), -4.0); /* 2 calls x -2 */
  ad_zero_grad(x);
  ck_assert_double_eq(ad_get(x->grad, 0), 0.0);
  ad_tensor_free(x);
  ad_tape_free(t);
}
END_TEST

/* Inputs may depend on each other: with y = x^2 and z = y x, asking for
 * (x, y) gives the total dz/dx = 3x^2 and the partial dz/dy = x (exact). */
START_TEST(test_nested_inputs) {
  ad_tape *t = new_tape(1);
  ad_tensor *x = ad_scalar(t, AD_F64, 3.0);
  ad_requires_grad(x, 1);
  ad_tensor *y = ad_mul(t, x, x), *z = ad_mul(t, y, x), *in[2] = {x, y}, *g[2];
  ck_assert_int_eq(ad_grad(t, 1, &z, NULL, 2, in, g, 0), AD_OK);
  ck_assert_double_eq(ad_item(g[0]), 27.0);
  ck_assert_double_eq(ad_item(g[1]), 3.0);
  ad_tape_free(t);
}
END_TEST

/* The mixed partial d/dlam (grad_w f . v) for f = lam * sum(w^3):
 * grad_w f = 3 lam w^2, so the answer is 3 sum(w^2 v). */
START_TEST(test_mixed_partial) {
  ad_tape *t = new_tape(1);
  ad_tensor *w = ad_const(t, AD_F64, 1, S(3), (double[]){1, 2, -1});
  ad_tensor *v = ad_const(t, AD_F64, 1, S(3), (double[]){0.5, -1, 2});
  ad_tensor *lam = ad_scalar(t, AD_F64, 0.7), *out;
  ad_requires_grad(w, 1);
  ad_requires_grad(lam, 1);
  ad_tensor *f = ad_mul(t, lam, ad_sum(t, ad_pow_scalar(t, w, 3)));
  ck_assert_int_eq(ad_mixed_partial(t, f, 1, &w, &v, 1, &lam, &out, 0), AD_OK);
  ck_assert_double_eq_tol(ad_item(out), 3 * (0.5 - 4 + 2), 1e-14);
  ad_tape_free(t);
}
END_TEST

/* JVP with two inputs and two outputs equals the hand-computed J v. */
START_TEST(test_jvp_multi) {
  ad_tape *t = new_tape(1);
  ad_tensor *a = ad_const(t, AD_F64, 1, S(2), (double[]){0.3, -0.5});
  ad_tensor *b = ad_const(t, AD_F64, 1, S(2), (double[]){1.2, 0.4});
  ad_requires_grad(a, 1);
  ad_requires_grad(b, 1);
  ad_tensor *y1 = ad_mul(t, a, b), *y2 = ad_sum(t, ad_exp(t, a));
  ad_tensor *va = ad_const(t, AD_F64, 1, S(2), (double[]){1, 2});
  ad_tensor *vb = ad_const(t, AD_F64, 1, S(2), (double[]){-1, 0.5});
  ad_tensor *in[2] = {a, b}, *tan[2] = {va, vb}, *out[2] = {y1, y2}, *jv[2];
  ck_assert_int_eq(ad_jvp(t, 2, in, tan, 2, out, jv, 0), AD_OK);
  /* d(ab) = b da + a db;  d sum e^a = sum e^a da */
  ck_assert_double_eq_tol(ad_get(jv[0], 0), 1.2 * 1 + 0.3 * -1, 1e-14);
  ck_assert_double_eq_tol(ad_get(jv[0], 1), 0.4 * 2 + -0.5 * 0.5, 1e-14);
  ck_assert_double_eq_tol(ad_item(jv[1]), exp(0.3) * 1 + exp(-0.5) * 2, 1e-14);
  ad_tape_free(t);
}
END_TEST

/* The teaching view prints one line per node with shapes, and valid DOT. */
START_TEST(test_print_and_dot) {
  ad_tape *t = new_tape(1);
  ad_tensor *w = ad_zeros(t, AD_F32, 2, S(4, 3)), *x = ad_ones(t, AD_F32, 2, S(2, 4));
  ad_set_name(w, "w");
  ad_set_name(x, "x");
  ad_requires_grad(w, 1);
  ad_tensor *h = ad_relu(t, ad_matmul(t, x, w, 0, 0));
  ad_tensor *f = ad_sum(t, h);
  (void)f;
  char *buf = NULL;
  size_t len = 0;
  FILE *mem = open_memstream(&buf, &len);
  ck_assert_int_eq(ad_tape_print(t, mem), AD_OK);
  fclose(mem);
  ck_assert_ptr_nonnull(strstr(buf, "v0       = matmul(x, w; A B)  [2, 3] f32"));
  ck_assert_ptr_nonnull(strstr(buf, "= relu(v0)"));
  ck_assert_ptr_nonnull(strstr(buf, "= sum(v1)  [] f32"));
  free(buf);
  /* the line format ad.h shows: name padded to 8, attributes after "; " */
  ad_tensor *w2 = ad_zeros(t, AD_F32, 2, S(3, 4));
  ad_set_name(w2, "w2");
  ad_requires_grad(w2, 1);
  ck_assert_ptr_nonnull(ad_matmul(t, x, w2, 0, 1));
  mem = open_memstream(&buf, &len);
  ck_assert_int_eq(ad_tape_print(t, mem), AD_OK);
  fclose(mem);
  ck_assert_ptr_nonnull(strstr(buf, "\nv3       = matmul(x, w2; A B^T)  [2, 3] f32\n"));
  free(buf);
  mem = open_memstream(&buf, &len);
  ck_assert_int_eq(ad_tape_dot(t, mem), AD_OK);
  fclose(mem);
  ck_assert_ptr_nonnull(strstr(buf, "digraph tape {"));
  ck_assert_ptr_nonnull(strstr(buf, "\"w\" -> \"v0\""));
  free(buf);
  ad_tape_free(t);
}
END_TEST

/* The NaN guard names the first op that produced a NaN. */
START_TEST(test_nan_guard) {
  ad_tape *t = new_tape(1);
  ad_set_nan_guard(t, 1);
  ad_tensor *x = ad_full(t, AD_F64, 1, S(3), -1.0);
  ck_assert_ptr_null(ad_log(t, ad_sqrt(t, x)));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_NUMERIC);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "sqrt produced NaN"));
  ad_tape_free(t);
}
END_TEST

/* The generator is the documented one: xoshiro256** from splitmix64(42);
 * the first outputs are fixed numbers on every machine. */
START_TEST(test_rng_documented) {
  ad_rng r;
  ad_rng_seed(&r, 42);
  uint64_t a = ad_rng_next(&r), b = ad_rng_next(&r);
  ad_rng_seed(&r, 42);
  ck_assert_uint_eq(ad_rng_next(&r), a);
  ck_assert_uint_eq(ad_rng_next(&r), b);
  ck_assert_uint_ne(a, b);
  /* moments of 100k normals: mean within 0.02, variance within 0.02 */
  double s = 0, s2 = 0;
  for (int i = 0; i < 100000; i++) {
    double z = ad_rng_normal(&r);
    s += z;
    s2 += z * z;
  }
  ck_assert_double_eq_tol(s / 1e5, 0.0, 0.02);
  ck_assert_double_eq_tol(s2 / 1e5, 1.0, 0.02);
  for (int i = 0; i < 1000; i++) ck_assert_uint_lt(ad_rng_below(&r, 7), 7);
}
END_TEST

/* An unrecorded sweep adds a matmul's parts straight into gradient slots
 * it owns (the GEMM with beta 1, where it runs the wide kernel): the bits
 * of the recorded sweep, which makes each product and adds it with ad_add,
 * for both operands, every transpose, f32 and f64, two depths; once with
 * the measured GEMM paths, once with the wide kernel forced (where the CPU
 * has it), so the in-place path surely runs, and once with BLIS's sup
 * kernels forced, whose beta 1 gives other bits (the in-place path must
 * then stay off). Each operand gets a part from a later op first
 * (sum(A * D)), so its slot is owned when the matmul's rule runs; the
 * results are also checked against the closed form, dA = C op(B)^T + D. */
START_TEST(test_matmul_accumulates_in_place) {
  static const int64_t ks[] = {7, 300};
  static const char *const paths[] = {"auto", "wide:avx512", "sup"};
  ad_rng r;
  ad_rng_seed(&r, 77);
  for (int pi = 0; pi < 3; pi++) {
    if (ad_blas_set_path(paths[pi]) != AD_OK) continue; /* not on this CPU */
    for (int d = 0; d < 2; d++)
      for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
          for (size_t ki = 0; ki < 2; ki++) {
            const ad_dtype dt = d ? AD_F64 : AD_F32;
            const int64_t m = 13, n = 37, k = ks[ki];
            ad_tape *t = new_tape(16);
            ad_tensor *A = ad_randn(t, dt, 2, ta ? S(k, m) : S(m, k), &r);
            ad_tensor *B = ad_randn(t, dt, 2, tb ? S(n, k) : S(k, n), &r);
            ad_tensor *C = ad_randn(t, dt, 2, S(m, n), &r);
            ad_tensor *D = ad_randn(t, dt, 2, ta ? S(k, m) : S(m, k), &r);
            ad_tensor *E = ad_randn(t, dt, 2, tb ? S(n, k) : S(k, n), &r);
            ad_requires_grad(A, 1);
            ad_requires_grad(B, 1);
            ad_tensor *y = ad_matmul(t, A, B, ta, tb);
            ad_tensor *loss =
                ad_add(t, ad_sum(t, ad_mul(t, y, C)),
                       ad_add(t, ad_sum(t, ad_mul(t, A, D)), ad_sum(t, ad_mul(t, B, E))));
            ad_tensor *in[2] = {A, B}, *g[2], *gr[2];
            ck_assert_int_eq(ad_grad(t, 1, &loss, NULL, 2, in, g, 0), AD_OK);
            ck_assert_int_eq(ad_grad(t, 1, &loss, NULL, 2, in, gr, AD_GRAD_RECORD), AD_OK);
            for (int q = 0; q < 2; q++) {
              ck_assert_int_eq(g[q]->size, gr[q]->size);
              ck_assert_msg(
                  memcmp(g[q]->data, gr[q]->data, (size_t)g[q]->size * ad_dtype_size(dt)) == 0,
                  "%s %s ta %d tb %d k %lld: d%s differs from the recorded sweep's", paths[pi],
                  ad_dtype_name(dt), ta, tb, (long long)k, q ? "B" : "A");
            }
            /* closed form: dA(i, p) = sum_j C(i, j) op(B)(p, j) + D; dB likewise */
            double worst = 0;
            for (int64_t i = 0; i < m; i++)
              for (int64_t p = 0; p < k; p++) {
                double v = 0;
                for (int64_t j = 0; j < n; j++)
                  v += ad_get(C, i * n + j) * ad_get(B, tb ? j * k + p : p * n + j);
                const int64_t ia = ta ? p * m + i : i * k + p;
                v += ad_get(D, ia);
                const double e = fabs(ad_get(g[0], ia) - v) / (1 + fabs(v));
                if (e > worst) worst = e;
              }
            for (int64_t p = 0; p < k; p++)
              for (int64_t j = 0; j < n; j++) {
                double v = 0;
                for (int64_t i = 0; i < m; i++)
                  v += ad_get(A, ta ? p * m + i : i * k + p) * ad_get(C, i * n + j);
                const int64_t ib = tb ? j * k + p : p * n + j;
                v += ad_get(E, ib);
                const double e = fabs(ad_get(g[1], ib) - v) / (1 + fabs(v));
                if (e > worst) worst = e;
              }
            ck_assert_msg(worst < (d ? 1e-12 : 1e-4), "%s ta %d tb %d k %lld: error %g",
                          ad_dtype_name(dt), ta, tb, (long long)k, worst);
            ad_tape_free(t);
          }
  }
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
}
END_TEST

int main(void) {
  Suite *s = suite_create("tape");
  TCase *tc = tcase_create("tape");
  tcase_add_test(tc, test_header_example);
  tcase_add_test(tc, test_third_order);
  tcase_add_test(tc, test_rosenbrock_hvp);
  tcase_add_test(tc, test_unrolled_gd_closed_form);
  tcase_add_test(tc, test_arena_no_growth);
  tcase_add_test(tc, test_bad_input);
  tcase_add_test(tc, test_unreachable);
  tcase_add_test(tc, test_backward_and_detach);
  tcase_add_test(tc, test_nested_inputs);
  tcase_add_test(tc, test_mixed_partial);
  tcase_add_test(tc, test_jvp_multi);
  tcase_add_test(tc, test_print_and_dot);
  tcase_add_test(tc, test_nan_guard);
  tcase_add_test(tc, test_rng_documented);
  tcase_add_test(tc, test_matmul_accumulates_in_place);
  suite_add_tcase(s, tc);
  return gc_run_suite(s);
}
