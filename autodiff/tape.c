/* tape.c — the tape: its arena, its node list, its sticky error, marks. */
#include "ad_internal.h"

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
};

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

ad_status ad__set_last(ad_status s, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_msg, sizeof last_msg, fmt, ap);
  va_end(ap);
  last_status = s;
  return s;
}

ad_tensor *ad__fail(ad_tape *t, ad_status s, const char *fmt, ...) {
  char buf[sizeof last_msg];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  memcpy(last_msg, buf, sizeof buf);
  last_status = s;
  if (t && t->status == AD_OK) { /* keep the first: it is the cause */
    t->status = s;
    memcpy(t->msg, buf, sizeof t->msg);
  }
  return NULL;
}

ad_status ad_tape_new(ad_tape **out, const ad_tape_opts *opts) {
  if (!out) return ad__set_last(AD_ERR_NULL, "ad_tape_new: out is NULL");
  *out = NULL;
  ad_tape_opts o = opts ? *opts : (ad_tape_opts){0};
  if (o.arena_mb == 0) o.arena_mb = 64;
  if (o.arena_max_mb == 0) o.arena_max_mb = o.arena_mb;
  if (o.arena_max_mb < o.arena_mb)
    return ad__set_last(AD_ERR_ARG, "ad_tape_new: arena_max_mb (%zu) < arena_mb (%zu)",
                        o.arena_max_mb, o.arena_mb);
  if (o.arena_mb > ((size_t)1 << 20))
    return ad__set_last(AD_ERR_ARG, "ad_tape_new: arena_mb %zu is absurd", o.arena_mb);
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
  *out = t;
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
  size_t need = (bytes + AD_ALIGN - 1) & ~(size_t)(AD_ALIGN - 1);
  if (need < bytes) {
    ad__fail(t, AD_ERR_ARENA, "arena: request of %zu bytes overflows", bytes);
    return NULL;
  }
  while (t->off + need > t->chunk_cap[t->cur]) {
    /* Skip to the next chunk; reserve one if none is left. The tail of the
     * current chunk counts as used so that marks restore `used` exactly. */
    size_t tail = t->chunk_cap[t->cur] - t->off;
    if (t->cur + 1 < t->n_chunks && t->chunk_cap[t->cur + 1] >= need) {
      t->used += tail;
      t->cur++;
      t->off = 0;
      continue;
    }
    size_t cap = t->first_mb << 20;
    if (cap < need) cap = need;
    size_t left = t->cap_max - t->capacity;
    if (t->cur + 1 < t->n_chunks || t->n_chunks == AD_MAX_CHUNKS || cap > left) {
      size_t here = t->chunk_cap[t->cur] - t->off;
      ad__fail(t, AD_ERR_ARENA,
               "arena exhausted: asked for %zu bytes, %zu left in this chunk and %zu "
               "more may be reserved (cap %zu MiB; raise ad_tape_opts.arena_max_mb)",
               bytes, here, left, t->cap_max >> 20);
      return NULL;
    }
    char *c = aligned_alloc(AD_ALIGN, cap);
    if (!c) {
      ad__fail(t, AD_ERR_NOMEM, "arena: malloc of %zu bytes failed", cap);
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
  return m;
}

void ad_rewind(ad_tape *t, ad_marker m) {
  if (!t || m.chunk >= t->n_chunks || m.used > t->used) return;
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

/* ---- recording */

ad_node *ad__record(ad_tape *t, const ad_op_def *op, ad_tensor *out, int n_in,
                    ad_tensor *const *in) {
  if (!t->record || !out) return NULL;
  int any = 0;
  for (int i = 0; i < n_in; i++) any |= ad_needs_grad(in[i]);
  if (!any) return NULL;
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

ad_tensor *ad__done(ad_tape *t, ad_tensor *out, const char *op) {
  if (!out || !t->nan_guard) return out;
  for (int64_t i = 0; i < out->size; i++) {
    double v = ad_get(out, i);
    if (v != v || v - v != 0) {
      char sh[96];
      return ad__fail(t, AD_ERR_NUMERIC, "%s produced %s at element %lld of %s", op,
                      v != v ? "NaN" : "Inf", (long long)i, ad_shape_str(out, sh, sizeof sh));
    }
  }
  return out;
}

ad_node **ad__node_buf(ad_tape *t, int slot, size_t n) {
  if (n > t->nbuf_cap[slot]) {
    size_t cap = t->nbuf_cap[slot] ? t->nbuf_cap[slot] : 256;
    while (cap < n) cap *= 2;
    ad_node **b = realloc(t->nbuf[slot], cap * sizeof *b);
    if (!b) {
      ad__fail(t, AD_ERR_NOMEM, "ad_grad: cannot grow the graph-walk buffer to %zu nodes", n);
      return NULL;
    }
    t->nbuf[slot] = b;
    t->nbuf_cap[slot] = cap;
  }
  return t->nbuf[slot];
}
