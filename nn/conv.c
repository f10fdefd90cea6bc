/* conv.c — 2-D convolution (NCHW, square stride and zero padding) by
 * im2col + one BLIS GEMM per image, and its two companion ops.
 *
 * With x [N, C, H, W], w [K, C, R, S], y [N, K, P, Q],
 *   P = (H + 2 pad - R) / stride + 1,  Q = (W + 2 pad - S) / stride + 1,
 *   y[n,k,p,q] = b[k] + sum_{c,r,s} w[k,c,r,s] x[n, c, p*st + r - pad, q*st + s - pad]
 * and B(x, w, G) = <G, conv(x, w)> trilinear, the three ops are
 *   conv2d(x, w)                  y
 *   conv2d_backward_input(G, w)   dB/dx  (a transposed convolution)
 *   conv2d_backward_weight(x, G)  dB/dw
 * Each one's rule is written with the other two, from B's linearity in
 * each argument:
 *   <H, bwd_input(G, w)>  = <G, conv(H, w)>  -> d/dG = conv(H, w),       d/dw = bwd_weight(H, G)
 *   <U, bwd_weight(x, G)> = <G, conv(x, U)>  -> d/dx = bwd_input(G, U),  d/dG = conv(x, U)
 * so derivatives of every order stay three fast kernels, never a long
 * chain of elementwise nodes. */
#define _POSIX_C_SOURCE 200809L /* sysconf */
#include "nn.h"

#include "autodiff/ad_internal.h"
#include "nn_internal.h"

#include <string.h>
#include <unistd.h>

typedef struct {
  int64_t n, c, h, w; /* input */
  int64_t k, r, s;    /* filters */
  int64_t p, q;       /* output */
  int64_t st, pad;
} conv_geom;

/* ------------------------------------------------------------------ kernels */
/* im2col: x_n [C, H, W] -> col [C*R*S, P*Q],
 *   col[(c*R + r)*S + s][p*Q + q] = x_n[c][p*st + r - pad][q*st + s - pad]  (0 outside).
 * col2im is its adjoint: x_n[c][ih][iw] += col[...] over the same pairs.
 * For each (c, r, s) row the valid output columns q are [q0, q1): left and
 * right of them the input column falls in the padding. */
static void valid_q(const conv_geom *g, int64_t s, int64_t *q0, int64_t *q1) {
  int64_t lo = g->pad - s; /* need q*st >= lo */
  int64_t a = lo <= 0 ? 0 : (lo + g->st - 1) / g->st;
  int64_t hi = g->w - 1 + g->pad - s; /* need q*st <= hi */
  int64_t b = hi < 0 ? 0 : hi / g->st + 1;
  if (b > g->q) b = g->q;
  if (a > b) a = b;
  *q0 = a;
  *q1 = b;
}

/* "Same"-width convolutions at stride 1 (Q == W: the 3x3 pad 1 kind) get a
 * faster path: every col row (c, r, s) is the input plane shifted by
 * (r - pad) rows and (s - pad) columns, so it is ONE contiguous copy of the
 * plane followed by zeroing the |s - pad| columns that wrapped around from
 * the neighbouring row (and the rows that fell off the top or bottom).
 * col2im_same adds the plane back in one contiguous pass after zeroing the
 * same wrapped columns in col (its own workspace). */
static int is_same_width(const conv_geom *g) {
  return g->st == 1 && g->q == g->w;
}

/* Same width and height with an odd filter centred by the padding: tap
 * (pad, pad) reads the input plane unshifted. */
static int has_centre_tap(const conv_geom *g) {
  return is_same_width(g) && g->p == g->h && g->r == 2 * g->pad + 1;
}

/* Rows of the col plane whose input row p + dr lies inside [0, H). */
static void valid_p(const conv_geom *g, int64_t dr, int64_t *p0, int64_t *p1) {
  int64_t a = dr < 0 ? -dr : 0, b = g->h - dr < g->p ? g->h - dr : g->p;
  *p0 = a;
  *p1 = b > a ? b : a;
}

#define DEF_KERNELS(T, SFX)                                                                        \
  static void im2col_##SFX(const T *x, T *col, const conv_geom *g, int first) {                    \
    (void)first;                                                                                   \
    const int64_t H = g->h, W = g->w, P = g->p, Q = g->q, st = g->st;                              \
    for (int64_t c = 0; c < g->c; c++)                                                             \
      for (int64_t r = 0; r < g->r; r++)                                                           \
        for (int64_t s = 0; s < g->s; s++) {                                                       \
          T *dst = col + ((c * g->r + r) * g->s + s) * P * Q;                                      \
          int64_t q0, q1;                                                                          \
          valid_q(g, s, &q0, &q1);                                                                 \
          for (int64_t p = 0; p < P; p++, dst += Q) {                                              \
            int64_t ih = p * st + r - g->pad;                                                      \
            if (ih < 0 || ih >= H) {                                                               \
              for (int64_t q = 0; q < Q; q++) dst[q] = 0;                                          \
              continue;                                                                            \
            }                                                                                      \
            const T *row = x + (c * H + ih) * W; /* iw = q*st + s - pad */                         \
            const int64_t off = s - g->pad;                                                        \
            for (int64_t q = 0; q < q0; q++) dst[q] = 0;                                           \
            for (int64_t q = q0; q < q1; q++) dst[q] = row[q * st + off];                          \
            for (int64_t q = q1; q < Q; q++) dst[q] = 0;                                           \
          }                                                                                        \
        }                                                                                          \
  }                                                                                                \
  /* x_n += col2im(col); x_n must hold what it should be added to. */                              \
  static void col2im_##SFX(const T *col, T *x, const conv_geom *g) {                               \
    const int64_t H = g->h, W = g->w, P = g->p, Q = g->q, st = g->st;                              \
    for (int64_t c = 0; c < g->c; c++)                                                             \
      for (int64_t r = 0; r < g->r; r++)                                                           \
        for (int64_t s = 0; s < g->s; s++) {                                                       \
          const T *src = col + ((c * g->r + r) * g->s + s) * P * Q;                                \
          int64_t q0, q1;                                                                          \
          valid_q(g, s, &q0, &q1);                                                                 \
          for (int64_t p = 0; p < P; p++, src += Q) {                                              \
            int64_t ih = p * st + r - g->pad;                                                      \
            if (ih < 0 || ih >= H) continue;                                                       \
            T *row = x + (c * H + ih) * W;                                                         \
            const int64_t off = s - g->pad;                                                        \
            for (int64_t q = q0; q < q1; q++) row[q * st + off] += src[q];                         \
          }                                                                                        \
        }                                                                                          \
  }                                                                                                \
  /* col [C*R*S, P*W] from x_n [C, H, W], stride 1, Q == W. The rows that                          \
   * fall off the top or bottom are the same for every image: zeroed only                          \
   * for the first image of an op (first = 1); col is reused for the rest. */                      \
  static void im2col_same_##SFX(const T *x, T *col, const conv_geom *g, int first) {               \
    const int64_t H = g->h, W = g->w, P = g->p;                                                    \
    for (int64_t c = 0; c < g->c; c++)                                                             \
      for (int64_t r = 0; r < g->r; r++)                                                           \
        for (int64_t s = 0; s < g->s; s++) {                                                       \
          T *dst = col + ((c * g->r + r) * g->s + s) * P * W;                                      \
          const T *plane = x + c * H * W;                                                          \
          const int64_t dr = r - g->pad, off = s - g->pad;                                         \
          int64_t p0, p1;                                                                          \
          valid_p(g, dr, &p0, &p1);                                                                \
          if (first) {                                                                             \
            for (int64_t i = 0; i < p0 * W; i++) dst[i] = 0;                                       \
            for (int64_t i = p1 * W; i < P * W; i++) dst[i] = 0;                                   \
          }                                                                                        \
          if (p1 == p0) continue;                                                                  \
          /* dst[p*W + q] = plane[(p + dr)*W + q + off] for p in [p0, p1), all q */                \
          int64_t sb = (p0 + dr) * W + off, len = (p1 - p0) * W;                                   \
          int64_t lo = sb < 0 ? -sb : 0, hi = sb + len > H * W ? sb + len - H * W : 0;             \
          memcpy(dst + p0 * W + lo, plane + sb + lo, sizeof(T) * (size_t)(len - lo - hi));         \
          /* the columns that wrapped around; p innermost (strided), so this                       \
           * is a few stores, not a memset call per row */                                         \
          for (int64_t q = 0; q < -off; q++)                                                       \
            for (int64_t p = p0; p < p1; p++) dst[p * W + q] = 0;                                  \
          for (int64_t q = W - off; q < W; q++)                                                    \
            for (int64_t p = p0; p < p1; p++) dst[p * W + q] = 0;                                  \
        }                                                                                          \
  }                                                                                                \
  /* x_n += col2im(col), stride 1, Q == W; zeroes col's wrapped columns.                           \
   * With a centre tap (has_centre_tap) x_n need not be zeroed first: the                          \
   * centre tap covers the whole plane unshifted and is copied, not added. */                      \
  static void col2im_same_##SFX(T *col, T *x, const conv_geom *g) {                                \
    const int64_t H = g->h, W = g->w, P = g->p;                                                    \
    const int centre = has_centre_tap(g);                                                          \
    for (int64_t c = 0; c < g->c; c++) {                                                           \
      if (centre)                                                                                  \
        memcpy(x + c * H * W, col + ((c * g->r + g->pad) * g->s + g->pad) * P * W,                 \
               sizeof(T) * (size_t)(H * W));                                                       \
      for (int64_t r = 0; r < g->r; r++)                                                           \
        for (int64_t s = 0; s < g->s; s++) {                                                       \
          if (centre && r == g->pad && s == g->pad) continue;                                      \
          T *src = col + ((c * g->r + r) * g->s + s) * P * W;                                      \
          T *plane = x + c * H * W;                                                                \
          const int64_t dr = r - g->pad, off = s - g->pad;                                         \
          int64_t p0, p1;                                                                          \
          valid_p(g, dr, &p0, &p1);                                                                \
          if (p1 == p0) continue;                                                                  \
          for (int64_t q = 0; q < -off; q++)                                                       \
            for (int64_t p = p0; p < p1; p++) src[p * W + q] = 0;                                  \
          for (int64_t q = W - off; q < W; q++)                                                    \
            for (int64_t p = p0; p < p1; p++) src[p * W + q] = 0;                                  \
          int64_t sb = (p0 + dr) * W + off, len = (p1 - p0) * W;                                   \
          int64_t lo = sb < 0 ? -sb : 0, hi = sb + len > H * W ? sb + len - H * W : 0;             \
          T *d = plane + sb + lo;                                                                  \
          const T *a = src + p0 * W + lo;                                                          \
          for (int64_t i = 0; i < len - lo - hi; i++) d[i] += a[i];                                \
        }                                                                                          \
    }                                                                                              \
  }

DEF_KERNELS(float, f32)
DEF_KERNELS(double, f64)

/* A 1x1 filter at stride 1 without padding reads x_n itself as col. */
static int is_pointwise(const conv_geom *g) {
  return g->r == 1 && g->s == 1 && g->st == 1 && g->pad == 0;
}

/* Typed GEMM on element pointers: C = alpha op(A) op(B) + beta C. */
static void gemm(ad_dtype dt, int ta, int tb, int64_t m, int64_t n, int64_t k, const void *a,
                 int64_t lda, const void *b, int64_t ldb, double beta, void *c, int64_t ldc) {
  if (dt == AD_F32)
    ad_gemm_f32(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, (float)beta, c, ldc);
  else
    ad_gemm_f64(ta, tb, m, n, k, 1.0, a, lda, b, ldb, beta, c, ldc);
}

/* gw [K, CRS] (+)= sum_{i < m} G_i [K, PQ] X_i^T [PQ, CRS], G_i = gi + i K PQ
 * and X_i = xi + i sx elements (im2col slots, or pointwise the images):
 * the per-image GEMMs in order of i, as one pool job (ad__gemm_sum).
 * first: gw is new (beta 0 for i = 0). */
static void gw_sum(ad_dtype dt, const conv_geom *g, const void *gi, const void *xi, int64_t sx,
                   int64_t m, int first, void *gw) {
  const int64_t crs = g->c * g->r * g->s, pq = g->p * g->q;
  ad__gemm_sum(dt, 0, 1, g->k, crs, pq, gi, pq, g->k * pq, xi, pq, sx, m, first ? 0.0 : 1.0, gw,
               crs);
}

/* first: this is the first image into this col workspace. */
static void im2col(ad_dtype dt, const void *x, void *col, const conv_geom *g, int first) {
  int same = is_same_width(g);
  if (dt == AD_F32)
    (same ? im2col_same_f32 : im2col_f32)(x, col, g, first);
  else
    (same ? im2col_same_f64 : im2col_f64)(x, col, g, first);
}

/* col is the caller's workspace: the same-width path zeroes parts of it. */
static void col2im(ad_dtype dt, void *col, void *x, const conv_geom *g) {
  if (!is_same_width(g)) {
    if (dt == AD_F32)
      col2im_f32(col, x, g);
    else
      col2im_f64(col, x, g);
  } else if (dt == AD_F32) {
    col2im_same_f32(col, x, g);
  } else {
    col2im_same_f64(col, x, g);
  }
}

/* The per-image loops go in chunks of as many images as there are worker
 * threads: the im2col (col2im) of a chunk's images runs split over the
 * threads, each image into its own slot of the workspace, and the GEMMs
 * (threaded by the BLAS) run between. One thread: chunks of one image,
 * whose workspace stays in cache from its im2col to its GEMM. Every image's
 * work is the same whatever the split, so results do not depend on it. */
typedef struct {
  ad_dtype dt;
  const conv_geom *g;
  char *x;    /* image 0 of the chunk ([C, H, W] each) */
  char *col;  /* slot 0 of the chunk */
  int64_t ld; /* elements from one slot to the next */
  int first;  /* the slots are new: zero what the same-width path only zeroes once */
  int ones;   /* im2col: set row C*R*S to ones (the bias row) when first */
  int zero_x; /* col2im: zero x_n before adding into it */
} col_job;

static void im2col_part(void *ctx, int part, int64_t lo, int64_t hi) {
  (void)part;
  const col_job *j = ctx;
  const conv_geom *g = j->g;
  size_t es = ad_dtype_size(j->dt);
  int64_t chw = g->c * g->h * g->w, crs = g->c * g->r * g->s, pq = g->p * g->q;
  for (int64_t i = lo; i < hi; i++) {
    char *col = j->col + (size_t)(i * j->ld) * es;
    im2col(j->dt, j->x + (size_t)(i * chw) * es, col, g, j->first);
    if (j->ones && j->first) {
      if (j->dt == AD_F32)
        for (int64_t e = 0; e < pq; e++) ((float *)col)[crs * pq + e] = 1.0f;
      else
        for (int64_t e = 0; e < pq; e++) ((double *)col)[crs * pq + e] = 1.0;
    }
  }
}

static void col2im_part(void *ctx, int part, int64_t lo, int64_t hi) {
  (void)part;
  const col_job *j = ctx;
  const conv_geom *g = j->g;
  size_t es = ad_dtype_size(j->dt);
  int64_t chw = g->c * g->h * g->w;
  for (int64_t i = lo; i < hi; i++) {
    char *xn = j->x + (size_t)(i * chw) * es;
    if (j->zero_x) memset(xn, 0, (size_t)chw * es);
    col2im(j->dt, j->col + (size_t)(i * j->ld) * es, xn, g);
  }
}

/* Images per chunk: the number of parts a loop over all of them takes. */
static int64_t chunk_of(const conv_geom *g) {
  return ad__par_parts(g->n, 1);
}

/* Images per chunk of the fused backward passes. One thread: one image,
 * whose G_n, col slot and gradient stay in cache from one step to the next.
 * More: a chunk costs three pool jobs (the per-image half, the weight sum,
 * the bias sum), and with one image per thread their start and wait cost
 * as much as their work on small layers. So each part takes as many whole
 * images as twice its core's L2 holds (G_n and its im2col slot): measured
 * on a 2-core Zen 4 (1 MB L2) at batch 64, the MNIST CNN's backward took
 * 3.0-3.2 ms at one image per part, 2.8-2.9 at 3 or 5 (what one L2 holds),
 * 2.4-2.5 at 16 and 2.6-2.8 at 32, where the chunk outgrows L3's share. */
static int64_t bwd_chunk_of(const conv_geom *g, size_t es) {
  const int64_t parts = ad__par_parts(g->n, 1);
  if (parts < 2) return 1;
  int64_t l2 = 512 * 1024; /* unknown: a common L2 size */
#ifdef _SC_LEVEL2_CACHE_SIZE
  const long v = sysconf(_SC_LEVEL2_CACHE_SIZE); /* glibc: from CPUID, cached */
  if (v > 0) l2 = v;
#endif
  const int64_t per = (g->c * g->r * g->s + g->k) * g->p * g->q * (int64_t)es;
  int64_t each = 2 * l2 / (per > 0 ? per : 1);
  if (each < 1) each = 1;
  return parts * each < g->n ? parts * each : g->n;
}

/* conv_forward on several threads: the per-image GEMMs are too small to
 * split (a 32x196x145 product), so each part takes whole images instead:
 * its own col slot (and pooled workspace), im2col, the GEMM (on the part's
 * thread: a GEMM inside a pool part runs single-threaded) and the pool of
 * the image's planes, one image at a time. Every image's output is its
 * own, written by one part, and each is computed by the same kernels as
 * on one thread (a one-thread GEMM there too), so the bits do not depend
 * on the split. */
typedef struct {
  ad_dtype dt;
  const conv_geom *g;
  const char *x;
  const void *a; /* [W b] or W */
  char *y;
  const nn__pool *pool;
  int64_t kk, ld; /* GEMM depth, one col slot */
  char *col;      /* a slot per part */
  char *ybuf;     /* pool: a conv output per part */
  int *nan;       /* pool: per part, whether some pooled output is NaN */
} fwd_job;

static void fwd_part(void *ctx, int part, int64_t lo, int64_t hi) {
  const fwd_job *j = ctx;
  const conv_geom *g = j->g;
  const size_t es = ad_dtype_size(j->dt);
  const int64_t pq = g->p * g->q, kpq = g->k * pq, chw = g->c * g->h * g->w;
  char *col = j->col + (size_t)(part * j->ld) * es;
  char *yb = j->pool ? j->ybuf + (size_t)(part * kpq) * es : NULL;
  for (int64_t n = lo; n < hi; n++) {
    col_job cj = {j->dt,
                  g,
                  (char *)j->x + (size_t)(n * chw) * es,
                  col,
                  j->ld,
                  n == lo,
                  j->kk > g->c * g->r * g->s,
                  0};
    im2col_part(&cj, 0, 0, 1);
    gemm(j->dt, 0, 0, g->k, pq, j->kk, j->a, j->kk, col, pq, 0.0,
         yb ? yb : j->y + (size_t)(n * kpq) * es, pq);
    if (j->pool)
      j->nan[part] |=
          nn__relu_pool_planes_serial(j->pool, j->dt, yb, j->y, n * g->k, (n + 1) * g->k);
  }
}

/* The per-image half of a chunk's backward, whole images per part (the
 * per-image GEMMs are too small to split over threads; a GEMM inside a
 * pool part runs on the part's thread): for slot i, image n0 + i,
 *   gc_i = scatter(G) of the image's planes    (when pool)
 *   colg_i = W^T G_i, col2im into gx_n          (when gx; pointwise: into gx_n)
 *   colx_i = im2col(x_n)                        (when colx)
 * Every output is the image's own, so the bits do not depend on the split;
 * the weight and bias sums over images stay on the caller, in image order. */
typedef struct {
  ad_dtype dt;
  const conv_geom *g;
  int64_t n0;
  const char *gd; /* G's data (image n0 + i), or NULL: gc slot i */
  const nn__pool *pool;
  const char *pgy; /* pool: the whole pooled gradient's data */
  char *gc;        /* pool: K*P*Q per slot */
  const void *w;
  char *gx, *colg; /* dx; colg: a slot per part (unused when pointwise) */
  const char *x;
  char *colx; /* im2col slots (NULL: none) */
  int64_t ld; /* C*R*S*P*Q */
  int zero_x; /* col2im: zero gx_n first */
  int first;  /* the colx slots are new */
} bwd_job;

static void bwd_part(void *ctx, int part, int64_t lo, int64_t hi) {
  const bwd_job *j = ctx;
  const conv_geom *g = j->g;
  const size_t es = ad_dtype_size(j->dt);
  const int64_t crs = g->c * g->r * g->s, pq = g->p * g->q, kpq = g->k * pq,
                chw = g->c * g->h * g->w;
  const int pw = is_pointwise(g);
  for (int64_t i = lo; i < hi; i++) {
    const int64_t n = j->n0 + i;
    const char *gn = j->gd ? j->gd + (size_t)(n * kpq) * es : j->gc + (size_t)(i * kpq) * es;
    if (j->pool)
      nn__relu_pool_scatter_planes_serial(j->pool, j->dt, j->pgy, (char *)gn, n * g->k,
                                          (n + 1) * g->k);
    if (j->gx) {
      char *gxn = j->gx + (size_t)(n * chw) * es;
      char *cg = pw ? gxn : j->colg + (size_t)(part * j->ld) * es; /* used at once: per part */
      gemm(j->dt, 1, 0, crs, pq, g->k, j->w, crs, gn, pq, 0.0, cg, pq);
      if (!pw) {
        col_job cj = {j->dt, g, gxn, cg, j->ld, 0, 0, j->zero_x};
        col2im_part(&cj, 0, 0, 1);
      }
    }
    if (j->colx) {
      col_job cj = {j->dt,
                    g,
                    (char *)j->x + (size_t)(n * chw) * es,
                    j->colx + (size_t)(i * j->ld) * es,
                    j->ld,
                    j->first,
                    0,
                    0};
      im2col_part(&cj, 0, 0, 1);
    }
  }
}

/* y [N, K, P, Q] = conv(x, w) (+ b per channel).
 * The bias rides in the GEMM: col gets a row of ones and W a column b, so
 * y_n = [W b] [col; 1] with beta 0: no pass filling y_n with b first and
 * no read of it back in the GEMM, for one more step of depth.
 * With pool (not pointwise), y is relu(max pool(conv)) instead: each chunk
 * of images is convolved into a workspace and pooled from it while it is
 * in cache, the convolution's output never formed whole. Returns 1, or 0
 * on failure, or 2 when some pooled output is NaN (the caller takes the
 * unfused ops, whose rules carry relu's NaN rule). */
static int conv_forward(ad_tape *t, const conv_geom *g, const ad_tensor *x, const ad_tensor *w,
                        const ad_tensor *b, ad_tensor *y, const nn__pool *pool) {
  ad_dtype dt = x->dtype;
  size_t es = ad_dtype_size(dt);
  int64_t crs = g->c * g->r * g->s, pq = g->p * g->q, chw = g->c * g->h * g->w;
  if (is_pointwise(g)) { /* x_n is col itself: the bias is filled in first */
    for (int64_t n = 0; n < g->n; n++) {
      const char *xn = (const char *)x->data + (size_t)(n * chw) * es;
      char *yn = (char *)y->data + (size_t)(n * g->k * pq) * es;
      for (int64_t k = 0; b && k < g->k; k++) {
        if (dt == AD_F32) {
          float v = AD_F(b)[k], *row = (float *)yn + k * pq;
          for (int64_t i = 0; i < pq; i++) row[i] = v;
        } else {
          double v = AD_D(b)[k], *row = (double *)yn + k * pq;
          for (int64_t i = 0; i < pq; i++) row[i] = v;
        }
      }
      gemm(dt, 0, 0, g->k, pq, crs, w->data, crs, xn, pq, b ? 1.0 : 0.0, yn, pq);
    }
    return 1;
  }
  const int64_t kk = crs + (b != NULL), ld = kk * pq; /* GEMM depth, one image's col */
  const void *a = w->data;
  if (b) { /* [W b]: K rows of CRS + 1 */
    char *wb = ad_arena_alloc(t, (size_t)(g->k * kk) * es);
    if (!wb) return 0;
    for (int64_t k = 0; k < g->k; k++) {
      memcpy(wb + (size_t)(k * kk) * es, (const char *)w->data + (size_t)(k * crs) * es,
             (size_t)crs * es);
      memcpy(wb + (size_t)(k * kk + crs) * es, (const char *)b->data + (size_t)k * es, es);
    }
    a = wb;
  }
  const int64_t kpq = g->k * pq;
  if (ad_blas_threads() > 1 && g->n >= 2 && !ad__par_inside()) {
    /* Several threads: whole images per part (see fwd_part), no
     * reduction across images, so the bits are those of one thread. */
    const int parts = ad__par_parts(g->n, 1);
    fwd_job j = {dt, g, x->data, a, y->data, pool, kk, ld, NULL, NULL, NULL};
    j.col = ad_arena_alloc(t, (size_t)(parts * ld) * es);
    j.ybuf = pool ? ad_arena_alloc(t, (size_t)(parts * kpq) * es) : NULL;
    j.nan = ad_arena_alloc(t, sizeof(int) * (size_t)parts);
    if (!j.col || (pool && !j.ybuf) || !j.nan) return 0;
    for (int p = 0; p < parts; p++) j.nan[p] = 0;
    ad__par_for(g->n, 1, fwd_part, &j);
    for (int p = 0; p < parts; p++)
      if (j.nan[p]) return 2;
    return 1;
  }
  const int64_t cs = chunk_of(g);
  char *col = ad_arena_alloc(t, (size_t)(cs * ld) * es);
  char *ybuf = pool ? ad_arena_alloc(t, (size_t)(cs * kpq) * es) : NULL;
  if (!col || (pool && !ybuf)) return 0;
  for (int64_t n0 = 0; n0 < g->n; n0 += cs) {
    int64_t m = g->n - n0 < cs ? g->n - n0 : cs;
    col_job j = {dt, g, (char *)x->data + (size_t)(n0 * chw) * es, col, ld, n0 == 0, b != NULL, 0};
    ad__par_for(m, 1, im2col_part, &j);
    for (int64_t i = 0; i < m; i++) /* y_n [K, PQ] = [W b] [K, CRS+1] [col; 1] [CRS+1, PQ] */
      gemm(dt, 0, 0, g->k, pq, kk, a, kk, j.col + (size_t)(i * ld) * es, pq, 0.0,
           pool ? ybuf + (size_t)(i * kpq) * es : (char *)y->data + (size_t)((n0 + i) * kpq) * es,
           pq);
    if (pool) { /* the chunk's planes [n0 K, (n0 + m) K) */
      int ok,
          nan = nn__relu_pool_planes(t, pool, dt, ybuf, y->data, n0 * g->k, (n0 + m) * g->k, &ok);
      if (!ok) return 0;
      if (nan) return 2;
    }
  }
  return 1;
}

/* gx [N, C, H, W] = bwd_input(G, w): per image colg [CRS, PQ] = W^T G_n, col2im. */
static int conv_bwd_input(ad_tape *t, const conv_geom *g, const ad_tensor *gy, const ad_tensor *w,
                          ad_tensor *gx) {
  ad_dtype dt = gy->dtype;
  size_t es = ad_dtype_size(dt);
  int64_t crs = g->c * g->r * g->s, pq = g->p * g->q, chw = g->c * g->h * g->w;
  if (is_pointwise(g)) { /* colg is gx_n itself */
    for (int64_t n = 0; n < g->n; n++)
      gemm(dt, 1, 0, crs, pq, g->k, w->data, crs,
           (const char *)gy->data + (size_t)(n * g->k * pq) * es, pq, 0.0,
           (char *)gx->data + (size_t)(n * chw) * es, pq);
    return 1;
  }
  const int64_t cs = chunk_of(g), ld = crs * pq;
  char *col = ad_arena_alloc(t, (size_t)(cs * ld) * es);
  if (!col) return 0;
  for (int64_t n0 = 0; n0 < g->n; n0 += cs) {
    int64_t m = g->n - n0 < cs ? g->n - n0 : cs;
    /* colg [CRS, PQ] = W^T [CRS, K] G_n [K, PQ], then col2im; gx_n zeroed
     * per image (hot in cache for the adds), unless the centre tap's copy
     * in col2im covers it anyway */
    bwd_job j = {dt,   g,    n0, gy->data,           NULL, NULL, NULL, w->data, gx->data, col,
                 NULL, NULL, ld, !has_centre_tap(g), 0};
    ad__par_for(m, 1, bwd_part, &j);
  }
  return 1;
}

/* gw [K, C, R, S] = bwd_weight(x, G) = sum_n G_n [K, PQ] col_n^T [PQ, CRS],
 * the sum in order of n. */
static int conv_bwd_weight(ad_tape *t, const conv_geom *g, const ad_tensor *x, const ad_tensor *gy,
                           ad_tensor *gw) {
  ad_dtype dt = x->dtype;
  size_t es = ad_dtype_size(dt);
  int64_t crs = g->c * g->r * g->s, pq = g->p * g->q, chw = g->c * g->h * g->w;
#define GW_GEMM(n, colp)                                                                           \
  gemm(dt, 0, 1, g->k, crs, pq, (const char *)gy->data + (size_t)((n)*g->k * pq) * es, pq, (colp), \
       pq, (n) == 0 ? 0.0 : 1.0, gw->data, crs)
  if (is_pointwise(g)) {
    for (int64_t n = 0; n < g->n; n++) GW_GEMM(n, (const char *)x->data + (size_t)(n * chw) * es);
    return 1;
  }
  const int64_t cs = chunk_of(g), ld = crs * pq;
  char *col = ad_arena_alloc(t, (size_t)(cs * ld) * es);
  if (!col) return 0;
  for (int64_t n0 = 0; n0 < g->n; n0 += cs) {
    int64_t m = g->n - n0 < cs ? g->n - n0 : cs;
    col_job j = {dt, g, (char *)x->data + (size_t)(n0 * chw) * es, col, ld, n0 == 0, 0, 0};
    ad__par_for(m, 1, im2col_part, &j);
    gw_sum(dt, g, (const char *)gy->data + (size_t)(n0 * g->k * pq) * es, col, ld, m, n0 == 0,
           gw->data);
  }
#undef GW_GEMM
  return 1;
}

/* ------------------------------------------------------------------ geometry */

static void attr_conv(const ad_node *nd, char *buf, size_t len) {
  const conv_geom *g = nd->a.extra;
  snprintf(buf, len, "stride=%lld pad=%lld", (long long)g->st, (long long)g->pad);
}

/* Fills g from the input / filter / output sizes and checks they fit. */
static int make_geom(ad_tape *t, const char *op, conv_geom *g, int64_t n, int64_t c, int64_t h,
                     int64_t w, int64_t k, int64_t r, int64_t s, int stride, int pad) {
  if (stride < 1 || pad < 0) {
    ad__fail(t, AD_ERR_ARG, "%s: stride %d must be >= 1 and pad %d >= 0", op, stride, pad);
    return 0;
  }
  if (h < 1 || w < 1) { /* the backward ops take h and w from the caller */
    ad__fail(t, AD_ERR_SHAPE, "%s: input size %lldx%lld must be at least 1x1", op, (long long)h,
             (long long)w);
    return 0;
  }
  g->n = n, g->c = c, g->h = h, g->w = w, g->k = k, g->r = r, g->s = s;
  g->st = stride, g->pad = pad;
  /* The padded sizes in 64 bits, checked: 2 * pad overflows an int for a
   * pad past 2^30, and h comes from the caller in the backward ops. */
  int64_t hp, wp;
  if (nn__add_overflow(h, 2 * (int64_t)pad, &hp) || nn__add_overflow(w, 2 * (int64_t)pad, &wp)) {
    ad__fail(t, AD_ERR_SHAPE, "%s: a %lldx%lld input padded by %d overflows 64 bits", op,
             (long long)h, (long long)w, pad);
    return 0;
  }
  if (hp < r || wp < s) {
    ad__fail(t, AD_ERR_SHAPE, "%s: a %lldx%lld filter does not fit a %lldx%lld input padded by %d",
             op, (long long)r, (long long)s, (long long)h, (long long)w, pad);
    return 0;
  }
  g->p = (hp - r) / stride + 1;
  g->q = (wp - s) / stride + 1;
  /* Every size the kernels form, checked once here so none of them can
   * wrap: the output [N, K, P, Q], the input [N, C, H, W], the im2col
   * workspace [C*R*S, P*Q] in bytes. */
  int64_t pq, nkpq, chw, nchw, crs, col;
  if (nn__mul_overflow(g->p, g->q, &pq) || nn__mul_overflow(pq, k, &nkpq) ||
      nn__mul_overflow(nkpq, n, &nkpq) || nn__mul_overflow(h, w, &chw) ||
      nn__mul_overflow(chw, c, &chw) || nn__mul_overflow(chw, n, &nchw) ||
      nn__mul_overflow(c, r, &crs) || nn__mul_overflow(crs, s, &crs) ||
      nn__mul_overflow(crs, pq, &col) || nn__mul_overflow(col, 8, &col)) {
    ad__fail(t, AD_ERR_SHAPE,
             "%s: sizes overflow 64 bits (input %lldx%lldx%lldx%lld, filter %lldx%lldx%lld, "
             "output %lldx%lld)",
             op, (long long)n, (long long)c, (long long)h, (long long)w, (long long)k, (long long)r,
             (long long)s, (long long)g->p, (long long)g->q);
    return 0;
  }
  return 1;
}

static ad_node *record(ad_tape *t, const ad_op_def *op, ad_tensor *out, int n_in,
                       ad_tensor *const *in, const conv_geom *g) {
  ad_node *nd = ad__record(t, op, out, n_in, in);
  if (!nd) return NULL;
  conv_geom *copy = ad_arena_alloc(t, sizeof *copy);
  if (!copy) return NULL;
  *copy = *g;
  nd->a.extra = copy;
  return nd;
}

static int dims4(ad_tape *t, const char *op, const char *what, const ad_tensor *x) {
  if (x->ndim == 4) return 1;
  char s[96];
  ad__fail(t, AD_ERR_SHAPE, "%s: %s must be 4-D (NCHW / KCRS), got %s", op, what,
           ad_shape_str(x, s, sizeof s));
  return 0;
}

/* ------------------------------------------------------------------ bias gradient */
/* The bias gradient db[k] = sum_{n,p,q} G[n,k,p,q] and its adjoint, the
 * per-channel broadcast, as a pair of fused ops (each the other's rule):
 * one pass over G instead of two strided axis reductions. */

static ad_tensor *channel_expand(ad_tape *t, ad_tensor *v, const conv_geom *g);

static void vjp_channel_sum(ad_tape *t, const ad_node *nd, ad_tensor *h, ad_tensor **gin,
                            const int *need) {
  if (need[0]) gin[0] = channel_expand(t, h, nd->a.extra);
}
static const ad_op_def OP_CHANNEL_SUM = {"conv2d_bias_grad", vjp_channel_sum, attr_conv, {0}};

typedef struct {
  const conv_geom *g;
  const ad_tensor *src;
  ad_tensor *dst;
  int64_t n0, n1; /* channel_sum_part: the images [n0, n1) ... */
  const void *gd; /* ... of G's data, or (when not NULL) of gd, which holds them from n0 on */
} channel_job;

/* db[k] for k in [lo, hi): each channel's sum over n in order of n, the
 * same bits however the channels are split over the threads. */
static void channel_sum_part(void *ctx, int part, int64_t lo, int64_t hi) {
  (void)part;
  const channel_job *j = ctx;
  const conv_geom *g = j->g;
  int64_t pq = g->p * g->q;
  const int64_t d0 = j->gd ? j->n0 : 0;
  const char *gd = j->gd ? j->gd : j->src->data;
  for (int64_t n = j->n0; n < j->n1; n++) /* n outer: one sequential stream over G */
    for (int64_t k = lo; k < hi; k++) {
      int64_t off = ((n - d0) * g->k + k) * pq;
      if (j->src->dtype == AD_F32) {
        const float *x = (const float *)(const void *)gd + off;
        float part8[8] = {0}, s = 0; /* eight partial sums: vectorizes */
        int64_t i = 0;
        for (; i + 8 <= pq; i += 8)
          for (int e = 0; e < 8; e++) part8[e] += x[i + e];
        for (; i < pq; i++) s += x[i];
        for (int e = 0; e < 8; e++) s += part8[e];
        AD_F(j->dst)[k] += s;
      } else {
        const double *x = (const double *)(const void *)gd + off;
        double s = 0;
        for (int64_t i = 0; i < pq; i++) s += x[i];
        AD_D(j->dst)[k] += s;
      }
    }
}

/* db [K] = sum over n and the P*Q positions of G [N, K, P, Q]. */
static ad_tensor *channel_sum(ad_tape *t, ad_tensor *G, const conv_geom *g) {
  ad_tensor *db = ad__alloc(t, G->dtype, 1, &g->k, 1);
  if (!db) return NULL;
  channel_job j = {g, G, db, 0, g->n, NULL};
  ad__par_for(g->k, 1 + 16384 / (g->n * g->p * g->q + 1), channel_sum_part, &j);
  ad_node *nd = ad__record(t, &OP_CHANNEL_SUM, db, 1, &G);
  if (nd) nd->a.extra = (void *)g; /* the forward node's geometry */
  return ad__done(t, db, "conv2d_bias_grad");
}

static void vjp_channel_expand(ad_tape *t, const ad_node *nd, ad_tensor *h, ad_tensor **gin,
                               const int *need) {
  if (need[0]) gin[0] = channel_sum(t, h, nd->a.extra);
}
static const ad_op_def OP_CHANNEL_EXPAND = {
    "conv2d_bias_expand", vjp_channel_expand, attr_conv, {0}};

/* Rows (n, k) in [lo, hi) of the broadcast. */
static void channel_expand_part(void *ctx, int part, int64_t lo, int64_t hi) {
  (void)part;
  const channel_job *j = ctx;
  int64_t pq = j->g->p * j->g->q;
  for (int64_t nk = lo; nk < hi; nk++) {
    int64_t k = nk % j->g->k;
    if (j->src->dtype == AD_F32) {
      float c = AD_F(j->src)[k], *row = AD_F(j->dst) + nk * pq;
      for (int64_t i = 0; i < pq; i++) row[i] = c;
    } else {
      double c = AD_D(j->src)[k], *row = AD_D(j->dst) + nk * pq;
      for (int64_t i = 0; i < pq; i++) row[i] = c;
    }
  }
}

/* [N, K, P, Q] holding v[k] on every position of channel k. */
static ad_tensor *channel_expand(ad_tape *t, ad_tensor *v, const conv_geom *g) {
  int64_t shape[4] = {g->n, g->k, g->p, g->q};
  ad_tensor *y = ad__alloc(t, v->dtype, 4, shape, 0);
  if (!y) return NULL;
  channel_job j = {g, v, y, 0, 0, NULL};
  ad__par_for(g->n * g->k, 1 + 16384 / (g->p * g->q), channel_expand_part, &j);
  ad_node *nd = ad__record(t, &OP_CHANNEL_EXPAND, y, 1, &v);
  if (nd) nd->a.extra = (void *)g;
  return ad__done(t, y, "conv2d_bias_expand");
}

/* ------------------------------------------------------------------ conv2d */

static ad_tensor *conv2d_geom(ad_tape *t, ad_tensor *x, ad_tensor *w, ad_tensor *b,
                              const conv_geom *g);

static const ad_op_def OP_CONV2D_BWD_INPUT, OP_CONV2D_BWD_WEIGHT;

/* The rule's three results in one pass over the images, each recorded as
 * its own node exactly as the three ops would record it (same values,
 * bits included: every sum runs in the same order), so everything above
 * differentiates them as before. Per image, G_n is read while it is still
 * in cache for the input GEMM + col2im, the im2col + weight GEMM and the
 * bias row sums, instead of three passes over all of G from memory.
 * Returns 0 (nothing done) for the caller to take the ops one by one. */
static int conv_backward_fused(ad_tape *t, const ad_node *nd, ad_tensor *G, ad_tensor **gin,
                               const int *need) {
  const conv_geom *g = nd->a.extra;
  ad_tensor *x = nd->in[0], *w = nd->in[1], *in2[2] = {G, w};
  const int want_x = need[0], want_b = nd->n_in > 2 && need[2];
  if (!need[1] || !G || G->ndim != 4 || G->dtype != x->dtype || G->shape[0] != g->n ||
      G->shape[1] != g->k || G->shape[2] != g->p || G->shape[3] != g->q)
    return 0;
  if (!ad__check(t, "conv2d backward", 2, in2)) return 1; /* the error is on the tape */
  ad_dtype dt = x->dtype;
  size_t es = ad_dtype_size(dt);
  const int64_t crs = g->c * g->r * g->s, pq = g->p * g->q, chw = g->c * g->h * g->w;
  ad_tensor *gx = want_x ? ad__alloc(t, dt, 4, (int64_t[]){g->n, g->c, g->h, g->w}, 0) : NULL;
  ad_tensor *gw = ad__alloc(t, dt, 4, (int64_t[]){g->k, g->c, g->r, g->s}, 0);
  ad_tensor *db = want_b ? ad__alloc(t, dt, 1, &g->k, 1) : NULL;
  if (!gw || (want_x && !gx) || (want_b && !db)) return 1;
  const int pw = is_pointwise(g);
  const int64_t cs = bwd_chunk_of(g, es), ld = crs * pq, parts = ad__par_parts(cs, 1);
  char *colx = pw ? NULL : ad_arena_alloc(t, (size_t)(cs * ld) * es);
  char *colg = pw || !want_x ? NULL : ad_arena_alloc(t, (size_t)(parts * ld) * es);
  if ((!pw && !colx) || (!pw && want_x && !colg)) return 1;
  const char *gd = G->data, *xd = x->data;
  for (int64_t n0 = 0; n0 < g->n; n0 += cs) {
    const int64_t m = g->n - n0 < cs ? g->n - n0 : cs;
    { /* dx as conv_bwd_input, the im2col as conv_bwd_weight */
      bwd_job j = {dt,
                   g,
                   n0,
                   gd,
                   NULL,
                   NULL,
                   NULL,
                   w->data,
                   want_x ? gx->data : NULL,
                   colg,
                   xd,
                   colx,
                   ld,
                   !has_centre_tap(g),
                   n0 == 0};
      if (want_x || !pw) ad__par_for(m, 1, bwd_part, &j);
    }
    gw_sum(dt, g, gd + (size_t)(n0 * g->k * pq) * es, pw ? xd + (size_t)(n0 * chw) * es : colx,
           pw ? chw : ld, m, n0 == 0, gw->data);
    if (want_b) { /* as channel_sum, images [n0, n0 + m) */
      channel_job j = {g, G, db, n0, n0 + m, NULL};
      ad__par_for(g->k, 1 + 16384 / (m * pq + 1), channel_sum_part, &j);
    }
  }
  if (want_x) {
    record(t, &OP_CONV2D_BWD_INPUT, gx, 2, in2, g);
    gin[0] = ad__done(t, gx, "conv2d_backward_input");
  }
  ad_tensor *inw[2] = {x, G};
  record(t, &OP_CONV2D_BWD_WEIGHT, gw, 2, inw, g);
  gin[1] = ad__done(t, gw, "conv2d_backward_weight");
  if (want_b) {
    ad_node *nb = ad__record(t, &OP_CHANNEL_SUM, db, 1, &G);
    if (nb) nb->a.extra = (void *)g; /* the forward node's geometry */
    gin[2] = ad__done(t, db, "conv2d_bias_grad");
  }
  return 1;
}

/* d conv(x, w) + b:  dx = bwd_input(G, w),  dw = bwd_weight(x, G),
 * db[k] = sum_{n,p,q} G[n,k,p,q]. */
static void vjp_conv2d(ad_tape *t, const ad_node *nd, ad_tensor *G, ad_tensor **gin,
                       const int *need) {
  if (conv_backward_fused(t, nd, G, gin, need)) return;
  const conv_geom *g = nd->a.extra;
  ad_tensor *x = nd->in[0], *w = nd->in[1];
  if (need[0]) gin[0] = nn_conv2d_backward_input(t, G, w, g->h, g->w, (int)g->st, (int)g->pad);
  if (need[1]) gin[1] = nn_conv2d_backward_weight(t, x, G, g->r, g->s, (int)g->st, (int)g->pad);
  if (nd->n_in > 2 && need[2]) gin[2] = channel_sum(t, G, g);
}
static const ad_op_def OP_CONV2D = {"conv2d", vjp_conv2d, attr_conv, {0}};

static ad_tensor *conv2d_geom(ad_tape *t, ad_tensor *x, ad_tensor *w, ad_tensor *b,
                              const conv_geom *g) {
  int64_t shape[4] = {g->n, g->k, g->p, g->q};
  ad_tensor *y = ad__alloc(t, x->dtype, 4, shape, 0);
  if (!y || !conv_forward(t, g, x, w, b, y, NULL)) return NULL;
  ad_tensor *in[3] = {x, w, b};
  record(t, &OP_CONV2D, y, b ? 3 : 2, in, g);
  return ad__done(t, y, "conv2d");
}

/* nn_conv2d's argument checks; fills g. */
static int conv_args(ad_tape *t, const char *op, ad_tensor *x, ad_tensor *w, ad_tensor *b,
                     int stride, int pad, conv_geom *g) {
  ad_tensor *in[3] = {x, w, b};
  if (!ad__check(t, op, b ? 3 : 2, in)) return 0;
  if (!dims4(t, op, "x", x) || !dims4(t, op, "w", w)) return 0;
  if (x->shape[1] != w->shape[1] || (b && b->size != w->shape[0])) {
    char sx[96], sw[96], sb[96];
    ad__fail(t, AD_ERR_SHAPE,
             "%s: x %s, w %s, b %s do not fit (x [N, C, H, W], w [K, C, R, S], b [K])", op,
             ad_shape_str(x, sx, sizeof sx), ad_shape_str(w, sw, sizeof sw),
             b ? ad_shape_str(b, sb, sizeof sb) : "none");
    return 0;
  }
  return make_geom(t, op, g, x->shape[0], x->shape[1], x->shape[2], x->shape[3], w->shape[0],
                   w->shape[2], w->shape[3], stride, pad);
}

ad_tensor *nn_conv2d(ad_tape *t, ad_tensor *x, ad_tensor *w, ad_tensor *b, int stride, int pad) {
  conv_geom g;
  if (!conv_args(t, "nn_conv2d", x, w, b, stride, pad, &g)) return NULL;
  return conv2d_geom(t, x, w, b, &g);
}

/* ------------------------------------------------------------------ conv2d + relu + max pool */
/* F(x, w, b) = relu(max_pool(conv(x, w) + b)). Its VJP, by the chain rule
 * with C = conv(x, w) + b and the masked argmax index of the pool (the
 * window's maximum where it is above 0, nothing where relu clips it),
 *   gC = scatter(G)            (pool.c's masked scatter; its rule is the
 *                               masked gather, linear in G)
 *   dx = bwd_input(gC, w),  dw = bwd_weight(x, gC),  db[k] = sum gC[:,k]
 * i.e. conv2d's rule applied to gC, each result recorded with its own
 * rule, so every order stays the same fast kernels and exact. The index
 * is all the rule keeps of C: C is never formed whole. */
typedef struct {
  conv_geom g; /* first: conv2d's rule reads a.extra as its geometry */
  const nn__pool *pool;
} conv_pool;

/* Not recording (a first-order gradient): gC = scatter(G) and conv2d's
 * backward one chunk of images at a time, gC_n formed in a workspace and
 * used from cache, never whole. The same kernels on the same data in the
 * same order as the scatter and then conv_backward_fused: the same bits.
 * Returns 0 (nothing done) for the caller to take the recorded way. */
static int conv_pool_backward_chunked(ad_tape *t, const ad_node *nd, ad_tensor *G, ad_tensor **gin,
                                      const int *need) {
  const conv_pool *cp = nd->a.extra;
  const conv_geom *g = &cp->g;
  ad_tensor *x = nd->in[0], *w = nd->in[1];
  const int want_x = need[0], want_b = nd->n_in > 2 && need[2];
  int64_t ps[4];
  nn__relu_pool_shape(cp->pool, ps);
  if (ad__recording(t) || !need[1] || is_pointwise(g) || !G || G->ndim != 4 ||
      G->dtype != x->dtype || G->shape[0] != ps[0] || G->shape[1] != ps[1] ||
      G->shape[2] != ps[2] || G->shape[3] != ps[3])
    return 0;
  ad_tensor *in2[2] = {G, w};
  if (!ad__check(t, "conv2d_relu_max_pool2d backward", 2, in2)) return 1; /* error on the tape */
  const ad_dtype dt = x->dtype;
  const size_t es = ad_dtype_size(dt);
  const int64_t crs = g->c * g->r * g->s, pq = g->p * g->q,

                kpq = g->k * pq;
  ad_tensor *gx = want_x ? ad__alloc(t, dt, 4, (int64_t[]){g->n, g->c, g->h, g->w}, 0) : NULL;
  ad_tensor *gw = ad__alloc(t, dt, 4, (int64_t[]){g->k, g->c, g->r, g->s}, 0);
  ad_tensor *db = want_b ? ad__alloc(t, dt, 1, &g->k, 1) : NULL;
  if (!gw || (want_x && !gx) || (want_b && !db)) return 1;
  const int64_t cs = bwd_chunk_of(g, es), ld = crs * pq, parts = ad__par_parts(cs, 1);
  char *colx = ad_arena_alloc(t, (size_t)(cs * ld) * es);
  char *colg = want_x ? ad_arena_alloc(t, (size_t)(parts * ld) * es) : NULL;
  char *gc = ad_arena_alloc(t, (size_t)(cs * kpq) * es);
  if (!colx || !gc || (want_x && !colg)) return 1;
  for (int64_t n0 = 0; n0 < g->n; n0 += cs) {
    const int64_t m = g->n - n0 < cs ? g->n - n0 : cs;
    /* gc = scatter(G), dx as conv_bwd_input, the im2col as conv_bwd_weight */
    bwd_job j = {dt,
                 g,
                 n0,
                 NULL,
                 cp->pool,
                 G->data,
                 gc,
                 w->data,
                 want_x ? gx->data : NULL,
                 colg,
                 x->data,
                 colx,
                 ld,
                 !has_centre_tap(g),
                 n0 == 0};
    ad__par_for(m, 1, bwd_part, &j);
    gw_sum(dt, g, gc, colx, ld, m, n0 == 0, gw->data);
    if (want_b) { /* as channel_sum, images [n0, n0 + m) */
      channel_job cj = {g, G, db, n0, n0 + m, gc};
      ad__par_for(g->k, 1 + 16384 / (m * pq + 1), channel_sum_part, &cj);
    }
  }
  /* not recording: ad__record records nothing, it only marks the results
   * as conv_backward_fused's calls would */
  ad_tensor *inw[2] = {x, G};
  if (want_x) {
    ad__record(t, &OP_CONV2D_BWD_INPUT, gx, 2, in2);
    gin[0] = ad__done(t, gx, "conv2d_backward_input");
  }
  ad__record(t, &OP_CONV2D_BWD_WEIGHT, gw, 2, inw);
  gin[1] = ad__done(t, gw, "conv2d_backward_weight");
  if (want_b) {
    ad__record(t, &OP_CHANNEL_SUM, db, 1, &G);
    gin[2] = ad__done(t, db, "conv2d_bias_grad");
  }
  return 1;
}

static void vjp_conv2d_relu_pool(ad_tape *t, const ad_node *nd, ad_tensor *G, ad_tensor **gin,
                                 const int *need) {
  if (conv_pool_backward_chunked(t, nd, G, gin, need)) return;
  const conv_pool *cp = nd->a.extra;
  ad_tensor *gc = nn__relu_pool_scatter(t, G, cp->pool);
  if (gc) vjp_conv2d(t, nd, gc, gin, need);
}
/* dx reads w, dw reads x, db neither (the index is in a.extra, raw arena
 * data with pointers inside: compaction refuses, as for max_pool2d). */
static const ad_op_def OP_CONV2D_RELU_POOL = {"conv2d_relu_max_pool2d",
                                              vjp_conv2d_relu_pool,
                                              attr_conv,
                                              {AD_SAVES(AD_S_IN(1), AD_S_IN(0), 0, 0), NULL, 0}};

ad_tensor *nn_conv2d_relu_max_pool2d(ad_tape *t, ad_tensor *x, ad_tensor *w, ad_tensor *b,
                                     int stride, int pad, int k, int pool_stride, int pool_pad) {
  const char *op = "nn_conv2d_relu_max_pool2d";
  conv_geom g;
  if (!conv_args(t, op, x, w, b, stride, pad, &g)) return NULL;
  const int64_t cs[4] = {g.n, g.k, g.p, g.q};
  const int rec =
      ad__recording(t) && (ad_needs_grad(x) || ad_needs_grad(w) || (b && ad_needs_grad(b)));
  const nn__pool *pool = nn__relu_pool_plan(t, op, cs, k, pool_stride, pool_pad, rec);
  if (!pool) return NULL;
  if (!is_pointwise(&g)) { /* a 1x1 convolution has no col workspace to pool from */
    int64_t ps[4];
    nn__relu_pool_shape(pool, ps);
    ad_tensor *y = ad__alloc(t, x->dtype, 4, ps, 0);
    if (!y) return NULL;
    int r = conv_forward(t, &g, x, w, b, y, pool);
    if (!r) return NULL;
    if (r == 1) {
      ad_tensor *in[3] = {x, w, b};
      ad_node *nd = ad__record(t, &OP_CONV2D_RELU_POOL, y, b ? 3 : 2, in);
      if (nd) {
        conv_pool *cp = ad_arena_alloc(t, sizeof *cp);
        if (!cp) return NULL;
        cp->g = g, cp->pool = pool;
        nd->a.extra = cp;
      }
      return ad__done(t, y, "conv2d_relu_max_pool2d");
    }
  } /* else (a NaN pooled, or pointwise): the ops one by one, the same values */
  return nn_relu_max_pool2d(t, nn_conv2d(t, x, w, b, stride, pad), k, pool_stride, pool_pad);
}

/* ------------------------------------------------------------------ backward input */

/* <H, bwd_input(G, w)> = <G, conv(H, w)>: dG = conv(H, w), dw = bwd_weight(H, G). */
static void vjp_bwd_input(ad_tape *t, const ad_node *nd, ad_tensor *H, ad_tensor **gin,
                          const int *need) {
  const conv_geom *g = nd->a.extra;
  ad_tensor *G = nd->in[0], *w = nd->in[1];
  if (need[0]) gin[0] = conv2d_geom(t, H, w, NULL, g);
  if (need[1]) gin[1] = nn_conv2d_backward_weight(t, H, G, g->r, g->s, (int)g->st, (int)g->pad);
}
static const ad_op_def OP_CONV2D_BWD_INPUT = {
    "conv2d_backward_input", vjp_bwd_input, attr_conv, {0}};

ad_tensor *nn_conv2d_backward_input(ad_tape *t, ad_tensor *gy, ad_tensor *w, int64_t h, int64_t wd,
                                    int stride, int pad) {
  ad_tensor *in[2] = {gy, w};
  const char *op = "nn_conv2d_backward_input";
  if (!ad__check(t, op, 2, in)) return NULL;
  if (!dims4(t, op, "g", gy) || !dims4(t, op, "w", w)) return NULL;
  conv_geom g;
  if (!make_geom(t, op, &g, gy->shape[0], w->shape[1], h, wd, w->shape[0], w->shape[2], w->shape[3],
                 stride, pad))
    return NULL;
  if (gy->shape[1] != g.k || gy->shape[2] != g.p || gy->shape[3] != g.q) {
    char sg[96], sw[96];
    return ad__fail(t, AD_ERR_SHAPE, "%s: g %s does not fit w %s on a %lldx%lld input", op,
                    ad_shape_str(gy, sg, sizeof sg), ad_shape_str(w, sw, sizeof sw), (long long)h,
                    (long long)wd);
  }
  int64_t shape[4] = {g.n, g.c, g.h, g.w};
  ad_tensor *gx = ad__alloc(t, gy->dtype, 4, shape, 0);
  if (!gx || !conv_bwd_input(t, &g, gy, w, gx)) return NULL;
  record(t, &OP_CONV2D_BWD_INPUT, gx, 2, in, &g);
  return ad__done(t, gx, "conv2d_backward_input");
}

/* ------------------------------------------------------------------ backward weight */

/* <U, bwd_weight(x, G)> = <G, conv(x, U)>: dx = bwd_input(G, U), dG = conv(x, U). */
static void vjp_bwd_weight(ad_tape *t, const ad_node *nd, ad_tensor *U, ad_tensor **gin,
                           const int *need) {
  const conv_geom *g = nd->a.extra;
  ad_tensor *x = nd->in[0], *G = nd->in[1];
  if (need[0]) gin[0] = nn_conv2d_backward_input(t, G, U, g->h, g->w, (int)g->st, (int)g->pad);
  if (need[1]) gin[1] = conv2d_geom(t, x, U, NULL, g);
}
static const ad_op_def OP_CONV2D_BWD_WEIGHT = {
    "conv2d_backward_weight", vjp_bwd_weight, attr_conv, {0}};

ad_tensor *nn_conv2d_backward_weight(ad_tape *t, ad_tensor *x, ad_tensor *gy, int64_t r, int64_t s,
                                     int stride, int pad) {
  ad_tensor *in[2] = {x, gy};
  const char *op = "nn_conv2d_backward_weight";
  if (!ad__check(t, op, 2, in)) return NULL;
  if (!dims4(t, op, "x", x) || !dims4(t, op, "g", gy)) return NULL;
  if (r < 1 || s < 1)
    return ad__fail(t, AD_ERR_ARG, "%s: filter size %lldx%lld", op, (long long)r, (long long)s);
  conv_geom g;
  if (!make_geom(t, op, &g, x->shape[0], x->shape[1], x->shape[2], x->shape[3], gy->shape[1], r, s,
                 stride, pad))
    return NULL;
  if (gy->shape[0] != g.n || gy->shape[2] != g.p || gy->shape[3] != g.q) {
    char sx[96], sg[96];
    return ad__fail(t, AD_ERR_SHAPE, "%s: g %s does not fit x %s with a %lldx%lld filter", op,
                    ad_shape_str(gy, sg, sizeof sg), ad_shape_str(x, sx, sizeof sx), (long long)r,
                    (long long)s);
  }
  int64_t shape[4] = {g.k, g.c, g.r, g.s};
  ad_tensor *gw = ad__alloc(t, x->dtype, 4, shape, 0);
  if (!gw || !conv_bwd_weight(t, &g, x, gy, gw)) return NULL;
  record(t, &OP_CONV2D_BWD_WEIGHT, gw, 2, in, &g);
  return ad__done(t, gw, "conv2d_backward_weight");
}
