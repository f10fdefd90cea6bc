#define _POSIX_C_SOURCE 200809L /* open_memstream */
/* test_dot.c — the teaching view of a recorded hypergradient: stable names,
 * constants with values, attributes, operand order, phases, clusters per
 * inner step, outputs, and the text print agreeing with the DOT export.
 *
 * The problem: inner loss 0.5 (w - lam)^2, T steps of gradient descent with
 * learning rate 0.1 from w0 = 0, outer loss 0.5 (w_T - 2)^2. With r = 0.9,
 * w_T = r^T w0 + (1 - r^T) lam, so d outer / d lam = (w_T - 2)(1 - r^T). */
#include "autodiff/ad.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *STEP[] = {"step 1", "step 2", "step 3"};

typedef struct {
  char *dot, *text;
  double hyper, w_t;
} run_out;

static char *slurp_dot(ad_tape *t, const ad_dot_opts *o, int text) {
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  ck_assert_ptr_nonnull(f);
  ck_assert_int_eq(text ? ad_tape_print(t, f) : ad_tape_dot_ex(t, f, o), AD_OK);
  fclose(f);
  return buf;
}

/* Records T steps and the hypergradient (recorded too, so it is drawn). */
static run_out record(ad_tape *t, int steps) {
  ad_tensor *w0 = ad_scalar(t, AD_F64, 0.0), *lam = ad_scalar(t, AD_F64, 0.5);
  ad_requires_grad(w0, 1);
  ad_requires_grad(lam, 1);
  ad_set_name(w0, "w0");
  ad_set_name(lam, "lam");
  ad_marker start = ad_mark(t);
  ad_tensor *w = w0;
  for (int k = 0; k < steps; k++) {
    ad_marker m = ad_mark(t);
    ad_tensor *d = ad_sub(t, w, lam);
    ad_tensor *loss = ad_scale(t, ad_mul(t, d, d), 0.5), *g = NULL;
    ck_assert_int_eq(ad_grad(t, 1, &loss, NULL, 1, &w, &g, AD_GRAD_RECORD), AD_OK);
    w = ad_sub(t, w, ad_scale(t, g, 0.1));
    ck_assert_int_eq(ad_tape_label(t, m, STEP[k]), AD_OK);
  }
  ad_tensor *b = ad_scalar(t, AD_F64, 2.0);
  ad_tensor *e = ad_sub(t, w, b);
  ad_tensor *outer = ad_scale(t, ad_mul(t, e, e), 0.5), *h = NULL;
  ad_set_name(outer, "outer");
  ck_assert_int_eq(ad_grad(t, 1, &outer, NULL, 1, &lam, &h, AD_GRAD_RECORD), AD_OK);
  ck_assert_int_eq(ad_tape_label(t, start, "outer loss and hypergradient"), AD_OK);
  ad_tensor *outs[2] = {outer, h};
  char title[64];
  snprintf(title, sizeof title, "hypergradient through %d step%s of gradient descent", steps,
           steps > 1 ? "s" : "");
  ad_dot_opts o = {.title = title, .outputs = outs, .n_outputs = 2};
  run_out r = {slurp_dot(t, &o, 0), slurp_dot(t, NULL, 1), ad_item(h), ad_item(w)};
  const char *dir = getenv("HT_DOT_DIR"); /* to render docs/img (see README) */
  if (dir) {
    char path[512];
    snprintf(path, sizeof path, "%s/tape_%d_step.dot", dir, steps);
    FILE *f = fopen(path, "w");
    if (f) {
      fputs(r.dot, f);
      fclose(f);
    }
  }
  return r;
}

static int count(const char *s, const char *needle) {
  int n = 0;
  for (const char *p = strstr(s, needle); p; p = strstr(p + 1, needle)) n++;
  return n;
}

/* The line of the DOT output that declares node `id` ("v3" [label=...). */
static char *decl_line(const char *dot, const char *id) {
  char key[64];
  snprintf(key, sizeof key, "\"%s\" [label=", id);
  const char *p = strstr(dot, key);
  ck_assert_msg(p != NULL, "no declaration of %s", id);
  const char *q = strchr(p, '\n');
  return strndup(p, (size_t)(q - p));
}

START_TEST(test_hypergradient_dot) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  run_out a = record(t, 2);
  /* closed form: w_T = 0.19 * 0.5, hypergradient (w_T - 2) * 0.19 */
  ck_assert_double_eq_tol(a.w_t, 0.095, 1e-15);
  ck_assert_double_eq_tol(a.hyper, (0.095 - 2.0) * 0.19, 1e-14);

  /* Stable: the same tape after a reset (node ids continue, addresses move
   * because of the extra allocation) and a fresh tape give the same bytes. */
  ad_tape_reset(t);
  (void)ad_zeros(t, AD_F64, 1, (int64_t[]){100});
  run_out b = record(t, 2);
  ad_tape *t2 = NULL;
  ck_assert_int_eq(ad_tape_new(&t2, NULL), AD_OK);
  run_out c = record(t2, 2);
  ck_assert_str_eq(a.dot, b.dot);
  ck_assert_str_eq(a.dot, c.dot);
  ck_assert_str_eq(a.text, b.text);
  ck_assert_str_eq(a.text, c.text);
  ck_assert_ptr_null(strstr(a.dot, "c_")); /* no address-derived names */

  /* Leaves and the constant b with their values; the title. */
  ck_assert_ptr_nonnull(strstr(a.dot, "\"w0\" [label=\"w0 = 0\\n[] f64\""));
  ck_assert_ptr_nonnull(strstr(a.dot, "\"lam\" [label=\"lam = 0.5\\n[] f64\""));
  ck_assert_ptr_nonnull(strstr(a.dot, "label=\"c2 = 2\\n[] f64\""));
  ck_assert_ptr_nonnull(
      strstr(a.dot, "label=\"hypergradient through 2 steps of gradient descent\""));
  /* v0 = sub(w0, lam): the first node; its operands numbered in order. */
  ck_assert_ptr_nonnull(strstr(a.dot, "\"v0\" [label=\"v0 = sub\\n[] f64 = -0.5\" shape=box]"));
  ck_assert_ptr_nonnull(strstr(a.dot, "\"w0\" -> \"v0\" [color=black label=\"0\"]"));
  ck_assert_ptr_nonnull(strstr(a.dot, "\"lam\" -> \"v0\" [color=black label=\"1\"]"));
  /* v2 = scale(v1) with its attribute; one operand, no number. */
  ck_assert_ptr_nonnull(strstr(a.dot, "\"v2\" [label=\"v2 = scale\\nc=0.5\\n[] f64 = 0.125\""));
  ck_assert_ptr_nonnull(strstr(a.dot, "\"v1\" -> \"v2\" [color=black];"));
  ck_assert_ptr_nonnull(strstr(a.dot, "c=0.1\\n"));

  /* One cluster per labelled step plus the rest, in order, and the legend. */
  const char *s1 = strstr(a.dot, "subgraph cluster_0 {\n    label=\"step 1\"");
  const char *s2 = strstr(a.dot, "subgraph cluster_1 {\n    label=\"step 2\"");
  const char *s3 =
      strstr(a.dot, "subgraph cluster_2 {\n    label=\"outer loss and hypergradient\"");
  ck_assert_ptr_nonnull(s1);
  ck_assert_ptr_nonnull(s2);
  ck_assert_ptr_nonnull(s3);
  ck_assert(s1 < s2 && s2 < s3);
  ck_assert_int_eq(count(a.dot, "subgraph cluster_"), 4);
  ck_assert_ptr_nonnull(strstr(a.dot, "subgraph cluster_legend"));
  ck_assert_ptr_nonnull(strstr(a.dot, "legend_forward [label=\"forward op\""));
  ck_assert_ptr_nonnull(strstr(a.dot, "legend_backward [label=\"recorded backward op\""));
  ck_assert_ptr_nonnull(strstr(a.dot, "legend_second [label=\"second-order sweep"));
  ck_assert_ptr_nonnull(strstr(a.dot, "legend_output"));

  /* Outputs: the outer loss (named) and the recorded hypergradient, and
   * nothing else, drawn with the output style. */
  ck_assert_int_eq(count(a.dot, "peripheries=2"), 3); /* two outputs + the legend */
  char *outer_decl = NULL;
  const char *p = strstr(a.dot, "[label=\"outer = scale");
  ck_assert_ptr_nonnull(p);
  outer_decl = strndup(p, (size_t)(strchr(p, '\n') - p));
  ck_assert_ptr_nonnull(strstr(outer_decl, "peripheries=2"));
  ck_assert_ptr_nonnull(strstr(outer_decl, "= 1.81451")); /* 0.5 (0.095 - 2)^2 */
  free(outer_decl);

  /* Phases, read back from the text print: per step the forward ops, then
   * the recorded backward, then the step's update (forward again); at the
   * end the outer loss and its recorded sweep, second order because it
   * goes back through both recorded backwards. */
  ck_assert_int_eq(count(a.text, "# step 1: forward\n"), 2);
  ck_assert_int_eq(count(a.text, "# step 1: recorded backward\n"), 1);
  ck_assert_int_eq(count(a.text, "# step 2: recorded backward\n"), 1);
  ck_assert_int_eq(count(a.text, "# outer loss and hypergradient: forward\n"), 1);
  ck_assert_int_eq(count(a.text, "second-order sweep (hypergradient)\n"), 1);
  ck_assert_int_eq(count(a.text, "recorded backward"), 2);
  /* The text names agree with the DOT ids and show the same attribute. */
  ck_assert_ptr_nonnull(strstr(a.text, "w0       = leaf 0  [] f64\n"));
  ck_assert_ptr_nonnull(strstr(a.text, "lam      = leaf 0.5  [] f64\n"));
  ck_assert_ptr_nonnull(strstr(a.text, "v0       = sub(w0, lam)  [] f64\n"));
  ck_assert_ptr_nonnull(strstr(a.text, "v2       = scale(v1; c=0.5)  [] f64\n"));
  ck_assert_ptr_nonnull(strstr(a.text, "c2       = const 2  [] f64\n"));
  /* Every node of the DOT has a line in the text, and the backward and
   * second-order node declarations carry their styles. */
  int n_nodes = count(a.dot, "\" [label=\"v") + count(a.dot, "\" [label=\"outer");
  int n_lines = count(a.text, ")  [");
  ck_assert_int_eq(n_nodes, n_lines);
  int n_bwd = count(a.dot, "fillcolor=\"#fff1b8\""), n_sec = count(a.dot, "fillcolor=\"#f8c4bc\"");
  ck_assert_int_ge(n_bwd, 3); /* at least one per step, plus the legend */
  ck_assert_int_ge(n_sec, 2);
  /* each count less its legend entry: styled nodes = all nodes */
  int n_fwd = count(a.dot, "shape=box]") - 1, n_fwd_out = count(a.dot, "shape=box color=") - 1;
  ck_assert_int_eq((n_bwd - 1) + (n_sec - 1) + n_fwd + n_fwd_out, n_nodes);
  ck_assert_int_eq(n_nodes, 36); /* 2 x (3 forward, 3 backward, 2 update), 3 outer, 17 swept */
  char *v0 = decl_line(a.dot, "v0");
  ck_assert_ptr_null(strstr(v0, "fillcolor"));
  free(v0);

  /* Without clusters, the same graph with no step boxes; LR direction. */
  char *flat = slurp_dot(t2, &(ad_dot_opts){.no_clusters = 1, .no_legend = 1, .rankdir = "LR"}, 0);
  ck_assert_int_eq(count(flat, "subgraph"), 0);
  ck_assert_ptr_nonnull(strstr(flat, "rankdir=LR;"));
  ck_assert_int_eq(count(flat, " -> "), count(a.dot, " -> ") - count(a.dot, "style=invis"));
  free(flat);

  free(a.dot), free(a.text), free(b.dot), free(b.text), free(c.dot), free(c.text);
  ad_tape_free(t);
  ad_tape_free(t2);
}
END_TEST

/* A one-step run for docs/img (and a check that T = 1 matches its closed
 * form: (0.05 - 2) * 0.1). */
START_TEST(test_one_step) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  run_out a = record(t, 1);
  ck_assert_double_eq_tol(a.hyper, (0.05 - 2.0) * 0.1, 1e-14);
  ck_assert_int_eq(count(a.dot, "subgraph cluster_"), 3);
  free(a.dot), free(a.text);
  ad_tape_free(t);
}
END_TEST

/* Constants that are not scalars show their shape; two constants with the
 * same name stay two nodes (generated ids), a unique name is the id. */
START_TEST(test_constants_and_names) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  ad_tensor *w = ad_full(t, AD_F32, 2, (int64_t[]){2, 3}, 1.0);
  ad_requires_grad(w, 1);
  ad_tensor *m = ad_ones(t, AD_F32, 2, (int64_t[]){2, 3});
  ad_tensor *lr1 = ad_scalar(t, AD_F32, 0.5), *lr2 = ad_scalar(t, AD_F32, 0.25);
  ad_set_name(lr1, "lr");
  ad_set_name(lr2, "lr");
  ad_tensor *y = ad_mul(t, ad_mul(t, ad_mul(t, w, m), lr1), lr2);
  ck_assert_ptr_nonnull(y);
  char *dot = slurp_dot(t, NULL, 0);
  ck_assert_ptr_nonnull(strstr(dot, "\"leaf0\" [label=\"leaf0\\n[2, 3] f32\""));
  ck_assert_ptr_nonnull(strstr(dot, "\"c0\" [label=\"c0\\n[2, 3] f32\""));
  ck_assert_ptr_nonnull(strstr(dot, "\"c1\" [label=\"lr = 0.5\\n[] f32\""));
  ck_assert_ptr_nonnull(strstr(dot, "\"c2\" [label=\"lr = 0.25\\n[] f32\""));
  ck_assert_ptr_nonnull(strstr(dot, "rankdir=TB;"));
  ck_assert_ptr_null(strstr(dot, "legend_backward")); /* only what is present */
  free(dot);
  ad_set_name(lr2, "lr2");
  dot = slurp_dot(t, NULL, 0);
  ck_assert_ptr_nonnull(strstr(dot, "\"lr2\" -> \"v2\" [color=black label=\"1\"]"));
  free(dot);
  ad_tape_free(t);
}
END_TEST

/* Bad input: a clear status and message, nothing written for option errors. */
START_TEST(test_bad_input) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  ck_assert_int_eq(ad_tape_dot_ex(t, f, &(ad_dot_opts){.rankdir = "up"}), AD_ERR_ARG);
  ck_assert_ptr_nonnull(strstr(ad_last_error(), "ad_tape_dot_ex: rankdir \"up\""));
  ck_assert_int_eq(ad_tape_dot_ex(t, f, &(ad_dot_opts){.n_outputs = -1}), AD_ERR_ARG);
  ck_assert_int_eq(ad_tape_dot_ex(t, f, &(ad_dot_opts){.n_outputs = 1}), AD_ERR_NULL);
  ad_tensor *none[1] = {NULL};
  ck_assert_int_eq(ad_tape_dot_ex(t, f, &(ad_dot_opts){.n_outputs = 1, .outputs = none}),
                   AD_ERR_NULL);
  ck_assert_ptr_nonnull(strstr(ad_last_error(), "output 0 is NULL"));
  fflush(f);
  ck_assert_uint_eq(len, 0);
  ck_assert_int_eq(ad_tape_dot_ex(NULL, f, NULL), AD_ERR_NULL);
  ck_assert_int_eq(ad_tape_dot(t, NULL), AD_ERR_NULL);
  fclose(f);
  free(buf);
  ck_assert_int_eq(ad_tape_label(t, ad_mark(t), NULL), AD_ERR_NULL);
  ck_assert_int_eq(ad_tape_label(NULL, (ad_marker){0}, "x"), AD_ERR_NULL);
  ad_tensor *x = ad_scalar(t, AD_F64, 1.0);
  ad_requires_grad(x, 1);
  ad_marker before = ad_mark(t);
  ad_tensor *y = ad_scale(t, x, 2.0);
  ad_marker after = ad_mark(t);
  (void)y;
  ad_rewind(t, before);
  ck_assert_int_eq(ad_tape_label(t, after, "late"), AD_ERR_ARG);
  ck_assert_ptr_nonnull(strstr(ad_last_error(), "ad_tape_label: the mark is at node 1"));
  ck_assert_int_eq(ad_tape_status(t), AD_OK); /* printing errors do not poison the tape */
  ad_tape_free(t);
}
END_TEST

int main(void) {
  Suite *s = suite_create("dot");
  TCase *tc = tcase_create("dot");
  tcase_add_test(tc, test_hypergradient_dot);
  tcase_add_test(tc, test_one_step);
  tcase_add_test(tc, test_constants_and_names);
  tcase_add_test(tc, test_bad_input);
  suite_add_tcase(s, tc);
  SRunner *r = srunner_create(s);
  srunner_run_all(r, CK_NORMAL);
  int failed = srunner_ntests_failed(r);
  srunner_free(r);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
