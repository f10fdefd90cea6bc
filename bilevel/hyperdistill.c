/* hyperdistill.c — HyperDistill (Lee et al. 2022): the second-order term of
 * the hypergradient distilled into one step's worth of work.
 *
 * The decayed sum the greedy method would need,
 *   sum_{s=1}^{t} gamma^{t-s} alpha_t B_s(w_{s-1}),
 * is replaced by a single B at the weighted mean of the iterates,
 *   N_t alpha_t B(w*_t),   N_t = sum_{s=1}^t gamma^{t-s} = (1 - gamma^t)/(1 - gamma),
 *   w*_t = p_t w*_{t-1} + (1 - p_t) w_{t-1},  p_t = (gamma - gamma^t)/(1 - gamma^t)
 * (w*_t = sum_s gamma^{t-s} w_{s-1} / N_t, kept as an EMA while training;
 * the optimizer state gets the same EMA), and a scalar theta corrects the
 * scale: the distilled term is fitted by least squares to a DrMAD-style
 * estimate of the true second-order term (bl__drmad_reverse along the line
 * w_0 -> w_t),
 *   theta = <h_drmad, h_dist> / <h_dist, h_dist>,   h_dist = N_t alpha_t B(w*_t).
 * Online, theta is refreshed every o->distill_every steps (default T: once,
 * at the end); the hypergradient returned after T steps is
 *   g = dL_val/dlam |_{w_T} + theta N_T alpha_T B(w*_T)
 * with the latest theta (theta = 1 before the first fit, i.e. when
 * distill_every > T). o->gamma in (0, 1], default 0.9. Needs T >= 1. */
#include "bl_internal.h"

#include <math.h>

/* N_t and p_t, with their gamma -> 1 limits t and (t-1)/t. */
static double n_t(double gamma, int64_t t) {
  return gamma == 1 ? (double)t : (1 - pow(gamma, (double)t)) / (1 - gamma);
}
static double p_t(double gamma, int64_t t) {
  if (gamma == 1) return (double)(t - 1) / (double)t;
  double gt = pow(gamma, (double)t);
  return (gamma - gt) / (1 - gt);
}

/* h = N_t alpha B(w*, s*) with alpha = grad_w L_val(w): into h (long-lived
 * buffers), and the direct term into gd when not NULL. */
static ad_status distilled(bl_run *r, ad_tensor *const *w, ad_tensor *const *w_ema,
                           const bl_state *s_ema, int64_t t, double gamma, ad_tensor *const *h,
                           ad_tensor *const *alpha, ad_tensor *const *gd) {
  int n = r->p->n_w, n_lam = r->p->n_lam;
  ad_marker m = ad_mark(r->t);
  ad_tensor *ga[NN_MAX_PARAMS], *gl[NN_MAX_PARAMS], *v[NN_MAX_PARAMS];
  r->val_at = t;
  ad_status s = bl__val_grad(r, r->lam, w, NULL, ga, gd ? gl : NULL);
  if (!s) s = bl__step_vjp(r, w_ema, s_ema, t - 1, ga, NULL, v, NULL, NULL);
  if (!s) {
    bl__copy_list(n_lam, h, v);
    bl__scale(n_lam, h, n_t(gamma, t));
    bl__copy_list(n, alpha, ga);
    if (gd) bl__copy_list(n_lam, gd, gl);
  }
  ad_rewind(r->t, m);
  return s;
}

/* theta at step t: least-squares fit of the distilled term to DrMAD's. */
static ad_status estimate_theta(bl_run *r, const bl_state *s0, ad_tensor *const *w,
                                const bl_state *s, ad_tensor *const *w_ema, const bl_state *s_ema,
                                int64_t t, double gamma, double *theta) {
  int n = r->p->n_w, n_lam = r->p->n_lam;
  ad_marker m = ad_mark(r->t);
  ad_tensor *h[NN_MAX_PARAMS], *alpha[NN_MAX_PARAMS], *hd[NN_MAX_PARAMS];
  ad_status st = bl__zeros_new(r, n_lam, r->lam, h);
  if (!st) st = bl__zeros_new(r, n_lam, r->lam, hd);
  if (!st) st = bl__zeros_new(r, n, w, alpha);
  if (!st) st = distilled(r, w, w_ema, s_ema, t, gamma, h, alpha, NULL);
  if (!st) st = bl__drmad_reverse(r, r->p->w0, s0, w, s, t, alpha, hd);
  if (!st) {
    double hh = bl__dot(n_lam, h, h);
    *theta = hh > 0 ? bl__dot(n_lam, hd, h) / hh : 1.0;
  }
  ad_rewind(r->t, m);
  return st;
}

ad_status bl_hyperdistill(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                          bl_stats *st) {
  bl_run r;
  ad_status s = bl__begin(&r, "bl_hyperdistill", t, p, o, hg, 1);
  if (s) return bl__end(&r, s, st);
  double gamma = BL_OPT(&r, gamma, 0.9);
  int64_t T = p->inner_steps, every = BL_OPT(&r, distill_every, T);
  if (!(gamma > 0 && gamma <= 1) || every < 1)
    return bl__end(&r,
                   bl__fail(&r, AD_ERR_ARG, "gamma = %g (needs (0, 1]), distill_every = %lld",
                            gamma, (long long)every),
                   st);
  int n = p->n_w, n_lam = p->n_lam;
  ad_tensor *w[NN_MAX_PARAMS], *w_ema[NN_MAX_PARAMS], *h[NN_MAX_PARAMS], *alpha[NN_MAX_PARAMS];
  ad_tensor *glam[NN_MAX_PARAMS], *sb[BL_MAX_STATE], *eb[BL_MAX_STATE];
  bl_state os = {0}, os0 = {0}, s_ema = {0};
  s = bl__w0_copy(&r, w);
  if (!s) s = bl__state_new(&r, &os);
  if (!s) s = bl__state_new(&r, &os0);
  if (!s) s = bl__state_new(&r, &s_ema);
  if (!s) s = bl__copy_new(&r, n, w, w_ema);
  if (!s) s = bl__zeros_new(&r, n_lam, r.lam, h);
  if (!s) s = bl__zeros_new(&r, n_lam, r.lam, glam);
  if (!s) s = bl__zeros_new(&r, n, w, alpha);
  int ns = bl__state_list(&os, sb);
  bl__state_list(&s_ema, eb);

  double theta = 1.0;
  for (int64_t k = 0; k < T && !s; k++) { /* step t = k + 1 */
    int64_t tt = k + 1;
    /* EMA point before the step: w*_t = p_t w*_{t-1} + (1 - p_t) w_{t-1} */
    double pt = p_t(gamma, tt);
    bl__lerp(n, w_ema, w, w_ema, pt);
    bl__lerp(ns, eb, sb, eb, pt);
    s = bl__run_inplace(&r, r.lam, w, &os, k, k + 1);
    if (!s && tt % every == 0)
      s = estimate_theta(&r, &os0, w, &os, w_ema, &s_ema, tt, gamma, &theta);
  }
  /* g = direct + theta N_T alpha_T B(w*_T) */
  if (!s) s = distilled(&r, w, w_ema, &s_ema, T, gamma, h, alpha, glam);
  if (!s) {
    bl__axpy(n_lam, glam, theta, h);
    s = bl__write_hg(&r, glam, hg);
  }
  return bl__end(&r, s, st);
}
