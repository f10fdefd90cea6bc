/* bl.h — hypergradient methods, each a short composition of tape ops.
 *
 * The bilevel problem:   min_lam  L_val(w*(lam), lam)
 *                        w*(lam) ~ w_T = Phi^T(w_0, lam)   (T inner steps)
 * and its hypergradient by the chain rule over the inner trajectory:
 *   dL_val/dlam = dL_val/dlam|direct + sum_t alpha_t (prod_{s>t} A_s) B_t,
 *   alpha_t = grad_w L_val(w_T) pulled back to step t,  A_s = dPhi/dw,
 *   B_t = dPhi/dlam.
 * Every method here computes or approximates that sum; see each file.
 *
 * Usage:
 *     bl_problem p = {.n_w = 2, .w0 = w0, .n_lam = 1, .lam = lam,
 *                     .train_loss = my_train, .val_loss = my_val, .ctx = &data,
 *                     .opt = {.kind = NN_OPT_SGD, .lr = 0.1}, .inner_steps = 100};
 *     ad_tensor *hg[1];            // heap tensors shaped like lam, filled in
 *     bl_stats st;
 *     bl_unroll(tape, &p, &(bl_opts){0}, hg, &st);
 *
 * The inner step Phi is the problem's library optimizer (p->opt; e.g.
 * nn_opt_momentum(0.1, 0.0) for an explicit zero) or any rule the user
 * writes (p->step, see "the inner step" below): every method runs it
 * through the same interface, so a hand-written optimizer gets every
 * method.
 *
 * Non-finite values are errors, not results: every method checks the
 * training loss at each inner step, the iterates it keeps, L_val and its
 * result, and fails with AD_ERR_NUMERIC naming where it broke ("train_loss
 * is inf at inner step 51", "... at solver iteration 3"), leaving hg
 * untouched; bad settings (optimizer numbers, NaN tape hyperparameters,
 * eps, alpha, ...) are AD_ERR_ARG naming the value, before any work.
 */
#ifndef HYPERTAPE_BL_H
#define HYPERTAPE_BL_H
#include "autodiff/ad.h"
#include "nn/nn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A loss that records on the tape and returns a scalar. `step` is the inner
 * step index for training losses (pick the batch with it) and -1 for the
 * validation loss. */
typedef ad_tensor *(*bl_loss_fn)(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam,
                                 int64_t step, void *ctx);

/* Gauss-Newton split of the training loss (optional; see bl_problem):
 * model outputs f(w, lam) of any shape, recorded on the tape ... */
typedef ad_tensor *(*bl_output_fn)(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam,
                                   int64_t step, void *ctx);
/* ... and the scalar loss l(f, lam) of those outputs. */
typedef ad_tensor *(*bl_out_loss_fn)(ad_tape *t, ad_tensor *out, ad_tensor *const *lam,
                                     int64_t step, void *ctx);

/* ------------------------------------------------------------------ the inner step
 * Any inner update rule, written by the user with public ops so it records on
 * the tape like everything else:
 *     (w_t, s_t, g_t, lam, t)  ->  (w_{t+1}, s_{t+1})
 * w, g: n_w tensors (g = grad_w L_train(w_t, lam), weight decay of a library
 * optimizer already folded in by the provider); state: n_w * slots tensors,
 * slot k of parameter i at index k * n_w + i, each shaped like w[i] and zero at
 * step 0; lam: the problem's hyperparameters (the method's leaf views: read
 * them through this argument, never through pointers saved elsewhere, or the
 * hypergradient does not reach them); step: the 0-based step index t.
 * The rule fills w_new[0..n_w) and state_new[0..n_w*slots) with tensors made
 * by public ops from its inputs (it may return an input unchanged) and returns
 * AD_OK, or an error it has recorded on the tape. It must not modify its
 * inputs: the methods call it with recording on (to differentiate through it)
 * and off (to run it fast), and call it again at the same point. */
typedef ad_status (*bl_step_fn)(ad_tape *t, int n_w, ad_tensor *const *w, ad_tensor *const *state,
                                ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                                ad_tensor **w_new, ad_tensor **state_new);

/* A step: the rule, its state size and its context. fn NULL = no user step
 * (the problem's nn_opt_cfg is used: the library's optimizers are providers
 * of this same interface). */
/* Optional initial state of a user step (NULL = zeros): called once per
 * trajectory with the state buffers (zeros on entry, arena tensors shaped
 * like w0) to write their values in place (ad_set, ad_copy_values, ...).
 * The initial state is a constant: it is not differentiated. */
typedef ad_status (*bl_step_init_fn)(ad_tape *t, int n_w, ad_tensor *const *w0,
                                     ad_tensor *const *state, void *ctx);

typedef struct {
  bl_step_fn fn;
  int slots;            /* state buffers per parameter, 0..BL_STEP_MAX_SLOTS */
  void *ctx;            /* passed to fn */
  const char *name;     /* for messages and logs; NULL = "user step" */
  bl_step_init_fn init; /* optional: non-zero initial state */
} bl_step;

#define BL_STEP_MAX_SLOTS 2

/* A user step, heavy-ball momentum with the learning rate lam[0] (a
 * scalar) and mu = 0.9 (tests/test_bl_steps.c runs it through every
 * method and gets NN_OPT_MOMENTUM's hypergradients bit for bit):
 *
 *     static ad_status heavy_ball(ad_tape *t, int n, ad_tensor *const *w,
 *                                 ad_tensor *const *s, ad_tensor *const *g,
 *                                 ad_tensor *const *lam, int64_t step, void *ctx,
 *                                 ad_tensor **w_new, ad_tensor **s_new) {
 *       for (int i = 0; i < n; i++) {
 *         s_new[i] = ad_add(t, ad_scale(t, s[i], 0.9), g[i]);      // m' = mu m + g
 *         w_new[i] = ad_sub(t, w[i], ad_mul(t, lam[0], s_new[i])); // w' = w - lr m'
 *       }
 *       return ad_tape_status(t);
 *     }
 *     bl_problem p = {..., .step = {.fn = heavy_ball, .slots = 1, .name = "heavy ball"}};
 *
 * Where the methods need more than the rule itself: the implicit methods
 * take H = d^2 L_train/dw^2 (a user step adds no decay term to L_train: put
 * any decay in train_loss), neumann needs o->alpha (a user step has no
 * learning rate to default to), and fixed_point iterates the step's own
 * adjoint map (see below). */

typedef struct {
  int n_w;
  ad_tensor *const *w0; /* inner parameters at the start; never modified */
  int n_lam;
  ad_tensor *const *lam; /* hyperparameters (heap leaves); never modified */
  bl_loss_fn train_loss; /* L_train(w, lam) */
  bl_loss_fn val_loss;   /* L_val(w, lam) */
  void *ctx;
  nn_opt_cfg opt;      /* inner optimizer; its *_var fields may point into lam */
  bl_step step;        /* user inner step; when step.fn is set it replaces opt */
  int64_t inner_steps; /* T */
  /* Optional split used only by the Gauss-Newton option of the implicit
   * methods (bl_opts.gauss_newton): L_train(w, lam) must equal
   *     train_out_loss(train_output(w, lam), lam) + train_reg(w, lam)
   * (train_reg NULL = 0), e.g. f = the network's logits, l = cross-entropy,
   * R = weight decay. The curvature used is then
   *     G = J^T H_l J + H_R,   J = df/dw,  H_l = d^2 l/df^2,  H_R = d^2 R/dw^2,
   * which is positive semi-definite whenever l and R are convex (the inner
   * optimizer's own L2 decay, if any, is added to R by the methods). The
   * methods check that the split adds up to train_loss at w_T and return
   * AD_ERR_ARG if it does not. Evaluated at step index max(T - 1, 0). */
  bl_output_fn train_output;     /* f(w, lam) */
  bl_out_loss_fn train_out_loss; /* l(f, lam) */
  bl_loss_fn train_reg;          /* R(w, lam), or NULL */
} bl_problem;

/* State buffers per parameter of the problem's step: p->step.slots for a
 * user step, else the library optimizer's (SGD 0, momentum, Nesterov and
 * RMSprop 1, Adam and AdamW 2). -1 for a NULL problem, an unknown
 * optimizer kind or slots out of range (message in ad_last_error()). */
int bl_step_slots(const bl_problem *p);

enum {
  BL_STEP_INPLACE = 0, /* overwrite w and state with the new values, record nothing */
  BL_STEP_RECORD = 1   /* record the step on the tape; results in w_new, state_new */
};

/* Applies the problem's step (user step or library optimizer) once:
 *   (w, state) -> (w', state')  at step index `step`.
 * state: bl_step_slots(p) * p->n_w tensors shaped like w (slot k of
 * parameter i at k * n_w + i; zeros at step 0; may be NULL when there are
 * no slots). g: grad_w L_train(w, lam) (without the library optimizer's
 * decay, which the step adds itself), or NULL to have it computed here
 * from p->train_loss at index `step` (recorded in BL_STEP_RECORD mode, so
 * the step's derivative includes the loss's second derivatives). lam: the
 * hyperparameters the step and the loss see (NULL = p->lam; library
 * *_var fields that point into p->lam are read from lam).
 *   BL_STEP_INPLACE: w and state (writable tensors) receive w', state';
 *     w_new and state_new are ignored (may be NULL); the arena is left as
 *     found.
 *   BL_STEP_RECORD: w_new[0..n_w) and state_new[0..slots*n_w) receive tape
 *     tensors (differentiable in w, state, g and lam); nothing passed in is
 *     modified.
 * Errors (AD_ERR_NULL, AD_ERR_SHAPE, AD_ERR_ARG, the step's own status,
 * AD_ERR_NUMERIC for a non-finite loss) go on the tape, named
 * "bl_step_apply: step '<name>' ..."; on error nothing is written. */
ad_status bl_step_apply(ad_tape *t, const bl_problem *p, ad_tensor *const *lam, ad_tensor *const *w,
                        ad_tensor *const *state, ad_tensor *const *g, int64_t step, int mode,
                        ad_tensor **w_new, ad_tensor **state_new);

typedef struct {
  int64_t inner_steps;     /* inner optimizer steps taken */
  int64_t hvps;            /* Hessian- (or Jacobian-) vector products used */
  int64_t iterations;      /* solver iterations (CG, Neumann, ...) */
  size_t peak_arena_bytes; /* high-water mark of the tape's arena in the call */
  double seconds;
  double val_loss; /* L_val at the final inner iterate */
  double residual; /* implicit solvers: final ||H x - b|| */
} bl_stats;

/* HOAG (Pedregosa 2016) state carried across outer iterations: the previous
 * solution of H x = grad_w L_val (warm start) and a CG tolerance that
 * shrinks geometrically from call to call, so early outer steps are cheap
 * and late ones accurate. Zero-initialise it ((bl_hoag_state){0} or with
 * designated fields), point bl_opts.hoag at it, and free it with
 * bl_hoag_state_free. */
typedef struct bl_hoag_state {
  double tol0;    /* first relative tolerance (default 1e-2) */
  double decay;   /* tol <- max(tol * decay, tol_min) after each call (default 0.5) */
  double tol_min; /* floor (default bl_opts.tol, else 1e-10) */
  /* filled in by bl_hoag */
  double tol;                  /* tolerance the next call will use (0 = tol0) */
  int64_t calls;               /* bl_hoag calls made with this state */
  int64_t last_iterations;     /* CG iterations of the last call */
  int64_t total_iterations;    /* summed over calls */
  int n;                       /* tensors held in x */
  ad_tensor *x[NN_MAX_PARAMS]; /* previous solution (heap), shaped like w */
} bl_hoag_state;

/* Frees the held solution and zeroes the filled-in fields (keeps tol0,
 * decay, tol_min). Accepts NULL. */
void bl_hoag_state_free(bl_hoag_state *s);

/* Options. Zero means the default named here (the implicit methods' K,
 * tol and alpha: see their comment below). */
typedef struct {
  int64_t K;                /* unroll: backprop through the last K steps (0 or >= T: all);
                               implicit solvers: iterations / Neumann terms */
  double tol;               /* solver tolerance */
  double alpha;             /* Neumann / fixed-point step (default: the inner lr) */
  double gamma;             /* greedy / HyperDistill decay, in (0, 1]; default 0.9 */
  double eps;               /* finite-difference step: T1-T2 DARTS eps_i = eps max(1, |lam_i|),
                               default cbrt(machine epsilon of the dtype); SAMA perturbation
                               norm, default cbrt(machine epsilon) max(1, ||w_T||) */
  int darts_fd;             /* T1-T2: B_t by central differences instead of the tape */
  int gauss_newton;         /* implicit methods: J^T H_out J in place of the Hessian */
  double damping;           /* added to the Hessian's diagonal (implicit methods) */
  int64_t checkpoint_every; /* checkpointed unroll; default sqrt(T) */
  int64_t distill_every;    /* HyperDistill: theta re-estimated every this many steps;
                               default T (once) */
  int64_t samples;          /* zero-order: directions; default 16 */
  double sigma;             /* zero-order: smoothing radius; default 1e-2 */
  int antithetic;           /* zero-order: +/- pairs (2 inner runs per direction) */
  uint64_t seed;            /* zero-order: seeds the directions */
  int warm_start;           /* HOAG: keep the previous solution (bl_hoag_state) */
  /* Keep everything the method recorded on the tape instead of rewinding it:
   * for drawing a real method's graph (ad_tape_dot_ex) or inspecting it. The
   * caller rewinds (take an ad_mark before the call). Memory then grows with
   * the work done. Honoured by the methods built on the shared trajectory
   * helpers (unroll, truncated unroll, fo, one_step, t1t2, and the inner runs
   * of the others); a method's own scratch rewinds may still free what only
   * it used. Results do not change. */
  int keep_tape;
  bl_hoag_state *hoag; /* HOAG: state across calls; NULL = plain CG at tol */
} bl_opts;

/* Every method: fills hg[k] (caller's heap tensors shaped like lam[k]) with
 * the hypergradient estimate, fills st if not NULL, and leaves the tape as it
 * found it (everything it recorded is rewound). Returns AD_OK or the error;
 * on error hg is left untouched. */
typedef ad_status (*bl_method_fn)(ad_tape *t, const bl_problem *p, const bl_opts *o,
                                  ad_tensor *const *hg, bl_stats *st);

/* Iterative differentiation (bilevel/unroll.c, forward.c, checkpoint.c,
 * drmad.c, reversible.c): the chain-rule sum over the trajectory itself.
 *   unroll:       all T steps recorded (each step's L_train gradient with its
 *                 own backward), then one reverse sweep, walked back in
 *                 ~16 chunks so the peak is the forward tape plus one chunk's
 *                 backward. Exact for the trajectory. o->K in 1..T-1: the
 *                 first T-K steps run in place and the record starts from a
 *                 detached w_{T-K}: the K-step truncated hypergradient
 *                 (Shaban et al. 2019). st->hvps = steps walked back.
 *   forward:      tangents dw_t/dlam_j (and the state's) carried forward, one
 *                 JVP per scalar hyperparameter per step (Franceschi et al.
 *                 2017): memory independent of T, cost T * dim(lam). The same
 *                 number as unroll.
 *   checkpointed: the unroll's number in O(sqrt T) memory: (w, state) saved
 *                 every o->checkpoint_every steps (default ceil(sqrt T)) in
 *                 an in-place forward run, each segment re-recorded and
 *                 walked back from the last.
 *   drmad:        the reverse sweep along the straight line w_T -> w_0 (and
 *                 s_T -> s_0) instead of the stored trajectory (Fu et al.
 *                 2016): memory of one step; exact when the trajectory is a
 *                 line (T = 1). Needs T >= 1.
 *   reversible:   heavy-ball momentum (NN_OPT_MOMENTUM) only: the unroll's
 *                 number with the trajectory run in fixed point and walked
 *                 back exactly from w_T (Maclaurin et al. 2015), keeping only
 *                 the bits the momentum decay destroys; see reversible.c. */
ad_status bl_unroll(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                    bl_stats *st); /* o->K > 0: backprop through the last K steps only */
ad_status bl_forward(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                     bl_stats *st);
ad_status bl_checkpointed(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                          bl_stats *st);
ad_status bl_drmad(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                   bl_stats *st);
/* Exact reversible unroll (bilevel/reversible.c; Maclaurin et al. 2015): NN_OPT_MOMENTUM
 * only, run in fixed point and walked back exactly from w_T; the same answer as bl_unroll
 * with memory O(n_w) plus ~-log2(momentum) bits per element and step (counted in
 * st->peak_arena_bytes). Other optimizers and user steps: AD_ERR_ARG. */
ad_status bl_reversible(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                        bl_stats *st);

/* Short-horizon approximations (bilevel/fo.c, one_step.c, t1t2.c, greedy.c,
 * hyperdistill.c): cheaper estimates that keep only part of the sum. With
 * alpha_t = grad_w L_val at the iterate named and B_t = dPhi/dlam of the
 * step into w_t (from w_{t-1}, s_{t-1} held fixed):
 *   fo:           dL_val/dlam|direct at w_T only (zero for a hyperparameter
 *                 that is not in L_val). T = 0 allowed.
 *   one_step:     direct + alpha_T B_T: the last step's term (= unroll with
 *                 K = 1, HyperDistill with gamma = 0). Needs T >= 1.
 *   t1t2:         the same number (Luketina et al. 2016); with o->darts_fd,
 *                 alpha_T B_T by a central difference of the step in each
 *                 element of lam (DARTS, Liu et al. 2019), step
 *                 o->eps max(1, |lam_i|) (eps >= 0; 0 = cbrt(machine eps)):
 *                 no derivative of the step at all, two steps per element.
 *   greedy:       direct + sum_t gamma^{T-t} alpha_t B_t with alpha_t taken at
 *                 w_t itself, not pulled back (the products of A replaced by
 *                 gamma^{T-t} I); o->gamma in (0, 1], default 0.9. gamma = 1
 *                 and T = 1 give the unroll. Needs T >= 1.
 *   hyperdistill: greedy's decayed sum distilled into one term at the EMA
 *                 point w*_T of the iterates, N_T alpha_T B(w*_T), scaled by a
 *                 theta fitted to a DrMAD estimate every o->distill_every
 *                 steps (default T) (Lee et al. 2022); o->gamma as greedy.
 *                 Needs T >= 1. */
ad_status bl_fo(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                bl_stats *st);
ad_status bl_one_step(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                      bl_stats *st);
ad_status bl_t1t2(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                  bl_stats *st);
ad_status bl_greedy(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                    bl_stats *st);
ad_status bl_hyperdistill(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                          bl_stats *st);

/* Implicit differentiation at w_T ~ w* (bilevel/neumann.c, cg.c, fixed_point.c,
 * hoag.c, exact.c). Each runs the T inner steps in place (no recording),
 * then, with H = d^2 L_train/dw^2 at w_T (+ o->damping I; with
 * o->gauss_newton the matrix G of bl_problem instead), solves
 *     H v = grad_w L_val(w_T, lam)
 * and returns  dL_val/dlam|direct - (d^2 L_train / dlam dw) v,
 * the implicit-function-theorem hypergradient; exact when w_T = w*.
 * Defaults: K = 20 (hoag 100; exact: unused), tol = 1e-10 relative residual
 * ||H v - b|| <= tol ||b||, alpha = the inner lr. st->hvps counts
 * curvature products plus one for the mixed partial; st->residual is the
 * final ||H v - b|| (neumann: NAN, it does not form it).
 * L_train here includes the inner optimizer's own L2 decay (opt.weight_decay
 * and its *_var(s)): L_eff = L_train + sum_i (wd_i/2) ||w_i||^2, whose
 * stationary point the inner run converges to; it is evaluated at step
 * index max(T - 1, 0), the last batch the inner run saw. With a user step
 * L_eff = L_train (a user step's decay is not known to the methods: put it
 * in train_loss); the inner run is the user's step.
 *   neumann:     v = alpha sum_{j=0}^{K} (I - alpha H)^j b   (K + 1 terms, K products;
 *                converges when 0 < alpha < 2 / lambda_max(H); a term
 *                growing past 2 ||b|| is AD_ERR_NUMERIC naming the
 *                iteration). A user step has no lr: set o->alpha
 *   fixed_point: the inner step's own fixed point, differentiated (Grazzi
 *                et al. 2020): u <- A^T u + b on (w, state), A = d step /
 *                d(w, state) at w_T, from u = 0 (one VJP of the step per
 *                iteration, no H formed, no alpha needed, any step), then
 *                hg = direct + B^T u; at most K iterations, stops at tol
 *                on ||A^T u + b - u||. For SGD this is exactly
 *                v <- v - lr (H v - b). With o->alpha, o->damping or
 *                o->gauss_newton set: that Richardson iteration on the
 *                curvature system with the given alpha instead
 *   cg:          conjugate gradients from v = 0, at most K steps, stops at tol
 *   hoag:        cg with o->hoag's decreasing tolerance, warm-started from
 *                the previous call's v when o->warm_start (o->hoag NULL: cg)
 *   exact:       dense H from one product per column, LU with partial
 *                pivoting in f64; for small problems (the test oracle). */
ad_status bl_neumann(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                     bl_stats *st);
ad_status bl_cg(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                bl_stats *st);
ad_status bl_fixed_point(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                         bl_stats *st);
ad_status bl_hoag(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                  bl_stats *st);
ad_status bl_exact(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                   bl_stats *st);

/* Derivative-free and preconditioned estimates (bilevel/zero_order.c, sama.c).
 *   zero_order: Gaussian-smoothing (ES) estimate from values of
 *               L_val(w_T(lam + sigma u), ...) over o->samples directions
 *               (default 16; o->antithetic: +/- pairs), o->sigma (default
 *               1e-2), o->seed; the inner runs are the step run in place at
 *               the perturbed lam, so any step, differentiable or not.
 *   sama:       (Choe et al. 2023) H^{-1} replaced by the step's own
 *               sensitivity to its gradient, P = -d step/d g at the last
 *               step (one VJP: for any step, library or user, P is whatever
 *               preconditioner the rule applies), the mixed partial by one
 *               central difference of radius o->eps (finite, >= 0; 0 =
 *               default). Covers hyperparameters of L_train; a step
 *               hyperparameter (lr_var, a user step's lam) gets only its
 *               direct term. Needs T >= 1. */
ad_status bl_zero_order(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                        bl_stats *st);
ad_status bl_sama(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                  bl_stats *st);

/* The curvature product the implicit methods use, at the given w (and
 * lam): out[i] = ((H or G) + o->damping I) v, H = d^2 L_eff/dw^2 (L_eff
 * as above, at step index max(T - 1, 0); G with o->gauss_newton). w, v and
 * out are caller tensors shaped like w0; no inner steps are run. For
 * teaching and checking; leaves the tape as found. */
ad_status bl_curvature_product(ad_tape *t, const bl_problem *p, const bl_opts *o,
                               ad_tensor *const *w, ad_tensor *const *v, ad_tensor *const *out);

/* ------------------------------------------------------------------ meta-learning */

/* A per-task loss at parameters `params` (shaped like theta). */
typedef ad_tensor *(*bl_task_loss_fn)(ad_tape *t, ad_tensor *const *params, int task, void *ctx);

/* A batch of tasks' loss at stacked parameters: params[i] is
 * [n, theta[i]'s shape...], index j of the leading axis holding task
 * task0 + j's parameters; returns the SUM over those n tasks of the
 * per-task losses, a scalar. Task task0 + j's loss must read only slice j
 * (tasks are independent), so the gradient of the sum with respect to the
 * stacked params holds, at each index, that task's own gradient. Written
 * with the batched ops (ad_bmm, ad_add_batch_rowvec; elementwise ops and
 * ad_mse take any shape), it runs the batch in one graph: one op per layer
 * instead of one per task. An MLP x -> relu(x W1 + b1) W2 + b2 over tasks
 * with X [n_tasks, K, d] and Y [n_tasks, K, 1] (bench/maml_bench.h and
 * tests/test_bl_meta_batched.c run it with two hidden layers, the test
 * against the per-task losses); ad_mse means over all n K points, so n
 * times it is the sum of the per-task means:
 *
 *     static ad_tensor *support_batch(ad_tape *t, ad_tensor *const *p, int task0, int n,
 *                                     void *ctx) {
 *       const my_tasks *u = ctx;           // p: W1 [n, d, H], b1 [n, H], W2 [n, H, 1], b2 [n, 1]
 *       ad_tensor *x = ad_slice(t, u->X, 0, task0, n), *y = ad_slice(t, u->Y, 0, task0, n);
 *       ad_tensor *h = ad_relu(t, ad_add_batch_rowvec(t, ad_bmm(t, x, p[0], 0, 0), p[1]));
 *       ad_tensor *out = ad_add_batch_rowvec(t, ad_bmm(t, h, p[2], 0, 0), p[3]);
 *       return ad_scale(t, ad_mse(t, out, y), n);
 *     }
 *     p.support_batch = support_batch; p.query_batch = query_batch;  // (same on the query set)
 */
typedef ad_tensor *(*bl_batch_loss_fn)(ad_tape *t, ad_tensor *const *params, int task0, int n,
                                       void *ctx);

/* Meta-learning over tasks (MAML family):
 *   phi_i = Adapt_i(theta, lam)   (inner_steps steps of a step rule on the
 *                                  support loss, from phi = theta)
 *   meta-loss = (1/n_tasks) sum_i L_query,i(phi_i)
 * and the methods return d meta-loss / d theta and d meta-loss / d lam.
 *
 * The adaptation step, one of (setting both step.fn and opt is an
 * AD_ERR_ARG):
 *   - step.fn set: a user step (bl_step_fn above) with g = grad L_support,
 *     its lam argument the views of this problem's lam, its state zero at
 *     the start of every task and `step` the 0-based adaptation step;
 *   - opt set: a library optimizer, whose *_var / *_vars fields may point
 *     at tensors of lam (those are then learned, as in bl_problem);
 *   - neither: plain SGD, phi <- phi - inner_lr g (what callers written
 *     before the step interface get). inner_lr is read only here (and must
 *     be 0 with opt or step: give the step size there).
 * Meta-SGD (Li et al. 2017): a learnable learning rate per parameter
 * element, met with the optimizer's own per-parameter variables:
 *     ad_tensor *alpha[NP];           // shaped like theta[i] (or size 1)
 *     p.opt = &(nn_opt_cfg){.kind = NN_OPT_SGD, .lr_vars = alpha};
 *     p.n_lam = NP, p.lam = alpha;    // meta_grad[NP + i] = d meta-loss / d alpha[i]
 * (any kind works: momentum with per-element rates, Adam, ...). Learnable
 * rates may take either sign: Meta-SGD learns the update's direction as well
 * as its size, so only NaN/Inf is refused there; the scalar inner_lr and the
 * optimizer's number lr must be finite and > 0 / >= 0. Without a user step
 * every lam[k] must be one of opt's variables (else AD_ERR_ARG: its
 * meta-gradient would silently be zero). */
typedef struct {
  int n_theta;
  ad_tensor *const *theta; /* meta-parameters (heap); never modified */
  int n_tasks;
  bl_task_loss_fn support_loss; /* L_support,i(phi): inner (adaptation) loss */
  bl_task_loss_fn query_loss;   /* L_query,i(phi): outer loss */
  void *ctx;
  double inner_lr;       /* alpha of the plain-SGD adaptation (> 0); 0 with opt or step */
  int64_t inner_steps;   /* k (>= 1; iMAML >= 0: steps solving its proximal problem) */
  double prox;           /* iMAML: lambda of the proximal term (> 0) */
  const nn_opt_cfg *opt; /* adaptation optimizer; NULL = plain SGD at inner_lr */
  bl_step step;          /* user adaptation step; when step.fn is set it adapts */
  int n_lam;             /* adaptation hyperparameters, 0..NN_MAX_PARAMS */
  ad_tensor *const *lam; /* (heap; never modified) learned with theta: the user
                          * step's lam, or what opt's variables point at */
  /* Optional, both or neither (bl_batch_loss_fn above): bl_maml and
   * bl_fomaml then adapt batch_tasks tasks at a time (0: all n_tasks at
   * once), on stacked parameters, in one graph per batch (support_loss /
   * query_loss may then be NULL; bl_imaml needs them and ignores these).
   * The results equal the per-task path's up to rounding. A batch's graph
   * is rewound before the next, so batch_tasks bounds the arena (and a
   * batch that stays in cache runs faster than a larger one). theta[i] of at most 3 dimensions (the
   * task axis makes 4). The stacked phi starts as theta repeated n_tasks times (its adjoint sums
   * the tasks' meta-gradients); the step rule runs on the stacked tensors: the library optimizers
   * act elementwise, and their per- parameter variables (lr_vars, weight_decay_vars, Meta-SGD's
   * rates) shaped like theta[i] are repeated over tasks for them; a user step gets the stacked w, g
   * and state and the unstacked lam (a rate shaped like theta[i] must be repeated by the step,
   * ad_broadcast_axis(t, rate, 0, w[i]->shape[0], 0)). */
  bl_batch_loss_fn support_batch, query_batch;
  int batch_tasks; /* tasks per batched graph (0: n_tasks; >= 0) */
} bl_meta_problem;

/* Every meta method: fills meta_grad[k] (caller's heap tensors, n_theta +
 * n_lam of them: meta_grad[k] shaped like theta[k], then meta_grad[n_theta
 * + j] shaped like lam[j]) and st (if not NULL; st->val_loss = the mean
 * query loss), and leaves the tape as found. Returns AD_OK or the error
 * (meta_grad then untouched). (bilevel/maml.c, imaml.c)
 *   maml:   the adaptation differentiated through (second order: the
 *           backward pass of each inner gradient is recorded), so both
 *           outputs are the exact derivatives of the meta-loss.
 *   fomaml: first order in the adaptation: every inner gradient
 *           grad L_support(phi_s) is held constant (a stop-gradient) and
 *           everything else is differentiated exactly. For SGD, momentum
 *           and Adam without weight decay dphi/dtheta is then I and the
 *           theta output the mean of grad L_query(phi_i). The lam output is
 *           that same first-order derivative, not zero: for Meta-SGD rates
 *           alpha (SGD) it is -mean_i grad L_query,i(phi_i) * sum_s g_i,s
 *           (elementwise; summed over elements for a size-1 rate), g_i,s
 *           the inner gradients; with momentum sum_s m_i,s+1 replaces
 *           sum_s g_i,s. It drops the same Hessian terms as the theta part.
 *   imaml:  phi_i ~ argmin L_support,i(phi) + (prox/2) ||phi - theta||^2 by
 *           inner_steps steps of the adaptation step (its g the gradient of
 *           that proximal objective) from theta; meta-gradient of each
 *           task (I + H_i / prox)^{-1} grad L_query,i(phi_i) by CG
 *           (o->K default 20, o->tol default 1e-10). The answer is taken at
 *           the fixed point, which does not depend on the step that reached
 *           it (any step whose fixed points are the zeros of g), so
 *           Meta-SGD and every other step hyperparameter would get a
 *           meta-gradient of exactly 0 there: imaml refuses n_lam > 0
 *           (AD_ERR_ARG, use maml or fomaml), and refuses an optimizer
 *           with weight decay (it moves the fixed point; put the
 *           regulariser into support_loss instead).
 * st->inner_steps counts adaptation steps over all tasks; st->hvps the
 * iMAML products (0 for maml: its second-order work is inside the reverse
 * sweep); st->iterations and st->residual (the worst task's) iMAML's CG. */
typedef ad_status (*bl_meta_method_fn)(ad_tape *t, const bl_meta_problem *p, const bl_opts *o,
                                       ad_tensor *const *meta_grad, bl_stats *st);
ad_status bl_maml(ad_tape *t, const bl_meta_problem *p, const bl_opts *o,
                  ad_tensor *const *meta_grad, bl_stats *st);
ad_status bl_fomaml(ad_tape *t, const bl_meta_problem *p, const bl_opts *o,
                    ad_tensor *const *meta_grad, bl_stats *st);
ad_status bl_imaml(ad_tape *t, const bl_meta_problem *p, const bl_opts *o,
                   ad_tensor *const *meta_grad, bl_stats *st);

#ifdef __cplusplus
}
#endif
#endif
