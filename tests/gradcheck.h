/* gradcheck.h — numerical checks of derivative rules, in the spirit of
 * PyTorch's gradcheck: every rule against central finite differences in
 * f64, first order (VJP), second order (HVP against differences of
 * gradients) and forward mode (JVP against differences of outputs). */
#ifndef HT_GRADCHECK_H
#define HT_GRADCHECK_H
#include "autodiff/ad.h"

#include <check.h>

/* Builds an output (any shape) from the inputs on the tape. */
typedef ad_tensor *(*gc_fn)(ad_tape *t, ad_tensor *const *in, void *ctx);

typedef struct {
  double eps; /* finite-difference step (default 1e-6) */
  double tol; /* max |analytic - numeric| / (1 + |numeric|) (default 1e-6) */
  int no_hvp; /* skip the second-order check (piecewise-linear ops) */
  int no_jvp;
  uint64_t seed;
} gc_opts;

/* Checks f at the given f64 leaf inputs (their values are not changed in
 * the end). The scalar checked is s = <f(x), r> for a fixed random r, so
 * the whole Jacobian is exercised. Returns the worst error seen and writes
 * a line naming the check and the worst element into report. */
double gc_check(const char *name, gc_fn f, int n, ad_tensor *const *in, void *ctx, gc_opts o,
                char *report, size_t len);

/* Makes an f64 heap leaf of the given shape filled from N(0,1) shifted by
 * `offset`, values pushed at least `margin` away from 0 (for kinks). */
ad_tensor *gc_leaf(int ndim, const int64_t *shape, ad_rng *r, double offset, double margin);

/* One row of a gradcheck table (test_ops.c, test_nn_layers.c): f on n
 * inputs, input i of shape shape[i][0..ndim[i]) drawn by gc_leaf with
 * offset[i] and margin[i]. */
typedef struct {
  const char *name;
  gc_fn f;
  int n;
  int ndim[4];
  int64_t shape[4][4];
  double offset[4], margin[4];
  int no_hvp;
} gc_case;

/* Makes the case's inputs from an rng seeded with `seed` (asserting each
 * was made), runs gc_check on them (ctx NULL), prints the report line to
 * stderr and frees the inputs. Returns the worst error, for the caller to
 * assert its bound on. Call from inside a Check test. */
double gc_check_case(const gc_case *c, uint64_t seed, char *report, size_t len);

/* Runs the suite with srunner (CK_NORMAL) and frees it; returns the exit
 * code for main: EXIT_SUCCESS when no test failed, EXIT_FAILURE otherwise. */
int gc_run_suite(Suite *s);

/* Whether Check runs each test in a fresh child process (CK_FORK unset or
 * "yes"): tests that need a fresh process (environment variables read at
 * first use, an empty shape cache) are added only then. */
int gc_forking(void);

/* max_i |a - b| / max_i |b| over the elements of the n tensors of each
 * list (paired by position; the absolute error when b is all zero). */
double gc_rel_err(int n, ad_tensor *const *a, ad_tensor *const *b);

/* The number of entries of directory `dir` other than . and .. (a test of
 * an atomic write sees that no temporary is left beside the file).
 * Asserts that the directory opens: call from inside a Check test. */
int gc_dir_entries(const char *dir);

#endif
