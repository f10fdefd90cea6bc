/* bl_fixtures.h — bilevel problems with known answers, shared by the
 * test_bl_*.c suites: ridge regression (closed-form w* and hypergradient),
 * a quadratic under gradient descent (closed-form w_T), a tiny f64 MLP, and
 * the checks every method must pass (errors on bad input, tape left as
 * found). Header-only (static inline) so each suite stays one file. */
#ifndef HT_BL_FIXTURES_H
#define HT_BL_FIXTURES_H

#include "bilevel/bl.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#define FX_MAXD 8

/* ---------------------------------------------------------------- small dense algebra */

/* Solves A x = b (n x n, row-major, copied) by Gaussian elimination with
 * partial pivoting. */
static inline void fx_solve(int n, const double *A_in, const double *b, double *x) {
  double A[FX_MAXD * FX_MAXD], y[FX_MAXD];
  memcpy(A, A_in, sizeof(double) * (size_t)(n * n));
  memcpy(y, b, sizeof(double) * (size_t)n);
  for (int c = 0; c < n; c++) {
    int piv = c;
    for (int i = c + 1; i < n; i++)
      if (fabs(A[i * n + c]) > fabs(A[piv * n + c])) piv = i;
    for (int j = 0; j < n; j++) {
      double tmp = A[c * n + j];
      A[c * n + j] = A[piv * n + j];
      A[piv * n + j] = tmp;
    }
    double tmp = y[c];
    y[c] = y[piv];
    y[piv] = tmp;
    for (int i = c + 1; i < n; i++) {
      double f = A[i * n + c] / A[c * n + c];
      for (int j = c; j < n; j++) A[i * n + j] -= f * A[c * n + j];
      y[i] -= f * y[c];
    }
  }
  for (int i = n - 1; i >= 0; i--) {
    double s = y[i];
    for (int j = i + 1; j < n; j++) s -= A[i * n + j] * x[j];
    x[i] = s / A[i * n + i];
  }
}

/* max_i |a_i - b_i| / max_i |b_i|: normwise relative error. */
static inline double fx_rel(int64_t n, const double *a, const double *b) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; i++) {
    if (fabs(a[i] - b[i]) > num) num = fabs(a[i] - b[i]);
    if (fabs(b[i]) > den) den = fabs(b[i]);
  }
  return den > 0 ? num / den : num;
}

/* The same over lists of tensors (hypergradients). */
static inline double fx_rel_t(int n, ad_tensor *const *a, ad_tensor *const *b) {
  double num = 0, den = 0;
  for (int k = 0; k < n; k++)
    for (int64_t i = 0; i < a[k]->size; i++) {
      double x = ad_get(a[k], i), y = ad_get(b[k], i);
      if (fabs(x - y) > num) num = fabs(x - y);
      if (fabs(y) > den) den = fabs(y);
    }
  return den > 0 ? num / den : num;
}

static inline ad_tensor *fx_new(ad_dtype dt, int ndim, const int64_t *shape) {
  ad_tensor *x = NULL;
  ck_assert_int_eq(ad_tensor_new(&x, dt, ndim, shape), AD_OK);
  return x;
}

static inline ad_tape *fx_tape(size_t mb) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = mb, .arena_max_mb = 8 * mb}), AD_OK);
  return t;
}

/* ---------------------------------------------------------------- ridge regression */
/* L_train(w, lam) = 1/(2n) ||X w - y||^2 + 1/2 sum_j lam_j w_j^2
 * L_val(w)        = 1/(2m) ||Xv w - yv||^2  (+ 1/2 sum_j lam_j w_j^2 with val_pen,
 *                   as in the tutorial's weight-decay problem: a direct term)
 * lam is a scalar (the same for every j) or a [d, 1] tensor (per coordinate).
 * With A = X^T X / n, c = X^T y / n and Lam = diag(lam):
 *   w*(lam)      = (A + Lam)^{-1} c
 *   dL_val/dlam_j = [1/2 w*_j^2] - [(A + Lam)^{-1} grad_w L_val(w*)]_j w*_j,
 *   grad_w L_val = Xv^T (Xv w - yv) / m  [+ Lam w]   ([..]: with val_pen)
 * (scalar lam: the sum over j, = -grad L_val^T (A + lam I)^{-1} w*). */
typedef struct {
  int n, m, d;
  int val_pen; /* L_val also carries the penalty 1/2 sum_j lam_j w_j^2 */
  double X[64 * FX_MAXD], y[64], Xv[64 * FX_MAXD], yv[64];
} fx_ridge;

static inline void fx_ridge_make(fx_ridge *rp, int n, int m, int d, uint64_t seed) {
  ad_rng g;
  ad_rng_seed(&g, seed);
  rp->n = n;
  rp->m = m;
  rp->d = d;
  double wt[FX_MAXD];
  for (int j = 0; j < d; j++) wt[j] = ad_rng_normal(&g);
  for (int i = 0; i < n; i++) {
    double s = 0;
    for (int j = 0; j < d; j++) s += (rp->X[i * d + j] = ad_rng_normal(&g)) * wt[j];
    rp->y[i] = s + 0.5 * ad_rng_normal(&g);
  }
  for (int i = 0; i < m; i++) {
    double s = 0;
    for (int j = 0; j < d; j++) s += (rp->Xv[i * d + j] = ad_rng_normal(&g)) * wt[j];
    rp->yv[i] = s + 0.5 * ad_rng_normal(&g);
  }
}

/* 0.5/rows ||X w[0] - y||^2 with X [rows, d] and y [rows] given in f64,
 * made constants of w[0]'s dtype. */
static inline ad_tensor *fx_ridge_fit(ad_tape *t, ad_tensor *const *w, int rows, int d,
                                      const double *Xs, const double *ys) {
  ad_dtype dt = w[0]->dtype;
  double buf[64 * FX_MAXD];
  ad_tensor *X, *y;
  if (dt == AD_F64) {
    X = ad_const(t, dt, 2, (int64_t[]){rows, d}, Xs);
    y = ad_const(t, dt, 2, (int64_t[]){rows, 1}, ys);
  } else {
    float *f = (float *)buf;
    for (int i = 0; i < rows * d; i++) f[i] = (float)Xs[i];
    X = ad_const(t, dt, 2, (int64_t[]){rows, d}, f);
    for (int i = 0; i < rows; i++) f[i] = (float)ys[i];
    y = ad_const(t, dt, 2, (int64_t[]){rows, 1}, f);
  }
  ad_tensor *res = ad_sub(t, ad_matmul(t, X, w[0], 0, 0), y);
  return ad_scale(t, ad_dot(t, res, res), 0.5 / rows);
}

/* 1/2 sum lam[0] * w[0]^2 */
static inline ad_tensor *fx_ridge_pen(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam) {
  return ad_scale(t, ad_sum(t, ad_mul(t, lam[0], ad_mul(t, w[0], w[0]))), 0.5);
}

/* lam[0]: the penalty (scalar or [d,1]); lam[1] (if present) is not used by
 * the loss (the optimizer may use it, e.g. as lr_var). */
static inline ad_tensor *fx_ridge_train(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam,
                                        int64_t step, void *ctx) {
  (void)step;
  const fx_ridge *rp = ctx;
  ad_tensor *fit = fx_ridge_fit(t, w, rp->n, rp->d, rp->X, rp->y);
  return ad_add(t, fit, fx_ridge_pen(t, w, lam));
}

static inline ad_tensor *fx_ridge_val(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam,
                                      int64_t step, void *ctx) {
  (void)step;
  const fx_ridge *rp = ctx;
  ad_tensor *fit = fx_ridge_fit(t, w, rp->m, rp->d, rp->Xv, rp->yv);
  if (!rp->val_pen) return fit;
  return ad_add(t, fit, fx_ridge_pen(t, w, lam));
}

/* Closed form: w* and dL_val/dlam (per coordinate, length d). */
static inline void fx_ridge_exact(const fx_ridge *rp, const double *lam, double *wstar,
                                  double *hg) {
  int n = rp->n, d = rp->d, m = rp->m;
  double A[FX_MAXD * FX_MAXD] = {0}, c[FX_MAXD] = {0}, gv[FX_MAXD] = {0}, z[FX_MAXD];
  for (int i = 0; i < n; i++)
    for (int j = 0; j < d; j++) {
      c[j] += rp->X[i * d + j] * rp->y[i] / n;
      for (int k = 0; k < d; k++) A[j * d + k] += rp->X[i * d + j] * rp->X[i * d + k] / n;
    }
  for (int j = 0; j < d; j++) A[j * d + j] += lam[j];
  fx_solve(d, A, c, wstar);
  for (int i = 0; i < m; i++) {
    double r = -rp->yv[i];
    for (int j = 0; j < d; j++) r += rp->Xv[i * d + j] * wstar[j];
    for (int j = 0; j < d; j++) gv[j] += rp->Xv[i * d + j] * r / m;
  }
  if (rp->val_pen)
    for (int j = 0; j < d; j++) gv[j] += lam[j] * wstar[j];
  fx_solve(d, A, gv, z); /* A symmetric: (A^{-1} gv) */
  for (int j = 0; j < d; j++)
    hg[j] = -z[j] * wstar[j] + (rp->val_pen ? 0.5 * wstar[j] * wstar[j] : 0);
}

/* A ridge problem ready to pass to a method: SGD with learning rate lr,
 * T steps, w0 fixed, lam scalar (0.3) or per coordinate (0.2 + 0.15 j). */
typedef struct {
  fx_ridge rp;
  ad_tensor *w0[1], *lam[1], *hg[1];
  bl_problem p;
  double lam_v[FX_MAXD];
} fx_rcase;

/* per_coord: lam is [d,1] with different values; else a scalar. */
static inline void fx_rcase_setup(fx_rcase *c, int per_coord, int64_t T, double lr) {
  memset(c, 0, sizeof *c);
  fx_ridge_make(&c->rp, 40, 30, 5, 7);
  int d = c->rp.d;
  c->w0[0] = fx_new(AD_F64, 2, (int64_t[]){d, 1});
  for (int j = 0; j < d; j++) ad_set(c->w0[0], j, 0.1 * (j - 2));
  if (per_coord) {
    c->lam[0] = fx_new(AD_F64, 2, (int64_t[]){d, 1});
    c->hg[0] = fx_new(AD_F64, 2, (int64_t[]){d, 1});
    for (int j = 0; j < d; j++) ad_set(c->lam[0], j, c->lam_v[j] = 0.2 + 0.15 * j);
  } else {
    c->lam[0] = fx_new(AD_F64, 0, NULL);
    c->hg[0] = fx_new(AD_F64, 0, NULL);
    ad_set(c->lam[0], 0, 0.3);
    for (int j = 0; j < d; j++) c->lam_v[j] = 0.3;
  }
  c->p = (bl_problem){.n_w = 1,
                      .w0 = c->w0,
                      .n_lam = 1,
                      .lam = c->lam,
                      .train_loss = fx_ridge_train,
                      .val_loss = fx_ridge_val,
                      .ctx = &c->rp,
                      .opt = {.kind = NN_OPT_SGD, .lr = lr},
                      .inner_steps = T};
}

static inline void fx_rcase_free(fx_rcase *c) {
  ad_tensor_free(c->w0[0]);
  ad_tensor_free(c->lam[0]);
  ad_tensor_free(c->hg[0]);
}

static inline void fx_rcase_exact(fx_rcase *c, double *hg_out) {
  double ws[FX_MAXD], hj[FX_MAXD];
  fx_ridge_exact(&c->rp, c->lam_v, ws, hj);
  if (c->lam[0]->size == 1) {
    hg_out[0] = 0;
    for (int j = 0; j < c->rp.d; j++) hg_out[0] += hj[j];
  } else {
    for (int j = 0; j < c->rp.d; j++) hg_out[j] = hj[j];
  }
}

/* ---------------------------------------------------------------- tiny MLP */
/* 4 -> 6 (tanh) -> 3, cross-entropy, f64; 12 training and 10 validation
 * examples. Hyperparameters by case:
 *   0: SGD, log learning rate in the loss: L_train = exp(lam) CE (lr 1)
 *   1: SGD, per-parameter weight decay (weight_decay_vars = lam)
 *   2: momentum 0.9, per-parameter weight decay
 *   3: Adam, learning rate lr_var = lam[0] and per-parameter weight decay
 *      lam[1..3]
 *   4: momentum 0.9 with learning rate lr_var = lam[0] (0.1), and an L2
 *      term in the loss: L_train = CE + (lam[1]/2) sum_i ||w_i||^2
 *      (lam[1] = 0.05): every hyperparameter is scalar, and both kinds
 *      (the step's and the loss's) are there
 * fx_mlp_run gives L_val(w_T(lam)) with the in-place optimizer and no
 * bilevel code: the reference for finite differences. */
#define FX_MN 12
#define FX_MV 10
typedef struct {
  double X[FX_MN * 4], Xv[FX_MV * 4];
  int32_t y[FX_MN], yv[FX_MV];
  int kind;
} fx_mlp_data;

static inline ad_tensor *fx_mlp_logits(ad_tape *t, ad_tensor *const *w, const double *X, int n) {
  ad_tensor *x = ad_const(t, AD_F64, 2, (int64_t[]){n, 4}, X);
  ad_tensor *h = ad_tanh(t, ad_add_rowvec(t, ad_matmul(t, x, w[0], 0, 1), w[1]));
  return ad_matmul(t, h, w[2], 0, 1);
}

static inline ad_tensor *fx_mlp_train(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam,
                                      int64_t step, void *ctx) {
  (void)step;
  const fx_mlp_data *d = ctx;
  ad_tensor *L = ad_cross_entropy(t, fx_mlp_logits(t, w, d->X, FX_MN), d->y, FX_MN);
  if (d->kind == 4) {
    ad_tensor *pen = NULL;
    for (int i = 0; i < 3; i++) {
      ad_tensor *q = ad_dot(t, w[i], w[i]);
      pen = pen ? ad_add(t, pen, q) : q;
    }
    return ad_add(t, L, ad_mul(t, ad_scale(t, lam[1], 0.5), pen));
  }
  return d->kind == 0 ? ad_mul(t, ad_exp(t, lam[0]), L) : L;
}

static inline ad_tensor *fx_mlp_val(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam,
                                    int64_t step, void *ctx) {
  (void)step, (void)lam;
  const fx_mlp_data *d = ctx;
  return ad_cross_entropy(t, fx_mlp_logits(t, w, d->Xv, FX_MV), d->yv, FX_MV);
}

typedef struct {
  fx_mlp_data d;
  ad_tensor *w0[3], *lam[4], *hg[4];
  int n_lam;
  bl_problem p;
} fx_mlp;

static inline void fx_mlp_setup(fx_mlp *c, int kind, int64_t T) {
  memset(c, 0, sizeof *c);
  ad_rng g;
  ad_rng_seed(&g, 11);
  c->d.kind = kind;
  for (int i = 0; i < FX_MN * 4; i++) c->d.X[i] = ad_rng_normal(&g);
  for (int i = 0; i < FX_MV * 4; i++) c->d.Xv[i] = ad_rng_normal(&g);
  for (int i = 0; i < FX_MN; i++) c->d.y[i] = (int32_t)ad_rng_below(&g, 3);
  for (int i = 0; i < FX_MV; i++) c->d.yv[i] = (int32_t)ad_rng_below(&g, 3);
  const int64_t shapes[3][2] = {{6, 4}, {6, 1}, {3, 6}};
  const int nd[3] = {2, 1, 2};
  for (int i = 0; i < 3; i++) {
    c->w0[i] = fx_new(AD_F64, nd[i], shapes[i]);
    ad_tensor_fill_normal(c->w0[i], &g, 0.0, 0.5);
  }
  nn_opt_cfg cfg = {.kind = NN_OPT_SGD, .lr = 0.5};
  if (kind == 0) {
    c->n_lam = 1;
    c->lam[0] = fx_new(AD_F64, 0, NULL);
    ad_set(c->lam[0], 0, log(0.5));
    cfg.lr = 1.0;
  } else if (kind == 4) {
    c->n_lam = 2;
    for (int k = 0; k < 2; k++) c->lam[k] = fx_new(AD_F64, 0, NULL);
    ad_set(c->lam[0], 0, 0.1);
    ad_set(c->lam[1], 0, 0.05);
    cfg = (nn_opt_cfg){.kind = NN_OPT_MOMENTUM, .momentum = 0.9, .lr_var = c->lam[0]};
  } else {
    int off = kind == 3;
    c->n_lam = 3 + off;
    if (off) {
      c->lam[0] = fx_new(AD_F64, 0, NULL);
      ad_set(c->lam[0], 0, 0.05);
    }
    for (int i = 0; i < 3; i++) {
      c->lam[off + i] = fx_new(AD_F64, nd[i], shapes[i]);
      ad_tensor_fill_uniform(c->lam[off + i], &g, 0.01, 0.2);
    }
    cfg.weight_decay_vars = c->lam + off;
    if (kind == 2) {
      cfg.kind = NN_OPT_MOMENTUM;
      cfg.momentum = 0.9;
      cfg.lr = 0.1;
    }
    if (kind == 3) {
      cfg.kind = NN_OPT_ADAM;
      cfg.lr_var = c->lam[0];
    }
  }
  for (int k = 0; k < c->n_lam; k++) c->hg[k] = fx_new(AD_F64, c->lam[k]->ndim, c->lam[k]->shape);
  c->p = (bl_problem){.n_w = 3,
                      .w0 = c->w0,
                      .n_lam = c->n_lam,
                      .lam = c->lam,
                      .train_loss = fx_mlp_train,
                      .val_loss = fx_mlp_val,
                      .ctx = &c->d,
                      .opt = cfg,
                      .inner_steps = T};
}

static inline void fx_mlp_free(fx_mlp *c) {
  for (int i = 0; i < 3; i++) ad_tensor_free(c->w0[i]);
  for (int k = 0; k < c->n_lam; k++) {
    ad_tensor_free(c->lam[k]);
    ad_tensor_free(c->hg[k]);
  }
}

/* L_val(w_T(lam)) with the in-place optimizer (no bilevel code involved). */
static inline double fx_mlp_run(fx_mlp *c, ad_tape *t) {
  ad_tensor *w[3];
  for (int i = 0; i < 3; i++) {
    ck_assert_int_eq(ad_tensor_from(&w[i], AD_F64, c->w0[i]->ndim, c->w0[i]->shape, c->w0[i]->data),
                     AD_OK);
    ad_requires_grad(w[i], 1);
  }
  nn_opt_state os;
  ck_assert_int_eq(nn_opt_state_init(&c->p.opt, &os, 3, w), AD_OK);
  for (int64_t k = 0; k < c->p.inner_steps; k++) {
    ad_marker m = ad_mark(t);
    ad_tensor *L = fx_mlp_train(t, w, c->lam, k, &c->d), *g[3];
    ck_assert_int_eq(ad_grad(t, 1, &L, NULL, 3, w, g, 0), AD_OK);
    ck_assert_int_eq(nn_opt_step(&c->p.opt, &os, 3, w, g), AD_OK);
    ad_rewind(t, m);
  }
  ad_marker m = ad_mark(t);
  double v = ad_item(fx_mlp_val(t, w, c->lam, -1, &c->d));
  ad_rewind(t, m);
  nn_opt_state_free(&os);
  for (int i = 0; i < 3; i++) ad_tensor_free(w[i]);
  return v;
}

/* ---------------------------------------------------------------- a method's common duties */

/* The problem's own training loss, failing (NULL) at step 2: an error in
 * the middle of a trajectory. */
static bl_loss_fn fx_inner_train;
static inline ad_tensor *fx_fail_at_2(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam,
                                      int64_t step, void *ctx) {
  return step == 2 ? NULL : fx_inner_train(t, w, lam, step, ctx);
}

static inline ad_tensor *fx_null_loss(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam,
                                      int64_t step, void *ctx) {
  (void)t, (void)w, (void)lam, (void)step, (void)ctx;
  return NULL;
}

/* Every method must: fail cleanly on a NULL problem, mismatched hg shapes
 * and (when min_steps > 0) T = 0, and leave the tape as it found it (arena
 * bytes in use and node count) whether it succeeds or fails. p must be a
 * valid problem whose lam[0] has more than one element or is a scalar. */
static inline void fx_check_duties(const char *name, bl_method_fn f, const bl_problem *p_ok,
                                   const bl_opts *o, ad_tensor *const *hg, int min_steps) {
  ad_tape *t = fx_tape(16);
  /* Something already on the tape, to see that it survives. */
  ad_tensor *x = ad_scalar(t, AD_F64, 2.0);
  ad_requires_grad(x, 1);
  ad_tensor *y = ad_mul(t, x, x);
  ck_assert_ptr_nonnull(y);
  ad_arena_stats a0, a1;
  ad_arena_stats_get(t, &a0);

  /* success leaves the tape as found */
  bl_stats st;
  ad_status s = f(t, p_ok, o, hg, &st);
  ck_assert_msg(s == AD_OK, "%s: %s", name, ad_tape_errmsg(t));
  ad_arena_stats_get(t, &a1);
  ck_assert_msg(a1.used == a0.used && a1.n_nodes == a0.n_nodes,
                "%s: tape not restored (used %zu -> %zu, nodes %zu -> %zu)", name, a0.used, a1.used,
                a0.n_nodes, a1.n_nodes);
  ck_assert_msg(ad_is_recording(t), "%s: recording not restored", name);

  /* NULL problem, NULL tape, NULL hg */
  ck_assert_int_eq(f(t, NULL, o, hg, &st), AD_ERR_NULL);
  ad_tape_clear_error(t);
  ck_assert_int_eq(f(NULL, p_ok, o, hg, &st), AD_ERR_NULL);
  ck_assert_int_eq(f(t, p_ok, o, NULL, &st), AD_ERR_NULL);
  ad_tape_clear_error(t);

  /* hg shaped wrong */
  ad_tensor *bad = fx_new(AD_F64, 1, (int64_t[]){p_ok->lam[0]->size + 1});
  ad_tensor *hg_bad[NN_MAX_PARAMS];
  for (int k = 0; k < p_ok->n_lam; k++) hg_bad[k] = hg[k];
  hg_bad[0] = bad;
  double keep = ad_get(hg[0], 0);
  ck_assert_int_eq(f(t, p_ok, o, hg_bad, &st), AD_ERR_SHAPE);
  ck_assert_msg(strstr(ad_tape_errmsg(t), "hg[0]") != NULL, "%s: message '%s'", name,
                ad_tape_errmsg(t));
  ad_tape_clear_error(t);
  ad_tensor_free(bad);

  /* missing callback, NULL w0 entry */
  bl_problem q = *p_ok;
  q.val_loss = NULL;
  ck_assert_int_eq(f(t, &q, o, hg, &st), AD_ERR_NULL);
  ad_tape_clear_error(t);
  q = *p_ok;
  ad_tensor *w0[NN_MAX_PARAMS];
  for (int i = 0; i < q.n_w; i++) w0[i] = p_ok->w0[i];
  w0[0] = NULL;
  q.w0 = w0;
  ck_assert_int_eq(f(t, &q, o, hg, &st), AD_ERR_NULL);
  ad_tape_clear_error(t);
  q = *p_ok;
  q.n_w = 0;
  ck_assert_int_eq(f(t, &q, o, hg, &st), AD_ERR_ARG);
  ad_tape_clear_error(t);

  /* T below the minimum / negative */
  q = *p_ok;
  q.inner_steps = min_steps > 0 ? 0 : -1;
  ck_assert_int_eq(f(t, &q, o, hg, &st), AD_ERR_ARG);
  ad_tape_clear_error(t);

  /* a loss that fails (returns NULL): an error, and the tape rewound */
  q = *p_ok;
  q.val_loss = fx_null_loss;
  ck_assert_int_eq(f(t, &q, o, hg, &st), AD_ERR_NULL);
  ad_tape_clear_error(t);
  q = *p_ok;
  q.train_loss = fx_null_loss;
  s = f(t, &q, o, hg, &st);
  ck_assert_msg(s == AD_ERR_NULL || (min_steps == 0 && q.inner_steps == 0), "%s: %d", name, s);
  ad_tape_clear_error(t);
  if (p_ok->inner_steps > 2) {
    fx_inner_train = p_ok->train_loss;
    q.train_loss = fx_fail_at_2;
    ck_assert_msg(f(t, &q, o, hg, &st) == AD_ERR_NULL, "%s: failure at step 2 not reported", name);
    ck_assert_msg(strstr(ad_tape_errmsg(t), "step 2") != NULL, "%s: message '%s'", name,
                  ad_tape_errmsg(t));
    ad_tape_clear_error(t);
  }
  ad_arena_stats_get(t, &a1);
  ck_assert_msg(a1.used == a0.used && a1.n_nodes == a0.n_nodes, "%s: tape not restored on errors",
                name);
  ck_assert_msg(ad_get(hg[0], 0) == keep, "%s: hg written on error", name);
  /* the earlier recording still differentiates */
  ad_tensor *dx = NULL;
  ck_assert_int_eq(ad_grad(t, 1, &y, NULL, 1, &x, &dx, 0), AD_OK);
  ck_assert_double_eq_tol(ad_item(dx), 4.0, 1e-15);
  ad_tape_free(t);
}

#endif
