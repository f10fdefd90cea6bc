/* meta_common.c — the run scope of the meta-learning methods (maml.c,
 * imaml.c): checks, arena mark, leaf views of theta, the accumulated
 * meta-gradient, and the exit that writes it. */
#include "implicit_internal.h"

#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------- meta-learning */

static ad_status check_meta(bl_meta_run *r, const bl_meta_problem *p, ad_tensor *const *mg,
                            int64_t min_steps, int need_prox) {
  bl_run *b = &r->base;
  if (!p) return bl__fail(b, AD_ERR_NULL, "problem is NULL");
  if (!p->support_loss || !p->query_loss)
    return bl__fail(b, AD_ERR_NULL, "support_loss or query_loss callback is NULL");
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
  if (!(p->inner_lr > 0) || !isfinite(p->inner_lr))
    return bl__fail(b, AD_ERR_ARG, "inner_lr is %g; it must be > 0", p->inner_lr);
  if (p->inner_steps < min_steps)
    return bl__fail(b, AD_ERR_ARG, "inner_steps is %lld; at least %lld needed",
                    (long long)p->inner_steps, (long long)min_steps);
  if (need_prox && (!(p->prox > 0) || !isfinite(p->prox)))
    return bl__fail(b, AD_ERR_ARG, "prox is %g; iMAML needs prox > 0", p->prox);
  if (b->o.K < 0 || b->o.tol < 0)
    return bl__fail(b, AD_ERR_ARG, "K (%lld) and tol (%g) must be >= 0", (long long)b->o.K,
                    b->o.tol);
  return AD_OK;
}

ad_status bl__meta_begin(bl_meta_run *r, const char *who, ad_tape *t, const bl_meta_problem *p,
                         const bl_opts *o, ad_tensor *const *mg, int64_t min_steps, int need_prox) {
  memset(r, 0, sizeof *r);
  bl_run *b = &r->base;
  b->who = who;
  b->t = t;
  b->t0 = bl__now();
  r->p = p;
  if (o) b->o = *o;
  if (!t) return bl__fail(b, AD_ERR_NULL, "tape is NULL");
  if (ad_tape_status(t) != AD_OK) return ad_tape_status(t);
  ad_status s = check_meta(r, p, mg, min_steps, need_prox);
  if (s) return s;
  ad_arena_stats as;
  ad_arena_stats_get(t, &as);
  b->used0 = as.used;
  b->mark = ad_mark(t);
  b->recording = ad_set_recording(t, 1);
  b->begun = 1;
  ad_arena_reset_peak(t);
  for (int i = 0; i < p->n_theta; i++) {
    r->theta[i] = bl__leaf_view(t, p->theta[i]);
    r->acc[i] = ad_zeros_like(t, p->theta[i]);
    if (!r->theta[i] || !r->acc[i]) return ad_tape_status(t);
  }
  return AD_OK;
}

ad_status bl__meta_end(bl_meta_run *r, ad_status s, ad_tensor *const *mg, bl_stats *st) {
  if (!s) {
    int n = r->p->n_tasks;
    bl__scale(r->p->n_theta, r->acc, 1.0 / n);
    for (int i = 0; !s && i < r->p->n_theta; i++)
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
