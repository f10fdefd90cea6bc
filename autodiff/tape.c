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

static int usable(ad_tape *t, const char *op, const char *what, int i, const ad_tensor *x,
                  int values) {
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
  if (values && where == 0 && (x->flags & AD_FLAG_RELEASED)) {
    char sh[96];
    ad__fail(t, AD_ERR_ARG,
             "%s: %s %d (%s) had its values released by ad_tape_compact (no derivative rule "
             "of the compacted graph reads them; pass it in keep[] to keep them)",
             op, what, i, ad_shape_str(x, sh, sizeof sh));
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

int ad__usable(ad_tape *t, const char *op, const char *what, int i, const ad_tensor *x) {
  return usable(t, op, what, i, x, 1);
}
int ad__usable_shape(ad_tape *t, const char *op, const char *what, int i, const ad_tensor *x) {
  return usable(t, op, what, i, x, 0);
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

/* ---- compaction (ad_tape_compact)
 *
 * Why: an unrolled inner loop records, per step, the forward, its recorded
 * backward and the update; the arena keeps every temporary of all of them,
 * while reverse mode later needs only what the derivative rules read (and
 * the graph structure). Compaction is a sliding collector over the part of
 * the arena after a mark: the survivors (every node after the mark, the
 * tensor structs nodes and keep[] refer to, the value blocks some rule
 * reads or keep[] asks for, node input arrays and declared node extras)
 * are moved down in address order. Each survivor's new place is at or
 * before its old one (the same first-fit bump over the same chunks, with
 * less before it), so memmove in address order never overwrites a
 * survivor not yet moved; nothing is copied to the heap. Pointers are fixed
 * on the old copies first, through a sorted table of (old, new) ranges. */

typedef struct {
  char *old, *nw;
  size_t size, align, chunk, off;
} cp_item;

typedef struct {
  ad_tensor *x;
  int need; /* values needed */
} cp_tensor;

typedef struct {
  cp_item *it;
  size_t n, cap;
  cp_tensor *ts;
  size_t nt, tcap;
  ad_node **live; /* the nodes kept, in tape order */
  size_t nlive;
  const char *why; /* reason compaction is refused, or NULL */
  char whybuf[160];
} cp_plan;

/* A set of pointers (open addressing), for the liveness pass. */
typedef struct {
  const void **slot;
  size_t cap;
} cp_set;

static int cp_set_init(cp_set *s, size_t n) {
  s->cap = 64;
  while (s->cap < 2 * n + 16) s->cap *= 2;
  s->slot = calloc(s->cap, sizeof *s->slot);
  return s->slot != NULL;
}
static size_t cp_hash(const void *p, size_t cap) {
  uint64_t x = (uint64_t)(uintptr_t)p;
  x ^= x >> 29;
  x *= 0x9E3779B97F4A7C15ull;
  return (size_t)(x >> 17) & (cap - 1);
}
static int cp_set_has(const cp_set *s, const void *p) {
  for (size_t h = cp_hash(p, s->cap);; h = (h + 1) & (s->cap - 1)) {
    if (!s->slot[h]) return 0;
    if (s->slot[h] == p) return 1;
  }
}
static void cp_set_add(cp_set *s, const void *p) { /* never full: cap > 2 n */
  for (size_t h = cp_hash(p, s->cap);; h = (h + 1) & (s->cap - 1)) {
    if (s->slot[h] == p) return;
    if (!s->slot[h]) {
      s->slot[h] = p;
      return;
    }
  }
}

/* Position of p in t's arena (chunk, offset); 0 when outside it. */
static int arena_pos(const ad_tape *t, const void *p, size_t *c, size_t *o) {
  uintptr_t a = (uintptr_t)p;
  for (size_t k = 0; k < t->n_chunks; k++) {
    uintptr_t lo = (uintptr_t)t->chunk[k];
    if (a < lo || a - lo >= t->chunk_cap[k]) continue;
    *c = k;
    *o = (size_t)(a - lo);
    return 1;
  }
  return 0;
}

/* Whether p lies between mark m and the allocation point. */
static int in_region(const ad_tape *t, ad_marker m, const void *p) {
  size_t c, o;
  if (!p || !arena_pos(t, p, &c, &o)) return 0;
  if (c < m.chunk || (c == m.chunk && o < m.offset)) return 0;
  return c < t->cur || (c == t->cur && o < t->off);
}

static int cp_push_item(cp_plan *pl, const ad_tape *t, void *p, size_t size, size_t align) {
  if (pl->n == pl->cap) {
    size_t cap = pl->cap ? 2 * pl->cap : 256;
    cp_item *q = realloc(pl->it, cap * sizeof *q);
    if (!q) return 0;
    pl->it = q;
    pl->cap = cap;
  }
  cp_item *it = &pl->it[pl->n++];
  it->old = p;
  it->nw = NULL;
  it->size = size;
  it->align = align;
  arena_pos(t, p, &it->chunk, &it->off);
  return 1;
}

static int cp_push_tensor(cp_plan *pl, ad_tensor *x, int need) {
  if (pl->nt == pl->tcap) {
    size_t cap = pl->tcap ? 2 * pl->tcap : 256;
    cp_tensor *q = realloc(pl->ts, cap * sizeof *q);
    if (!q) return 0;
    pl->ts = q;
    pl->tcap = cap;
  }
  pl->ts[pl->nt++] = (cp_tensor){x, need};
  return 1;
}

static int cmp_tensor(const void *a, const void *b) {
  uintptr_t x = (uintptr_t)((const cp_tensor *)a)->x, y = (uintptr_t)((const cp_tensor *)b)->x;
  return (x > y) - (x < y);
}
static int cmp_data(const void *a, const void *b) {
  uintptr_t x = (uintptr_t)((const cp_tensor *)a)->x->data;
  uintptr_t y = (uintptr_t)((const cp_tensor *)b)->x->data;
  return (x > y) - (x < y);
}
static int cmp_item(const void *a, const void *b) {
  const cp_item *x = a, *y = b;
  if (x->chunk != y->chunk) return x->chunk < y->chunk ? -1 : 1;
  return (x->off > y->off) - (x->off < y->off);
}

static void cp_free(cp_plan *pl) {
  free(pl->it);
  free(pl->ts);
  free(pl->live);
}

/* The saves word of a node (0: undeclared). */
static unsigned node_saves(const ad_node *n) {
  return n->op->saves.of ? n->op->saves.of(n) : n->op->saves.mask;
}

/* Which of n's tensors a rule may read: bit j for input j (j < 4), bit 4
 * for the output; *high set when inputs 4.. count as read. Only gradients
 * that can be asked for count: those of inputs needing a gradient. */
static unsigned node_reads(const ad_node *n, int *high) {
  unsigned s = node_saves(n);
  *high = 1;
  if (!(s & AD_SAVES_DECLARED)) return 0x1fu;
  unsigned r = 0;
  for (int i = 0; i < n->n_in; i++)
    if (ad_needs_grad(n->in[i])) r |= i < AD_NODE_MAX_INLINE ? AD_SAVES_FOR(s, i) : 0x1fu;
  return r;
}

static int cp_refuse(cp_plan *pl, const char *fmt, const char *name) {
  snprintf(pl->whybuf, sizeof pl->whybuf, fmt, name);
  pl->why = pl->whybuf;
  return 0;
}

/* Collects the survivors after m and their new places. Returns 1 when the
 * plan can be carried out; 0 with pl->why (refused) or without (no
 * memory). Changes nothing on the tape. slack > 0: a survivor stays where
 * it is when the gap below its new place is at most `slack` bytes and at
 * most 1/CP_PIN_RATIO of its size (a hole stays; see ad__sweep_collect). */
enum { CP_PIN_RATIO = 32 };

static int cp_make_plan(ad_tape *t, ad_marker m, int n_keep, ad_tensor *const *keep, int n_roots,
                        ad_tensor *const *roots, size_t slack, cp_plan *pl) {
  ad_node *first = m.last ? m.last->next : t->first;
  size_t nn = t->n_nodes - m.n_nodes, k0 = 0, n_ref = (size_t)n_keep;
  for (ad_node *n = first; n; n = n->next) {
    if (!in_region(t, m, n)) return cp_refuse(pl, "node of %s lies before the mark", n->op->name);
    if (in_region(t, m, n->op))
      return cp_refuse(pl, "the op descriptor of %s lies in the arena", n->op->name);
    if (in_region(t, m, n->label)) return cp_refuse(pl, "a label of %s lies in the arena", "");
    if (n->a.extra && in_region(t, m, n->a.extra) && !(node_saves(n) & AD_SAVES_EXTRA_TENSOR) &&
        !n->op->saves.extra_bytes)
      return cp_refuse(pl,
                       "op %s keeps arena data (a.extra) of a size it does not declare "
                       "(ad_op_def.saves.extra_bytes)",
                       n->op->name);
    n_ref += (size_t)n->n_in + 1;
    k0++;
  }
  if (k0 != nn) return cp_refuse(pl, "the node list does not match the count%s", "");
  /* Liveness: a node stays when its output is kept or feeds a node that
   * stays. The others (the inner training loss itself, say: nothing
   * recorded after it reads it) can never be reached by a gradient of a
   * kept tensor, and the caller may use no other tensor made after m, so
   * they go with their tensors. */
  pl->live = nn ? malloc(nn * sizeof *pl->live) : NULL;
  if (nn && !pl->live) return 0;
  cp_set live;
  if (!cp_set_init(&live, n_ref + (size_t)n_roots)) return 0;
  for (int i = 0; i < n_keep; i++) cp_set_add(&live, keep[i]);
  for (int i = 0; i < n_roots; i++) cp_set_add(&live, roots[i]);
  size_t q = nn;
  for (ad_node *n = t->last; n && n != m.last; n = n->prev) {
    if (!cp_set_has(&live, n->out)) continue;
    pl->live[--q] = n;
    for (int i = 0; i < n->n_in; i++)
      if (n->in[i]) cp_set_add(&live, n->in[i]);
  }
  free(live.slot);
  /* the live nodes were written from the end: move them to the front */
  pl->nlive = nn - q;
  if (q) memmove(pl->live, pl->live + q, pl->nlive * sizeof *pl->live);
  /* Nodes, their arrays and extras; the tensors they refer to. */
  for (size_t qi = 0; qi < pl->nlive; qi++) {
    ad_node *n = pl->live[qi];
    if (!cp_push_item(pl, t, n, sizeof *n, 16)) return 0;
    if (n->in != n->in_inline && in_region(t, m, n->in) &&
        !cp_push_item(pl, t, n->in, sizeof(ad_tensor *) * (size_t)n->n_in, 16))
      return 0;
    unsigned s = node_saves(n);
    if (n->a.extra && in_region(t, m, n->a.extra)) {
      if (s & AD_SAVES_EXTRA_TENSOR) {
        if (!cp_push_tensor(pl, n->a.extra, 1)) return 0;
      } else if (!cp_push_item(pl, t, n->a.extra, n->op->saves.extra_bytes, 16)) {
        return 0;
      }
    }
    int high;
    unsigned r = node_reads(n, &high);
    for (int i = 0; i < n->n_in; i++) {
      ad_tensor *x = n->in[i];
      if (!x || !in_region(t, m, x)) continue;
      int need = i < AD_NODE_MAX_INLINE ? (int)((r >> i) & 1u) : high;
      if (!cp_push_tensor(pl, x, need)) return 0;
    }
    if (in_region(t, m, n->out) && !cp_push_tensor(pl, n->out, (r & AD_S_OUT) != 0)) return 0;
  }
  for (int i = 0; i < n_keep; i++)
    if (in_region(t, m, keep[i]) && !cp_push_tensor(pl, keep[i], 1)) return 0;
  for (int i = 0; i < n_roots; i++) /* the struct; values only if a rule reads them */
    if (in_region(t, m, roots[i]) && !cp_push_tensor(pl, roots[i], 0)) return 0;
  /* Unique tensors, needs merged. */
  if (pl->nt) qsort(pl->ts, pl->nt, sizeof *pl->ts, cmp_tensor);
  size_t u = 0;
  for (size_t k = 0; k < pl->nt; k++) {
    if (u && pl->ts[u - 1].x == pl->ts[k].x)
      pl->ts[u - 1].need |= pl->ts[k].need;
    else
      pl->ts[u++] = pl->ts[k];
  }
  pl->nt = u;
  for (size_t k = 0; k < pl->nt; k++) {
    ad_tensor *x = pl->ts[k].x;
    if (!(x->flags & AD_FLAG_ARENA) || x->tape_id != t->id)
      return cp_refuse(pl, "a node refers to memory after the mark that is no tensor%s", "");
    if (in_region(t, m, x->name)) return cp_refuse(pl, "a tensor name lies in the arena%s", "");
    if (!cp_push_item(pl, t, x, sizeof *x, 16)) return 0;
  }
  /* Value blocks: views share one block (ad__view copies the data
   * pointer), kept when any tensor sharing it needs it; its size is the
   * largest of theirs. */
  cp_tensor *byd = pl->nt ? malloc(pl->nt * sizeof *byd) : NULL;
  size_t nd = 0;
  if (pl->nt && !byd) return 0;
  for (size_t k = 0; k < pl->nt; k++)
    if (in_region(t, m, pl->ts[k].x->data)) byd[nd++] = pl->ts[k];
  if (nd) qsort(byd, nd, sizeof *byd, cmp_data);
  for (size_t k = 0; k < nd;) {
    size_t j = k, bytes = 0;
    int need = 0;
    for (; j < nd && byd[j].x->data == byd[k].x->data; j++) {
      size_t b = (size_t)byd[j].x->size * ad_dtype_size(byd[j].x->dtype);
      if (b > bytes) bytes = b;
      need |= byd[j].need;
    }
    if (need && !cp_push_item(pl, t, byd[k].x->data, bytes, AD_ALIGN)) {
      free(byd);
      return 0;
    }
    k = j;
  }
  free(byd);
  /* New places: first fit from the mark, in address order. */
  if (pl->n) qsort(pl->it, pl->n, sizeof *pl->it, cmp_item);
  size_t c = m.chunk, o = m.offset;
  for (size_t k = 0; k < pl->n; k++) {
    cp_item *it = &pl->it[k];
    if (k && (it->chunk == pl->it[k - 1].chunk && it->off < pl->it[k - 1].off + pl->it[k - 1].size))
      return cp_refuse(pl, "survivors overlap in the arena%s", "");
    for (;;) {
      size_t a = (o + it->align - 1) & ~(it->align - 1);
      if (a <= t->chunk_cap[c] && it->size <= t->chunk_cap[c] - a) {
        o = a;
        break;
      }
      c++;
      o = 0;
      if (c >= t->n_chunks) return cp_refuse(pl, "no room%s", "");
    }
    if (c > it->chunk || (c == it->chunk && o > it->off))
      return cp_refuse(pl, "a survivor would move up%s", ""); /* cannot happen: guard */
    if (slack && c == it->chunk && it->off - o <= slack && (it->off - o) * CP_PIN_RATIO <= it->size)
      o = it->off; /* pinned: a small hole stays below it */
    it->nw = t->chunk[c] + o;
    o += it->size;
  }
  return 1;
}

/* New address of p (anything inside a survivor), p itself when outside the
 * region, NULL when p lies in the region but in no survivor. */
static void *cp_remap(const ad_tape *t, ad_marker m, const cp_plan *pl, const void *p) {
  if (!in_region(t, m, p)) return (void *)p;
  size_t c = 0, o = 0;
  arena_pos(t, p, &c, &o);
  size_t lo = 0, hi = pl->n;
  while (lo < hi) { /* first item after p */
    size_t mid = (lo + hi) / 2;
    const cp_item *it = &pl->it[mid];
    if (it->chunk < c || (it->chunk == c && it->off <= o))
      lo = mid + 1;
    else
      hi = mid;
  }
  if (lo == 0) return NULL;
  const cp_item *it = &pl->it[lo - 1];
  if (it->chunk != c || o - it->off >= it->size) return NULL;
  return it->nw + (o - it->off);
}

static int marker_ok(const ad_tape *t, ad_marker m) {
  if (m.chunk >= t->n_chunks || m.offset > t->chunk_cap[m.chunk] || m.used > t->used ||
      m.n_nodes > t->n_nodes || m.seq > t->n_marks)
    return 0;
  return m.chunk < t->cur || (m.chunk == t->cur && m.offset <= t->off);
}

int ad__after_mark(const ad_tape *t, ad_marker m, const void *p) {
  return t && marker_ok(t, m) && in_region(t, m, p);
}

int ad__nan_guard(const ad_tape *t) {
  return t && t->nan_guard;
}

int ad__compactable(ad_tape *t, ad_marker m) {
  if (!t || !marker_ok(t, m)) return 0;
  cp_plan pl = {0};
  int ok = cp_make_plan(t, m, 0, NULL, 0, NULL, 0, &pl);
  cp_free(&pl);
  return ok;
}

static ad_status compact(ad_tape *t, ad_marker m, int n_keep, ad_tensor **keep, int n_roots,
                         ad_tensor **roots, size_t slack, int *skipped);

ad_status ad_tape_compact(ad_tape *t, ad_marker m, int n_keep, ad_tensor **keep) {
  return compact(t, m, n_keep, keep, 0, NULL, 0, NULL);
}

/* ad_tape_compact with roots: tensors whose graph stays (their nodes and
 * what those read) but whose own values go unless a rule reads them — an
 * unrolled segment's last output once L_val's gradient at it is taken
 * (its adjoint's seed still needs its node; nothing reads its values).
 * roots[] is updated as keep[] is; a root's values may be released
 * (AD_FLAG_RELEASED). Internal (bilevel/bl_internal.h declares it). */
ad_status ad__compact_roots(ad_tape *t, ad_marker m, int n_keep, ad_tensor **keep, int n_roots,
                            ad_tensor **roots) {
  if (!t) return ad__set_last(AD_ERR_NULL, "ad__compact_roots: tape is NULL");
  if (t->status != AD_OK) return t->status;
  if (n_roots < 0 || (n_roots > 0 && !roots)) {
    ad__fail(t, AD_ERR_ARG, "ad__compact_roots: %d roots at %p", n_roots, (void *)roots);
    return t->status;
  }
  for (int i = 0; i < n_roots; i++) {
    if (!roots[i]) {
      ad__fail(t, AD_ERR_NULL, "ad__compact_roots: root %d is NULL", i);
      return t->status;
    }
    if (!ad__usable_shape(t, "ad__compact_roots", "root", i, roots[i])) return t->status;
  }
  return compact(t, m, n_keep, keep, n_roots, roots, 0, NULL);
}

/* skipped: NULL, or where to say the compaction was not done because it
 * would move more bytes than it frees (nothing changed then; the sweep's
 * collection asks for this, a caller of ad_tape_compact wants the bytes). */
static ad_status compact(ad_tape *t, ad_marker m, int n_keep, ad_tensor **keep, int n_roots,
                         ad_tensor **roots, size_t slack, int *skipped) {
  if (!t) return ad__set_last(AD_ERR_NULL, "ad_tape_compact: tape is NULL");
  if (t->status != AD_OK) return t->status;
  if (!marker_ok(t, m)) {
    ad__fail(t, AD_ERR_ARG,
             "ad_tape_compact: the marker was not made by ad_mark on this tape "
             "or lies past the tape's current point");
    return t->status;
  }
  if (n_keep < 0 || (n_keep > 0 && !keep)) {
    ad__fail(t, n_keep < 0 ? AD_ERR_ARG : AD_ERR_NULL, "ad_tape_compact: keep (%d) is %s", n_keep,
             n_keep < 0 ? "negative" : "NULL");
    return t->status;
  }
  for (int i = 0; i < n_keep; i++) {
    if (!keep[i]) {
      ad__fail(t, AD_ERR_NULL, "ad_tape_compact: keep[%d] is NULL", i);
      return t->status;
    }
    if (!ad__usable(t, "ad_tape_compact", "keep", i, keep[i])) return t->status;
  }
  cp_plan pl = {0};
  if (!cp_make_plan(t, m, n_keep, keep, n_roots, roots, slack, &pl)) {
    if (pl.why)
      ad__fail(t, AD_ERR_STATE, "ad_tape_compact: cannot compact: %s", pl.why);
    else
      ad__fail(t, AD_ERR_NOMEM, "ad_tape_compact: out of memory for the plan");
    cp_free(&pl);
    return t->status;
  }
  if (skipped) {
    size_t moved = 0, kept = 0;
    for (size_t k = 0; k < pl.n; k++) {
      kept += pl.it[k].size;
      if (pl.it[k].nw != pl.it[k].old) moved += pl.it[k].size;
    }
    *skipped = moved > t->used - m.used - kept;
    if (*skipped) {
      cp_free(&pl);
      return AD_OK;
    }
  }
  /* Fix pointers on the old copies: tensors, then nodes (a node's input
   * array is read through its old address before that is replaced). */
  for (size_t k = 0; k < pl.nt; k++) {
    ad_tensor *x = pl.ts[k].x;
    if (in_region(t, m, x->data)) {
      void *d = cp_remap(t, m, &pl, x->data);
      x->data = d;
      if (!d) x->flags |= AD_FLAG_RELEASED;
    }
    if (in_region(t, m, x->node)) x->node = cp_remap(t, m, &pl, x->node);
    if (in_region(t, m, x->grad)) x->grad = cp_remap(t, m, &pl, x->grad);
    x->scratch = NULL;
    x->gen = 0;
  }
  /* The live nodes, relinked (dead ones drop out of the list). */
  ad_node *prev_new = m.last;
  for (size_t q = 0; q < pl.nlive; q++) {
    ad_node *n = pl.live[q], *nn = cp_remap(t, m, &pl, n);
    for (int i = 0; i < n->n_in; i++) n->in[i] = cp_remap(t, m, &pl, n->in[i]);
    if (n->in == n->in_inline)
      n->in = nn->in_inline; /* the inline array moves with the node */
    else
      n->in = cp_remap(t, m, &pl, n->in);
    n->out = cp_remap(t, m, &pl, n->out);
    n->prev = prev_new;
    n->next = q + 1 < pl.nlive ? cp_remap(t, m, &pl, pl.live[q + 1]) : NULL;
    n->a.extra = cp_remap(t, m, &pl, n->a.extra);
    n->mark = 0;
    prev_new = nn;
  }
  ad_node *nf = pl.nlive ? cp_remap(t, m, &pl, pl.live[0]) : NULL;
  if (m.last)
    m.last->next = nf;
  else
    t->first = nf;
  t->last = prev_new;
  t->n_nodes = m.n_nodes + pl.nlive;
  for (int i = 0; i < n_keep; i++) keep[i] = cp_remap(t, m, &pl, keep[i]);
  for (int i = 0; i < n_roots; i++) roots[i] = cp_remap(t, m, &pl, roots[i]);
  /* Move, in address order (each moves down or stays: memmove is safe),
   * with the whole region unpoisoned; then poison all but the survivors. */
  size_t end_c = t->cur, end_o = t->off;
  for (size_t c = m.chunk; c <= end_c; c++) {
    size_t lo = c == m.chunk ? m.offset : 0, hi = c == end_c ? end_o : t->chunk_cap[c];
    UNPOISON(t->chunk[c] + lo, hi - lo);
  }
  for (size_t k = 0; k < pl.n; k++)
    if (pl.it[k].nw != pl.it[k].old) memmove(pl.it[k].nw, pl.it[k].old, pl.it[k].size);
  for (size_t c = m.chunk; c <= end_c; c++) {
    size_t lo = c == m.chunk ? m.offset : 0, hi = c == end_c ? end_o : t->chunk_cap[c];
    POISON(t->chunk[c] + lo, hi - lo);
  }
  /* The new allocation point and `used` as ad_arena_alloc would count it:
   * chunk tails skipped count as used, the end is 64-aligned. */
  size_t c = m.chunk, o = m.offset, used = m.used;
  for (size_t k = 0; k < pl.n; k++) {
    size_t nc = 0, no = 0;
    arena_pos(t, pl.it[k].nw, &nc, &no);
    for (; c < nc; c++, o = 0) used += t->chunk_cap[c] - o;
    used += no + pl.it[k].size - o;
    o = no + pl.it[k].size;
    UNPOISON(pl.it[k].nw, pl.it[k].size);
  }
  size_t oe = (o + AD_ALIGN - 1) & ~(size_t)(AD_ALIGN - 1);
  if (oe > t->chunk_cap[c]) oe = t->chunk_cap[c];
  used += oe - o;
  t->cur = c;
  t->off = oe;
  t->used = used;
  t->op_n = 0; /* the op context may point at moved tensors */
  cp_free(&pl);
  return AD_OK;
}

/* Why: the reverse sweep of one unrolled step makes several temporaries
 * the size of the weights per node (an update's rule alone makes five),
 * all dead once the next node has taken them in; a bump arena would hold
 * every one until the caller rewinds. Compacting when the arena has grown
 * by more than what was live at the last collection (at least 1 MiB)
 * keeps the peak near the live set, and the memmove it costs is paid for
 * by the growth in between, so it stays a small fraction of the sweep.
 * Survivors are pinned over small holes (cp_make_plan): a sweep frees a
 * layer's small gradients (the 8 KB cotangent of a 200 x 10 weight's
 * gradient, say) below weight-sized ones still live, and sliding a
 * 627 KB survivor down to reclaim 8 KB moved more memory than the whole
 * collection frees. A pinned hole is at most SWEEP_SLACK bytes and 1/32 of
 * the survivor over it; the sweep's region is freed whole afterwards. */
enum { SWEEP_SLACK = 64 << 10 };

void ad__sweep_collect(ad_tape *t, ad__sweep_gc *gc, ad_node *const *nodes, ptrdiff_t k,
                       ptrdiff_t count, unsigned gen) {
  if (t->status != AD_OK || t->record || t->last != gc->m.last) return;
  size_t since = t->used - gc->m.used, budget = gc->budget ? gc->budget : (size_t)1 << 20;
  if (since < budget) return;
  size_t cap = (size_t)gc->n_in + (size_t)k, nk = 0;
  for (ptrdiff_t j = 0; j < count; j++) cap += (size_t)nodes[j]->n_in;
  ad_tensor **own = malloc(cap * sizeof *own), **keep = malloc(cap * sizeof *keep);
  if (!own || !keep) {
    free(own);
    free(keep);
    return; /* no collection: the sweep goes on as before */
  }
#define GC_TAKE(x)                                                                                 \
  do {                                                                                             \
    ad_tensor *x_ = (x);                                                                           \
    if (x_->gen == gen && x_->scratch) {                                                           \
      own[nk] = x_;                                                                                \
      keep[nk++] = x_->scratch;                                                                    \
    }                                                                                              \
  } while (0)
  /* Live slots: those of the nodes still to run (their rules read them,
   * and contributions still arrive) and of the inputs asked for. A slot of
   * a node already run is dead: every consumer of its tensor ran before it
   * (decreasing id), so nothing adds to or reads it again — the cotangent
   * of an unrolled step's gradient, a weight-sized tensor, goes as soon as
   * the first rule of the gradient's graph has taken it in. Every stamped
   * tensor is an input or the output of one of `nodes`. */
  for (ptrdiff_t j = 0; j < k; j++) GC_TAKE(nodes[j]->out);
  for (int i = 0; i < gc->n_in; i++) GC_TAKE(gc->inputs[i]);
#undef GC_TAKE
  /* Stamps are read through own[] below; compaction resets the stamps of
   * the tensors it moves, which are gradients here, never graph tensors
   * (those lie before m). */
  int skipped = 0;
  if (compact(t, gc->m, (int)nk, keep, 0, NULL, SWEEP_SLACK, &skipped) == AD_OK && !skipped)
    for (size_t j = 0; j < nk; j++) own[j]->scratch = keep[j];
  /* Skipped (the survivors to move outweigh the garbage: a CNN's sweep
   * would slide 884 KB of live cotangents down to free 659 KB): the next
   * try waits for as much growth again as a collection would have left. */
  size_t live = t->used - gc->m.used;
  if (skipped) live += budget;
  gc->budget = live > ((size_t)1 << 20) ? live : (size_t)1 << 20;
  free(own);
  free(keep);
}
