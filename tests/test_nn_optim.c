/* test_nn_optim.c — optimizers: the in-place and the differentiable step
 * agree, and hypergradients through several differentiable steps match
 * finite differences of the in-place trajectory. */
#include "nn/nn.h"
#include "gradcheck.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define NP 2
#define T_STEPS 4
static const nn_opt_kind KINDS[] = {NN_OPT_SGD,  NN_OPT_MOMENTUM, NN_OPT_NESTEROV,
                                    NN_OPT_ADAM, NN_OPT_ADAMW,    NN_OPT_RMSPROP};
static const char *KIND_NAMES[] = {"sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop"};

/* Training loss  L(w) = sum tanh(A w0 - b)^2 + 0.5 sum (w1 * c)^2,
 * with w1[2] unused so its gradient is exactly zero (the Adam sqrt trap). */
static const double A[12] = {0.3, -0.2, 0.5, 0.1, -0.4, 0.7, 0.2, 0.2, -0.6, 0.05, 0.3, 0.4};
static const double B[3] = {0.1, -0.3, 0.2};
static const double C[3] = {1.5, -0.7, 0.0};

static ad_tensor *train_loss(ad_tape *t, ad_tensor *const *w) {
  ad_tensor *a = ad_const(t, AD_F64, 2, (int64_t[]){3, 4}, A);
  ad_tensor *b = ad_const(t, AD_F64, 2, (int64_t[]){3, 1}, B);
  ad_tensor *c = ad_const(t, AD_F64, 1, (int64_t[]){3}, C);
  ad_tensor *r = ad_tanh(t, ad_sub(t, ad_matmul(t, a, w[0], 0, 0), b));
  ad_tensor *q = ad_mul(t, w[1], c);
  return ad_add(t, ad_sum(t, ad_mul(t, r, r)), ad_scale(t, ad_dot(t, q, q), 0.5));
}

/* Validation loss: distance of w to a target. */
static ad_tensor *val_loss(ad_tape *t, ad_tensor *const *w) {
  ad_tensor *s = ad_add_scalar(t, w[0], -0.25);
  ad_tensor *u = ad_add_scalar(t, w[1], 0.5);
  return ad_add(t, ad_dot(t, s, s), ad_dot(t, u, u));
}

static void make_w(ad_tensor **w) {
  ck_assert_int_eq(ad_tensor_new(&w[0], AD_F64, 2, (int64_t[]){4, 1}), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&w[1], AD_F64, 1, (int64_t[]){3}), AD_OK);
  const double w0[4] = {0.5, -0.3, 0.8, 0.1}, w1[3] = {0.2, 0.4, -0.6};
  for (int i = 0; i < 4; i++) ad_set(w[0], i, w0[i]);
  for (int i = 0; i < 3; i++) ad_set(w[1], i, w1[i]);
}

/* Runs T in-place steps from the standard start with lr and wd as numbers;
 * returns L_val(w_T). */
static double run_inplace(nn_opt_kind kind, double lr, double wd, double *w_out) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 4}), AD_OK);
  ad_tensor *w[NP];
  make_w(w);
  for (int i = 0; i < NP; i++) ad_requires_grad(w[i], 1);
  nn_opt_cfg cfg = {.kind = kind, .lr = lr, .weight_decay = wd, .momentum = 0.8};
  nn_opt_state st;
  ck_assert_int_eq(nn_opt_state_init(&cfg, &st, NP, w), AD_OK);
  for (int s = 0; s < T_STEPS; s++) {
    ad_marker m = ad_mark(t);
    ad_tensor *L = train_loss(t, w), *g[NP];
    ck_assert_int_eq(ad_grad(t, 1, &L, NULL, NP, w, g, 0), AD_OK);
    ck_assert_int_eq(nn_opt_step(&cfg, &st, NP, w, g), AD_OK);
    ad_rewind(t, m);
  }
  if (w_out)
    for (int i = 0, k = 0; i < NP; i++)
      for (int64_t j = 0; j < w[i]->size; j++) w_out[k++] = ad_get(w[i], j);
  double v = ad_item(val_loss(t, w));
  nn_opt_state_free(&st);
  for (int i = 0; i < NP; i++) ad_tensor_free(w[i]);
  ad_tape_free(t);
  return v;
}

/* The same trajectory recorded, lr and wd as tape variables; returns
 * L_val(w_T) and d L_val / d(lr, wd), and w_T. */
static double run_diff(nn_opt_kind kind, double lr, double wd, double *dlr, double *dwd,
                       double *w_out) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 16}), AD_OK);
  ad_tensor *w0[NP], *lrv = NULL, *wdv = NULL;
  make_w(w0);
  ck_assert_int_eq(ad_tensor_new(&lrv, AD_F64, 0, NULL), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&wdv, AD_F64, 0, NULL), AD_OK);
  ad_set(lrv, 0, lr);
  ad_set(wdv, 0, wd);
  ad_requires_grad(lrv, 1);
  ad_requires_grad(wdv, 1);
  for (int i = 0; i < NP; i++) ad_requires_grad(w0[i], 1);
  nn_opt_cfg cfg = {.kind = kind, .lr_var = lrv, .weight_decay_var = wdv, .momentum = 0.8};
  nn_opt_state st;
  ck_assert_int_eq(nn_opt_state_init_tape(t, &cfg, &st, NP, w0), AD_OK);
  ad_tensor *w[NP] = {w0[0], w0[1]};
  for (int s = 0; s < T_STEPS; s++) {
    ad_tensor *L = train_loss(t, w), *g[NP], *wn[NP];
    ck_assert_int_eq(ad_grad(t, 1, &L, NULL, NP, w, g, AD_GRAD_RECORD), AD_OK);
    ck_assert_int_eq(nn_opt_step_diff(t, &cfg, &st, NP, w, g, wn), AD_OK);
    for (int i = 0; i < NP; i++) w[i] = wn[i];
  }
  ad_tensor *V = val_loss(t, w), *h[2], *hv[2] = {lrv, wdv};
  ck_assert_int_eq(ad_grad(t, 1, &V, NULL, 2, hv, h, 0), AD_OK);
  *dlr = ad_item(h[0]);
  *dwd = ad_item(h[1]);
  if (w_out)
    for (int i = 0, k = 0; i < NP; i++)
      for (int64_t j = 0; j < w[i]->size; j++) w_out[k++] = ad_get(w[i], j);
  double v = ad_item(V);
  for (int i = 0; i < NP; i++) ad_tensor_free(w0[i]);
  ad_tensor_free(lrv);
  ad_tensor_free(wdv);
  ad_tape_free(t);
  return v;
}

/* In-place and differentiable steps give the same parameters (1e-12). */
START_TEST(test_modes_agree) {
  double wa[7], wb[7], d1, d2;
  double va = run_inplace(KINDS[_i], 0.05, 0.01, wa);
  double vb = run_diff(KINDS[_i], 0.05, 0.01, &d1, &d2, wb);
  for (int k = 0; k < 7; k++)
    ck_assert_msg(fabs(wa[k] - wb[k]) < 1e-12, "%s: w[%d] %g vs %g", KIND_NAMES[_i], k, wa[k],
                  wb[k]);
  ck_assert_double_eq_tol(va, vb, 1e-12);
}
END_TEST

/* d L_val(w_T) / d lr and / d wd through T = 4 recorded steps match central
 * differences of the in-place trajectory: |err| <= 1e-6 (1 + |fd|).
 * Run with wd = 0.01 and with wd = 0: then the unused coordinate w1[2] has an
 * exactly-zero gradient at every step, Adam's and RMSprop's second moment is
 * exactly 0 there, and sqrt's derivative at 0 would make the hypergradient
 * NaN if the step used a plain sqrt. (At wd = 0 the loss has a kink in wd for
 * Adam/RMSprop — the normalised step of a gradient h*w is ~sign(h) for
 * |h w| >> eps — so there only d/dlr is compared with differences and d/dwd
 * is required to be finite.) */
START_TEST(test_hypergrad_fd) {
  const double lr = 0.05, wd = _i >= 6 ? 0.0 : 0.01, h = 1e-6;
  _i %= 6;
  double dlr, dwd;
  run_diff(KINDS[_i], lr, wd, &dlr, &dwd, NULL);
  ck_assert_msg(isfinite(dlr) && isfinite(dwd), "%s: non-finite hypergradient", KIND_NAMES[_i]);
  double fl =
      (run_inplace(KINDS[_i], lr + h, wd, NULL) - run_inplace(KINDS[_i], lr - h, wd, NULL)) /
      (2 * h);
  double fw =
      (run_inplace(KINDS[_i], lr, wd + h, NULL) - run_inplace(KINDS[_i], lr, wd - h, NULL)) /
      (2 * h);
  ck_assert_msg(fabs(dlr - fl) <= 1e-6 * (1 + fabs(fl)), "%s: dlr %.10g vs fd %.10g",
                KIND_NAMES[_i], dlr, fl);
  if (wd != 0 || KINDS[_i] == NN_OPT_SGD || KINDS[_i] == NN_OPT_MOMENTUM ||
      KINDS[_i] == NN_OPT_NESTEROV)
    ck_assert_msg(fabs(dwd - fw) <= 1e-6 * (1 + fabs(fw)), "%s: dwd %.10g vs fd %.10g",
                  KIND_NAMES[_i], dwd, fw);
}
END_TEST

/* Per-parameter learning-rate tensors: gradient w.r.t. each element of a
 * per-parameter lr after 3 SGD steps matches finite differences (1e-6). */
START_TEST(test_per_param_lr) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  ad_tensor *w0[NP], *lr[NP];
  make_w(w0);
  for (int i = 0; i < NP; i++) {
    ad_requires_grad(w0[i], 1);
    ck_assert_int_eq(ad_tensor_new(&lr[i], AD_F64, w0[i]->ndim, w0[i]->shape), AD_OK);
    for (int64_t j = 0; j < lr[i]->size; j++) ad_set(lr[i], j, 0.03 + 0.01 * (double)j);
    ad_requires_grad(lr[i], 1);
  }
  nn_opt_cfg cfg = {.kind = NN_OPT_SGD, .lr_vars = lr};
  ad_tensor *hg[NP];
  double base = 0;
  for (int pass = 0; pass < 2; pass++) {
    /* pass 0: analytic; pass 1: finite differences element by element */
    for (int i = 0; i < (pass ? NP : 1); i++)
      for (int64_t j = 0; j < (pass ? lr[i]->size : 1); j++)
        for (int sgn = (pass ? 1 : 0); sgn >= (pass ? -1 : 0); sgn -= 2) {
          double keep = pass ? ad_get(lr[i], j) : 0;
          if (pass) ad_set(lr[i], j, keep + sgn * 1e-6);
          ad_marker m = ad_mark(t);
          ad_tensor *w[NP] = {w0[0], w0[1]};
          for (int s = 0; s < 3; s++) {
            ad_tensor *L = train_loss(t, w), *g[NP], *wn[NP];
            ck_assert_int_eq(ad_grad(t, 1, &L, NULL, NP, w, g, AD_GRAD_RECORD), AD_OK);
            ck_assert_int_eq(nn_opt_step_diff(t, &cfg, NULL, NP, w, g, wn), AD_OK);
            w[0] = wn[0];
            w[1] = wn[1];
          }
          ad_tensor *V = val_loss(t, w);
          if (!pass) {
            ad_tensor *gg[NP];
            ck_assert_int_eq(ad_grad(t, 1, &V, NULL, NP, lr, gg, 0), AD_OK);
            for (int k = 0; k < NP; k++) {
              ck_assert_int_eq(
                  ad_tensor_from(&hg[k], AD_F64, gg[k]->ndim, gg[k]->shape, gg[k]->data), AD_OK);
            }
            base = ad_item(V);
          } else {
            static double vp;
            if (sgn > 0) {
              vp = ad_item(V);
            } else {
              double fd = (vp - ad_item(V)) / 2e-6;
              double an = ad_get(hg[i], j);
              ck_assert_msg(fabs(an - fd) <= 1e-6 * (1 + fabs(fd)), "lr[%d][%lld]: %g vs %g", i,
                            (long long)j, an, fd);
            }
            ad_set(lr[i], j, keep);
          }
          ad_rewind(t, m);
        }
  }
  ck_assert(isfinite(base));
  for (int i = 0; i < NP; i++) {
    ad_tensor_free(w0[i]);
    ad_tensor_free(lr[i]);
    ad_tensor_free(hg[i]);
  }
  ad_tape_free(t);
}
END_TEST

/* The differentiable SGD step is one fused op with its own rule: its
 * gradient, HVP and JVP in every input (w, g, a scalar lr variable, a
 * per-element decay variable, or numbers) against central differences,
 * within 1e-6 (the op is bilinear, so the output is squared to give the
 * second-order check something to see). */
static ad_tensor *f_sgd(ad_tape *t, ad_tensor *const *x, void *ctx) {
  int mode = *(const int *)ctx;
  nn_opt_cfg cfg = {.kind = NN_OPT_SGD, .lr = 0.3, .weight_decay = 0.05};
  if (mode & 1) cfg.lr_var = x[2];
  if (mode & 2) cfg.weight_decay_vars = &x[3];
  ad_tensor *wn = NULL;
  if (nn_opt_step_diff(t, &cfg, NULL, 1, &x[0], &x[1], &wn) != AD_OK) return NULL;
  return ad_mul(t, wn, wn);
}
START_TEST(test_sgd_op_gradcheck) {
  int mode = _i;
  ad_rng r;
  ad_rng_seed(&r, 11);
  ad_tensor *x[4] = {gc_leaf(2, (int64_t[]){3, 2}, &r, 0, 0),
                     gc_leaf(2, (int64_t[]){3, 2}, &r, 0, 0), gc_leaf(0, NULL, &r, 0.5, 0.1),
                     gc_leaf(2, (int64_t[]){3, 2}, &r, 0, 0)};
  char rep[512];
  double worst = gc_check("sgd_step", f_sgd, 4, x, &mode, (gc_opts){0}, rep, sizeof rep);
  ck_assert_msg(worst <= 1e-6, "mode %d: %s", mode, rep);
  for (int i = 0; i < 4; i++) ad_tensor_free(x[i]);
}
END_TEST

/* Bad input gets an error, never a crash, and the parameters are untouched. */
START_TEST(test_bad_input) {
  ad_tensor *w[NP], *g[NP];
  make_w(w);
  make_w(g);
  nn_opt_cfg cfg = {.kind = NN_OPT_ADAM};
  nn_opt_state st;
  ck_assert_int_eq(nn_opt_step(NULL, NULL, NP, w, g), AD_ERR_NULL);
  ck_assert_int_eq(nn_opt_step(&cfg, NULL, NP, w, g), AD_ERR_STATE); /* Adam needs state */
  ck_assert_int_eq(nn_opt_step(&(nn_opt_cfg){.kind = (nn_opt_kind)42}, NULL, NP, w, g), AD_ERR_ARG);
  ad_tensor *gbad[NP] = {g[1], g[0]}; /* swapped shapes */
  ck_assert_int_eq(nn_opt_state_init(&cfg, &st, NP, w), AD_OK);
  ck_assert_int_eq(nn_opt_step(&cfg, &st, NP, w, gbad), AD_ERR_SHAPE);
  ck_assert(strstr(ad_last_error(), "gradient 0") != NULL);
  ck_assert_double_eq(ad_get(w[0], 0), 0.5); /* untouched */
  ck_assert_int_eq(nn_opt_step(&cfg, &st, 0, w, g), AD_ERR_ARG);
  nn_opt_state_free(&st);
  nn_opt_state_free(NULL);
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  ad_tensor *wn[NP];
  ck_assert_int_eq(nn_opt_step_diff(t, &cfg, NULL, NP, w, g, wn), AD_ERR_STATE);
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_STATE);
  ad_tape_free(t);
  for (int i = 0; i < NP; i++) {
    ad_tensor_free(w[i]);
    ad_tensor_free(g[i]);
  }
}
END_TEST

/* T in-place steps of cfg from the standard start; w_T into w_out. */
static void run_cfg(const nn_opt_cfg *cfg, double *w_out) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 4}), AD_OK);
  ad_tensor *w[NP];
  make_w(w);
  for (int i = 0; i < NP; i++) ad_requires_grad(w[i], 1);
  nn_opt_state st;
  ck_assert_int_eq(nn_opt_state_init(cfg, &st, NP, w), AD_OK);
  for (int s = 0; s < T_STEPS; s++) {
    ad_marker m = ad_mark(t);
    ad_tensor *L = train_loss(t, w), *g[NP];
    ck_assert_int_eq(ad_grad(t, 1, &L, NULL, NP, w, g, 0), AD_OK);
    ck_assert_msg(nn_opt_step(cfg, &st, NP, w, g) == AD_OK, "%s", ad_last_error());
    ad_rewind(t, m);
  }
  for (int i = 0, k = 0; i < NP; i++)
    for (int64_t j = 0; j < w[i]->size; j++) w_out[k++] = ad_get(w[i], j);
  nn_opt_state_free(&st);
  for (int i = 0; i < NP; i++) ad_tensor_free(w[i]);
  ad_tape_free(t);
}

/* Zero is a value: momentum 0 (constructor or set mark) is plain SGD bit
 * for bit, in place and recorded; lr 0 leaves w where it was; a bare
 * designated initialiser still means the defaults (mu 0.9). */
START_TEST(test_zero_is_a_value) {
  double ws[7], wm[7], wn[7], wz[7], w0[7], wd[7], wc[7];
  nn_opt_cfg sgd = nn_opt_sgd(0.05);
  run_cfg(&sgd, ws);
  nn_opt_cfg mom = nn_opt_momentum(0.05, 0.0), nes = nn_opt_nesterov(0.05, 0.0);
  nn_opt_cfg mark = {.kind = NN_OPT_MOMENTUM, .lr = 0.05, .set = NN_OPT_SET_MOMENTUM};
  run_cfg(&mom, wm);
  run_cfg(&nes, wn);
  run_cfg(&mark, wz);
  for (int k = 0; k < 7; k++) {
    ck_assert_msg(wm[k] == ws[k] && wn[k] == ws[k] && wz[k] == ws[k],
                  "momentum 0 differs from SGD at %d: %.17g %.17g %.17g vs %.17g", k, wm[k], wn[k],
                  wz[k], ws[k]);
  }
  /* recorded: the same */
  double wr[7];
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 16}), AD_OK);
  ad_tensor *w[NP];
  make_w(w);
  nn_opt_state st;
  ck_assert_int_eq(nn_opt_state_init_tape(t, &mom, &st, NP, w), AD_OK);
  ad_tensor *cur[NP] = {w[0], w[1]};
  for (int i = 0; i < NP; i++) ad_requires_grad(w[i], 1);
  for (int s = 0; s < T_STEPS; s++) {
    ad_tensor *L = train_loss(t, cur), *g[NP], *nw[NP];
    ck_assert_int_eq(ad_grad(t, 1, &L, NULL, NP, cur, g, AD_GRAD_RECORD), AD_OK);
    ck_assert_int_eq(nn_opt_step_diff(t, &mom, &st, NP, cur, g, nw), AD_OK);
    for (int i = 0; i < NP; i++) cur[i] = nw[i];
  }
  for (int i = 0, k = 0; i < NP; i++)
    for (int64_t j = 0; j < cur[i]->size; j++) wr[k++] = ad_get(cur[i], j);
  for (int k = 0; k < 7; k++) ck_assert(fabs(wr[k] - ws[k]) <= 1e-15);
  ad_tape_free(t);
  for (int i = 0; i < NP; i++) ad_tensor_free(w[i]);
  /* lr 0 does not move */
  nn_opt_cfg still = nn_opt_adam(0.0, 0.9, 0.999, 1e-8);
  run_cfg(&still, wz);
  ad_tensor *wi[NP];
  make_w(wi);
  for (int i = 0, k = 0; i < NP; i++)
    for (int64_t j = 0; j < wi[i]->size; j++) w0[k++] = ad_get(wi[i], j);
  for (int i = 0; i < NP; i++) ad_tensor_free(wi[i]);
  for (int k = 0; k < 7; k++) ck_assert(wz[k] == w0[k]);
  /* defaults unchanged for designated initialisers */
  nn_opt_cfg dflt = {.kind = NN_OPT_MOMENTUM, .lr = 0.05};
  nn_opt_cfg expl = nn_opt_momentum(0.05, 0.9);
  run_cfg(&dflt, wd);
  run_cfg(&expl, wc);
  for (int k = 0; k < 7; k++) ck_assert(wd[k] == wc[k]);
  ck_assert(fabs(wd[0] - ws[0]) > 1e-6); /* and mu 0.9 is not SGD */
  printf("momentum 0 == sgd bit for bit; lr 0 keeps w; default mu 0.9 kept\n");
}
END_TEST

/* beta1 = 0 is honoured: Adam without a first moment, checked against the
 * update written out by hand, w' = w - lr g / (sqrt(v'/(1 - b2^k)) + eps),
 * v' = b2 v + (1 - b2) g^2 (m' = g and its correction 1 - 0^k = 1), to
 * 1e-15; and it differs from the default beta1 = 0.9. */
START_TEST(test_beta1_zero) {
  const double lr = 0.05, b2 = 0.999, eps = 1e-8;
  nn_opt_cfg cfg = nn_opt_adam(lr, 0.0, b2, eps);
  double w_lib[7], w_def[7], w_hand[7], v[7] = {0};
  run_cfg(&cfg, w_lib);
  nn_opt_cfg dflt = {.kind = NN_OPT_ADAM, .lr = lr, .beta1 = 0}; /* 0 = default 0.9 */
  run_cfg(&dflt, w_def);
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 4}), AD_OK);
  ad_tensor *w[NP];
  make_w(w);
  for (int i = 0; i < NP; i++) ad_requires_grad(w[i], 1);
  for (int s = 0; s < T_STEPS; s++) {
    ad_marker m = ad_mark(t);
    ad_tensor *L = train_loss(t, w), *g[NP];
    ck_assert_int_eq(ad_grad(t, 1, &L, NULL, NP, w, g, 0), AD_OK);
    double c2 = 1 - pow(b2, s + 1);
    for (int i = 0, k = 0; i < NP; i++)
      for (int64_t j = 0; j < w[i]->size; j++, k++) {
        double gj = ad_get(g[i], j);
        v[k] = b2 * v[k] + (1 - b2) * gj * gj;
        ad_set(w[i], j, ad_get(w[i], j) - lr * gj / (sqrt(v[k] / c2) + eps));
      }
    ad_rewind(t, m);
  }
  for (int i = 0, k = 0; i < NP; i++)
    for (int64_t j = 0; j < w[i]->size; j++) w_hand[k++] = ad_get(w[i], j);
  double e = 0, d = 0;
  for (int k = 0; k < 7; k++) {
    e = fmax(e, fabs(w_lib[k] - w_hand[k]));
    d = fmax(d, fabs(w_lib[k] - w_def[k]));
  }
  printf("adam beta1 = 0 vs hand-written update: %.1e (bound 1e-15); vs beta1 0.9: %.1e\n", e, d);
  ck_assert(e <= 1e-15);
  ck_assert(d > 1e-4);
  for (int i = 0; i < NP; i++) ad_tensor_free(w[i]);
  ad_tape_free(t);
}
END_TEST

/* Invalid settings: AD_ERR_ARG naming the field and value, from the
 * in-place step, the recorded step (on the tape) and nn_opt_check; the
 * parameters untouched. */
START_TEST(test_bad_settings) {
  ad_tensor *w[NP], *g[NP], *nanv = NULL;
  make_w(w);
  make_w(g);
  ck_assert_int_eq(ad_tensor_new(&nanv, AD_F64, 0, NULL), AD_OK);
  ad_set(nanv, 0, NAN);
  struct {
    nn_opt_cfg c;
    const char *text;
  } bad[] = {
      {{.kind = NN_OPT_SGD, .lr = NAN}, "lr = nan"},
      {{.kind = NN_OPT_SGD, .lr = INFINITY}, "lr = inf"},
      {{.kind = NN_OPT_SGD, .lr = -0.1}, "lr = -0.1"},
      {{.kind = NN_OPT_ADAM, .beta1 = 1}, "beta1 = 1"},
      {{.kind = NN_OPT_ADAM, .beta2 = 1.5}, "beta2 = 1.5"},
      {{.kind = NN_OPT_ADAM, .beta2 = -0.1}, "beta2 = -0.1"},
      {{.kind = NN_OPT_RMSPROP, .eps = -1e-8}, "eps = -1e-08"},
      {{.kind = NN_OPT_RMSPROP, .alpha = NAN}, "alpha = nan"},
      {{.kind = NN_OPT_MOMENTUM, .momentum = -0.5}, "momentum = -0.5"},
      {{.kind = NN_OPT_MOMENTUM, .momentum = NAN}, "momentum = nan"},
      {{.kind = NN_OPT_SGD, .weight_decay = NAN}, "weight_decay = nan"},
      {{.kind = NN_OPT_SGD, .lr_var = nanv}, "lr_var is nan"},
      {{.kind = NN_OPT_SGD, .weight_decay_var = nanv}, "weight_decay_var is nan"},
      {{.kind = NN_OPT_MOMENTUM, .momentum_var = nanv}, "momentum_var is nan"},
  };
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  for (size_t b = 0; b < sizeof bad / sizeof bad[0]; b++) {
    nn_opt_state st = {0};
    ck_assert_int_eq(nn_opt_check(&bad[b].c, NP, w), AD_ERR_ARG);
    ck_assert_msg(strstr(ad_last_error(), bad[b].text), "%s", ad_last_error());
    ck_assert_int_eq(nn_opt_state_init(&bad[b].c, &st, NP, w), AD_ERR_ARG);
    ck_assert_int_eq(nn_opt_step(&bad[b].c, &st, NP, w, g), AD_ERR_ARG);
    ck_assert_msg(strstr(ad_last_error(), "nn_opt_step") && strstr(ad_last_error(), bad[b].text),
                  "%s", ad_last_error());
    ck_assert_double_eq(ad_get(w[0], 0), 0.5); /* untouched */
    ad_tensor *wn[NP];
    ck_assert_int_eq(nn_opt_step_diff(t, &bad[b].c, &st, NP, w, g, wn), AD_ERR_ARG);
    ck_assert_msg(strstr(ad_tape_errmsg(t), bad[b].text), "%s", ad_tape_errmsg(t));
    ad_tape_clear_error(t);
  }
  /* valid edge values are accepted: beta 0, lr 0, eps 0, negative decay */
  nn_opt_cfg ok = nn_opt_adam(0.0, 0.0, 0.0, 0.0);
  ck_assert_int_eq(nn_opt_check(&ok, NP, w), AD_OK);
  ok = nn_opt_sgd(0.1);
  ok.weight_decay = -1e-3;
  ck_assert_int_eq(nn_opt_check(&ok, NP, w), AD_OK);
  ad_tape_free(t);
  ad_tensor_free(nanv);
  for (int i = 0; i < NP; i++) {
    ad_tensor_free(w[i]);
    ad_tensor_free(g[i]);
  }
}
END_TEST

int main(void) {
  Suite *s = suite_create("nn_optim");
  TCase *tc = tcase_create("optim");
  tcase_set_timeout(tc, 120);
  int nk = (int)(sizeof KINDS / sizeof KINDS[0]);
  tcase_add_loop_test(tc, test_modes_agree, 0, nk);
  tcase_add_loop_test(tc, test_hypergrad_fd, 0, 2 * nk);
  tcase_add_test(tc, test_per_param_lr);
  tcase_add_loop_test(tc, test_sgd_op_gradcheck, 0, 4);
  tcase_add_test(tc, test_bad_input);
  tcase_add_test(tc, test_zero_is_a_value);
  tcase_add_test(tc, test_beta1_zero);
  tcase_add_test(tc, test_bad_settings);
  suite_add_tcase(s, tc);
  return gc_run_suite(s);
}
