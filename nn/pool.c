/* pool.c — 2-D max and average pooling over NCHW, each with a fused
 * backward op whose own rule closes the loop.
 *
 * Max pooling is y = gather(x, argmax): piecewise a selection, so its VJP
 * scatters g back through the saved argmax index, and scatter and gather
 * (with that same index) are each other's adjoints:
 *   max_pool(x)       -> d = scatter(G)
 *   pool_scatter(G)   -> d = gather(H)      (linear in G)
 *   pool_gather(H)    -> d = scatter(G)     (linear in H)
 * Average pooling (divisor k*k, padding counted as zeros, PyTorch's
 * default) is linear; its VJP spreads g / k^2 over each window, and that
 * spread's VJP is the average pool again. */
#include "nn.h"

#include "autodiff/ad_internal.h"
#include "autodiff/ad_simd.h"
#include "nn_internal.h"

#include <float.h>
#include <string.h>

typedef struct nn__pool {
  int64_t n, c, h, w; /* input */
  int64_t p, q;       /* output */
  int64_t k, st, pad;
  int32_t *idx;    /* max pool: flat index into x of each output's maximum */
  int nan;         /* relu_max_pool2d: some pooled maximum is NaN ... */
  const void *src; /* ... of this input, which relu's NaN rule then reads */
  int v512;        /* the f32 2x2 rows may use AVX-512 (ad__blas_avx512_allowed) */
} pool_geom;

static void attr_pool(const ad_node *nd, char *buf, size_t len) {
  const pool_geom *g = nd->a.extra;
  snprintf(buf, len, "k=%lld stride=%lld pad=%lld", (long long)g->k, (long long)g->st,
           (long long)g->pad);
}

/* Fills g for a k x k pool of an [N, C, H, W] input (d) at stride and pad;
 * what names d in errors (its shape string). */
static int geom_dims(ad_tape *t, const char *op, const int64_t d[4], const char *what, int k,
                     int stride, int pad, pool_geom *g) {
  if (k < 1 || stride < 1 || pad < 0 || pad > k / 2) { /* not 2 * pad: it overflows an int */
    ad__fail(t, AD_ERR_ARG,
             "%s: kernel %d, stride %d, pad %d (need k, stride >= 1, 0 <= pad <= k/2)", op, k,
             stride, pad);
    return 0;
  }
  memset(g, 0, sizeof *g);
  g->n = d[0], g->c = d[1], g->h = d[2], g->w = d[3];
  g->k = k, g->st = stride, g->pad = pad;
  g->v512 = ad__blas_avx512_allowed();
  /* pad <= k / 2 here, so 2 * pad fits an int; h + 2 * pad is 64-bit. */
  int64_t hp, wp;
  if (nn__add_overflow(g->h, 2 * (int64_t)pad, &hp) ||
      nn__add_overflow(g->w, 2 * (int64_t)pad, &wp) || hp < k || wp < k) {
    ad__fail(t, AD_ERR_SHAPE, "%s: a %dx%d window does not fit %s padded by %d", op, k, k, what,
             pad);
    return 0;
  }
  g->p = (hp - k) / stride + 1;
  g->q = (wp - k) / stride + 1;
  return 1;
}

static int make_geom(ad_tape *t, const char *op, const ad_tensor *x, int k, int stride, int pad,
                     pool_geom *g) {
  if (!ad__check(t, op, 1, (ad_tensor *const *)&x)) return 0;
  char s[96];
  if (x->ndim != 4) {
    ad__fail(t, AD_ERR_SHAPE, "%s: x must be 4-D (NCHW), got %s", op, ad_shape_str(x, s, sizeof s));
    return 0;
  }
  return geom_dims(t, op, x->shape, ad_shape_str(x, s, sizeof s), k, stride, pad, g);
}

static const pool_geom *keep_geom(ad_tape *t, ad_node *nd, const pool_geom *g) {
  if (!nd) return NULL;
  pool_geom *copy = ad_arena_alloc(t, sizeof *copy);
  if (!copy) return NULL;
  *copy = *g;
  nd->a.extra = copy;
  return copy;
}

/* ------------------------------------------------------------------ kernels */

/* Window of output (p, q) clipped to the input: rows [h0, h1), cols [w0, w1). */
#define WINDOW(g, p, q)                                                                            \
  int64_t h0 = (p) * (g)->st - (g)->pad, w0 = (q) * (g)->st - (g)->pad;                            \
  int64_t h1 = h0 + (g)->k, w1 = w0 + (g)->k;                                                      \
  if (h0 < 0) h0 = 0;                                                                              \
  if (w0 < 0) w0 = 0;                                                                              \
  if (h1 > (g)->h) h1 = (g)->h;                                                                    \
  if (w1 > (g)->w) w1 = (g)->w

/* The 2x2 stride-2 rows four windows at a time (f32, SSE2: every x86-64):
 * the very compares of the scalar loops below, so the same values, indices
 * and ties, and the same NaN detection (a NaN row is redone the general
 * way). A row of Q >= 4 windows is done whole, its last four overlapping
 * the ones before when 4 does not divide Q (each window's stores are the
 * same both times); each returns the q it stopped at (Q, or 0 for a row of
 * fewer than four), the scalar loop does the rest.
 * f64 (and f32 without SSE2) do everything in the scalar loops. */
#if defined(__SSE2__)
#include <emmintrin.h>
static int64_t max2_row_f32(const float *a, const float *b, float *yr, int32_t *ir, int32_t base,
                            int32_t W, int64_t Q, int relu, int *nan) {
  if (Q < 4) return 0;
  const __m128 zero = _mm_setzero_ps();
  const __m128i step = _mm_setr_epi32(0, 2, 4, 6), vw = _mm_set1_epi32(W),
                ones = _mm_set1_epi32(-1);
  __m128 bad = zero;
  for (int64_t q0 = 0; q0 < Q; q0 += 4) {
    const int64_t q = q0 + 4 > Q ? Q - 4 : q0; /* the last four overlap: the same stores again */
    const __m128 a01 = _mm_loadu_ps(a + 2 * q), a23 = _mm_loadu_ps(a + 2 * q + 4);
    const __m128 b01 = _mm_loadu_ps(b + 2 * q), b23 = _mm_loadu_ps(b + 2 * q + 4);
    const __m128 a0 = _mm_shuffle_ps(a01, a23, _MM_SHUFFLE(2, 0, 2, 0));
    const __m128 a1 = _mm_shuffle_ps(a01, a23, _MM_SHUFFLE(3, 1, 3, 1));
    const __m128 b0 = _mm_shuffle_ps(b01, b23, _MM_SHUFFLE(2, 0, 2, 0));
    const __m128 b1 = _mm_shuffle_ps(b01, b23, _MM_SHUFFLE(3, 1, 3, 1));
    bad = _mm_or_ps(bad, _mm_or_ps(_mm_cmpunord_ps(a0, a1), _mm_cmpunord_ps(b0, b1)));
    /* maxps(x, y) is x > y ? x : y, the scalar select exactly */
    const __m128 ma = _mm_max_ps(a1, a0), mb = _mm_max_ps(b1, b0), m = _mm_max_ps(mb, ma);
    const __m128 keep = _mm_cmpgt_ps(m, zero);
    _mm_storeu_ps(yr + q, relu ? _mm_and_ps(m, keep) : m);
    if (ir) { /* pos = base + 2q + ia + bot (W + ib - ia), the masks being -1 for true */
      const __m128i ia = _mm_castps_si128(_mm_cmpgt_ps(a1, a0));
      const __m128i ib = _mm_castps_si128(_mm_cmpgt_ps(b1, b0));
      const __m128i bot = _mm_castps_si128(_mm_cmpgt_ps(mb, ma));
      __m128i pos = _mm_sub_epi32(_mm_add_epi32(_mm_set1_epi32(base + (int32_t)(2 * q)), step), ia);
      pos = _mm_add_epi32(pos, _mm_and_si128(bot, _mm_add_epi32(vw, _mm_sub_epi32(ia, ib))));
      if (relu) pos = _mm_xor_si128(pos, _mm_xor_si128(_mm_castps_si128(keep), ones)); /* ~pos */
      _mm_storeu_si128((__m128i *)(void *)(ir + q), pos);
    }
  }
  *nan |= _mm_movemask_ps(bad) != 0;
  return Q;
}
/* g at the argmax of each window (0 for a clipped one), 0 at its other
 * three elements: the window's four outputs by compares on the offset. */
static int64_t scatter2_row_f32(float *a, float *b, const float *yr, const int32_t *ir,
                                int32_t base, int32_t W, int64_t Q) {
  if (Q < 4) return 0;
  const __m128i step = _mm_setr_epi32(0, 2, 4, 6), z = _mm_setzero_si128(), one = _mm_set1_epi32(1),
                vw = _mm_set1_epi32(W), vw1 = _mm_set1_epi32(W + 1);
  for (int64_t q0 = 0; q0 < Q; q0 += 4) {
    const int64_t q = q0 + 4 > Q ? Q - 4 : q0; /* the last four overlap: the same stores again */
    const __m128i i = _mm_loadu_si128((const __m128i *)(const void *)(ir + q));
    const __m128i neg = _mm_srai_epi32(i, 31);
    const __m128i off = _mm_sub_epi32(_mm_xor_si128(i, neg),
                                      _mm_add_epi32(_mm_set1_epi32(base + (int32_t)(2 * q)), step));
    const __m128 v = _mm_andnot_ps(_mm_castsi128_ps(neg), _mm_loadu_ps(yr + q));
    const __m128 e0 = _mm_and_ps(v, _mm_castsi128_ps(_mm_cmpeq_epi32(off, z)));
    const __m128 e1 = _mm_and_ps(v, _mm_castsi128_ps(_mm_cmpeq_epi32(off, one)));
    const __m128 e2 = _mm_and_ps(v, _mm_castsi128_ps(_mm_cmpeq_epi32(off, vw)));
    const __m128 e3 = _mm_and_ps(v, _mm_castsi128_ps(_mm_cmpeq_epi32(off, vw1)));
    _mm_storeu_ps(a + 2 * q, _mm_unpacklo_ps(e0, e1));
    _mm_storeu_ps(a + 2 * q + 4, _mm_unpackhi_ps(e0, e1));
    _mm_storeu_ps(b + 2 * q, _mm_unpacklo_ps(e2, e3));
    _mm_storeu_ps(b + 2 * q + 4, _mm_unpackhi_ps(e2, e3));
  }
  return Q;
}
#else
static int64_t max2_row_f32(const float *a, const float *b, float *yr, int32_t *ir, int32_t base,
                            int32_t W, int64_t Q, int relu, int *nan) {
  (void)a, (void)b, (void)yr, (void)ir, (void)base, (void)W, (void)Q, (void)relu, (void)nan;
  return 0;
}
static int64_t scatter2_row_f32(float *a, float *b, const float *yr, const int32_t *ir,
                                int32_t base, int32_t W, int64_t Q) {
  (void)a, (void)b, (void)yr, (void)ir, (void)base, (void)W, (void)Q;
  return 0;
}
#endif

/* The same 2x2 stride-2 rows with AVX-512 (taken where
 * ad__blas_avx512_allowed says so: the CPU runs it and HYPERTAPE_BLIS_ARCH
 * does not ask for an AVX2-only kernel set), sixteen windows at a time and
 * the row's tail under a lane mask, so a row of 14 or 7 windows (MNIST's
 * 28x28 and 14x14 planes) is one step. The same compares as the SSE2 and
 * scalar loops (vmaxps is x > y ? x : y too): the same values, indices,
 * ties and NaN detection. */
#if AD_X86 && defined(__GNUC__)
#define POOL_HAVE_512 1
AD_AVX512_ATTR static inline int64_t max2_row_512(const float *a, const float *b, float *yr,
                                                  int32_t *ir, int32_t base, int32_t W, int64_t Q,
                                                  int relu, int *nan) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i step = even, one = _mm512_set1_epi32(1), vw = _mm512_set1_epi32(W);
  const __m512 zero = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t q = 0; q < Q; q += 16) {
    const int64_t n = Q - q < 16 ? Q - q : 16; /* windows in this step */
    const __mmask16 mq = (__mmask16)((1u << n) - 1);
    const __mmask16 lo = (__mmask16)(n >= 8 ? 0xffffu : (1u << 2 * n) - 1);
    const __mmask16 hi = (__mmask16)(n <= 8 ? 0 : (1u << (2 * n - 16)) - 1);
    const float *pa = a + 2 * q, *pb = b + 2 * q;
    const __m512 al = _mm512_maskz_loadu_ps(lo, pa), ah = _mm512_maskz_loadu_ps(hi, pa + 16);
    const __m512 bl = _mm512_maskz_loadu_ps(lo, pb), bh = _mm512_maskz_loadu_ps(hi, pb + 16);
    const __m512 a0 = _mm512_permutex2var_ps(al, even, ah),
                 a1 = _mm512_permutex2var_ps(al, odd, ah);
    const __m512 b0 = _mm512_permutex2var_ps(bl, even, bh),
                 b1 = _mm512_permutex2var_ps(bl, odd, bh);
    bad |= _mm512_cmp_ps_mask(a0, a1, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b0, b1, _CMP_UNORD_Q);
    const __m512 ma = _mm512_max_ps(a1, a0), mb = _mm512_max_ps(b1, b0), m = _mm512_max_ps(mb, ma);
    const __mmask16 keep = _mm512_cmp_ps_mask(m, zero, _CMP_GT_OQ);
    _mm512_mask_storeu_ps(yr + q, mq, relu ? _mm512_maskz_mov_ps(keep, m) : m);
    if (ir) { /* pos = base + 2q + ia + bot (W + ib - ia) */
      const __mmask16 ia = _mm512_cmp_ps_mask(a1, a0, _CMP_GT_OQ);
      const __mmask16 ib = _mm512_cmp_ps_mask(b1, b0, _CMP_GT_OQ);
      const __mmask16 bot = _mm512_cmp_ps_mask(mb, ma, _CMP_GT_OQ);
      __m512i pos = _mm512_add_epi32(_mm512_set1_epi32(base + (int32_t)(2 * q)), step);
      pos = _mm512_mask_add_epi32(pos, ia, pos, one);
      __m512i dw = _mm512_mask_add_epi32(vw, ib, vw, one);
      dw = _mm512_mask_sub_epi32(dw, ia, dw, one);
      pos = _mm512_mask_add_epi32(pos, bot, pos, dw);
      if (relu) pos = _mm512_mask_xor_epi32(pos, (__mmask16)~keep, pos, _mm512_set1_epi32(-1));
      _mm512_mask_storeu_epi32(ir + q, mq, pos);
    }
  }
  *nan |= bad != 0;
  return Q;
}
AD_AVX512_ATTR static inline int64_t scatter2_row_512(float *a, float *b, const float *yr,
                                                      const int32_t *ir, int32_t base, int32_t W,
                                                      int64_t Q) {
  const __m512i step = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  /* interleave e0, e1: lanes 0..7 of each for the low 16, 8..15 for the high */
  const __m512i il = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ih = _mm512_add_epi32(il, _mm512_set1_epi32(8));
  const __m512i one = _mm512_set1_epi32(1), vw = _mm512_set1_epi32(W),
                vw1 = _mm512_set1_epi32(W + 1), z = _mm512_setzero_si512();
  for (int64_t q = 0; q < Q; q += 16) {
    const int64_t n = Q - q < 16 ? Q - q : 16;
    const __mmask16 mq = (__mmask16)((1u << n) - 1);
    const __mmask16 lo = (__mmask16)(n >= 8 ? 0xffffu : (1u << 2 * n) - 1);
    const __mmask16 hi = (__mmask16)(n <= 8 ? 0 : (1u << (2 * n - 16)) - 1);
    const __m512i i = _mm512_maskz_loadu_epi32(mq, ir + q);
    const __m512i neg = _mm512_srai_epi32(i, 31);
    const __m512i off =
        _mm512_sub_epi32(_mm512_xor_si512(i, neg),
                         _mm512_add_epi32(_mm512_set1_epi32(base + (int32_t)(2 * q)), step));
    /* g where the window passes relu (i >= 0), else 0 */
    const __m512 v = _mm512_maskz_loadu_ps((__mmask16)(mq & _mm512_cmpge_epi32_mask(i, z)), yr + q);
    const __m512 e0 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(off, z), v);
    const __m512 e1 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(off, one), v);
    const __m512 e2 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(off, vw), v);
    const __m512 e3 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(off, vw1), v);
    float *pa = a + 2 * q, *pb = b + 2 * q;
    _mm512_mask_storeu_ps(pa, lo, _mm512_permutex2var_ps(e0, il, e1));
    _mm512_mask_storeu_ps(pa + 16, hi, _mm512_permutex2var_ps(e0, ih, e1));
    _mm512_mask_storeu_ps(pb, lo, _mm512_permutex2var_ps(e2, il, e3));
    _mm512_mask_storeu_ps(pb + 16, hi, _mm512_permutex2var_ps(e2, ih, e3));
  }
  return Q;
}

/* Whole planes (rows 2p, 2p + 1 for every p) in one call, the rows'
 * constants and the call out of the loop over rows. max2: returns 0 when
 * some window holds a NaN, for the caller to redo the plane row by row
 * (which lets the NaN win). scatter2: also zeroes the columns and rows
 * past the last window. */
AD_AVX512_ATTR static int max2_plane_512(const float *xp, float *yp, int32_t *ip, int32_t base,
                                         int32_t W, int64_t P, int64_t Q, int relu) {
  int nan = 0;
  for (int64_t p = 0; p < P; p++) {
    const float *a = xp + 2 * p * W;
    max2_row_512(a, a + W, yp + p * Q, ip ? ip + p * Q : NULL, base + (int32_t)(2 * p * W), W, Q,
                 relu, &nan);
  }
  return !nan;
}
AD_AVX512_ATTR static void scatter2_plane_512(float *xp, const float *yp, const int32_t *ip,
                                              int32_t base, int32_t W, int64_t H, int64_t P,
                                              int64_t Q) {
  for (int64_t p = 0; p < P; p++) {
    float *a = xp + 2 * p * W, *b = a + W;
    scatter2_row_512(a, b, yp + p * Q, ip + p * Q, base + (int32_t)(2 * p * W), W, Q);
    for (int64_t j = 2 * Q; j < W; j++) a[j] = b[j] = 0;
  }
  for (int64_t i = 2 * P * W; i < H * W; i++) xp[i] = 0;
}
#else
#define POOL_HAVE_512 0
#endif

/* The f32 planes by AVX-512 where allowed (v512); 0: not done, the rows
 * go one by one (SSE2 and scalar). */
static int max2_plane_f32(const float *xp, float *yp, int32_t *ip, int32_t base, int32_t W,
                          int64_t P, int64_t Q, int relu, int v512) {
#if POOL_HAVE_512
  if (v512) return max2_plane_512(xp, yp, ip, base, W, P, Q, relu);
#endif
  (void)xp, (void)yp, (void)ip, (void)base, (void)W, (void)P, (void)Q, (void)relu, (void)v512;
  return 0;
}
static int scatter2_plane_f32(float *xp, const float *yp, const int32_t *ip, int32_t base,
                              int32_t W, int64_t H, int64_t P, int64_t Q, int v512) {
#if POOL_HAVE_512
  if (v512) {
    scatter2_plane_512(xp, yp, ip, base, W, H, P, Q);
    return 1;
  }
#endif
  (void)xp, (void)yp, (void)ip, (void)base, (void)W, (void)H, (void)P, (void)Q, (void)v512;
  return 0;
}
static int max2_plane_f64(const double *xp, double *yp, int32_t *ip, int32_t base, int32_t W,
                          int64_t P, int64_t Q, int relu, int v512) {
  (void)xp, (void)yp, (void)ip, (void)base, (void)W, (void)P, (void)Q, (void)relu, (void)v512;
  return 0;
}
static int scatter2_plane_f64(double *xp, const double *yp, const int32_t *ip, int32_t base,
                              int32_t W, int64_t H, int64_t P, int64_t Q, int v512) {
  (void)xp, (void)yp, (void)ip, (void)base, (void)W, (void)H, (void)P, (void)Q, (void)v512;
  return 0;
}
static int64_t max2_row_f64(const double *a, const double *b, double *yr, int32_t *ir, int32_t base,
                            int32_t W, int64_t Q, int relu, int *nan) {
  (void)a, (void)b, (void)yr, (void)ir, (void)base, (void)W, (void)Q, (void)relu, (void)nan;
  return 0;
}
static int64_t scatter2_row_f64(double *a, double *b, const double *yr, const int32_t *ir,
                                int32_t base, int32_t W, int64_t Q) {
  (void)a, (void)b, (void)yr, (void)ir, (void)base, (void)W, (void)Q;
  return 0;
}

/* Every kernel covers the planes (n, c) in [nc0, nc1): a plane's outputs
 * read and write only that plane, so the planes split over the worker
 * threads with the same results however they are split.
 *
 * Index encoding (idx[o], a flat index into x): the maximum of window o is
 * at idx[o] when idx[o] >= 0. The fused relu_max_pool2d stores ~pos (< 0)
 * for a window whose maximum is not above 0: relu clips it, so its output
 * is 0 and its gradient reaches no input. */
#define DEF_KERNELS(T, SFX, UT)                                                                    \
  /* v, or +0 when the window is clipped (i < 0), by a mask on the bits: a                         \
   * select here compiles to a branch that mispredicts on real data. */                            \
  static inline T masked_##SFX(T v, int32_t i) {                                                   \
    UT b;                                                                                          \
    memcpy(&b, &v, sizeof b);                                                                      \
    b &= ~(UT)(-(int64_t)(i < 0));                                                                 \
    memcpy(&v, &b, sizeof b);                                                                      \
    return v;                                                                                      \
  }                                                                                                \
  /* y [N, C, P, Q] = max over windows of x [N, C, H, W] (relu: then                               \
   * max(., 0), NaN kept); idx (may be NULL) gets the flat index of the                            \
   * first maximum (NaN wins, as in the core). Returns whether some output                         \
   * is NaN. The compares are written as selects so they compile to                                \
   * branch-free code: on real data the max is unpredictable and branches                          \
   * mispredict. */                                                                                \
  static int maxpool_##SFX(const pool_geom *g, const T *x, T *y, int32_t *idx, int64_t nc0,        \
                           int64_t nc1, int relu, int64_t xoff) {                                  \
    const int64_t W = g->w, hw = g->h * g->w, pq = g->p * g->q;                                    \
    const int fast2 = g->k == 2 && g->st == 2 && g->pad == 0;                                      \
    int any_nan = 0;                                                                               \
    for (int64_t nc = nc0; nc < nc1; nc++) {                                                       \
      const T *xp = x + (nc - xoff) * hw; /* x holds the planes from xoff on */                    \
      T *yp = y + nc * pq;                                                                         \
      int32_t *ip = idx ? idx + nc * pq : NULL;                                                    \
      if (fast2 &&                                                                                 \
          max2_plane_##SFX(xp, yp, ip, (int32_t)(nc * hw), (int32_t)W, g->p, g->q, relu, g->v512)) \
        continue;                                                                                  \
      for (int64_t p = 0; p < g->p; p++) {                                                         \
        if (fast2) { /* 2x2 windows, stride 2: rows 2p and 2p+1, as a tree: */                     \
          const T *a = xp + 2 * p * W, *b = a + W; /* max(a0, a1) vs max(b0, b1) */                \
          T *yr = yp + p * g->q;                                                                   \
          int32_t *ir = ip ? ip + p * g->q : NULL;                                                 \
          const int32_t base = (int32_t)(nc * hw + 2 * p * W);                                     \
          int nan = 0;                                                                             \
          const int64_t qv = max2_row_##SFX(a, b, yr, ir, base, (int32_t)W, g->q, relu, &nan);     \
          if (!ir) {                                                                               \
            for (int64_t q = qv; q < g->q; q++) {                                                  \
              const T a0 = a[2 * q], a1 = a[2 * q + 1], b0 = b[2 * q], b1 = b[2 * q + 1];          \
              const T ma = a1 > a0 ? a1 : a0, mb = b1 > b0 ? b1 : b0;                              \
              const T m = mb > ma ? mb : ma; /* ties go to the first (top) row */                  \
              yr[q] = relu && !(m > 0) ? 0 : m;                                                    \
              nan |= (a0 != a0) | (a1 != a1) | (b0 != b0) | (b1 != b1);                            \
            }                                                                                      \
          } else { /* the index by arithmetic on the compares: no branch to mispredict */          \
            for (int64_t q = qv; q < g->q; q++) {                                                  \
              const T a0 = a[2 * q], a1 = a[2 * q + 1], b0 = b[2 * q], b1 = b[2 * q + 1];          \
              const int32_t ia = a1 > a0, ib = b1 > b0;                                            \
              const T ma = a1 > a0 ? a1 : a0, mb = b1 > b0 ? b1 : b0;                              \
              const int32_t bot = mb > ma;                                                         \
              const T m = mb > ma ? mb : ma;                                                       \
              const int32_t pos = base + (int32_t)(2 * q) + ia + bot * ((int32_t)W + ib - ia);     \
              const int blk = relu && !(m > 0); /* no NaN here: a NaN row is redone */             \
              yr[q] = blk ? 0 : m;                                                                 \
              ir[q] = blk ? ~pos : pos;                                                            \
              nan |= (a0 != a0) | (a1 != a1) | (b0 != b0) | (b1 != b1);                            \
            }                                                                                      \
          }                                                                                        \
          if (!nan) continue; /* else redo the row the general way, NaN winning */                 \
        }                                                                                          \
        for (int64_t q = 0; q < g->q; q++) {                                                       \
          WINDOW(g, p, q);                                                                         \
          int64_t best = h0 * W + w0;                                                              \
          T m = xp[best];                                                                          \
          for (int64_t i = h0; i < h1; i++)                                                        \
            for (int64_t j = w0; j < w1; j++) {                                                    \
              T v = xp[i * W + j];                                                                 \
              int take = v > m || (v != v && m == m);                                              \
              m = take ? v : m, best = take ? i * W + j : best;                                    \
            }                                                                                      \
          const int blk = relu && !(m > 0) && m == m; /* relu(NaN) = NaN, as in the core */        \
          any_nan |= m != m;                                                                       \
          yp[p * g->q + q] = blk ? 0 : m;                                                          \
          if (ip) ip[p * g->q + q] = (int32_t)(nc * hw + best) ^ (blk ? -1 : 0);                   \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
    return any_nan;                                                                                \
  }                                                                                                \
  /* y [N, C, P, Q] = sum over windows of x / k^2 */                                               \
  static void avgpool_##SFX(const pool_geom *g, const T *x, T *y, int64_t nc0, int64_t nc1) {      \
    int64_t hw = g->h * g->w, pq = g->p * g->q;                                                    \
    T inv = (T)1 / (T)(g->k * g->k);                                                               \
    for (int64_t nc = nc0; nc < nc1; nc++) {                                                       \
      const T *xp = x + nc * hw;                                                                   \
      for (int64_t p = 0; p < g->p; p++)                                                           \
        for (int64_t q = 0; q < g->q; q++) {                                                       \
          WINDOW(g, p, q);                                                                         \
          T s = 0;                                                                                 \
          for (int64_t i = h0; i < h1; i++)                                                        \
            for (int64_t j = w0; j < w1; j++) s += xp[i * g->w + j];                               \
          y[nc * pq + p * g->q + q] = s * inv;                                                     \
        }                                                                                          \
    }                                                                                              \
  }                                                                                                \
  /* x [N, C, H, W] = spread of y / k^2 over the windows (zeroed first) */                         \
  static void avgpool_bwd_##SFX(const pool_geom *g, const T *y, T *x, int64_t nc0, int64_t nc1) {  \
    int64_t hw = g->h * g->w, pq = g->p * g->q;                                                    \
    T inv = (T)1 / (T)(g->k * g->k);                                                               \
    memset(x + nc0 * hw, 0, sizeof(T) * (size_t)((nc1 - nc0) * hw));                               \
    for (int64_t nc = nc0; nc < nc1; nc++) {                                                       \
      T *xp = x + nc * hw;                                                                         \
      for (int64_t p = 0; p < g->p; p++)                                                           \
        for (int64_t q = 0; q < g->q; q++) {                                                       \
          WINDOW(g, p, q);                                                                         \
          T v = y[nc * pq + p * g->q + q] * inv;                                                   \
          for (int64_t i = h0; i < h1; i++)                                                        \
            for (int64_t j = w0; j < w1; j++) xp[i * g->w + j] += v;                               \
        }                                                                                          \
    }                                                                                              \
  }                                                                                                \
  /* x = 0, then x[idx[o]] += y[o] for the outputs o of the planes; a                              \
   * clipped window (idx < 0) adds nothing. */                                                     \
  static void scatter_##SFX(const pool_geom *g, const int32_t *idx, const T *y, T *x, int64_t nc0, \
                            int64_t nc1, int64_t xoff) {                                           \
    const int64_t hw = g->h * g->w, pq = g->p * g->q;                                              \
    memset(x + (nc0 - xoff) * hw, 0, sizeof(T) * (size_t)((nc1 - nc0) * hw));                      \
    for (int64_t o = nc0 * pq; o < nc1 * pq; o++) /* x never holds -0: adding +0 is a no-op */     \
      x[(idx[o] ^ -(int32_t)(idx[o] < 0)) - xoff * hw] += masked_##SFX(y[o], idx[o]);              \
  }                                                                                                \
  /* The same for 2x2 windows at stride 2 that tile x: every input element                         \
   * is written once (g at the argmax, 0 elsewhere), one streaming pass                            \
   * instead of a memset and scattered adds. Rows/columns past the last                            \
   * window (odd H or W) are zeroed. A clipped window stores 0 at ~idx. */                         \
  static void scatter2_##SFX(const pool_geom *g, const int32_t *idx, const T *y, T *x,             \
                             int64_t nc0, int64_t nc1, int64_t xoff) {                             \
    const int64_t W = g->w, hw = g->h * g->w, pq = g->p * g->q;                                    \
    for (int64_t nc = nc0; nc < nc1; nc++) {                                                       \
      T *xp = x + (nc - xoff) * hw; /* x holds the planes from xoff on */                          \
      if (scatter2_plane_##SFX(xp, y + nc * pq, idx + nc * pq, (int32_t)(nc * hw), (int32_t)W,     \
                               g->h, g->p, g->q, g->v512))                                         \
        continue;                                                                                  \
      for (int64_t p = 0; p < g->p; p++) {                                                         \
        T *a = xp + 2 * p * W, *b = a + W;                                                         \
        const T *yr = y + nc * pq + p * g->q;                                                      \
        const int32_t *ir = idx + nc * pq + p * g->q;                                              \
        const int64_t qv =                                                                         \
            scatter2_row_##SFX(a, b, yr, ir, (int32_t)(nc * hw + 2 * p * W), (int32_t)W, g->q);    \
        for (int64_t q = qv; q < g->q; q++) { /* zero the window, then store g at the argmax */    \
          a[2 * q] = a[2 * q + 1] = b[2 * q] = b[2 * q + 1] = 0;                                   \
          const int32_t i = ir[q];                                                                 \
          xp[(i ^ -(int32_t)(i < 0)) - nc * hw] = masked_##SFX(yr[q], i);                          \
        }                                                                                          \
        for (int64_t j = 2 * g->q; j < W; j++) a[j] = b[j] = 0;                                    \
      }                                                                                            \
      for (int64_t i = 2 * g->p * W; i < hw; i++) xp[i] = 0;                                       \
    }                                                                                              \
  }                                                                                                \
  /* y[o] = x[idx[o]], 0 for a clipped window. */                                                  \
  static void gather_##SFX(const pool_geom *g, const int32_t *idx, const T *x, T *y, int64_t nc0,  \
                           int64_t nc1) {                                                          \
    const int64_t pq = g->p * g->q;                                                                \
    for (int64_t o = nc0 * pq; o < nc1 * pq; o++) {                                                \
      const int32_t i = idx[o];                                                                    \
      y[o] = masked_##SFX(x[i ^ -(int32_t)(i < 0)], i);                                            \
    }                                                                                              \
  }                                                                                                \
  /* relu's NaN rule for the fused op's linear maps: where the pooled                              \
   * maximum (src[idx[o]]) is NaN, relu_backward gives NaN whatever the                            \
   * incoming gradient; scatter (to_x) or gather output gets it there. */                          \
  static void nan_fix_##SFX(const pool_geom *g, const T *src, T *out, int to_x, int64_t nc0,       \
                            int64_t nc1) {                                                         \
    const int64_t pq = g->p * g->q;                                                                \
    for (int64_t o = nc0 * pq; o < nc1 * pq; o++) {                                                \
      const int32_t i = g->idx[o];                                                                 \
      if (i >= 0 && src[i] != src[i]) out[to_x ? i : o] = src[i];                                  \
    }                                                                                              \
  }

DEF_KERNELS(float, f32, uint32_t)
DEF_KERNELS(double, f64, uint64_t)

/* ------------------------------------------------------------------ threaded kernels */

enum { K_MAX, K_AVG, K_AVG_BWD, K_SCATTER, K_GATHER };

typedef struct {
  int kind, relu;
  ad_dtype dt;
  const pool_geom *g;
  const void *in;
  void *out;
  int *nan;    /* K_MAX: per part, whether some output is NaN */
  int64_t nc0; /* the planes [nc0, nc0 + n) of the call; K_MAX: in holds them from nc0 on */
} pool_job;

static void pool_part(void *ctx, int part, int64_t lo, int64_t hi) {
  const pool_job *j = ctx;
  lo += j->nc0, hi += j->nc0;
  const pool_geom *g = j->g;
  const int f = j->dt == AD_F32;
  const int tiled2 = g->k == 2 && g->st == 2 && g->pad == 0;
  switch (j->kind) {
  case K_MAX:
    j->nan[part] = f ? maxpool_f32(g, j->in, j->out, g->idx, lo, hi, j->relu, j->nc0)
                     : maxpool_f64(g, j->in, j->out, g->idx, lo, hi, j->relu, j->nc0);
    break;
  case K_AVG:
    f ? avgpool_f32(g, j->in, j->out, lo, hi) : avgpool_f64(g, j->in, j->out, lo, hi);
    break;
  case K_AVG_BWD:
    f ? avgpool_bwd_f32(g, j->in, j->out, lo, hi) : avgpool_bwd_f64(g, j->in, j->out, lo, hi);
    break;
  case K_SCATTER:
    if (tiled2)
      f ? scatter2_f32(g, g->idx, j->in, j->out, lo, hi, j->nc0)
        : scatter2_f64(g, g->idx, j->in, j->out, lo, hi, j->nc0);
    else
      f ? scatter_f32(g, g->idx, j->in, j->out, lo, hi, j->nc0)
        : scatter_f64(g, g->idx, j->in, j->out, lo, hi, j->nc0);
    if (g->nan) /* after the scatter: its NaNs overwrite what it stored */
      f ? nan_fix_f32(g, g->src, j->out, 1, lo, hi) : nan_fix_f64(g, g->src, j->out, 1, lo, hi);
    break;
  default: /* K_GATHER */
    f ? gather_f32(g, g->idx, j->in, j->out, lo, hi) : gather_f64(g, g->idx, j->in, j->out, lo, hi);
    if (g->nan)
      f ? nan_fix_f32(g, g->src, j->out, 0, lo, hi) : nan_fix_f64(g, g->src, j->out, 0, lo, hi);
    break;
  }
}

/* Runs a kernel over the planes [nc0, nc1) of the N*C, split over the
 * worker threads (a few planes per part at least: small pools stay on the
 * caller's thread). K_MAX reads in and K_SCATTER writes out from plane
 * nc0 on (it points at plane nc0: a chunk of images, nn__relu_pool_planes
 * and nn__relu_pool_scatter_planes); the others index in and out from
 * plane 0. The NaN fix-up (g->nan) is for whole tensors only. Returns whether some part saw a NaN
 * output (K_MAX). */
static int pool_run_planes(ad_tape *t, int kind, int relu, ad_dtype dt, const pool_geom *g,
                           const void *in, void *out, int64_t nc0, int64_t nc1, int *ok) {
  int64_t planes = nc1 - nc0, per = g->h * g->w + 1;
  int64_t grain = 1 + 8192 / per; /* ~8K input elements per part at least */
  int parts = ad__par_parts(planes, grain);
  int *nan = ad_arena_alloc(t, sizeof(int) * (size_t)parts);
  *ok = nan != NULL;
  if (!nan) return 0;
  for (int p = 0; p < parts; p++) nan[p] = 0;
  pool_job j = {kind, relu, dt, g, in, out, nan, nc0};
  ad__par_for(planes, grain, pool_part, &j);
  int any = 0;
  for (int p = 0; p < parts; p++) any |= nan[p];
  return any;
}

static int pool_run(ad_tape *t, int kind, int relu, ad_dtype dt, const pool_geom *g, const void *in,
                    void *out, int *ok) {
  return pool_run_planes(t, kind, relu, dt, g, in, out, 0, g->n * g->c, ok);
}

/* ------------------------------------------------------------------ scatter / gather */

static ad_tensor *pool_scatter(ad_tape *t, ad_tensor *gy, const pool_geom *g);
static ad_tensor *pool_gather(ad_tape *t, ad_tensor *h, const pool_geom *g);

/* scatter and gather with one index are adjoint: <H, scatter(G)> = <gather(H), G>.
 * For the fused relu_max_pool2d both carry relu's mask (the clipped windows,
 * idx < 0), and the pair stays adjoint: scatter(m . G) against gather(H) . m. */
static void vjp_scatter(ad_tape *t, const ad_node *nd, ad_tensor *H, ad_tensor **gin,
                        const int *need) {
  if (need[0]) gin[0] = pool_gather(t, H, nd->a.extra);
}
static const ad_op_def OP_POOL_SCATTER = {"max_pool2d_backward", vjp_scatter, attr_pool, {0}};

static void vjp_gather(ad_tape *t, const ad_node *nd, ad_tensor *G, ad_tensor **gin,
                       const int *need) {
  if (need[0]) gin[0] = pool_scatter(t, G, nd->a.extra);
}
static const ad_op_def OP_POOL_GATHER = {"max_pool2d_gather", vjp_gather, attr_pool, {0}};

/* x-shaped gradient from a y-shaped one: x[idx[o]] += g[o]. */
static ad_tensor *pool_scatter(ad_tape *t, ad_tensor *gy, const pool_geom *g) {
  if (!gy) return NULL;
  int64_t shape[4] = {g->n, g->c, g->h, g->w};
  ad_tensor *gx = ad__alloc(t, gy->dtype, 4, shape, 0);
  if (!gx) return NULL;
  int ok;
  pool_run(t, K_SCATTER, 0, gy->dtype, g, gy->data, gx->data, &ok);
  if (!ok) return NULL;
  ad_node *nd = ad__record(t, &OP_POOL_SCATTER, gx, 1, &gy);
  if (nd) nd->a.extra = (void *)g; /* the geometry lives as long as the forward node */
  return ad__done(t, gx, "max_pool2d_backward");
}

/* y-shaped values picked from an x-shaped tensor: y[o] = h[idx[o]]. */
static ad_tensor *pool_gather(ad_tape *t, ad_tensor *h, const pool_geom *g) {
  if (!h) return NULL;
  int64_t shape[4] = {g->n, g->c, g->p, g->q};
  ad_tensor *y = ad__alloc(t, h->dtype, 4, shape, 0);
  if (!y) return NULL;
  int ok;
  pool_run(t, K_GATHER, 0, h->dtype, g, h->data, y->data, &ok);
  if (!ok) return NULL;
  ad_node *nd = ad__record(t, &OP_POOL_GATHER, y, 1, &h);
  if (nd) nd->a.extra = (void *)g;
  return ad__done(t, y, "max_pool2d_gather");
}

/* ------------------------------------------------------------------ max pool */

static void vjp_maxpool(ad_tape *t, const ad_node *nd, ad_tensor *G, ad_tensor **gin,
                        const int *need) {
  if (need[0]) gin[0] = pool_scatter(t, G, nd->a.extra);
}
static const ad_op_def OP_MAXPOOL = {"max_pool2d", vjp_maxpool, attr_pool, {0}};
/* relu_max_pool2d(x) = relu(max_pool2d(x)) = max_pool2d(relu(x)) (max and
 * relu commute): d = scatter(relu_backward(G, m)) with m the pooled
 * maximum, i.e. G goes to the argmax of each window whose m > 0 (NaN at a
 * NaN m, as relu_backward gives), nothing from the others. The scatter
 * and its gather carry that mask in the index, so both stay linear in
 * their input and the rule differentiates again like max_pool2d's. */
static const ad_op_def OP_RELU_MAXPOOL = {"relu_max_pool2d", vjp_maxpool, attr_pool, {0}};

static ad_tensor *maxpool_op(ad_tape *t, const char *op, ad_tensor *x, int k, int stride, int pad,
                             int relu) {
  pool_geom g;
  if (!make_geom(t, op, x, k, stride, pad, &g)) return NULL;
  if (x->size > INT32_MAX)
    return ad__fail(t, AD_ERR_SHAPE, "%s: more than 2^31 input elements", op);
  int64_t shape[4] = {g.n, g.c, g.p, g.q};
  ad_tensor *y = ad__alloc(t, x->dtype, 4, shape, 0);
  if (!y) return NULL;
  /* The index is needed only when the node is recorded. */
  int rec = ad__recording(t) && ad_needs_grad(x);
  if (rec && !(g.idx = ad_arena_alloc(t, sizeof(int32_t) * (size_t)y->size))) return NULL;
  int ok;
  int nan = pool_run(t, K_MAX, relu, x->dtype, &g, x->data, y->data, &ok);
  if (!ok) return NULL;
  if (relu && nan) g.nan = 1, g.src = x->data; /* x lives as long as the node */
  if (rec && !keep_geom(t, ad__record(t, relu ? &OP_RELU_MAXPOOL : &OP_MAXPOOL, y, 1, &x), &g))
    return NULL;
  return ad__done(t, y, relu ? "relu_max_pool2d" : "max_pool2d");
}

ad_tensor *nn_max_pool2d(ad_tape *t, ad_tensor *x, int k, int stride, int pad) {
  return maxpool_op(t, "nn_max_pool2d", x, k, stride, pad, 0);
}

ad_tensor *nn_relu_max_pool2d(ad_tape *t, ad_tensor *x, int k, int stride, int pad) {
  return maxpool_op(t, "nn_relu_max_pool2d", x, k, stride, pad, 1);
}

/* ------------------------------------------------------------------ for conv.c */
/* nn_conv2d_relu_max_pool2d (conv.c) pools its convolution chunk by chunk
 * of images, from a workspace, never forming the convolution's output. */

nn__pool *nn__relu_pool_plan(ad_tape *t, const char *op, const int64_t xshape[4], int k, int stride,
                             int pad, int rec) {
  pool_geom g;
  char s[128];
  snprintf(s, sizeof s, "[%lld, %lld, %lld, %lld]", (long long)xshape[0], (long long)xshape[1],
           (long long)xshape[2], (long long)xshape[3]);
  if (!geom_dims(t, op, xshape, s, k, stride, pad, &g)) return NULL;
  int64_t hw, chw, nchw, pq, out;
  if (nn__mul_overflow(g.h, g.w, &hw) || nn__mul_overflow(hw, g.c, &chw) ||
      nn__mul_overflow(chw, g.n, &nchw) || nchw > INT32_MAX || nn__mul_overflow(g.p, g.q, &pq) ||
      nn__mul_overflow(pq, g.c * g.n, &out)) {
    ad__fail(t, AD_ERR_SHAPE, "%s: more than 2^31 elements before the pool (%s)", op, s);
    return NULL;
  }
  if (rec && !(g.idx = ad_arena_alloc(t, sizeof(int32_t) * (size_t)out))) return NULL;
  pool_geom *copy = ad_arena_alloc(t, sizeof *copy);
  if (!copy) return NULL;
  *copy = g;
  return copy;
}

void nn__relu_pool_shape(const nn__pool *g, int64_t shape[4]) {
  shape[0] = g->n, shape[1] = g->c, shape[2] = g->p, shape[3] = g->q;
}

int nn__relu_pool_planes(ad_tape *t, const nn__pool *g, ad_dtype dt, const void *x, void *y,
                         int64_t nc0, int64_t nc1, int *ok) {
  return pool_run_planes(t, K_MAX, 1, dt, g, x, y, nc0, nc1, ok);
}

int nn__relu_pool_planes_serial(const nn__pool *g, ad_dtype dt, const void *x, void *y, int64_t nc0,
                                int64_t nc1) {
  return dt == AD_F32 ? maxpool_f32(g, x, y, g->idx, nc0, nc1, 1, nc0)
                      : maxpool_f64(g, x, y, g->idx, nc0, nc1, 1, nc0);
}

void nn__relu_pool_scatter_planes(ad_tape *t, const nn__pool *g, ad_dtype dt, const void *gy,
                                  void *x, int64_t nc0, int64_t nc1, int *ok) {
  pool_run_planes(t, K_SCATTER, 0, dt, g, gy, x, nc0, nc1, ok);
}

void nn__relu_pool_scatter_planes_serial(const nn__pool *g, ad_dtype dt, const void *gy, void *x,
                                         int64_t nc0, int64_t nc1) {
  pool_job j = {K_SCATTER, 0, dt, g, gy, x, NULL, nc0};
  pool_part(&j, 0, 0, nc1 - nc0);
}

ad_tensor *nn__relu_pool_scatter(ad_tape *t, ad_tensor *gy, const nn__pool *g) {
  return pool_scatter(t, gy, g);
}

/* ------------------------------------------------------------------ average pool */

static ad_tensor *avgpool_geom(ad_tape *t, ad_tensor *x, const pool_geom *g);
static ad_tensor *avgpool_bwd_geom(ad_tape *t, ad_tensor *gy, const pool_geom *g);

static void vjp_avgpool(ad_tape *t, const ad_node *nd, ad_tensor *G, ad_tensor **gin,
                        const int *need) {
  if (need[0]) gin[0] = avgpool_bwd_geom(t, G, nd->a.extra);
}
static const ad_op_def OP_AVGPOOL = {"avg_pool2d", vjp_avgpool, attr_pool, {0}};

static void vjp_avgpool_bwd(ad_tape *t, const ad_node *nd, ad_tensor *H, ad_tensor **gin,
                            const int *need) {
  if (need[0]) gin[0] = avgpool_geom(t, H, nd->a.extra);
}
static const ad_op_def OP_AVGPOOL_BWD = {"avg_pool2d_backward", vjp_avgpool_bwd, attr_pool, {0}};

static ad_tensor *avgpool_geom(ad_tape *t, ad_tensor *x, const pool_geom *g) {
  if (!x) return NULL;
  int64_t shape[4] = {g->n, g->c, g->p, g->q};
  ad_tensor *y = ad__alloc(t, x->dtype, 4, shape, 0);
  if (!y) return NULL;
  int ok;
  pool_run(t, K_AVG, 0, x->dtype, g, x->data, y->data, &ok);
  if (!ok) return NULL;
  ad_node *nd = ad__record(t, &OP_AVGPOOL, y, 1, &x);
  if (nd && !keep_geom(t, nd, g)) return NULL;
  return ad__done(t, y, "avg_pool2d");
}

static ad_tensor *avgpool_bwd_geom(ad_tape *t, ad_tensor *gy, const pool_geom *g) {
  if (!gy) return NULL;
  int64_t shape[4] = {g->n, g->c, g->h, g->w};
  ad_tensor *gx = ad__alloc(t, gy->dtype, 4, shape, 0);
  if (!gx) return NULL;
  int ok;
  pool_run(t, K_AVG_BWD, 0, gy->dtype, g, gy->data, gx->data, &ok);
  if (!ok) return NULL;
  ad_node *nd = ad__record(t, &OP_AVGPOOL_BWD, gx, 1, &gy);
  if (nd && !keep_geom(t, nd, g)) return NULL;
  return ad__done(t, gx, "avg_pool2d_backward");
}

ad_tensor *nn_avg_pool2d(ad_tape *t, ad_tensor *x, int k, int stride, int pad) {
  pool_geom g;
  if (!make_geom(t, "nn_avg_pool2d", x, k, stride, pad, &g)) return NULL;
  return avgpool_geom(t, x, &g);
}
