/* optim.c — SGD, momentum (heavy ball, Nesterov), Adam, AdamW, RMSprop, in
 * two modes. The differentiable step is written with public tape ops, so a
 * hypergradient flows through T steps of it to the learning rate, momentum
 * and weight decay (numbers or tape variables) and to the initial weights.
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

#include <math.h>
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
static ad_tensor *safe_sqrt(ad_tape *t, ad_tensor *x) {
  ad_tensor *mask = ad_empty(t, x->dtype, x->ndim, x->shape);
  if (!mask) return NULL;
  for (int64_t i = 0; i < x->size; i++) ad_set(mask, i, ad_get(x, i) > 0);
  ad_tensor *one = ad_scalar(t, x->dtype, 1.0), *zero = ad_scalar(t, x->dtype, 0.0);
  return ad_where(t, mask, ad_sqrt(t, ad_where(t, mask, x, one)), zero);
}

/* ---- the fused SGD step:  w' = w - a (g + d w),  a = lr, d = weight decay
 * (numbers, or tape variables of size 1 or shaped like w). Its rule:
 *   dw = G (1 - a d)      dg = -a G
 *   da = -sum? (g + d w) G        dd = -sum? a w G
 * ("sum?" where the variable is a broadcast scalar), written with public ops
 * so the step can be differentiated twice (unrolled hypergradients do). */
static ad_tensor *scale_by(ad_tape *t, ad_tensor *var, double c, ad_tensor *x) {
  return var ? ad_mul(t, var, x) : ad_scale(t, x, c);
}
static ad_tensor *sum_to(ad_tape *t, ad_tensor *x, const ad_tensor *like) {
  return x && like->size != x->size ? ad_reshape(t, ad_sum(t, x), like->ndim, like->shape) : x;
}
/* The node keeps a = a.c and d = *(double *)a.extra; a.ta / a.tb say whether
 * inputs 2 / 3 (the variables) are present; absent ones are NULL slots. */
static void vjp_sgd(ad_tape *t, const ad_node *n, ad_tensor *G, ad_tensor **gin, const int *need) {
  ad_tensor *w = n->in[0], *g = n->in[1];
  ad_tensor *av = n->a.ta ? n->in[2] : NULL, *dv = n->a.tb ? n->in[n->a.ta ? 3 : 2] : NULL;
  double a = n->a.c, d = *(const double *)n->a.extra;
  int ia = n->a.ta ? 2 : -1, id = n->a.tb ? (n->a.ta ? 3 : 2) : -1;
  /* With a number for a (the common case) each product is one pass: axpy
   * and scale fold the constant in. */
  if (need[0]) {
    if (!av && !dv)
      gin[0] = ad_scale(t, G, 1 - a * d);
    else if (!av)
      gin[0] = ad_axpy(t, G, -a, ad_mul(t, dv, G));
    else
      gin[0] = ad_sub(t, G, ad_mul(t, av, scale_by(t, dv, d, G)));
  }
  if (need[1]) gin[1] = av ? ad_neg(t, ad_mul(t, av, G)) : ad_scale(t, G, -a);
  if (ia >= 0 && need[ia]) {
    ad_tensor *step = dv ? ad_add(t, g, ad_mul(t, dv, w)) : ad_axpy(t, g, d, w);
    gin[ia] = sum_to(t, ad_neg(t, ad_mul(t, step, G)), av);
  }
  if (id >= 0 && need[id]) {
    ad_tensor *wg = ad_mul(t, w, G);
    gin[id] = sum_to(t, av ? ad_neg(t, ad_mul(t, av, wg)) : ad_scale(t, wg, -a), dv);
  }
}
/* What vjp_sgd reads (for ad_tape_compact), per gradient, the optional
 * variables at their slots: dw reads a and d; dg reads a; da reads g, w
 * and d; dd reads w and a. g is read only for da: an unroll with a number
 * for the learning rate keeps w' and w, not the gradient. */
static unsigned saves_sgd(const ad_node *n) {
  int ia = n->a.ta ? 2 : -1, id = n->a.tb ? (n->a.ta ? 3 : 2) : -1;
  unsigned A = ia >= 0 ? AD_S_IN(ia) : 0, D = id >= 0 ? AD_S_IN(id) : 0;
  unsigned r[4] = {A | D, A, 0, 0};
  if (ia >= 0) r[ia] = AD_S_IN(0) | AD_S_IN(1) | D;
  if (id >= 0) r[id] = AD_S_IN(0) | A;
  return AD_SAVES(r[0], r[1], r[2], r[3]);
}
static const ad_op_def OP_SGD = {
    "sgd_step", vjp_sgd, NULL, {.of = saves_sgd, .extra_bytes = sizeof(double)}};

#define DEF_SGD_FWD(T, S)                                                                          \
  static void sgd_fwd_##S(const ad_tensor *w, const ad_tensor *g, const ad_tensor *av, double a,   \
                          const ad_tensor *dv, double d, ad_tensor *out) {                         \
    const T *W = (const T *)w->data, *Gr = (const T *)g->data;                                     \
    T *O = (T *)out->data;                                                                         \
    if (!av && !dv) {                                                                              \
      T ta = (T)a, td = (T)(1 - a * d);                                                            \
      for (int64_t j = 0; j < w->size; j++) O[j] = td * W[j] - ta * Gr[j];                         \
      return;                                                                                      \
    }                                                                                              \
    const T *A = av ? (const T *)av->data : NULL, *D = dv ? (const T *)dv->data : NULL;            \
    int64_t sa = av && av->size > 1, sd = dv && dv->size > 1;                                      \
    for (int64_t j = 0; j < w->size; j++) {                                                        \
      T aj = A ? A[j * sa] : (T)a, dj = D ? D[j * sd] : (T)d;                                      \
      O[j] = W[j] - aj * (Gr[j] + dj * W[j]);                                                      \
    }                                                                                              \
  }
DEF_SGD_FWD(float, f32)
DEF_SGD_FWD(double, f64)

static ad_tensor *sgd_update(ad_tape *t, ad_tensor *w, ad_tensor *g, hval lr, hval wd) {
  ad_tensor *av = (ad_tensor *)lr.v, *dv = (ad_tensor *)wd.v;
  if ((av && av->dtype != w->dtype) || (dv && dv->dtype != w->dtype))
    return ad__fail(t, AD_ERR_DTYPE, "nn_opt_step_diff: hyperparameter variables must be %s",
                    ad_dtype_name(w->dtype));
  ad_tensor *out = ad_empty(t, w->dtype, w->ndim, w->shape);
  double *dstore = ad_arena_alloc(t, sizeof(double));
  if (!out || !dstore) return NULL;
  *dstore = wd.c;
  if (w->dtype == AD_F32)
    sgd_fwd_f32(w, g, av, lr.c, dv, wd.c, out);
  else
    sgd_fwd_f64(w, g, av, lr.c, dv, wd.c, out);
  ad_tensor *in[4] = {w, g, NULL, NULL};
  int k = 2;
  if (av) in[k++] = av;
  if (dv) in[k++] = dv;
  ad_node *nd = ad__record(t, &OP_SGD, out, k, in);
  if (nd) {
    nd->a.c = lr.c;
    nd->a.extra = dstore;
    nd->a.ta = av != NULL;
    nd->a.tb = dv != NULL;
  }
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
    if (cfg->kind == NN_OPT_SGD) {
      /* One fused op: a recorded unroll keeps w' only, not wd*w and g+wd*w. */
      w_new[i] = sgd_update(t, w[i], gi, lr, wd);
      continue;
    }
    int has_wd = wd.v || wd.c != 0;
    if (has_wd && cfg->kind != NN_OPT_ADAMW) gi = ad_add(t, gi, times(t, wd, w[i]));
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
      s->m[i] = ad_axpy(t, ad_scale(t, s->m[i], h.b1), 1 - h.b1, gi);
      s->v[i] = ad_axpy(t, ad_scale(t, s->v[i], h.b2), 1 - h.b2, ad_mul(t, gi, gi));
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
