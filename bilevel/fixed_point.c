/* fixed_point.c — implicit hypergradient by fixed-point (Richardson)
 * iteration on the linear system (Grazzi et al. 2020):
 *   v <- v - alpha (H v - b),  v_0 = 0,  b = grad_w L_val(w_T),
 *   hg = dL_val/dlam|direct - (d^2 L_train / dlam dw) v.
 * The map is a contraction when 0 < alpha < 2/lambda_max(H). From v_0 = 0
 * the iterates are the Neumann partial sums; what this form adds is the
 * residual r = b - H v at every step for free, so it stops at
 * ||r|| <= tol ||b|| and reports the residual. One product per step. */
#include "implicit_internal.h"

#include <math.h>

ad_status bl_fixed_point(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                         bl_stats *st) {
  bl_run r;
  bl_imp m;
  ad_tensor *v[NN_MAX_PARAMS], *res[NN_MAX_PARAMS];
  ad_status s = bl__begin(&r, "bl_fixed_point", t, p, o, hg, 0);
  if (!s) s = bl__imp_begin(&m, &r);
  if (!s) s = bl__zeros_new(&r, m.n, m.w, v);
  if (!s) s = bl__copy_new(&r, m.n, m.b, res); /* r_0 = b - H 0 */
  if (!s) {
    double alpha = BL_OPT(&r, alpha, bl__lr(&r.opt.cfg));
    double tol = BL_OPT(&r, tol, 1e-10), bn = bl__norm(m.n, m.b);
    int64_t K = BL_OPT(&r, K, 20);
    /* K products: v_1 = alpha b needs none, then each step one. */
    bl__axpy(m.n, v, alpha, res);
    r.st.iterations = 1;
    r.st.residual = bn;
    for (int64_t k = 0; k < K && !s; k++) {
      s = bl__imp_apply(&m, v, res); /* res = H v */
      if (s) break;
      bl__imp_lincomb(m.n, res, 1.0, m.b, -1.0, res); /* res = b - H v */
      r.st.residual = sqrt(bl__imp_dot(m.n, res, res));
      if (r.st.residual <= tol * bn) break;
      bl__axpy(m.n, v, alpha, res);
      r.st.iterations++;
    }
  }
  if (!s) s = bl__imp_finish(&m, v, hg);
  return bl__end(&r, s, st);
}
