/* maml.c — MAML and first-order MAML (Finn et al. 2017).
 *
 * For each task i, k SGD steps on the support loss adapt the
 * meta-parameters,
 *   phi_0 = theta,  phi_{s+1} = phi_s - alpha grad L_support,i(phi_s),
 * and the meta-loss is the mean query loss L_query,i(phi_k). Its gradient
 * by the chain rule is
 *   d L_query(phi_k)/d theta = prod_s (I - alpha H_support(phi_s)) grad L_query(phi_k)
 * (product taken from s = k-1 down to 0, transposed — H is symmetric).
 *   maml:   records each inner gradient (AD_GRAD_RECORD), so the reverse
 *           sweep from L_query goes back through the backward passes and
 *           produces the Hessian terms exactly;
 *   fomaml: takes the inner gradients unrecorded (constants, a stop-
 *           gradient), so dphi_k/dtheta = I and the meta-gradient is the mean
 *           of grad L_query(phi_k): no second-order term, half the cost.
 * Each task is recorded, differentiated and rewound before the next, so the
 * arena holds one task's graph at a time. */
#include "implicit_internal.h"

static ad_status maml_common(ad_tape *t, const bl_meta_problem *p, const bl_opts *o,
                             ad_tensor *const *mg, bl_stats *st, int second_order,
                             const char *who) {
  bl_meta_run r;
  ad_status s = bl__meta_begin(&r, who, t, p, o, mg, 1, 0);
  int n = s ? 0 : p->n_theta;
  ad_tensor *phi[NN_MAX_PARAMS], *g[NN_MAX_PARAMS], *gq[NN_MAX_PARAMS];
  unsigned flags = second_order ? AD_GRAD_RECORD : 0;
  for (int task = 0; !s && task < p->n_tasks; task++) {
    ad_marker mk = ad_mark(t);
    for (int i = 0; i < n; i++) phi[i] = r.theta[i];
    for (int64_t k = 0; !s && k < p->inner_steps; k++) {
      ad_tensor *L = bl__task_loss(&r, p->support_loss, "support_loss", phi, task);
      s = L ? ad_grad(t, 1, &L, NULL, n, phi, g, flags) : ad_tape_status(t);
      /* phi - alpha g: recorded (phi depends on theta); g carries history
       * only in second-order mode. */
      for (int i = 0; !s && i < n; i++) {
        phi[i] = ad_axpy(t, phi[i], -p->inner_lr, g[i]);
        if (!phi[i]) s = ad_tape_status(t);
      }
      r.base.st.inner_steps++;
    }
    ad_tensor *Lq = s ? NULL : bl__task_loss(&r, p->query_loss, "query_loss", phi, task);
    if (!s && !Lq) s = ad_tape_status(t);
    if (!s) s = ad_grad(t, 1, &Lq, NULL, n, r.theta, gq, 0);
    if (!s) {
      bl__axpy(n, r.acc, 1.0, gq);
      r.loss_sum += ad_item(Lq);
    }
    ad_rewind(t, mk);
  }
  return bl__meta_end(&r, s, mg, st);
}

ad_status bl_maml(ad_tape *t, const bl_meta_problem *p, const bl_opts *o,
                  ad_tensor *const *meta_grad, bl_stats *st) {
  return maml_common(t, p, o, meta_grad, st, 1, "bl_maml");
}

ad_status bl_fomaml(ad_tape *t, const bl_meta_problem *p, const bl_opts *o,
                    ad_tensor *const *meta_grad, bl_stats *st) {
  return maml_common(t, p, o, meta_grad, st, 0, "bl_fomaml");
}
