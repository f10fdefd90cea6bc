/* forward.c — forward-mode hypergradient (real-time recurrent style,
 * Franceschi et al. 2017): carry the tangents of the trajectory forward.
 *
 * For each hyperparameter direction e_j (one scalar element of lam),
 *   Z_{k+1} = A_k Z_k + B_k e_j,   Z_0 = 0,   Z_k = dw_k/dlam_j (and the
 *   state's tangent alongside: (w, s) is the carried pair),
 *   dL_val/dlam_j = dL_val/dlam_j|_{w_T} + <grad_w L_val(w_T), Z_T>.
 * A_k Z + B_k e_j is one JVP of the recorded step (ad_jvp: the double-VJP
 * trick), taken per direction per step; the step's graph is rewound
 * before the next, so memory is constant in T and grows with the number of
 * directions P (P tangents shaped like w and the state). Cost: T * P JVPs,
 * so this is the method for a few hyperparameters and a long horizon.
 *
 * The trajectory is the recorded one (each step's values are taken from
 * its recorded output), the same as bl_unroll's. */
#include "bl_internal.h"

/* Total number of scalar hyperparameters. */
static int64_t n_directions(const bl_problem *p) {
  int64_t P = 0;
  for (int k = 0; k < p->n_lam; k++) P += p->lam[k]->size;
  return P;
}

/* Direction j as (tensor index, element index). */
static void direction(const bl_problem *p, int64_t j, int *k, int64_t *e) {
  int q = 0;
  while (j >= p->lam[q]->size) j -= p->lam[q++]->size;
  *k = q;
  *e = j;
}

ad_status bl_forward(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                     bl_stats *st) {
  bl_run r;
  ad_status s = bl__begin(&r, "bl_forward", t, p, o, hg, 0);
  if (s) return bl__end(&r, s, st);
  int n = p->n_w, n_lam = p->n_lam;
  int64_t T = p->inner_steps, P = n_directions(p);

  ad_tensor *w[NN_MAX_PARAMS], *sb[BL_MAX_STATE], *glam[NN_MAX_PARAMS], *e[NN_MAX_PARAMS];
  bl_state os = {0};
  s = bl__w0_copy(&r, w);
  if (!s) s = bl__state_new(&r, &os);
  int ns = bl__state_list(&os, sb), nv = n + ns; /* carried pair (w, s) as one list */
  /* Z[j] / Znext[j]: tangents of (w, s) for direction j, nv tensors each. */
  ad_tensor **Z = ad_arena_alloc(t, sizeof(ad_tensor *) * (size_t)(2 * P * nv + 1));
  if (!Z) s = ad_tape_status(t);
  ad_tensor **Zn = Z ? Z + P * nv : NULL;
  ad_tensor *vars[NN_MAX_PARAMS + BL_MAX_STATE];
  for (int i = 0; i < n; i++) vars[i] = w[i];
  for (int q = 0; q < ns; q++) vars[n + q] = sb[q];
  for (int64_t j = 0; j < P && !s; j++) {
    s = bl__zeros_new(&r, nv, vars, Z + j * nv);
    if (!s) s = bl__zeros_new(&r, nv, vars, Zn + j * nv);
  }
  if (!s) s = bl__zeros_new(&r, n_lam, r.lam, e); /* e_j, one element set at a time */
  if (!s) s = bl__zeros_new(&r, n_lam, r.lam, glam);

  for (int64_t k = 0; k < T && !s; k++) {
    ad_marker m = ad_mark(t);
    /* Record step k from leaves (w_k, s_k). */
    ad_tensor *wl[NN_MAX_PARAMS], *wn[NN_MAX_PARAMS];
    bl_state sl = {0};
    s = bl__leaf_new(&r, n, w, wl);
    if (!s) s = bl__state_copy(&r, &sl, &os, BL_STATE_LEAF);
    ad_tensor *ins[NN_MAX_PARAMS * 2 + BL_MAX_STATE], *tan[NN_MAX_PARAMS * 2 + BL_MAX_STATE];
    ad_tensor *outs[NN_MAX_PARAMS + BL_MAX_STATE];
    int n_in = 0;
    for (int q = 0; q < n_lam; q++) ins[n_in++] = r.lam[q];
    for (int i = 0; i < n; i++) ins[n_in++] = wl[i];
    if (!s) n_in += bl__state_list(&sl, ins + n_in);
    if (!s) s = bl__step_recorded(&r, r.lam, wl, &sl, k, NULL, wn);
    if (s) break;
    for (int i = 0; i < n; i++) outs[i] = wn[i];
    bl__state_list(&sl, outs + n);

    /* (Z, e_j) -> A_k Z + B_k e_j, one JVP per direction. */
    for (int64_t j = 0; j < P && !s; j++) {
      int kq;
      int64_t el;
      direction(p, j, &kq, &el);
      ad_set(e[kq], el, 1.0);
      for (int q = 0; q < n_lam; q++) tan[q] = e[q];
      for (int v = 0; v < nv; v++) tan[n_lam + v] = Z[j * nv + v];
      ad_marker mj = ad_mark(t);
      ad_tensor *tout[NN_MAX_PARAMS + BL_MAX_STATE];
      s = ad_jvp(t, n_in, ins, tan, nv, outs, tout, 0);
      if (!s) bl__copy_list(nv, Zn + j * nv, tout);
      ad_rewind(t, mj);
      ad_set(e[kq], el, 0.0);
      r.st.hvps++;
    }
    if (s) break;
    /* Move on: (w, s) <- step output, Z <- Znext. */
    bl__copy_list(n, w, wn);
    bl__state_set(&os, &sl);
    ad_rewind(t, m);
    ad_tensor **tmp = Z;
    Z = Zn;
    Zn = tmp;
  }

  /* dL/dlam_j = direct_j + <grad_w L_val(w_T), Z_T[j]>. */
  ad_tensor *gw[NN_MAX_PARAMS], *gd[NN_MAX_PARAMS];
  if (!s) s = bl__val_grad(&r, r.lam, w, NULL, gw, gd);
  if (!s) {
    bl__copy_list(n_lam, glam, gd);
    for (int64_t j = 0; j < P; j++) {
      int kq;
      int64_t el;
      direction(p, j, &kq, &el);
      ad_set(glam[kq], el, ad_get(glam[kq], el) + bl__dot(n, gw, Z + j * nv));
    }
    s = bl__write_hg(&r, glam, hg);
  }
  return bl__end(&r, s, st);
}
