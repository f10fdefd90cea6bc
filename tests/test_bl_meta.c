/* test_bl_meta.c — meta-learning methods (bl_maml, bl_fomaml, bl_imaml):
 *   - MAML's meta-gradient against central differences of the
 *     post-adaptation query loss (sinusoid tasks, tanh MLP, f64);
 *   - FOMAML = MAML minus the second-order term, that term built separately
 *     from Hessian-vector products;
 *   - iMAML on quadratic tasks against the closed form
 *     (I + H/lambda)^{-1} grad L_query(phi*);
 *   - any adaptation step: the library's heavy-ball optimizer (3 steps) and
 *     a user bl_step with learnable lr and momentum (MAML against central
 *     differences of a hand-written adaptation); Meta-SGD per-element rates
 *     (their meta-gradient against central differences); Adam and RMSprop
 *     adaptation (the state list's second slot); multi-step FOMAML
 *     with rates and momentum against its definition; iMAML's fixed point
 *     reached by heavy ball and by a user step;
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

/* 1 when some element of the list is nonzero */
static int any_nonzero(int n, ad_tensor *const *a) {
  for (int k = 0; k < n; k++)
    for (int64_t i = 0; i < a[k]->size; i++)
      if (ad_get(a[k], i) != 0) return 1;
  return 0;
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
    double err = gc_rel_err(NP, mg, fd);
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
  double e1 = gc_rel_err(NP, fo, q), e2 = gc_rel_err(NP, diff, so);
  printf("fomaml vs mean grad L_query(phi): %.2e (bound 1e-12); maml - fomaml vs "
         "-alpha H grad L_query: %.2e (bound 1e-9)\n",
         e1, e2);
  ck_assert(e1 <= 1e-12);
  ck_assert(e2 <= 1e-9);
  ck_assert(gc_rel_err(NP, mg, fo) > 1e-3); /* the term is not negligible here */
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

/* ---------------------------------------------------------------- any adaptation step */

/* One task's adaptation by hand, no bilevel library: k heavy-ball steps
 *   m <- mu m + g,  phi <- phi - a * m   (mu = 0: plain SGD)
 * with a the scalar `alpha`, or element e of rate[j] when rate is given
 * (rate[j] of size 1 or shaped like theta[j]: Meta-SGD). Returns
 * L_query(phi_k); q (if given) receives grad L_query(phi_k) and msum (if
 * given) sum_s m_{s+1}, both heap lists shaped like theta. */
static double ref_task(ad_tape *t, ad_tensor *const *theta, sine_tasks *s, int task, double alpha,
                       ad_tensor *const *rate, double mu, int k, ad_tensor *const *q,
                       ad_tensor *const *msum) {
  ad_marker mk = ad_mark(t);
  ad_tensor *phi[NP], *m[NP], *g[NP];
  for (int j = 0; j < NP; j++) {
    phi[j] = ad_const(t, AD_F64, theta[j]->ndim, theta[j]->shape, theta[j]->data);
    m[j] = ad_zeros_like(t, theta[j]);
    ad_requires_grad(phi[j], 1);
    if (msum)
      for (int64_t e = 0; e < msum[j]->size; e++) ad_set(msum[j], e, 0);
  }
  for (int step = 0; step < k; step++) {
    ad_tensor *L = sine_support(t, phi, task, s);
    ck_assert_int_eq(ad_grad(t, 1, &L, NULL, NP, phi, g, 0), AD_OK);
    for (int j = 0; j < NP; j++)
      for (int64_t e = 0; e < phi[j]->size; e++) {
        double a = rate ? ad_get(rate[j], rate[j]->size == 1 ? 0 : e) : alpha;
        double mj = mu * ad_get(m[j], e) + ad_get(g[j], e);
        ad_set(m[j], e, mj);
        ad_set(phi[j], e, ad_get(phi[j], e) - a * mj);
        if (msum) ad_set(msum[j], e, ad_get(msum[j], e) + mj);
      }
  }
  ad_tensor *Lq = sine_query(t, phi, task, s);
  double v = ad_item(Lq);
  if (q) {
    ad_tensor *gq[NP];
    ck_assert_int_eq(ad_grad(t, 1, &Lq, NULL, NP, phi, gq, 0), AD_OK);
    for (int j = 0; j < NP; j++) ck_assert_int_eq(ad_copy_values(q[j], gq[j]), AD_OK);
  }
  ad_rewind(t, mk);
  return v;
}

static double ref_meta(ad_tape *t, ad_tensor *const *theta, sine_tasks *s, double alpha,
                       ad_tensor *const *rate, double mu, int k) {
  double sum = 0;
  for (int i = 0; i < NT; i++) sum += ref_task(t, theta, s, i, alpha, rate, mu, k, NULL, NULL);
  return sum / NT;
}

/* Central differences (step h) of f over every element of the tensors
 * x[0..n), written into fd. f reads the tensors' current values. */
typedef double (*scalar_fn)(void *ctx);
static void central_fd(int n, ad_tensor *const *x, ad_tensor *const *fd, scalar_fn f, void *ctx,
                       double h) {
  for (int j = 0; j < n; j++)
    for (int64_t e = 0; e < x[j]->size; e++) {
      double v = ad_get(x[j], e);
      ad_set(x[j], e, v + h);
      double fp = f(ctx);
      ad_set(x[j], e, v - h);
      double fm = f(ctx);
      ad_set(x[j], e, v);
      ad_set(fd[j], e, (fp - fm) / (2 * h));
    }
}

typedef struct {
  ad_tape *t;
  ad_tensor **theta, **rate, *lr, *mu; /* rate: Meta-SGD; lr, mu: size-1 tensors (or NULL) */
  sine_tasks *s;
  double alpha, mom;
  int k;
} ref_ctx;
static double ref_eval(void *ctx) {
  ref_ctx *c = ctx;
  return ref_meta(c->t, c->theta, c->s, c->lr ? ad_item(c->lr) : c->alpha, c->rate,
                  c->mu ? ad_item(c->mu) : c->mom, c->k);
}

START_TEST(test_maml_momentum_three_steps) {
  /* The adaptation is the library's heavy-ball optimizer (lr 0.03,
   * momentum 0.8), 3 steps. bl_maml's meta-loss equals the hand-written
   * adaptation's (1e-12) and its meta-gradient matches central differences
   * (step 1e-5) of that meta-loss: 1e-6 relative (max-norm), f64. */
  sine_tasks s;
  sine_make(&s, 41);
  ad_tensor *th[NP], *mg[NP], *fd[NP];
  theta_make(th, 12);
  like(NP, th, mg);
  like(NP, th, fd);
  ad_tape *t = new_tape();
  nn_opt_cfg opt = {.kind = NN_OPT_MOMENTUM, .lr = 0.03, .momentum = 0.8};
  bl_meta_problem p = {.n_theta = NP,
                       .theta = th,
                       .n_tasks = NT,
                       .support_loss = sine_support,
                       .query_loss = sine_query,
                       .ctx = &s,
                       .opt = &opt,
                       .inner_steps = 3};
  bl_stats st;
  ck_assert_msg(bl_maml(t, &p, NULL, mg, &st) == AD_OK, "%s", ad_tape_errmsg(t));
  ref_ctx c = {.t = t, .theta = th, .s = &s, .alpha = 0.03, .mom = 0.8, .k = 3};
  double f0 = ref_eval(&c);
  ck_assert(fabs(st.val_loss - f0) <= 1e-12 * (1 + f0));
  central_fd(NP, th, fd, ref_eval, &c, 1e-5);
  double err = gc_rel_err(NP, mg, fd);
  printf("maml, momentum adaptation, 3 steps, vs finite differences: rel err %.2e (bound 1e-6)\n",
         err);
  ck_assert(err <= 1e-6);
  ck_assert_int_eq(st.inner_steps, NT * 3);
  list_free(NP, th);
  list_free(NP, mg);
  list_free(NP, fd);
  sine_free(&s);
  ad_tape_free(t);
}
END_TEST

typedef struct {
  ad_tape *t;
  bl_meta_problem *p;
  ad_tensor **mg;
} maml_ctx;
static double maml_value(void *ctx) {
  maml_ctx *c = ctx;
  bl_stats st;
  ck_assert_int_eq(bl_maml(c->t, c->p, NULL, c->mg, &st), AD_OK);
  return st.val_loss;
}

START_TEST(test_maml_adam_rmsprop) {
  /* Adaptation by Adam (state slots m and v) and RMSprop (v only), 2 steps,
   * lr 0.01 / 0.002: bl_maml's meta-gradient against central differences (step
   * 1e-5) of its own meta-loss value, 1e-6 relative, f64. This covers the
   * state list's second slot. */
  sine_tasks s;
  sine_make(&s, 59);
  ad_tensor *th[NP], *mg[NP], *scratch[NP], *fd[NP];
  theta_make(th, 20);
  like(NP, th, mg);
  like(NP, th, scratch);
  like(NP, th, fd);
  ad_tape *t = new_tape();
  nn_opt_kind kinds[2] = {NN_OPT_ADAM, NN_OPT_RMSPROP};
  for (int m = 0; m < 2; m++) {
    /* RMSprop's first step is about lr * 10 * sign(g) per element; at lr
     * 0.01 the meta-loss has third derivatives large enough that the
     * differences' O(h^2) error reaches 6e-7 at h = 1e-5 (it falls 10x per
     * 3x smaller h: truncation, not the rule), so lr 0.002 here. */
    nn_opt_cfg opt = {.kind = kinds[m], .lr = m ? 0.002 : 0.01};
    bl_meta_problem p = {.n_theta = NP,
                         .theta = th,
                         .n_tasks = NT,
                         .support_loss = sine_support,
                         .query_loss = sine_query,
                         .ctx = &s,
                         .opt = &opt,
                         .inner_steps = 2};
    bl_stats st;
    ck_assert_msg(bl_maml(t, &p, NULL, mg, &st) == AD_OK, "%s", ad_tape_errmsg(t));
    maml_ctx c = {t, &p, scratch};
    central_fd(NP, th, fd, maml_value, &c, 1e-5);
    double err = gc_rel_err(NP, mg, fd);
    printf("maml, %s adaptation, 2 steps, vs finite differences: rel err %.2e (bound 1e-6)\n",
           m ? "rmsprop" : "adam", err);
    ck_assert(err <= 1e-6);
  }
  list_free(NP, th);
  list_free(NP, mg);
  list_free(NP, scratch);
  list_free(NP, fd);
  sine_free(&s);
  ad_tape_free(t);
}
END_TEST

/* A user step: heavy ball with a learnable rate lam[0] and momentum lam[1]
 * (size-1 tensors), written with public ops:  m' = mu m + g,  w' = w - lr m'. */
static ad_status user_heavy_ball(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *state,
                                 ad_tensor *const *g, ad_tensor *const *lam, int64_t step,
                                 void *ctx, ad_tensor **w_new, ad_tensor **state_new) {
  (void)step;
  int *calls = ctx;
  (*calls)++;
  for (int i = 0; i < n; i++) {
    /* tensor first: the product takes its shape (a [1] parameter stays [1]) */
    state_new[i] = ad_add(t, ad_mul(t, state[i], lam[1]), g[i]);
    w_new[i] = ad_sub(t, w[i], ad_mul(t, state_new[i], lam[0]));
  }
  return ad_tape_status(t);
}

START_TEST(test_maml_user_step) {
  /* The same heavy-ball adaptation as a user bl_step whose lr and momentum
   * are adaptation hyperparameters (lam). Bounds: meta-loss and
   * d/d theta equal the library optimizer's at the same numbers to 1e-12;
   * d/d theta and d/d (lr, mu) match central differences (step 1e-5) of
   * the hand-written meta-loss to 1e-6 relative, f64. */
  sine_tasks s;
  sine_make(&s, 43);
  ad_tensor *th[NP], *mg[NP + 2], *lib[NP], *fd[NP + 2];
  theta_make(th, 14);
  like(NP, th, mg);
  like(NP, th, lib);
  like(NP, th, fd);
  ad_tensor *lam[2] = {new_tensor(0, NULL), new_tensor(0, NULL)};
  ad_set(lam[0], 0, 0.04);
  ad_set(lam[1], 0, 0.7);
  like(2, lam, mg + NP);
  like(2, lam, fd + NP);
  ad_tape *t = new_tape();
  int calls = 0;
  bl_meta_problem p = {.n_theta = NP,
                       .theta = th,
                       .n_tasks = NT,
                       .support_loss = sine_support,
                       .query_loss = sine_query,
                       .ctx = &s,
                       .step = {.fn = user_heavy_ball, .slots = 1, .ctx = &calls, .name = "hb"},
                       .n_lam = 2,
                       .lam = lam,
                       .inner_steps = 3};
  bl_stats st;
  ck_assert_msg(bl_maml(t, &p, NULL, mg, &st) == AD_OK, "%s", ad_tape_errmsg(t));
  ck_assert_int_eq(calls, NT * 3);
  double user_loss = st.val_loss;
  nn_opt_cfg opt = {.kind = NN_OPT_MOMENTUM, .lr = 0.04, .momentum = 0.7};
  bl_meta_problem q = p;
  q.step = (bl_step){0};
  q.opt = &opt;
  q.n_lam = 0;
  q.lam = NULL;
  ck_assert_msg(bl_maml(t, &q, NULL, lib, &st) == AD_OK, "%s", ad_tape_errmsg(t));
  double e_lib = gc_rel_err(NP, mg, lib);
  ck_assert(fabs(user_loss - st.val_loss) <= 1e-12 * (1 + st.val_loss));
  ref_ctx c = {.t = t, .theta = th, .lr = lam[0], .mu = lam[1], .s = &s, .k = 3};
  central_fd(NP, th, fd, ref_eval, &c, 1e-5);
  central_fd(2, lam, fd + NP, ref_eval, &c, 1e-5);
  double e_th = gc_rel_err(NP, mg, fd), e_lam = gc_rel_err(2, mg + NP, fd + NP);
  printf("maml, user heavy-ball step: vs NN_OPT_MOMENTUM %.2e (bound 1e-12); vs finite "
         "differences theta %.2e, (lr, mu) %.2e (bound 1e-6); d/dlr %.4f d/dmu %.4f\n",
         e_lib, e_th, e_lam, ad_get(mg[NP], 0), ad_get(mg[NP + 1], 0));
  ck_assert(e_lib <= 1e-12);
  ck_assert(e_th <= 1e-6);
  ck_assert(e_lam <= 1e-6);
  ck_assert(fabs(ad_get(mg[NP], 0)) > 1e-3); /* the hyperparameters matter here */
  list_free(NP, th);
  list_free(NP + 2, mg);
  list_free(NP, lib);
  list_free(NP + 2, fd);
  list_free(2, lam);
  sine_free(&s);
  ad_tape_free(t);
}
END_TEST

/* Meta-SGD rates: one per element of each theta[j], except theta[2] (W2)
 * which gets a single size-1 rate, drawn in [0.02, 0.08]. */
static void rates_make(ad_tensor **rate, ad_tensor *const *th, uint64_t seed) {
  ad_rng r;
  ad_rng_seed(&r, seed);
  for (int j = 0; j < NP; j++) {
    rate[j] = j == 2 ? new_tensor(0, NULL) : new_tensor(th[j]->ndim, th[j]->shape);
    ad_tensor_fill_uniform(rate[j], &r, 0.02, 0.08);
  }
}

START_TEST(test_meta_sgd_rates) {
  /* Meta-SGD: SGD adaptation (2 steps) with a learnable rate per element
   * (opt.lr_vars pointing at lam). d meta-loss / d theta and d / d rates
   * against central differences (step 1e-5) of the hand-written meta-loss,
   * 1e-6 relative, f64; the meta-loss itself to 1e-12. */
  sine_tasks s;
  sine_make(&s, 47);
  ad_tensor *th[NP], *rate[NP], *mg[2 * NP], *fd[2 * NP];
  theta_make(th, 16);
  rates_make(rate, th, 3);
  like(NP, th, mg);
  like(NP, rate, mg + NP);
  like(NP, th, fd);
  like(NP, rate, fd + NP);
  ad_tape *t = new_tape();
  nn_opt_cfg opt = {.kind = NN_OPT_SGD, .lr_vars = rate};
  bl_meta_problem p = {.n_theta = NP,
                       .theta = th,
                       .n_tasks = NT,
                       .support_loss = sine_support,
                       .query_loss = sine_query,
                       .ctx = &s,
                       .opt = &opt,
                       .n_lam = NP,
                       .lam = rate,
                       .inner_steps = 2};
  bl_stats st;
  ck_assert_msg(bl_maml(t, &p, NULL, mg, &st) == AD_OK, "%s", ad_tape_errmsg(t));
  ref_ctx c = {.t = t, .theta = th, .rate = rate, .s = &s, .k = 2};
  double f0 = ref_eval(&c);
  ck_assert(fabs(st.val_loss - f0) <= 1e-12 * (1 + f0));
  central_fd(NP, th, fd, ref_eval, &c, 1e-5);
  central_fd(NP, rate, fd + NP, ref_eval, &c, 1e-5);
  double e_th = gc_rel_err(NP, mg, fd), e_rate = gc_rel_err(NP, mg + NP, fd + NP);
  printf("meta-sgd (maml, per-element rates): vs finite differences theta %.2e, rates %.2e "
         "(bound 1e-6)\n",
         e_th, e_rate);
  ck_assert(e_th <= 1e-6);
  ck_assert(e_rate <= 1e-6);
  ck_assert(any_nonzero(NP, mg + NP));
  list_free(NP, th);
  list_free(NP, rate);
  list_free(2 * NP, mg);
  list_free(2 * NP, fd);
  sine_free(&s);
  ad_tape_free(t);
}
END_TEST

START_TEST(test_fomaml_multistep_definition) {
  /* FOMAML with Meta-SGD rates and heavy-ball adaptation (mu 0.6), 3 steps,
   * against its definition (inner gradients held constant):
   *   d/d theta = mean_i q_i,   d/d rate = -mean_i q_i * sum_s m_i,s+1
   * (summed over elements for the size-1 rate), q_i = grad L_query,i(phi_i)
   * and m the momentum buffers of the hand-written adaptation. 1e-12. */
  sine_tasks s;
  sine_make(&s, 53);
  ad_tensor *th[NP], *rate[NP], *mg[2 * NP], *ex[2 * NP], *q[NP], *ms[NP];
  theta_make(th, 18);
  rates_make(rate, th, 5);
  like(NP, th, mg);
  like(NP, rate, mg + NP);
  like(NP, th, ex);
  like(NP, rate, ex + NP);
  like(NP, th, q);
  like(NP, th, ms);
  ad_tape *t = new_tape();
  nn_opt_cfg opt = {.kind = NN_OPT_MOMENTUM, .momentum = 0.6, .lr_vars = rate};
  bl_meta_problem p = {.n_theta = NP,
                       .theta = th,
                       .n_tasks = NT,
                       .support_loss = sine_support,
                       .query_loss = sine_query,
                       .ctx = &s,
                       .opt = &opt,
                       .n_lam = NP,
                       .lam = rate,
                       .inner_steps = 3};
  bl_stats st;
  ck_assert_msg(bl_fomaml(t, &p, NULL, mg, &st) == AD_OK, "%s", ad_tape_errmsg(t));
  double loss = 0;
  for (int i = 0; i < NT; i++) {
    loss += ref_task(t, th, &s, i, 0, rate, 0.6, 3, q, ms) / NT;
    for (int j = 0; j < NP; j++)
      for (int64_t e = 0; e < th[j]->size; e++) {
        double qe = ad_get(q[j], e) / NT, d = -qe * ad_get(ms[j], e);
        ad_set(ex[j], e, ad_get(ex[j], e) + qe);
        int64_t er = rate[j]->size == 1 ? 0 : e;
        ad_set(ex[NP + j], er, ad_get(ex[NP + j], er) + d);
      }
  }
  double e_th = gc_rel_err(NP, mg, ex), e_rate = gc_rel_err(NP, mg + NP, ex + NP);
  printf("fomaml (meta-sgd + momentum, 3 steps) vs its definition: theta %.2e, rates %.2e "
         "(bound 1e-12)\n",
         e_th, e_rate);
  ck_assert(fabs(st.val_loss - loss) <= 1e-12 * (1 + loss));
  ck_assert(e_th <= 1e-12);
  ck_assert(e_rate <= 1e-12);
  /* and it is not MAML: the dropped second-order terms are visible */
  ck_assert_int_eq(bl_maml(t, &p, NULL, ex, &st), AD_OK);
  ck_assert(gc_rel_err(2 * NP, mg, ex) > 1e-3);
  list_free(NP, th);
  list_free(NP, rate);
  list_free(2 * NP, mg);
  list_free(2 * NP, ex);
  list_free(NP, q);
  list_free(NP, ms);
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

/* w - lr g with lr a number in ctx: a user step with no hyperparameters. */
static ad_status ctx_sgd_step(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *state,
                              ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                              ad_tensor **w_new, ad_tensor **state_new) {
  (void)state, (void)lam, (void)step, (void)state_new;
  for (int i = 0; i < n; i++) w_new[i] = ad_axpy(t, w[i], -*(const double *)ctx, g[i]);
  return ad_tape_status(t);
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
  double e = gc_rel_err(1, mg, ex);
  printf("imaml vs (I + H/lam)^{-1} grad L_query: rel err %.2e (bound 1e-8), %lld hvps, CG "
         "residual %.1e\n",
         e, (long long)st.hvps, st.residual);
  ck_assert(e <= 1e-8);
  ck_assert_int_eq(st.inner_steps, QT * 2000);
  ck_assert_int_le(st.hvps, QT * QD);
  ck_assert_int_eq(bl_imaml(t, &p, &(bl_opts){.K = 2}, mg, &st), AD_OK);
  double e2 = gc_rel_err(1, mg, ex);
  printf("imaml with K=2 CG steps: rel err %.2e (expected > 1e-6)\n", e2);
  ck_assert(e2 > 1e-6);
  /* The same through a user step (plain gradient steps, the rate in ctx). */
  bl_meta_problem pu = p;
  double lr_ctx = p.inner_lr;
  pu.inner_lr = 0;
  pu.step = (bl_step){.fn = ctx_sgd_step, .ctx = &lr_ctx};
  ck_assert_msg(bl_imaml(t, &pu, &(bl_opts){.K = QD, .tol = 1e-300}, mg, &st) == AD_OK, "%s",
                ad_tape_errmsg(t));
  double e4 = gc_rel_err(1, mg, ex);
  printf("imaml, user step: rel err %.2e (bound 1e-8)\n", e4);
  ck_assert(e4 <= 1e-8);
  /* The fixed point does not depend on the rule that reaches it: heavy-ball
   * adaptation (momentum 0.5, same step) gives the closed form too, 1e-8. */
  nn_opt_cfg hb = {.kind = NN_OPT_MOMENTUM, .lr = p.inner_lr, .momentum = 0.5};
  bl_meta_problem pm = p;
  pm.inner_lr = 0;
  pm.opt = &hb;
  ck_assert_msg(bl_imaml(t, &pm, &(bl_opts){.K = QD, .tol = 1e-300}, mg, &st) == AD_OK, "%s",
                ad_tape_errmsg(t));
  double e3 = gc_rel_err(1, mg, ex);
  printf("imaml, heavy-ball adaptation: rel err %.2e (bound 1e-8)\n", e3);
  ck_assert(e3 <= 1e-8);
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

/* Returns a [3] tensor for every parameter: the wrong shape. */
static ad_status bad_shape_step(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *state,
                                ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                                ad_tensor **w_new, ad_tensor **state_new) {
  (void)w, (void)state, (void)g, (void)lam, (void)step, (void)ctx, (void)state_new;
  for (int i = 0; i < n; i++) w_new[i] = ad_zeros(t, AD_F64, 1, (int64_t[]){3});
  return AD_OK;
}
/* Forgets w_new[1]. */
static ad_status missing_step(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *state,
                              ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                              ad_tensor **w_new, ad_tensor **state_new) {
  (void)t, (void)state, (void)g, (void)lam, (void)step, (void)ctx, (void)state_new;
  for (int i = 0; i < n; i++) w_new[i] = i == 1 ? NULL : w[i];
  return AD_OK;
}
/* Fails without recording why. */
static ad_status silent_fail_step(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *state,
                                  ad_tensor *const *g, ad_tensor *const *lam, int64_t step,
                                  void *ctx, ad_tensor **w_new, ad_tensor **state_new) {
  (void)t, (void)n, (void)w, (void)state, (void)g, (void)lam, (void)step, (void)ctx, (void)w_new,
      (void)state_new;
  return AD_ERR_STATE;
}

START_TEST(test_adaptation_bad_input) {
  /* Each bad adaptation setting is refused with its status and a message
   * naming the field; the tape is left as found and meta_grad untouched. */
  sine_tasks s;
  sine_make(&s, 7);
  ad_tensor *th[NP], *rate[NP], *mg[2 * NP];
  theta_make(th, 2);
  rates_make(rate, th, 9);
  like(NP, th, mg);
  like(NP, rate, mg + NP);
  ad_tensor *wrong = new_tensor(1, (int64_t[]){5}), *nan_rate = new_tensor(0, NULL);
  ad_set(nan_rate, 0, NAN);
  ad_tensor *rate_bad_shape[NP], *rate_nan[NP];
  for (int j = 0; j < NP; j++) rate_bad_shape[j] = rate_nan[j] = rate[j];
  rate_bad_shape[3] = wrong;
  rate_nan[1] = nan_rate;
  nn_opt_cfg sgd_rates = {.kind = NN_OPT_SGD, .lr_vars = rate};
  nn_opt_cfg bad_shape = {.kind = NN_OPT_SGD, .lr_vars = rate_bad_shape};
  nn_opt_cfg bad_nan = {.kind = NN_OPT_SGD, .lr_vars = rate_nan};
  nn_opt_cfg neg_lr = {.kind = NN_OPT_MOMENTUM, .lr = -0.1};
  nn_opt_cfg nan_lr = {.kind = NN_OPT_MOMENTUM, .lr = NAN};
  nn_opt_cfg decay = {.kind = NN_OPT_SGD, .lr = 0.01, .weight_decay = 0.1};
  bl_meta_problem ok = {.n_theta = NP,
                        .theta = th,
                        .n_tasks = NT,
                        .support_loss = sine_support,
                        .query_loss = sine_query,
                        .ctx = &s,
                        .opt = &sgd_rates,
                        .n_lam = NP,
                        .lam = rate,
                        .inner_steps = 2,
                        .prox = 1.0};
  enum { NB = 16 };
  struct {
    bl_meta_problem p;
    bl_meta_method_fn f;
    ad_status want;
    const char *says; /* a piece of the message */
  } bad[NB];
  for (int i = 0; i < NB; i++) bad[i].p = ok, bad[i].f = bl_maml;
  bad[0].p.opt = NULL, bad[0].p.n_lam = 0, bad[0].p.inner_lr = NAN;
  bad[0].want = AD_ERR_ARG, bad[0].says = "inner_lr is nan";
  bad[1].p.opt = NULL, bad[1].p.n_lam = 0, bad[1].p.inner_lr = -0.5, bad[1].f = bl_fomaml;
  bad[1].want = AD_ERR_ARG, bad[1].says = "inner_lr is -0.5";
  bad[2].p.inner_lr = 0.1, bad[2].want = AD_ERR_ARG, bad[2].says = "inner_lr must be 0";
  bad[3].p.opt = &bad_shape, bad[3].want = AD_ERR_SHAPE, bad[3].says = "opt->lr_vars[3] is [5]";
  bad[4].p.opt = &bad_nan, bad[4].want = AD_ERR_ARG, bad[4].says = "opt->lr_vars[1] element 0";
  bad[5].p.opt = &neg_lr, bad[5].p.n_lam = 0, bad[5].want = AD_ERR_ARG, bad[5].says = "opt->lr";
  bad[6].p.opt = &nan_lr, bad[6].p.n_lam = 0, bad[6].want = AD_ERR_ARG, bad[6].says = "opt->lr";
  bad[7].p.step = (bl_step){.fn = bad_shape_step}, bad[7].want = AD_ERR_ARG;
  bad[7].says = "both step.fn and opt";
  bad[8].p.opt = NULL, bad[8].p.step = (bl_step){.fn = bad_shape_step, .name = "mine"};
  bad[8].want = AD_ERR_SHAPE, bad[8].says = "mine returned w_new[0] [3]";
  bad[9].p.opt = NULL, bad[9].p.step = (bl_step){.fn = missing_step};
  bad[9].want = AD_ERR_NULL, bad[9].says = "user step returned no w_new[1]";
  bad[10].p.opt = NULL, bad[10].p.step = (bl_step){.fn = silent_fail_step, .slots = 3};
  bad[10].want = AD_ERR_ARG, bad[10].says = "step.slots is 3";
  bad[11].p.opt = NULL, bad[11].p.step = (bl_step){.fn = silent_fail_step, .name = "quiet"};
  bad[11].want = AD_ERR_STATE, bad[11].says = "quiet failed at step 0";
  bad[12].f = bl_imaml, bad[12].want = AD_ERR_ARG, bad[12].says = "fixed point";
  bad[13].p.opt = &decay, bad[13].p.n_lam = 0, bad[13].f = bl_imaml;
  bad[13].want = AD_ERR_ARG, bad[13].says = "weight decay";
  nn_opt_cfg plain_momentum = {.kind = NN_OPT_MOMENTUM, .lr = 0.01};
  bad[14].p.opt = &plain_momentum, bad[14].want = AD_ERR_ARG,
  bad[14].says = "lam[0] is read by nothing";
  bad[15].p.opt = NULL, bad[15].p.inner_lr = 0.01, bad[15].f = bl_fomaml;
  bad[15].want = AD_ERR_ARG, bad[15].says = "lam[0] is read by nothing";
  ad_tape *t = new_tape();
  ad_arena_stats a0, a1;
  ad_arena_stats_get(t, &a0);
  for (int j = 0; j < 2 * NP; j++) ad_set(mg[j], 0, 42.0);
  bl_stats st;
  for (int i = 0; i < NB; i++) {
    ad_status got = bad[i].f(t, &bad[i].p, NULL, mg, &st);
    ck_assert_msg(got == bad[i].want && strstr(ad_tape_errmsg(t), bad[i].says),
                  "bad case %d: got %s (%s), wanted %s with \"%s\"", i, ad_status_str(got),
                  ad_tape_errmsg(t), ad_status_str(bad[i].want), bad[i].says);
    printf("bad case %2d: %s\n", i, ad_tape_errmsg(t));
    ad_tape_clear_error(t);
  }
  /* meta_grad for a rate shaped wrong */
  ad_tensor *mg_bad[2 * NP];
  for (int j = 0; j < 2 * NP; j++) mg_bad[j] = mg[j];
  mg_bad[NP] = wrong;
  ck_assert_int_eq(bl_maml(t, &ok, NULL, mg_bad, &st), AD_ERR_SHAPE);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "meta_grad[6]"));
  ad_tape_clear_error(t);
  ad_arena_stats_get(t, &a1);
  ck_assert(a1.used == a0.used && a1.n_nodes == a0.n_nodes);
  for (int j = 0; j < 2 * NP; j++) ck_assert(ad_get(mg[j], 0) == 42.0);
  /* the good problem runs, and negative rates are allowed (Meta-SGD learns
   * directions): same numbers as the hand-written adaptation */
  ad_set(rate[0], 0, -0.03);
  ck_assert_msg(bl_maml(t, &ok, NULL, mg, &st) == AD_OK, "%s", ad_tape_errmsg(t));
  double f0 = ref_meta(t, th, &s, 0, rate, 0, 2);
  ck_assert(fabs(st.val_loss - f0) <= 1e-12 * (1 + f0));
  ad_tape_free(t);
  list_free(NP, th);
  list_free(NP, rate);
  list_free(2 * NP, mg);
  ad_tensor_free(wrong);
  ad_tensor_free(nan_rate);
  sine_free(&s);
}
END_TEST

static Suite *meta_suite(void) {
  Suite *s = suite_create("bl_meta");
  TCase *tc = tcase_create("meta");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, test_maml_finite_differences);
  tcase_add_test(tc, test_fomaml_is_maml_minus_second_order);
  tcase_add_test(tc, test_maml_momentum_three_steps);
  tcase_add_test(tc, test_maml_adam_rmsprop);
  tcase_add_test(tc, test_maml_user_step);
  tcase_add_test(tc, test_meta_sgd_rates);
  tcase_add_test(tc, test_fomaml_multistep_definition);
  tcase_add_test(tc, test_imaml_quadratic_closed_form);
  tcase_add_test(tc, test_duties);
  tcase_add_test(tc, test_adaptation_bad_input);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  return gc_run_suite(meta_suite());
}
