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

/* relu + max pooling of a tensor [N, C, H, W] that is produced in chunks
 * of planes and never formed whole (nn_conv2d_relu_max_pool2d, conv.c;
 * pool.c's relu_max_pool2d kernels). The plan lives in t's arena. */
typedef struct nn__pool nn__pool;
/* The plan for a k x k pool at stride and pad of an input of xshape, with
 * the argmax index (for the rule) when rec; NULL with the error on t (op
 * names the caller) on bad arguments or sizes. */
nn__pool *nn__relu_pool_plan(ad_tape *t, const char *op, const int64_t xshape[4], int k, int stride,
                             int pad, int rec);
/* The pooled output's shape [N, C, P, Q]. */
void nn__relu_pool_shape(const nn__pool *g, int64_t shape[4]);
/* y's planes [nc0, nc1) (y: the whole pooled output) = relu(max pool) of
 * x, which holds the input's planes from nc0 on; the index (if planned)
 * gets their argmax as if x were the whole input. Returns whether some
 * output is NaN (then the index does not carry relu's NaN rule: the caller
 * must take the unfused ops); *ok = 0 when out of memory. */
int nn__relu_pool_planes(ad_tape *t, const nn__pool *g, ad_dtype dt, const void *x, void *y,
                         int64_t nc0, int64_t nc1, int *ok);
/* The same on the caller's thread only, with no allocation: for a part
 * of a parallel loop (ad__par_for) that pools its own images. Returns
 * whether some output is NaN. */
int nn__relu_pool_planes_serial(const nn__pool *g, ad_dtype dt, const void *x, void *y, int64_t nc0,
                                int64_t nc1);
/* The pool's VJP: the input-shaped gradient, G at each window's argmax
 * where the maximum is above 0, else 0 (recorded; its rule is the masked
 * gather, so every order stays exact). */
ad_tensor *nn__relu_pool_scatter(ad_tape *t, ad_tensor *gy, const nn__pool *g);
/* The same scatter, unrecorded, for the input planes [nc0, nc1) only: x
 * (which holds those planes from nc0 on) gets them from gy (the whole
 * pooled gradient's data). *ok = 0 when out of memory. */
void nn__relu_pool_scatter_planes(ad_tape *t, const nn__pool *g, ad_dtype dt, const void *gy,
                                  void *x, int64_t nc0, int64_t nc1, int *ok);

/* The same on the caller's thread only, with no allocation (a part of a
 * parallel loop scattering its own images). */
void nn__relu_pool_scatter_planes_serial(const nn__pool *g, ad_dtype dt, const void *gy, void *x,
                                         int64_t nc0, int64_t nc1);

#endif
