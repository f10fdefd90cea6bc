/* t1t2.c — T1-T2 (Luketina et al. 2016): alternate one training step (T1)
 * with one hyperparameter step (T2) whose gradient goes through that single
 * training step only,
 *   g = dL_val/dlam |_{w_T} + alpha_T B_T,   alpha_T = grad_w L_val(w_T),
 *   B_T = dPhi(w_{T-1}, lam)/dlam.
 * Exact (o->darts_fd = 0): alpha_T B_T by one VJP of the recorded step (the
 * same number bl_one_step returns). With o->darts_fd, B_T is not
 * differentiated at all: the DARTS-style central difference (Liu et al.
 * 2019) of the optimizer step in each hyperparameter coordinate,
 *   (alpha_T B_T)_i ~ <alpha_T, Phi(w_{T-1}, lam + e_i eps_i)
 *                              - Phi(w_{T-1}, lam - e_i eps_i)> / (2 eps_i),
 * eps_i = o->eps max(1, |lam_i|), o->eps defaulting to the cube root of the
 * dtype's machine epsilon (6e-6 in f64, 5e-3 in f32: balances truncation
 * O(eps^2) against rounding O(u/eps)). Two in-place steps per coordinate:
 * meant for a few hyperparameters. Needs T >= 1. */
#include "bl_internal.h"

#include <float.h>
#include <math.h>

/* alpha . Phi(w_prev, lam_p) for one perturbed lam_p: one in-place step
 * from copies of (w_prev, s_prev). */
static ad_status step_dot(bl_run *r, ad_tensor *const *lam_p, ad_tensor *const *w_prev,
                          const bl_state *s_prev, ad_tensor *const *wt, bl_state *stt,
                          ad_tensor *const *alpha, double *out) {
  bl__copy_list(r->p->n_w, wt, w_prev);
  bl__state_set(stt, s_prev);
  int64_t T = r->p->inner_steps;
  ad_status s = bl__run_inplace(r, lam_p, wt, stt, T - 1, T);
  if (!s) *out = bl__dot(r->p->n_w, alpha, wt);
  return s;
}

ad_status bl_t1t2(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                  bl_stats *st) {
  bl_run r;
  ad_status s = bl__begin(&r, "bl_t1t2", t, p, o, hg, 1);
  if (s) return bl__end(&r, s, st);
  if (!(r.o.eps >= 0) || !isfinite(r.o.eps))
    return bl__end(
        &r, bl__fail(&r, AD_ERR_ARG, "eps = %g (a finite step >= 0; 0 = default)", r.o.eps), st);
  int n = p->n_w, n_lam = p->n_lam;
  int64_t T = p->inner_steps;
  ad_tensor *w[NN_MAX_PARAMS], *w_prev[NN_MAX_PARAMS], *gw[NN_MAX_PARAMS], *glam[NN_MAX_PARAMS];
  ad_tensor *aB[NN_MAX_PARAMS];
  bl_state os = {0}, os_prev = {0};
  /* T1: the training steps, keeping (w_{T-1}, s_{T-1}). */
  s = bl__run_keep_last(&r, w, w_prev, &os, &os_prev, gw, glam);
  if (s) return bl__end(&r, s, st);

  if (!r.o.darts_fd) {
    /* T2 exact: alpha_T B_T from the recorded step. */
    s = bl__step_vjp(&r, w_prev, &os_prev, T - 1, gw, NULL, aB, NULL, NULL);
    if (!s) bl__axpy(n_lam, glam, 1.0, aB);
  } else {
    /* T2 by central differences of the step in each coordinate of lam. */
    ad_tensor *lam_p[NN_MAX_PARAMS], *wt[NN_MAX_PARAMS];
    bl_state stt = {0};
    double u = p->w0[0]->dtype == AD_F64 ? DBL_EPSILON : FLT_EPSILON;
    double eps = r.o.eps > 0 ? r.o.eps : cbrt(u);
    s = bl__copy_new(&r, n_lam, p->lam, lam_p);
    if (!s) s = bl__copy_new(&r, n, w_prev, wt);
    if (!s) s = bl__state_copy(&r, &stt, &os_prev, BL_STATE_INPLACE);
    for (int k = 0; k < n_lam && !s; k++)
      for (int64_t i = 0; i < p->lam[k]->size && !s; i++) {
        /* the step actually taken is (v + h) - (v - h) as stored in lam's dtype */
        double v = ad_get(p->lam[k], i), h = eps * fmax(1.0, fabs(v)), fp = 0, fm = 0;
        ad_set(lam_p[k], i, v + h);
        double vp = ad_get(lam_p[k], i);
        s = step_dot(&r, lam_p, w_prev, &os_prev, wt, &stt, gw, &fp);
        ad_set(lam_p[k], i, v - h);
        double vm = ad_get(lam_p[k], i);
        if (!s) s = step_dot(&r, lam_p, w_prev, &os_prev, wt, &stt, gw, &fm);
        ad_set(lam_p[k], i, v);
        if (!s) ad_set(glam[k], i, ad_get(glam[k], i) + (fp - fm) / (vp - vm));
      }
  }
  if (!s) s = bl__write_hg(&r, glam, hg);
  return bl__end(&r, s, st);
}
