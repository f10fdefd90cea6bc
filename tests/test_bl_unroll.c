/* test_bl_unroll.c — reverse-mode unroll, forward mode and checkpointed
 * unroll against closed forms (ridge regression, gradient descent on a
 * quadratic), against each other on the same trajectory, and against finite
 * differences of L_val(w_T(lam)) on a tiny f64 MLP with SGD, momentum and
 * Adam inner optimizers. Each assert states its bound; the measured error
 * is printed. */
#include "bl_fixtures.h"
#include "gradcheck.h"

#include <stdlib.h>

/* ---------------------------------------------------------------- ridge */

static void get_vals(const ad_tensor *x, double *out) {
  for (int64_t i = 0; i < x->size; i++) out[i] = ad_get(x, i);
}

/* unroll (T = 200, lr 0.5: w_T = w* to ~1e-20) matches the closed form
 * within 1e-4 relative; forward equals unroll to 1e-10 and checkpointed
 * equals unroll to 1e-12 on the same trajectory; checkpointing needs less
 * arena than the full unroll. Scalar and per-coordinate lam, with and
 * without the penalty in L_val (a direct term). */
START_TEST(test_ridge_closed_form) {
  for (int per = 0; per < 4; per++) {
    fx_rcase c;
    fx_rcase_setup(&c, per & 1, 200, 0.5);
    c.rp.val_pen = per >> 1;
    ad_tape *t = fx_tape(32);
    int64_t P = c.lam[0]->size;
    double exact[FX_MAXD], hu[FX_MAXD], hf[FX_MAXD], hc[FX_MAXD];
    fx_rcase_exact(&c, exact);
    bl_stats su, sf, sc;
    ck_assert_msg(bl_unroll(t, &c.p, NULL, c.hg, &su) == AD_OK, "%s", ad_tape_errmsg(t));
    get_vals(c.hg[0], hu);
    ck_assert_msg(bl_forward(t, &c.p, NULL, c.hg, &sf) == AD_OK, "%s", ad_tape_errmsg(t));
    get_vals(c.hg[0], hf);
    ck_assert_msg(bl_checkpointed(t, &c.p, NULL, c.hg, &sc) == AD_OK, "%s", ad_tape_errmsg(t));
    get_vals(c.hg[0], hc);
    double e_u = fx_rel(P, hu, exact), e_f = fx_rel(P, hf, hu), e_c = fx_rel(P, hc, hu);
    printf("ridge (%s lam%s): unroll vs closed form %.2e, forward vs unroll %.2e, "
           "checkpointed vs unroll %.2e; peak arena unroll %zu B, checkpointed %zu B, "
           "forward %zu B\n",
           (per & 1) ? "per-coordinate" : "scalar", (per >> 1) ? ", penalty in L_val too" : "", e_u,
           e_f, e_c, su.peak_arena_bytes, sc.peak_arena_bytes, sf.peak_arena_bytes);
    ck_assert_msg(e_u < 1e-4, "unroll vs closed form %g", e_u);   /* bound 1e-4 */
    ck_assert_msg(e_f < 1e-10, "forward vs unroll %g", e_f);      /* bound 1e-10 */
    ck_assert_msg(e_c < 1e-12, "checkpointed vs unroll %g", e_c); /* bound 1e-12 */
    ck_assert(sc.peak_arena_bytes < su.peak_arena_bytes / 4);
    ck_assert_int_eq(su.inner_steps, 200);
    ck_assert_int_eq(su.hvps, 200);
    ck_assert_int_eq(sf.hvps, 200 * P);
    ck_assert(fabs(su.val_loss - sc.val_loss) < 1e-12);
    ad_tape_free(t);
    fx_rcase_free(&c);
  }
}
END_TEST

/* Truncation: K >= T is the full unroll; K = 1 keeps only the last step's
 * B_T: g = dL/dlam|direct + alpha_T B_T, which for SGD on ridge is
 * -lr <grad_w L_val(w_T), w_{T-1}> (scalar lam; dPhi/dlam = -lr w_{T-1}).
 * Both to 1e-12 relative. */
START_TEST(test_truncated) {
  fx_rcase c;
  fx_rcase_setup(&c, 0, 12, 0.3);
  ad_tape *t = fx_tape(16);
  double full, trunc_all, k1;
  ck_assert_int_eq(bl_unroll(t, &c.p, NULL, c.hg, NULL), AD_OK);
  full = ad_item(c.hg[0]);
  ck_assert_int_eq(bl_unroll(t, &c.p, &(bl_opts){.K = 12}, c.hg, NULL), AD_OK);
  trunc_all = ad_item(c.hg[0]);
  bl_stats st;
  ck_assert_int_eq(bl_unroll(t, &c.p, &(bl_opts){.K = 1}, c.hg, &st), AD_OK);
  k1 = ad_item(c.hg[0]);
  ck_assert_int_eq(st.hvps, 1);
  /* by hand: 11 SGD steps then the last */
  int d = c.rp.d, n = c.rp.n, m = c.rp.m;
  double w[FX_MAXD], wprev[FX_MAXD], lr = 0.3, lam = 0.3;
  for (int j = 0; j < d; j++) w[j] = 0.1 * (j - 2);
  for (int k = 0; k < 12; k++) {
    double g[FX_MAXD] = {0};
    for (int i = 0; i < n; i++) {
      double r = -c.rp.y[i];
      for (int j = 0; j < d; j++) r += c.rp.X[i * d + j] * w[j];
      for (int j = 0; j < d; j++) g[j] += c.rp.X[i * d + j] * r / n;
    }
    memcpy(wprev, w, sizeof w);
    for (int j = 0; j < d; j++) w[j] -= lr * (g[j] + lam * w[j]);
  }
  double gv[FX_MAXD] = {0}, by_hand = 0;
  for (int i = 0; i < m; i++) {
    double r = -c.rp.yv[i];
    for (int j = 0; j < d; j++) r += c.rp.Xv[i * d + j] * w[j];
    for (int j = 0; j < d; j++) gv[j] += c.rp.Xv[i * d + j] * r / m;
  }
  for (int j = 0; j < d; j++) by_hand += -lr * gv[j] * wprev[j];
  printf("truncated: K=T vs full %.2e, K=1 vs by hand %.2e\n", fabs(trunc_all - full) / fabs(full),
         fabs(k1 - by_hand) / fabs(by_hand));
  ck_assert(fabs(trunc_all - full) <= 1e-12 * fabs(full)); /* bound 1e-12 */
  ck_assert(fabs(k1 - by_hand) <= 1e-12 * fabs(by_hand));  /* bound 1e-12 */
  ck_assert_int_eq(bl_unroll(t, &c.p, &(bl_opts){.K = -1}, c.hg, NULL), AD_ERR_ARG);
  ad_tape_clear_error(t);
  /* T = 0: only the direct term at w_0, as bl_fo gives it (exactly) */
  c.rp.val_pen = 1;
  c.p.inner_steps = 0;
  ck_assert_int_eq(bl_unroll(t, &c.p, NULL, c.hg, NULL), AD_OK);
  double u0 = ad_item(c.hg[0]);
  ck_assert_int_eq(bl_fo(t, &c.p, NULL, c.hg, NULL), AD_OK);
  ck_assert(u0 == ad_item(c.hg[0]) && u0 != 0);
  ck_assert_int_eq(bl_forward(t, &c.p, NULL, c.hg, NULL), AD_OK);
  ck_assert(u0 == ad_item(c.hg[0]));
  ad_tape_free(t);
  fx_rcase_free(&c);
}
END_TEST

/* ---------------------------------------------------------------- GD on a quadratic */
/* L_train(w) = 1/2 w^T A w - b^T w + lam/2 |w|^2, A = Q diag(a) Q^T (Q a
 * Householder reflection), GD with learning rate eta (lr_var = hyper 0),
 * lam = hyper 1; L_val = 1/2 |w - c|^2. In the eigenbasis (hats), with
 * mu = a + lam, beta = 1 - eta mu, w* = b/mu:
 *   w_T        = w* + beta^T (w_0 - w*)
 *   dw_T/deta  = -T mu beta^{T-1} (w_0 - w*)
 *   dw_T/dlam  = -(w* / mu) (1 - beta^T) - eta T beta^{T-1} (w_0 - w*)
 * and dL_val/d. = (w_T - c)^T dw_T/d. */
#define QD 3
static const double q_a[QD] = {0.5, 1.4, 2.7}, q_b[QD] = {1.0, -0.5, 0.25},
                    q_c[QD] = {0.3, 0.2, -0.1}, q_w0[QD] = {0.7, -0.4, 0.9},
                    q_v[QD] = {1.0, 2.0, -1.0};

static void householder(double *Q) {
  double vv = 0;
  for (int i = 0; i < QD; i++) vv += q_v[i] * q_v[i];
  for (int i = 0; i < QD; i++)
    for (int j = 0; j < QD; j++) Q[i * QD + j] = (i == j) - 2 * q_v[i] * q_v[j] / vv;
}

static ad_tensor *quad_train(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                             void *ctx) {
  (void)step, (void)ctx;
  double Q[QD * QD], A[QD * QD];
  householder(Q);
  for (int i = 0; i < QD; i++)
    for (int j = 0; j < QD; j++) {
      A[i * QD + j] = 0;
      for (int k = 0; k < QD; k++) A[i * QD + j] += Q[i * QD + k] * q_a[k] * Q[j * QD + k];
    }
  ad_tensor *Am = ad_const(t, AD_F64, 2, (int64_t[]){QD, QD}, A);
  ad_tensor *b = ad_const(t, AD_F64, 2, (int64_t[]){QD, 1}, q_b);
  ad_tensor *Aw = ad_matmul(t, Am, w[0], 0, 0);
  ad_tensor *q = ad_sub(t, ad_scale(t, ad_dot(t, w[0], Aw), 0.5), ad_dot(t, b, w[0]));
  return ad_add(t, q, ad_scale(t, ad_mul(t, lam[1], ad_dot(t, w[0], w[0])), 0.5));
}

static ad_tensor *quad_val(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                           void *ctx) {
  (void)step, (void)ctx, (void)lam;
  ad_tensor *c = ad_const(t, AD_F64, 2, (int64_t[]){QD, 1}, q_c);
  ad_tensor *r = ad_sub(t, w[0], c);
  return ad_scale(t, ad_dot(t, r, r), 0.5);
}

/* unroll, forward and checkpointed each match the closed form to 1e-11
 * relative (T = 30, not converged: the trajectory matters). */
START_TEST(test_quadratic_gd_closed_form) {
  const int64_t T = 30;
  const double eta = 0.2, lamv = 0.1;
  double Q[QD * QD];
  householder(Q);
  double bh[QD] = {0}, w0h[QD] = {0};
  for (int i = 0; i < QD; i++)
    for (int k = 0; k < QD; k++) {
      bh[i] += Q[k * QD + i] * q_b[k];
      w0h[i] += Q[k * QD + i] * q_w0[k];
    }
  double wT[QD] = {0}, dEta[QD] = {0}, dLam[QD] = {0};
  for (int i = 0; i < QD; i++) {
    double mu = q_a[i] + lamv, beta = 1 - eta * mu, ws = bh[i] / mu;
    double bT = pow(beta, (double)T), bT1 = pow(beta, (double)(T - 1));
    double wTh = ws + bT * (w0h[i] - ws);
    double de = -(double)T * mu * bT1 * (w0h[i] - ws);
    double dl = -(ws / mu) * (1 - bT) - eta * (double)T * bT1 * (w0h[i] - ws);
    for (int k = 0; k < QD; k++) { /* back to the original basis: w = Q w_hat */
      wT[k] += Q[k * QD + i] * wTh;
      dEta[k] += Q[k * QD + i] * de;
      dLam[k] += Q[k * QD + i] * dl;
    }
  }
  double exact[2] = {0, 0};
  for (int k = 0; k < QD; k++) {
    exact[0] += (wT[k] - q_c[k]) * dEta[k];
    exact[1] += (wT[k] - q_c[k]) * dLam[k];
  }
  ad_tensor *w0[1] = {fx_new(AD_F64, 2, (int64_t[]){QD, 1})};
  for (int i = 0; i < QD; i++) ad_set(w0[0], i, q_w0[i]);
  ad_tensor *lam[2] = {fx_new(AD_F64, 0, NULL), fx_new(AD_F64, 0, NULL)};
  ad_tensor *hg[2] = {fx_new(AD_F64, 0, NULL), fx_new(AD_F64, 0, NULL)};
  ad_set(lam[0], 0, eta);
  ad_set(lam[1], 0, lamv);
  bl_problem p = {.n_w = 1,
                  .w0 = w0,
                  .n_lam = 2,
                  .lam = lam,
                  .train_loss = quad_train,
                  .val_loss = quad_val,
                  .opt = {.kind = NN_OPT_SGD, .lr_var = lam[0]},
                  .inner_steps = T};
  ad_tape *t = fx_tape(16);
  bl_method_fn fs[3] = {bl_unroll, bl_forward, bl_checkpointed};
  const char *names[3] = {"unroll", "forward", "checkpointed"};
  for (int k = 0; k < 3; k++) {
    ck_assert_msg(fs[k](t, &p, NULL, hg, NULL) == AD_OK, "%s", ad_tape_errmsg(t));
    double got[2] = {ad_item(hg[0]), ad_item(hg[1])};
    double e = fx_rel(2, got, exact);
    printf("GD quadratic, %s: d/d lr %.10g (exact %.10g), d/d lam %.10g (exact %.10g), rel err "
           "%.2e\n",
           names[k], got[0], exact[0], got[1], exact[1], e);
    ck_assert_msg(e < 1e-11, "%s: %g", names[k], e); /* bound 1e-11 */
  }
  ad_tape_free(t);
  for (int k = 0; k < 2; k++) {
    ad_tensor_free(lam[k]);
    ad_tensor_free(hg[k]);
  }
  ad_tensor_free(w0[0]);
}
END_TEST

/* ---------------------------------------------------------------- tiny MLP */
/* unroll, forward and checkpointed vs central differences (h = 1e-6) of
 * L_val(w_T(lam)) computed with the in-place optimizer (fx_mlp_run): 1e-6
 * relative, normwise over all hyperparameters. Cases: see fx_mlp_setup. */
START_TEST(test_mlp_finite_differences) {
  int kind = _i;
  const char *names[4] = {"SGD, log-lr", "SGD, per-parameter wd", "momentum, per-parameter wd",
                          "Adam, lr + per-parameter wd"};
  fx_mlp c;
  fx_mlp_setup(&c, kind, 8);
  ad_tape *t = fx_tape(16);
  /* central differences, h = 1e-6 */
  double fd[128], num = 0, den = 0;
  int64_t P = 0;
  for (int k = 0; k < c.n_lam; k++)
    for (int64_t e = 0; e < c.lam[k]->size; e++) {
      double v = ad_get(c.lam[k], e), h = 1e-6;
      ad_set(c.lam[k], e, v + h);
      double fp = fx_mlp_run(&c, t);
      ad_set(c.lam[k], e, v - h);
      double fm = fx_mlp_run(&c, t);
      ad_set(c.lam[k], e, v);
      fd[P++] = (fp - fm) / (2 * h);
    }
  bl_method_fn fs[3] = {bl_unroll, bl_forward, bl_checkpointed};
  const char *mn[3] = {"unroll", "forward", "checkpointed"};
  for (int q = 0; q < 3; q++) {
    ck_assert_msg(fs[q](t, &c.p, &(bl_opts){.checkpoint_every = 3}, c.hg, NULL) == AD_OK, "%s",
                  ad_tape_errmsg(t));
    num = den = 0;
    int64_t j = 0;
    for (int k = 0; k < c.n_lam; k++)
      for (int64_t e = 0; e < c.lam[k]->size; e++, j++) {
        num = fmax(num, fabs(ad_get(c.hg[k], e) - fd[j]));
        den = fmax(den, fabs(fd[j]));
      }
    printf("MLP %s, %s: %lld hyperparameters, max |hg - fd| / max |fd| = %.2e\n", names[kind],
           mn[q], (long long)P, num / den);
    ck_assert_msg(num <= 1e-6 * den, "%s %s: %g", names[kind], mn[q], num / den); /* bound 1e-6 */
  }
  ad_tape_free(t);
  fx_mlp_free(&c);
}
END_TEST

/* ---------------------------------------------------------------- duties */

START_TEST(test_duties) {
  fx_rcase c;
  fx_rcase_setup(&c, 1, 5, 0.3);
  fx_check_duties("bl_unroll", bl_unroll, &c.p, NULL, c.hg, 0);
  fx_check_duties("bl_unroll K=2", bl_unroll, &c.p, &(bl_opts){.K = 2}, c.hg, 0);
  fx_check_duties("bl_forward", bl_forward, &c.p, NULL, c.hg, 0);
  fx_check_duties("bl_checkpointed", bl_checkpointed, &c.p, NULL, c.hg, 0);
  fx_rcase_free(&c);
  /* with optimizer state (Adam): the state's buffers are rewound too */
  fx_mlp m;
  fx_mlp_setup(&m, 3, 3);
  fx_check_duties("bl_unroll adam", bl_unroll, &m.p, NULL, m.hg, 0);
  fx_check_duties("bl_checkpointed adam", bl_checkpointed, &m.p, NULL, m.hg, 0);
  fx_mlp_free(&m);
}
END_TEST

int main(void) {
  Suite *s = suite_create("bl_unroll");
  TCase *tc = tcase_create("core");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, test_ridge_closed_form);
  tcase_add_test(tc, test_truncated);
  tcase_add_test(tc, test_quadratic_gd_closed_form);
  tcase_add_loop_test(tc, test_mlp_finite_differences, 0, 4);
  tcase_add_test(tc, test_duties);
  suite_add_tcase(s, tc);
  return gc_run_suite(s);
}
