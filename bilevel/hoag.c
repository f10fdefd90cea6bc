/* hoag.c — HOAG (Pedregosa 2016): the CG hypergradient inside an outer
 * loop, with two economies that carry from one outer iteration to the next
 * through a bl_hoag_state:
 *   - a tolerance that starts loose and shrinks geometrically,
 *       tol_k = max(tol0 decay^k, tol_min),
 *     so early outer steps (far from the optimum, where a rough direction is
 *     enough) are cheap and later ones accurate;
 *   - a warm start: lam moves little between outer steps, so the previous
 *     solution of H v = grad_w L_val is close to the new one and CG starts
 *     from a small residual (one extra product to form r = b - H v_prev).
 * Without a state (o->hoag NULL) this is bl_cg. */
#include "implicit_internal.h"

#include <math.h>

/* Heap room in the state for a solution shaped like v (made before the
 * hypergradient is written, so a failed allocation leaves hg untouched). */
static ad_status make_room(bl_run *r, bl_hoag_state *h, int n, ad_tensor *const *v) {
  for (int i = 0; i < NN_MAX_PARAMS; i++) {
    if (h->x[i] && (i >= n || !ad_same_shape(h->x[i], v[i]) || h->x[i]->dtype != v[i]->dtype)) {
      ad_tensor_free(h->x[i]);
      h->x[i] = NULL;
    }
    if (i < n && !h->x[i] && ad_tensor_new(&h->x[i], v[i]->dtype, v[i]->ndim, v[i]->shape)) {
      h->n = 0; /* what is held no longer fits anything */
      return bl__nn(r, AD_ERR_NOMEM);
    }
  }
  return AD_OK;
}

/* The held solution fits these parameters (else start cold). */
static int fits(const bl_hoag_state *h, int n, ad_tensor *const *w) {
  if (h->n != n) return 0;
  for (int i = 0; i < n; i++)
    if (!h->x[i] || h->x[i]->size != w[i]->size || h->x[i]->dtype != w[i]->dtype) return 0;
  return 1;
}

ad_status bl_hoag(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                  bl_stats *st) {
  bl_run r;
  bl_imp m;
  bl_cg_info info;
  ad_tensor *v[NN_MAX_PARAMS];
  bl_hoag_state *h = o ? o->hoag : NULL;
  ad_status s = bl__begin(&r, "bl_hoag", t, p, o, hg, 0);
  double tol0 = 0, decay = 0, tol_min = 0, tol = BL_OPT(&r, tol, 1e-10);
  if (!s && h) {
    tol0 = h->tol0 ? h->tol0 : 1e-2;
    decay = h->decay ? h->decay : 0.5;
    tol_min = h->tol_min ? h->tol_min : tol;
    if (!(tol0 > 0) || !(decay > 0 && decay <= 1) || !(tol_min >= 0) || h->n < 0 ||
        h->n > NN_MAX_PARAMS)
      s = bl__fail(&r, AD_ERR_ARG,
                   "hoag state: tol0 (%g) must be > 0, decay (%g) in (0, 1], tol_min (%g) >= 0",
                   tol0, decay, tol_min);
    tol = h->tol > 0 ? h->tol : tol0;
  }
  if (!s) s = bl__imp_begin(&m, &r);
  if (!s) s = bl__zeros_new(&r, m.n, m.w, v);
  int warm = !s && h && r.o.warm_start && fits(h, m.n, m.w);
  if (warm) bl__copy_list(m.n, v, h->x);
  if (!s) s = bl__imp_cg(&m, v, BL_OPT(&r, K, 100), tol, warm, &info);
  if (!s && h) s = make_room(&r, h, m.n, v);
  if (!s) s = bl__imp_finish(&m, v, hg);
  if (!s && h) {
    bl__copy_list(m.n, h->x, v);
    h->n = m.n;
    h->calls++;
    h->last_iterations = info.iterations;
    h->total_iterations += info.iterations;
    h->tol = fmax(tol * decay, tol_min);
  }
  return bl__end(&r, s, st);
}

void bl_hoag_state_free(bl_hoag_state *s) {
  if (!s) return;
  for (int i = 0; i < NN_MAX_PARAMS; i++) {
    ad_tensor_free(s->x[i]);
    s->x[i] = NULL;
  }
  s->n = 0;
  s->tol = 0;
  s->calls = s->last_iterations = s->total_iterations = 0;
}
