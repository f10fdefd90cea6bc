/* test_bl_zo_sama.c — the zero-order (evolution strategies) estimate and
 * SAMA. zero_order: with many antithetic samples it lands within a stated
 * tolerance of the true hypergradient of a smooth 2-D problem, and its
 * variance across seeds is far below the naive estimator's. sama: equals
 * its definition computed by hand (Adam's preconditioner written out). */
#include "bl_fixtures.h"
#include "gradcheck.h"

#include <stdlib.h>

/* A ridge problem with two hyperparameters (d = 2, per-coordinate lam,
 * penalty in L_val too), T = 5 SGD steps: F(lam) = L_val(w_5(lam), lam) is
 * a smooth (polynomial) function of lam. */
static void zo_case(fx_rcase *c) {
  fx_rcase_setup(c, 1, 5, 0.3);
  fx_ridge_make(&c->rp, 40, 30, 2, 3);
  c->rp.val_pen = 1;
  ad_tensor_free(c->lam[0]);
  ad_tensor_free(c->hg[0]);
  ad_tensor_free(c->w0[0]);
  c->w0[0] = fx_new(AD_F64, 2, (int64_t[]){2, 1});
  ad_set(c->w0[0], 0, 0.5);
  ad_set(c->w0[0], 1, -0.5);
  c->lam[0] = fx_new(AD_F64, 2, (int64_t[]){2, 1});
  c->hg[0] = fx_new(AD_F64, 2, (int64_t[]){2, 1});
  ad_set(c->lam[0], 0, 0.4);
  ad_set(c->lam[0], 1, 0.8);
}

/* Antithetic, N = 2000 directions, sigma = 1e-2: normwise relative error
 * against the unroll (the exact gradient of F) below 0.1. The estimator's
 * standard deviation is about |grad F| sqrt(2 / N) = 0.03 |grad F| per
 * coordinate, so 0.1 is ~3 sigma; the bias is O(sigma^2) (F smooth). */
START_TEST(test_zero_order_accuracy) {
  fx_rcase c;
  zo_case(&c);
  ad_tape *t = fx_tape(16);
  double exact[2], got[2];
  ck_assert_int_eq(bl_unroll(t, &c.p, NULL, c.hg, NULL), AD_OK);
  for (int j = 0; j < 2; j++) exact[j] = ad_get(c.hg[0], j);
  bl_stats st;
  ck_assert_int_eq(
      bl_zero_order(t, &c.p,
                    &(bl_opts){.samples = 2000, .sigma = 1e-2, .antithetic = 1, .seed = 42}, c.hg,
                    &st),
      AD_OK);
  for (int j = 0; j < 2; j++) got[j] = ad_get(c.hg[0], j);
  double e = fx_rel(2, got, exact);
  printf("zero_order antithetic N=2000: (%.5f, %.5f) vs exact (%.5f, %.5f): rel err %.3f, "
         "%lld inner steps\n",
         got[0], got[1], exact[0], exact[1], e, (long long)st.inner_steps);
  ck_assert(e < 0.1); /* bound 0.1 */
  ck_assert_int_eq(st.inner_steps, 2 * 2000 * 5 + 5);
  ck_assert_int_eq(st.hvps, 0);
  ad_tape_free(t);
  fx_rcase_free(&c);
}
END_TEST

/* Over 30 seeds with N = 20 directions each, the antithetic estimator's
 * variance (summed over both coordinates) is below 1% of the naive one's:
 * the naive sum carries F(lam) u / sigma terms (variance ~ F^2 / (N
 * sigma^2)) that the +/- pairs cancel. Also: the mean of the antithetic
 * estimates is within 0.1 (relative) of the true gradient. */
START_TEST(test_zero_order_variance) {
  fx_rcase c;
  zo_case(&c);
  ad_tape *t = fx_tape(16);
  double exact[2];
  ck_assert_int_eq(bl_unroll(t, &c.p, NULL, c.hg, NULL), AD_OK);
  for (int j = 0; j < 2; j++) exact[j] = ad_get(c.hg[0], j);
  double var[2] = {0, 0}, mean_anti[2] = {0, 0};
  for (int anti = 0; anti < 2; anti++) {
    double s1[2] = {0, 0}, s2[2] = {0, 0};
    const int R = 30;
    for (int rep = 0; rep < R; rep++) {
      bl_opts o = {.samples = 20, .sigma = 1e-2, .antithetic = anti, .seed = 1000 + rep};
      ck_assert_int_eq(bl_zero_order(t, &c.p, &o, c.hg, NULL), AD_OK);
      for (int j = 0; j < 2; j++) {
        double g = ad_get(c.hg[0], j);
        s1[j] += g;
        s2[j] += g * g;
      }
    }
    for (int j = 0; j < 2; j++) {
      double m = s1[j] / R;
      var[anti] += s2[j] / R - m * m;
      if (anti) mean_anti[j] = m;
    }
  }
  double e = fx_rel(2, mean_anti, exact);
  printf("zero_order variance over 30 seeds (N=20): naive %.4g, antithetic %.4g (ratio %.2e); "
         "antithetic mean rel err %.3f\n",
         var[0], var[1], var[1] / var[0], e);
  ck_assert(var[1] < 0.01 * var[0]); /* bound: antithetic variance < 1% of naive */
  ck_assert(e < 0.1);                /* bound 0.1 */
  ck_assert_int_eq(bl_zero_order(t, &c.p, &(bl_opts){.sigma = -1}, c.hg, NULL), AD_ERR_ARG);
  ad_tape_free(t);
  fx_rcase_free(&c);
}
END_TEST

/* SAMA by hand on ridge with the penalty in both losses (d = 5, T = 4),
 * Adam inner optimizer (lr 0.05): with g the last gradient (at w_3), m, v
 * Adam's moments after step 4, c1 = 1 - b1^4, c2 = 1 - b2^4,
 * mh = m / c1, vh = v / c2,
 *   P_j = lr [ (1 - b1) / (c1 (sqrt vh_j + eps))
 *            - mh_j (1 - b2) g_j / (c2 sqrt vh_j (sqrt vh_j + eps)^2) ]
 *   q = P alpha,  alpha = grad_w L_val(w_4),
 * and since grad_lam_j L_train = 1/2 w_j^2 is quadratic, the central
 * difference is exactly w_j q_j:
 *   hg_j = 1/2 w_j^2 - w_j q_j   (per coordinate; the sum for scalar lam).
 * Also SGD (P = lr). To 1e-8 relative (the difference's rounding). */
START_TEST(test_sama_by_hand) {
  for (int per = 0; per < 2; per++)
    for (int adam = 0; adam < 2; adam++) {
      fx_rcase c;
      const double lr = adam ? 0.05 : 0.3, b1 = 0.9, b2 = 0.999, eps = 1e-8;
      fx_rcase_setup(&c, per, 4, lr);
      c.rp.val_pen = 1;
      if (adam) c.p.opt = (nn_opt_cfg){.kind = NN_OPT_ADAM, .lr = lr};
      const fx_ridge *rp = &c.rp;
      int d = rp->d, n = rp->n, m = rp->m;
      double w[FX_MAXD], mm[FX_MAXD] = {0}, vv[FX_MAXD] = {0}, g[FX_MAXD];
      for (int j = 0; j < d; j++) w[j] = ad_get(c.w0[0], j);
      for (int k = 1; k <= 4; k++) {
        for (int j = 0; j < d; j++) g[j] = c.lam_v[j] * w[j];
        for (int i = 0; i < n; i++) {
          double r = -rp->y[i];
          for (int j = 0; j < d; j++) r += rp->X[i * d + j] * w[j];
          for (int j = 0; j < d; j++) g[j] += rp->X[i * d + j] * r / n;
        }
        double c1 = 1 - pow(b1, k), c2 = 1 - pow(b2, k);
        for (int j = 0; j < d; j++) {
          mm[j] = b1 * mm[j] + (1 - b1) * g[j];
          vv[j] = b2 * vv[j] + (1 - b2) * g[j] * g[j];
          w[j] -= adam ? lr * (mm[j] / c1) / (sqrt(vv[j] / c2) + eps) : lr * g[j];
        }
      }
      double alpha[FX_MAXD], want[FX_MAXD], c1 = 1 - pow(b1, 4), c2 = 1 - pow(b2, 4);
      for (int j = 0; j < d; j++) alpha[j] = c.lam_v[j] * w[j];
      for (int i = 0; i < m; i++) {
        double r = -rp->yv[i];
        for (int j = 0; j < d; j++) r += rp->Xv[i * d + j] * w[j];
        for (int j = 0; j < d; j++) alpha[j] += rp->Xv[i * d + j] * r / m;
      }
      double total = 0;
      for (int j = 0; j < d; j++) {
        double mh = mm[j] / c1, sv = sqrt(vv[j] / c2);
        double P = adam ? lr * ((1 - b1) / (c1 * (sv + eps)) -
                                mh * (1 - b2) * g[j] / (c2 * sv * (sv + eps) * (sv + eps)))
                        : lr;
        want[j] = 0.5 * w[j] * w[j] - w[j] * P * alpha[j];
        total += want[j];
      }
      if (!per) want[0] = total;
      ad_tape *t = fx_tape(16);
      bl_stats st;
      ck_assert_msg(bl_sama(t, &c.p, NULL, c.hg, &st) == AD_OK, "%s", ad_tape_errmsg(t));
      double got[FX_MAXD];
      for (int64_t j = 0; j < c.hg[0]->size; j++) got[j] = ad_get(c.hg[0], j);
      double e = fx_rel(c.hg[0]->size, got, want);
      printf("sama (%s, %s lam) vs by hand: %.2e\n", adam ? "Adam" : "SGD",
             per ? "per-coordinate" : "scalar", e);
      ck_assert(e < 1e-8); /* bound 1e-8 */
      ck_assert_int_eq(st.inner_steps, 4);
      ad_tape_free(t);
      fx_rcase_free(&c);
    }
}
END_TEST

START_TEST(test_duties) {
  fx_rcase c;
  fx_rcase_setup(&c, 1, 3, 0.3);
  c.rp.val_pen = 1;
  fx_check_duties("bl_zero_order", bl_zero_order, &c.p, &(bl_opts){.samples = 3}, c.hg, 0);
  fx_check_duties("bl_zero_order anti", bl_zero_order, &c.p,
                  &(bl_opts){.samples = 3, .antithetic = 1}, c.hg, 0);
  fx_check_duties("bl_sama", bl_sama, &c.p, NULL, c.hg, 1);
  c.p.opt = (nn_opt_cfg){.kind = NN_OPT_ADAM, .lr = 0.05};
  fx_check_duties("bl_sama adam", bl_sama, &c.p, NULL, c.hg, 1);
  fx_check_duties("bl_zero_order adam", bl_zero_order, &c.p, &(bl_opts){.samples = 2}, c.hg, 0);
  fx_rcase_free(&c);
}
END_TEST

int main(void) {
  Suite *s = suite_create("bl_zo_sama");
  TCase *tc = tcase_create("core");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, test_zero_order_accuracy);
  tcase_add_test(tc, test_zero_order_variance);
  tcase_add_test(tc, test_sama_by_hand);
  tcase_add_test(tc, test_duties);
  suite_add_tcase(s, tc);
  return gc_run_suite(s);
}
