/* ad_internal.h — what op files share with the tape: the node record, the
 * op descriptor, and helpers for checking inputs and recording. Not
 * installed; users never see it. nn/ and bilevel/ may include it to define
 * fused ops of their own in the same way. */
#ifndef HYPERTAPE_AD_INTERNAL_H
#define HYPERTAPE_AD_INTERNAL_H

#include "ad.h"

#include <stdarg.h>

typedef struct ad_node ad_node;

/* A derivative rule. g is the gradient of the node's output; for every input
 * i with need[i] set, the rule stores dL/d in[i] in gin[i] (or leaves NULL for
 * a zero gradient). Rules use only public ops, so with recording on the
 * backward pass lands on the tape and can be differentiated again. */
typedef void (*ad_vjp_fn)(ad_tape *t, const ad_node *n, ad_tensor *g, ad_tensor **gin,
                          const int *need);

/* What printing shows of a node's attributes ("axis=1", "c=0.5"). */
typedef void (*ad_attr_fn)(const ad_node *n, char *buf, size_t len);

typedef struct {
  const char *name;
  ad_vjp_fn vjp;
  ad_attr_fn attr; /* may be NULL */
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
  size_t id;     /* creation order: increasing ids are a topological order */
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
};

/* ---- errors */
/* Records the first error on the tape (later ones are dropped so the root
 * cause survives) and returns NULL so rules can `return ad__fail(...)`. */
ad_tensor *ad__fail(ad_tape *t, ad_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Thread-local last error, for calls without a tape. */
ad_status ad__set_last(ad_status s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Checks tape and inputs for NULL and equal dtypes. Returns 1 when fine. */
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

/* ---- allocation */
ad_tensor *ad__alloc(ad_tape *t, ad_dtype dt, int ndim, const int64_t *shape, int zero);
/* A tensor struct in the arena sharing `data` (views: reshape, detach). */
ad_tensor *ad__view(ad_tape *t, const ad_tensor *x, int ndim, const int64_t *shape);
ad_tensor *ad__like(ad_tape *t, const ad_tensor *x); /* uninitialised, same shape */

/* ---- recording */
/* Appends a node when recording is on and an input needs a gradient; the
 * output then needs one too. Returns the node (to fill attributes) or NULL
 * when nothing was recorded. */
ad_node *ad__record(ad_tape *t, const ad_op_def *op, ad_tensor *out, int n_in,
                    ad_tensor *const *in);
/* Runs the NaN/Inf guard on an op's output if enabled; returns out or NULL. */
ad_tensor *ad__done(ad_tape *t, ad_tensor *out, const char *op);

int ad__recording(const ad_tape *t);
ad_node *ad__first_node(const ad_tape *t);
/* Per-tape scratch arrays of node pointers (slot 0 or 1), grown as needed and
 * kept for the tape's life, so repeated ad_grad calls allocate nothing.
 * Returns NULL (and records AD_ERR_NOMEM) if it cannot grow to n. */
ad_node **ad__node_buf(ad_tape *t, int slot, size_t n);
/* Marks an arena tensor as a leaf needing a gradient (internal: jvp dummies). */
void ad__make_leaf(ad_tensor *x);

/* Shape helpers. */
int64_t ad__numel(int ndim, const int64_t *shape);
/* Sizes around an axis: outer * n * inner = size. */
void ad__split(const ad_tensor *x, int axis, int64_t *outer, int64_t *n, int64_t *inner);

/* Typed element pointers. */
#define AD_F(x) ((float *)(x)->data)
#define AD_D(x) ((double *)(x)->data)

#endif
