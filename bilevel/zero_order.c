/* zero_order.c — evolution-strategies estimate of the hypergradient: no
 * derivative of the inner loop at all, only values of
 *   F(lam) = L_val(w_T(lam), lam),   w_T(lam) by T in-place steps,
 * so it works for inner loops that are not differentiable. With u_i ~ N(0, I)
 * over all hyperparameter elements (Gaussian smoothing, Nesterov & Spokoiny
 * 2017; Salimans et al. 2017):
 *   naive:       g = 1/(N sigma)   sum_i F(lam + sigma u_i) u_i
 *   antithetic:  g = 1/(2N sigma)  sum_i [F(lam + sigma u_i) - F(lam - sigma u_i)] u_i
 * Both estimate the gradient of the smoothed F_sigma(lam) = E F(lam + sigma u),
 * which is grad F + O(sigma^2) for smooth F. The naive sum carries F(lam) u_i
 * terms of mean zero but variance F^2 / sigma^2 per sample; the antithetic
 * pairs cancel them (and every even-order term), which is why its variance
 * is far lower for the same N. N = o->samples (default 16: directions, so
 * antithetic costs 2N inner runs), sigma = o->sigma (default 1e-2),
 * o->antithetic, o->seed. st->inner_steps counts every in-place step. */
#include "bl_internal.h"

ad_status bl_zero_order(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                        bl_stats *st) {
  bl_run r;
  ad_status s = bl__begin(&r, "bl_zero_order", t, p, o, hg, 0);
  if (s) return bl__end(&r, s, st);
  int64_t N = BL_OPT(&r, samples, 16);
  double sigma = BL_OPT(&r, sigma, 1e-2);
  if (N < 1 || !(sigma > 0))
    return bl__end(&r,
                   bl__fail(&r, AD_ERR_ARG, "samples = %lld and sigma = %g must be positive",
                            (long long)N, sigma),
                   st);
  int n = p->n_w, n_lam = p->n_lam, pairs = r.o.antithetic ? 2 : 1;
  ad_rng rng;
  ad_rng_seed(&rng, r.o.seed ? r.o.seed : 0x5eed);

  /* lam_p = lam + sign sigma u, and its optimizer config; fresh w and state
   * for each run. */
  ad_tensor *lam_p[NN_MAX_PARAMS], *u[NN_MAX_PARAMS], *glam[NN_MAX_PARAMS], *w[NN_MAX_PARAMS];
  bl_state os = {0}, os0 = {0};
  s = bl__copy_new(&r, n_lam, p->lam, lam_p);
  if (!s) s = bl__zeros_new(&r, n_lam, p->lam, u);
  if (!s) s = bl__zeros_new(&r, n_lam, p->lam, glam);
  if (!s) s = bl__w0_copy(&r, w);
  if (!s) s = bl__state_new(&r, &os);
  if (!s) s = bl__state_new(&r, &os0);

  for (int64_t i = 0; i < N && !s; i++) {
    for (int k = 0; k < n_lam; k++) ad_tensor_fill_normal(u[k], &rng, 0.0, 1.0);
    double F[2] = {0, 0};
    for (int q = 0; q < pairs && !s; q++) {
      /* F(lam + sigma u) (q = 0) or F(lam - sigma u) (q = 1) */
      bl__copy_list(n_lam, lam_p, p->lam);
      bl__axpy(n_lam, lam_p, q ? -sigma : sigma, u);
      bl__copy_list(n, w, p->w0);
      bl__state_set(&os, &os0);
      s = bl__run_inplace(&r, lam_p, w, &os, 0, p->inner_steps);
      if (!s) s = bl__val_value(&r, lam_p, w, &F[q]);
    }
    if (!s) bl__axpy(n_lam, glam, (F[0] - F[1]) / (pairs * N * sigma), u);
  }
  /* st->val_loss: F at lam itself (one more run) */
  if (!s) {
    bl__copy_list(n, w, p->w0);
    bl__state_set(&os, &os0);
    s = bl__run_inplace(&r, r.lam, w, &os, 0, p->inner_steps);
  }
  if (!s) s = bl__val_value(&r, r.lam, w, NULL);
  if (!s) s = bl__write_hg(&r, glam, hg);
  return bl__end(&r, s, st);
}
