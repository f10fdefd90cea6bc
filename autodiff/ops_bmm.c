/* ops_bmm.c — batched matrix product and the per-batch bias add: the ops a
 * "vmapped" graph needs (one op per layer for a whole meta-batch of tasks
 * instead of one per task, bilevel/maml.c's batched path).
 *
 * Layout: a batched operand is a contiguous [B, r, c] tensor, element b
 * the row-major r x c matrix at offset b r c. A 2-D operand is one matrix
 * shared by every batch element (stride 0): a weight common to all tasks. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "ad_internal.h"
#include "ad_simd.h"

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---------------------------------------------------------------- kernel */

/* The batched tiny-product loop. A meta-batch's products are small (10 x
 * 40 x 40 and down to outer products, k = 1): per call, ad_gemm_*'s own
 * overhead (choosing the path, packing a panel) costs more than the
 * arithmetic of the smallest ones. Here one call does the whole batch.
 * Each element is O = X P: rows of X times a panel P of k rows of VL*NV
 * columns (NV vectors), in register tiles of MR rows x NV vectors
 * accumulated over p = 0 .. k-1 (NV and MR compile-time constants, so the
 * accumulators stay in registers). Normally O = C, X = op(A), P = op(B);
 * when C is narrow (n < VL and n < m: the n = 1 products of a scalar
 * output) it is computed transposed, C^T = op(B)^T op(A)^T, so the
 * vectors run along m instead. P is read in place when it is stored that
 * way (with whole vectors, or in the AVX-512 build with a masked last
 * vector), else copied, zero-padded, once per element (once for a shared
 * operand). Every element is the sum over p in ascending order, one fused
 * multiply-add per step from zero: the AVX2 and AVX-512 builds give the
 * same bits, whatever the vector width and tile, so choosing between them
 * by timing (below) never changes a result (tests/test_tiny_gemm.c checks
 * it over a sweep of shapes). Taken for the products bmm_reach admits, the
 * same in every x86 build (else one build would hand a shape to ad_gemm_*
 * that another computes itself: other bits); the rest go to ad_gemm_* per
 * element. */
#define BMM_TINY 64
#define BMM_MRMAX 8 /* rows of the tallest tile of any build */

/* Whether the tiny loop takes C = op(A) op(B) (element size es): m, n, k
 * <= BMM_TINY, and the panel fits the AVX2 build's widest tile, 8 vectors
 * of 32 bytes, in the orientation that build picks (rows: along n, unless
 * C is narrow; see tiny_). One rule for every x86 build, whatever its own
 * widths: for f64 (32 of up to 64 columns) the AVX-512 build could take
 * more, but a shape only one build computes would change bits with the
 * timed choice, and past AVX2's reach ad_gemm_* was also the faster one
 * where it mattered (f64 40x40x10 A B^T: 21 us BLIS against 113 us for
 * AVX-512's dot loop, 25 elements). */
static inline int bmm_reach(size_t es, int ta, int tb, int64_t m, int64_t n, int64_t k) {
  if (m > BMM_TINY || n > BMM_TINY || k > BMM_TINY) return 0;
  const int64_t vl = 32 / (int64_t)es; /* AVX2's lanes */
  const int rows = tb && !ta && k > 1 ? n <= m : n >= vl || n >= m;
  return (rows ? n : m) <= 8 * vl;
}

/* One tile: O(r, j) for r < R, j < N (N > (NV - 1) VL). The last vector of
 * a row of P is loaded (and of O stored) through LDM / STM with lane mask
 * lm when MASKED, else whole. */
#define BMM_PANEL(NAME, T, VT, VTU, VL, NV, MR, MASKED, LDM, STM, PFMA, ATTR)                      \
  __attribute__((always_inline)) ATTR static inline void NAME##_tile(                              \
      const int R, int64_t N, int64_t K, const T *x, int64_t xrs, int64_t xcs, const T *P,         \
      int64_t lp, T *o, int64_t ors, int64_t ocs, unsigned lm) {                                   \
    const T *xr[BMM_MRMAX];                                                                        \
    for (int r = 0; r < R; r++) xr[r] = x + r * xrs;                                               \
    VT acc[BMM_MRMAX][NV];                                                                         \
    for (int r = 0; r < R; r++)                                                                    \
      for (int v = 0; v < NV; v++) acc[r][v] = (VT){0};                                            \
    for (int64_t p = 0; p < K; p++) {                                                              \
      const T *pr = P + p * lp;                                                                    \
      VT bv[NV];                                                                                   \
      for (int v = 0; v < NV - 1; v++) bv[v] = *(const VTU *)(pr + v * VL);                        \
      if (MASKED)                                                                                  \
        bv[NV - 1] = LDM(pr + (NV - 1) * VL, lm);                                                  \
      else                                                                                         \
        bv[NV - 1] = *(const VTU *)(pr + (NV - 1) * VL);                                           \
      for (int r = 0; r < R; r++) {                                                                \
        const T av = xr[r][p * xcs];                                                               \
        for (int v = 0; v < NV; v++) acc[r][v] = PFMA(av, bv[v], acc[r][v]);                       \
      }                                                                                            \
    }                                                                                              \
    /* unrolled, so every acc[r][v] is a constant index (else GCC keeps a                          \
     * copy of the accumulators on the stack, stored on every step of p) */                        \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                          \
      T *orow = o + r * ors;                                                                       \
      if (ocs == 1 && (MASKED || N == NV * VL)) { /* stored as vectors */                          \
        for (int v = 0; v < NV - 1; v++) *(VTU *)(orow + v * VL) = acc[r][v];                      \
        if (MASKED)                                                                                \
          STM(orow + (NV - 1) * VL, lm, acc[r][NV - 1]);                                           \
        else                                                                                       \
          *(VTU *)(orow + (NV - 1) * VL) = acc[r][NV - 1];                                         \
        continue;                                                                                  \
      }                                                                                            \
      T tmp[NV * VL];                                                                              \
      for (int v = 0; v < NV; v++) *(VTU *)(tmp + v * VL) = acc[r][v];                             \
      for (int64_t j = 0; j < N; j++) orow[j * ocs] = tmp[j];                                      \
    }                                                                                              \
  }                                                                                                \
  /* O(i, j) = sum_p X(i, p) P[p lp + j], X(i, p) = x[i xrs + p xcs],                              \
   * written to o[i ors + j ocs] for i < M, j < N <= NV VL: whole tiles,                           \
   * then one of the rows left (no row computed twice). Not inlined: in                            \
   * one function with all its siblings GCC kept the accumulators on the                           \
   * stack (AVX-512 build: 50 vs 80 GF/s). */                                                      \
  __attribute__((noinline)) ATTR static void NAME(int64_t M, int64_t N, int64_t K, const T *x,     \
                                                  int64_t xrs, int64_t xcs, const T *P,            \
                                                  int64_t lp, T *o, int64_t ors, int64_t ocs) {    \
    const int64_t last = N - (NV - 1) * VL; /* lanes of the last vector, 1 .. VL */                \
    const unsigned lm = last >= 32 ? ~0u : (1u << last) - 1u;                                      \
    int64_t i0 = 0;                                                                                \
    for (; i0 + MR <= M; i0 += MR)                                                                 \
      NAME##_tile(MR, N, K, x + i0 * xrs, xrs, xcs, P, lp, o + i0 * ors, ors, ocs, lm);            \
    const int64_t left = M - i0;                                                                   \
    x += i0 * xrs, o += i0 * ors;                                                                  \
    BMM_LEFT(NAME##_tile, MR, left, N, K, x, xrs, xcs, P, lp, o, ors, ocs, lm);                    \
  }

/* The last partial tile, its row count a constant in each branch (only
 * those below MR survive compilation). */
#define BMM_LEFT1(TILE, MR, R, left, ...) else if (R < MR && left == R) TILE(R, __VA_ARGS__);
#define BMM_LEFT(TILE, MR, left, ...)                                                              \
  if (left <= 0) {                                                                                 \
  }                                                                                                \
  BMM_LEFT1(TILE, MR, 1, left, __VA_ARGS__)                                                        \
  BMM_LEFT1(TILE, MR, 2, left, __VA_ARGS__)                                                        \
  BMM_LEFT1(TILE, MR, 3, left, __VA_ARGS__)                                                        \
  BMM_LEFT1(TILE, MR, 4, left, __VA_ARGS__)                                                        \
  BMM_LEFT1(TILE, MR, 5, left, __VA_ARGS__)                                                        \
  BMM_LEFT1(TILE, MR, 6, left, __VA_ARGS__)                                                        \
  BMM_LEFT1(TILE, MR, 7, left, __VA_ARGS__)

/* One build of the loop:
 *   SUF, T          name suffix, element type
 *   VT, VTU, VL     the panel's vectors (VL lanes); NVMAX of them at most
 *   MRF(nv)         rows per tile for nv vectors: as many as the registers
 *                   hold next to the nv B vectors
 *   MASKED, LDM, STM   masked last vectors (see BMM_PANEL)
 *   DVT, DVTU, DVL, DMR, HSUM   the dot kernel's vectors, its rows per
 *                   tile (x 4 columns) and its four-way lane sum; the same
 *                   vectors and order in every x86 build (same bits)
 *   DOT             the dot kernel to run: bmm_dot_SUF, or one of its own. */
#define BMM_ISA(SUF, T, VT, VTU, VL, NVMAX, MRF, MASKED, LDM, STM, DVT, DVTU, DVL, DMR, HSUM, DOT, \
                PFMA, DFMA, TFMA, ATTR)                                                            \
  BMM_PANEL(panel_##SUF##1, T, VT, VTU, VL, 1, MRF(1), MASKED, LDM, STM, PFMA, ATTR)               \
  BMM_PANEL(panel_##SUF##2, T, VT, VTU, VL, 2, MRF(2), MASKED, LDM, STM, PFMA, ATTR)               \
  BMM_PANEL(panel_##SUF##3, T, VT, VTU, VL, 3, MRF(3), MASKED, LDM, STM, PFMA, ATTR)               \
  BMM_PANEL(panel_##SUF##4, T, VT, VTU, VL, 4, MRF(4), MASKED, LDM, STM, PFMA, ATTR)               \
  BMM_PANEL(panel_##SUF##5, T, VT, VTU, VL, 5, MRF(5), MASKED, LDM, STM, PFMA, ATTR)               \
  BMM_PANEL(panel_##SUF##6, T, VT, VTU, VL, 6, MRF(6), MASKED, LDM, STM, PFMA, ATTR)               \
  BMM_PANEL(panel_##SUF##7, T, VT, VTU, VL, 7, MRF(7), MASKED, LDM, STM, PFMA, ATTR)               \
  BMM_PANEL(panel_##SUF##8, T, VT, VTU, VL, 8, MRF(8), MASKED, LDM, STM, PFMA, ATTR)               \
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
   * tiles of DMR rows x 4 columns of C, no copy at all. Each lane sums                            \
   * its p's in ascending order, the lanes are added in order, then the                            \
   * tail p's (k mod DVL) in order. bs: stride between op(B)'s columns. */                         \
  __attribute__((unused)) ATTR static void bmm_dot_##SUF(                                          \
      int64_t m, int64_t n, int64_t k, const T *A, int64_t lda, const T *B, int64_t bs, T *C) {    \
    const int64_t kv = k - k % DVL;                                                                \
    for (int64_t i0 = 0; i0 < m; i0 += DMR) {                                                      \
      const T *ar[DMR]; /* rows past m repeat the last one, never stored */                        \
      for (int r = 0; r < DMR; r++) ar[r] = A + (i0 + r < m ? i0 + r : m - 1) * lda;               \
      for (int64_t j0 = 0; j0 < n; j0 += 4) {                                                      \
        const T *bq[4];                                                                            \
        for (int q = 0; q < 4; q++) bq[q] = B + (j0 + q < n ? j0 + q : n - 1) * bs;                \
        DVT acc[DMR][4];                                                                           \
        for (int r = 0; r < DMR; r++)                                                              \
          for (int q = 0; q < 4; q++) acc[r][q] = (DVT){0};                                        \
        for (int64_t p = 0; p < kv; p += DVL) {                                                    \
          DVT y[4];                                                                                \
          for (int q = 0; q < 4; q++) y[q] = *(const DVTU *)(bq[q] + p);                           \
          for (int r = 0; r < DMR; r++) {                                                          \
            const DVT xv = *(const DVTU *)(ar[r] + p);                                             \
            for (int q = 0; q < 4; q++) acc[r][q] = DFMA(xv, y[q], acc[r][q]);                     \
          }                                                                                        \
        }                                                                                          \
        _Pragma("GCC unroll 8") for (int r = 0; r < DMR; r++) {                                    \
          if (i0 + r >= m) break;                                                                  \
          if (kv == k && j0 + 4 <= n) { /* four sums stored at once */                             \
            HSUM(acc[r], C + (i0 + r) * n + j0);                                                   \
            continue;                                                                              \
          }                                                                                        \
          T sum[4];                                                                                \
          HSUM(acc[r], sum);                                                                       \
          for (int q = 0; q < 4 && j0 + q < n; q++) {                                              \
            for (int64_t p = kv; p < k; p++) sum[q] = TFMA(ar[r][p], bq[q][p], sum[q]);            \
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
    if (!bmm_reach(sizeof(T), ta, tb, m, n, k) || nv > NVMAX) return 0;                            \
    if (!ta && (tb || ldb == 1) && k >= DVL) {                                                     \
      for (int64_t e = 0; e < nb; e++)                                                             \
        DOT(m, n, k, a + e * sa, lda, b + e * sb, tb ? ldb : 1, c + e * sc);                       \
      return 1;                                                                                    \
    }                                                                                              \
    _Alignas(64) T pk[BMM_TINY * NVMAX * VL];                                                      \
    for (int64_t e = 0; e < nb; e++) {                                                             \
      const T *A = a + e * sa, *B = b + e * sb, *x, *P;                                            \
      int64_t xrs, xcs, plp, ors, ocs;                                                             \
      if (rows) { /* X = op(A), P = op(B) */                                                       \
        x = A, xrs = ta ? 1 : lda, xcs = ta ? lda : 1, ors = n, ocs = 1;                           \
        if ((!tb || (k == 1 && ldb == 1)) && (MASKED || n % VL == 0)) { /* k = 1: B^T's row */     \
          P = B, plp = tb ? n : ldb;                                                               \
        } else {                                                                                   \
          if (e == 0 || sb) bmm_pack_##SUF(tb, k, n, lp, B, ldb, pk);                              \
          P = pk, plp = lp;                                                                        \
        }                                                                                          \
      } else { /* X = op(B)^T, P = op(A)^T, O = C^T */                                             \
        x = B, xrs = tb ? ldb : 1, xcs = tb ? 1 : ldb, ors = 1, ocs = n;                           \
        if ((ta || (k == 1 && lda == 1)) && (MASKED || m % VL == 0)) {                             \
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

/* The multiply-add of the baseline build (no FMA there). The x86 builds
 * fuse every one explicitly (BMM_FMA_* below, and __builtin_fma for the dot
 * kernel's tail), as GCC's fp-contract=fast may or may not fuse: in the
 * tail it vectorised the products and left the adds apart in one build
 * only, and the AVX2 and AVX-512 builds differed in the last bit. */
#define BMM_MADD(a, b, c) ((a) * (b) + (c))

/* Whole last vectors (the unmasked builds never take these branches). */
#define BMM_LDW_S(p, m) ((void)(m), *(const ad_v4fu *)(p))
#define BMM_LDW_D(p, m) ((void)(m), *(const ad_v2du *)(p))
#define BMM_STW(p, m, v) ((void)(m), (void)(p), (void)(v))
#define BMM_MR2(nv) 2

/* Compiled for the baseline ISA and, on x86 with GCC or Clang, for
 * AVX2+FMA and AVX-512 (taken when the CPU has them, as autodiff/blas.c's
 * direct loop is; GCC contracts a*b+c there, Clang within the statement). */
BMM_ISA(s_base, float, ad_v4f, ad_v4fu, 4, 8, BMM_MR2, 0, BMM_LDW_S, BMM_STW, ad_v4f, ad_v4fu, 4, 2,
        hsum_s_base, bmm_dot_s_base, BMM_MADD, BMM_MADD, BMM_MADD, )
BMM_ISA(d_base, double, ad_v2d, ad_v2du, 2, 8, BMM_MR2, 0, BMM_LDW_D, BMM_STW, ad_v2d, ad_v2du, 2,
        2, hsum_d_base, bmm_dot_d_base, BMM_MADD, BMM_MADD, BMM_MADD, )
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
/* The multiply-adds, fused by intrinsics, not left to fp-contract: GCC
 * contracts a * b + c only when optimising (a Debug build's generic-vector
 * loops did separate multiplies and adds while the AVX-512 dot loop's
 * intrinsics fused: other bits). PFMA(a, b, c): scalar a broadcast. */
#define BMM_FMA_S8(a, b, c) ((ad_v8f)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c)))
#define BMM_FMA_D4(a, b, c) ((ad_v4d)_mm256_fmadd_pd((__m256d)(a), (__m256d)(b), (__m256d)(c)))
#define BMM_PFMA_S8(a, b, c) BMM_FMA_S8(_mm256_set1_ps(a), b, c)
#define BMM_PFMA_D4(a, b, c) BMM_FMA_D4(_mm256_set1_pd(a), b, c)
#define BMM_PFMA_S16(a, b, c)                                                                      \
  ((ad_v16f)_mm512_fmadd_ps(_mm512_set1_ps(a), (__m512)(b), (__m512)(c)))
#define BMM_PFMA_D8(a, b, c)                                                                       \
  ((ad_v8d)_mm512_fmadd_pd(_mm512_set1_pd(a), (__m512d)(b), (__m512d)(c)))
#define BMM_LDW_S8(p, m) ((void)(m), *(const ad_v8fu *)(p))
#define BMM_LDW_D4(p, m) ((void)(m), *(const ad_v4du *)(p))
BMM_ISA(s_avx2, float, ad_v8f, ad_v8fu, 8, 8, BMM_MR2, 0, BMM_LDW_S8, BMM_STW, ad_v8f, ad_v8fu, 8,
        2, hsum_s_avx2, bmm_dot_s_avx2, BMM_PFMA_S8, BMM_FMA_S8, __builtin_fmaf, AD_AVX2_ATTR)
BMM_ISA(d_avx2, double, ad_v4d, ad_v4du, 4, 8, BMM_MR2, 0, BMM_LDW_D4, BMM_STW, ad_v4d, ad_v4du, 4,
        2, hsum_d_avx2, bmm_dot_d_avx2, BMM_PFMA_D4, BMM_FMA_D4, __builtin_fma, AD_AVX2_ATTR)
/* AVX-512: 16 floats (8 doubles) per panel vector, the last one masked
 * (so n = 40 reads B in place: 2 whole vectors and 8 lanes), and with 32
 * registers tiles of 8 rows for up to 2 vectors (16 accumulators), 5 for
 * 3-4 (MAML's 10 x 40: two tiles of 5 x 3; 6 ran 10 x 40 x 40 at 270 ns,
 * 5 at 175, 8 at 200 on Zen 5), 3 for 5-8 (f64). */
#define BMM_MR512(nv) ((nv) <= 2 ? 8 : (nv) <= 4 ? 5 : 3)
#define BMM_LDM_S16(p, m) ((ad_v16f)_mm512_maskz_loadu_ps((__mmask16)(m), (p)))
#define BMM_STM_S16(p, m, v) _mm512_mask_storeu_ps((p), (__mmask16)(m), (__m512)(v))
#define BMM_LDM_D8(p, m) ((ad_v8d)_mm512_maskz_loadu_pd((__mmask8)(m), (p)))
#define BMM_STM_D8(p, m, v) _mm512_mask_storeu_pd((p), (__mmask8)(m), (__m512d)(v))

/* The f32 dot kernel for AVX-512, with AVX2's sums bit for bit: lane l of
 * C(i, j)'s accumulator sums A(i, p) B(j, p) over p = l mod 8 ascending
 * from zero, the 8 lanes are added by hsum_s_avx2, then the tail p's. But
 * one 512-bit vector holds two columns' accumulators (j in the low half,
 * j + 1 in the high), against the 8 floats of A's row broadcast to both
 * halves: half the FMAs of 256-bit vectors. Tiles of up to 10 rows x 4
 * columns (20 accumulators), the rows left done exactly (no row twice):
 * MAML's 10 x 40 x 40 A B^T is one tile row. Only AVX-512F (the 256-bit
 * halves moved as f64x4). */
#define BMM_BC8(p) _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))))
#define BMM_PAIR(p0, p1)                                                                           \
  _mm512_castpd_ps(                                                                                \
      _mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(_mm256_loadu_ps(p0))),            \
                         _mm256_castps_pd(_mm256_loadu_ps(p1)), 1))
#define BMM_HI8(v) _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))
__attribute__((always_inline)) AD_AVX512_ATTR static inline void
bmm_dot2_tile(const int R, int64_t n, int64_t k, const float *A, int64_t lda, const float *B,
              int64_t bs, float *C) {
  const int64_t kv = k - k % 8;
  for (int64_t j0 = 0; j0 < n; j0 += 4) {
    const float *bq[4];
    for (int q = 0; q < 4; q++) bq[q] = B + (j0 + q < n ? j0 + q : n - 1) * bs;
    __m512 acc[10][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kv; p += 8) {
      const __m512 y01 = BMM_PAIR(bq[0] + p, bq[1] + p), y23 = BMM_PAIR(bq[2] + p, bq[3] + p);
      for (int r = 0; r < R; r++) {
        const __m512 x = BMM_BC8(A + r * lda + p);
        acc[r][0] = _mm512_fmadd_ps(x, y01, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(x, y23, acc[r][1]);
      }
    }
    _Pragma("GCC unroll 10") for (int r = 0; r < R; r++) {
      const ad_v8f v[4] = {(ad_v8f)_mm512_castps512_ps256(acc[r][0]), (ad_v8f)BMM_HI8(acc[r][0]),
                           (ad_v8f)_mm512_castps512_ps256(acc[r][1]), (ad_v8f)BMM_HI8(acc[r][1])};
      float *cr = C + r * n + j0;
      if (kv == k && j0 + 4 <= n) { /* four sums stored at once */
        hsum_s_avx2(v, cr);
        continue;
      }
      float sum[4];
      hsum_s_avx2(v, sum);
      for (int q = 0; q < 4 && j0 + q < n; q++) {
        for (int64_t p = kv; p < k; p++) sum[q] = __builtin_fmaf(A[r * lda + p], bq[q][p], sum[q]);
        cr[q] = sum[q];
      }
    }
  }
}
#define BMM_DOT2_LEFT(R) else if (left == R) bmm_dot2_tile(R, n, k, A, lda, B, bs, C);
AD_AVX512_ATTR static void bmm_dot2_s512(int64_t m, int64_t n, int64_t k, const float *A,
                                         int64_t lda, const float *B, int64_t bs, float *C) {
  int64_t i0 = 0;
  for (; i0 + 10 <= m; i0 += 10) bmm_dot2_tile(10, n, k, A + i0 * lda, lda, B, bs, C + i0 * n);
  const int64_t left = m - i0;
  A += i0 * lda, C += i0 * n;
  if (left <= 0) {
  }
  BMM_DOT2_LEFT(1)
  BMM_DOT2_LEFT(2)
  BMM_DOT2_LEFT(3)
  BMM_DOT2_LEFT(4)
  BMM_DOT2_LEFT(5) BMM_DOT2_LEFT(6) BMM_DOT2_LEFT(7) BMM_DOT2_LEFT(8) BMM_DOT2_LEFT(9)
}

BMM_ISA(s_avx512, float, ad_v16f, ad_v16fu, 16, 4, BMM_MR512, 1, BMM_LDM_S16, BMM_STM_S16, ad_v8f,
        ad_v8fu, 8, 4, hsum_s_avx2, bmm_dot2_s512, BMM_PFMA_S16, BMM_FMA_S8, __builtin_fmaf,
        AD_AVX512_ATTR)
/* f64 keeps the generic dot kernel, AVX2's 4-double vectors and order, in
 * tiles of 4 rows. */
BMM_ISA(d_avx512, double, ad_v8d, ad_v8du, 8, 8, BMM_MR512, 1, BMM_LDM_D8, BMM_STM_D8, ad_v4d,
        ad_v4du, 4, 4, hsum_d_avx2, bmm_dot_d_avx512, BMM_PFMA_D8, BMM_FMA_D4, __builtin_fma,
        AD_AVX512_ATTR)
#else
#define BMM_X86 0
#endif

/* ---------------------------------------------------------------- which build */

/* On a CPU with AVX-512 both x86 builds can run, and which is faster
 * depends on the CPU and the shape (512-bit loads that split cache lines,
 * the masked tail's wasted lanes, how many tiles a row count makes), so
 * each shape class (dtype, transposes, batch, m, n, k, operand strides,
 * which operands are shared) is timed once, on first use, on the caller's
 * own operands into a scratch C (bounded: at most BMM_MEASURE_NB elements,
 * BMM_BUDGET_NS of rounds), and the faster build is kept. The two give
 * the same bits (see above), so the choice changes only the time. Entries
 * are claimed by compare-and-swap and published with release stores: a
 * lookup is a hash and an atomic load, no lock; a thread that finds a
 * class still being measured by another runs the AVX2 build meanwhile.
 * The choices are listed in ad_blas_reason(). */
enum { BMM_AUTO, BMM_BASE, BMM_AVX2, BMM_AVX512 };
static const char *const k_bmm_names[] = {"auto", "base", "avx2", "avx512"};

typedef struct {
  _Atomic uint64_t key; /* 0: free */
  atomic_int isa;       /* 0 while being measured */
  float ns[2];          /* per batch element: AVX2, AVX-512 (written before isa) */
} bmm_class;

#define BMM_SLOTS 256 /* a power of two; when full, new classes run AVX2 */
#define BMM_MEASURE_NB 16
#define BMM_BUDGET_NS 1000000.0
#define BMM_ROUNDS_MIN 3
#define BMM_ROUNDS_MAX 20
static bmm_class g_cls[BMM_SLOTS];
static atomic_int g_forced_isa = BMM_AUTO;
static atomic_int g_have512 = -1; /* -1: not asked yet */

/* Whether the AVX-512 build may run: the CPU has it and the kernel set
 * asked for (HYPERTAPE_BLIS_ARCH) is not an AVX2 one (blas.c decides). */
static int have512(void) {
  int h = atomic_load_explicit(&g_have512, memory_order_relaxed);
  if (h < 0) {
    h = BMM_X86 && ad__cpu_avx512() && ad__blas_avx512_allowed();
    atomic_store_explicit(&g_have512, h, memory_order_relaxed);
  }
  return h;
}

/* Tests only (tests/test_bmm.c, tests/test_tiny_gemm.c declare it):
 * force one build of the loop (BMM_* above: 1 base, 2 AVX2, 3 AVX-512; 0
 * back to automatic); returns the previous setting, or -1 (nothing
 * changed) when this CPU cannot run the build asked for. */
int ad__bmm_force_isa(int isa);
int ad__bmm_force_isa(int isa) {
  if (isa < BMM_AUTO || isa > BMM_AVX512 || (isa == BMM_AVX2 && !(BMM_X86 && ad__cpu_avx2_fma())) ||
      (isa == BMM_AVX512 && !have512()))
    return -1;
  return atomic_exchange(&g_forced_isa, isa);
}

static double bmm_cpu_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int bmm_tiny(int isa, ad_dtype dt, int ta, int tb, int64_t nb, int64_t m, int64_t n,
                    int64_t k, const void *a, int64_t lda, int64_t sa, const void *b, int64_t ldb,
                    int64_t sb, void *c, int64_t sc) {
#if BMM_X86
  if (isa == BMM_AVX512)
    return dt == AD_F32 ? tiny_s_avx512(ta, tb, nb, m, n, k, a, lda, sa, b, ldb, sb, c, sc)
                        : tiny_d_avx512(ta, tb, nb, m, n, k, a, lda, sa, b, ldb, sb, c, sc);
  if (isa == BMM_AVX2)
    return dt == AD_F32 ? tiny_s_avx2(ta, tb, nb, m, n, k, a, lda, sa, b, ldb, sb, c, sc)
                        : tiny_d_avx2(ta, tb, nb, m, n, k, a, lda, sa, b, ldb, sb, c, sc);
#endif
  (void)isa;
  return dt == AD_F32 ? tiny_s_base(ta, tb, nb, m, n, k, a, lda, sa, b, ldb, sb, c, sc)
                      : tiny_d_base(ta, tb, nb, m, n, k, a, lda, sa, b, ldb, sb, c, sc);
}

/* Times both x86 builds on up to BMM_MEASURE_NB elements, alternating
 * them round by round (a burst of load elsewhere hits both), each one's
 * fastest round counting; CPU time of this thread, so time spent
 * descheduled does not count. Returns the winner, AVX2 on a tie or when
 * the scratch cannot be had. */
static int bmm_measure(bmm_class *e, ad_dtype dt, int ta, int tb, int64_t nb, int64_t m, int64_t n,
                       int64_t k, const void *a, int64_t lda, int64_t sa, const void *b,
                       int64_t ldb, int64_t sb) {
  const int64_t nm = nb < BMM_MEASURE_NB ? nb : BMM_MEASURE_NB;
  const size_t es = dt == AD_F64 ? sizeof(double) : sizeof(float);
  void *c = malloc((size_t)(nm * m * n) * es);
  if (!c) return BMM_AVX2;
  const int isa[2] = {BMM_AVX2, BMM_AVX512};
  double best[2] = {1e300, 1e300};
  double t0 = bmm_cpu_ns();
  for (int i = 0; i < 2; i++)
    bmm_tiny(isa[i], dt, ta, tb, nm, m, n, k, a, lda, sa, b, ldb, sb, c, m * n);
  const double per = (bmm_cpu_ns() - t0) / 2;
  const int reps = per > 20000.0 ? 1 : per < 100.0 ? 200 : (int)(20000.0 / per);
  const double start = bmm_cpu_ns();
  for (int round = 0; round < BMM_ROUNDS_MAX; round++) {
    for (int i = 0; i < 2; i++) {
      const double ts = bmm_cpu_ns();
      for (int r = 0; r < reps; r++)
        bmm_tiny(isa[i], dt, ta, tb, nm, m, n, k, a, lda, sa, b, ldb, sb, c, m * n);
      const double t = (bmm_cpu_ns() - ts) / reps;
      if (t < best[i]) best[i] = t;
    }
    if (round + 1 >= BMM_ROUNDS_MIN && bmm_cpu_ns() - start > BMM_BUDGET_NS) break;
  }
  free(c);
  e->ns[0] = (float)(best[0] / (double)nm);
  e->ns[1] = (float)(best[1] / (double)nm);
  return best[1] < best[0] ? BMM_AVX512 : BMM_AVX2;
}

/* The build for this product: forced, the only one there is, or the one
 * measured for its class (measuring it now if the class is new). */
static int bmm_pick(ad_dtype dt, int ta, int tb, int64_t nb, int64_t m, int64_t n, int64_t k,
                    const void *a, int64_t lda, int64_t sa, const void *b, int64_t ldb,
                    int64_t sb) {
  const int forced = atomic_load_explicit(&g_forced_isa, memory_order_relaxed);
  if (forced != BMM_AUTO) return forced;
  if (!(BMM_X86 && ad__cpu_avx2_fma())) return BMM_BASE;
  if (m > BMM_TINY || n > BMM_TINY || k > BMM_TINY || !have512()) return BMM_AVX2;
  const uint64_t cl = (uint64_t)(nb < 255 ? nb : 255), ca = (uint64_t)(lda < 255 ? lda : 255),
                 cb = (uint64_t)(ldb < 255 ? ldb : 255);
  const uint64_t key = 1u | (uint64_t)(dt == AD_F64) << 1 | (uint64_t) !!ta << 2 |
                       (uint64_t) !!tb << 3 | (uint64_t)(sa == 0) << 4 | (uint64_t)(sb == 0) << 5 |
                       (uint64_t)m << 6 | (uint64_t)n << 13 | (uint64_t)k << 20 | ca << 27 |
                       cb << 35 | cl << 43;
  uint64_t h = key * 0x9E3779B97F4A7C15ULL;
  unsigned slot = (unsigned)(h >> 40) & (BMM_SLOTS - 1);
  for (int probe = 0; probe < BMM_SLOTS; probe++, slot = (slot + 1) & (BMM_SLOTS - 1)) {
    bmm_class *e = &g_cls[slot];
    uint64_t cur = atomic_load_explicit(&e->key, memory_order_acquire);
    if (cur == 0) {
      if (atomic_compare_exchange_strong(&e->key, &cur, key)) {
        int win = bmm_measure(e, dt, ta, tb, nb, m, n, k, a, lda, sa, b, ldb, sb);
        atomic_store_explicit(&e->isa, win, memory_order_release);
        return win;
      }
      /* another thread claimed the slot first: cur is its key */
    }
    if (cur == key) {
      int isa = atomic_load_explicit(&e->isa, memory_order_acquire);
      return isa ? isa : BMM_AVX2;
    }
  }
  return BMM_AVX2;
}

/* For ad_blas_reason (blas.c): the build chosen per class so far, with
 * both timings; appends to buf (cap bytes in all, len used); returns the
 * new length (may exceed cap, as snprintf). */
size_t ad__bmm_describe(char *buf, size_t len, size_t cap) {
#define BMM_PUT(...) (len = ad__buf_put(buf, len, cap, __VA_ARGS__))
  const int forced = atomic_load(&g_forced_isa);
  if (forced != BMM_AUTO) {
    BMM_PUT("; ad_bmm tiny loop: %s (forced)", k_bmm_names[forced]);
    return len;
  }
  if (!(BMM_X86 && ad__cpu_avx2_fma())) {
    BMM_PUT("; ad_bmm tiny loop: base");
    return len;
  }
  if (!have512()) {
    BMM_PUT("; ad_bmm tiny loop: avx2");
    return len;
  }
  int nshown = 0;
  for (int s = 0; s < BMM_SLOTS; s++) {
    const uint64_t key = atomic_load_explicit(&g_cls[s].key, memory_order_acquire);
    const int isa = key ? atomic_load_explicit(&g_cls[s].isa, memory_order_acquire) : 0;
    if (!isa) continue;
    BMM_PUT("%s %s %llux%llux%llux%llu %c%c%s%s: %savx2 %.0f %savx512 %.0f",
            nshown ? ";"
                   : "; ad_bmm tiny loop per shape (batch x m x n x k, ns per element, * = "
                     "chosen):",
            key >> 1 & 1 ? "f64" : "f32", (unsigned long long)(key >> 43 & 255),
            (unsigned long long)(key >> 6 & 127), (unsigned long long)(key >> 13 & 127),
            (unsigned long long)(key >> 20 & 127), key >> 2 & 1 ? 'T' : 'N',
            key >> 3 & 1 ? 'T' : 'N', key >> 4 & 1 ? " A shared" : "",
            key >> 5 & 1 ? " B shared" : "", isa == BMM_AVX2 ? "*" : "", (double)g_cls[s].ns[0],
            isa == BMM_AVX512 ? "*" : "", (double)g_cls[s].ns[1]);
    nshown++;
  }
  if (!nshown) BMM_PUT("; ad_bmm tiny loop: avx2 or avx512, measured per shape (none yet)");
#undef BMM_PUT
  return len;
}

/* C[b] = op(A[b]) op(B[b]) for b < nb, with strides sa / sb (0: shared) and
 * sc between batch elements; lda / ldb are row strides of the stored
 * arrays, C's rows are n apart. */
static void bmm_run(ad_dtype dt, int ta, int tb, int64_t nb, int64_t m, int64_t n, int64_t k,
                    const void *a, int64_t lda, int64_t sa, const void *b, int64_t ldb, int64_t sb,
                    void *c, int64_t sc) {
  const int isa = bmm_pick(dt, ta, tb, nb, m, n, k, a, lda, sa, b, ldb, sb);
  if (bmm_tiny(isa, dt, ta, tb, nb, m, n, k, a, lda, sa, b, ldb, sb, c, sc)) return;
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
