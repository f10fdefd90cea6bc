/* optim.c — SGD, momentum (heavy ball, Nesterov), Adam, AdamW, RMSprop, in
 * two modes. The differentiable step is recorded on the tape, so a
 * hypergradient flows through T steps of it to the learning rate, momentum
 * and weight decay (numbers or tape variables) and to the initial weights.
 * SGD, momentum, Nesterov, Adam and AdamW record fused ops (sgd_step,
 * moment_buffer, adam_update below: one pass each, outputs only, rules that
 * differentiate again); RMSprop and the reference path of
 * nn__opt_set_unfused compose public ops.
 *
 * Update rules (g already includes L2 weight decay wd*w, except for AdamW):
 *   SGD       w' = w - lr g
 *   momentum  m' = mu m + g;            w' = w - lr m'
 *   Nesterov  m' = mu m + g;            w' = w - lr (g + mu m')
 *   Adam      m' = b1 m + (1-b1) g;     v' = b2 v + (1-b2) g^2
 *             w' = w - lr mhat / (sqrt(vhat) + eps),
 *             mhat = m'/(1-b1^k), vhat = v'/(1-b2^k), k = step number
 *   AdamW     as Adam on the raw g, then  w' -= lr wd w
 *   RMSprop   v' = a v + (1-a) g^2;     w' = w - lr g / (sqrt(v') + eps)
 */
#include "nn.h"

#include "autodiff/ad_internal.h"
#include "autodiff/ad_simd.h"
#include "nn_internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

typedef struct {
  double lr, mu, b1, b2, alpha, eps, wd;
} hyper;

/* The numbers in effect: a zero field takes its default unless its bit is
 * in c->set. */
static hyper defaults(const nn_opt_cfg *c) {
  hyper h = {c->lr, c->momentum, c->beta1, c->beta2, c->alpha, c->eps, c->weight_decay};
  unsigned set = c->set;
  if (h.lr == 0 && !(set & NN_OPT_SET_LR) && !c->lr_var && !c->lr_vars) h.lr = 0.01;
  if (h.mu == 0 && !(set & NN_OPT_SET_MOMENTUM) && !c->momentum_var) h.mu = 0.9;
  if (h.b1 == 0 && !(set & NN_OPT_SET_BETA1)) h.b1 = 0.9;
  if (h.b2 == 0 && !(set & NN_OPT_SET_BETA2)) h.b2 = 0.999;
  if (h.alpha == 0 && !(set & NN_OPT_SET_ALPHA)) h.alpha = 0.99;
  if (h.eps == 0 && !(set & NN_OPT_SET_EPS)) h.eps = 1e-8;
  return h;
}

static nn_opt_cfg make(nn_opt_kind kind, double lr) {
  return (nn_opt_cfg){.kind = kind,
                      .lr = lr,
                      .set = NN_OPT_SET_ALL,
                      .momentum = 0.9,
                      .beta1 = 0.9,
                      .beta2 = 0.999,
                      .alpha = 0.99,
                      .eps = 1e-8};
}
nn_opt_cfg nn_opt_sgd(double lr) {
  return make(NN_OPT_SGD, lr);
}
nn_opt_cfg nn_opt_momentum(double lr, double momentum) {
  nn_opt_cfg c = make(NN_OPT_MOMENTUM, lr);
  c.momentum = momentum;
  return c;
}
nn_opt_cfg nn_opt_nesterov(double lr, double momentum) {
  nn_opt_cfg c = make(NN_OPT_NESTEROV, lr);
  c.momentum = momentum;
  return c;
}
nn_opt_cfg nn_opt_adam(double lr, double beta1, double beta2, double eps) {
  nn_opt_cfg c = make(NN_OPT_ADAM, lr);
  c.beta1 = beta1;
  c.beta2 = beta2;
  c.eps = eps;
  return c;
}
nn_opt_cfg nn_opt_adamw(double lr, double beta1, double beta2, double eps, double weight_decay) {
  nn_opt_cfg c = nn_opt_adam(lr, beta1, beta2, eps);
  c.kind = NN_OPT_ADAMW;
  c.weight_decay = weight_decay;
  return c;
}
nn_opt_cfg nn_opt_rmsprop(double lr, double alpha, double eps) {
  nn_opt_cfg c = make(NN_OPT_RMSPROP, lr);
  c.alpha = alpha;
  c.eps = eps;
  return c;
}

/* Every number in effect is valid: finite, >= 0, the decay rates in
 * [0, 1) (beta = 1 never forgets, and Adam's bias correction 1 - beta^k
 * is then 0: a division by zero). Weight decay need only be finite: a
 * central difference at decay 0 and a learned decay both pass through
 * negative values, and the update stays well defined there. Names the
 * field and its value. */
static ad_status check_numbers(ad_tape *t, const char *who, const nn_opt_cfg *c) {
  hyper h = defaults(c);
  enum { NONNEG, UNIT, FINITE };
  const struct {
    const char *name;
    double v;
    int rule;
  } f[] = {{"lr", h.lr, NONNEG},          {"momentum", h.mu, NONNEG}, {"beta1", h.b1, UNIT},
           {"beta2", h.b2, UNIT},         {"alpha", h.alpha, UNIT},   {"eps", h.eps, NONNEG},
           {"weight_decay", h.wd, FINITE}};
  static const char *why[] = {"must be finite and >= 0", "must be in [0, 1)", "must be finite"};
  for (size_t k = 0; k < sizeof f / sizeof f[0]; k++) {
    double v = f[k].v;
    int ok = isfinite(v) && (f[k].rule == FINITE || v >= 0) && (f[k].rule != UNIT || v < 1);
    if (!ok) {
      ad__fail(t, AD_ERR_ARG, "%s: %s = %g (%s)", who, f[k].name, v, why[f[k].rule]);
      return AD_ERR_ARG;
    }
  }
  return AD_OK;
}

/* A tape-variable hyperparameter must be finite in every element. */
static ad_status check_var(ad_tape *t, const char *who, const char *name, int i,
                           const ad_tensor *v) {
  if (!v) return AD_OK;
  if (ad__all_finite(v)) return AD_OK; /* one vectorized pass; search only on failure */
  for (int64_t j = 0; j < v->size; j++) {
    double x = ad_get(v, j);
    if (!isfinite(x)) {
      if (i >= 0)
        ad__fail(t, AD_ERR_ARG, "%s: %s[%d] element %lld is %g (must be finite)", who, name, i,
                 (long long)j, x);
      else
        ad__fail(t, AD_ERR_ARG, "%s: %s is %g (must be finite)", who, name, x);
      return AD_ERR_ARG;
    }
  }
  return AD_OK;
}

static int uses_m(nn_opt_kind k) {
  return k != NN_OPT_SGD && k != NN_OPT_RMSPROP;
}
static int uses_v(nn_opt_kind k) {
  return k == NN_OPT_ADAM || k == NN_OPT_ADAMW || k == NN_OPT_RMSPROP;
}

/* Checks the config against the parameters; message via ad__set_last or the tape. */
static ad_status check_cfg(ad_tape *t, const char *who, const nn_opt_cfg *cfg, int n,
                           ad_tensor *const *w, ad_tensor *const *g) {
  if (!cfg || !w) {
    ad__fail(t, AD_ERR_NULL, "%s: cfg or parameters are NULL", who);
    return AD_ERR_NULL;
  }
  if (n <= 0 || n > NN_MAX_PARAMS) {
    ad__fail(t, AD_ERR_ARG, "%s: %d parameters (1..%d allowed)", who, n, NN_MAX_PARAMS);
    return AD_ERR_ARG;
  }
  if ((unsigned)cfg->kind > NN_OPT_RMSPROP) {
    ad__fail(t, AD_ERR_ARG, "%s: unknown optimizer kind %d", who, (int)cfg->kind);
    return AD_ERR_ARG;
  }
  for (int i = 0; i < n; i++) {
    if (!w[i] || (g && !g[i])) {
      ad__fail(t, AD_ERR_NULL, "%s: parameter or gradient %d is NULL", who, i);
      return AD_ERR_NULL;
    }
    if (g && (g[i]->size != w[i]->size || g[i]->dtype != w[i]->dtype)) {
      char a[96], b[96];
      ad__fail(t, AD_ERR_SHAPE, "%s: gradient %d is %s but parameter is %s", who, i,
               ad_shape_str(g[i], a, sizeof a), ad_shape_str(w[i], b, sizeof b));
      return AD_ERR_SHAPE;
    }
    const ad_tensor *pv[2] = {cfg->lr_vars ? cfg->lr_vars[i] : NULL,
                              cfg->weight_decay_vars ? cfg->weight_decay_vars[i] : NULL};
    for (int k = 0; k < 2; k++)
      if (pv[k] && pv[k]->size != 1 && pv[k]->size != w[i]->size) {
        char a[96], b[96];
        ad__fail(t, AD_ERR_SHAPE, "%s: %s variable for parameter %d is %s, parameter is %s", who,
                 k ? "weight-decay" : "learning-rate", i, ad_shape_str(pv[k], a, sizeof a),
                 ad_shape_str(w[i], b, sizeof b));
        return AD_ERR_SHAPE;
      }
  }
  const ad_tensor *sv[3] = {cfg->lr_var, cfg->momentum_var, cfg->weight_decay_var};
  for (int k = 0; k < 3; k++)
    if (sv[k] && sv[k]->size != 1) {
      char a[96];
      ad__fail(t, AD_ERR_SHAPE, "%s: scalar hyperparameter variable %d is %s (size 1 needed)", who,
               k, ad_shape_str(sv[k], a, sizeof a));
      return AD_ERR_SHAPE;
    }
  ad_status st = check_numbers(t, who, cfg);
  if (!st) st = check_var(t, who, "lr_var", -1, cfg->lr_var);
  if (!st) st = check_var(t, who, "momentum_var", -1, cfg->momentum_var);
  if (!st) st = check_var(t, who, "weight_decay_var", -1, cfg->weight_decay_var);
  /* Per-parameter variables shaped like w are scanned where a run starts
   * (nn_opt_check, the state initialisers) but not in every step (g == NULL
   * tells them apart): a per-step pass over a decay tensor as large as the
   * model cost the unroll bench ~5%, and a NaN that appears mid-run shows
   * in w and the loss at once. Size-1 ones cost nothing and are checked. */
  for (int i = 0; i < n && !st; i++) {
    const ad_tensor *lv = cfg->lr_vars ? cfg->lr_vars[i] : NULL;
    const ad_tensor *dv = cfg->weight_decay_vars ? cfg->weight_decay_vars[i] : NULL;
    if (lv && (!g || lv->size == 1)) st = check_var(t, who, "lr_vars", i, lv);
    if (!st && dv && (!g || dv->size == 1)) st = check_var(t, who, "weight_decay_vars", i, dv);
  }
  return st;
}

ad_status nn_opt_check(const nn_opt_cfg *cfg, int n, ad_tensor *const *w) {
  return check_cfg(NULL, "nn_opt_check", cfg, n, w, NULL);
}

ad_status nn_opt_state_init(const nn_opt_cfg *cfg, nn_opt_state *s, int n, ad_tensor *const *w) {
  if (!s) return ad__set_last(AD_ERR_NULL, "nn_opt_state_init: state is NULL");
  memset(s, 0, sizeof *s);
  ad_status st = check_cfg(NULL, "nn_opt_state_init", cfg, n, w, NULL);
  if (st) return st;
  s->n = n;
  for (int i = 0; i < n; i++) {
    if ((uses_m(cfg->kind) && ad_tensor_new(&s->m[i], w[i]->dtype, w[i]->ndim, w[i]->shape)) ||
        (uses_v(cfg->kind) && ad_tensor_new(&s->v[i], w[i]->dtype, w[i]->ndim, w[i]->shape))) {
      nn_opt_state_free(s);
      return AD_ERR_NOMEM;
    }
  }
  return AD_OK;
}

void nn_opt_state_free(nn_opt_state *s) {
  if (!s || s->on_tape) return;
  for (int i = 0; i < NN_MAX_PARAMS; i++) {
    ad_tensor_free(s->m[i]);
    ad_tensor_free(s->v[i]);
    s->m[i] = s->v[i] = NULL;
  }
}

ad_status nn_opt_state_init_tape(ad_tape *t, const nn_opt_cfg *cfg, nn_opt_state *s, int n,
                                 ad_tensor *const *w) {
  if (!t) return ad__set_last(AD_ERR_NULL, "nn_opt_state_init_tape: tape is NULL");
  if (!s) {
    ad__fail(t, AD_ERR_NULL, "nn_opt_state_init_tape: state is NULL");
    return AD_ERR_NULL;
  }
  memset(s, 0, sizeof *s);
  ad_status st = check_cfg(t, "nn_opt_state_init_tape", cfg, n, w, NULL);
  if (st) return st;
  s->n = n;
  s->on_tape = 1;
  for (int i = 0; i < n; i++) {
    if (uses_m(cfg->kind)) s->m[i] = ad_zeros_like(t, w[i]);
    if (uses_v(cfg->kind)) s->v[i] = ad_zeros_like(t, w[i]);
  }
  return ad_tape_status(t);
}

/* ------------------------------------------------------------------ in place */

/* Reads element i of a hyperparameter that is a number, a scalar variable or
 * a per-element variable. */
typedef struct {
  double c;
  const ad_tensor *v;
} hval;
static inline double hget(hval h, int64_t i) {
  return h.v ? ad_get(h.v, h.v->size == 1 ? 0 : i) : h.c;
}
static hval pick(double c, const ad_tensor *scalar_var, ad_tensor *const *vars, int i) {
  hval h = {c, NULL};
  if (vars && vars[i])
    h.v = vars[i];
  else if (scalar_var)
    h.v = scalar_var;
  return h;
}

/* One parameter's in-place update, typed, reading hyperparameters that are
 * numbers, scalar variables or per-element variables through pointers with
 * stride 0 or 1 (a variable of another dtype is read through ad_get). The
 * arithmetic is in double and mirrors the differentiable step op for op
 * (mhat = m * (1/c1), ...), so in f64 both modes agree to the last bit. */
#define DEF_UPDATE(T, S)                                                                           \
  static void update_##S(nn_opt_kind kind, const hyper *h, double mu, double c1, double c2,        \
                         hval lr, hval wd, ad_tensor *wt, const ad_tensor *gt, ad_tensor *mt,      \
                         ad_tensor *vt) {                                                          \
    T *W = (T *)wt->data, *M = mt ? (T *)mt->data : NULL, *V = vt ? (T *)vt->data : NULL;          \
    const T *G = (const T *)gt->data;                                                              \
    const T *LR = lr.v && lr.v->dtype == wt->dtype ? (const T *)lr.v->data : NULL;                 \
    const T *WD = wd.v && wd.v->dtype == wt->dtype ? (const T *)wd.v->data : NULL;                 \
    int64_t slr = lr.v && lr.v->size > 1, swd = wd.v && wd.v->size > 1;                            \
    double ic1 = 1 / c1, ic2 = 1 / c2;                                                             \
    for (int64_t j = 0; j < wt->size; j++) {                                                       \
      double a = LR ? (double)LR[j * slr] : hget(lr, j);                                           \
      double d = WD ? (double)WD[j * swd] : hget(wd, j);                                           \
      double wj = W[j], gj = G[j], mj = M ? M[j] : 0, vj = V ? V[j] : 0, step = 0;                 \
      if (kind != NN_OPT_ADAMW) gj += d * wj;                                                      \
      switch (kind) {                                                                              \
      case NN_OPT_SGD:                                                                             \
        step = gj;                                                                                 \
        break;                                                                                     \
      case NN_OPT_MOMENTUM:                                                                        \
        step = mj = mu * mj + gj;                                                                  \
        break;                                                                                     \
      case NN_OPT_NESTEROV:                                                                        \
        mj = mu * mj + gj;                                                                         \
        step = gj + mu * mj;                                                                       \
        break;                                                                                     \
      case NN_OPT_ADAM:                                                                            \
      case NN_OPT_ADAMW:                                                                           \
        mj = h->b1 * mj + (1 - h->b1) * gj;                                                        \
        vj = h->b2 * vj + (1 - h->b2) * (gj * gj);                                                 \
        step = (mj * ic1) / (sqrt(vj * ic2) + h->eps);                                             \
        if (kind == NN_OPT_ADAMW) step += d * wj;                                                  \
        break;                                                                                     \
      case NN_OPT_RMSPROP:                                                                         \
        vj = h->alpha * vj + (1 - h->alpha) * (gj * gj);                                           \
        step = gj / (sqrt(vj) + h->eps);                                                           \
        break;                                                                                     \
      }                                                                                            \
      W[j] = (T)(wj - a * step);                                                                   \
      if (M) M[j] = (T)mj;                                                                         \
      if (V) V[j] = (T)vj;                                                                         \
    }                                                                                              \
  }
DEF_UPDATE(float, f32)
DEF_UPDATE(double, f64)

ad_status nn_opt_step(const nn_opt_cfg *cfg, nn_opt_state *s, int n, ad_tensor *const *w,
                      ad_tensor *const *g) {
  ad_status st = check_cfg(NULL, "nn_opt_step", cfg, n, w, g);
  if (st) return st;
  if (!g) return ad__set_last(AD_ERR_NULL, "nn_opt_step: gradients are NULL");
  if ((uses_m(cfg->kind) || uses_v(cfg->kind)) && (!s || s->n != n || s->on_tape))
    return ad__set_last(AD_ERR_STATE,
                        "nn_opt_step: state not made by nn_opt_state_init for "
                        "these %d parameters",
                        n);
  hyper h = defaults(cfg);
  int64_t k = s ? ++s->step : 1;
  double c1 = 1 - pow(h.b1, (double)k), c2 = 1 - pow(h.b2, (double)k);
  double mu = cfg->momentum_var ? ad_item(cfg->momentum_var) : h.mu;
  for (int i = 0; i < n; i++) {
    hval lr = pick(h.lr, cfg->lr_var, cfg->lr_vars, i);
    hval wd = pick(h.wd, cfg->weight_decay_var, cfg->weight_decay_vars, i);
    int simple = !lr.v && !wd.v && w[i]->dtype == AD_F32;
    if (simple && cfg->kind == NN_OPT_SGD) {
      /* The hot path of plain training: one vectorized pass. */
      float *W = AD_F(w[i]);
      const float *G = AD_F(g[i]);
      float a = (float)h.lr, d = (float)(1.0 - h.lr * h.wd);
      for (int64_t j = 0; j < w[i]->size; j++) W[j] = d * W[j] - a * G[j];
      continue;
    }
    ad_tensor *m = s ? s->m[i] : NULL, *v = s ? s->v[i] : NULL;
    if (w[i]->dtype == AD_F32)
      update_f32(cfg->kind, &h, mu, c1, c2, lr, wd, w[i], g[i], m, v);
    else
      update_f64(cfg->kind, &h, mu, c1, c2, lr, wd, w[i], g[i], m, v);
  }
  return AD_OK;
}

/* ------------------------------------------------------------------ differentiable */

/* c * x with c a number or a tape variable (size 1 or shaped like x). */
static ad_tensor *times(ad_tape *t, hval c, ad_tensor *x) {
  return c.v ? ad_mul(t, (ad_tensor *)c.v, x) : ad_scale(t, x, c.c);
}

/* sqrt(x) with derivative 0 where x == 0 instead of 1/(2 sqrt 0) = inf. Adam
 * hits x = 0 whenever a gradient entry is exactly 0 (dead ReLU, unused
 * embedding), and inf * 0 would turn the hypergradient into NaN. The inner
 * where keeps sqrt's own rule away from 0 as well ("double where"). */
/* 1 where x > 0, else 0 (a constant: no gradient), in one typed pass. */
static ad_tensor *pos_mask(ad_tape *t, const ad_tensor *x) {
  ad_tensor *mask = ad_empty(t, x->dtype, x->ndim, x->shape);
  if (!mask) return NULL;
  if (x->dtype == AD_F32) {
    const float *X = AD_F(x);
    float *M = AD_F(mask);
    for (int64_t i = 0; i < x->size; i++) M[i] = X[i] > 0 ? 1.0f : 0.0f;
  } else {
    const double *X = AD_D(x);
    double *M = AD_D(mask);
    for (int64_t i = 0; i < x->size; i++) M[i] = X[i] > 0 ? 1.0 : 0.0;
  }
  return mask;
}
static ad_tensor *safe_sqrt(ad_tape *t, ad_tensor *x) {
  ad_tensor *mask = pos_mask(t, x);
  if (!mask) return NULL;
  ad_tensor *one = ad_scalar(t, x->dtype, 1.0), *zero = ad_scalar(t, x->dtype, 0.0);
  return ad_where(t, mask, ad_sqrt(t, ad_where(t, mask, x, one)), zero);
}

/* ---- the fused SGD step
 *
 *   w' = w - A (g + D w)
 *
 * A = lr, D = weight decay: numbers, or tape variables of size 1 or shaped
 * like w. One op: a recorded unroll keeps w' only, not D w and g + D w.
 * The node's inputs are w, g and the variables (the caller's tensors: no
 * temporaries); a.c = the number a, a.extra -> the number d, a.ta / a.tb:
 * whether the A / D variables are inputs 2 / 3 (absent ones are skipped).
 *
 * Its rule, G the cotangent of w' ("sum?" where the variable is a size-1
 * broadcast and the cotangent is summed to its size):
 *   dw = G - A (D G)             (= G (1 - A D); with numbers, the number 1 - a d times G,
 *                                 G itself when d is the number 0)
 *   dg = -A G
 *   dA = -sum?((g + D w) G)
 *   dD = -sum?(A (w G))
 * Reads: dw and dg read the variables only; dA reads g, and w unless D is
 * the number 0; dD reads w. Never the output. The rule is one pass
 * (sgd_bwd) computing every wanted cotangent; each result is recorded as a
 * node of its own (sgd_step_dw, _dg, _dlr, _dwd below) with its own rule,
 * so a recorded backward can be differentiated again. The loops run in
 * blocks: a size-1 or number hyperparameter is a block of its value, so one
 * vectorizable loop serves every combination. */

enum { SGD_BLK = 512, SGD_GRAIN = 16384 };

static _Thread_local int sgd_unfused; /* nn__opt_set_unfused: the public-op path */
void nn__opt_set_unfused(int on) {
  sgd_unfused = on != 0;
}

typedef struct {
  int64_t n;
  const void *w, *g, *G; /* inputs; G is the cotangent (backward) */
  const void *A, *D;     /* full-size variables, or NULL: then a / d hold the value */
  double a, d;
  int plain;      /* no variable at all: forward (1 - a d) w - a g, backward (1 - a d) G */
  int d_zero;     /* D is the number 0: the step is w - A g, and dA does not read w */
  void *out;      /* forward */
  void *dw, *dg;  /* backward, NULL when not wanted */
  void *da, *dd;  /* full-size cotangents of full-size A / D, or NULL */
  int dd_acc;     /* dd is D's gradient slot: the part is added into it */
  double *part_a; /* per-part sums of dA when A is size 1 (else NULL) */
  double *part_d; /* the same for dD */
} sgd_job;

/* The kernels are compiled twice for each type: for the base ISA and
 * (x86, GCC/Clang) for AVX-512, taken at run time when the CPU has it and
 * the GEMM layer allows it (not under HYPERTAPE_BLIS_ARCH=haswell). They
 * are memory-bound passes over weight-sized arrays: 512-bit loads and
 * stores instead of the base ISA's 128-bit ones took about a fifth off the
 * backward pass in the 784-200-10 unroll (bench_unroll_T10, 1 thread).
 * Every element is the same expression in the same order either way, and
 * nothing is contracted into an FMA (fp-contract off: the composed public
 * ops round each product, and the fused step must give their bits), so
 * both clones give the same bits. */
#if AD_X86 && defined(__GNUC__)
#define SGD_WIDE 1
#else
#define SGD_WIDE 0
#endif

/* Whether the AVX-512 clones run (once: the CPU does not change). */
static int sgd_wide(void) {
#if SGD_WIDE
  static _Atomic int on = -1;
  int v = on;
  if (v < 0) on = v = ad__blas_avx512_allowed(); /* implies ad__cpu_avx512() */
  return v;
#else
  return 0;
#endif
}

/* Sum of x[0..k) in double with 8 partials (vectorizes). */
#define DEF_SGD_KERNELS(T, S, ATTR)                                                                \
  ATTR static double sum_blk_##S(const T *x, int64_t k) {                                          \
    AD_NO_FMA                                                                                      \
    double p[8] = {0}, s = 0;                                                                      \
    int64_t i = 0;                                                                                 \
    for (; i + 8 <= k; i += 8)                                                                     \
      for (int q = 0; q < 8; q++) p[q] += (double)x[i + q];                                        \
    for (; i < k; i++) s += (double)x[i];                                                          \
    for (int q = 0; q < 8; q++) s += p[q];                                                         \
    return s;                                                                                      \
  }                                                                                                \
  ATTR static void sgd_fwd_##S(void *ctx, int part, int64_t lo, int64_t hi) {                      \
    AD_NO_FMA                                                                                      \
    const sgd_job *c = ctx;                                                                        \
    (void)part;                                                                                    \
    const T *W = c->w, *Gr = c->g;                                                                 \
    T *restrict O = c->out;                                                                        \
    if (c->plain) {                                                                                \
      T ta = (T)c->a, td = (T)(1 - c->a * c->d);                                                   \
      for (int64_t j = lo; j < hi; j++) O[j] = td * W[j] - ta * Gr[j];                             \
      return;                                                                                      \
    }                                                                                              \
    T ab[SGD_BLK], db[SGD_BLK];                                                                    \
    for (int k = 0; k < SGD_BLK; k++) ab[k] = (T)c->a, db[k] = (T)c->d;                            \
    for (int64_t b = lo; b < hi; b += SGD_BLK) {                                                   \
      int64_t m = hi - b < SGD_BLK ? hi - b : SGD_BLK;                                             \
      const T *Ap = c->A ? (const T *)c->A + b : ab, *Dp = c->D ? (const T *)c->D + b : db;        \
      const T *Wb = W + b, *Gb = Gr + b;                                                           \
      T *restrict Ob = O + b;                                                                      \
      if (c->d_zero)                                                                               \
        for (int64_t k = 0; k < m; k++) Ob[k] = Wb[k] - Ap[k] * Gb[k];                             \
      else                                                                                         \
        for (int64_t k = 0; k < m; k++) Ob[k] = Wb[k] - Ap[k] * (Gb[k] + Dp[k] * Wb[k]);           \
    }                                                                                              \
  }                                                                                                \
  ATTR static void sgd_bwd_##S(void *ctx, int part, int64_t lo, int64_t hi) {                      \
    AD_NO_FMA                                                                                      \
    const sgd_job *c = ctx;                                                                        \
    const T *W = c->w, *Gr = c->g, *G = c->G;                                                      \
    T *restrict DW = c->dw, *restrict DG = c->dg, *restrict DA = c->da, *restrict DD = c->dd;      \
    T ab[SGD_BLK], db[SGD_BLK], tmp[SGD_BLK];                                                      \
    for (int k = 0; k < SGD_BLK; k++) ab[k] = (T)c->a, db[k] = (T)c->d;                            \
    double sa = 0, sd = 0;                                                                         \
    for (int64_t b = lo; b < hi; b += SGD_BLK) {                                                   \
      int64_t m = hi - b < SGD_BLK ? hi - b : SGD_BLK;                                             \
      const T *Ap = c->A ? (const T *)c->A + b : ab, *Dp = c->D ? (const T *)c->D + b : db;        \
      const T *Gb = G + b;                                                                         \
      if (DW) {                                                                                    \
        T *restrict o = DW + b;                                                                    \
        if (c->plain) {                                                                            \
          T k1 = (T)(1 - c->a * c->d);                                                             \
          for (int64_t k = 0; k < m; k++) o[k] = k1 * Gb[k];                                       \
        } else {                                                                                   \
          for (int64_t k = 0; k < m; k++) o[k] = Gb[k] - Ap[k] * (Dp[k] * Gb[k]);                  \
        }                                                                                          \
      }                                                                                            \
      if (DG) {                                                                                    \
        T *restrict o = DG + b;                                                                    \
        for (int64_t k = 0; k < m; k++) o[k] = -(Ap[k] * Gb[k]);                                   \
      }                                                                                            \
      if (DA || c->part_a) {                                                                       \
        T *restrict o = DA ? DA + b : tmp;                                                         \
        const T *gb = Gr + b;                                                                      \
        if (c->d_zero) {                                                                           \
          for (int64_t k = 0; k < m; k++) o[k] = -(gb[k] * Gb[k]);                                 \
        } else {                                                                                   \
          const T *Wb = W + b;                                                                     \
          for (int64_t k = 0; k < m; k++) o[k] = -((gb[k] + Dp[k] * Wb[k]) * Gb[k]);               \
        }                                                                                          \
        if (!DA) sa += sum_blk_##S(tmp, m);                                                        \
      }                                                                                            \
      if (DD || c->part_d) {                                                                       \
        T *restrict o = DD ? DD + b : tmp;                                                         \
        const T *Wb = W + b;                                                                       \
        if (c->dd_acc) /* the slot's in-place add, part rounded first */                           \
          for (int64_t k = 0; k < m; k++) o[k] = o[k] + -(Ap[k] * (Wb[k] * Gb[k]));                \
        else                                                                                       \
          for (int64_t k = 0; k < m; k++) o[k] = -(Ap[k] * (Wb[k] * Gb[k]));                       \
        if (!DD) sd += sum_blk_##S(tmp, m);                                                        \
      }                                                                                            \
    }                                                                                              \
    if (c->part_a) c->part_a[part] = sa;                                                           \
    if (c->part_d) c->part_d[part] = sd;                                                           \
  }
DEF_SGD_KERNELS(float, f32, )
DEF_SGD_KERNELS(double, f64, )
#if SGD_WIDE
DEF_SGD_KERNELS(float, f32w, AD_AVX512_EXACT_ATTR)
DEF_SGD_KERNELS(double, f64w, AD_AVX512_EXACT_ATTR)
#define SGD_PICK(NAME, dt)                                                                         \
  (sgd_wide() ? ((dt) == AD_F32 ? NAME##_f32w : NAME##_f64w)                                       \
              : ((dt) == AD_F32 ? NAME##_f32 : NAME##_f64))
#else
#define SGD_PICK(NAME, dt) ((dt) == AD_F32 ? NAME##_f32 : NAME##_f64)
#endif

/* The value of a hyperparameter as the loops see it: a number, a size-1
 * variable's element, or NULL data for a full-size variable. */
static const void *hyper_data(const ad_tensor *v, int64_t n, double c, double *val) {
  if (v && v->size == n && n > 1) return v->data;
  *val = v ? ad_get(v, 0) : c;
  return NULL;
}

/* {d, 1}: the decay number, and the moment ops' Q (set by them). */
static double *keep_number(ad_tape *t, double d) {
  double *p = ad_arena_alloc(t, 2 * sizeof *p);
  if (p) p[0] = d, p[1] = 1;
  return p;
}

static void attr_sgd(const ad_node *n, char *buf, size_t len) {
  snprintf(buf, len, "lr=%g wd=%g", n->a.c, n->a.extra ? *(const double *)n->a.extra : 0.0);
}

static void vjp_sgd(ad_tape *t, const ad_node *n, ad_tensor *G, ad_tensor **gin, const int *need);
static void vjp_sgd_dw(ad_tape *t, const ad_node *n, ad_tensor *C, ad_tensor **gin,
                       const int *need);
static void vjp_sgd_dg(ad_tape *t, const ad_node *n, ad_tensor *C, ad_tensor **gin,
                       const int *need);
static void vjp_sgd_dlr(ad_tape *t, const ad_node *n, ad_tensor *C, ad_tensor **gin,
                        const int *need);
static void vjp_sgd_dwd(ad_tape *t, const ad_node *n, ad_tensor *C, ad_tensor **gin,
                        const int *need);
/* What the fused rule reads (for ad_tape_compact), per gradient, with the
 * optional variables A, D at their slots: the kernel reads size-1 A and D
 * whatever is asked, so they are in every set; dA also reads g and w, dD
 * reads w. g is read only for dA: an unroll with a number for the learning
 * rate keeps w' and w, not the gradient. a.extra is keep_number's pair. */
static unsigned saves_sgd(const ad_node *n) {
  int ia = n->a.ta ? 2 : -1, id = n->a.tb ? (n->a.ta ? 3 : 2) : -1;
  unsigned A = ia >= 0 ? AD_S_IN(ia) : 0, D = id >= 0 ? AD_S_IN(id) : 0;
  unsigned r[4] = {A | D, A | D, 0, 0};
  if (ia >= 0) r[ia] = AD_S_IN(0) | AD_S_IN(1) | A | D;
  if (id >= 0) r[id] = AD_S_IN(0) | A | D;
  return AD_SAVES(r[0], r[1], r[2], r[3]);
}
enum { SGD_EXTRA = 2 * sizeof(double) };
static const ad_op_def OP_SGD = {
    "sgd_step", vjp_sgd, attr_sgd, {.of = saves_sgd, .extra_bytes = SGD_EXTRA}};
static const ad_op_def OP_SGD_DW = {
    "sgd_step_dw", vjp_sgd_dw, attr_sgd, {.extra_bytes = SGD_EXTRA}};
static const ad_op_def OP_SGD_DG = {
    "sgd_step_dg", vjp_sgd_dg, attr_sgd, {.extra_bytes = SGD_EXTRA}};
static const ad_op_def OP_SGD_DLR = {
    "sgd_step_dlr", vjp_sgd_dlr, attr_sgd, {.extra_bytes = SGD_EXTRA}};
static const ad_op_def OP_SGD_DWD = {
    "sgd_step_dwd", vjp_sgd_dwd, attr_sgd, {.extra_bytes = SGD_EXTRA}};

/* Records out = op(in) with the hyperparameter numbers and flags. */
static ad_node *record_sgd(ad_tape *t, const ad_op_def *op, ad_tensor *out, int k, ad_tensor **in,
                           double a, double d, int ta, int tb, int kd) {
  ad_node *nd = ad__record(t, op, out, k, in);
  if (!nd) return NULL;
  nd->a.c = a;
  nd->a.extra = keep_number(t, d);
  nd->a.ta = ta;
  nd->a.tb = tb;
  nd->a.keepdim = kd;
  if (!nd->a.extra) ad__fail(t, AD_ERR_NOMEM, "sgd_step: arena full");
  return nd;
}

/* The fused backward: the wanted cotangents of w' = w - A (g + D w) for
 * the cotangent G, in one pass, each recorded as its own node. w and g may
 * be NULL when neither dA nor dD is wanted (the second-order rules use this
 * for the dw / dg parts alone). Results go to *ow, *og, *oa, *od (each
 * pointer NULL when not wanted). */
static void sgd_bwd(ad_tape *t, ad_tensor *G, ad_tensor *w, ad_tensor *g, ad_tensor *av, double a,
                    ad_tensor *dv, double d, ad_tensor **ow, ad_tensor **og, ad_tensor **oa,
                    ad_tensor **od) {
  int64_t n = G->size;
  sgd_job c = {.n = n, .G = G->data, .w = w ? w->data : NULL, .g = g ? g->data : NULL};
  c.A = hyper_data(av, n, a, &c.a);
  c.D = hyper_data(dv, n, d, &c.d);
  c.plain = !av && !dv;
  c.d_zero = !dv && d == 0;
  ad_tensor *rw = NULL, *rg = NULL, *ra = NULL, *rd = NULL;
  if (ow && c.plain && d == 0) { /* dw = G (momentum's w - A m'): no pass, no copy */
    *ow = G;
    ow = NULL;
  }
  /* Unrecorded, a full-size D whose gradient slot the sweep owns (an
   * unroll's per-parameter decay, whose slot is the hypergradient being
   * summed) takes its part from the kernel itself: no D-sized result and
   * no pass adding it. */
  ad_tensor *slot_d = od && dv->size == n ? ad__grad_slot(t, dv) : NULL;
  if (slot_d && slot_d->dtype == G->dtype && !ad__overlap(slot_d, G) &&
      !(w && ad__overlap(slot_d, w)) && !ad__overlap(slot_d, dv) &&
      !(g && ad__overlap(slot_d, g)) && !(av && ad__overlap(slot_d, av))) {
    c.dd = slot_d->data;
    c.dd_acc = 1;
    *od = NULL;
    od = NULL;
  }
  /* dg last: in an unrolled step's reverse sweep it is taken in by the
   * gradient's graph and dead long before dw and the hyperparameter parts
   * are, and a dead block at the top of the arena is freed by the sweep's
   * collection without sliding the live ones below it down. */
  if (ow && !(rw = ad__like(t, G))) return;
  if (oa && !(ra = ad__alloc(t, G->dtype, av->ndim, av->shape, 0))) return;
  if (od && !(rd = ad__alloc(t, G->dtype, dv->ndim, dv->shape, 0))) return;
  if (og && !(rg = ad__like(t, G))) return;
  int parts = ad__par_parts(n, SGD_GRAIN);
  c.dw = rw ? rw->data : NULL;
  c.dg = rg ? rg->data : NULL;
  if (ra && ra->size == n) c.da = ra->data;
  if (rd && rd->size == n) c.dd = rd->data;
  if (ra && !c.da && !(c.part_a = ad_arena_alloc(t, sizeof(double) * (size_t)parts))) return;
  if (rd && !c.dd && !(c.part_d = ad_arena_alloc(t, sizeof(double) * (size_t)parts))) return;
  ad__par_for(n, SGD_GRAIN, SGD_PICK(sgd_bwd, G->dtype), &c);
  double s[2] = {0, 0};
  for (int p = 0; p < parts; p++) {
    if (c.part_a) s[0] += c.part_a[p];
    if (c.part_d) s[1] += c.part_d[p];
  }
  if (c.part_a) ad_set(ra, 0, s[0]);
  if (c.part_d) ad_set(rd, 0, s[1]);
  ad_tensor *in[4];
  int k;
  if (rw) {
    k = 0;
    in[k++] = G;
    if (av) in[k++] = av;
    if (dv) in[k++] = dv;
    ad__op_begin(t, "sgd_step_dw", k, in);
    record_sgd(t, &OP_SGD_DW, rw, k, in, a, d, av != NULL, dv != NULL, 0);
    *ow = ad__done(t, rw, "sgd_step_dw");
  }
  if (rg) {
    k = 0;
    in[k++] = G;
    if (av) in[k++] = av;
    ad__op_begin(t, "sgd_step_dg", k, in);
    record_sgd(t, &OP_SGD_DG, rg, k, in, a, d, av != NULL, 0, 0);
    *og = ad__done(t, rg, "sgd_step_dg");
  }
  if (ra) {
    k = 0;
    in[k++] = G;
    in[k++] = g;
    if (!c.d_zero) in[k++] = w;
    if (dv) in[k++] = dv;
    ad__op_begin(t, "sgd_step_dlr", k, in);
    record_sgd(t, &OP_SGD_DLR, ra, k, in, a, d, 0, dv != NULL, !c.d_zero);
    *oa = ad__done(t, ra, "sgd_step_dlr");
  }
  if (rd) {
    k = 0;
    in[k++] = G;
    in[k++] = w;
    if (av) in[k++] = av;
    ad__op_begin(t, "sgd_step_dwd", k, in);
    record_sgd(t, &OP_SGD_DWD, rd, k, in, a, d, av != NULL, 0, 0);
    *od = ad__done(t, rd, "sgd_step_dwd");
  }
}

static void vjp_sgd(ad_tape *t, const ad_node *n, ad_tensor *G, ad_tensor **gin, const int *need) {
  int ia = n->a.ta ? 2 : -1, id = n->a.tb ? (n->a.ta ? 3 : 2) : -1;
  ad_tensor *av = ia >= 0 ? n->in[ia] : NULL, *dv = id >= 0 ? n->in[id] : NULL;
  int wa = ia >= 0 && need[ia], wd = id >= 0 && need[id];
  sgd_bwd(t, G, n->in[0], n->in[1], av, n->a.c, dv, *(const double *)n->a.extra,
          need[0] ? &gin[0] : NULL, need[1] ? &gin[1] : NULL, wa ? &gin[ia] : NULL,
          wd ? &gin[id] : NULL);
}

/* ---- the rules of the backward's parts, from public ops (and the fused
 * parts themselves), so a third derivative follows too. C is the
 * cotangent of the part's output. */

/* -x, or -c x, or -v x with v a variable (size 1 or like x). */
static ad_tensor *neg_times(ad_tape *t, ad_tensor *v, double c, ad_tensor *x) {
  return v ? ad_neg(t, ad_mul(t, v, x)) : ad_scale(t, x, -c);
}
static ad_tensor *sum_to(ad_tape *t, ad_tensor *x, const ad_tensor *like) {
  return x && like->size != x->size ? ad_reshape(t, ad_sum(t, x), like->ndim, like->shape) : x;
}

/* y = G - A (D G):  dG = C - A (D C) (this part again),
 *                   dA = -sum?(D (C G)),  dD = -sum?(A (C G)).
 * Inputs G, A?, D?; reads G, A, D. */
static void vjp_sgd_dw(ad_tape *t, const ad_node *n, ad_tensor *C, ad_tensor **gin,
                       const int *need) {
  int ia = n->a.ta ? 1 : -1, id = n->a.tb ? (n->a.ta ? 2 : 1) : -1;
  ad_tensor *G = n->in[0], *av = ia >= 0 ? n->in[ia] : NULL, *dv = id >= 0 ? n->in[id] : NULL;
  double a = n->a.c, d = *(const double *)n->a.extra;
  if (need[0]) sgd_bwd(t, C, NULL, NULL, av, a, dv, d, &gin[0], NULL, NULL, NULL);
  ad_tensor *cg = (ia >= 0 && need[ia]) || (id >= 0 && need[id]) ? ad_mul(t, C, G) : NULL;
  if (ia >= 0 && need[ia]) gin[ia] = sum_to(t, neg_times(t, dv, d, cg), av);
  if (id >= 0 && need[id]) gin[id] = sum_to(t, neg_times(t, av, a, cg), dv);
}

/* y = -A G:  dG = -A C (this part again),  dA = -sum?(C G).  Inputs G, A?;
 * reads G, A. */
static void vjp_sgd_dg(ad_tape *t, const ad_node *n, ad_tensor *C, ad_tensor **gin,
                       const int *need) {
  ad_tensor *G = n->in[0], *av = n->a.ta ? n->in[1] : NULL;
  if (need[0]) sgd_bwd(t, C, NULL, NULL, av, n->a.c, NULL, 0, NULL, &gin[0], NULL, NULL);
  if (av && need[1]) gin[1] = sum_to(t, ad_neg(t, ad_mul(t, C, G)), av);
}

/* y = -sum?((g + D w) G), shaped like A (C too: broadcast when size 1):
 *   dG = -(g + D w) C,  dg = -G C,  dw = -D (G C),  dD = -sum?(w (G C)).
 * Inputs G, g, w? (absent when D is the number 0), D?; reads all of them. */
static void vjp_sgd_dlr(ad_tape *t, const ad_node *n, ad_tensor *C, ad_tensor **gin,
                        const int *need) {
  int iw = n->a.keepdim ? 2 : -1, id = n->a.tb ? (iw >= 0 ? 3 : 2) : -1;
  ad_tensor *G = n->in[0], *g = n->in[1], *w = iw >= 0 ? n->in[iw] : NULL;
  ad_tensor *dv = id >= 0 ? n->in[id] : NULL;
  double d = *(const double *)n->a.extra;
  if (need[0]) {
    ad_tensor *step = !w ? g : dv ? ad_add(t, g, ad_mul(t, dv, w)) : ad_axpy(t, g, d, w);
    gin[0] = ad_neg(t, ad_mul(t, step, C));
  }
  ad_tensor *gc =
      need[1] || (iw >= 0 && need[iw]) || (id >= 0 && need[id]) ? ad_mul(t, G, C) : NULL;
  if (need[1]) gin[1] = ad_neg(t, gc);
  if (iw >= 0 && need[iw]) gin[iw] = neg_times(t, dv, d, gc);
  if (id >= 0 && need[id]) gin[id] = sum_to(t, ad_neg(t, ad_mul(t, w, gc)), dv);
}

/* y = -sum?(A (w G)), shaped like D (C too):
 *   dG = -A (w C),  dw = -A (G C),  dA = -sum?(w (G C)).
 * Inputs G, w, A?; reads all of them. */
static void vjp_sgd_dwd(ad_tape *t, const ad_node *n, ad_tensor *C, ad_tensor **gin,
                        const int *need) {
  ad_tensor *G = n->in[0], *w = n->in[1], *av = n->a.ta ? n->in[2] : NULL;
  double a = n->a.c;
  if (need[0]) gin[0] = neg_times(t, av, a, ad_mul(t, w, C));
  ad_tensor *gc = need[1] || (av && need[2]) ? ad_mul(t, G, C) : NULL;
  if (need[1]) gin[1] = neg_times(t, av, a, gc);
  if (av && need[2]) gin[2] = sum_to(t, ad_neg(t, ad_mul(t, w, gc)), av);
}

/* ---- the fused moment buffers
 *
 *   first moment   m' = P m + Q (g + D w)
 *   second moment  v' = P v + Q (g + D w)^2
 *
 * P = the decay (momentum, a number or a size-1 variable; Adam's beta1 or
 * beta2), Q a number (1 for momentum, 1 - beta for Adam), D = weight decay
 * (as in sgd_step; absent when it is the number 0, and w is then no input;
 * AdamW passes none: its decay is decoupled). The heavy ball is
 * m' = first(m, g, w), w' = sgd_step(w, m') with no decay; Nesterov's
 * look-ahead g + D w + M m' is the first-moment op at m', then
 * w' = sgd_step(w, look); Adam's moments are these two ops. Each is in the
 * element order of the composed step (P m + Q (g + D w), Q dropped when
 * it is 1), so both give the same bits. Their rules (C the cotangent,
 * gi = g + D w, e = Q C for the first moment and 2 Q gi C for the second):
 *   dm = P C    dg = e    dw = D e    dP = sum(m C)    dD = sum?(w e)
 * Reads: m for dP; for the second moment g, w and D (gi); w for dD; the
 * variables; never the output. Public ops, differentiable again. The
 * node's inputs: m, g, then w (a.keepdim), P's variable (a.ta), D's
 * variable (a.tb); a.c = the number P, a.extra -> {D, Q}, a.i0 = 1 for the
 * second moment. */

typedef struct {
  const void *m, *g, *w, *D;
  double p, d, q;
  int has_d, sq;
  void *out;
} mom_job;

#define DEF_MOM_KERNEL(T, S)                                                                       \
  static void mom_fwd_##S(void *ctx, int part, int64_t lo, int64_t hi) {                           \
    const mom_job *c = ctx;                                                                        \
    (void)part;                                                                                    \
    const T *M = c->m, *Gr = c->g, *W = c->w;                                                      \
    T *restrict O = c->out;                                                                        \
    T p = (T)c->p, q = (T)c->q;                                                                    \
    T db[SGD_BLK], gi[SGD_BLK];                                                                    \
    for (int k = 0; k < SGD_BLK; k++) db[k] = (T)c->d;                                             \
    for (int64_t b = lo; b < hi; b += SGD_BLK) {                                                   \
      int64_t m = hi - b < SGD_BLK ? hi - b : SGD_BLK;                                             \
      const T *Dp = c->D ? (const T *)c->D + b : db, *Mb = M + b, *Gb = Gr + b, *Wb = W + b;       \
      T *restrict Ob = O + b;                                                                      \
      if (c->has_d)                                                                                \
        for (int64_t k = 0; k < m; k++) gi[k] = Gb[k] + Dp[k] * Wb[k];                             \
      else                                                                                         \
        for (int64_t k = 0; k < m; k++) gi[k] = Gb[k];                                             \
      if (c->sq)                                                                                   \
        for (int64_t k = 0; k < m; k++) Ob[k] = p * Mb[k] + q * (gi[k] * gi[k]);                   \
      else if (c->q != 1)                                                                          \
        for (int64_t k = 0; k < m; k++) Ob[k] = p * Mb[k] + q * gi[k];                             \
      else                                                                                         \
        for (int64_t k = 0; k < m; k++) Ob[k] = p * Mb[k] + gi[k];                                 \
    }                                                                                              \
  }
DEF_MOM_KERNEL(float, f32)
DEF_MOM_KERNEL(double, f64)

/* Never runs: the results of the unrecorded pass have no node. ad__record
 * is still called with it so they carry AD_FLAG_UNREC like any op's. */
static void vjp_unrecorded(ad_tape *t, const ad_node *n, ad_tensor *C, ad_tensor **gin,
                           const int *need) {
  (void)n, (void)C, (void)gin, (void)need;
  ad__fail(t, AD_ERR_GRAD, "an unrecorded fused derivative was differentiated");
}
/* The unrecorded backward of the moment op (a plain ad_grad): vjp_mom's
 * formulas in one pass over m, g, w and C; dg is C itself for momentum
 * (e = C). A recorded backward takes the public ops of vjp_mom. */
typedef struct {
  const void *m, *g, *w, *C, *D;
  double p, d, q;
  int sq, has_d;
  void *dm, *dg, *dw, *dd; /* full-size outputs or NULL */
  double *part_p, *part_d; /* per-part sums for P's variable / a size-1 D */
} mom_bjob;

#define DEF_MOM_BWD(T, S)                                                                          \
  static void mom_bwd_##S(void *ctx, int part, int64_t lo, int64_t hi) {                           \
    const mom_bjob *c = ctx;                                                                       \
    const T *M = c->m, *Gr = c->g, *W = c->w, *Cg = c->C;                                          \
    T *restrict DM = c->dm, *restrict DG = c->dg, *restrict DW = c->dw, *restrict DD = c->dd;      \
    T p = (T)c->p, q = (T)c->q, q2 = (T)(2 * c->q);                                                \
    T db[SGD_BLK], e[SGD_BLK], tmp[SGD_BLK];                                                       \
    for (int k = 0; k < SGD_BLK; k++) db[k] = (T)c->d;                                             \
    double sp = 0, sd = 0;                                                                         \
    for (int64_t b = lo; b < hi; b += SGD_BLK) {                                                   \
      int64_t m = hi - b < SGD_BLK ? hi - b : SGD_BLK;                                             \
      const T *Dp = c->D ? (const T *)c->D + b : db, *Cb = Cg + b;                                 \
      if (DM)                                                                                      \
        for (int64_t k = 0; k < m; k++) DM[b + k] = p * Cb[k];                                     \
      if (c->part_p) {                                                                             \
        for (int64_t k = 0; k < m; k++) tmp[k] = M[b + k] * Cb[k];                                 \
        sp += sum_blk_##S(tmp, m);                                                                 \
      }                                                                                            \
      if (!DG && !DW && !DD && !c->part_d) continue;                                               \
      if (c->sq) {                                                                                 \
        const T *Gb = Gr + b, *Wb = W + b;                                                         \
        if (c->has_d)                                                                              \
          for (int64_t k = 0; k < m; k++) e[k] = q2 * ((Gb[k] + Dp[k] * Wb[k]) * Cb[k]);           \
        else                                                                                       \
          for (int64_t k = 0; k < m; k++) e[k] = q2 * (Gb[k] * Cb[k]);                             \
      } else {                                                                                     \
        for (int64_t k = 0; k < m; k++) e[k] = q * Cb[k];                                          \
      }                                                                                            \
      if (DG)                                                                                      \
        for (int64_t k = 0; k < m; k++) DG[b + k] = e[k];                                          \
      if (DW)                                                                                      \
        for (int64_t k = 0; k < m; k++) DW[b + k] = Dp[k] * e[k];                                  \
      if (DD || c->part_d) {                                                                       \
        T *restrict o = DD ? DD + b : tmp;                                                         \
        for (int64_t k = 0; k < m; k++) o[k] = W[b + k] * e[k];                                    \
        if (!DD) sd += sum_blk_##S(tmp, m);                                                        \
      }                                                                                            \
    }                                                                                              \
    if (c->part_p) c->part_p[part] = sp;                                                           \
    if (c->part_d) c->part_d[part] = sd;                                                           \
  }
DEF_MOM_BWD(float, f32)
DEF_MOM_BWD(double, f64)

static const ad_op_def OP_MOM_BWD = {"moment_buffer_grad", vjp_unrecorded, NULL, {0}};

static void mom_bwd_fast(ad_tape *t, const ad_node *n, ad_tensor *C, ad_tensor **gin,
                         const int *need, int iw, int im, int id) {
  ad_tensor *m = n->in[0], *g = n->in[1], *w = iw >= 0 ? n->in[iw] : NULL;
  ad_tensor *pv = im >= 0 ? n->in[im] : NULL, *dv = id >= 0 ? n->in[id] : NULL;
  const double *dq = n->a.extra;
  int64_t sz = m->size;
  mom_bjob c = {.m = m->data, .g = g->data, .w = w ? w->data : NULL, .C = C->data};
  c.p = pv ? ad_get(pv, 0) : n->a.c;
  c.D = hyper_data(dv, sz, dq[0], &c.d);
  c.q = dq[1];
  c.sq = (int)n->a.i0;
  c.has_d = w != NULL;
  ad_tensor *out[5] = {NULL};
  const ad_tensor *like[5] = {m, g, w, pv, dv};
  int slot[5] = {0, 1, iw, im, id};
  for (int k = 0; k < 5; k++) {
    if (slot[k] < 0 || !need[slot[k]]) continue;
    if (k == 1 && !c.sq && c.q == 1) {
      gin[1] = C; /* dg = C */
      continue;
    }
    if (!(out[k] = ad__alloc(t, m->dtype, like[k]->ndim, like[k]->shape, 0))) return;
  }
  int parts = ad__par_parts(sz, SGD_GRAIN);
  c.dm = out[0] ? out[0]->data : NULL;
  c.dg = out[1] ? out[1]->data : NULL;
  c.dw = out[2] ? out[2]->data : NULL;
  if (out[4] && out[4]->size == sz) c.dd = out[4]->data;
  if (out[3] && !(c.part_p = ad_arena_alloc(t, sizeof(double) * (size_t)parts))) return;
  if (out[4] && !c.dd && !(c.part_d = ad_arena_alloc(t, sizeof(double) * (size_t)parts))) return;
  ad__par_for(sz, SGD_GRAIN, m->dtype == AD_F32 ? mom_bwd_f32 : mom_bwd_f64, &c);
  double s[2] = {0, 0};
  for (int p = 0; p < parts; p++) {
    if (c.part_p) s[0] += c.part_p[p];
    if (c.part_d) s[1] += c.part_d[p];
  }
  if (c.part_p) ad_set(out[3], 0, s[0]);
  if (c.part_d) ad_set(out[4], 0, s[1]);
  for (int k = 0; k < 5; k++) {
    if (!out[k]) continue;
    ad__record(t, &OP_MOM_BWD, out[k], n->n_in, n->in);
    gin[slot[k]] = ad__done(t, out[k], "moment_buffer_grad");
  }
}

static void vjp_mom(ad_tape *t, const ad_node *n, ad_tensor *C, ad_tensor **gin, const int *need) {
  int k = 2, iw = n->a.keepdim ? k++ : -1, im = n->a.ta ? k++ : -1, id = n->a.tb ? k++ : -1;
  if (!ad__recording(t)) {
    mom_bwd_fast(t, n, C, gin, need, iw, im, id);
    return;
  }
  ad_tensor *m = n->in[0], *g = n->in[1], *w = iw >= 0 ? n->in[iw] : NULL;
  ad_tensor *mv = im >= 0 ? n->in[im] : NULL, *dv = id >= 0 ? n->in[id] : NULL;
  const double *dq = n->a.extra;
  double p = n->a.c, d = dq[0], q = dq[1];
  if (need[0]) gin[0] = mv ? ad_mul(t, mv, C) : ad_scale(t, C, p);
  if (im >= 0 && need[im]) gin[im] = sum_to(t, ad_mul(t, m, C), mv);
  int want_e = need[1] || (iw >= 0 && need[iw]) || (id >= 0 && need[id]);
  if (!want_e) return;
  ad_tensor *e;
  if (n->a.i0) { /* second moment: e = 2 Q gi C */
    ad_tensor *gi = !w ? g : dv ? ad_add(t, g, ad_mul(t, dv, w)) : ad_axpy(t, g, d, w);
    e = ad_scale(t, ad_mul(t, gi, C), 2 * q);
  } else {
    e = q == 1 ? C : ad_scale(t, C, q);
  }
  if (need[1]) gin[1] = e;
  if (iw >= 0 && need[iw]) gin[iw] = dv ? ad_mul(t, dv, e) : ad_scale(t, e, d);
  if (id >= 0 && need[id]) gin[id] = sum_to(t, ad_mul(t, w, e), dv);
}
static void attr_mom(const ad_node *n, char *buf, size_t len) {
  const double *dq = n->a.extra;
  snprintf(buf, len, "%s p=%g q=%g wd=%g", n->a.i0 ? "second" : "first", n->a.c, dq ? dq[1] : 0.0,
           dq ? dq[0] : 0.0);
}
/* Undeclared reads (all); a.extra is keep_number's pair {d, q}. */
static const ad_op_def OP_MOM = {"moment_buffer", vjp_mom, attr_mom, {.extra_bytes = SGD_EXTRA}};

/* A hyperparameter variable checked against w: w's dtype (else NULL with
 * AD_ERR_DTYPE), and read as w's shape when it has w's size (a view, so
 * the rules' elementwise products line up). NULL stays NULL. */
static ad_tensor *hyper_var(ad_tape *t, const ad_tensor *v, const ad_tensor *w, int *bad) {
  if (!v) return NULL;
  if (v->dtype != w->dtype) {
    *bad = 1;
    ad__fail(t, AD_ERR_DTYPE, "nn_opt_step_diff: hyperparameter variables must be %s",
             ad_dtype_name(w->dtype));
    return NULL;
  }
  ad_tensor *x = (ad_tensor *)v;
  if (x->size == w->size && !ad_same_shape(x, w) && !(x = ad_reshape(t, x, w->ndim, w->shape)))
    *bad = 1;
  return x;
}

/* The moment buffer P m + Q (g + D w) (sq = 0) or P m + Q (g + D w)^2
 * (sq = 1) as one node (pv: P's size-1 variable or NULL). */
static ad_tensor *mom_buffer(ad_tape *t, ad_tensor *m, ad_tensor *g, ad_tensor *w, double p,
                             ad_tensor *pv, double q, int sq, hval wd) {
  int bad = 0;
  ad_tensor *dv = hyper_var(t, wd.v, w, &bad);
  pv = hyper_var(t, pv, w, &bad);
  if (bad) return NULL;
  ad_tensor *out = ad_empty(t, w->dtype, w->ndim, w->shape);
  if (!out) return NULL;
  mom_job c = {.m = m->data, .g = g->data, .w = w->data, .out = out->data, .q = q, .sq = sq};
  c.p = pv ? ad_get(pv, 0) : p;
  c.has_d = dv || wd.c != 0;
  c.D = hyper_data(dv, w->size, wd.c, &c.d);
  ad__par_for(w->size, SGD_GRAIN, w->dtype == AD_F32 ? mom_fwd_f32 : mom_fwd_f64, &c);
  ad_tensor *in[5];
  int k = 0;
  in[k++] = m;
  in[k++] = g;
  if (c.has_d) in[k++] = w;
  if (pv) in[k++] = pv;
  if (dv) in[k++] = dv;
  ad__op_begin(t, "moment_buffer", k, in);
  ad_node *nd = record_sgd(t, &OP_MOM, out, k, in, p, wd.c, pv != NULL, dv != NULL, c.has_d);
  if (nd && nd->a.extra) {
    ((double *)nd->a.extra)[1] = q;
    nd->a.i0 = sq;
  }
  return ad__done(t, out, "moment_buffer");
}

/* ---- the fused Adam update
 *
 *   w' = w - A (r + D w),   r = mhat / (ss(vhat) + eps),
 *   mhat = m (1/c1),  vhat = v (1/c2),  c1 = 1 - b1^k,  c2 = 1 - b2^k
 *
 * m, v: the new moments (the moment ops above); D only for AdamW (Adam's
 * decay is inside g); ss = safe_sqrt (derivative 0 where vhat = 0). One op
 * for the eight of the composed update (scales, mask, two wheres, sqrt,
 * add, divide, axpy), in their element order, so the same bits; the node
 * keeps its inputs only. Its rule (C the cotangent of w', u = ss(vhat) +
 * eps, AC = A C, h = 1 / (2 ss(vhat)) where vhat > 0 else 0):
 *   dw = C - A (D C)       (C without D)
 *   dm = -AC / u / c1
 *   dv = AC (r / u) h / c2
 *   dA = -sum?((r + D w) C)
 *   dD = -sum?(A (w C))
 * Reads m and v (r, u and h are recomputed from them), w for dD and for
 * AdamW's dA, the variables; never the output. Public ops (where keeps
 * sqrt's and the division's rules away from vhat = 0: the "double where"
 * of safe_sqrt), so it is differentiable again. The node's inputs: w, m,
 * v, A's variable (a.ta), D's variable (a.tb); a.c = the number A,
 * a.extra -> {c1, c2, eps, d, has_d}. */

typedef struct {
  const void *w, *m, *v, *A, *D;
  double a, d, ic1, ic2, eps;
  int plain, has_d;
  void *out;
} adam_job;

#define DEF_ADAM_KERNEL(T, S)                                                                      \
  static void adam_fwd_##S(void *ctx, int part, int64_t lo, int64_t hi) {                          \
    const adam_job *c = ctx;                                                                       \
    (void)part;                                                                                    \
    const T *W = c->w, *M = c->m, *V = c->v;                                                       \
    T *restrict O = c->out;                                                                        \
    T i1 = (T)c->ic1, i2 = (T)c->ic2, eps = (T)c->eps, na = (T)(-c->a);                            \
    T ab[SGD_BLK], db[SGD_BLK], st[SGD_BLK];                                                       \
    for (int k = 0; k < SGD_BLK; k++) ab[k] = (T)c->a, db[k] = (T)c->d;                            \
    for (int64_t b = lo; b < hi; b += SGD_BLK) {                                                   \
      int64_t m = hi - b < SGD_BLK ? hi - b : SGD_BLK;                                             \
      const T *Ap = c->A ? (const T *)c->A + b : ab, *Dp = c->D ? (const T *)c->D + b : db;        \
      const T *Wb = W + b, *Mb = M + b, *Vb = V + b;                                               \
      T *restrict Ob = O + b;                                                                      \
      for (int64_t k = 0; k < m; k++) {                                                            \
        T vh = i2 * Vb[k];                                                                         \
        T s = vh > 0 ? (T)sqrt(vh) : (T)0;                                                         \
        st[k] = (i1 * Mb[k]) / (s + eps);                                                          \
      }                                                                                            \
      if (c->has_d)                                                                                \
        for (int64_t k = 0; k < m; k++) st[k] = st[k] + Dp[k] * Wb[k];                             \
      if (c->plain)                                                                                \
        for (int64_t k = 0; k < m; k++) Ob[k] = Wb[k] + na * st[k];                                \
      else                                                                                         \
        for (int64_t k = 0; k < m; k++) Ob[k] = Wb[k] - Ap[k] * st[k];                             \
    }                                                                                              \
  }
DEF_ADAM_KERNEL(float, f32)
DEF_ADAM_KERNEL(double, f64)

/* The unrecorded backward of adam_update (a plain ad_grad, as the unroll's
 * outer sweep): the same formulas as vjp_adam's public ops below, in one
 * pass over w, m, v and C, with no temporaries. A recorded backward (one to
 * be differentiated again) takes the public-op rule instead; the tests
 * hold both to the composed step's derivatives. */
typedef struct {
  const void *w, *m, *v, *C, *A, *D;
  double a, d, ic1, ic2, eps;
  int plain, has_d;
  void *dw, *dm, *dv, *da, *dd; /* full-size outputs or NULL */
  double *part_a, *part_d;      /* per-part sums for size-1 A / D */
} adam_bjob;

#define DEF_ADAM_BWD(T, S)                                                                         \
  static void adam_bwd_##S(void *ctx, int part, int64_t lo, int64_t hi) {                          \
    const adam_bjob *c = ctx;                                                                      \
    const T *W = c->w, *M = c->m, *V = c->v, *Cg = c->C;                                           \
    T *restrict DW = c->dw, *restrict DM = c->dm, *restrict DV = c->dv;                            \
    T *restrict DA = c->da, *restrict DD = c->dd;                                                  \
    T i1 = (T)c->ic1, i2 = (T)c->ic2, eps = (T)c->eps, ni1 = (T)(-c->ic1);                         \
    T ab[SGD_BLK], db[SGD_BLK], r[SGD_BLK], u[SGD_BLK], ac[SGD_BLK], tmp[SGD_BLK];                 \
    for (int k = 0; k < SGD_BLK; k++) ab[k] = (T)c->a, db[k] = (T)c->d;                            \
    double sa = 0, sd = 0;                                                                         \
    for (int64_t b = lo; b < hi; b += SGD_BLK) {                                                   \
      int64_t m = hi - b < SGD_BLK ? hi - b : SGD_BLK;                                             \
      const T *Ap = c->A ? (const T *)c->A + b : ab, *Dp = c->D ? (const T *)c->D + b : db;        \
      const T *Wb = W + b, *Mb = M + b, *Vb = V + b, *Cb = Cg + b;                                 \
      for (int64_t k = 0; k < m; k++) {                                                            \
        T vh = i2 * Vb[k];                                                                         \
        T s = vh > 0 ? (T)sqrt(vh) : (T)0;                                                         \
        u[k] = s + eps;                                                                            \
        r[k] = (i1 * Mb[k]) / u[k];                                                                \
        ac[k] = Ap[k] * Cb[k];                                                                     \
      }                                                                                            \
      if (DW) {                                                                                    \
        T *restrict o = DW + b;                                                                    \
        if (c->plain) {                                                                            \
          T k1 = (T)(1 - c->a * c->d);                                                             \
          for (int64_t k = 0; k < m; k++) o[k] = k1 * Cb[k];                                       \
        } else {                                                                                   \
          for (int64_t k = 0; k < m; k++) o[k] = Cb[k] - Ap[k] * (Dp[k] * Cb[k]);                  \
        }                                                                                          \
      }                                                                                            \
      if (DM)                                                                                      \
        for (int64_t k = 0; k < m; k++) DM[b + k] = (ac[k] / u[k]) * ni1;                          \
      if (DV)                                                                                      \
        for (int64_t k = 0; k < m; k++) {                                                          \
          T vh = i2 * Vb[k];                                                                       \
          T h = vh > 0 ? (T)0.5 / (T)sqrt(vh) : (T)0;                                              \
          DV[b + k] = ((ac[k] * (r[k] / u[k])) * h) * i2;                                          \
        }                                                                                          \
      if (DA || c->part_a) {                                                                       \
        T *restrict o = DA ? DA + b : tmp;                                                         \
        if (c->has_d)                                                                              \
          for (int64_t k = 0; k < m; k++) o[k] = -((r[k] + Dp[k] * Wb[k]) * Cb[k]);                \
        else                                                                                       \
          for (int64_t k = 0; k < m; k++) o[k] = -(r[k] * Cb[k]);                                  \
        if (!DA) sa += sum_blk_##S(tmp, m);                                                        \
      }                                                                                            \
      if (DD || c->part_d) {                                                                       \
        T *restrict o = DD ? DD + b : tmp;                                                         \
        for (int64_t k = 0; k < m; k++) o[k] = -(Ap[k] * (Wb[k] * Cb[k]));                         \
        if (!DD) sd += sum_blk_##S(tmp, m);                                                        \
      }                                                                                            \
    }                                                                                              \
    if (c->part_a) c->part_a[part] = sa;                                                           \
    if (c->part_d) c->part_d[part] = sd;                                                           \
  }
DEF_ADAM_BWD(float, f32)
DEF_ADAM_BWD(double, f64)

static const ad_op_def OP_ADAM_BWD = {"adam_update_grad", vjp_unrecorded, NULL, {0}};

static void adam_bwd_fast(ad_tape *t, const ad_node *n, ad_tensor *C, ad_tensor **gin,
                          const int *need, int ia, int id) {
  ad_tensor *w = n->in[0], *m = n->in[1], *v = n->in[2];
  ad_tensor *av = ia >= 0 ? n->in[ia] : NULL, *dv = id >= 0 ? n->in[id] : NULL;
  const double *x = n->a.extra;
  int64_t sz = w->size;
  adam_bjob c = {.w = w->data, .m = m->data, .v = v->data, .C = C->data};
  c.A = hyper_data(av, sz, n->a.c, &c.a);
  c.D = hyper_data(dv, sz, x[3], &c.d);
  c.ic1 = 1 / x[0], c.ic2 = 1 / x[1], c.eps = x[2];
  c.has_d = x[4] != 0;
  c.plain = !av && !dv;
  ad_tensor *out[5] = {NULL};
  const ad_tensor *like[5] = {w, m, v, av, dv};
  int slot[5] = {0, 1, 2, ia, id};
  for (int k = 0; k < 5; k++) {
    if (slot[k] < 0 || !need[slot[k]]) continue;
    if (k == 0 && !c.has_d) {
      gin[0] = C; /* dw = C */
      continue;
    }
    if (!(out[k] = ad__alloc(t, w->dtype, like[k]->ndim, like[k]->shape, 0))) return;
  }
  int parts = ad__par_parts(sz, SGD_GRAIN);
  c.dw = out[0] ? out[0]->data : NULL;
  c.dm = out[1] ? out[1]->data : NULL;
  c.dv = out[2] ? out[2]->data : NULL;
  if (out[3] && out[3]->size == sz) c.da = out[3]->data;
  if (out[4] && out[4]->size == sz) c.dd = out[4]->data;
  if (out[3] && !c.da && !(c.part_a = ad_arena_alloc(t, sizeof(double) * (size_t)parts))) return;
  if (out[4] && !c.dd && !(c.part_d = ad_arena_alloc(t, sizeof(double) * (size_t)parts))) return;
  ad__par_for(sz, SGD_GRAIN, w->dtype == AD_F32 ? adam_bwd_f32 : adam_bwd_f64, &c);
  double s[2] = {0, 0};
  for (int p = 0; p < parts; p++) {
    if (c.part_a) s[0] += c.part_a[p];
    if (c.part_d) s[1] += c.part_d[p];
  }
  if (c.part_a) ad_set(out[3], 0, s[0]);
  if (c.part_d) ad_set(out[4], 0, s[1]);
  for (int k = 0; k < 5; k++) {
    if (!out[k]) continue;
    ad__record(t, &OP_ADAM_BWD, out[k], n->n_in, n->in);
    gin[slot[k]] = ad__done(t, out[k], "adam_update_grad");
  }
}

static void vjp_adam(ad_tape *t, const ad_node *n, ad_tensor *C, ad_tensor **gin, const int *need) {
  int k = 3, ia = n->a.ta ? k++ : -1, id = n->a.tb ? k++ : -1;
  if (!ad__recording(t)) {
    adam_bwd_fast(t, n, C, gin, need, ia, id);
    return;
  }
  ad_tensor *w = n->in[0], *m = n->in[1], *v = n->in[2];
  ad_tensor *av = ia >= 0 ? n->in[ia] : NULL, *dv = id >= 0 ? n->in[id] : NULL;
  const double *x = n->a.extra;
  double a = n->a.c, c1 = x[0], c2 = x[1], eps = x[2], d = x[3];
  int has_d = x[4] != 0;
  if (need[0]) {
    if (!has_d)
      gin[0] = C;
    else if (!av && !dv)
      gin[0] = ad_scale(t, C, 1 - a * d);
    else
      gin[0] = ad_sub(t, C,
                      ad_mul(t, av ? av : ad_scalar(t, C->dtype, a),
                             dv ? ad_mul(t, dv, C) : ad_scale(t, C, d)));
  }
  int want_r = need[1] || need[2] || (ia >= 0 && need[ia]);
  if (want_r) {
    ad_tensor *vh = ad_scale(t, v, 1 / c2), *s = safe_sqrt(t, vh);
    ad_tensor *u = ad_add_scalar(t, s, eps), *r = ad_div(t, ad_scale(t, m, 1 / c1), u);
    ad_tensor *ac = need[1] || need[2] ? (av ? ad_mul(t, av, C) : ad_scale(t, C, a)) : NULL;
    if (need[1]) gin[1] = ad_scale(t, ad_div(t, ac, u), -1 / c1);
    if (need[2]) {
      /* h = 1 / (2 ss(vhat)) on vhat > 0, 0 elsewhere, by the double where */
      ad_tensor *mask = pos_mask(t, vh);
      if (!mask) return;
      ad_tensor *one = ad_scalar(t, vh->dtype, 1.0), *zero = ad_scalar(t, vh->dtype, 0.0);
      ad_tensor *h = ad_where(
          t, mask, ad_div(t, ad_scalar(t, vh->dtype, 0.5), ad_where(t, mask, s, one)), zero);
      gin[2] = ad_scale(t, ad_mul(t, ad_mul(t, ac, ad_div(t, r, u)), h), 1 / c2);
    }
    if (ia >= 0 && need[ia]) {
      ad_tensor *stp = !has_d ? r : dv ? ad_add(t, r, ad_mul(t, dv, w)) : ad_axpy(t, r, d, w);
      gin[ia] = sum_to(t, ad_neg(t, ad_mul(t, stp, C)), av);
    }
  }
  if (id >= 0 && need[id]) gin[id] = sum_to(t, neg_times(t, av, a, ad_mul(t, w, C)), dv);
}
static void attr_adam(const ad_node *n, char *buf, size_t len) {
  const double *x = n->a.extra;
  snprintf(buf, len, "lr=%g c1=%g c2=%g eps=%g wd=%g", n->a.c, x[0], x[1], x[2], x[3]);
}
/* Undeclared reads (all); a.extra is {c1, c2, eps, wd, has_d}. */
static const ad_op_def OP_ADAM = {
    "adam_update", vjp_adam, attr_adam, {.extra_bytes = 5 * sizeof(double)}};

/* w' of the Adam update above (wd: AdamW's decoupled decay, or none). */
static ad_tensor *adam_update(ad_tape *t, ad_tensor *w, ad_tensor *m, ad_tensor *v, hval lr,
                              hval wd, double c1, double c2, double eps) {
  int bad = 0;
  ad_tensor *av = hyper_var(t, lr.v, w, &bad), *dv = hyper_var(t, wd.v, w, &bad);
  if (bad) return NULL;
  ad_tensor *out = ad_empty(t, w->dtype, w->ndim, w->shape);
  double *x = ad_arena_alloc(t, 5 * sizeof *x);
  if (!out || !x) return NULL;
  adam_job c = {.w = w->data, .m = m->data, .v = v->data, .out = out->data};
  c.A = hyper_data(av, w->size, lr.c, &c.a);
  c.D = hyper_data(dv, w->size, wd.c, &c.d);
  c.ic1 = 1 / c1, c.ic2 = 1 / c2, c.eps = eps;
  c.plain = !av;
  c.has_d = dv || wd.c != 0;
  ad__par_for(w->size, SGD_GRAIN, w->dtype == AD_F32 ? adam_fwd_f32 : adam_fwd_f64, &c);
  ad_tensor *in[5];
  int k = 0;
  in[k++] = w;
  in[k++] = m;
  in[k++] = v;
  if (av) in[k++] = av;
  if (dv) in[k++] = dv;
  ad__op_begin(t, "adam_update", k, in);
  ad_node *nd = ad__record(t, &OP_ADAM, out, k, in);
  if (nd) {
    x[0] = c1, x[1] = c2, x[2] = eps, x[3] = wd.c, x[4] = c.has_d;
    nd->a.c = lr.c;
    nd->a.extra = x;
    nd->a.ta = av != NULL;
    nd->a.tb = dv != NULL;
  }
  return ad__done(t, out, "adam_update");
}

static ad_tensor *sgd_update(ad_tape *t, ad_tensor *w, ad_tensor *g, hval lr, hval wd) {
  ad_tensor *av = (ad_tensor *)lr.v, *dv = (ad_tensor *)wd.v;
  if ((av && av->dtype != w->dtype) || (dv && dv->dtype != w->dtype))
    return ad__fail(t, AD_ERR_DTYPE, "nn_opt_step_diff: hyperparameter variables must be %s",
                    ad_dtype_name(w->dtype));
  /* A variable of w's size but another shape is read as w's shape (a view),
   * so the rules' elementwise products line up. */
  if (av && av->size == w->size && !ad_same_shape(av, w)) av = ad_reshape(t, av, w->ndim, w->shape);
  if (dv && dv->size == w->size && !ad_same_shape(dv, w)) dv = ad_reshape(t, dv, w->ndim, w->shape);
  if ((lr.v && !av) || (wd.v && !dv)) return NULL;
  ad_tensor *out = ad_empty(t, w->dtype, w->ndim, w->shape);
  if (!out) return NULL;
  sgd_job c = {.n = w->size, .w = w->data, .g = g->data, .out = out->data};
  c.A = hyper_data(av, w->size, lr.c, &c.a);
  c.D = hyper_data(dv, w->size, wd.c, &c.d);
  c.plain = !av && !dv;
  c.d_zero = !dv && wd.c == 0; /* w - A g: momentum's step, and SGD without decay */
  ad__par_for(w->size, SGD_GRAIN, SGD_PICK(sgd_fwd, w->dtype), &c);
  ad_tensor *in[4] = {w, g, NULL, NULL};
  int k = 2;
  if (av) in[k++] = av;
  if (dv) in[k++] = dv;
  ad__op_begin(t, "sgd_step", k, in);
  record_sgd(t, &OP_SGD, out, k, in, lr.c, wd.c, av != NULL, dv != NULL, 0);
  return ad__done(t, out, "sgd_step");
}

ad_status nn_opt_step_diff(ad_tape *t, const nn_opt_cfg *cfg, nn_opt_state *s, int n,
                           ad_tensor *const *w, ad_tensor *const *g, ad_tensor **w_new) {
  if (!t) return ad__set_last(AD_ERR_NULL, "nn_opt_step_diff: tape is NULL");
  ad_status st = check_cfg(t, "nn_opt_step_diff", cfg, n, w, g);
  if (st) return st;
  if (!g || !w_new) {
    ad__fail(t, AD_ERR_NULL, "nn_opt_step_diff: gradients or w_new are NULL");
    return AD_ERR_NULL;
  }
  if ((uses_m(cfg->kind) || uses_v(cfg->kind)) && (!s || s->n != n || !s->on_tape)) {
    ad__fail(t, AD_ERR_STATE,
             "nn_opt_step_diff: state not made by nn_opt_state_init_tape for these %d "
             "parameters",
             n);
    return AD_ERR_STATE;
  }
  hyper h = defaults(cfg);
  int64_t k = s ? ++s->step : 1;
  double c1 = 1 - pow(h.b1, (double)k), c2 = 1 - pow(h.b2, (double)k);
  for (int i = 0; i < n; i++) {
    hval lr = pick(h.lr, cfg->lr_var, cfg->lr_vars, i);
    hval wd = pick(h.wd, cfg->weight_decay_var, cfg->weight_decay_vars, i);
    ad_tensor *gi = g[i];
    if (!ad_same_shape(gi, w[i])) gi = ad_reshape(t, gi, w[i]->ndim, w[i]->shape);
    if (cfg->kind == NN_OPT_SGD && !sgd_unfused) {
      /* One fused op: a recorded unroll keeps w' only, not wd*w and g+wd*w. */
      w_new[i] = sgd_update(t, w[i], gi, lr, wd);
      continue;
    }
    if ((cfg->kind == NN_OPT_MOMENTUM || cfg->kind == NN_OPT_NESTEROV) && !sgd_unfused) {
      /* Two fused ops (three for Nesterov), no other temporaries. */
      hval none = {0, NULL};
      s->m[i] = mom_buffer(t, s->m[i], gi, w[i], h.mu, cfg->momentum_var, 1, 0, wd);
      ad_tensor *stp = s->m[i];
      if (stp && cfg->kind == NN_OPT_NESTEROV)
        stp = mom_buffer(t, s->m[i], gi, w[i], h.mu, cfg->momentum_var, 1, 0, wd);
      w_new[i] = stp ? sgd_update(t, w[i], stp, lr, none) : NULL;
      if (!w_new[i]) break;
      continue;
    }
    int has_wd = wd.v || wd.c != 0;
    ad_tensor *g0 = gi; /* before L2 decay: the fused Adam moments add it themselves */
    int fused_adam = !sgd_unfused && (cfg->kind == NN_OPT_ADAM || cfg->kind == NN_OPT_ADAMW);
    if (has_wd && cfg->kind != NN_OPT_ADAMW && !fused_adam) gi = ad_add(t, gi, times(t, wd, w[i]));
    ad_tensor *step = NULL;
    switch (cfg->kind) {
    case NN_OPT_SGD:
      step = gi;
      break;
    case NN_OPT_MOMENTUM:
    case NN_OPT_NESTEROV: {
      ad_tensor *mm =
          cfg->momentum_var ? ad_mul(t, cfg->momentum_var, s->m[i]) : ad_scale(t, s->m[i], h.mu);
      s->m[i] = ad_add(t, mm, gi);
      if (cfg->kind == NN_OPT_MOMENTUM) {
        step = s->m[i];
      } else {
        ad_tensor *look =
            cfg->momentum_var ? ad_mul(t, cfg->momentum_var, s->m[i]) : ad_scale(t, s->m[i], h.mu);
        step = ad_add(t, gi, look);
      }
      break;
    }
    case NN_OPT_ADAM:
    case NN_OPT_ADAMW: {
      if (!sgd_unfused) {
        /* The moments as two fused ops from the raw g (Adam's decay inside
         * them, AdamW's after); the same bits as the composed ones. */
        hval dec = cfg->kind == NN_OPT_ADAM ? wd : (hval){0, NULL};
        s->m[i] = mom_buffer(t, s->m[i], g0, w[i], h.b1, NULL, 1 - h.b1, 0, dec);
        s->v[i] = mom_buffer(t, s->v[i], g0, w[i], h.b2, NULL, 1 - h.b2, 1, dec);
        if (!s->m[i] || !s->v[i]) return ad_tape_status(t);
        hval dw = cfg->kind == NN_OPT_ADAMW ? wd : (hval){0, NULL};
        w_new[i] = adam_update(t, w[i], s->m[i], s->v[i], lr, dw, c1, c2, h.eps);
        if (!w_new[i]) return ad_tape_status(t);
        continue;
      } else {
        s->m[i] = ad_axpy(t, ad_scale(t, s->m[i], h.b1), 1 - h.b1, gi);
        s->v[i] = ad_axpy(t, ad_scale(t, s->v[i], h.b2), 1 - h.b2, ad_mul(t, gi, gi));
      }
      ad_tensor *mhat = ad_scale(t, s->m[i], 1 / c1), *vhat = ad_scale(t, s->v[i], 1 / c2);
      step = ad_div(t, mhat, ad_add_scalar(t, safe_sqrt(t, vhat), h.eps));
      if (has_wd && cfg->kind == NN_OPT_ADAMW) step = ad_add(t, step, times(t, wd, w[i]));
      break;
    }
    case NN_OPT_RMSPROP:
      s->v[i] = ad_axpy(t, ad_scale(t, s->v[i], h.alpha), 1 - h.alpha, ad_mul(t, gi, gi));
      step = ad_div(t, gi, ad_add_scalar(t, safe_sqrt(t, s->v[i]), h.eps));
      break;
    }
    w_new[i] = lr.v ? ad_sub(t, w[i], times(t, lr, step)) : ad_axpy(t, w[i], -lr.c, step);
  }
  return ad_tape_status(t);
}
