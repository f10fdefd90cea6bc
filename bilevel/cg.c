/* cg.c — implicit hypergradient with conjugate gradients (Pedregosa 2016;
 * Rajeswaran et al. 2019):
 *   solve  H v = grad_w L_val(w_T)  by CG (H symmetric; CG needs it
 *   positive definite, which a regularised minimum gives),
 *   hg = dL_val/dlam|direct - (d^2 L_train / dlam dw) v.
 * In exact arithmetic CG is exact after dim(w) iterations; in practice a
 * few tens reach the accuracy the inner solve allows. */
#include "implicit_internal.h"

ad_status bl_cg(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                bl_stats *st) {
  bl_run r;
  bl_imp m;
  bl_cg_info info;
  ad_tensor *v[NN_MAX_PARAMS];
  ad_status s = bl__begin(&r, "bl_cg", t, p, o, hg, 0);
  if (!s) s = bl__imp_begin(&m, &r);
  if (!s) s = bl__zeros_new(&r, m.n, m.w, v);
  if (!s) s = bl__imp_cg(&m, v, BL_OPT(&r, K, 20), BL_OPT(&r, tol, 1e-10), 0, &info);
  if (!s) s = bl__imp_finish(&m, v, hg);
  return bl__end(&r, s, st);
}
