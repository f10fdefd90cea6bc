/* one_step.c — the one-step hypergradient: the chain rule's sum cut to its
 * last term,
 *   g = dL_val/dlam |_{w_T} + alpha_T B_T,
 *   alpha_T = grad_w L_val(w_T),  B_T = dPhi/dlam at the last step
 *   (from w_{T-1} and the optimizer state s_{T-1}, both held fixed),
 * i.e. HyperDistill with gamma = 0 (and the K = 1 truncated unroll). Needs
 * T >= 1. B_T comes from the tape: one VJP of the recorded last step. */
#include "bl_internal.h"

ad_status bl_one_step(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                      bl_stats *st) {
  bl_run r;
  ad_status s = bl__begin(&r, "bl_one_step", t, p, o, hg, 1);
  if (s) return bl__end(&r, s, st);
  int n_lam = p->n_lam;
  int64_t T = p->inner_steps;
  ad_tensor *w[NN_MAX_PARAMS], *w_prev[NN_MAX_PARAMS], *gw[NN_MAX_PARAMS], *glam[NN_MAX_PARAMS];
  ad_tensor *aB[NN_MAX_PARAMS];
  bl_state os = {0}, os_prev = {0};
  /* w_{T-1}, s_{T-1} kept; one more step in place gives w_T; alpha_T and
   * the direct term at w_T. */
  s = bl__run_keep_last(&r, w, w_prev, &os, &os_prev, gw, glam);
  /* alpha_T B_T: VJP of the step w_{T-1} -> w_T with cotangent alpha_T */
  if (!s) s = bl__step_vjp(&r, w_prev, &os_prev, T - 1, gw, NULL, aB, NULL, NULL);
  if (!s) {
    bl__axpy(n_lam, glam, 1.0, aB);
    s = bl__write_hg(&r, glam, hg);
  }
  return bl__end(&r, s, st);
}
