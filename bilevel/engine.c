/* engine.c — levels run in dependency order by an engine (bl_engine.h).
 *
 * The engine does three things a hand-written outer loop does, once:
 *  - it turns each dependency edge (upper U over lower L) into a bl_problem
 *    (w = L's parameters, lam = U's, L's loss as L_train, U's as L_val, L's
 *    step and steps per call) and asks the edge's method for dL_U/dlam;
 *  - it evaluates a loss at the RESPONSE of the levels below the one the
 *    method differentiates through (recorded unrolls, so the response is
 *    differentiable: see the header for why that makes three levels exact);
 *  - it keeps the whole state (parameters, optimizer states, counters,
 *    iterator positions, rng) in one place it can save and restore.
 * Batches are drawn per call of a level into `steps` slots; a method looking
 * ahead through L's next call and L's own call then see the same batches. */
#define _POSIX_C_SOURCE 200809L /* mkstemp, fsync, fileno */

#include "bl_engine.h"
#include "bl_internal.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

/* Limits the build applies to methods that scale badly (see bl_engine_build). */
#define FORWARD_MAX_HYPER 4096
#define EXACT_MAX_INNER 4096

/* ---------------------------------------------------------------- methods */

static const struct {
  const char *name;
  bl_method_fn fn;
} METHODS[BL_METHOD_COUNT] = {
    [BL_UNROLL] = {"unroll", bl_unroll},
    [BL_FORWARD] = {"forward", bl_forward},
    [BL_CHECKPOINTED] = {"checkpointed", bl_checkpointed},
    [BL_DRMAD] = {"drmad", bl_drmad},
    [BL_FO] = {"fo", bl_fo},
    [BL_ONE_STEP] = {"one_step", bl_one_step},
    [BL_T1T2] = {"t1t2", bl_t1t2},
    [BL_GREEDY] = {"greedy", bl_greedy},
    [BL_HYPERDISTILL] = {"hyperdistill", bl_hyperdistill},
    [BL_NEUMANN] = {"neumann", bl_neumann},
    [BL_CG] = {"cg", bl_cg},
    [BL_FIXED_POINT] = {"fixed_point", bl_fixed_point},
    [BL_HOAG] = {"hoag", bl_hoag},
    [BL_EXACT] = {"exact", bl_exact},
    [BL_ZERO_ORDER] = {"zero_order", bl_zero_order},
    [BL_SAMA] = {"sama", bl_sama},
    [BL_REVERSIBLE] = {"reversible", bl_reversible},
};

const char *bl_method_name(bl_method m) {
  return (unsigned)m < BL_METHOD_COUNT ? METHODS[m].name : NULL;
}

int bl_method_from_name(const char *name) {
  if (!name) return -1;
  for (int m = 0; m < BL_METHOD_COUNT; m++)
    if (!strcmp(name, METHODS[m].name)) return m;
  return -1;
}

bl_method_fn bl_method_function(bl_method m) {
  return (unsigned)m < BL_METHOD_COUNT ? METHODS[m].fn : NULL;
}

/* Implicit methods: their answer is taken at w* and has no term for the
 * inner optimizer's settings. */
static int implicit(bl_method m) {
  return m == BL_NEUMANN || m == BL_CG || m == BL_FIXED_POINT || m == BL_HOAG || m == BL_EXACT ||
         m == BL_SAMA;
}

/* ---------------------------------------------------------------- the engine */

typedef struct {
  char name[NN_NAME_MAX];
  bl_level l; /* the caller's level; strings re-pointed at the copies below */
  char dep_name[BL_LEVEL_MAX_DEPS][NN_NAME_MAX];
  char dep_method[BL_LEVEL_MAX_DEPS][32];
  int dep[BL_LEVEL_MAX_DEPS]; /* resolved: level index of each dependency */
  bl_method method[BL_LEVEL_MAX_DEPS];
  int n_up, up[BL_ENGINE_MAX_LEVELS]; /* levels that depend on this one */
  int n;
  ad_tensor *params[NN_MAX_PARAMS];
  int64_t steps;
  int user; /* user step (l.step.fn) rather than l.opt */
  nn_opt_cfg opt;
  nn_opt_state os;                                   /* heap (library step) */
  ad_tensor *us[NN_MAX_PARAMS * BL_STEP_MAX_SLOTS];  /* heap (user step) */
  ad_tensor *hg[NN_MAX_PARAMS], *tmp[NN_MAX_PARAMS]; /* heap gradient buffers */
  /* batches */
  ds_iter *it;
  ad_tensor **xb, **yb; /* [steps] */
  int32_t *lb;          /* [steps * batch] or NULL */
  int64_t *bn;          /* [steps] rows filled */
  int64_t batch;
  /* counters (saved) */
  int64_t count; /* in-place steps taken */
  int64_t k;     /* position in the current call */
  int64_t draws; /* batches drawn from the iterator */
  int pending;   /* the current call's batches are drawn */
  double last_loss;
} level;

struct bl_engine {
  bl_engine_opts o;
  ad_tape *t;
  int n, built, add_failed, build_tried;
  level lv[BL_ENGINE_MAX_LEVELS];
  int order[BL_ENGINE_MAX_LEVELS]; /* a topological order, lowest first */
  ad_status status;
  char msg[1024];
  ad_rng rng;
  double t0;
  /* counters (saved) */
  int64_t steps_done, n_val, bad;
  double best, best_step, last_metric, hg_norm;
};

/* Errors: each public call starts clean (clear_error) and the first error
 * it meets is kept, so the message names the root cause. */
static void clear_error(bl_engine *e) {
  e->status = AD_OK;
  e->msg[0] = 0;
}

static ad_status efail(bl_engine *e, ad_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static ad_status efail(bl_engine *e, ad_status s, const char *fmt, ...) {
  if (!e) return s;
  if (e->status == AD_OK) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    e->status = s;
  }
  return s;
}

/* Moves a tape error (or ad_last_error) onto the engine, prefixed. */
static ad_status efrom(bl_engine *e, ad_status s, const char *who) {
  if (s == AD_OK) return AD_OK;
  const char *m = ad_tape_status(e->t) != AD_OK ? ad_tape_errmsg(e->t) : ad_last_error();
  efail(e, s, "%s: %s", who, m && *m ? m : ad_status_str(s));
  ad_tape_clear_error(e->t);
  return s;
}

const char *bl_engine_errmsg(const bl_engine *e) {
  return e ? e->msg : "bl_engine: engine is NULL";
}
ad_status bl_engine_status(const bl_engine *e) {
  return e ? e->status : AD_ERR_NULL;
}

ad_status bl_engine_new(bl_engine **out, const bl_engine_opts *opts) {
  if (!out) return ad__set_last(AD_ERR_NULL, "bl_engine_new: out is NULL");
  *out = NULL;
  bl_engine *e = calloc(1, sizeof *e);
  if (!e) return ad__set_last(AD_ERR_NOMEM, "bl_engine_new: out of memory");
  if (opts) e->o = *opts;
  if (e->o.log_every < 0 || e->o.val_every < 0 || e->o.patience < 0 || e->o.min_delta < 0) {
    free(e);
    return ad__set_last(AD_ERR_ARG, "bl_engine_new: log_every, val_every, patience and "
                                    "min_delta must be >= 0");
  }
  size_t mb = e->o.arena_mb ? e->o.arena_mb : 64;
  size_t max = e->o.arena_max_mb ? e->o.arena_max_mb : 4096;
  ad_status s = ad_tape_new(&e->t, &(ad_tape_opts){.arena_mb = mb, .arena_max_mb = max});
  if (s) {
    free(e);
    return s;
  }
  ad_rng_seed(&e->rng, e->o.seed);
  e->best = NAN;
  e->best_step = -1;
  e->last_metric = NAN;
  e->hg_norm = NAN;
  e->t0 = bl__now();
  *out = e;
  return AD_OK;
}

static void free_level(level *L) {
  nn_opt_state_free(&L->os);
  for (int i = 0; i < NN_MAX_PARAMS * BL_STEP_MAX_SLOTS; i++) ad_tensor_free(L->us[i]);
  for (int i = 0; i < NN_MAX_PARAMS; i++) {
    ad_tensor_free(L->hg[i]);
    ad_tensor_free(L->tmp[i]);
  }
  if (L->xb)
    for (int64_t k = 0; k < L->steps; k++) ad_tensor_free(L->xb[k]);
  if (L->yb)
    for (int64_t k = 0; k < L->steps; k++) ad_tensor_free(L->yb[k]);
  free(L->xb);
  free(L->yb);
  free(L->lb);
  free(L->bn);
  ds_iter_free(L->it);
}

void bl_engine_free(bl_engine *e) {
  if (!e) return;
  for (int i = 0; i < e->n; i++) free_level(&e->lv[i]);
  ad_tape_free(e->t);
  free(e);
}

static int copy_name(char *dst, size_t cap, const char *src) {
  if (!src) return -1;
  size_t n = strlen(src);
  if (n == 0 || n >= cap) return -1;
  memcpy(dst, src, n + 1);
  return 0;
}

static ad_status add_level(bl_engine *e, const bl_level *l, int *id);

ad_status bl_engine_add(bl_engine *e, const bl_level *l, int *id) {
  if (id) *id = -1;
  if (!e) return ad__set_last(AD_ERR_NULL, "bl_engine_add: engine is NULL");
  ad_status s = add_level(e, l, id);
  if (s) e->add_failed = 1; /* build refuses: the program is not what was meant */
  return s;
}

static ad_status add_level(bl_engine *e, const bl_level *l, int *id) {
  clear_error(e);
  if (!l) return efail(e, AD_ERR_NULL, "bl_engine_add: level is NULL");
  clear_error(e);
  if (e->built) return efail(e, AD_ERR_STATE, "bl_engine_add: the engine is already built");
  if (e->n >= BL_ENGINE_MAX_LEVELS)
    return efail(e, AD_ERR_ARG, "bl_engine_add: more than %d levels", BL_ENGINE_MAX_LEVELS);
  level *L = &e->lv[e->n];
  memset(L, 0, sizeof *L);
  if (copy_name(L->name, sizeof L->name, l->name))
    return efail(e, AD_ERR_ARG, "bl_engine_add: level %d: the name must have 1..%d characters",
                 e->n, NN_NAME_MAX - 1);
  if (l->n_deps < 0 || l->n_deps > BL_LEVEL_MAX_DEPS)
    return efail(e, AD_ERR_ARG, "bl_engine_add: level '%s': n_deps %d (0..%d)", L->name, l->n_deps,
                 BL_LEVEL_MAX_DEPS);
  L->l = *l;
  L->l.name = L->name;
  for (int d = 0; d < l->n_deps; d++) {
    if (copy_name(L->dep_name[d], NN_NAME_MAX, l->deps[d].level))
      return efail(e, AD_ERR_ARG, "bl_engine_add: level '%s': dependency %d has no valid name",
                   L->name, d);
    L->l.deps[d].level = L->dep_name[d];
    if (l->deps[d].method_name) {
      if (copy_name(L->dep_method[d], sizeof L->dep_method[d], l->deps[d].method_name))
        return efail(e, AD_ERR_ARG, "bl_engine_add: level '%s': bad method name for '%s'", L->name,
                     L->dep_name[d]);
      L->l.deps[d].method_name = L->dep_method[d];
    }
  }
  if (L->l.opt) L->opt = *L->l.opt;
  if (id) *id = e->n;
  e->n++;
  return AD_OK;
}

/* ---------------------------------------------------------------- build */

/* DFS over "depends on" edges; on a cycle writes it into buf and returns 1. */
static int find_cycle(const bl_engine *e, int v, int *color, int *stack, int depth, char *buf,
                      size_t len) {
  color[v] = 1;
  stack[depth] = v;
  const level *L = &e->lv[v];
  for (int d = 0; d < L->l.n_deps; d++) {
    int w = L->dep[d];
    if (color[w] == 1) {
      size_t off = 0;
      int start = 0;
      while (stack[start] != w) start++;
      for (int i = start; i <= depth; i++)
        off +=
            (size_t)snprintf(buf + off, off < len ? len - off : 0, "%s -> ", e->lv[stack[i]].name);
      snprintf(buf + (off < len ? off : len - 1), off < len ? len - off : 1, "%s", e->lv[w].name);
      return 1;
    }
    if (color[w] == 0 && find_cycle(e, w, color, stack, depth + 1, buf, len)) return 1;
  }
  color[v] = 2;
  return 0;
}

static void topo_visit(bl_engine *e, int v, int *seen, int *pos) {
  if (seen[v]) return;
  seen[v] = 1;
  for (int d = 0; d < e->lv[v].l.n_deps; d++) topo_visit(e, e->lv[v].dep[d], seen, pos);
  e->order[(*pos)++] = v;
}

static int64_t numel(int n, ad_tensor *const *x) {
  int64_t s = 0;
  for (int i = 0; i < n; i++) s += x[i]->size;
  return s;
}

/* 1 when cfg's optimizer settings point at any of U's parameters. */
static int cfg_uses(const nn_opt_cfg *c, int n_w, const level *U) {
  for (int i = 0; i < U->n; i++) {
    const ad_tensor *x = U->params[i];
    if (c->lr_var == x || c->momentum_var == x || c->weight_decay_var == x) return 1;
    for (int j = 0; j < n_w; j++)
      if ((c->lr_vars && c->lr_vars[j] == x) ||
          (c->weight_decay_vars && c->weight_decay_vars[j] == x))
        return 1;
  }
  return 0;
}

static ad_status ensure_batches(bl_engine *e, int id);
static ad_tensor *eval_loss(bl_engine *e, int id, bl_vars *v, int64_t k);
static void vars_current(const bl_engine *e, bl_vars *v);

static ad_status check_level(bl_engine *e, int id) {
  level *L = &e->lv[id];
  const bl_level *l = &L->l;
  const char *nm = L->name;
  if (l->params) {
    if (l->n < 1 || l->n > NN_MAX_PARAMS)
      return efail(e, AD_ERR_ARG, "bl_engine_build: level '%s': n = %d parameters (1..%d)", nm,
                   l->n, NN_MAX_PARAMS);
    L->n = l->n;
    for (int i = 0; i < l->n; i++) L->params[i] = l->params[i];
  } else if (l->set) {
    L->n = nn_params_count(l->set);
    for (int i = 0; i < L->n; i++) L->params[i] = nn_params_at(l->set, i);
  } else {
    return efail(e, AD_ERR_NULL, "bl_engine_build: level '%s' has no parameters (params or set)",
                 nm);
  }
  for (int i = 0; i < L->n; i++) {
    if (!L->params[i])
      return efail(e, AD_ERR_NULL, "bl_engine_build: level '%s': parameter %d is NULL", nm, i);
    if (L->params[i]->node || (L->params[i]->flags & AD_FLAG_ARENA))
      return efail(e, AD_ERR_ARG,
                   "bl_engine_build: level '%s': parameter %d is not a heap tensor "
                   "(ad_tensor_new or an nn_params set)",
                   nm, i);
    if (L->params[i]->dtype != L->params[0]->dtype)
      return efail(e, AD_ERR_DTYPE,
                   "bl_engine_build: level '%s': parameter %d is %s, parameter 0 %s", nm, i,
                   ad_dtype_name(L->params[i]->dtype), ad_dtype_name(L->params[0]->dtype));
    ad_requires_grad(L->params[i], 1);
  }
  if (!l->loss) return efail(e, AD_ERR_NULL, "bl_engine_build: level '%s' has no loss", nm);
  L->user = l->step.fn != NULL;
  if (!L->user && !l->opt)
    return efail(e, AD_ERR_NULL,
                 "bl_engine_build: level '%s' has no step (set opt to a library optimizer or "
                 "step.fn to a user step)",
                 nm);
  if (L->user && (l->step.slots < 0 || l->step.slots > BL_STEP_MAX_SLOTS))
    return efail(e, AD_ERR_ARG, "bl_engine_build: level '%s': step.slots = %d (0..%d)", nm,
                 l->step.slots, BL_STEP_MAX_SLOTS);
  if (l->steps < 0)
    return efail(e, AD_ERR_ARG, "bl_engine_build: level '%s': steps = %lld < 0", nm,
                 (long long)l->steps);
  L->steps = l->steps ? l->steps : 1;
  if (l->schedule && !L->user && (L->opt.lr_var || L->opt.lr_vars))
    return efail(e, AD_ERR_ARG,
                 "bl_engine_build: level '%s': a schedule multiplies a numeric lr, but its lr is "
                 "a tape variable",
                 nm);
  if (l->schedule && L->user)
    return efail(e, AD_ERR_ARG,
                 "bl_engine_build: level '%s': a schedule needs a library optimizer (a user "
                 "step sets its own rate)",
                 nm);
  if (!L->user) {
    ad_status s = nn_opt_state_init(&L->opt, &L->os, L->n, L->params);
    if (s) return efail(e, s, "bl_engine_build: level '%s': optimizer: %s", nm, ad_last_error());
  } else {
    for (int j = 0; j < l->step.slots * L->n; j++) {
      const ad_tensor *w = L->params[j % L->n];
      if (ad_tensor_new(&L->us[j], w->dtype, w->ndim, w->shape))
        return efail(e, AD_ERR_NOMEM, "bl_engine_build: level '%s': out of memory", nm);
    }
    /* The step's own initial state, written in place (zeros otherwise). */
    if (l->step.init && l->step.slots > 0) {
      ad_marker m = ad_mark(e->t);
      ad_status s = l->step.init(e->t, L->n, L->params, L->us, l->step.ctx);
      ad_rewind(e->t, m);
      if (s) return efrom(e, s, "bl_engine_build: step init");
    }
  }
  for (int i = 0; i < L->n; i++) {
    const ad_tensor *w = L->params[i];
    if (ad_tensor_new(&L->hg[i], w->dtype, w->ndim, w->shape) ||
        ad_tensor_new(&L->tmp[i], w->dtype, w->ndim, w->shape))
      return efail(e, AD_ERR_NOMEM, "bl_engine_build: level '%s': out of memory", nm);
  }
  if (l->data) {
    const ds_dataset *d = l->data;
    if (!d->x)
      return efail(e, AD_ERR_NULL, "bl_engine_build: level '%s': its data set has no x", nm);
    ds_iter_opts bo = l->batch;
    if (ds_iter_new(&L->it, d->x, d->labels, d->y, &bo))
      return efail(e, AD_ERR_ARG, "bl_engine_build: level '%s': batches: %s", nm, ds_errmsg());
    L->batch = bo.batch;
    L->xb = calloc((size_t)L->steps, sizeof *L->xb);
    L->yb = calloc((size_t)L->steps, sizeof *L->yb);
    L->bn = calloc((size_t)L->steps, sizeof *L->bn);
    if (d->labels) L->lb = calloc((size_t)(L->steps * L->batch), sizeof *L->lb);
    if (!L->xb || !L->yb || !L->bn || (d->labels && !L->lb))
      return efail(e, AD_ERR_NOMEM, "bl_engine_build: level '%s': out of memory", nm);
    for (int64_t k = 0; k < L->steps; k++) {
      int64_t sh[AD_MAX_DIMS];
      memcpy(sh, d->x->shape, sizeof sh);
      sh[0] = L->batch;
      if (ad_tensor_new(&L->xb[k], d->x->dtype, d->x->ndim, sh))
        return efail(e, AD_ERR_NOMEM, "bl_engine_build: level '%s': out of memory", nm);
      if (d->y) {
        memcpy(sh, d->y->shape, sizeof sh);
        sh[0] = L->batch;
        if (ad_tensor_new(&L->yb[k], d->y->dtype, d->y->ndim, sh))
          return efail(e, AD_ERR_NOMEM, "bl_engine_build: level '%s': out of memory", nm);
      }
    }
  }
  L->last_loss = NAN;
  return AD_OK;
}

static ad_status check_edge(bl_engine *e, int u, int d) {
  level *U = &e->lv[u];
  const bl_dep *dep = &U->l.deps[d];
  level *L = &e->lv[U->dep[d]];
  bl_method m = dep->method;
  if (dep->method_name) {
    int k = bl_method_from_name(dep->method_name);
    if (k < 0) {
      char names[512];
      size_t off = 0;
      for (int j = 0; j < BL_METHOD_COUNT && off < sizeof names; j++)
        off += (size_t)snprintf(names + off, sizeof names - off, " %s", METHODS[j].name);
      return efail(e, AD_ERR_ARG,
                   "bl_engine_build: level '%s' over '%s': unknown method '%s' (one of:%s)",
                   U->name, L->name, dep->method_name, names);
    }
    m = (bl_method)k;
  }
  if ((unsigned)m >= BL_METHOD_COUNT)
    return efail(e, AD_ERR_ARG, "bl_engine_build: level '%s' over '%s': method %d out of range",
                 U->name, L->name, (int)m);
  U->method[d] = m;
  const char *mn = METHODS[m].name;
  if (dep->opts.gauss_newton)
    return efail(e, AD_ERR_ARG,
                 "bl_engine_build: level '%s' over '%s': gauss_newton needs the lower loss split "
                 "into outputs and an output loss, which a level does not have",
                 U->name, L->name);
  if (L->user && m == BL_NEUMANN && dep->opts.alpha == 0)
    return efail(e, AD_ERR_ARG,
                 "bl_engine_build: level '%s' over '%s': neumann needs opts.alpha with a user "
                 "step ('%s''s step has no learning rate to default to)",
                 U->name, L->name, L->name);
  if (L->user && L->n_up > 1)
    return efail(e, AD_ERR_ARG,
                 "bl_engine_build: level '%s' has a user step and %d levels above it: which "
                 "level's parameters its lam argument holds would depend on the edge",
                 L->name, L->n_up);
  if (dep->force) return AD_OK;
  int64_t P = numel(U->n, U->params), N = numel(L->n, L->params);
  if (m == BL_FORWARD && P > FORWARD_MAX_HYPER)
    return efail(e, AD_ERR_ARG,
                 "bl_engine_build: level '%s' over '%s': forward mode carries one tangent per "
                 "hyperparameter: %lld of them make %lld JVPs per call of '%s' (limit %d); use "
                 "unroll, checkpointed or an implicit method, or set force",
                 U->name, L->name, (long long)P, (long long)(P * L->steps), L->name,
                 FORWARD_MAX_HYPER);
  if (m == BL_EXACT && N > EXACT_MAX_INNER)
    return efail(e, AD_ERR_ARG,
                 "bl_engine_build: level '%s' over '%s': exact forms the dense %lld x %lld "
                 "Hessian of '%s' (limit %d parameters); use cg, or set force",
                 U->name, L->name, (long long)N, (long long)N, L->name, EXACT_MAX_INNER);
  if (implicit(m) && cfg_uses(&L->opt, L->n, U))
    return efail(e, AD_ERR_ARG,
                 "bl_engine_build: level '%s' over '%s': '%s' learns settings of '%s''s "
                 "optimizer, which an implicit method (%s) cannot see: at w* the answer does not "
                 "depend on them; use unroll or forward",
                 U->name, L->name, U->name, L->name, mn);
  if (U->n > NN_MAX_PARAMS || L->n > NN_MAX_PARAMS)
    return efail(e, AD_ERR_ARG, "bl_engine_build: level '%s' over '%s': too many tensors", U->name,
                 L->name);
  return AD_OK;
}

/* Evaluates every loss once at the current values, so a shape mismatch or
 * a non-scalar loss is a build error naming the level. */
static ad_status dry_run(bl_engine *e) {
  ad_tape *t = e->t;
  ad_status s = AD_OK;
  for (int i = 0; i < e->n && !s; i++) {
    s = ensure_batches(e, i);
    if (s) break;
    ad_marker m = ad_mark(t);
    int rec = ad_set_recording(t, 1);
    bl_vars v;
    vars_current(e, &v);
    ad_tensor *L = eval_loss(e, i, &v, 0);
    if (!L || ad_tape_status(t)) {
      /* Name the level unless the message already does. */
      char who[96];
      snprintf(who, sizeof who, "bl_engine_build: level '%s'", e->lv[i].name);
      s = efrom(e, ad_tape_status(t) ? ad_tape_status(t) : AD_ERR_NULL,
                strncmp(ad_tape_errmsg(t), "level '", 7) ? who : "bl_engine_build");
    } else if (!isfinite(ad_item(L)))
      s = efail(e, AD_ERR_NUMERIC, "bl_engine_build: level '%s': its loss is %g at the start",
                e->lv[i].name, ad_item(L));
    ad_rewind(t, m);
    ad_set_recording(t, rec);
  }
  for (int i = 0; i < e->n; i++) {
    level *L = &e->lv[i];
    if (L->it) ds_iter_reset(L->it);
    L->draws = 0;
    L->pending = 0;
    L->k = 0;
  }
  return s;
}

ad_status bl_engine_build(bl_engine *e) {
  if (!e) return ad__set_last(AD_ERR_NULL, "bl_engine_build: engine is NULL");
  clear_error(e);
  if (e->add_failed)
    return efail(e, AD_ERR_STATE, "bl_engine_build: a bl_engine_add call failed before");
  if (e->built) return efail(e, AD_ERR_STATE, "bl_engine_build: already built");
  /* A failed build has made states and links; starting over is cleaner
   * than undoing them. */
  if (e->build_tried)
    return efail(e, AD_ERR_STATE, "bl_engine_build: a build failed before; make a new engine");
  e->build_tried = 1;
  if (e->n == 0) return efail(e, AD_ERR_ARG, "bl_engine_build: no levels");
  for (int i = 0; i < e->n; i++)
    for (int j = 0; j < i; j++)
      if (!strcmp(e->lv[i].name, e->lv[j].name))
        return efail(e, AD_ERR_ARG, "bl_engine_build: two levels are named '%s'", e->lv[i].name);
  /* Resolve the dependencies by name. */
  for (int i = 0; i < e->n; i++) {
    level *L = &e->lv[i];
    for (int d = 0; d < L->l.n_deps; d++) {
      int j = bl_engine_find(e, L->dep_name[d]);
      if (j < 0)
        return efail(e, AD_ERR_ARG,
                     "bl_engine_build: level '%s' depends on '%s', which is not "
                     "a level",
                     L->name, L->dep_name[d]);
      if (j == i)
        return efail(e, AD_ERR_ARG, "bl_engine_build: level '%s' depends on itself", L->name);
      for (int d2 = 0; d2 < d; d2++)
        if (L->dep[d2] == j)
          return efail(e, AD_ERR_ARG, "bl_engine_build: level '%s' lists '%s' twice", L->name,
                       L->dep_name[d]);
      L->dep[d] = j;
      e->lv[j].up[e->lv[j].n_up++] = i;
    }
  }
  int color[BL_ENGINE_MAX_LEVELS] = {0}, stack[BL_ENGINE_MAX_LEVELS];
  char cyc[512];
  for (int i = 0; i < e->n; i++)
    if (!color[i] && find_cycle(e, i, color, stack, 0, cyc, sizeof cyc))
      return efail(e, AD_ERR_ARG, "bl_engine_build: the dependencies form a cycle: %s", cyc);
  int seen[BL_ENGINE_MAX_LEVELS] = {0}, pos = 0;
  for (int i = 0; i < e->n; i++) topo_visit(e, i, seen, &pos);
  ad_status s = AD_OK;
  for (int i = 0; i < e->n && !s; i++) s = check_level(e, i);
  for (int i = 0; i < e->n && !s; i++)
    for (int d = 0; d < e->lv[i].l.n_deps && !s; d++) s = check_edge(e, i, d);
  if (!s) s = dry_run(e);
  if (s) return s;
  e->built = 1;
  return AD_OK;
}

int bl_engine_find(const bl_engine *e, const char *name) {
  if (!e || !name) return -1;
  for (int i = 0; i < e->n; i++)
    if (!strcmp(e->lv[i].name, name)) return i;
  return -1;
}

/* ---------------------------------------------------------------- batches */

static ad_status draw_one(bl_engine *e, level *L, int64_t k) {
  ds_batch b;
  if (ds_iter_next(L->it, L->xb[k], L->lb ? L->lb + k * L->batch : NULL, L->yb[k], &b))
    return efail(e, AD_ERR_ARG, "level '%s': batch: %s", L->name, ds_errmsg());
  L->bn[k] = b.size;
  L->draws++;
  return AD_OK;
}

/* Draws the current call's batches (once per call). */
static ad_status ensure_batches(bl_engine *e, int id) {
  level *L = &e->lv[id];
  if (L->pending) return AD_OK;
  L->k = 0;
  if (L->it)
    for (int64_t k = 0; k < L->steps; k++) {
      ad_status s = draw_one(e, L, k);
      if (s) return s;
    }
  L->pending = 1;
  return AD_OK;
}

/* The batches of id and of every level below it. */
static ad_status ensure_below(bl_engine *e, int id) {
  ad_status s = ensure_batches(e, id);
  for (int d = 0; d < e->lv[id].l.n_deps && !s; d++) s = ensure_below(e, e->lv[id].dep[d]);
  return s;
}

/* ---------------------------------------------------------------- losses and responses */

static void vars_current(const bl_engine *e, bl_vars *v) {
  memset(v, 0, sizeof *v);
  for (int i = 0; i < e->n; i++) v->p[i] = e->lv[i].params;
}

static ad_tensor *eval_loss(bl_engine *e, int id, bl_vars *v, int64_t k) {
  level *L = &e->lv[id];
  if (k < 0) k = 0;
  if (k >= L->steps) k = L->steps - 1;
  v->self = id;
  v->step = k;
  v->x = L->it ? L->xb[k] : NULL;
  v->y = L->it ? L->yb[k] : NULL;
  v->labels = L->lb ? L->lb + k * L->batch : NULL;
  v->n = L->it ? L->bn[k] : 0;
  ad_tensor *out = L->l.loss(e->t, v, L->l.ctx);
  if (ad_tape_status(e->t)) return NULL;
  if (!out) return ad__fail(e->t, AD_ERR_NULL, "level '%s': its loss returned NULL", L->name);
  if (out->size != 1) {
    char b[96];
    return ad__fail(e->t, AD_ERR_SHAPE, "level '%s': its loss is %s; a scalar is needed", L->name,
                    ad_shape_str(out, b, sizeof b));
  }
  return out;
}

/* x if it is none of the levels' heap parameters, else what v says stands
 * for that parameter now. */
static ad_tensor *map_var(const bl_engine *e, const bl_vars *v, ad_tensor *x) {
  if (!x) return NULL;
  for (int i = 0; i < e->n; i++)
    for (int j = 0; j < e->lv[i].n; j++)
      if (e->lv[i].params[j] == x) return v->p[i][j];
  return x;
}

typedef struct {
  nn_opt_cfg cfg;
  ad_tensor *lr[NN_MAX_PARAMS], *wd[NN_MAX_PARAMS];
} cfg_view;

static void map_cfg(const bl_engine *e, const level *L, const bl_vars *v, double lr_mult,
                    cfg_view *c) {
  c->cfg = L->opt;
  if (lr_mult != 1.0) c->cfg.lr = bl__lr(&L->opt) * lr_mult;
  c->cfg.lr_var = map_var(e, v, L->opt.lr_var);
  c->cfg.momentum_var = map_var(e, v, L->opt.momentum_var);
  c->cfg.weight_decay_var = map_var(e, v, L->opt.weight_decay_var);
  if (L->opt.lr_vars) {
    for (int i = 0; i < L->n; i++) c->lr[i] = map_var(e, v, L->opt.lr_vars[i]);
    c->cfg.lr_vars = c->lr;
  }
  if (L->opt.weight_decay_vars) {
    for (int i = 0; i < L->n; i++) c->wd[i] = map_var(e, v, L->opt.weight_decay_vars[i]);
    c->cfg.weight_decay_vars = c->wd;
  }
}

static double lr_mult(const level *L) {
  return L->l.schedule ? L->l.schedule(L->count, L->l.schedule_ctx) : 1.0;
}

/* The parameters a user step sees as lam: those of the first level above. */
static ad_tensor *const *step_lam(const level *L, const bl_vars *v) {
  return L->n_up ? v->p[L->up[0]] : NULL;
}

static ad_status assign_below(bl_engine *e, int id, bl_vars *v);

/* The response of level j: its steps recorded from its current values and
 * optimizer state, every gradient with AD_GRAD_RECORD, so *out (arena
 * tensors) is a differentiable function of whatever v holds as tape
 * tensors. The levels below j respond at each step in turn. */
static ad_status response(bl_engine *e, int j, const bl_vars *v, ad_tensor **out) {
  level *J = &e->lv[j];
  ad_tape *t = e->t;
  int n = J->n;
  ad_tensor *w[NN_MAX_PARAMS], *g[NN_MAX_PARAMS], *wn[NN_MAX_PARAMS];
  ad_tensor *st[NN_MAX_PARAMS * BL_STEP_MAX_SLOTS], *sn[NN_MAX_PARAMS * BL_STEP_MAX_SLOTS];
  for (int i = 0; i < n; i++) {
    w[i] = bl__leaf(t, J->params[i]);
    if (!w[i]) return ad_tape_status(t);
  }
  nn_opt_state ts = J->os;
  int ns = J->user ? J->l.step.slots * n : 0;
  if (!J->user) {
    for (int i = 0; i < ts.n; i++) {
      if (ts.m[i] && !(ts.m[i] = bl__copy(t, J->os.m[i]))) return ad_tape_status(t);
      if (ts.v[i] && !(ts.v[i] = bl__copy(t, J->os.v[i]))) return ad_tape_status(t);
    }
    ts.on_tape = 1;
  } else {
    for (int i = 0; i < ns; i++)
      if (!(st[i] = bl__copy(t, J->us[i]))) return ad_tape_status(t);
  }
  cfg_view cv;
  map_cfg(e, J, v, lr_mult(J), &cv);
  for (int64_t k = 0; k < J->steps; k++) {
    bl_vars vk = *v;
    vk.p[j] = w;
    ad_status s = assign_below(e, j, &vk);
    if (s) return s;
    ad_tensor *L = eval_loss(e, j, &vk, k);
    if (!L) return ad_tape_status(t);
    s = ad_grad(t, 1, &L, NULL, n, w, g, AD_GRAD_RECORD);
    if (!s && !J->user) {
      s = nn_opt_step_diff(t, &cv.cfg, &ts, n, w, g, wn);
      if (s && !ad_tape_status(t)) ad__fail(t, s, "%s", ad_last_error());
    } else if (!s) {
      s = J->l.step.fn(t, n, w, st, g, step_lam(J, &vk), J->count + k, J->l.step.ctx, wn, sn);
      if (!s)
        for (int i = 0; i < ns; i++) st[i] = sn[i];
    }
    if (s) return ad_tape_status(t) ? ad_tape_status(t) : s;
    for (int i = 0; i < n; i++) w[i] = wn[i];
  }
  for (int i = 0; i < n; i++) out[i] = w[i];
  return AD_OK;
}

/* Replaces, in v, every level below id by its response (id's own entry is
 * what the caller set). The lists live in the arena. */
static ad_status assign_below(bl_engine *e, int id, bl_vars *v) {
  level *L = &e->lv[id];
  for (int d = 0; d < L->l.n_deps; d++) {
    int j = L->dep[d];
    ad_tensor **w = ad_arena_alloc(e->t, sizeof(ad_tensor *) * (size_t)e->lv[j].n);
    if (!w) return ad_tape_status(e->t);
    ad_status s = response(e, j, v, w);
    if (s) return s;
    v->p[j] = w;
    s = assign_below(e, j, v);
    if (s) return s;
  }
  return AD_OK;
}

/* ---------------------------------------------------------------- edges as bl_problems */

typedef struct {
  bl_engine *e;
  int u, l;
} edge;

static ad_tensor *edge_loss(edge *c, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                            int train) {
  bl_engine *e = c->e;
  bl_vars v;
  vars_current(e, &v);
  v.p[c->l] = w;
  v.p[c->u] = lam;
  /* The response below the lower level must be on the tape even when the
   * method evaluates with recording off, or its dependence on w is lost. */
  int deep = e->lv[c->l].l.n_deps > 0;
  int rec = deep ? ad_set_recording(e->t, 1) : 0;
  ad_tensor *L = NULL;
  if (assign_below(e, c->l, &v) == AD_OK)
    L = train ? eval_loss(e, c->l, &v, step) : eval_loss(e, c->u, &v, e->lv[c->u].k);
  if (deep) ad_set_recording(e->t, rec);
  return L;
}

static ad_tensor *edge_train(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                             void *ctx) {
  (void)t;
  return edge_loss(ctx, w, lam, step, 1);
}

static ad_tensor *edge_val(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                           void *ctx) {
  (void)t, (void)step;
  return edge_loss(ctx, w, lam, -1, 0);
}

/* ---------------------------------------------------------------- steps */

/* d U_loss / d U_params at the current values of everything (the plain
 * gradient, or the direct term), into out; *value its loss. */
static ad_status direct_grad(bl_engine *e, int u, ad_tensor *const *out, double *value) {
  level *U = &e->lv[u];
  ad_tape *t = e->t;
  ad_marker m = ad_mark(t);
  int rec = ad_set_recording(t, 1);
  bl_vars v;
  vars_current(e, &v);
  ad_tensor *g[NN_MAX_PARAMS];
  ad_tensor *L = eval_loss(e, u, &v, U->k);
  ad_status s = L ? ad_grad(t, 1, &L, NULL, U->n, U->params, g, 0) : ad_tape_status(t);
  if (!s) {
    *value = ad_item(L);
    for (int i = 0; i < U->n; i++) ad_copy_values(out[i], g[i]);
  }
  ad_rewind(t, m);
  ad_set_recording(t, rec);
  return efrom(e, s, U->name);
}

/* U->hg = the gradient U's next step takes. */
static ad_status compute_grad(bl_engine *e, int u, double *value) {
  level *U = &e->lv[u];
  ad_status s = ensure_batches(e, u);
  if (s) return s;
  if (U->l.n_deps == 0) return direct_grad(e, u, U->hg, value);
  bl__zero(U->n, U->hg);
  for (int d = 0; d < U->l.n_deps; d++) {
    int l = U->dep[d];
    level *L = &e->lv[l];
    s = ensure_below(e, l);
    if (s) return s;
    edge c = {e, u, l};
    cfg_view cv;
    bl_vars v;
    vars_current(e, &v);
    map_cfg(e, L, &v, lr_mult(L), &cv);
    bl_problem p = {.n_w = L->n,
                    .w0 = L->params,
                    .n_lam = U->n,
                    .lam = U->params,
                    .train_loss = edge_train,
                    .val_loss = edge_val,
                    .ctx = &c,
                    .opt = cv.cfg,
                    .step = L->l.step,
                    .inner_steps = L->steps};
    bl_opts o = U->l.deps[d].opts;
    /* A fresh draw of directions per call, still fixed by the counters. */
    if (U->method[d] == BL_ZERO_ORDER) o.seed += 0x9E3779B97F4A7C15ull * (uint64_t)(U->count + 1);
    bl_stats st;
    s = METHODS[U->method[d]].fn(e->t, &p, &o, U->tmp, &st);
    if (s) {
      char who[160];
      snprintf(who, sizeof who, "level '%s' over '%s' (%s)", U->name, L->name,
               METHODS[U->method[d]].name);
      return efrom(e, s, who);
    }
    bl__axpy(U->n, U->hg, 1.0, U->tmp);
    *value = st.val_loss;
  }
  /* Each method's answer holds U's direct gradient; keep it once. */
  if (U->l.n_deps > 1) {
    double v;
    s = direct_grad(e, u, U->tmp, &v);
    if (s) return s;
    bl__axpy(U->n, U->hg, -(double)(U->l.n_deps - 1), U->tmp);
  }
  return AD_OK;
}

/* Applies U's step to U->hg in place. */
static ad_status apply_step(bl_engine *e, int u) {
  level *U = &e->lv[u];
  ad_status s;
  if (!U->user) {
    nn_opt_cfg c = U->opt;
    double mult = lr_mult(U);
    if (U->l.schedule) c.lr = bl__lr(&U->opt) * mult;
    s = nn_opt_step(&c, &U->os, U->n, U->params, U->hg);
    if (s) return efail(e, s, "level '%s': step: %s", U->name, ad_last_error());
  } else {
    ad_tape *t = e->t;
    ad_marker m = ad_mark(t);
    int rec = ad_set_recording(t, 0);
    ad_tensor *wn[NN_MAX_PARAMS], *sn[NN_MAX_PARAMS * BL_STEP_MAX_SLOTS];
    bl_vars v;
    vars_current(e, &v);
    int ns = U->l.step.slots * U->n;
    s = U->l.step.fn(t, U->n, U->params, U->us, U->hg, step_lam(U, &v), U->count, U->l.step.ctx, wn,
                     sn);
    if (!s && ad_tape_status(t)) s = ad_tape_status(t);
    for (int i = 0; !s && i < U->n; i++)
      if (!wn[i] || wn[i]->size != U->params[i]->size || wn[i]->dtype != U->params[i]->dtype)
        s = efail(e, AD_ERR_SHAPE, "level '%s': its user step returned a bad w_new[%d]", U->name,
                  i);
    for (int i = 0; !s && i < ns; i++)
      if (!sn[i] || sn[i]->size != U->us[i]->size || sn[i]->dtype != U->us[i]->dtype)
        s = efail(e, AD_ERR_SHAPE, "level '%s': its user step returned a bad state_new[%d]",
                  U->name, i);
    /* Checked before anything is written, so a bad step leaves the
     * parameters as they were. */
    if (!s) {
      for (int i = 0; i < U->n; i++)
        if (wn[i] != U->params[i]) ad_copy_values(U->params[i], wn[i]);
      for (int i = 0; i < ns; i++)
        if (sn[i] != U->us[i]) ad_copy_values(U->us[i], sn[i]);
    }
    ad_rewind(t, m);
    ad_set_recording(t, rec);
    if (s) return efrom(e, s, U->name);
  }
  if (U->l.project) U->l.project(U->n, U->params, U->l.project_ctx);
  return AD_OK;
}

static ad_status advance_call(bl_engine *e, int id);

/* One in-place step of level u, then its dependencies' calls. */
static ad_status one_step(bl_engine *e, int u) {
  level *U = &e->lv[u];
  double value = NAN;
  ad_status s = compute_grad(e, u, &value);
  if (s) return s;
  U->last_loss = value;
  double norm = bl__norm(U->n, U->hg);
  if (U->l.n_deps) e->hg_norm = norm;
  /* Never a silent NaN: stop before it reaches the parameters. */
  if (!isfinite(value) || !isfinite(norm))
    return efail(e, AD_ERR_NUMERIC,
                 "level '%s': step %lld: its loss is %g and its %sgradient's norm %g; the "
                 "parameters are left as they were",
                 U->name, (long long)U->count, value, U->l.n_deps ? "hyper" : "", norm);
  s = apply_step(e, u);
  if (s) return s;
  for (int d = 0; d < U->l.n_deps && !s; d++) s = advance_call(e, U->dep[d]);
  if (s) return s;
  U->count++;
  if (++U->k >= U->steps) {
    U->k = 0;
    U->pending = 0;
  }
  return AD_OK;
}

static ad_status advance_call(bl_engine *e, int id) {
  ad_status s = one_step(e, id);
  while (!s && e->lv[id].pending) s = one_step(e, id);
  return s;
}

/* ---------------------------------------------------------------- logging */

static void json_num(FILE *f, double x) {
  if (isfinite(x))
    fprintf(f, "%.17g", x);
  else
    fputs("null", f);
}

static void log_record(bl_engine *e, int validated) {
  ad_arena_stats as;
  ad_arena_stats_get(e->t, &as);
  double secs = bl__now() - e->t0, mb = (double)as.peak / 1048576.0;
  if (e->o.log_every > 0 && e->steps_done % e->o.log_every == 0) {
    FILE *f = e->o.progress ? e->o.progress : stdout;
    fprintf(f, "step %6lld", (long long)e->steps_done);
    for (int i = 0; i < e->n; i++) fprintf(f, "  %s %.5g", e->lv[i].name, e->lv[i].last_loss);
    fprintf(f, "  |hg| %.3e", e->hg_norm);
    if (validated) fprintf(f, "  val %.5g", e->last_metric);
    fprintf(f, "  %.2f s  arena %.1f MB\n", secs, mb);
    fflush(f);
  }
  if (e->o.json_path &&
      ((e->o.log_every > 0 && e->steps_done % e->o.log_every == 0) || validated)) {
    FILE *f = fopen(e->o.json_path, "a");
    if (!f) return; /* logging never stops a run */
    fprintf(f, "{\"step\":%lld,\"loss\":{", (long long)e->steps_done);
    for (int i = 0; i < e->n; i++) {
      fprintf(f, "%s\"%s\":", i ? "," : "", e->lv[i].name);
      json_num(f, e->lv[i].last_loss);
    }
    fputs("},\"hg_norm\":", f);
    json_num(f, e->hg_norm);
    if (validated) {
      fputs(",\"val\":", f);
      json_num(f, e->last_metric);
    }
    fputs(",\"seconds\":", f);
    json_num(f, secs);
    fputs(",\"arena_mb\":", f);
    json_num(f, mb);
    fputs("}\n", f);
    fclose(f);
  }
}

/* ---------------------------------------------------------------- running */

static ad_status need_built(bl_engine *e, const char *who) {
  if (!e) return ad__set_last(AD_ERR_NULL, "%s: engine is NULL", who);
  clear_error(e);
  if (!e->built) return efail(e, AD_ERR_STATE, "%s: call bl_engine_build first", who);
  return AD_OK;
}

ad_status bl_engine_step(bl_engine *e) {
  ad_status s = need_built(e, "bl_engine_step");
  if (s) return s;
  for (int i = 0; i < e->n && !s; i++)
    if (e->lv[i].n_up == 0) s = advance_call(e, i);
  if (s) return s;
  e->steps_done++;
  return AD_OK;
}

static void fill_result(const bl_engine *e, bl_engine_result *res, int stopped) {
  if (!res) return;
  res->steps = e->steps_done;
  res->stopped_early = stopped;
  res->best_metric = e->best;
  res->best_step = (int64_t)e->best_step;
  res->last_metric = e->last_metric;
  res->hg_norm = e->hg_norm;
}

ad_status bl_engine_run(bl_engine *e, int64_t n, bl_engine_result *res) {
  ad_status s = need_built(e, "bl_engine_run");
  if (s) return s;
  if (n < 0) return efail(e, AD_ERR_ARG, "bl_engine_run: n = %lld < 0", (long long)n);
  int stopped = 0;
  for (int64_t i = 0; i < n && !stopped; i++) {
    s = bl_engine_step(e);
    if (s) break;
    int validated = 0;
    if (e->o.val_every > 0 && e->o.validate && e->steps_done % e->o.val_every == 0) {
      double metric = NAN;
      ad_marker m = ad_mark(e->t);
      s = e->o.validate(e, e->t, &metric, e->o.validate_ctx);
      ad_rewind(e->t, m);
      if (s) {
        efrom(e, s, "bl_engine_run: validate");
        break;
      }
      validated = 1;
      e->n_val++;
      e->last_metric = metric;
      if (isnan(e->best) || metric < e->best - e->o.min_delta) {
        e->best = metric;
        e->best_step = (double)e->steps_done;
        e->bad = 0;
      } else if (++e->bad >= e->o.patience && e->o.patience > 0) {
        stopped = 1;
      }
    }
    log_record(e, validated);
  }
  fill_result(e, res, stopped);
  return s;
}

ad_status bl_engine_hypergrad(bl_engine *e, int id, ad_tensor *const *out, double *value) {
  ad_status s = need_built(e, "bl_engine_hypergrad");
  if (s) return s;
  if (id < 0 || id >= e->n)
    return efail(e, AD_ERR_ARG, "bl_engine_hypergrad: level %d out of range", id);
  level *U = &e->lv[id];
  if (!out) return efail(e, AD_ERR_NULL, "bl_engine_hypergrad: out is NULL");
  for (int i = 0; i < U->n; i++)
    if (!out[i] || out[i]->size != U->params[i]->size)
      return efail(e, AD_ERR_SHAPE,
                   "bl_engine_hypergrad: out[%d] is not shaped like '%s''s "
                   "parameter %d",
                   i, U->name, i);
  double v = NAN;
  s = compute_grad(e, id, &v);
  if (s) return s;
  for (int i = 0; i < U->n; i++) ad_copy_values(out[i], U->hg[i]);
  if (value) *value = v;
  return AD_OK;
}

int64_t bl_engine_steps_done(const bl_engine *e) {
  return e ? e->steps_done : 0;
}
int64_t bl_engine_level_steps(const bl_engine *e, int id) {
  return e && id >= 0 && id < e->n ? e->lv[id].count : -1;
}
double bl_engine_loss(const bl_engine *e, int id) {
  return e && id >= 0 && id < e->n ? e->lv[id].last_loss : NAN;
}
ad_rng *bl_engine_rng(bl_engine *e) {
  return e ? &e->rng : NULL;
}
ad_tape *bl_engine_tape(bl_engine *e) {
  return e ? e->t : NULL;
}

/* ---------------------------------------------------------------- state file */

static const char MAGIC[8] = {'H', 'T', 'E', 'N', 'G', 'I', 'N', 'E'};

static uint32_t crc_of(const unsigned char *p, size_t n) {
  uLong crc = crc32(0L, Z_NULL, 0);
  while (n > 0) { /* zlib takes uInt lengths */
    uInt k = n > (1u << 30) ? (1u << 30) : (uInt)n;
    crc = crc32(crc, p, k);
    p += k;
    n -= k;
  }
  return (uint32_t)crc;
}

static void put_f64(ad__bytebuf *b, double x) {
  uint64_t u;
  memcpy(&u, &x, 8);
  ad__bytebuf_put_le(b, u, 8);
}

static void put_tensor(ad__bytebuf *b, const ad_tensor *x) {
  ad__bytebuf_put_le(b, (uint64_t)x->dtype, 1);
  ad__bytebuf_put_le(b, (uint64_t)x->ndim, 1);
  for (int d = 0; d < x->ndim; d++) ad__bytebuf_put_le(b, (uint64_t)x->shape[d], 8);
  for (int64_t i = 0; i < x->size; i++) {
    if (x->dtype == AD_F64) {
      put_f64(b, ((const double *)x->data)[i]);
    } else {
      uint32_t u;
      memcpy(&u, (const float *)x->data + i, 4);
      ad__bytebuf_put_le(b, u, 4);
    }
  }
}

/* The state buffers of a level, in a fixed order. */
static int state_list(level *L, ad_tensor **out) {
  int k = 0;
  if (L->user) {
    for (int i = 0; i < L->l.step.slots * L->n; i++) out[k++] = L->us[i];
  } else {
    for (int i = 0; i < L->os.n; i++)
      if (L->os.m[i]) out[k++] = L->os.m[i];
    for (int i = 0; i < L->os.n; i++)
      if (L->os.v[i]) out[k++] = L->os.v[i];
  }
  return k;
}

static ad_status encode(bl_engine *e, ad__bytebuf *b) {
  ad__bytebuf_put(b, MAGIC, 8);
  ad__bytebuf_put_le(b, BL_ENGINE_STATE_VERSION, 4);
  ad__bytebuf_put_le(b, (uint64_t)e->n, 4);
  ad__bytebuf_put_le(b, (uint64_t)e->steps_done, 8);
  ad__bytebuf_put_le(b, (uint64_t)e->n_val, 8);
  ad__bytebuf_put_le(b, (uint64_t)e->bad, 8);
  put_f64(b, e->best);
  put_f64(b, e->best_step);
  put_f64(b, e->last_metric);
  put_f64(b, e->hg_norm);
  for (int i = 0; i < 4; i++) ad__bytebuf_put_le(b, e->rng.s[i], 8);
  put_f64(b, e->rng.spare);
  ad__bytebuf_put_le(b, (uint64_t)e->rng.has_spare, 4);
  for (int i = 0; i < e->n; i++) {
    level *L = &e->lv[i];
    size_t len = strlen(L->name);
    ad__bytebuf_put_le(b, len, 2);
    ad__bytebuf_put(b, L->name, len);
    ad__bytebuf_put_le(b, (uint64_t)L->count, 8);
    ad__bytebuf_put_le(b, (uint64_t)L->k, 8);
    ad__bytebuf_put_le(b, (uint64_t)L->draws, 8);
    ad__bytebuf_put_le(b, (uint64_t)L->pending, 4);
    put_f64(b, L->last_loss);
    ad__bytebuf_put_le(b, (uint64_t)L->n, 4);
    for (int j = 0; j < L->n; j++) put_tensor(b, L->params[j]);
    ad_tensor *sl[NN_MAX_PARAMS * BL_STEP_MAX_SLOTS];
    int ns = state_list(L, sl);
    ad__bytebuf_put_le(b, (uint64_t)(L->user ? 0 : L->os.step), 8);
    ad__bytebuf_put_le(b, (uint64_t)ns, 4);
    for (int j = 0; j < ns; j++) put_tensor(b, sl[j]);
  }
  uint32_t crc = crc_of(b->p, b->n);
  ad__bytebuf_put_le(b, crc, 4);
  if (b->oom) return efail(e, AD_ERR_NOMEM, "bl_engine_save: out of memory");
  return AD_OK;
}

ad_status bl_engine_save(bl_engine *e, const char *path) {
  ad_status s = need_built(e, "bl_engine_save");
  if (s) return s;
  if (!path) return efail(e, AD_ERR_NULL, "bl_engine_save: path is NULL");
  ad__bytebuf b = {0};
  s = encode(e, &b);
  if (s) {
    ad__bytebuf_free(&b);
    return s;
  }
  ad__afile af;
  int err = ad__afile_open(&af, path);
  if (err) {
    if (!af.tmp)
      s = efail(e, AD_ERR_NOMEM, "bl_engine_save: out of memory");
    else
      s = efail(e, AD_ERR_IO, "bl_engine_save: cannot create a temporary file %s: %s", af.tmp,
                strerror(err));
    ad__afile_finish(&af, path, err);
    ad__bytebuf_free(&b);
    return s;
  }
  size_t off = 0;
  while (!err && off < b.n) {
    ssize_t k = write(af.fd, b.p + off, b.n - off);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0)
      err = k < 0 && errno ? errno : EIO;
    else
      off += (size_t)k;
  }
  err = ad__afile_finish(&af, path, err);
  if (err)
    s = efail(e, AD_ERR_IO,
              "bl_engine_save: writing %s failed: %s (the old file, if any, is "
              "unchanged)",
              path, strerror(err));
  ad__bytebuf_free(&b);
  return s;
}

typedef struct {
  const unsigned char *p;
  size_t n, off;
  int bad;
} rd;

static uint64_t get_u(rd *r, int bytes) {
  if (r->bad || r->n - r->off < (size_t)bytes) {
    r->bad = 1;
    return 0;
  }
  uint64_t v = 0;
  for (int i = 0; i < bytes; i++) v |= (uint64_t)r->p[r->off + (size_t)i] << (8 * i);
  r->off += (size_t)bytes;
  return v;
}

static double get_f64(rd *r) {
  uint64_t u = get_u(r, 8);
  double x;
  memcpy(&x, &u, 8);
  return x;
}

/* Checks the next tensor against x; writes it into x when apply. */
static int get_tensor(rd *r, ad_tensor *x, int apply) {
  int dt = (int)get_u(r, 1), nd = (int)get_u(r, 1);
  if (r->bad || dt != (int)x->dtype || nd != x->ndim) return 0;
  for (int d = 0; d < nd; d++)
    if ((int64_t)get_u(r, 8) != x->shape[d]) return 0;
  size_t es = ad_dtype_size(x->dtype);
  if (r->bad || (r->n - r->off) / es < (size_t)x->size) return 0;
  for (int64_t i = 0; i < x->size; i++) {
    uint64_t u = get_u(r, (int)es);
    /* The engine stops before a non-finite value reaches a parameter or an
     * optimizer buffer, so a state that holds one is not one it wrote. */
    double v;
    if (x->dtype == AD_F64) {
      memcpy(&v, &u, 8);
    } else {
      uint32_t u32 = (uint32_t)u;
      float f;
      memcpy(&f, &u32, 4);
      v = f;
    }
    if (!isfinite(v)) return 0;
    if (!apply) continue;
    if (x->dtype == AD_F64) {
      memcpy((double *)x->data + i, &u, 8);
    } else {
      uint32_t u32 = (uint32_t)u;
      memcpy((float *)x->data + i, &u32, 4);
    }
  }
  return !r->bad;
}

#define LOAD_BAD(...)                                                                              \
  do {                                                                                             \
    if (!apply) efail(e, AD_ERR_FORMAT, __VA_ARGS__);                                              \
    return AD_ERR_FORMAT;                                                                          \
  } while (0)

/* One pass over the body: checks everything (apply 0) or writes it (1). */
static ad_status decode(bl_engine *e, const unsigned char *p, size_t n, int apply) {
  rd r = {p, n - 4, 8, 0};
  const char *who = "bl_engine_load";
  uint64_t ver = get_u(&r, 4), nl = get_u(&r, 4);
  if (ver != BL_ENGINE_STATE_VERSION)
    LOAD_BAD("%s: state version %llu, this library reads %d", who, (unsigned long long)ver,
             BL_ENGINE_STATE_VERSION);
  if (nl != (uint64_t)e->n)
    LOAD_BAD("%s: the file holds %llu levels, the engine %d", who, (unsigned long long)nl, e->n);
  int64_t steps_done = (int64_t)get_u(&r, 8), n_val = (int64_t)get_u(&r, 8),
          bad = (int64_t)get_u(&r, 8);
  double best = get_f64(&r), best_step = get_f64(&r), last = get_f64(&r), hgn = get_f64(&r);
  ad_rng rng;
  for (int i = 0; i < 4; i++) rng.s[i] = get_u(&r, 8);
  rng.spare = get_f64(&r);
  rng.has_spare = (int)get_u(&r, 4);
  if (r.bad) LOAD_BAD("%s: truncated header", who);
  if (steps_done < 0 || n_val < 0 || bad < 0 || (rng.has_spare != 0 && rng.has_spare != 1))
    LOAD_BAD("%s: counters out of range", who);
  for (int i = 0; i < e->n; i++) {
    level *L = &e->lv[i];
    size_t len = (size_t)get_u(&r, 2);
    if (r.bad || r.n - r.off < len || len != strlen(L->name) ||
        memcmp(r.p + r.off, L->name, len) != 0)
      LOAD_BAD("%s: level %d is not '%s' in the file", who, i, L->name);
    r.off += len;
    int64_t count = (int64_t)get_u(&r, 8), k = (int64_t)get_u(&r, 8), draws = (int64_t)get_u(&r, 8);
    int pending = (int)get_u(&r, 4);
    double ll = get_f64(&r);
    uint64_t nt = get_u(&r, 4);
    if (r.bad) LOAD_BAD("%s: level '%s': truncated", who, L->name);
    /* The counters are tied: draws = batches of the calls started. */
    int64_t expect = L->it ? (count - k) + (pending ? L->steps : 0) : 0;
    if (count < 0 || k < 0 || k >= L->steps || (pending != 0 && pending != 1) ||
        (!pending && k != 0) || draws != expect || count - k < 0)
      LOAD_BAD("%s: level '%s': inconsistent step counters", who, L->name);
    if (nt != (uint64_t)L->n)
      LOAD_BAD("%s: level '%s': %llu tensors in the file, %d in the engine", who, L->name,
               (unsigned long long)nt, L->n);
    for (int j = 0; j < L->n; j++)
      if (!get_tensor(&r, L->params[j], apply))
        LOAD_BAD("%s: level '%s': parameter %d differs in dtype or shape, is truncated or holds a "
                 "non-finite value",
                 who, L->name, j);
    ad_tensor *sl[NN_MAX_PARAMS * BL_STEP_MAX_SLOTS];
    int ns = state_list(L, sl);
    int64_t ostep = (int64_t)get_u(&r, 8);
    uint64_t nsf = get_u(&r, 4);
    if (r.bad || nsf != (uint64_t)ns || ostep < 0)
      LOAD_BAD("%s: level '%s': optimizer state does not match", who, L->name);
    for (int j = 0; j < ns; j++)
      if (!get_tensor(&r, sl[j], apply))
        LOAD_BAD("%s: level '%s': optimizer buffer %d differs, is truncated or holds a non-finite "
                 "value",
                 who, L->name, j);
    if (apply) {
      L->count = count;
      L->last_loss = ll;
      if (!L->user) L->os.step = ostep;
      /* Iterator: replay to the start of the current call, then draw it. */
      L->pending = 0;
      L->k = 0;
      L->draws = 0;
      if (L->it) {
        ds_iter_reset(L->it);
        for (int64_t q = 0; q < count - k; q++) {
          ad_status s = draw_one(e, L, 0);
          if (s) return s;
        }
      }
      if (pending) {
        ad_status s = ensure_batches(e, i);
        if (s) return s;
        L->k = k;
      }
    }
  }
  if (r.off != r.n) LOAD_BAD("%s: %zu bytes after the last level", who, r.n - r.off);
  if (apply) {
    e->steps_done = steps_done;
    e->n_val = n_val;
    e->bad = bad;
    e->best = best;
    e->best_step = best_step;
    e->last_metric = last;
    e->hg_norm = hgn;
    e->rng = rng;
  }
  return AD_OK;
}

ad_status bl_engine_load_bytes(bl_engine *e, const void *bytes, size_t len) {
  ad_status s = need_built(e, "bl_engine_load");
  if (s) return s;
  const unsigned char *p = bytes;
  if (!p && len) return efail(e, AD_ERR_NULL, "bl_engine_load: bytes are NULL");
  if (len < 8 + 4 + 4 || memcmp(p, MAGIC, 8) != 0)
    return efail(e, AD_ERR_FORMAT, "bl_engine_load: not an engine state (bad magic or too short)");
  uint32_t stored = 0;
  for (int i = 0; i < 4; i++) stored |= (uint32_t)p[len - 4 + (size_t)i] << (8 * i);
  uint32_t crc = crc_of(p, len - 4);
  if (stored != crc)
    return efail(e, AD_ERR_FORMAT,
                 "bl_engine_load: checksum mismatch (stored %08x, computed %08x): the file is "
                 "corrupt or truncated",
                 stored, crc);
  s = decode(e, p, len, 0);
  if (s) return s;
  s = decode(e, p, len, 1);
  return s;
}

ad_status bl_engine_load(bl_engine *e, const char *path) {
  ad_status s = need_built(e, "bl_engine_load");
  if (s) return s;
  if (!path) return efail(e, AD_ERR_NULL, "bl_engine_load: path is NULL");
  FILE *f = fopen(path, "rb");
  if (!f) return efail(e, AD_ERR_IO, "bl_engine_load: cannot open %s: %s", path, strerror(errno));
  ad__bytebuf b = {0};
  ad__bytebuf_read(&b, f);
  int err = ferror(f);
  fclose(f);
  if (err || b.oom) {
    ad__bytebuf_free(&b);
    return efail(e, err ? AD_ERR_IO : AD_ERR_NOMEM, "bl_engine_load: cannot read %s", path);
  }
  s = bl_engine_load_bytes(e, b.p, b.n);
  ad__bytebuf_free(&b);
  return s;
}
