/* imaml.c — implicit MAML (Rajeswaran et al. 2019).
 *
 * Each task adapts by solving a proximal problem anchored at theta,
 *   phi_i = argmin_phi  L_support,i(phi) + (lambda/2) ||phi - theta||^2,
 * here by inner_steps steps of the adaptation rule (plain SGD at inner_lr,
 * the optimizer opt, or a user step) from phi = theta. At the
 * solution grad L_support(phi_i) + lambda (phi_i - theta) = 0;
 * differentiating in theta (implicit function theorem) gives
 *   d phi_i / d theta = (I + H_i / lambda)^{-1},   H_i = Hessian of L_support,i at phi_i,
 * so the task's meta-gradient is the solution x of
 *   (I + H_i / lambda) x = grad L_query,i(phi_i),
 * found by CG with Hessian-vector products (o->K, default 20; o->tol,
 * default 1e-10). Nothing of the inner path is recorded: memory does not
 * grow with inner_steps, and the answer depends only on phi_i, not on how
 * it was reached (exact when the inner problem is solved exactly). */
#include "implicit_internal.h"

typedef struct {
  ad_tape *t;
  bl_meta_run *r;
  int n;
  ad_tensor **phi, **g; /* phi* (leaves) and grad L_support recorded there */
  double prox;
} task_op;

/* out = v + H v / lambda */
static ad_status prox_op(void *ctx, ad_tensor *const *v, ad_tensor *const *out) {
  task_op *a = ctx;
  ad_tensor *hv[NN_MAX_PARAMS];
  ad_marker mk = ad_mark(a->t);
  ad_status s = ad_grad(a->t, a->n, a->g, v, a->n, a->phi, hv, 0);
  if (!s) {
    bl__imp_lincomb(a->n, out, 1.0, v, 1.0 / a->prox, hv);
    a->r->base.st.hvps++;
  }
  ad_rewind(a->t, mk);
  return s;
}

/* The proximal solve: inner_steps steps of the adaptation rule with
 *   g = grad L_support(phi) + lambda (phi - theta),
 * in place and unrecorded (each step rewound), from phi = theta and a zero
 * state. Any rule whose fixed points are the zeros of g (SGD, momentum,
 * Adam, a user's descent rule) ends at the same phi*, which is all the
 * meta-gradient below depends on. */
static ad_status inner_solve(bl_meta_run *r, int task, ad_tensor *const *phi) {
  const bl_meta_problem *p = r->p;
  ad_tape *t = r->base.t;
  int n = p->n_theta, ns = r->step.slots * n;
  ad_tensor *g[NN_MAX_PARAMS], *state[BL_STEP_MAX_SLOTS * NN_MAX_PARAMS];
  ad_tensor *phi_new[NN_MAX_PARAMS], *state_new[BL_STEP_MAX_SLOTS * NN_MAX_PARAMS];
  ad_status s = bl__meta_state_new(r, state);
  for (int64_t k = 0; !s && k < p->inner_steps; k++) {
    ad_marker mk = ad_mark(t);
    ad_tensor *L = bl__task_loss(r, p->support_loss, "support_loss", phi, task);
    s = L ? ad_grad(t, 1, &L, NULL, n, phi, g, 0) : ad_tape_status(t);
    if (!s) {
      bl__axpy(n, g, p->prox, phi);       /* g + lambda phi */
      bl__axpy(n, g, -p->prox, r->theta); /*   - lambda theta */
      int rec = ad_set_recording(t, 0);   /* values only: nothing differentiates the path */
      s = bl__meta_step(r, phi, state, g, k, phi_new, state_new);
      ad_set_recording(t, rec);
    }
    if (!s) {
      bl__copy_list(n, phi, phi_new);
      bl__copy_list(ns, state, state_new);
    }
    ad_rewind(t, mk);
    if (!s) r->base.st.inner_steps++;
  }
  return s;
}

ad_status bl_imaml(ad_tape *t, const bl_meta_problem *p, const bl_opts *o,
                   ad_tensor *const *meta_grad, bl_stats *st) {
  bl_meta_run r;
  ad_status s = bl__meta_begin(&r, "bl_imaml", t, p, o, meta_grad, 0, 1);
  int n = s ? 0 : p->n_theta;
  int64_t K = s ? 0 : BL_OPT(&r.base, K, 20);
  double tol = s ? 0 : BL_OPT(&r.base, tol, 1e-10);
  ad_tensor *phi[NN_MAX_PARAMS], *g[NN_MAX_PARAMS], *gq[NN_MAX_PARAMS], *x[NN_MAX_PARAMS];
  for (int task = 0; !s && task < p->n_tasks; task++) {
    ad_marker mk = ad_mark(t);
    s = bl__leaf_new(&r.base, n, r.theta, phi);
    if (!s) s = inner_solve(&r, task, phi);
    /* grad L_query at phi*, then grad L_support recorded for the products. */
    ad_tensor *Lq = s ? NULL : bl__task_loss(&r, p->query_loss, "query_loss", phi, task);
    if (!s && !Lq) s = ad_tape_status(t);
    if (!s) s = ad_grad(t, 1, &Lq, NULL, n, phi, gq, 0);
    ad_tensor *Ls = s ? NULL : bl__task_loss(&r, p->support_loss, "support_loss", phi, task);
    if (!s && !Ls) s = ad_tape_status(t);
    if (!s) s = ad_grad(t, 1, &Ls, NULL, n, phi, g, AD_GRAD_RECORD);
    if (!s) s = bl__zeros_new(&r.base, n, phi, x);
    if (!s) {
      task_op a = {t, &r, n, phi, g, p->prox};
      bl_cg_info info;
      s = bl__cg(t, n, prox_op, &a, gq, x, K, tol, 0, &info);
      r.base.st.iterations += info.iterations;
      if (info.residual > r.base.st.residual) r.base.st.residual = info.residual;
    }
    if (!s) {
      bl__axpy(n, r.acc, 1.0, x);
      r.loss_sum += ad_item(Lq);
    }
    ad_rewind(t, mk);
  }
  return bl__meta_end(&r, s, meta_grad, st);
}
