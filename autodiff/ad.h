/*
 * ad.h — hypertape's autodiff core: tensors, a tape, ops with derivative
 * rules, reverse mode (ad_grad), forward mode (ad_jvp), and arena memory.
 *
 * Ten lines to a derivative: f(x) = a*x^2 + b at x = 3 (a = 2, b = 1).
 *
 *     ad_tape *tape = NULL;
 *     ad_tape_new(&tape, NULL);                        // arena: 64 MiB, grows to 4 GiB
 *     ad_tensor *x = ad_scalar(tape, AD_F64, 3.0);
 *     ad_requires_grad(x, 1);                          // a leaf we differentiate by
 *     ad_tensor *f = ad_add_scalar(tape, ad_scale(tape, ad_mul(tape, x, x), 2.0), 1.0);
 *     ad_tensor *df = NULL;
 *     ad_grad(tape, 1, &f, NULL, 1, &x, &df, 0);       // df/dx = 2*a*x = 12
 *     printf("f=%g df=%g\n", ad_item(f), ad_item(df));
 *     ad_tape_free(tape);
 *
 * (tests/test_tape.c, test_header_example, builds and runs exactly this.)
 *
 * The model
 * ---------
 * Define-by-run. Every op takes the tape first, computes its value at once,
 * and, when recording is on and an input requires a gradient, appends a node
 * (op, inputs, output, attributes) to the tape. Every derivative rule is
 * written with these same public ops, so `ad_grad(..., AD_GRAD_RECORD)` puts
 * the backward pass itself on the tape: differentiate it again for
 * Hessian-vector products, mixed partials and hypergradients through whole
 * unrolled training runs.
 *
 * Memory: tensors made by ops live in the tape's arena. `ad_mark` remembers a
 * point, `ad_rewind` frees everything allocated and recorded after it, so a
 * training loop allocates nothing per step after the first. Parameters are
 * made with ad_tensor_new (heap, outside the arena) and are leaves on any tape.
 *
 * Errors stick to the tape (like sqlite3_errmsg): an op given a NULL input or
 * bad shapes returns NULL and records the first error; check
 * ad_tape_status() once after a block of ops. While an error is in force,
 * later errors are dropped (the first is the cause) and ad_grad & co. return
 * it at once. It stops being in force on ad_tape_clear_error, or when the
 * tape is rewound to a mark taken before the error (ad_rewind,
 * ad_tape_reset): what the error concerned is gone with the rewind, so a
 * loop that rewinds each step recovers by itself. Its message stays
 * readable (ad_tape_errmsg) until the next error or ad_tape_clear_error, so
 * a call that failed and rewound on its way out can still say why.
 * Constructors return a status and set their OUT pointer to NULL on failure;
 * destructors accept NULL. Nothing here aborts or exits on bad input.
 *
 * Messages begin with the function that was called ("ad_slice: ...",
 * "nn_layer_norm: ..." for an error in an op a layer runs). The NaN/Inf
 * guard (ad_set_nan_guard) names the op, the first bad element, the input
 * shapes and the tape node (which it takes off the tape). An error inside a
 * derivative rule ends with the forward node whose rule it was, named as
 * ad_tape_print shows it: ", in the derivative of sqrt (node 7)" is the line
 * "v7 = sqrt(...)".
 */
#ifndef HYPERTAPE_AD_H
#define HYPERTAPE_AD_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ status */

typedef enum {
  AD_OK = 0,
  AD_ERR_NULL,    /* a required pointer argument was NULL */
  AD_ERR_SHAPE,   /* shapes do not fit the op */
  AD_ERR_DTYPE,   /* dtypes differ or are not supported */
  AD_ERR_ARENA,   /* the tape's arena cannot hold the request */
  AD_ERR_NOMEM,   /* malloc failed */
  AD_ERR_ARG,     /* an argument is out of range, or a tensor of another tape / rewound */
  AD_ERR_GRAD,    /* ad_grad cannot give a true gradient (unrecorded, strict: not reached) */
  AD_ERR_NUMERIC, /* NaN/Inf guard tripped */
  AD_ERR_IO,      /* file could not be read or written */
  AD_ERR_FORMAT,  /* file contents are corrupt or of the wrong version */
  AD_ERR_STATE    /* call not valid in the object's current state */
} ad_status;

/* Short name of a status ("shape mismatch", ...). Never NULL. */
const char *ad_status_str(ad_status s);

/* Message of the last failing call on this thread that has no tape to hold
 * its error: heap tensor constructors, ad_tape_new, ad_copy_values,
 * ad_tape_print/ad_tape_dot, and any op or transform given a NULL tape
 * (nn_ calls without a tape report here too). Each of these sets it to ""
 * when it succeeds. Errors raised on a tape are read with ad_tape_errmsg. */
const char *ad_last_error(void);

/* ------------------------------------------------------------------ tensors */

#define AD_MAX_DIMS 4

typedef enum { AD_F32 = 0, AD_F64 = 1 } ad_dtype;

struct ad_node;
struct ad_tape;

/* Dense, row-major, contiguous. Fields are public to read; change them only
 * through the API. `data` holds `size` elements of `dtype`; a tensor has at
 * most 2^40 elements (AD_ERR_SHAPE naming the shape beyond that, with every
 * size computed overflow-checked). An arena tensor belongs to the tape that
 * made it: ops on another tape refuse it (AD_ERR_ARG), heap tensors are
 * accepted by every tape. */
typedef struct ad_tensor {
  ad_dtype dtype;
  int ndim;                   /* 0 (scalar) .. AD_MAX_DIMS */
  int64_t shape[AD_MAX_DIMS]; /* unused dims are 1 */
  int64_t size;               /* product of shape[0..ndim) */
  void *data;
  struct ad_tensor *grad; /* leaves: gradient accumulated by ad_backward */
  /* internal */
  struct ad_node *node; /* op that produced it; NULL for leaves/constants */
  unsigned flags;
  unsigned gen;              /* scratch stamp used by ad_grad */
  struct ad_tensor *scratch; /* scratch gradient slot used by ad_grad */
  const char *name;          /* optional, for printing */
  size_t tape_id;            /* arena tensors: the id of the tape holding them; 0 on the heap */
} ad_tensor;

/* Bytes of one element of the dtype (4 or 8). */
size_t ad_dtype_size(ad_dtype dt);
const char *ad_dtype_name(ad_dtype dt);

/* Heap tensors (outside any arena): parameters, datasets, results to keep.
 * new: zero-filled. from: copies `data` (size elements of dtype).
 * wrap: borrows caller memory (not freed by ad_tensor_free).
 * On failure *out = NULL and ad_last_error() says why. */
ad_status ad_tensor_new(ad_tensor **out, ad_dtype dt, int ndim, const int64_t *shape);
ad_status ad_tensor_from(ad_tensor **out, ad_dtype dt, int ndim, const int64_t *shape,
                         const void *data);
ad_status ad_tensor_wrap(ad_tensor **out, ad_dtype dt, int ndim, const int64_t *shape, void *data);
/* Frees the tensor, its owned data and its ->grad. Accepts NULL. */
void ad_tensor_free(ad_tensor *t);

/* Marks a tensor as a leaf that needs a gradient (on = 1) or not. Returns the
 * previous setting, or -1 if t is NULL or was produced by an op. */
int ad_requires_grad(ad_tensor *t, int on);
int ad_needs_grad(const ad_tensor *t);

/* Zeroes t->grad if present. */
void ad_zero_grad(ad_tensor *t);

/* Element access as double (for tests, printing and small loops). */
double ad_get(const ad_tensor *t, int64_t i);
void ad_set(ad_tensor *t, int64_t i, double v);
double ad_item(const ad_tensor *t); /* element 0; NaN if t is NULL */

/* Copies src's values into dst (same size, any dtypes). Returns a status. */
ad_status ad_copy_values(ad_tensor *dst, const ad_tensor *src);
int ad_same_shape(const ad_tensor *a, const ad_tensor *b);
/* "[128, 784] f32" into buf; returns buf. */
const char *ad_shape_str(const ad_tensor *t, char *buf, size_t len);

/* ------------------------------------------------------------------ rng */

/* xoshiro256** (Blackman & Vigna) seeded through splitmix64; normals by the
 * Marsaglia polar method in double precision. Integer and uniform streams
 * are identical on every machine; normals are too wherever libm's log()
 * is correctly rounded (glibc's is). */
typedef struct {
  uint64_t s[4];
  double spare; /* polar method yields normals in pairs */
  int has_spare;
} ad_rng;

void ad_rng_seed(ad_rng *r, uint64_t seed);
uint64_t ad_rng_next(ad_rng *r);
double ad_rng_uniform(ad_rng *r);             /* [0, 1), 53 bits */
double ad_rng_normal(ad_rng *r);              /* N(0, 1) */
uint64_t ad_rng_below(ad_rng *r, uint64_t n); /* uniform in [0, n), unbiased */
void ad_tensor_fill_normal(ad_tensor *t, ad_rng *r, double mean, double std);
void ad_tensor_fill_uniform(ad_tensor *t, ad_rng *r, double lo, double hi);

/* ------------------------------------------------------------------ tape */

typedef struct ad_tape ad_tape;

/* The arena starts with one chunk of arena_mb MiB and grows by further
 * chunks (each as large as all before it, at least the request) while the
 * total stays within arena_max_mb; a chunk is reserved only when a request
 * does not fit in those already reserved.
 * Chunks are kept until the tape is freed, so a loop that rewinds to a mark
 * reserves memory only in its first step. For a fixed arena that fails
 * with AD_ERR_ARENA instead of growing, set arena_max_mb = arena_mb. */
#define AD_ARENA_DEFAULT_MB 64       /* first chunk by default */
#define AD_ARENA_DEFAULT_MAX_MB 4096 /* cap by default: 4 GiB */
typedef struct {
  size_t arena_mb;     /* first arena chunk, MiB (0: AD_ARENA_DEFAULT_MB) */
  size_t arena_max_mb; /* total cap, MiB (0: AD_ARENA_DEFAULT_MAX_MB, or arena_mb if larger) */
  int no_record;       /* start with recording off */
  int nan_guard;       /* check every op's output for NaN/Inf (AD_ERR_NUMERIC) */
} ad_tape_opts;

/* Makes a tape. opts may be NULL (defaults). */
ad_status ad_tape_new(ad_tape **out, const ad_tape_opts *opts);
void ad_tape_free(ad_tape *t); /* accepts NULL */

/* The error in force on the tape (AD_OK when none; see the top of this
 * file for when it clears), and the message of the tape's last error: the
 * one in force, or the one a rewind retired ("" if none since creation or
 * ad_tape_clear_error). clear_error drops both. */
ad_status ad_tape_status(const ad_tape *t);
const char *ad_tape_errmsg(const ad_tape *t);
void ad_tape_clear_error(ad_tape *t);

/* Recording on/off; returns the previous setting. With recording off ops
 * compute values only. */
int ad_set_recording(ad_tape *t, int on);
int ad_is_recording(const ad_tape *t);
int ad_set_nan_guard(ad_tape *t, int on);

/* Arena marks. Everything allocated or recorded after the mark is freed by
 * ad_rewind; tensors made after the mark must not be used afterwards (an op
 * given one fails with AD_ERR_ARG while its memory is unused; once reused,
 * it may not be caught). Rewinding to a mark taken before the tape's error
 * clears the error (see the top). A marker not made by ad_mark on this tape,
 * or past the tape's current point, is ignored. */
typedef struct {
  size_t chunk, offset, used, n_nodes;
  struct ad_node *last;
  size_t seq; /* order of the mark on its tape (1, 2, ...) */
} ad_marker;
ad_marker ad_mark(ad_tape *t);
void ad_rewind(ad_tape *t, ad_marker m);
/* Frees every node and tensor on the tape (like rewinding to the start). */
void ad_tape_reset(ad_tape *t);

/* Compaction: frees what the recorded graph after mark m does not need,
 * keeping the graph itself. Every node recorded after m that a tensor of
 * keep[] depends on stays, with the tensor structs it refers to, so ad_grad
 * (recorded or not) still runs through it and gives the same gradients
 * (nodes nothing kept depends on go: no gradient of a kept tensor reaches
 * them); but of the tensors made after m only these keep their values:
 *   - those a derivative rule of a node after m reads (each op declares
 *     what its rule reads; an op that did not is assumed to read all);
 *   - those in keep[0..n_keep) (updated in place to their new addresses).
 * Any other tensor made after m that a node refers to keeps its struct but
 * has its values released: an op given it fails with AD_ERR_ARG saying so.
 * Tensors made after m that neither a node nor keep[] refers to are freed
 * as ad_rewind frees them: do not use them. The space is reclaimed by
 * moving the survivors down to m, so marks taken at or before m stay valid
 * and marks taken after m must not be used. Gradients may be asked only
 * with respect to tensors that needed one when compacting (a leaf given
 * ad_requires_grad later can meet a released value: AD_ERR_ARG, never a
 * wrong number). Ops whose node holds arena data compaction cannot size
 * make it refuse (AD_ERR_STATE, the tape unchanged but for the error). */
ad_status ad_tape_compact(ad_tape *t, ad_marker m, int n_keep, ad_tensor **keep);

typedef struct {
  size_t used;     /* bytes in use now */
  size_t peak;     /* high-water mark since creation or ad_arena_reset_peak */
  size_t capacity; /* bytes reserved from the system */
  size_t n_chunks; /* chunks reserved */
  size_t n_grows;  /* times the arena asked the system for memory */
  size_t n_nodes;  /* nodes on the tape now */
} ad_arena_stats;
void ad_arena_stats_get(const ad_tape *t, ad_arena_stats *s);
void ad_arena_reset_peak(ad_tape *t);

/* Raw, 64-byte aligned scratch memory from the arena (freed by rewind).
 * NULL + AD_ERR_ARENA on the tape when it does not fit. */
void *ad_arena_alloc(ad_tape *t, size_t bytes);

/* ------------------------------------------------------------------ arena tensors */

/* Tensors made in the arena. None requires a gradient. */
ad_tensor *ad_empty(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape);
ad_tensor *ad_zeros(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape);
ad_tensor *ad_full(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape, double v);
ad_tensor *ad_ones(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape);
ad_tensor *ad_scalar(ad_tape *t, ad_dtype dt, double v);
ad_tensor *ad_const(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape, const void *data);
ad_tensor *ad_zeros_like(ad_tape *t, const ad_tensor *x);
ad_tensor *ad_ones_like(ad_tape *t, const ad_tensor *x);
ad_tensor *ad_randn(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape, ad_rng *r);
ad_tensor *ad_rand_uniform(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape, ad_rng *r,
                           double lo, double hi);
/* x's values with no history (stop-gradient): gradients do not flow through
 * the result. For a tensor made on a tape this is a view sharing its data
 * (free); for a heap tensor (a parameter that may later change in place) it
 * is a copy of the values as they are now. */
ad_tensor *ad_detach(ad_tape *t, const ad_tensor *x);

/* ------------------------------------------------------------------ ops */
/* Every op returns NULL (and records an error on the tape) on bad input.
 * Binary elementwise ops take same-shape operands or one operand of size 1
 * (a scalar broadcast over the other). */

ad_tensor *ad_add(ad_tape *t, ad_tensor *a, ad_tensor *b);
ad_tensor *ad_sub(ad_tape *t, ad_tensor *a, ad_tensor *b);
ad_tensor *ad_mul(ad_tape *t, ad_tensor *a, ad_tensor *b);
ad_tensor *ad_div(ad_tape *t, ad_tensor *a, ad_tensor *b);
ad_tensor *ad_neg(ad_tape *t, ad_tensor *x);
/* The number (c, p; also ad_axpy's c) must be finite in x's dtype (|c| <=
 * FLT_MAX for f32), else AD_ERR_ARG naming the op and the argument. */
ad_tensor *ad_scale(ad_tape *t, ad_tensor *x, double c);      /* c*x */
ad_tensor *ad_add_scalar(ad_tape *t, ad_tensor *x, double c); /* x+c */
ad_tensor *ad_pow_scalar(ad_tape *t, ad_tensor *x, double p); /* x^p */
ad_tensor *ad_exp(ad_tape *t, ad_tensor *x);
ad_tensor *ad_log(ad_tape *t, ad_tensor *x);
ad_tensor *ad_sqrt(ad_tape *t, ad_tensor *x);
ad_tensor *ad_tanh(ad_tape *t, ad_tensor *x);
ad_tensor *ad_sigmoid(ad_tape *t, ad_tensor *x);
ad_tensor *ad_relu(ad_tape *t, ad_tensor *x);
/* g * (x > 0): relu's VJP as one fused op with its own rule. */
ad_tensor *ad_relu_backward(ad_tape *t, ad_tensor *g, ad_tensor *x);
ad_tensor *ad_softplus(ad_tape *t, ad_tensor *x);
ad_tensor *ad_abs(ad_tape *t, ad_tensor *x);
/* 1 where x > 0, -1 where x < 0, 0 at 0. No gradient flows through it. */
ad_tensor *ad_sign(ad_tape *t, ad_tensor *x);

/* Multiply-add with a number c: a + c*b (axpy) in one pass; a and b as for
 * the binary ops above. (For a tensor coefficient use ad_add(a, ad_mul(c, b)).) */
ad_tensor *ad_axpy(ad_tape *t, ad_tensor *a, double c, ad_tensor *b);

/* C = op(A) op(B), 2-D; op(X) = X^T when the flag is set. No copies: the
 * transpose is passed to BLIS as strides. */
ad_tensor *ad_matmul(ad_tape *t, ad_tensor *a, ad_tensor *b, int trans_a, int trans_b);
ad_tensor *ad_transpose(ad_tape *t, ad_tensor *x); /* 2-D copy */
/* A view with another shape and the same elements. */
ad_tensor *ad_reshape(ad_tape *t, ad_tensor *x, int ndim, const int64_t *shape);
/* x[N, M] + b[M] on every row. */
ad_tensor *ad_add_rowvec(ad_tape *t, ad_tensor *x, ad_tensor *b);

/* Batched products (autodiff/ops_bmm.c), for one graph over a batch of
 * same-shaped problems (bilevel's batched MAML path) instead of one per
 * problem. C[b] = op(A[b]) op(B[b]) for A [B, m, k] and B [B, k, n]
 * (transposes per flag as in ad_matmul) -> [B, m, n]. One operand may be
 * 2-D, a matrix shared by every batch element (its gradient is the sum
 * over the batch). Both 2-D, batch sizes or inner dimensions that differ:
 * AD_ERR_SHAPE. Each element is an ad_gemm_* product. */
ad_tensor *ad_bmm(ad_tape *t, ad_tensor *a, ad_tensor *b, int trans_a, int trans_b);
/* x[B, m, n] + v[b, :] on every row of batch element b; v is [B, n] (or
 * any shape with leading dimension B and B n elements, e.g. [B, 1, n]). */
ad_tensor *ad_add_batch_rowvec(ad_tape *t, ad_tensor *x, ad_tensor *v);

/* Reductions. Axis reductions drop the axis (keepdim = 0) or keep it as 1. */
ad_tensor *ad_sum(ad_tape *t, ad_tensor *x); /* scalar (ndim 0) */
ad_tensor *ad_mean(ad_tape *t, ad_tensor *x);
ad_tensor *ad_sum_axis(ad_tape *t, ad_tensor *x, int axis, int keepdim);
ad_tensor *ad_mean_axis(ad_tape *t, ad_tensor *x, int axis, int keepdim);
ad_tensor *ad_max_axis(ad_tape *t, ad_tensor *x, int axis, int keepdim);
/* Repeats x n times along a new (keepdim = 0) or size-1 (keepdim = 1) axis:
 * the adjoint of ad_sum_axis. */
ad_tensor *ad_broadcast_axis(ad_tape *t, ad_tensor *x, int axis, int64_t n, int keepdim);
/* Broadcast a size-1 tensor to the shape of `like`. */
ad_tensor *ad_expand(ad_tape *t, ad_tensor *x, const ad_tensor *like);
ad_tensor *ad_logsumexp(ad_tape *t, ad_tensor *x, int axis, int keepdim);
ad_tensor *ad_softmax(ad_tape *t, ad_tensor *x, int axis);
ad_tensor *ad_log_softmax(ad_tape *t, ad_tensor *x, int axis);

/* Losses. labels: N integers in [0, C), copied into the arena. */
ad_tensor *ad_nll(ad_tape *t, ad_tensor *logp, const int32_t *labels, int64_t n);
ad_tensor *ad_cross_entropy(ad_tape *t, ad_tensor *logits, const int32_t *labels, int64_t n);
/* a and b of the same shape ([3, 4] against [4, 3] is AD_ERR_SHAPE). */
ad_tensor *ad_mse(ad_tape *t, ad_tensor *a, ad_tensor *b); /* mean((a-b)^2) */
ad_tensor *ad_dot(ad_tape *t, ad_tensor *a, ad_tensor *b); /* sum(a*b), scalar */

/* mask (same shape, no gradient; nonzero = take a) ? a : b. */
ad_tensor *ad_where(ad_tape *t, const ad_tensor *mask, ad_tensor *a, ad_tensor *b);
ad_tensor *ad_concat(ad_tape *t, int n, ad_tensor *const *xs, int axis);
ad_tensor *ad_slice(ad_tape *t, ad_tensor *x, int axis, int64_t start, int64_t len);
/* Zeros of `full_len` along axis with x placed at `start`: slice's adjoint. */
ad_tensor *ad_pad_axis(ad_tape *t, ad_tensor *x, int axis, int64_t start, int64_t full_len);

/* ------------------------------------------------------------------ transforms */

enum {
  AD_GRAD_RECORD = 1u << 0, /* record the backward pass (create graph) */
  AD_GRAD_STRICT = 1u << 1, /* AD_ERR_GRAD if an input does not reach the outputs */
};

/* Functional reverse mode: grads_out[i] = sum_j seeds[j]^T d outputs[j] / d inputs[i].
 * seeds may be NULL (ones); a seed has its output's size and dtype. An input
 * the outputs do not depend on gets zeros (or AD_ERR_GRAD with
 * AD_GRAD_STRICT). Gradients are arena tensors; with AD_GRAD_RECORD they
 * carry history and can be differentiated again.
 * AD_ERR_GRAD, never a silent zero: an input that needs no gradient (a
 * constant: call ad_requires_grad before recording; or an op's result that
 * was not recorded), and an output computed with recording off from tensors
 * that need a gradient (including a gradient taken without AD_GRAD_RECORD
 * and differentiated again). All tensors given must belong to t or live on
 * the heap (AD_ERR_ARG otherwise), as for every op. */
ad_status ad_grad(ad_tape *t, int n_out, ad_tensor *const *outputs, ad_tensor *const *seeds,
                  int n_in, ad_tensor *const *inputs, ad_tensor **grads_out, unsigned flags);

/* Accumulating reverse mode: adds d loss / d leaf into leaf->grad (a heap
 * tensor made on first use) for every leaf with ad_requires_grad set that
 * the loss depends on. seed may be NULL (1) only when loss has one element;
 * otherwise pass a seed of its size (AD_ERR_SHAPE without). */
ad_status ad_backward(ad_tape *t, ad_tensor *loss, ad_tensor *seed);

/* Hessian-vector product: hv[i] = sum_j d^2 f / dw_i dw_j v[j]. f has one
 * element and v[i] the shape of w[i] (AD_ERR_SHAPE otherwise). */
ad_status ad_hvp(ad_tape *t, ad_tensor *f, int n, ad_tensor *const *w, ad_tensor *const *v,
                 ad_tensor **hv_out, unsigned flags);

/* Mixed partial: out[k] = d/d lam_k ( sum_i grad_{w_i} f . v_i ). */
ad_status ad_mixed_partial(ad_tape *t, ad_tensor *f, int n_w, ad_tensor *const *w,
                           ad_tensor *const *v, int n_lam, ad_tensor *const *lam, ad_tensor **out,
                           unsigned flags);

/* Forward mode: tangents_out[j] = sum_i d outputs[j] / d inputs[i] . tangents[i].
 * Computed on the recorded graph by the double-VJP construction (see
 * ad_jvp in autodiff/grad.c for why): the outputs must have been recorded. */
ad_status ad_jvp(ad_tape *t, int n_in, ad_tensor *const *inputs, ad_tensor *const *tangents,
                 int n_out, ad_tensor *const *outputs, ad_tensor **tangents_out, unsigned flags);

/* ------------------------------------------------------------------ teaching view */

/* Names a tensor for printing (the string must outlive the tape use). */
void ad_set_name(ad_tensor *x, const char *name);
/* Names are stable: node outputs are v0, v1, ... in tape order, leaves
 * leaf0, ... and constants c0, ... in order of first use (a tensor's own
 * name, from ad_set_name, is shown instead). Two runs of the same program
 * print the same bytes. */

/* Wengert list: one line per node, the output padded to 8 columns, the op
 * as the tape names it, inputs, attributes after "; " and the output's shape:
 *     v12      = matmul(v3, w1; A B^T)  [128, 200] f32
 * Each leaf or constant is defined on a line before its first use
 * ("c0       = const 0.1  [] f64"), and a "# step 1: recorded backward"
 * line comes where the label or the phase changes. */
ad_status ad_tape_print(const ad_tape *t, FILE *f);

/* Labels the nodes recorded since `from` that have no label yet, so a loop
 * can call it after each inner step ("step 1", "step 2", ...) and once more
 * at the end for the rest ("hypergradient"). The DOT export draws each label
 * as a box around its nodes. The string is not copied: it must live as long
 * as the tape is printed (as for ad_set_name). Errors: AD_ERR_NULL, or
 * AD_ERR_ARG when `from` is past the end of the tape. */
ad_status ad_tape_label(ad_tape *t, ad_marker from, const char *label);

typedef struct {
  const char *title;   /* shown above the graph; NULL for none */
  const char *rankdir; /* "TB" (default: top to bottom), "LR", "BT" or "RL" */
  int n_outputs;       /* tensors drawn as outputs (bold red, double border) */
  ad_tensor *const *outputs;
  int no_clusters; /* 1: ignore ad_tape_label ranges */
  int no_legend;   /* 1: no legend box */
} ad_dot_opts;

/* Graphviz DOT of the recorded graph (`dot -Tpng tape.dot -o tape.png`).
 * Ops are boxes "v3 = scale" with their attributes ("c=0.1") and shape;
 * edges into an op with several operands are numbered in operand order
 * (sub: 0 - 1); scalar constants show their value, other constants their
 * shape; leaves needing a gradient are blue. The phase picks the style:
 * forward ops plain, ops a recorded ad_grad put on the tape (the recorded
 * backward) filled yellow and rounded, ops of a recorded sweep through a
 * recorded backward (a hypergradient or Hessian-vector product recorded
 * with AD_GRAD_RECORD) filled red and bold. A legend lists the kinds
 * present. o may be NULL (the defaults). Errors: AD_ERR_NULL, AD_ERR_ARG
 * (bad rankdir, n_outputs < 0), AD_ERR_NOMEM. */
ad_status ad_tape_dot_ex(const ad_tape *t, FILE *f, const ad_dot_opts *o);
/* ad_tape_dot_ex with the defaults. */
ad_status ad_tape_dot(const ad_tape *t, FILE *f);

/* ------------------------------------------------------------------ BLAS */

/* Name of the BLIS kernel set the GEMM calls use ("skx", "zen3", "haswell",
 * "generic", ...). */
const char *ad_blas_kernel(void);
/* Why that kernel set, then the path chosen for each GEMM shape so far.
 * The path of a shape (dtype, transposes, m, n, k, threads) is chosen by
 * timing the candidates on its first use (a few ms at most, kept for the
 * process): "direct" (our own loop, tiny products), "sup", "sup+packA",
 * "sup+packB" (BLIS's small-matrix kernels), "packed" and "packed:SET"
 * (BLIS's packed path, with a second kernel set); products too large to
 * time cheaply take "blis" (BLIS's own rule). The text lives in a
 * per-thread buffer, rewritten by the next call from that thread. */
const char *ad_blas_reason(void);
/* Forces one path for every GEMM ("direct", "sup", ..., "blis"; as
 * HYPERTAPE_GEMM_PATH does), or back to measuring with "auto".
 * AD_ERR_ARG (with ad_last_error()) for a name not in that list. */
ad_status ad_blas_set_path(const char *path);
/* The path a product of this shape takes (timed now if the shape is new;
 * "none" for sizes below 1). */
const char *ad_blas_path(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, ad_dtype dt);
/* ------------------------------------------------------------------ threads */

/* The library's one thread setting: the threads inside each GEMM and in
 * every loop run through the library's worker pool (elementwise ops,
 * reductions, softmax/log_softmax, copies, broadcasts and fills, and the
 * nn/ loops built on the same pool; a loop too small to gain, below about
 * 32K elements per thread for cheap ops or 4K for exp/log/tanh-like ones,
 * stays on the calling thread). Default 1, or the
 * HYPERTAPE_THREADS environment variable read on first use. n must be in
 * 1..AD_MAX_THREADS: otherwise AD_ERR_ARG (with ad_last_error()) and the
 * setting is kept. The loops' workers are made on the first loop that uses
 * them and joined at exit. Results are deterministic for a fixed setting
 * (a loop's split into parts depends only on its size and the setting);
 * elementwise results are the same at every setting, a reduction's may
 * differ in the last bits between settings. Change it between steps, not
 * while another thread runs ops. Ops may be called from several threads at
 * once (each with its own tape): a call that finds the workers busy with
 * another thread's loop runs its loop on its own thread. */
#define AD_MAX_THREADS 256
ad_status ad_set_threads(int n);
int ad_threads(void);
/* The same setting under its older names; ad_blas_set_threads clamps n to
 * 1..AD_MAX_THREADS instead of failing. */
void ad_blas_set_threads(int n);
int ad_blas_threads(void);

/* Raw GEMM on row-major arrays through the chosen BLIS context:
 * C = alpha op(A) op(B) + beta C, op(A) m x k, op(B) k x n, lda/ldb/ldc are
 * row strides of the stored (untransposed) arrays. */
void ad_gemm_f32(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c,
                 int64_t ldc);
void ad_gemm_f64(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                 const double *a, int64_t lda, const double *b, int64_t ldb, double beta, double *c,
                 int64_t ldc);

/* ------------------------------------------------------------------ user ops
 * An op defined outside autodiff/: a forward that computes the output's
 * values, and a derivative rule written with the public ops above. The op
 * records on the tape like a built-in one, so ad_grad differentiates
 * through it, and because the rule is made of recorded ops, ad_grad with
 * AD_GRAD_RECORD, ad_hvp, ad_mixed_partial and ad_jvp work through it too.
 * A smooth |x| (tests/test_custom_op.c runs this op, with its unused
 * parameters cast to void; autodiff/custom_op.c says how it is recorded):
 *
 *     static ad_status sabs_fwd(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out,
 *                               const void *attrs) {           // out = sqrt(x^2 + eps)
 *       double eps = *(const double *)attrs;
 *       for (int64_t i = 0; i < out->size; i++) {
 *         double x = ad_get(in[0], i);
 *         ad_set(out, i, sqrt(x * x + eps));
 *       }
 *       return AD_OK;
 *     }
 *     static ad_status sabs_vjp(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out,
 *                               ad_tensor *g, const int *need, ad_tensor **gin,
 *                               const void *attrs) {           // d/dx = x / y
 *       gin[0] = ad_mul(t, g, ad_div(t, in[0], out));
 *       return ad_tape_status(t);
 *     }
 *     static const ad_custom_op SABS = {.name = "smooth_abs", .forward = sabs_fwd,
 *                                       .vjp = sabs_vjp};
 *     double eps = 1e-3;
 *     ad_tensor *y = ad_custom(tape, &SABS, 1, &x, &eps, sizeof eps);
 */

/* Output shape from the inputs: set *ndim (0..AD_MAX_DIMS) and shape[0..ndim).
 * Return AD_OK, or an error (see ad_custom_fail) when the inputs do not fit. */
typedef ad_status (*ad_custom_shape_fn)(ad_tape *t, int n_in, ad_tensor *const *in,
                                        const void *attrs, int *ndim, int64_t *shape);

/* Fills out (made by ad_custom: the shape above, in[0]'s dtype, contents
 * undefined) from the inputs. Plain loops over ->data / ad_get, any user
 * code (a library call, a message exchange), or public ops for temporaries
 * copied in with ad_copy_values: recording is off while it runs. It must
 * not modify the inputs, and, as it may run inside a derivative rule (one
 * that applies this op), not call ad_grad / ad_hvp / ad_jvp. Returns AD_OK
 * or an error status. */
typedef ad_status (*ad_custom_forward_fn)(ad_tape *t, int n_in, ad_tensor *const *in,
                                          ad_tensor *out, const void *attrs);

/* The derivative rule (VJP). g is d loss / d out (shaped like out). For
 * every i with need[i] set, store in gin[i] d loss / d in[i] = g^T d out /
 * d in[i], shaped like in[i] and of its dtype, or leave it NULL for zero.
 * Build gin only with public ops (ad_custom included: an op may use itself,
 * as an allreduce does) from g, in and out: they are recorded when the
 * caller asked for a recorded backward, which is what makes second
 * derivatives work; values read out into plain loops are constants to the
 * next derivative. It must not call ad_grad / ad_hvp / ad_jvp (the sweep
 * that runs it is under way) nor modify g, in or out. Returns AD_OK or an
 * error status. */
typedef ad_status (*ad_custom_vjp_fn)(ad_tape *t, int n_in, ad_tensor *const *in, ad_tensor *out,
                                      ad_tensor *g, const int *need, ad_tensor **gin,
                                      const void *attrs);

/* A user op's definition. ad_custom copies it (and the name) onto the
 * tape, so it may live on the stack; the functions must stay callable while
 * the tape holds nodes of the op. */
typedef struct {
  const char *name;             /* shown by ad_tape_print / ad_tape_dot and in errors */
  ad_custom_forward_fn forward; /* required */
  ad_custom_vjp_fn vjp;         /* required */
  ad_custom_shape_fn shape;     /* NULL: the output is shaped like in[0] */
  /* Optional: the attributes as text for ad_tape_print ("eps=0.001"). */
  void (*describe)(const void *attrs, char *buf, size_t len);
} ad_custom_op;

/* Applies a user op to n_in >= 1 inputs of one dtype; returns the output
 * (an arena tensor, recorded when an input needs a gradient) or NULL with
 * the error on the tape: AD_ERR_NULL for a missing definition, name,
 * forward, rule or input; the callbacks' own errors otherwise, with the
 * op's name in the message. attrs: the op's attributes, handed to every
 * callback. With attrs_size > 0 they are copied onto the tape (kept by the
 * node for the rule, so a stack struct will do); with attrs_size 0 the
 * pointer itself is kept (a context that must outlive the tape's use of
 * the node, e.g. a communicator; NULL is fine). A rule that returns a
 * gradient of the wrong shape or dtype makes ad_grad fail with AD_ERR_SHAPE
 * naming the op and the input. */
ad_tensor *ad_custom(ad_tape *t, const ad_custom_op *op, int n_in, ad_tensor *const *in,
                     const void *attrs, size_t attrs_size);

/* For user ops' callbacks: records an error on the tape (the first one
 * sticks, as with the library's own) with a printf-style message and
 * returns s, so a callback can `return ad_custom_fail(t, AD_ERR_ARG, ...)`. */
#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
ad_status
ad_custom_fail(ad_tape *t, ad_status s, const char *fmt, ...);

#ifdef __cplusplus
}
#endif
#endif
