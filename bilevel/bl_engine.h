/* bl_engine.h — levels and an engine: bilevel (and deeper) programs run in
 * dependency order, logged, validated, stopped early, saved and resumed.
 *
 * Two levels: a classifier (w) trained on L_train(w; lam), and above it a
 * weight decay lam learned by hypergradient descent on its own loss.
 *
 *     enum { CLS = 0, HPO = 1 };                   // ids: the order of bl_engine_add
 *     bl_engine *e = NULL;
 *     bl_engine_new(&e, &(bl_engine_opts){.log_every = 10});
 *     nn_opt_cfg sgd = {.kind = NN_OPT_SGD, .lr = 0.1}, adam = {.kind = NN_OPT_ADAM, .lr = 1e-2};
 *     bl_engine_add(e, &(bl_level){.name = "cls", .n = 1, .params = &w, .loss = cls_loss,
 *                                  .opt = &sgd, .steps = 5}, NULL);
 *     bl_engine_add(e, &(bl_level){.name = "hpo", .n = 1, .params = &lam, .loss = hpo_loss,
 *                                  .opt = &adam, .n_deps = 1,
 *                                  .deps = {{.level = "cls", .method = BL_UNROLL}}}, NULL);
 *     if (bl_engine_build(e) != AD_OK) printf("%s\n", bl_engine_errmsg(e));
 *     bl_engine_run(e, 100, NULL);                 // 100 hpo steps, 500 cls steps
 *     bl_engine_free(e);
 *
 * where a loss reads every level's parameters through the view it is given
 * (the test's: cls (w - 2)^2 + lam w^2, hpo (w - 1)^2; lam goes to 1):
 *     ad_tensor *cls_loss(ad_tape *t, const bl_vars *v, void *ctx) {
 *       ad_tensor *w = v->p[CLS][0], *lam = v->p[HPO][0], *d = ad_add_scalar(t, w, -2.0);
 *       return ad_add(t, ad_dot(t, d, d), ad_dot(t, ad_mul(t, lam, w), w));
 *     }
 * (tests/test_bl_engine.c, test_header_example, builds and runs exactly this.)
 *
 * The model
 * ---------
 * A level is a plain struct: a name, parameter tensors (or an nn_params
 * set), a loss, a step (a library optimizer or a user bl_step), a data set
 * to draw batches from, steps per call, an optional learning-rate schedule,
 * and for each level it depends on (a level BELOW it, whose parameters
 * respond to its own) the hypergradient method with its bl_opts. The
 * dependencies form a DAG, checked by bl_engine_build.
 *
 * One step of level U:
 *   1. its batches for the call (steps_U of them) are drawn once;
 *   2. its gradient: with no dependencies, grad of U's loss at the current
 *      values of every level; otherwise, for each dependency L, the edge's
 *      bl_* method on the bilevel problem
 *          w = L's parameters, lam = U's parameters,
 *          train_loss = L's loss,  val_loss = U's loss,
 *          inner optimizer = L's step,  T = L's steps per call,
 *      (summed over the dependencies, with U's direct gradient counted once);
 *   3. U's step on that gradient, in place (then the optional projection);
 *   4. each dependency L takes its steps_L steps (recursively): the steps
 *      the method just looked ahead through, now with U's new values.
 * One engine step is one call (steps_U steps) of every top level (a level
 * nobody depends on). A level shared by two upper levels trains after each.
 *
 * Deeper than two levels, exactly: when a method differentiates through L's
 * steps and L itself has dependencies, L's loss is evaluated, at each of
 * those steps, at the RESPONSE of the levels below it: steps_B recorded
 * steps of each level B below L from B's current values (gradients taken
 * with AD_GRAD_RECORD, so the response is a differentiable function of L's
 * parameters), recursively. A loss that reads a level below the method's
 * lower level also sees that response. So the top level's hypergradient in
 * a three-level chain T > M > B by bl_unroll is the exact derivative of
 *     T_loss(w_B(lam_K), lam_K, eta),  lam_{k+1} = step_M(lam_k, d/dlam M_loss(w_B(lam_k))),
 *     w_B(lam) = steps_B recorded steps of B from its current values,
 * a third-order tape (test_three_level_fd checks it against central
 * differences). The response of a level below is always its recorded
 * unroll (that is what can be differentiated again); the method named on
 * an edge chooses how that edge's upper level gets its hypergradient in its
 * own step. Within one look-ahead the levels below restart from their
 * current values at each step of the level above (they do not warm-start
 * along the look-ahead): a short-horizon model of how they will move.
 * Methods start the inner optimizer state from zero (bl_problem has no
 * initial state); the responses start from the level's current state.
 *
 * Errors are statuses with a message on the engine (bl_engine_errmsg), as
 * on the tape. bl_engine_build names the levels involved in any problem it
 * finds (a cycle, an unknown dependency, a missing loss or step, a method
 * that does not fit its edge, a loss that fails or is not a scalar on a
 * first dry evaluation), so nothing of the kind surfaces mid-run.
 */
#ifndef HYPERTAPE_BL_ENGINE_H
#define HYPERTAPE_BL_ENGINE_H

#include "bilevel/bl.h"
#include "datasets/ds.h"

#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BL_ENGINE_MAX_LEVELS 16
#define BL_LEVEL_MAX_DEPS 8

/* Version of the state file written by bl_engine_save. */
#define BL_ENGINE_STATE_VERSION 1

/* Every hypergradient method of bl.h, by enum or by name (the function's
 * name without bl_: "unroll", "cg", ...). */
typedef enum {
  BL_UNROLL = 0,
  BL_FORWARD,
  BL_CHECKPOINTED,
  BL_DRMAD,
  BL_FO,
  BL_ONE_STEP,
  BL_T1T2,
  BL_GREEDY,
  BL_HYPERDISTILL,
  BL_NEUMANN,
  BL_CG,
  BL_FIXED_POINT,
  BL_HOAG,
  BL_EXACT,
  BL_ZERO_ORDER,
  BL_SAMA,
  BL_REVERSIBLE, /* heavy-ball momentum only (bilevel/reversible.c) */
  BL_METHOD_COUNT
} bl_method;

/* Name of a method ("unroll"), NULL when out of range. */
const char *bl_method_name(bl_method m);
/* The method of that name, or -1. */
int bl_method_from_name(const char *name);
/* Its function (NULL when out of range). */
bl_method_fn bl_method_function(bl_method m);

/* The view a loss reads: p[id] is level id's parameter list (id = the order
 * of bl_engine_add), each either the current heap tensors or, while a
 * method differentiates, tape tensors standing for them: read parameters
 * ONLY through this view. The batch is the evaluated level's own (NULL /
 * 0 when it has no data): x [batch, ...] in the data set's dtype, labels
 * (batch int32, -1 past n) or NULL, y or NULL; n rows are real. step is the
 * index of the step within the level's call (0 .. steps-1). */
typedef struct {
  ad_tensor *const *p[BL_ENGINE_MAX_LEVELS];
  int self; /* the level whose loss this is */
  int64_t step;
  ad_tensor *x, *y;
  const int32_t *labels;
  int64_t n;
} bl_vars;

typedef ad_tensor *(*bl_level_loss_fn)(ad_tape *t, const bl_vars *v, void *ctx);

/* Learning-rate multiplier at the level's step count (0, 1, ...): the
 * step uses lr * schedule(k). Only for a numeric lr (not lr_var/lr_vars). */
typedef double (*bl_schedule_fn)(int64_t k, void *ctx);

/* Called after each in-place step of the level (e.g. keep decays >= 0). */
typedef void (*bl_project_fn)(int n, ad_tensor *const *params, void *ctx);

/* A dependency: the level below and the method that differentiates
 * through it. method_name, when set, takes precedence over method. */
typedef struct {
  const char *level;
  bl_method method;
  const char *method_name;
  bl_opts opts;
  int force; /* accept a method the build would refuse as unfit (see build) */
} bl_dep;

typedef struct bl_level {
  const char *name; /* unique, 1..NN_NAME_MAX-1 characters */
  /* parameters: n heap tensors (trained in place, one dtype) or a set */
  int n;
  ad_tensor *const *params;
  nn_params *set; /* used when params is NULL */
  bl_level_loss_fn loss;
  void *ctx; /* passed to loss */
  /* the step: a library optimizer (its *_var fields may point at the
   * parameters of a level above) or a user step (step.fn set; its lam
   * argument is the parameters of the level above, NULL for a top level) */
  const nn_opt_cfg *opt;
  bl_step step;
  /* batches: drawn from data by an iterator the engine owns (NULL: none) */
  const ds_dataset *data;
  ds_iter_opts batch;
  int64_t steps; /* steps per call (the unroll length seen from above); 0 = 1 */
  bl_schedule_fn schedule;
  void *schedule_ctx;
  bl_project_fn project;
  void *project_ctx;
  int n_deps;
  bl_dep deps[BL_LEVEL_MAX_DEPS];
} bl_level;

typedef struct bl_engine bl_engine;

/* Validation: *metric (lower is better) at the current values. */
typedef ad_status (*bl_validate_fn)(bl_engine *e, ad_tape *t, double *metric, void *ctx);

typedef struct {
  size_t arena_mb, arena_max_mb; /* the engine's tape (defaults 64 and 4096) */
  int64_t log_every;             /* progress line every N engine steps (0: none) */
  FILE *progress;                /* where (NULL: stdout) */
  const char *json_path;         /* the same records as JSON lines, appended (NULL: none) */
  int64_t val_every;             /* validate every N engine steps (0: never) */
  bl_validate_fn validate;
  void *validate_ctx;
  int64_t patience; /* stop after this many validations without improvement (0: never) */
  double min_delta; /* an improvement is metric < best - min_delta */
  uint64_t seed;    /* the engine's rng (bl_engine_rng), saved with the state */
} bl_engine_opts;

typedef struct {
  int64_t steps;      /* engine steps taken (all runs, resumed ones included) */
  int stopped_early;  /* patience ran out */
  double best_metric; /* best validation metric (NAN: none yet) */
  int64_t best_step;  /* engine step where it was reached */
  double last_metric; /* last validation (NAN: none) */
  double hg_norm;     /* norm of the last hypergradient (all levels) */
} bl_engine_result;

/* Makes an engine with its own tape. opts may be NULL. */
ad_status bl_engine_new(bl_engine **out, const bl_engine_opts *opts);
/* Frees it (not the levels' parameters or data). Accepts NULL. */
void bl_engine_free(bl_engine *e);
/* Message of the first error ("" when none) and its status. */
const char *bl_engine_errmsg(const bl_engine *e);
ad_status bl_engine_status(const bl_engine *e);

/* Copies the level (names and deps are copied; tensors, data and ctx are
 * borrowed and must outlive the engine); *id (may be NULL) its index in
 * bl_vars.p. Before bl_engine_build only. */
ad_status bl_engine_add(bl_engine *e, const bl_level *l, int *id);

/* Checks the graph and every level, refusing with AD_ERR_ARG (or
 * AD_ERR_SHAPE, AD_ERR_NULL) and a message naming the levels:
 * - an unknown or duplicated name, a dependency on itself, a cycle (the
 *   message prints it: "a -> b -> a");
 * - a level without parameters, loss or step (neither opt nor step.fn);
 * - a schedule on a learning rate that is a tape variable;
 * - a method that does not fit its edge (unless the dep says force):
 *   forward with more than 4096 scalar hyperparameters (T * P JVPs per
 *   call), exact with more than 4096 inner parameters (a dense N x N
 *   Hessian), an implicit method (neumann, cg, fixed_point, hoag, exact,
 *   sama) when the upper level's parameters are the lower one's optimizer
 *   settings (at w* they have no effect: the answer would be 0),
 *   gauss_newton (a level has no output/loss split), neumann over a
 *   user step without opts.alpha, more than NN_MAX_PARAMS tensors;
 * - a user step on a level with two or more levels above it (its lam
 *   argument, the parameters of the level above, would be ambiguous);
 * - a loss that records an error or returns a non-scalar when evaluated
 *   once at the current values (shape mismatches surface here).
 * On success the iterators are made and the optimizer states zeroed. Once
 * per engine: after a failed build, make a new one. */
ad_status bl_engine_build(bl_engine *e);

/* One engine step / n of them with validation, early stopping and logging
 * (res may be NULL). */
ad_status bl_engine_step(bl_engine *e);
ad_status bl_engine_run(bl_engine *e, int64_t n, bl_engine_result *res);

/* The gradient level id's next step would take (a hypergradient when it
 * has dependencies), at the current state, without changing anything (the
 * batches it draws are kept for that step). out: heap tensors shaped like
 * its parameters; *value (may be NULL) its loss as the method saw it
 * (bl_stats.val_loss; the plain loss for a level without dependencies). */
ad_status bl_engine_hypergrad(bl_engine *e, int id, ad_tensor *const *out, double *value);

/* Counters and values. */
int bl_engine_find(const bl_engine *e, const char *name);  /* -1 if none */
int64_t bl_engine_steps_done(const bl_engine *e);          /* engine steps */
int64_t bl_engine_level_steps(const bl_engine *e, int id); /* in-place steps of a level */
double bl_engine_loss(const bl_engine *e, int id);         /* last loss seen (NAN: none) */
ad_rng *bl_engine_rng(bl_engine *e);                       /* saved and restored */
ad_tape *bl_engine_tape(bl_engine *e);                     /* for validation callbacks */

/* The whole state: every level's parameters and optimizer state, step
 * counters, iterator positions, the engine rng, early-stopping and log
 * counters. Format (little-endian): "HTENGINE", u32 version, u32 levels,
 * per level its name, counters, tensors (dtype, ndim, shape, values) and
 * state buffers, then u32 CRC-32 of every byte before it. save writes a
 * temporary file in the same directory, fsyncs and renames it over path
 * (AD_ERR_IO on failure, the old file kept). load checks everything (magic,
 * version, length, checksum, names, dtypes and shapes against this
 * engine's levels) before changing anything: AD_ERR_FORMAT for a corrupt,
 * truncated or foreign file, the engine untouched. load_bytes does the
 * same on a buffer (the fuzz target's entry). Iterators are restored by
 * replaying their draws from a reset (the file holds the count, not the
 * batches; ds.h has no iterator state to save). After build only. Not in the
 * file: what the caller owns (a bl_opts.hoag state, ctx contents), so a
 * HOAG warm start restarts cold after a resume. */
ad_status bl_engine_save(bl_engine *e, const char *path);
ad_status bl_engine_load(bl_engine *e, const char *path);
ad_status bl_engine_load_bytes(bl_engine *e, const void *bytes, size_t len);

#ifdef __cplusplus
}
#endif
#endif
