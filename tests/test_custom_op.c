#define _POSIX_C_SOURCE 200809L /* open_memstream */
/* test_custom_op.c — user ops (ad_custom, ad.h "user ops"):
 *   - a smooth |x| = sqrt(x^2 + eps) with a loop forward and a rule made of
 *     public ops: gradient, HVP (ad_hvp) and JVP against central
 *     differences (gc_check, f64, 1e-6), values and gradients equal to the
 *     same function built from library ops, and the Hessian's closed form;
 *   - a fused layer y = tanh(x W^T + b) with its own shape, loop forward and
 *     rule: gc_check over (x, W, b), equality with the composite layer, and
 *     ad_hvp of a loss through it against differences of gradients;
 *   - an allreduce-shaped op (one input, same shape, forward calling
 *     arbitrary user code through a kept context, rule = the op itself):
 *     first and second order through it;
 *   - printing shows the user's name and attributes;
 *   - bad definitions and bad rules give errors naming the op.
 * Each assertion states its bound beside it. */
#include "autodiff/ad.h"
#include "gradcheck.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static ad_tape *new_tape(void) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 8, .arena_max_mb = 64}), AD_OK);
  return t;
}

/* ---------------------------------------------------------------- smooth |x| */

static ad_status sabs_fwd(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out,
                          const void *attrs) {
  (void)t, (void)n;
  double eps = *(const double *)attrs;
  for (int64_t i = 0; i < out->size; i++) {
    double x = ad_get(in[0], i);
    ad_set(out, i, sqrt(x * x + eps));
  }
  return AD_OK;
}
/* d/dx sqrt(x^2 + eps) = x / y: one recorded div and mul, so the next
 * derivative sees d(x/y)/dx = 1/y - x^2/y^3 = eps / y^3 through y's node. */
static ad_status sabs_vjp(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out, ad_tensor *g,
                          const int *need, ad_tensor **gin, const void *attrs) {
  (void)n, (void)need, (void)attrs;
  gin[0] = ad_mul(t, g, ad_div(t, in[0], out));
  return ad_tape_status(t);
}
static void sabs_describe(const void *attrs, char *buf, size_t len) {
  snprintf(buf, len, "eps=%g", *(const double *)attrs);
}
static const ad_custom_op SABS = {
    .name = "smooth_abs", .forward = sabs_fwd, .vjp = sabs_vjp, .describe = sabs_describe};

static ad_tensor *f_sabs(ad_tape *t, ad_tensor *const *in, void *ctx) {
  double eps = *(const double *)ctx; /* a stack copy: ad_custom keeps its own */
  return ad_custom(t, &SABS, 1, in, &eps, sizeof eps);
}
static ad_tensor *f_sabs_composite(ad_tape *t, ad_tensor *const *in, void *ctx) {
  return ad_sqrt(t, ad_add_scalar(t, ad_mul(t, in[0], in[0]), *(const double *)ctx));
}

START_TEST(test_smooth_abs) {
  /* gc_check (gradient, ad_hvp, ad_jvp vs central differences): worst
   * error <= 1e-6 (|a - n| / (1 + |n|)), with x spread across the kink
   * (eps = 0.05 keeps the curvature finite). Against the same function made
   * of library ops: values and gradients to 1e-14; the diagonal Hessian
   * against its closed form eps / y^3 to 1e-12 relative. */
  ad_rng r;
  ad_rng_seed(&r, 3);
  ad_tensor *x = gc_leaf(2, (int64_t[]){3, 5}, &r, 0, 0);
  double eps = 0.05;
  char rep[512];
  double worst = gc_check("smooth_abs", f_sabs, 1, &x, &eps, (gc_opts){0}, rep, sizeof rep);
  printf("%s (bound 1e-6)\n", rep);
  ck_assert(worst <= 1e-6);

  ad_tape *t = new_tape();
  ad_tensor *y = f_sabs(t, &x, &eps), *yc = f_sabs_composite(t, &x, &eps);
  ck_assert_ptr_nonnull(y);
  ad_tensor *s = ad_sum(t, y), *sc = ad_sum(t, yc), *g = NULL, *gc = NULL;
  ck_assert_int_eq(ad_grad(t, 1, &s, NULL, 1, &x, &g, 0), AD_OK);
  ck_assert_int_eq(ad_grad(t, 1, &sc, NULL, 1, &x, &gc, 0), AD_OK);
  double ev = gc_rel_err(1, &y, &yc), eg = gc_rel_err(1, &g, &gc);
  /* H = diag(eps / y^3): ad_hvp with v = ones gives the diagonal. */
  ad_tensor *v = ad_ones_like(t, x), *hv = NULL, *ex = ad_empty(t, AD_F64, 2, x->shape);
  ck_assert_int_eq(ad_hvp(t, s, 1, &x, &v, &hv, 0), AD_OK);
  for (int64_t i = 0; i < x->size; i++) ad_set(ex, i, eps / pow(ad_get(y, i), 3));
  double eh = gc_rel_err(1, &hv, &ex);
  printf("smooth_abs vs library ops: values %.2e, gradient %.2e (bound 1e-14); Hessian vs "
         "eps/y^3 %.2e (bound 1e-12)\n",
         ev, eg, eh);
  ck_assert(ev <= 1e-14 && eg <= 1e-14);
  ck_assert(eh <= 1e-12);
  ad_tape_free(t);
  ad_tensor_free(x);
}
END_TEST

/* ---------------------------------------------------------------- fused layer */
/* y = tanh(x W^T + b), x [N, I], W [O, I], b [O] -> y [N, O]. */

static ad_status layer_shape(ad_tape *t, int n, ad_tensor *const *in, const void *attrs, int *ndim,
                             int64_t *shape) {
  (void)attrs;
  ad_tensor *x = in[0], *W = n > 1 ? in[1] : NULL, *b = n > 2 ? in[2] : NULL;
  if (n != 3 || x->ndim != 2 || W->ndim != 2 || b->ndim != 1 || W->shape[1] != x->shape[1] ||
      b->shape[0] != W->shape[0]) {
    char a[96], c[96];
    return ad_custom_fail(t, AD_ERR_SHAPE, "tanh_layer: x %s and W %s do not fit",
                          ad_shape_str(x, a, sizeof a), W ? ad_shape_str(W, c, sizeof c) : "-");
  }
  *ndim = 2;
  shape[0] = x->shape[0];
  shape[1] = W->shape[0];
  return AD_OK;
}
static ad_status layer_fwd(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out,
                           const void *attrs) {
  (void)t, (void)n, (void)attrs;
  const double *x = in[0]->data, *W = in[1]->data, *b = in[2]->data;
  double *y = out->data;
  int64_t N = in[0]->shape[0], I = in[0]->shape[1], O = in[1]->shape[0];
  for (int64_t i = 0; i < N; i++)
    for (int64_t o = 0; o < O; o++) {
      double z = b[o];
      for (int64_t k = 0; k < I; k++) z += x[i * I + k] * W[o * I + k];
      y[i * O + o] = tanh(z);
    }
  return AD_OK;
}
/* With d = g (1 - y^2):  dx = d W,  dW = d^T x,  db = sum_rows d. */
static ad_status layer_vjp(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out, ad_tensor *g,
                           const int *need, ad_tensor **gin, const void *attrs) {
  (void)n, (void)attrs;
  ad_tensor *d = ad_mul(t, g, ad_add_scalar(t, ad_neg(t, ad_mul(t, out, out)), 1.0));
  if (need[0]) gin[0] = ad_matmul(t, d, in[1], 0, 0);
  if (need[1]) gin[1] = ad_matmul(t, d, in[0], 1, 0);
  if (need[2]) gin[2] = ad_sum_axis(t, d, 0, 0);
  return ad_tape_status(t);
}
static const ad_custom_op LAYER = {
    .name = "tanh_layer", .forward = layer_fwd, .vjp = layer_vjp, .shape = layer_shape};

static ad_tensor *f_layer(ad_tape *t, ad_tensor *const *in, void *ctx) {
  (void)ctx;
  return ad_custom(t, &LAYER, 3, in, NULL, 0);
}
static ad_tensor *f_layer_composite(ad_tape *t, ad_tensor *const *in, void *ctx) {
  (void)ctx;
  return ad_tanh(t, ad_add_rowvec(t, ad_matmul(t, in[0], in[1], 0, 1), in[2]));
}
/* A scalar loss through the layer: sum(y^2) / 2. */
static ad_tensor *loss_through(ad_tape *t, ad_tensor *const *in, int composite) {
  ad_tensor *y = composite ? f_layer_composite(t, in, NULL) : f_layer(t, in, NULL);
  return ad_scale(t, ad_dot(t, y, y), 0.5);
}

START_TEST(test_fused_layer) {
  /* gc_check over (x [4,3], W [5,3], b [5]): gradient, HVP, JVP <= 1e-6.
   * Against the composite layer: values, gradients and ad_hvp to 1e-13
   * relative. ad_hvp of sum(y^2)/2 against central differences of its
   * gradient (step 1e-5) along v: 1e-6 relative. */
  ad_rng r;
  ad_rng_seed(&r, 11);
  ad_tensor *in[3] = {gc_leaf(2, (int64_t[]){4, 3}, &r, 0, 0),
                      gc_leaf(2, (int64_t[]){5, 3}, &r, 0, 0),
                      gc_leaf(1, (int64_t[]){5}, &r, 0, 0)};
  for (int k = 0; k < 3; k++)
    for (int64_t i = 0; i < in[k]->size; i++) ad_set(in[k], i, 0.6 * ad_get(in[k], i));
  char rep[512];
  double worst = gc_check("tanh_layer", f_layer, 3, in, NULL, (gc_opts){0}, rep, sizeof rep);
  printf("%s (bound 1e-6)\n", rep);
  ck_assert(worst <= 1e-6);

  ad_tape *t = new_tape();
  ad_tensor *y = f_layer(t, in, NULL), *yc = f_layer_composite(t, in, NULL);
  ck_assert_msg(y != NULL, "%s", ad_tape_errmsg(t));
  double ev = gc_rel_err(1, &y, &yc);
  ad_tensor *L = loss_through(t, in, 0), *Lc = loss_through(t, in, 1);
  ad_tensor *g[3], *gc[3], *v[3], *hv[3], *hvc[3], *fd[3];
  ck_assert_int_eq(ad_grad(t, 1, &L, NULL, 3, in, g, 0), AD_OK);
  ck_assert_int_eq(ad_grad(t, 1, &Lc, NULL, 3, in, gc, 0), AD_OK);
  for (int k = 0; k < 3; k++) {
    v[k] = ad_randn(t, AD_F64, in[k]->ndim, in[k]->shape, &r);
    fd[k] = ad_empty(t, AD_F64, in[k]->ndim, in[k]->shape);
  }
  ck_assert_int_eq(ad_hvp(t, L, 3, in, v, hv, 0), AD_OK);
  ck_assert_int_eq(ad_hvp(t, Lc, 3, in, v, hvc, 0), AD_OK);
  double eg = gc_rel_err(3, g, gc), eh = gc_rel_err(3, hv, hvc);
  /* differences of gradients along v */
  double h = 1e-5;
  for (int sign = 1; sign >= -1; sign -= 2) {
    ad_marker m = ad_mark(t);
    for (int k = 0; k < 3; k++)
      for (int64_t i = 0; i < in[k]->size; i++)
        ad_set(in[k], i, ad_get(in[k], i) + sign * h * ad_get(v[k], i));
    ad_tensor *Ls = loss_through(t, in, 0), *gs[3];
    ck_assert_int_eq(ad_grad(t, 1, &Ls, NULL, 3, in, gs, 0), AD_OK);
    for (int k = 0; k < 3; k++)
      for (int64_t i = 0; i < in[k]->size; i++) {
        ad_set(fd[k], i, ad_get(fd[k], i) * (sign < 0) + sign * ad_get(gs[k], i) / (2 * h));
        ad_set(in[k], i, ad_get(in[k], i) - sign * h * ad_get(v[k], i));
      }
    ad_rewind(t, m);
  }
  double efd = gc_rel_err(3, hv, fd);
  printf("tanh_layer vs composite: values %.2e, gradients %.2e, hvp %.2e (bound 1e-13); "
         "ad_hvp vs differences of gradients %.2e (bound 1e-6)\n",
         ev, eg, eh, efd);
  ck_assert(ev <= 1e-13 && eg <= 1e-13 && eh <= 1e-13);
  ck_assert(efd <= 1e-6);
  ad_tape_free(t);
  for (int k = 0; k < 3; k++) ad_tensor_free(in[k]);
}
END_TEST

/* ---------------------------------------------------------------- allreduce-shaped op */
/* Stands in for an MPI allreduce over `ranks` processes that all hold the
 * same values: out = ranks * x, done by "library code" the op only calls
 * through a context pointer it keeps (attrs_size 0). Its adjoint is the same
 * allreduce of the cotangent, so the rule applies the op itself. */
typedef struct {
  int ranks;
  int calls; /* forward calls, to see the user code run */
  void (*reduce)(const double *src, double *dst, int64_t n, int ranks);
} fake_comm;

static void fake_reduce(const double *src, double *dst, int64_t n, int ranks) {
  for (int64_t i = 0; i < n; i++) {
    double s = 0;
    for (int k = 0; k < ranks; k++) s += src[i]; /* every rank sends the same */
    dst[i] = s;
  }
}
static ad_status ar_fwd(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out,
                        const void *attrs) {
  (void)t, (void)n;
  fake_comm *c = (fake_comm *)attrs; /* the kept pointer: the user's own object */
  c->calls++;
  c->reduce(in[0]->data, out->data, out->size, c->ranks);
  return AD_OK;
}
static const ad_custom_op ALLREDUCE;
static ad_status ar_vjp(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out, ad_tensor *g,
                        const int *need, ad_tensor **gin, const void *attrs) {
  (void)n, (void)in, (void)out, (void)need;
  gin[0] = ad_custom(t, &ALLREDUCE, 1, &g, attrs, 0);
  return ad_tape_status(t);
}
static const ad_custom_op ALLREDUCE = {.name = "allreduce_sum", .forward = ar_fwd, .vjp = ar_vjp};

static ad_tensor *f_allreduce(ad_tape *t, ad_tensor *const *in, void *ctx) {
  /* tanh(allreduce(x)) * x: curvature on both sides of the op */
  ad_tensor *y = ad_custom(t, &ALLREDUCE, 1, in, ctx, 0);
  return ad_mul(t, ad_tanh(t, ad_scale(t, y, 0.3)), in[0]);
}

START_TEST(test_allreduce_shaped_op) {
  /* gc_check through the op (gradient, HVP, JVP) <= 1e-6 with 3 fake
   * ranks; the user code ran (calls > 0), including inside the recorded
   * rule; the gradient of sum(allreduce(x)) is ranks * 1 exactly. */
  ad_rng r;
  ad_rng_seed(&r, 5);
  ad_tensor *x = gc_leaf(1, (int64_t[]){7}, &r, 0, 0);
  fake_comm c = {.ranks = 3, .reduce = fake_reduce};
  char rep[512];
  double worst = gc_check("allreduce_sum", f_allreduce, 1, &x, &c, (gc_opts){0}, rep, sizeof rep);
  printf("%s (bound 1e-6), %d forward calls\n", rep, c.calls);
  ck_assert(worst <= 1e-6);
  ck_assert_int_gt(c.calls, 0);
  ad_tape *t = new_tape();
  ad_tensor *s = ad_sum(t, ad_custom(t, &ALLREDUCE, 1, &x, &c, 0)), *g = NULL;
  int before = c.calls;
  ck_assert_int_eq(ad_grad(t, 1, &s, NULL, 1, &x, &g, AD_GRAD_RECORD), AD_OK);
  ck_assert_int_eq(c.calls, before + 1); /* the rule ran the user code once */
  for (int64_t i = 0; i < x->size; i++) ck_assert(ad_get(g, i) == 3.0);
  ad_tape_free(t);
  ad_tensor_free(x);
}
END_TEST

/* ---------------------------------------------------------------- printing */

START_TEST(test_print_shows_name) {
  /* The Wengert list has "smooth_abs(" with "eps=0.25", the DOT output
   * the name in a node label; a rewind frees the record (nodes back to 0). */
  ad_tape *t = new_tape();
  ad_tensor *x = ad_full(t, AD_F64, 1, (int64_t[]){3}, 0.5);
  ad_requires_grad(x, 1);
  double eps = 0.25;
  ad_marker m = ad_mark(t);
  ad_tensor *y = ad_custom(t, &SABS, 1, &x, &eps, sizeof eps);
  ck_assert_ptr_nonnull(y);
  ck_assert_double_eq_tol(ad_get(y, 1), sqrt(0.25 + 0.25), 1e-15);
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  ck_assert_int_eq(ad_tape_print(t, f), AD_OK);
  fclose(f);
  printf("%s", buf);
  ck_assert_ptr_nonnull(strstr(buf, "smooth_abs("));
  ck_assert_ptr_nonnull(strstr(buf, "eps=0.25"));
  free(buf);
  f = open_memstream(&buf, &len);
  ck_assert_int_eq(ad_tape_dot(t, f), AD_OK);
  fclose(f);
  ck_assert_ptr_nonnull(strstr(buf, "= smooth_abs\\n"));
  free(buf);
  ad_rewind(t, m);
  ad_arena_stats as;
  ad_arena_stats_get(t, &as);
  ck_assert_int_eq(as.n_nodes, 0);
  /* with no input needing a gradient nothing is recorded, the value is there */
  ad_tensor *c = ad_full(t, AD_F64, 1, (int64_t[]){2}, -2.0);
  ad_tensor *yc = ad_custom(t, &SABS, 1, &c, &eps, sizeof eps);
  ck_assert_ptr_nonnull(yc);
  ck_assert_ptr_null(yc->node);
  ck_assert_double_eq_tol(ad_get(yc, 0), sqrt(4.25), 1e-15);
  ad_tape_free(t);
}
END_TEST

/* ---------------------------------------------------------------- bad definitions */

static ad_status wrong_shape_vjp(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out,
                                 ad_tensor *g, const int *need, ad_tensor **gin,
                                 const void *attrs) {
  (void)n, (void)in, (void)out, (void)need, (void)attrs;
  gin[0] = ad_sum(t, g); /* a scalar for a [3] input */
  return AD_OK;
}
static ad_status wrong_dtype_vjp(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out,
                                 ad_tensor *g, const int *need, ad_tensor **gin,
                                 const void *attrs) {
  (void)n, (void)out, (void)need, (void)attrs, (void)g;
  gin[0] = ad_zeros(t, AD_F32, in[0]->ndim, in[0]->shape);
  return AD_OK;
}
static ad_status quiet_fail_vjp(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out,
                                ad_tensor *g, const int *need, ad_tensor **gin, const void *attrs) {
  (void)t, (void)n, (void)in, (void)out, (void)g, (void)need, (void)gin, (void)attrs;
  return AD_ERR_ARG;
}
static ad_status loud_fail_fwd(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out,
                               const void *attrs) {
  (void)n, (void)in, (void)out, (void)attrs;
  return ad_custom_fail(t, AD_ERR_IO, "my_op: the device is gone");
}
static ad_status quiet_fail_fwd(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out,
                                const void *attrs) {
  (void)t, (void)n, (void)in, (void)out, (void)attrs;
  return AD_ERR_STATE;
}
static ad_status bad_ndim_shape(ad_tape *t, int n, ad_tensor *const *in, const void *attrs,
                                int *ndim, int64_t *shape) {
  (void)t, (void)n, (void)in, (void)attrs, (void)shape;
  *ndim = 7;
  return AD_OK;
}

START_TEST(test_bad_definitions) {
  /* Each bad definition or bad rule: its status and a message with the
   * op's name; nothing crashes, the inputs keep their values. */
  ad_tape *t = new_tape();
  ad_tensor *x = ad_full(t, AD_F64, 1, (int64_t[]){3}, 0.5);
  ad_tensor *xf = ad_full(t, AD_F32, 1, (int64_t[]){3}, 0.5);
  ad_requires_grad(x, 1);
  double eps = 0.1;
  struct {
    ad_custom_op op;
    ad_status want;
    const char *says;
  } defs[] = {
      {{.name = "no_fwd", .vjp = sabs_vjp}, AD_ERR_NULL, "no_fwd has no forward"},
      {{.name = "no_vjp", .forward = sabs_fwd}, AD_ERR_NULL, "no_vjp has no derivative rule"},
      {{.forward = sabs_fwd, .vjp = sabs_vjp}, AD_ERR_NULL, "has no name"},
      {{.name = "my_op", .forward = loud_fail_fwd, .vjp = sabs_vjp}, AD_ERR_IO, "device is gone"},
      {{.name = "q_op", .forward = quiet_fail_fwd, .vjp = sabs_vjp},
       AD_ERR_STATE,
       "q_op (user op): forward failed"},
      {{.name = "d_op", .forward = sabs_fwd, .vjp = sabs_vjp, .shape = bad_ndim_shape},
       AD_ERR_SHAPE,
       "d_op (user op): shape callback gave 7"},
  };
  for (size_t i = 0; i < sizeof defs / sizeof defs[0]; i++) {
    ad_tensor *y = ad_custom(t, &defs[i].op, 1, &x, &eps, sizeof eps);
    ck_assert_msg(!y && ad_tape_status(t) == defs[i].want &&
                      strstr(ad_tape_errmsg(t), defs[i].says),
                  "def %zu: %s (%s)", i, ad_status_str(ad_tape_status(t)), ad_tape_errmsg(t));
    printf("bad definition %zu: %s\n", i, ad_tape_errmsg(t));
    ad_tape_clear_error(t);
  }
  ck_assert_ptr_null(ad_custom(t, NULL, 1, &x, NULL, 0));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_NULL);
  ad_tape_clear_error(t);
  ck_assert_ptr_null(ad_custom(t, &SABS, 0, &x, &eps, sizeof eps));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ad_tape_clear_error(t);
  ck_assert_ptr_null(ad_custom(t, &SABS, 1, &x, NULL, sizeof eps));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_NULL);
  ad_tape_clear_error(t);
  ad_tensor *mixed[3] = {x, xf, x};
  ck_assert_ptr_null(ad_custom(t, &LAYER, 3, mixed, NULL, 0));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_DTYPE);
  ad_tape_clear_error(t);
  ad_tensor *nul[1] = {NULL};
  ck_assert_ptr_null(ad_custom(t, &SABS, 1, nul, &eps, sizeof eps));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_NULL);
  ad_tape_clear_error(t);
  /* the user's shape callback refusing (its own message) */
  ad_tensor *two[3] = {x, x, x};
  ck_assert_ptr_null(ad_custom(t, &LAYER, 3, two, NULL, 0));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_assert_ptr_nonnull(strstr(ad_tape_errmsg(t), "tanh_layer: x [3] f64"));
  ad_tape_clear_error(t);
  ck_assert_ptr_null(ad_custom(NULL, &SABS, 1, &x, &eps, sizeof eps));
  ck_assert_ptr_nonnull(strstr(ad_last_error(), "tape is NULL"));

  /* rules that break the contract fail ad_grad, naming the op and input */
  struct {
    ad_custom_op op;
    ad_status want;
    const char *says;
  } rules[] = {
      {{.name = "shape_rule", .forward = sabs_fwd, .vjp = wrong_shape_vjp},
       AD_ERR_SHAPE,
       "shape_rule (user op): derivative rule returned [] f64 for input 0, which is [3] f64"},
      {{.name = "dtype_rule", .forward = sabs_fwd, .vjp = wrong_dtype_vjp},
       AD_ERR_SHAPE,
       "dtype_rule (user op): derivative rule returned [3] f32"},
      {{.name = "quiet_rule", .forward = sabs_fwd, .vjp = quiet_fail_vjp},
       AD_ERR_ARG,
       "quiet_rule (user op): derivative rule failed"},
  };
  for (size_t i = 0; i < sizeof rules / sizeof rules[0]; i++) {
    ad_marker m = ad_mark(t);
    ad_tensor *y = ad_custom(t, &rules[i].op, 1, &x, &eps, sizeof eps);
    ck_assert_ptr_nonnull(y);
    ad_tensor *s = ad_sum(t, y), *g = NULL;
    ad_status got = ad_grad(t, 1, &s, NULL, 1, &x, &g, 0);
    ck_assert_msg(got == rules[i].want && strstr(ad_tape_errmsg(t), rules[i].says),
                  "rule %zu: %s (%s)", i, ad_status_str(got), ad_tape_errmsg(t));
    printf("bad rule %zu: %s\n", i, ad_tape_errmsg(t));
    ad_tape_clear_error(t);
    ad_rewind(t, m);
  }
  for (int64_t i = 0; i < x->size; i++) ck_assert(ad_get(x, i) == 0.5);
  ad_tape_free(t);
}
END_TEST

static Suite *custom_suite(void) {
  Suite *s = suite_create("custom_op");
  TCase *tc = tcase_create("custom_op");
  tcase_add_test(tc, test_smooth_abs);
  tcase_add_test(tc, test_fused_layer);
  tcase_add_test(tc, test_allreduce_shaped_op);
  tcase_add_test(tc, test_print_shows_name);
  tcase_add_test(tc, test_bad_definitions);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  return gc_run_suite(custom_suite());
}
