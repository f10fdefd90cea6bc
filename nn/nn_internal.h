/* nn_internal.h — helpers shared by the nn/ files; not installed. */
#ifndef HYPERTAPE_NN_INTERNAL_H
#define HYPERTAPE_NN_INTERNAL_H

#include "autodiff/ad_internal.h"

#include <stdint.h>

/* Checked size arithmetic: autodiff's one implementation (ad__mul_i64 /
 * ad__add_i64 in autodiff/ad_internal.h) in the builtins' convention:
 * returns 1 when a * b or a + b does not fit an int64_t, else 0 with the
 * result in *r. Shapes from files and callers go through these, so a huge
 * dimension is a clear error instead of a wrapped product. */
static inline int nn__mul_overflow(int64_t a, int64_t b, int64_t *r) {
  return !ad__mul_i64(a, b, r);
}
static inline int nn__add_overflow(int64_t a, int64_t b, int64_t *r) {
  return !ad__add_i64(a, b, r);
}

/* nn_opt_step_diff's SGD, momentum and Nesterov steps as fused ops (the
 * default, 0) or, with on = 1, composed of public ops (add, mul, axpy) as
 * before the fusion: the reference tests/test_fused_step.c compares the
 * fused ops with. Per thread. */
void nn__opt_set_unfused(int on);

#endif
