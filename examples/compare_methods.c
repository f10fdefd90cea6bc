/* compare_methods.c — every hypergradient method in bl.h on one small
 * problem with a known answer, side by side.
 *
 * The problem: ridge regression with one weight-decay hyperparameter per
 * feature (f64),
 *     L_train(w, lam) = ||X w - y||^2 / (2n) + 1/2 sum_j lam_j w_j^2
 *     L_val(w)        = ||Xv w - yv||^2 / (2m),
 * trained by T = 300 steps of gradient descent from w = 0. Its minimiser
 * w*(lam) = (X^T X/n + diag(lam))^{-1} X^T y/n and the hypergradient
 *     dL_val/dlam_j = -[(X^T X/n + diag(lam))^{-1} grad L_val(w*)]_j w*_j
 * are closed forms, and T is long enough that w_T = w* to rounding, so
 * every method is measured against the same true answer.
 *
 * The columns:
 *   method      the bl_ function (and options that matter)
 *   rel.err     ||g - g*|| / ||g*||, g* the closed form: how far off the
 *               estimate is (1e-15 = rounding; 1 = useless)
 *   cosine      <g, g*> / (||g|| ||g*||): whether it points the right way,
 *               which is what a gradient step on lam needs most; a biased
 *               method can have a large rel.err and still a cosine near 1
 *   seconds     wall time of the one call (inner training included)
 *   peak MB     the arena's high-water mark during the call, above what was
 *               in use before it: the memory the method needed. Unrolling
 *               stores the whole trajectory; implicit methods store one
 *               gradient graph; checkpointing sits in between
 *   HVPs        second-order products used: Hessian- or Jacobian-vector
 *               products, and reverse sweeps through one step's derivative
 *
 * A second, smaller table does the same for the meta-learning methods on
 * sinusoid regression tasks (the MAML benchmark), against MAML's own exact
 * meta-gradient.
 *
 *     ./build/examples/compare_methods [--threads N]
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, in example_util.h */
#include "example_util.h"
#include "hypertape.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- the problem */

enum { N = 80, M = 60, D = 10, T = 300 };

typedef struct {
  double X[N * D], y[N], Xv[M * D], yv[M];
} ridge;

static ad_tensor *fit(ad_tape *t, ad_tensor *w, const double *X, const double *y, int n) {
  ad_tensor *Xt = ad_const(t, AD_F64, 2, (int64_t[]){n, D}, X);
  ad_tensor *yt = ad_const(t, AD_F64, 2, (int64_t[]){n, 1}, y);
  ad_tensor *r = ad_sub(t, ad_matmul(t, Xt, w, 0, 0), yt);
  return ad_scale(t, ad_dot(t, r, r), 0.5 / n);
}
static ad_tensor *penalty(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                          void *ctx) {
  (void)step, (void)ctx;
  return ad_scale(t, ad_sum(t, ad_mul(t, lam[0], ad_mul(t, w[0], w[0]))), 0.5);
}
static ad_tensor *train_loss(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                             void *ctx) {
  ridge *r = ctx;
  return ad_add(t, fit(t, w[0], r->X, r->y, N), penalty(t, w, lam, step, ctx));
}
static ad_tensor *val_loss(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                           void *ctx) {
  (void)lam, (void)step;
  ridge *r = ctx;
  return fit(t, w[0], r->Xv, r->yv, M);
}
/* The Gauss-Newton split: outputs X w, loss of outputs, the penalty. */
static ad_tensor *outputs(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                          void *ctx) {
  (void)lam, (void)step;
  return ad_matmul(t, ad_const(t, AD_F64, 2, (int64_t[]){N, D}, ((ridge *)ctx)->X), w[0], 0, 0);
}
static ad_tensor *out_loss(ad_tape *t, ad_tensor *f, ad_tensor *const *lam, int64_t step,
                           void *ctx) {
  (void)lam, (void)step;
  ad_tensor *r = ad_sub(t, f, ad_const(t, AD_F64, 2, (int64_t[]){N, 1}, ((ridge *)ctx)->y));
  return ad_scale(t, ad_dot(t, r, r), 0.5 / N);
}

/* Solves the SPD system A x = b (D x D) by Cholesky; A is overwritten. */
static void chol_solve(double *A, const double *b, double *x) {
  for (int j = 0; j < D; j++) {
    for (int k = 0; k < j; k++) A[j * D + j] -= A[j * D + k] * A[j * D + k];
    A[j * D + j] = sqrt(A[j * D + j]);
    for (int i = j + 1; i < D; i++) {
      for (int k = 0; k < j; k++) A[i * D + j] -= A[i * D + k] * A[j * D + k];
      A[i * D + j] /= A[j * D + j];
    }
  }
  for (int i = 0; i < D; i++) {
    x[i] = b[i];
    for (int k = 0; k < i; k++) x[i] -= A[i * D + k] * x[k];
    x[i] /= A[i * D + i];
  }
  for (int i = D - 1; i >= 0; i--) {
    for (int k = i + 1; k < D; k++) x[i] -= A[k * D + i] * x[k];
    x[i] /= A[i * D + i];
  }
}

/* The closed-form hypergradient at lam. */
static void closed_form(const ridge *r, const double *lam, double *hg) {
  double A[D * D] = {0}, A2[D * D], c[D] = {0}, ws[D], gv[D] = {0}, z[D];
  for (int i = 0; i < N; i++)
    for (int j = 0; j < D; j++) {
      c[j] += r->X[i * D + j] * r->y[i] / N;
      for (int k = 0; k < D; k++) A[j * D + k] += r->X[i * D + j] * r->X[i * D + k] / N;
    }
  for (int j = 0; j < D; j++) A[j * D + j] += lam[j];
  memcpy(A2, A, sizeof A);
  chol_solve(A, c, ws);
  for (int i = 0; i < M; i++) {
    double e = -r->yv[i];
    for (int j = 0; j < D; j++) e += r->Xv[i * D + j] * ws[j];
    for (int j = 0; j < D; j++) gv[j] += r->Xv[i * D + j] * e / M;
  }
  chol_solve(A2, gv, z);
  for (int j = 0; j < D; j++) hg[j] = -z[j] * ws[j];
}

/* ---------------------------------------------------------------- the table */

static void row(const char *name, const double *g, const double *ref, int64_t n,
                const bl_stats *st) {
  double dd = 0, gg = 0, rr = 0, gr = 0;
  for (int64_t i = 0; i < n; i++) {
    dd += (g[i] - ref[i]) * (g[i] - ref[i]);
    gg += g[i] * g[i];
    rr += ref[i] * ref[i];
    gr += g[i] * ref[i];
  }
  double cosv = gg > 0 && rr > 0 ? gr / sqrt(gg * rr) : 0;
  printf("%-26s %10.2e %9.5f %9.4f %9.2f %7lld\n", name, sqrt(dd / rr), cosv, st->seconds,
         (double)st->peak_arena_bytes / (1 << 20), (long long)st->hvps);
}

static void header(void) {
  printf("%-26s %10s %9s %9s %9s %7s\n", "method", "rel.err", "cosine", "seconds", "peak MB",
         "HVPs");
  printf("%-26s %10s %9s %9s %9s %7s\n", "------", "-------", "------", "-------", "-------",
         "----");
}

typedef struct {
  const char *name;
  bl_method_fn f;
  bl_opts o;
} method;

static int hyperparameter_table(ad_tape *tape) {
  static ridge r;
  ad_rng g;
  ad_rng_seed(&g, 2024);
  double wt[D];
  for (int j = 0; j < D; j++) wt[j] = ad_rng_normal(&g);
  for (int i = 0; i < N + M; i++) {
    double *x = i < N ? r.X + i * D : r.Xv + (i - N) * D, s = 0;
    for (int j = 0; j < D; j++) s += (x[j] = ad_rng_normal(&g)) * wt[j];
    *(i < N ? &r.y[i] : &r.yv[i - N]) = s + 0.5 * ad_rng_normal(&g);
  }
  double lam_v[D], ref[D], got[D];
  for (int j = 0; j < D; j++) lam_v[j] = 0.05 + 0.05 * j;
  closed_form(&r, lam_v, ref);

  ad_tensor *w0 = NULL, *lam = NULL, *hg = NULL;
  if (ad_tensor_new(&w0, AD_F64, 2, (int64_t[]){D, 1}) ||
      ad_tensor_new(&lam, AD_F64, 2, (int64_t[]){D, 1}) ||
      ad_tensor_new(&hg, AD_F64, 2, (int64_t[]){D, 1})) {
    fprintf(stderr, "out of memory: %s\n", ad_last_error());
    return 1;
  }
  for (int j = 0; j < D; j++) ad_set(lam, j, lam_v[j]);
  bl_problem p = {.n_w = 1,
                  .w0 = &w0,
                  .n_lam = 1,
                  .lam = &lam,
                  .train_loss = train_loss,
                  .val_loss = val_loss,
                  .ctx = &r,
                  .opt = {.kind = NN_OPT_SGD, .lr = 0.3},
                  .inner_steps = T,
                  .train_output = outputs,
                  .train_out_loss = out_loss,
                  .train_reg = penalty};
  bl_hoag_state hs = {0};
  const method ms[] = {
      {"exact (dense LU)", bl_exact, {0}},
      {"cg K=10", bl_cg, {.K = 10}},
      {"cg K=10 gauss-newton", bl_cg, {.K = 10, .gauss_newton = 1}},
      {"cg K=3", bl_cg, {.K = 3}},
      {"hoag (first call)", bl_hoag, {.hoag = &hs, .warm_start = 1}},
      {"neumann K=20", bl_neumann, {.K = 20}},
      {"fixed_point K=20", bl_fixed_point, {.K = 20}},
      {"unroll", bl_unroll, {0}},
      {"unroll truncated K=10", bl_unroll, {.K = 10}},
      {"forward", bl_forward, {0}},
      {"checkpointed", bl_checkpointed, {0}},
      {"drmad", bl_drmad, {0}},
      {"fo (direct only)", bl_fo, {0}},
      {"one_step", bl_one_step, {0}},
      {"t1t2", bl_t1t2, {0}},
      {"t1t2 darts_fd", bl_t1t2, {.darts_fd = 1}},
      {"greedy gamma=0.9", bl_greedy, {0}},
      {"hyperdistill", bl_hyperdistill, {0}},
      {"zero_order N=16 anti.", bl_zero_order, {.antithetic = 1, .seed = 1}},
      {"sama", bl_sama, {0}},
  };
  printf("Hypergradient of L_val w.r.t. %d per-feature weight decays (ridge regression, "
         "T = %d GD steps, f64)\n\n",
         D, T);
  header();
  int failures = 0;
  for (size_t i = 0; i < sizeof ms / sizeof ms[0]; i++) {
    bl_stats st = {0};
    ad_status s = ms[i].f(tape, &p, &ms[i].o, &hg, &st);
    if (s != AD_OK) {
      printf("%-26s failed: %s\n", ms[i].name, ad_tape_errmsg(tape));
      ad_tape_clear_error(tape);
      failures++;
      continue;
    }
    for (int j = 0; j < D; j++) got[j] = ad_get(hg, j);
    row(ms[i].name, got, ref, D, &st);
  }
  bl_hoag_state_free(&hs);
  ad_tensor_free(w0);
  ad_tensor_free(lam);
  ad_tensor_free(hg);
  return failures;
}

/* ---------------------------------------------------------------- meta-learning */

enum { TASKS = 10, KPTS = 10, HID = 40 };
typedef struct {
  ad_tensor *xs[TASKS], *ys[TASKS], *xq[TASKS], *yq[TASKS];
} sine;

static ad_tensor *net(ad_tape *t, ad_tensor *const *p, ad_tensor *x) {
  ad_tensor *h = ad_relu(t, ad_add_rowvec(t, ad_matmul(t, x, p[0], 0, 0), p[1]));
  h = ad_relu(t, ad_add_rowvec(t, ad_matmul(t, h, p[2], 0, 0), p[3]));
  return ad_add_rowvec(t, ad_matmul(t, h, p[4], 0, 0), p[5]);
}
static ad_tensor *support(ad_tape *t, ad_tensor *const *p, int i, void *ctx) {
  sine *s = ctx;
  return ad_mse(t, net(t, p, s->xs[i]), s->ys[i]);
}
static ad_tensor *query(ad_tape *t, ad_tensor *const *p, int i, void *ctx) {
  sine *s = ctx;
  return ad_mse(t, net(t, p, s->xq[i]), s->yq[i]);
}

static int meta_table(ad_tape *tape) {
  static sine s;
  ad_rng g;
  ad_rng_seed(&g, 7);
  int64_t kshape[2] = {KPTS, 1};
  for (int i = 0; i < TASKS; i++) {
    ds_sine_task task;
    ds_sine_task_sample(&task, &g);
    ad_tensor **xs[4] = {&s.xs[i], &s.ys[i], &s.xq[i], &s.yq[i]};
    for (int k = 0; k < 4; k++)
      if (ad_tensor_new(xs[k], AD_F64, 2, kshape)) return 1;
    ds_sine_task_points(&task, &g, s.xs[i], s.ys[i]);
    ds_sine_task_points(&task, &g, s.xq[i], s.yq[i]);
  }
  const int nd[6] = {2, 1, 2, 1, 2, 1};
  const int64_t sh[6][2] = {{1, HID}, {HID}, {HID, HID}, {HID}, {HID, 1}, {1}};
  ad_tensor *th[6], *mg[6];
  int64_t P = 0;
  for (int k = 0; k < 6; k++) {
    if (ad_tensor_new(&th[k], AD_F64, nd[k], sh[k]) || ad_tensor_new(&mg[k], AD_F64, nd[k], sh[k]))
      return 1;
    double fan_in = k == 0 || k == 1 ? 1 : HID;
    ad_tensor_fill_normal(th[k], &g, 0, k % 2 ? 0.0 : sqrt(2.0 / fan_in));
    P += th[k]->size;
  }
  bl_meta_problem p = {.n_theta = 6,
                       .theta = th,
                       .n_tasks = TASKS,
                       .support_loss = support,
                       .query_loss = query,
                       .ctx = &s,
                       .inner_lr = 0.01,
                       .inner_steps = 1,
                       .prox = 1.0};
  double *ref = malloc(sizeof(double) * (size_t)P), *got = malloc(sizeof(double) * (size_t)P);
  if (!ref || !got) return 1;
  struct {
    const char *name;
    bl_meta_method_fn f;
    int64_t steps;
  } ms[] = {{"maml (the reference)", bl_maml, 1},
            {"fomaml", bl_fomaml, 1},
            {"imaml (10 prox steps, K=20)", bl_imaml, 10}};
  printf("\nMeta-gradient over %d sinusoid tasks (MLP 1-%d-%d-1 ReLU, %d support / %d query "
         "points, one inner SGD step, f64);\nerrors against MAML's exact meta-gradient. iMAML "
         "answers a different question (the proximal\ninner problem, lambda = %.1f), so its "
         "error is a difference of objectives, not a bug. At this initialisation\n"
         "the support losses are large and alpha H is not small, so FOMAML's dropped term "
         "matters.\n\n",
         TASKS, HID, HID, KPTS, KPTS, p.prox);
  header();
  int failures = 0;
  for (int m = 0; m < 3; m++) {
    bl_stats st = {0};
    p.inner_steps = ms[m].steps;
    if (ms[m].f(tape, &p, NULL, mg, &st) != AD_OK) {
      printf("%-26s failed: %s\n", ms[m].name, ad_tape_errmsg(tape));
      ad_tape_clear_error(tape);
      failures++;
      continue;
    }
    int64_t c = 0;
    for (int k = 0; k < 6; k++)
      for (int64_t j = 0; j < mg[k]->size; j++) got[c++] = ad_get(mg[k], j);
    if (m == 0) memcpy(ref, got, sizeof(double) * (size_t)P);
    row(ms[m].name, got, ref, P, &st);
  }
  free(ref);
  free(got);
  for (int k = 0; k < 6; k++) {
    ad_tensor_free(th[k]);
    ad_tensor_free(mg[k]);
  }
  for (int i = 0; i < TASKS; i++) {
    ad_tensor_free(s.xs[i]);
    ad_tensor_free(s.ys[i]);
    ad_tensor_free(s.xq[i]);
    ad_tensor_free(s.yq[i]);
  }
  return failures;
}

int main(int argc, char **argv) {
  int threads = 0;
  const ex_opt opts[] = {EX_OPT_THREADS(&threads), {0}};
  ex_parse_args(argc, argv,
                "every hypergradient method on ridge regression against the closed form, and the "
                "meta-learning methods on sinusoid tasks against MAML's exact meta-gradient",
                opts);
  ex_set_threads(threads);
  ad_tape *tape = NULL;
  if (ad_tape_new(&tape, &(ad_tape_opts){.arena_mb = 64, .arena_max_mb = 1024}) != AD_OK) {
    fprintf(stderr, "cannot make a tape: %s\n", ad_last_error());
    return 1;
  }
  int failures = hyperparameter_table(tape) + meta_table(tape);
  ad_tape_free(tape);
  return failures ? 1 : 0;
}
