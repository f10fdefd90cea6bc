/* gradcheck.c — see gradcheck.h. */
#define _POSIX_C_SOURCE 200809L /* opendir, readdir */
#include "gradcheck.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

ad_tensor *gc_leaf(int ndim, const int64_t *shape, ad_rng *r, double offset, double margin) {
  ad_tensor *x = NULL;
  if (ad_tensor_new(&x, AD_F64, ndim, shape) != AD_OK) return NULL;
  for (int64_t i = 0; i < x->size; i++) {
    double v = ad_rng_normal(r) + offset;
    if (fabs(v) < margin) v = v < 0 ? -margin - fabs(v) : margin + fabs(v);
    ad_set(x, i, v);
  }
  ad_requires_grad(x, 1);
  return x;
}

/* s = <f(x), r> with recording as given; returns the value (NaN on error). */
static double eval_s(ad_tape *t, gc_fn f, ad_tensor *const *in, void *ctx, const double *r) {
  ad_marker m = ad_mark(t);
  int prev = ad_set_recording(t, 0);
  ad_tensor *y = f(t, in, ctx);
  double s = NAN;
  if (y) {
    s = 0;
    for (int64_t i = 0; i < y->size; i++) s += ad_get(y, i) * r[i];
  }
  ad_set_recording(t, prev);
  ad_rewind(t, m);
  return s;
}

/* Output values at x into buf (size ny). */
static void eval_y(ad_tape *t, gc_fn f, ad_tensor *const *in, void *ctx, double *buf) {
  ad_marker m = ad_mark(t);
  int prev = ad_set_recording(t, 0);
  ad_tensor *y = f(t, in, ctx);
  for (int64_t i = 0; y && i < y->size; i++) buf[i] = ad_get(y, i);
  ad_set_recording(t, prev);
  ad_rewind(t, m);
}

/* Gradient of s at x, flattened into buf (total size of inputs). */
static int grad_s(ad_tape *t, gc_fn f, int n, ad_tensor *const *in, void *ctx, ad_tensor *rt,
                  double *buf) {
  ad_marker m = ad_mark(t);
  ad_tensor *y = f(t, in, ctx);
  ad_tensor *g[16];
  if (!y || ad_grad(t, 1, &y, &rt, n, in, g, 0) != AD_OK) {
    ad_rewind(t, m);
    return 0;
  }
  int64_t k = 0;
  for (int i = 0; i < n; i++)
    for (int64_t j = 0; j < in[i]->size; j++) buf[k++] = ad_get(g[i], j);
  ad_rewind(t, m);
  return 1;
}

static double err(double a, double num) {
  return fabs(a - num) / (1.0 + fabs(num));
}

double gc_check(const char *name, gc_fn f, int n, ad_tensor *const *in, void *ctx, gc_opts o,
                char *report, size_t len) {
  if (o.eps == 0) o.eps = 1e-6;
  if (o.tol == 0) o.tol = 1e-6;
  if (!o.seed) o.seed = 1234;
  report[0] = 0;
  ad_tape *t = NULL;
  if (ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 16, .arena_max_mb = 256}) != AD_OK) {
    snprintf(report, len, "%s: no tape", name);
    return INFINITY;
  }
  ad_rng rng;
  ad_rng_seed(&rng, o.seed);
  int64_t nx = 0;
  for (int i = 0; i < n; i++) nx += in[i]->size;
  /* The output's size decides r. */
  ad_tensor *y0 = f(t, in, ctx);
  if (!y0) {
    snprintf(report, len, "%s: forward failed: %s", name, ad_tape_errmsg(t));
    ad_tape_free(t);
    return INFINITY;
  }
  /* Keep the output's shape: y0 dies with the reset. */
  int64_t ny = y0->size, yshape[AD_MAX_DIMS];
  int yndim = y0->ndim;
  for (int d = 0; d < AD_MAX_DIMS; d++) yshape[d] = y0->shape[d];
  ad_tape_reset(t);
  double r[4096], ga[4096], gp[4096], gm[4096], v[4096], yp[4096], ym[4096];
  if (nx > 4096 || ny > 4096) {
    snprintf(report, len, "%s: too large for the checker", name);
    ad_tape_free(t);
    return INFINITY;
  }
  for (int64_t i = 0; i < ny; i++) r[i] = ad_rng_normal(&rng);
  ad_tensor *rt = NULL;
  ad_tensor_new(&rt, AD_F64, yndim, yshape);
  for (int64_t i = 0; i < ny; i++) ad_set(rt, i, r[i]);
  double worst = 0;
  const char *worst_what = "";
  int64_t worst_i = -1;
  double worst_a = 0, worst_n = 0;
#define NOTE(WHAT, I, A, NUM)                                                                      \
  do {                                                                                             \
    double e_ = err(A, NUM);                                                                       \
    if (!(e_ <= worst)) {                                                                          \
      worst = isnan(e_) ? INFINITY : e_;                                                           \
      worst_what = WHAT;                                                                           \
      worst_i = I;                                                                                 \
      worst_a = A;                                                                                 \
      worst_n = NUM;                                                                               \
    }                                                                                              \
  } while (0)

  /* 1. first order: analytic gradient vs central differences of s. */
  if (!grad_s(t, f, n, in, ctx, rt, ga)) {
    snprintf(report, len, "%s: ad_grad failed: %s", name, ad_tape_errmsg(t));
    worst = INFINITY;
    goto done;
  }
  for (int i = 0, k = 0; i < n; i++)
    for (int64_t j = 0; j < in[i]->size; j++, k++) {
      double x0 = ad_get(in[i], j);
      ad_set(in[i], j, x0 + o.eps);
      double sp = eval_s(t, f, in, ctx, r);
      ad_set(in[i], j, x0 - o.eps);
      double sm = eval_s(t, f, in, ctx, r);
      ad_set(in[i], j, x0);
      NOTE("grad", k, ga[k], (sp - sm) / (2 * o.eps));
    }

  /* 2. second order: H v against differences of gradients along v. */
  if (!o.no_hvp) {
    for (int64_t k = 0; k < nx; k++) v[k] = ad_rng_normal(&rng);
    ad_marker m = ad_mark(t);
    ad_tensor *y = f(t, in, ctx);
    ad_tensor *s = y ? ad_dot(t, y, ad_reshape(t, rt, y->ndim, y->shape)) : NULL;
    ad_tensor *vt[16], *hv[16];
    for (int i = 0, k = 0; i < n; i++) {
      vt[i] = ad_empty(t, AD_F64, in[i]->ndim, in[i]->shape);
      for (int64_t j = 0; j < in[i]->size; j++) ad_set(vt[i], j, v[k++]);
    }
    if (!s || ad_hvp(t, s, n, in, vt, hv, 0) != AD_OK) {
      snprintf(report, len, "%s: ad_hvp failed: %s", name, ad_tape_errmsg(t));
      worst = INFINITY;
      goto done;
    }
    double hva[4096];
    for (int i = 0, k = 0; i < n; i++)
      for (int64_t j = 0; j < in[i]->size; j++) hva[k++] = ad_get(hv[i], j);
    ad_rewind(t, m);
    double h = 1e-5;
    for (int sign = 1; sign >= -1; sign -= 2) {
      for (int i = 0, k = 0; i < n; i++)
        for (int64_t j = 0; j < in[i]->size; j++, k++)
          ad_set(in[i], j, ad_get(in[i], j) + sign * h * v[k]);
      grad_s(t, f, n, in, ctx, rt, sign > 0 ? gp : gm);
      for (int i = 0, k = 0; i < n; i++)
        for (int64_t j = 0; j < in[i]->size; j++, k++)
          ad_set(in[i], j, ad_get(in[i], j) - sign * h * v[k]);
    }
    for (int64_t k = 0; k < nx; k++) NOTE("hvp", k, hva[k], (gp[k] - gm[k]) / (2 * h));
  }

  /* 3. forward mode: J v against differences of outputs along v. */
  if (!o.no_jvp) {
    for (int64_t k = 0; k < nx; k++) v[k] = ad_rng_normal(&rng);
    ad_marker m = ad_mark(t);
    ad_tensor *y = f(t, in, ctx);
    ad_tensor *vt[16], *jv = NULL;
    for (int i = 0, k = 0; i < n; i++) {
      vt[i] = ad_empty(t, AD_F64, in[i]->ndim, in[i]->shape);
      for (int64_t j = 0; j < in[i]->size; j++) ad_set(vt[i], j, v[k++]);
    }
    if (!y || ad_jvp(t, n, in, vt, 1, &y, &jv, 0) != AD_OK) {
      snprintf(report, len, "%s: ad_jvp failed: %s", name, ad_tape_errmsg(t));
      worst = INFINITY;
      goto done;
    }
    double jva[4096];
    for (int64_t k = 0; k < ny; k++) jva[k] = ad_get(jv, k);
    ad_rewind(t, m);
    for (int sign = 1; sign >= -1; sign -= 2) {
      for (int i = 0, k = 0; i < n; i++)
        for (int64_t j = 0; j < in[i]->size; j++, k++)
          ad_set(in[i], j, ad_get(in[i], j) + sign * o.eps * v[k]);
      eval_y(t, f, in, ctx, sign > 0 ? yp : ym);
      for (int i = 0, k = 0; i < n; i++)
        for (int64_t j = 0; j < in[i]->size; j++, k++)
          ad_set(in[i], j, ad_get(in[i], j) - sign * o.eps * v[k]);
    }
    for (int64_t k = 0; k < ny; k++) NOTE("jvp", k, jva[k], (yp[k] - ym[k]) / (2 * o.eps));
  }
  snprintf(report, len, "%s: worst %s error %.3g at element %lld (analytic %.10g, numeric %.10g)",
           name, worst_what, worst, (long long)worst_i, worst_a, worst_n);
done:
#undef NOTE
  ad_tensor_free(rt);
  ad_tape_free(t);
  return worst;
}

double gc_check_case(const gc_case *c, uint64_t seed, char *report, size_t len) {
  ad_rng r;
  ad_rng_seed(&r, seed);
  ad_tensor *in[4] = {0};
  for (int i = 0; i < c->n; i++) {
    in[i] = gc_leaf(c->ndim[i], c->shape[i], &r, c->offset[i], c->margin[i]);
    ck_assert_ptr_nonnull(in[i]);
  }
  double worst =
      gc_check(c->name, c->f, c->n, in, NULL, (gc_opts){.no_hvp = c->no_hvp}, report, len);
  fprintf(stderr, "%s\n", report);
  for (int i = 0; i < c->n; i++) ad_tensor_free(in[i]);
  return worst;
}

int gc_run_suite(Suite *s) {
  SRunner *sr = srunner_create(s);
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

int gc_forking(void) {
  SRunner *probe = srunner_create(suite_create("probe"));
  int forking = srunner_fork_status(probe) != CK_NOFORK;
  srunner_free(probe);
  return forking;
}

double gc_rel_err(int n, ad_tensor *const *a, ad_tensor *const *b) {
  double num = 0, den = 0;
  for (int k = 0; k < n; k++)
    for (int64_t i = 0; i < a[k]->size; i++) {
      num = fmax(num, fabs(ad_get(a[k], i) - ad_get(b[k], i)));
      den = fmax(den, fabs(ad_get(b[k], i)));
    }
  return den > 0 ? num / den : num;
}

int gc_dir_entries(const char *dir) {
  DIR *d = opendir(dir);
  ck_assert_msg(d != NULL, "cannot open directory %s", dir);
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)))
    if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
  closedir(d);
  return n;
}
