/* implicit_internal.h — what the implicit methods (neumann.c, cg.c,
 * fixed_point.c, hoag.c, exact.c) and the meta-learning methods (maml.c,
 * imaml.c) share, on top of bl_internal.h: the curvature products
 * (implicit_common.c), list algebra and CG (linsolve.c), and the meta
 * methods' run scope (meta_common.c). Not installed.
 *
 * An implicit method reads like this (bilevel/cg.c):
 *
 *     bl_run r;  bl_imp m;
 *     ad_status s = bl__begin(&r, "bl_cg", t, p, o, hg, 0);
 *     if (!s) s = bl__imp_begin(&m, &r);        // w_T, grad_w L_train recorded, b
 *     ...solve A v = m.b with bl__imp_apply (A = H or G, + damping)...
 *     if (!s) s = bl__imp_finish(&m, v, hg);   // hg = direct - (d2 L/dlam dw) v
 *     return bl__end(&r, s, st);
 *
 * The training loss the implicit methods see
 * -------------------------------------------
 * The inner optimizer adds its own L2 weight decay (nn_opt_cfg
 * weight_decay / weight_decay_var / weight_decay_vars) to the gradient, so
 * the point the inner run converges to is a stationary point of
 *     L_eff(w, lam) = L_train(w, lam) + sum_i (wd_i / 2) ||w_i||^2,
 * and that is what H, G and the mixed partial are taken of. (For AdamW the
 * decay is decoupled and this is only an approximation.) L_eff is
 * evaluated at step index max(T - 1, 0), the last batch the run saw.
 */
#ifndef HYPERTAPE_IMPLICIT_INTERNAL_H
#define HYPERTAPE_IMPLICIT_INTERNAL_H

#include "bl_internal.h"

/* ---------------------------------------------------------------- implicit methods */

typedef struct {
  bl_run *r;
  int n;                       /* parameter tensors */
  int64_t step;                /* step index L_eff is evaluated at */
  ad_tensor *w[NN_MAX_PARAMS]; /* w_T: leaves needing a gradient */
  bl_state s;                  /* the step's state at w_T (bl__imp_begin) */
  ad_tensor *g[NN_MAX_PARAMS]; /* grad_w L_eff(w_T), recorded */
  /* What the H products sweep, and the decay they add in closed form: H v
   * = d/dw <gh, v> + dec (.) v + dec_s v. gh is grad_w L_train without the
   * decay when the decay is a per-element tensor of w's dtype and size
   * (dec), one number (folded into dec_s) or none; else gh = g, dec NULL.
   * The decay's second derivative is that diagonal exactly, and applying
   * it in the solver's pass saves the sweep a multiply and an accumulation
   * over every parameter per product. dec_s also holds the damping. */
  ad_tensor *gh[NN_MAX_PARAMS];
  ad_tensor *dec[NN_MAX_PARAMS];
  double dec_s[NN_MAX_PARAMS];
  ad_tensor *b[NN_MAX_PARAMS];      /* grad_w L_val(w_T): the right-hand side */
  ad_tensor *direct[NN_MAX_PARAMS]; /* dL_val/dlam with w held fixed */
  double damping;                   /* added to the diagonal */
  /* Gauss-Newton: G v = J^T (H_l (J v)) + H_R v */
  int gn;
  ad_tensor *f;                   /* model outputs f(w_T), recorded */
  ad_tensor *f_leaf;              /* the same values as a leaf: l is taken there */
  ad_tensor *gl;                  /* grad_f l at f_leaf, recorded */
  ad_tensor *greg[NN_MAX_PARAMS]; /* grad_w (R + decay), recorded; NULL: none */
} bl_imp;

/* Checks the implicit options (K, tol, alpha, damping >= 0; the
 * Gauss-Newton callbacks when asked for), runs the T inner steps in place
 * from w0, takes b = grad_w L_val and the direct part at w_T, and records
 * grad_w L_eff (and the Gauss-Newton pieces) for the products. */
ad_status bl__imp_begin(bl_imp *m, bl_run *r);

/* The same at given parameter values w (no inner steps, no L_val): what
 * bl_curvature_product needs. */
ad_status bl__imp_at(bl_imp *m, bl_run *r, ad_tensor *const *w);

/* out = (H or G) v + damping v. v and out are tensors shaped like w made
 * before the call (e.g. by bl__zeros_new); they may not alias. Everything
 * the product records is rewound. Counts one hvp. */
ad_status bl__imp_apply(bl_imp *m, ad_tensor *const *v, ad_tensor *const *out);

/* bl__imp_apply that also returns <v, out>, from the same pass. */
ad_status bl__imp_apply_dot(bl_imp *m, ad_tensor *const *v, ad_tensor *const *out, double *vout);

/* One Neumann term: q <- q - alpha (H + damping) q, v <- v + q, *qq = <q, q>
 * after it, with the product and the update in one pass over the lists.
 * The same bits as bl__imp_apply into a buffer, then
 * bl__imp_neumann_step. Counts one hvp. */
ad_status bl__imp_neumann_term(bl_imp *m, ad_tensor *const *q, ad_tensor *const *v, double alpha,
                               double *qq);

/* hg = direct - (d^2 L_eff / dlam dw) v, written to the caller's tensors.
 * Counts one hvp (the mixed partial). */
ad_status bl__imp_finish(bl_imp *m, ad_tensor *const *v, ad_tensor *const *hg);

/* ---------------------------------------------------------------- solver vector algebra */
/* The solvers' inner loops over lists of n tensors, one pass each and
 * written to vectorize (the bench's 157k-element lists spend more time here
 * than in anything but the GEMMs otherwise). Lists paired by index have
 * equal sizes; mixed dtypes take a slower general path. */

/* out_i = a x_i + b y_i; out may be x or y. */
void bl__imp_lincomb(int n, ad_tensor *const *out, double a, ad_tensor *const *x, double b,
                     ad_tensor *const *y);
/* The CG update x += a p, r -= a Ap in one pass; returns <r, r> after it. */
double bl__imp_cg_step(int n, ad_tensor *const *x, ad_tensor *const *r, ad_tensor *const *p,
                       ad_tensor *const *Ap, double a);

/* The CG update split as the solver uses it: r -= a Ap returning <r, r>,
 * then x += a p and p = r + beta p in one pass. Together the same bits as
 * bl__imp_cg_step then bl__imp_lincomb(p, 1, r, beta, p). */
double bl__imp_cg_resid(int n, ad_tensor *const *r, ad_tensor *const *Ap, double a);
void bl__imp_cg_dir(int n, ad_tensor *const *x, ad_tensor *const *p, ad_tensor *const *r, double a,
                    double beta);

/* One Neumann term in one pass: q = q - alpha hq, v = v + q; returns
 * <q, q> after it (bl__dot's order). */
double bl__imp_neumann_step(int n, ad_tensor *const *q, ad_tensor *const *v, double alpha,
                            ad_tensor *const *hq);

/* The operator pass: out_i = h_i + dec_i (.) v_i + s_i v_i (dec NULL or
 * dec[i] NULL: no elementwise term; s NULL: all 0); returns <v, out> in
 * bl__dot's order. dec_i has v_i's size. out may not alias v or h. */
double bl__imp_op_pass(int n, ad_tensor *const *out, ad_tensor *const *h, ad_tensor *const *dec,
                       const double *s, ad_tensor *const *v);

/* bl__imp_neumann_step with hq = h + dec (.) q + s q formed on the way
 * (the same bits as bl__imp_op_pass into a buffer, then the step). h may
 * alias q. */
double bl__imp_neumann_pass(int n, ad_tensor *const *q, ad_tensor *const *v, double alpha,
                            ad_tensor *const *h, ad_tensor *const *dec, const double *s);

/* ---------------------------------------------------------------- conjugate gradients */

/* A symmetric positive (semi-)definite operator: out = A v. */
typedef ad_status (*bl_linop)(void *ctx, ad_tensor *const *v, ad_tensor *const *out);

typedef struct {
  int64_t iterations; /* CG iterations (operator products, + 1 when warm) */
  double residual;    /* ||b - A x|| by the recurrence */
  double b_norm;
  int negative_curvature; /* stopped because p^T A p <= 0 */
} bl_cg_info;

/* Solves A x = b by conjugate gradients over lists of n tensors. x holds
 * the start (used when warm, else zeroed) and receives the solution. Stops
 * after K iterations or when ||r|| <= tol ||b||; stops early (keeping x) if
 * p^T A p <= 0, where A is not positive definite. Work vectors live in the
 * arena (the caller's rewind frees them). */
ad_status bl__cg(ad_tape *t, int n, bl_linop A, void *ctx, ad_tensor *const *b, ad_tensor *const *x,
                 int64_t K, double tol, int warm, bl_cg_info *info);

/* An operator that also returns <v, A v> from the pass that forms A v. */
typedef ad_status (*bl_linop_dot)(void *ctx, ad_tensor *const *v, ad_tensor *const *out,
                                  double *vout);

/* bl__cg with such an operator: the same iterates and bits, one pass fewer
 * per iteration. */
ad_status bl__cg_dot(ad_tape *t, int n, bl_linop_dot A, void *ctx, ad_tensor *const *b,
                     ad_tensor *const *x, int64_t K, double tol, int warm, bl_cg_info *info);

/* bl__cg with A = bl__imp_apply. */
ad_status bl__imp_cg(bl_imp *m, ad_tensor *const *x, int64_t K, double tol, int warm,
                     bl_cg_info *info);

/* ---------------------------------------------------------------- meta-learning */

/* The library optimizer as a meta adaptation step (meta_common.c). */
typedef struct {
  bl_cfg_map map;     /* *p->opt with its variables pointing at the lam views */
  int uses_m, uses_v; /* the state buffers it keeps (slots m, then v) */
} bl_meta_opt;

/* The working set of one meta-method call. `base` carries the tape, the
 * name, the mark and the stats so bl__fail / bl__nn / bl__end apply.
 * The adaptation is always a bl_step (`step`): the user's, or a provider
 * for the library optimizer (opt) or plain SGD (lr), so maml.c and imaml.c
 * have one path whatever the rule. */
typedef struct {
  bl_run base;
  const bl_meta_problem *p;
  ad_tensor *theta[NN_MAX_PARAMS];   /* leaf views of p->theta */
  ad_tensor *lam[NN_MAX_PARAMS];     /* leaf views of p->lam */
  ad_tensor *acc[2 * NN_MAX_PARAMS]; /* meta-gradient (theta, then lam) summed over tasks */
  int n_meta;                        /* n_theta + n_lam: the meta-parameters */
  double loss_sum;                   /* query losses summed over tasks */
  bl_step step;                      /* the adaptation rule */
  bl_meta_opt opt;                   /* *p->opt as a step (when opt is set) */
  double lr;                         /* plain SGD: p->inner_lr */
  int batched;                       /* maml/fomaml on p->support_batch / query_batch */
  bl_cfg_map bopt;                   /* batched: opt with its per-parameter variables stacked */
} bl_meta_run;

/* Checks t, p (callbacks, theta and lam of one dtype, n_tasks >= 1, the
 * adaptation: inner_lr > 0 for plain SGD, else 0 and exactly one of opt /
 * step.fn, their numbers and variables finite and shaped to fit;
 * inner_steps >= min_steps; for iMAML (imaml set) prox > 0, no lam and no
 * optimizer weight decay), mg (n_theta + n_lam tensors shaped like theta,
 * lam) and o (K, tol >= 0); marks the arena, turns recording on, makes the
 * theta and lam views, the zeroed accumulators and the step. Pair with
 * bl__meta_end. */
ad_status bl__meta_begin(bl_meta_run *r, const char *who, ad_tape *t, const bl_meta_problem *p,
                         const bl_opts *o, ad_tensor *const *mg, int64_t min_steps, int imaml);

/* On success writes mg = acc / n_tasks and st->val_loss = mean query loss;
 * then rewinds and fills st like bl__end. Returns s. */
ad_status bl__meta_end(bl_meta_run *r, ad_status s, ad_tensor *const *mg, bl_stats *st);

/* Calls a task loss and checks it returned a scalar. */
ad_tensor *bl__task_loss(bl_meta_run *r, bl_task_loss_fn f, const char *which,
                         ad_tensor *const *phi, int task);

/* A task's adaptation state: slots * n_theta zero tensors shaped like
 * theta (slot k of parameter i at k * n_theta + i), in the arena. */
ad_status bl__meta_state_new(bl_meta_run *r, ad_tensor **state);

/* One adaptation step through r->step, at the current recording setting:
 * (phi, state, g) -> (phi_new, state_new) at step index k, lam = r->lam.
 * Checks what the rule returned (non-NULL, shaped like phi, one dtype) and
 * names the rule in the error. */
/* The batched path (p->support_batch), for a batch of n_tasks tasks:
 * phi = theta stacked over them ([n_tasks, theta[i]...], recorded), the
 * step's state zeros shaped like it, and for the library optimizer a cfg
 * whose per-parameter variables are stacked too (r->step.ctx then points
 * at it). */
ad_status bl__meta_batch_begin(bl_meta_run *r, int n_tasks, ad_tensor **phi, ad_tensor **state);
/* Calls a batched loss for tasks task0 .. task0 + n - 1 and checks it
 * returned a scalar. */
ad_tensor *bl__batch_loss(bl_meta_run *r, bl_batch_loss_fn f, const char *which,
                          ad_tensor *const *phi, int task0, int n);

ad_status bl__meta_step(bl_meta_run *r, ad_tensor *const *phi, ad_tensor *const *state,
                        ad_tensor *const *g, int64_t k, ad_tensor **phi_new, ad_tensor **state_new);

#endif
