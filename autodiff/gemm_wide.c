/* gemm_wide.c — an AVX-512 kernel for mid-sized f32 products that skips
 * packing A (blas.c's "wide:avx512" path; see ad__gemm_wide512 in
 * ad_internal.h).
 *
 * Why. On a Zen 5 the MLP's products (128x200x784, 784x200x128 with A
 * transposed) ran at 0.83-0.88x OpenBLAS through BLIS: BLIS 0.9.0 has no
 * AVX-512 small-matrix kernels (its sup kernels are AVX2, 8 lanes), and
 * its packed AVX-512 path spends 12-15% of the time in the reference C
 * packing of A. A product of this size does not need A packed: A's rows
 * are read straight from the caller's memory, one element broadcast at a
 * time (a 4-byte load never splits a cache line), and only op(B) is copied,
 * 32 columns at a time, into an aligned panel that every row tile reuses.
 *
 * The tile: MR = 12 rows x 32 columns of C in 24 accumulators (two 16-lane
 * vectors per row), plus the two vectors of the panel's row p: 26 of the 32
 * registers. Per step p, 2 loads, 12 broadcasts and 24 FMAs. Rows past a
 * multiple of 12 take a tile of the rows left; columns past a multiple of
 * 32 are zero in the panel and masked at the store. Each element of C is
 * one accumulator summed over p = 0, 1, ..., k-1 in order, then
 * alpha acc (+ beta C): the same bits on every call.
 *
 * The whole of k runs in one tile: the panel (128 k bytes, 100 KB at
 * k = 784) stays in L2, streamed at 128 bytes per 24 FMAs, well inside the
 * L2's bandwidth; MR rows of A (48 k bytes) stay in L1 across the tile. */
#include "ad_internal.h"
#include "ad_simd.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if AD_X86 && defined(__GNUC__)
#include <immintrin.h>

enum { WD_MR = 12, WD_NR = 32, WD_STACK = 4096 /* floats of panel on the stack */ };

/* C[0..MR) x [0..32) (columns past `w` not stored) from A(r, p) =
 * a[r ars + p acs] and the panel bp[p 32 + j]. MR is a constant at each
 * call, so the loops unroll into registers. The panel's rows are ldp
 * floats apart. */
__attribute__((always_inline)) AD_AVX512_ATTR static inline void
wd_tile(const int MR, int64_t k, const float *a, int64_t ars, int64_t acs, const float *bp,
        int64_t ldp, float alpha, float beta, float *c, int64_t ldc, __mmask16 m0, __mmask16 m1) {
  __m512 acc[WD_MR][2];
  for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k; p++) {
    const __m512 b0 = _mm512_loadu_ps(bp + p * ldp), b1 = _mm512_loadu_ps(bp + p * ldp + 16);
    const float *ap = a + p * acs;
    for (int r = 0; r < MR; r++) {
      const __m512 av = _mm512_set1_ps(ap[r * ars]);
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int r = 0; r < MR; r++) {
    float *cr = c + r * ldc;
    __m512 o0 = _mm512_mul_ps(va, acc[r][0]), o1 = _mm512_mul_ps(va, acc[r][1]);
    if (beta != 0.0f) { /* beta = 0 never reads C (it may hold NaN) */
      o0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, cr), o0);
      o1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, cr + 16), o1);
    }
    _mm512_mask_storeu_ps(cr, m0, o0);
    _mm512_mask_storeu_ps(cr + 16, m1, o1);
  }
}

/* The first w of 16 lanes (none for w <= 0, all for w >= 16): a panel
 * of width w is stored through wd_mask(w) and wd_mask(w - 16). */
static inline __mmask16 wd_mask(int64_t w) {
  return (__mmask16)(w >= 16 ? 0xFFFFu : w <= 0 ? 0u : (1u << w) - 1u);
}

/* Every row of C for one panel. */
AD_AVX512_ATTR static void wd_panel(int64_t m, int64_t k, const float *a, int64_t ars, int64_t acs,
                                    const float *bp, int64_t ldp, float alpha, float beta, float *c,
                                    int64_t ldc, int64_t w) {
  const __mmask16 m0 = wd_mask(w), m1 = wd_mask(w - 16);
  int64_t i = 0;
  for (; i + WD_MR <= m; i += WD_MR)
    wd_tile(WD_MR, k, a + i * ars, ars, acs, bp, ldp, alpha, beta, c + i * ldc, ldc, m0, m1);
  switch (m - i) {
#define WD_TAIL(R)                                                                                 \
  case R:                                                                                          \
    wd_tile(R, k, a + i * ars, ars, acs, bp, ldp, alpha, beta, c + i * ldc, ldc, m0, m1);          \
    break;
    WD_TAIL(1)
    WD_TAIL(2)
    WD_TAIL(3)
    WD_TAIL(4)
    WD_TAIL(5)
    WD_TAIL(6)
    WD_TAIL(7)
    WD_TAIL(8)
    WD_TAIL(9)
    WD_TAIL(10)
    WD_TAIL(11)
#undef WD_TAIL
  default:
    break;
  }
}

/* bp[p 32 + j] = op(B)(p, j0 + j) for j < w, 0 for w <= j < 32. op(B)'s
 * rows are contiguous when B is not transposed: two masked vector copies
 * per row. A transposed B (a conv's dW = dY X^T) has its columns
 * contiguous instead: 8x8 blocks are transposed in registers (element by
 * element it ran 32x144x196 at 0.7x OpenBLAS). */
AD_AVX512_ATTR static void wd_pack(int tb, int64_t k, const float *b, int64_t ldb, int64_t j0,
                                   int64_t w, float *bp) {
  if (!tb) {
    const __mmask16 m0 = wd_mask(w), m1 = wd_mask(w - 16);
    for (int64_t p = 0; p < k; p++) {
      const float *row = b + p * ldb + j0;
      _mm512_store_ps(bp + p * WD_NR, _mm512_maskz_loadu_ps(m0, row));
      _mm512_store_ps(bp + p * WD_NR + 16, _mm512_maskz_loadu_ps(m1, row + 16));
    }
    return;
  }
  /* Blocks of 8 columns x 8 steps, transposed in registers; columns past
   * w read as zeros (never loaded), and the last k % 8 steps one by one. */
  int64_t p0 = 0;
  for (; p0 + 8 <= k; p0 += 8)
    for (int64_t j = 0; j < WD_NR; j += 8) {
      __m256 r[8], col[8];
      for (int q = 0; q < 8; q++)
        r[q] = j + q < w ? _mm256_loadu_ps(b + (j0 + j + q) * ldb + p0) : _mm256_setzero_ps();
      ad__tr8_ps(r, col);
      for (int q = 0; q < 8; q++) _mm256_store_ps(bp + (p0 + q) * WD_NR + j, col[q]);
    }
  for (; p0 < k; p0++) {
    float *dst = bp + p0 * WD_NR;
    for (int64_t j = 0; j < WD_NR; j++) dst[j] = j < w ? b[(j0 + j) * ldb + p0] : 0.0f;
  }
}

AD_AVX512_ATTR static void wd_gemm(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha,
                                   const float *a, int64_t lda, const float *b, int64_t ldb,
                                   float beta, float *c, int64_t ldc, float *bp) {
  const int64_t ars = ta ? 1 : lda, acs = ta ? lda : 1; /* A(i, p) = a[i ars + p acs] */
  for (int64_t j0 = 0; j0 < n; j0 += WD_NR) {
    const int64_t w = n - j0 < WD_NR ? n - j0 : WD_NR;
    wd_pack(tb, k, b, ldb, j0, w, bp);
    wd_panel(m, k, a, ars, acs, bp, WD_NR, alpha, beta, c + j0, ldc, w);
  }
}

int ad__gemm_wide512(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                     int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
  if (m <= 0 || n <= 0 || k <= 0) return 0; /* the caller's general path handles these */
  _Alignas(64) float stack[WD_STACK];
  float *bp = stack;
  void *heap = NULL;
  if ((size_t)k * WD_NR > WD_STACK) {
    if (!(heap = aligned_alloc(64, (size_t)k * WD_NR * sizeof(float)))) return 0;
    bp = heap;
  }
  wd_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bp);
  free(heap);
  return 1;
}

#else

int ad__gemm_wide512(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                     int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
  (void)ta, (void)tb, (void)m, (void)n, (void)k, (void)alpha, (void)a, (void)lda, (void)b;
  (void)ldb, (void)beta, (void)c, (void)ldc;
  return 0;
}

#endif
