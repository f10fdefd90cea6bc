/* fixed_point.c — implicit hypergradient by fixed-point iteration (Grazzi
 * et al. 2020): the inner step Phi is the map whose fixed point w* is, so
 * differentiating w* = Phi(w*, lam) gives
 *   u = A^T u + b,   A = dPhi/d(w, s) at (w_T, s_T),  b = (grad_w L_val(w_T), 0),
 *   hg = dL_val/dlam|direct + B^T u,   B = dPhi/dlam,
 * and u is found by iterating that map from u = 0: each iteration is one
 * VJP of the recorded step (bl__step_vjp), whatever the step is (library
 * optimizer or user step; the state rides along with w). The residual
 * r = A^T u + b - u comes with every iteration, so it stops at
 * ||r|| <= tol ||b|| and reports ||r||; the B^T u of the last VJP is the
 * hypergradient, so stopping costs no extra product.
 * For SGD, A = I - lr H and B = -lr d^2 L/dlam dw, and this is exactly the
 * Richardson iteration v <- v - lr (H v - b) with v = lr u (the Neumann
 * partial sums): the same iterates, residuals and counts.
 * With o->alpha, o->damping or o->gauss_newton set the iteration is that
 * Richardson form on the curvature system instead,
 *   v <- v - alpha ((H or G) v + damping v - b),  hg = direct - (d^2 L/dlam dw) v,
 * a contraction when 0 < alpha < 2/lambda_max. Both stop after K products
 * (default 20) or at tol (default 1e-10). */
#include "implicit_internal.h"

#include <math.h>

/* A diverging iteration is reported where it broke, not returned. */
static ad_status check_residual(bl_run *r, double res, int64_t j) {
  if (isfinite(res)) return AD_OK;
  return bl__fail(r, AD_ERR_NUMERIC,
                  "the residual is %g at solver iteration %lld: the iteration diverged", res,
                  (long long)j);
}

static ad_status richardson(bl_run *r, bl_imp *m, ad_tensor *const *hg) {
  ad_tensor *v[NN_MAX_PARAMS], *res[NN_MAX_PARAMS];
  double alpha = 0;
  ad_status s = bl__alpha(r, &alpha);
  if (!s) s = bl__zeros_new(r, m->n, m->w, v);
  if (!s) s = bl__copy_new(r, m->n, m->b, res); /* r_0 = b - H 0 */
  if (s) return s;
  double tol = BL_OPT(r, tol, 1e-10), bn = bl__norm(m->n, m->b);
  int64_t K = BL_OPT(r, K, 20);
  /* K products: v_1 = alpha b needs none, then each step one. */
  bl__axpy(m->n, v, alpha, res);
  r->st.iterations = 1;
  r->st.residual = bn;
  for (int64_t k = 0; k < K && !s; k++) {
    s = bl__imp_apply(m, v, res); /* res = H v */
    if (s) break;
    bl__imp_lincomb(m->n, res, 1.0, m->b, -1.0, res); /* res = b - H v */
    r->st.residual = sqrt(bl__dot(m->n, res, res));
    if ((s = check_residual(r, r->st.residual, k + 1))) break;
    /* r_k = (I - alpha H)^k b never grows when 0 < alpha < 2/lambda_max and
     * H is positive semi-definite: growth past 2 ||b|| is divergence. */
    if (r->st.residual > 2 * bn) {
      s = bl__fail(r, AD_ERR_NUMERIC,
                   "the iteration diverges at solver iteration %lld: ||b - H v|| = %g > 2 ||b|| "
                   "(alpha = %g is past 2 / lambda_max(H), or H is not positive semi-definite)",
                   (long long)(k + 1), r->st.residual, alpha);
      break;
    }
    if (r->st.residual <= tol * bn) break;
    bl__axpy(m->n, v, alpha, res);
    r->st.iterations++;
  }
  if (!s) s = bl__imp_finish(m, v, hg);
  return s;
}

static ad_status step_map(bl_run *r, bl_imp *m, ad_tensor *const *hg) {
  int n = m->n, ns = m->s.n, nv = n + ns, n_lam = r->p->n_lam;
  ad_tensor *u[NN_MAX_PARAMS + BL_MAX_STATE], *res[NN_MAX_PARAMS + BL_MAX_STATE];
  ad_tensor *glam[NN_MAX_PARAMS], *like[NN_MAX_PARAMS + BL_MAX_STATE];
  for (int i = 0; i < n; i++) like[i] = m->w[i];
  for (int j = 0; j < ns; j++) like[n + j] = m->s.b[j];
  ad_status s = bl__zeros_new(r, nv, like, u);
  if (!s) s = bl__zeros_new(r, nv, like, res);
  if (!s) s = bl__copy_new(r, n_lam, m->direct, glam);
  if (s) return s;
  double tol = BL_OPT(r, tol, 1e-10), bn = bl__norm(n, m->b);
  int64_t K = BL_OPT(r, K, 20);
  bl__copy_list(n, u, m->b); /* u_1 = A^T 0 + b */
  r->st.iterations = 1;
  r->st.residual = bn;
  int done = 0;
  for (int64_t k = 0; k < K && !s; k++) {
    ad_marker mk = ad_mark(r->t);
    ad_tensor *gl[NN_MAX_PARAMS], *gw[NN_MAX_PARAMS], *gs[BL_MAX_STATE];
    s = bl__step_vjp(r, m->w, &m->s, m->step, u, ns ? u + n : NULL, gl, gw, ns ? gs : NULL);
    if (!s) {
      /* res = A^T u + b - u */
      bl__imp_lincomb(n, res, 1.0, gw, -1.0, u);
      bl__axpy(n, res, 1.0, m->b);
      if (ns) bl__imp_lincomb(ns, res + n, 1.0, gs, -1.0, u + n);
      r->st.residual = sqrt(bl__dot(nv, res, res));
      s = check_residual(r, r->st.residual, k + 1);
    }
    if (!s && r->st.residual <= tol * bn) { /* B^T u of this u is the answer */
      bl__axpy(n_lam, glam, 1.0, gl);
      done = 1;
    }
    ad_rewind(r->t, mk);
    if (s || done) break;
    bl__axpy(nv, u, 1.0, res); /* u <- A^T u + b */
    r->st.iterations++;
  }
  if (!s && !done) {
    ad_marker mk = ad_mark(r->t);
    ad_tensor *gl[NN_MAX_PARAMS];
    s = bl__step_vjp(r, m->w, &m->s, m->step, u, ns ? u + n : NULL, gl, NULL, NULL);
    if (!s) bl__axpy(n_lam, glam, 1.0, gl);
    ad_rewind(r->t, mk);
  }
  if (!s) s = bl__write_hg(r, glam, hg);
  return s;
}

ad_status bl_fixed_point(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                         bl_stats *st) {
  bl_run r;
  bl_imp m;
  ad_status s = bl__begin(&r, "bl_fixed_point", t, p, o, hg, 0);
  if (!s) s = bl__imp_begin(&m, &r);
  if (!s)
    s = r.o.alpha != 0 || r.o.damping != 0 || r.o.gauss_newton ? richardson(&r, &m, hg)
                                                               : step_map(&r, &m, hg);
  return bl__end(&r, s, st);
}
