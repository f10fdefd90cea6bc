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
#include "nn_internal.h"

#include <float.h>
#include <string.h>

typedef struct {
  int64_t n, c, h, w; /* input */
  int64_t p, q;       /* output */
  int64_t k, st, pad;
  int32_t *idx; /* max pool: flat index into x of each output's maximum */
} pool_geom;

static void attr_pool(const ad_node *nd, char *buf, size_t len) {
  const pool_geom *g = nd->a.extra;
  snprintf(buf, len, "k=%lld stride=%lld pad=%lld", (long long)g->k, (long long)g->st,
           (long long)g->pad);
}

static int make_geom(ad_tape *t, const char *op, const ad_tensor *x, int k, int stride, int pad,
                     pool_geom *g) {
  if (!ad__check(t, op, 1, (ad_tensor *const *)&x)) return 0;
  if (x->ndim != 4) {
    char s[96];
    ad__fail(t, AD_ERR_SHAPE, "%s: x must be 4-D (NCHW), got %s", op, ad_shape_str(x, s, sizeof s));
    return 0;
  }
  if (k < 1 || stride < 1 || pad < 0 || pad > k / 2) { /* not 2 * pad: it overflows an int */
    ad__fail(t, AD_ERR_ARG,
             "%s: kernel %d, stride %d, pad %d (need k, stride >= 1, 0 <= pad <= k/2)", op, k,
             stride, pad);
    return 0;
  }
  memset(g, 0, sizeof *g);
  g->n = x->shape[0], g->c = x->shape[1], g->h = x->shape[2], g->w = x->shape[3];
  g->k = k, g->st = stride, g->pad = pad;
  /* pad <= k / 2 here, so 2 * pad fits an int; h + 2 * pad is 64-bit. */
  int64_t hp, wp;
  if (nn__add_overflow(g->h, 2 * (int64_t)pad, &hp) ||
      nn__add_overflow(g->w, 2 * (int64_t)pad, &wp) || hp < k || wp < k) {
    char s[96];
    ad__fail(t, AD_ERR_SHAPE, "%s: a %dx%d window does not fit %s padded by %d", op, k, k,
             ad_shape_str(x, s, sizeof s), pad);
    return 0;
  }
  g->p = (hp - k) / stride + 1;
  g->q = (wp - k) / stride + 1;
  return 1;
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

#define DEF_KERNELS(T, SFX)                                                                        \
  /* y [N, C, P, Q] = max over windows of x [N, C, H, W]; idx (may be NULL)                        \
   * gets the flat index of the first maximum (NaN wins, as in the core).                          \
   * The compares are written as selects so they compile to branch-free                            \
   * code: on real data the max is unpredictable and branches mispredict. */                       \
  static void maxpool_##SFX(const pool_geom *g, const T *x, T *y, int32_t *idx) {                  \
    const int64_t W = g->w, hw = g->h * g->w, pq = g->p * g->q;                                    \
    const int fast2 = g->k == 2 && g->st == 2 && g->pad == 0;                                      \
    for (int64_t nc = 0; nc < g->n * g->c; nc++) {                                                 \
      const T *xp = x + nc * hw;                                                                   \
      T *yp = y + nc * pq;                                                                         \
      int32_t *ip = idx ? idx + nc * pq : NULL;                                                    \
      for (int64_t p = 0; p < g->p; p++) {                                                         \
        if (fast2) { /* 2x2 windows, stride 2: rows 2p and 2p+1, as a tree: */                     \
          const T *a = xp + 2 * p * W, *b = a + W; /* max(a0, a1) vs max(b0, b1) */                \
          T *yr = yp + p * g->q;                                                                   \
          int32_t *ir = ip ? ip + p * g->q : NULL;                                                 \
          const int32_t base = (int32_t)(nc * hw + 2 * p * W);                                     \
          int nan = 0;                                                                             \
          if (!ir) {                                                                               \
            for (int64_t q = 0; q < g->q; q++) {                                                   \
              const T a0 = a[2 * q], a1 = a[2 * q + 1], b0 = b[2 * q], b1 = b[2 * q + 1];          \
              const T ma = a1 > a0 ? a1 : a0, mb = b1 > b0 ? b1 : b0;                              \
              yr[q] = mb > ma ? mb : ma; /* ties go to the first (top) row */                      \
              nan |= (a0 != a0) | (a1 != a1) | (b0 != b0) | (b1 != b1);                            \
            }                                                                                      \
          } else { /* the index by arithmetic on the compares: no branch to mispredict */          \
            for (int64_t q = 0; q < g->q; q++) {                                                   \
              const T a0 = a[2 * q], a1 = a[2 * q + 1], b0 = b[2 * q], b1 = b[2 * q + 1];          \
              const int32_t ia = a1 > a0, ib = b1 > b0;                                            \
              const T ma = a1 > a0 ? a1 : a0, mb = b1 > b0 ? b1 : b0;                              \
              const int32_t bot = mb > ma;                                                         \
              yr[q] = mb > ma ? mb : ma;                                                           \
              ir[q] = base + (int32_t)(2 * q) + ia + bot * ((int32_t)W + ib - ia);                 \
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
          yp[p * g->q + q] = m;                                                                    \
          if (ip) ip[p * g->q + q] = (int32_t)(nc * hw + best);                                    \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
  }                                                                                                \
  /* y [N, C, P, Q] = sum over windows of x / k^2 */                                               \
  static void avgpool_##SFX(const pool_geom *g, const T *x, T *y) {                                \
    int64_t hw = g->h * g->w, pq = g->p * g->q;                                                    \
    T inv = (T)1 / (T)(g->k * g->k);                                                               \
    for (int64_t nc = 0; nc < g->n * g->c; nc++) {                                                 \
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
  static void avgpool_bwd_##SFX(const pool_geom *g, const T *y, T *x) {                            \
    int64_t hw = g->h * g->w, pq = g->p * g->q;                                                    \
    T inv = (T)1 / (T)(g->k * g->k);                                                               \
    memset(x, 0, sizeof(T) * (size_t)(g->n * g->c * hw));                                          \
    for (int64_t nc = 0; nc < g->n * g->c; nc++) {                                                 \
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
  static void scatter_##SFX(const int32_t *idx, int64_t n, const T *y, T *x, int64_t nx) {         \
    memset(x, 0, sizeof(T) * (size_t)nx);                                                          \
    for (int64_t i = 0; i < n; i++) x[idx[i]] += y[i];                                             \
  }                                                                                                \
  /* The same for 2x2 windows at stride 2 that tile x: every input element                         \
   * is written once (g at the argmax, 0 elsewhere), one streaming pass                            \
   * instead of a memset and scattered adds. Rows/columns past the last                            \
   * window (odd H or W) are zeroed. */                                                            \
  static void scatter2_##SFX(const pool_geom *g, const int32_t *idx, const T *y, T *x) {           \
    const int64_t W = g->w, hw = g->h * g->w, pq = g->p * g->q;                                    \
    for (int64_t nc = 0; nc < g->n * g->c; nc++) {                                                 \
      T *xp = x + nc * hw;                                                                         \
      for (int64_t p = 0; p < g->p; p++) {                                                         \
        T *a = xp + 2 * p * W, *b = a + W;                                                         \
        const T *yr = y + nc * pq + p * g->q;                                                      \
        const int32_t *ir = idx + nc * pq + p * g->q;                                              \
        for (int64_t q = 0; q < g->q; q++) { /* zero the window, then store g at the argmax */     \
          a[2 * q] = a[2 * q + 1] = b[2 * q] = b[2 * q + 1] = 0;                                   \
          xp[ir[q] - nc * hw] = yr[q];                                                             \
        }                                                                                          \
        for (int64_t j = 2 * g->q; j < W; j++) a[j] = b[j] = 0;                                    \
      }                                                                                            \
      for (int64_t i = 2 * g->p * W; i < hw; i++) xp[i] = 0;                                       \
    }                                                                                              \
  }                                                                                                \
  static void gather_##SFX(const int32_t *idx, int64_t n, const T *x, T *y) {                      \
    for (int64_t i = 0; i < n; i++) y[i] = x[idx[i]];                                              \
  }

DEF_KERNELS(float, f32)
DEF_KERNELS(double, f64)

/* ------------------------------------------------------------------ scatter / gather */

static ad_tensor *pool_scatter(ad_tape *t, ad_tensor *gy, const pool_geom *g);
static ad_tensor *pool_gather(ad_tape *t, ad_tensor *h, const pool_geom *g);

/* scatter and gather with one index are adjoint: <H, scatter(G)> = <gather(H), G>. */
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
  int tiled2 = g->k == 2 && g->st == 2 && g->pad == 0;
  if (gy->dtype == AD_F32) {
    if (tiled2)
      scatter2_f32(g, g->idx, AD_F(gy), AD_F(gx));
    else
      scatter_f32(g->idx, gy->size, AD_F(gy), AD_F(gx), gx->size);
  } else if (tiled2) {
    scatter2_f64(g, g->idx, AD_D(gy), AD_D(gx));
  } else {
    scatter_f64(g->idx, gy->size, AD_D(gy), AD_D(gx), gx->size);
  }
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
  if (h->dtype == AD_F32)
    gather_f32(g->idx, y->size, AD_F(h), AD_F(y));
  else
    gather_f64(g->idx, y->size, AD_D(h), AD_D(y));
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

ad_tensor *nn_max_pool2d(ad_tape *t, ad_tensor *x, int k, int stride, int pad) {
  pool_geom g;
  if (!make_geom(t, "nn_max_pool2d", x, k, stride, pad, &g)) return NULL;
  if (x->size > INT32_MAX)
    return ad__fail(t, AD_ERR_SHAPE, "nn_max_pool2d: more than 2^31 input elements");
  int64_t shape[4] = {g.n, g.c, g.p, g.q};
  ad_tensor *y = ad__alloc(t, x->dtype, 4, shape, 0);
  if (!y) return NULL;
  /* The index is needed only when the node is recorded. */
  int rec = ad__recording(t) && ad_needs_grad(x);
  if (rec && !(g.idx = ad_arena_alloc(t, sizeof(int32_t) * (size_t)y->size))) return NULL;
  if (x->dtype == AD_F32)
    maxpool_f32(&g, AD_F(x), AD_F(y), g.idx);
  else
    maxpool_f64(&g, AD_D(x), AD_D(y), g.idx);
  if (rec && !keep_geom(t, ad__record(t, &OP_MAXPOOL, y, 1, &x), &g)) return NULL;
  return ad__done(t, y, "max_pool2d");
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
  if (x->dtype == AD_F32)
    avgpool_f32(g, AD_F(x), AD_F(y));
  else
    avgpool_f64(g, AD_D(x), AD_D(y));
  ad_node *nd = ad__record(t, &OP_AVGPOOL, y, 1, &x);
  if (nd && !keep_geom(t, nd, g)) return NULL;
  return ad__done(t, y, "avg_pool2d");
}

static ad_tensor *avgpool_bwd_geom(ad_tape *t, ad_tensor *gy, const pool_geom *g) {
  if (!gy) return NULL;
  int64_t shape[4] = {g->n, g->c, g->h, g->w};
  ad_tensor *gx = ad__alloc(t, gy->dtype, 4, shape, 0);
  if (!gx) return NULL;
  if (gy->dtype == AD_F32)
    avgpool_bwd_f32(g, AD_F(gy), AD_F(gx));
  else
    avgpool_bwd_f64(g, AD_D(gy), AD_D(gx));
  ad_node *nd = ad__record(t, &OP_AVGPOOL_BWD, gx, 1, &gy);
  if (nd && !keep_geom(t, nd, g)) return NULL;
  return ad__done(t, gx, "avg_pool2d_backward");
}

ad_tensor *nn_avg_pool2d(ad_tape *t, ad_tensor *x, int k, int stride, int pad) {
  pool_geom g;
  if (!make_geom(t, "nn_avg_pool2d", x, k, stride, pad, &g)) return NULL;
  return avgpool_geom(t, x, &g);
}
