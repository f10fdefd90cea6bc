/* teaching — one hypergradient taken apart, term by term, on a problem small
 * enough to solve by hand: ridge regression with one weight w and one
 * hyperparameter lam (the weight decay).
 *
 *   L_train(w, lam) = 1/(2n) sum_i (x_i w - y_i)^2 + lam/2 w^2
 *   L_val(w, lam)   = 1/(2m) sum_j (u_j w - v_j)^2 + c/2 lam^2
 *
 * (the small price c/2 lam^2 on the decay is there so that the direct term of
 * the hypergradient is not zero). Every term of the implicit-function-theorem
 * hypergradient is computed with the tape (gradients, a Hessian-vector product
 * and a mixed partial, each recorded) and printed beside its closed form; the
 * tape that computed the hypergradient is written as Graphviz DOT (and drawn
 * to PNG when `dot` is installed); and every bl_ method of bilevel/bl.h is then
 * run on the same problem against the same closed form.
 *
 *     ./build/examples/teaching
 *     ./build/examples/teaching --lambda 2 --dot /tmp/hg.dot
 *
 * Ends with one line:
 *   summary: max_abs_error=E hypergradient=H ...
 * (E: the largest gap between a tape term and its closed form, all in f64). */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, popen */
#include "example_util.h"
#include "hypertape.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { N = 20, M = 20 };

typedef struct {
  double x[N], y[N], u[M], v[M];
  double c; /* price on lam in L_val */
} ridge1;

/* 1/(2k) sum (x w - y)^2 with x, y as [k] constants and w of shape [1]. */
static ad_tensor *half_mse(ad_tape *t, ad_tensor *w, const double *x, const double *y, int k) {
  ad_tensor *X = ad_const(t, AD_F64, 1, (int64_t[]){k}, x);
  ad_tensor *Y = ad_const(t, AD_F64, 1, (int64_t[]){k}, y);
  ad_tensor *r = ad_sub(t, ad_mul(t, X, w), Y); /* w [1] broadcasts over the k rows */
  return ad_scale(t, ad_dot(t, r, r), 0.5 / k);
}

static ad_tensor *train_loss(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                             void *ctx) {
  (void)step;
  const ridge1 *d = ctx;
  ad_tensor *decay = ad_scale(t, ad_mul(t, lam[0], ad_mul(t, w[0], w[0])), 0.5);
  return ad_add(t, half_mse(t, w[0], d->x, d->y, N), ad_sum(t, decay));
}

static ad_tensor *val_loss(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                           void *ctx) {
  (void)step;
  const ridge1 *d = ctx;
  ad_tensor *price = ad_scale(t, ad_sum(t, ad_mul(t, lam[0], lam[0])), 0.5 * d->c);
  return ad_add(t, half_mse(t, w[0], d->u, d->v, M), price);
}

/* The closed forms, with a = mean x^2, b = mean x y, p = mean u^2, q = mean u v:
 *   w*(lam) = b / (a + lam)                      (d L_train/dw = (a + lam) w - b = 0)
 *   H = d^2 L_train/dw^2 = a + lam,  mixed = d^2 L_train/dlam dw = w
 *   d L_val/dw = p w - q,            d L_val/dlam|_w = c lam
 *   dw* /dlam = -H^-1 mixed = -w* /(a + lam)
 *   dL_val/dlam = c lam + (p w* - q) dw* /dlam */
typedef struct {
  double a, b, p, q;
} moments;

static moments moments_of(const ridge1 *d) {
  moments m = {0};
  for (int i = 0; i < N; i++) m.a += d->x[i] * d->x[i] / N, m.b += d->x[i] * d->y[i] / N;
  for (int j = 0; j < M; j++) m.p += d->u[j] * d->u[j] / M, m.q += d->u[j] * d->v[j] / M;
  return m;
}

enum { T_DIRECT, T_PARAM, T_HESS, T_HINV, T_MIXED, T_BRJ, T_HG, N_TERMS };
static const struct {
  const char *name, *formula, *closed;
} TERMS[N_TERMS] = {
    {"direct gradient", "dL_val/dlam |_w", "c lam"},
    {"parameter gradient", "dL_val/dw", "p w* - q"},
    {"Hessian", "H = d2L_train/dw2", "a + lam"},
    {"inverse Hessian", "H^-1", "1 / (a + lam)"},
    {"mixed partial", "d2L_train/dlam dw", "w*"},
    {"best-response Jacobian", "dw*/dlam = -H^-1 mixed", "-w* / (a + lam)"},
    {"hypergradient", "direct + dL_val/dw dw*/dlam", "c lam - (p w* - q) w*/(a + lam)"},
};

/* Records every term on the tape at (w, lam), the hypergradient last, so
 * that the tape holds exactly the computation the DOT file shows. */
static int tape_terms(ad_tape *t, ad_tensor *w, ad_tensor *lam, const ridge1 *d, double *out) {
  ad_tensor *W[1] = {w}, *LAM[1] = {lam}, *wl[2] = {w, lam}, *g[2];
  ad_tensor *lv = val_loss(t, W, LAM, -1, (void *)d);
  ad_set_name(lv, "L_val");
  /* One reverse sweep gives both first derivatives of L_val; recorded, so
   * they stay on the tape as nodes the hypergradient is built from. */
  if (!lv || ad_grad(t, 1, &lv, NULL, 2, wl, g, AD_GRAD_RECORD)) return -1;
  ad_tensor *direct = g[1], *gw = g[0];
  ad_tensor *lt = train_loss(t, W, LAM, 0, (void *)d), *one = ad_ones_like(t, w), *h, *mix;
  ad_set_name(lt, "L_train");
  /* H v with v = 1 is H itself for one weight; the mixed partial
   * d/dlam (dL_train/dw . v) likewise. */
  if (!lt || ad_hvp(t, lt, 1, W, &one, &h, AD_GRAD_RECORD) ||
      ad_mixed_partial(t, lt, 1, W, &one, 1, LAM, &mix, AD_GRAD_RECORD))
    return -1;
  ad_tensor *hinv = ad_div(t, one, h);
  ad_tensor *brj = ad_neg(t, ad_mul(t, hinv, mix));
  ad_tensor *hg = ad_add(t, direct, ad_mul(t, gw, brj));
  const char *names[N_TERMS] = {"direct",   "dL_val/dw",    "H", "H^-1", "mixed",
                                "dw*/dlam", "hypergradient"};
  ad_tensor *terms[N_TERMS] = {direct, gw, h, hinv, mix, brj, hg};
  if (ad_tape_status(t)) return -1;
  for (int k = 0; k < N_TERMS; k++) {
    ad_set_name(terms[k], names[k]);
    out[k] = ad_item(terms[k]);
  }
  return 0;
}

static const struct {
  const char *name;
  bl_method_fn fn;
  bl_opts o;
} METHODS[] = {
    {"exact", bl_exact, {0}},
    {"cg", bl_cg, {0}},
    {"cg gauss_newton", bl_cg, {.gauss_newton = 1}},
    {"neumann K=20", bl_neumann, {.K = 20}},
    {"fixed_point", bl_fixed_point, {0}},
    {"hoag", bl_hoag, {0}},
    {"unroll", bl_unroll, {0}},
    {"unroll K=5", bl_unroll, {.K = 5}},
    {"forward", bl_forward, {0}},
    {"checkpointed", bl_checkpointed, {0}},
    {"drmad", bl_drmad, {0}},
    {"fo", bl_fo, {0}},
    {"one_step", bl_one_step, {0}},
    {"t1t2", bl_t1t2, {0}},
    {"t1t2 darts_fd", bl_t1t2, {.darts_fd = 1}},
    {"greedy", bl_greedy, {0}},
    {"hyperdistill", bl_hyperdistill, {0}},
    {"zero_order N=16", bl_zero_order, {.samples = 16, .antithetic = 1, .seed = 1}},
    {"sama", bl_sama, {0}},
};
enum { N_METHODS = sizeof METHODS / sizeof METHODS[0] };

/* Gauss-Newton split: f = x w, l(f) = 1/(2n) ||f - y||^2, R = lam/2 w^2. */
static ad_tensor *gn_out(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                         void *ctx) {
  (void)lam, (void)step;
  return ad_mul(t, ad_const(t, AD_F64, 1, (int64_t[]){N}, ((const ridge1 *)ctx)->x), w[0]);
}
static ad_tensor *gn_loss(ad_tape *t, ad_tensor *f, ad_tensor *const *lam, int64_t step,
                          void *ctx) {
  (void)lam, (void)step;
  ad_tensor *r = ad_sub(t, f, ad_const(t, AD_F64, 1, (int64_t[]){N}, ((const ridge1 *)ctx)->y));
  return ad_scale(t, ad_dot(t, r, r), 0.5 / N);
}
static ad_tensor *gn_reg(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                         void *ctx) {
  (void)step, (void)ctx;
  return ad_sum(t, ad_scale(t, ad_mul(t, lam[0], ad_mul(t, w[0], w[0])), 0.5));
}

/* x.dot -> x.png with graphviz when it is installed (any other name gets
 * .png appended). */
static void draw_png(const char *dot_path) {
  if (system("command -v dot >/dev/null 2>&1") == 0) {
    /* x.dot -> x.png; any other name gets .png appended. */
    char png[2048], cmd[4200];
    size_t len = strlen(dot_path);
    int strip = len > 4 && !strcmp(dot_path + len - 4, ".dot");
    snprintf(png, sizeof png, "%.*s.png", (int)(strip ? len - 4 : len), dot_path);
    snprintf(cmd, sizeof cmd, "dot -Tpng -o '%s' '%s'", png, dot_path);
    printf("  %s: %s\n", cmd, system(cmd) == 0 ? "drawn" : "failed");
  } else {
    printf("  (install graphviz to draw it: dot -Tpng -o tape.png %s)\n", dot_path);
  }
}

int main(int argc, char **argv) {
  const char *dot_path = "/tmp/teaching.dot", *log_path = "/tmp/teaching.jsonl";
  const char *method_dot = "/tmp/teaching_one_step.dot";
  double lam0 = 0.5;
  int steps = 100, wengert = 0;
  uint64_t seed = 1;
  const ex_opt opts[] = {
      {"--lambda", EX_DOUBLE, &lam0, "L",
       .help = "the weight decay at which the hypergradient is taken", .max = 1e6},
      {"--steps", EX_INT, &steps, "T", .help = "inner gradient-descent steps of the bl_ methods",
       .min = 1, .max = 1000000},
      {"--seed", EX_U64, &seed, "S", .help = "the data"},
      {"--method-dot", EX_STR, &method_dot, "FILE",
       .help = "Graphviz DOT of what bl_one_step records on this problem (bl_opts.keep_tape), "
               "drawn like --dot"},
      {"--dot", EX_STR, &dot_path, "FILE",
       .help = "Graphviz DOT of the hypergradient's tape, drawn to FILE with .dot replaced by "
               ".png when `dot` is installed"},
      {"--log", EX_STR, &log_path, "FILE", .help = "JSON lines: one per term, one per method"},
      {"--wengert", EX_FLAG, &wengert, NULL, .help = "also print the tape as a Wengert list"},
      {0}};
  ex_parse_args(argc, argv,
                "one hypergradient taken apart term by term, each beside its closed form, its "
                "tape drawn, and every bl_ method on the same problem",
                opts);
  /* The PNG is drawn through the shell: keep the name out of its quoting. */
  if (strchr(dot_path, '\''))
    ex_usage_error("--dot: a file name with a single quote is not supported");
  if (strchr(method_dot, '\''))
    ex_usage_error("--method-dot: a file name with a single quote is not supported");
  /* Data: y = 2x + noise for training, the same law for validation. */
  static ridge1 d;
  d.c = 0.1;
  ad_rng rng;
  ad_rng_seed(&rng, seed);
  for (int i = 0; i < N; i++)
    d.x[i] = ad_rng_normal(&rng), d.y[i] = 2 * d.x[i] + ad_rng_normal(&rng);
  for (int j = 0; j < M; j++)
    d.u[j] = ad_rng_normal(&rng), d.v[j] = 2 * d.u[j] + ad_rng_normal(&rng);
  moments mo = moments_of(&d);
  const double ws = mo.b / (mo.a + lam0);
  double closed[N_TERMS];
  closed[T_DIRECT] = d.c * lam0;
  closed[T_PARAM] = mo.p * ws - mo.q;
  closed[T_HESS] = mo.a + lam0;
  closed[T_HINV] = 1 / (mo.a + lam0);
  closed[T_MIXED] = ws;
  closed[T_BRJ] = -ws / (mo.a + lam0);
  closed[T_HG] = closed[T_DIRECT] + closed[T_PARAM] * closed[T_BRJ];

  printf("The problem: one weight w, one hyperparameter lam (a weight decay), %d training and "
         "%d validation points (x, y), y = 2x + noise.\n"
         "  L_train(w, lam) = 1/(2n) sum_i (x_i w - y_i)^2 + lam/2 w^2\n"
         "  L_val(w, lam)   = 1/(2m) sum_j (u_j w - v_j)^2 + c/2 lam^2\n"
         "Write a = mean x^2, b = mean x y (training) and p = mean u^2, q = mean u v "
         "(validation). Then\n"
         "  w*(lam) = b / (a + lam)            (where dL_train/dw = (a + lam) w - b is zero)\n"
         "and the hypergradient, by the chain rule through w*(lam):\n"
         "  dL_val/dlam = dL_val/dlam|_w + dL_val/dw * dw*/dlam,\n"
         "  dw*/dlam = -H^-1 d2L_train/dlam dw     (implicit function theorem).\n\n"
         "The numbers: a = %.6f, b = %.6f, p = %.6f, q = %.6f, c = %g, lam = %g, w* = %.10f\n\n",
         N, M, mo.a, mo.b, mo.p, mo.q, d.c, lam0, ws);

  /* Every term on the tape, at w = w*(lam). */
  ad_tape *tape = NULL;
  ad_tensor *w = NULL, *lam = NULL, *w0 = NULL, *hgt = NULL;
  if (ad_tape_new(&tape, NULL) || ad_tensor_new(&w, AD_F64, 1, (int64_t[]){1}) ||
      ad_tensor_new(&lam, AD_F64, 1, (int64_t[]){1}) ||
      ad_tensor_new(&w0, AD_F64, 1, (int64_t[]){1}) ||
      ad_tensor_new(&hgt, AD_F64, 1, (int64_t[]){1})) {
    fprintf(stderr, "teaching: %s\n", ad_last_error());
    return 1;
  }
  ad_set(w, 0, ws);
  ad_set(lam, 0, lam0);
  ad_requires_grad(w, 1);
  ad_requires_grad(lam, 1);
  ad_set_name(w, "w");
  ad_set_name(lam, "lam");
  double tape_v[N_TERMS];
  if (tape_terms(tape, w, lam, &d, tape_v)) {
    fprintf(stderr, "teaching: %s\n", ad_tape_errmsg(tape));
    return 1;
  }
  FILE *log = fopen(log_path, "w");
  if (!log) {
    fprintf(stderr, "teaching: cannot write the log %s\n", log_path);
    return 1;
  }
  printf("Each term from the tape, beside its closed form (f64):\n");
  printf("  %-24s %-28s %-32s %19s %19s %9s\n", "term", "what", "formula", "tape", "closed form",
         "|gap|");
  double max_err = 0;
  for (int k = 0; k < N_TERMS; k++) {
    double gap = fabs(tape_v[k] - closed[k]);
    if (!(gap <= max_err)) max_err = gap; /* a NaN gap is the largest */
    printf("  %d %-22s %-28s %-32s %19.15f %19.15f %9.1e\n", k + 1, TERMS[k].name, TERMS[k].formula,
           TERMS[k].closed, tape_v[k], closed[k], gap);
    fprintf(log,
            "{\"kind\": \"term\", \"term\": \"%s\", \"tape\": %.17g, \"closed_form\": %.17g, "
            "\"abs_error\": %.3g}\n",
            TERMS[k].name, tape_v[k], closed[k], gap);
  }
  printf("  (H and the mixed partial are ad_hvp and ad_mixed_partial with v = 1; the first "
         "derivatives one recorded ad_grad)\n\n");

  /* The tape that computed it: as DOT, and drawn when graphviz is here. */
  FILE *df = fopen(dot_path, "w");
  ad_arena_stats as;
  ad_arena_stats_get(tape, &as);
  if (!df || ad_tape_dot(tape, df)) {
    fprintf(stderr, "teaching: cannot write %s\n", dot_path);
    return 1;
  }
  fclose(df);
  printf("The tape of the hypergradient: %zu nodes (forward losses, their recorded backward "
         "passes, and the products above), written to %s\n",
         as.n_nodes, dot_path);
  draw_png(dot_path);
  if (wengert) ad_tape_print(tape, stdout);
  ad_tape_reset(tape);

  /* The method table: the same hypergradient by every method of bl.h,
   * each from w0 = 0 through `steps` inner GD steps (lr 0.5). */
  printf("\nThe same hypergradient by every method of bilevel/bl.h (inner: %d GD steps, lr 0.5, "
         "from w = 0), against the closed form %.15f:\n",
         steps, closed[T_HG]);
  printf("  %-22s %19s %9s %9s %6s\n", "method", "hypergradient", "|error|", "seconds", "HVPs");
  bl_problem p = {.n_w = 1,
                  .w0 = &w0,
                  .n_lam = 1,
                  .lam = &lam,
                  .train_loss = train_loss,
                  .val_loss = val_loss,
                  .ctx = &d,
                  .opt = {.kind = NN_OPT_SGD, .lr = 0.5},
                  .inner_steps = steps,
                  .train_output = gn_out,
                  .train_out_loss = gn_loss,
                  .train_reg = gn_reg};
  double worst_exact = 0;
  for (int k = 0; k < N_METHODS; k++) {
    bl_stats st = {0};
    if (METHODS[k].fn(tape, &p, &METHODS[k].o, &hgt, &st) != AD_OK) {
      printf("  %-22s failed: %s\n", METHODS[k].name, ad_tape_errmsg(tape));
      ad_tape_clear_error(tape);
      continue;
    }
    double h = ad_item(hgt), e = fabs(h - closed[T_HG]);
    if (k == 0) worst_exact = e;
    printf("  %-22s %19.15f %9.1e %9.5f %6lld\n", METHODS[k].name, h, e, st.seconds,
           (long long)st.hvps);
    fprintf(log,
            "{\"kind\": \"method\", \"method\": \"%s\", \"hypergradient\": %.17g, "
            "\"abs_error\": %.3g, \"seconds\": %.6f, \"hvps\": %lld}\n",
            METHODS[k].name, h, e, st.seconds, (long long)st.hvps);
  }
  fclose(log);

  /* What a real method records: bl_one_step with keep_tape leaves its inner
   * run and the last step's derivative on the tape, to be drawn. Two inner
   * steps, so the drawing stays readable. */
  ad_marker before = ad_mark(tape);
  bl_opts keep = {.keep_tape = 1};
  bl_problem p2 = p;
  p2.inner_steps = 2;
  FILE *mf = NULL;
  if (bl_one_step(tape, &p2, &keep, &hgt, NULL) != AD_OK || !(mf = fopen(method_dot, "w")) ||
      ad_tape_dot_ex(tape, mf,
                     &(ad_dot_opts){.title = "what bl_one_step records", .n_outputs = 0})) {
    fprintf(stderr, "teaching: cannot draw bl_one_step's tape to %s: %s\n", method_dot,
            ad_tape_errmsg(tape));
    if (mf) fclose(mf);
    return 1;
  }
  fclose(mf);
  ad_arena_stats ms;
  ad_arena_stats_get(tape, &ms);
  printf("\nbl_one_step's own tape at T = 2 (%zu nodes, kept with bl_opts.keep_tape) written to "
         "%s\n",
         ms.n_nodes, method_dot);
  draw_png(method_dot);
  ad_rewind(tape, before);
  printf("\nReading the table: the implicit methods (exact, cg, neumann, fixed_point, hoag) and "
         "the\nunrolled ones (unroll, forward, checkpointed) agree with the closed form to "
         "rounding, because\nthe inner run has converged; fo keeps only the direct term; "
         "one_step, t1t2, greedy and\nhyperdistill are short-horizon approximations; drmad "
         "reverses along a straight line;\nzero_order and sama estimate without inner "
         "derivatives.\n");
  printf("summary: max_abs_error=%.2e hypergradient=%.12f closed_form=%.12f exact_method_error="
         "%.2e dot=%s log=%s\n",
         max_err, tape_v[T_HG], closed[T_HG], worst_exact, dot_path, log_path);
  ad_tensor_free(w);
  ad_tensor_free(lam);
  ad_tensor_free(w0);
  ad_tensor_free(hgt);
  ad_tape_free(tape);
  return max_err <= 1e-10 ? 0 : 1;
}
