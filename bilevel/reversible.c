/* reversible.c — exact reversible unroll of heavy-ball momentum (Maclaurin,
 * Duvenaud and Adams 2015, "Gradient-based hyperparameter optimization
 * through reversible learning").
 *
 * The update is the library's NN_OPT_MOMENTUM, unchanged:
 *     g_t     = grad_w L_train(w_t, lam, t) + wd w_t
 *     m_{t+1} = mu m_t + g_t
 *     w_{t+1} = w_t - lr m_{t+1}
 * (lr, mu, wd numbers or tape variables in lam, per parameter where nn
 * allows it). It is an explicit map whose inverse is explicit too:
 *     w_t = w_{t+1} + lr m_{t+1},   m_t = (m_{t+1} - g_t(w_t)) / mu,
 * so the backward pass can walk the trajectory back from (w_T, m_T) instead
 * of storing it. In floating point the inverse drifts (dividing by mu
 * amplifies rounding by 1/mu per step), so the trajectory is run in fixed
 * point, where every operation but one is an exact integer bijection:
 *   - w and m are int64 X with value X 2^-K (K = REV_K = 40);
 *   - g_t and lr m_{t+1} are rounded to the grid; they are deterministic
 *     functions of values the backward pass has again (w_t, m_{t+1}), so
 *     adding or subtracting them loses nothing;
 *   - the multiplication by mu = a / 2^b (mu's exact double value, a odd)
 *     destroys -log2(mu) bits per element and step. Those go onto an exact
 *     arbitrary-precision integer per element, the information buffer:
 *         forward:  s = B mod a, B = B div a;  Z = a X + s;
 *                   r = Z mod 2^b, B = B 2^b + r;  Y = Z div 2^b
 *         backward: r = B mod 2^b, B = B div 2^b;  Z = Y 2^b + r;
 *                   s = Z mod a, X = Z div a;  B = B a + s
 *     (Y = mu X + (s - r) / 2^b, within one grid unit of mu X.) Each half is
 *     a bijection of (X, B), so the backward pass restores X and B exactly,
 *     and B is back to 0 at step 0 (checked: a mismatch means train_loss is
 *     not a deterministic function of (w, lam, step)).
 * The hypergradient is the reverse-mode recursion of bl_unroll, one step at
 * a time: with alpha_T = grad_w L_val(w_T), beta_T = 0,
 *     glam += (alpha, beta) dPhi_t/dlam,
 *     (alpha, beta) <- (alpha, beta) dPhi_t/d(w_t, m_t),   t = T-1 .. 0,
 * each a bl__step_vjp of the float step at the reconstructed (w_t, m_t).
 *
 * Radix and error. K = 40: grid 2^-40 ~ 9.1e-13, range |w|, |m| < 2^21
 * (~2.1e6; beyond it the call fails with AD_ERR_NUMERIC, never wraps). Each
 * step perturbs w and m by at most 2 grid units (g rounded: 1/2, the mu
 * product: 1, lr m rounded: 1/2) against the exact real-arithmetic run, so
 * over T steps of a non-expansive run the fixed-point trajectory is within
 * ~2 T 2^-40 (1.8e-9 at T = 1000) of the float one, and so is the
 * hypergradient relatively, far below the 1e-6 the tests ask. w_0 itself
 * is rounded to the grid (2^-41). In f32 the same integers are decoded to
 * f32 for the losses; the reversal stays exact, the float error is f32's.
 * mu below 2^-9 has more than 62 bits after the point and is rounded to
 * a / 2^62 (relative error <= 2^-62 / mu).
 *
 * Memory: the arena holds w, m, the adjoints and one step's VJP; the heap
 * holds W, M, per-element lr and wd and the buffers' headers (48 bytes per
 * element) and the buffers, which grow by about -log2(mu) T bits per
 * element (0.152 T for mu = 0.9: 19 bytes per element at T = 1000), plus
 * the first step's push of b <= 62 bits (nothing to pop yet), in 64-bit
 * limbs of doubling capacity. Their peak is added to
 * st->peak_arena_bytes, so the figure bounds the whole call. Each buffer
 * operation walks its integer, so a step costs O(T / 400) limb operations
 * per element: negligible beside the VJP up to T ~ 10^5.
 * The training loss is evaluated three times per step (forward, the
 * reversal's g_t, the VJP): it must return the same value each time. */
#include "bl_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define REV_K 40
#define REV_LIM ((int64_t)1 << 61) /* |W|, |M|, |G|, |D| bound: sums stay inside int64 */

__extension__ typedef __int128 rev_i128;
__extension__ typedef unsigned __int128 rev_u128;

/* A non-negative big integer, little-endian 64-bit limbs, len 0 = zero. */
typedef struct {
  uint64_t *d;
  int32_t len, cap;
} rev_bn;

typedef struct {
  int64_t n;                      /* elements over all parameters */
  int64_t off[NN_MAX_PARAMS + 1]; /* parameter i: elements off[i] .. off[i+1]-1 */
  int64_t *W, *M;                 /* fixed-point w and m */
  double *lr, *wd;                /* per element */
  rev_bn *B;                      /* information buffer, per element */
  uint64_t a;                     /* mu = a / 2^b */
  int b;
  size_t bytes, peak; /* heap bytes held, high-water */
  int nomem;
} rev;

/* ---------------------------------------------------------------- big integers */

static void rev_hold(rev *v, ptrdiff_t d) {
  v->bytes = (size_t)((ptrdiff_t)v->bytes + d);
  if (v->bytes > v->peak) v->peak = v->bytes;
}

/* B = B c + add  (c < 2^63, add < 2^64) */
static void bn_muladd(rev *v, rev_bn *B, uint64_t c, uint64_t add) {
  rev_u128 carry = add;
  for (int32_t i = 0; i < B->len; i++) {
    rev_u128 p = (rev_u128)B->d[i] * c + carry;
    B->d[i] = (uint64_t)p;
    carry = p >> 64;
  }
  if (!carry) return;
  if (B->len == B->cap) {
    int32_t cap = B->cap ? 2 * B->cap : 2;
    uint64_t *d = realloc(B->d, sizeof(uint64_t) * (size_t)cap);
    if (!d) {
      v->nomem = 1;
      return;
    }
    rev_hold(v, (ptrdiff_t)(sizeof(uint64_t) * (size_t)(cap - B->cap)));
    B->d = d;
    B->cap = cap;
  }
  B->d[B->len++] = (uint64_t)carry;
}

/* B = B div c, returns B mod c  (1 <= c < 2^63) */
static uint64_t bn_divmod(rev_bn *B, uint64_t c) {
  rev_u128 rem = 0;
  for (int32_t i = B->len - 1; i >= 0; i--) {
    rev_u128 cur = (rem << 64) | B->d[i];
    B->d[i] = (uint64_t)(cur / c);
    rem = cur % c;
  }
  while (B->len > 0 && B->d[B->len - 1] == 0) B->len--;
  return (uint64_t)rem;
}

/* Floor division and modulo of a 128-bit signed by a positive divisor. */
static rev_i128 fmod128(rev_i128 z, rev_i128 m) {
  rev_i128 r = z % m;
  return r < 0 ? r + m : r;
}

/* Y = mu X with the destroyed bits pushed onto B (see the top). */
static int64_t rev_mul(rev *v, rev_bn *B, int64_t X) {
  rev_i128 s = bn_divmod(B, v->a);
  rev_i128 z = (rev_i128)X * (rev_i128)v->a + s, m = (rev_i128)1 << v->b;
  rev_i128 r = fmod128(z, m);
  bn_muladd(v, B, (uint64_t)m, (uint64_t)r);
  return (int64_t)((z - r) / m);
}

/* X from Y = rev_mul(X), B restored. */
static int64_t rev_unmul(rev *v, rev_bn *B, int64_t Y) {
  rev_i128 m = (rev_i128)1 << v->b;
  rev_i128 z = (rev_i128)Y * m + bn_divmod(B, (uint64_t)m);
  rev_i128 s = fmod128(z, (rev_i128)v->a);
  bn_muladd(v, B, v->a, (uint64_t)s);
  return (int64_t)((z - s) / (rev_i128)v->a);
}

/* ---------------------------------------------------------------- set-up */

static const char *kind_reason(nn_opt_kind k) {
  switch (k) {
  case NN_OPT_SGD:
    return "plain SGD w' = w - lr g(w) has no explicit inverse (w would solve an implicit "
           "equation); use NN_OPT_MOMENTUM";
  case NN_OPT_NESTEROV:
    return "the Nesterov look-ahead form is not implemented; use NN_OPT_MOMENTUM";
  case NN_OPT_ADAM:
  case NN_OPT_ADAMW:
  case NN_OPT_RMSPROP:
    return "its division by sqrt(v) and the squared-gradient average cannot be inverted "
           "exactly in fixed point; use NN_OPT_MOMENTUM";
  default:
    return "unknown optimizer kind";
  }
}

/* A hyperparameter for parameter i: a per-parameter variable, else a scalar
 * variable, else the number (nn's order). Checks sizes and finiteness. */
static ad_status rev_hyper(bl_run *r, const char *what, double c, const ad_tensor *sv,
                           ad_tensor *const *vars, int i, int64_t size, double *out) {
  int per = vars && vars[i];
  const ad_tensor *x = per ? vars[i] : sv;
  if (x && x->size != 1 && (!per || x->size != size))
    return bl__fail(r, AD_ERR_SHAPE, "%s variable for parameter %d has %lld elements (1%s needed)",
                    what, i, (long long)x->size, per ? " or the parameter's size" : "");
  for (int64_t j = 0; j < size; j++) {
    out[j] = x ? ad_get(x, x->size > 1 ? j : 0) : c;
    if (!isfinite(out[j]))
      return bl__fail(r, AD_ERR_ARG, "%s of parameter %d is %g (element %lld): not finite", what, i,
                      out[j], (long long)j);
  }
  return AD_OK;
}

static void rev_free(rev *v) {
  if (v->B)
    for (int64_t e = 0; e < v->n; e++) free(v->B[e].d);
  free(v->B);
  free(v->W);
  free(v->M);
  free(v->lr);
  free(v->wd);
  memset(v, 0, sizeof *v);
}

/* Checks that the problem is heavy-ball momentum and makes the fixed-point
 * state at (w_0, m_0 = 0) with empty buffers. */
static ad_status rev_init(bl_run *r, rev *v) {
  const bl_problem *p = r->p;
  memset(v, 0, sizeof *v);
  if (p->step.fn)
    return bl__fail(r, AD_ERR_ARG,
                    "a user step ('%s') cannot be run backwards exactly: the reversal needs the "
                    "heavy-ball update of NN_OPT_MOMENTUM (m' = mu m + g, w' = w - lr m'); use "
                    "bl_unroll or bl_checkpointed",
                    bl__step_name(r));
  const nn_opt_cfg *cfg = &r->opt.cfg;
  if (cfg->kind != NN_OPT_MOMENTUM)
    return bl__fail(r, AD_ERR_ARG, "optimizer '%s' cannot be reversed: %s", r->step.name,
                    kind_reason(cfg->kind));
  double mu =
      cfg->momentum_var ? ad_get(cfg->momentum_var, 0) : (cfg->momentum == 0 ? 0.9 : cfg->momentum);
  if (cfg->momentum_var && cfg->momentum_var->size != 1)
    return bl__fail(r, AD_ERR_SHAPE, "momentum_var has %lld elements (1 needed)",
                    (long long)cfg->momentum_var->size);
  if (!(mu > 0 && mu < 1))
    return bl__fail(r, AD_ERR_ARG,
                    "momentum %g is outside (0, 1): the reversal divides by it and its buffer "
                    "stores -log2(momentum) bits per step",
                    mu);
  /* mu = a / 2^b exactly: f 2^53 is an integer for f in [0.5, 1) */
  int e;
  double f = frexp(mu, &e);
  uint64_t a = (uint64_t)ldexp(f, 53);
  int b = 53 - e;
  if (b > 62) {
    a = (uint64_t)llrint(ldexp(mu, 62));
    b = 62;
    if (a == 0) a = 1;
  }
  while (b > 0 && !(a & 1)) a >>= 1, b--;
  v->a = a;
  v->b = b;
  int n = p->n_w;
  for (int i = 0; i < n; i++) v->off[i + 1] = v->off[i] + p->w0[i]->size;
  v->n = v->off[n];
  size_t z = (size_t)v->n;
  v->W = calloc(z, sizeof(int64_t));
  v->M = calloc(z, sizeof(int64_t));
  v->lr = calloc(z, sizeof(double));
  v->wd = calloc(z, sizeof(double));
  v->B = calloc(z, sizeof(rev_bn));
  if (!v->W || !v->M || !v->lr || !v->wd || !v->B)
    return bl__fail(r, AD_ERR_NOMEM, "no memory for the fixed-point state of %lld elements",
                    (long long)v->n);
  rev_hold(v, (ptrdiff_t)(z * (4 * sizeof(int64_t) + sizeof(rev_bn))));
  double lr0 = cfg->lr == 0 && !cfg->lr_var && !cfg->lr_vars ? 0.01 : cfg->lr;
  for (int i = 0; i < n; i++) {
    int64_t o = v->off[i], sz = p->w0[i]->size;
    ad_status s = rev_hyper(r, "learning rate", lr0, cfg->lr_var, cfg->lr_vars, i, sz, v->lr + o);
    if (!s)
      s = rev_hyper(r, "weight decay", cfg->weight_decay, cfg->weight_decay_var,
                    cfg->weight_decay_vars, i, sz, v->wd + o);
    if (s) return s;
    for (int64_t j = 0; j < sz; j++) {
      double x = ldexp(ad_get(p->w0[i], j), REV_K);
      if (!isfinite(x))
        return bl__fail(r, AD_ERR_NUMERIC, "w0[%d] element %lld is %g: not finite", i, (long long)j,
                        ad_get(p->w0[i], j));
      if (fabs(x) >= (double)REV_LIM)
        return bl__fail(r, AD_ERR_ARG,
                        "w0[%d] element %lld is %g: outside the fixed-point range "
                        "|w| < 2^%d",
                        i, (long long)j, ad_get(p->w0[i], j), 61 - REV_K);
      v->W[o + j] = llrint(x);
    }
  }
  return AD_OK;
}

/* ---------------------------------------------------------------- steps */

/* w (arena tensors shaped like w0) <- the values of W. */
static void rev_decode(const rev *v, int n, const int64_t *X, ad_tensor *const *w) {
  for (int i = 0; i < n; i++)
    for (int64_t j = 0; j < w[i]->size; j++)
      ad_set(w[i], j, ldexp((double)X[v->off[i] + j], -REV_K));
}

static ad_status rev_range(bl_run *r, int64_t x, const char *what, int64_t step) {
  if (x > -REV_LIM && x < REV_LIM) return AD_OK;
  return bl__fail(r, AD_ERR_NUMERIC,
                  "%s left the fixed-point range (|x| < 2^%d at radix 2^-%d) at inner step %lld: "
                  "the inner run diverges or its scale is too large",
                  what, 61 - REV_K, REV_K, (long long)step);
}

/* lr m' on the grid: a deterministic function of M', so both passes agree. */
static int64_t rev_dw(const rev *v, int64_t e, int64_t Mn) {
  return llrint(v->lr[e] * (double)Mn);
}

/* The gradient part of step `step` at w = W (decoded into w), rounded to
 * the grid, G = round((g + wd w) 2^K), and then
 *   forward:  M <- mu M + G, W <- W - round(lr M)
 *   backward: M <- (M - G) / mu   (W is already w_step)
 * The same floating-point work in both directions, so G is bit-identical. */
static ad_status rev_half(bl_run *r, rev *v, ad_tensor *const *w, int64_t step, int forward) {
  const bl_problem *p = r->p;
  ad_tape *t = r->t;
  int n = p->n_w;
  rev_decode(v, n, v->W, w);
  ad_marker mk = ad_mark(t);
  ad_tensor *g[NN_MAX_PARAMS];
  ad_tensor *L = p->train_loss(t, w, r->lam, step, p->ctx);
  ad_status s = bl__check_loss(r, L, "train_loss", step);
  if (!s && !isfinite(ad_item(L)))
    s = bl__fail(r, AD_ERR_NUMERIC,
                 "train_loss is %g at inner step %lld: the inner run diverged (lower the "
                 "learning rate)",
                 ad_item(L), (long long)step);
  if (!s) s = ad_grad(t, 1, &L, NULL, n, w, g, 0);
  for (int i = 0; i < n && !s; i++)
    for (int64_t j = 0; j < w[i]->size && !s; j++) {
      int64_t e = v->off[i] + j;
      double x = ldexp(ad_get(g[i], j) + v->wd[e] * ad_get(w[i], j), REV_K);
      if (!isfinite(x) || fabs(x) >= (double)REV_LIM) {
        s = bl__fail(r, AD_ERR_NUMERIC,
                     "the gradient of parameter %d (element %lld) is %g at inner step %lld: not "
                     "finite or outside the fixed-point range (< 2^%d)",
                     i, (long long)j, ldexp(x, -REV_K), (long long)step, 61 - REV_K);
        break;
      }
      int64_t G = llrint(x);
      if (forward) {
        int64_t Mn = rev_mul(v, &v->B[e], v->M[e]) + G;
        s = rev_range(r, Mn, "the momentum", step);
        int64_t D = s ? 0 : rev_dw(v, e, Mn);
        if (!s) s = rev_range(r, D, "the update lr m", step);
        if (!s) s = rev_range(r, v->W[e] - D, "w", step);
        if (!s) v->M[e] = Mn, v->W[e] -= D;
      } else {
        v->M[e] = rev_unmul(v, &v->B[e], v->M[e] - G);
      }
    }
  ad_rewind(t, mk);
  if (!s && v->nomem) s = bl__fail(r, AD_ERR_NOMEM, "no memory for the information buffer");
  return s;
}

/* Forward T steps from (w_0, 0). */
static ad_status rev_forward(bl_run *r, rev *v, ad_tensor *const *w) {
  ad_status s = AD_OK;
  for (int64_t k = 0; k < r->p->inner_steps && !s; k++) {
    s = rev_half(r, v, w, k, 1);
    if (!s) r->st.inner_steps++;
  }
  return s;
}

/* (W, M) from step+1 back to step. */
static ad_status rev_back(bl_run *r, rev *v, ad_tensor *const *w, int64_t step) {
  for (int64_t e = 0; e < v->n; e++) v->W[e] += rev_dw(v, e, v->M[e]);
  return rev_half(r, v, w, step, 0);
}

/* After the backward pass: W must be w_0 on the grid, M zero, every buffer
 * empty; else the training loss was not reproducible. */
static ad_status rev_check_start(bl_run *r, const rev *v) {
  const bl_problem *p = r->p;
  for (int i = 0; i < p->n_w; i++)
    for (int64_t j = 0; j < p->w0[i]->size; j++) {
      int64_t e = v->off[i] + j;
      if (v->W[e] != llrint(ldexp(ad_get(p->w0[i], j), REV_K)) || v->M[e] != 0 || v->B[e].len)
        return bl__fail(r, AD_ERR_NUMERIC,
                        "the reversed trajectory did not return to w0 (parameter %d element "
                        "%lld): train_loss must give the same value for the same (w, lam, step) "
                        "every time it is called",
                        i, (long long)j);
    }
  return AD_OK;
}

static size_t rev_end_bytes(rev *v) {
  size_t peak = v->peak;
  rev_free(v);
  return peak;
}

/* ---------------------------------------------------------------- the method */

ad_status bl_reversible(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                        bl_stats *st) {
  bl_run r;
  rev v = {0};
  ad_status s = bl__begin(&r, "bl_reversible", t, p, o, hg, 0);
  if (!s) s = rev_init(&r, &v);
  if (s) {
    rev_free(&v);
    return bl__end(&r, s, st);
  }
  int n = p->n_w, n_lam = p->n_lam;
  ad_tensor *w[NN_MAX_PARAMS], *aw[NN_MAX_PARAMS], *glam[NN_MAX_PARAMS], *am[NN_MAX_PARAMS];
  bl_state ms = {0};
  s = bl__w0_copy(&r, w);
  if (!s) s = bl__state_new(&r, &ms);
  if (!s) s = rev_forward(&r, &v, w);
  /* alpha_T = grad_w L_val(w_T), beta_T = 0, glam = the direct term */
  ad_tensor *gw[NN_MAX_PARAMS], *gd[NN_MAX_PARAMS];
  if (!s) {
    rev_decode(&v, n, v.W, w);
    s = bl__val_grad(&r, r.lam, w, NULL, gw, gd);
  }
  if (!s) s = bl__copy_new(&r, n, gw, aw);
  if (!s) s = bl__copy_new(&r, n_lam, gd, glam);
  if (!s) s = bl__zeros_new(&r, n, w, am);
  for (int64_t k = p->inner_steps - 1; k >= 0 && !s; k--) {
    s = rev_back(&r, &v, w, k); /* (W, M) = (w_k, m_k); w holds w_k */
    if (s) break;
    rev_decode(&v, n, v.M, ms.b);
    ad_marker mk = ad_mark(t);
    ad_tensor *gl[NN_MAX_PARAMS], *gwk[NN_MAX_PARAMS], *gs[BL_MAX_STATE];
    s = bl__step_vjp(&r, w, &ms, k, aw, am, gl, gwk, gs);
    if (!s) {
      bl__axpy(n_lam, glam, 1.0, gl);
      bl__copy_list(n, aw, gwk);
      bl__copy_list(n, am, gs);
    }
    ad_rewind(t, mk);
  }
  if (!s) s = rev_check_start(&r, &v);
  if (!s) s = bl__write_hg(&r, glam, hg);
  size_t heap = rev_end_bytes(&v);
  s = bl__end(&r, s, st);
  if (st) st->peak_arena_bytes += heap;
  return s;
}

/* Test hook (tests/test_bl_reversible.c; no header): runs T steps forward
 * and T back with no hypergradient, and copies out the integers: the
 * encoded w_0, (W_T, M_T) and the reconstructed (W_0, M_0) (any may be
 * NULL; each holds sum_i w0[i]->size elements), the peak heap bytes of
 * the whole fixed-point state, and the buffer's size in bits at w_T. */
ad_status bl__reversible_roundtrip(ad_tape *t, const bl_problem *p, ad_tensor *const *hg,
                                   int64_t *w_start, int64_t *w_end, int64_t *m_end,
                                   int64_t *w_back, int64_t *m_back, size_t *heap_peak,
                                   double *info_bits);
ad_status bl__reversible_roundtrip(ad_tape *t, const bl_problem *p, ad_tensor *const *hg,
                                   int64_t *w_start, int64_t *w_end, int64_t *m_end,
                                   int64_t *w_back, int64_t *m_back, size_t *heap_peak,
                                   double *info_bits) {
  bl_run r;
  rev v = {0};
  ad_tensor *w[NN_MAX_PARAMS];
  ad_status s = bl__begin(&r, "bl_reversible", t, p, NULL, hg, 0);
  if (!s) s = rev_init(&r, &v);
  size_t z = sizeof(int64_t) * (size_t)v.n;
  if (!s && w_start) memcpy(w_start, v.W, z);
  if (!s) s = bl__w0_copy(&r, w);
  if (!s) s = rev_forward(&r, &v, w);
  if (!s && w_end) memcpy(w_end, v.W, z);
  if (!s && m_end) memcpy(m_end, v.M, z);
  if (!s && info_bits) {
    /* the buffer's size in bits: the integers' bit lengths summed */
    double bits = 0;
    for (int64_t e = 0; e < v.n; e++)
      if (v.B[e].len)
        bits += 64.0 * (v.B[e].len - 1) + (64 - __builtin_clzll(v.B[e].d[v.B[e].len - 1]));
    *info_bits = bits;
  }
  for (int64_t k = p && !s ? p->inner_steps - 1 : -1; k >= 0 && !s; k--) s = rev_back(&r, &v, w, k);
  if (!s && w_back) memcpy(w_back, v.W, z);
  if (!s && m_back) memcpy(m_back, v.M, z);
  size_t heap = rev_end_bytes(&v);
  if (heap_peak) *heap_peak = heap;
  return bl__end(&r, s, NULL);
}
