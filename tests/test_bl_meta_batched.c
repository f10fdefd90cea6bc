/* test_bl_meta_batched.c — the batched meta-batch path (bl_meta_problem's
 * support_batch / query_batch): bl_maml and bl_fomaml on stacked
 * parameters give the per-task loop's meta-gradients (theta and lam) and
 * meta-loss, f64 to 1e-10 and f32 to 1e-5 relative, with plain SGD,
 * momentum, Adam, Meta-SGD rates (per element and size 1, with momentum
 * too), per-element weight decay and a user step; bl_imaml ignores the
 * batched losses; batches of batch_tasks tasks give the same as one; a bad
 * contract is refused with a message naming it; the tape is left as found. */
#include "bilevel/bl.h"
#include "datasets/ds.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { NT = 4, K = 6, H = 5, NP = 6 };

typedef struct {
  ad_dtype dt;
  ad_tensor *xs[NT], *ys[NT], *xq[NT], *yq[NT]; /* [K, 1] */
  ad_tensor *XS, *YS, *XQ, *YQ;                 /* [NT, K, 1]: the same points stacked */
  ad_tensor *theta[NP];
  int bad; /* 1: batched support loss returns a non-scalar; 2: NULL */
} fix;

static ad_tensor *new_tensor(ad_dtype dt, int ndim, const int64_t *shape) {
  ad_tensor *x = NULL;
  ck_assert_int_eq(ad_tensor_new(&x, dt, ndim, shape), AD_OK);
  return x;
}

static void fix_make(fix *f, ad_dtype dt, uint64_t seed) {
  memset(f, 0, sizeof *f);
  f->dt = dt;
  ad_rng r;
  ad_rng_seed(&r, seed);
  const int64_t sk[2] = {K, 1}, sb[3] = {NT, K, 1};
  f->XS = new_tensor(dt, 3, sb);
  f->YS = new_tensor(dt, 3, sb);
  f->XQ = new_tensor(dt, 3, sb);
  f->YQ = new_tensor(dt, 3, sb);
  for (int i = 0; i < NT; i++) {
    ds_sine_task task;
    ck_assert_int_eq(ds_sine_task_sample(&task, &r), AD_OK);
    f->xs[i] = new_tensor(dt, 2, sk);
    f->ys[i] = new_tensor(dt, 2, sk);
    f->xq[i] = new_tensor(dt, 2, sk);
    f->yq[i] = new_tensor(dt, 2, sk);
    ck_assert_int_eq(ds_sine_task_points(&task, &r, f->xs[i], f->ys[i]), AD_OK);
    ck_assert_int_eq(ds_sine_task_points(&task, &r, f->xq[i], f->yq[i]), AD_OK);
    for (int j = 0; j < K; j++) {
      ad_set(f->XS, i * K + j, ad_get(f->xs[i], j));
      ad_set(f->YS, i * K + j, ad_get(f->ys[i], j));
      ad_set(f->XQ, i * K + j, ad_get(f->xq[i], j));
      ad_set(f->YQ, i * K + j, ad_get(f->yq[i], j));
    }
  }
  const int nd[NP] = {2, 1, 2, 1, 2, 1};
  const int64_t sh[NP][2] = {{1, H}, {H}, {H, H}, {H}, {H, 1}, {1}};
  for (int k = 0; k < NP; k++) {
    f->theta[k] = new_tensor(dt, nd[k], sh[k]);
    ad_tensor_fill_normal(f->theta[k], &r, 0, 0.7);
  }
}

static void fix_free(fix *f) {
  for (int i = 0; i < NT; i++) {
    ad_tensor_free(f->xs[i]);
    ad_tensor_free(f->ys[i]);
    ad_tensor_free(f->xq[i]);
    ad_tensor_free(f->yq[i]);
  }
  ad_tensor_free(f->XS);
  ad_tensor_free(f->YS);
  ad_tensor_free(f->XQ);
  ad_tensor_free(f->YQ);
  for (int k = 0; k < NP; k++) ad_tensor_free(f->theta[k]);
}

/* MLP 1-H-H-1, tanh: per task with matmul, over the batch with bmm. */
static ad_tensor *net(ad_tape *t, ad_tensor *const *p, ad_tensor *x) {
  ad_tensor *h = ad_tanh(t, ad_add_rowvec(t, ad_matmul(t, x, p[0], 0, 0), p[1]));
  h = ad_tanh(t, ad_add_rowvec(t, ad_matmul(t, h, p[2], 0, 0), p[3]));
  return ad_add_rowvec(t, ad_matmul(t, h, p[4], 0, 0), p[5]);
}
static ad_tensor *net_b(ad_tape *t, ad_tensor *const *p, ad_tensor *x) {
  ad_tensor *h = ad_tanh(t, ad_add_batch_rowvec(t, ad_bmm(t, x, p[0], 0, 0), p[1]));
  h = ad_tanh(t, ad_add_batch_rowvec(t, ad_bmm(t, h, p[2], 0, 0), p[3]));
  return ad_add_batch_rowvec(t, ad_bmm(t, h, p[4], 0, 0), p[5]);
}
static ad_tensor *support(ad_tape *t, ad_tensor *const *p, int i, void *ctx) {
  fix *f = ctx;
  return ad_mse(t, net(t, p, f->xs[i]), f->ys[i]);
}
static ad_tensor *query(ad_tape *t, ad_tensor *const *p, int i, void *ctx) {
  fix *f = ctx;
  return ad_mse(t, net(t, p, f->xq[i]), f->yq[i]);
}
/* ad_mse means over NT K points: NT times it is the sum of the task means. */
static ad_tensor *support_b(ad_tape *t, ad_tensor *const *p, int task0, int n, void *ctx) {
  fix *f = ctx;
  ck_assert_int_eq(p[0]->shape[0], n); /* the contract: n tasks stacked */
  ad_tensor *out = net_b(t, p, ad_slice(t, f->XS, 0, task0, n));
  if (f->bad == 1) return ad_sum_axis(t, out, 0, 0);
  if (f->bad == 2) return NULL;
  return ad_scale(t, ad_mse(t, out, ad_slice(t, f->YS, 0, task0, n)), n);
}
static ad_tensor *query_b(ad_tape *t, ad_tensor *const *p, int task0, int n, void *ctx) {
  fix *f = ctx;
  ad_tensor *out = net_b(t, p, ad_slice(t, f->XQ, 0, task0, n));
  return ad_scale(t, ad_mse(t, out, ad_slice(t, f->YQ, 0, task0, n)), n);
}

/* Heavy ball with the learning rate lam[0] (a scalar): a user step, which
 * sees the stacked tensors. */
static ad_status heavy_ball(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *s,
                            ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                            ad_tensor **w_new, ad_tensor **s_new) {
  (void)step, (void)ctx;
  for (int i = 0; i < n; i++) {
    s_new[i] = ad_add(t, ad_scale(t, s[i], 0.7), g[i]);
    w_new[i] = ad_sub(t, w[i], ad_mul(t, lam[0], s_new[i]));
  }
  return ad_tape_status(t);
}

/* max |a - b| / max |b| over the list */
static double rel_err(int n, ad_tensor *const *a, ad_tensor *const *b) {
  double num = 0, den = 0;
  for (int k = 0; k < n; k++)
    for (int64_t i = 0; i < a[k]->size; i++) {
      num = fmax(num, fabs(ad_get(a[k], i) - ad_get(b[k], i)));
      den = fmax(den, fabs(ad_get(b[k], i)));
    }
  return den > 0 ? num / den : num;
}

enum { A_SGD, A_MOMENTUM, A_ADAM, A_METASGD, A_METASGD_MOM, A_DECAY, A_USER, N_ADAPT };
static const char *const ADAPT_NAME[N_ADAPT] = {
    "plain SGD",           "momentum",          "Adam",     "Meta-SGD",
    "Meta-SGD + momentum", "weight decay vars", "user step"};

/* Runs method m per task and batched with adaptation `a` on fix f and
 * returns the relative difference of the meta-gradients (theta and lam
 * together) and of the meta-losses; asserts both runs succeeded and left
 * the tape's arena as found. */
static double compare(bl_meta_method_fn m, const char *mname, ad_dtype dt, int a, int batch,
                      double *dloss) {
  fix f;
  fix_make(&f, dt, 100 + (uint64_t)a);
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 8, .arena_max_mb = 64}), AD_OK);
  ad_tensor *lam[NP] = {0}, *decay[NP] = {0};
  int n_lam = 0;
  nn_opt_cfg opt = {0};
  bl_meta_problem p = {.n_theta = NP,
                       .theta = f.theta,
                       .n_tasks = NT,
                       .support_loss = support,
                       .query_loss = query,
                       .ctx = &f,
                       .inner_steps = 2};
  ad_rng r;
  ad_rng_seed(&r, 9);
  switch (a) {
  case A_SGD:
    p.inner_lr = 0.05;
    break;
  case A_MOMENTUM:
    opt = (nn_opt_cfg){.kind = NN_OPT_MOMENTUM, .lr = 0.04, .momentum = 0.7};
    p.opt = &opt;
    break;
  case A_ADAM:
    opt = (nn_opt_cfg){.kind = NN_OPT_ADAM, .lr = 0.01};
    p.opt = &opt;
    break;
  case A_METASGD:
  case A_METASGD_MOM:
    /* per-element rates, except theta[3]'s: one number (size 1) */
    for (int k = 0; k < NP; k++) {
      lam[k] = k == 3 ? new_tensor(dt, 1, (int64_t[]){1})
                      : new_tensor(dt, f.theta[k]->ndim, f.theta[k]->shape);
      ad_tensor_fill_uniform(lam[k], &r, 0.01, 0.08);
    }
    n_lam = NP;
    opt = (nn_opt_cfg){
        .kind = a == A_METASGD ? NN_OPT_SGD : NN_OPT_MOMENTUM, .momentum = 0.6, .lr_vars = lam};
    p.opt = &opt;
    break;
  case A_DECAY:
    /* per-element weight decay (constants, not learned) and learned rates */
    for (int k = 0; k < NP; k++) {
      decay[k] = new_tensor(dt, f.theta[k]->ndim, f.theta[k]->shape);
      ad_tensor_fill_uniform(decay[k], &r, 0.0, 0.5);
    }
    lam[0] = new_tensor(dt, 1, (int64_t[]){1});
    ad_set(lam[0], 0, 0.05);
    n_lam = 1;
    opt = (nn_opt_cfg){.kind = NN_OPT_SGD, .lr_var = lam[0], .weight_decay_vars = decay};
    p.opt = &opt;
    break;
  case A_USER:
    lam[0] = new_tensor(dt, 0, NULL);
    ad_set(lam[0], 0, 0.05);
    n_lam = 1;
    p.step = (bl_step){.fn = heavy_ball, .slots = 1, .name = "heavy ball"};
    break;
  }
  p.n_lam = n_lam;
  p.lam = n_lam ? lam : NULL;
  ad_tensor *g1[2 * NP], *g2[2 * NP];
  int nm = NP + n_lam;
  for (int k = 0; k < nm; k++) {
    const ad_tensor *like = k < NP ? f.theta[k] : lam[k - NP];
    g1[k] = new_tensor(dt, like->ndim, like->shape);
    g2[k] = new_tensor(dt, like->ndim, like->shape);
  }
  bl_stats s1, s2;
  ad_arena_stats a0, a1;
  ad_arena_stats_get(t, &a0);
  ad_status st = m(t, &p, NULL, g1, &s1);
  ck_assert_msg(st == AD_OK, "%s %s per task: %s", mname, ADAPT_NAME[a], ad_tape_errmsg(t));
  p.support_batch = support_b;
  p.query_batch = query_b;
  p.batch_tasks = batch;
  st = m(t, &p, NULL, g2, &s2);
  ck_assert_msg(st == AD_OK, "%s %s batched: %s", mname, ADAPT_NAME[a], ad_tape_errmsg(t));
  ad_arena_stats_get(t, &a1);
  ck_assert_uint_eq(a1.used, a0.used); /* the tape left as found */
  ck_assert_uint_eq(a1.n_nodes, a0.n_nodes);
  ck_assert_int_eq(s2.inner_steps, s1.inner_steps); /* counted over tasks both ways */
  /* a comparison of zeros would prove nothing: every meta-gradient tensor
   * (theta's and lam's) has a nonzero element */
  for (int k = 0; k < nm; k++) {
    int nz = 0;
    for (int64_t i = 0; i < g1[k]->size; i++) nz |= ad_get(g1[k], i) != 0;
    ck_assert_msg(nz, "%s %s: meta_grad[%d] is all zeros", mname, ADAPT_NAME[a], k);
  }
  double e = rel_err(nm, g2, g1);
  *dloss = fabs(s2.val_loss - s1.val_loss) / fabs(s1.val_loss);
  printf("%s, %s, %s, batch_tasks %d: batched vs per task: meta-gradient %.2e, meta-loss %.2e\n",
         mname, ADAPT_NAME[a], dt == AD_F32 ? "f32" : "f64", batch, e, *dloss);
  for (int k = 0; k < nm; k++) {
    ad_tensor_free(g1[k]);
    ad_tensor_free(g2[k]);
  }
  for (int k = 0; k < NP; k++) {
    ad_tensor_free(lam[k]);
    ad_tensor_free(decay[k]);
  }
  ad_tape_free(t);
  fix_free(&f);
  return e;
}

/* loop index: batch_tasks (all NT at once, or 3: batches of 3 and 1) x
 * method (maml, fomaml) x dtype x adaptation */
START_TEST(test_batched_equals_per_task) {
  int a = _i % N_ADAPT, dt = (_i / N_ADAPT) % 2, meth = (_i / (2 * N_ADAPT)) % 2;
  int batch = _i / (4 * N_ADAPT) ? 3 : 0;
  bl_meta_method_fn m = meth ? bl_fomaml : bl_maml;
  const char *mname = meth ? "fomaml" : "maml";
  double dloss = 0;
  double e = compare(m, mname, (ad_dtype)dt, a, batch, &dloss);
  /* The same arithmetic in another order (the tasks' meta-gradients summed
   * by the broadcast's adjoint, products of the batch folded): rounding
   * only. */
  double tol = dt == AD_F32 ? 1e-5 : 1e-10;
  ck_assert_msg(e <= tol, "%s %s %s: meta-gradient differs by %.3g (bound %g)", mname,
                ADAPT_NAME[a], dt ? "f64" : "f32", e, tol);
  ck_assert_msg(dloss <= tol, "%s %s: meta-loss differs by %.3g", mname, ADAPT_NAME[a], dloss);
}
END_TEST

/* bl_imaml has no batched path: with both kinds of loss it runs the per-task
 * one (the same numbers as without the batched losses). */
START_TEST(test_imaml_ignores_batched) {
  fix f;
  fix_make(&f, AD_F64, 3);
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  bl_meta_problem p = {.n_theta = NP,
                       .theta = f.theta,
                       .n_tasks = NT,
                       .support_loss = support,
                       .query_loss = query,
                       .ctx = &f,
                       .inner_lr = 0.05,
                       .inner_steps = 3,
                       .prox = 2.0};
  ad_tensor *g1[NP], *g2[NP];
  for (int k = 0; k < NP; k++) {
    g1[k] = new_tensor(AD_F64, f.theta[k]->ndim, f.theta[k]->shape);
    g2[k] = new_tensor(AD_F64, f.theta[k]->ndim, f.theta[k]->shape);
  }
  ck_assert_int_eq(bl_imaml(t, &p, NULL, g1, NULL), AD_OK);
  p.support_batch = support_b;
  p.query_batch = query_b;
  ck_assert_int_eq(bl_imaml(t, &p, NULL, g2, NULL), AD_OK);
  ck_assert_double_eq(rel_err(NP, g2, g1), 0); /* the same path: the same bits */
  for (int k = 0; k < NP; k++) {
    ad_tensor_free(g1[k]);
    ad_tensor_free(g2[k]);
  }
  ad_tape_free(t);
  fix_free(&f);
}
END_TEST

static void expect(ad_tape *t, bl_meta_method_fn m, const bl_meta_problem *p, ad_tensor *const *g,
                   ad_status want, const char *needle) {
  ad_arena_stats a0, a1;
  ad_arena_stats_get(t, &a0);
  ad_status st = m(t, p, NULL, g, NULL);
  ck_assert_msg(st == want, "got %s (%s), want %s", ad_status_str(st), ad_tape_errmsg(t),
                ad_status_str(want));
  ck_assert_msg(strstr(ad_tape_errmsg(t), needle) != NULL, "message '%s' lacks '%s'",
                ad_tape_errmsg(t), needle);
  ad_arena_stats_get(t, &a1);
  ck_assert_uint_eq(a1.used, a0.used);
  ad_tape_clear_error(t);
}

START_TEST(test_batched_bad_contract) {
  fix f;
  fix_make(&f, AD_F64, 4);
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  ad_tensor *g[NP];
  for (int k = 0; k < NP; k++) g[k] = new_tensor(AD_F64, f.theta[k]->ndim, f.theta[k]->shape);
  bl_meta_problem p = {.n_theta = NP,
                       .theta = f.theta,
                       .n_tasks = NT,
                       .ctx = &f,
                       .inner_lr = 0.05,
                       .inner_steps = 1,
                       .prox = 1.0,
                       .support_batch = support_b};
  /* one batched loss without the other */
  expect(t, bl_maml, &p, g, AD_ERR_ARG, "support_batch is set but query_batch is NULL");
  p.support_batch = NULL;
  p.query_batch = query_b;
  expect(t, bl_fomaml, &p, g, AD_ERR_ARG, "query_batch is set but support_batch is NULL");
  /* both batched losses and no per-task ones: maml runs, imaml cannot */
  p.support_batch = support_b;
  ck_assert_int_eq(bl_maml(t, &p, NULL, g, NULL), AD_OK);
  expect(t, bl_imaml, &p, g, AD_ERR_NULL, "bl_imaml has no batched path");
  /* a batched loss that is not a scalar, or is missing */
  f.bad = 1;
  expect(t, bl_maml, &p, g, AD_ERR_SHAPE, "support_batch returned [6, 1] f64 (tasks 0..3)");
  f.bad = 2;
  p.batch_tasks = 2;
  expect(t, bl_maml, &p, g, AD_ERR_NULL, "support_batch returned NULL (tasks 0..1)");
  f.bad = 0;
  p.batch_tasks = -1;
  expect(t, bl_fomaml, &p, g, AD_ERR_ARG, "batch_tasks is -1");
  p.batch_tasks = 0;
  /* theta of 4 dimensions has no room for the task axis */
  ad_tensor *w4 = new_tensor(AD_F64, 4, (int64_t[]){1, 1, 1, 2});
  ad_tensor *g4 = new_tensor(AD_F64, 4, (int64_t[]){1, 1, 1, 2});
  ad_tensor *th[1] = {w4}, *gg[1] = {g4};
  bl_meta_problem p4 = p;
  p4.n_theta = 1;
  p4.theta = th;
  expect(t, bl_maml, &p4, gg, AD_ERR_SHAPE, "theta[0] is [1, 1, 1, 2] f64; the batched losses");
  ad_tensor_free(w4);
  ad_tensor_free(g4);
  for (int k = 0; k < NP; k++) ad_tensor_free(g[k]);
  ad_tape_free(t);
  fix_free(&f);
}
END_TEST

static Suite *suite(void) {
  Suite *s = suite_create("bl_meta_batched");
  TCase *tc = tcase_create("batched");
  tcase_set_timeout(tc, 120);
  tcase_add_loop_test(tc, test_batched_equals_per_task, 0, 2 * 2 * 2 * N_ADAPT);
  tcase_add_test(tc, test_imaml_ignores_batched);
  tcase_add_test(tc, test_batched_bad_contract);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  SRunner *sr = srunner_create(suite());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
