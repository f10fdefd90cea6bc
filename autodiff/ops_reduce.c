/* ops_reduce.c — sums, means, max, logsumexp, softmax, log_softmax, dot.
 * Axis kernels see a tensor as [outer, n, inner] around the axis. */
#include "ad_internal.h"
#include "ad_simd.h"

#include <math.h>
#include <string.h>

/* v[i] = ad__exp(v[i]) for i < n. glibc's exp is a call per element; a
 * branch-free polynomial in a loop would vectorize but for the clamps
 * (under trapping math GCC keeps a compare as a branch), so on AVX-512 the
 * same operations, in the same order and uncontracted, are written out on
 * 8 lanes: the bits of ad__exp either way. */
#if AD_X86 && defined(__GNUC__)
AD_AVX512_EXACT_ATTR static void exp_array_w512(double *v, int64_t n) {
  static const double c[AD__EXP_NPOLY] = {AD__EXP_POLY};
  const __m512d magic = _mm512_set1_pd(AD__EXP_MAGIC), lo = _mm512_set1_pd(AD__EXP_LO),
                hi = _mm512_set1_pd(AD__EXP_HI), log2e = _mm512_set1_pd(AD__EXP_LOG2E),
                ln2_hi = _mm512_set1_pd(AD__EXP_LN2_HI), ln2_lo = _mm512_set1_pd(AD__EXP_LN2_LO);
  const __m512i mb = _mm512_castpd_si512(magic), off = _mm512_set1_epi64(2048),
                bias = _mm512_set1_epi64(1023 - 1024);
  for (int64_t i = 0; i < n; i += 8) {
    const __mmask8 m = (__mmask8)(n - i >= 8 ? 0xFF : (1u << (n - i)) - 1u);
    const __m512d x = _mm512_maskz_loadu_pd(m, v + i);
    /* max/min return their second operand when either is NaN: x's NaN */
    const __m512d xc = _mm512_min_pd(hi, _mm512_max_pd(lo, x));
    const __m512d tk = _mm512_add_pd(_mm512_mul_pd(xc, log2e), magic);
    const __m512d kf = _mm512_sub_pd(tk, magic);
    const __m512d r =
        _mm512_sub_pd(_mm512_sub_pd(xc, _mm512_mul_pd(kf, ln2_hi)), _mm512_mul_pd(kf, ln2_lo));
    __m512d p = _mm512_set1_pd(c[0]);
    for (int j = 1; j < AD__EXP_NPOLY; j++)
      p = _mm512_add_pd(_mm512_mul_pd(p, r), _mm512_set1_pd(c[j]));
    const __m512i u = _mm512_add_epi64(_mm512_sub_epi64(_mm512_castpd_si512(tk), mb), off);
    const __m512i u1 = _mm512_srli_epi64(u, 1);
    const __m512i e1 = _mm512_slli_epi64(_mm512_add_epi64(u1, bias), 52);
    const __m512i e2 = _mm512_slli_epi64(_mm512_add_epi64(_mm512_sub_epi64(u, u1), bias), 52);
    const __m512d y =
        _mm512_mul_pd(_mm512_mul_pd(p, _mm512_castsi512_pd(e1)), _mm512_castsi512_pd(e2));
    _mm512_mask_storeu_pd(v + i, m, y);
  }
}
#endif
static void exp_array(double *v, int64_t n) {
#if AD_X86 && defined(__GNUC__)
  if (ad__blas_avx512_allowed()) {
    exp_array_w512(v, n);
    return;
  }
#endif
  for (int64_t i = 0; i < n; i++) v[i] = ad__exp(v[i]);
}

/* Elements whose exps the axis kernels take in one exp_array call: whole
 * rows of a short axis (a classifier's 10 logits) are batched, so the
 * polynomial runs on full vectors, many at once. */
#define EXP_BLK 512

/* Kernels written once per element type. Each computes the outputs of
 * outer indices [o0, o1) and inner indices [i0, i1): the threaded loops
 * below hand disjoint blocks of outputs to the parts, and every output is
 * computed in the same order of operations whichever block holds it, so
 * axis reductions give the same bits at every thread count. */
#define DEF_KERNELS(T, S)                                                                          \
  static void sum_axis_##S(const T *x, T *y, int64_t n, int64_t inner, int64_t o0, int64_t o1,     \
                           int64_t i0, int64_t i1) {                                               \
    if (inner == 1) { /* last axis: row sums, 8 lanes so the loop vectorizes */                    \
      for (int64_t o = o0; o < o1; o++) {                                                          \
        const T *xo = x + o * n;                                                                   \
        T lane[8] = {0};                                                                           \
        int64_t k = 0;                                                                             \
        for (; k + 8 <= n; k += 8)                                                                 \
          for (int l = 0; l < 8; l++) lane[l] += xo[k + l];                                        \
        T s = 0;                                                                                   \
        for (int l = 0; l < 8; l++) s += lane[l];                                                  \
        for (; k < n; k++) s += xo[k];                                                             \
        y[o] = s;                                                                                  \
      }                                                                                            \
      return;                                                                                      \
    }                                                                                              \
    for (int64_t o = o0; o < o1; o++) {                                                            \
      T *yo = y + o * inner;                                                                       \
      memset(yo + i0, 0, sizeof(T) * (size_t)(i1 - i0));                                           \
      for (int64_t k = 0; k < n; k++) {                                                            \
        const T *xk = x + (o * n + k) * inner;                                                     \
        for (int64_t i = i0; i < i1; i++) yo[i] += xk[i];                                          \
      }                                                                                            \
    }                                                                                              \
  }                                                                                                \
  /* max along the axis; onehot (if not NULL) marks the first maximum */                           \
  static void max_axis_##S(const T *x, T *y, T *onehot, int64_t n, int64_t inner, int64_t o0,      \
                           int64_t o1, int64_t i0, int64_t i1) {                                   \
    for (int64_t o = o0; o < o1; o++)                                                              \
      for (int64_t i = i0; i < i1; i++) {                                                          \
        int64_t best = 0;                                                                          \
        T m = x[o * n * inner + i];                                                                \
        for (int64_t k = 1; k < n; k++) {                                                          \
          T v = x[(o * n + k) * inner + i];                                                        \
          if (v > m || m != m) m = v, best = k;                                                    \
        }                                                                                          \
        y[o * inner + i] = m;                                                                      \
        if (onehot)                                                                                \
          for (int64_t k = 0; k < n; k++) onehot[(o * n + k) * inner + i] = (T)(k == best);        \
      }                                                                                            \
  }                                                                                                \
  /* y = log sum exp x along the axis, shifted by the max for stability;                           \
   * if sm is not NULL it receives softmax = exp(x - lse), lsm log_softmax. */                     \
  static void lse_axis_##S(const T *x, T *y, T *sm, T *lsm, int64_t n, int64_t inner, int64_t o0,  \
                           int64_t o1, int64_t i0, int64_t i1) {                                   \
    if (inner == 1 && n <= EXP_BLK) { /* whole rows, EXP_BLK / n at a time */                      \
      double e[EXP_BLK], lr[EXP_BLK];                                                              \
      const int64_t nb = EXP_BLK / n;                                                              \
      for (int64_t o = o0; o < o1; o += nb) {                                                      \
        const int64_t ob = o1 - o < nb ? o1 - o : nb;                                              \
        const T *xb = x + o * n;                                                                   \
        for (int64_t b = 0; b < ob; b++) {                                                         \
          const T *xo = xb + b * n;                                                                \
          T m = xo[0];                                                                             \
          for (int64_t k = 1; k < n; k++) m = xo[k] > m ? xo[k] : m;                               \
          if (!isfinite(m)) m = 0;                                                                 \
          lr[b] = (double)m;                                                                       \
          for (int64_t k = 0; k < n; k++) e[b * n + k] = (double)(xo[k] - m);                      \
        }                                                                                          \
        exp_array(e, n *ob);                                                                       \
        for (int64_t b = 0; b < ob; b++) {                                                         \
          double sum = 0;                                                                          \
          for (int64_t k = 0; k < n; k++) sum += e[b * n + k];                                     \
          lr[b] += log(sum);                                                                       \
          if (y) y[o + b] = (T)lr[b];                                                              \
        }                                                                                          \
        for (int64_t b = 0; lsm && b < ob; b++)                                                    \
          for (int64_t k = 0; k < n; k++)                                                          \
            lsm[(o + b) * n + k] = (T)((double)xb[b * n + k] - lr[b]);                             \
        if (!sm) continue;                                                                         \
        for (int64_t b = 0; b < ob; b++)                                                           \
          for (int64_t k = 0; k < n; k++) e[b * n + k] = (double)xb[b * n + k] - lr[b];            \
        exp_array(e, n *ob);                                                                       \
        for (int64_t j = 0; j < ob * n; j++) sm[o * n + j] = (T)e[j];                              \
      }                                                                                            \
      return;                                                                                      \
    }                                                                                              \
    for (int64_t o = o0; o < o1; o++)                                                              \
      for (int64_t i = i0; i < i1; i++) {                                                          \
        const T *xo = x + o * n * inner + i;                                                       \
        T m = xo[0];                                                                               \
        for (int64_t k = 1; k < n; k++) m = xo[k * inner] > m ? xo[k * inner] : m;                 \
        if (!isfinite(m)) m = 0;                                                                   \
        /* the exps EXP_BLK at a time, summed in order */                                          \
        double s = 0, e[EXP_BLK];                                                                  \
        for (int64_t k0 = 0; k0 < n; k0 += EXP_BLK) {                                              \
          const int64_t kn = n - k0 < EXP_BLK ? n - k0 : EXP_BLK;                                  \
          for (int64_t k = 0; k < kn; k++) e[k] = (double)(xo[(k0 + k) * inner] - m);              \
          exp_array(e, kn);                                                                        \
          for (int64_t k = 0; k < kn; k++) s += e[k];                                              \
        }                                                                                          \
        double l = (double)m + log(s);                                                             \
        if (y) y[o * inner + i] = (T)l;                                                            \
        T *smo = sm ? sm + o * n * inner + i : NULL, *lsmo = lsm ? lsm + o * n * inner + i : NULL; \
        for (int64_t k0 = 0; smo && k0 < n; k0 += EXP_BLK) {                                       \
          const int64_t kn = n - k0 < EXP_BLK ? n - k0 : EXP_BLK;                                  \
          for (int64_t k = 0; k < kn; k++) e[k] = (double)xo[(k0 + k) * inner] - l;                \
          exp_array(e, kn);                                                                        \
          for (int64_t k = 0; k < kn; k++) smo[(k0 + k) * inner] = (T)e[k];                        \
        }                                                                                          \
        for (int64_t k = 0; lsmo && k < n; k++) lsmo[k * inner] = (T)((double)xo[k * inner] - l);  \
      }                                                                                            \
  }                                                                                                \
  /* log_softmax's backward: r = g - exp(y) s along the axis, s the sums of                        \
   * g (one per output): exp in double (ad__exp, by exp_array), then a                             \
   * product and a difference in T. */                                                             \
  static void lsb_axis_##S(const T *g, T *r, const T *y, const T *s, int64_t n, int64_t inner,     \
                           int64_t o0, int64_t o1, int64_t i0, int64_t i1) {                       \
    double e[EXP_BLK];                                                                             \
    if (inner == 1 && n <= EXP_BLK) { /* whole rows, EXP_BLK / n at a time */                      \
      const int64_t nb = EXP_BLK / n;                                                              \
      for (int64_t o = o0; o < o1; o += nb) {                                                      \
        const int64_t ob = o1 - o < nb ? o1 - o : nb, j0 = o * n;                                  \
        for (int64_t j = 0; j < ob * n; j++) e[j] = (double)y[j0 + j];                             \
        exp_array(e, n *ob);                                                                       \
        for (int64_t b = 0; b < ob; b++)                                                           \
          for (int64_t k = 0; k < n; k++)                                                          \
            r[j0 + b * n + k] = g[j0 + b * n + k] - (T)e[b * n + k] * s[o + b];                    \
      }                                                                                            \
      return;                                                                                      \
    }                                                                                              \
    for (int64_t o = o0; o < o1; o++)                                                              \
      for (int64_t k = 0; k < n; k++) {                                                            \
        int64_t j0 = (o * n + k) * inner;                                                          \
        for (int64_t b = i0; b < i1; b += EXP_BLK) {                                               \
          const int64_t bn = i1 - b < EXP_BLK ? i1 - b : EXP_BLK;                                  \
          for (int64_t i = 0; i < bn; i++) e[i] = (double)y[j0 + b + i];                           \
          exp_array(e, bn);                                                                        \
          for (int64_t i = 0; i < bn; i++)                                                         \
            r[j0 + b + i] = g[j0 + b + i] - (T)e[i] * s[o * inner + b + i];                        \
        }                                                                                          \
      }                                                                                            \
  }

DEF_KERNELS(float, f32)
DEF_KERNELS(double, f64)

/* ---------------------------------------------------------------- threaded loops */

/* Elements of x per part: below this, waking a thread costs more than the
 * part saves (the pool's spin/sleep costs, see parallel.c). Whole sums
 * (sum, dot) are memory-bound like the elementwise ops; an axis kernel's
 * element costs at least as much. */
#define RED_GRAIN 32768

typedef enum { K_SUM, K_MAX, K_LSE, K_LSB } axis_kind;

typedef struct {
  axis_kind kind;
  ad_dtype dt;
  const void *x;
  void *y, *aux, *aux2; /* max: onehot; lse: sm, lsm; lsb: y, sums */
  int64_t outer, n, inner;
  int by_outer; /* parts split the outer indices (else the inner ones) */
} axis_ctx;

static void axis_part(void *vc, int part, int64_t lo, int64_t hi) {
  const axis_ctx *c = vc;
  (void)part;
  int64_t o0 = 0, o1 = c->outer, i0 = 0, i1 = c->inner;
  if (c->by_outer)
    o0 = lo, o1 = hi;
  else
    i0 = lo, i1 = hi;
  if (c->dt == AD_F32) {
    if (c->kind == K_SUM)
      sum_axis_f32(c->x, c->y, c->n, c->inner, o0, o1, i0, i1);
    else if (c->kind == K_MAX)
      max_axis_f32(c->x, c->y, c->aux, c->n, c->inner, o0, o1, i0, i1);
    else if (c->kind == K_LSB)
      lsb_axis_f32(c->x, c->y, c->aux, c->aux2, c->n, c->inner, o0, o1, i0, i1);
    else
      lse_axis_f32(c->x, c->y, c->aux, c->aux2, c->n, c->inner, o0, o1, i0, i1);
  } else {
    if (c->kind == K_SUM)
      sum_axis_f64(c->x, c->y, c->n, c->inner, o0, o1, i0, i1);
    else if (c->kind == K_MAX)
      max_axis_f64(c->x, c->y, c->aux, c->n, c->inner, o0, o1, i0, i1);
    else if (c->kind == K_LSB)
      lsb_axis_f64(c->x, c->y, c->aux, c->aux2, c->n, c->inner, o0, o1, i0, i1);
    else
      lse_axis_f64(c->x, c->y, c->aux, c->aux2, c->n, c->inner, o0, o1, i0, i1);
  }
}

/* Runs an axis kernel over every output, split over the outer indices
 * when there are several (each part then reads whole contiguous blocks),
 * else over the inner ones. */
static void run_axis(axis_kind kind, const ad_tensor *x, void *y, void *aux, void *aux2,
                     int64_t outer, int64_t n, int64_t inner) {
  axis_ctx c = {kind, x->dtype, x->data, y, aux, aux2, outer, n, inner, outer > 1};
  int64_t units = c.by_outer ? outer : inner;
  int64_t per_unit = c.by_outer ? n * inner : n; /* elements of x one unit reads */
  int64_t grain = per_unit >= RED_GRAIN ? 1 : RED_GRAIN / (per_unit > 0 ? per_unit : 1);
  ad__par_for(units, grain, axis_part, &c);
}

/* Whole sum (b == NULL) or dot product of a and b, one partial per part
 * added in part order: the same bits on every run at a given thread count
 * (and, at one thread, the same bits as the one-loop sum). */
typedef struct {
  const ad_tensor *a, *b;
  double *partial;
} sum_ctx;

/* Elements summed in float lanes before the lanes go into the double
 * total: float lanes keep the loop as fast as the plain float loop, and
 * flushing them every block keeps the float rounding to a block's worth
 * (float lanes over 300K elements had lost ~1e-6 of the result, and those
 * last digits then moved with the split into parts). */
#define SUM_BLOCK 1024

static void sum_part(void *vc, int part, int64_t lo, int64_t hi) {
  const sum_ctx *c = vc;
  /* Accumulate in double even for f32: a long sum loses digits otherwise. */
  double s = 0;
  if (c->a->dtype == AD_F32) {
    const float *A = AD_F(c->a), *B = c->b ? AD_F(c->b) : NULL;
    for (int64_t b0 = lo; b0 < hi; b0 += SUM_BLOCK) {
      int64_t b1 = hi - b0 < SUM_BLOCK ? hi : b0 + SUM_BLOCK, i = b0;
      float lane[8] = {0};
      if (B) {
        for (; i + 8 <= b1; i += 8)
          for (int k = 0; k < 8; k++) lane[k] += A[i + k] * B[i + k];
        for (int k = 0; k < 8; k++) s += lane[k];
        for (; i < b1; i++) s += (double)A[i] * B[i];
      } else {
        for (; i + 8 <= b1; i += 8)
          for (int k = 0; k < 8; k++) lane[k] += A[i + k];
        for (int k = 0; k < 8; k++) s += lane[k];
        for (; i < b1; i++) s += A[i];
      }
    }
  } else {
    const double *A = AD_D(c->a), *B = c->b ? AD_D(c->b) : NULL;
    if (B)
      for (int64_t i = lo; i < hi; i++) s += A[i] * B[i];
    else
      for (int64_t i = lo; i < hi; i++) s += A[i];
  }
  c->partial[part] = s;
}

static double sum_all(const ad_tensor *a, const ad_tensor *b) {
  double partial[AD_MAX_THREADS];
  int parts = ad__par_parts(a->size, RED_GRAIN);
  sum_ctx c = {a, b, partial};
  partial[0] = 0;
  ad__par_for(a->size, RED_GRAIN, sum_part, &c);
  double s = partial[0];
  for (int p = 1; p < parts; p++) s += partial[p];
  return s;
}

static void attr_axis(const ad_node *n, char *buf, size_t len) {
  snprintf(buf, len, "axis=%d%s", n->a.axis, n->a.keepdim ? " keepdim" : "");
}

/* Output shape of a reduction along axis. */
static int reduced_shape(const ad_tensor *x, int axis, int keepdim, int64_t *shape) {
  int nd = 0;
  for (int i = 0; i < x->ndim; i++) {
    if (i == axis) {
      if (keepdim) shape[nd++] = 1;
    } else {
      shape[nd++] = x->shape[i];
    }
  }
  return nd;
}

/* ---------------------------------------------------------------- sum, mean */
/* d sum(x) = g everywhere */
static void vjp_sum(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  if (need[0]) gin[0] = ad_expand(t, g, n->in[0]);
}
static const ad_op_def OP_SUM = {"sum", vjp_sum, NULL, {.mask = AD_SAVES(0, 0, 0, 0)}};

ad_tensor *ad_sum(ad_tape *t, ad_tensor *x) {
  if (!ad__check(t, "ad_sum", 1, &x)) return NULL;
  ad_tensor *out = ad__alloc(t, x->dtype, 0, NULL, 0);
  if (!out) return NULL;
  ad_set(out, 0, sum_all(x, NULL));
  ad__record(t, &OP_SUM, out, 1, &x);
  return ad__done(t, out, "ad_sum");
}

ad_tensor *ad_mean(ad_tape *t, ad_tensor *x) {
  if (!ad__check(t, "ad_mean", 1, &x)) return NULL;
  return ad_scale(t, ad_sum(t, x), 1.0 / (double)x->size);
}

/* d sum_axis(x) = g repeated along the axis */
static void vjp_sum_axis(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                         const int *need) {
  if (need[0])
    gin[0] = ad_broadcast_axis(t, g, n->a.axis, n->in[0]->shape[n->a.axis], n->a.keepdim);
}
static const ad_op_def OP_SUM_AXIS = {
    "sum_axis", vjp_sum_axis, attr_axis, {.mask = AD_SAVES(0, 0, 0, 0)}};

ad_tensor *ad_sum_axis(ad_tape *t, ad_tensor *x, int axis, int keepdim) {
  if (!ad__check(t, "ad_sum_axis", 1, &x) || !ad__axis(t, "ad_sum_axis", x, axis)) return NULL;
  int64_t shape[AD_MAX_DIMS];
  int nd = reduced_shape(x, axis, keepdim, shape);
  ad_tensor *out = ad__alloc(t, x->dtype, nd, shape, 0);
  if (!out) return NULL;
  int64_t outer, n, inner;
  ad__split(x, axis, &outer, &n, &inner);
  run_axis(K_SUM, x, out->data, NULL, NULL, outer, n, inner);
  ad_node *nd_ = ad__record(t, &OP_SUM_AXIS, out, 1, &x);
  if (nd_) {
    nd_->a.axis = axis;
    nd_->a.keepdim = keepdim;
  }
  return ad__done(t, out, "ad_sum_axis");
}

ad_tensor *ad_mean_axis(ad_tape *t, ad_tensor *x, int axis, int keepdim) {
  if (!ad__check(t, "ad_mean_axis", 1, &x) || !ad__axis(t, "ad_mean_axis", x, axis)) return NULL;
  return ad_scale(t, ad_sum_axis(t, x, axis, keepdim), 1.0 / (double)x->shape[axis]);
}

/* ---------------------------------------------------------------- max */
/* d max_axis(x) = g routed to the (first) maximum: g_b * onehot(argmax).
 * The onehot is a constant: max is piecewise linear. */
static void vjp_max_axis(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                         const int *need) {
  if (!need[0]) return;
  ad_tensor *gb = ad_broadcast_axis(t, g, n->a.axis, n->in[0]->shape[n->a.axis], n->a.keepdim);
  gin[0] = ad_mul(t, gb, (ad_tensor *)n->a.extra);
}
static const ad_op_def OP_MAX_AXIS = {
    "max_axis", vjp_max_axis, attr_axis, {.mask = AD_SAVES(0, 0, 0, 0) | AD_SAVES_EXTRA_TENSOR}};

ad_tensor *ad_max_axis(ad_tape *t, ad_tensor *x, int axis, int keepdim) {
  if (!ad__check(t, "ad_max_axis", 1, &x) || !ad__axis(t, "ad_max_axis", x, axis)) return NULL;
  int64_t shape[AD_MAX_DIMS];
  int nd = reduced_shape(x, axis, keepdim, shape);
  ad_tensor *out = ad__alloc(t, x->dtype, nd, shape, 0);
  if (!out) return NULL;
  int rec = ad__recording(t) && ad_needs_grad(x);
  ad_tensor *onehot = rec ? ad__like(t, x) : NULL;
  if (rec && !onehot) return NULL;
  int64_t outer, n, inner;
  ad__split(x, axis, &outer, &n, &inner);
  run_axis(K_MAX, x, out->data, onehot ? onehot->data : NULL, NULL, outer, n, inner);
  ad_node *nd_ = ad__record(t, &OP_MAX_AXIS, out, 1, &x);
  if (nd_) {
    nd_->a.axis = axis;
    nd_->a.keepdim = keepdim;
    nd_->a.extra = onehot;
  }
  return ad__done(t, out, "ad_max_axis");
}

/* ---------------------------------------------------------------- logsumexp, softmax */
/* d lse(x) = softmax(x) g_b */
static void vjp_lse(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  if (!need[0]) return;
  int ax = n->a.axis;
  ad_tensor *gb = ad_broadcast_axis(t, g, ax, n->in[0]->shape[ax], n->a.keepdim);
  gin[0] = ad_mul(t, gb, ad_softmax(t, n->in[0], ax));
}
static const ad_op_def OP_LSE = {
    "logsumexp", vjp_lse, attr_axis, {.mask = AD_SAVES(AD_S_IN(0), 0, 0, 0)}};

ad_tensor *ad_logsumexp(ad_tape *t, ad_tensor *x, int axis, int keepdim) {
  if (!ad__check(t, "ad_logsumexp", 1, &x) || !ad__axis(t, "ad_logsumexp", x, axis)) return NULL;
  int64_t shape[AD_MAX_DIMS];
  int nd = reduced_shape(x, axis, keepdim, shape);
  ad_tensor *out = ad__alloc(t, x->dtype, nd, shape, 0);
  if (!out) return NULL;
  int64_t outer, n, inner;
  ad__split(x, axis, &outer, &n, &inner);
  run_axis(K_LSE, x, out->data, NULL, NULL, outer, n, inner);
  ad_node *nd_ = ad__record(t, &OP_LSE, out, 1, &x);
  if (nd_) {
    nd_->a.axis = axis;
    nd_->a.keepdim = keepdim;
  }
  return ad__done(t, out, "ad_logsumexp");
}

/* d softmax: dx = y (g - sum(g y) along the axis) */
static void vjp_softmax(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                        const int *need) {
  if (!need[0]) return;
  int ax = n->a.axis;
  ad_tensor *y = n->out;
  ad_tensor *s = ad_sum_axis(t, ad_mul(t, g, y), ax, 1);
  gin[0] = ad_mul(t, y, ad_sub(t, g, ad_broadcast_axis(t, s, ax, y->shape[ax], 1)));
}
static const ad_op_def OP_SOFTMAX = {
    "softmax", vjp_softmax, attr_axis, {.mask = AD_SAVES(AD_S_OUT, 0, 0, 0)}};

/* d log_softmax: dx = g - softmax(x) sum(g) along the axis; softmax = exp(y),
 * as the one op log_softmax_backward(g, y) (below). */
static void vjp_log_softmax(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                            const int *need) {
  if (need[0]) gin[0] = ad__log_softmax_backward(t, g, n->out, n->a.axis);
}
static const ad_op_def OP_LOG_SOFTMAX = {
    "log_softmax", vjp_log_softmax, attr_axis, {.mask = AD_SAVES(AD_S_OUT, 0, 0, 0)}};

/* ---------------------------------------------------------------- log_softmax's backward
 * b(g, y) = g - e S_b,  e = exp(y),  S = sum of g along the axis (S_b: S
 * repeated along it), y = log_softmax(x). Why one op: recorded as exp,
 * mul by the broadcast sum and sub (the three ops it replaces), it kept
 * exp(y) and the full-size S_b for their own rules, two class-sized
 * tensors per recorded training step that an unroll holds for every step;
 * this keeps y (log_softmax keeps it anyway) and, when g is a constant (a
 * loss seed, as in every recorded gradient step), S alone, one value per
 * row. Its derivatives, C the cotangent of the output:
 *   dg = C - (sum of C e along the axis)_b      (db_j/dg_k = [j = k] - e_j)
 *   dy = -C e S_b                               (db_j/dy_j = -e_j S)
 * With g differentiable, S is taken again from g by recorded ops (so dy
 * has its g-derivative); else from the kept sums. */
static void vjp_lsb(ad_tape *t, const ad_node *n, ad_tensor *C, ad_tensor **gin, const int *need) {
  int ax = n->a.axis;
  ad_tensor *g = n->in[0], *y = n->in[1];
  int64_t len = y->shape[ax];
  ad_tensor *ce = ad_mul(t, C, ad_exp(t, y));
  if (need[0]) gin[0] = ad_sub(t, C, ad_broadcast_axis(t, ad_sum_axis(t, ce, ax, 1), ax, len, 1));
  if (need[1]) {
    ad_tensor *s = n->a.extra ? (ad_tensor *)n->a.extra : ad_sum_axis(t, g, ax, 1);
    gin[1] = ad_neg(t, ad_mul(t, ce, ad_broadcast_axis(t, s, ax, len, 1)));
  }
}
/* Both gradients read y; dy reads the kept sums, or g when there are none. */
static unsigned saves_lsb(const ad_node *n) {
  if (n->a.extra) return AD_SAVES(AD_S_IN(1), AD_S_IN(1), 0, 0) | AD_SAVES_EXTRA_TENSOR;
  return AD_SAVES(AD_S_IN(1), AD_S_IN(0) | AD_S_IN(1), 0, 0);
}
static const ad_op_def OP_LSB = {"log_softmax_backward", vjp_lsb, attr_axis, {.of = saves_lsb}};

ad_tensor *ad__log_softmax_backward(ad_tape *t, ad_tensor *g, ad_tensor *y, int axis) {
  ad_tensor *in[2] = {g, y};
  if (!ad__check(t, "log_softmax_backward", 2, in) || !ad__axis(t, "log_softmax_backward", y, axis))
    return NULL;
  if (!ad_same_shape(g, y) || g->dtype != y->dtype) {
    char sa[96], sb[96];
    return ad__fail(t, AD_ERR_SHAPE, "log_softmax_backward: g is %s %s but y is %s %s",
                    ad_dtype_name(g->dtype), ad_shape_str(g, sa, sizeof sa),
                    ad_dtype_name(y->dtype), ad_shape_str(y, sb, sizeof sb));
  }
  int64_t shape[AD_MAX_DIMS];
  int nd = reduced_shape(y, axis, 1, shape);
  ad_tensor *s = ad__alloc(t, g->dtype, nd, shape, 0), *out = s ? ad__like(t, g) : NULL;
  if (!out) return NULL;
  int64_t outer, n, inner;
  ad__split(y, axis, &outer, &n, &inner);
  run_axis(K_SUM, g, s->data, NULL, NULL, outer, n, inner); /* the bits of ad_sum_axis */
  run_axis(K_LSB, g, out->data, y->data, s->data, outer, n, inner);
  ad_node *nd_ = ad__record(t, &OP_LSB, out, 2, in);
  if (nd_) {
    nd_->a.axis = axis;
    nd_->a.extra = ad_needs_grad(g) ? NULL : s;
  }
  return ad__done(t, out, "log_softmax_backward");
}

static ad_tensor *softmax_like(ad_tape *t, ad_tensor *x, int axis, int logv, const char *name,
                               const ad_op_def *op) {
  if (!ad__check(t, name, 1, &x) || !ad__axis(t, name, x, axis)) return NULL;
  ad_tensor *out = ad__like(t, x);
  if (!out) return NULL;
  int64_t outer, n, inner;
  ad__split(x, axis, &outer, &n, &inner);
  run_axis(K_LSE, x, NULL, logv ? NULL : out->data, logv ? out->data : NULL, outer, n, inner);
  ad_node *nd = ad__record(t, op, out, 1, &x);
  if (nd) nd->a.axis = axis;
  return ad__done(t, out, name);
}

ad_tensor *ad_softmax(ad_tape *t, ad_tensor *x, int axis) {
  return softmax_like(t, x, axis, 0, "ad_softmax", &OP_SOFTMAX);
}
ad_tensor *ad_log_softmax(ad_tape *t, ad_tensor *x, int axis) {
  return softmax_like(t, x, axis, 1, "ad_log_softmax", &OP_LOG_SOFTMAX);
}

/* ---------------------------------------------------------------- dot */
/* d <a, b> = g b da + g a db */
static void vjp_dot(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin, const int *need) {
  if (need[0]) gin[0] = ad_mul(t, n->in[1], g);
  if (need[1]) gin[1] = ad_mul(t, n->in[0], g);
}
static const ad_op_def OP_DOT = {
    "dot", vjp_dot, NULL, {.mask = AD_SAVES(AD_S_IN(1), AD_S_IN(0), 0, 0)}};

ad_tensor *ad_dot(ad_tape *t, ad_tensor *a, ad_tensor *b) {
  ad_tensor *in[2] = {a, b};
  if (!ad__check(t, "ad_dot", 2, in)) return NULL;
  if (!ad_same_shape(a, b)) { /* same size but another shape pairs the wrong elements */
    char sa[96], sb[96];
    return ad__fail(t, AD_ERR_SHAPE, "ad_dot: shapes %s and %s differ",
                    ad_shape_str(a, sa, sizeof sa), ad_shape_str(b, sb, sizeof sb));
  }
  ad_tensor *out = ad__alloc(t, a->dtype, 0, NULL, 0);
  if (!out) return NULL;
  ad_set(out, 0, sum_all(a, b));
  ad__record(t, &OP_DOT, out, 2, in);
  return ad__done(t, out, "ad_dot");
}
