/* test_bl_implicit.c — the implicit hypergradient methods (exact, cg,
 * neumann, fixed_point, hoag) and the Gauss-Newton option:
 *   - ridge regression, whose w*(lam) and hypergradient are closed forms;
 *   - a tiny tanh MLP trained to a tight minimum, where every method is
 *     compared with bl_exact and bl_exact with finite differences of
 *     L_val(w*(lam));
 *   - the Gauss-Newton product against a hand-built J^T H_out J + H_R;
 *   - errors on bad input, and the tape left as found.
 * Each assertion states its bound beside it. */
#include "bilevel/implicit_internal.h"
#include "bl_fixtures.h"
#include "gradcheck.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>

/* ---------------------------------------------------------------- ridge */

typedef struct {
  fx_ridge rp;
  ad_tensor *w0[1], *lam[1], *hg[1];
  double lam_v[FX_MAXD], wstar[FX_MAXD], exact[FX_MAXD];
  bl_problem p;
} ridge_case;

/* The Gauss-Newton split of fx_ridge_train: f = X w, l = ||f - y||^2/(2n),
 * R = 1/2 sum_j lam_j w_j^2. */
static ad_tensor *ridge_out(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                            void *ctx) {
  (void)lam, (void)step;
  const fx_ridge *rp = ctx;
  ad_tensor *X = ad_const(t, AD_F64, 2, (int64_t[]){rp->n, rp->d}, rp->X);
  return ad_matmul(t, X, w[0], 0, 0);
}
static ad_tensor *ridge_out_loss(ad_tape *t, ad_tensor *f, ad_tensor *const *lam, int64_t step,
                                 void *ctx) {
  (void)lam, (void)step;
  const fx_ridge *rp = ctx;
  ad_tensor *y = ad_const(t, AD_F64, 2, (int64_t[]){rp->n, 1}, rp->y);
  ad_tensor *res = ad_sub(t, f, y);
  return ad_scale(t, ad_dot(t, res, res), 0.5 / rp->n);
}
static ad_tensor *ridge_reg(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                            void *ctx) {
  (void)step, (void)ctx;
  return ad_scale(t, ad_sum(t, ad_mul(t, lam[0], ad_mul(t, w[0], w[0]))), 0.5);
}
/* A wrong split (R missing its factor 1/2) the methods must refuse. */
static ad_tensor *ridge_reg_wrong(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam,
                                  int64_t step, void *ctx) {
  (void)step, (void)ctx;
  return ad_sum(t, ad_mul(t, lam[0], ad_mul(t, w[0], w[0])));
}

/* lam_j in [0.1, 0.5]. at_opt: w0 = w*(lam) and T = 0 (the solvers alone
 * are tested); else w0 = 0 and T inner GD steps (lr 0.5). */
static void ridge_setup(ridge_case *c, int at_opt, int64_t T) {
  memset(c, 0, sizeof *c);
  fx_ridge_make(&c->rp, 40, 30, 5, 11);
  int d = c->rp.d;
  for (int j = 0; j < d; j++) c->lam_v[j] = 0.1 + 0.1 * j;
  fx_ridge_exact(&c->rp, c->lam_v, c->wstar, c->exact);
  c->w0[0] = fx_new(AD_F64, 2, (int64_t[]){d, 1});
  c->lam[0] = fx_new(AD_F64, 2, (int64_t[]){d, 1});
  c->hg[0] = fx_new(AD_F64, 2, (int64_t[]){d, 1});
  for (int j = 0; j < d; j++) {
    ad_set(c->lam[0], j, c->lam_v[j]);
    ad_set(c->w0[0], j, at_opt ? c->wstar[j] : 0.0);
  }
  c->p = (bl_problem){.n_w = 1,
                      .w0 = c->w0,
                      .n_lam = 1,
                      .lam = c->lam,
                      .train_loss = fx_ridge_train,
                      .val_loss = fx_ridge_val,
                      .ctx = &c->rp,
                      .opt = {.kind = NN_OPT_SGD, .lr = 0.5},
                      .inner_steps = at_opt ? 0 : T,
                      .train_output = ridge_out,
                      .train_out_loss = ridge_out_loss,
                      .train_reg = ridge_reg};
}

static void ridge_free(ridge_case *c) {
  ad_tensor_free(c->w0[0]);
  ad_tensor_free(c->lam[0]);
  ad_tensor_free(c->hg[0]);
}

/* Relative error of the method's hypergradient against the closed form. */
static double ridge_err(ridge_case *c, ad_tape *t, bl_method_fn f, const bl_opts *o, bl_stats *st) {
  ad_status s = f(t, &c->p, o, c->hg, st);
  ck_assert_msg(s == AD_OK, "%s", ad_tape_errmsg(t));
  double got[FX_MAXD];
  for (int j = 0; j < c->rp.d; j++) got[j] = ad_get(c->hg[0], j);
  return fx_rel(c->rp.d, got, c->exact);
}

START_TEST(test_ridge_exact) {
  ridge_case c;
  ad_tape *t = fx_tape(16);
  bl_stats st;
  /* At w* (T = 0): only the dense solve's rounding. Bound 1e-8. */
  ridge_setup(&c, 1, 0);
  double e = ridge_err(&c, t, bl_exact, NULL, &st);
  printf("ridge exact at w*: rel err %.2e (bound 1e-8), residual %.1e, %lld hvps\n", e, st.residual,
         (long long)st.hvps);
  ck_assert(e <= 1e-8);
  ck_assert_int_eq(st.hvps, 5 + 1); /* one product per column + the mixed partial */
  ridge_free(&c);
  /* From w0 = 0 through 300 GD steps (contraction <= 0.75 per step, so w_T
   * = w* to rounding). Bound 1e-8. */
  ridge_setup(&c, 0, 300);
  e = ridge_err(&c, t, bl_exact, NULL, &st);
  printf("ridge exact after T=300: rel err %.2e (bound 1e-8)\n", e);
  ck_assert(e <= 1e-8);
  ck_assert_int_eq(st.inner_steps, 300);
  ridge_free(&c);
  ad_tape_free(t);
}
END_TEST

START_TEST(test_ridge_cg) {
  ridge_case c;
  ad_tape *t = fx_tape(16);
  bl_stats st;
  ridge_setup(&c, 1, 0);
  /* K = dim(w) = 5: CG is exact in exact arithmetic. Bound 1e-6. */
  double e = ridge_err(&c, t, bl_cg, &(bl_opts){.K = 5, .tol = 1e-300}, &st);
  printf("ridge cg K=5: rel err %.2e (bound 1e-6), residual %.1e\n", e, st.residual);
  ck_assert(e <= 1e-6);
  ck_assert_int_le(st.iterations, 5);
  /* A few iterations are not enough: the error is real, not luck. */
  double e2 = ridge_err(&c, t, bl_cg, &(bl_opts){.K = 2}, &st);
  printf("ridge cg K=2: rel err %.2e (expected > 1e-6)\n", e2);
  ck_assert(e2 > 1e-6);
  /* hoag without a state is cg. Bound 1e-6. */
  e = ridge_err(&c, t, bl_hoag, &(bl_opts){.K = 5, .tol = 1e-300}, &st);
  ck_assert(e <= 1e-6);
  ridge_free(&c);
  ad_tape_free(t);
}
END_TEST

START_TEST(test_ridge_neumann_fixed_point) {
  ridge_case c;
  ad_tape *t = fx_tape(16);
  bl_stats st;
  ridge_setup(&c, 1, 0);
  bl_method_fn fs[2] = {bl_neumann, bl_fixed_point};
  const char *names[2] = {"neumann", "fixed_point"};
  for (int m = 0; m < 2; m++) {
    double prev = INFINITY;
    const int64_t Ks[4] = {2, 5, 10, 20};
    for (int k = 0; k < 4; k++) {
      /* alpha defaults to the inner lr 0.5 < 2/lambda_max. tol 0: all K. */
      double e = ridge_err(&c, t, fs[m], &(bl_opts){.K = Ks[k], .tol = 1e-300}, &st);
      printf("ridge %s K=%lld: rel err %.2e\n", names[m], (long long)Ks[k], e);
      ck_assert_msg(e < prev, "%s: error did not decrease with K", names[m]); /* strictly */
      ck_assert_int_eq(st.hvps, Ks[k] + 1);
      prev = e;
    }
    double e = ridge_err(&c, t, fs[m], &(bl_opts){.K = 500, .tol = 1e-300}, &st);
    printf("ridge %s K=500: rel err %.2e (bound 1e-3)\n", names[m], e);
    ck_assert(e <= 1e-3);
  }
  /* The two are the same iterate from v = 0 (K products each): agree to
   * rounding. Bound 1e-12. */
  double a[FX_MAXD], b[FX_MAXD];
  ck_assert_int_eq(bl_neumann(t, &c.p, &(bl_opts){.K = 7}, c.hg, NULL), AD_OK);
  for (int j = 0; j < c.rp.d; j++) a[j] = ad_get(c.hg[0], j);
  ck_assert_int_eq(bl_fixed_point(t, &c.p, &(bl_opts){.K = 7, .tol = 1e-300}, c.hg, &st), AD_OK);
  for (int j = 0; j < c.rp.d; j++) b[j] = ad_get(c.hg[0], j);
  ck_assert(fx_rel(c.rp.d, a, b) <= 1e-12);
  /* fixed_point stops at its tolerance and says how far it got */
  ck_assert_int_eq(bl_fixed_point(t, &c.p, &(bl_opts){.K = 1000, .tol = 1e-6}, c.hg, &st), AD_OK);
  ck_assert_int_lt(st.iterations, 1000);
  ck_assert(st.residual > 0 && st.residual <= 1e-6 * 10); /* ||r|| <= tol ||b||, ||b|| < 10 */
  ridge_free(&c);
  ad_tape_free(t);
}
END_TEST

START_TEST(test_ridge_f32) {
  /* The same ridge problem in f32 (w0 = w* rounded to f32, T = 0): exact,
   * cg (K = dim) and neumann (K = 200) against the f64 closed form. Bound
   * 1e-4: f32 rounding (~6e-8) times the condition number (< 10) times the
   * products' depth, with room. */
  ridge_case c;
  ridge_setup(&c, 1, 0);
  ad_tensor *w0 = fx_new(AD_F32, 2, (int64_t[]){c.rp.d, 1});
  ad_tensor *lam = fx_new(AD_F32, 2, (int64_t[]){c.rp.d, 1});
  ad_tensor *hg = fx_new(AD_F32, 2, (int64_t[]){c.rp.d, 1});
  ad_copy_values(w0, c.w0[0]);
  ad_copy_values(lam, c.lam[0]);
  bl_problem p = c.p;
  p.w0 = &w0;
  p.lam = &lam;
  ad_tape *t = fx_tape(16);
  struct {
    const char *name;
    bl_method_fn f;
    bl_opts o;
  } ms[] = {{"exact", bl_exact, {0}},
            {"cg", bl_cg, {.K = 5, .tol = 1e-300}},
            {"neumann", bl_neumann, {.K = 200}}};
  for (int i = 0; i < 3; i++) {
    ck_assert_msg(ms[i].f(t, &p, &ms[i].o, &hg, NULL) == AD_OK, "%s", ad_tape_errmsg(t));
    double got[FX_MAXD];
    for (int j = 0; j < c.rp.d; j++) got[j] = ad_get(hg, j);
    double e = fx_rel(c.rp.d, got, c.exact);
    printf("ridge f32 %-8s rel err %.2e (bound 1e-4)\n", ms[i].name, e);
    ck_assert(e <= 1e-4);
  }
  ad_tensor_free(w0);
  ad_tensor_free(lam);
  ad_tensor_free(hg);
  ridge_free(&c);
  ad_tape_free(t);
}
END_TEST

START_TEST(test_ridge_gauss_newton) {
  /* Least squares in a model linear in w: G = J^T H_l J + H_R = H exactly,
   * so the GN hypergradient is the exact one. Bound 1e-8 vs the closed form
   * and 1e-10 between the GN and Hessian dense solves. */
  ridge_case c;
  ad_tape *t = fx_tape(16);
  bl_stats st;
  ridge_setup(&c, 1, 0);
  double e_gn = ridge_err(&c, t, bl_exact, &(bl_opts){.gauss_newton = 1}, &st);
  double gn[FX_MAXD], h[FX_MAXD];
  for (int j = 0; j < c.rp.d; j++) gn[j] = ad_get(c.hg[0], j);
  ridge_err(&c, t, bl_exact, NULL, &st);
  for (int j = 0; j < c.rp.d; j++) h[j] = ad_get(c.hg[0], j);
  double e_cg = ridge_err(&c, t, bl_cg, &(bl_opts){.gauss_newton = 1, .K = 5}, &st);
  printf("ridge GN: exact %.2e, cg %.2e (bound 1e-8), GN vs H %.2e (bound 1e-10)\n", e_gn, e_cg,
         fx_rel(c.rp.d, gn, h));
  ck_assert(e_gn <= 1e-8);
  ck_assert(e_cg <= 1e-8);
  ck_assert(fx_rel(c.rp.d, gn, h) <= 1e-10);
  /* A split that does not add up to L_train is refused. */
  c.p.train_reg = ridge_reg_wrong;
  ck_assert_int_eq(bl_cg(t, &c.p, &(bl_opts){.gauss_newton = 1}, c.hg, &st), AD_ERR_ARG);
  ck_assert(strstr(ad_tape_errmsg(t), "split") != NULL);
  ad_tape_clear_error(t);
  /* ... and so is gauss_newton without the split */
  c.p.train_output = NULL;
  ck_assert_int_eq(bl_exact(t, &c.p, &(bl_opts){.gauss_newton = 1}, c.hg, &st), AD_ERR_NULL);
  ad_tape_clear_error(t);
  ridge_free(&c);
  ad_tape_free(t);
}
END_TEST

/* A larger, ill-conditioned ridge problem for HOAG (d = 40: CG needs tens
 * of iterations, so a warm start has something to save). Column j of X is
 * scaled by 10^(-1.5 j/d); lam_j starts at 1e-2. */
enum { BD = 40, BN = 80, BM = 60 };
typedef struct {
  double X[BN * BD], y[BN], Xv[BM * BD], yv[BM];
} big_ridge;

static ad_tensor *big_train(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                            void *ctx) {
  (void)step;
  big_ridge *b = ctx;
  ad_tensor *X = ad_const(t, AD_F64, 2, (int64_t[]){BN, BD}, b->X);
  ad_tensor *y = ad_const(t, AD_F64, 2, (int64_t[]){BN, 1}, b->y);
  ad_tensor *r = ad_sub(t, ad_matmul(t, X, w[0], 0, 0), y);
  return ad_add(t, ad_scale(t, ad_dot(t, r, r), 0.5 / BN),
                ad_scale(t, ad_sum(t, ad_mul(t, lam[0], ad_mul(t, w[0], w[0]))), 0.5));
}
static ad_tensor *big_val(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                          void *ctx) {
  (void)step, (void)lam;
  big_ridge *b = ctx;
  ad_tensor *X = ad_const(t, AD_F64, 2, (int64_t[]){BM, BD}, b->Xv);
  ad_tensor *y = ad_const(t, AD_F64, 2, (int64_t[]){BM, 1}, b->yv);
  ad_tensor *r = ad_sub(t, ad_matmul(t, X, w[0], 0, 0), y);
  return ad_scale(t, ad_dot(t, r, r), 0.5 / BM);
}

/* Cholesky solve of the SPD system A x = c (d x d), A overwritten. */
static void chol_solve(int d, double *A, const double *c, double *x) {
  for (int j = 0; j < d; j++) {
    for (int k = 0; k < j; k++) A[j * d + j] -= A[j * d + k] * A[j * d + k];
    A[j * d + j] = sqrt(A[j * d + j]);
    for (int i = j + 1; i < d; i++) {
      for (int k = 0; k < j; k++) A[i * d + j] -= A[i * d + k] * A[j * d + k];
      A[i * d + j] /= A[j * d + j];
    }
  }
  for (int i = 0; i < d; i++) {
    x[i] = c[i];
    for (int k = 0; k < i; k++) x[i] -= A[i * d + k] * x[k];
    x[i] /= A[i * d + i];
  }
  for (int i = d - 1; i >= 0; i--) {
    for (int k = i + 1; k < d; k++) x[i] -= A[k * d + i] * x[k];
    x[i] /= A[i * d + i];
  }
}

/* w*(lam) and the closed-form hypergradient of the big problem. */
static void big_exact(const big_ridge *b, const double *lam, double *ws, double *hg) {
  static double A[BD * BD], A2[BD * BD];
  double c[BD] = {0}, gv[BD] = {0}, z[BD];
  memset(A, 0, sizeof A);
  for (int i = 0; i < BN; i++)
    for (int j = 0; j < BD; j++) {
      c[j] += b->X[i * BD + j] * b->y[i] / BN;
      for (int k = 0; k < BD; k++) A[j * BD + k] += b->X[i * BD + j] * b->X[i * BD + k] / BN;
    }
  for (int j = 0; j < BD; j++) A[j * BD + j] += lam[j];
  memcpy(A2, A, sizeof A);
  chol_solve(BD, A, c, ws);
  for (int i = 0; i < BM; i++) {
    double r = -b->yv[i];
    for (int j = 0; j < BD; j++) r += b->Xv[i * BD + j] * ws[j];
    for (int j = 0; j < BD; j++) gv[j] += b->Xv[i * BD + j] * r / BM;
  }
  chol_solve(BD, A2, gv, z);
  for (int j = 0; j < BD; j++) hg[j] = -z[j] * ws[j];
}

START_TEST(test_hoag_warm_start) {
  /* Outer gradient descent on lam (kept >= 1e-4) with the HOAG
   * hypergradient, the same tolerance schedule (1e-1 halving to 1e-10)
   * warm-started and cold. The test solves the inner problem itself (w0 =
   * w*(lam), T = 0) so that only the linear solves differ. (The two runs
   * take slightly different paths: early hypergradients are solved
   * loosely.) Asserted: the validation loss falls in both, the warm run
   * uses fewer products, and the last hypergradient (at tol <= 3e-9)
   * matches the closed form (bound 1e-6). */
  static big_ridge b;
  ad_rng g;
  ad_rng_seed(&g, 17);
  double wt[BD];
  for (int j = 0; j < BD; j++) wt[j] = ad_rng_normal(&g);
  for (int i = 0; i < BN + BM; i++) {
    double *x = i < BN ? b.X + i * BD : b.Xv + (i - BN) * BD, s = 0;
    for (int j = 0; j < BD; j++) s += (x[j] = ad_rng_normal(&g) * pow(10, -1.5 * j / BD)) * wt[j];
    *(i < BN ? &b.y[i] : &b.yv[i - BN]) = s + 0.3 * ad_rng_normal(&g);
  }
  ad_tensor *w0[1] = {fx_new(AD_F64, 2, (int64_t[]){BD, 1})};
  ad_tensor *lam[1] = {fx_new(AD_F64, 2, (int64_t[]){BD, 1})};
  ad_tensor *hg[1] = {fx_new(AD_F64, 2, (int64_t[]){BD, 1})};
  bl_problem p = {.n_w = 1,
                  .w0 = w0,
                  .n_lam = 1,
                  .lam = lam,
                  .train_loss = big_train,
                  .val_loss = big_val,
                  .ctx = &b,
                  .inner_steps = 0};
  ad_tape *t = fx_tape(16);
  bl_stats st;
  int64_t hvps[2] = {0, 0};
  double loss0 = 0, loss1[2], final_err[2];
  enum { OUTER = 25 };
  for (int warm = 0; warm < 2; warm++) {
    double lv[BD], ws[BD], ex[BD], got[BD];
    for (int j = 0; j < BD; j++) lv[j] = 1e-2;
    bl_hoag_state hs = {.tol0 = 1e-1, .decay = 0.5, .tol_min = 1e-10};
    bl_opts o = {.hoag = &hs, .warm_start = warm, .K = 500};
    for (int it = 0; it <= OUTER; it++) {
      big_exact(&b, lv, ws, ex);
      for (int j = 0; j < BD; j++) {
        ad_set(lam[0], j, lv[j]);
        ad_set(w0[0], j, ws[j]);
      }
      ck_assert_int_eq(bl_hoag(t, &p, &o, hg, &st), AD_OK);
      if (it == 0) loss0 = st.val_loss;
      if (it == OUTER) break;
      hvps[warm] += st.hvps;
      for (int j = 0; j < BD; j++) lv[j] = fmax(lv[j] - 0.005 * ad_get(hg[0], j), 1e-4);
    }
    loss1[warm] = st.val_loss;
    for (int j = 0; j < BD; j++) got[j] = ad_get(hg[0], j);
    final_err[warm] = fx_rel(BD, got, ex);
    ck_assert_int_eq(hs.calls, OUTER + 1);
    bl_hoag_state_free(&hs);
  }
  printf("hoag: val loss %.6f -> %.6f (cold) / %.6f (warm); products over %d outer steps: "
         "cold %lld, warm %lld; final rel err %.1e / %.1e (bound 1e-6)\n",
         loss0, loss1[0], loss1[1], OUTER, (long long)hvps[0], (long long)hvps[1], final_err[0],
         final_err[1]);
  ck_assert(loss1[0] < 0.7 * loss0 && loss1[1] < 0.7 * loss0);
  ck_assert_int_lt(hvps[1], hvps[0]);
  ck_assert(final_err[0] <= 1e-6 && final_err[1] <= 1e-6);
  ad_tensor_free(w0[0]);
  ad_tensor_free(lam[0]);
  ad_tensor_free(hg[0]);
  ad_tape_free(t);
}
END_TEST

/* ---------------------------------------------------------------- tiny MLP */
/* f(x) = tanh(x W1 + b1) W2 + b2, 2-6-1, f64; L_train = mse on 24 points,
 * the decay lam_k (one scalar per tensor) applied by the inner optimizer
 * (opt.weight_decay_vars) so the methods must add it themselves;
 * L_val = mse on 16 other points. */
enum { TM_N = 24, TM_V = 16, TM_I = 2, TM_H = 6 };
typedef struct {
  double X[TM_N * TM_I], y[TM_N], Xv[TM_V * TM_I], yv[TM_V];
  ad_tensor *w0[4], *lam[4], *hg[4];
  bl_problem p;
} mlp_case;

static ad_tensor *mlp_f(ad_tape *t, ad_tensor *const *w, const double *X, int n) {
  ad_tensor *x = ad_const(t, AD_F64, 2, (int64_t[]){n, TM_I}, X);
  ad_tensor *h = ad_tanh(t, ad_add_rowvec(t, ad_matmul(t, x, w[0], 0, 0), w[1]));
  return ad_add_rowvec(t, ad_matmul(t, h, w[2], 0, 0), w[3]);
}
static ad_tensor *mlp_out(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                          void *ctx) {
  (void)lam, (void)step;
  return mlp_f(t, w, ((mlp_case *)ctx)->X, TM_N);
}
static ad_tensor *mlp_out_loss(ad_tape *t, ad_tensor *f, ad_tensor *const *lam, int64_t step,
                               void *ctx) {
  (void)lam, (void)step;
  ad_tensor *y = ad_const(t, AD_F64, 2, (int64_t[]){TM_N, 1}, ((mlp_case *)ctx)->y);
  return ad_mse(t, f, y);
}
static ad_tensor *mlp_train(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                            void *ctx) {
  return mlp_out_loss(t, mlp_out(t, w, lam, step, ctx), lam, step, ctx);
}
static ad_tensor *mlp_val(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                          void *ctx) {
  (void)lam, (void)step;
  mlp_case *c = ctx;
  ad_tensor *y = ad_const(t, AD_F64, 2, (int64_t[]){TM_V, 1}, c->yv);
  return ad_mse(t, mlp_f(t, w, c->Xv, TM_V), y);
}

static void mlp_setup(mlp_case *c, const double *lam) {
  memset(c, 0, sizeof *c);
  ad_rng g;
  ad_rng_seed(&g, 5);
  for (int i = 0; i < TM_N; i++) {
    for (int j = 0; j < TM_I; j++) c->X[i * TM_I + j] = 2 * ad_rng_uniform(&g) - 1;
    c->y[i] = sin(2 * c->X[i * TM_I]) + 0.5 * c->X[i * TM_I + 1] + 0.1 * ad_rng_normal(&g);
  }
  for (int i = 0; i < TM_V; i++) {
    for (int j = 0; j < TM_I; j++) c->Xv[i * TM_I + j] = 2 * ad_rng_uniform(&g) - 1;
    c->yv[i] = sin(2 * c->Xv[i * TM_I]) + 0.5 * c->Xv[i * TM_I + 1] + 0.1 * ad_rng_normal(&g);
  }
  const int nd[4] = {2, 1, 2, 1};
  const int64_t sh[4][2] = {{TM_I, TM_H}, {TM_H}, {TM_H, 1}, {1}};
  for (int k = 0; k < 4; k++) {
    c->w0[k] = fx_new(AD_F64, nd[k], sh[k]);
    ad_tensor_fill_normal(c->w0[k], &g, 0, 0.5);
    c->lam[k] = fx_new(AD_F64, 0, NULL);
    ad_set(c->lam[k], 0, lam[k]);
    c->hg[k] = fx_new(AD_F64, 0, NULL);
  }
  c->p = (bl_problem){.n_w = 4,
                      .w0 = c->w0,
                      .n_lam = 4,
                      .lam = c->lam,
                      .train_loss = mlp_train,
                      .val_loss = mlp_val,
                      .ctx = c,
                      .opt = {.kind = NN_OPT_SGD, .lr = 0.25, .weight_decay_vars = c->lam},
                      .inner_steps = 0,
                      .train_output = mlp_out,
                      .train_out_loss = mlp_out_loss};
}

static void mlp_free(mlp_case *c) {
  for (int k = 0; k < 4; k++) {
    ad_tensor_free(c->w0[k]);
    ad_tensor_free(c->lam[k]);
    ad_tensor_free(c->hg[k]);
  }
}

/* Gradient descent on L_eff = mse + sum_k lam_k/2 ||w_k||^2 from c->w0 in
 * place (the test's own loop, independent of the library's), until
 * ||grad|| <= 1e-12 or `steps` steps; returns the final gradient norm. */
static double mlp_converge(mlp_case *c, ad_tape *t, int steps) {
  double gn = INFINITY;
  for (int k = 0; k < 4; k++) ad_requires_grad(c->w0[k], 1);
  for (int it = 0; it < steps && gn > 1e-12; it++) {
    ad_marker m = ad_mark(t);
    ad_tensor *L = mlp_train(t, c->w0, c->lam, 0, c), *g[4];
    ad_status st = ad_grad(t, 1, &L, NULL, 4, c->w0, g, 0);
    ck_assert_msg(st == AD_OK, "%s", ad_tape_errmsg(t));
    double s = 0;
    for (int k = 0; k < 4; k++) {
      double lk = ad_item(c->lam[k]);
      for (int64_t j = 0; j < c->w0[k]->size; j++) {
        double gj = ad_get(g[k], j) + lk * ad_get(c->w0[k], j);
        s += gj * gj;
        ad_set(c->w0[k], j, ad_get(c->w0[k], j) - 0.25 * gj);
      }
    }
    gn = sqrt(s);
    ad_rewind(t, m);
  }
  for (int k = 0; k < 4; k++) ad_requires_grad(c->w0[k], 0);
  return gn;
}

static const double MLP_LAM[4] = {0.2, 0.1, 0.2, 0.05};

START_TEST(test_mlp_exact_vs_finite_differences) {
  /* At a tight minimum (||grad L_eff|| <= 1e-10), bl_exact's hypergradient
   * equals central differences of lam_k -> L_val(w*(lam)), each w* found by
   * the test's own descent. Bound 1e-5 relative (difference error ~eps^2
   * plus the inner solves' ~1e-12/eps). */
  mlp_case c;
  ad_tape *t = fx_tape(16);
  mlp_setup(&c, MLP_LAM);
  double gn = mlp_converge(&c, t, 20000);
  printf("mlp: ||grad L_eff(w*)|| = %.1e (needs <= 1e-10)\n", gn);
  ck_assert(gn <= 1e-10);
  bl_stats st;
  ck_assert_int_eq(bl_exact(t, &c.p, NULL, c.hg, &st), AD_OK);
  double ex[4], fd[4], eps = 1e-4;
  for (int k = 0; k < 4; k++) ex[k] = ad_item(c.hg[k]);
  for (int k = 0; k < 4; k++) {
    double lv[2];
    for (int sgn = 0; sgn < 2; sgn++) {
      double lam[4];
      memcpy(lam, MLP_LAM, sizeof lam);
      lam[k] += sgn ? -eps : eps;
      mlp_case d;
      mlp_setup(&d, lam);
      for (int i = 0; i < 4; i++) ad_copy_values(d.w0[i], c.w0[i]); /* start near w* */
      ck_assert(mlp_converge(&d, t, 20000) <= 1e-11);
      ad_marker m = ad_mark(t);
      lv[sgn] = ad_item(mlp_val(t, d.w0, d.lam, -1, &d));
      ad_rewind(t, m);
      mlp_free(&d);
    }
    fd[k] = (lv[0] - lv[1]) / (2 * eps);
  }
  double e = fx_rel(4, ex, fd);
  printf("mlp exact vs finite differences: rel err %.2e (bound 1e-5); hg = [%.6g %.6g %.6g "
         "%.6g]\n",
         e, ex[0], ex[1], ex[2], ex[3]);
  ck_assert(e <= 1e-5);
  mlp_free(&c);
  ad_tape_free(t);
}
END_TEST

START_TEST(test_mlp_methods_vs_exact) {
  /* Same converged w*. Bounds: cg with K = dim = 25 within 1e-6; neumann
   * and fixed_point with K = 2000 terms (alpha = the inner lr) within 1e-3;
   * hoag at tol 1e-12 within 1e-6. */
  mlp_case c;
  ad_tape *t = fx_tape(16);
  mlp_setup(&c, MLP_LAM);
  ck_assert(mlp_converge(&c, t, 20000) <= 1e-10);
  bl_stats st;
  ck_assert_int_eq(bl_exact(t, &c.p, NULL, c.hg, &st), AD_OK);
  ad_tensor *ex[4];
  for (int k = 0; k < 4; k++) {
    ex[k] = fx_new(AD_F64, 0, NULL);
    ad_copy_values(ex[k], c.hg[k]);
  }
  printf("mlp exact: residual %.1e, %lld products\n", st.residual, (long long)st.hvps);
  struct {
    const char *name;
    bl_method_fn f;
    bl_opts o;
    double bound;
  } cases[] = {
      {"cg", bl_cg, {.K = 25, .tol = 1e-300}, 1e-6},
      {"hoag", bl_hoag, {.K = 100, .tol = 1e-12}, 1e-6},
      {"neumann", bl_neumann, {.K = 2000}, 1e-3},
      {"fixed_point", bl_fixed_point, {.K = 2000, .tol = 1e-300}, 1e-3},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    ck_assert_int_eq(cases[i].f(t, &c.p, &cases[i].o, c.hg, &st), AD_OK);
    double e = fx_rel_t(4, c.hg, ex);
    printf("mlp %-12s rel err vs exact %.2e (bound %.0e), %lld products\n", cases[i].name, e,
           cases[i].bound, (long long)st.hvps);
    ck_assert(e <= cases[i].bound);
  }
  /* Gauss-Newton with the decay applied by the optimizer (the methods add
   * it to G themselves, there is no train_reg): cg with K = dim agrees with
   * the dense GN solve. Bound 1e-6. */
  ck_assert_int_eq(bl_exact(t, &c.p, &(bl_opts){.gauss_newton = 1}, c.hg, &st), AD_OK);
  for (int k = 0; k < 4; k++) ad_copy_values(ex[k], c.hg[k]);
  ck_assert_int_eq(bl_cg(t, &c.p, &(bl_opts){.gauss_newton = 1, .K = 25, .tol = 1e-300}, c.hg, &st),
                   AD_OK);
  double egn = fx_rel_t(4, c.hg, ex);
  printf("mlp gauss-newton cg vs dense GN: rel err %.2e (bound 1e-6)\n", egn);
  ck_assert(egn <= 1e-6);
  for (int k = 0; k < 4; k++) ad_tensor_free(ex[k]);
  mlp_free(&c);
  ad_tape_free(t);
}
END_TEST

/* ---------------------------------------------------------------- Gauss-Newton on a nonlinear
 * model */
/* 3-class classifier 2-4-3 (tanh), cross-entropy l, R = sum_k lam_k/2 ||w_k||^2. */
enum { GN_N = 8, GN_C = 3, GN_H = 4 };
typedef struct {
  double X[GN_N * TM_I];
  int32_t labels[GN_N];
} gn_data;

static ad_tensor *gn_out(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                         void *ctx) {
  (void)lam, (void)step;
  gn_data *d = ctx;
  ad_tensor *x = ad_const(t, AD_F64, 2, (int64_t[]){GN_N, TM_I}, d->X);
  ad_tensor *h = ad_tanh(t, ad_add_rowvec(t, ad_matmul(t, x, w[0], 0, 0), w[1]));
  return ad_add_rowvec(t, ad_matmul(t, h, w[2], 0, 0), w[3]);
}
static ad_tensor *gn_out_loss(ad_tape *t, ad_tensor *f, ad_tensor *const *lam, int64_t step,
                              void *ctx) {
  (void)lam, (void)step;
  return ad_cross_entropy(t, f, ((gn_data *)ctx)->labels, GN_N);
}
static ad_tensor *gn_reg(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                         void *ctx) {
  (void)step, (void)ctx;
  ad_tensor *s = NULL;
  for (int k = 0; k < 4; k++) {
    ad_tensor *q = ad_scale(t, ad_mul(t, lam[k], ad_dot(t, w[k], w[k])), 0.5);
    s = s ? ad_add(t, s, q) : q;
  }
  return s;
}
static ad_tensor *gn_train(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                           void *ctx) {
  return ad_add(t, gn_out_loss(t, gn_out(t, w, lam, step, ctx), lam, step, ctx),
                gn_reg(t, w, lam, step, ctx));
}

START_TEST(test_gauss_newton_product) {
  /* bl_curvature_product with gauss_newton equals J^T H_l J v + H_R v built
   * by hand: J row by row (one seeded reverse sweep per output), H_l column
   * by column (HVPs of l at the outputs), H_R v by an HVP of R. Bound 1e-12
   * relative. And on this nonlinear model it is not the Hessian product
   * (relative difference > 1e-3). */
  gn_data d;
  ad_rng g;
  ad_rng_seed(&g, 3);
  for (int i = 0; i < GN_N * TM_I; i++) d.X[i] = ad_rng_normal(&g);
  for (int i = 0; i < GN_N; i++) d.labels[i] = (int32_t)ad_rng_below(&g, GN_C);
  const int nd[4] = {2, 1, 2, 1};
  const int64_t sh[4][2] = {{TM_I, GN_H}, {GN_H}, {GN_H, GN_C}, {GN_C}};
  ad_tensor *w[4], *v[4], *gv[4], *hv[4], *lam[4];
  int64_t P = 0;
  for (int k = 0; k < 4; k++) {
    w[k] = fx_new(AD_F64, nd[k], sh[k]);
    v[k] = fx_new(AD_F64, nd[k], sh[k]);
    gv[k] = fx_new(AD_F64, nd[k], sh[k]);
    hv[k] = fx_new(AD_F64, nd[k], sh[k]);
    ad_tensor_fill_normal(w[k], &g, 0, 1.0);
    ad_tensor_fill_normal(v[k], &g, 0, 1.0);
    lam[k] = fx_new(AD_F64, 0, NULL);
    ad_set(lam[k], 0, 0.1 * (k + 1));
    P += w[k]->size;
  }
  bl_problem p = {.n_w = 4,
                  .w0 = w,
                  .n_lam = 4,
                  .lam = lam,
                  .train_loss = gn_train,
                  .val_loss = gn_train,
                  .ctx = &d,
                  .train_output = gn_out,
                  .train_out_loss = gn_out_loss,
                  .train_reg = gn_reg};
  ad_tape *t = fx_tape(16);
  ad_arena_stats a0, a1;
  ad_arena_stats_get(t, &a0);
  ck_assert_int_eq(bl_curvature_product(t, &p, &(bl_opts){.gauss_newton = 1}, w, v, gv), AD_OK);
  ck_assert_int_eq(bl_curvature_product(t, &p, NULL, w, v, hv), AD_OK);
  ad_arena_stats_get(t, &a1);
  ck_assert(a1.used == a0.used && a1.n_nodes == a0.n_nodes);

  /* by hand */
  enum { NO = GN_N * GN_C };
  double *J = calloc((size_t)(NO * P), sizeof *J), Hl[NO * NO], jv[NO], hjv[NO];
  ad_tensor *wl[4];
  for (int k = 0; k < 4; k++) {
    wl[k] = ad_detach(t, w[k]);
    ad_requires_grad(wl[k], 1);
  }
  ad_tensor *f = gn_out(t, wl, lam, 0, &d);
  for (int o = 0; o < NO; o++) {
    ad_marker m = ad_mark(t);
    ad_tensor *e = ad_zeros_like(t, f), *row[4];
    ad_set(e, o, 1.0);
    ck_assert_int_eq(ad_grad(t, 1, &f, &e, 4, wl, row, 0), AD_OK);
    int64_t c = 0;
    for (int k = 0; k < 4; k++)
      for (int64_t j = 0; j < row[k]->size; j++) J[o * P + c++] = ad_get(row[k], j);
    ad_rewind(t, m);
  }
  ad_tensor *fl = ad_detach(t, f);
  ad_requires_grad(fl, 1);
  ad_tensor *l = gn_out_loss(t, fl, lam, 0, &d);
  for (int o = 0; o < NO; o++) {
    ad_marker m = ad_mark(t);
    ad_tensor *e = ad_zeros_like(t, fl), *col;
    ad_set(e, o, 1.0);
    ck_assert_int_eq(ad_hvp(t, l, 1, &fl, &e, &col, 0), AD_OK);
    for (int i = 0; i < NO; i++) Hl[i * NO + o] = ad_get(col, i);
    ad_rewind(t, m);
  }
  ad_tensor *R = gn_reg(t, wl, lam, 0, &d), *hr[4];
  ck_assert_int_eq(ad_hvp(t, R, 4, wl, v, hr, 0), AD_OK);
  double vf[64], want[64], got[64], hess[64];
  int64_t c = 0;
  for (int k = 0; k < 4; k++)
    for (int64_t j = 0; j < v[k]->size; j++) {
      vf[c] = ad_get(v[k], j);
      want[c] = ad_get(hr[k], j);
      got[c] = ad_get(gv[k], j);
      hess[c] = ad_get(hv[k], j);
      c++;
    }
  for (int o = 0; o < NO; o++) {
    jv[o] = 0;
    for (int64_t j = 0; j < P; j++) jv[o] += J[o * P + j] * vf[j];
  }
  for (int o = 0; o < NO; o++) {
    hjv[o] = 0;
    for (int i = 0; i < NO; i++) hjv[o] += Hl[o * NO + i] * jv[i];
  }
  for (int64_t j = 0; j < P; j++)
    for (int o = 0; o < NO; o++) want[j] += J[o * P + j] * hjv[o];
  double e = fx_rel(P, got, want), dh = fx_rel(P, hess, want);
  printf("GN product vs hand-built J^T H_l J + H_R: rel err %.2e (bound 1e-12); Hessian "
         "product differs by %.2e (needs > 1e-3)\n",
         e, dh);
  ck_assert(e <= 1e-12);
  ck_assert(dh > 1e-3);
  free(J);
  /* The GN hypergradient runs end to end and differs from the Hessian one. */
  ad_tensor *hg1[4], *hg2[4];
  for (int k = 0; k < 4; k++) {
    hg1[k] = fx_new(AD_F64, 0, NULL);
    hg2[k] = fx_new(AD_F64, 0, NULL);
  }
  ad_tape_reset(t);
  ck_assert_int_eq(bl_exact(t, &p, &(bl_opts){.gauss_newton = 1}, hg1, NULL), AD_OK);
  ck_assert_int_eq(bl_cg(t, &p, &(bl_opts){.gauss_newton = 1, .K = 60, .tol = 1e-13}, hg2, NULL),
                   AD_OK);
  /* G is positive definite here (R > 0): CG reaches the dense solve. Bound 1e-6. */
  ck_assert(fx_rel_t(4, hg2, hg1) <= 1e-6);
  for (int k = 0; k < 4; k++) {
    ad_tensor_free(w[k]);
    ad_tensor_free(v[k]);
    ad_tensor_free(gv[k]);
    ad_tensor_free(hv[k]);
    ad_tensor_free(lam[k]);
    ad_tensor_free(hg1[k]);
    ad_tensor_free(hg2[k]);
  }
  ad_tape_free(t);
}
END_TEST

/* ---------------------------------------------------------------- duties */

START_TEST(test_duties) {
  ridge_case c;
  ridge_setup(&c, 0, 20);
  struct {
    const char *name;
    bl_method_fn f;
    bl_opts o;
  } ms[] = {
      {"bl_exact", bl_exact, {0}},
      {"bl_cg", bl_cg, {.K = 3}},
      {"bl_neumann", bl_neumann, {.K = 3}},
      {"bl_fixed_point", bl_fixed_point, {.K = 3}},
      {"bl_hoag", bl_hoag, {.K = 3}},
      {"bl_cg gauss_newton", bl_cg, {.K = 3, .gauss_newton = 1}},
      {"bl_exact gauss_newton", bl_exact, {.gauss_newton = 1}},
  };
  bl_hoag_state hs = {0};
  for (size_t i = 0; i < sizeof ms / sizeof ms[0]; i++) {
    fx_check_duties(ms[i].name, ms[i].f, &c.p, &ms[i].o, c.hg, 0);
    /* bad options: an error, the tape rewound, hg untouched */
    ad_tape *t = fx_tape(16);
    ad_arena_stats a0, a1;
    ad_arena_stats_get(t, &a0);
    double keep = ad_get(c.hg[0], 0);
    bl_opts bad = ms[i].o;
    bad.K = -1;
    ck_assert_int_eq(ms[i].f(t, &c.p, &bad, c.hg, NULL), AD_ERR_ARG);
    ad_tape_clear_error(t);
    bad = ms[i].o;
    bad.damping = -1;
    ck_assert_int_eq(ms[i].f(t, &c.p, &bad, c.hg, NULL), AD_ERR_ARG);
    ad_tape_clear_error(t);
    /* a non-scalar training loss */
    bl_problem q = c.p;
    q.train_loss = ridge_out;
    ck_assert_int_eq(ms[i].f(t, &q, &ms[i].o, c.hg, NULL), AD_ERR_SHAPE);
    ad_tape_clear_error(t);
    ad_arena_stats_get(t, &a1);
    ck_assert(a1.used == a0.used && a1.n_nodes == a0.n_nodes);
    ck_assert(ad_get(c.hg[0], 0) == keep);
    /* the user's lam is not re-flagged */
    ck_assert_int_eq(ad_needs_grad(c.lam[0]), 0);
    ad_tape_free(t);
  }
  /* hoag with a state: a bad schedule is an error; a good one keeps the
   * tape as found too */
  bl_opts o = {.hoag = &hs, .warm_start = 1};
  fx_check_duties("bl_hoag state", bl_hoag, &c.p, &o, c.hg, 0);
  bl_hoag_state bad_hs = {.decay = 2};
  ad_tape *t = fx_tape(16);
  ck_assert_int_eq(bl_hoag(t, &c.p, &(bl_opts){.hoag = &bad_hs}, c.hg, NULL), AD_ERR_ARG);
  ad_tape_free(t);
  bl_hoag_state_free(&hs);
  bl_hoag_state_free(NULL);
  ridge_free(&c);
}
END_TEST

START_TEST(test_curvature_product_input) {
  /* bl_curvature_product: H v on ridge is (X^T X/n + diag(lam)) v exactly
   * (bound 1e-12), and bad input is an error with the tape as found. */
  ridge_case c;
  ridge_setup(&c, 1, 0);
  int d = c.rp.d;
  ad_tensor *v = fx_new(AD_F64, 2, (int64_t[]){d, 1}), *out = fx_new(AD_F64, 2, (int64_t[]){d, 1});
  ad_tensor *bad = fx_new(AD_F64, 1, (int64_t[]){d + 1});
  for (int j = 0; j < d; j++) ad_set(v, j, 1.0 + j);
  ad_tape *t = fx_tape(16);
  ad_arena_stats a0, a1;
  ad_arena_stats_get(t, &a0);
  ck_assert_int_eq(bl_curvature_product(t, &c.p, NULL, c.w0, &v, &out), AD_OK);
  double want[FX_MAXD], got[FX_MAXD];
  for (int j = 0; j < d; j++) {
    want[j] = c.lam_v[j] * (1.0 + j);
    for (int k = 0; k < d; k++) {
      double a = 0;
      for (int i = 0; i < c.rp.n; i++) a += c.rp.X[i * d + j] * c.rp.X[i * d + k] / c.rp.n;
      want[j] += a * (1.0 + k);
    }
    got[j] = ad_get(out, j);
  }
  ck_assert(fx_rel(d, got, want) <= 1e-12);
  ck_assert_int_eq(bl_curvature_product(t, &c.p, NULL, c.w0, &bad, &out), AD_ERR_SHAPE);
  ad_tape_clear_error(t);
  ck_assert_int_eq(bl_curvature_product(t, &c.p, NULL, NULL, &v, &out), AD_ERR_NULL);
  ad_tape_clear_error(t);
  ck_assert_int_eq(bl_curvature_product(t, NULL, NULL, c.w0, &v, &out), AD_ERR_NULL);
  ad_tape_clear_error(t);
  ck_assert_int_eq(bl_curvature_product(NULL, &c.p, NULL, c.w0, &v, &out), AD_ERR_NULL);
  ad_arena_stats_get(t, &a1);
  ck_assert(a1.used == a0.used && a1.n_nodes == a0.n_nodes);
  ad_tensor_free(v);
  ad_tensor_free(out);
  ad_tensor_free(bad);
  ridge_free(&c);
  ad_tape_free(t);
}
END_TEST

static ad_tensor *zero_train(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                             void *ctx) {
  (void)lam, (void)step, (void)ctx;
  return ad_scale(t, ad_sum(t, w[0]), 1.0); /* linear in w: H = 0 */
}

/* ---------------------------------------------------------------- closed-form decay, fused passes
 */

/* mlp_train with the output bias held at 0: w[3] reaches L_eff only
 * through the decay. */
static ad_tensor *mlp_train_nob2(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam,
                                 int64_t step, void *ctx) {
  ad_tensor *ww[4] = {w[0], w[1], w[2], ad_zeros_like(t, w[3])};
  return mlp_train(t, ww, lam, step, ctx);
}

/* H v recorded from scratch: L_eff = train + sum_k 1/2 sum dec_k (.) w_k^2
 * written as a loss, its gradient recorded, swept with seed v; + damping v. */
static void fresh_hvp(ad_tape *t, mlp_case *c, bl_loss_fn train, ad_tensor *const *dec,
                      double damping, ad_tensor *const *v, double *out) {
  ad_marker mk = ad_mark(t);
  ad_tensor *w[4], *g[4], *hv[4];
  for (int k = 0; k < 4; k++) {
    w[k] = ad_const(t, AD_F64, c->w0[k]->ndim, c->w0[k]->shape, c->w0[k]->data);
    ad_requires_grad(w[k], 1);
  }
  ad_tensor *L = train(t, w, c->lam, 0, c);
  for (int k = 0; k < 4; k++) {
    ad_tensor *d = ad_const(t, AD_F64, w[k]->ndim, w[k]->shape, AD_D(dec[k]));
    L = ad_add(t, L, ad_scale(t, ad_sum(t, ad_mul(t, d, ad_mul(t, w[k], w[k]))), 0.5));
  }
  ck_assert_int_eq(ad_grad(t, 1, &L, NULL, 4, w, g, AD_GRAD_RECORD), AD_OK);
  ck_assert_int_eq(ad_grad(t, 4, g, v, 4, w, hv, 0), AD_OK);
  int i = 0;
  for (int k = 0; k < 4; k++)
    for (int64_t j = 0; j < hv[k]->size; j++, i++)
      out[i] = ad_get(hv[k], j) + damping * ad_get(v[k], j);
  ad_rewind(t, mk);
}

START_TEST(test_decay_closed_form) {
  /* The products apply the optimizer's decay as the diagonal it is (dec (.)
   * v, not a sweep through lam (.) w): per-element decay tensors, a scalar
   * per tensor, with and without damping, against H v of L_eff recorded
   * and differentiated from scratch. Bound 1e-12 relative: the same
   * products in f64, the decay term added in another order. */
  mlp_case c;
  mlp_setup(&c, MLP_LAM);
  ad_tape *t = fx_tape(16);
  ad_tensor *dl[4], *dfull[4], *v[4], *out[4];
  ad_rng g;
  ad_rng_seed(&g, 9);
  for (int k = 0; k < 4; k++) {
    dl[k] = fx_new(AD_F64, c.w0[k]->ndim, c.w0[k]->shape);
    dfull[k] = fx_new(AD_F64, c.w0[k]->ndim, c.w0[k]->shape);
    v[k] = fx_new(AD_F64, c.w0[k]->ndim, c.w0[k]->shape);
    out[k] = fx_new(AD_F64, c.w0[k]->ndim, c.w0[k]->shape);
    for (int64_t j = 0; j < dl[k]->size; j++) {
      ad_set(dl[k], j, 0.05 + 0.3 * ad_rng_uniform(&g));
      ad_set(dfull[k], j, MLP_LAM[k]);
    }
    ad_tensor_fill_normal(v[k], &g, 0, 1);
  }
  double want[64], got[64];
  for (int per_elem = 0; per_elem < 3; per_elem++)
    for (int dmp = 0; dmp < 2; dmp++) {
      bl_problem p = c.p;
      if (per_elem) p.opt.weight_decay_vars = p.lam = dl;
      if (per_elem == 2) p.train_loss = mlp_train_nob2; /* w[3]: decay only */
      double damping = dmp ? 0.3 : 0;
      ck_assert_int_eq(bl_curvature_product(t, &p, &(bl_opts){.damping = damping}, c.w0, v, out),
                       AD_OK);
      fresh_hvp(t, &c, p.train_loss, per_elem ? dl : dfull, damping, v, want);
      int i = 0;
      for (int k = 0; k < 4; k++)
        for (int64_t j = 0; j < out[k]->size; j++) got[i++] = ad_get(out[k], j);
      double e = fx_rel(i, got, want);
      printf("decay closed form (%s, damping %g): rel err %.1e (bound 1e-12)\n",
             per_elem == 2 ? "per element, w[3] by decay only"
             : per_elem    ? "per element"
                           : "scalar",
             damping, e);
      ck_assert(e <= 1e-12);
    }
  for (int k = 0; k < 4; k++) {
    ad_tensor_free(dl[k]);
    ad_tensor_free(dfull[k]);
    ad_tensor_free(v[k]);
    ad_tensor_free(out[k]);
  }
  mlp_free(&c);
  ad_tape_free(t);
}
END_TEST

/* A tensor of n values from g, in dtype dt. */
static ad_tensor *rnd_vec(ad_dtype dt, int64_t n, ad_rng *g) {
  ad_tensor *x = fx_new(dt, 1, (int64_t[]){n});
  ad_tensor_fill_normal(x, g, 0, 1);
  return x;
}

static int same_bits(const ad_tensor *a, const ad_tensor *b) {
  return a->size == b->size &&
         memcmp(a->data, b->data, (size_t)a->size * ad_dtype_size(a->dtype)) == 0;
}

START_TEST(test_fused_passes_bits) {
  /* The solvers' fused passes give the same bits as the unfused steps they
   * replace (whatever instruction set the CPU picks, also under
   * HYPERTAPE_BLIS_ARCH=haswell): the operator pass as a plain loop and its
   * dot as bl__dot; the Neumann pass as the operator pass into a buffer,
   * then bl__imp_neumann_step; the CG step as the plain update and bl__dot.
   * Two tensors of sizes with tails and several 4096-element flushes, at 1
   * and 2 threads (the f32 passes split at flush boundaries). */
  ad_rng g;
  ad_rng_seed(&g, 3);
  const int64_t sz[2] = {4096 * 9 + 37, 45};
  for (int run = 0; run < 4; run++) {
    int dt = run % 2;
    ck_assert_int_eq(ad_set_threads(1 + run / 2), AD_OK);
    ad_dtype D = dt ? AD_F64 : AD_F32;
    ad_tensor *h[2], *d[2], *v[2], *o[2], *o2[2], *q1[2], *q2[2], *v1[2], *v2[2];
    double s[2] = {0.3, 0};
    for (int i = 0; i < 2; i++) {
      h[i] = rnd_vec(D, sz[i], &g);
      d[i] = i ? NULL : rnd_vec(D, sz[i], &g);
      v[i] = rnd_vec(D, sz[i], &g);
      o[i] = rnd_vec(D, sz[i], &g);
      o2[i] = rnd_vec(D, sz[i], &g);
      q1[i] = rnd_vec(D, sz[i], &g);
      q2[i] = fx_new(D, 1, (int64_t[]){sz[i]});
      ad_copy_values(q2[i], q1[i]);
      v1[i] = rnd_vec(D, sz[i], &g);
      v2[i] = fx_new(D, 1, (int64_t[]){sz[i]});
      ad_copy_values(v2[i], v1[i]);
    }
    /* operator pass against the loop written out */
    double dot = bl__imp_op_pass(2, o, h, d, s, v);
    for (int i = 0; i < 2; i++)
      for (int64_t j = 0; j < sz[i]; j++) {
        if (dt) {
          double x = AD_D(v[i])[j], a = AD_D(h[i])[j], t;
          if (d[i]) t = AD_D(d[i])[j] * x, a = a + t;
          if (s[i] != 0) t = s[i] * x, a = a + t;
          AD_D(o2[i])[j] = a;
        } else {
          float x = AD_F(v[i])[j], a = AD_F(h[i])[j], t, si = (float)s[i];
          if (d[i]) t = AD_F(d[i])[j] * x, a = a + t;
          if (si != 0) t = si * x, a = a + t;
          AD_F(o2[i])[j] = a;
        }
      }
    for (int i = 0; i < 2; i++) ck_assert(same_bits(o[i], o2[i]));
    ck_assert(dot == bl__dot(2, v, o2));
    /* Neumann pass against operator pass + step */
    double alpha = 0.07;
    double qq1 = bl__imp_neumann_pass(2, q1, v1, alpha, h, d, s);
    bl__imp_op_pass(2, o2, h, d, s, q2);
    double qq2 = bl__imp_neumann_step(2, q2, v2, alpha, o2);
    for (int i = 0; i < 2; i++) ck_assert(same_bits(q1[i], q2[i]) && same_bits(v1[i], v2[i]));
    ck_assert(qq1 == qq2 && qq1 == bl__dot(2, q1, q1));
    /* CG step against x += a p, r -= a Ap, bl__dot(r, r) */
    double a = 0.37;
    double rr = bl__imp_cg_step(2, q1, v1, h, v, a);
    for (int i = 0; i < 2; i++)
      for (int64_t j = 0; j < sz[i]; j++) {
        if (dt) {
          AD_D(q2[i])[j] += a * AD_D(h[i])[j];
          AD_D(v2[i])[j] -= a * AD_D(v[i])[j];
        } else {
          AD_F(q2[i])[j] += (float)a * AD_F(h[i])[j];
          AD_F(v2[i])[j] -= (float)a * AD_F(v[i])[j];
        }
      }
    for (int i = 0; i < 2; i++) ck_assert(same_bits(q1[i], q2[i]) && same_bits(v1[i], v2[i]));
    ck_assert(rr == bl__dot(2, v1, v1));
    /* the solver's split of it (r pass, then x and p in one pass) against
     * bl__imp_cg_step then p = 1 r + beta p */
    ad_tensor *p1[2], *p2[2];
    for (int i = 0; i < 2; i++) {
      p1[i] = fx_new(D, 1, (int64_t[]){sz[i]});
      p2[i] = fx_new(D, 1, (int64_t[]){sz[i]});
      ad_copy_values(p1[i], h[i]);
      ad_copy_values(p2[i], h[i]);
    }
    double beta = 0.61;
    double rr1 = bl__imp_cg_resid(2, v1, v, a);
    bl__imp_cg_dir(2, q1, p1, v1, a, beta);
    double rr2 = bl__imp_cg_step(2, q2, v2, p2, v, a);
    bl__imp_lincomb(2, p2, 1.0, v2, beta, p2);
    ck_assert(rr1 == rr2);
    for (int i = 0; i < 2; i++) {
      ck_assert(same_bits(q1[i], q2[i]) && same_bits(v1[i], v2[i]) && same_bits(p1[i], p2[i]));
      ad_tensor_free(p1[i]);
      ad_tensor_free(p2[i]);
    }
    ad_tensor *all[] = {h[0],  h[1],  d[0],  v[0],  v[1],  o[0],  o[1],  o2[0], o2[1],
                        q1[0], q1[1], q2[0], q2[1], v1[0], v1[1], v2[0], v2[1]};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) ad_tensor_free(all[i]);
  }
  ck_assert_int_eq(ad_set_threads(1), AD_OK);
}
END_TEST

START_TEST(test_exact_singular) {
  ridge_case c;
  ridge_setup(&c, 1, 0);
  c.p.train_loss = zero_train;
  ad_tape *t = fx_tape(16);
  ck_assert_int_eq(bl_exact(t, &c.p, NULL, c.hg, NULL), AD_ERR_NUMERIC);
  ck_assert(strstr(ad_tape_errmsg(t), "singular") != NULL);
  ad_tape_clear_error(t);
  /* damping makes it solvable: H + 1 I = I */
  ck_assert_int_eq(bl_exact(t, &c.p, &(bl_opts){.damping = 1}, c.hg, NULL), AD_OK);
  ad_tape_free(t);
  ridge_free(&c);
}
END_TEST

static Suite *implicit_suite(void) {
  Suite *s = suite_create("bl_implicit");
  TCase *tc = tcase_create("implicit");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, test_ridge_exact);
  tcase_add_test(tc, test_ridge_cg);
  tcase_add_test(tc, test_ridge_neumann_fixed_point);
  tcase_add_test(tc, test_ridge_f32);
  tcase_add_test(tc, test_ridge_gauss_newton);
  tcase_add_test(tc, test_hoag_warm_start);
  tcase_add_test(tc, test_mlp_exact_vs_finite_differences);
  tcase_add_test(tc, test_mlp_methods_vs_exact);
  tcase_add_test(tc, test_gauss_newton_product);
  tcase_add_test(tc, test_duties);
  tcase_add_test(tc, test_exact_singular);
  tcase_add_test(tc, test_curvature_product_input);
  tcase_add_test(tc, test_decay_closed_form);
  tcase_add_test(tc, test_fused_passes_bits);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  return gc_run_suite(implicit_suite());
}
