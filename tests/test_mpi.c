/* test_mpi.c — distribution over MPI (bilevel/bl_mpi.h), run by ctest under
 * mpirun at 1, 2 and 4 ranks (label mpi). Every test is collective: all
 * ranks run it, and each asserts on its own results.
 *   - the two ops: R and C values, first and second derivatives against
 *     closed forms in the rank count;
 *   - data-parallel ridge regression (training rows and validation rows
 *     sharded, uneven at 4 ranks): unroll, forward, checkpointed, CG,
 *     Neumann, fixed point and HOAG hypergradients against the same method
 *     run by this process alone on the whole batch, 1e-12 relative, and the
 *     same bits on every rank;
 *   - a MAML / FOMAML / iMAML meta-batch of 7 quadratic tasks split across
 *     ranks against the method on all 7 tasks, 1e-12;
 *   - zero-order directions split across ranks against one process drawing
 *     the same blocks, 1e-12, and that against bl_zero_order block by block;
 *   - both sum paths (one allgather; reduce-scatter + allgather);
 *   - a two-level engine with data-parallel levels against the engine on
 *     the whole batch (unroll and CG edges), 1e-12; save/resume with one
 *     file per rank, bit-identical; a missing file fails every rank;
 *   - faults: ranks that disagree on settings or shapes, and a rank whose
 *     loss fails mid-run, end in errors on every rank (no hang), after which
 *     the handle still works; a rank late beyond the timeout makes the
 *     others fail with a timeout error and a handle that refuses work. */
#define _POSIX_C_SOURCE 200809L /* sleep */
#include "bilevel/bl_mpi.h"
#include "bl_fixtures.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static bl_mpi *D;    /* MPI_COMM_WORLD */
static int R_, P_;   /* rank, size */
static bl_mpi *SELF; /* MPI_COMM_SELF: "this process alone" */
static bl_mpi *RS;   /* MPI_COMM_WORLD, reduce-scatter + allgather from 4 elements */

/* 1 when x holds the same bits on every rank. */
static int same_everywhere(int n, ad_tensor *const *x) {
  int64_t total = 0;
  for (int k = 0; k < n; k++) total += x[k]->size;
  double *v = malloc((size_t)total * sizeof *v), *all = malloc((size_t)(total * P_) * sizeof *v);
  int64_t j = 0;
  for (int k = 0; k < n; k++)
    for (int64_t i = 0; i < x[k]->size; i++) v[j++] = ad_get(x[k], i);
  MPI_Allgather(v, (int)total, MPI_DOUBLE, all, (int)total, MPI_DOUBLE, MPI_COMM_WORLD);
  int ok = memcmp(all, all + (P_ - 1) * total, (size_t)total * sizeof *v) == 0;
  for (int r = 1; r < P_; r++) ok &= memcmp(all, all + r * total, (size_t)total * 8) == 0;
  free(v);
  free(all);
  return ok;
}

/* ---------------------------------------------------------------- the ops */

/* x_r = (r + 1) * (1, 2, 3): R(x) = P(P+1)/2 (1, 2, 3) on every rank.
 * f(w) = R(sum((r+1) C(w)^2)) = P(P+1)/2 ||w||^2, so grad f = P(P+1) w
 * and H v = P(P+1) v: the second derivative goes through R's rule (C) and
 * C's rule (R) once more. */
START_TEST(test_ops) {
  ad_tape *t = fx_tape(8);
  double c = P_ * (P_ + 1) / 2.0;
  ad_tensor *x = ad_zeros(t, AD_F64, 1, (int64_t[]){3});
  for (int i = 0; i < 3; i++) ad_set(x, i, (R_ + 1) * (i + 1.0));
  ad_tensor *y = bl_mpi_sum(t, D, x);
  ck_assert_ptr_nonnull(y);
  for (int i = 0; i < 3; i++) ck_assert_double_eq_tol(ad_get(y, i), c * (i + 1), 1e-12);
  /* a scalar rides in the header */
  ad_tensor *s = bl_mpi_sum(t, D, ad_scalar(t, AD_F64, R_ + 1.0));
  ck_assert_double_eq_tol(ad_get(s, 0), c, 1e-12);

  ad_tensor *w = fx_new(AD_F64, 1, (int64_t[]){3}), *v = fx_new(AD_F64, 1, (int64_t[]){3});
  ad_requires_grad(w, 1);
  for (int i = 0; i < 3; i++) ad_set(w, i, 0.5 - i), ad_set(v, i, 1.0 + 2 * i);
  ad_tensor *cw = bl_mpi_copy(t, D, w);
  ad_tensor *f = bl_mpi_sum(t, D, ad_scale(t, ad_sum(t, ad_mul(t, cw, cw)), R_ + 1.0));
  ck_assert_double_eq_tol(ad_get(f, 0), c * (0.25 + 0.25 + 2.25), 1e-12);
  ad_tensor *g = NULL, *hv = NULL;
  ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 1, &w, &g, 0), AD_OK);
  for (int i = 0; i < 3; i++) ck_assert_double_eq_tol(ad_get(g, i), 2 * c * (0.5 - i), 1e-12);
  ck_assert_int_eq(ad_hvp(t, f, 1, &w, &v, &hv, 0), AD_OK);
  for (int i = 0; i < 3; i++) ck_assert_double_eq_tol(ad_get(hv, i), 2 * c * (1.0 + 2 * i), 1e-12);
  ad_tensor *gl[1] = {g};
  ck_assert(same_everywhere(1, gl));
  ad_tensor_free(w);
  ad_tensor_free(v);
  ad_tape_free(t);
}
END_TEST

/* ---------------------------------------------------------------- data-parallel ridge */

/* This rank's shares of fx_ridge_train / fx_ridge_val: its rows of the
 * fit, weighted rows / n so the shares add up to the mean, and the penalty
 * divided by the size (every rank records the same ops). fail_rank fails its training loss from
 * step fail_step. */
typedef struct {
  const fx_ridge *rp;
  int rank, size;
  int fail_rank;
  int64_t fail_step;
} shard;

static ad_tensor *shard_fit(ad_tape *t, ad_tensor *const *w, const shard *s, int n, const double *X,
                            const double *y) {
  int lo = n * s->rank / s->size, hi = n * (s->rank + 1) / s->size, d = s->rp->d;
  ad_tensor *fit = fx_ridge_fit(t, w, hi - lo, d, X + lo * d, y + lo);
  return ad_scale(t, fit, (double)(hi - lo) / n);
}

static ad_tensor *shard_train(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                              void *ctx) {
  const shard *s = ctx;
  if (s->rank == s->fail_rank && step >= s->fail_step) {
    ad_custom_fail(t, AD_ERR_NUMERIC, "shard_train: simulated failure at step %lld",
                   (long long)step);
    return NULL;
  }
  ad_tensor *fit = shard_fit(t, w, s, s->rp->n, s->rp->X, s->rp->y);
  return ad_add(t, fit, ad_scale(t, fx_ridge_pen(t, w, lam), 1.0 / s->size));
}

static ad_tensor *shard_val(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                            void *ctx) {
  (void)lam, (void)step;
  const shard *s = ctx;
  return shard_fit(t, w, s, s->rp->m, s->rp->Xv, s->rp->yv);
}

/* The sharded twin of c->p. */
static void make_dp(fx_rcase *c, shard *sh, bl_mpi_problem *dp) {
  *sh = (shard){.rp = &c->rp, .rank = R_, .size = P_, .fail_rank = -1};
  bl_problem local = c->p;
  local.train_loss = shard_train;
  local.val_loss = shard_val;
  local.ctx = sh;
  ck_assert_int_eq(bl_mpi_shard(D, &local, dp), AD_OK);
}

typedef struct {
  const char *name;
  bl_method_fn f;
  int64_t T;
  bl_opts o;
} dp_case;

static const dp_case DP_CASES[] = {
    {"unroll", bl_unroll, 30, {0}},
    {"unroll K=10", bl_unroll, 30, {.K = 10}},
    {"forward", bl_forward, 30, {0}},
    {"checkpointed", bl_checkpointed, 30, {.checkpoint_every = 7}},
    {"cg", bl_cg, 200, {.K = 5, .tol = 1e-300}},
    {"neumann", bl_neumann, 200, {.K = 40}},
    {"fixed_point", bl_fixed_point, 200, {.K = 60, .tol = 1e-300}},
};

static void dp_check(const char *name, bl_method_fn f, int64_t T, const bl_opts *o) {
  fx_rcase c;
  fx_rcase_setup(&c, 1, T, 0.1);
  ad_tape *t = fx_tape(32);
  bl_stats st1, st;
  ad_tensor *ref = fx_new(AD_F64, 2, (int64_t[]){c.rp.d, 1});
  ad_tensor *refl[1] = {ref};
  ck_assert_msg(f(t, &c.p, o, refl, &st1) == AD_OK, "%s: %s", name, ad_tape_errmsg(t));
  shard sh;
  bl_mpi_problem dp;
  make_dp(&c, &sh, &dp);
  bl_mpi_stats ms0, ms1;
  bl_mpi_stats_get(D, &ms0);
  ad_status s = bl_mpi_call(D, f, t, &dp.p, o, c.hg, &st);
  ck_assert_msg(s == AD_OK, "%s: %s", name, ad_tape_errmsg(t));
  bl_mpi_stats_get(D, &ms1);
  double e = fx_rel_t(1, c.hg, refl);
  if (R_ == 0)
    printf("mpi np=%d %-13s rel err %.2e vs one process; %lld collectives, %lld bytes in, "
           "%.2f ms in collectives\n",
           P_, name, e, (long long)(ms1.collectives - ms0.collectives),
           (long long)(ms1.bytes - ms0.bytes), 1e3 * (ms1.seconds - ms0.seconds));
  ck_assert_msg(e <= 1e-12, "%s: relative error %.3e vs one process (bound 1e-12)", name, e);
  ck_assert_msg(same_everywhere(1, c.hg), "%s: ranks differ", name);
  ck_assert_double_eq_tol(st.val_loss, st1.val_loss, 1e-12 * fabs(st1.val_loss));
  ck_assert_int_eq(st.iterations, st1.iterations); /* the same solver path */
  ad_tensor_free(ref);
  ad_tape_free(t);
  fx_rcase_free(&c);
}

START_TEST(test_dp_methods) {
  const dp_case *k = &DP_CASES[_i];
  dp_check(k->name, k->f, k->T, &k->o);
}
END_TEST

/* The bandwidth path of the sums (reduce-scatter in rank order, then
 * allgather; uneven segments at 4 ranks): values, and two methods whose
 * 5-element gradients all take it. */
START_TEST(test_reduce_scatter_path) {
  ad_tape *t = fx_tape(8);
  double c = P_ * (P_ + 1) / 2.0;
  ad_tensor *x = ad_zeros(t, AD_F64, 1, (int64_t[]){11});
  for (int i = 0; i < 11; i++) ad_set(x, i, (R_ + 1) * (i + 1.0));
  ad_tensor *y = bl_mpi_sum(t, RS, x);
  ck_assert_ptr_nonnull(y);
  for (int i = 0; i < 11; i++) ck_assert_double_eq_tol(ad_get(y, i), c * (i + 1), 1e-12);
  ad_tape_free(t);
  bl_mpi *keep = D;
  D = RS;
  dp_check("unroll (rs)", bl_unroll, 30, &(bl_opts){0});
  dp_check("cg (rs)", bl_cg, 200, &(bl_opts){.K = 5, .tol = 1e-300});
  D = keep;
}
END_TEST

/* HOAG over three outer steps: the decreasing tolerance and the warm start
 * are state carried across calls, the same on every rank. */
START_TEST(test_dp_hoag) {
  fx_rcase c;
  fx_rcase_setup(&c, 1, 200, 0.1);
  ad_tape *t = fx_tape(32);
  ad_tensor *ref = fx_new(AD_F64, 2, (int64_t[]){c.rp.d, 1});
  ad_tensor *refl[1] = {ref};
  shard sh;
  bl_mpi_problem dp;
  make_dp(&c, &sh, &dp);
  bl_hoag_state h1 = {.tol0 = 1e-1, .decay = 0.1, .tol_min = 1e-12}, h2 = h1;
  for (int call = 0; call < 3; call++) {
    bl_stats a, b;
    ck_assert_int_eq(bl_hoag(t, &c.p, &(bl_opts){.hoag = &h1, .warm_start = 1}, refl, &a), AD_OK);
    ck_assert_msg(bl_mpi_call(D, bl_hoag, t, &dp.p, &(bl_opts){.hoag = &h2, .warm_start = 1}, c.hg,
                              &b) == AD_OK,
                  "hoag call %d: %s", call, ad_tape_errmsg(t));
    double e = fx_rel_t(1, c.hg, refl);
    ck_assert_msg(e <= 1e-12, "hoag call %d: relative error %.3e (bound 1e-12)", call, e);
    ck_assert_int_eq(a.iterations, b.iterations);
    ck_assert(same_everywhere(1, c.hg));
  }
  bl_hoag_state_free(&h1);
  bl_hoag_state_free(&h2);
  ad_tensor_free(ref);
  ad_tape_free(t);
  fx_rcase_free(&c);
}
END_TEST

/* ---------------------------------------------------------------- the engine */

/* Two levels on the ridge problem: cls (w) on the training loss, hpo (lam)
 * on the validation loss through an edge method. dp: both losses are
 * bl_mpi_level_loss over this rank's shards; else the whole batch. */
typedef struct {
  fx_rcase c;
  shard sh;
  bl_mpi_level lc, lh;
  ad_tensor *w, *lam;
  bl_engine *e;
} eng;

static ad_tensor *eng_cls_shard(ad_tape *t, const bl_vars *v, void *ctx) {
  return shard_train(t, v->p[0], v->p[1], v->step, ctx);
}
static ad_tensor *eng_hpo_shard(ad_tape *t, const bl_vars *v, void *ctx) {
  return shard_val(t, v->p[0], v->p[1], v->step, ctx);
}
static ad_tensor *eng_cls_whole(ad_tape *t, const bl_vars *v, void *ctx) {
  return fx_ridge_train(t, v->p[0], v->p[1], v->step, ctx);
}
static ad_tensor *eng_hpo_whole(ad_tape *t, const bl_vars *v, void *ctx) {
  return fx_ridge_val(t, v->p[0], v->p[1], v->step, ctx);
}

static void eng_make(eng *g, int dp, bl_method m) {
  fx_rcase_setup(&g->c, 1, 1, 0.1);
  g->sh = (shard){.rp = &g->c.rp, .rank = R_, .size = P_, .fail_rank = -1};
  g->lc = (bl_mpi_level){.mpi = D, .local = eng_cls_shard, .ctx = &g->sh, .n = {1, 1}};
  g->lh = (bl_mpi_level){.mpi = D, .local = eng_hpo_shard, .ctx = &g->sh, .n = {1, 1}};
  g->w = fx_new(AD_F64, 2, (int64_t[]){g->c.rp.d, 1});
  g->lam = fx_new(AD_F64, 2, (int64_t[]){g->c.rp.d, 1});
  ad_copy_values(g->w, g->c.w0[0]);
  ad_copy_values(g->lam, g->c.lam[0]);
  static const nn_opt_cfg sgd = {.kind = NN_OPT_SGD, .lr = 0.1},
                          up = {.kind = NN_OPT_SGD, .lr = 0.5};
  ck_assert_int_eq(bl_engine_new(&g->e, NULL), AD_OK);
  bl_level cls = {.name = "cls", .n = 1, .params = &g->w, .opt = &sgd, .steps = 8};
  bl_level hpo = {.name = "hpo", .n = 1, .params = &g->lam, .opt = &up, .n_deps = 1};
  hpo.deps[0] = (bl_dep){.level = "cls", .method = m, .opts = {.K = 5, .tol = 1e-300}};
  if (dp) {
    cls.loss = bl_mpi_level_loss, cls.ctx = &g->lc;
    hpo.loss = bl_mpi_level_loss, hpo.ctx = &g->lh;
  } else {
    cls.loss = eng_cls_whole, cls.ctx = &g->c.rp;
    hpo.loss = eng_hpo_whole, hpo.ctx = &g->c.rp;
  }
  ck_assert_int_eq(bl_engine_add(g->e, &cls, NULL), AD_OK);
  ck_assert_int_eq(bl_engine_add(g->e, &hpo, NULL), AD_OK);
  ck_assert_msg(bl_engine_build(g->e) == AD_OK, "%s", bl_engine_errmsg(g->e));
}

static void eng_free(eng *g) {
  bl_engine_free(g->e);
  ad_tensor_free(g->w);
  ad_tensor_free(g->lam);
  fx_rcase_free(&g->c);
}

/* Four engine steps (32 cls steps, 4 hypergradient steps of lam) with the
 * levels data-parallel = the same engine on the whole batch, 1e-12, for an
 * unrolled and an implicit edge. */
START_TEST(test_engine_dp) {
  bl_method ms[] = {BL_UNROLL, BL_CG};
  for (int k = 0; k < 2; k++) {
    eng a, b;
    eng_make(&a, 0, ms[k]);
    eng_make(&b, 1, ms[k]);
    ck_assert_int_eq(bl_engine_run(a.e, 4, NULL), AD_OK);
    ck_assert_msg(bl_engine_run(b.e, 4, NULL) == AD_OK, "%s", bl_engine_errmsg(b.e));
    ad_tensor *x[2] = {b.w, b.lam}, *y[2] = {a.w, a.lam};
    double e = fx_rel_t(2, x, y);
    ck_assert_msg(e <= 1e-12, "engine %d: relative error %.3e (bound 1e-12)", k, e);
    ck_assert(same_everywhere(2, x));
    /* lam moved: the test is not of a fixed point */
    ck_assert(fabs(ad_get(a.lam, 0) - ad_get(a.c.lam[0], 0)) > 1e-6);
    eng_free(&a);
    eng_free(&b);
  }
}
END_TEST

/* Save after 2 steps, 2 more; a new engine resumed from the files takes the
 * same 2 steps to the same bits. Then a rank without its file: every rank
 * fails the load. */
START_TEST(test_engine_resume) {
  int tag = (int)getpid();
  MPI_Bcast(&tag, 1, MPI_INT, 0, MPI_COMM_WORLD);
  char path[128];
  snprintf(path, sizeof path, "/tmp/ht_test_mpi_%d_np%d", tag, P_);
  eng a, b, c;
  eng_make(&a, 1, BL_UNROLL);
  ck_assert_int_eq(bl_engine_run(a.e, 2, NULL), AD_OK);
  ck_assert_msg(bl_mpi_engine_save(D, a.e, path) == AD_OK, "%s", bl_mpi_errmsg(D));
  ck_assert_int_eq(bl_engine_run(a.e, 2, NULL), AD_OK);
  eng_make(&b, 1, BL_UNROLL);
  ck_assert_msg(bl_mpi_engine_load(D, b.e, path) == AD_OK, "%s", bl_mpi_errmsg(D));
  ck_assert_int_eq(bl_engine_steps_done(b.e), 2);
  ck_assert_int_eq(bl_engine_run(b.e, 2, NULL), AD_OK);
  for (int j = 0; j < a.c.rp.d; j++) {
    ck_assert(ad_get(a.w, j) == ad_get(b.w, j));
    ck_assert(ad_get(a.lam, j) == ad_get(b.lam, j));
  }
  char mine[160];
  snprintf(mine, sizeof mine, "%s.%dof%d", path, R_, P_);
  MPI_Barrier(MPI_COMM_WORLD);
  if (R_ == P_ - 1) remove(mine);
  MPI_Barrier(MPI_COMM_WORLD);
  eng_make(&c, 1, BL_UNROLL);
  ck_assert_int_ne(bl_mpi_engine_load(D, c.e, path), AD_OK);
  char want[32];
  snprintf(want, sizeof want, "rank %d failed", P_ - 1);
  ck_assert_msg(strstr(bl_mpi_errmsg(D), want) != NULL, "%s", bl_mpi_errmsg(D));
  remove(mine);
  eng_free(&a);
  eng_free(&b);
  eng_free(&c);
}
END_TEST

/* ---------------------------------------------------------------- meta-batches */

/* Task i: support and query losses 1/(2k) ||A phi - b||^2 + 1/4 sum phi^4 /
 * k (a quartic, so the Hessian depends on phi and MAML's second-order term
 * is not constant), data from a seed per task. */
enum { MT = 7, MD = 3, MK = 6 };
typedef struct {
  double A[2][MT][MK * MD], b[2][MT][MK];
} meta_data;

static void meta_make(meta_data *m) {
  for (int q = 0; q < 2; q++)
    for (int i = 0; i < MT; i++) {
      ad_rng g;
      ad_rng_seed(&g, 100 + 10 * i + q);
      for (int j = 0; j < MK * MD; j++) m->A[q][i][j] = ad_rng_normal(&g);
      for (int j = 0; j < MK; j++) m->b[q][i][j] = ad_rng_normal(&g);
    }
}

static ad_tensor *meta_loss(ad_tape *t, ad_tensor *const *phi, int task, const meta_data *m,
                            int q) {
  ad_tensor *A = ad_const(t, AD_F64, 2, (int64_t[]){MK, MD}, m->A[q][task]);
  ad_tensor *b = ad_const(t, AD_F64, 2, (int64_t[]){MK, 1}, m->b[q][task]);
  ad_tensor *r = ad_sub(t, ad_matmul(t, A, phi[0], 0, 0), b);
  ad_tensor *p2 = ad_mul(t, phi[0], phi[0]);
  return ad_add(t, ad_scale(t, ad_dot(t, r, r), 0.5 / MK),
                ad_scale(t, ad_sum(t, ad_mul(t, p2, p2)), 0.25 / MK));
}
static ad_tensor *meta_support(ad_tape *t, ad_tensor *const *phi, int task, void *ctx) {
  return meta_loss(t, phi, task, ctx, 0);
}
static ad_tensor *meta_query(ad_tape *t, ad_tensor *const *phi, int task, void *ctx) {
  return meta_loss(t, phi, task, ctx, 1);
}

START_TEST(test_meta_batch) {
  static meta_data m;
  meta_make(&m);
  ad_tensor *theta = fx_new(AD_F64, 2, (int64_t[]){MD, 1});
  for (int j = 0; j < MD; j++) ad_set(theta, j, 0.3 - 0.2 * j);
  ad_tensor *th[1] = {theta};
  struct {
    const char *name;
    bl_meta_method_fn f;
  } cases[] = {{"maml", bl_maml}, {"fomaml", bl_fomaml}, {"imaml", bl_imaml}};
  ad_tape *t = fx_tape(32);
  for (int k = 0; k < 3; k++) {
    int im = k == 2;
    bl_meta_problem p = {.n_theta = 1,
                         .theta = th,
                         .n_tasks = MT,
                         .support_loss = meta_support,
                         .query_loss = meta_query,
                         .ctx = &m,
                         .inner_lr = 0.1,
                         .inner_steps = im ? 30 : 3,
                         .prox = im ? 2.0 : 0};
    ad_tensor *ref[1] = {fx_new(AD_F64, 2, (int64_t[]){MD, 1})};
    ad_tensor *mg[1] = {fx_new(AD_F64, 2, (int64_t[]){MD, 1})};
    bl_stats a, b;
    bl_opts o = {.K = 10, .tol = 1e-300};
    ck_assert_msg(cases[k].f(t, &p, &o, ref, &a) == AD_OK, "%s: %s", cases[k].name,
                  ad_tape_errmsg(t));
    ck_assert_msg(bl_mpi_meta(D, cases[k].f, t, &p, &o, mg, &b) == AD_OK, "%s: %s", cases[k].name,
                  ad_tape_errmsg(t));
    double e = fx_rel_t(1, mg, ref);
    if (R_ == 0)
      printf("mpi np=%d %-6s meta-batch of %d: rel err %.2e vs one process\n", P_, cases[k].name,
             MT, e);
    ck_assert_msg(e <= 1e-12, "%s: relative error %.3e (bound 1e-12)", cases[k].name, e);
    ck_assert(same_everywhere(1, mg));
    ck_assert_double_eq_tol(b.val_loss, a.val_loss, 1e-12 * fabs(a.val_loss));
    ck_assert_int_eq(b.inner_steps, a.inner_steps);
    ad_tensor_free(ref[0]);
    ad_tensor_free(mg[0]);
  }
  ad_tensor_free(theta);
  ad_tape_free(t);
}
END_TEST

/* ---------------------------------------------------------------- zero-order */

START_TEST(test_zero_order) {
  fx_rcase c;
  fx_rcase_setup(&c, 1, 30, 0.1);
  ad_tape *t = fx_tape(16);
  bl_opts o = {.samples = 8, .sigma = 1e-3, .antithetic = 1, .seed = 11};
  ad_tensor *one[1] = {fx_new(AD_F64, 2, (int64_t[]){c.rp.d, 1})};
  ad_tensor *blk[1] = {fx_new(AD_F64, 2, (int64_t[]){c.rp.d, 1})};
  bl_stats a, b;
  /* 3 blocks of 3, 3, 2 directions */
  ck_assert_int_eq(bl_mpi_zero_order(SELF, t, &c.p, &o, 3, one, &a), AD_OK);
  ck_assert_msg(bl_mpi_zero_order(D, t, &c.p, &o, 3, c.hg, &b) == AD_OK, "%s", ad_tape_errmsg(t));
  double e = fx_rel_t(1, c.hg, one);
  ck_assert_msg(e <= 1e-12, "zero-order: relative error %.3e vs one process (bound 1e-12)", e);
  ck_assert(same_everywhere(1, c.hg));
  ck_assert_int_eq(a.inner_steps, b.inner_steps);
  ck_assert_double_eq_tol(a.val_loss, b.val_loss, 1e-14);
  /* the definition: sum_b (n_b / N) bl_zero_order(block b) */
  double want[FX_MAXD] = {0};
  for (int64_t k = 0; k < 3; k++) {
    int64_t nb = k < 2 ? 3 : 2;
    bl_opts ob = o;
    ob.samples = nb;
    ob.seed = bl_mpi_zo_seed(11, k);
    ck_assert_int_eq(bl_zero_order(t, &c.p, &ob, blk, NULL), AD_OK);
    for (int j = 0; j < c.rp.d; j++) want[j] += nb / 8.0 * ad_get(blk[0], j);
  }
  for (int j = 0; j < c.rp.d; j++)
    ck_assert_double_eq_tol(ad_get(one[0], j), want[j], 1e-12 * fabs(want[j]) + 1e-15);
  ad_tensor_free(one[0]);
  ad_tensor_free(blk[0]);
  ad_tape_free(t);
  fx_rcase_free(&c);
}
END_TEST

/* ---------------------------------------------------------------- faults */

/* The last rank asks for one more inner step, then brings lam of another
 * shape: every rank fails with AD_ERR_ARG naming it, before any loss runs.
 * At one rank there is nobody to disagree with: the calls succeed. */
START_TEST(test_disagreement) {
  fx_rcase c;
  fx_rcase_setup(&c, 1, 20, 0.1);
  ad_tape *t = fx_tape(16);
  shard sh;
  bl_mpi_problem dp;
  make_dp(&c, &sh, &dp);
  if (R_ == P_ - 1 && P_ > 1) dp.p.inner_steps++;
  ad_status s = bl_mpi_call(D, bl_unroll, t, &dp.p, NULL, c.hg, NULL);
  if (P_ == 1) {
    ck_assert_int_eq(s, AD_OK);
  } else {
    ck_assert_int_eq(s, AD_ERR_ARG);
    ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
    char want[64];
    snprintf(want, sizeof want, "rank %d disagrees", P_ - 1);
    ck_assert_msg(strstr(ad_tape_errmsg(t), want) != NULL, "message: %s", ad_tape_errmsg(t));
    ck_assert_msg(strstr(bl_mpi_errmsg(D), want) != NULL, "message: %s", bl_mpi_errmsg(D));
  }
  ad_tape_clear_error(t);
  dp.p.inner_steps = 20;
  /* a scalar lam on the last rank */
  ad_tensor *lam0 = fx_new(AD_F64, 0, NULL), *hg0 = fx_new(AD_F64, 0, NULL);
  ad_set(lam0, 0, 0.3);
  ad_tensor *lam[1] = {R_ == P_ - 1 ? lam0 : c.lam[0]}, *hg[1] = {R_ == P_ - 1 ? hg0 : c.hg[0]};
  dp.p.lam = lam;
  s = bl_mpi_call(D, bl_cg, t, &dp.p, NULL, hg, NULL);
  if (P_ == 1) {
    ck_assert_int_eq(s, AD_OK);
  } else {
    ck_assert_int_eq(s, AD_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "disagrees"));
  }
  ad_tape_clear_error(t);
  /* still in step: a good call works */
  dp.p.lam = c.lam;
  ck_assert_msg(bl_mpi_call(D, bl_unroll, t, &dp.p, NULL, c.hg, NULL) == AD_OK, "%s",
                ad_tape_errmsg(t));
  ad_tensor_free(lam0);
  ad_tensor_free(hg0);
  ad_tape_free(t);
  fx_rcase_free(&c);
}
END_TEST

/* The last rank's training loss fails from inner step 3 on (in an unroll,
 * inside CG's products): every rank returns an error, the others naming
 * that rank and its message; hg is untouched; the next call succeeds. */
START_TEST(test_rank_failure) {
  bl_method_fn fs[] = {bl_unroll, bl_cg, bl_forward};
  for (int k = 0; k < 3; k++) {
    fx_rcase c;
    fx_rcase_setup(&c, 1, 10, 0.1);
    ad_tape *t = fx_tape(16);
    shard sh;
    bl_mpi_problem dp;
    make_dp(&c, &sh, &dp);
    sh.fail_rank = P_ - 1;
    sh.fail_step = k == 1 ? 9 : 3; /* cg: the loss at T-1 is the one its products use */
    for (int j = 0; j < c.rp.d; j++) ad_set(c.hg[0], j, 42.0);
    ad_status s = bl_mpi_call(D, fs[k], t, &dp.p, NULL, c.hg, NULL);
    ck_assert_int_ne(s, AD_OK);
    ck_assert_int_ne(ad_tape_status(t), AD_OK);
    ck_assert_msg(strstr(ad_tape_errmsg(t), "simulated failure") != NULL, "%s: message: %s",
                  k == 0   ? "unroll"
                  : k == 1 ? "cg"
                           : "forward",
                  ad_tape_errmsg(t));
    if (R_ != P_ - 1) {
      char want[32];
      snprintf(want, sizeof want, "rank %d failed", P_ - 1);
      ck_assert_msg(strstr(ad_tape_errmsg(t), want) != NULL, "message: %s", ad_tape_errmsg(t));
    }
    for (int j = 0; j < c.rp.d; j++) ck_assert_double_eq(ad_get(c.hg[0], j), 42.0);
    ad_tape_clear_error(t);
    sh.fail_rank = -1;
    ck_assert_msg(bl_mpi_call(D, fs[k], t, &dp.p, NULL, c.hg, NULL) == AD_OK, "%s",
                  ad_tape_errmsg(t));
    ad_tape_free(t);
    fx_rcase_free(&c);
  }
}
END_TEST

/* A rank that comes late (3 s) to a sum: the others give up after their
 * handle's 1 s timeout with an error saying so, and their handle refuses
 * further work at once; the late rank, arriving while the others' request
 * is still open, completes. Needs a peer: at one rank nobody can be late. */
START_TEST(test_timeout) {
  if (P_ == 1) return;
  bl_mpi *to = NULL;
  ck_assert_int_eq(bl_mpi_open(&to, MPI_COMM_WORLD, &(bl_mpi_opts){.timeout = 1}), AD_OK);
  ad_tape *t = fx_tape(4);
  MPI_Barrier(MPI_COMM_WORLD);
  if (R_ == P_ - 1) sleep(3);
  ad_tensor *y = bl_mpi_sum(t, to, ad_scalar(t, AD_F64, 1.0));
  if (R_ == P_ - 1) {
    ck_assert_msg(y != NULL, "%s", ad_tape_errmsg(t));
    ck_assert_double_eq(ad_get(y, 0), P_);
  } else {
    ck_assert_ptr_null(y);
    ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
    ck_assert_msg(strstr(ad_tape_errmsg(t), "waited 1 s") != NULL, "%s", ad_tape_errmsg(t));
    ad_tape_clear_error(t);
    /* refused before any collective (the message of the broken path) */
    ck_assert_ptr_null(bl_mpi_sum(t, to, ad_scalar(t, AD_F64, 1.0)));
    ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "unusable after an earlier failure"));
  }
  /* the others' open request completes while they wait here */
  MPI_Barrier(MPI_COMM_WORLD);
  bl_mpi_close(to);
  ad_tape_free(t);
}
END_TEST

/* Bad calls: NULLs and a Gauss-Newton split are refused on the calling
 * rank without a collective. */
START_TEST(test_bad_calls) {
  fx_rcase c;
  fx_rcase_setup(&c, 1, 5, 0.1);
  bl_mpi_problem dp;
  ck_assert_int_eq(bl_mpi_shard(D, NULL, &dp), AD_ERR_NULL);
  bl_problem gn = c.p;
  gn.train_output = (bl_output_fn)fx_ridge_train;
  ck_assert_int_eq(bl_mpi_shard(D, &gn, &dp), AD_ERR_ARG);
  ck_assert_ptr_nonnull(strstr(bl_mpi_errmsg(D), "Gauss-Newton"));
  ad_tape *t = fx_tape(4);
  ck_assert_int_eq(bl_mpi_call(D, NULL, t, &c.p, NULL, c.hg, NULL), AD_ERR_NULL);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "bl_mpi_call: method is NULL"));
  ck_assert_ptr_null(bl_mpi_sum(t, NULL, NULL));
  ck_assert_ptr_null(bl_mpi_sum(NULL, D, NULL));
  ck_assert_int_eq(bl_mpi_size(NULL), 0);
  bl_mpi *bad = (bl_mpi *)&bad;
  ck_assert_int_eq(bl_mpi_open(&bad, MPI_COMM_WORLD, &(bl_mpi_opts){.timeout = -1}), AD_ERR_ARG);
  ck_assert_ptr_null(bad);
  ck_assert_ptr_nonnull(strstr(ad_last_error(), "bl_mpi_open: timeout"));
  ck_assert_int_eq(bl_mpi_open(&bad, MPI_COMM_NULL, NULL), AD_ERR_ARG);
  ck_assert_ptr_nonnull(strstr(ad_last_error(), "duplicate"));
  ck_assert_int_eq(bl_mpi_open(NULL, MPI_COMM_WORLD, NULL), AD_ERR_NULL);
  bl_mpi_close(NULL);
  ad_tape_free(t);
  fx_rcase_free(&c);
}
END_TEST

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &R_);
  MPI_Comm_size(MPI_COMM_WORLD, &P_);
  /* a bounded wait: a broken test fails in 30 s instead of hanging */
  if (bl_mpi_open(&D, MPI_COMM_WORLD, &(bl_mpi_opts){.timeout = 30}) ||
      bl_mpi_open(&SELF, MPI_COMM_SELF, NULL) ||
      bl_mpi_open(&RS, MPI_COMM_WORLD, &(bl_mpi_opts){.timeout = 30, .large = 4})) {
    fprintf(stderr, "bl_mpi_open failed\n");
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  Suite *s = suite_create("mpi");
  TCase *tc = tcase_create("core");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, test_ops);
  tcase_add_loop_test(tc, test_dp_methods, 0, (int)(sizeof DP_CASES / sizeof DP_CASES[0]));
  tcase_add_test(tc, test_reduce_scatter_path);
  tcase_add_test(tc, test_dp_hoag);
  tcase_add_test(tc, test_engine_dp);
  tcase_add_test(tc, test_engine_resume);
  tcase_add_test(tc, test_meta_batch);
  tcase_add_test(tc, test_zero_order);
  tcase_add_test(tc, test_disagreement);
  tcase_add_test(tc, test_rank_failure);
  tcase_add_test(tc, test_bad_calls);
  tcase_add_test(tc, test_timeout);
  suite_add_tcase(s, tc);
  SRunner *sr = srunner_create(s);
  srunner_set_fork_status(sr, CK_NOFORK); /* no fork after MPI_Init */
  srunner_run_all(sr, R_ == 0 ? CK_NORMAL : CK_SILENT);
  int failed = srunner_ntests_failed(sr);
  if (failed && R_ != 0) srunner_print(sr, CK_NORMAL);
  srunner_free(sr);
  bl_mpi_close(D);
  bl_mpi_close(SELF);
  bl_mpi_close(RS);
  MPI_Finalize();
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
