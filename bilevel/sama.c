/* sama.c — SAMA (Choe et al. 2023, "Making Scalable Meta Learning
 * Practical"): the implicit hypergradient with the inverse Hessian replaced
 * by the inner optimizer's own preconditioner, and the mixed second
 * derivative by one central difference.
 *
 * Implicit differentiation needs -d^2 L_train/dlam dw H^{-1} alpha. SAMA
 * takes the update rule's sensitivity to the gradient at the last inner
 * step instead of H^{-1} ("algorithmic adaptation"): for w_T = Phi(w, g),
 *   P = -dPhi/dg   (diagonal: every nn/ optimizer is elementwise in g;
 *                   SGD: lr; Adam: lr d(mhat / (sqrt(vhat) + eps))/dg, read
 *                   from the inner Adam state m, v and the last gradient),
 *   q = P alpha,   alpha = grad_w L_val(w_T),
 * obtained exactly as one VJP of the recorded last step with respect to its
 * gradient input. Then, with the mixed partial by a central difference,
 *   d^2 L_train/dlam dw q ~ [grad_lam L_train(w_T + e q) - grad_lam L_train(w_T - e q)] / (2e),
 *   g = dL_val/dlam |_{w_T} - that,
 * e = o->eps / ||q|| so the perturbation has norm o->eps (default
 * cbrt(machine epsilon) max(1, ||w_T||)). L_train is evaluated with the last
 * step's index (its batch). Only hyperparameters of L_train are covered
 * (an optimizer hyperparameter such as lr_var gets just its direct term).
 * Any step works, a user step included: P is read off the step itself, so
 * it is whatever preconditioner the rule applies to its gradient.
 * Needs T >= 1. */
#include "bl_internal.h"

#include <float.h>
#include <math.h>

/* grad_lam L_train(w + c q, lam) at step k into out (long-lived buffers). */
static ad_status train_lam_grad(bl_run *r, ad_tensor *const *w, double c, ad_tensor *const *q,
                                int64_t k, ad_tensor *const *wt, ad_tensor *const *out) {
  const bl_problem *p = r->p;
  ad_marker m = ad_mark(r->t);
  bl__copy_list(p->n_w, wt, w);
  bl__axpy(p->n_w, wt, c, q);
  ad_tensor *L = p->train_loss(r->t, wt, r->lam, k, p->ctx), *g[NN_MAX_PARAMS];
  ad_status s = bl__check_loss(r, L, "train_loss", k);
  if (!s) s = ad_grad(r->t, 1, &L, NULL, p->n_lam, r->lam, g, 0);
  if (!s) bl__copy_list(p->n_lam, out, g);
  ad_rewind(r->t, m);
  return s;
}

ad_status bl_sama(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                  bl_stats *st) {
  bl_run r;
  ad_status s = bl__begin(&r, "bl_sama", t, p, o, hg, 1);
  if (s) return bl__end(&r, s, st);
  if (!(r.o.eps >= 0) || !isfinite(r.o.eps))
    return bl__end(
        &r, bl__fail(&r, AD_ERR_ARG, "eps = %g (a finite radius >= 0; 0 = default)", r.o.eps), st);
  int n = p->n_w, n_lam = p->n_lam;
  int64_t T = p->inner_steps;
  ad_tensor *w[NN_MAX_PARAMS], *q[NN_MAX_PARAMS], *glam[NN_MAX_PARAMS], *wt[NN_MAX_PARAMS];
  ad_tensor *gp[NN_MAX_PARAMS], *gm[NN_MAX_PARAMS];
  bl_state os = {0};
  s = bl__w0_copy(&r, w);
  if (!s) s = bl__state_new(&r, &os);
  if (!s) s = bl__zeros_new(&r, n, w, q);
  if (!s) s = bl__zeros_new(&r, n, w, wt);
  if (!s) s = bl__zeros_new(&r, n_lam, r.lam, glam);
  if (!s) s = bl__zeros_new(&r, n_lam, r.lam, gp);
  if (!s) s = bl__zeros_new(&r, n_lam, r.lam, gm);
  if (!s) s = bl__run_inplace(&r, r.lam, w, &os, 0, T - 1);

  /* The last step recorded with its gradient g as the input we
   * differentiate by: w_T = Phi(w_{T-1}, g, s_{T-1}). */
  ad_marker m = ad_mark(t);
  ad_tensor *g[NN_MAX_PARAMS], *gl[NN_MAX_PARAMS], *wc[NN_MAX_PARAMS], *wT[NN_MAX_PARAMS];
  ad_tensor *alpha[NN_MAX_PARAMS], *gd[NN_MAX_PARAMS], *Pa[NN_MAX_PARAMS];
  bl_state sl = {0};
  ad_tensor *L = s ? NULL : p->train_loss(t, w, r.lam, T - 1, p->ctx);
  if (!s) s = bl__check_loss(&r, L, "train_loss", T - 1);
  if (!s) s = ad_grad(t, 1, &L, NULL, n, w, g, 0);
  if (!s) s = bl__leaf_new(&r, n, g, gl);
  if (!s) s = bl__copy_new(&r, n, w, wc);
  if (!s) s = bl__state_copy(&r, &sl, &os, BL_STATE_TAPE);
  if (!s) s = bl__step_call(&r, r.lam, wc, &sl, gl, T - 1, wT, &sl);
  /* alpha and the direct term at w_T; q = P alpha = -(dPhi/dg)^T alpha */
  if (!s) s = bl__val_grad(&r, r.lam, wT, NULL, alpha, gd);
  if (!s) s = ad_grad(t, n, wT, alpha, n, gl, Pa, 0);
  if (!s) {
    r.st.inner_steps++;
    r.st.hvps++; /* the VJP through the optimizer step (no Hessian in it) */
    bl__copy_list(n, w, wT);
    bl__state_set(&os, &sl);
    bl__copy_list(n, q, Pa);
    bl__scale(n, q, -1.0);
    bl__copy_list(n_lam, glam, gd);
  }
  ad_rewind(t, m);

  /* the mixed partial along q by one central difference */
  double qn = bl__norm(n, q), u = p->w0[0]->dtype == AD_F64 ? DBL_EPSILON : FLT_EPSILON;
  double radius = r.o.eps > 0 ? r.o.eps : cbrt(u) * fmax(1.0, bl__norm(n, w));
  if (!s && qn > 0) {
    double e = radius / qn;
    s = train_lam_grad(&r, w, e, q, T - 1, wt, gp);
    if (!s) s = train_lam_grad(&r, w, -e, q, T - 1, wt, gm);
    if (!s) {
      bl__axpy(n_lam, glam, -1.0 / (2 * e), gp);
      bl__axpy(n_lam, glam, 1.0 / (2 * e), gm);
    }
  }
  if (!s) s = bl__write_hg(&r, glam, hg);
  return bl__end(&r, s, st);
}
