/* test_bl_steps.c — the inner step interface (bl.h: bl_step): a user's
 * update rule through every method, against the library optimizer it
 * re-implements and against finite differences for a rule the library
 * lacks; bad steps; bl_step_apply; diverging inner runs and solvers. Each
 * assert states its bound; the measured error is printed. */
#include "bl_fixtures.h"
#include "gradcheck.h"

#include <stdlib.h>

/* ---------------------------------------------------------------- heavy ball */

/* Heavy-ball momentum written by hand, in the op order nn/optim.c uses:
 *   m' = mu m + g,   w' = w - lr m',   lr = lam[0] (scalar), mu = 0.9. */
static ad_status heavy_ball(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *s,
                            ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                            ad_tensor **w_new, ad_tensor **s_new) {
  (void)step, (void)ctx;
  for (int i = 0; i < n; i++) {
    s_new[i] = ad_add(t, ad_scale(t, s[i], 0.9), g[i]);
    w_new[i] = ad_sub(t, w[i], ad_mul(t, lam[0], s_new[i]));
  }
  return ad_tape_status(t);
}

typedef struct {
  const char *name;
  bl_method_fn f;
  bl_opts o;
} method_case;

/* Every method that runs or differentiates the inner loop. */
static const method_case METHODS[] = {
    {"unroll", bl_unroll, {0}},
    {"unroll K=3", bl_unroll, {.K = 3}},
    {"forward", bl_forward, {0}},
    {"checkpointed", bl_checkpointed, {.checkpoint_every = 3}},
    {"drmad", bl_drmad, {0}},
    {"fo", bl_fo, {0}},
    {"one_step", bl_one_step, {0}},
    {"t1t2", bl_t1t2, {0}},
    {"t1t2 darts_fd", bl_t1t2, {.darts_fd = 1}},
    {"greedy", bl_greedy, {0}},
    {"hyperdistill", bl_hyperdistill, {.distill_every = 4}},
    {"neumann", bl_neumann, {.K = 10, .alpha = 0.1}},
    {"cg", bl_cg, {.K = 10}},
    {"fixed_point", bl_fixed_point, {.K = 10}},
    {"fixed_point richardson", bl_fixed_point, {.K = 10, .alpha = 0.1}},
    {"hoag", bl_hoag, {.K = 10}},
    {"exact", bl_exact, {.damping = 0.1}},
    {"zero_order", bl_zero_order, {.samples = 4, .antithetic = 1}},
    {"sama", bl_sama, {0}},
};
#define N_METHODS (sizeof METHODS / sizeof METHODS[0])

/* The tiny MLP (fixture kind 4: lam = {lr, L2 scale}) with NN_OPT_MOMENTUM
 * and the same problem with heavy_ball as a user step: every method gives
 * the same hypergradient to 1e-14 relative (normwise over both lam). */
START_TEST(test_heavy_ball_equals_momentum) {
  fx_mlp c;
  fx_mlp_setup(&c, 4, 12);
  bl_problem pu = c.p;
  pu.opt = (nn_opt_cfg){0};
  pu.step = (bl_step){.fn = heavy_ball, .slots = 1, .name = "heavy ball"};
  ck_assert_int_eq(bl_step_slots(&c.p), 1);
  ck_assert_int_eq(bl_step_slots(&pu), 1);
  ad_tape *t = fx_tape(16);
  ad_tensor *ref[2];
  for (int k = 0; k < 2; k++) ref[k] = fx_new(AD_F64, 0, NULL);
  double worst = 0;
  for (size_t i = 0; i < N_METHODS; i++) {
    const method_case *m = &METHODS[i];
    bl_stats sl, su;
    ck_assert_msg(m->f(t, &c.p, &m->o, c.hg, &sl) == AD_OK, "%s (library): %s", m->name,
                  ad_tape_errmsg(t));
    for (int k = 0; k < 2; k++) ad_copy_values(ref[k], c.hg[k]);
    ck_assert_msg(m->f(t, &pu, &m->o, c.hg, &su) == AD_OK, "%s (user step): %s", m->name,
                  ad_tape_errmsg(t));
    double e = fx_rel_t(2, c.hg, ref);
    double mag = fabs(ad_get(ref[0], 0)) + fabs(ad_get(ref[1], 0));
    printf("heavy ball vs NN_OPT_MOMENTUM, %-22s hg = (%+.6e, %+.6e)  rel diff %.1e\n", m->name,
           ad_get(ref[0], 0), ad_get(ref[1], 0), e);
    /* fo is zero here by definition (lam is not in L_val): equal zeros */
    ck_assert_msg(mag > 0 || m->f == bl_fo, "%s: a zero hypergradient compares nothing", m->name);
    ck_assert_msg(e <= 1e-14, "%s: user step differs from the library by %g", m->name, e);
    ck_assert_int_eq(sl.inner_steps, su.inner_steps);
    ck_assert_int_eq(sl.hvps, su.hvps);
    if (e > worst) worst = e;
  }
  printf("heavy ball: worst rel diff over %zu methods %.1e (bound 1e-14)\n", N_METHODS, worst);
  for (int k = 0; k < 2; k++) ad_tensor_free(ref[k]);
  ad_tape_free(t);
  fx_mlp_free(&c);
}
END_TEST

/* ---------------------------------------------------------------- Adagrad + Meta-SGD */

/* A rule the library lacks: Adagrad with a per-parameter, per-element
 * learning rate (Meta-SGD) and a learnable eps,
 *   s' = s + g^2,   w' = w - lr_i (.) g / (sqrt(s') + eps),
 * lr_i = lam[i] (shaped like w[i]), eps = lam[3] (scalar). */
static ad_status adagrad_msgd(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *s,
                              ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                              ad_tensor **w_new, ad_tensor **s_new) {
  (void)step, (void)ctx;
  for (int i = 0; i < n; i++) {
    s_new[i] = ad_add(t, s[i], ad_mul(t, g[i], g[i]));
    ad_tensor *den = ad_add(t, ad_sqrt(t, s_new[i]), lam[3]);
    w_new[i] = ad_sub(t, w[i], ad_mul(t, lam[i], ad_div(t, g[i], den)));
  }
  return ad_tape_status(t);
}

typedef struct {
  fx_mlp m;
  ad_tensor *lam[4], *hg[4];
  bl_problem p;
} ada_case;

static void ada_setup(ada_case *c, int64_t T) {
  fx_mlp_setup(&c->m, 1, T); /* data and w0; its lam are not used */
  ad_rng g;
  ad_rng_seed(&g, 5);
  for (int i = 0; i < 3; i++) {
    c->lam[i] = fx_new(AD_F64, c->m.w0[i]->ndim, c->m.w0[i]->shape);
    ad_tensor_fill_uniform(c->lam[i], &g, 0.05, 0.2);
  }
  c->lam[3] = fx_new(AD_F64, 0, NULL);
  ad_set(c->lam[3], 0, 0.1);
  for (int k = 0; k < 4; k++) c->hg[k] = fx_new(AD_F64, c->lam[k]->ndim, c->lam[k]->shape);
  c->p = c->m.p;
  c->p.n_lam = 4;
  c->p.lam = c->lam;
  c->p.opt = (nn_opt_cfg){0};
  c->p.step = (bl_step){.fn = adagrad_msgd, .slots = 1, .name = "adagrad meta-sgd"};
}

static void ada_free(ada_case *c) {
  for (int k = 0; k < 4; k++) {
    ad_tensor_free(c->lam[k]);
    ad_tensor_free(c->hg[k]);
  }
  fx_mlp_free(&c->m);
}

/* L_val(w_T(lam)) by a plain loop written with doubles (no bilevel code,
 * no step callback): the reference the finite differences are taken of. */
static double ada_run(ada_case *c, ad_tape *t) {
  ad_tensor *w[3];
  double s[3][24] = {{0}};
  for (int i = 0; i < 3; i++) {
    ck_assert_int_eq(
        ad_tensor_from(&w[i], AD_F64, c->m.w0[i]->ndim, c->m.w0[i]->shape, c->m.w0[i]->data),
        AD_OK);
    ad_requires_grad(w[i], 1);
  }
  double eps = ad_get(c->lam[3], 0);
  for (int64_t k = 0; k < c->p.inner_steps; k++) {
    ad_marker m = ad_mark(t);
    ad_tensor *L = fx_mlp_train(t, w, c->lam, k, &c->m.d), *g[3];
    ck_assert_int_eq(ad_grad(t, 1, &L, NULL, 3, w, g, 0), AD_OK);
    for (int i = 0; i < 3; i++)
      for (int64_t j = 0; j < w[i]->size; j++) {
        double gj = ad_get(g[i], j);
        s[i][j] += gj * gj;
        ad_set(w[i], j, ad_get(w[i], j) - ad_get(c->lam[i], j) * gj / (sqrt(s[i][j]) + eps));
      }
    ad_rewind(t, m);
  }
  ad_marker m = ad_mark(t);
  double v = ad_item(fx_mlp_val(t, w, c->lam, -1, &c->m.d));
  ad_rewind(t, m);
  for (int i = 0; i < 3; i++) ad_tensor_free(w[i]);
  return v;
}

/* unroll, forward and checkpointed through the Adagrad/Meta-SGD step match
 * central differences of ada_run in every one of the 49 hyperparameter
 * elements (h = 1e-5 max(1, |lam|)): within 1e-6 relative (normwise). */
START_TEST(test_adagrad_metasgd_fd) {
  ada_case c;
  ada_setup(&c, 10);
  ad_tape *t = fx_tape(16);
  double fd[64];
  int64_t P = 0;
  for (int k = 0; k < 4; k++)
    for (int64_t j = 0; j < c.lam[k]->size; j++) {
      double v = ad_get(c.lam[k], j), h = 1e-5 * fmax(1.0, fabs(v));
      ad_set(c.lam[k], j, v + h);
      double fp = ada_run(&c, t);
      ad_set(c.lam[k], j, v - h);
      double fm = ada_run(&c, t);
      ad_set(c.lam[k], j, v);
      fd[P++] = (fp - fm) / (2 * h);
    }
  ck_assert_int_eq(P, 49);
  const method_case ms[] = {{"unroll", bl_unroll, {0}},
                            {"forward", bl_forward, {0}},
                            {"checkpointed", bl_checkpointed, {.checkpoint_every = 3}}};
  for (size_t i = 0; i < 3; i++) {
    bl_stats st;
    ck_assert_msg(ms[i].f(t, &c.p, &ms[i].o, c.hg, &st) == AD_OK, "%s: %s", ms[i].name,
                  ad_tape_errmsg(t));
    double got[64];
    int64_t q = 0;
    for (int k = 0; k < 4; k++)
      for (int64_t j = 0; j < c.hg[k]->size; j++) got[q++] = ad_get(c.hg[k], j);
    double e = fx_rel(P, got, fd);
    printf("adagrad meta-sgd %-12s vs central differences: rel err %.2e (bound 1e-6); "
           "d/d eps = %+.6e (fd %+.6e)\n",
           ms[i].name, e, got[48], fd[48]);
    ck_assert_msg(e <= 1e-6, "%s: %g", ms[i].name, e);
    ck_assert(fabs(st.val_loss - ada_run(&c, t)) <= 1e-12);
  }
  ad_tape_free(t);
  ada_free(&c);
}
END_TEST

/* ---------------------------------------------------------------- bl_step_apply */

/* One step by hand (in place and recorded) equals the library's own
 * nn_opt_step on the same numbers; the recorded one differentiates to lr:
 * d<1, w'>/dlr = -sum m' (to 1e-15). */
START_TEST(test_step_apply) {
  fx_mlp c;
  fx_mlp_setup(&c, 4, 1);
  ad_tape *t = fx_tape(16);
  ad_tensor *w[3], *s[3], *wr[3], *sr[3], *wref[3];
  nn_opt_state os;
  for (int i = 0; i < 3; i++) {
    ck_assert_int_eq(ad_tensor_from(&w[i], AD_F64, c.w0[i]->ndim, c.w0[i]->shape, c.w0[i]->data),
                     AD_OK);
    ck_assert_int_eq(ad_tensor_from(&wref[i], AD_F64, c.w0[i]->ndim, c.w0[i]->shape, c.w0[i]->data),
                     AD_OK);
    ck_assert_int_eq(ad_tensor_new(&s[i], AD_F64, c.w0[i]->ndim, c.w0[i]->shape), AD_OK);
  }
  ck_assert_int_eq(nn_opt_state_init(&c.p.opt, &os, 3, wref), AD_OK);
  /* two steps in place, both ways */
  for (int64_t k = 0; k < 2; k++) {
    ad_marker m = ad_mark(t);
    for (int i = 0; i < 3; i++) ad_requires_grad(wref[i], 1);
    ad_tensor *L = fx_mlp_train(t, wref, c.lam, k, &c.d), *g[3];
    ck_assert_int_eq(ad_grad(t, 1, &L, NULL, 3, wref, g, 0), AD_OK);
    ck_assert_int_eq(nn_opt_step(&c.p.opt, &os, 3, wref, g), AD_OK);
    ad_rewind(t, m);
    ck_assert_msg(bl_step_apply(t, &c.p, NULL, w, s, NULL, k, BL_STEP_INPLACE, NULL, NULL) == AD_OK,
                  "%s", ad_tape_errmsg(t));
  }
  double e = fx_rel_t(3, w, wref);
  printf("bl_step_apply in place vs nn_opt_step: %.1e\n", e);
  ck_assert(e <= 1e-15);
  for (int i = 0; i < 3; i++) ck_assert(fx_rel_t(1, &s[i], &os.m[i]) <= 1e-15);
  /* recorded at lam views: d sum(w')/dlr = -sum(m') */
  ad_marker m = ad_mark(t);
  ad_tensor *lv[2] = {ad_detach(t, c.lam[0]), ad_detach(t, c.lam[1])};
  ad_requires_grad(lv[0], 1);
  ck_assert_int_eq(bl_step_apply(t, &c.p, lv, w, s, NULL, 2, BL_STEP_RECORD, wr, sr), AD_OK);
  ad_tensor *tot = NULL;
  double msum = 0;
  for (int i = 0; i < 3; i++) {
    ad_tensor *q = ad_sum(t, wr[i]);
    tot = tot ? ad_add(t, tot, q) : q;
    for (int64_t j = 0; j < sr[i]->size; j++) msum += ad_get(sr[i], j);
  }
  ad_tensor *dl;
  ck_assert_int_eq(ad_grad(t, 1, &tot, NULL, 1, lv, &dl, 0), AD_OK);
  printf("bl_step_apply recorded: d sum(w')/dlr = %.15g, -sum(m') = %.15g\n", ad_item(dl), -msum);
  ck_assert(fabs(ad_item(dl) + msum) <= 1e-15 * fabs(msum));
  ad_rewind(t, m);
  /* bad input: no state for a step that has some, bad mode */
  ck_assert_int_eq(bl_step_apply(t, &c.p, NULL, w, NULL, NULL, 0, BL_STEP_INPLACE, NULL, NULL),
                   AD_ERR_NULL);
  ck_assert(strstr(ad_tape_errmsg(t), "bl_step_apply") && strstr(ad_tape_errmsg(t), "state"));
  ad_tape_clear_error(t);
  ck_assert_int_eq(bl_step_apply(t, &c.p, NULL, w, s, NULL, 0, 7, NULL, NULL), AD_ERR_ARG);
  ad_tape_clear_error(t);
  nn_opt_state_free(&os);
  for (int i = 0; i < 3; i++) {
    ad_tensor_free(w[i]);
    ad_tensor_free(s[i]);
    ad_tensor_free(wref[i]);
  }
  ad_tape_free(t);
  fx_mlp_free(&c);
}
END_TEST

/* ---------------------------------------------------------------- bad steps */

static ad_status null_step(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *s,
                           ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                           ad_tensor **w_new, ad_tensor **s_new) {
  (void)t, (void)s, (void)g, (void)lam, (void)ctx, (void)s_new;
  for (int i = 0; i < n; i++) w_new[i] = step == 2 && i == 1 ? NULL : w[i];
  return AD_OK;
}

static ad_status shape_step(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *s,
                            ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                            ad_tensor **w_new, ad_tensor **s_new) {
  (void)s, (void)g, (void)lam, (void)step, (void)ctx;
  for (int i = 0; i < n; i++) {
    w_new[i] = w[i];
    s_new[i] = i == 2 ? ad_sum(t, w[i]) : w[i]; /* a scalar where [3, 6] is due */
  }
  return ad_tape_status(t);
}

static ad_status failing_step(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *s,
                              ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                              ad_tensor **w_new, ad_tensor **s_new) {
  (void)t, (void)n, (void)w, (void)s, (void)g, (void)lam, (void)step, (void)ctx, (void)w_new,
      (void)s_new;
  return AD_ERR_ARG;
}

/* Each bad step gives its status with the step's name in the message,
 * through every method, and hg untouched. */
START_TEST(test_bad_steps) {
  fx_mlp c;
  fx_mlp_setup(&c, 4, 4);
  struct {
    bl_step step;
    ad_status want;
    const char *text;
  } bad[] = {
      {{.fn = heavy_ball, .slots = 3, .name = "three slots"}, AD_ERR_ARG, "slots = 3"},
      {{.fn = heavy_ball, .slots = -1, .name = "negative slots"}, AD_ERR_ARG, "slots = -1"},
      {{.fn = null_step, .slots = 0, .name = "null output"}, AD_ERR_NULL, "NULL w_new[1]"},
      {{.fn = shape_step, .slots = 1, .name = "wrong shape"}, AD_ERR_SHAPE, "state_new[2]"},
      {{.fn = failing_step, .slots = 0, .name = "failing"}, AD_ERR_ARG, "failed"},
  };
  ad_tape *t = fx_tape(16);
  for (size_t b = 0; b < sizeof bad / sizeof bad[0]; b++) {
    bl_problem p = c.p;
    p.opt = (nn_opt_cfg){0};
    p.step = bad[b].step;
    for (size_t i = 0; i < N_METHODS; i++) {
      const method_case *m = &METHODS[i];
      /* fo, zero_order and the implicit methods call the step in place only
       * (the null step fails at step 2: needs T > 2, set above). */
      for (int k = 0; k < 2; k++) ad_set(c.hg[k], 0, 123.0);
      ad_status s = m->f(t, &p, &m->o, c.hg, NULL);
      const char *msg = ad_tape_errmsg(t);
      ck_assert_msg(s == bad[b].want, "%s with step '%s': status %s (%s)", m->name,
                    bad[b].step.name, ad_status_str(s), msg);
      ck_assert_msg(strstr(msg, bad[b].step.name) && strstr(msg, bad[b].text),
                    "%s: message does not name the step: %s", m->name, msg);
      for (int k = 0; k < 2; k++) ck_assert(ad_get(c.hg[k], 0) == 123.0);
      ad_tape_clear_error(t);
    }
    printf("bad step '%s': e.g. \"%s\"\n", bad[b].step.name,
           (bl_unroll(t, &p, NULL, c.hg, NULL), ad_tape_errmsg(t)));
    ad_tape_clear_error(t);
  }
  ad_tape_free(t);
  fx_mlp_free(&c);
}
END_TEST

/* ---------------------------------------------------------------- divergence */

/* Ridge with inner lr 500 (|1 - 500 lambda| >> 1: w overflows within the
 * T = 300 steps): every method, with the library SGD and with a user step,
 * fails with AD_ERR_NUMERIC naming the inner step, and hg is untouched. */
static ad_status plain_sgd(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *s,
                           ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                           ad_tensor **w_new, ad_tensor **s_new) {
  (void)s, (void)lam, (void)step, (void)s_new;
  for (int i = 0; i < n; i++) w_new[i] = ad_axpy(t, w[i], -*(const double *)ctx, g[i]);
  return ad_tape_status(t);
}

START_TEST(test_diverging_inner_run) {
  fx_rcase c;
  fx_rcase_setup(&c, 1, 300, 500.0);
  double lr = 500.0;
  ad_tape *t = fx_tape(64);
  for (int user = 0; user < 2; user++) {
    bl_problem p = c.p;
    if (user) p.step = (bl_step){.fn = plain_sgd, .ctx = &lr, .name = "sgd by hand"};
    for (size_t i = 0; i < N_METHODS; i++) {
      const method_case *m = &METHODS[i];
      for (int j = 0; j < c.rp.d; j++) ad_set(c.hg[0], j, 7.0);
      ad_status s = m->f(t, &p, &m->o, c.hg, NULL);
      const char *msg = ad_tape_errmsg(t);
      ck_assert_msg(s == AD_ERR_NUMERIC, "%s (%s): %s, %s", m->name, user ? "user" : "library",
                    ad_status_str(s), msg);
      ck_assert_msg(strstr(msg, "inner step") != NULL, "%s: %s", m->name, msg);
      for (int j = 0; j < c.rp.d; j++) ck_assert(ad_get(c.hg[0], j) == 7.0);
      if (i == 0) printf("lr 500, %s step: \"%s\"\n", user ? "user" : "library", msg);
      ad_tape_clear_error(t);
    }
  }
  ad_tape_free(t);
  fx_rcase_free(&c);
}
END_TEST

/* Converged ridge (lr 0.5, T = 200): Neumann and Richardson with alpha = 10,
 * past 2/lambda_max, fail at a named solver iteration instead of returning
 * |hg| ~ 1e25; with alpha = 0.5 both succeed. */
START_TEST(test_diverging_solver) {
  fx_rcase c;
  fx_rcase_setup(&c, 1, 200, 0.5);
  ad_tape *t = fx_tape(64);
  bl_method_fn fs[2] = {bl_neumann, bl_fixed_point};
  const char *names[2] = {"neumann", "fixed_point"};
  for (int k = 0; k < 2; k++) {
    for (int j = 0; j < c.rp.d; j++) ad_set(c.hg[0], j, 7.0);
    ad_status s = fs[k](t, &c.p, &(bl_opts){.K = 20, .alpha = 10}, c.hg, NULL);
    const char *msg = ad_tape_errmsg(t);
    printf("%s alpha 10: \"%s\"\n", names[k], msg);
    ck_assert_int_eq(s, AD_ERR_NUMERIC);
    ck_assert(strstr(msg, "solver iteration") != NULL);
    for (int j = 0; j < c.rp.d; j++) ck_assert(ad_get(c.hg[0], j) == 7.0);
    ad_tape_clear_error(t);
    ck_assert_int_eq(fs[k](t, &c.p, &(bl_opts){.K = 20, .alpha = 0.5}, c.hg, NULL), AD_OK);
  }
  ad_tape_free(t);
  fx_rcase_free(&c);
}
END_TEST

/* Settings that are not numbers a method can use: AD_ERR_ARG naming the
 * value, hg untouched. */
START_TEST(test_bad_settings) {
  fx_rcase c;
  fx_rcase_setup(&c, 0, 5, 0.5);
  ad_tape *t = fx_tape(16);
  struct {
    const char *name;
    bl_method_fn f;
    bl_opts o;
    nn_opt_cfg opt;
    const char *text;
  } bad[] = {
      {"sama eps < 0", bl_sama, {.eps = -1e-3}, {.kind = NN_OPT_SGD, .lr = 0.5}, "eps = -0.001"},
      {"sama eps NaN", bl_sama, {.eps = NAN}, {.kind = NN_OPT_SGD, .lr = 0.5}, "eps = nan"},
      {"darts eps < 0",
       bl_t1t2,
       {.darts_fd = 1, .eps = -1},
       {.kind = NN_OPT_SGD, .lr = 0.5},
       "eps = -1"},
      {"inner lr NaN", bl_unroll, {0}, {.kind = NN_OPT_SGD, .lr = NAN}, "lr = nan"},
      {"inner lr < 0", bl_cg, {0}, {.kind = NN_OPT_SGD, .lr = -0.1}, "lr = -0.1"},
      {"adam beta1 = 1",
       bl_forward,
       {0},
       {.kind = NN_OPT_ADAM, .lr = 0.1, .beta1 = 1},
       "beta1 = 1"},
      {"rmsprop eps < 0",
       bl_fo,
       {0},
       {.kind = NN_OPT_RMSPROP, .lr = 0.1, .eps = -1e-8},
       "eps = -1e-08"},
  };
  for (size_t b = 0; b < sizeof bad / sizeof bad[0]; b++) {
    bl_problem p = c.p;
    p.opt = bad[b].opt;
    ad_set(c.hg[0], 0, 7.0);
    ad_status s = bad[b].f(t, &p, &bad[b].o, c.hg, NULL);
    const char *msg = ad_tape_errmsg(t);
    printf("%s: \"%s\"\n", bad[b].name, msg);
    ck_assert_msg(s == AD_ERR_ARG && strstr(msg, bad[b].text), "%s: %s", bad[b].name, msg);
    ck_assert(ad_get(c.hg[0], 0) == 7.0);
    ad_tape_clear_error(t);
  }
  /* a NaN tape-variable hyperparameter */
  bl_problem p = c.p;
  ad_tensor *lr = fx_new(AD_F64, 0, NULL);
  ad_set(lr, 0, NAN);
  p.opt.lr_var = lr;
  ck_assert_int_eq(bl_unroll(t, &p, NULL, c.hg, NULL), AD_ERR_ARG);
  printf("NaN lr_var: \"%s\"\n", ad_tape_errmsg(t));
  ck_assert(strstr(ad_tape_errmsg(t), "lr_var is nan"));
  ck_assert(ad_get(c.hg[0], 0) == 7.0);
  ad_tensor_free(lr);
  ad_tape_free(t);
  fx_rcase_free(&c);
}
END_TEST

int main(void) {
  Suite *s = suite_create("bl_steps");
  TCase *tc = tcase_create("steps");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, test_heavy_ball_equals_momentum);
  tcase_add_test(tc, test_adagrad_metasgd_fd);
  tcase_add_test(tc, test_step_apply);
  tcase_add_test(tc, test_bad_steps);
  tcase_add_test(tc, test_diverging_inner_run);
  tcase_add_test(tc, test_diverging_solver);
  tcase_add_test(tc, test_bad_settings);
  suite_add_tcase(s, tc);
  return gc_run_suite(s);
}
