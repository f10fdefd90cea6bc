/* test_bl_meta.c — meta-learning methods (bl_maml, bl_fomaml, bl_imaml):
 *   - MAML's meta-gradient against central differences of the
 *     post-adaptation query loss (sinusoid tasks, tanh MLP, f64);
 *   - FOMAML = MAML minus the second-order term, that term built separately
 *     from Hessian-vector products;
 *   - iMAML on quadratic tasks against the closed form
 *     (I + H/lambda)^{-1} grad L_query(phi*);
 *   - errors on bad input, and the tape left as found.
 * Each assertion states its bound beside it. */
#include "bilevel/bl.h"
#include "datasets/ds.h"
#include "gradcheck.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static ad_tape *new_tape(void) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 16, .arena_max_mb = 64}), AD_OK);
  return t;
}

static ad_tensor *new_tensor(int ndim, const int64_t *shape) {
  ad_tensor *x = NULL;
  ck_assert_int_eq(ad_tensor_new(&x, AD_F64, ndim, shape), AD_OK);
  return x;
}

/* max |a - b| / max |b| over lists of tensors */
static double rel_err(int n, ad_tensor *const *a, ad_tensor *const *b) {
  double num = 0, den = 0;
  for (int k = 0; k < n; k++)
    for (int64_t i = 0; i < a[k]->size; i++) {
      num = fmax(num, fabs(ad_get(a[k], i) - ad_get(b[k], i)));
      den = fmax(den, fabs(ad_get(b[k], i)));
    }
  return den > 0 ? num / den : num;
}

/* ---------------------------------------------------------------- sinusoid tasks */

enum { NT = 3, KS = 10, KQ = 10, HID = 8 };
typedef struct {
  ad_tensor *xs[NT], *ys[NT], *xq[NT], *yq[NT]; /* [K, 1] f64 */
} sine_tasks;

static void sine_make(sine_tasks *s, uint64_t seed) {
  ad_rng r;
  ad_rng_seed(&r, seed);
  for (int i = 0; i < NT; i++) {
    ds_sine_task task;
    ck_assert_int_eq(ds_sine_task_sample(&task, &r), AD_OK);
    s->xs[i] = new_tensor(2, (int64_t[]){KS, 1});
    s->ys[i] = new_tensor(2, (int64_t[]){KS, 1});
    s->xq[i] = new_tensor(2, (int64_t[]){KQ, 1});
    s->yq[i] = new_tensor(2, (int64_t[]){KQ, 1});
    ck_assert_int_eq(ds_sine_task_points(&task, &r, s->xs[i], s->ys[i]), AD_OK);
    ck_assert_int_eq(ds_sine_task_points(&task, &r, s->xq[i], s->yq[i]), AD_OK);
  }
}

static void sine_free(sine_tasks *s) {
  for (int i = 0; i < NT; i++) {
    ad_tensor_free(s->xs[i]);
    ad_tensor_free(s->ys[i]);
    ad_tensor_free(s->xq[i]);
    ad_tensor_free(s->yq[i]);
  }
}

/* 1-HID-HID-1 tanh MLP: params W1 [1,H], b1 [H], W2 [H,H], b2 [H], W3 [H,1], b3 [1]. */
static ad_tensor *mlp(ad_tape *t, ad_tensor *const *p, ad_tensor *x) {
  ad_tensor *h = ad_tanh(t, ad_add_rowvec(t, ad_matmul(t, x, p[0], 0, 0), p[1]));
  h = ad_tanh(t, ad_add_rowvec(t, ad_matmul(t, h, p[2], 0, 0), p[3]));
  return ad_add_rowvec(t, ad_matmul(t, h, p[4], 0, 0), p[5]);
}
static ad_tensor *sine_support(ad_tape *t, ad_tensor *const *p, int task, void *ctx) {
  sine_tasks *s = ctx;
  return ad_mse(t, mlp(t, p, s->xs[task]), s->ys[task]);
}
static ad_tensor *sine_query(ad_tape *t, ad_tensor *const *p, int task, void *ctx) {
  sine_tasks *s = ctx;
  return ad_mse(t, mlp(t, p, s->xq[task]), s->yq[task]);
}

enum { NP = 6 };
static void theta_make(ad_tensor **th, uint64_t seed) {
  const int nd[NP] = {2, 1, 2, 1, 2, 1};
  const int64_t sh[NP][2] = {{1, HID}, {HID}, {HID, HID}, {HID}, {HID, 1}, {1}};
  ad_rng r;
  ad_rng_seed(&r, seed);
  for (int k = 0; k < NP; k++) {
    th[k] = new_tensor(nd[k], sh[k]);
    ad_tensor_fill_normal(th[k], &r, 0, 0.6);
  }
}
static void list_free(int n, ad_tensor **x) {
  for (int k = 0; k < n; k++) ad_tensor_free(x[k]);
}
static void like(int n, ad_tensor *const *src, ad_tensor **out) {
  for (int k = 0; k < n; k++) out[k] = new_tensor(src[k]->ndim, src[k]->shape);
}

/* The meta-loss by plain code, no bilevel library: mean over tasks of
 * L_query(phi_k), phi from k SGD steps on the support loss from theta. */
static double meta_loss(ad_tape *t, ad_tensor *const *theta, sine_tasks *s, double alpha, int k) {
  double sum = 0;
  for (int i = 0; i < NT; i++) {
    ad_marker m = ad_mark(t);
    ad_tensor *phi[NP], *g[NP];
    for (int j = 0; j < NP; j++) { /* copies (ad_detach would share theta's data) */
      phi[j] = ad_const(t, AD_F64, theta[j]->ndim, theta[j]->shape, theta[j]->data);
      ad_requires_grad(phi[j], 1);
    }
    for (int step = 0; step < k; step++) {
      ad_tensor *L = sine_support(t, phi, i, s);
      ck_assert_int_eq(ad_grad(t, 1, &L, NULL, NP, phi, g, 0), AD_OK);
      for (int j = 0; j < NP; j++)
        for (int64_t e = 0; e < phi[j]->size; e++)
          ad_set(phi[j], e, ad_get(phi[j], e) - alpha * ad_get(g[j], e));
    }
    sum += ad_item(sine_query(t, phi, i, s));
    ad_rewind(t, m);
  }
  return sum / NT;
}

START_TEST(test_maml_finite_differences) {
  /* d meta-loss / d theta by bl_maml against central differences (step
   * 1e-5) of meta_loss, for k = 1 and k = 2 inner steps. Bound 1e-6
   * relative (max-norm), f64. */
  sine_tasks s;
  sine_make(&s, 21);
  ad_tensor *th[NP], *mg[NP], *fd[NP];
  theta_make(th, 4);
  like(NP, th, mg);
  like(NP, th, fd);
  ad_tape *t = new_tape();
  for (int k = 1; k <= 2; k++) {
    bl_meta_problem p = {.n_theta = NP,
                         .theta = th,
                         .n_tasks = NT,
                         .support_loss = sine_support,
                         .query_loss = sine_query,
                         .ctx = &s,
                         .inner_lr = 0.05,
                         .inner_steps = k};
    bl_stats st;
    ck_assert_int_eq(bl_maml(t, &p, NULL, mg, &st), AD_OK);
    double h = 1e-5, f0 = meta_loss(t, th, &s, 0.05, k);
    ck_assert(fabs(st.val_loss - f0) <= 1e-12 * (1 + f0)); /* the same meta-loss */
    for (int j = 0; j < NP; j++)
      for (int64_t e = 0; e < th[j]->size; e++) {
        double v = ad_get(th[j], e);
        ad_set(th[j], e, v + h);
        double fp = meta_loss(t, th, &s, 0.05, k);
        ad_set(th[j], e, v - h);
        double fm = meta_loss(t, th, &s, 0.05, k);
        ad_set(th[j], e, v);
        ad_set(fd[j], e, (fp - fm) / (2 * h));
      }
    double err = rel_err(NP, mg, fd);
    printf("maml k=%d vs finite differences: rel err %.2e (bound 1e-6), meta-loss %.4f\n", k, err,
           st.val_loss);
    ck_assert(err <= 1e-6);
    ck_assert_int_eq(st.inner_steps, NT * k);
  }
  list_free(NP, th);
  list_free(NP, mg);
  list_free(NP, fd);
  sine_free(&s);
  ad_tape_free(t);
}
END_TEST

START_TEST(test_fomaml_is_maml_minus_second_order) {
  /* One inner step: phi_i = theta - alpha g_i(theta), and
   *   maml   = mean_i (I - alpha H_i(theta)) grad L_query,i(phi_i)
   *   fomaml = mean_i grad L_query,i(phi_i).
   * The second-order term -alpha mean_i H_i(theta) q_i is built here by
   * ad_hvp on the support loss at theta. Bounds: fomaml vs the mean of q_i
   * 1e-12; maml - fomaml vs that term 1e-9 (relative to the term). */
  sine_tasks s;
  sine_make(&s, 33);
  ad_tensor *th[NP], *mg[NP], *fo[NP], *q[NP], *so[NP], *diff[NP];
  theta_make(th, 8);
  like(NP, th, mg);
  like(NP, th, fo);
  like(NP, th, q);
  like(NP, th, so);
  like(NP, th, diff);
  const double alpha = 0.1;
  bl_meta_problem p = {.n_theta = NP,
                       .theta = th,
                       .n_tasks = NT,
                       .support_loss = sine_support,
                       .query_loss = sine_query,
                       .ctx = &s,
                       .inner_lr = alpha,
                       .inner_steps = 1};
  ad_tape *t = new_tape();
  bl_stats st;
  ck_assert_int_eq(bl_maml(t, &p, NULL, mg, &st), AD_OK);
  ck_assert_int_eq(bl_fomaml(t, &p, NULL, fo, &st), AD_OK);
  for (int i = 0; i < NT; i++) {
    ad_marker m = ad_mark(t);
    ad_tensor *x[NP], *g[NP], *phi[NP], *gq[NP], *hv[NP];
    for (int j = 0; j < NP; j++) {
      x[j] = ad_detach(t, th[j]);
      ad_requires_grad(x[j], 1);
    }
    ad_tensor *Ls = sine_support(t, x, i, &s);
    ck_assert_int_eq(ad_grad(t, 1, &Ls, NULL, NP, x, g, 0), AD_OK);
    for (int j = 0; j < NP; j++) {
      phi[j] = ad_axpy(t, ad_detach(t, x[j]), -alpha, g[j]);
      ad_requires_grad(phi[j], 1);
    }
    ad_tensor *Lq = sine_query(t, phi, i, &s);
    ck_assert_int_eq(ad_grad(t, 1, &Lq, NULL, NP, phi, gq, 0), AD_OK);
    ck_assert_int_eq(ad_hvp(t, Ls, NP, x, gq, hv, 0), AD_OK);
    for (int j = 0; j < NP; j++)
      for (int64_t e = 0; e < th[j]->size; e++) {
        ad_set(q[j], e, ad_get(q[j], e) + ad_get(gq[j], e) / NT);
        ad_set(so[j], e, ad_get(so[j], e) - alpha * ad_get(hv[j], e) / NT);
      }
    ad_rewind(t, m);
  }
  for (int j = 0; j < NP; j++)
    for (int64_t e = 0; e < th[j]->size; e++)
      ad_set(diff[j], e, ad_get(mg[j], e) - ad_get(fo[j], e));
  double e1 = rel_err(NP, fo, q), e2 = rel_err(NP, diff, so);
  printf("fomaml vs mean grad L_query(phi): %.2e (bound 1e-12); maml - fomaml vs "
         "-alpha H grad L_query: %.2e (bound 1e-9)\n",
         e1, e2);
  ck_assert(e1 <= 1e-12);
  ck_assert(e2 <= 1e-9);
  ck_assert(rel_err(NP, mg, fo) > 1e-3); /* the term is not negligible here */
  list_free(NP, th);
  list_free(NP, mg);
  list_free(NP, fo);
  list_free(NP, q);
  list_free(NP, so);
  list_free(NP, diff);
  sine_free(&s);
  ad_tape_free(t);
}
END_TEST

/* ---------------------------------------------------------------- iMAML on quadratics */
/* Task i: L_support(phi) = 1/2 (phi - c_i)^T A_i (phi - c_i),
 *         L_query(phi)   = 1/2 (phi - d_i)^T B_i (phi - d_i),
 * A_i, B_i SPD (d = 6). The proximal solution p_i and its Jacobian:
 *   p_i = (A_i + lam I)^{-1} (A_i c_i + lam theta),
 *   d p_i / d theta = lam (A_i + lam I)^{-1} = (I + A_i/lam)^{-1},
 * so the meta-gradient is mean_i (I + A_i/lam)^{-1} B_i (p_i - d_i). */
enum { QD = 6, QT = 3 };
typedef struct {
  double A[QT][QD * QD], B[QT][QD * QD], c[QT][QD], d[QT][QD];
} quad_tasks;

static ad_tensor *quad(ad_tape *t, ad_tensor *phi, const double *M, const double *c) {
  ad_tensor *r = ad_sub(t, phi, ad_const(t, AD_F64, 2, (int64_t[]){QD, 1}, c));
  ad_tensor *Mr = ad_matmul(t, ad_const(t, AD_F64, 2, (int64_t[]){QD, QD}, M), r, 0, 0);
  return ad_scale(t, ad_dot(t, r, Mr), 0.5);
}
static ad_tensor *quad_support(ad_tape *t, ad_tensor *const *p, int task, void *ctx) {
  quad_tasks *q = ctx;
  return quad(t, p[0], q->A[task], q->c[task]);
}
static ad_tensor *quad_query(ad_tape *t, ad_tensor *const *p, int task, void *ctx) {
  quad_tasks *q = ctx;
  return quad(t, p[0], q->B[task], q->d[task]);
}

/* Solves M x = b (QD x QD) by Gaussian elimination with partial pivoting. */
static void solve(const double *M_in, const double *b, double *x) {
  double M[QD * QD], y[QD];
  memcpy(M, M_in, sizeof M);
  memcpy(y, b, sizeof y);
  for (int c = 0; c < QD; c++) {
    int piv = c;
    for (int i = c + 1; i < QD; i++)
      if (fabs(M[i * QD + c]) > fabs(M[piv * QD + c])) piv = i;
    for (int j = 0; j < QD; j++) {
      double tmp = M[c * QD + j];
      M[c * QD + j] = M[piv * QD + j];
      M[piv * QD + j] = tmp;
    }
    double tmp = y[c];
    y[c] = y[piv];
    y[piv] = tmp;
    for (int i = c + 1; i < QD; i++) {
      double f = M[i * QD + c] / M[c * QD + c];
      for (int j = c; j < QD; j++) M[i * QD + j] -= f * M[c * QD + j];
      y[i] -= f * y[c];
    }
  }
  for (int i = QD - 1; i >= 0; i--) {
    double s = y[i];
    for (int j = i + 1; j < QD; j++) s -= M[i * QD + j] * x[j];
    x[i] = s / M[i * QD + i];
  }
}

static void spd(ad_rng *r, double *M, double shift) {
  double G[QD * QD];
  for (int i = 0; i < QD * QD; i++) G[i] = ad_rng_normal(r) / sqrt(QD);
  for (int i = 0; i < QD; i++)
    for (int j = 0; j < QD; j++) {
      double s = i == j ? shift : 0;
      for (int k = 0; k < QD; k++) s += G[k * QD + i] * G[k * QD + j];
      M[i * QD + j] = s;
    }
}

START_TEST(test_imaml_quadratic_closed_form) {
  /* Inner problem solved to rounding (2000 steps of size 1/(L + lam) on a
   * strongly convex quadratic), CG with K = d: the meta-gradient equals the
   * closed form. Bound 1e-8 relative. With K = 2 CG steps it does not
   * (error > 1e-6): the solve matters. */
  quad_tasks q;
  ad_rng r;
  ad_rng_seed(&r, 9);
  for (int i = 0; i < QT; i++) {
    spd(&r, q.A[i], 0.2);
    spd(&r, q.B[i], 0.5);
    for (int j = 0; j < QD; j++) {
      q.c[i][j] = ad_rng_normal(&r);
      q.d[i][j] = ad_rng_normal(&r);
    }
  }
  ad_tensor *th[1] = {new_tensor(2, (int64_t[]){QD, 1})}, *mg[1], *ex[1];
  like(1, th, mg);
  like(1, th, ex);
  ad_tensor_fill_normal(th[0], &r, 0, 1);
  const double lam = 0.7;
  /* closed form */
  for (int i = 0; i < QT; i++) {
    double M[QD * QD], rhs[QD], phi[QD], g[QD], x[QD];
    for (int a = 0; a < QD; a++) {
      rhs[a] = lam * ad_get(th[0], a);
      for (int b = 0; b < QD; b++) {
        M[a * QD + b] = q.A[i][a * QD + b] + (a == b ? lam : 0);
        rhs[a] += q.A[i][a * QD + b] * q.c[i][b];
      }
    }
    solve(M, rhs, phi);
    for (int a = 0; a < QD; a++) {
      g[a] = 0;
      for (int b = 0; b < QD; b++) g[a] += q.B[i][a * QD + b] * (phi[b] - q.d[i][b]);
    }
    solve(M, g, x); /* (A + lam I)^{-1} g; times lam below */
    for (int a = 0; a < QD; a++) ad_set(ex[0], a, ad_get(ex[0], a) + lam * x[a] / QT);
  }
  bl_meta_problem p = {.n_theta = 1,
                       .theta = th,
                       .n_tasks = QT,
                       .support_loss = quad_support,
                       .query_loss = quad_query,
                       .ctx = &q,
                       .prox = lam,
                       .inner_steps = 2000};
  /* step 1/(L + lam) with L <= max row sum of |A| */
  double L = 0;
  for (int i = 0; i < QT; i++)
    for (int a = 0; a < QD; a++) {
      double s = 0;
      for (int b = 0; b < QD; b++) s += fabs(q.A[i][a * QD + b]);
      L = fmax(L, s);
    }
  p.inner_lr = 1.0 / (L + lam);
  ad_tape *t = new_tape();
  bl_stats st;
  ck_assert_int_eq(bl_imaml(t, &p, &(bl_opts){.K = QD, .tol = 1e-300}, mg, &st), AD_OK);
  double e = rel_err(1, mg, ex);
  printf("imaml vs (I + H/lam)^{-1} grad L_query: rel err %.2e (bound 1e-8), %lld hvps, CG "
         "residual %.1e\n",
         e, (long long)st.hvps, st.residual);
  ck_assert(e <= 1e-8);
  ck_assert_int_eq(st.inner_steps, QT * 2000);
  ck_assert_int_le(st.hvps, QT * QD);
  ck_assert_int_eq(bl_imaml(t, &p, &(bl_opts){.K = 2}, mg, &st), AD_OK);
  double e2 = rel_err(1, mg, ex);
  printf("imaml with K=2 CG steps: rel err %.2e (expected > 1e-6)\n", e2);
  ck_assert(e2 > 1e-6);
  list_free(1, th);
  list_free(1, mg);
  list_free(1, ex);
  ad_tape_free(t);
}
END_TEST

/* ---------------------------------------------------------------- duties */

static ad_tensor *null_loss(ad_tape *t, ad_tensor *const *p, int task, void *ctx) {
  (void)t, (void)p, (void)task, (void)ctx;
  return NULL;
}
static ad_tensor *vector_loss(ad_tape *t, ad_tensor *const *p, int task, void *ctx) {
  (void)task, (void)ctx;
  return ad_scale(t, p[1], 2.0); /* b1: [HID], not a scalar */
}

START_TEST(test_duties) {
  sine_tasks s;
  sine_make(&s, 5);
  ad_tensor *th[NP], *mg[NP];
  theta_make(th, 1);
  like(NP, th, mg);
  bl_meta_problem ok = {.n_theta = NP,
                        .theta = th,
                        .n_tasks = NT,
                        .support_loss = sine_support,
                        .query_loss = sine_query,
                        .ctx = &s,
                        .inner_lr = 0.05,
                        .inner_steps = 1,
                        .prox = 1.0};
  bl_meta_method_fn fs[3] = {bl_maml, bl_fomaml, bl_imaml};
  const char *names[3] = {"maml", "fomaml", "imaml"};
  for (int m = 0; m < 3; m++) {
    ad_tape *t = new_tape();
    /* something already on the tape survives */
    ad_tensor *x = ad_scalar(t, AD_F64, 3.0);
    ad_requires_grad(x, 1);
    ad_tensor *y = ad_mul(t, x, x);
    ad_arena_stats a0, a1;
    ad_arena_stats_get(t, &a0);
    bl_stats st;
    ck_assert_msg(fs[m](t, &ok, NULL, mg, &st) == AD_OK, "%s: %s", names[m], ad_tape_errmsg(t));
    ad_arena_stats_get(t, &a1);
    ck_assert_msg(a1.used == a0.used && a1.n_nodes == a0.n_nodes, "%s: tape not restored",
                  names[m]);
    ck_assert(st.peak_arena_bytes > 0);
    double keep = ad_get(mg[0], 0);
    /* bad input: each an error, no crash */
    ck_assert_int_eq(fs[m](NULL, &ok, NULL, mg, &st), AD_ERR_NULL);
    ck_assert_int_eq(fs[m](t, NULL, NULL, mg, &st), AD_ERR_NULL);
    ad_tape_clear_error(t);
    ck_assert_int_eq(fs[m](t, &ok, NULL, NULL, &st), AD_ERR_NULL);
    ad_tape_clear_error(t);
    struct {
      bl_meta_problem p;
      ad_status want;
    } bad[8];
    for (int i = 0; i < 8; i++) bad[i].p = ok;
    bad[0].p.n_tasks = 0, bad[0].want = AD_ERR_ARG;
    bad[1].p.inner_lr = -1, bad[1].want = AD_ERR_ARG;
    bad[2].p.support_loss = NULL, bad[2].want = AD_ERR_NULL;
    bad[3].p.query_loss = null_loss, bad[3].want = AD_ERR_NULL;
    bad[4].p.support_loss = vector_loss, bad[4].want = AD_ERR_SHAPE;
    bad[5].p.n_theta = 0, bad[5].want = AD_ERR_ARG;
    bad[6].p.inner_steps = m < 2 ? 0 : -1, bad[6].want = AD_ERR_ARG;
    bad[7].p.prox = m == 2 ? 0 : 1, bad[7].want = m == 2 ? AD_ERR_ARG : AD_OK;
    for (int i = 0; i < 8; i++) {
      ad_status got = fs[m](t, &bad[i].p, NULL, mg, &st);
      ck_assert_msg(got == bad[i].want, "%s bad case %d: got %s (%s)", names[m], i,
                    ad_status_str(got), ad_tape_errmsg(t));
      ad_tape_clear_error(t);
    }
    ck_assert_int_eq(fs[m](t, &ok, &(bl_opts){.K = -1}, mg, &st), AD_ERR_ARG);
    ad_tape_clear_error(t);
    /* meta_grad shaped wrong */
    ad_tensor *mg_bad[NP];
    for (int k = 0; k < NP; k++) mg_bad[k] = mg[k];
    mg_bad[2] = new_tensor(1, (int64_t[]){3});
    ck_assert_int_eq(fs[m](t, &ok, NULL, mg_bad, &st), AD_ERR_SHAPE);
    ad_tape_clear_error(t);
    ad_tensor_free(mg_bad[2]);
    ad_arena_stats_get(t, &a1);
    ck_assert_msg(a1.used == a0.used && a1.n_nodes == a0.n_nodes, "%s: tape not restored on errors",
                  names[m]);
    ck_assert(ad_get(mg[0], 0) == keep);       /* errors leave it; successes rewrite the same */
    ck_assert_int_eq(ad_needs_grad(th[0]), 0); /* theta not re-flagged */
    ad_tensor *dx = NULL;
    ck_assert_int_eq(ad_grad(t, 1, &y, NULL, 1, &x, &dx, 0), AD_OK);
    ck_assert_double_eq_tol(ad_item(dx), 6.0, 1e-15);
    ad_tape_free(t);
  }
  list_free(NP, th);
  list_free(NP, mg);
  sine_free(&s);
}
END_TEST

static Suite *meta_suite(void) {
  Suite *s = suite_create("bl_meta");
  TCase *tc = tcase_create("meta");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, test_maml_finite_differences);
  tcase_add_test(tc, test_fomaml_is_maml_minus_second_order);
  tcase_add_test(tc, test_imaml_quadratic_closed_form);
  tcase_add_test(tc, test_duties);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  return gc_run_suite(meta_suite());
}
