/* meta_common.c — the run scope of the meta-learning methods (maml.c,
 * imaml.c): checks, arena mark, leaf views of theta, the accumulated
 * meta-gradient, and the exit that writes it. */
#include "implicit_internal.h"

#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------- step providers
 * The adaptation rules the library supplies, as bl_step_fn like a user's,
 * so the methods call one interface whatever the rule. */

/* Plain SGD: phi' = phi - alpha g (ctx: the double alpha). One ad_axpy per
 * parameter, the same op the methods used before the interface existed. */
static ad_status sgd_provider(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *state,
                              ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                              ad_tensor **w_new, ad_tensor **state_new) {
  (void)state, (void)lam, (void)step, (void)state_new;
  double alpha = *(const double *)ctx;
  for (int i = 0; i < n; i++)
    if (!(w_new[i] = ad_axpy(t, w[i], -alpha, g[i]))) return ad_tape_status(t);
  return AD_OK;
}

/* ---------------------------------------------------------------- checks */

static int all_finite(const ad_tensor *x, int64_t *bad) {
  for (int64_t e = 0; e < x->size; e++) {
    double v = ad_get(x, e);
    if (!isfinite(v)) {
      *bad = e;
      return 0;
    }
  }
  return 1;
}

/* A learnable rate or decay variable of the optimizer: size 1 or theta[i]'s
 * size, finite (either sign: Meta-SGD learns directions too). */
static ad_status check_var(bl_run *b, const ad_tensor *v, const char *field, int i,
                           const ad_tensor *like) {
  char a[96], c[96], nm[48];
  if (i >= 0)
    snprintf(nm, sizeof nm, "%s[%d]", field, i);
  else
    snprintf(nm, sizeof nm, "%s", field);
  if (!v) return AD_OK;
  if (v->size != 1 && (!like || v->size != like->size)) {
    if (like)
      return bl__fail(b, AD_ERR_SHAPE, "%s is %s but theta[%d] is %s (size 1 or theta's size)", nm,
                      ad_shape_str(v, a, sizeof a), i, ad_shape_str(like, c, sizeof c));
    return bl__fail(b, AD_ERR_SHAPE, "%s is %s; it must have size 1", nm,
                    ad_shape_str(v, a, sizeof a));
  }
  int64_t e;
  if (!all_finite(v, &e))
    return bl__fail(b, AD_ERR_ARG, "%s element %lld is %g", nm, (long long)e, ad_get(v, e));
  return AD_OK;
}

static ad_status check_opt(bl_meta_run *r, const nn_opt_cfg *c, int imaml) {
  bl_run *b = &r->base;
  const bl_meta_problem *p = r->p;
  if (!isfinite(c->lr) || c->lr < 0)
    return bl__fail(b, AD_ERR_ARG, "opt->lr is %g; it must be finite and >= 0", c->lr);
  ad_status s = check_var(b, c->lr_var, "opt->lr_var", -1, NULL);
  if (!s) s = check_var(b, c->momentum_var, "opt->momentum_var", -1, NULL);
  if (!s) s = check_var(b, c->weight_decay_var, "opt->weight_decay_var", -1, NULL);
  for (int i = 0; !s && i < p->n_theta; i++) {
    if (c->lr_vars) s = check_var(b, c->lr_vars[i], "opt->lr_vars", i, p->theta[i]);
    if (!s && c->weight_decay_vars)
      s = check_var(b, c->weight_decay_vars[i], "opt->weight_decay_vars", i, p->theta[i]);
  }
  if (s) return s;
  /* The decay is added to g, so it moves the point the proximal solve
   * converges to, and the (I + H/prox) system would no longer describe it. */
  if (imaml && (c->weight_decay != 0 || c->weight_decay_var || c->weight_decay_vars))
    return bl__fail(b, AD_ERR_ARG,
                    "opt has weight decay, which moves iMAML's fixed point; put the "
                    "regulariser into support_loss");
  return AD_OK;
}

/* Whether opt's variables read x. */
static int opt_reads(const nn_opt_cfg *c, int n, const ad_tensor *x) {
  if (!c) return 0;
  if (c->lr_var == x || c->momentum_var == x || c->weight_decay_var == x) return 1;
  for (int i = 0; i < n; i++)
    if ((c->lr_vars && c->lr_vars[i] == x) ||
        (c->weight_decay_vars && c->weight_decay_vars[i] == x))
      return 1;
  return 0;
}

static ad_status check_adaptation(bl_meta_run *r, int imaml) {
  bl_run *b = &r->base;
  const bl_meta_problem *p = r->p;
  if (p->step.fn && p->opt)
    return bl__fail(b, AD_ERR_ARG, "both step.fn and opt are set; give one adaptation rule");
  if (!p->step.fn && !p->opt) {
    if (!(p->inner_lr > 0) || !isfinite(p->inner_lr))
      return bl__fail(b, AD_ERR_ARG, "inner_lr is %g; it must be > 0", p->inner_lr);
    return AD_OK;
  }
  if (p->inner_lr != 0)
    return bl__fail(b, AD_ERR_ARG,
                    "inner_lr is %g but the adaptation is %s; give the step size there "
                    "(inner_lr must be 0)",
                    p->inner_lr, p->step.fn ? "step.fn" : "opt");
  if (p->step.fn) {
    if (p->step.slots < 0 || p->step.slots > BL_STEP_MAX_SLOTS)
      return bl__fail(b, AD_ERR_ARG, "step.slots is %d (0..%d allowed)", p->step.slots,
                      BL_STEP_MAX_SLOTS);
    return AD_OK;
  }
  return check_opt(r, p->opt, imaml);
}

static ad_status check_lam_read(bl_meta_run *r) {
  bl_run *b = &r->base;
  const bl_meta_problem *p = r->p;
  /* Without a user step only opt's variables can read lam: a tensor they
   * do not point at would silently get a zero meta-gradient. */
  for (int k = 0; !p->step.fn && k < p->n_lam; k++)
    if (!opt_reads(p->opt, p->n_theta, p->lam[k]))
      return bl__fail(b, AD_ERR_ARG,
                      "lam[%d] is read by nothing: without a user step only opt's *_var / "
                      "*_vars fields can point at it, and none does",
                      k);
  return AD_OK;
}

static ad_status check_lam(bl_meta_run *r, ad_tensor *const *mg, int imaml) {
  bl_run *b = &r->base;
  const bl_meta_problem *p = r->p;
  if (p->n_lam < 0 || p->n_lam > NN_MAX_PARAMS)
    return bl__fail(b, AD_ERR_ARG, "n_lam is %d (0..%d allowed)", p->n_lam, NN_MAX_PARAMS);
  if (p->n_lam == 0) return AD_OK;
  if (imaml)
    return bl__fail(b, AD_ERR_ARG,
                    "n_lam is %d, but iMAML differentiates at the adaptation's fixed point, "
                    "which does not depend on the step's hyperparameters (their meta-gradient "
                    "is 0 there); learn them (Meta-SGD rates and the like) with bl_maml or "
                    "bl_fomaml",
                    p->n_lam);
  if (!p->lam) return bl__fail(b, AD_ERR_NULL, "lam is NULL but n_lam is %d", p->n_lam);
  for (int k = 0; k < p->n_lam; k++) {
    ad_tensor *l = p->lam[k], *g = mg[p->n_theta + k];
    char a[96], c[96];
    if (!l || !g)
      return bl__fail(b, AD_ERR_NULL, "lam[%d] or meta_grad[%d] is NULL", k, p->n_theta + k);
    if (l->dtype != p->theta[0]->dtype)
      return bl__fail(b, AD_ERR_DTYPE, "lam[%d] is %s but theta[0] is %s", k,
                      ad_dtype_name(l->dtype), ad_dtype_name(p->theta[0]->dtype));
    if (!ad_same_shape(g, l))
      return bl__fail(b, AD_ERR_SHAPE, "meta_grad[%d] is %s but lam[%d] is %s", p->n_theta + k,
                      ad_shape_str(g, a, sizeof a), k, ad_shape_str(l, c, sizeof c));
    for (int i = 0; i < p->n_theta; i++)
      if (l == p->theta[i])
        return bl__fail(b, AD_ERR_ARG, "lam[%d] is theta[%d]; a tensor is one or the other", k, i);
    int64_t e;
    if (!all_finite(l, &e))
      return bl__fail(b, AD_ERR_ARG, "lam[%d] element %lld is %g", k, (long long)e, ad_get(l, e));
  }
  return AD_OK;
}

static ad_status check_meta(bl_meta_run *r, const bl_meta_problem *p, ad_tensor *const *mg,
                            int64_t min_steps, int imaml) {
  bl_run *b = &r->base;
  if (!p) return bl__fail(b, AD_ERR_NULL, "problem is NULL");
  int n_batch = (p->support_batch != NULL) + (p->query_batch != NULL);
  if (n_batch == 1)
    return bl__fail(b, AD_ERR_ARG, "%s is set but %s is NULL; give both batched losses or neither",
                    p->support_batch ? "support_batch" : "query_batch",
                    p->support_batch ? "query_batch" : "support_batch");
  if ((!p->support_loss || !p->query_loss) && (imaml || !n_batch))
    return bl__fail(b, AD_ERR_NULL, "support_loss or query_loss callback is NULL%s",
                    n_batch ? " (bl_imaml has no batched path: it needs the per-task losses)" : "");
  if (p->n_theta <= 0 || p->n_theta > NN_MAX_PARAMS)
    return bl__fail(b, AD_ERR_ARG, "theta: %d tensors (1..%d allowed)", p->n_theta, NN_MAX_PARAMS);
  if (!p->theta || !mg) return bl__fail(b, AD_ERR_NULL, "theta or the output is NULL");
  for (int i = 0; i < p->n_theta; i++) {
    if (!p->theta[i] || !mg[i])
      return bl__fail(b, AD_ERR_NULL, "theta[%d] or meta_grad[%d] is NULL", i, i);
    if (p->theta[i]->dtype != p->theta[0]->dtype)
      return bl__fail(b, AD_ERR_DTYPE, "theta[%d] is %s but theta[0] is %s", i,
                      ad_dtype_name(p->theta[i]->dtype), ad_dtype_name(p->theta[0]->dtype));
    if (!ad_same_shape(mg[i], p->theta[i])) {
      char a[96], c[96];
      return bl__fail(b, AD_ERR_SHAPE, "meta_grad[%d] is %s but theta[%d] is %s", i,
                      ad_shape_str(mg[i], a, sizeof a), i, ad_shape_str(p->theta[i], c, sizeof c));
    }
  }
  if (p->n_tasks <= 0) return bl__fail(b, AD_ERR_ARG, "n_tasks is %d", p->n_tasks);
  if (p->batch_tasks < 0)
    return bl__fail(b, AD_ERR_ARG, "batch_tasks is %d (>= 0; 0 = all tasks)", p->batch_tasks);
  /* The batched path adds a leading task axis to every theta[i]. */
  for (int i = 0; n_batch && !imaml && i < p->n_theta; i++)
    if (p->theta[i]->ndim > AD_MAX_DIMS - 1) {
      char a[96];
      return bl__fail(b, AD_ERR_SHAPE,
                      "theta[%d] is %s; the batched losses stack theta over tasks, which needs "
                      "at most %d dimensions",
                      i, ad_shape_str(p->theta[i], a, sizeof a), AD_MAX_DIMS - 1);
    }
  ad_status s = check_lam(r, mg, imaml);
  if (!s) s = check_adaptation(r, imaml);
  if (!s) s = check_lam_read(r);
  if (s) return s;
  if (p->inner_steps < min_steps)
    return bl__fail(b, AD_ERR_ARG, "inner_steps is %lld; at least %lld needed",
                    (long long)p->inner_steps, (long long)min_steps);
  if (imaml && (!(p->prox > 0) || !isfinite(p->prox)))
    return bl__fail(b, AD_ERR_ARG, "prox is %g; iMAML needs prox > 0", p->prox);
  if (b->o.K < 0 || b->o.tol < 0)
    return bl__fail(b, AD_ERR_ARG, "K (%lld) and tol (%g) must be >= 0", (long long)b->o.K,
                    b->o.tol);
  return AD_OK;
}

/* ---------------------------------------------------------------- run scope */

/* r->step: the user's rule, or the provider for opt / plain SGD. Which
 * buffers the optimizer keeps is asked of nn itself (the state it makes),
 * so a new optimizer kind needs nothing here. */
static ad_status resolve_step(bl_meta_run *r) {
  const bl_meta_problem *p = r->p;
  if (p->step.fn) {
    r->step = p->step;
    if (!r->step.name) r->step.name = "user step";
    return AD_OK;
  }
  if (p->opt) {
    /* bl__cfg_map's view of a problem: the same mapping rule as bl_problem. */
    bl_problem q = {.n_w = p->n_theta, .n_lam = p->n_lam, .lam = p->lam, .opt = *p->opt};
    bl__cfg_map(&q, r->lam, &r->opt.map);
    nn_opt_state s;
    ad_status st = bl__nn(
        &r->base, nn_opt_state_init_tape(r->base.t, &r->opt.map.cfg, &s, p->n_theta, r->theta));
    if (st) return st;
    r->opt.uses_m = s.m[0] != NULL;
    r->opt.uses_v = s.v[0] != NULL;
    /* step.c's provider with the cfg fixed: the state list is m (slot 0, if
     * kept) then v, at step count `step`, so Adam's bias correction sees
     * k = step + 1 as in a plain run. */
    r->step = (bl_step){.fn = bl__cfg_step,
                        .slots = r->opt.uses_m + r->opt.uses_v,
                        .ctx = &r->opt.map.cfg,
                        .name = "opt"};
    return AD_OK;
  }
  r->lr = p->inner_lr;
  r->step = (bl_step){.fn = sgd_provider, .slots = 0, .ctx = &r->lr, .name = "plain SGD"};
  return AD_OK;
}

ad_status bl__meta_begin(bl_meta_run *r, const char *who, ad_tape *t, const bl_meta_problem *p,
                         const bl_opts *o, ad_tensor *const *mg, int64_t min_steps, int imaml) {
  memset(r, 0, sizeof *r);
  bl_run *b = &r->base;
  b->who = who;
  b->t = t;
  b->t0 = bl__now();
  r->p = p;
  if (o) b->o = *o;
  if (!t) return bl__fail(b, AD_ERR_NULL, "tape is NULL");
  if (ad_tape_status(t) != AD_OK) return ad_tape_status(t);
  ad_status s = check_meta(r, p, mg, min_steps, imaml);
  if (s) return s;
  ad_arena_stats as;
  ad_arena_stats_get(t, &as);
  b->used0 = as.used;
  b->mark = ad_mark(t);
  b->recording = ad_set_recording(t, 1);
  b->begun = 1;
  ad_arena_reset_peak(t);
  r->batched = !imaml && p->support_batch && p->query_batch;
  r->n_meta = p->n_theta + p->n_lam;
  for (int i = 0; i < p->n_theta; i++) {
    r->theta[i] = bl__leaf_view(t, p->theta[i]);
    r->acc[i] = ad_zeros_like(t, p->theta[i]);
    if (!r->theta[i] || !r->acc[i]) return ad_tape_status(t);
  }
  for (int k = 0; k < p->n_lam; k++) {
    r->lam[k] = bl__leaf_view(t, p->lam[k]);
    r->acc[p->n_theta + k] = ad_zeros_like(t, p->lam[k]);
    if (!r->lam[k] || !r->acc[p->n_theta + k]) return ad_tape_status(t);
  }
  return resolve_step(r);
}

ad_status bl__meta_end(bl_meta_run *r, ad_status s, ad_tensor *const *mg, bl_stats *st) {
  if (!s) {
    int n = r->p->n_tasks;
    bl__scale(r->n_meta, r->acc, 1.0 / n);
    for (int i = 0; !s && i < r->n_meta; i++)
      s = bl__nn(&r->base, ad_copy_values(mg[i], r->acc[i]));
    r->base.st.val_loss = r->loss_sum / n;
  }
  return bl__end(&r->base, s, st);
}

ad_tensor *bl__task_loss(bl_meta_run *r, bl_task_loss_fn f, const char *which,
                         ad_tensor *const *phi, int task) {
  ad_tensor *L = f(r->base.t, phi, task, r->p->ctx);
  if (bl__check_loss(&r->base, L, which, task)) return NULL;
  return L;
}

ad_status bl__meta_state_new(bl_meta_run *r, ad_tensor **state) {
  int n = r->p->n_theta;
  for (int k = 0; k < r->step.slots; k++) {
    ad_status s = bl__zeros_new(&r->base, n, r->p->theta, state + k * n);
    if (s) return s;
  }
  return AD_OK;
}

/* A returned tensor must be there and shaped like what it replaces. */
static ad_status check_out(bl_meta_run *r, const char *what, int i, const ad_tensor *got,
                           const ad_tensor *like) {
  char a[96], c[96];
  if (!got) return bl__fail(&r->base, AD_ERR_NULL, "%s returned no %s[%d]", r->step.name, what, i);
  if (!ad_same_shape(got, like) || got->dtype != like->dtype)
    return bl__fail(&r->base, AD_ERR_SHAPE, "%s returned %s[%d] %s for %s", r->step.name, what, i,
                    ad_shape_str(got, a, sizeof a), ad_shape_str(like, c, sizeof c));
  return AD_OK;
}

ad_status bl__meta_step(bl_meta_run *r, ad_tensor *const *phi, ad_tensor *const *state,
                        ad_tensor *const *g, int64_t k, ad_tensor **phi_new,
                        ad_tensor **state_new) {
  ad_tape *t = r->base.t;
  int n = r->p->n_theta, ns = r->step.slots * n;
  for (int i = 0; i < n; i++) phi_new[i] = NULL;
  for (int j = 0; j < ns; j++) state_new[j] = NULL;
  ad_status s = r->step.fn(t, n, phi, state, g, r->lam, k, r->step.ctx, phi_new, state_new);
  if (ad_tape_status(t)) return ad_tape_status(t);
  if (s)
    return bl__fail(&r->base, s, "%s failed at step %lld (%s) without saying why on the tape",
                    r->step.name, (long long)k, ad_status_str(s));
  for (int i = 0; !s && i < n; i++) s = check_out(r, "w_new", i, phi_new[i], phi[i]);
  for (int j = 0; !s && j < ns; j++) s = check_out(r, "state_new", j, state_new[j], state[j]);
  return s;
}

/* ---------------------------------------------------------------- the batched path */

/* x (shaped like theta[i], or of its size) repeated over the tasks:
 * [n_tasks, theta[i]'s shape]. Its adjoint sums over tasks. */
static ad_tensor *stack(bl_meta_run *r, ad_tensor *x, int i, int n_tasks) {
  ad_tape *t = r->base.t;
  const ad_tensor *like = r->p->theta[i];
  if (!ad_same_shape(x, like)) x = ad_reshape(t, x, like->ndim, like->shape);
  return ad_broadcast_axis(t, x, 0, n_tasks, 0);
}

ad_status bl__meta_batch_begin(bl_meta_run *r, int n_tasks, ad_tensor **phi, ad_tensor **state) {
  const bl_meta_problem *p = r->p;
  ad_tape *t = r->base.t;
  int n = p->n_theta;
  for (int i = 0; i < n; i++)
    if (!(phi[i] = stack(r, r->theta[i], i, n_tasks))) return ad_tape_status(t);
  for (int k = 0; k < r->step.slots; k++) {
    ad_status s = bl__zeros_new(&r->base, n, phi, state + k * n);
    if (s) return s;
  }
  if (r->step.fn != bl__cfg_step) return AD_OK;
  /* The optimizer's per-parameter variables shaped like theta[i] must
   * match the stacked phi: repeat them over tasks (recorded, so their
   * meta-gradient is the sum of the tasks'). Size-1 ones broadcast as they
   * are. */
  const nn_opt_cfg *c = &r->opt.map.cfg;
  r->bopt.cfg = *c;
  for (int i = 0; i < n; i++) {
    ad_tensor *lv = c->lr_vars ? c->lr_vars[i] : NULL;
    ad_tensor *dv = c->weight_decay_vars ? c->weight_decay_vars[i] : NULL;
    r->bopt.lr_vars[i] = lv && lv->size != 1 ? stack(r, lv, i, n_tasks) : lv;
    r->bopt.wd_vars[i] = dv && dv->size != 1 ? stack(r, dv, i, n_tasks) : dv;
  }
  if (ad_tape_status(t)) return ad_tape_status(t);
  if (c->lr_vars) r->bopt.cfg.lr_vars = r->bopt.lr_vars;
  if (c->weight_decay_vars) r->bopt.cfg.weight_decay_vars = r->bopt.wd_vars;
  r->step.ctx = &r->bopt.cfg;
  return AD_OK;
}

ad_tensor *bl__batch_loss(bl_meta_run *r, bl_batch_loss_fn f, const char *which,
                          ad_tensor *const *phi, int task0, int n) {
  bl_run *b = &r->base;
  ad_tensor *L = f(b->t, phi, task0, n, r->p->ctx);
  if (ad_tape_status(b->t) != AD_OK) return NULL;
  if (!L) {
    bl__fail(b, AD_ERR_NULL, "%s returned NULL (tasks %d..%d)", which, task0, task0 + n - 1);
    return NULL;
  }
  if (L->size != 1) {
    char a[96];
    bl__fail(b, AD_ERR_SHAPE,
             "%s returned %s (tasks %d..%d); the sum over the tasks (a scalar) is needed", which,
             ad_shape_str(L, a, sizeof a), task0, task0 + n - 1);
    return NULL;
  }
  return L;
}
