/* test_bl_engine.c — levels and the engine (bilevel/bl_engine.h): the
 * header's example against a hand-written replica of the same program, a
 * three-level chain against central finite differences and closed forms,
 * methods per edge against each other, build-time refusals, early stopping
 * and logs, and save / resume in a new process, bit for bit. */
#define _POSIX_C_SOURCE 200809L /* fork, mkstemp */
#include "bilevel/bl_engine.h"
#include "gradcheck.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static double rel(double a, double b) {
  return fabs(a - b) / fmax(1e-300, fmax(fabs(a), fabs(b)));
}

static ad_tensor *heap(int n, const double *v) {
  ad_tensor *x = NULL;
  ck_assert_int_eq(ad_tensor_from(&x, AD_F64, 1, (int64_t[]){n}, v), AD_OK);
  return x;
}

/* ================================================================ the header's example
 * cls:  (w - 2)^2 + lam w^2,  5 SGD steps (lr 0.1) per call
 * hpo:  (w - 1)^2,            Adam (lr 1e-2) on lam, by unroll through cls. */
enum { CLS = 0, HPO = 1 };

static ad_tensor *cls_loss(ad_tape *t, const bl_vars *v, void *ctx) {
  (void)ctx;
  ad_tensor *w = v->p[CLS][0], *lam = v->p[HPO][0], *d = ad_add_scalar(t, w, -2.0);
  return ad_add(t, ad_dot(t, d, d), ad_dot(t, ad_mul(t, lam, w), w));
}
static ad_tensor *hpo_loss(ad_tape *t, const bl_vars *v, void *ctx) {
  (void)ctx;
  ad_tensor *d = ad_add_scalar(t, v->p[CLS][0], -1.0);
  return ad_dot(t, d, d);
}

START_TEST(test_header_example) {
  ad_tensor *w = heap(1, (double[]){0.0}), *lam = heap(1, (double[]){0.5});
  /* As in bl_engine.h. */
  bl_engine *e = NULL;
  bl_engine_new(&e, &(bl_engine_opts){.log_every = 10});
  nn_opt_cfg sgd = {.kind = NN_OPT_SGD, .lr = 0.1}, adam = {.kind = NN_OPT_ADAM, .lr = 1e-2};
  bl_engine_add(
      e,
      &(bl_level){.name = "cls", .n = 1, .params = &w, .loss = cls_loss, .opt = &sgd, .steps = 5},
      NULL);
  bl_engine_add(e,
                &(bl_level){.name = "hpo",
                            .n = 1,
                            .params = &lam,
                            .loss = hpo_loss,
                            .opt = &adam,
                            .n_deps = 1,
                            .deps = {{.level = "cls", .method = BL_UNROLL}}},
                NULL);
  if (bl_engine_build(e) != AD_OK) printf("%s\n", bl_engine_errmsg(e));
  bl_engine_run(e, 100, NULL); // 100 hpo steps, 500 cls steps

  ck_assert_int_eq(bl_engine_status(e), AD_OK);
  ck_assert_int_eq(bl_engine_steps_done(e), 100);
  ck_assert_int_eq(bl_engine_level_steps(e, CLS), 500);
  ck_assert_int_eq(bl_engine_level_steps(e, HPO), 100);
  /* The same program by hand: the hypergradient of (w_5 - 1)^2 through
   * w_{t+1} = w_t - 0.1 (2 (w_t - 2) + 2 lam w_t), carried forward as
   * z = dw/dlam: z_{t+1} = (0.8 - 0.2 lam) z_t - 0.2 w_t; Adam on lam; then
   * the 5 steps with the new lam. */
  double W = 0, L = 0.5, m = 0, vv = 0;
  for (int k = 1; k <= 100; k++) {
    double x = W, z = 0;
    for (int s = 0; s < 5; s++) {
      z = (0.8 - 0.2 * L) * z - 0.2 * x;
      x = x - 0.1 * (2 * (x - 2) + 2 * L * x);
    }
    double g = 2 * (x - 1) * z;
    m = 0.9 * m + 0.1 * g;
    vv = 0.999 * vv + 0.001 * g * g;
    L -= 1e-2 * (m / (1 - pow(0.9, k))) / (sqrt(vv / (1 - pow(0.999, k))) + 1e-8);
    for (int s = 0; s < 5; s++) W = W - 0.1 * (2 * (W - 2) + 2 * L * W);
  }
  ck_assert_msg(rel(ad_item(lam), L) < 1e-10, "lam %.17g, by hand %.17g", ad_item(lam), L);
  ck_assert_msg(rel(ad_item(w), W) < 1e-10, "w %.17g, by hand %.17g", ad_item(w), W);
  /* It learned: lam moved from 0.5 toward the optimum lam = 1 (w* = 1). */
  ck_assert(ad_item(lam) > 0.9 && ad_item(lam) < 1.1);
  bl_engine_free(e);
  ad_tensor_free(w);
  ad_tensor_free(lam);
}
END_TEST

/* ================================================================ three levels
 * B (bottom): w in R^2,   L_B = 1/2 ||A w - a||^2 + 1/2 sum_i lam_i w_i^2,  SGD lr_B
 * M (middle): lam in R^2, L_M = 1/2 ||C w - c||^2 (validation split),  SGD with lr = eta
 * T (top):    eta in R^1, L_T = 1/2 ||D w - d||^2 (a second held-out split),  SGD 0.01
 * M learns a weight decay per weight, T learns M's learning rate. */
enum { B3 = 0, M3 = 1, T3 = 2 };
static const double A3[6] = {1.0, 0.2, 0.1, 1.2, 0.5, -0.3}, a3[3] = {1.0, -0.5, 0.7};
static const double C3[6] = {0.8, -0.1, 0.3, 0.9, -0.4, 0.6}, c3[3] = {0.9, -0.2, 0.1};
static const double D3[6] = {1.1, 0.4, -0.2, 0.7, 0.6, 0.5}, d3[3] = {0.5, 0.3, -0.8};

static ad_tensor *lsq(ad_tape *t, ad_tensor *w, const double *X, const double *y) {
  ad_tensor *Xt = ad_const(t, AD_F64, 2, (int64_t[]){3, 2}, X);
  ad_tensor *yt = ad_const(t, AD_F64, 2, (int64_t[]){3, 1}, y);
  ad_tensor *r = ad_sub(t, ad_matmul(t, Xt, ad_reshape(t, w, 2, (int64_t[]){2, 1}), 0, 0), yt);
  return ad_scale(t, ad_dot(t, r, r), 0.5);
}
static ad_tensor *loss_b(ad_tape *t, const bl_vars *v, void *ctx) {
  (void)ctx;
  ad_tensor *w = v->p[B3][0], *lam = v->p[M3][0];
  return ad_add(t, lsq(t, w, A3, a3), ad_scale(t, ad_dot(t, ad_mul(t, lam, w), w), 0.5));
}
static ad_tensor *loss_m(ad_tape *t, const bl_vars *v, void *ctx) {
  (void)ctx;
  return lsq(t, v->p[B3][0], C3, c3);
}
static ad_tensor *loss_t(ad_tape *t, const bl_vars *v, void *ctx) {
  (void)ctx;
  return lsq(t, v->p[B3][0], D3, d3);
}

/* Plain C: the bottom's K steps from w0 and dw_K/dlam (2x2, J[i][j] = dw_i/dlam_j). */
static void ref_bottom(const double *w0, const double *lam, double lr, int K, double *w,
                       double J[2][2]) {
  double H[2][2] = {{0}};
  for (int r = 0; r < 3; r++)
    for (int i = 0; i < 2; i++)
      for (int j = 0; j < 2; j++) H[i][j] += A3[r * 2 + i] * A3[r * 2 + j];
  w[0] = w0[0], w[1] = w0[1];
  memset(J, 0, sizeof(double) * 4);
  for (int k = 0; k < K; k++) {
    double g[2], Jn[2][2];
    for (int i = 0; i < 2; i++) {
      double s = 0;
      for (int r = 0; r < 3; r++)
        s += A3[r * 2 + i] * (A3[r * 2] * w[0] + A3[r * 2 + 1] * w[1] - a3[r]);
      g[i] = s + lam[i] * w[i];
    }
    for (int i = 0; i < 2; i++)
      for (int j = 0; j < 2; j++) {
        double s = 0;
        for (int q = 0; q < 2; q++) s += (H[i][q] + (i == q ? lam[i] : 0)) * J[q][j];
        Jn[i][j] = J[i][j] - lr * s - (i == j ? lr * w[i] : 0);
      }
    memcpy(J, Jn, sizeof Jn);
    for (int i = 0; i < 2; i++) w[i] -= lr * g[i];
  }
}

/* 1/2 ||X w - y||^2 and its gradient in w. */
static double ref_lsq(const double *X, const double *y, const double *w, double *g) {
  double f = 0;
  if (g) g[0] = g[1] = 0;
  for (int r = 0; r < 3; r++) {
    double res = X[r * 2] * w[0] + X[r * 2 + 1] * w[1] - y[r];
    f += 0.5 * res * res;
    if (g) g[0] += X[r * 2] * res, g[1] += X[r * 2 + 1] * res;
  }
  return f;
}

/* d L_M(w_K(lam)) / d lam. */
static void ref_mid_grad(const double *w0, const double *lam, double lr, int K, double *out) {
  double w[2], J[2][2], gw[2];
  ref_bottom(w0, lam, lr, K, w, J);
  ref_lsq(C3, c3, w, gw);
  for (int j = 0; j < 2; j++) out[j] = J[0][j] * gw[0] + J[1][j] * gw[1];
}

/* F(eta) = L_T(w_K(lam_S)), lam_{s+1} = lam_s - eta d/dlam L_M(w_K(lam_s)). */
static double ref_top(const double *w0, const double *lam0, double eta, double lr, int K, int S) {
  double lam[2] = {lam0[0], lam0[1]}, g[2], w[2], J[2][2];
  for (int s = 0; s < S; s++) {
    ref_mid_grad(w0, lam, lr, K, g);
    lam[0] -= eta * g[0], lam[1] -= eta * g[1];
  }
  ref_bottom(w0, lam, lr, K, w, J);
  return ref_lsq(D3, d3, w, NULL);
}

typedef struct {
  ad_tensor *w, *lam, *eta;
  nn_opt_cfg ob, om, ot;
  bl_engine *e;
} three;

static const double W0[2] = {0.3, -0.2}, LAM0[2] = {0.4, 0.25}, ETA0 = 0.5;

static void three_make(three *p, int64_t KB, double lrB, int64_t SM, bl_method top, bl_method mid) {
  p->w = heap(2, W0);
  p->lam = heap(2, LAM0);
  p->eta = heap(1, (double[]){ETA0});
  p->ob = (nn_opt_cfg){.kind = NN_OPT_SGD, .lr = lrB};
  p->om = (nn_opt_cfg){.kind = NN_OPT_SGD, .lr_var = p->eta};
  p->ot = (nn_opt_cfg){.kind = NN_OPT_SGD, .lr = 0.01};
  ck_assert_int_eq(bl_engine_new(&p->e, NULL), AD_OK);
  ck_assert_int_eq(bl_engine_add(p->e,
                                 &(bl_level){.name = "bottom",
                                             .n = 1,
                                             .params = &p->w,
                                             .loss = loss_b,
                                             .opt = &p->ob,
                                             .steps = KB},
                                 NULL),
                   AD_OK);
  ck_assert_int_eq(bl_engine_add(p->e,
                                 &(bl_level){.name = "middle",
                                             .n = 1,
                                             .params = &p->lam,
                                             .loss = loss_m,
                                             .opt = &p->om,
                                             .steps = SM,
                                             .n_deps = 1,
                                             .deps = {{.level = "bottom", .method = mid}}},
                                 NULL),
                   AD_OK);
  ck_assert_int_eq(bl_engine_add(p->e,
                                 &(bl_level){.name = "top",
                                             .n = 1,
                                             .params = &p->eta,
                                             .loss = loss_t,
                                             .opt = &p->ot,
                                             .n_deps = 1,
                                             .deps = {{.level = "middle", .method = top}}},
                                 NULL),
                   AD_OK);
  ad_status s = bl_engine_build(p->e);
  ck_assert_msg(s == AD_OK, "%s", bl_engine_errmsg(p->e));
}

static void three_free(three *p) {
  bl_engine_free(p->e);
  ad_tensor_free(p->w);
  ad_tensor_free(p->lam);
  ad_tensor_free(p->eta);
}

/* The top level's hypergradient through both lower levels (a third-order
 * tape: unroll over the middle's steps, each holding a recorded bottom
 * unroll) against central differences of the plain-C program, 1e-6
 * relative; its value and the middle's own hypergradient against the
 * plain-C program to 1e-12. */
START_TEST(test_three_level_fd) {
  const int KB = 3, SM = 2;
  const double lrB = 0.1;
  three p;
  three_make(&p, KB, lrB, SM, BL_UNROLL, BL_UNROLL);
  ad_tensor *hg = heap(1, (double[]){0}), *hm = heap(2, (double[]){0, 0});
  double F = NAN, FM = NAN;
  ck_assert_msg(bl_engine_hypergrad(p.e, T3, &hg, &F) == AD_OK, "%s", bl_engine_errmsg(p.e));
  double h = 1e-5;
  double fd =
      (ref_top(W0, LAM0, ETA0 + h, lrB, KB, SM) - ref_top(W0, LAM0, ETA0 - h, lrB, KB, SM)) /
      (2 * h);
  fprintf(stderr, "three levels: dL_top/deta %.15g, central differences %.15g (rel %.2e)\n",
          ad_item(hg), fd, rel(ad_item(hg), fd));
  ck_assert(fabs(fd) > 1e-4); /* not a vacuous comparison */
  ck_assert_msg(rel(ad_item(hg), fd) < 1e-6, "hg %.15g fd %.15g", ad_item(hg), fd);
  ck_assert_msg(rel(F, ref_top(W0, LAM0, ETA0, lrB, KB, SM)) < 1e-12, "F %.17g", F);
  /* The middle's hypergradient (through the bottom by unroll). */
  double gm[2];
  ref_mid_grad(W0, LAM0, lrB, KB, gm);
  ck_assert_msg(bl_engine_hypergrad(p.e, M3, &hm, &FM) == AD_OK, "%s", bl_engine_errmsg(p.e));
  for (int j = 0; j < 2; j++)
    ck_assert_msg(rel(ad_get(hm, j), gm[j]) < 1e-12, "middle %d: %.17g vs %.17g", j, ad_get(hm, j),
                  gm[j]);
  /* Nothing moved. */
  ck_assert_double_eq(ad_item(p.eta), ETA0);
  ck_assert_double_eq(ad_get(p.w, 0), W0[0]);
  /* One engine step: eta <- eta - 0.01 hg, and eta is then the middle's lr:
   * lam_1 = lam_0 - eta_1 g(lam_0), lam_2 likewise, the bottom trains KB
   * steps after each. */
  ck_assert_int_eq(bl_engine_step(p.e), AD_OK);
  double eta1 = ETA0 - 0.01 * ad_item(hg), lam[2] = {LAM0[0], LAM0[1]}, w[2] = {W0[0], W0[1]},
         J[2][2];
  for (int s = 0; s < SM; s++) {
    ref_mid_grad(w, lam, lrB, KB, gm);
    lam[0] -= eta1 * gm[0], lam[1] -= eta1 * gm[1];
    double wn[2];
    ref_bottom(w, lam, lrB, KB, wn, J);
    w[0] = wn[0], w[1] = wn[1];
  }
  ck_assert(rel(ad_item(p.eta), eta1) < 1e-14);
  for (int j = 0; j < 2; j++) {
    ck_assert_msg(rel(ad_get(p.lam, j), lam[j]) < 1e-12, "lam %d", j);
    ck_assert_msg(rel(ad_get(p.w, j), w[j]) < 1e-12, "w %d", j);
  }
  ad_tensor_free(hg);
  ad_tensor_free(hm);
  three_free(&p);
}
END_TEST

/* Methods per edge. Top edge: forward mode equals unroll (both exact for the
 * program, 1e-10). Middle edge with the bottom run to convergence (100
 * steps, contraction <= 0.7 per step): cg (implicit, exact at w*) and
 * unroll both equal the closed form -diag(w*) (A^T A + diag lam)^{-1}
 * grad_w L_M(w*) to 1e-8; whole runs of 3 engine steps with (forward, cg)
 * and (unroll, unroll) agree to 1e-8. */
START_TEST(test_three_level_methods) {
  three u, f;
  three_make(&u, 3, 0.1, 2, BL_UNROLL, BL_UNROLL);
  three_make(&f, 3, 0.1, 2, BL_FORWARD, BL_UNROLL);
  ad_tensor *hu = heap(1, (double[]){0}), *hf = heap(1, (double[]){0});
  ck_assert_int_eq(bl_engine_hypergrad(u.e, T3, &hu, NULL), AD_OK);
  ck_assert_msg(bl_engine_hypergrad(f.e, T3, &hf, NULL) == AD_OK, "%s", bl_engine_errmsg(f.e));
  ck_assert_msg(rel(ad_item(hu), ad_item(hf)) < 1e-10, "unroll %.17g forward %.17g", ad_item(hu),
                ad_item(hf));
  three_free(&u);
  three_free(&f);

  const int K = 100;
  three_make(&u, K, 0.2, 2, BL_UNROLL, BL_UNROLL);
  three_make(&f, K, 0.2, 2, BL_FORWARD, BL_CG);
  /* Closed form at w* = (A^T A + diag lam)^{-1} A^T a. */
  double H[4] = {0}, Aa[2] = {0}, ws[2], gw[2], v[2];
  for (int r = 0; r < 3; r++)
    for (int i = 0; i < 2; i++) {
      Aa[i] += A3[r * 2 + i] * a3[r];
      for (int j = 0; j < 2; j++) H[i * 2 + j] += A3[r * 2 + i] * A3[r * 2 + j];
    }
  H[0] += LAM0[0], H[3] += LAM0[1];
  double det = H[0] * H[3] - H[1] * H[2];
  ws[0] = (H[3] * Aa[0] - H[1] * Aa[1]) / det;
  ws[1] = (H[0] * Aa[1] - H[2] * Aa[0]) / det;
  ref_lsq(C3, c3, ws, gw);
  v[0] = (H[3] * gw[0] - H[1] * gw[1]) / det;
  v[1] = (H[0] * gw[1] - H[2] * gw[0]) / det;
  ad_tensor *mu = heap(2, (double[]){0, 0}), *mc = heap(2, (double[]){0, 0});
  ck_assert_int_eq(bl_engine_hypergrad(u.e, M3, &mu, NULL), AD_OK);
  ck_assert_msg(bl_engine_hypergrad(f.e, M3, &mc, NULL) == AD_OK, "%s", bl_engine_errmsg(f.e));
  for (int j = 0; j < 2; j++) {
    double exact = -ws[j] * v[j];
    fprintf(stderr, "middle edge %d: closed form %.15g unroll %.15g cg %.15g\n", j, exact,
            ad_get(mu, j), ad_get(mc, j));
    ck_assert(rel(ad_get(mu, j), exact) < 1e-8);
    ck_assert(rel(ad_get(mc, j), exact) < 1e-8);
  }
  ck_assert_int_eq(bl_engine_run(u.e, 3, NULL), AD_OK);
  ck_assert_msg(bl_engine_run(f.e, 3, NULL) == AD_OK, "%s", bl_engine_errmsg(f.e));
  ck_assert(rel(ad_item(u.eta), ad_item(f.eta)) < 1e-8);
  for (int j = 0; j < 2; j++) {
    ck_assert(rel(ad_get(u.lam, j), ad_get(f.lam, j)) < 1e-8);
    ck_assert(rel(ad_get(u.w, j), ad_get(f.w, j)) < 1e-8);
  }
  ck_assert(ad_item(u.eta) != ETA0); /* it moved */
  ad_tensor_free(hu);
  ad_tensor_free(hf);
  ad_tensor_free(mu);
  ad_tensor_free(mc);
  three_free(&u);
  three_free(&f);
}
END_TEST

/* ================================================================ build-time refusals */

static ad_tensor *bad_shape_loss(ad_tape *t, const bl_vars *v, void *ctx) {
  (void)ctx;
  ad_tensor *x = ad_zeros(t, AD_F64, 2, (int64_t[]){3, 5});
  return ad_sum(t, ad_matmul(t, x, ad_reshape(t, v->p[v->self][0], 2, (int64_t[]){2, 1}), 0, 0));
}
static ad_tensor *vector_loss(ad_tape *t, const bl_vars *v, void *ctx) {
  (void)ctx;
  return ad_mul(t, v->p[v->self][0], v->p[v->self][0]);
}

/* Builds levels a (bottom) and b (over a) with b's dep and a's loss / step
 * as given; returns the build status and copies the message. */
static ad_status try_build(bl_level la, bl_level lb, char *msg, size_t len) {
  bl_engine *e = NULL;
  ck_assert_int_eq(bl_engine_new(&e, NULL), AD_OK);
  bl_engine_add(e, &la, NULL);
  bl_engine_add(e, &lb, NULL);
  ad_status s = bl_engine_build(e);
  snprintf(msg, len, "%s", bl_engine_errmsg(e));
  fprintf(stderr, "refused (%d): %s\n", (int)s, msg);
  bl_engine_free(e);
  return s;
}

START_TEST(test_build_errors) {
  ad_tensor *w = heap(2, (double[]){1, 2}), *lam = heap(2, (double[]){0.1, 0.2}), *big = NULL;
  ck_assert_int_eq(ad_tensor_new(&big, AD_F64, 1, (int64_t[]){5000}), AD_OK);
  nn_opt_cfg sgd = {.kind = NN_OPT_SGD, .lr = 0.1}, lrv = {.kind = NN_OPT_SGD, .lr_vars = &lam};
  char m[1024];
  bl_level a = {.name = "a", .n = 1, .params = &w, .loss = loss_b, .opt = &sgd};
  bl_level b = {.name = "b",
                .n = 1,
                .params = &lam,
                .loss = loss_m,
                .opt = &sgd,
                .n_deps = 1,
                .deps = {{.level = "a"}}};
  /* Fine as it is (B3 = 0: a, M3 = 1: b). */
  ck_assert_int_eq(try_build(a, b, m, sizeof m), AD_OK);

  bl_level ca = a;
  ca.n_deps = 1;
  ca.deps[0] = (bl_dep){.level = "b"};
  ck_assert_int_eq(try_build(ca, b, m, sizeof m), AD_ERR_ARG);
  ck_assert_ptr_nonnull(strstr(m, "cycle: a -> b -> a"));

  bl_level na = a;
  na.loss = NULL;
  ck_assert_int_eq(try_build(na, b, m, sizeof m), AD_ERR_NULL);
  ck_assert_ptr_nonnull(strstr(m, "level 'a' has no loss"));

  na = a;
  na.opt = NULL;
  ck_assert_int_eq(try_build(na, b, m, sizeof m), AD_ERR_NULL);
  ck_assert_ptr_nonnull(strstr(m, "level 'a' has no step"));

  bl_level ub = b;
  ub.deps[0].level = "nope";
  ck_assert_int_eq(try_build(a, ub, m, sizeof m), AD_ERR_ARG);
  ck_assert_ptr_nonnull(strstr(m, "'b' depends on 'nope'"));

  ub = b;
  ub.deps[0].method_name = "newton";
  ck_assert_int_eq(try_build(a, ub, m, sizeof m), AD_ERR_ARG);
  ck_assert_ptr_nonnull(strstr(m, "unknown method 'newton'"));
  ub.deps[0].method_name = "cg"; /* by name */
  ck_assert_int_eq(try_build(a, ub, m, sizeof m), AD_OK);

  /* Forward mode with 5000 hyperparameters: refused with the reason, and
   * accepted when forced. */
  bl_level fb = b;
  fb.params = &big;
  fb.loss = hpo_loss; /* reads p[0][0] only */
  fb.deps[0].method = BL_FORWARD;
  bl_level fa = a;
  fa.loss = hpo_loss;
  ck_assert_int_eq(try_build(fa, fb, m, sizeof m), AD_ERR_ARG);
  ck_assert_ptr_nonnull(strstr(m, "forward mode carries one tangent per hyperparameter"));
  ck_assert_ptr_nonnull(strstr(m, "'b' over 'a'"));
  fb.deps[0].force = 1;
  ck_assert_int_eq(try_build(fa, fb, m, sizeof m), AD_OK);

  /* An implicit method for an upper level that sets the lower's lr. */
  bl_level la = a;
  la.opt = &lrv;
  ub = b;
  ub.deps[0].method = BL_CG;
  ck_assert_int_eq(try_build(la, ub, m, sizeof m), AD_ERR_ARG);
  ck_assert_ptr_nonnull(strstr(m, "implicit method (cg)"));

  /* Shapes: a loss that multiplies [3, 5] by [2, 1], and one that is not a
   * scalar, both named at build time. */
  bl_level sa = a;
  sa.loss = bad_shape_loss;
  ck_assert_int_eq(try_build(sa, b, m, sizeof m), AD_ERR_SHAPE);
  ck_assert_ptr_nonnull(strstr(m, "bl_engine_build"));
  ck_assert_ptr_nonnull(strstr(m, "matmul"));
  sa.loss = vector_loss;
  ck_assert_int_eq(try_build(sa, b, m, sizeof m), AD_ERR_SHAPE);
  ck_assert_ptr_nonnull(strstr(m, "level 'a': its loss is [2] f64; a scalar is needed"));

  /* Duplicated names; a schedule on a learnable lr. */
  bl_level da = a;
  da.name = "b";
  ck_assert_int_eq(try_build(da, b, m, sizeof m), AD_ERR_ARG);
  ck_assert_ptr_nonnull(strstr(m, "two levels are named 'b'"));
  ad_tensor_free(w);
  ad_tensor_free(lam);
  ad_tensor_free(big);
}
END_TEST

/* ================================================================ early stopping and logs */

typedef struct {
  int calls;
} val_ctx;

/* Validation metrics 5, 4, 4.5, 3.95, 4.2, 4.1, ...: with min_delta 0.1 the
 * 3.95 is no improvement on 4, so with patience 3 the run stops at the 5th
 * validation (after 4: 4.5, 3.95, 4.2). */
static ad_status validate(bl_engine *e, ad_tape *t, double *metric, void *ctx) {
  (void)e, (void)t;
  static const double seq[] = {5, 4, 4.5, 3.95, 4.2, 4.1, 1, 1};
  val_ctx *c = ctx;
  *metric = seq[c->calls++];
  return AD_OK;
}

START_TEST(test_early_stop_and_logs) {
  ad_tensor *w = heap(1, (double[]){0.0}), *lam = heap(1, (double[]){0.5});
  char json[] = "/tmp/ht_engine_logXXXXXX";
  int fd = mkstemp(json);
  ck_assert_int_ge(fd, 0);
  close(fd);
  FILE *prog = tmpfile();
  val_ctx vc = {0};
  bl_engine *e = NULL;
  ck_assert_int_eq(bl_engine_new(&e, &(bl_engine_opts){.log_every = 2,
                                                       .progress = prog,
                                                       .json_path = json,
                                                       .val_every = 2,
                                                       .validate = validate,
                                                       .validate_ctx = &vc,
                                                       .patience = 3,
                                                       .min_delta = 0.1}),
                   AD_OK);
  nn_opt_cfg sgd = {.kind = NN_OPT_SGD, .lr = 0.1}, adam = {.kind = NN_OPT_ADAM, .lr = 1e-2};
  bl_engine_add(
      e,
      &(bl_level){.name = "cls", .n = 1, .params = &w, .loss = cls_loss, .opt = &sgd, .steps = 5},
      NULL);
  bl_engine_add(e,
                &(bl_level){.name = "hpo",
                            .n = 1,
                            .params = &lam,
                            .loss = hpo_loss,
                            .opt = &adam,
                            .n_deps = 1,
                            .deps = {{.level = "cls"}}},
                NULL);
  ck_assert_int_eq(bl_engine_build(e), AD_OK);
  bl_engine_result res;
  ck_assert_int_eq(bl_engine_run(e, 100, &res), AD_OK);
  ck_assert_int_eq(res.stopped_early, 1);
  ck_assert_int_eq(vc.calls, 5);
  ck_assert_int_eq(res.steps, 10);
  ck_assert_double_eq(res.best_metric, 4);
  ck_assert_int_eq(res.best_step, 4);
  ck_assert_double_eq(res.last_metric, 4.2);
  ck_assert(res.hg_norm > 0 && isfinite(res.hg_norm));
  /* 5 progress lines, 5 JSON records, each with both levels' losses. */
  char line[1024];
  int n = 0;
  rewind(prog);
  while (fgets(line, sizeof line, prog)) {
    n++;
    ck_assert_ptr_nonnull(strstr(line, "cls "));
    ck_assert_ptr_nonnull(strstr(line, "hpo "));
    ck_assert_ptr_nonnull(strstr(line, "|hg|"));
    ck_assert_ptr_nonnull(strstr(line, "MB"));
  }
  ck_assert_int_eq(n, 5);
  FILE *jf = fopen(json, "r");
  n = 0;
  while (fgets(line, sizeof line, jf)) {
    char want[64];
    snprintf(want, sizeof want, "{\"step\":%d,\"loss\":{\"cls\":", 2 * (n + 1));
    ck_assert_msg(strncmp(line, want, strlen(want)) == 0, "%s", line);
    ck_assert_ptr_nonnull(strstr(line, "\"hpo\":"));
    ck_assert_ptr_nonnull(strstr(line, "\"hg_norm\":"));
    ck_assert_ptr_nonnull(strstr(line, "\"val\":"));
    ck_assert_ptr_nonnull(strstr(line, "\"arena_mb\":"));
    n++;
  }
  ck_assert_int_eq(n, 5);
  fclose(jf);
  fclose(prog);
  unlink(json);
  bl_engine_free(e);
  ad_tensor_free(w);
  ad_tensor_free(lam);
}
END_TEST

/* ================================================================ save and resume
 * Ridge regression on synthetic data through shuffled batch iterators, with
 * a momentum lower level, an Adam upper level, and the engine's rng drawn
 * in the loss (a random scale of the penalty), so every kind of state
 * matters. */
typedef struct {
  ds_dataset *train, *val;
  bl_engine **e;
} rs_ctx;

static ad_tensor *rs_fit(ad_tape *t, const bl_vars *v, ad_tensor *w) {
  ad_tensor *r = ad_sub(t, ad_matmul(t, v->x, ad_reshape(t, w, 2, (int64_t[]){4, 1}), 0, 0), v->y);
  return ad_scale(t, ad_dot(t, r, r), 0.5 / (double)v->n);
}
static ad_tensor *rs_lower(ad_tape *t, const bl_vars *v, void *ctx) {
  rs_ctx *c = ctx;
  double u = 0.5 + ad_rng_uniform(bl_engine_rng(*c->e));
  ad_tensor *w = v->p[0][0];
  return ad_add(t, rs_fit(t, v, w), ad_scale(t, ad_dot(t, ad_mul(t, v->p[1][0], w), w), 0.5 * u));
}
static ad_tensor *rs_upper(ad_tape *t, const bl_vars *v, void *ctx) {
  (void)ctx;
  return rs_fit(t, v, v->p[0][0]);
}

typedef struct {
  ad_tensor *w, *lam;
  nn_opt_cfg ol, ou;
  bl_engine *e;
  rs_ctx c;
} rs;

static void rs_make(rs *p, ds_dataset *train, ds_dataset *val) {
  p->w = heap(4, (double[]){0.1, -0.1, 0.2, 0.0});
  p->lam = heap(4, (double[]){0.1, 0.1, 0.1, 0.1});
  p->ol = (nn_opt_cfg){.kind = NN_OPT_MOMENTUM, .lr = 0.05};
  p->ou = (nn_opt_cfg){.kind = NN_OPT_ADAM, .lr = 0.01};
  p->c = (rs_ctx){train, val, &p->e};
  ck_assert_int_eq(bl_engine_new(&p->e, &(bl_engine_opts){.seed = 42}), AD_OK);
  ck_assert_int_eq(bl_engine_add(p->e,
                                 &(bl_level){.name = "model",
                                             .n = 1,
                                             .params = &p->w,
                                             .loss = rs_lower,
                                             .ctx = &p->c,
                                             .opt = &p->ol,
                                             .data = train,
                                             .batch = {.batch = 8, .seed = 3},
                                             .steps = 4},
                                 NULL),
                   AD_OK);
  ck_assert_int_eq(bl_engine_add(p->e,
                                 &(bl_level){.name = "decay",
                                             .n = 1,
                                             .params = &p->lam,
                                             .loss = rs_upper,
                                             .ctx = &p->c,
                                             .opt = &p->ou,
                                             .data = val,
                                             .batch = {.batch = 8, .seed = 5},
                                             .n_deps = 1,
                                             .deps = {{.level = "model", .method = BL_UNROLL}}},
                                 NULL),
                   AD_OK);
  ck_assert_msg(bl_engine_build(p->e) == AD_OK, "%s", bl_engine_errmsg(p->e));
}

static void rs_free(rs *p) {
  bl_engine_free(p->e);
  ad_tensor_free(p->w);
  ad_tensor_free(p->lam);
}

/* What is compared: both levels' parameters and losses, bit for bit. */
static void rs_snapshot(const rs *p, double *out) {
  for (int i = 0; i < 4; i++) out[i] = ad_get(p->w, i), out[4 + i] = ad_get(p->lam, i);
  out[8] = bl_engine_loss(p->e, 0);
  out[9] = bl_engine_loss(p->e, 1);
  out[10] = (double)bl_engine_level_steps(p->e, 0);
}

static void rs_data(ds_dataset **train, ds_dataset **val) {
  ad_rng r;
  ad_rng_seed(&r, 11);
  ck_assert_int_eq(
      ds_linear_regression(train,
                           &(ds_linear_opts){.n = 40, .dim = 4, .noise = 0.3, .dtype = AD_F64}, &r),
      AD_OK);
  ck_assert_int_eq(
      ds_linear_regression(val,
                           &(ds_linear_opts){.n = 24,
                                             .dim = 4,
                                             .noise = 0.3,
                                             .w = (const double *)(*train)->w_true->data,
                                             .dtype = AD_F64},
                           &r),
      AD_OK);
}

START_TEST(test_resume_bit_identical) {
  enum { N = 3, M = 4 };
  ds_dataset *train, *val;
  rs_data(&train, &val);
  char path[] = "/tmp/ht_engine_stateXXXXXX";
  int fd = mkstemp(path);
  ck_assert_int_ge(fd, 0);
  close(fd);
  {
    rs a;
    rs_make(&a, train, val);
    ck_assert_int_eq(bl_engine_run(a.e, N, NULL), AD_OK);
    ck_assert_msg(bl_engine_save(a.e, path) == AD_OK, "%s", bl_engine_errmsg(a.e));
    rs_free(&a);
  }
  /* A new process builds a fresh engine, loads the file, takes M steps and
   * sends back what it got. */
  int pfd[2];
  ck_assert_int_eq(pipe(pfd), 0);
  pid_t pid = fork();
  ck_assert_int_ge(pid, 0);
  if (pid == 0) {
    close(pfd[0]);
    rs b;
    rs_make(&b, train, val);
    double snap[11] = {0};
    if (bl_engine_load(b.e, path) == AD_OK && bl_engine_run(b.e, M, NULL) == AD_OK)
      rs_snapshot(&b, snap);
    else
      snap[10] = -1;
    ssize_t k = write(pfd[1], snap, sizeof snap);
    _exit(k == (ssize_t)sizeof snap ? 0 : 1);
  }
  close(pfd[1]);
  double got[11];
  ck_assert_int_eq(read(pfd[0], got, sizeof got), (ssize_t)sizeof got);
  close(pfd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  rs c;
  rs_make(&c, train, val);
  ck_assert_int_eq(bl_engine_run(c.e, N + M, NULL), AD_OK);
  double want[11];
  rs_snapshot(&c, want);
  ck_assert_double_eq(want[10], (N + M) * 4.0);
  for (int i = 0; i < 11; i++)
    ck_assert_msg(memcmp(&got[i], &want[i], sizeof(double)) == 0,
                  "%d: resumed %.17g straight %.17g", i, got[i], want[i]);
  /* And the comparison is not trivial: the parameters moved. */
  ck_assert(ad_get(c.lam, 0) != 0.1 && ad_get(c.w, 0) != 0.1);
  rs_free(&c);
  unlink(path);
  ds_dataset_free(train);
  ds_dataset_free(val);
}
END_TEST

/* Corrupt, truncated or foreign files: AD_ERR_FORMAT and the engine as it
 * was (values, counters, and it still runs). */
START_TEST(test_corrupt_state) {
  ds_dataset *train, *val;
  rs_data(&train, &val);
  char path[] = "/tmp/ht_engine_badXXXXXX";
  int fd = mkstemp(path);
  ck_assert_int_ge(fd, 0);
  close(fd);
  rs a;
  rs_make(&a, train, val);
  ck_assert_int_eq(bl_engine_run(a.e, 2, NULL), AD_OK);
  ck_assert_int_eq(bl_engine_save(a.e, path), AD_OK);
  FILE *f = fopen(path, "rb");
  unsigned char bytes[8192];
  size_t len = fread(bytes, 1, sizeof bytes, f);
  fclose(f);
  ck_assert(len > 100 && len < sizeof bytes);
  ck_assert_int_eq(bl_engine_run(a.e, 1, NULL), AD_OK);
  double before[11], after[11];
  rs_snapshot(&a, before);
  for (size_t pos = 0; pos < len; pos += 7) {
    bytes[pos] ^= 0x10;
    ck_assert_int_eq(bl_engine_load_bytes(a.e, bytes, len), AD_ERR_FORMAT);
    bytes[pos] ^= 0x10;
  }
  for (size_t cut = 0; cut < len; cut += 13)
    ck_assert_int_eq(bl_engine_load_bytes(a.e, bytes, cut), AD_ERR_FORMAT);
  fprintf(stderr, "corrupt state: %s\n", bl_engine_errmsg(a.e));
  rs_snapshot(&a, after);
  ck_assert_int_eq(memcmp(before, after, sizeof before), 0);
  ck_assert_int_eq(bl_engine_steps_done(a.e), 3);
  /* A file of another engine (other level names). */
  rs_free(&a);
  three t3;
  three_make(&t3, 2, 0.1, 1, BL_UNROLL, BL_UNROLL);
  ck_assert_int_eq(bl_engine_load(t3.e, path), AD_ERR_FORMAT);
  ck_assert_ptr_nonnull(strstr(bl_engine_errmsg(t3.e), "levels"));
  ck_assert_int_eq(bl_engine_load(t3.e, "/nonexistent/state"), AD_ERR_IO);
  ck_assert_int_eq(bl_engine_step(t3.e), AD_OK);
  three_free(&t3);
  /* The good bytes load. */
  rs_make(&a, train, val);
  ck_assert_int_eq(bl_engine_load_bytes(a.e, bytes, len), AD_OK);
  ck_assert_int_eq(bl_engine_steps_done(a.e), 2);
  rs_free(&a);
  unlink(path);
  ds_dataset_free(train);
  ds_dataset_free(val);
}
END_TEST

/* ================================================================ a user step at the top
 * Heavy-ball momentum written as a user step drives the upper level exactly
 * as NN_OPT_MOMENTUM does (f64, 1e-14 relative after 20 engine steps). */
static ad_status heavy_ball(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *state,
                            ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                            ad_tensor **w_new, ad_tensor **state_new) {
  (void)lam, (void)step, (void)ctx;
  for (int i = 0; i < n; i++) {
    state_new[i] = ad_add(t, ad_scale(t, state[i], 0.9), g[i]); /* m = mu m + g */
    w_new[i] = ad_axpy(t, w[i], -1e-2, state_new[i]);           /* w -= lr m */
  }
  return ad_tape_status(t);
}

START_TEST(test_user_step_top) {
  ad_tensor *w[2], *lam[2];
  bl_engine *e[2];
  nn_opt_cfg sgd = {.kind = NN_OPT_SGD, .lr = 0.1}, mom = {.kind = NN_OPT_MOMENTUM, .lr = 1e-2};
  for (int k = 0; k < 2; k++) {
    w[k] = heap(1, (double[]){0.0});
    lam[k] = heap(1, (double[]){0.5});
    ck_assert_int_eq(bl_engine_new(&e[k], NULL), AD_OK);
    bl_engine_add(
        e[k],
        &(bl_level){
            .name = "cls", .n = 1, .params = &w[k], .loss = cls_loss, .opt = &sgd, .steps = 5},
        NULL);
    bl_level up = {.name = "hpo",
                   .n = 1,
                   .params = &lam[k],
                   .loss = hpo_loss,
                   .n_deps = 1,
                   .deps = {{.level = "cls"}}};
    if (k == 0)
      up.opt = &mom;
    else
      up.step = (bl_step){.fn = heavy_ball, .slots = 1, .name = "heavy ball"};
    bl_engine_add(e[k], &up, NULL);
    ck_assert_msg(bl_engine_build(e[k]) == AD_OK, "%s", bl_engine_errmsg(e[k]));
    ck_assert_msg(bl_engine_run(e[k], 20, NULL) == AD_OK, "%s", bl_engine_errmsg(e[k]));
  }
  ck_assert(ad_item(lam[0]) != 0.5);
  ck_assert_msg(rel(ad_item(lam[0]), ad_item(lam[1])) < 1e-14, "%.17g %.17g", ad_item(lam[0]),
                ad_item(lam[1]));
  ck_assert(rel(ad_item(w[0]), ad_item(w[1])) < 1e-14);
  for (int k = 0; k < 2; k++) {
    bl_engine_free(e[k]);
    ad_tensor_free(w[k]);
    ad_tensor_free(lam[k]);
  }
}
END_TEST

/* The same heavy ball as the lower level's step, through unroll and cg
 * edges: equal to NN_OPT_MOMENTUM (lr 1e-2, mu 0.9) to 1e-14 after 10
 * engine steps (the methods run the user step; the engine applies it in
 * place and saves its state). */
START_TEST(test_user_step_lower) {
  const bl_method ms[2] = {BL_UNROLL, BL_CG};
  for (int mi = 0; mi < 2; mi++) {
    ad_tensor *w[2], *lam[2];
    bl_engine *e[2];
    nn_opt_cfg mom = {.kind = NN_OPT_MOMENTUM, .lr = 1e-2}, sgd = {.kind = NN_OPT_SGD, .lr = 0.05};
    for (int k = 0; k < 2; k++) {
      w[k] = heap(1, (double[]){0.0});
      lam[k] = heap(1, (double[]){0.5});
      ck_assert_int_eq(bl_engine_new(&e[k], NULL), AD_OK);
      bl_level lo = {.name = "cls", .n = 1, .params = &w[k], .loss = cls_loss, .steps = 6};
      if (k == 0)
        lo.opt = &mom;
      else
        lo.step = (bl_step){.fn = heavy_ball, .slots = 1, .name = "heavy ball"};
      bl_engine_add(e[k], &lo, NULL);
      bl_engine_add(e[k],
                    &(bl_level){.name = "hpo",
                                .n = 1,
                                .params = &lam[k],
                                .loss = hpo_loss,
                                .opt = &sgd,
                                .n_deps = 1,
                                .deps = {{.level = "cls", .method = ms[mi]}}},
                    NULL);
      ck_assert_msg(bl_engine_build(e[k]) == AD_OK, "%s", bl_engine_errmsg(e[k]));
      ck_assert_msg(bl_engine_run(e[k], 10, NULL) == AD_OK, "%s", bl_engine_errmsg(e[k]));
    }
    fprintf(stderr, "user step below (%s): lam %.17g vs %.17g\n", bl_method_name(ms[mi]),
            ad_item(lam[0]), ad_item(lam[1]));
    ck_assert(ad_item(lam[0]) != 0.5);
    ck_assert(rel(ad_item(lam[0]), ad_item(lam[1])) < 1e-14);
    ck_assert(rel(ad_item(w[0]), ad_item(w[1])) < 1e-14);
    for (int k = 0; k < 2; k++) {
      bl_engine_free(e[k]);
      ad_tensor_free(w[k]);
      ad_tensor_free(lam[k]);
    }
  }
}
END_TEST

/* ================================================================ a DAG: one level over two
 * L1: (w1 - 2)^2 + lam w1^2,  L2: (w2 + 1)^2 + 2 lam w2^2  (SGD 0.1, 4 steps each)
 * U:  (w1 - 1)^2 + (w2 + 0.3)^2 + 0.1 lam^2, with a direct term, by unroll over
 * both. The engine sums the two edges and keeps the direct term once:
 * compared with central differences of the plain-C program, 1e-7. */
enum { D1 = 0, D2 = 1, DU = 2 };
static ad_tensor *dag_l1(ad_tape *t, const bl_vars *v, void *ctx) {
  (void)ctx;
  ad_tensor *w = v->p[D1][0], *d = ad_add_scalar(t, w, -2.0);
  return ad_add(t, ad_dot(t, d, d), ad_dot(t, ad_mul(t, v->p[DU][0], w), w));
}
static ad_tensor *dag_l2(ad_tape *t, const bl_vars *v, void *ctx) {
  (void)ctx;
  ad_tensor *w = v->p[D2][0], *d = ad_add_scalar(t, w, 1.0);
  return ad_add(t, ad_dot(t, d, d), ad_scale(t, ad_dot(t, ad_mul(t, v->p[DU][0], w), w), 2.0));
}
static ad_tensor *dag_u(ad_tape *t, const bl_vars *v, void *ctx) {
  (void)ctx;
  ad_tensor *a = ad_add_scalar(t, v->p[D1][0], -1.0), *b = ad_add_scalar(t, v->p[D2][0], 0.3);
  ad_tensor *lam = v->p[DU][0];
  return ad_add(t, ad_add(t, ad_dot(t, a, a), ad_dot(t, b, b)),
                ad_scale(t, ad_dot(t, lam, lam), 0.1));
}
static double dag_ref(double lam) {
  double w1 = 0.5, w2 = 0.2;
  for (int k = 0; k < 4; k++) {
    w1 -= 0.1 * (2 * (w1 - 2) + 2 * lam * w1);
    w2 -= 0.1 * (2 * (w2 + 1) + 4 * lam * w2);
  }
  return (w1 - 1) * (w1 - 1) + (w2 + 0.3) * (w2 + 0.3) + 0.1 * lam * lam;
}

START_TEST(test_dag_two_lowers) {
  ad_tensor *w1 = heap(1, (double[]){0.5}), *w2 = heap(1, (double[]){0.2});
  ad_tensor *lam = heap(1, (double[]){0.3}), *hg = heap(1, (double[]){0});
  nn_opt_cfg sgd = {.kind = NN_OPT_SGD, .lr = 0.1};
  bl_engine *e = NULL;
  ck_assert_int_eq(bl_engine_new(&e, NULL), AD_OK);
  bl_engine_add(
      e, &(bl_level){.name = "l1", .n = 1, .params = &w1, .loss = dag_l1, .opt = &sgd, .steps = 4},
      NULL);
  bl_engine_add(
      e, &(bl_level){.name = "l2", .n = 1, .params = &w2, .loss = dag_l2, .opt = &sgd, .steps = 4},
      NULL);
  bl_engine_add(e,
                &(bl_level){.name = "u",
                            .n = 1,
                            .params = &lam,
                            .loss = dag_u,
                            .opt = &sgd,
                            .n_deps = 2,
                            .deps = {{.level = "l1"}, {.level = "l2", .method = BL_FORWARD}}},
                NULL);
  ck_assert_msg(bl_engine_build(e) == AD_OK, "%s", bl_engine_errmsg(e));
  ck_assert_int_eq(bl_engine_hypergrad(e, DU, &hg, NULL), AD_OK);
  double h = 1e-5, fd = (dag_ref(0.3 + h) - dag_ref(0.3 - h)) / (2 * h);
  fprintf(stderr, "dag: hg %.15g fd %.15g\n", ad_item(hg), fd);
  ck_assert(rel(ad_item(hg), fd) < 1e-7);
  ck_assert_int_eq(bl_engine_step(e), AD_OK);
  ck_assert_int_eq(bl_engine_level_steps(e, D1), 4);
  ck_assert_int_eq(bl_engine_level_steps(e, D2), 4);
  bl_engine_free(e);
  ad_tensor_free(w1);
  ad_tensor_free(w2);
  ad_tensor_free(lam);
  ad_tensor_free(hg);
}
END_TEST

/* ================================================================ a schedule, an nn_params set
 * One level, loss sum (w - 3)^2 over an nn_params set of two tensors, SGD
 * lr 0.1 * 1/(1 + k): w_{k+1} = w_k - 0.2 (w_k - 3) / (1 + k), by hand. */
static double inv_decay(int64_t k, void *ctx) {
  (void)ctx;
  return 1.0 / (1.0 + (double)k);
}
static ad_tensor *sched_loss(ad_tape *t, const bl_vars *v, void *ctx) {
  (void)ctx;
  ad_tensor *a = ad_add_scalar(t, v->p[0][0], -3.0), *b = ad_add_scalar(t, v->p[0][1], -3.0);
  return ad_add(t, ad_dot(t, a, a), ad_dot(t, b, b));
}

START_TEST(test_schedule_and_set) {
  nn_params *set = NULL;
  nn_param_spec sp[2] = {{"a", 1, {2}}, {"b", 0, {0}}};
  ck_assert_int_eq(nn_params_new(&set, AD_F64, 2, sp), AD_OK);
  nn_opt_cfg sgd = {.kind = NN_OPT_SGD, .lr = 0.1};
  bl_engine *e = NULL;
  ck_assert_int_eq(bl_engine_new(&e, NULL), AD_OK);
  ck_assert_int_eq(bl_engine_add(e,
                                 &(bl_level){.name = "fit",
                                             .set = set,
                                             .loss = sched_loss,
                                             .opt = &sgd,
                                             .steps = 3,
                                             .schedule = inv_decay},
                                 NULL),
                   AD_OK);
  ck_assert_msg(bl_engine_build(e) == AD_OK, "%s", bl_engine_errmsg(e));
  ck_assert_int_eq(bl_engine_run(e, 2, NULL), AD_OK);
  double w = 0;
  for (int k = 0; k < 6; k++) w -= 0.1 / (1.0 + k) * 2 * (w - 3);
  for (int i = 0; i < 3; i++)
    ck_assert_msg(rel(ad_get(nn_params_values(set), i), w) < 1e-14, "%d: %.17g vs %.17g", i,
                  ad_get(nn_params_values(set), i), w);
  ck_assert_int_eq(bl_engine_level_steps(e, 0), 6);
  bl_engine_free(e);
  nn_params_free(set);
}
END_TEST

/* Calls out of order or with NULLs: statuses and messages, no crash. */
START_TEST(test_bad_calls) {
  ck_assert_int_eq(bl_engine_new(NULL, NULL), AD_ERR_NULL);
  ck_assert_int_eq(bl_engine_add(NULL, NULL, NULL), AD_ERR_NULL);
  ck_assert_int_eq(bl_engine_build(NULL), AD_ERR_NULL);
  ck_assert_int_eq(bl_engine_step(NULL), AD_ERR_NULL);
  bl_engine_free(NULL);
  bl_engine *e = NULL;
  ck_assert_int_eq(bl_engine_new(&e, &(bl_engine_opts){.patience = -1}), AD_ERR_ARG);
  ck_assert_ptr_null(e);
  ck_assert_int_eq(bl_engine_new(&e, NULL), AD_OK);
  ck_assert_int_eq(bl_engine_step(e), AD_ERR_STATE);
  ck_assert_ptr_nonnull(strstr(bl_engine_errmsg(e), "bl_engine_build first"));
  ck_assert_int_eq(bl_engine_save(e, "/tmp/x"), AD_ERR_STATE);
  ck_assert_int_eq(bl_engine_add(e, NULL, NULL), AD_ERR_NULL);
  ck_assert_int_eq(bl_engine_build(e), AD_ERR_STATE); /* an add failed */
  bl_engine_free(e);
  ad_tensor *w = heap(1, (double[]){0.0}), *lam = heap(1, (double[]){0.5});
  nn_opt_cfg sgd = {.kind = NN_OPT_SGD, .lr = 0.1};
  ck_assert_int_eq(bl_engine_new(&e, NULL), AD_OK);
  int id = -5;
  ck_assert_int_eq(
      bl_engine_add(
          e, &(bl_level){.name = "cls", .n = 1, .params = &w, .loss = cls_loss, .opt = &sgd}, &id),
      AD_OK);
  ck_assert_int_eq(id, 0);
  ck_assert_int_eq(bl_engine_add(e,
                                 &(bl_level){.name = "hpo",
                                             .n = 1,
                                             .params = &lam,
                                             .loss = hpo_loss,
                                             .opt = &sgd,
                                             .n_deps = 1,
                                             .deps = {{.level = "cls"}}},
                                 &id),
                   AD_OK);
  ck_assert_int_eq(bl_engine_build(e), AD_OK);
  ck_assert_int_eq(bl_engine_build(e), AD_ERR_STATE);
  ck_assert_int_eq(bl_engine_add(e, &(bl_level){.name = "late"}, NULL), AD_ERR_STATE);
  ck_assert_int_eq(bl_engine_hypergrad(e, 7, &lam, NULL), AD_ERR_ARG);
  ad_tensor *wrong = heap(2, (double[]){0, 0});
  ck_assert_int_eq(bl_engine_hypergrad(e, 1, &wrong, NULL), AD_ERR_SHAPE);
  ck_assert_int_eq(bl_engine_run(e, -1, NULL), AD_ERR_ARG);
  ck_assert_int_eq(bl_engine_find(e, "hpo"), 1);
  ck_assert_int_eq(bl_engine_find(e, "none"), -1);
  ck_assert_int_eq(bl_engine_run(e, 2, NULL), AD_OK); /* still usable */
  ck_assert_str_eq(bl_engine_errmsg(e), "");
  bl_engine_free(e);
  ad_tensor_free(w);
  ad_tensor_free(lam);
  ad_tensor_free(wrong);
}
END_TEST

/* A loss that turns NaN: the step stops with AD_ERR_NUMERIC naming the
 * level, and the parameters keep their last finite values. */
static int poison;
static ad_tensor *nan_loss(ad_tape *t, const bl_vars *v, void *ctx) {
  /* cls_loss when there is a level above, else (w - 1)^2 */
  ad_tensor *L = v->p[HPO] ? cls_loss(t, v, ctx) : hpo_loss(t, v, ctx);
  /* times a NaN tensor (ad_scale refuses a NaN constant with AD_ERR_ARG) */
  return poison && L ? ad_mul(t, L, ad_scalar(t, L->dtype, NAN)) : L;
}

START_TEST(test_nan_stops) {
  ad_tensor *w = heap(1, (double[]){0.0}), *lam = heap(1, (double[]){0.5});
  nn_opt_cfg sgd = {.kind = NN_OPT_SGD, .lr = 0.1};
  for (int top = 0; top < 2; top++) {
    bl_engine *e = NULL;
    poison = 0;
    ck_assert_int_eq(bl_engine_new(&e, NULL), AD_OK);
    bl_engine_add(
        e,
        &(bl_level){.name = "cls", .n = 1, .params = &w, .loss = nan_loss, .opt = &sgd, .steps = 2},
        NULL);
    if (top)
      bl_engine_add(e,
                    &(bl_level){.name = "hpo",
                                .n = 1,
                                .params = &lam,
                                .loss = hpo_loss,
                                .opt = &sgd,
                                .n_deps = 1,
                                .deps = {{.level = "cls"}}},
                    NULL);
    ck_assert_int_eq(bl_engine_build(e), AD_OK);
    ck_assert_int_eq(bl_engine_run(e, 2, NULL), AD_OK);
    double w1 = ad_item(w), l1 = ad_item(lam);
    poison = 1;
    ck_assert_int_eq(bl_engine_step(e), AD_ERR_NUMERIC);
    fprintf(stderr, "nan: %s\n", bl_engine_errmsg(e));
    ck_assert_ptr_nonnull(strstr(bl_engine_errmsg(e), "cls"));
    ck_assert_double_eq(ad_item(w), w1);
    ck_assert_double_eq(ad_item(lam), l1);
    bl_engine_free(e);
  }
  ad_tensor_free(w);
  ad_tensor_free(lam);
}
END_TEST

int main(void) {
  Suite *s = suite_create("bl_engine");
  TCase *tc = tcase_create("engine");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, test_header_example);
  tcase_add_test(tc, test_three_level_fd);
  tcase_add_test(tc, test_three_level_methods);
  tcase_add_test(tc, test_build_errors);
  tcase_add_test(tc, test_early_stop_and_logs);
  tcase_add_test(tc, test_resume_bit_identical);
  tcase_add_test(tc, test_corrupt_state);
  tcase_add_test(tc, test_user_step_top);
  tcase_add_test(tc, test_user_step_lower);
  tcase_add_test(tc, test_dag_two_lowers);
  tcase_add_test(tc, test_schedule_and_set);
  tcase_add_test(tc, test_bad_calls);
  tcase_add_test(tc, test_nan_stops);
  suite_add_tcase(s, tc);
  return gc_run_suite(s);
}
