/* maml.c — MAML and first-order MAML (Finn et al. 2017), with any
 * adaptation step (Meta-SGD, Li et al. 2017, among them).
 *
 * For each task i, k steps of the adaptation rule Phi (plain SGD, a library
 * optimizer or a user bl_step; state s) on the support loss adapt the
 * meta-parameters,
 *   phi_0 = theta,  s_0 = 0,
 *   (phi_{j+1}, s_{j+1}) = Phi(phi_j, s_j, g_j, lam, j),  g_j = grad L_support,i(phi_j),
 * and the meta-loss is the mean query loss L_query,i(phi_k). For plain SGD
 * its gradient by the chain rule is
 *   d L_query(phi_k)/d theta = prod_j (I - alpha H_support(phi_j)) grad L_query(phi_k)
 * (product taken from j = k-1 down to 0, transposed — H is symmetric); for
 * other rules the reverse sweep walks Phi's own derivative the same way,
 * and reaches lam (the step's hyperparameters, Meta-SGD's rates) through
 * every step that reads it.
 *   maml:   records each inner gradient (AD_GRAD_RECORD), so the reverse
 *           sweep from L_query goes back through the backward passes and
 *           produces the Hessian terms exactly;
 *   fomaml: takes the inner gradients unrecorded (constants, a stop-
 *           gradient): the sweep still goes through Phi, but never into
 *           g_j, so no Hessian term appears (for SGD dphi_k/dtheta = I and
 *           the meta-gradient is the mean of grad L_query(phi_k); for a
 *           Meta-SGD rate alpha, -grad L_query(phi_k) * sum_j g_j).
 * Each task is adapted, differentiated and rewound before the next, so the
 * arena holds one task's graph at a time; with the batched losses
 * (p->support_batch, maml_batched below) each batch of tasks runs as one
 * graph. */
#include "implicit_internal.h"

/* phi = Adapt_task(theta, lam): k recorded steps from the theta views.
 * flags: AD_GRAD_RECORD (second order) or 0 (first order). */
static ad_status adapt(bl_meta_run *r, int task, unsigned flags, ad_tensor **phi) {
  const bl_meta_problem *p = r->p;
  ad_tape *t = r->base.t;
  int n = p->n_theta, ns = r->step.slots * n;
  ad_tensor *g[NN_MAX_PARAMS], *state[BL_STEP_MAX_SLOTS * NN_MAX_PARAMS];
  ad_tensor *phi_new[NN_MAX_PARAMS], *state_new[BL_STEP_MAX_SLOTS * NN_MAX_PARAMS];
  for (int i = 0; i < n; i++) phi[i] = r->theta[i];
  ad_status s = bl__meta_state_new(r, state);
  for (int64_t k = 0; !s && k < p->inner_steps; k++) {
    ad_tensor *L = bl__task_loss(r, p->support_loss, "support_loss", phi, task);
    s = L ? ad_grad(t, 1, &L, NULL, n, phi, g, flags) : ad_tape_status(t);
    /* The step is recorded (phi depends on theta, and lam may enter); g
     * carries history only in second-order mode. */
    if (!s) s = bl__meta_step(r, phi, state, g, k, phi_new, state_new);
    if (!s) {
      for (int i = 0; i < n; i++) phi[i] = phi_new[i];
      for (int j = 0; j < ns; j++) state[j] = state_new[j];
      r->base.st.inner_steps++;
    }
  }
  return s;
}

/* The batched path (p->support_batch set): batch_tasks tasks at a time
 * (all by default). phi = theta stacked over the batch, the same steps on
 * the stacked tensors (the gradient of the summed support loss is each
 * task's own gradient, at its index), one summed query loss, one reverse
 * sweep: the broadcast that stacked theta sums the tasks' meta-gradients
 * on its way back. The same arithmetic as the per-task loop, in batch
 * times fewer ops. */
static ad_status maml_batch(bl_meta_run *r, int task0, int nb, unsigned flags) {
  const bl_meta_problem *p = r->p;
  ad_tape *t = r->base.t;
  int n = p->n_theta, ns = r->step.slots * n;
  ad_tensor *phi[NN_MAX_PARAMS], *g[NN_MAX_PARAMS], *state[BL_STEP_MAX_SLOTS * NN_MAX_PARAMS];
  ad_tensor *phi_new[NN_MAX_PARAMS], *state_new[BL_STEP_MAX_SLOTS * NN_MAX_PARAMS];
  ad_tensor *meta[2 * NN_MAX_PARAMS], *gq[2 * NN_MAX_PARAMS];
  ad_marker mk = ad_mark(t);
  ad_status s = bl__meta_batch_begin(r, nb, phi, state);
  for (int64_t k = 0; !s && k < p->inner_steps; k++) {
    ad_tensor *L = bl__batch_loss(r, p->support_batch, "support_batch", phi, task0, nb);
    s = L ? ad_grad(t, 1, &L, NULL, n, phi, g, flags) : ad_tape_status(t);
    if (!s) s = bl__meta_step(r, phi, state, g, k, phi_new, state_new);
    if (!s) {
      for (int i = 0; i < n; i++) phi[i] = phi_new[i];
      for (int j = 0; j < ns; j++) state[j] = state_new[j];
      r->base.st.inner_steps += nb;
    }
  }
  ad_tensor *Lq = s ? NULL : bl__batch_loss(r, p->query_batch, "query_batch", phi, task0, nb);
  if (!s && !Lq) s = ad_tape_status(t);
  for (int i = 0; i < n; i++) meta[i] = r->theta[i];
  for (int k = 0; k < p->n_lam; k++) meta[n + k] = r->lam[k];
  if (!s) s = ad_grad(t, 1, &Lq, NULL, r->n_meta, meta, gq, 0);
  if (!s) {
    bl__axpy(r->n_meta, r->acc, 1.0, gq);
    r->loss_sum += ad_item(Lq);
  }
  ad_rewind(t, mk);
  return s;
}

static ad_status maml_batched(bl_meta_run *r, unsigned flags) {
  int T = r->p->n_tasks, B = r->p->batch_tasks > 0 ? r->p->batch_tasks : T;
  ad_status s = AD_OK;
  for (int t0 = 0; !s && t0 < T; t0 += B) s = maml_batch(r, t0, T - t0 < B ? T - t0 : B, flags);
  return s;
}

static ad_status maml_common(ad_tape *t, const bl_meta_problem *p, const bl_opts *o,
                             ad_tensor *const *mg, bl_stats *st, int second_order,
                             const char *who) {
  bl_meta_run r;
  ad_status s = bl__meta_begin(&r, who, t, p, o, mg, 1, 0);
  int n = s ? 0 : p->n_theta;
  ad_tensor *phi[NN_MAX_PARAMS], *meta[2 * NN_MAX_PARAMS], *gq[2 * NN_MAX_PARAMS];
  for (int i = 0; i < n; i++) meta[i] = r.theta[i];
  for (int k = 0; !s && k < p->n_lam; k++) meta[n + k] = r.lam[k];
  if (!s && r.batched)
    return bl__meta_end(&r, maml_batched(&r, second_order ? AD_GRAD_RECORD : 0), mg, st);
  for (int task = 0; !s && task < p->n_tasks; task++) {
    ad_marker mk = ad_mark(t);
    s = adapt(&r, task, second_order ? AD_GRAD_RECORD : 0, phi);
    ad_tensor *Lq = s ? NULL : bl__task_loss(&r, p->query_loss, "query_loss", phi, task);
    if (!s && !Lq) s = ad_tape_status(t);
    if (!s) s = ad_grad(t, 1, &Lq, NULL, r.n_meta, meta, gq, 0);
    if (!s) {
      bl__axpy(r.n_meta, r.acc, 1.0, gq);
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
