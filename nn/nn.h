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
 *
 * (tests/test_header_examples.c runs this, and bl.h's example.)
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
  NN_OPT_SGD = 0,  /* w -= lr (g + wd w) */
  NN_OPT_MOMENTUM, /* heavy ball: m = mu m + g;  w -= lr m */
  NN_OPT_NESTEROV, /* m = mu m + g;  w -= lr (g + mu m) */
  NN_OPT_ADAM,     /* bias-corrected moments; wd as L2 added to g */
  NN_OPT_ADAMW,    /* Adam with decoupled decay: w -= lr (update + wd w) */
  NN_OPT_RMSPROP   /* v = a v + (1-a) g^2;  w -= lr g / (sqrt(v) + eps) */
} nn_opt_kind;

/* Numbers: a field left 0 takes the default named, unless its bit is in
 * `set` (NN_OPT_SET_*): then the value is used as given, zero included
 * (momentum 0 is plain SGD, beta1 0 is RMSprop-like Adam, lr 0 does not
 * move). The constructors below set every bit, so
 *     nn_opt_cfg c = nn_opt_adam(1e-3, 0.0, 0.999, 1e-8);   // beta1 really 0
 * and designated initialisers keep working as before:
 *     nn_opt_cfg c = {.kind = NN_OPT_MOMENTUM, .lr = 0.1};   // mu = 0.9
 *     nn_opt_cfg c = {.kind = NN_OPT_MOMENTUM, .lr = 0.1,
 *                     .set = NN_OPT_SET_MOMENTUM};            // mu = 0
 * The *_var fields, when set, replace the numbers with tape variables so
 * gradients flow to them: a size-1 tensor, or (the *_vars arrays) one
 * tensor per parameter, shaped like it or of size 1.
 * Valid values (else AD_ERR_ARG naming the field and the value, from
 * every call that takes the config): lr, momentum and eps finite and >= 0;
 * beta1, beta2 and alpha in [0, 1); weight_decay finite (a negative decay
 * is allowed: finite differences at 0 and learned decays pass through
 * it); tape variables finite in every element (the per-parameter *_vars
 * larger than one element are scanned by nn_opt_check and the state
 * initialisers, not by every step, which would cost a pass per step). */
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
  unsigned set;                        /* NN_OPT_SET_* bits: these numbers are explicit */
} nn_opt_cfg;

enum {
  NN_OPT_SET_LR = 1u << 0,
  NN_OPT_SET_MOMENTUM = 1u << 1,
  NN_OPT_SET_BETA1 = 1u << 2,
  NN_OPT_SET_BETA2 = 1u << 3,
  NN_OPT_SET_ALPHA = 1u << 4,
  NN_OPT_SET_EPS = 1u << 5,
  NN_OPT_SET_ALL = (1u << 6) - 1
};

/* Checks cfg for n parameters w (kind, variable shapes, every number and
 * tape variable as above) without stepping: AD_OK, or the error with its
 * message in ad_last_error(). Every step call does the same checks. */
ad_status nn_opt_check(const nn_opt_cfg *cfg, int n, ad_tensor *const *w);

/* Configs with every number explicit (set = NN_OPT_SET_ALL; weight decay
 * 0 except for AdamW; add *_var fields afterwards as needed). */
nn_opt_cfg nn_opt_sgd(double lr);
nn_opt_cfg nn_opt_momentum(double lr, double momentum);
nn_opt_cfg nn_opt_nesterov(double lr, double momentum);
nn_opt_cfg nn_opt_adam(double lr, double beta1, double beta2, double eps);
nn_opt_cfg nn_opt_adamw(double lr, double beta1, double beta2, double eps, double weight_decay);
nn_opt_cfg nn_opt_rmsprop(double lr, double alpha, double eps);

/* Optimizer state: step count and up to two buffers per parameter. A plain
 * struct: copying it copies the step count and the buffer pointers. For a
 * tape state that is a snapshot (nn_opt_step_diff replaces the buffers, it
 * never writes them); an in-place state's buffers are overwritten by each
 * nn_opt_step, so a snapshot of it must copy their values too
 * (ad_copy_values), as the checkpointed unroll does. */
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

/* 2-D convolution, NCHW: x [N, C, H, W], w [K, C, R, S], b [K] or NULL;
 * y [N, K, P, Q] with P = (H + 2 pad - R) / stride + 1 (Q likewise), zero
 * padding. im2col + one BLIS GEMM per image, workspace from the tape's
 * arena. Its derivatives are the two companion ops below, whose own rules
 * use conv2d and each other, so HVPs and unrolled hypergradients through a
 * CNN stay three fast kernels. */
ad_tensor *nn_conv2d(ad_tape *t, ad_tensor *x, ad_tensor *w, ad_tensor *b, int stride, int pad);
/* d<g, conv2d(x, w)>/dx for an input of h x wd: a transposed convolution of
 * g [N, K, P, Q] with w [K, C, R, S]; returns [N, C, h, wd]. */
ad_tensor *nn_conv2d_backward_input(ad_tape *t, ad_tensor *g, ad_tensor *w, int64_t h, int64_t wd,
                                    int stride, int pad);
/* d<g, conv2d(x, w)>/dw for an r x s filter: x [N, C, H, W], g [N, K, P, Q];
 * returns [K, C, r, s]. */
ad_tensor *nn_conv2d_backward_weight(ad_tape *t, ad_tensor *x, ad_tensor *g, int64_t r, int64_t s,
                                     int stride, int pad);

/* Max pooling over k x k windows (stride, zero-cost padding that never
 * wins: 0 <= pad <= k/2) of x [N, C, H, W]. The gradient is routed through
 * the saved argmax (first maximum of each window) by a fused backward op
 * that is linear in g, with its own rule. */
ad_tensor *nn_max_pool2d(ad_tape *t, ad_tensor *x, int k, int stride, int pad);
/* relu then max pooling, fused: nn_max_pool2d(ad_relu(x)), which equals
 * ad_relu(nn_max_pool2d(x)) (max and relu commute), in one pass over x with
 * no relu tensor, and one scatter pass for the gradient (dx = g at the
 * argmax of each window whose maximum is > 0, else 0; NaN at a NaN
 * maximum). Same arguments and errors as nn_max_pool2d; differentiable to
 * any order. */
ad_tensor *nn_relu_max_pool2d(ad_tape *t, ad_tensor *x, int k, int stride, int pad);
/* conv, bias, relu and max pooling fused: nn_relu_max_pool2d(nn_conv2d(x,
 * w, b, stride, pad), k, pool_stride, pool_pad), the same values (bits
 * included) and the same errors, with each chunk of images pooled from
 * cache and one recorded op whose rule is conv2d's applied to the pool's
 * masked scatter; differentiable to any order. */
ad_tensor *nn_conv2d_relu_max_pool2d(ad_tape *t, ad_tensor *x, ad_tensor *w, ad_tensor *b,
                                     int stride, int pad, int k, int pool_stride, int pool_pad);
/* Average pooling, divisor k*k (padding counts as zeros: PyTorch's
 * count_include_pad). Linear; its backward op is its adjoint. */
ad_tensor *nn_avg_pool2d(ad_tape *t, ad_tensor *x, int k, int stride, int pad);

/* Layer norm over the last axis of x [..., D]: (x - mean) / sqrt(var + eps)
 * * gamma + beta, statistics per row (biased variance). gamma, beta [D] or
 * NULL (no affine part). eps > 0 (1e-5 is usual). */
ad_tensor *nn_layer_norm(ad_tape *t, ad_tensor *x, ad_tensor *gamma, ad_tensor *beta, double eps);

/* Batch norm running statistics, owned by the caller (heap tensors). A
 * plain struct: nn_bn_state_clone gives an independent copy for an inner
 * loop, so unrolled inner steps never leak into evaluation statistics. */
typedef struct {
  int64_t channels;
  double momentum;   /* running = (1 - momentum) running + momentum batch */
  double eps;        /* added to the variance */
  ad_tensor *mean;   /* [C], starts at 0 */
  ad_tensor *var;    /* [C], unbiased batch variances, starts at 1 */
  int64_t n_updates; /* times NN_BN_UPDATE changed the statistics */
} nn_bn_state;

/* Makes the state: mean 0, var 1; momentum 0 means 0.1, eps 0 means 1e-5.
 * Free with nn_bn_state_free (accepts NULL and freed states). */
ad_status nn_bn_state_init(nn_bn_state *s, ad_dtype dt, int64_t channels, double momentum,
                           double eps);
void nn_bn_state_free(nn_bn_state *s);
/* dst = a new independent copy of src (dst uninitialised). */
ad_status nn_bn_state_clone(nn_bn_state *dst, const nn_bn_state *src);
/* Copies src's statistics into an initialised dst of as many channels. */
ad_status nn_bn_state_copy(nn_bn_state *dst, const nn_bn_state *src);

enum {
  NN_BN_EVAL = 0,        /* normalise with s's running statistics */
  NN_BN_TRAIN = 1u << 0, /* normalise with the batch's statistics (recorded) */
  NN_BN_UPDATE = 1u << 1 /* with TRAIN: also fold the batch statistics into s */
};

/* Batch norm over x [N, C] or [N, C, H, W], per channel: (x - mean) /
 * sqrt(var + eps) * gamma + beta (gamma, beta [C] or NULL). The running
 * statistics in s change ONLY with NN_BN_TRAIN | NN_BN_UPDATE; NN_BN_TRAIN
 * alone leaves s untouched (s may then be NULL: eps 1e-5). Evaluation
 * (NN_BN_EVAL) needs s. The update itself is not differentiated (values
 * only, as in PyTorch). */
ad_tensor *nn_batch_norm(ad_tape *t, ad_tensor *x, ad_tensor *gamma, ad_tensor *beta,
                         nn_bn_state *s, unsigned mode);

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
ad_tensor *nn_cross_entropy_each(ad_tape *t, ad_tensor *logits, const int32_t *labels, int64_t n);
/* Mean over all but the first axis of (a - b)^2: [N]. a and b have the same
 * size and first axis N. */
ad_tensor *nn_mse_each(ad_tape *t, ad_tensor *a, ad_tensor *b);
/* Binary cross-entropy with logits z and targets y in [0, 1] (same size and
 * first axis), in the stable form softplus(z) - y z: finite for any z.
 * _each: mean over all but the first axis, [N]; plain: mean of all, scalar. */
ad_tensor *nn_bce_with_logits_each(ad_tape *t, ad_tensor *z, ad_tensor *y);
ad_tensor *nn_bce_with_logits(ad_tape *t, ad_tensor *z, ad_tensor *y);

/* ------------------------------------------------------------------ parameter sets */
/* A parameter set holds named tensors as views into ONE contiguous block of
 * values and ONE of gradients (llm.c's layout): nn_params_values() and
 * nn_params_grads() are the whole model as plain [numel] vectors, which CG,
 * Neumann series and optimizers can use without copying. Every tensor is a
 * heap leaf with ad_requires_grad set, and its ->grad is a view into the
 * gradient block, so ad_backward accumulates straight into the block. All
 * tensors of a set share one dtype. Errors are reported through
 * ad_last_error(). */

/* Longest name, with its terminating NUL. */
#define NN_NAME_MAX 64

typedef struct {
  const char *name; /* 1..NN_NAME_MAX-1 characters, unique in the set */
  int ndim;         /* 0..AD_MAX_DIMS */
  int64_t shape[AD_MAX_DIMS];
} nn_param_spec;

typedef struct nn_params nn_params;

/* Makes a set of n (1..NN_MAX_PARAMS) zero tensors laid out in spec order,
 * with one allocation for the values and one for the gradients. The names
 * are copied. On failure *out = NULL (AD_ERR_ARG for a bad or duplicated
 * name, AD_ERR_SHAPE for a bad shape). Free with nn_params_free. */
ad_status nn_params_new(nn_params **out, ad_dtype dt, int n, const nn_param_spec *specs);
/* Frees the set, its blocks and its tensors. Accepts NULL. */
void nn_params_free(nn_params *p);

/* Number of tensors, total elements, dtype (0 / AD_F32 for NULL). */
int nn_params_count(const nn_params *p);
int64_t nn_params_numel(const nn_params *p);
ad_dtype nn_params_dtype(const nn_params *p);

/* Tensor by name (NULL if none), its index (-1 if none), tensor and name by
 * index (NULL out of range), and its element offset in the blocks (-1). The
 * set owns the tensors: do not free them. */
ad_tensor *nn_params_get(const nn_params *p, const char *name);
int nn_params_index(const nn_params *p, const char *name);
ad_tensor *nn_params_at(const nn_params *p, int i);
const char *nn_params_name(const nn_params *p, int i);
int64_t nn_params_offset(const nn_params *p, int i);
/* The count() tensors in order, for ad_grad / nn_opt_step / bilevel calls. */
ad_tensor *const *nn_params_list(const nn_params *p);

/* [numel] views of the value block and the gradient block (owned by the
 * set; writing through them writes the parameters / gradients). */
ad_tensor *nn_params_values(const nn_params *p);
ad_tensor *nn_params_grads(const nn_params *p);

/* Zeroes the gradient block. */
void nn_params_zero_grad(nn_params *p);
/* Turns ad_requires_grad on or off for every tensor of the set. */
void nn_params_requires_grad(nn_params *p, int on);

/* Copies src's values into dst (same names, dtype and shapes: else
 * AD_ERR_SHAPE). clone: a new set with src's layout and values. */
ad_status nn_params_copy(nn_params *dst, const nn_params *src);
ad_status nn_params_clone(nn_params **out, const nn_params *src);

/* All values to / from one vector v of numel elements (any shape, any
 * dtype: converted). AD_ERR_SHAPE when the size differs. */
ad_status nn_params_to_vector(const nn_params *p, ad_tensor *v);
ad_status nn_params_from_vector(nn_params *p, const ad_tensor *v);

/* On the tape: n tensors flattened and concatenated into one [total]
 * vector (recorded, so gradients flow back to each piece), and the inverse:
 * out[i] = the piece of v shaped like like[i]. unpack(pack(x)) = x to
 * every derivative order. */
ad_tensor *nn_pack(ad_tape *t, int n, ad_tensor *const *xs);
ad_status nn_unpack(ad_tape *t, ad_tensor *v, int n, ad_tensor *const *like, ad_tensor **out);

/* ------------------------------------------------------------------ init */

typedef enum { NN_INIT_NORMAL = 0, NN_INIT_UNIFORM = 1 } nn_init_dist;

/* Fans of a weight in PyTorch's convention, w [out, in, k...]:
 * fan_in = in * prod(k), fan_out = out * prod(k). AD_ERR_SHAPE below 2 dims.
 * Either pointer may be NULL. */
ad_status nn_init_fans(const ad_tensor *w, int64_t *fan_in, int64_t *fan_out);
/* Kaiming/He (fan_in mode): zero mean, std = gain / sqrt(fan_in); gain 0
 * means sqrt(2) (ReLU). Uniform draws on [-sqrt(3) std, sqrt(3) std]. Values
 * come from r only, so a seed fixes them on every machine. */
ad_status nn_init_kaiming(ad_tensor *w, ad_rng *r, nn_init_dist dist, double gain);
/* Xavier/Glorot: std = gain sqrt(2 / (fan_in + fan_out)); gain 0 means 1. */
ad_status nn_init_xavier(ad_tensor *w, ad_rng *r, nn_init_dist dist, double gain);
/* Every element set to v (biases). */
ad_status nn_init_constant(ad_tensor *w, double v);

/* ------------------------------------------------------------------ save / load */

/* Version of the parameter file format written by nn_params_save. */
#define NN_PARAMS_FILE_VERSION 1

/* Writes the set (names, dtypes, shapes, values) to path: magic, version,
 * tensor table, little-endian data, CRC-32. Atomic: written to a temporary
 * file in the same directory, fsync'ed and renamed over path, so a crash
 * leaves the old file or the new one, never a partial one. AD_ERR_IO (and
 * no temporary left behind) when any step fails. */
ad_status nn_params_save(const nn_params *p, const char *path);
/* Reads a file written by nn_params_save into p. Everything is checked
 * before anything is written: AD_ERR_FORMAT for a bad magic, another
 * version, a truncated or padded file, a checksum mismatch, or a tensor
 * whose name, dtype or shape differs from p's (the message names it);
 * AD_ERR_IO when the file cannot be read. On error p is untouched. */
ad_status nn_params_load(nn_params *p, const char *path);
/* Same, into a new set laid out as the file says. */
ad_status nn_params_load_new(nn_params **out, const char *path);

#ifdef __cplusplus
}
#endif
#endif
