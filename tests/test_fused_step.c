/* test_fused_step.c — the differentiable SGD step as one fused op
 * (nn/optim.c: sgd_step, w' = w - A (g + D w), and the fused parts of its
 * derivative). Every way nn_opt_cfg can give the learning rate A (a number,
 * lr_var, lr_vars of size 1 or shaped like w) and the weight decay D (none,
 * a number, weight_decay_var, weight_decay_vars of size 1 or like w), in f32
 * and f64:
 *   - the fused step against the same step composed of public ops
 *     (nn__opt_set_unfused): w', the gradient in w, g, A, D, and the second
 *     derivative (gradient of a recorded gradient) agree to rounding;
 *   - gradient, HVP and JVP against central differences (f64), of the step,
 *     of a gradient taken through it (second and third order), and of a
 *     two-step unroll with recorded inner gradients (as bl_unroll and MAML
 *     record them);
 *   - what it keeps: one node per step, and an unrecorded backward that
 *     allocates the wanted cotangents and nothing else;
 *   - bad input is an error naming what is wrong. */
#include "nn/nn.h"
#include "nn/nn_internal.h"
#include "autodiff/ad_internal.h" /* ad__grad_acc */
#include "gradcheck.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Combinations: SGD ones 0..NCOMBO-1, then momentum and Nesterov, each
 * with a number and with a momentum_var, then Adam and AdamW (whose
 * moments are fused; NALL in all). */
enum { NLR = 4, NWD = 5, NCOMBO = NLR * NWD, NALL = 7 * NCOMBO };
static const char *KIND_NAME[5] = {"sgd", "momentum", "nesterov", "adam", "adamw"};
static const char *LR_NAME[NLR] = {"lr number", "lr_var", "lr_vars size 1", "lr_vars like w"};
static const char *WD_NAME[NWD] = {"no decay", "weight_decay number", "weight_decay_var",
                                   "weight_decay_vars size 1", "weight_decay_vars like w"};

/* One configuration: inputs x = {w, g, A?, D?, M?} (n of them); ia / id /
 * im are the slots of the variables, -1 when the hyperparameter is a
 * number. kind 0 SGD, 1 momentum, 2 Nesterov. */
typedef struct {
  int lrm, wdm, kind, n, ia, id, im;
} combo;

static combo combo_of(int i) {
  /* rest: 0 sgd, 1..4 momentum/nesterov x (number, momentum_var), 5 adam, 6 adamw */
  int base = i % NCOMBO, rest = i / NCOMBO;
  combo c = {base % NLR, base / NLR, rest >= 5 ? rest - 2 : rest ? 1 + (rest - 1) / 2 : 0, 2, -1,
             -1,         -1};
  if (c.lrm) c.ia = c.n++;
  if (c.wdm >= 2) c.id = c.n++;
  if (rest && rest < 5 && (rest - 1) % 2) c.im = c.n++;
  return c;
}

static const char *combo_name(const combo *c, char *buf, size_t len) {
  snprintf(buf, len, "%s%s, %s, %s", KIND_NAME[c->kind], c->im >= 0 ? " (momentum_var)" : "",
           LR_NAME[c->lrm], WD_NAME[c->wdm]);
  return buf;
}

static nn_opt_cfg cfg_of(const combo *c, ad_tensor *const *x) {
  nn_opt_cfg cfg = c->kind == 1   ? nn_opt_momentum(0.3, 0.8)
                   : c->kind == 2 ? nn_opt_nesterov(0.3, 0.8)
                   : c->kind == 3 ? nn_opt_adam(0.3, 0.8, 0.9, 0.1)
                   : c->kind == 4 ? nn_opt_adamw(0.3, 0.8, 0.9, 0.1, 0.0)
                                  : nn_opt_sgd(0.3);
  if (c->im >= 0) cfg.momentum_var = x[c->im];
  if (c->wdm == 1) cfg.weight_decay = 0.05;
  if (c->lrm == 1) cfg.lr_var = x[c->ia];
  if (c->lrm >= 2) cfg.lr_vars = &x[c->ia];
  if (c->wdm == 2) cfg.weight_decay_var = x[c->id];
  if (c->wdm >= 3) cfg.weight_decay_vars = &x[c->id];
  return cfg;
}

/* The shape of input k: w's, or size 1 for a broadcast variable. */
static int shape_of(const combo *c, int k, int ndim, const int64_t *shape, int64_t *out) {
  int scalar = (k == c->ia && c->lrm <= 2) || (k == c->id && c->wdm <= 3) || k == c->im;
  if (!scalar) {
    memcpy(out, shape, sizeof(int64_t) * (size_t)ndim);
    return ndim;
  }
  out[0] = 1;
  return (k == c->ia && c->lrm == 1) || (k == c->id && c->wdm == 2) || k == c->im ? 0 : 1;
}

/* Heap leaves of dtype dt for combination c, w of the given shape: w and g
 * N(0, 1) (g pushed 0.5 away from 0 for Adam), A about 0.3, D about 0.05
 * (learned rates vary per element), M about 0.8. */
static void make_inputs(const combo *c, ad_dtype dt, int ndim, const int64_t *shape, uint64_t seed,
                        ad_tensor **x) {
  ad_rng r;
  ad_rng_seed(&r, seed);
  for (int k = 0; k < c->n; k++) {
    int64_t sh[4];
    int nd = shape_of(c, k, ndim, shape, sh);
    ck_assert_int_eq(ad_tensor_new(&x[k], dt, nd, sh), AD_OK);
    double mean = k == c->ia ? 0.3 : k == c->id ? 0.05 : k == c->im ? 0.8 : 0.0;
    double sd = k == c->ia ? 0.1 : k == c->id ? 0.03 : k == c->im ? 0.05 : 1.0;
    ad_tensor_fill_normal(x[k], &r, mean, sd);
    /* Adam's step m / (sqrt(v) + eps) has derivatives of order 1/|g|^k: a
     * gradient bounded away from 0 keeps them (and the differences) tame. */
    for (int64_t j = 0; k == 1 && c->kind >= 3 && j < x[k]->size; j++) {
      double v = ad_get(x[k], j);
      ad_set(x[k], j, v < 0 ? v - 0.5 : v + 0.5);
    }
    ad_requires_grad(x[k], 1);
  }
}

static void free_inputs(int n, ad_tensor **x) {
  for (int k = 0; k < n; k++) ad_tensor_free(x[k]);
}

/* SGD: w' of one step with the inputs x. The others: two steps from
 * w = x[0] and zero buffers with gradient x[1] (the second step sees the
 * first's buffers), returning w_2 + 0.7 m_2 (+ 0.3 v_2 for Adam) so every
 * output counts. */
static ad_tensor *step(ad_tape *t, const combo *c, ad_tensor *const *x) {
  nn_opt_cfg cfg = cfg_of(c, x);
  ad_tensor *wn = NULL, *w = x[0];
  if (!c->kind) return nn_opt_step_diff(t, &cfg, NULL, 1, &w, &x[1], &wn) == AD_OK ? wn : NULL;
  nn_opt_state st;
  if (nn_opt_state_init_tape(t, &cfg, &st, 1, &w) != AD_OK) return NULL;
  for (int k = 0; k < 2; k++) {
    if (nn_opt_step_diff(t, &cfg, &st, 1, &w, &x[1], &wn) != AD_OK) return NULL;
    w = wn;
  }
  w = ad_axpy(t, w, 0.7, st.m[0]);
  return c->kind >= 3 ? ad_axpy(t, w, 0.3, st.v[0]) : w;
}

/* A constant of x's shape and dtype with entries from a fixed pattern. */
static ad_tensor *pattern(ad_tape *t, const ad_tensor *x, double off) {
  ad_tensor *p = ad_empty(t, x->dtype, x->ndim, x->shape);
  for (int64_t j = 0; p && j < x->size; j++) ad_set(p, j, off + 0.37 * sin(1.3 * (double)j + off));
  return p;
}

/* Everything the comparison looks at, flattened into out (returns the
 * count): w'; the gradient of L = <w' w', r> in every input (unrecorded);
 * the gradient of s = sum_k <dL/dx_k, v_k> (the backward recorded, then
 * differentiated: the rules of the fused derivative parts). part[k] gets
 * the offset where block k starts (1 + 2 n blocks). */
static int64_t run_path(int unfused, const combo *c, ad_tensor *const *x, double *out,
                        int64_t *part) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 4}), AD_OK);
  nn__opt_set_unfused(unfused);
  int64_t m = 0, b = 0;
  ad_tensor *wn = step(t, c, x);
  ck_assert_msg(wn != NULL, "step: %s", ad_tape_errmsg(t));
  part[b++] = m;
  for (int64_t j = 0; j < wn->size; j++) out[m++] = ad_get(wn, j);
  ad_tensor *L = ad_dot(t, ad_mul(t, wn, wn), pattern(t, wn, 0.5)), *gr[5], *g2[5];
  ck_assert_int_eq(ad_grad(t, 1, &L, NULL, c->n, x, gr, 0), AD_OK);
  for (int k = 0; k < c->n; k++) {
    part[b++] = m;
    for (int64_t j = 0; j < gr[k]->size; j++) out[m++] = ad_get(gr[k], j);
  }
  ck_assert_int_eq(ad_grad(t, 1, &L, NULL, c->n, x, gr, AD_GRAD_RECORD), AD_OK);
  ad_tensor *s = NULL;
  for (int k = 0; k < c->n; k++) {
    ad_tensor *d = ad_dot(t, gr[k], pattern(t, gr[k], 0.1 * k - 0.2));
    s = s ? ad_add(t, s, d) : d;
  }
  ck_assert_int_eq(ad_grad(t, 1, &s, NULL, c->n, x, g2, 0), AD_OK);
  for (int k = 0; k < c->n; k++) {
    part[b++] = m;
    for (int64_t j = 0; j < g2[k]->size; j++) out[m++] = ad_get(g2[k], j);
  }
  part[b] = m;
  nn__opt_set_unfused(0);
  ck_assert_int_eq(ad_tape_status(t), AD_OK);
  ad_tape_free(t);
  return m;
}

/* Fused and unfused agree: |fused - unfused| <= tol (1 + |unfused|) with
 * tol 1e-13 in f64, 4e-6 in f32 (the two orders of rounding of the same
 * products; 1e-4 for the f32 sums that size-1 variables get). w has 1573
 * elements: three loop blocks of 512 and a tail. Each gradient block is
 * required to be nonzero somewhere, so the comparison has something to
 * compare. Called for every combination of every kind, in f64 and f32. */
static void fused_matches_unfused(int i, ad_dtype dt) {
  combo c = combo_of(i);
  double tol = dt == AD_F64 ? 1e-13 : 4e-6;
  const int64_t shape[2] = {11, 143};
  ad_tensor *x[5];
  char nm[160];
  combo_name(&c, nm, sizeof nm);
  make_inputs(&c, dt, 2, shape, 100 + (uint64_t)i + (dt == AD_F32 ? NALL : 0), x);
  /* Adam: one gradient entry exactly 0, so (without L2 decay) v = 0 there
   * and the update's sqrt is taken at 0: both paths must give 0, not NaN,
   * for its derivative (safe_sqrt's "double where"). */
  if (c.kind >= 3) ad_set(x[1], 7, 0.0);
  enum { CAP = 11 * 1573 + 16 };
  static double a[CAP], b[CAP];
  int64_t pa[12], pb[12];
  int64_t na = run_path(0, &c, x, a, pa), nb = run_path(1, &c, x, b, pb);
  ck_assert_int_eq(na, nb);
  double worst = 0;
  for (int blk = 0; blk < 1 + 2 * c.n; blk++) {
    double mx = 0, bt = tol;
    /* The gradient of a size-1 variable is a sum over w's 1573 elements
     * (of products that are themselves sums, at second order): in f32 the
     * two paths round those sums differently, by up to ~1e-5 of the result
     * here. The f64 run of the same combination holds them to 1e-13. */
    if (dt == AD_F32 && pa[blk + 1] - pa[blk] == 1) bt = 1e-4;
    /* Adam's second derivative (through m / (sqrt(v) + eps), v of the
     * squared gradient) cancels: the fused second moment's rule, 2 Q gi C
     * in one product, rounds differently from the composed gi C + C gi,
     * and the difference grows to a few 1e-5 of the result in f32. The
     * gradchecks below hold Adam's second and third order to finite
     * differences. */
    if (c.kind >= 3 && blk > c.n) bt = dt == AD_F64 ? 1e-12 : 2e-4;
    for (int64_t j = pa[blk]; j < pa[blk + 1]; j++) {
      double e = fabs(a[j] - b[j]) / (1 + fabs(b[j]));
      if (e > worst) worst = e;
      ck_assert_msg(e <= bt, "%s, %s: block %d element %lld: fused %.17g unfused %.17g", nm,
                    ad_dtype_name(dt), blk, (long long)(j - pa[blk]), a[j], b[j]);
      /* momentum's forward is the composed one's arithmetic: the same bits */
      if (c.kind && blk == 0)
        ck_assert_msg(a[j] == b[j], "%s, %s: w_2 + 0.7 m_2 element %lld: %.17g vs %.17g", nm,
                      ad_dtype_name(dt), (long long)j, a[j], b[j]);
      if (fabs(b[j]) > mx) mx = fabs(b[j]);
    }
    ck_assert_msg(mx > 0, "%s: block %d is all zero", nm, blk);
  }
  fprintf(stderr, "fused vs unfused %-62s %s: worst %.2e (bound %.0e)\n", nm, ad_dtype_name(dt),
          worst, tol);
  free_inputs(c.n, x);
}
/* _i: a kind (SGD, momentum, Nesterov, each momentum with a number and a
 * momentum_var, Adam, AdamW) and a dtype; every lr / decay form in it. */
START_TEST(test_fused_matches_unfused) {
  for (int k = 0; k < NCOMBO; k++)
    fused_matches_unfused((_i % 7) * NCOMBO + k, _i >= 7 ? AD_F32 : AD_F64);
}
END_TEST

/* ---------------------------------------------------------------- gradchecks */

/* w'^2: the step is linear in each input, the square gives the HVP check
 * a second derivative to see. */
static ad_tensor *f_step(ad_tape *t, ad_tensor *const *x, void *ctx) {
  ad_tensor *wn = step(t, ctx, x);
  return wn ? ad_mul(t, wn, wn) : NULL;
}

/* sum_k |dL/dx_k|^2 for L = <w' w' w', r>, the gradient recorded: its
 * gradient is a second derivative through the step (the rules of the fused
 * derivative parts), its HVP a third. Recording is switched on inside, as
 * the gradient needs it even when gradcheck evaluates without. */
static ad_tensor *f_grad(ad_tape *t, ad_tensor *const *x, void *ctx) {
  const combo *c = ctx;
  int prev = ad_set_recording(t, 1);
  ad_tensor *wn = step(t, c, x), *gr[5], *s = NULL;
  if (wn) {
    ad_tensor *L = ad_dot(t, ad_mul(t, ad_mul(t, wn, wn), wn), pattern(t, wn, 0.5));
    if (ad_grad(t, 1, &L, NULL, c->n, x, gr, AD_GRAD_RECORD) == AD_OK)
      for (int k = 0; k < c->n; k++) {
        ad_tensor *d = ad_dot(t, gr[k], gr[k]);
        s = s ? ad_add(t, s, d) : d;
      }
  }
  ad_set_recording(t, prev);
  return s;
}

/* Two recorded SGD steps of L_train(w) = <tanh(w), q> + 0.5 <w, w w> / 3
 * from w_0 = x[0] (g = its recorded gradient, as bl_unroll and MAML take
 * it), then L_val = <tanh(w_2), q'>: its gradient in w_0, A and D is the
 * hypergradient of an unroll, its HVP goes through the backward of the
 * inner gradients and the step's derivative parts. Input 1 (g) is unused. */
static ad_tensor *f_unroll(ad_tape *t, ad_tensor *const *x, void *ctx) {
  const combo *c = ctx;
  int prev = ad_set_recording(t, 1);
  ad_tensor *in[5], *w = x[0], *out = NULL;
  memcpy(in, x, sizeof in);
  for (int k = 0; k < 2 && w; k++) {
    ad_tensor *L = ad_add(t, ad_dot(t, ad_tanh(t, w), pattern(t, w, 0.3)),
                          ad_scale(t, ad_dot(t, w, ad_mul(t, w, w)), 0.5 / 3));
    ad_tensor *g = NULL;
    if (!L || ad_grad(t, 1, &L, NULL, 1, &w, &g, AD_GRAD_RECORD) != AD_OK) break;
    in[0] = w;
    in[1] = g;
    w = step(t, c, in);
  }
  if (w) out = ad_dot(t, ad_tanh(t, w), pattern(t, w, -0.4));
  ad_set_recording(t, prev);
  return out;
}

static void gradcheck_combo(const char *what, gc_fn f, int i, double tol) {
  combo c = combo_of(i);
  ad_tensor *x[5];
  make_inputs(&c, AD_F64, 2, (int64_t[]){3, 2}, 7 + (uint64_t)i, x);
  char rep[512], name[200], nm[160];
  snprintf(name, sizeof name, "%s (%s)", what, combo_name(&c, nm, sizeof nm));
  double worst = gc_check(name, f, c.n, x, &c, (gc_opts){.tol = tol}, rep, sizeof rep);
  fprintf(stderr, "%s\n", rep);
  ck_assert_msg(worst <= tol, "%s", rep);
  free_inputs(c.n, x);
}

/* Gradient, HVP and JVP within 1e-6 of central differences; _i a kind as
 * above, every lr / decay form in it. */
START_TEST(test_gradcheck_step) {
  for (int k = 0; k < NCOMBO; k++) gradcheck_combo("step", f_step, _i * NCOMBO + k, 1e-6);
}
END_TEST
START_TEST(test_gradcheck_second_order) {
  for (int k = 0; k < NCOMBO; k++)
    gradcheck_combo("grad through the step", f_grad, _i * NCOMBO + k, 1e-6);
}
END_TEST
START_TEST(test_gradcheck_unroll) {
  for (int k = 0; k < NCOMBO; k++)
    gradcheck_combo("2-step unroll", f_unroll, _i * NCOMBO + k, 1e-6);
}
END_TEST

/* ---------------------------------------------------------------- what it keeps */

/* The step records one node whatever the configuration (the unfused one
 * several); an unrecorded backward through it, seeded directly on w',
 * allocates the wanted cotangents (w, g and a decay shaped like w) and
 * nothing else: at most 3 tensors of w's size plus small records, where
 * the composed rule had full-size temporaries besides. f32, 1573 elements. */
START_TEST(test_keeps_little) {
  combo c = combo_of(4 * NLR + 0); /* lr number, weight_decay_vars like w: the bench's case */
  const int64_t shape[2] = {11, 143};
  ad_tensor *x[4];
  make_inputs(&c, AD_F32, 2, shape, 5, x);
  size_t used[2];
  size_t nodes[2];
  for (int unf = 0; unf < 2; unf++) {
    ad_tape *t = NULL;
    ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 4}), AD_OK);
    nn__opt_set_unfused(unf);
    ad_tensor *seed = NULL;
    ck_assert_int_eq(ad_tensor_new(&seed, AD_F32, 2, shape), AD_OK);
    for (int64_t j = 0; j < seed->size; j++) ad_set(seed, j, 0.5);
    ad_arena_stats s0, s1, s2;
    ad_arena_stats_get(t, &s0);
    ad_tensor *wn = step(t, &c, x), *gr[4];
    ck_assert_ptr_nonnull(wn);
    ad_arena_stats_get(t, &s1);
    ck_assert_int_eq(ad_grad(t, 1, &wn, &seed, c.n, x, gr, 0), AD_OK);
    ad_arena_stats_get(t, &s2);
    nodes[unf] = s1.n_nodes - s0.n_nodes;
    used[unf] = s2.used - s1.used;
    /* the cotangents themselves: dw = s (1 - a D), dg = -a s, dD = -a w s */
    for (int64_t j = 0; j < 5; j++) {
      double wj = ad_get(x[0], j), dj = ad_get(x[2], j);
      ck_assert_double_eq_tol(ad_get(gr[0], j), 0.5 * (1 - 0.3 * dj), 1e-6);
      ck_assert_double_eq_tol(ad_get(gr[1], j), -0.5 * 0.3, 1e-6);
      ck_assert_double_eq_tol(ad_get(gr[2], j), -0.3 * wj * 0.5, 1e-6);
    }
    nn__opt_set_unfused(0);
    ad_tensor_free(seed);
    ad_tape_free(t);
  }
  size_t full = 1573 * sizeof(float);
  fprintf(stderr,
          "step nodes fused %zu unfused %zu; backward bytes fused %zu unfused %zu (w: %zu)\n",
          nodes[0], nodes[1], used[0], used[1], full);
  ck_assert_uint_eq(nodes[0], 1);
  ck_assert_uint_gt(nodes[1], 1);
  ck_assert_uint_le(used[0], 3 * full + 4096);
  ck_assert_uint_gt(used[1], 4 * full);
  free_inputs(c.n, x);
}
END_TEST

/* A variable with w's size but a flat shape is read as w's shape: the same
 * numbers as a w-shaped one, and its gradient keeps its own shape. */
START_TEST(test_flat_variable) {
  combo c = combo_of(3 + 4 * NLR); /* lr_vars like w, weight_decay_vars like w */
  ad_tensor *x[4], *y[4];
  make_inputs(&c, AD_F64, 2, (int64_t[]){4, 3}, 9, x);
  for (int k = 0; k < 4; k++) {
    ck_assert_int_eq(
        ad_tensor_new(&y[k], AD_F64, k >= 2 ? 1 : 2, k >= 2 ? (int64_t[]){12} : x[k]->shape),
        AD_OK);
    for (int64_t j = 0; j < 12; j++) ad_set(y[k], j, ad_get(x[k], j));
    ad_requires_grad(y[k], 1);
  }
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 4}), AD_OK);
  ad_tensor *a = step(t, &c, x), *b = step(t, &c, y), *ga[4], *gb[4];
  ck_assert_ptr_nonnull(a);
  ck_assert_ptr_nonnull(b);
  ad_tensor *La = ad_dot(t, a, a), *Lb = ad_dot(t, b, b);
  ck_assert_int_eq(ad_grad(t, 1, &La, NULL, 4, x, ga, 0), AD_OK);
  ck_assert_int_eq(ad_grad(t, 1, &Lb, NULL, 4, y, gb, 0), AD_OK);
  for (int64_t j = 0; j < 12; j++) {
    ck_assert(ad_get(a, j) == ad_get(b, j));
    for (int k = 0; k < 4; k++) ck_assert(ad_get(ga[k], j) == ad_get(gb[k], j));
  }
  ck_assert_int_eq(gb[2]->ndim, 1);
  ck_assert_int_eq(gb[3]->ndim, 1);
  ad_tape_free(t);
  free_inputs(4, x);
  free_inputs(4, y);
}
END_TEST

/* An unrecorded sweep that sums per-parameter decay's gradient into an
 * accumulator (ad__grad_acc, as bl_unroll sums its hypergradient) gets the
 * part from the fused kernel, added in place: the bits of the gradient
 * alone added after, acc + dD, per element. Every learning-rate form, f32
 * and f64, a size the kernel runs in one part and one it splits (at 2
 * threads). */
START_TEST(test_decay_into_accumulator) {
  static const int64_t shapes[2][2] = {{4, 3}, {300, 240}};
  for (int th = 1; th <= 2; th++) {
    ck_assert_int_eq(ad_set_threads(th), AD_OK);
    for (int lrm = 0; lrm < NLR; lrm++)
      for (int d = 0; d < 2; d++)
        for (int si = 0; si < 2; si++) {
          const ad_dtype dt = d ? AD_F64 : AD_F32;
          combo c = combo_of(lrm + 4 * NLR); /* weight_decay_vars like w */
          ad_tensor *x[4];
          make_inputs(&c, dt, 2, shapes[si], 21 + (uint64_t)lrm, x);
          ad_tape *t = NULL;
          ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 16}), AD_OK);
          ad_rng r;
          ad_rng_seed(&r, 3);
          ad_tensor *acc = ad_randn(t, dt, 2, shapes[si], &r),
                    *acc0 = ad_empty(t, dt, 2, shapes[si]);
          ck_assert_ptr_nonnull(acc0);
          ck_assert_int_eq(ad_copy_values(acc0, acc), AD_OK);
          ad_tensor *a = step(t, &c, x);
          ck_assert_ptr_nonnull(a);
          ad_tensor *L = ad_dot(t, a, a), *D = x[c.id], *gacc = NULL, *g = NULL;
          ck_assert_int_eq(ad__grad_acc(t, 1, &L, NULL, 1, &D, &gacc, 0, 1, &acc), AD_OK);
          ck_assert_ptr_eq(gacc, acc);
          ck_assert_int_eq(ad_grad(t, 1, &L, NULL, 1, &D, &g, 0), AD_OK);
          for (int64_t j = 0; j < acc->size; j++) {
            int same;
            if (d) {
              const double want = AD_D(acc0)[j] + AD_D(g)[j];
              same = memcmp(&AD_D(acc)[j], &want, sizeof want) == 0;
            } else {
              const float want = AD_F(acc0)[j] + AD_F(g)[j];
              same = memcmp(&AD_F(acc)[j], &want, sizeof want) == 0;
            }
            ck_assert_msg(same, "%s %s threads %d size %lld [%lld]: %.17g, want %.17g + %.17g",
                          LR_NAME[lrm], d ? "f64" : "f32", th, (long long)acc->size, (long long)j,
                          ad_get(acc, j), ad_get(acc0, j), ad_get(g, j));
          }
          ad_tape_free(t);
          free_inputs(c.n, x);
        }
  }
  ck_assert_int_eq(ad_set_threads(1), AD_OK);
}
END_TEST

/* ---------------------------------------------------------------- bad input */

static void expect_fail(const nn_opt_cfg *cfg, ad_tensor *w, ad_tensor *g, ad_status want,
                        const char *msg) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 4}), AD_OK);
  ad_tensor *wn = NULL;
  ad_status s = nn_opt_step_diff(t, cfg, NULL, 1, &w, &g, &wn);
  ck_assert_msg(s == want, "status %d, want %d (%s)", (int)s, (int)want, ad_tape_errmsg(t));
  ck_assert_int_eq(ad_tape_status(t), want);
  ck_assert_msg(strstr(ad_tape_errmsg(t), msg) != NULL, "message '%s' lacks '%s'",
                ad_tape_errmsg(t), msg);
  ad_tape_free(t);
}

START_TEST(test_bad_input) {
  ad_tensor *w = NULL, *g = NULL, *g5 = NULL, *v32 = NULL, *v4 = NULL, *vnan = NULL;
  ck_assert_int_eq(ad_tensor_new(&w, AD_F64, 2, (int64_t[]){3, 2}), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&g, AD_F64, 2, (int64_t[]){3, 2}), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&g5, AD_F64, 1, (int64_t[]){5}), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&v32, AD_F32, 2, (int64_t[]){3, 2}), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&v4, AD_F64, 1, (int64_t[]){4}), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&vnan, AD_F64, 0, NULL), AD_OK);
  ad_set(vnan, 0, NAN);
  ad_requires_grad(w, 1);
  nn_opt_cfg c = nn_opt_sgd(0.1);
  c.lr_vars = &v32; /* f32 variable for an f64 parameter */
  expect_fail(&c, w, g, AD_ERR_DTYPE, "hyperparameter variables must be f64");
  c = nn_opt_sgd(0.1);
  c.weight_decay_vars = &v4; /* 4 elements for a [3, 2] parameter */
  expect_fail(&c, w, g, AD_ERR_SHAPE, "weight-decay variable for parameter 0");
  c = nn_opt_sgd(0.1);
  c.weight_decay_var = vnan;
  expect_fail(&c, w, g, AD_ERR_ARG, "weight_decay_var is nan");
  c = nn_opt_sgd(0.1);
  expect_fail(&c, w, g5, AD_ERR_SHAPE, "gradient 0 is");
  expect_fail(&c, w, NULL, AD_ERR_NULL, "parameter or gradient 0 is NULL");
  c.lr = -1;
  expect_fail(&c, w, g, AD_ERR_ARG, "lr = -1");
  ad_tensor *all[] = {w, g, g5, v32, v4, vnan};
  free_inputs(6, all);
}
END_TEST

int main(void) {
  Suite *s = suite_create("fused_step");
  TCase *tc = tcase_create("fused_step");
  tcase_set_timeout(tc, 300);
  tcase_add_loop_test(tc, test_fused_matches_unfused, 0, 14);
  tcase_add_loop_test(tc, test_gradcheck_step, 0, 7);
  tcase_add_loop_test(tc, test_gradcheck_second_order, 0, 7);
  tcase_add_loop_test(tc, test_gradcheck_unroll, 0, 7);
  tcase_add_test(tc, test_keeps_little);
  tcase_add_test(tc, test_flat_variable);
  tcase_add_test(tc, test_decay_into_accumulator);
  tcase_add_test(tc, test_bad_input);
  suite_add_tcase(s, tc);
  return gc_run_suite(s);
}
