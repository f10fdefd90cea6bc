/* gradcheck.h — numerical checks of derivative rules, in the spirit of
 * PyTorch's gradcheck: every rule against central finite differences in
 * f64, first order (VJP), second order (HVP against differences of
 * gradients) and forward mode (JVP against differences of outputs). */
#ifndef HT_GRADCHECK_H
#define HT_GRADCHECK_H
#include "autodiff/ad.h"

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

#endif
