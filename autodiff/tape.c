/* tape.c — the tape: its arena, its node list, its sticky error, marks. */
#include "ad_internal.h"

#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Under AddressSanitizer the arena's free space is poisoned, so a kernel
 * that writes past its tensor (or reads a rewound one) is caught even
 * though the arena is one big allocation. */
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#define AD_ALIGN 64
#define AD_MAX_CHUNKS 64

struct ad_tape {
  /* Arena: a list of chunks reserved from the system and kept until the
   * tape dies, so rewinding and re-running a step reuses them. */
  char *chunk[AD_MAX_CHUNKS];
  size_t chunk_cap[AD_MAX_CHUNKS];
  size_t n_chunks;
  size_t cur, off;   /* allocation point: chunk index, offset in it */
  size_t used, peak; /* bytes handed out (incl. tails skipped at chunk ends) */
  size_t capacity, cap_max, n_grows;
  size_t first_mb;
  ad_node *first, *last;
  size_t n_nodes, next_id;
  int record, nan_guard;
  unsigned phase; /* AD_PHASE_* given to new nodes (set by ad_grad) */
  ad_status status;
  char msg[768];
  ad_node **nbuf[2]; /* scratch for ad_grad's graph walk */
  size_t nbuf_cap[2];
  size_t id; /* names the tape in messages; arena tensors carry it */
  /* Marks handed out so far, and how many had been when the error in force
   * was raised: rewinding to a mark with seq <= err_marks clears it. */
  size_t n_marks, err_marks;
  /* Context for messages: the op being run (set by ad__check, with its
   * inputs, alive for the op's duration), the node whose derivative rule is
   * running, and the scopes of composite functions (nn_layer_norm, ...). */
  const char *op_name;
  int op_n;
  const ad_tensor *op_in[AD_NODE_MAX_INLINE];
  const ad_node *rule;
  const char *scope[AD_MAX_SCOPES];
  int n_scope;
};

/* Tape ids are never reused within a process, so a tensor of a freed tape
 * cannot pass for one of a new tape at the same address. */
static atomic_size_t tape_ids;

static _Thread_local ad_status last_status;
static _Thread_local char last_msg[768];

const char *ad_status_str(ad_status s) {
  switch (s) {
  case AD_OK:
    return "ok";
  case AD_ERR_NULL:
    return "NULL argument";
  case AD_ERR_SHAPE:
    return "shape mismatch";
  case AD_ERR_DTYPE:
    return "dtype mismatch";
  case AD_ERR_ARENA:
    return "arena exhausted";
  case AD_ERR_NOMEM:
    return "out of memory";
  case AD_ERR_ARG:
    return "bad argument";
  case AD_ERR_GRAD:
    return "input not reached";
  case AD_ERR_NUMERIC:
    return "NaN or Inf";
  case AD_ERR_IO:
    return "I/O error";
  case AD_ERR_FORMAT:
    return "bad file format";
  case AD_ERR_STATE:
    return "bad state";
  }
  return "unknown status";
}

const char *ad_last_error(void) {
  return last_msg;
}

ad_status ad__last_status(void) {
  return last_status;
}

ad_status ad__set_last(ad_status s, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_msg, sizeof last_msg, fmt, ap);
  va_end(ap);
  last_status = s;
  return s;
}

/* Writes the context of an error raised on t into out around msg: the
 * scopes it was raised in ("nn_layer_norm: "), the message, and the rule it
 * was raised in (", in the derivative of sqrt (node 7)"). */
static void with_context(const ad_tape *t, const char *msg, char *out, size_t len) {
  size_t k = 0;
  for (int i = 0; i < t->n_scope && k < len; i++) {
    size_t n = strlen(t->scope[i]);
    if (i == t->n_scope - 1 && strncmp(msg, t->scope[i], n) == 0 && msg[n] == ':')
      break; /* the scope's own message already names it */
    k += (size_t)snprintf(out + k, len - k, "%s: ", t->scope[i]);
  }
  if (k < len) k += (size_t)snprintf(out + k, len - k, "%s", msg);
  if (t->rule && k < len)
    snprintf(out + k, len - k, ", in the derivative of %s (node %zu)", t->rule->op->name,
             t->rule->id);
}

ad_tensor *ad__fail(ad_tape *t, ad_status s, const char *fmt, ...) {
  char buf[sizeof last_msg];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (!t) { /* no tape to hold it: the thread's last error */
    memcpy(last_msg, buf, sizeof buf);
    last_status = s;
  } else if (t->status == AD_OK) { /* keep the first: it is the cause */
    t->status = s;
    t->err_marks = t->n_marks; /* marks taken so far predate it */
    with_context(t, buf, t->msg, sizeof t->msg);
  }
  return NULL;
}

void ad__clear_last(void) {
  last_status = AD_OK;
  last_msg[0] = 0;
}

ad_status ad_tape_new(ad_tape **out, const ad_tape_opts *opts) {
  if (!out) return ad__set_last(AD_ERR_NULL, "ad_tape_new: out is NULL");
  *out = NULL;
  ad_tape_opts o = opts ? *opts : (ad_tape_opts){0};
  if (o.arena_mb == 0) o.arena_mb = AD_ARENA_DEFAULT_MB;
  if (o.arena_max_mb == 0)
    o.arena_max_mb = o.arena_mb > AD_ARENA_DEFAULT_MAX_MB ? o.arena_mb : AD_ARENA_DEFAULT_MAX_MB;
  if (o.arena_max_mb < o.arena_mb)
    return ad__set_last(AD_ERR_ARG, "ad_tape_new: arena_max_mb (%zu) < arena_mb (%zu)",
                        o.arena_max_mb, o.arena_mb);
  /* MiB to bytes must not wrap: cap both at 2^30 MiB (1 PiB). */
  if (o.arena_mb > ((size_t)1 << 20))
    return ad__set_last(AD_ERR_ARG, "ad_tape_new: arena_mb %zu is absurd", o.arena_mb);
  if (o.arena_max_mb > ((size_t)1 << 30))
    return ad__set_last(AD_ERR_ARG, "ad_tape_new: arena_max_mb %zu is absurd", o.arena_max_mb);
  ad_tape *t = calloc(1, sizeof *t);
  if (!t) return ad__set_last(AD_ERR_NOMEM, "ad_tape_new: out of memory");
  size_t cap = o.arena_mb << 20;
  t->chunk[0] = aligned_alloc(AD_ALIGN, cap);
  if (!t->chunk[0]) {
    free(t);
    return ad__set_last(AD_ERR_NOMEM, "ad_tape_new: cannot reserve %zu MiB arena", o.arena_mb);
  }
  POISON(t->chunk[0], cap);
  t->chunk_cap[0] = cap;
  t->n_chunks = 1;
  t->capacity = cap;
  t->cap_max = o.arena_max_mb << 20;
  t->first_mb = o.arena_mb;
  t->n_grows = 1;
  t->record = !o.no_record;
  t->nan_guard = o.nan_guard;
  t->id = atomic_fetch_add(&tape_ids, 1) + 1;
  *out = t;
  ad__clear_last();
  return AD_OK;
}

void ad_tape_free(ad_tape *t) {
  if (!t) return;
  for (size_t i = 0; i < t->n_chunks; i++) {
    UNPOISON(t->chunk[i], t->chunk_cap[i]);
    free(t->chunk[i]);
  }
  free(t->nbuf[0]);
  free(t->nbuf[1]);
  free(t);
}

ad_status ad_tape_status(const ad_tape *t) {
  return t ? t->status : AD_ERR_NULL;
}
const char *ad_tape_errmsg(const ad_tape *t) {
  return t ? t->msg : "tape is NULL";
}
void ad_tape_clear_error(ad_tape *t) {
  if (!t) return;
  t->status = AD_OK;
  t->msg[0] = 0;
}

int ad_set_recording(ad_tape *t, int on) {
  if (!t) return 0;
  int prev = t->record;
  t->record = on != 0;
  return prev;
}
int ad_is_recording(const ad_tape *t) {
  return t ? t->record : 0;
}
int ad__recording(const ad_tape *t) {
  return t->record;
}
int ad_set_nan_guard(ad_tape *t, int on) {
  if (!t) return 0;
  int prev = t->nan_guard;
  t->nan_guard = on != 0;
  return prev;
}

void *ad_arena_alloc(ad_tape *t, size_t bytes) {
  if (!t) {
    ad__set_last(AD_ERR_NULL, "ad_arena_alloc: tape is NULL");
    return NULL;
  }
  size_t need;
  if (!ad__add_size(bytes, AD_ALIGN - 1, &need)) {
    ad__fail(t, AD_ERR_ARENA, "ad_arena_alloc: a request of %zu bytes cannot be aligned", bytes);
    return NULL;
  }
  need &= ~(size_t)(AD_ALIGN - 1);
  /* Compared as need > room, never as off + need > cap: that sum may wrap. */
  while (need > t->chunk_cap[t->cur] - t->off) {
    /* Move on to the next chunk; reserve one if none is left. The tail of
     * the current chunk counts as used so that marks restore `used`
     * exactly. A next chunk that exists (kept from before a rewind) but is
     * too small is skipped the same way, whole, on the next turn of the
     * loop: it stays for later requests that fit, and the request goes on
     * to a larger chunk or a new one. */
    size_t tail = t->chunk_cap[t->cur] - t->off;
    if (t->cur + 1 < t->n_chunks) {
      t->used += tail;
      t->cur++;
      t->off = 0;
      continue;
    }
    /* A new chunk at the end: at least the request and the first chunk's
     * size, and as large as everything reserved so far (capacity doubles,
     * so a long unroll needs few chunks), within the cap. */
    size_t left = t->cap_max - t->capacity;
    size_t cap = t->capacity > need ? t->capacity : need;
    if (cap < (t->first_mb << 20)) cap = t->first_mb << 20;
    if (cap > left) cap = left; /* multiples of AD_ALIGN: need, cap_max, capacity */
    if (cap < need || t->n_chunks == AD_MAX_CHUNKS) {
      ad__fail(t, AD_ERR_ARENA,
               "arena exhausted: asked for %zu bytes, %zu left in this chunk and %zu "
               "more may be reserved (cap %zu MiB; raise ad_tape_opts.arena_max_mb)",
               bytes, tail, t->n_chunks == AD_MAX_CHUNKS ? (size_t)0 : left, t->cap_max >> 20);
      return NULL;
    }
    char *c = aligned_alloc(AD_ALIGN, cap);
    if (!c) {
      ad__fail(t, AD_ERR_NOMEM, "ad_arena_alloc: malloc of a %zu-byte arena chunk failed", cap);
      return NULL;
    }
    POISON(c, cap);
    t->chunk[t->n_chunks] = c;
    t->chunk_cap[t->n_chunks] = cap;
    t->n_chunks++;
    t->capacity += cap;
    t->n_grows++;
    t->used += tail;
    t->cur++;
    t->off = 0;
  }
  void *p = t->chunk[t->cur] + t->off;
  UNPOISON(p, bytes);
  t->off += need;
  t->used += need;
  if (t->used > t->peak) t->peak = t->used;
  return p;
}

ad_marker ad_mark(ad_tape *t) {
  ad_marker m = {0};
  if (!t) return m;
  m.chunk = t->cur;
  m.offset = t->off;
  m.used = t->used;
  m.n_nodes = t->n_nodes;
  m.last = t->last;
  m.seq = ++t->n_marks;
  return m;
}

void ad_rewind(ad_tape *t, ad_marker m) {
  /* A marker that cannot come from ad_mark on this tape is ignored. */
  if (!t || m.chunk >= t->n_chunks || m.offset > t->chunk_cap[m.chunk] || m.used > t->used) return;
  /* Everything after the mark is free again: poison it (chunks past the
   * mark's are poisoned whole). */
  POISON(t->chunk[m.chunk] + m.offset, t->chunk_cap[m.chunk] - m.offset);
  for (size_t c = m.chunk + 1; c <= t->cur && c < t->n_chunks; c++)
    POISON(t->chunk[c], t->chunk_cap[c]);
  t->cur = m.chunk;
  t->off = m.offset;
  t->used = m.used;
  t->n_nodes = m.n_nodes;
  t->last = m.last;
  if (t->last)
    t->last->next = NULL;
  else
    t->first = NULL;
  /* The error in force was raised after this mark: what it concerned is
   * gone, so it no longer blocks the tape. Its message stays readable until
   * the next error or ad_tape_clear_error, for a caller whose failed call
   * rewound on its way out. */
  if (t->status != AD_OK && m.seq <= t->err_marks) t->status = AD_OK;
}

void ad_tape_reset(ad_tape *t) {
  if (!t) return;
  ad_rewind(t, (ad_marker){0});
}

void ad_arena_stats_get(const ad_tape *t, ad_arena_stats *s) {
  if (!s) return;
  memset(s, 0, sizeof *s);
  if (!t) return;
  s->used = t->used;
  s->peak = t->peak;
  s->capacity = t->capacity;
  s->n_chunks = t->n_chunks;
  s->n_grows = t->n_grows;
  s->n_nodes = t->n_nodes;
}

void ad_arena_reset_peak(ad_tape *t) {
  if (t) t->peak = t->used;
}

/* ---- ownership */

size_t ad__tape_id(const ad_tape *t) {
  return t ? t->id : 0;
}

/* Where p lies in t's arena: -1 outside it, 0 in the part in use, 1 in the
 * free part (after the allocation point: rewound, or never handed out).
 * Addresses only: nothing is read, so a freed (poisoned) tensor is safe. */
static int arena_where(const ad_tape *t, const void *p) {
  uintptr_t a = (uintptr_t)p;
  for (size_t c = 0; c < t->n_chunks; c++) {
    uintptr_t lo = (uintptr_t)t->chunk[c];
    if (a < lo || a - lo >= t->chunk_cap[c]) continue;
    if (c < t->cur) return 0;
    return c == t->cur && a - lo < t->off ? 0 : 1;
  }
  return -1;
}

int ad__usable(ad_tape *t, const char *op, const char *what, int i, const ad_tensor *x) {
  int where = arena_where(t, x);
  if (where == 1) {
    ad__fail(t, AD_ERR_ARG,
             "%s: %s %d was freed by ad_rewind (it was made after the mark the tape was "
             "rewound to) and must not be used any more",
             op, what, i);
    return 0;
  }
  if (where == 0 && (!(x->flags & AD_FLAG_ARENA) || x->tape_id != t->id)) {
    ad__fail(t, AD_ERR_ARG,
             "%s: %s %d points into tape #%zu's arena but not at a live tensor (memory "
             "reused after ad_rewind?)",
             op, what, i, t->id);
    return 0;
  }
  if (where < 0 && (x->flags & AD_FLAG_ARENA)) {
    char sh[96];
    ad__fail(t, AD_ERR_ARG,
             "%s: %s %d (%s) belongs to tape #%zu, but this call is on tape #%zu: arena "
             "tensors live on the tape that made them (copy values across with "
             "ad_copy_values or use heap tensors)",
             op, what, i, ad_shape_str(x, sh, sizeof sh), x->tape_id, t->id);
    return 0;
  }
  return 1;
}

/* ---- recording */

ad_node *ad__record(ad_tape *t, const ad_op_def *op, ad_tensor *out, int n_in,
                    ad_tensor *const *in) {
  if (!out) return NULL;
  int any = 0;
  unsigned taint = 0;
  for (int i = 0; i < n_in; i++) {
    any |= ad_needs_grad(in[i]);
    taint |= in[i]->flags & AD_FLAG_UNREC;
  }
  if (!t->record || !any) {
    if ((any && !t->record) || taint) out->flags |= AD_FLAG_UNREC;
    return NULL;
  }
  ad_node *n = ad_arena_alloc(t, sizeof *n);
  if (!n) return NULL;
  memset(n, 0, sizeof *n);
  n->op = op;
  n->n_in = n_in;
  if (n_in <= AD_NODE_MAX_INLINE) {
    n->in = n->in_inline;
  } else {
    n->in = ad_arena_alloc(t, sizeof(ad_tensor *) * (size_t)n_in);
    if (!n->in) return NULL;
  }
  for (int i = 0; i < n_in; i++) n->in[i] = in[i];
  n->out = out;
  n->id = t->next_id++;
  n->phase = t->phase;
  n->prev = t->last;
  if (t->last)
    t->last->next = n;
  else
    t->first = n;
  t->last = n;
  t->n_nodes++;
  out->node = n;
  return n;
}

unsigned ad__set_phase(ad_tape *t, unsigned phase) {
  unsigned prev = t->phase;
  t->phase = phase;
  return prev;
}

ad_node *ad__first_node(const ad_tape *t) {
  return t->first;
}

void ad__op_begin(ad_tape *t, const char *op, int n, ad_tensor *const *in) {
  t->op_name = op;
  t->op_n = n < AD_NODE_MAX_INLINE ? n : AD_NODE_MAX_INLINE;
  for (int i = 0; i < t->op_n; i++) t->op_in[i] = in[i];
}

const ad_node *ad__set_rule(ad_tape *t, const ad_node *n) {
  const ad_node *prev = t->rule;
  t->rule = n;
  return prev;
}

int ad__scope_push(ad_tape *t, const char *name) {
  if (!t) return 0;
  int depth = t->n_scope;
  if (depth < AD_MAX_SCOPES) t->scope[t->n_scope++] = name;
  return depth;
}

void ad__scope_pop(ad_tape *t, int depth) {
  if (t && depth >= 0 && depth <= t->n_scope) t->n_scope = depth;
}

ad_tensor *ad__done(ad_tape *t, ad_tensor *out, const char *op) {
  if (!out || !t->nan_guard) return out;
  for (int64_t i = 0; i < out->size; i++) {
    double v = ad_get(out, i);
    if (v == v && v - v == 0) continue;
    /* The op's inputs: from its node when recorded, else from what
     * ad__check saw for this op (if that was this op). */
    char ins[4 * 100] = "", sh[96], where[64];
    const ad_node *nd = out->node;
    int n = nd ? nd->n_in : t->op_name && strcmp(t->op_name, op) == 0 ? t->op_n : 0;
    size_t k = 0;
    for (int j = 0; j < n && j < AD_NODE_MAX_INLINE && k < sizeof ins; j++)
      k += (size_t)snprintf(ins + k, sizeof ins - k, "%s%s", j ? ", " : " from inputs ",
                            ad_shape_str(nd ? nd->in[j] : t->op_in[j], sh, sizeof sh));
    if (nd)
      snprintf(where, sizeof where, " (tape node %zu, removed)", nd->id);
    else
      snprintf(where, sizeof where, " (not recorded)");
    /* The failed node goes: nothing may build on or differentiate it. It
     * is the last one (recorded just now by this op). */
    if (nd && nd == t->last) {
      t->last = nd->prev;
      if (t->last)
        t->last->next = NULL;
      else
        t->first = NULL;
      t->n_nodes--;
      t->next_id--;
      out->node = NULL;
    }
    return ad__fail(t, AD_ERR_NUMERIC, "%s produced %s at element %lld of %s%s%s", op,
                    v != v ? "NaN" : "Inf", (long long)i, ad_shape_str(out, sh, sizeof sh), ins,
                    where);
  }
  return out;
}

ad_node **ad__node_buf(ad_tape *t, int slot, size_t n) {
  if (n > t->nbuf_cap[slot]) {
    size_t cap = t->nbuf_cap[slot] ? t->nbuf_cap[slot] : 256, bytes = 0;
    while (cap < n && ad__mul_size(cap, 2, &cap)) {
    }
    ad_node **b =
        cap >= n && ad__mul_size(cap, sizeof *b, &bytes) ? realloc(t->nbuf[slot], bytes) : NULL;
    if (!b) {
      ad__fail(t, AD_ERR_NOMEM, "ad_grad: cannot grow the graph-walk buffer to %zu nodes", n);
      return NULL;
    }
    t->nbuf[slot] = b;
    t->nbuf_cap[slot] = cap;
  }
  return t->nbuf[slot];
}
