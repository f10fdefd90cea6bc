/* ad_internal.h — what op files share with the tape: the node record, the
 * op descriptor, and helpers for checking inputs and recording. Not
 * installed; users never see it. nn/ and bilevel/ may include it to define
 * fused ops of their own in the same way. */
#ifndef HYPERTAPE_AD_INTERNAL_H
#define HYPERTAPE_AD_INTERNAL_H

#include "ad.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <string.h>

typedef struct ad_node ad_node;

/* A derivative rule. g is the gradient of the node's output; for every input
 * i with need[i] set, the rule stores dL/d in[i] in gin[i] (or leaves NULL for
 * a zero gradient). Rules use only public ops, so with recording on the
 * backward pass lands on the tape and can be differentiated again. */
typedef void (*ad_vjp_fn)(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                          const int *need);

/* What printing shows of a node's attributes ("axis=1", "c=0.5"). */
typedef void (*ad_attr_fn)(const ad_node *n, char *buf, size_t len);

/* What a derivative rule reads, for ad_tape_compact (tape.c). A rule
 * "reads" a tensor when it passes it to a public op (that op reads its
 * values) or dereferences its data; looking at its shape only is no read.
 * The declaration is per gradient: byte i (i < AD_NODE_MAX_INLINE) is the
 * set read while making input i's gradient, AD_S_IN(j) for input j and
 * AD_S_OUT for the node's output. Compaction keeps the values of a node's
 * tensors only for the inputs whose gradient can be asked for (those that
 * need one: an input with no history and no requires_grad cannot become a
 * gradient target of this node), so a matmul with a constant left operand
 * keeps its left operand (for dB = A^T G) but not its right one.
 * saves = 0 is undeclared: every input and the output count as read (the
 * safe default for ops that never said). Inputs at index >= 4 are always
 * counted as read. */
#define AD_S_IN(j) (1u << (j))
#define AD_S_OUT (1u << 4)
#define AD_SAVES_DECLARED (1u << 31)
/* a.extra is an arena tensor (a constant such as onehot(labels)) the rule
 * reads: compaction keeps it whole. */
#define AD_SAVES_EXTRA_TENSOR (1u << 30)
#define AD_SAVES(r0, r1, r2, r3)                                                                   \
  (AD_SAVES_DECLARED | (unsigned)(r0) | (unsigned)(r1) << 8 | (unsigned)(r2) << 16 |               \
   (unsigned)(r3) << 24)
/* The set read for input i's gradient under a declaration s. */
#define AD_SAVES_FOR(s, i) (((s) >> (8 * (i))) & 0x1fu)

/* An op's declaration of what its rule reads (zero: undeclared). */
typedef struct {
  unsigned mask; /* AD_SAVES(...) (| AD_SAVES_EXTRA_TENSOR), or 0: undeclared */
  /* When what is read depends on the node (which optional inputs are
   * present): returns the mask for n, overriding `mask`. May be NULL. */
  unsigned (*of)(const ad_node *n);
  /* a.extra is raw arena data of this many bytes (0: no raw extra). An op
   * whose a.extra lies after the mark but is neither declared here nor as
   * AD_SAVES_EXTRA_TENSOR makes ad_tape_compact refuse (AD_ERR_STATE): it
   * cannot move memory whose size it does not know. */
  size_t extra_bytes;
} ad_saves;

typedef struct {
  const char *name;
  ad_vjp_fn vjp;
  ad_attr_fn attr; /* may be NULL */
  ad_saves saves;  /* {0}: undeclared (compaction assumes the rule reads all) */
} ad_op_def;

/* Small attributes every op family needs. */
typedef struct {
  double c;          /* scalar constant (scale, pow exponent, ...) */
  int axis, keepdim; /* reductions, concat, slice */
  int ta, tb;        /* matmul transposes */
  int64_t i0, i1;    /* slice start/len, pad start/full length, broadcast n */
  void *extra;       /* arena data: labels, masks, ... */
  int64_t n_extra;
} ad_attrs;

#define AD_NODE_MAX_INLINE 4

struct ad_node {
  const ad_op_def *op;
  int n_in;
  ad_tensor **in; /* n_in inputs (points at in_inline when n_in <= 4) */
  ad_tensor *in_inline[AD_NODE_MAX_INLINE];
  ad_tensor *out;
  ad_attrs a;
  ad_node *prev, *next;
  size_t id;         /* creation order: increasing ids are a topological order */
  unsigned mark;     /* scratch stamp used by ad_grad's graph walk */
  unsigned phase;    /* AD_PHASE_*: what was running when it was recorded */
  const char *label; /* ad_tape_label range ("step 3"), or NULL */
};

/* Node phases, for the teaching view: recorded by user code (forward), by a
 * recorded ad_grad over forward nodes (backward), or by a recorded ad_grad
 * whose sweep goes through backward nodes (second order: hypergradients,
 * Hessian-vector products). Set by grad.c through ad__set_phase. */
enum { AD_PHASE_FORWARD = 0, AD_PHASE_BACKWARD = 1, AD_PHASE_SECOND = 2 };
/* Sets the phase new nodes get; returns the previous one. */
unsigned ad__set_phase(ad_tape *t, unsigned phase);

/* Tensor flags. */
enum {
  AD_FLAG_REQ = 1u << 0,   /* leaf that needs a gradient */
  AD_FLAG_OWNS = 1u << 1,  /* heap tensor that owns its data */
  AD_FLAG_ARENA = 1u << 2, /* lives in a tape arena */
  AD_FLAG_HEAP = 1u << 3,  /* struct itself malloc'd */
  AD_FLAG_OP = 1u << 4,    /* made by an op (ad__alloc/ad__like/ad__view), not a constructor */
  /* Computed, with no node, from tensors that needed a gradient: recording
   * was off. Set by ad__record and passed on by unrecorded ops, so ad_grad
   * can tell such an output (whose zero gradient would be a lie) from a
   * genuine constant (a gradient of a linear function, say). */
  AD_FLAG_UNREC = 1u << 5,
  /* Its values were dropped by ad_tape_compact (data is NULL): no
   * derivative rule of the compacted graph reads them. The struct stays so
   * the graph can still be walked; every op refuses it (ad__usable). */
  AD_FLAG_RELEASED = 1u << 6,
};

/* ---- errors */
/* Records the first error on the tape (later ones are dropped so the root
 * cause survives) and returns NULL so rules can `return ad__fail(...)`. */
ad_tensor *ad__fail(ad_tape *t, ad_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Thread-local last error, for calls without a tape. */
ad_status ad__set_last(ad_status s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Status of that last error (AD_OK if none). */
ad_status ad__last_status(void);
/* Clears it: every call that reports through ad_last_error() calls this
 * when it succeeds (as ds_ calls do for ds_errmsg). */
void ad__clear_last(void);

/* Whether x may be used on t: a heap tensor, or a live tensor of t's arena.
 * A tensor of another tape's arena, or one freed by ad_rewind (it lies in
 * the free part of t's arena), fails with AD_ERR_ARG; the message names
 * `op`, the argument (`what` and index i, e.g. "input", 1) and the tapes.
 * Returns 1 when fine. Never reads a freed tensor of t. */
int ad__usable(ad_tape *t, const char *op, const char *what, int i, const ad_tensor *x);
/* ad__usable also refuses a tensor whose values ad_tape_compact released
 * (AD_FLAG_RELEASED); ad__usable_shape accepts it, for callers that read
 * only its shape (ad_zeros_like, ad_expand's `like`, ad_grad's outputs and
 * inputs: a gradient with respect to a compacted tensor needs no values). */
int ad__usable_shape(ad_tape *t, const char *op, const char *what, int i, const ad_tensor *x);
/* The tape's id (1, 2, ... in creation order in the process), for messages. */
size_t ad__tape_id(const ad_tape *t);

/* Checks tape and inputs for NULL, tape ownership (ad__usable) and equal
 * dtypes. Returns 1 when fine. */
int ad__check(ad_tape *t, const char *op, int n, ad_tensor *const *xs);
/* Binary elementwise shape rule: same shape, or one side of size 1. */
int ad__check_binary(ad_tape *t, const char *op, const ad_tensor *a, const ad_tensor *b);
int ad__axis(ad_tape *t, const char *op, const ad_tensor *x, int axis);

/* Labels against log-probabilities [N, C]: checks shape and range (the
 * message names `op`), and records a node whose a.extra is the constant
 * onehot(labels) when out needs a gradient. Both return 1 when fine. */
int ad__check_labels(ad_tape *t, const char *op, ad_tensor *logp, const int32_t *labels, int64_t n);
int ad__record_labelled(ad_tape *t, const ad_op_def *op, ad_tensor *out, ad_tensor *logp,
                        const int32_t *labels, int64_t n);

/* Whether ad_tape_compact(t, m, ...) can compact what follows m (1), or
 * refuses with AD_ERR_STATE (0: an op of unknown extra size, say); asks
 * without recording any error. */
int ad__compactable(ad_tape *t, ad_marker m);
/* ad_tape_compact plus roots: tensors whose nodes stay but whose values
 * go unless a rule reads them (bilevel's lean unroll: a segment's last
 * outputs once L_val's gradient at them is taken). */
ad_status ad__compact_roots(ad_tape *t, ad_marker m, int n_keep, ad_tensor **keep, int n_roots,
                            ad_tensor **roots);
/* Whether p lies in the arena after mark m (grad.c: a rule's fresh
 * result), and whether the tape's NaN guard is on. */
int ad__after_mark(const ad_tape *t, ad_marker m, const void *p);
int ad__nan_guard(const ad_tape *t);
/* ad_grad flag for internal callers (bilevel's lean unroll): an input the
 * outputs do not reach gets NULL instead of a new tensor of zeros, so a
 * caller that only adds the gradient somewhere holds no weight-sized
 * zeros. A bit above the public flags. */
#define AD_GRAD_NULL_UNREACHED (1u << 30)

/* Collection during an unrecorded backward sweep (grad.c): ad_grad's
 * sweep calls ad__sweep_collect before each node's rule. When the arena
 * grew by more than `budget` since the last collection, it compacts
 * everything allocated after m (no node is recorded there: recording is
 * off) keeping only the gradients still to be read: those of the outputs
 * of nodes[0..k) not yet swept, of every node's inputs (the gradients
 * being accumulated) and of the requested inputs; scratch slots are
 * updated to the moved tensors. */
typedef struct {
  ad_marker m;
  size_t budget;
  int n_in;
  ad_tensor *const *inputs;
} ad__sweep_gc;
void ad__sweep_collect(ad_tape *t, ad__sweep_gc *gc, ad_node *const *nodes, ptrdiff_t k,
                       ptrdiff_t count, unsigned gen);

/* In an unrecorded backward sweep, the gradient slot of x (an input of
 * the node whose rule is running, with need[i] set) when the sweep owns
 * it and a rule may add its part into it in place instead of returning a
 * new tensor (then it leaves gin[i] NULL): the slot holds the sum of the
 * contributions so far, has x's dtype and size, and nothing else refers
 * to it. NULL otherwise (no contribution yet, recording, the NaN guard).
 * The rule must give the bits accumulate's in-place add would: slot + part,
 * part rounded first (grad.c). */
ad_tensor *ad__grad_slot(const ad_tape *t, const ad_tensor *x);
/* ad_grad whose first n_acc inputs' gradients are added into acc[i] (a
 * tensor of the input's dtype and size, or NULL: none) in place, when the
 * sweep is unrecorded: grads_out[i] is then acc[i] itself (unreached: acc
 * as it was). Recorded, or for an acc that does not fit, grads_out[i] is
 * the gradient alone, as ad_grad's: the caller adds it in. The sum is
 * acc + c1 + c2 ... in the order the contributions arrive. */
ad_status ad__grad_acc(ad_tape *t, int n_out, ad_tensor *const *outputs, ad_tensor *const *seeds,
                       int n_in, ad_tensor *const *inputs, ad_tensor **grads_out, unsigned flags,
                       int n_acc, ad_tensor *const *acc);

/* ---- allocation */
ad_tensor *ad__alloc(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape, int zero);
/* A tensor struct in the arena sharing `data` (views: reshape, detach). */
ad_tensor *ad__view(ad_tape *t, const ad_tensor *x, int ndim, const int64_t *shape);
ad_tensor *ad__like(ad_tape *t, const ad_tensor *x); /* uninitialised, same shape */

/* ---- recording */
/* Appends a node when recording is on and an input needs a gradient; the
 * output then needs one too. Returns the node (to fill attributes) or NULL
 * when nothing was recorded (then out is marked AD_FLAG_UNREC if it was
 * computed from tensors needing a gradient with recording off, or from
 * such marked tensors). Call it for every op output, recording or not. */
ad_node *ad__record(ad_tape *t, const ad_op_def *op, ad_tensor *out, int n_in,
                    ad_tensor *const *in);
/* Runs the NaN/Inf guard on an op's output if enabled; returns out or NULL.
 * `op` is the public function ("ad_div"): the message gives it, the first
 * bad element, the input shapes and the tape node, which is taken off the
 * tape (plus the rule and scope context, as every message). */
ad_tensor *ad__done(ad_tape *t, ad_tensor *out, const char *op);

/* Message context (internal). ad__check calls ad__op_begin with the op and
 * its inputs, for ad__done. grad.c sets the node whose derivative rule
 * runs (errors inside get ", in the derivative of sqrt (node 7)");
 * returns the previous one. */
void ad__op_begin(ad_tape *t, const char *op, int n, ad_tensor *const *in);
const ad_node *ad__set_rule(ad_tape *t, const ad_node *n);

/* Error-prefix scopes for composite functions built of ops (nn_layer_norm
 * and the like): errors raised inside, by the ops it calls, begin with the
 * scope's name ("nn_layer_norm: ad_sum_axis produced NaN ..."), so the
 * message names what the user called. push returns a depth for pop:
 *     int sc = ad__scope_push(t, "nn_layer_norm");
 *     ... ops ...
 *     ad__scope_pop(t, sc);
 * Up to AD_MAX_SCOPES deep (deeper pushes are not shown). t may be NULL. */
#define AD_MAX_SCOPES 8
int ad__scope_push(ad_tape *t, const char *name);
void ad__scope_pop(ad_tape *t, int depth);

int ad__recording(const ad_tape *t);
ad_node *ad__first_node(const ad_tape *t);
/* Per-tape scratch arrays of node pointers (slot 0 or 1), grown as needed and
 * kept for the tape's life, so repeated ad_grad calls allocate nothing.
 * Returns NULL (and records AD_ERR_NOMEM) if it cannot grow to n. */
ad_node **ad__node_buf(ad_tape *t, int slot, size_t n);
/* Marks an arena tensor as a leaf needing a gradient (internal: jvp dummies). */
void ad__make_leaf(ad_tensor *x);

/* ---- checked arithmetic
 * Every size, offset and bound computed from what a caller passed goes
 * through these (here, in nn/ and in datasets/): signed overflow is
 * undefined and size_t wraps silently, so a check like `start + len > n`
 * with start + len past INT64_MAX passes and the copy that follows runs
 * out of bounds. Each returns 1 and stores the exact result, or returns 0
 * (storing nothing) when the result does not fit. */
static inline int ad__add_i64(int64_t a, int64_t b, int64_t *r) {
  int64_t v;
  if (__builtin_add_overflow(a, b, &v)) return 0;
  *r = v;
  return 1;
}
static inline int ad__mul_i64(int64_t a, int64_t b, int64_t *r) {
  int64_t v;
  if (__builtin_mul_overflow(a, b, &v)) return 0;
  *r = v;
  return 1;
}
static inline int ad__add_size(size_t a, size_t b, size_t *r) {
  size_t v;
  if (__builtin_add_overflow(a, b, &v)) return 0;
  *r = v;
  return 1;
}
static inline int ad__mul_size(size_t a, size_t b, size_t *r) {
  size_t v;
  if (__builtin_mul_overflow(a, b, &v)) return 0;
  *r = v;
  return 1;
}
/* 1 when [start, start + len) lies inside [0, n), decided without forming
 * start + len (which may not fit). */
static inline int ad__range_ok(int64_t start, int64_t len, int64_t n) {
  return start >= 0 && len >= 0 && n >= 0 && start <= n && len <= n - start;
}

/* 1 when the number c, applied to elements of dtype dt (a scale, an
 * exponent, a slope), is finite there: not NaN or Inf, and on f32 not past
 * FLT_MAX (it would round to Inf). Compared, not cast: converting an
 * out-of-range double to float is undefined behaviour in C. */
static inline int ad__finite_in(double c, ad_dtype dt) {
  return isfinite(c) && (dt != AD_F32 || fabs(c) <= FLT_MAX);
}

/* Largest element count of one tensor (2^40): far past any arena, and small
 * enough that every byte count and element offset of a valid tensor fits
 * in int64_t and size_t with room to spare. */
#define AD_MAX_NUMEL ((int64_t)1 << 40)

/* Element count of a shape: 1 with *n set when every dimension is >= 1 and
 * the product is at most AD_MAX_NUMEL; 0 otherwise (overflow included). */
static inline int ad__numel_ok(int ndim, const int64_t *shape, int64_t *n) {
  int64_t p = 1;
  for (int i = 0; i < ndim; i++)
    if (shape[i] < 1 || !ad__mul_i64(p, shape[i], &p) || p > AD_MAX_NUMEL) return 0;
  *n = p;
  return 1;
}
/* Bytes of n elements of es bytes each. */
static inline int ad__bytes_ok(int64_t n, size_t es, size_t *bytes) {
  return n >= 0 && ad__mul_size((size_t)n, es, bytes);
}

/* "[4294967296, 4294967296]" for a raw shape (not yet a tensor) into buf. */
const char *ad__dims_str(int ndim, const int64_t *shape, char *buf, size_t len);

/* Shape helpers. */
int64_t ad__numel(int ndim, const int64_t *shape);
/* Sizes around an axis: outer * n * inner = size. */
void ad__split(const ad_tensor *x, int axis, int64_t *outer, int64_t *n, int64_t *inner);
/* The VJP of y = log_softmax(x) along axis for cotangent g, g - exp(y) sum(g),
 * as one recorded op (ops_reduce.c says why). */
ad_tensor *ad__log_softmax_backward(ad_tape *t, ad_tensor *g, ad_tensor *y, int axis);

/* Atomic file replacement (atomic_file.c). ad__afile_open makes a
 * temporary file, mode 0644, beside path and returns 0, or an errno: ENOMEM
 * leaves tmp NULL; any other keeps tmp (the name tried, for the caller's
 * message) until ad__afile_finish. The caller writes to fd, or to a FILE or
 * gzFile on dup(fd) which it closes first, then calls ad__afile_finish with
 * err 0 (its writes succeeded) or the errno of its failure. finish fsyncs
 * and closes fd, renames the temporary over path and fsyncs the directory;
 * on err or any failure it removes the temporary, leaving an existing file
 * as it was. It frees tmp and returns 0 or the first errno. */
typedef struct {
  char *tmp;
  int fd;
} ad__afile;
int ad__afile_open(ad__afile *a, const char *path);
int ad__afile_finish(ad__afile *a, const char *path, int err);

/* 1 when every element of x (f32 or f64) is finite: the exponent field is
 * all ones exactly for NaN and Inf, tested with integer ops so the loop
 * vectorizes (cheap enough for per-step checks; search for the element
 * only when this says 0). */
/* exp(x) in double, branch-free and inline so that a loop of it vectorizes
 * (glibc's exp is a call per element, with an errno wrapper: in a
 * 784-200-10 MLP's gradient step the softmax's exps took 2% of the step).
 *   x = k ln2 + r, |r| <= ln2 / 2 (k by the 1.5 2^52 rounding trick, ln2
 *   in two parts so k ln2_hi is exact),  exp(r) = sum_{i <= 13} r^i / i!
 *   (the next term is below 5e-18 relative),  2^k = 2^k1 2^k2 with both
 *   halves normal, so results in the subnormal range are rounded once.
 * Within about 2 ulp of exp; x is clamped to [-746, 710], outside which
 * exp is 0 or +inf in double anyway; NaN stays NaN (no integer conversion
 * of a float: the exponent bits are made by integer adds). */
/* Its constants, shared with the 8-lane form (ops_reduce.c's exp_array):
 * the rounding magic, log2 e, ln 2 in two parts, the clamp, and the
 * Horner coefficients 1/13!, 1/12!, ..., 1/2, 1, 1. */
#define AD__EXP_MAGIC 0x1.8p52
#define AD__EXP_LOG2E 0x1.71547652b82fep0
#define AD__EXP_LN2_HI 0x1.62e42feep-1
#define AD__EXP_LN2_LO 0x1.a39ef35793c76p-33
#define AD__EXP_LO (-746.0)
#define AD__EXP_HI 710.0
#define AD__EXP_NPOLY 14
#define AD__EXP_POLY                                                                               \
  1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,        \
      1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0
static inline double ad__exp(double x) {
  static const double c[AD__EXP_NPOLY] = {AD__EXP_POLY};
  const double magic = AD__EXP_MAGIC;
  double xc = x < AD__EXP_LO ? AD__EXP_LO : x;
  xc = xc > AD__EXP_HI ? AD__EXP_HI : xc;
  const double tk = xc * AD__EXP_LOG2E + magic, kf = tk - magic;
  const double r = (xc - kf * AD__EXP_LN2_HI) - kf * AD__EXP_LN2_LO;
  double p = c[0];
  for (int j = 1; j < AD__EXP_NPOLY; j++) p = p * r + c[j];
  uint64_t tb, mb;
  memcpy(&tb, &tk, sizeof tb);
  memcpy(&mb, &magic, sizeof mb);
  /* k + 2048 in [972, 3072] (k = tb - mb), halved without a signed shift */
  const uint64_t u = tb - mb + 2048u, u1 = u >> 1;
  const uint64_t e1 = (u1 - 1024u + 1023u) << 52, e2 = (u - u1 - 1024u + 1023u) << 52;
  double s1, s2;
  memcpy(&s1, &e1, sizeof s1);
  memcpy(&s2, &e2, sizeof s2);
  return p * s1 * s2;
}

/* Whether x's and y's elements share memory (a rule writing into one
 * while reading the other must not). */
static inline int ad__overlap(const ad_tensor *x, const ad_tensor *y) {
  const uintptr_t a = (uintptr_t)x->data, b = (uintptr_t)y->data;
  return a < b + (size_t)y->size * ad_dtype_size(y->dtype) &&
         b < a + (size_t)x->size * ad_dtype_size(x->dtype);
}

static inline int ad__all_finite(const ad_tensor *x) {
  uint64_t bad = 0;
  const unsigned char *u = (const unsigned char *)x->data;
  if (x->dtype == AD_F64) {
    const uint64_t e = 0x7ff0000000000000ull;
    for (int64_t j = 0; j < x->size; j++) {
      uint64_t b; /* memcpy: the bits without breaking aliasing rules */
      memcpy(&b, u + 8 * j, 8);
      bad |= (b & e) == e;
    }
  } else {
    const uint32_t e = 0x7f800000u;
    for (int64_t j = 0; j < x->size; j++) {
      uint32_t b;
      memcpy(&b, u + 4 * j, 4);
      bad |= (b & e) == e;
    }
  }
  return !bad;
}

/* Typed element pointers. */
#define AD_F(x) ((float *)(x)->data)
#define AD_D(x) ((double *)(x)->data)

/* ---- parallel loops (autodiff/parallel.c)
 * Elementwise, reduction, im2col/col2im and pooling loops split [0, n) into
 * `parts` contiguous ranges, part p covering [n*p/parts, n*(p+1)/parts),
 * and run them on the library's worker threads (as many as
 * ad_blas_threads()). parts = min(threads, n / grain), at least 1, so small
 * loops stay on the caller's thread. The split depends only on n, grain and
 * the thread count: a reduction that sums each part into partial[p] and
 * then adds the partials in order of p gives the same bits on every run
 * with the same thread count. fn must not call ad__par_for itself (nested
 * calls run serially) and must not record on a tape. */
typedef void (*ad__range_fn)(void *ctx, int part, int64_t lo, int64_t hi);
/* The number of parts ad__par_for(n, grain, ...) uses now (1..threads). */
int ad__par_parts(int64_t n, int64_t grain);
/* Runs fn over every part and returns when all are done. */
void ad__par_for(int64_t n, int64_t grain, ad__range_fn fn, void *ctx);
/* The same with the number of parts given (capped to n, at least 1): the
 * split of a multi-thread GEMM (blas.c), whose part count belongs to the
 * shape class it measured. Nested and concurrent calls run serially, as
 * for ad__par_for. */
void ad__par_for_parts(int64_t n, int parts, ad__range_fn fn, void *ctx);
/* 1 on a pool worker or inside a part (a GEMM there must not start a
 * thread team of its own: its ad__par_for_parts runs serially anyway). */
int ad__par_inside(void);

/* C = beta C + sum_{i < nb} op(A_i) op(B_i) with A_i = a + i sa, B_i = b + i sb
 * (elements, dtype dt): the bits of nb ad_gemm calls in order (beta, then
 * 1), in one pool job (blas.c). */
void ad__gemm_sum(ad_dtype dt, int ta, int tb, int64_t m, int64_t n, int64_t k, const void *a,
                  int64_t lda, int64_t sa, const void *b, int64_t ldb, int64_t sb, int64_t nb,
                  double beta, void *c, int64_t ldc);

/* ---- the "wide:avx512" GEMM kernel (autodiff/gemm_wide.c)
 * C = alpha op(A) op(B) + beta C in f32, row-major, A read in place and
 * op(B) copied 32 columns at a time: blas.c times it as one more path.
 * Returns 1 when it ran, 0 when it did not (an empty product, or no memory
 * for the panel), so the caller takes another path. Call it only where
 * ad__cpu_avx512() (ad_simd.h) says the CPU runs AVX-512F and VL. */
int ad__gemm_wide512(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                     int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

/* 1 when an f32 product of this shape, called now, runs on the wide:avx512
 * kernel (its measured, cached or forced choice; a new shape is measured on
 * a and b), split or not: each element of C is then alpha acc + beta C
 * with the k-sum acc complete first, so C += AB with beta 1 has the bits of
 * the product then an add. (BLIS's sup kernels do not: with beta 1 they
 * gave other bits.) */
int ad__gemm_f32_runs_wide(int ta, int tb, int64_t m, int64_t n, int64_t k, const float *a,
                           int64_t lda, const float *b, int64_t ldb);

/* ---- tiny products (blas.c, ops_bmm.c) */
/* Whether our own AVX-512 kernels may run: the CPU has AVX-512 and the
 * BLIS kernel set asked for (HYPERTAPE_BLIS_ARCH) is not an AVX2-only one
 * (blas.c). */
int ad__blas_avx512_allowed(void);
/* ops_bmm.c's choice of loop per shape class, appended to buf at len
 * (cap bytes in all) for ad_blas_reason; returns the new length. */
size_t ad__bmm_describe(char *buf, size_t len, size_t cap);

/* ---- bounded text (autodiff/print.c)
 * Appends printf-style text to buf (cap bytes in all, len used) without
 * writing past cap; returns the new length, which may exceed cap (as
 * snprintf's does: the caller marks the text truncated), or cap on an
 * encoding error. For the reason strings of ad_blas_reason. */
size_t ad__buf_put(char *buf, size_t len, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* ---- growable byte buffer (autodiff/bytebuf.c)
 * The bytes of a file being built in memory (nn_params_save's header,
 * bl_engine_save's state) or read whole (nn_params_load, bl_engine_load).
 * Start from {0}. A failed allocation, or a size past SIZE_MAX, sets oom
 * and makes every later put a no-op, so a writer puts everything and checks
 * oom once at the end. Capacity doubles, so n bytes cost O(n) copies. */
#include <stdio.h> /* FILE, for ad__bytebuf_read */
typedef struct {
  unsigned char *p;
  size_t n, cap;
  int oom;
} ad__bytebuf;
/* Room for `extra` more bytes past n: 1, or 0 with oom set. */
int ad__bytebuf_reserve(ad__bytebuf *b, size_t extra);
void ad__bytebuf_put(ad__bytebuf *b, const void *src, size_t n);
/* The low `bytes` (1..8) bytes of v, little-endian. */
void ad__bytebuf_put_le(ad__bytebuf *b, uint64_t v, int bytes);
/* Appends the rest of f; the caller checks ferror(f) and oom. */
void ad__bytebuf_read(ad__bytebuf *b, FILE *f);
/* Frees the bytes and leaves b as {0}. */
void ad__bytebuf_free(ad__bytebuf *b);

#endif
