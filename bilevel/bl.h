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

typedef struct {
  int n_w;
  ad_tensor *const *w0; /* inner parameters at the start; never modified */
  int n_lam;
  ad_tensor *const *lam; /* hyperparameters (heap leaves); never modified */
  bl_loss_fn train_loss; /* L_train(w, lam) */
  bl_loss_fn val_loss;   /* L_val(w, lam) */
  void *ctx;
  nn_opt_cfg opt; /* inner optimizer; its *_var fields may point into lam */
  int64_t inner_steps; /* T */
} bl_problem;

typedef struct {
  int64_t inner_steps;     /* inner optimizer steps taken */
  int64_t hvps;            /* Hessian- (or Jacobian-) vector products used */
  int64_t iterations;      /* solver iterations (CG, Neumann, ...) */
  size_t peak_arena_bytes; /* high-water mark of the tape's arena in the call */
  double seconds;
  double val_loss; /* L_val at the final inner iterate */
  double residual; /* implicit solvers: final ||H x - b|| */
} bl_stats;

/* Options. Zero means the default given in each method's comment. */
typedef struct {
  int64_t K;        /* truncation length / solver iterations / Neumann terms */
  double tol;       /* solver tolerance */
  double alpha;     /* Neumann / fixed-point step (default: the inner lr) */
  double gamma;     /* greedy / HyperDistill decay */
  double eps;       /* finite-difference step (T1-T2 DARTS, SAMA) */
  int darts_fd;     /* T1-T2: B_t by central differences instead of the tape */
  int gauss_newton; /* implicit methods: J^T H_out J in place of the Hessian */
  double damping;   /* added to the Hessian's diagonal (implicit methods) */
  int64_t checkpoint_every; /* checkpointed unroll; default sqrt(T) */
  int64_t distill_every;    /* HyperDistill: theta re-estimated every this many steps */
  int64_t samples;          /* zero-order: directions */
  double sigma;             /* zero-order: smoothing radius */
  int antithetic;           /* zero-order: +/- pairs */
  uint64_t seed;
  int warm_start;           /* HOAG: keep the previous solution (bl_hoag_state) */
} bl_opts;

/* Every method: fills hg[k] (caller's heap tensors shaped like lam[k]) with
 * the hypergradient estimate, fills st if not NULL, and leaves the tape as it
 * found it (everything it recorded is rewound). Returns AD_OK or the error;
 * on error hg is left untouched. */
typedef ad_status (*bl_method_fn)(ad_tape *t, const bl_problem *p, const bl_opts *o,
                                  ad_tensor *const *hg, bl_stats *st);

/* Iterative differentiation (bilevel/unroll.c, forward.c, checkpoint.c, drmad.c). */
ad_status bl_unroll(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                    bl_stats *st); /* o->K > 0: backprop through the last K steps only */
ad_status bl_forward(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                     bl_stats *st);
ad_status bl_checkpointed(ad_tape *t, const bl_problem *p, const bl_opts *o,
                          ad_tensor *const *hg, bl_stats *st);
ad_status bl_drmad(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                   bl_stats *st);

/* Short-horizon approximations (bilevel/fo.c, one_step.c, t1t2.c, greedy.c,
 * hyperdistill.c). */
ad_status bl_fo(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                bl_stats *st);
ad_status bl_one_step(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                      bl_stats *st);
ad_status bl_t1t2(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                  bl_stats *st);
ad_status bl_greedy(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                    bl_stats *st);
ad_status bl_hyperdistill(ad_tape *t, const bl_problem *p, const bl_opts *o,
                          ad_tensor *const *hg, bl_stats *st);

/* Implicit differentiation at w_T ~ w* (bilevel/neumann.c, cg.c, fixed_point.c,
 * hoag.c, exact.c). */
ad_status bl_neumann(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                     bl_stats *st);
ad_status bl_cg(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                bl_stats *st);
ad_status bl_fixed_point(ad_tape *t, const bl_problem *p, const bl_opts *o,
                         ad_tensor *const *hg, bl_stats *st);
ad_status bl_hoag(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                  bl_stats *st);
ad_status bl_exact(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                   bl_stats *st);

/* Derivative-free and preconditioned estimates (bilevel/zero_order.c, sama.c). */
ad_status bl_zero_order(ad_tape *t, const bl_problem *p, const bl_opts *o,
                        ad_tensor *const *hg, bl_stats *st);
ad_status bl_sama(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                  bl_stats *st);

#ifdef __cplusplus
}
#endif
#endif
