/* test_bl_reversible.c — the exact reversible unroll (bilevel/reversible.c):
 * the backward pass gives back w_0 and m_0 as the same integers; the
 * hypergradient equals bl_unroll's at T = 1000 to 1e-6 relative with at
 * most 5% of its memory (both measured here); it matches central finite
 * differences of L_val(w_T(lam)) of the float run; bad input is refused.
 * Each assert states its bound; the measured numbers are printed. */
#include "bl_fixtures.h"
#include "gradcheck.h"

#include <stdlib.h>

/* The test hook in reversible.c (no header: not part of the API). */
ad_status bl__reversible_roundtrip(ad_tape *t, const bl_problem *p, ad_tensor *const *hg,
                                   int64_t *w_start, int64_t *w_end, int64_t *m_end,
                                   int64_t *w_back, int64_t *m_back, size_t *heap_peak,
                                   double *info_bits);

/* Ridge regression under heavy-ball momentum (mu 0.9, lr 0.1), lam the
 * scalar penalty. */
static void ridge_momentum(fx_rcase *c, int64_t T) {
  fx_rcase_setup(c, 0, T, 0.1);
  c->p.opt = (nn_opt_cfg){.kind = NN_OPT_MOMENTUM, .lr = 0.1, .momentum = 0.9};
}

/* The MLP case 4 (momentum with lr_var = lam[0], L2 weight lam[1] in the
 * loss) with the momentum itself a third hyperparameter, lam[2] = mu. */
static void mlp_three(fx_mlp *c, int64_t T, double mu) {
  fx_mlp_setup(c, 4, T);
  c->lam[2] = fx_new(AD_F64, 0, NULL);
  ad_set(c->lam[2], 0, mu);
  c->hg[2] = fx_new(AD_F64, 0, NULL);
  c->n_lam = c->p.n_lam = 3;
  c->p.opt.momentum_var = c->lam[2];
}

/* ---------------------------------------------------------------- (1) exact reversal */

/* From (W_T, M_T) the backward pass gives back the encoded w_0 and M_0 = 0
 * as equal integers, every element; the trajectory moved (W_T != W_0 by
 * many grid units, M_T != 0), so the equality is not trivial. Ridge
 * (5 elements, T = 500) and the MLP (45 elements, T = 300, mu 0.8 as a
 * variable, and per-parameter weight decay through case 2). */
START_TEST(test_roundtrip_bit_exact) {
  for (int which = 0; which < 3; which++) {
    fx_rcase rc;
    fx_mlp mc;
    bl_problem *p;
    ad_tensor **hg;
    if (which == 0) {
      ridge_momentum(&rc, 500);
      p = &rc.p, hg = rc.hg;
    } else if (which == 1) {
      mlp_three(&mc, 300, 0.8);
      p = &mc.p, hg = mc.hg;
    } else {
      fx_mlp_setup(&mc, 2, 300);
      p = &mc.p, hg = mc.hg;
    }
    int64_t n = 0;
    for (int i = 0; i < p->n_w; i++) n += p->w0[i]->size;
    int64_t *a = calloc((size_t)n * 5, sizeof(int64_t));
    int64_t *w0 = a, *wT = a + n, *mT = a + 2 * n, *wb = a + 3 * n, *mb = a + 4 * n;
    ad_tape *t = fx_tape(16);
    size_t heap = 0;
    double bits = 0;
    ad_status s = bl__reversible_roundtrip(t, p, hg, w0, wT, mT, wb, mb, &heap, &bits);
    ck_assert_msg(s == AD_OK, "%s", ad_tape_errmsg(t));
    int64_t bad = 0, moved = 0, mnz = 0;
    for (int64_t e = 0; e < n; e++) {
      bad += wb[e] != w0[e] || mb[e] != 0;
      int64_t d = llabs(wT[e] - w0[e]);
      if (d > moved) moved = d;
      mnz += mT[e] != 0;
    }
    printf("roundtrip case %d: %lld elements, max |W_T - W_0| = %lld grid units (%.3e), "
           "%lld of M_T nonzero, mismatches after reversal %lld, heap peak %zu B\n",
           which, (long long)n, (long long)moved, ldexp((double)moved, -40), (long long)mnz,
           (long long)bad, heap);
    ck_assert_int_eq(bad, 0);              /* bit-exact: integer equality */
    ck_assert(moved > ((int64_t)1 << 30)); /* moved by > 1e-3 */
    ck_assert_int_gt(mnz, 0);
    /* The buffer holds what mu destroys, -log2(mu) bits per element and
     * step, give or take the first push (b <= 62 bits, before anything can
     * be popped) and a bit of rounding per element. */
    double mu = which == 1 ? 0.8 : 0.9, want = (double)n * (double)p->inner_steps * -log2(mu);
    printf("roundtrip case %d: information buffer %.0f bits, -log2(mu) n T = %.0f\n", which, bits,
           want);
    ck_assert(bits >= want - 4.0 * n && bits <= want + 64.0 * n);
    free(a);
    ad_tape_free(t);
    if (which == 0)
      fx_rcase_free(&rc);
    else
      fx_mlp_free(&mc);
  }
}
END_TEST

/* ---------------------------------------------------------------- (2) vs bl_unroll at T = 1000 */

/* T = 1000 on the MLP (lr_var, L2 weight and momentum_var, so all three
 * kinds of hyperparameter) and on ridge with momentum: relative difference
 * from bl_unroll <= 1e-6, and bl_reversible's peak (arena + its heap
 * buffers, as reported in st) <= 5% of bl_unroll's peak arena. */
START_TEST(test_vs_unroll_T1000) {
  for (int which = 0; which < 2; which++) {
    fx_rcase rc;
    fx_mlp mc;
    bl_problem *p;
    ad_tensor **hg;
    int n_lam;
    if (which == 0) {
      mlp_three(&mc, 1000, 0.9);
      p = &mc.p, hg = mc.hg, n_lam = 3;
    } else {
      ridge_momentum(&rc, 1000);
      p = &rc.p, hg = rc.hg, n_lam = 1;
    }
    ad_tape *t = fx_tape(64);
    ad_tensor *ref[3];
    for (int k = 0; k < n_lam; k++) ref[k] = fx_new(AD_F64, hg[k]->ndim, hg[k]->shape);
    bl_stats su, sr;
    ck_assert_msg(bl_unroll(t, p, NULL, hg, &su) == AD_OK, "%s", ad_tape_errmsg(t));
    for (int k = 0; k < n_lam; k++) ad_copy_values(ref[k], hg[k]);
    ck_assert_msg(bl_reversible(t, p, NULL, hg, &sr) == AD_OK, "%s", ad_tape_errmsg(t));
    double e = fx_rel_t(n_lam, hg, ref), frac = (double)sr.peak_arena_bytes / su.peak_arena_bytes;
    printf("T=1000 %s: unroll hg[0] %+.10e, reversible %+.10e; rel diff %.2e (bound 1e-6); "
           "memory reversible %zu B vs unroll %zu B = %.3f%% (bound 5%%); val loss %.12f vs "
           "%.12f\n",
           which ? "ridge" : "mlp", ad_get(ref[0], 0), ad_get(hg[0], 0), e, sr.peak_arena_bytes,
           su.peak_arena_bytes, 100 * frac, sr.val_loss, su.val_loss);
    double mag = 0;
    for (int k = 0; k < n_lam; k++) mag += fabs(ad_get(ref[k], 0));
    ck_assert(mag > 1e-6); /* a zero hypergradient compares nothing */
    ck_assert_msg(e <= 1e-6, "rel diff %g", e);
    ck_assert_msg(frac <= 0.05, "memory fraction %g", frac);
    ck_assert_int_eq(sr.inner_steps, 1000);
    ck_assert_int_eq(sr.hvps, 1000);
    ck_assert(fabs(sr.val_loss - su.val_loss) <= 1e-9 * fabs(su.val_loss));
    for (int k = 0; k < n_lam; k++) ad_tensor_free(ref[k]);
    ad_tape_free(t);
    if (which == 0)
      fx_mlp_free(&mc);
    else
      fx_rcase_free(&rc);
  }
}
END_TEST

/* ---------------------------------------------------------------- (3) finite differences */

/* The MLP, T = 40, lam = (lr, L2 weight, mu): each component against the
 * central difference (f(lam + h) - f(lam - h)) / 2h, h = 1e-5 max(1, |lam|),
 * of L_val(w_T) from the float in-place optimizer (no bilevel code);
 * bound 1e-6 relative to the largest component (truncation h^2 ~ 1e-10,
 * rounding 1e-16 / h ~ 1e-11, fixed point ~1e-10). Also with
 * per-parameter weight decay variables (case 2, lam = three tensors). */
START_TEST(test_finite_differences) {
  for (int which = 0; which < 2; which++) {
    fx_mlp c;
    if (which == 0)
      mlp_three(&c, 40, 0.9);
    else
      fx_mlp_setup(&c, 2, 40);
    ad_tape *t = fx_tape(16);
    ck_assert_msg(bl_reversible(t, &c.p, NULL, c.hg, NULL) == AD_OK, "%s", ad_tape_errmsg(t));
    double num = 0, den = 0;
    for (int k = 0; k < c.n_lam; k++)
      for (int64_t j = 0; j < c.lam[k]->size; j++) {
        double x = ad_get(c.lam[k], j), h = 1e-5 * fmax(1, fabs(x));
        ad_set(c.lam[k], j, x + h);
        double fp = fx_mlp_run(&c, t);
        ad_set(c.lam[k], j, x - h);
        double fm = fx_mlp_run(&c, t);
        ad_set(c.lam[k], j, x);
        double fd = (fp - fm) / (2 * h), an = ad_get(c.hg[k], j);
        if (which == 0)
          printf("fd lam[%d] = %g: reversible %+.10e, central difference %+.10e\n", k, x, an, fd);
        num = fmax(num, fabs(fd - an));
        den = fmax(den, fabs(fd));
      }
    printf("fd case %d: max |reversible - fd| / max |fd| = %.2e (bound 1e-6), max |fd| %.3e\n",
           which, num / den, den);
    ck_assert(den > 1e-4);
    ck_assert_msg(num / den <= 1e-6, "rel err %g", num / den);
    ad_tape_free(t);
    fx_mlp_free(&c);
  }
}
END_TEST

/* ---------------------------------------------------------------- (4) bad input */

static ad_status heavy_ball(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *s,
                            ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                            ad_tensor **w_new, ad_tensor **s_new) {
  (void)step, (void)ctx;
  for (int i = 0; i < n; i++) {
    s_new[i] = ad_axpy(t, g[i], 0.9, s[i]);
    w_new[i] = ad_sub(t, w[i], ad_mul(t, lam[0], s_new[i]));
  }
  return ad_tape_status(t);
}

/* Refused with the code and a message naming the function and the reason;
 * hg untouched; the tape usable afterwards. */
static void refuse(ad_tape *t, const bl_problem *p, ad_tensor *const *hg, ad_status want,
                   const char *needle) {
  double keep = ad_get(hg[0], 0);
  ad_status s = bl_reversible(t, p, NULL, hg, NULL);
  const char *msg = ad_tape_errmsg(t);
  printf("refused (%d): %s\n", s, msg);
  ck_assert_int_eq(s, want);
  ck_assert_msg(strstr(msg, "bl_reversible") && strstr(msg, needle), "message '%s' lacks '%s'", msg,
                needle);
  ck_assert(ad_get(hg[0], 0) == keep);
  ad_tape_clear_error(t);
}

START_TEST(test_bad_input) {
  fx_mlp c;
  mlp_three(&c, 5, 0.9);
  ad_tape *t = fx_tape(16);
  bl_problem q = c.p;
  const nn_opt_kind others[] = {NN_OPT_SGD, NN_OPT_NESTEROV, NN_OPT_ADAM, NN_OPT_ADAMW,
                                NN_OPT_RMSPROP};
  const char *names[] = {"'sgd'", "'nesterov'", "'adam'", "'adamw'", "'rmsprop'"};
  for (int k = 0; k < 5; k++) {
    q = c.p;
    q.opt.kind = others[k];
    refuse(t, &q, c.hg, AD_ERR_ARG, names[k]);
  }
  q = c.p;
  q.opt = (nn_opt_cfg){0};
  q.step = (bl_step){.fn = heavy_ball, .slots = 1, .name = "my heavy ball"};
  refuse(t, &q, c.hg, AD_ERR_ARG, "my heavy ball");
  /* momentum outside (0, 1): as a number and as a variable */
  const double bad_mu[] = {-0.5, 1.0, 1.5, NAN};
  for (int k = 0; k < 4; k++) {
    q = c.p;
    q.opt.momentum_var = NULL;
    q.opt.momentum = bad_mu[k];
    refuse(t, &q, c.hg, AD_ERR_ARG, "outside (0, 1)");
    ad_set(c.lam[2], 0, bad_mu[k]);
    refuse(t, &c.p, c.hg, AD_ERR_ARG, "outside (0, 1)");
    ad_set(c.lam[2], 0, 0.9);
  }
  /* non-finite learning rate (variable), weight decay (number), w0 */
  ad_set(c.lam[0], 0, INFINITY);
  refuse(t, &c.p, c.hg, AD_ERR_ARG, "learning rate");
  ad_set(c.lam[0], 0, 0.1);
  q = c.p;
  q.opt.weight_decay = NAN;
  refuse(t, &q, c.hg, AD_ERR_ARG, "weight decay");
  double w00 = ad_get(c.w0[1], 2);
  ad_set(c.w0[1], 2, NAN);
  refuse(t, &c.p, c.hg, AD_ERR_NUMERIC, "w0[1] element 2 is nan: not finite");
  ad_set(c.w0[1], 2, 1e9); /* beyond the fixed-point range 2^21 */
  refuse(t, &c.p, c.hg, AD_ERR_ARG, "fixed-point range");
  ad_set(c.w0[1], 2, w00);
  /* a diverging run is stopped where it leaves the range, not wrapped */
  ad_set(c.lam[0], 0, 500.0);
  q = c.p;
  q.inner_steps = 200;
  refuse(t, &q, c.hg, AD_ERR_NUMERIC, "inner step");
  ad_set(c.lam[0], 0, 0.1);
  /* still fine afterwards, and the common duties */
  ck_assert_msg(bl_reversible(t, &c.p, NULL, c.hg, NULL) == AD_OK, "%s", ad_tape_errmsg(t));
  ad_tape_free(t);
  fx_check_duties("bl_reversible", bl_reversible, &c.p, NULL, c.hg, 0);
  fx_mlp_free(&c);
  fx_rcase rc;
  ridge_momentum(&rc, 6);
  fx_check_duties("bl_reversible ridge", bl_reversible, &rc.p, NULL, rc.hg, 0);
  fx_rcase_free(&rc);
}
END_TEST

int main(void) {
  Suite *s = suite_create("bl_reversible");
  TCase *tc = tcase_create("core");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, test_roundtrip_bit_exact);
  tcase_add_test(tc, test_vs_unroll_T1000);
  tcase_add_test(tc, test_finite_differences);
  tcase_add_test(tc, test_bad_input);
  suite_add_tcase(s, tc);
  return gc_run_suite(s);
}
