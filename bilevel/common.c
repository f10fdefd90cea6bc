/* common.c — the helpers of bl_internal.h: what every hypergradient method
 * shares, so each method file reads like its formula. */
#include "bl_internal.h"
#include "autodiff/ad_simd.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* ---------------------------------------------------------------- errors */

ad_status bl__fail(bl_run *r, ad_status s, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  const char *who = r && r->who ? r->who : "bilevel";
  if (r && r->t)
    ad__fail(r->t, s, "%s: %s", who, msg);
  else
    ad__set_last(s, "%s: %s", who, msg);
  return s;
}

ad_status bl__nn(bl_run *r, ad_status s) {
  if (s == AD_OK) return AD_OK;
  /* nn_ calls given a tape already put the error there; the others left it
   * in the thread-local message. Keep the first error on the tape. */
  if (ad_tape_status(r->t) != AD_OK) return ad_tape_status(r->t);
  return bl__fail(r, s, "%s", ad_last_error());
}

double bl__now(void) {
  struct timespec ts;
  if (timespec_get(&ts, TIME_UTC) != TIME_UTC) return 0;
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double bl__lr(const nn_opt_cfg *cfg) {
  if (cfg->lr_vars && cfg->lr_vars[0]) return ad_get(cfg->lr_vars[0], 0);
  if (cfg->lr_var) return ad_item(cfg->lr_var);
  return cfg->lr != 0 || (cfg->set & NN_OPT_SET_LR) ? cfg->lr : 0.01;
}

ad_status bl__alpha(bl_run *r, double *alpha) {
  if (r->o.alpha != 0) {
    *alpha = r->o.alpha;
    return AD_OK;
  }
  if (!r->lib)
    return bl__fail(r, AD_ERR_ARG,
                    "step '%s' has no learning rate to default alpha to: set o->alpha "
                    "(0 < alpha < 2 / lambda_max(H))",
                    bl__step_name(r));
  *alpha = bl__lr(&r->opt.cfg);
  return AD_OK;
}

/* ---------------------------------------------------------------- entry, exit */

static ad_status check_tensor_list(bl_run *r, const char *what, int n, ad_tensor *const *xs) {
  if (n <= 0 || n > NN_MAX_PARAMS)
    return bl__fail(r, AD_ERR_ARG, "%s: %d tensors (1..%d allowed)", what, n, NN_MAX_PARAMS);
  if (!xs) return bl__fail(r, AD_ERR_NULL, "%s is NULL", what);
  for (int i = 0; i < n; i++)
    if (!xs[i]) return bl__fail(r, AD_ERR_NULL, "%s[%d] is NULL", what, i);
  return AD_OK;
}

static ad_status check_problem(bl_run *r, const bl_problem *p, ad_tensor *const *hg,
                               int64_t min_steps) {
  if (!p) return bl__fail(r, AD_ERR_NULL, "problem is NULL");
  if (!p->train_loss || !p->val_loss)
    return bl__fail(r, AD_ERR_NULL, "train_loss or val_loss callback is NULL");
  ad_status s = check_tensor_list(r, "w0", p->n_w, p->w0);
  if (!s) s = check_tensor_list(r, "lam", p->n_lam, p->lam);
  if (s) return s;
  for (int i = 1; i < p->n_w; i++)
    if (p->w0[i]->dtype != p->w0[0]->dtype)
      return bl__fail(r, AD_ERR_DTYPE, "w0[%d] is %s but w0[0] is %s", i,
                      ad_dtype_name(p->w0[i]->dtype), ad_dtype_name(p->w0[0]->dtype));
  if (!hg) return bl__fail(r, AD_ERR_NULL, "hg (the output) is NULL");
  for (int k = 0; k < p->n_lam; k++) {
    if (!hg[k]) return bl__fail(r, AD_ERR_NULL, "hg[%d] is NULL", k);
    if (!ad_same_shape(hg[k], p->lam[k])) {
      char a[96], b[96];
      return bl__fail(r, AD_ERR_SHAPE, "hg[%d] is %s but lam[%d] is %s", k,
                      ad_shape_str(hg[k], a, sizeof a), k, ad_shape_str(p->lam[k], b, sizeof b));
    }
  }
  /* A non-finite hyperparameter is the caller's input, not a divergence:
   * say so here, before the inner run turns it into a NaN loss that would
   * be blamed on the learning rate. */
  for (int k = 0; k < p->n_lam; k++) {
    if (ad__all_finite(p->lam[k])) continue; /* one vectorized pass; search only on failure */
    for (int64_t j = 0; j < p->lam[k]->size; j++) {
      double v = ad_get(p->lam[k], j);
      if (!isfinite(v))
        return bl__fail(r, AD_ERR_ARG, "lam[%d] element %lld is %g: hyperparameters must be finite",
                        k, (long long)j, v);
    }
  }
  if (p->inner_steps < min_steps)
    return bl__fail(r, AD_ERR_ARG, "inner_steps is %lld; this method needs at least %lld",
                    (long long)p->inner_steps, (long long)min_steps);
  return AD_OK;
}

/* lam's leaves for a call: views of the caller's tensors, not copies, when
 * the tape is rewound at the end of the call (no o.keep_tape). No method
 * writes the caller's lam during a call (perturbations go to copies), and
 * a copy would hold another lam-sized buffer (as large as w, for
 * per-parameter hyperparameters) through the whole call; in an unroll that
 * is a w-sized share of the peak. A kept tape outlives the call and lam may
 * be updated in place afterwards, so it gets copies, as ad_detach makes. */
static ad_tensor *lam_leaf(ad_tape *t, ad_tensor *x, int share) {
  if (!share || !(x->flags & AD_FLAG_HEAP)) return bl__leaf_view(t, x);
  ad_tensor *v = ad__view(t, x, x->ndim, x->shape);
  if (!v) return NULL;
  v->flags &= ~(unsigned)AD_FLAG_OP; /* a leaf, as ad_detach's */
  ad_requires_grad(v, 1);
  return v;
}

ad_status bl__begin(bl_run *r, const char *who, ad_tape *t, const bl_problem *p, const bl_opts *o,
                    ad_tensor *const *hg, int64_t min_steps) {
  memset(r, 0, sizeof *r);
  r->who = who;
  r->t = t;
  r->p = p;
  if (o) r->o = *o;
  r->t0 = bl__now();
  if (!t) return bl__fail(r, AD_ERR_NULL, "tape is NULL");
  if (ad_tape_status(t) != AD_OK) return ad_tape_status(t); /* its message stays */
  ad_status s = check_problem(r, p, hg, min_steps);
  if (s) return s;
  ad_arena_stats as;
  ad_arena_stats_get(t, &as);
  r->used0 = as.used;
  r->mark = ad_mark(t);
  r->recording = ad_set_recording(t, 1);
  r->begun = 1;
  ad_arena_reset_peak(t);
  for (int k = 0; k < p->n_lam; k++) {
    r->lam[k] = lam_leaf(t, p->lam[k], !r->o.keep_tape);
    if (!r->lam[k]) return ad_tape_status(t);
  }
  bl__cfg_map(p, r->lam, &r->opt);
  r->val_at = p->inner_steps;
  return bl__step_resolve(r, p->w0);
}

void bl__rewind(bl_run *r, ad_marker m) {
  if (!r->o.keep_tape) ad_rewind(r->t, m);
}

/* A failed call leaves nothing behind, kept tape or not. */
static void end_rewind(bl_run *r, ad_status s) {
  if (s)
    ad_rewind(r->t, r->mark);
  else
    bl__rewind(r, r->mark);
}

ad_status bl__end(bl_run *r, ad_status s, bl_stats *st) {
  if (r->begun) {
    ad_arena_stats as;
    ad_arena_stats_get(r->t, &as);
    r->st.peak_arena_bytes = as.peak > r->used0 ? as.peak - r->used0 : 0;
    end_rewind(r, s);
    ad_set_recording(r->t, r->recording);
  }
  r->st.seconds = bl__now() - r->t0;
  if (st) *st = r->st;
  return s;
}

/* ---------------------------------------------------------------- configs */

static ad_tensor *map_one(const bl_problem *p, ad_tensor *const *lam, ad_tensor *x) {
  if (!x) return NULL;
  for (int k = 0; k < p->n_lam; k++)
    if (x == p->lam[k]) return lam[k];
  return x;
}

void bl__cfg_map(const bl_problem *p, ad_tensor *const *lam, bl_cfg_map *m) {
  m->cfg = p->opt;
  m->cfg.lr_var = map_one(p, lam, p->opt.lr_var);
  m->cfg.momentum_var = map_one(p, lam, p->opt.momentum_var);
  m->cfg.weight_decay_var = map_one(p, lam, p->opt.weight_decay_var);
  if (p->opt.lr_vars) {
    for (int i = 0; i < p->n_w; i++) m->lr_vars[i] = map_one(p, lam, p->opt.lr_vars[i]);
    m->cfg.lr_vars = m->lr_vars;
  }
  if (p->opt.weight_decay_vars) {
    for (int i = 0; i < p->n_w; i++) m->wd_vars[i] = map_one(p, lam, p->opt.weight_decay_vars[i]);
    m->cfg.weight_decay_vars = m->wd_vars;
  }
}

/* ---------------------------------------------------------------- tensors */

ad_tensor *bl__copy(ad_tape *t, const ad_tensor *x) {
  if (!x) return ad__fail(t, AD_ERR_NULL, "bl__copy: tensor is NULL");
  ad_tensor *c = ad_empty(t, x->dtype, x->ndim, x->shape);
  if (c) memcpy(c->data, x->data, (size_t)x->size * ad_dtype_size(x->dtype));
  return c;
}

ad_tensor *bl__leaf(ad_tape *t, const ad_tensor *x) {
  ad_tensor *c = bl__copy(t, x);
  if (c) ad_requires_grad(c, 1);
  return c;
}

ad_tensor *bl__leaf_view(ad_tape *t, const ad_tensor *x) {
  ad_tensor *c = ad_detach(t, x);
  if (c) ad_requires_grad(c, 1);
  return c;
}

static ad_status make_list(bl_run *r, int n, ad_tensor *const *src, ad_tensor **out, int kind) {
  for (int i = 0; i < n; i++) {
    out[i] = kind == 0   ? bl__copy(r->t, src[i])
             : kind == 1 ? bl__leaf(r->t, src[i])
                         : ad_zeros_like(r->t, src[i]);
    if (!out[i]) return ad_tape_status(r->t);
  }
  return AD_OK;
}

ad_status bl__copy_new(bl_run *r, int n, ad_tensor *const *src, ad_tensor **out) {
  return make_list(r, n, src, out, 0);
}
ad_status bl__leaf_new(bl_run *r, int n, ad_tensor *const *src, ad_tensor **out) {
  return make_list(r, n, src, out, 1);
}
ad_status bl__zeros_new(bl_run *r, int n, ad_tensor *const *like, ad_tensor **out) {
  return make_list(r, n, like, out, 2);
}

ad_status bl__w0_copy(bl_run *r, ad_tensor **w) {
  return bl__leaf_new(r, r->p->n_w, r->p->w0, w);
}

ad_status bl__write_hg(bl_run *r, ad_tensor *const *g, ad_tensor *const *hg) {
  for (int k = 0; k < r->p->n_lam; k++)
    if (!g[k]) return bl__fail(r, AD_ERR_STATE, "internal: hypergradient %d missing", k);
  /* Nothing is written unless every component is finite. */
  ad_status s = bl__check_finite(r, r->p->n_lam, g, "the hypergradient", "the end");
  if (s) return s;
  for (int k = 0; k < r->p->n_lam; k++) {
    s = ad_copy_values(hg[k], g[k]);
    if (s) return bl__nn(r, s);
  }
  return AD_OK;
}

/* ---------------------------------------------------------------- lists as vectors */

/* Independent lanes, so the compiler vectorizes the sums without
 * reassociating anything (the order is fixed: same bits every run); f32
 * lanes are flushed into a double every FLUSH elements so long lists keep
 * double accuracy. */
enum { DOT_LANES = 16, DOT_FLUSH = 4096 };

static double dot_f32(const float *a, const float *b, int64_t n) {
  double total = 0;
  for (int64_t s = 0; s < n; s += DOT_FLUSH) {
    int64_t e = s + DOT_FLUSH < n ? s + DOT_FLUSH : n, j = s;
    float acc[DOT_LANES] = {0};
    for (; j + DOT_LANES <= e; j += DOT_LANES)
      for (int l = 0; l < DOT_LANES; l++) acc[l] += a[j + l] * b[j + l];
    for (; j < e; j++) acc[0] += a[j] * b[j];
    for (int l = 0; l < DOT_LANES; l++) total += acc[l];
  }
  return total;
}

static double dot_f64(const double *a, const double *b, int64_t n) {
  double acc[8] = {0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; l++) acc[l] += a[j + l] * b[j + l];
  for (; j < n; j++) acc[0] += a[j] * b[j];
  double total = 0;
  for (int l = 0; l < 8; l++) total += acc[l];
  return total;
}

double bl__dot(int n, ad_tensor *const *a, ad_tensor *const *b) {
  double s = 0;
  for (int i = 0; i < n; i++) {
    if (!a[i] || !b[i]) continue;
    const ad_tensor *x = a[i], *y = b[i];
    int64_t m = x->size < y->size ? x->size : y->size;
    if (x->dtype == AD_F64 && y->dtype == AD_F64)
      s += dot_f64(AD_D(x), AD_D(y), m);
    else if (x->dtype == AD_F32 && y->dtype == AD_F32)
      s += dot_f32(AD_F(x), AD_F(y), m);
    else
      for (int64_t j = 0; j < m; j++) s += ad_get(x, j) * ad_get(y, j);
  }
  return s;
}

double bl__norm(int n, ad_tensor *const *a) {
  return sqrt(bl__dot(n, a, a));
}

/* y += c x over [lo, hi) of one same-typed pair, threaded (ad__par_for):
 * the lean unroll adds each chunk's weight-sized part of the
 * hypergradient, and every element is its own c * x + y, so the split does
 * not change the bits. y and x may be the same tensor (no restrict). */
typedef struct {
  void *y;
  const void *x;
  double c;
  int f64;
} axpy_job;

AD_WIDE_PASS(
    axpy_range, const axpy_job *a = ctx; (void)part; if (a->f64) {
      double *p = a->y, c = a->c;
      const double *q = a->x;
      for (int64_t j = lo; j < hi; j++) p[j] += c * q[j];
    } else {
      float *p = a->y, cf = (float)a->c;
      const float *q = a->x;
      for (int64_t j = lo; j < hi; j++) p[j] += cf * q[j];
    })

enum { AXPY_GRAIN = 16384 };

void bl__axpy(int n, ad_tensor *const *y, double c, ad_tensor *const *x) {
  for (int i = 0; i < n; i++) {
    if (!y[i] || !x[i]) continue;
    int64_t m = y[i]->size < x[i]->size ? y[i]->size : x[i]->size;
    int f64 = y[i]->dtype == AD_F64 && x[i]->dtype == AD_F64;
    if (f64 || (y[i]->dtype == AD_F32 && x[i]->dtype == AD_F32)) {
      axpy_job a = {y[i]->data, x[i]->data, c, f64};
      ad__par_for(m, AXPY_GRAIN, axpy_range, &a);
    } else {
      for (int64_t j = 0; j < m; j++) ad_set(y[i], j, ad_get(y[i], j) + c * ad_get(x[i], j));
    }
  }
}

void bl__scale(int n, ad_tensor *const *y, double c) {
  for (int i = 0; i < n; i++) {
    if (!y[i]) continue;
    if (y[i]->dtype == AD_F64) {
      double *p = AD_D(y[i]);
      for (int64_t j = 0; j < y[i]->size; j++) p[j] *= c;
    } else {
      float *p = AD_F(y[i]);
      float cf = (float)c;
      for (int64_t j = 0; j < y[i]->size; j++) p[j] *= cf;
    }
  }
}

void bl__zero(int n, ad_tensor *const *y) {
  for (int i = 0; i < n; i++)
    if (y[i]) memset(y[i]->data, 0, (size_t)y[i]->size * ad_dtype_size(y[i]->dtype));
}

void bl__copy_list(int n, ad_tensor *const *dst, ad_tensor *const *src) {
  for (int i = 0; i < n; i++) {
    if (!dst[i]) continue;
    if (!src[i])
      bl__zero(1, &dst[i]);
    else
      ad_copy_values(dst[i], src[i]);
  }
}

void bl__lerp(int n, ad_tensor *const *y, ad_tensor *const *a, ad_tensor *const *c, double b) {
  for (int i = 0; i < n; i++) {
    int64_t m = y[i]->size;
    if (y[i]->dtype == AD_F32 && a[i]->dtype == AD_F32 && c[i]->dtype == AD_F32) {
      float *Y = AD_F(y[i]), fb = (float)b, fa = (float)(1 - b);
      const float *A = AD_F(a[i]), *C = AD_F(c[i]);
      for (int64_t j = 0; j < m; j++) Y[j] = fa * A[j] + fb * C[j];
    } else if (y[i]->dtype == AD_F64 && a[i]->dtype == AD_F64 && c[i]->dtype == AD_F64) {
      double *Y = AD_D(y[i]);
      const double *A = AD_D(a[i]), *C = AD_D(c[i]);
      for (int64_t j = 0; j < m; j++) Y[j] = (1 - b) * A[j] + b * C[j];
    } else {
      for (int64_t j = 0; j < m; j++)
        ad_set(y[i], j, (1 - b) * ad_get(a[i], j) + b * ad_get(c[i], j));
    }
  }
}

ad_tensor *bl__dot_tape(ad_tape *t, int n, ad_tensor *const *a, ad_tensor *const *b) {
  ad_tensor *s = NULL;
  for (int i = 0; i < n; i++) {
    ad_tensor *bi = b[i];
    if (a[i] && bi && !ad_same_shape(a[i], bi)) bi = ad_reshape(t, bi, a[i]->ndim, a[i]->shape);
    ad_tensor *d = ad_dot(t, a[i], bi);
    s = s ? ad_add(t, s, d) : d;
  }
  return s;
}

/* ---------------------------------------------------------------- the inner trajectory */

ad_status bl__check_loss(bl_run *r, const ad_tensor *L, const char *which, int64_t step) {
  if (ad_tape_status(r->t) != AD_OK) return ad_tape_status(r->t);
  if (!L) return bl__fail(r, AD_ERR_NULL, "%s returned NULL at step %lld", which, (long long)step);
  if (L->size != 1) {
    char s[96];
    return bl__fail(r, AD_ERR_SHAPE, "%s returned %s at step %lld; a scalar is needed", which,
                    ad_shape_str(L, s, sizeof s), (long long)step);
  }
  return AD_OK;
}

/* The training loss must be finite at every inner step: a diverging run
 * (too large a learning rate) is reported where it broke, not as a NaN
 * hypergradient. One scalar read per step. */
static ad_status check_train(bl_run *r, const ad_tensor *L, int64_t step) {
  ad_status st = bl__check_loss(r, L, "train_loss", step);
  if (st) return st;
  double v = ad_item(L);
  if (!isfinite(v))
    return bl__fail(r, AD_ERR_NUMERIC,
                    "train_loss is %g at inner step %lld: the inner run diverged (step '%s'; "
                    "lower its learning rate)",
                    v, (long long)step, bl__step_name(r));
  return AD_OK;
}

ad_status bl__run_inplace(bl_run *r, ad_tensor *const *lam, ad_tensor *const *w, bl_state *s,
                          int64_t from, int64_t to) {
  const bl_problem *p = r->p;
  ad_tape *t = r->t;
  ad_tensor *g[NN_MAX_PARAMS];
  for (int i = 0; i < p->n_w; i++) ad_requires_grad(w[i], 1);
  for (int64_t k = from; k < to; k++) {
    ad_marker m = ad_mark(t);
    ad_tensor *L = p->train_loss(t, w, lam, k, p->ctx);
    ad_status st = check_train(r, L, k);
    if (!st) st = ad_grad(t, 1, &L, NULL, p->n_w, w, g, 0);
    if (!st) st = bl__step_inplace(r, lam, w, s, g, k);
    bl__rewind(r, m);
    if (st) return st;
    r->st.inner_steps++;
  }
  if (to > from) {
    char where[64];
    snprintf(where, sizeof where, "inner step %lld", (long long)(to - 1));
    ad_status st = bl__check_finite(r, p->n_w, w, "the inner iterate", where);
    if (!st) st = bl__check_finite(r, s->n, s->b, "the step's state", where);
    if (st) return st;
  }
  return AD_OK;
}

ad_status bl__step_recorded(bl_run *r, ad_tensor *const *lam, ad_tensor *const *w, bl_state *s,
                            int64_t step, ad_tensor **g_out, ad_tensor **w_new) {
  const bl_problem *p = r->p;
  ad_tape *t = r->t;
  ad_tensor *g[NN_MAX_PARAMS];
  ad_tensor *L = p->train_loss(t, w, lam, step, p->ctx);
  ad_status st = check_train(r, L, step);
  /* g = grad_w L_train, recorded: the step's own derivative needs it. */
  if (!st) st = ad_grad(t, 1, &L, NULL, p->n_w, w, g, AD_GRAD_RECORD);
  /* w_new is not scanned here: the next step's training loss, or L_val at
   * the end, is checked and would be NaN or Inf too, and the scan would
   * cost a pass over w per recorded step. */
  if (!st) st = bl__step_call(r, lam, w, s, g, step, w_new, s);
  if (st) return st;
  if (g_out)
    for (int i = 0; i < p->n_w; i++) g_out[i] = g[i];
  r->st.inner_steps++;
  return AD_OK;
}

ad_status bl__run_recorded(bl_run *r, ad_tensor *const *lam, ad_tensor *const *w_in, bl_state *s,
                           int64_t from, int64_t to, ad_tensor **w_out) {
  int n = r->p->n_w;
  ad_tensor *w[NN_MAX_PARAMS], *wn[NN_MAX_PARAMS];
  for (int i = 0; i < n; i++) w[i] = w_in[i];
  for (int64_t k = from; k < to; k++) {
    ad_status st = bl__step_recorded(r, lam, w, s, k, NULL, wn);
    if (st) return st;
    for (int i = 0; i < n; i++) w[i] = wn[i];
  }
  for (int i = 0; i < n; i++) w_out[i] = w[i];
  return AD_OK;
}

ad_status bl__step_vjp(bl_run *r, ad_tensor *const *w, const bl_state *s, int64_t step,
                       ad_tensor *const *a, ad_tensor *const *as, ad_tensor **glam, ad_tensor **gw,
                       ad_tensor **gs) {
  const bl_problem *p = r->p;
  int n = p->n_w, n_lam = p->n_lam;
  ad_tensor *wl[NN_MAX_PARAMS], *wn[NN_MAX_PARAMS];
  bl_state s0 = {0}, s1 = {0};
  ad_status st = bl__leaf_new(r, n, w, wl);
  if (!st) st = bl__state_copy(r, &s0, s, BL_STATE_LEAF);
  if (st) return st;
  s1 = s0;
  st = bl__step_recorded(r, r->lam, wl, &s1, step, NULL, wn);
  if (st) return st;
  r->st.inner_steps--; /* a re-evaluation, not a step of the trajectory */
  /* outputs: w_new and the new state's buffers; inputs: lam, w, old state */
  ad_tensor *outs[NN_MAX_PARAMS + BL_MAX_STATE], *seeds[NN_MAX_PARAMS + BL_MAX_STATE];
  ad_tensor *ins[2 * NN_MAX_PARAMS + BL_MAX_STATE], *grads[2 * NN_MAX_PARAMS + BL_MAX_STATE];
  int n_out = 0, n_in = 0;
  /* Seeds are copies: a rule may hand a seed back as an input's gradient
   * (d(w - c)/dw = I), and callers overwrite their cotangent buffers with
   * the results. */
  for (int i = 0; i < n; i++) {
    outs[n_out] = wn[i];
    seeds[n_out++] = a[i] ? bl__copy(r->t, a[i]) : NULL;
  }
  int ns = bl__state_list(&s1, outs + n_out);
  for (int k = 0; k < ns; k++) seeds[n_out + k] = as && as[k] ? bl__copy(r->t, as[k]) : NULL;
  if (as) n_out += ns; /* no cotangent on the state: leave it out */
  for (int k = 0; k < n_lam; k++) ins[n_in++] = r->lam[k];
  for (int i = 0; i < n; i++) ins[n_in++] = wl[i];
  int ns0 = bl__state_list(&s0, ins + n_in);
  n_in += ns0;
  /* ad_grad takes seeds or NULL for all: give explicit zeros where a
   * cotangent is missing. */
  for (int j = 0; j < n_out; j++)
    if (!seeds[j] && !(seeds[j] = ad_zeros_like(r->t, outs[j]))) return ad_tape_status(r->t);
  st = ad_grad(r->t, n_out, outs, seeds, n_in, ins, grads, 0);
  if (st) return st;
  r->st.hvps++;
  if (glam)
    for (int k = 0; k < n_lam; k++) glam[k] = grads[k];
  if (gw)
    for (int i = 0; i < n; i++) gw[i] = grads[n_lam + i];
  if (gs)
    for (int k = 0; k < ns0; k++) gs[k] = grads[n_lam + n + k];
  return AD_OK;
}

ad_status bl__val_grad(bl_run *r, ad_tensor *const *lam, ad_tensor *const *w, double *val,
                       ad_tensor **gw, ad_tensor **glam) {
  return bl__val_grad_ex(r, lam, w, val, gw, glam, 0);
}

ad_status bl__val_grad_ex(bl_run *r, ad_tensor *const *lam, ad_tensor *const *w, double *val,
                          ad_tensor **gw, ad_tensor **glam, unsigned flags) {
  const bl_problem *p = r->p;
  ad_tape *t = r->t;
  ad_tensor *wl[NN_MAX_PARAMS], *ins[2 * NN_MAX_PARAMS], *grads[2 * NN_MAX_PARAMS];
  /* Detached leaf views: partials at this w, whatever history w carries. */
  for (int i = 0; i < p->n_w; i++) {
    wl[i] = bl__leaf_view(t, w[i]);
    if (!wl[i]) return ad_tape_status(t);
  }
  ad_marker m0 = ad_mark(t);
  ad_tensor *L = p->val_loss(t, wl, lam, -1, p->ctx);
  ad_status st = bl__check_loss(r, L, "val_loss", -1);
  if (st) return st;
  /* BL_VAL_COMPACT: L_val's forward keeps only what its rules read (the
   * pre-activations a rule does not read go before the backward makes its
   * own temporaries). */
  if ((flags & BL_VAL_COMPACT) && ad__compactable(t, m0) && (st = ad_tape_compact(t, m0, 1, &L)))
    return st;
  r->st.val_loss = ad_item(L);
  if (!isfinite(r->st.val_loss))
    return bl__fail(r, AD_ERR_NUMERIC,
                    "val_loss is %g at w_%lld (the iterate after inner step %lld)", r->st.val_loss,
                    (long long)r->val_at, (long long)(r->val_at - 1));
  if (val) *val = r->st.val_loss;
  int n_in = 0;
  if (gw)
    for (int i = 0; i < p->n_w; i++) ins[n_in++] = wl[i];
  if (glam)
    for (int k = 0; k < p->n_lam; k++) ins[n_in++] = lam[k];
  if (n_in == 0) return AD_OK;
  st = ad_grad(t, 1, &L, NULL, n_in, ins, grads, flags & ~(unsigned)BL_VAL_COMPACT);
  if (st) return st;
  int j = 0;
  if (gw)
    for (int i = 0; i < p->n_w; i++) gw[i] = grads[j++];
  if (glam)
    for (int k = 0; k < p->n_lam; k++) glam[k] = grads[j++];
  return AD_OK;
}

ad_status bl__val_value(bl_run *r, ad_tensor *const *lam, ad_tensor *const *w, double *val) {
  ad_marker m = ad_mark(r->t);
  ad_tensor *L = r->p->val_loss(r->t, w, lam, -1, r->p->ctx);
  ad_status st = bl__check_loss(r, L, "val_loss", -1);
  if (!st) {
    r->st.val_loss = ad_item(L);
    if (!isfinite(r->st.val_loss))
      st = bl__fail(r, AD_ERR_NUMERIC,
                    "val_loss is %g at w_%lld (the iterate after inner step %lld)", r->st.val_loss,
                    (long long)r->val_at, (long long)(r->val_at - 1));
    if (val) *val = r->st.val_loss;
  }
  bl__rewind(r, m);
  return st;
}

/* ---------------------------------------------------------------- segments */

ad_status bl__segment_record(bl_run *r, bl_segment *sg, ad_tensor *const *w_from,
                             const bl_state *s_from, int64_t from, int64_t to, int64_t chunk) {
  return bl__segment_record_ex(r, sg, w_from, s_from, from, to, chunk, 0);
}

ad_status bl__segment_record_ex(bl_run *r, bl_segment *sg, ad_tensor *const *w_from,
                                const bl_state *s_from, int64_t from, int64_t to, int64_t chunk,
                                unsigned flags) {
  ad_tape *t = r->t;
  int n = r->p->n_w;
  int64_t len = to - from;
  ad_tensor *tmp[BL_MAX_STATE];
  memset(sg, 0, sizeof *sg);
  /* Default: one step per chunk when steps are compacted (below): the
   * forward kept per step is then about what the rules read, and the
   * backward of one chunk (every temporary of its reverse sweep, held until
   * the chunk is rewound) is the other term of the peak, so the smallest
   * chunk gives the lowest peak; per-chunk bookkeeping is a few leaf views.
   * Uncompacted (a kept tape) the old ceil(len / BL_SEGMENT_CHUNKS). */
  if (chunk <= 0) chunk = r->o.keep_tape ? (len + BL_SEGMENT_CHUNKS - 1) / BL_SEGMENT_CHUNKS : 1;
  if (chunk < 1) chunk = 1;
  sg->from = from;
  sg->to = to;
  sg->chunk = chunk;
  sg->n_chunks = (len + chunk - 1) / chunk;
  sg->n_w = n;
  sg->ns = bl__state_list(s_from, tmp);
  size_t row = (size_t)(n + sg->ns), nc = (size_t)(sg->n_chunks > 0 ? sg->n_chunks : 1);
  sg->marks = ad_arena_alloc(t, sizeof(ad_marker) * nc);
  sg->in = ad_arena_alloc(t, sizeof(ad_tensor *) * row * nc);
  sg->out = ad_arena_alloc(t, sizeof(ad_tensor *) * row * nc);
  if (!sg->marks || !sg->in || !sg->out) return ad_tape_status(t);
  /* The segment starts from copies: the caller's buffers may move on.
   * BL_SEG_LEAN: the caller keeps them as they are while the segment lives,
   * so leaf views do (no weight-sized copy), and the lean reverse keeps no
   * second adjoint buffer. */
  ad_tensor *w[NN_MAX_PARAMS], *wn[NN_MAX_PARAMS];
  bl_state s = {0};
  ad_status st = AD_OK;
  if (flags & BL_SEG_LEAN) {
    s.n = s_from->n;
    /* lam_leaf's sharing views: ad_detach would copy a heap w0 (a full
     * unroll starts from the caller's tensors); the lean path never keeps
     * the tape past the call, so a view is safe. */
    for (int i = 0; i < n && !st; i++)
      if (!(w[i] = lam_leaf(t, w_from[i], 1))) st = ad_tape_status(t);
    for (int j = 0; j < s.n && !st; j++)
      if (!(s.b[j] = lam_leaf(t, s_from->b[j], 1))) st = ad_tape_status(t);
  } else {
    st = bl__leaf_new(r, n, w_from, w);
    if (!st) st = bl__state_copy(r, &s, s_from, BL_STATE_LEAF);
    if (!st) st = bl__zeros_new(r, n, w_from, sg->spare);
    if (!st) st = bl__zeros_new(r, sg->ns, tmp, sg->spare + n);
  }
  for (int64_t k = from; k < to && !st; k++) {
    int64_t c = (k - from) / chunk;
    ad_tensor **in = sg->in + (size_t)c * row, **out = sg->out + (size_t)c * row;
    if ((k - from) % chunk == 0) { /* a chunk starts: remember where, and its leaves */
      sg->marks[c] = ad_mark(t);
      for (int i = 0; i < n; i++) in[i] = w[i];
      bl__state_list(&s, in + n);
    }
    ad_marker ms = ad_mark(t);
    st = bl__step_recorded(r, r->lam, w, &s, k, NULL, wn);
    if (st) break;
    /* Compact the step: of everything it made (the forward, its recorded
     * backward, the update) the reverse pass needs only the graph and the
     * values its derivative rules read, plus w_{k+1} and the new state,
     * which the next step, the chunk bookkeeping and the caller use. This
     * is what makes the recorded unroll hold about what PyTorch's saved
     * tensors hold, not every temporary. The chunk marks (taken at or
     * before ms) stay valid: compaction only moves what follows ms. A
     * step whose graph compaction cannot move (an op holding arena data of
     * undeclared size) is left as it is; a kept tape (o.keep_tape, for
     * inspection) is left whole too. */
    if (!r->o.keep_tape && ad__compactable(t, ms)) {
      ad_tensor *keep[NN_MAX_PARAMS + BL_MAX_STATE];
      for (int i = 0; i < n; i++) keep[i] = wn[i];
      for (int j = 0; j < s.n; j++) keep[n + j] = s.b[j];
      st = ad_tape_compact(t, ms, n + s.n, keep);
      if (st) break;
      for (int i = 0; i < n; i++) wn[i] = keep[i];
      for (int j = 0; j < s.n; j++) s.b[j] = keep[n + j];
    }
    for (int i = 0; i < n; i++) w[i] = wn[i];
    if ((k - from) % chunk != chunk - 1 && k != to - 1) continue;
    /* A chunk ends: its outputs, then the cut — the next chunk starts from
     * leaf views of these values, so its graph does not reach back into
     * this one (ad_detach). */
    for (int i = 0; i < n; i++) out[i] = wn[i];
    bl__state_list(&s, out + n);
    for (int i = 0; i < n && !st; i++)
      if (!(w[i] = bl__leaf_view(t, wn[i]))) st = ad_tape_status(t);
    for (int j = 0; j < s.n && !st; j++)
      if (!(s.b[j] = bl__leaf_view(t, s.b[j]))) st = ad_tape_status(t);
  }
  if (st) return st;
  for (int i = 0; i < n; i++) sg->w_end[i] = w[i];
  sg->s_end = s;
  return AD_OK;
}

/* One chunk's VJP, for both walks back: the seeds `cur` (nv adjoints of
 * the chunk's outputs) swept back to lam and, unless the chunk is the first
 * and its start needs no adjoint (*first), to the chunk's inputs; grads
 * gets n_lam + nv results (lam's first). The lam parts are added into glam:
 * by the sweep itself (ad__grad_acc: each contribution in place as it
 * arrives, a fused rule's straight from its kernel), else here. */
static ad_status chunk_vjp(bl_run *r, const bl_segment *sg, int64_t c, int nv,
                           ad_tensor *const *cur, ad_tensor **grads, unsigned flags, int *first,
                           ad_tensor *const *glam) {
  size_t row = (size_t)(sg->n_w + sg->ns);
  ad_tensor **in = sg->in + (size_t)c * row, **out = sg->out + (size_t)c * row;
  ad_tensor *ins[2 * NN_MAX_PARAMS + BL_MAX_STATE] = {0};
  int n_in = 0, n_lam = r->p->n_lam;
  *first = c == 0 && sg->skip_start_adjoint;
  for (int q = 0; q < n_lam; q++) ins[n_in++] = r->lam[q];
  if (!*first)
    for (int j = 0; j < nv; j++) ins[n_in++] = in[j];
  ad_status st = ad__grad_acc(r->t, nv, out, cur, n_in, ins, grads, flags, n_lam, glam);
  for (int q = 0; q < n_lam && !st; q++)
    if (grads[q] && grads[q] != glam[q]) bl__axpy(1, &glam[q], 1.0, &grads[q]);
  return st;
}

/* The inner steps chunk c covers (the HVPs its VJP counts as). */
static int64_t chunk_steps(const bl_segment *sg, int64_t c) {
  int64_t k0 = sg->from + c * sg->chunk, k1 = k0 + sg->chunk < sg->to ? k0 + sg->chunk : sg->to;
  return k1 - k0;
}

ad_status bl__segment_reverse(bl_run *r, bl_segment *sg, ad_tensor *const *aw, ad_tensor *const *as,
                              ad_tensor *const *glam) {
  int n = sg->n_w, ns = as ? sg->ns : 0, n_lam = r->p->n_lam, nv = n + ns;
  /* Adjoints are double-buffered (the other buffer is sg->spare): a rule
   * may hand its seed back as an input's gradient (d(w - c)/dw = I), so
   * results go to the buffer that is not the seed. */
  ad_tensor *cur[NN_MAX_PARAMS + BL_MAX_STATE], *nxt[NN_MAX_PARAMS + BL_MAX_STATE];
  ad_tensor *grads[2 * NN_MAX_PARAMS + BL_MAX_STATE];
  for (int j = 0; j < nv; j++) {
    cur[j] = j < n ? aw[j] : as[j - n];
    nxt[j] = sg->spare[j];
  }
  ad_status st = AD_OK;
  for (int64_t c = sg->n_chunks - 1; c >= 0 && !st; c--) {
    int first;
    st = chunk_vjp(r, sg, c, nv, cur, grads, 0, &first, glam);
    if (st) break;
    if (!first) {
      bl__copy_list(nv, nxt, grads + n_lam);
      for (int j = 0; j < nv; j++) {
        ad_tensor *tmp = cur[j];
        cur[j] = nxt[j];
        nxt[j] = tmp;
      }
    }
    r->st.hvps += chunk_steps(sg, c);
    bl__rewind(r, sg->marks[c]);
  }
  /* The adjoints end in the caller's buffers. */
  for (int j = 0; j < nv && !st; j++) {
    ad_tensor *dst = j < n ? aw[j] : as[j - n];
    if (cur[j] != dst) ad_copy_values(dst, cur[j]);
  }
  return st;
}

/* Moves the n tensors keep[] (made after m, by unrecorded ops) down to m
 * and frees everything else made after m: ad_tape_compact when the region
 * can be compacted; else (an op holding arena data of undeclared size) by
 * way of heap copies and a rewind. keep[] is updated; NULL entries are
 * skipped. */
static ad_status keep_down(bl_run *r, ad_marker m, int n, ad_tensor **keep) {
  ad_tape *t = r->t;
  ad_tensor *k[3 * NN_MAX_PARAMS + BL_MAX_STATE];
  int nk = 0, at[3 * NN_MAX_PARAMS + BL_MAX_STATE];
  for (int i = 0; i < n; i++)
    if (keep[i]) at[nk] = i, k[nk++] = keep[i];
  if (ad__compactable(t, m)) {
    ad_status st = nk ? ad_tape_compact(t, m, nk, k) : (ad_rewind(t, m), AD_OK);
    if (st) return st;
    for (int j = 0; j < nk; j++) keep[at[j]] = k[j];
    return AD_OK;
  }
  ad_tensor *h[3 * NN_MAX_PARAMS + BL_MAX_STATE] = {0};
  ad_status st = AD_OK;
  for (int j = 0; j < nk && !st; j++) {
    st = ad_tensor_new(&h[j], k[j]->dtype, k[j]->ndim, k[j]->shape);
    if (!st) st = ad_copy_values(h[j], k[j]);
  }
  if (!st) {
    ad_rewind(t, m);
    for (int j = 0; j < nk && !st; j++)
      if (!(keep[at[j]] = bl__copy(t, h[j]))) st = ad_tape_status(t);
  }
  for (int j = 0; j < nk; j++) ad_tensor_free(h[j]);
  return st ? bl__nn(r, st) : AD_OK;
}

ad_status bl__val_keep(bl_run *r, ad_tensor *const *w_end, ad_tensor **aw, ad_tensor **glam) {
  ad_tape *t = r->t;
  int n = r->p->n_w, n_lam = r->p->n_lam;
  ad_marker m = ad_mark(t);
  ad_tensor *gl[NN_MAX_PARAMS], *keep[NN_MAX_PARAMS];
  ad_status st =
      bl__val_grad_ex(r, r->lam, w_end, NULL, aw, gl, AD_GRAD_NULL_UNREACHED | BL_VAL_COMPACT);
  if (st) return st;
  /* glam (zeros) takes a copy of the direct term, as the old path's
   * zeros-then-copy did; unreached, it stays zeros */
  for (int k = 0; k < n_lam; k++)
    if (gl[k]) bl__copy_list(1, &glam[k], &gl[k]);
  for (int i = 0; i < n; i++) keep[i] = aw[i];
  st = keep_down(r, m, n, keep);
  if (st) return st;
  for (int i = 0; i < n; i++)
    if (!(aw[i] = keep[i]) && !(aw[i] = ad_zeros_like(t, w_end[i]))) return ad_tape_status(t);
  return AD_OK;
}

/* Frees chunk c of a lean segment after its VJP, keeping keep[] (NULLs
 * skipped; updated): moved down over it, and — when chunk c-1 can be
 * compacted — the values of chunk c-1's outputs are released too (the
 * leaves of chunk c read them, no rule of chunk c-1 does), so what stays
 * of the walked part is only what the next chunk's rules read. */
static ad_status drop_chunk(bl_run *r, bl_segment *sg, int64_t c, int n, ad_tensor **keep) {
  ad_tape *t = r->t;
  if (c < 1 || !ad__compactable(t, sg->marks[c - 1])) return keep_down(r, sg->marks[c], n, keep);
  size_t row = (size_t)(sg->n_w + sg->ns);
  ad_tensor *k[3 * NN_MAX_PARAMS + BL_MAX_STATE];
  int nk = 0, at[3 * NN_MAX_PARAMS + BL_MAX_STATE];
  for (int i = 0; i < n; i++)
    if (keep[i]) at[nk] = i, k[nk++] = keep[i];
  ad_status st =
      ad__compact_roots(t, sg->marks[c - 1], nk, k, (int)row, sg->out + (size_t)(c - 1) * row);
  if (st) return st;
  for (int j = 0; j < nk; j++) keep[at[j]] = k[j];
  return AD_OK;
}

ad_status bl__segment_release_end(bl_run *r, bl_segment *sg, ad_tensor **aw, ad_tensor **as) {
  ad_tape *t = r->t;
  if (sg->n_chunks < 1) return AD_OK;
  int n = sg->n_w, ns = as ? sg->ns : 0, nk = 0;
  size_t row = (size_t)(n + sg->ns), c = (size_t)sg->n_chunks - 1;
  ad_marker m = sg->marks[c];
  if (!ad__compactable(t, m)) return AD_OK; /* an op compaction cannot move: leave it */
  ad_tensor *keep[NN_MAX_PARAMS + BL_MAX_STATE];
  int at[NN_MAX_PARAMS + BL_MAX_STATE];
  for (int j = 0; j < n + ns; j++) {
    ad_tensor *x = j < n ? aw[j] : as[j - n];
    if (x) at[nk] = j, keep[nk++] = x;
  }
  ad_status st = ad__compact_roots(t, m, nk, keep, (int)row, sg->out + c * row);
  if (st) return st;
  for (int k = 0; k < nk; k++) {
    int j = at[k];
    if (j < n)
      aw[j] = keep[k];
    else
      as[j - n] = keep[k];
  }
  sg->s_end.n = 0;
  for (int i = 0; i < n; i++) sg->w_end[i] = NULL;
  return AD_OK;
}

ad_status bl__segment_reverse_lean(bl_run *r, bl_segment *sg, ad_tensor **aw, ad_tensor **as,
                                   ad_tensor **glam) {
  ad_tape *t = r->t;
  int n = sg->n_w, ns = as ? sg->ns : 0, n_lam = r->p->n_lam, nv = n + ns;
  size_t row = (size_t)(n + sg->ns);
  /* The adjoints are the last chunk's results, moved down over the chunk
   * (drop_chunk) instead of copied into a second buffer. glam lies below
   * the segment and is added into in place: it never moves. Nothing is
   * written into a seed: a rule may hand it back. */
  ad_tensor *cur[NN_MAX_PARAMS + BL_MAX_STATE];
  ad_tensor *grads[2 * NN_MAX_PARAMS + BL_MAX_STATE];
  ad_tensor *keep[NN_MAX_PARAMS + BL_MAX_STATE];
  for (int j = 0; j < nv; j++) cur[j] = j < n ? aw[j] : as[j - n];
  ad_status st = AD_OK;
  for (int64_t c = sg->n_chunks - 1; c >= 0 && !st; c--) {
    ad_tensor **in = sg->in + (size_t)c * row;
    int first;
    st = chunk_vjp(r, sg, c, nv, cur, grads, AD_GRAD_NULL_UNREACHED, &first, glam);
    if (st) break;
    /* an adjoint the outputs do not reach is zero (the old path's zeros) */
    for (int j = 0; j < nv && !first && !st; j++)
      if (!grads[n_lam + j] && !(grads[n_lam + j] = ad_zeros_like(t, in[j])))
        st = ad_tape_status(t);
    if (st) break;
    for (int j = 0; j < nv; j++) keep[j] = first ? NULL : grads[n_lam + j];
    st = drop_chunk(r, sg, c, nv, keep);
    if (st) break;
    for (int j = 0; j < nv && !first; j++) cur[j] = keep[j];
    r->st.hvps += chunk_steps(sg, c);
  }
  for (int j = 0; j < nv && !st; j++) { /* freed with the first chunk when skipped */
    ad_tensor *a = sg->skip_start_adjoint ? NULL : cur[j];
    if (j < n)
      aw[j] = a;
    else
      as[j - n] = a;
  }
  return st;
}

ad_status bl__run_keep_last(bl_run *r, ad_tensor **w, ad_tensor **w_prev, bl_state *os,
                            bl_state *os_prev, ad_tensor **gw, ad_tensor **glam) {
  int64_t T = r->p->inner_steps;
  ad_status s = bl__w0_copy(r, w);
  if (!s) s = bl__state_new(r, os);
  if (!s) s = bl__run_inplace(r, r->lam, w, os, 0, T - 1);
  if (!s) s = bl__copy_new(r, r->p->n_w, w, w_prev);
  if (!s) s = bl__state_copy(r, os_prev, os, BL_STATE_INPLACE);
  if (!s) s = bl__run_inplace(r, r->lam, w, os, T - 1, T);
  if (!s) s = bl__val_grad(r, r->lam, w, NULL, gw, glam);
  return s;
}
