/* implicit_common.c — the pieces every implicit method shares (see
 * implicit_internal.h): w_T and the recorded gradient the curvature
 * products differentiate, the products themselves (Hessian or Gauss-Newton),
 * the final mixed partial, and CG with those products. */
#include "implicit_internal.h"

#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------- L_eff */

/* The inner optimizer's L2 decay, as nn/optim.c picks it: a tape variable
 * (per parameter, shaped like it or of size 1, else the scalar one) or the
 * number cfg.weight_decay. */
static ad_tensor *decay_var(const bl_run *r, int i, double *c) {
  const nn_opt_cfg *cfg = &r->opt.cfg;
  *c = cfg->weight_decay;
  return cfg->weight_decay_vars && cfg->weight_decay_vars[i] ? cfg->weight_decay_vars[i]
                                                             : cfg->weight_decay_var;
}

/* g_i <- g_i + wd_i w_i (recorded): the gradient of sum_i (wd_i/2) ||w_i||^2
 * written down directly rather than differentiated, so the products see
 * one multiply per parameter (H: wd v; mixed partial: w v) instead of the
 * backward of a dot product. *any says whether there was one. */
static ad_status add_decay(bl_run *r, ad_tensor *const *w, ad_tensor **g, int *any) {
  ad_tape *t = r->t;
  *any = 0;
  for (int i = 0; i < r->p->n_w; i++) {
    double c;
    ad_tensor *v = decay_var(r, i, &c), *d;
    if (v) {
      if (v->size != 1 && !ad_same_shape(v, w[i])) v = ad_reshape(t, v, w[i]->ndim, w[i]->shape);
      d = ad_mul(t, v, w[i]);
    } else if (c != 0) {
      d = ad_scale(t, w[i], c);
    } else {
      continue;
    }
    if (!d) return ad_tape_status(t);
    g[i] = g[i] ? ad_add(t, g[i], d) : d;
    *any = 1;
  }
  return ad_tape_status(t);
}

static ad_status check_opts(bl_run *r) {
  const bl_opts *o = &r->o;
  if (o->K < 0 || o->tol < 0 || o->alpha < 0 || o->damping < 0)
    return bl__fail(r, AD_ERR_ARG, "K (%lld), tol (%g), alpha (%g) and damping (%g) must be >= 0",
                    (long long)o->K, o->tol, o->alpha, o->damping);
  if (!isfinite(o->tol) || !isfinite(o->alpha) || !isfinite(o->damping))
    return bl__fail(r, AD_ERR_ARG, "tol, alpha and damping must be finite");
  if (o->gauss_newton && (!r->p->train_output || !r->p->train_out_loss))
    return bl__fail(r, AD_ERR_NULL,
                    "gauss_newton needs the problem's train_output and train_out_loss "
                    "callbacks (the split L_train = l(f(w)) + R(w))");
  return AD_OK;
}

/* The decay's part of H in closed form (see bl_imp.gh): the Hessian of
 * sum_i (wd_i / 2) ||w_i||^2 is diag(wd_i), wd_i being a tensor or a number
 * that does not depend on w (the optimizer's decay is set before w_T
 * exists). Where the decay is not one of the forms the pass takes (a
 * tensor of another dtype), the products sweep the full g instead. The
 * Gauss-Newton products take the decay with R (greg). Either way dec_s
 * carries the damping. */
static void closed_form_decay(bl_imp *m) {
  bl_run *r = m->r;
  int ok = !m->gn;
  for (int i = 0; i < m->n; i++) {
    double c;
    ad_tensor *v = decay_var(r, i, &c);
    m->dec[i] = NULL;
    m->dec_s[i] = m->damping;
    if (!ok) continue;
    if (v && v->size == m->w[i]->size && v->dtype == m->w[i]->dtype)
      m->dec[i] = v;
    else if (v && v->size == 1)
      m->dec_s[i] += ad_get(v, 0);
    else if (v)
      ok = 0;
    else
      m->dec_s[i] += c;
  }
  if (ok) return;
  for (int i = 0; i < m->n; i++) {
    m->gh[i] = m->g[i];
    m->dec[i] = NULL;
    m->dec_s[i] = m->damping;
  }
}

/* Records grad_w L_eff at m->w (and the Gauss-Newton pieces). */
static ad_status record_curvature(bl_imp *m) {
  bl_run *r = m->r;
  const bl_problem *p = r->p;
  ad_tape *t = r->t;
  int n = m->n, any;
  ad_tensor *L = p->train_loss(t, m->w, r->lam, m->step, p->ctx);
  ad_status s = bl__check_loss(r, L, "train_loss", m->step);
  /* Recorded, so that <g, v> can be differentiated again: by w for the
   * products, by lam for the mixed partial. */
  if (!s) s = ad_grad(t, 1, &L, NULL, n, m->w, m->g, AD_GRAD_RECORD);
  if (!s) memcpy(m->gh, m->g, sizeof m->gh);
  if (!s) s = add_decay(r, m->w, m->g, &any);
  if (!s) closed_form_decay(m);
  if (s || !m->gn) return s;

  /* Gauss-Newton: l is taken at a leaf copy of the outputs, so grad_f l is
   * a graph in f alone and H_l z = d/df <grad_f l, z> is one short sweep. */
  m->f = p->train_output(t, m->w, r->lam, m->step, p->ctx);
  if (!m->f) {
    if (ad_tape_status(t)) return ad_tape_status(t);
    return bl__fail(r, AD_ERR_NULL, "train_output returned NULL");
  }
  m->f_leaf = bl__leaf_view(t, m->f);
  if (!m->f_leaf) return ad_tape_status(t);
  ad_tensor *l = p->train_out_loss(t, m->f_leaf, r->lam, m->step, p->ctx);
  s = bl__check_loss(r, l, "train_out_loss", m->step);
  if (!s) s = ad_grad(t, 1, &l, NULL, 1, &m->f_leaf, &m->gl, AD_GRAD_RECORD);
  if (s) return s;
  ad_tensor *R = NULL;
  if (p->train_reg) {
    R = p->train_reg(t, m->w, r->lam, m->step, p->ctx);
    s = bl__check_loss(r, R, "train_reg", m->step);
    if (!s) s = ad_grad(t, 1, &R, NULL, n, m->w, m->greg, AD_GRAD_RECORD);
    if (s) return s;
  }
  if (any && (s = add_decay(r, m->w, m->greg, &any))) return s;
  if (R || any) /* G's second part: zeros (no history) where R and decay miss w_i */
    for (int i = 0; i < n; i++)
      if (!m->greg[i] && !(m->greg[i] = ad_zeros_like(t, m->w[i]))) return ad_tape_status(t);
  /* The split must add up to L_train, or G is the curvature of some other
   * objective and the hypergradient silently wrong. */
  double a = ad_item(L), b = ad_item(l) + (R ? ad_item(R) : 0);
  double tol = L->dtype == AD_F64 ? 1e-9 : 1e-4;
  if (!(fabs(a - b) <= tol * (1 + fabs(a))))
    return bl__fail(r, AD_ERR_ARG,
                    "gauss_newton: train_out_loss(train_output) + train_reg = %.10g but "
                    "train_loss = %.10g at w_T; the split must add up to the training loss",
                    b, a);
  return AD_OK;
}

static ad_status imp_init(bl_imp *m, bl_run *r) {
  memset(m, 0, sizeof *m);
  m->r = r;
  m->n = r->p->n_w;
  m->gn = r->o.gauss_newton != 0;
  m->damping = r->o.damping;
  m->step = r->p->inner_steps > 0 ? r->p->inner_steps - 1 : 0;
  return check_opts(r);
}

ad_status bl__imp_begin(bl_imp *m, bl_run *r) {
  ad_status s = imp_init(m, r);
  if (!s) s = bl__w0_copy(r, m->w);
  if (!s) s = bl__state_new(r, &m->s);
  if (!s) s = bl__run_inplace(r, r->lam, m->w, &m->s, 0, r->p->inner_steps);
  if (!s) s = bl__val_grad(r, r->lam, m->w, NULL, m->b, m->direct);
  if (!s) s = record_curvature(m);
  return s;
}

ad_status bl__imp_at(bl_imp *m, bl_run *r, ad_tensor *const *w) {
  ad_status s = imp_init(m, r);
  if (!s) s = bl__leaf_new(r, m->n, w, m->w);
  if (!s) s = record_curvature(m);
  return s;
}

/* hv = the sweep's part of (H or G) v, in the arena (the caller rewinds). */
static ad_status imp_sweep(bl_imp *m, ad_tensor *const *v, ad_tensor **hv) {
  ad_tape *t = m->r->t;
  int n = m->n;
  ad_tensor *hr[NN_MAX_PARAMS];
  if (!m->gn)
    /* H v = d/dw <grad_w L, v>: the recorded gradient swept back once with
     * v as its seed (no dot-product nodes needed); the decay's diagonal is
     * added by the caller's pass. */
    return ad_grad(t, n, m->gh, v, n, m->w, hv, 0);
  /* G v = J^T (H_l (J v)) + H_R v:  J v forward (ad_jvp), H_l on the
   * outputs, J^T back by a seeded reverse sweep through f. */
  ad_tensor *jv = NULL, *hjv = NULL;
  ad_status s = ad_jvp(t, n, m->w, v, 1, &m->f, &jv, 0);
  if (!s) s = ad_grad(t, 1, &m->gl, &jv, 1, &m->f_leaf, &hjv, 0);
  if (!s) s = ad_grad(t, 1, &m->f, &hjv, n, m->w, hv, 0);
  if (!s && m->greg[0]) {
    s = ad_grad(t, n, m->greg, v, n, m->w, hr, 0);
    if (!s) bl__axpy(n, hv, 1.0, hr);
  }
  return s;
}

ad_status bl__imp_apply_dot(bl_imp *m, ad_tensor *const *v, ad_tensor *const *out, double *vout) {
  ad_tape *t = m->r->t;
  ad_tensor *hv[NN_MAX_PARAMS];
  ad_marker mk = ad_mark(t);
  ad_status s = imp_sweep(m, v, hv);
  /* (H + d I) v = hv + dec (.) v + dec_s v, and <v, (H + d I) v>. */
  if (!s) *vout = bl__imp_op_pass(m->n, out, hv, m->dec, m->dec_s, v);
  ad_rewind(t, mk);
  if (!s) m->r->st.hvps++;
  return s;
}

ad_status bl__imp_apply(bl_imp *m, ad_tensor *const *v, ad_tensor *const *out) {
  double vout;
  return bl__imp_apply_dot(m, v, out, &vout);
}

ad_status bl__imp_neumann_term(bl_imp *m, ad_tensor *const *q, ad_tensor *const *v, double alpha,
                               double *qq) {
  ad_tape *t = m->r->t;
  ad_tensor *hv[NN_MAX_PARAMS];
  ad_marker mk = ad_mark(t);
  ad_status s = imp_sweep(m, q, hv);
  if (!s) *qq = bl__imp_neumann_pass(m->n, q, v, alpha, hv, m->dec, m->dec_s);
  ad_rewind(t, mk);
  if (!s) m->r->st.hvps++;
  return s;
}

ad_status bl__imp_finish(bl_imp *m, ad_tensor *const *v, ad_tensor *const *hg) {
  bl_run *r = m->r;
  int n_lam = r->p->n_lam;
  ad_tensor *mixed[NN_MAX_PARAMS], *res[NN_MAX_PARAMS];
  /* (d^2 L / dlam dw) v = d/dlam <grad_w L, v>: the same seeded sweep,
   * differentiated by lam instead of w. */
  ad_status s = ad_grad(r->t, m->n, m->g, v, n_lam, r->lam, mixed, 0);
  if (s) return s;
  r->st.hvps++;
  s = bl__copy_new(r, n_lam, m->direct, res);
  if (s) return s;
  bl__axpy(n_lam, res, -1.0, mixed);
  return bl__write_hg(r, res, hg);
}

/* ---------------------------------------------------------------- public product */

ad_status bl_curvature_product(ad_tape *t, const bl_problem *p, const bl_opts *o,
                               ad_tensor *const *w, ad_tensor *const *v, ad_tensor *const *out) {
  bl_run r;
  bl_imp m;
  /* bl__begin checks an output shaped like lam; this call has none, so it
   * is handed lam itself (only shapes are looked at, nothing is written). */
  ad_status s = bl__begin(&r, "bl_curvature_product", t, p, o, p ? p->lam : NULL, 0);
  for (int i = 0; !s && i < p->n_w; i++) {
    if (!w || !v || !out || !w[i] || !v[i] || !out[i])
      s = bl__fail(&r, AD_ERR_NULL, "w, v and out must hold %d tensors", p->n_w);
    else if (w[i]->size != p->w0[i]->size || v[i]->size != p->w0[i]->size ||
             out[i]->size != p->w0[i]->size)
      s = bl__fail(&r, AD_ERR_SHAPE, "w[%d], v[%d] and out[%d] must be shaped like w0[%d]", i, i, i,
                   i);
  }
  ad_tensor *vv[NN_MAX_PARAMS], *res[NN_MAX_PARAMS];
  if (!s) s = bl__imp_at(&m, &r, w);
  if (!s) s = bl__copy_new(&r, p->n_w, v, vv);
  if (!s) s = bl__zeros_new(&r, p->n_w, m.w, res);
  if (!s) s = bl__imp_apply(&m, vv, res);
  for (int i = 0; !s && i < p->n_w; i++) s = bl__nn(&r, ad_copy_values(out[i], res[i]));
  return bl__end(&r, s, NULL);
}

static ad_status imp_op(void *ctx, ad_tensor *const *v, ad_tensor *const *out, double *vout) {
  return bl__imp_apply_dot(ctx, v, out, vout);
}

ad_status bl__imp_cg(bl_imp *m, ad_tensor *const *x, int64_t K, double tol, int warm,
                     bl_cg_info *info) {
  ad_status s = bl__cg_dot(m->r->t, m->n, imp_op, m, m->b, x, K, tol, warm, info);
  if (!s) {
    m->r->st.iterations += info->iterations;
    m->r->st.residual = info->residual;
  }
  return s;
}
