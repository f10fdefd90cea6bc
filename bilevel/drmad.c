/* drmad.c — DrMAD (Fu et al. 2016): reverse-mode hypergradient without
 * storing the trajectory. Maclaurin et al. (2015) reverse SGD-with-momentum
 * exactly, step by step, to recover each w_t in the backward pass; DrMAD
 * replaces that reversal by the straight line from w_T back to w_0,
 *   w_t ~ (1 - t/T) w_0 + (t/T) w_T,
 * and runs the usual backward recursion along it:
 *   alpha_T = grad_w L_val(w_T),
 *   g += alpha_{t+1} B_t(w~_t),  alpha_t = alpha_{t+1} A_t(w~_t),  t = T-1 .. 0.
 * Memory: w_0, w_T and one step's graph — no tape of the trajectory. The
 * step's state is interpolated the same way (from its start to s_T) and its adjoint carried
 * alongside. Exact when the trajectory is a line (e.g. T = 1); the error otherwise is measured in
 * the tests. Needs T >= 1. */
#include "bl_internal.h"

ad_status bl__drmad_reverse(bl_run *r, ad_tensor *const *w0, const bl_state *s0,
                            ad_tensor *const *w_end, const bl_state *s_end, int64_t t_end,
                            ad_tensor *const *aw, ad_tensor *const *glam) {
  int n = r->p->n_w, n_lam = r->p->n_lam;
  ad_tensor *wk[NN_MAX_PARAMS], *as[BL_MAX_STATE], *b0[BL_MAX_STATE], *b1[BL_MAX_STATE];
  ad_tensor *bk[BL_MAX_STATE];
  bl_state sk = {0};
  ad_status s = bl__copy_new(r, n, w_end, wk);
  if (!s) s = bl__state_copy(r, &sk, s_end, BL_STATE_INPLACE);
  int ns = bl__state_list(s_end, b1);
  bl__state_list(s0, b0);
  bl__state_list(&sk, bk);
  if (!s) s = bl__zeros_new(r, ns, b1, as);
  for (int64_t k = t_end - 1; k >= 0 && !s; k--) {
    /* the point on the line, and the state's step count there */
    double beta = (double)k / (double)t_end;
    bl__lerp(n, wk, w0, w_end, beta);
    bl__lerp(ns, bk, b0, b1, beta);
    ad_marker m = ad_mark(r->t);
    ad_tensor *gl[NN_MAX_PARAMS], *gw[NN_MAX_PARAMS], *gs[BL_MAX_STATE];
    s = bl__step_vjp(r, wk, &sk, k, aw, ns ? as : NULL, gl, gw, gs);
    if (!s) {
      bl__axpy(n_lam, glam, 1.0, gl);
      bl__copy_list(n, aw, gw);
      bl__copy_list(ns, as, gs);
    }
    ad_rewind(r->t, m);
  }
  return s;
}

ad_status bl_drmad(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                   bl_stats *st) {
  bl_run r;
  ad_status s = bl__begin(&r, "bl_drmad", t, p, o, hg, 1);
  if (s) return bl__end(&r, s, st);
  int n = p->n_w, n_lam = p->n_lam;
  ad_tensor *w[NN_MAX_PARAMS], *aw[NN_MAX_PARAMS], *glam[NN_MAX_PARAMS];
  bl_state os = {0}, os0 = {0};
  /* forward in place: only w_0 (p->w0), s_0 (zeros) and w_T, s_T are kept */
  s = bl__w0_copy(&r, w);
  if (!s) s = bl__state_new(&r, &os);
  if (!s) s = bl__state_new(&r, &os0);
  if (!s) s = bl__run_inplace(&r, r.lam, w, &os, 0, p->inner_steps);
  ad_tensor *gw[NN_MAX_PARAMS], *gd[NN_MAX_PARAMS];
  if (!s) s = bl__val_grad(&r, r.lam, w, NULL, gw, gd);
  if (!s) s = bl__copy_new(&r, n, gw, aw);
  if (!s) s = bl__copy_new(&r, n_lam, gd, glam);
  /* backward along the line w_T -> w_0 */
  if (!s) s = bl__drmad_reverse(&r, p->w0, &os0, w, &os, p->inner_steps, aw, glam);
  if (!s) s = bl__write_hg(&r, glam, hg);
  return bl__end(&r, s, st);
}
