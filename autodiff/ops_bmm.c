/* ops_bmm.c — batched matrix product and the per-batch bias add: the ops a
 * "vmapped" graph needs (one op per layer for a whole meta-batch of tasks
 * instead of one per task, bilevel/maml.c's batched path).
 *
 * Layout: a batched operand is a contiguous [B, r, c] tensor, element b
 * the row-major r x c matrix at offset b r c. A 2-D operand is one matrix
 * shared by every batch element (stride 0): a weight common to all tasks. */
#include "ad_internal.h"
#include "ad_simd.h"

#include <string.h>

/* ---------------------------------------------------------------- kernel */

/* The batched tiny-product loop. A meta-batch's products are small (10 x
 * 40 x 40 and down to outer products, k = 1): per call, ad_gemm_*'s own
 * overhead (choosing the path, packing a panel) costs more than the
 * arithmetic of the smallest ones. Here one call does the whole batch.
 * Each element is O = X P: rows of X times a panel P of k rows of VL*NV
 * columns (NV vectors, zero-padded), in register tiles of 2 rows x NV
 * vectors accumulated over p = 0 .. k-1 (NV a compile-time constant, so
 * the accumulators stay in registers). Normally O = C, X = op(A), P =
 * op(B); when C is narrow (n < VL and n < m: the n = 1 products of a
 * scalar output) it is computed transposed, C^T = op(B)^T op(A)^T, so the
 * vectors run along m instead. P is read in place when it is stored that
 * way with whole vectors, else copied once per element (once for a shared
 * operand). Every element is the sum over p in ascending order. Taken
 * when m, n, k <= BMM_TINY and the panel fits in 8 vectors; other products
 * go to ad_gemm_* per element. */
#define BMM_TINY 64
#define BMM_NVMAX 8

/* O(i, j) = sum_p X(i, p) P[p lp + j], X(i, p) = x[i xrs + p xcs], written
 * to o[i ors + j ocs] for i < M, j < N <= NV VL. */
#define BMM_PANEL(NAME, T, VT, VTU, VL, NV, ATTR)                                                  \
  ATTR static void NAME(int64_t M, int64_t N, int64_t K, const T *x, int64_t xrs, int64_t xcs,     \
                        const T *P, int64_t lp, T *o, int64_t ors, int64_t ocs) {                  \
    for (int64_t i0 = 0; i0 < M; i0 += 2) {                                                        \
      const int two = M - i0 > 1; /* a last odd row repeats itself, stored once */                 \
      const T *x0 = x + i0 * xrs, *x1 = x + (i0 + two) * xrs;                                      \
      VT acc0[NV], acc1[NV];                                                                       \
      for (int v = 0; v < NV; v++) acc0[v] = acc1[v] = (VT){0};                                    \
      for (int64_t p = 0; p < K; p++) {                                                            \
        const T a0 = x0[p * xcs], a1 = x1[p * xcs];                                                \
        const T *pr = P + p * lp;                                                                  \
        for (int v = 0; v < NV; v++) {                                                             \
          const VT bv = *(const VTU *)(pr + v * VL);                                               \
          acc0[v] = a0 * bv + acc0[v];                                                             \
          acc1[v] = a1 * bv + acc1[v];                                                             \
        }                                                                                          \
      }                                                                                            \
      for (int r = 0; r <= two; r++) {                                                             \
        T *orow = o + (i0 + r) * ors;                                                              \
        if (ocs == 1 && N == NV * VL) { /* whole vectors: stored as they are */                    \
          for (int v = 0; v < NV; v++) *(VTU *)(orow + v * VL) = r ? acc1[v] : acc0[v];            \
          continue;                                                                                \
        }                                                                                          \
        T tmp[NV * VL];                                                                            \
        for (int v = 0; v < NV; v++) *(VTU *)(tmp + v * VL) = r ? acc1[v] : acc0[v];               \
        for (int64_t j = 0; j < N; j++) orow[j * ocs] = tmp[j];                                    \
      }                                                                                            \
    }                                                                                              \
  }

#define BMM_ISA(SUF, T, VT, VTU, VL, HSUM, ATTR)                                                   \
  BMM_PANEL(panel_##SUF##1, T, VT, VTU, VL, 1, ATTR)                                               \
  BMM_PANEL(panel_##SUF##2, T, VT, VTU, VL, 2, ATTR)                                               \
  BMM_PANEL(panel_##SUF##3, T, VT, VTU, VL, 3, ATTR)                                               \
  BMM_PANEL(panel_##SUF##4, T, VT, VTU, VL, 4, ATTR)                                               \
  BMM_PANEL(panel_##SUF##5, T, VT, VTU, VL, 5, ATTR)                                               \
  BMM_PANEL(panel_##SUF##6, T, VT, VTU, VL, 6, ATTR)                                               \
  BMM_PANEL(panel_##SUF##7, T, VT, VTU, VL, 7, ATTR)                                               \
  BMM_PANEL(panel_##SUF##8, T, VT, VTU, VL, 8, ATTR)                                               \
  /* pk[p lp + j] = X[p, j] for p < k, j < n (zeros up to lp), X stored                            \
   * k x n (tr = 0) or n x k (tr = 1) with row stride ld; read in storage                          \
   * order (the transposed copy writes with a stride instead). */                                  \
  ATTR static void bmm_pack_##SUF(int tr, int64_t k, int64_t n, int64_t lp, const T *x,            \
                                  int64_t ld, T *pk) {                                             \
    if (tr)                                                                                        \
      for (int64_t j = 0; j < n; j++)                                                              \
        for (int64_t p = 0; p < k; p++) pk[p * lp + j] = x[j * ld + p];                            \
    else                                                                                           \
      for (int64_t p = 0; p < k; p++)                                                              \
        for (int64_t j = 0; j < n; j++) pk[p * lp + j] = x[p * ld + j];                            \
    for (int64_t p = 0; p < k; p++)                                                                \
      for (int64_t j = n; j < lp; j++) pk[p * lp + j] = 0;                                         \
  }                                                                                                \
  /* C = A op(B) with A's rows and op(B)'s columns both contiguous along p                         \
   * (A B^T, and A b for a column b): dot products, vectors along p, in                            \
   * tiles of 2 rows x 4 columns of C, no copy at all. Each lane sums its                          \
   * p's in ascending order, the lanes are added in order, then the tail                           \
   * p's (k mod VL) in order. bs: stride between op(B)'s columns. */                               \
  ATTR static void bmm_dot_##SUF(int64_t m, int64_t n, int64_t k, const T *A, int64_t lda,         \
                                 const T *B, int64_t bs, T *C) {                                   \
    const int64_t kv = k - k % VL;                                                                 \
    for (int64_t i0 = 0; i0 < m; i0 += 2) {                                                        \
      const T *a0 = A + i0 * lda, *a1 = A + (i0 + 1 < m ? i0 + 1 : i0) * lda;                      \
      for (int64_t j0 = 0; j0 < n; j0 += 4) {                                                      \
        const int64_t jl = n - 1;                                                                  \
        const T *b0 = B + j0 * bs, *b1 = B + (j0 + 1 < n ? j0 + 1 : jl) * bs;                      \
        const T *b2 = B + (j0 + 2 < n ? j0 + 2 : jl) * bs,                                         \
                *b3 = B + (j0 + 3 < n ? j0 + 3 : jl) * bs;                                         \
        VT acc0[4] = {{0}}, acc1[4] = {{0}};                                                       \
        for (int64_t p = 0; p < kv; p += VL) {                                                     \
          const VT x0 = *(const VTU *)(a0 + p), x1 = *(const VTU *)(a1 + p);                       \
          const VT y0 = *(const VTU *)(b0 + p), y1 = *(const VTU *)(b1 + p);                       \
          const VT y2 = *(const VTU *)(b2 + p), y3 = *(const VTU *)(b3 + p);                       \
          acc0[0] = x0 * y0 + acc0[0], acc0[1] = x0 * y1 + acc0[1];                                \
          acc0[2] = x0 * y2 + acc0[2], acc0[3] = x0 * y3 + acc0[3];                                \
          acc1[0] = x1 * y0 + acc1[0], acc1[1] = x1 * y1 + acc1[1];                                \
          acc1[2] = x1 * y2 + acc1[2], acc1[3] = x1 * y3 + acc1[3];                                \
        }                                                                                          \
        if (kv == k && j0 + 4 <= n) { /* a whole tile row: four sums stored at once */             \
          HSUM(acc0, C + i0 * n + j0);                                                             \
          if (i0 + 1 < m) HSUM(acc1, C + (i0 + 1) * n + j0);                                       \
          continue;                                                                                \
        }                                                                                          \
        const T *bq[4] = {b0, b1, b2, b3};                                                         \
        for (int r = 0; r < 2 && i0 + r < m; r++) {                                                \
          T sum[4];                                                                                \
          const T *ar = r ? a1 : a0;                                                               \
          HSUM(r ? acc1 : acc0, sum);                                                              \
          for (int q = 0; q < 4 && j0 + q < n; q++) {                                              \
            for (int64_t p = kv; p < k; p++) sum[q] += ar[p] * bq[q][p];                           \
            C[(i0 + r) * n + j0 + q] = sum[q];                                                     \
          }                                                                                        \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
  }                                                                                                \
  /* Returns 0 (doing nothing) when the product is not tiny. */                                    \
  ATTR static int tiny_##SUF(int ta, int tb, int64_t nb, int64_t m, int64_t n, int64_t k,          \
                             const T *a, int64_t lda, int64_t sa, const T *b, int64_t ldb,         \
                             int64_t sb, T *c, int64_t sc) {                                       \
    /* rows unless C is narrow; for A B^T the operand to copy is the                               \
     * smaller: op(B) (n k) for rows, op(A)^T (m k) for columns */                                 \
    const int rows = tb && !ta && k > 1 ? n <= m : n >= VL || n >= m;                              \
    const int64_t M = rows ? m : n, N = rows ? n : m, nv = (N + VL - 1) / VL, lp = nv * VL;        \
    if (m > BMM_TINY || n > BMM_TINY || k > BMM_TINY || nv > BMM_NVMAX) return 0;                  \
    if (!ta && (tb || ldb == 1) && k >= VL) {                                                      \
      for (int64_t e = 0; e < nb; e++)                                                             \
        bmm_dot_##SUF(m, n, k, a + e * sa, lda, b + e * sb, tb ? ldb : 1, c + e * sc);             \
      return 1;                                                                                    \
    }                                                                                              \
    T pk[BMM_TINY * BMM_NVMAX * VL];                                                               \
    for (int64_t e = 0; e < nb; e++) {                                                             \
      const T *A = a + e * sa, *B = b + e * sb, *x, *P;                                            \
      int64_t xrs, xcs, plp, ors, ocs;                                                             \
      if (rows) { /* X = op(A), P = op(B) */                                                       \
        x = A, xrs = ta ? 1 : lda, xcs = ta ? lda : 1, ors = n, ocs = 1;                           \
        if ((!tb || (k == 1 && ldb == 1)) && n % VL == 0) { /* k = 1: B^T's one row */             \
          P = B, plp = tb ? n : ldb;                                                               \
        } else {                                                                                   \
          if (e == 0 || sb) bmm_pack_##SUF(tb, k, n, lp, B, ldb, pk);                              \
          P = pk, plp = lp;                                                                        \
        }                                                                                          \
      } else { /* X = op(B)^T, P = op(A)^T, O = C^T */                                             \
        x = B, xrs = tb ? ldb : 1, xcs = tb ? 1 : ldb, ors = 1, ocs = n;                           \
        if ((ta || (k == 1 && lda == 1)) && m % VL == 0) {                                         \
          P = A, plp = ta ? lda : m;                                                               \
        } else {                                                                                   \
          if (e == 0 || sa) bmm_pack_##SUF(!ta, k, m, lp, A, lda, pk);                             \
          P = pk, plp = lp;                                                                        \
        }                                                                                          \
      }                                                                                            \
      T *C = c + e * sc;                                                                           \
      switch (nv) {                                                                                \
      case 1:                                                                                      \
        panel_##SUF##1(M, N, k, x, xrs, xcs, P, plp, C, ors, ocs);                                 \
        break;                                                                                     \
      case 2:                                                                                      \
        panel_##SUF##2(M, N, k, x, xrs, xcs, P, plp, C, ors, ocs);                                 \
        break;                                                                                     \
      case 3:                                                                                      \
        panel_##SUF##3(M, N, k, x, xrs, xcs, P, plp, C, ors, ocs);                                 \
        break;                                                                                     \
      case 4:                                                                                      \
        panel_##SUF##4(M, N, k, x, xrs, xcs, P, plp, C, ors, ocs);                                 \
        break;                                                                                     \
      case 5:                                                                                      \
        panel_##SUF##5(M, N, k, x, xrs, xcs, P, plp, C, ors, ocs);                                 \
        break;                                                                                     \
      case 6:                                                                                      \
        panel_##SUF##6(M, N, k, x, xrs, xcs, P, plp, C, ors, ocs);                                 \
        break;                                                                                     \
      case 7:                                                                                      \
        panel_##SUF##7(M, N, k, x, xrs, xcs, P, plp, C, ors, ocs);                                 \
        break;                                                                                     \
      default:                                                                                     \
        panel_##SUF##8(M, N, k, x, xrs, xcs, P, plp, C, ors, ocs);                                 \
        break;                                                                                     \
      }                                                                                            \
    }                                                                                              \
    return 1;                                                                                      \
  }

/* out[q] = the sum of v[q]'s lanes, q < 4, in a fixed order: in the
 * baseline build lane by lane, with AVX2 by horizontal adds (two hadds
 * and a half-add: four dot products' reductions in four instructions). */
#define BMM_HSUM_BASE(NAME, T, VT, VTU, VL)                                                        \
  static inline void NAME(const VT *v, T *out) {                                                   \
    for (int q = 0; q < 4; q++) {                                                                  \
      T l[VL];                                                                                     \
      *(VTU *)l = v[q];                                                                            \
      T sum = l[0];                                                                                \
      for (int j = 1; j < VL; j++) sum += l[j];                                                    \
      out[q] = sum;                                                                                \
    }                                                                                              \
  }
BMM_HSUM_BASE(hsum_s_base, float, ad_v4f, ad_v4fu, 4)
BMM_HSUM_BASE(hsum_d_base, double, ad_v2d, ad_v2du, 2)

/* Compiled for the baseline ISA and, on x86 with GCC or Clang, for
 * AVX2+FMA (taken when the CPU has them, as autodiff/blas.c's direct loop
 * is; GCC contracts a*b+c there, Clang within the statement). */
BMM_ISA(s_base, float, ad_v4f, ad_v4fu, 4, hsum_s_base, )
BMM_ISA(d_base, double, ad_v2d, ad_v2du, 2, hsum_d_base, )
#if AD_X86 && defined(__GNUC__)
#include <immintrin.h>
#define BMM_X86 1
AD_AVX2_ATTR static inline void hsum_s_avx2(const ad_v8f *v, float *out) {
  /* h = [a0123 b0123 c0123 d0123 | a4567 b4567 c4567 d4567] */
  __m256 h = _mm256_hadd_ps(_mm256_hadd_ps((__m256)v[0], (__m256)v[1]),
                            _mm256_hadd_ps((__m256)v[2], (__m256)v[3]));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
AD_AVX2_ATTR static inline void hsum_d_avx2(const ad_v4d *v, double *out) {
  /* [a01 b01 a23 b23] and [c01 d01 c23 d23] -> [a b c d] */
  __m256d h01 = _mm256_hadd_pd((__m256d)v[0], (__m256d)v[1]);
  __m256d h23 = _mm256_hadd_pd((__m256d)v[2], (__m256d)v[3]);
  _mm256_storeu_pd(out, _mm256_add_pd(_mm256_permute2f128_pd(h01, h23, 0x20),
                                      _mm256_permute2f128_pd(h01, h23, 0x31)));
}
BMM_ISA(s_avx2, float, ad_v8f, ad_v8fu, 8, hsum_s_avx2, AD_AVX2_ATTR)
BMM_ISA(d_avx2, double, ad_v4d, ad_v4du, 4, hsum_d_avx2, AD_AVX2_ATTR)
#else
#define BMM_X86 0
#endif

/* Tests only (tests/test_bmm.c declares it): 1 makes ad_bmm take the
 * baseline loop even where AVX2 is present, so both builds of the loop
 * are checked on one machine; returns the previous setting. Set it from
 * one thread, with no ad_bmm running. */
int ad__bmm_force_base(int on);
static int g_force_base;
int ad__bmm_force_base(int on) {
  int was = g_force_base;
  g_force_base = on != 0;
  return was;
}

/* C[b] = op(A[b]) op(B[b]) for b < nb, with strides sa / sb (0: shared) and
 * sc between batch elements; lda / ldb are row strides of the stored
 * arrays, C's rows are n apart. */
static void bmm_run(ad_dtype dt, int ta, int tb, int64_t nb, int64_t m, int64_t n, int64_t k,
                    const void *a, int64_t lda, int64_t sa, const void *b, int64_t ldb, int64_t sb,
                    void *c, int64_t sc) {
  if (dt == AD_F32) {
    const float *A = a, *Bm = b;
    float *C = c;
#if BMM_X86
    if (!g_force_base && ad__cpu_avx2_fma()
            ? tiny_s_avx2(ta, tb, nb, m, n, k, A, lda, sa, Bm, ldb, sb, C, sc)
            : tiny_s_base(ta, tb, nb, m, n, k, A, lda, sa, Bm, ldb, sb, C, sc))
      return;
#else
    if (tiny_s_base(ta, tb, nb, m, n, k, A, lda, sa, Bm, ldb, sb, C, sc)) return;
#endif
    for (int64_t i = 0; i < nb; i++)
      ad_gemm_f32(ta, tb, m, n, k, 1.0f, A + i * sa, lda, Bm + i * sb, ldb, 0.0f, C + i * sc, n);
  } else {
    const double *A = a, *Bm = b;
    double *C = c;
#if BMM_X86
    if (!g_force_base && ad__cpu_avx2_fma()
            ? tiny_d_avx2(ta, tb, nb, m, n, k, A, lda, sa, Bm, ldb, sb, C, sc)
            : tiny_d_base(ta, tb, nb, m, n, k, A, lda, sa, Bm, ldb, sb, C, sc))
      return;
#else
    if (tiny_d_base(ta, tb, nb, m, n, k, A, lda, sa, Bm, ldb, sb, C, sc)) return;
#endif
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
static const ad_op_def OP_BMM = {"bmm", vjp_bmm, attr_bmm, {0}};

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
static const ad_op_def OP_ADD_BATCH_ROWVEC = {"add_batch_rowvec", vjp_add_batch_rowvec, NULL, {0}};

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
