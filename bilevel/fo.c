/* fo.c — first-order hypergradient: the direct term only,
 *   g_FO = dL_val/dlam |_{w_T}  (w_T held fixed),
 * i.e. every alpha_t B_t term of the chain rule dropped. Zero when lam does
 * not appear in L_val (a pure training hyperparameter). T = 0 is allowed
 * (then w_T = w_0). */
#include "bl_internal.h"

ad_status bl_fo(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                bl_stats *st) {
  bl_run r;
  ad_status s = bl__begin(&r, "bl_fo", t, p, o, hg, 0);
  if (s) return bl__end(&r, s, st);
  ad_tensor *w[NN_MAX_PARAMS], *glam[NN_MAX_PARAMS];
  bl_state os = {0};
  s = bl__w0_copy(&r, w);
  if (!s) s = bl__state_new(&r, &os);
  if (!s) s = bl__run_inplace(&r, r.lam, w, &os, 0, p->inner_steps);
  if (!s) s = bl__val_grad(&r, r.lam, w, NULL, NULL, glam);
  if (!s) s = bl__write_hg(&r, glam, hg);
  return bl__end(&r, s, st);
}
