/* nn.h — layers that record on the tape, losses, parameter sets, and
 * optimizers in two modes: a fast in-place step, and a differentiable step
 * that records on the tape so hypergradients flow through it.
 *
 * A differentiable SGD step with a learnable learning rate:
 *
 *     nn_opt_cfg cfg = {.kind = NN_OPT_SGD, .lr_var = lr};   // lr: scalar leaf
 *     nn_opt_state st;
 *     nn_opt_state_init_tape(tape, &cfg, &st, n, w);
 *     ad_tensor *g[n], *w1[n];
 *     ad_grad(tape, 1, &loss, NULL, n, w, g, AD_GRAD_RECORD);
 *     nn_opt_step_diff(tape, &cfg, &st, n, w, g, w1);      // w1 = w - lr*g
 */
#ifndef HYPERTAPE_NN_H
#define HYPERTAPE_NN_H
#include "autodiff/ad.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Most parameters one optimizer state, parameter set or method handles. */
#define NN_MAX_PARAMS 64

/* ------------------------------------------------------------------ optimizers */

typedef enum {
  NN_OPT_SGD = 0,   /* w -= lr (g + wd w) */
  NN_OPT_MOMENTUM,  /* heavy ball: m = mu m + g;  w -= lr m */
  NN_OPT_NESTEROV,  /* m = mu m + g;  w -= lr (g + mu m) */
  NN_OPT_ADAM,      /* bias-corrected moments; wd as L2 added to g */
  NN_OPT_ADAMW,     /* Adam with decoupled decay: w -= lr (update + wd w) */
  NN_OPT_RMSPROP    /* v = a v + (1-a) g^2;  w -= lr g / (sqrt(v) + eps) */
} nn_opt_kind;

/* Zero fields take the defaults named. The *_var fields, when set, replace
 * the numbers with tape variables so gradients flow to them: a size-1
 * tensor, or (the *_vars arrays) one tensor per parameter, shaped like it
 * or of size 1. */
typedef struct {
  nn_opt_kind kind;
  double lr;           /* default 0.01 */
  double momentum;     /* MOMENTUM/NESTEROV, default 0.9 */
  double beta1, beta2; /* ADAM/ADAMW, default 0.9, 0.999 */
  double alpha;        /* RMSPROP decay, default 0.99 */
  double eps;          /* ADAM/ADAMW/RMSPROP, default 1e-8 */
  double weight_decay; /* default 0 */
  ad_tensor *lr_var;
  ad_tensor *momentum_var;
  ad_tensor *weight_decay_var;
  ad_tensor *const *lr_vars;           /* per parameter */
  ad_tensor *const *weight_decay_vars; /* per parameter */
} nn_opt_cfg;

/* Optimizer state: step count and up to two buffers per parameter. A plain
 * struct, so copying it snapshots the state (checkpointing relies on it). */
typedef struct {
  int n;
  int64_t step;
  int on_tape; /* buffers are arena tensors (differentiable mode) */
  ad_tensor *m[NN_MAX_PARAMS];
  ad_tensor *v[NN_MAX_PARAMS];
} nn_opt_state;

/* In-place mode: heap buffers of zeros shaped like w. Free with
 * nn_opt_state_free. */
ad_status nn_opt_state_init(const nn_opt_cfg *cfg, nn_opt_state *s, int n, ad_tensor *const *w);
void nn_opt_state_free(nn_opt_state *s); /* accepts NULL; no-op for tape states */
/* Differentiable mode: buffers of zeros in the tape's arena (freed by rewind). */
ad_status nn_opt_state_init_tape(ad_tape *t, const nn_opt_cfg *cfg, nn_opt_state *s, int n,
                                 ad_tensor *const *w);

/* Fast step: updates w (and the state) in place from gradients g; records
 * nothing. Tape variables in cfg are read as numbers. */
ad_status nn_opt_step(const nn_opt_cfg *cfg, nn_opt_state *s, int n, ad_tensor *const *w,
                      ad_tensor *const *g);

/* Differentiable step: w_new = Phi(w, g, hyperparameters, state) recorded on
 * the tape; s's buffers are replaced by their new tape values (the old ones
 * are not modified). w and g are not modified. */
ad_status nn_opt_step_diff(ad_tape *t, const nn_opt_cfg *cfg, nn_opt_state *s, int n,
                           ad_tensor *const *w, ad_tensor *const *g, ad_tensor **w_new);

#ifdef __cplusplus
}
#endif
#endif
