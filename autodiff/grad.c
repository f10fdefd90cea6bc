/* grad.c — reverse mode over the recorded tape, and the transforms built on
 * it: accumulate-into-leaf backward, Hessian-vector products, mixed partials
 * and forward mode. */
#include "ad_internal.h"
#include "ad_simd.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Stamps tell which tensors belong to the current ad_grad call. A counter
 * per thread is enough: one call finishes before the next starts. */
static _Thread_local unsigned gen_counter;

static unsigned next_gen(void) {
  if (++gen_counter == 0) gen_counter = 1;
  return gen_counter;
}

/* A gradient slot the unrecorded sweep may add into in place: the tensor
 * is referenced by its owner's slot alone (a sum accumulate made, or a
 * rule's fresh result that shares its memory with nothing else). Set only
 * during one unrecorded sweep; cleared when the owner's node hands the
 * slot to its rule (which may pass it on, d(a + b) = (g, g)) and on every
 * slot left at the end. A bit no other flag uses (ad_internal.h's go up
 * to 1 << 6). */
#define AD_FLAG_ACC_ (1u << 20)

static void acc_clear(ad_tensor *x) {
  if (x && x->scratch) x->scratch->flags &= ~AD_FLAG_ACC_;
}

/* y += x elementwise, same shape and dtype: the bits ad_add(y, x) gives
 * (u + v per element), without a new tensor. */
/* y += x over [lo, hi), threaded: the sum of an unrolled step's two
 * contributions to its weights' adjoint is a weight-sized pass, and each
 * element is one addition, so any split gives the same bits. */
typedef struct {
  ad_tensor *y;
  const ad_tensor *x;
} add_job;

AD_WIDE_PASS(
    add_range, const add_job *c = ctx; (void)part; if (c->y->dtype == AD_F32) {
      float *restrict p = AD_F(c->y);
      const float *restrict q = AD_F(c->x);
      for (int64_t j = lo; j < hi; j++) p[j] = p[j] + q[j];
    } else {
      double *restrict p = AD_D(c->y);
      const double *restrict q = AD_D(c->x);
      for (int64_t j = lo; j < hi; j++) p[j] = p[j] + q[j];
    })

enum { ADD_GRAIN = 16384 };

static void add_into(ad_tensor *y, const ad_tensor *x) {
  add_job c = {y, x};
  ad__par_for(y->size, ADD_GRAIN, add_range, &c);
}

/* Adds a gradient contribution into x's slot. The first one is taken as is
 * (no copy); later ones are summed with the public add, so a recorded
 * backward records its accumulations too. Unrecorded, a slot that is the
 * slot's own (AD_FLAG_ACC_) takes the sum in place: the same bits, one
 * weight-sized temporary fewer per extra contribution (an unrolled step's
 * weights get one from the update and one through their gradient). `own`:
 * g is a fresh result nothing else refers to (sweep_backward checks). */
static void accumulate(ad_tape *t, ad_tensor *x, ad_tensor *g, int own) {
  if (!g) return;
  if (g->size != x->size) {
    char sx[96], sg[96];
    ad__fail(t, AD_ERR_SHAPE, "ad_grad: rule of %s returned gradient %s for input %s",
             x->node ? x->node->op->name : "leaf", ad_shape_str(g, sg, sizeof sg),
             ad_shape_str(x, sx, sizeof sx));
    return;
  }
  if (!ad_same_shape(g, x)) g = ad_reshape(t, g, x->ndim, x->shape);
  if (!g) return;
  int unrec = !ad__recording(t) && !ad__nan_guard(t);
  ad_tensor *a = x->scratch;
  if (!a) {
    x->scratch = g;
    if (unrec && own)
      g->flags |= AD_FLAG_ACC_;
    else
      g->flags &= ~AD_FLAG_ACC_;
    return;
  }
  if (unrec && (a->flags & AD_FLAG_ACC_) && a->dtype == g->dtype && a->size == g->size &&
      (a->dtype == AD_F32 || a->dtype == AD_F64)) {
    add_into(a, g);
    return;
  }
  x->scratch = ad_add(t, a, g);
  if (unrec && x->scratch) x->scratch->flags |= AD_FLAG_ACC_;
}

ad_tensor *ad__grad_slot(const ad_tape *t, const ad_tensor *x) {
  ad_tensor *a = x ? x->scratch : NULL;
  if (!a || ad__recording(t) || ad__nan_guard(t) || !(a->flags & AD_FLAG_ACC_)) return NULL;
  if (a->dtype != x->dtype || a->size != x->size || !a->data) return NULL;
  return a;
}

/* Whether gin[i] is fresh and alone: its values were allocated by the rule
 * just run (after `pre`) and overlap no other result of that rule. */
static int fresh_alone(ad_tape *t, ad_marker pre, ad_tensor *const *gin, int n, int i) {
  const ad_tensor *g = gin[i];
  if (!g->data || !ad__after_mark(t, pre, g->data) || !ad__after_mark(t, pre, g)) return 0;
  for (int j = 0; j < n; j++) {
    const ad_tensor *h = gin[j];
    if (j == i || !h) continue;
    if (h == g || !h->data || ad__overlap(g, h)) return 0;
  }
  return 1;
}

static int by_id(const void *a, const void *b) {
  size_t x = (*(ad_node *const *)a)->id, y = (*(ad_node *const *)b)->id;
  return (x > y) - (x < y);
}

/* The part of the tape a gradient call needs: the nodes reachable backward
 * from the outputs, skipping those older than `min_id` (when every input
 * was made by a node, nothing older can depend on an input). Walking the
 * graph instead of the whole tape keeps a per-step ad_grad in a long
 * recorded loop O(step), not O(tape). Returns the nodes in increasing id
 * (a topological order) in scratch slot 0, and their count; -1 on error. */
static ptrdiff_t reachable(ad_tape *t, int n_out, ad_tensor *const *outputs, size_t min_id,
                           unsigned gen) {
  size_t n_seen = 0, n_stack = 0;
  ad_node **seen = ad__node_buf(t, 0, 64), **stack = ad__node_buf(t, 1, 64);
  if (!seen || !stack) return -1;
  for (int j = 0; j < n_out; j++) {
    ad_node *n = outputs[j]->node;
    if (n && n->mark != gen && n->id >= min_id) {
      n->mark = gen;
      stack[n_stack++] = n;
    }
    while (n_stack > 0) {
      ad_node *cur = stack[--n_stack];
      if (!(seen = ad__node_buf(t, 0, n_seen + 1))) return -1;
      seen[n_seen++] = cur;
      if (!(stack = ad__node_buf(t, 1, n_stack + (size_t)cur->n_in))) return -1;
      for (int i = 0; i < cur->n_in; i++) {
        ad_node *p = cur->in[i]->node;
        if (p && p->mark != gen && p->id >= min_id) {
          p->mark = gen;
          stack[n_stack++] = p;
        }
      }
    }
  }
  qsort(seen, n_seen, sizeof *seen, by_id);
  return (ptrdiff_t)n_seen;
}

/* Stamps, in topological order, every reachable node output that depends
 * on a stamped tensor (the inputs were stamped by the caller). */
static void stamp_dependents(ad_node **nodes, ptrdiff_t count, unsigned gen) {
  for (ptrdiff_t k = 0; k < count; k++) {
    ad_node *n = nodes[k];
    for (int i = 0; i < n->n_in; i++) {
      if (n->in[i]->gen == gen) {
        n->out->gen = gen;
        n->out->scratch = NULL;
        break;
      }
    }
  }
}

/* Backward sweep in decreasing id, applying each rule whose output is
 * stamped and has a gradient. `nodes` is scratch slot 0; rules may record
 * new nodes but never call ad_grad, so the slot stays ours. */
static void sweep_backward(ad_tape *t, unsigned gen, ad_node **nodes, ptrdiff_t count,
                           ad__sweep_gc *gc) {
  ad_tensor *gin_inline[AD_NODE_MAX_INLINE];
  int need_inline[AD_NODE_MAX_INLINE];
  for (ptrdiff_t k = count - 1; k >= 0; k--) {
    if (gc) ad__sweep_collect(t, gc, nodes, k + 1, count, gen);
    ad_node *n = nodes[k];
    ad_tensor *out = n->out;
    if (out->gen != gen || !out->scratch) continue;
    ad_tensor **gin = gin_inline;
    int *need = need_inline;
    if (n->n_in > AD_NODE_MAX_INLINE) {
      gin = ad_arena_alloc(t, sizeof(*gin) * (size_t)n->n_in);
      need = ad_arena_alloc(t, sizeof(*need) * (size_t)n->n_in);
      if (!gin || !need) return;
    }
    acc_clear(out); /* the rule may hand it on: no longer the slot's own */
    int any = 0;
    for (int i = 0; i < n->n_in; i++) {
      gin[i] = NULL;
      need[i] = n->in[i]->gen == gen;
      any |= need[i];
    }
    if (!any) continue;
    ad_marker pre = ad_mark(t);
    const ad_node *outer = ad__set_rule(t, n);
    n->op->vjp(t, n, out->scratch, gin, need);
    ad__set_rule(t, outer);
    if (ad_tape_status(t) != AD_OK) return;
    int unrec = !ad__recording(t);
    for (int i = 0; i < n->n_in; i++)
      if (need[i] && gin[i])
        accumulate(t, n->in[i], gin[i], unrec && fresh_alone(t, pre, gin, n->n_in, i));
    /* out->scratch stays: out may itself be one of the inputs asked for
     * (z = y x with y = x^2, inputs {x, y}). A later call starts clean
     * because stamping resets the slots it will read. */
  }
}

/* Common part of ad_grad and ad_backward: the inputs are stamped `gen` and
 * `nodes` holds the walk from reachable(). */
static ad_status run_backward(ad_tape *t, int n_out, ad_tensor *const *outputs,
                              ad_tensor *const *seeds, unsigned gen, ad_node **nodes,
                              ptrdiff_t count, int record, int n_in, ad_tensor *const *inputs) {
  stamp_dependents(nodes, count, gen);
  int prev = ad_set_recording(t, record);
  /* Phase tag for the teaching view: a recorded sweep through recorded
   * backward nodes is second order. */
  unsigned hi = AD_PHASE_FORWARD;
  for (ptrdiff_t k = 0; record && k < count; k++)
    if (nodes[k]->out->gen == gen && nodes[k]->phase > hi) hi = nodes[k]->phase;
  unsigned prev_phase = ad__set_phase(t, hi ? AD_PHASE_SECOND : AD_PHASE_BACKWARD);
  for (int j = 0; j < n_out; j++) {
    ad_tensor *y = outputs[j];
    if (y->gen != gen) continue; /* does not depend on the inputs */
    ad_tensor *s = seeds && seeds[j] ? seeds[j] : ad_ones_like(t, y);
    if (!s) break;
    if (s->size != y->size || s->dtype != y->dtype) {
      char sy[96], ss[96];
      ad__fail(t, AD_ERR_SHAPE, "ad_grad: seed %d is %s but output is %s", j,
               ad_shape_str(s, ss, sizeof ss), ad_shape_str(y, sy, sizeof sy));
      break;
    }
    accumulate(t, y, s, 0);
  }
  /* An unrecorded sweep's temporaries are garbage once their node is done:
   * it frees them as it goes (ad__sweep_collect), so the arena holds about
   * the live gradients, not every temporary of the sweep. */
  ad__sweep_gc gc = {.m = ad_mark(t), .n_in = n_in, .inputs = inputs};
  if (ad_tape_status(t) == AD_OK)
    sweep_backward(t, gen, nodes, count, record || !inputs ? NULL : &gc);
  /* No slot stays the sweep's own past it: the inputs' go to the caller.
   * (The nodes' slots were cleared as their nodes ran; a slot of a node
   * already run may point at memory the in-sweep collection freed, so it
   * is not touched. A flag left behind by a failed sweep is harmless:
   * accumulate clears it on every slot it does not set itself.) */
  for (int i = 0; i < n_in; i++) acc_clear(inputs[i]);
  ad__set_phase(t, prev_phase);
  ad_set_recording(t, prev);
  return ad_tape_status(t);
}

ad_status ad_grad(ad_tape *t, int n_out, ad_tensor *const *outputs, ad_tensor *const *seeds,
                  int n_in, ad_tensor *const *inputs, ad_tensor **grads_out, unsigned flags) {
  return ad__grad_acc(t, n_out, outputs, seeds, n_in, inputs, grads_out, flags, 0, NULL);
}

ad_status ad__grad_acc(ad_tape *t, int n_out, ad_tensor *const *outputs, ad_tensor *const *seeds,
                       int n_in, ad_tensor *const *inputs, ad_tensor **grads_out, unsigned flags,
                       int n_acc, ad_tensor *const *acc) {
  if (!t) return ad__set_last(AD_ERR_NULL, "ad_grad: tape is NULL");
  if (ad_tape_status(t) != AD_OK) return ad_tape_status(t);
  if (n_out <= 0 || n_in <= 0 || !outputs || !inputs || !grads_out) {
    ad__fail(t, n_out <= 0 || n_in <= 0 ? AD_ERR_ARG : AD_ERR_NULL,
             "ad_grad: need outputs (%d), inputs (%d) and grads_out", n_out, n_in);
    return ad_tape_status(t);
  }
  for (int i = 0; i < n_in; i++) grads_out[i] = NULL;
  for (int j = 0; j < n_out; j++) {
    if (!outputs[j]) {
      ad__fail(t, AD_ERR_NULL, "ad_grad: output %d is NULL", j);
      return ad_tape_status(t);
    }
    if (!ad__usable_shape(t, "ad_grad", "output", j, outputs[j]) ||
        (seeds && seeds[j] && !ad__usable(t, "ad_grad", "seed", j, seeds[j])))
      return ad_tape_status(t);
  }
  for (int i = 0; i < n_in; i++) {
    if (!inputs[i]) {
      ad__fail(t, AD_ERR_NULL, "ad_grad: input %d is NULL", i);
      return ad_tape_status(t);
    }
    if (!ad__usable_shape(t, "ad_grad", "input", i, inputs[i])) return ad_tape_status(t);
    /* Ops record only for inputs that need a gradient: a plain leaf would
     * silently get a zero (or partial) gradient, so say so instead. */
    if (!ad_needs_grad(inputs[i])) {
      char sh[96];
      const ad_tensor *x = inputs[i];
      if (x->flags & AD_FLAG_OP)
        /* An op's result that was not recorded is no leaf: marking it would
         * only hide that the ops making and using it are not on the tape. */
        ad__fail(t, AD_ERR_GRAD,
                 "ad_grad: input %d (%s%s%s) was made by an op that was not recorded "
                 "(recording was off, or none of its inputs needed a gradient), so nothing "
                 "on the tape depends on it: record the ops that make and use it",
                 i, x->name ? x->name : "", x->name ? " " : "", ad_shape_str(x, sh, sizeof sh));
      else
        ad__fail(t, AD_ERR_GRAD,
                 "ad_grad: input %d (%s%s%s) does not require a gradient: call "
                 "ad_requires_grad(x, 1) before recording the ops that use it",
                 i, x->name ? x->name : "", x->name ? " " : "", ad_shape_str(x, sh, sizeof sh));
      return ad_tape_status(t);
    }
  }
  /* An output computed from tensors needing a gradient but with recording
   * off has no history: every input would get a zero that looks like an
   * answer. (A genuine constant, such as the gradient of a linear
   * function, is not marked and gives zeros as documented.) */
  for (int j = 0; j < n_out; j++) {
    const ad_tensor *y = outputs[j];
    if (y->node || !(y->flags & AD_FLAG_UNREC)) continue;
    char sh[96];
    ad__fail(t, AD_ERR_GRAD,
             "ad_grad: output %d (%s) was not recorded: it was computed with recording off "
             "(ad_set_recording, or a gradient taken without AD_GRAD_RECORD) from tensors "
             "that need a gradient, so its gradient would be a silent zero",
             j, ad_shape_str(y, sh, sizeof sh));
    return ad_tape_status(t);
  }
  unsigned gen = next_gen();
  size_t min_id = SIZE_MAX;
  for (int i = 0; i < n_in; i++) {
    inputs[i]->gen = gen;
    inputs[i]->scratch = NULL;
    size_t id = inputs[i]->node ? inputs[i]->node->id : 0;
    if (id < min_id) min_id = id;
  }
  /* Accumulators: the slot starts as acc[i], the sweep's own, so every
   * contribution is added into it in place (accumulate, or a rule through
   * ad__grad_slot). Only unrecorded and for a tensor like the input. */
  const int unrec = !(flags & AD_GRAD_RECORD) && !ad__nan_guard(t);
  for (int i = 0; i < n_acc && i < n_in; i++) {
    ad_tensor *a = acc ? acc[i] : NULL;
    if (!unrec || !a || !a->data || a->dtype != inputs[i]->dtype || a->size != inputs[i]->size ||
        (a->dtype != AD_F32 && a->dtype != AD_F64))
      continue;
    inputs[i]->scratch = a;
    a->flags |= AD_FLAG_ACC_;
  }
  ptrdiff_t count = reachable(t, n_out, outputs, min_id, gen);
  if (count < 0) return ad_tape_status(t);
  ad_node **nodes = ad__node_buf(t, 0, (size_t)count);
  if (run_backward(t, n_out, outputs, seeds, gen, nodes, count, (flags & AD_GRAD_RECORD) != 0, n_in,
                   inputs) != AD_OK)
    return ad_tape_status(t);
  for (int i = 0; i < n_in; i++) {
    ad_tensor *x = inputs[i];
    ad_tensor *g = x->scratch;
    if (!g) {
      if (flags & AD_GRAD_STRICT) {
        char s[96];
        ad__fail(t, AD_ERR_GRAD, "ad_grad: input %d (%s%s) does not reach the outputs", i,
                 x->name ? x->name : "", ad_shape_str(x, s, sizeof s));
        return ad_tape_status(t);
      }
      if (!(flags & AD_GRAD_NULL_UNREACHED)) g = ad_zeros_like(t, x);
    }
    grads_out[i] = g;
  }
  for (int i = 0; i < n_in; i++) {
    inputs[i]->scratch = NULL;
    inputs[i]->gen = 0;
  }
  return ad_tape_status(t);
}

ad_status ad_backward(ad_tape *t, ad_tensor *loss, ad_tensor *seed) {
  if (!t) return ad__set_last(AD_ERR_NULL, "ad_backward: tape is NULL");
  if (!loss) {
    ad__fail(t, AD_ERR_NULL, "ad_backward: loss is NULL");
    return ad_tape_status(t);
  }
  if (ad_tape_status(t) != AD_OK) return ad_tape_status(t);
  if (!ad__usable(t, "ad_backward", "loss", 0, loss) ||
      (seed && !ad__usable(t, "ad_backward", "seed", 0, seed)))
    return ad_tape_status(t);
  char sh[96];
  if (!seed && loss->size != 1) {
    ad__fail(t, AD_ERR_SHAPE,
             "ad_backward: loss is %s, not a scalar: reduce it (ad_sum, ad_mean) or pass a "
             "seed of its shape",
             ad_shape_str(loss, sh, sizeof sh));
    return ad_tape_status(t);
  }
  if (!loss->node && (loss->flags & AD_FLAG_UNREC)) {
    ad__fail(t, AD_ERR_GRAD,
             "ad_backward: loss (%s) was not recorded: it was computed with recording off "
             "from tensors that need a gradient, so no leaf would get its gradient",
             ad_shape_str(loss, sh, sizeof sh));
    return ad_tape_status(t);
  }
  unsigned gen = next_gen();
  /* Stamp every leaf that needs a gradient and feeds a node the loss
   * reaches; slot 0 holds those nodes after the walk. */
  ptrdiff_t count = reachable(t, 1, &loss, 0, gen);
  if (count < 0) return ad_tape_status(t);
  ad_node **nodes = ad__node_buf(t, 0, (size_t)count);
  for (ptrdiff_t k = 0; k < count; k++)
    for (int i = 0; i < nodes[k]->n_in; i++) {
      ad_tensor *x = nodes[k]->in[i];
      if (!x->node && (x->flags & AD_FLAG_REQ) && x->gen != gen) {
        x->gen = gen;
        x->scratch = NULL;
      }
    }
  ad_tensor *seeds[1] = {seed};
  if (run_backward(t, 1, &loss, seeds, gen, nodes, count, 0, 0, NULL) != AD_OK)
    return ad_tape_status(t);
  /* Move leaf gradients into their heap ->grad (the walk is still in slot
   * 0: the backward sweep recorded nothing and walked nothing). */
  for (ptrdiff_t k = 0; k < count; k++)
    for (int i = 0; i < nodes[k]->n_in; i++) {
      ad_tensor *x = nodes[k]->in[i];
      if (x->node || x->gen != gen) continue;
      x->gen = 0;
      ad_tensor *g = x->scratch;
      x->scratch = NULL;
      if (!g) continue;
      if (!x->grad) {
        if (ad_tensor_new(&x->grad, x->dtype, x->ndim, x->shape) != AD_OK) {
          ad__fail(t, AD_ERR_NOMEM, "ad_backward: cannot allocate a leaf gradient");
          return ad_tape_status(t);
        }
      }
      if (x->dtype == AD_F32) {
        float *d = AD_F(x->grad);
        const float *s = AD_F(g);
        for (int64_t k = 0; k < x->size; k++) d[k] += s[k];
      } else {
        double *d = AD_D(x->grad);
        const double *s = AD_D(g);
        for (int64_t k = 0; k < x->size; k++) d[k] += s[k];
      }
    }
  return ad_tape_status(t);
}

/* s = sum_i g_i . v_i as one recorded scalar. */
static ad_tensor *sum_of_dots(ad_tape *t, const char *who, int n, ad_tensor *const *g,
                              ad_tensor *const *v) {
  ad_tensor *s = NULL;
  for (int i = 0; i < n; i++) {
    if (!v[i]) return ad__fail(t, AD_ERR_NULL, "%s: vector %d is NULL", who, i);
    if (!ad_same_shape(v[i], g[i]) || v[i]->dtype != g[i]->dtype) {
      char a[96], b[96];
      return ad__fail(t, AD_ERR_SHAPE, "%s: vector %d is %s but its partner is %s", who, i,
                      ad_shape_str(v[i], a, sizeof a), ad_shape_str(g[i], b, sizeof b));
    }
    ad_tensor *d = ad_dot(t, g[i], v[i]);
    s = s ? ad_add(t, s, d) : d;
  }
  return s;
}

/* Checks n tensors (none NULL, all usable on t) for `who`. */
static int check_list(ad_tape *t, const char *who, const char *what, int n, ad_tensor *const *xs) {
  for (int i = 0; i < n; i++) {
    if (!xs[i]) {
      ad__fail(t, AD_ERR_NULL, "%s: %s %d is NULL", who, what, i);
      return 0;
    }
    if (!ad__usable(t, who, what, i, xs[i])) return 0;
  }
  return 1;
}

static ad_status mixed(ad_tape *t, const char *who, ad_tensor *f, int n_w, ad_tensor *const *w,
                       ad_tensor *const *v, int n_lam, ad_tensor *const *lam, ad_tensor **out,
                       unsigned flags) {
  if (!t) return ad__set_last(AD_ERR_NULL, "%s: tape is NULL", who);
  if (ad_tape_status(t) != AD_OK) return ad_tape_status(t);
  if (!f || !w || !v || !lam || !out || n_w <= 0 || n_lam <= 0) {
    ad__fail(t, n_w <= 0 || n_lam <= 0 ? AD_ERR_ARG : AD_ERR_NULL,
             "%s: need f, w (%d), v, lam (%d) and out", who, n_w, n_lam);
    return ad_tape_status(t);
  }
  for (int k = 0; k < n_lam; k++) out[k] = NULL;
  if (f && f->size != 1) {
    char sh[96];
    ad__fail(t, AD_ERR_SHAPE, "%s: f must be a scalar, got %s", who,
             ad_shape_str(f, sh, sizeof sh));
    return ad_tape_status(t);
  }
  if (!check_list(t, who, "output", 1, &f) || !check_list(t, who, "w", n_w, w) ||
      !check_list(t, who, "v", n_w, v) || !check_list(t, who, "lam", n_lam, lam))
    return ad_tape_status(t);
  ad_tensor **g = ad_arena_alloc(t, sizeof(*g) * (size_t)n_w);
  if (!g) return ad_tape_status(t);
  /* First pass recorded, so the gradient keeps its dependence on w and lam. */
  if (ad_grad(t, 1, &f, NULL, n_w, w, g, AD_GRAD_RECORD) != AD_OK) return ad_tape_status(t);
  ad_tensor *s = sum_of_dots(t, who, n_w, g, v);
  if (!s) return ad_tape_status(t);
  return ad_grad(t, 1, &s, NULL, n_lam, lam, out, flags & ~(unsigned)AD_GRAD_STRICT);
}

ad_status ad_mixed_partial(ad_tape *t, ad_tensor *f, int n_w, ad_tensor *const *w,
                           ad_tensor *const *v, int n_lam, ad_tensor *const *lam, ad_tensor **out,
                           unsigned flags) {
  return mixed(t, "ad_mixed_partial", f, n_w, w, v, n_lam, lam, out, flags);
}

ad_status ad_hvp(ad_tape *t, ad_tensor *f, int n, ad_tensor *const *w, ad_tensor *const *v,
                 ad_tensor **hv_out, unsigned flags) {
  /* H v = d/dw (grad_w f . v): the mixed partial with lam = w. */
  return mixed(t, "ad_hvp", f, n, w, v, n, w, hv_out, flags);
}

/* Forward mode by the double-VJP construction: with u a dummy cotangent,
 * r(u) = J^T u is linear in u, and  J v = d/du <J^T u, v>.  Two reverse
 * sweeps cost about what one native forward sweep plus one reverse would;
 * in exchange every op's forward derivative is exact by construction — no
 * second rule per op that could drift from its VJP — and the recorded graph
 * of J v can itself be differentiated again. */
ad_status ad_jvp(ad_tape *t, int n_in, ad_tensor *const *inputs, ad_tensor *const *tangents,
                 int n_out, ad_tensor *const *outputs, ad_tensor **tangents_out, unsigned flags) {
  if (!t) return ad__set_last(AD_ERR_NULL, "ad_jvp: tape is NULL");
  if (!inputs || !tangents || !outputs || !tangents_out || n_in <= 0 || n_out <= 0) {
    ad__fail(t, AD_ERR_NULL, "ad_jvp: missing inputs, tangents, outputs or tangents_out");
    return ad_tape_status(t);
  }
  if (ad_tape_status(t) != AD_OK) return ad_tape_status(t);
  for (int j = 0; j < n_out; j++) tangents_out[j] = NULL;
  if (!check_list(t, "ad_jvp", "output", n_out, outputs) ||
      !check_list(t, "ad_jvp", "input", n_in, inputs) ||
      !check_list(t, "ad_jvp", "tangent", n_in, tangents))
    return ad_tape_status(t);
  ad_tensor **u = ad_arena_alloc(t, sizeof(*u) * (size_t)n_out);
  ad_tensor **r = ad_arena_alloc(t, sizeof(*r) * (size_t)n_in);
  if (!u || !r) return ad_tape_status(t);
  for (int j = 0; j < n_out; j++) {
    u[j] = ad_zeros_like(t, outputs[j]);
    if (!u[j]) return ad_tape_status(t);
    ad__make_leaf(u[j]);
  }
  int prev = ad_set_recording(t, 1);
  ad_grad(t, n_out, outputs, u, n_in, inputs, r, AD_GRAD_RECORD);
  ad_tensor *s = ad_tape_status(t) == AD_OK ? sum_of_dots(t, "ad_jvp", n_in, r, tangents) : NULL;
  ad_set_recording(t, prev);
  if (!s) return ad_tape_status(t);
  return ad_grad(t, 1, &s, NULL, n_out, u, tangents_out, flags & ~(unsigned)AD_GRAD_STRICT);
}
