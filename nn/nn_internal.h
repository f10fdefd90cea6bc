/* nn_internal.h — helpers shared by the nn/ files; not installed. */
#ifndef HYPERTAPE_NN_INTERNAL_H
#define HYPERTAPE_NN_INTERNAL_H

#include <stdint.h>

/* Checked size arithmetic, the builtins' convention: returns 1 (and leaves
 * *r unspecified) when a * b or a + b does not fit an int64_t, else 0 with
 * the result in *r. Shapes from files and callers go through these, so a
 * huge dimension is a clear error instead of a wrapped product. (Kept to
 * the nn__ prefix until the autodiff core has a shared one.) */
static inline int nn__mul_overflow(int64_t a, int64_t b, int64_t *r) {
  return __builtin_mul_overflow(a, b, r);
}
static inline int nn__add_overflow(int64_t a, int64_t b, int64_t *r) {
  return __builtin_add_overflow(a, b, r);
}

#endif
