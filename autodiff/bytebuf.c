/* bytebuf.c — the growable byte buffer of ad_internal.h, shared by the
 * parameter file (nn/serialize.c) and the engine state file
 * (bilevel/engine.c). */
#include "ad_internal.h"

#include <stdlib.h>
#include <string.h>

int ad__bytebuf_reserve(ad__bytebuf *b, size_t extra) {
  if (b->oom) return 0;
  size_t need;
  if (!ad__add_size(b->n, extra, &need)) {
    b->oom = 1; /* more than SIZE_MAX bytes: no allocation could hold them */
    return 0;
  }
  if (need <= b->cap) return 1;
  size_t cap = b->cap ? b->cap : 4096;
  while (cap < need)
    if (!ad__mul_size(cap, 2, &cap)) {
      cap = need; /* doubling would wrap: ask for exactly what is needed */
      break;
    }
  unsigned char *p = realloc(b->p, cap);
  if (!p) {
    b->oom = 1;
    return 0;
  }
  b->p = p;
  b->cap = cap;
  return 1;
}

void ad__bytebuf_put(ad__bytebuf *b, const void *src, size_t n) {
  if (n == 0 || !ad__bytebuf_reserve(b, n)) return;
  memcpy(b->p + b->n, src, n);
  b->n += n;
}

void ad__bytebuf_put_le(ad__bytebuf *b, uint64_t v, int bytes) {
  unsigned char c[8];
  for (int i = 0; i < bytes; i++) c[i] = (unsigned char)(v >> (8 * i));
  ad__bytebuf_put(b, c, (size_t)bytes);
}

void ad__bytebuf_read(ad__bytebuf *b, FILE *f) {
  /* Reads straight into the buffer: at least 64 KiB of room per fread, a
   * short count is the end of the file (or an error, for ferror). */
  for (;;) {
    if (!ad__bytebuf_reserve(b, (size_t)1 << 16)) return;
    size_t room = b->cap - b->n;
    size_t k = fread(b->p + b->n, 1, room, f);
    b->n += k;
    if (k < room) return;
  }
}

void ad__bytebuf_free(ad__bytebuf *b) {
  free(b->p);
  b->p = NULL;
  b->n = b->cap = 0;
  b->oom = 0;
}
