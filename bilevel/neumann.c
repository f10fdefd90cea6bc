/* neumann.c — implicit hypergradient with a truncated Neumann series
 * (Lorraine et al. 2020):
 *   H^{-1} = alpha sum_{j>=0} (I - alpha H)^j     when 0 < alpha < 2/lambda_max,
 *   v = alpha sum_{j=0}^{K} (I - alpha H)^j b,    b = grad_w L_val(w_T),
 *   hg = dL_val/dlam|direct - (d^2 L_train / dlam dw) v.
 * Each term costs one Hessian-vector product: q <- q - alpha H q, v += q.
 * The error after K terms is alpha sum_{j>K} (I - alpha H)^j b, which shrinks
 * like (1 - alpha mu)^K (mu the smallest eigenvalue): slow for
 * ill-conditioned H, and it is the same iterate as K steps of the inner SGD's
 * own linearisation. No residual is computed (st->residual = NAN). A
 * series whose terms grow past 2 ||b|| (alpha too large) is an
 * AD_ERR_NUMERIC naming the iteration, not a result. */
#include "implicit_internal.h"

#include <math.h>

ad_status bl_neumann(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                     bl_stats *st) {
  bl_run r;
  bl_imp m;
  ad_tensor *v[NN_MAX_PARAMS], *q[NN_MAX_PARAMS];
  ad_status s = bl__begin(&r, "bl_neumann", t, p, o, hg, 0);
  if (!s) s = bl__imp_begin(&m, &r);
  if (!s) s = bl__copy_new(&r, m.n, m.b, v); /* v = q = b: the j = 0 term */
  if (!s) s = bl__copy_new(&r, m.n, m.b, q);
  double alpha = 0;
  if (!s) s = bl__alpha(&r, &alpha);
  if (!s) {
    int64_t K = BL_OPT(&r, K, 20);
    double bn = bl__norm(m.n, m.b);
    for (int64_t j = 1; j <= K && !s; j++) {
      /* q = (I - alpha H)^j b, v += q, and ||q||^2: the product's sweep,
       * then one pass for the rest. */
      double qq = 0;
      s = bl__imp_neumann_term(&m, q, v, alpha, &qq);
      if (s) break;
      double qn = sqrt(qq);
      r.st.iterations++;
      /* With H positive semi-definite and 0 < alpha < 2/lambda_max every
       * eigenvalue of I - alpha H lies in (-1, 1], so ||q_j|| never grows.
       * Growth past 2 ||b|| means the series diverges (alpha too large, or
       * H indefinite at w_T): an error, not a huge hypergradient. */
      if (!isfinite(qn) || qn > 2 * bn)
        s = bl__fail(&r, AD_ERR_NUMERIC,
                     "the series diverges at solver iteration %lld: ||(I - alpha H)^j b|| = %g "
                     "> 2 ||b|| = %g (alpha = %g is past 2 / lambda_max(H), or H is not "
                     "positive semi-definite at w_T: lower o->alpha)",
                     (long long)j, qn, 2 * bn, alpha);
    }
    bl__scale(m.n, v, alpha);
    r.st.residual = NAN;
  }
  if (!s) s = bl__imp_finish(&m, v, hg);
  return bl__end(&r, s, st);
}
