/* linsolve.c — the implicit solvers' linear algebra over lists of tensors:
 * one-pass, vectorizable dot / linear combination / CG update, and
 * conjugate gradients against any symmetric operator (bl_linop). Used by
 * cg.c and hoag.c (A = H or G) and imaml.c (A = I + H / lambda). */
#include "implicit_internal.h"

#include "autodiff/ad_simd.h"

#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------- fused passes
 *
 * The solvers' passes over the 157k-element lists are memory bound, so
 * each one reads and writes every list once and takes its dot product on
 * the way. The dot is summed exactly as bl__dot (common.c) sums it: f32
 * products in 16 float lanes, lane j + l in lane l, the tail in lane 0,
 * the lanes added into a double in order every 4096 elements; f64 in 8
 * double lanes over the whole list. The elementwise formulas are written
 * one operation per statement, so no compiler contracts a * b + c into an
 * FMA: the AVX-512, AVX2 and portable instances below give the same bits,
 * and the same bits as the unfused passes they replace.
 *
 * The operator pass applies A = H + diag(dec) + s I to v, given the
 * sweep's h = H_sweep v:  out = h + dec (.) v + s v  (either term absent
 * when dec is NULL or s == 0). */
enum { FU_FLUSH = 4096 };

#define FU_LD16(p) (*(const ad_v16fu *)(const void *)(p))
#define FU_ST16(p, x) (*(ad_v16fu *)(void *)(p) = (x))
#define FU_LD8(p) (*(const ad_v8du *)(const void *)(p))
#define FU_ST8(p, x) (*(ad_v8du *)(void *)(p) = (x))

/* One instance of the kernels per instruction set (ATTR), named *_SFX. */
#define FU_KERNELS(SFX, ATTR)                                                                      \
  /* out = h + d v + s v; returns <v, out>. */                                                     \
  ATTR static void op32_##SFX(float *o, const float *h, const float *d, float s, const float *v,   \
                              int64_t n, float *lanes) {                                           \
    for (int64_t c = 0; c < n; c += FU_FLUSH) {                                                    \
      int64_t e = c + FU_FLUSH < n ? c + FU_FLUSH : n, j = c;                                      \
      ad_v16f acc = {0};                                                                           \
      for (; j + 16 <= e; j += 16) {                                                               \
        ad_v16f x = FU_LD16(v + j), a = FU_LD16(h + j), t;                                         \
        if (d) {                                                                                   \
          t = FU_LD16(d + j) * x;                                                                  \
          a = a + t;                                                                               \
        }                                                                                          \
        if (s != 0) {                                                                              \
          t = s * x;                                                                               \
          a = a + t;                                                                               \
        }                                                                                          \
        FU_ST16(o + j, a);                                                                         \
        t = x * a;                                                                                 \
        acc = acc + t;                                                                             \
      }                                                                                            \
      float l[16];                                                                                 \
      memcpy(l, &acc, sizeof l);                                                                   \
      for (; j < e; j++) {                                                                         \
        float x = v[j], a = h[j], t;                                                               \
        if (d) {                                                                                   \
          t = d[j] * x;                                                                            \
          a = a + t;                                                                               \
        }                                                                                          \
        if (s != 0) {                                                                              \
          t = s * x;                                                                               \
          a = a + t;                                                                               \
        }                                                                                          \
        o[j] = a;                                                                                  \
        t = x * a;                                                                                 \
        l[0] = l[0] + t;                                                                           \
      }                                                                                            \
      memcpy(lanes + (c / FU_FLUSH) * 16, l, sizeof l);                                            \
    }                                                                                              \
    return;                                                                                        \
  }                                                                                                \
  ATTR static double op64_##SFX(double *o, const double *h, const double *d, double s,             \
                                const double *v, int64_t n) {                                      \
    ad_v8d acc = {0};                                                                              \
    int64_t j = 0;                                                                                 \
    for (; j + 8 <= n; j += 8) {                                                                   \
      ad_v8d x = FU_LD8(v + j), a = FU_LD8(h + j), t;                                              \
      if (d) {                                                                                     \
        t = FU_LD8(d + j) * x;                                                                     \
        a = a + t;                                                                                 \
      }                                                                                            \
      if (s != 0) {                                                                                \
        t = s * x;                                                                                 \
        a = a + t;                                                                                 \
      }                                                                                            \
      FU_ST8(o + j, a);                                                                            \
      t = x * a;                                                                                   \
      acc = acc + t;                                                                               \
    }                                                                                              \
    double l[8], tot = 0;                                                                          \
    memcpy(l, &acc, sizeof l);                                                                     \
    for (; j < n; j++) {                                                                           \
      double x = v[j], a = h[j], t;                                                                \
      if (d) {                                                                                     \
        t = d[j] * x;                                                                              \
        a = a + t;                                                                                 \
      }                                                                                            \
      if (s != 0) {                                                                                \
        t = s * x;                                                                                 \
        a = a + t;                                                                                 \
      }                                                                                            \
      o[j] = a;                                                                                    \
      t = x * a;                                                                                   \
      l[0] = l[0] + t;                                                                             \
    }                                                                                              \
    for (int k = 0; k < 8; k++) tot += l[k];                                                       \
    return tot;                                                                                    \
  }                                                                                                \
  /* a = h + d q + s q;  q = q + na a (na = -alpha);  v = v + q; returns <q, q>. */                \
  ATTR static void nm32_##SFX(float *q, float *v, const float *h, const float *d, float s,         \
                              float na, int64_t n, float *lanes) {                                 \
    for (int64_t c = 0; c < n; c += FU_FLUSH) {                                                    \
      int64_t e = c + FU_FLUSH < n ? c + FU_FLUSH : n, j = c;                                      \
      ad_v16f acc = {0};                                                                           \
      for (; j + 16 <= e; j += 16) {                                                               \
        ad_v16f x = FU_LD16(q + j), a = FU_LD16(h + j), t;                                         \
        if (d) {                                                                                   \
          t = FU_LD16(d + j) * x;                                                                  \
          a = a + t;                                                                               \
        }                                                                                          \
        if (s != 0) {                                                                              \
          t = s * x;                                                                               \
          a = a + t;                                                                               \
        }                                                                                          \
        t = na * a;                                                                                \
        x = x + t;                                                                                 \
        FU_ST16(q + j, x);                                                                         \
        FU_ST16(v + j, FU_LD16(v + j) + x);                                                        \
        t = x * x;                                                                                 \
        acc = acc + t;                                                                             \
      }                                                                                            \
      float l[16];                                                                                 \
      memcpy(l, &acc, sizeof l);                                                                   \
      for (; j < e; j++) {                                                                         \
        float x = q[j], a = h[j], t;                                                               \
        if (d) {                                                                                   \
          t = d[j] * x;                                                                            \
          a = a + t;                                                                               \
        }                                                                                          \
        if (s != 0) {                                                                              \
          t = s * x;                                                                               \
          a = a + t;                                                                               \
        }                                                                                          \
        t = na * a;                                                                                \
        x = x + t;                                                                                 \
        q[j] = x;                                                                                  \
        v[j] = v[j] + x;                                                                           \
        t = x * x;                                                                                 \
        l[0] = l[0] + t;                                                                           \
      }                                                                                            \
      memcpy(lanes + (c / FU_FLUSH) * 16, l, sizeof l);                                            \
    }                                                                                              \
    return;                                                                                        \
  }                                                                                                \
  ATTR static double nm64_##SFX(double *q, double *v, const double *h, const double *d, double s,  \
                                double na, int64_t n) {                                            \
    ad_v8d acc = {0};                                                                              \
    int64_t j = 0;                                                                                 \
    for (; j + 8 <= n; j += 8) {                                                                   \
      ad_v8d x = FU_LD8(q + j), a = FU_LD8(h + j), t;                                              \
      if (d) {                                                                                     \
        t = FU_LD8(d + j) * x;                                                                     \
        a = a + t;                                                                                 \
      }                                                                                            \
      if (s != 0) {                                                                                \
        t = s * x;                                                                                 \
        a = a + t;                                                                                 \
      }                                                                                            \
      t = na * a;                                                                                  \
      x = x + t;                                                                                   \
      FU_ST8(q + j, x);                                                                            \
      FU_ST8(v + j, FU_LD8(v + j) + x);                                                            \
      t = x * x;                                                                                   \
      acc = acc + t;                                                                               \
    }                                                                                              \
    double l[8], tot = 0;                                                                          \
    memcpy(l, &acc, sizeof l);                                                                     \
    for (; j < n; j++) {                                                                           \
      double x = q[j], a = h[j], t;                                                                \
      if (d) {                                                                                     \
        t = d[j] * x;                                                                              \
        a = a + t;                                                                                 \
      }                                                                                            \
      if (s != 0) {                                                                                \
        t = s * x;                                                                                 \
        a = a + t;                                                                                 \
      }                                                                                            \
      t = na * a;                                                                                  \
      x = x + t;                                                                                   \
      q[j] = x;                                                                                    \
      v[j] = v[j] + x;                                                                             \
      t = x * x;                                                                                   \
      l[0] = l[0] + t;                                                                             \
    }                                                                                              \
    for (int k = 0; k < 8; k++) tot += l[k];                                                       \
    return tot;                                                                                    \
  }                                                                                                \
  /* x = x + a p;  r = r - a Ap; returns <r, r>. */                                                \
  ATTR static void cg32_##SFX(float *x, float *r, const float *p, const float *ap, float a,        \
                              int64_t n, float *lanes) {                                           \
    for (int64_t c = 0; c < n; c += FU_FLUSH) {                                                    \
      int64_t e = c + FU_FLUSH < n ? c + FU_FLUSH : n, j = c;                                      \
      ad_v16f acc = {0};                                                                           \
      for (; j + 16 <= e; j += 16) {                                                               \
        ad_v16f t = a * FU_LD16(p + j), y = FU_LD16(r + j);                                        \
        FU_ST16(x + j, FU_LD16(x + j) + t);                                                        \
        t = a * FU_LD16(ap + j);                                                                   \
        y = y - t;                                                                                 \
        FU_ST16(r + j, y);                                                                         \
        t = y * y;                                                                                 \
        acc = acc + t;                                                                             \
      }                                                                                            \
      float l[16];                                                                                 \
      memcpy(l, &acc, sizeof l);                                                                   \
      for (; j < e; j++) {                                                                         \
        float t = a * p[j], y = r[j];                                                              \
        x[j] = x[j] + t;                                                                           \
        t = a * ap[j];                                                                             \
        y = y - t;                                                                                 \
        r[j] = y;                                                                                  \
        t = y * y;                                                                                 \
        l[0] = l[0] + t;                                                                           \
      }                                                                                            \
      memcpy(lanes + (c / FU_FLUSH) * 16, l, sizeof l);                                            \
    }                                                                                              \
    return;                                                                                        \
  }                                                                                                \
  ATTR static double cg64_##SFX(double *x, double *r, const double *p, const double *ap, double a, \
                                int64_t n) {                                                       \
    ad_v8d acc = {0};                                                                              \
    int64_t j = 0;                                                                                 \
    for (; j + 8 <= n; j += 8) {                                                                   \
      ad_v8d t = a * FU_LD8(p + j), y = FU_LD8(r + j);                                             \
      FU_ST8(x + j, FU_LD8(x + j) + t);                                                            \
      t = a * FU_LD8(ap + j);                                                                      \
      y = y - t;                                                                                   \
      FU_ST8(r + j, y);                                                                            \
      t = y * y;                                                                                   \
      acc = acc + t;                                                                               \
    }                                                                                              \
    double l[8], tot = 0;                                                                          \
    memcpy(l, &acc, sizeof l);                                                                     \
    for (; j < n; j++) {                                                                           \
      double t = a * p[j], y = r[j];                                                               \
      x[j] = x[j] + t;                                                                             \
      t = a * ap[j];                                                                               \
      y = y - t;                                                                                   \
      r[j] = y;                                                                                    \
      t = y * y;                                                                                   \
      l[0] = l[0] + t;                                                                             \
    }                                                                                              \
    for (int k = 0; k < 8; k++) tot += l[k];                                                       \
    return tot;                                                                                    \
  }                                                                                                \
  /* r = r - a Ap; returns <r, r> (f32: lane sums per chunk). */                                   \
  ATTR static void rs32_##SFX(float *r, const float *ap, float a, int64_t n, float *lanes) {       \
    for (int64_t c = 0; c < n; c += FU_FLUSH) {                                                    \
      int64_t e = c + FU_FLUSH < n ? c + FU_FLUSH : n, j = c;                                      \
      ad_v16f acc = {0};                                                                           \
      for (; j + 16 <= e; j += 16) {                                                               \
        ad_v16f t = a * FU_LD16(ap + j), y = FU_LD16(r + j);                                       \
        y = y - t;                                                                                 \
        FU_ST16(r + j, y);                                                                         \
        t = y * y;                                                                                 \
        acc = acc + t;                                                                             \
      }                                                                                            \
      float l[16];                                                                                 \
      memcpy(l, &acc, sizeof l);                                                                   \
      for (; j < e; j++) {                                                                         \
        float t = a * ap[j], y = r[j];                                                             \
        y = y - t;                                                                                 \
        r[j] = y;                                                                                  \
        t = y * y;                                                                                 \
        l[0] = l[0] + t;                                                                           \
      }                                                                                            \
      memcpy(lanes + (c / FU_FLUSH) * 16, l, sizeof l);                                            \
    }                                                                                              \
  }                                                                                                \
  ATTR static double rs64_##SFX(double *r, const double *ap, double a, int64_t n) {                \
    ad_v8d acc = {0};                                                                              \
    int64_t j = 0;                                                                                 \
    for (; j + 8 <= n; j += 8) {                                                                   \
      ad_v8d t = a * FU_LD8(ap + j), y = FU_LD8(r + j);                                            \
      y = y - t;                                                                                   \
      FU_ST8(r + j, y);                                                                            \
      t = y * y;                                                                                   \
      acc = acc + t;                                                                               \
    }                                                                                              \
    double l[8], tot = 0;                                                                          \
    memcpy(l, &acc, sizeof l);                                                                     \
    for (; j < n; j++) {                                                                           \
      double t = a * ap[j], y = r[j];                                                              \
      y = y - t;                                                                                   \
      r[j] = y;                                                                                    \
      t = y * y;                                                                                   \
      l[0] = l[0] + t;                                                                             \
    }                                                                                              \
    for (int k = 0; k < 8; k++) tot += l[k];                                                       \
    return tot;                                                                                    \
  }                                                                                                \
  /* x = x + a p;  p = r + beta p (bl__imp_lincomb's 1 r + beta p). */                             \
  ATTR static void dir32_##SFX(float *x, float *p, const float *r, float a, float beta,            \
                               int64_t n) {                                                        \
    int64_t j = 0;                                                                                 \
    for (; j + 16 <= n; j += 16) {                                                                 \
      ad_v16f y = FU_LD16(p + j), t = a * y;                                                       \
      FU_ST16(x + j, FU_LD16(x + j) + t);                                                          \
      t = beta * y;                                                                                \
      FU_ST16(p + j, FU_LD16(r + j) + t);                                                          \
    }                                                                                              \
    for (; j < n; j++) {                                                                           \
      float y = p[j], t = a * y;                                                                   \
      x[j] = x[j] + t;                                                                             \
      t = beta * y;                                                                                \
      p[j] = r[j] + t;                                                                             \
    }                                                                                              \
  }                                                                                                \
  ATTR static void dir64_##SFX(double *x, double *p, const double *r, double a, double beta,       \
                               int64_t n) {                                                        \
    int64_t j = 0;                                                                                 \
    for (; j + 8 <= n; j += 8) {                                                                   \
      ad_v8d y = FU_LD8(p + j), t = a * y;                                                         \
      FU_ST8(x + j, FU_LD8(x + j) + t);                                                            \
      t = beta * y;                                                                                \
      FU_ST8(p + j, FU_LD8(r + j) + t);                                                            \
    }                                                                                              \
    for (; j < n; j++) {                                                                           \
      double y = p[j], t = a * y;                                                                  \
      x[j] = x[j] + t;                                                                             \
      t = beta * y;                                                                                \
      p[j] = r[j] + t;                                                                             \
    }                                                                                              \
  }

#if AD_X86 && defined(__GNUC__)
/* The EXACT attributes: an FMA would change the bits by instruction set. */
FU_KERNELS(avx512, AD_AVX512_EXACT_ATTR)
FU_KERNELS(avx2, AD_AVX2_EXACT_ATTR)
#endif
FU_KERNELS(base, )

typedef void (*fu_op32_fn)(float *, const float *, const float *, float, const float *, int64_t,
                           float *);
typedef double (*fu_op64_fn)(double *, const double *, const double *, double, const double *,
                             int64_t);
typedef void (*fu_nm32_fn)(float *, float *, const float *, const float *, float, float, int64_t,
                           float *);
typedef double (*fu_nm64_fn)(double *, double *, const double *, const double *, double, double,
                             int64_t);
typedef void (*fu_cg32_fn)(float *, float *, const float *, const float *, float, int64_t, float *);
typedef double (*fu_cg64_fn)(double *, double *, const double *, const double *, double, int64_t);
typedef void (*fu_rs32_fn)(float *, const float *, float, int64_t, float *);
typedef double (*fu_rs64_fn)(double *, const double *, double, int64_t);
typedef void (*fu_dir32_fn)(float *, float *, const float *, float, float, int64_t);
typedef void (*fu_dir64_fn)(double *, double *, const double *, double, double, int64_t);
typedef struct {
  fu_op32_fn op32;
  fu_op64_fn op64;
  fu_nm32_fn nm32;
  fu_nm64_fn nm64;
  fu_cg32_fn cg32;
  fu_cg64_fn cg64;
  fu_rs32_fn rs32;
  fu_rs64_fn rs64;
  fu_dir32_fn dir32;
  fu_dir64_fn dir64;
} fu_set;

/* The instruction set by what the CPU runs: AVX-512 only where blas.c
 * allows our AVX-512 kernels (not under an AVX2-only HYPERTAPE_BLIS_ARCH
 * such as haswell). All three give the same bits, so this is speed only. */
static const fu_set *fu_pick(void) {
#define FU_SET(SFX)                                                                                \
  {                                                                                                \
    op32_##SFX, op64_##SFX, nm32_##SFX, nm64_##SFX, cg32_##SFX, cg64_##SFX, rs32_##SFX,            \
        rs64_##SFX, dir32_##SFX, dir64_##SFX                                                       \
  }
  static const fu_set base = FU_SET(base);
#if AD_X86 && defined(__GNUC__)
  static const fu_set a512 = FU_SET(avx512), a2 = FU_SET(avx2);
  if (ad__blas_avx512_allowed()) return &a512;
  if (ad__cpu_avx2_fma()) return &a2;
#endif
  return &base;
#undef FU_SET
}

/* An f32 pass split over the library's threads at 4096-element chunk
 * boundaries: each chunk leaves its 16 lane sums in `lanes`, and they are
 * added in chunk order afterwards, so the dot has bl__dot's bits whatever
 * the thread count. */
enum { FU_OP, FU_NM, FU_CG, FU_RS, FU_DIR, FU_BATCH = 64, FU_GRAIN = 4 };
typedef struct {
  const fu_set *k;
  int kind;
  float *a, *b;
  const float *c, *d, *e;
  float s, na;
  int64_t n, c0;
  float lanes[FU_BATCH * 16];
} fu_job;

static void fu_range32(void *ctx, int part, int64_t lo, int64_t hi) {
  (void)part;
  fu_job *J = ctx;
  int64_t off = (J->c0 + lo) * FU_FLUSH, end = (J->c0 + hi) * FU_FLUSH;
  int64_t len = (end < J->n ? end : J->n) - off;
  const float *d = J->d ? J->d + off : NULL;
  float *l = J->lanes + lo * 16;
  switch (J->kind) {
  case FU_OP:
    J->k->op32(J->a + off, J->c + off, d, J->s, J->e + off, len, l);
    break;
  case FU_NM:
    J->k->nm32(J->a + off, J->b + off, J->c + off, d, J->s, J->na, len, l);
    break;
  case FU_CG:
    J->k->cg32(J->a + off, J->b + off, J->c + off, d, J->s, len, l);
    break;
  case FU_RS:
    J->k->rs32(J->a + off, J->c + off, J->s, len, l);
    break;
  default: /* FU_DIR: no dot, `lanes` unused */
    J->k->dir32(J->a + off, J->b + off, J->c + off, J->s, J->na, len);
    break;
  }
}

static double fu_run32(fu_job *J) {
  double tot = 0;
  int64_t nch = (J->n + FU_FLUSH - 1) / FU_FLUSH;
  for (int64_t c0 = 0; c0 < nch; c0 += FU_BATCH) {
    int64_t nb = nch - c0 < FU_BATCH ? nch - c0 : FU_BATCH;
    J->c0 = c0;
    ad__par_for(nb, FU_GRAIN, fu_range32, J);
    for (int64_t i = 0; i < nb * 16; i++) tot += J->lanes[i];
  }
  return tot;
}

static int fu_all(ad_dtype dt, const ad_tensor *a, const ad_tensor *b, const ad_tensor *c) {
  return a->dtype == dt && b->dtype == dt && (!c || c->dtype == dt);
}

/* ---------------------------------------------------------------- solver vector algebra */

void bl__imp_lincomb(int n, ad_tensor *const *out, double a, ad_tensor *const *x, double b,
                     ad_tensor *const *y) {
  for (int i = 0; i < n; i++) {
    int64_t m = out[i]->size;
    if (out[i]->dtype == AD_F32 && x[i]->dtype == AD_F32 && y[i]->dtype == AD_F32) {
      float *o = AD_F(out[i]), fa = (float)a, fb = (float)b;
      const float *xp = AD_F(x[i]), *yp = AD_F(y[i]);
      for (int64_t j = 0; j < m; j++) o[j] = fa * xp[j] + fb * yp[j];
    } else if (out[i]->dtype == AD_F64 && x[i]->dtype == AD_F64 && y[i]->dtype == AD_F64) {
      double *o = AD_D(out[i]);
      const double *xp = AD_D(x[i]), *yp = AD_D(y[i]);
      for (int64_t j = 0; j < m; j++) o[j] = a * xp[j] + b * yp[j];
    } else {
      for (int64_t j = 0; j < m; j++) ad_set(out[i], j, a * ad_get(x[i], j) + b * ad_get(y[i], j));
    }
  }
}

/* The general path's a = h + d v + s v, in double. */
static double fu_apply_at(const ad_tensor *h, const ad_tensor *d, double s, const ad_tensor *v,
                          int64_t j) {
  double x = ad_get(v, j), a = ad_get(h, j);
  if (d) a += ad_get(d, j) * x;
  if (s != 0) a += s * x;
  return a;
}

double bl__imp_op_pass(int n, ad_tensor *const *out, ad_tensor *const *h, ad_tensor *const *dec,
                       const double *s, ad_tensor *const *v) {
  const fu_set *k = fu_pick();
  double tot = 0;
  for (int i = 0; i < n; i++) {
    int64_t m = out[i]->size;
    const ad_tensor *d = dec ? dec[i] : NULL;
    double si = s ? s[i] : 0;
    if (fu_all(AD_F32, out[i], h[i], d) && v[i]->dtype == AD_F32) {
      fu_job J = {.k = k,
                  .kind = FU_OP,
                  .a = AD_F(out[i]),
                  .c = AD_F(h[i]),
                  .d = d ? AD_F(d) : NULL,
                  .e = AD_F(v[i]),
                  .s = (float)si,
                  .n = m};
      tot += fu_run32(&J);
    } else if (fu_all(AD_F64, out[i], h[i], d) && v[i]->dtype == AD_F64) {
      tot += k->op64(AD_D(out[i]), AD_D(h[i]), d ? AD_D(d) : NULL, si, AD_D(v[i]), m);
    } else {
      for (int64_t j = 0; j < m; j++) ad_set(out[i], j, fu_apply_at(h[i], d, si, v[i], j));
      tot += bl__dot(1, &v[i], &out[i]);
    }
  }
  return tot;
}

double bl__imp_cg_step(int n, ad_tensor *const *x, ad_tensor *const *r, ad_tensor *const *p,
                       ad_tensor *const *Ap, double a) {
  const fu_set *k = fu_pick();
  double rr = 0;
  for (int i = 0; i < n; i++) {
    int64_t m = x[i]->size;
    if (fu_all(AD_F32, x[i], r[i], p[i]) && Ap[i]->dtype == AD_F32) {
      fu_job J = {.k = k,
                  .kind = FU_CG,
                  .a = AD_F(x[i]),
                  .b = AD_F(r[i]),
                  .c = AD_F(p[i]),
                  .d = AD_F(Ap[i]),
                  .s = (float)a,
                  .n = m};
      rr += fu_run32(&J);
    } else if (fu_all(AD_F64, x[i], r[i], p[i]) && Ap[i]->dtype == AD_F64) {
      rr += k->cg64(AD_D(x[i]), AD_D(r[i]), AD_D(p[i]), AD_D(Ap[i]), a, m);
    } else {
      bl__axpy(1, &x[i], a, &p[i]);
      bl__axpy(1, &r[i], -a, &Ap[i]);
      rr += bl__dot(1, &r[i], &r[i]);
    }
  }
  return rr;
}

double bl__imp_cg_resid(int n, ad_tensor *const *r, ad_tensor *const *Ap, double a) {
  const fu_set *k = fu_pick();
  double rr = 0;
  for (int i = 0; i < n; i++) {
    int64_t m = r[i]->size;
    if (r[i]->dtype == AD_F32 && Ap[i]->dtype == AD_F32) {
      fu_job J = {.k = k, .kind = FU_RS, .a = AD_F(r[i]), .c = AD_F(Ap[i]), .s = (float)a, .n = m};
      rr += fu_run32(&J);
    } else if (r[i]->dtype == AD_F64 && Ap[i]->dtype == AD_F64) {
      rr += k->rs64(AD_D(r[i]), AD_D(Ap[i]), a, m);
    } else {
      bl__axpy(1, &r[i], -a, &Ap[i]);
      rr += bl__dot(1, &r[i], &r[i]);
    }
  }
  return rr;
}

void bl__imp_cg_dir(int n, ad_tensor *const *x, ad_tensor *const *p, ad_tensor *const *r, double a,
                    double beta) {
  const fu_set *k = fu_pick();
  for (int i = 0; i < n; i++) {
    int64_t m = x[i]->size;
    if (fu_all(AD_F32, x[i], p[i], r[i])) {
      fu_job J = {.k = k,
                  .kind = FU_DIR,
                  .a = AD_F(x[i]),
                  .b = AD_F(p[i]),
                  .c = AD_F(r[i]),
                  .s = (float)a,
                  .na = (float)beta,
                  .n = m};
      fu_run32(&J);
    } else if (fu_all(AD_F64, x[i], p[i], r[i])) {
      k->dir64(AD_D(x[i]), AD_D(p[i]), AD_D(r[i]), a, beta, m);
    } else {
      bl__axpy(1, &x[i], a, &p[i]);
      bl__imp_lincomb(1, &p[i], 1.0, &r[i], beta, &p[i]);
    }
  }
}

double bl__imp_neumann_pass(int n, ad_tensor *const *q, ad_tensor *const *v, double alpha,
                            ad_tensor *const *h, ad_tensor *const *dec, const double *s) {
  const fu_set *k = fu_pick();
  double qq = 0;
  for (int i = 0; i < n; i++) {
    int64_t m = q[i]->size;
    const ad_tensor *d = dec ? dec[i] : NULL;
    double si = s ? s[i] : 0;
    if (fu_all(AD_F32, q[i], v[i], d) && h[i]->dtype == AD_F32) {
      fu_job J = {.k = k,
                  .kind = FU_NM,
                  .a = AD_F(q[i]),
                  .b = AD_F(v[i]),
                  .c = AD_F(h[i]),
                  .d = d ? AD_F(d) : NULL,
                  .s = (float)si,
                  .na = -(float)alpha,
                  .n = m};
      qq += fu_run32(&J);
    } else if (fu_all(AD_F64, q[i], v[i], d) && h[i]->dtype == AD_F64) {
      qq += k->nm64(AD_D(q[i]), AD_D(v[i]), AD_D(h[i]), d ? AD_D(d) : NULL, si, -alpha, m);
    } else {
      for (int64_t j = 0; j < m; j++) {
        double a = fu_apply_at(h[i], d, si, q[i], j);
        ad_set(q[i], j, ad_get(q[i], j) - alpha * a);
        ad_set(v[i], j, ad_get(v[i], j) + ad_get(q[i], j));
      }
      qq += bl__dot(1, &q[i], &q[i]);
    }
  }
  return qq;
}

double bl__imp_neumann_step(int n, ad_tensor *const *q, ad_tensor *const *v, double alpha,
                            ad_tensor *const *hq) {
  return bl__imp_neumann_pass(n, q, v, alpha, hq, NULL, NULL);
}

/* ---------------------------------------------------------------- conjugate gradients */

/* CG with A v and, when Adot is given, <v, A v> from the same pass. */
static ad_status cg_run(ad_tape *t, int n, bl_linop A, bl_linop_dot Adot, void *ctx,
                        ad_tensor *const *b, ad_tensor *const *x, int64_t K, double tol, int warm,
                        bl_cg_info *info) {
  ad_tensor *r[NN_MAX_PARAMS], *p[NN_MAX_PARAMS], *Ap[NN_MAX_PARAMS];
  memset(info, 0, sizeof *info);
  for (int i = 0; i < n; i++) {
    r[i] = ad_zeros_like(t, b[i]);
    p[i] = ad_zeros_like(t, b[i]);
    Ap[i] = ad_zeros_like(t, b[i]);
    if (!r[i] || !p[i] || !Ap[i]) return ad_tape_status(t);
  }
  info->b_norm = sqrt(bl__dot(n, b, b));
  ad_status s;
  double pAp = 0;
  if (warm) { /* r = b - A x0 */
    if ((s = Adot ? Adot(ctx, x, Ap, &pAp) : A(ctx, x, Ap))) return s;
    bl__imp_lincomb(n, r, 1.0, b, -1.0, Ap);
  } else {
    bl__zero(n, x);
    bl__copy_list(n, r, b);
  }
  bl__copy_list(n, p, r);
  double rs = bl__dot(n, r, r);
  for (int64_t k = 0; k < K; k++) {
    if (sqrt(rs) <= tol * info->b_norm) break;
    if (Adot) {
      if ((s = Adot(ctx, p, Ap, &pAp))) return s;
    } else {
      if ((s = A(ctx, p, Ap))) return s;
      pAp = bl__dot(n, p, Ap);
    }
    if (!isfinite(pAp)) { /* a product overflowed or met a NaN: say where */
      ad__fail(t, AD_ERR_NUMERIC,
               "conjugate gradients: p^T A p = %g at solver iteration %lld (the curvature "
               "products are not finite)",
               pAp, (long long)(k + 1));
      return AD_ERR_NUMERIC;
    }
    if (!(pAp > 0)) { /* not positive definite along p: keep x as it is */
      info->negative_curvature = 1;
      break;
    }
    double a = rs / pAp;
    /* r -= a Ap with ||r||^2, then x += a p and p = r + (rs_new / rs) p in
     * one more pass: the bits of bl__imp_cg_step then bl__imp_lincomb,
     * with one list fewer read. */
    double rs_new = bl__imp_cg_resid(n, r, Ap, a);
    if (!isfinite(rs_new)) {
      ad__fail(t, AD_ERR_NUMERIC, "conjugate gradients: ||r||^2 = %g at solver iteration %lld",
               rs_new, (long long)(k + 1));
      return AD_ERR_NUMERIC;
    }
    bl__imp_cg_dir(n, x, p, r, a, rs_new / rs);
    rs = rs_new;
    info->iterations++;
  }
  info->residual = sqrt(rs);
  return AD_OK;
}

ad_status bl__cg(ad_tape *t, int n, bl_linop A, void *ctx, ad_tensor *const *b, ad_tensor *const *x,
                 int64_t K, double tol, int warm, bl_cg_info *info) {
  return cg_run(t, n, A, NULL, ctx, b, x, K, tol, warm, info);
}

ad_status bl__cg_dot(ad_tape *t, int n, bl_linop_dot A, void *ctx, ad_tensor *const *b,
                     ad_tensor *const *x, int64_t K, double tol, int warm, bl_cg_info *info) {
  return cg_run(t, n, NULL, A, ctx, b, x, K, tol, warm, info);
}
