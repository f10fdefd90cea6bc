/* ops_bmm.c — batched matrix product and the per-batch bias add: the ops a
 * "vmapped" graph needs (one op per layer for a whole meta-batch of tasks
 * instead of one per task, bilevel/maml.c's batched path).
 *
 * Layout: a batched operand is a contiguous [B, r, c] tensor, element b
 * the row-major r x c matrix at offset b r c. A 2-D operand is one matrix
 * shared by every batch element (stride 0): a weight common to all tasks. */
#include "ad_internal.h"

#include <string.h>

/* ---------------------------------------------------------------- kernel */

/* C[b] = op(A[b]) op(B[b]) for b < nb, with strides sa / sb (0: shared) and
 * sc between batch elements. lda / ldb are row strides of the stored arrays.
 * Each element goes to ad_gemm_*, which picks its path per shape (a direct
 * loop for the tiny products of a meta-batch). */
static void bmm_run(ad_dtype dt, int ta, int tb, int64_t nb, int64_t m, int64_t n, int64_t k,
                    const void *a, int64_t lda, int64_t sa, const void *b, int64_t ldb, int64_t sb,
                    void *c, int64_t sc) {
  if (dt == AD_F32) {
    const float *A = a, *Bm = b;
    float *C = c;
    for (int64_t i = 0; i < nb; i++)
      ad_gemm_f32(ta, tb, m, n, k, 1.0f, A + i * sa, lda, Bm + i * sb, ldb, 0.0f, C + i * sc, n);
  } else {
    const double *A = a, *Bm = b;
    double *C = c;
    for (int64_t i = 0; i < nb; i++)
      ad_gemm_f64(ta, tb, m, n, k, 1.0, A + i * sa, lda, Bm + i * sb, ldb, 0.0, C + i * sc, n);
  }
}

/* ---------------------------------------------------------------- ad_bmm */

/* Sum over the batch axis when the operand was shared (2-D) but its
 * per-element gradient is batched. */
static ad_tensor *to_operand(ad_tape *t, ad_tensor *g, const ad_tensor *x) {
  if (!g || x->ndim == 3) return g;
  return ad_sum_axis(t, g, 0, 0);
}

/* C[b] = op(A[b]) op(B[b]).  With G[b] = dL/dC[b], per batch element the
 * 2-D rules of ad_matmul:
 *   C = A B      : dA = G B^T      dB = A^T G
 *   C = A^T B    : dA = B G^T      dB = A G
 *   C = A B^T    : dA = G B        dB = G^T A
 *   C = A^T B^T  : dA = B^T G^T    dB = G^T A^T
 * each again an ad_bmm (so second order works); a shared (2-D) operand's
 * gradient is the sum over the batch of these. When that operand is B and
 * A is not transposed, the sum is one 2-D product of the batch folded into
 * the rows: dB = A'^T G' (or G'^T A' for B^T), A' = A as [B m, k],
 * G' = G as [B m, n]. */
static void vjp_bmm(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  ad_tensor *a = n->in[0], *b = n->in[1];
  int ta = n->a.ta, tb = n->a.tb;
  if (need[0]) gin[0] = to_operand(t, !ta ? ad_bmm(t, g, b, 0, !tb) : ad_bmm(t, b, g, tb, 1), a);
  if (need[1]) {
    if (b->ndim == 2 && a->ndim == 3 && !ta) {
      int64_t sa[2] = {a->shape[0] * a->shape[1], a->shape[2]};
      int64_t sg[2] = {g->shape[0] * g->shape[1], g->shape[2]};
      ad_tensor *af = ad_reshape(t, a, 2, sa), *gf = ad_reshape(t, g, 2, sg);
      gin[1] = !tb ? ad_matmul(t, af, gf, 1, 0) : ad_matmul(t, gf, af, 1, 0);
    } else {
      gin[1] = to_operand(t, !tb ? ad_bmm(t, a, g, !ta, 0) : ad_bmm(t, g, a, 1, ta), b);
    }
  }
}
static void attr_bmm(const ad_node *n, char *buf, size_t len) {
  snprintf(buf, len, "%s%s", n->a.ta ? "A^T" : "A", n->a.tb ? " B^T" : " B");
}
static const ad_op_def OP_BMM = {"bmm", vjp_bmm, attr_bmm};

ad_tensor *ad_bmm(ad_tape *t, ad_tensor *a, ad_tensor *b, int trans_a, int trans_b) {
  ad_tensor *in[2] = {a, b};
  if (!ad__check(t, "ad_bmm", 2, in)) return NULL;
  char sa[96], sb[96];
  if (a->ndim < 2 || a->ndim > 3 || b->ndim < 2 || b->ndim > 3 || (a->ndim == 2 && b->ndim == 2))
    return ad__fail(t, AD_ERR_SHAPE,
                    "ad_bmm: needs [B, m, k] and [B, k, n] operands (one may be 2-D, shared by "
                    "the batch), got %s and %s",
                    ad_shape_str(a, sa, sizeof sa), ad_shape_str(b, sb, sizeof sb));
  const int64_t *as = a->shape + (a->ndim - 2), *bs = b->shape + (b->ndim - 2);
  int64_t nb = a->ndim == 3 ? a->shape[0] : b->shape[0];
  if (a->ndim == 3 && b->ndim == 3 && a->shape[0] != b->shape[0])
    return ad__fail(t, AD_ERR_SHAPE, "ad_bmm: batch sizes differ: %s and %s",
                    ad_shape_str(a, sa, sizeof sa), ad_shape_str(b, sb, sizeof sb));
  int64_t m = trans_a ? as[1] : as[0], k = trans_a ? as[0] : as[1];
  int64_t kb = trans_b ? bs[1] : bs[0], nn = trans_b ? bs[0] : bs[1];
  if (k != kb)
    return ad__fail(
        t, AD_ERR_SHAPE, "ad_bmm: inner dimensions differ: %s%s times %s%s (%lld vs %lld)",
        ad_shape_str(a, sa, sizeof sa), trans_a ? "^T" : "", ad_shape_str(b, sb, sizeof sb),
        trans_b ? "^T" : "", (long long)k, (long long)kb);
  int64_t shape[3] = {nb, m, nn}, numel;
  if (!ad__numel_ok(3, shape, &numel))
    return ad__fail(t, AD_ERR_SHAPE,
                    "ad_bmm: %s times %s gives [%lld, %lld, %lld], over 2^40 "
                    "elements",
                    ad_shape_str(a, sa, sizeof sa), ad_shape_str(b, sb, sizeof sb), (long long)nb,
                    (long long)m, (long long)nn);
  ad_tensor *out = ad__alloc(t, a->dtype, 3, shape, 0);
  if (!out) return NULL;
  if (a->ndim == 3 && b->ndim == 2 && !trans_a)
    /* A shared right operand and rows of A in order: one product of the
     * batch folded into the rows, [B m, k] op(B). */
    bmm_run(a->dtype, 0, trans_b, 1, nb * m, nn, k, a->data, as[1], 0, b->data, bs[1], 0, out->data,
            0);
  else
    bmm_run(a->dtype, trans_a, trans_b, nb, m, nn, k, a->data, as[1],
            a->ndim == 3 ? as[0] * as[1] : 0, b->data, bs[1], b->ndim == 3 ? bs[0] * bs[1] : 0,
            out->data, m * nn);
  ad_node *nd = ad__record(t, &OP_BMM, out, 2, in);
  if (nd) {
    nd->a.ta = trans_a != 0;
    nd->a.tb = trans_b != 0;
  }
  return ad__done(t, out, "ad_bmm");
}

/* ---------------------------------------------------------------- bias */

/* y[b, i, j] = x[b, i, j] + v[b, j]:  dx = g,  dv[b, :] = sum_i g[b, i, :]
 * (ad_sum_axis over axis 1, whose own rule is a broadcast: second order
 * works). */
static void vjp_add_batch_rowvec(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                                 const int *need) {
  if (need[0]) gin[0] = g;
  if (need[1]) {
    ad_tensor *v = n->in[1];
    gin[1] = ad_reshape(t, ad_sum_axis(t, g, 1, 0), v->ndim, v->shape);
  }
}
static const ad_op_def OP_ADD_BATCH_ROWVEC = {"add_batch_rowvec", vjp_add_batch_rowvec, NULL};

ad_tensor *ad_add_batch_rowvec(ad_tape *t, ad_tensor *x, ad_tensor *v) {
  ad_tensor *in[2] = {x, v};
  if (!ad__check(t, "ad_add_batch_rowvec", 2, in)) return NULL;
  char sx[96], sv[96];
  if (x->ndim != 3 || v->ndim < 1 || v->shape[0] != x->shape[0] ||
      v->size != x->shape[0] * x->shape[2])
    return ad__fail(t, AD_ERR_SHAPE,
                    "ad_add_batch_rowvec: needs x [B, m, n] and v [B, n] (or [B, 1, n]), got %s "
                    "and %s",
                    ad_shape_str(x, sx, sizeof sx), ad_shape_str(v, sv, sizeof sv));
  ad_tensor *out = ad__like(t, x);
  if (!out) return NULL;
  int64_t nb = x->shape[0], m = x->shape[1], nn = x->shape[2];
  if (x->dtype == AD_F32) {
    const float *X = AD_F(x), *V = AD_F(v);
    float *Y = AD_F(out);
    for (int64_t b = 0; b < nb; b++)
      for (int64_t i = 0; i < m; i++) {
        const float *xr = X + (b * m + i) * nn, *vr = V + b * nn;
        float *yr = Y + (b * m + i) * nn;
        for (int64_t j = 0; j < nn; j++) yr[j] = xr[j] + vr[j];
      }
  } else {
    const double *X = AD_D(x), *V = AD_D(v);
    double *Y = AD_D(out);
    for (int64_t b = 0; b < nb; b++)
      for (int64_t i = 0; i < m; i++) {
        const double *xr = X + (b * m + i) * nn, *vr = V + b * nn;
        double *yr = Y + (b * m + i) * nn;
        for (int64_t j = 0; j < nn; j++) yr[j] = xr[j] + vr[j];
      }
  }
  ad__record(t, &OP_ADD_BATCH_ROWVEC, out, 2, in);
  return ad__done(t, out, "ad_add_batch_rowvec");
}
