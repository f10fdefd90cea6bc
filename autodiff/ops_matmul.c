/* ops_matmul.c — matrix product (BLIS, transposes as strides), transpose,
 * and the row-broadcast bias add. */
#include "ad_internal.h"

#include <string.h>

/* C = op(A) op(B).  With G = dL/dC:
 *   C = A B      : dA = G B^T      dB = A^T G
 *   C = A^T B    : dA = B G^T      dB = A G
 *   C = A B^T    : dA = G B        dB = G^T A
 *   C = A^T B^T  : dA = B^T G^T    dB = G^T A^T
 * each again a matmul with transpose flags, so nothing is copied. */
/* x's part op(A) op(B) added by the GEMM itself (beta 1) into x's gradient
 * slot when the sweep owns it (ad__grad_slot): the sum accumulate would
 * make in place, without the product's own weight-sized tensor and the
 * pass adding it (an unrolled step's weights get their part through the
 * gradient's graph on top of the update's). Only where the product runs
 * the wide kernel, whose beta-1 store has the bits of the product then the
 * add (ad__gemm_f32_runs_wide); elsewhere, and in f64, the product and the
 * add as before. 1 when it did. */
static int mm_acc(ad_tape *t, const ad_tensor *x, const ad_tensor *A, const ad_tensor *B, int ta,
                  int tb) {
  ad_tensor *s = ad__grad_slot(t, x);
  if (!s || x->ndim != 2 || x->dtype != AD_F32 || A->dtype != AD_F32 || B->dtype != AD_F32)
    return 0;
  const int64_t m = ta ? A->shape[1] : A->shape[0], k = ta ? A->shape[0] : A->shape[1];
  const int64_t nn = tb ? B->shape[0] : B->shape[1];
  if (m != x->shape[0] || nn != x->shape[1] || k < 1 || ad__overlap(s, A) || ad__overlap(s, B) ||
      !ad__gemm_f32_runs_wide(ta, tb, m, nn, k, AD_F(A), A->shape[1], AD_F(B), B->shape[1]))
    return 0;
  ad_gemm_f32(ta, tb, m, nn, k, 1.0f, AD_F(A), A->shape[1], AD_F(B), B->shape[1], 1.0f, AD_F(s),
              nn);
  return 1;
}

static void vjp_matmul(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                       const int *need) {
  ad_tensor *a = n->in[0], *b = n->in[1];
  int ta = n->a.ta, tb = n->a.tb;
  /* dA = G op(B)^T (A^T: op(B) G^T), dB = op(A)^T G (B^T: G^T op(A)) */
  if (need[0] && !(!ta ? mm_acc(t, a, g, b, 0, !tb) : mm_acc(t, a, b, g, tb, 1)))
    gin[0] = !ta ? ad_matmul(t, g, b, 0, !tb) : ad_matmul(t, b, g, tb, 1);
  if (need[1] && !(!tb ? mm_acc(t, b, a, g, !ta, 0) : mm_acc(t, b, g, a, 1, ta)))
    gin[1] = !tb ? ad_matmul(t, a, g, !ta, 0) : ad_matmul(t, g, a, 1, ta);
}
static void attr_mm(const ad_node *n, char *buf, size_t len) {
  snprintf(buf, len, "%s%s", n->a.ta ? "A^T" : "A", n->a.tb ? " B^T" : " B");
}
static const ad_op_def OP_MATMUL = {
    "matmul", vjp_matmul, attr_mm, {.mask = AD_SAVES(AD_S_IN(1), AD_S_IN(0), 0, 0)}};

ad_tensor *ad_matmul(ad_tape *t, ad_tensor *a, ad_tensor *b, int trans_a, int trans_b) {
  ad_tensor *in[2] = {a, b};
  if (!ad__check(t, "ad_matmul", 2, in)) return NULL;
  if (a->ndim != 2 || b->ndim != 2) {
    char sa[96], sb[96];
    return ad__fail(t, AD_ERR_SHAPE, "ad_matmul: needs 2-D operands, got %s and %s",
                    ad_shape_str(a, sa, sizeof sa), ad_shape_str(b, sb, sizeof sb));
  }
  int64_t m = trans_a ? a->shape[1] : a->shape[0];
  int64_t k = trans_a ? a->shape[0] : a->shape[1];
  int64_t kb = trans_b ? b->shape[1] : b->shape[0];
  int64_t nn = trans_b ? b->shape[0] : b->shape[1];
  if (k != kb) {
    char sa[96], sb[96];
    return ad__fail(
        t, AD_ERR_SHAPE, "ad_matmul: inner dimensions differ: %s%s times %s%s (%lld vs %lld)",
        ad_shape_str(a, sa, sizeof sa), trans_a ? "^T" : "", ad_shape_str(b, sb, sizeof sb),
        trans_b ? "^T" : "", (long long)k, (long long)kb);
  }
  int64_t shape[2] = {m, nn}, numel;
  if (!ad__numel_ok(2, shape, &numel)) {
    char sa[96], sb[96];
    return ad__fail(t, AD_ERR_SHAPE,
                    "ad_matmul: %s times %s gives [%lld, %lld], over 2^40 elements",
                    ad_shape_str(a, sa, sizeof sa), ad_shape_str(b, sb, sizeof sb), (long long)m,
                    (long long)nn);
  }
  ad_tensor *out = ad__alloc(t, a->dtype, 2, shape, 0);
  if (!out) return NULL;
  if (a->dtype == AD_F32)
    ad_gemm_f32(trans_a, trans_b, m, nn, k, 1.0f, AD_F(a), a->shape[1], AD_F(b), b->shape[1], 0.0f,
                AD_F(out), nn);
  else
    ad_gemm_f64(trans_a, trans_b, m, nn, k, 1.0, AD_D(a), a->shape[1], AD_D(b), b->shape[1], 0.0,
                AD_D(out), nn);
  ad_node *n = ad__record(t, &OP_MATMUL, out, 2, in);
  if (n) {
    n->a.ta = trans_a != 0;
    n->a.tb = trans_b != 0;
  }
  return ad__done(t, out, "ad_matmul");
}

/* d(X^T) = (dX)^T */
static void vjp_transpose(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                          const int *need) {
  (void)n;
  if (need[0]) gin[0] = ad_transpose(t, g);
}
static const ad_op_def OP_TRANSPOSE = {
    "transpose", vjp_transpose, NULL, {.mask = AD_SAVES(0, 0, 0, 0)}};

ad_tensor *ad_transpose(ad_tape *t, ad_tensor *x) {
  if (!ad__check(t, "ad_transpose", 1, &x)) return NULL;
  if (x->ndim != 2) {
    char s[96];
    return ad__fail(t, AD_ERR_SHAPE, "ad_transpose: needs a 2-D tensor, got %s",
                    ad_shape_str(x, s, sizeof s));
  }
  int64_t r = x->shape[0], c = x->shape[1];
  int64_t shape[2] = {c, r};
  ad_tensor *out = ad__alloc(t, x->dtype, 2, shape, 0);
  if (!out) return NULL;
  if (x->dtype == AD_F32) {
    const float *X = AD_F(x);
    float *Y = AD_F(out);
    for (int64_t i = 0; i < r; i++)
      for (int64_t j = 0; j < c; j++) Y[j * r + i] = X[i * c + j];
  } else {
    const double *X = AD_D(x);
    double *Y = AD_D(out);
    for (int64_t i = 0; i < r; i++)
      for (int64_t j = 0; j < c; j++) Y[j * r + i] = X[i * c + j];
  }
  ad__record(t, &OP_TRANSPOSE, out, 1, &x);
  return out;
}

/* y[i, j] = x[i, j] + b[j]:  dx = g,  db = sum_i g[i, :] */
static void vjp_add_rowvec(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                           const int *need) {
  if (need[0]) gin[0] = g;
  if (need[1]) {
    ad_tensor *b = n->in[1];
    int64_t rows = g->size / b->size, shape[2] = {rows, b->size};
    ad_tensor *s = ad_sum_axis(t, ad_reshape(t, g, 2, shape), 0, 0);
    gin[1] = ad_reshape(t, s, b->ndim, b->shape);
  }
}
static const ad_op_def OP_ADD_ROWVEC = {
    "add_rowvec", vjp_add_rowvec, NULL, {.mask = AD_SAVES(0, 0, 0, 0)}};

ad_tensor *ad_add_rowvec(ad_tape *t, ad_tensor *x, ad_tensor *b) {
  ad_tensor *in[2] = {x, b};
  if (!ad__check(t, "ad_add_rowvec", 2, in)) return NULL;
  int64_t m = x->ndim ? x->shape[x->ndim - 1] : 1;
  if (x->ndim < 1 || b->size != m) {
    char sx[96], sb[96];
    return ad__fail(t, AD_ERR_SHAPE, "ad_add_rowvec: bias %s does not match the rows of %s",
                    ad_shape_str(b, sb, sizeof sb), ad_shape_str(x, sx, sizeof sx));
  }
  ad_tensor *out = ad__like(t, x);
  if (!out) return NULL;
  int64_t rows = x->size / m;
  if (x->dtype == AD_F32) {
    const float *X = AD_F(x), *B = AD_F(b);
    float *Y = AD_F(out);
    for (int64_t i = 0; i < rows; i++)
      for (int64_t j = 0; j < m; j++) Y[i * m + j] = X[i * m + j] + B[j];
  } else {
    const double *X = AD_D(x), *B = AD_D(b);
    double *Y = AD_D(out);
    for (int64_t i = 0; i < rows; i++)
      for (int64_t j = 0; j < m; j++) Y[i * m + j] = X[i * m + j] + B[j];
  }
  ad__record(t, &OP_ADD_ROWVEC, out, 2, in);
  return ad__done(t, out, "ad_add_rowvec");
}
