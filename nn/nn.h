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

/* ------------------------------------------------------------------ layers */
/* Layers are functions that record on the tape like the core ops: they
 * return NULL and record the error on the tape on bad input. Parameters
 * are passed in (see nn_params below); nothing here owns state. */

/* y = x w^T + b. x [N, in], w [out, in] (PyTorch's layout), b [out] or NULL
 * (no bias). Returns y [N, out]. */
ad_tensor *nn_linear(ad_tape *t, ad_tensor *x, ad_tensor *w, ad_tensor *b);

/* [N, d1, d2, ...] -> [N, d1*d2*...]: a view, no copy. */
ad_tensor *nn_flatten(ad_tape *t, ad_tensor *x);

/* Inverted dropout: in training (train != 0) zeroes each element with
 * probability p, drawn from r, and scales the rest by 1/(1-p); in
 * evaluation returns x itself. p in [0, 1). r may be NULL when !train. */
ad_tensor *nn_dropout(ad_tape *t, ad_tensor *x, double p, ad_rng *r, int train);

/* ------------------------------------------------------------------ activations */

/* GELU, erf form (exact, PyTorch's default): x Phi(x), Phi the standard
 * normal CDF. A fused op; its derivative is nn_gelu_backward. */
ad_tensor *nn_gelu(ad_tape *t, ad_tensor *x);
/* g * gelu'(x), gelu'(x) = Phi(x) + x phi(x): GELU's VJP as a fused op with
 * its own rule (second derivative phi(x) (2 - x^2)). g and x same shape. */
ad_tensor *nn_gelu_backward(ad_tape *t, ad_tensor *g, ad_tensor *x);

/* Leaky ReLU: x where x > 0, slope * x elsewhere. */
ad_tensor *nn_leaky_relu(ad_tape *t, ad_tensor *x, double slope);
/* g * (x > 0 ? 1 : slope): leaky ReLU's VJP as a fused op. */
ad_tensor *nn_leaky_relu_backward(ad_tape *t, ad_tensor *g, ad_tensor *x, double slope);

/* ------------------------------------------------------------------ losses */
/* The *_each forms return one loss per example, a [N] tensor, so callers can
 * weight examples (data reweighting: ad_dot(weights, losses)). The mean
 * cross-entropy and MSE are ad_cross_entropy and ad_mse in ad.h. */

/* -logp[i, labels[i]] for each row of logp [N, C]: [N]. labels: n ints in
 * [0, C), copied. */
ad_tensor *nn_nll_each(ad_tape *t, ad_tensor *logp, const int32_t *labels, int64_t n);
/* Cross-entropy of each row of logits [N, C] with its label: [N]. */
ad_tensor *nn_cross_entropy_each(ad_tape *t, ad_tensor *logits, const int32_t *labels,
                                 int64_t n);
/* Mean over all but the first axis of (a - b)^2: [N]. a and b have the same
 * size and first axis N. */
ad_tensor *nn_mse_each(ad_tape *t, ad_tensor *a, ad_tensor *b);
/* Binary cross-entropy with logits z and targets y in [0, 1] (same size and
 * first axis), in the stable form softplus(z) - y z: finite for any z.
 * _each: mean over all but the first axis, [N]; plain: mean of all, scalar. */
ad_tensor *nn_bce_with_logits_each(ad_tape *t, ad_tensor *z, ad_tensor *y);
ad_tensor *nn_bce_with_logits(ad_tape *t, ad_tensor *z, ad_tensor *y);

#ifdef __cplusplus
}
#endif
#endif
