/* step.c — the inner step interface (bl.h: bl_step_fn) and the library
 * optimizers as providers of it.
 *
 * Every method reaches the inner update through r->step, so a user's rule
 * and nn/'s optimizers take the same path. The library provider wraps
 * nn_opt_step_diff: its state is the nn_opt_state buffers as a slot list
 * (m for momentum and Nesterov, v for RMSprop, m then v for Adam/AdamW)
 * and its step count is the step index, so a state is just tensors. Its
 * *_var fields that point into p->lam are resolved against the lam the
 * step is called with, so perturbed copies (t1t2's finite differences,
 * zero-order) and the methods' leaf views both reach the optimizer.
 * In place, a library optimizer runs nn_opt_step on the buffers (a fused
 * typed loop: no tape, no allocation); a user step runs with recording off
 * and its outputs are copied back. */
#include "bl_internal.h"

#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------- library provider */

static int lib_slots(nn_opt_kind k) {
  switch (k) {
  case NN_OPT_SGD:
    return 0;
  case NN_OPT_MOMENTUM:
  case NN_OPT_NESTEROV:
  case NN_OPT_RMSPROP:
    return 1;
  case NN_OPT_ADAM:
  case NN_OPT_ADAMW:
    return 2;
  }
  return -1;
}

static const char *lib_name(nn_opt_kind k) {
  static const char *names[] = {"sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop"};
  return (unsigned)k <= NN_OPT_RMSPROP ? names[k] : "unknown optimizer";
}

/* The nn_opt_state view of a slot list at step index `step` (nn_opt_step*
 * increments the count before using it: bias correction at step + 1). */
static void to_nn_state(nn_opt_kind kind, int n, ad_tensor *const *state, int64_t step, int on_tape,
                        nn_opt_state *s) {
  memset(s, 0, sizeof *s);
  s->n = n;
  s->step = step;
  s->on_tape = on_tape;
  for (int i = 0; i < n; i++) {
    if (kind == NN_OPT_RMSPROP) {
      s->v[i] = state[i];
    } else if (kind != NN_OPT_SGD) {
      s->m[i] = state[i];
      if (kind == NN_OPT_ADAM || kind == NN_OPT_ADAMW) s->v[i] = state[n + i];
    }
  }
}

static void from_nn_state(nn_opt_kind kind, int n, const nn_opt_state *s, ad_tensor **state) {
  for (int i = 0; i < n; i++) {
    if (kind == NN_OPT_RMSPROP) {
      state[i] = s->v[i];
    } else if (kind != NN_OPT_SGD) {
      state[i] = s->m[i];
      if (kind == NN_OPT_ADAM || kind == NN_OPT_ADAMW) state[n + i] = s->v[i];
    }
  }
}

/* p->opt with its *_var fields resolved against lam: r->opt when lam is the
 * method's own views, else mapped into m. */
static const nn_opt_cfg *lib_cfg(const bl_run *r, ad_tensor *const *lam, bl_cfg_map *m) {
  if (lam == r->lam) return &r->opt.cfg;
  bl__cfg_map(r->p, lam, m);
  return &m->cfg;
}

/* A library optimizer with its settings resolved, as a bl_step_fn (ctx =
 * the nn_opt_cfg; lam is not read: the cfg's *_var fields already point at
 * the lam it is for). The meta-learning methods use it directly. */
ad_status bl__cfg_step(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *state,
                       ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                       ad_tensor **w_new, ad_tensor **state_new) {
  (void)lam;
  const nn_opt_cfg *cfg = ctx;
  nn_opt_state s;
  to_nn_state(cfg->kind, n, state, step, 1, &s);
  ad_status st = nn_opt_step_diff(t, cfg, &s, n, w, g, w_new);
  if (st) return st;
  from_nn_state(cfg->kind, n, &s, state_new);
  return AD_OK;
}

/* The provider itself, a bl_step_fn (ctx = the bl_run): p->opt resolved
 * against the lam it is called with. */
static ad_status lib_step(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *state,
                          ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                          ad_tensor **w_new, ad_tensor **state_new) {
  const bl_run *r = ctx;
  bl_cfg_map m;
  const nn_opt_cfg *cfg = lib_cfg(r, lam, &m);
  return bl__cfg_step(t, n, w, state, g, lam, step, (void *)cfg, w_new, state_new);
}

/* ---------------------------------------------------------------- resolving */

const char *bl__step_name(const bl_run *r) {
  return r->step.name ? r->step.name : "user step";
}

ad_status bl__step_resolve(bl_run *r, ad_tensor *const *w) {
  const bl_problem *p = r->p;
  if (p->step.fn) {
    r->step = p->step;
    r->lib = 0;
    if (p->step.slots < 0 || p->step.slots > BL_STEP_MAX_SLOTS)
      return bl__fail(r, AD_ERR_ARG, "step '%s': slots = %d (0..%d allowed)", bl__step_name(r),
                      p->step.slots, BL_STEP_MAX_SLOTS);
    /* A user step replaces p->opt: no decay, no lr. */
    memset(&r->opt, 0, sizeof r->opt);
    return AD_OK;
  }
  int slots = lib_slots(p->opt.kind);
  if (slots < 0)
    return bl__fail(r, AD_ERR_ARG, "unknown optimizer kind %d in p->opt", (int)p->opt.kind);
  r->lib = 1;
  r->step = (bl_step){.fn = lib_step, .slots = slots, .ctx = r, .name = lib_name(p->opt.kind)};
  /* The optimizer's settings are checked once here, so a bad one is an
   * error naming the method before any work (the steps check again). */
  return bl__nn(r, nn_opt_check(&p->opt, p->n_w, w));
}

/* ---------------------------------------------------------------- calling */

/* Checks what the step returned: every output present and shaped (and
 * typed) like its input. */
static ad_status check_outputs(bl_run *r, int n, ad_tensor *const *in, ad_tensor *const *out,
                               const char *what, int64_t step) {
  for (int i = 0; i < n; i++) {
    if (!out[i])
      return bl__fail(r, AD_ERR_NULL, "step '%s' returned NULL %s[%d] at inner step %lld",
                      bl__step_name(r), what, i, (long long)step);
    if (!ad_same_shape(out[i], in[i]) || out[i]->dtype != in[i]->dtype) {
      char a[96], b[96];
      return bl__fail(r, AD_ERR_SHAPE, "step '%s' returned %s[%d] %s at inner step %lld; %s needed",
                      bl__step_name(r), what, i, ad_shape_str(out[i], a, sizeof a), (long long)step,
                      ad_shape_str(in[i], b, sizeof b));
    }
  }
  return AD_OK;
}

ad_status bl__step_call(bl_run *r, ad_tensor *const *lam, ad_tensor *const *w, const bl_state *s,
                        ad_tensor *const *g, int64_t step, ad_tensor **w_new, bl_state *s_new) {
  int n = r->p->n_w, ns = s->n;
  ad_tensor *in_s[BL_MAX_STATE], *out_s[BL_MAX_STATE];
  for (int j = 0; j < ns; j++) {
    in_s[j] = s->b[j];
    out_s[j] = NULL;
  }
  for (int i = 0; i < n; i++) w_new[i] = NULL;
  ad_status st = r->step.fn(r->t, n, w, in_s, g, lam, step, r->step.ctx, w_new, out_s);
  if (r->lib) {
    st = bl__nn(r, st);
  } else if (st != AD_OK || ad_tape_status(r->t) != AD_OK) {
    if (ad_tape_status(r->t) != AD_OK) return ad_tape_status(r->t);
    return bl__fail(r, st, "step '%s' failed at inner step %lld (%s)", bl__step_name(r),
                    (long long)step, ad_status_str(st));
  } else {
    st = check_outputs(r, n, w, w_new, "w_new", step);
    if (!st) st = check_outputs(r, ns, in_s, out_s, "state_new", step);
  }
  if (st) return st;
  s_new->n = ns;
  for (int j = 0; j < ns; j++) s_new->b[j] = out_s[j];
  return AD_OK;
}

ad_status bl__step_inplace(bl_run *r, ad_tensor *const *lam, ad_tensor *const *w, bl_state *s,
                           ad_tensor *const *g, int64_t step) {
  int n = r->p->n_w;
  if (r->lib) {
    bl_cfg_map m;
    const nn_opt_cfg *cfg = lib_cfg(r, lam, &m);
    nn_opt_state ns;
    to_nn_state(cfg->kind, n, s->b, step, 0, &ns);
    return bl__nn(r, nn_opt_step(cfg, &ns, n, w, g));
  }
  /* A user step, value-only: its outputs are fresh tensors or its inputs.
   * An output that is another buffer's input is copied first, so that
   * writing the buffers in order cannot overwrite a value still to be
   * read. */
  ad_marker mk = ad_mark(r->t);
  int rec = ad_set_recording(r->t, 0);
  ad_tensor *wn[NN_MAX_PARAMS];
  bl_state sn;
  ad_status st = bl__step_call(r, lam, w, s, g, step, wn, &sn);
  ad_set_recording(r->t, rec);
  ad_tensor *dst[NN_MAX_PARAMS + BL_MAX_STATE], *src[NN_MAX_PARAMS + BL_MAX_STATE];
  int nd = 0;
  for (int i = 0; i < n && !st; i++) {
    dst[nd] = w[i];
    src[nd++] = wn[i];
  }
  for (int j = 0; j < s->n && !st; j++) {
    dst[nd] = s->b[j];
    src[nd++] = sn.b[j];
  }
  for (int a = 0; a < nd && !st; a++) {
    if (src[a] == dst[a]) continue;
    for (int b = 0; b < nd; b++)
      if (b != a && src[a]->data == dst[b]->data) {
        if (!(src[a] = bl__copy(r->t, src[a]))) st = ad_tape_status(r->t);
        break;
      }
  }
  for (int a = 0; a < nd && !st; a++)
    if (src[a] != dst[a]) st = bl__nn(r, ad_copy_values(dst[a], src[a]));
  ad_rewind(r->t, mk);
  return st;
}

/* ---------------------------------------------------------------- state */

ad_status bl__state_new(bl_run *r, bl_state *s) {
  int n = r->p->n_w;
  memset(s, 0, sizeof *s);
  s->n = r->step.slots * n;
  for (int j = 0; j < s->n; j++)
    if (!(s->b[j] = ad_zeros_like(r->t, r->p->w0[j % n]))) return ad_tape_status(r->t);
  if (!r->lib && r->step.init && s->n > 0) {
    ad_status st = r->step.init(r->t, n, r->p->w0, s->b, r->step.ctx);
    if (st != AD_OK || ad_tape_status(r->t) != AD_OK) {
      if (ad_tape_status(r->t) != AD_OK) return ad_tape_status(r->t);
      return bl__fail(r, st, "step '%s': init failed (%s)", bl__step_name(r), ad_status_str(st));
    }
    return bl__check_finite(r, s->n, s->b, "the initial state", "step 0");
  }
  return AD_OK;
}

ad_status bl__state_copy(bl_run *r, bl_state *dst, const bl_state *src, int mode) {
  bl_state d = {.n = src->n};
  for (int j = 0; j < src->n; j++) {
    d.b[j] = mode == BL_STATE_LEAF ? bl__leaf(r->t, src->b[j]) : bl__copy(r->t, src->b[j]);
    if (!d.b[j]) return ad_tape_status(r->t);
  }
  *dst = d;
  return AD_OK;
}

void bl__state_set(bl_state *dst, const bl_state *src) {
  for (int j = 0; j < src->n && j < dst->n; j++) ad_copy_values(dst->b[j], src->b[j]);
}

int bl__state_list(const bl_state *s, ad_tensor **out) {
  for (int j = 0; j < s->n; j++) out[j] = s->b[j];
  return s->n;
}

ad_status bl__check_finite(bl_run *r, int n, ad_tensor *const *x, const char *what,
                           const char *where) {
  for (int i = 0; i < n; i++) {
    if (!x[i]) continue;
    const ad_tensor *t = x[i];
    /* one vectorized pass (ad__all_finite); search only on failure */
    int any = !ad__all_finite(t);
    int64_t bad = -1;
    for (int64_t j = 0; any && j < t->size && bad < 0; j++)
      if (!isfinite(ad_get(t, j))) bad = j;
    if (bad >= 0)
      return bl__fail(r, AD_ERR_NUMERIC, "%s is not finite at %s (element %lld of tensor %d is %g)",
                      what, where, (long long)bad, i, ad_get(t, bad));
  }
  return AD_OK;
}

/* ---------------------------------------------------------------- public */

int bl_step_slots(const bl_problem *p) {
  if (!p) {
    ad__set_last(AD_ERR_NULL, "bl_step_slots: problem is NULL");
    return -1;
  }
  if (p->step.fn) {
    if (p->step.slots < 0 || p->step.slots > BL_STEP_MAX_SLOTS) {
      ad__set_last(AD_ERR_ARG, "bl_step_slots: step '%s': slots = %d (0..%d allowed)",
                   p->step.name ? p->step.name : "user step", p->step.slots, BL_STEP_MAX_SLOTS);
      return -1;
    }
    return p->step.slots;
  }
  int k = lib_slots(p->opt.kind);
  if (k < 0) ad__set_last(AD_ERR_ARG, "bl_step_slots: unknown optimizer kind %d", (int)p->opt.kind);
  return k;
}

static ad_status apply_args(bl_run *r, const bl_problem *p, ad_tensor *const *lam,
                            ad_tensor *const *w, ad_tensor *const *state, int mode,
                            ad_tensor **w_new, ad_tensor **state_new) {
  if (!p) return bl__fail(r, AD_ERR_NULL, "problem is NULL");
  if (p->n_w <= 0 || p->n_w > NN_MAX_PARAMS || p->n_lam < 0 || p->n_lam > NN_MAX_PARAMS)
    return bl__fail(r, AD_ERR_ARG, "n_w = %d, n_lam = %d (1..%d and 0..%d allowed)", p->n_w,
                    p->n_lam, NN_MAX_PARAMS, NN_MAX_PARAMS);
  if (mode != BL_STEP_INPLACE && mode != BL_STEP_RECORD)
    return bl__fail(r, AD_ERR_ARG, "mode %d (BL_STEP_INPLACE or BL_STEP_RECORD)", mode);
  if (!w) return bl__fail(r, AD_ERR_NULL, "w is NULL");
  for (int i = 0; i < p->n_w; i++)
    if (!w[i]) return bl__fail(r, AD_ERR_NULL, "w[%d] is NULL", i);
  if (p->n_lam > 0 && !lam) return bl__fail(r, AD_ERR_NULL, "lam and p->lam are NULL");
  for (int k = 0; k < p->n_lam; k++)
    if (!lam[k]) return bl__fail(r, AD_ERR_NULL, "lam[%d] is NULL", k);
  int ns = r->step.slots * p->n_w;
  if (ns > 0 && !state)
    return bl__fail(r, AD_ERR_NULL, "step '%s' has %d state buffers but state is NULL",
                    bl__step_name(r), ns);
  for (int j = 0; j < ns; j++) {
    if (!state[j]) return bl__fail(r, AD_ERR_NULL, "state[%d] is NULL", j);
    const ad_tensor *like = w[j % p->n_w];
    if (state[j]->size != like->size || state[j]->dtype != like->dtype) {
      char a[96], b[96];
      return bl__fail(r, AD_ERR_SHAPE, "state[%d] is %s but w[%d] is %s", j,
                      ad_shape_str(state[j], a, sizeof a), j % p->n_w,
                      ad_shape_str(like, b, sizeof b));
    }
  }
  if (mode == BL_STEP_RECORD && (!w_new || (ns > 0 && !state_new)))
    return bl__fail(r, AD_ERR_NULL, "BL_STEP_RECORD needs w_new%s", ns ? " and state_new" : "");
  return AD_OK;
}

ad_status bl_step_apply(ad_tape *t, const bl_problem *p, ad_tensor *const *lam, ad_tensor *const *w,
                        ad_tensor *const *state, ad_tensor *const *g, int64_t step, int mode,
                        ad_tensor **w_new, ad_tensor **state_new) {
  bl_run r;
  memset(&r, 0, sizeof r);
  r.who = "bl_step_apply";
  r.t = t;
  r.p = p;
  if (!t) return bl__fail(&r, AD_ERR_NULL, "tape is NULL");
  if (ad_tape_status(t) != AD_OK) return ad_tape_status(t);
  if (!p) return bl__fail(&r, AD_ERR_NULL, "problem is NULL");
  if (!lam) lam = p->lam;
  for (int k = 0; k < p->n_lam && lam && k < NN_MAX_PARAMS; k++) r.lam[k] = lam[k];
  ad_status s = AD_OK;
  if (p->n_w <= 0 || p->n_w > NN_MAX_PARAMS)
    s = bl__fail(&r, AD_ERR_ARG, "n_w = %d (1..%d allowed)", p->n_w, NN_MAX_PARAMS);
  for (int i = 0; !s && i < p->n_w; i++)
    if (!w || !w[i]) s = bl__fail(&r, AD_ERR_NULL, "w or w[%d] is NULL", i);
  if (!s) s = bl__step_resolve(&r, w);
  if (!s && r.lib) bl__cfg_map(p, r.lam, &r.opt);
  if (!s) s = apply_args(&r, p, lam, w, state, mode, w_new, state_new);
  if (s) return s;
  int n = p->n_w;
  bl_state st_in = {.n = r.step.slots * n}, st_out;
  for (int j = 0; j < st_in.n; j++) st_in.b[j] = state[j];
  ad_tensor *gv[NN_MAX_PARAMS];
  ad_marker mk = ad_mark(t);
  if (!g) {
    if (!p->train_loss) return bl__fail(&r, AD_ERR_NULL, "g is NULL and p->train_loss is NULL");
    /* The gradient at w: w must need a gradient for ad_grad to reach it;
     * in place, leaf views stand in for w so the caller's flags are kept. */
    ad_tensor *wl[NN_MAX_PARAMS];
    for (int i = 0; i < n && !s; i++) {
      wl[i] = mode == BL_STEP_RECORD && ad_needs_grad(w[i]) ? w[i] : bl__leaf_view(t, w[i]);
      if (!wl[i]) s = ad_tape_status(t);
    }
    ad_tensor *L = s ? NULL : p->train_loss(t, wl, r.lam, step, p->ctx);
    if (!s) s = bl__check_loss(&r, L, "train_loss", step);
    if (!s && !isfinite(ad_item(L)))
      s = bl__fail(&r, AD_ERR_NUMERIC, "train_loss is %g at inner step %lld", ad_item(L),
                   (long long)step);
    if (!s)
      s = ad_grad(t, 1, &L, NULL, n, wl, gv,
                  mode == BL_STEP_RECORD && ad_is_recording(t) ? AD_GRAD_RECORD : 0);
    g = gv;
  } else {
    for (int i = 0; i < n && !s; i++)
      if (!g[i]) s = bl__fail(&r, AD_ERR_NULL, "g[%d] is NULL", i);
  }
  if (s) {
    ad_rewind(t, mk);
    return s;
  }
  if (mode == BL_STEP_INPLACE) {
    s = bl__step_inplace(&r, r.lam, w, &st_in, g, step);
    ad_rewind(t, mk);
    return s;
  }
  s = bl__step_call(&r, r.lam, w, &st_in, g, step, w_new, &st_out);
  if (s) return s;
  for (int j = 0; j < st_out.n; j++) state_new[j] = st_out.b[j];
  return AD_OK;
}
