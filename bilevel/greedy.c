/* greedy.c — the generalized greedy hypergradient: every step's direct
 * effect, weighted by a decay instead of the true products of A's,
 *   g = dL_val/dlam |_{w_T} + sum_{t=1}^{T} gamma^{T-t} alpha_t B_t,
 *   alpha_t = grad_w L_val(w_t)  (at the iterate itself, not pulled back),
 *   B_t = dPhi/dlam of the step w_{t-1} -> w_t.
 * That is the chain rule with prod_{s>t} A_s replaced by gamma^{T-t} I and
 * alpha_T pulled back by nothing but re-evaluated at each w_t (for a convex
 * L-smooth L_train and SGD, (1 - lr L) I <= A_s <= I motivates the decay).
 * gamma = 1 and T = 1 give the unroll exactly.
 * o->gamma in (0, 1], default 0.9. Each step is recorded once from leaves
 * (w_{t-1}, s_{t-1}): its output gives w_t, and one reverse sweep with
 * cotangent alpha_t gives alpha_t B_t; then the step is rewound. Needs T >= 1. */
#include "bl_internal.h"

#include <math.h>

ad_status bl_greedy(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                    bl_stats *st) {
  bl_run r;
  ad_status s = bl__begin(&r, "bl_greedy", t, p, o, hg, 1);
  if (s) return bl__end(&r, s, st);
  double gamma = BL_OPT(&r, gamma, 0.9);
  if (!(gamma > 0 && gamma <= 1))
    return bl__end(&r, bl__fail(&r, AD_ERR_ARG, "gamma = %g outside (0, 1]", gamma), st);
  int n = p->n_w, n_lam = p->n_lam;
  int64_t T = p->inner_steps;
  ad_tensor *w[NN_MAX_PARAMS], *glam[NN_MAX_PARAMS];
  bl_state os = {0};
  s = bl__w0_copy(&r, w);
  if (!s) s = bl__state_new(&r, &os);
  if (!s) s = bl__zeros_new(&r, n_lam, r.lam, glam);

  for (int64_t k = 0; k < T && !s; k++) { /* step t = k + 1 */
    ad_marker m = ad_mark(t);
    ad_tensor *wl[NN_MAX_PARAMS], *wn[NN_MAX_PARAMS], *alpha[NN_MAX_PARAMS], *aB[NN_MAX_PARAMS];
    ad_tensor *gd[NN_MAX_PARAMS];
    bl_state sl = {0};
    s = bl__leaf_new(&r, n, w, wl);
    if (!s) s = bl__state_copy(&r, &sl, &os, BL_STATE_LEAF);
    if (!s) s = bl__step_recorded(&r, r.lam, wl, &sl, k, NULL, wn);
    /* alpha_t at w_t (and, at t = T, the direct term) */
    r.val_at = k + 1;
    if (!s) s = bl__val_grad(&r, r.lam, wn, NULL, alpha, k == T - 1 ? gd : NULL);
    /* alpha_t B_t: w_t's dependence on lam through this step only */
    if (!s) s = ad_grad(t, n, wn, alpha, n_lam, r.lam, aB, 0);
    if (!s) {
      r.st.hvps++;
      bl__axpy(n_lam, glam, pow(gamma, (double)(T - 1 - k)), aB);
      if (k == T - 1) bl__axpy(n_lam, glam, 1.0, gd);
      bl__copy_list(n, w, wn);
      bl__state_set(&os, &sl);
    }
    ad_rewind(t, m);
  }
  if (!s) s = bl__write_hg(&r, glam, hg);
  return bl__end(&r, s, st);
}
