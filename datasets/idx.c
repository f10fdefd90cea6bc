/* idx.c — IDX files (the MNIST format), plain or gzip, read and write.
 *
 * Layout (big-endian): magic = 00 00 TYPE NDIM, then NDIM u32 dims, then
 * prod(dims) elements of TYPE. The reader insists the file ends exactly
 * after the data: MNIST files have no padding, so extra bytes mean a wrong
 * or damaged file, and saying so beats training on shifted pixels. */
#define _POSIX_C_SOURCE 200809L /* mkstemp, fsync, fdopen, dup */

#include "datasets/ds_internal.h"

#include "autodiff/ad_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

size_t ds_idx_type_size(ds_idx_type t) {
  switch (t) {
  case DS_IDX_U8:
  case DS_IDX_I8:
    return 1;
  case DS_IDX_I16:
    return 2;
  case DS_IDX_I32:
  case DS_IDX_F32:
    return 4;
  case DS_IDX_F64:
    return 8;
  }
  return 0;
}

const char *ds_idx_type_name(ds_idx_type t) {
  switch (t) {
  case DS_IDX_U8:
    return "u8";
  case DS_IDX_I8:
    return "i8";
  case DS_IDX_I16:
    return "i16";
  case DS_IDX_I32:
    return "i32";
  case DS_IDX_F32:
    return "f32";
  case DS_IDX_F64:
    return "f64";
  }
  return "unknown";
}

void ds_idx_free(ds_idx *a) {
  if (!a) return;
  free(a->data);
  free(a);
}

/* "60000 x 28 x 28" */
static const char *dims_str(char *buf, size_t len, int ndim, const int64_t *dims) {
  size_t used = 0;
  buf[0] = '\0';
  for (int i = 0; i < ndim && used < len; i++)
    used += (size_t)snprintf(buf + used, len - used, i ? " x %lld" : "%lld", (long long)dims[i]);
  return buf;
}

/* ------------------------------------------------------------------ reading */

/* Plain and gzip files behind one read call. The gzip side runs zlib's
 * inflate on the file itself rather than gzread, for two reasons: messages
 * can say "gzip stream" where that is the problem, and gzread silently
 * ignores whatever follows the last gzip member, while a plain file with
 * one byte too many is rejected: the same damage must get the same answer,
 * so bytes after the stream (other than a further gzip member, as `cat
 * a.gz b.gz` makes) are a format error here. */
typedef struct {
  const char *path;
  FILE *f;
  int gz;            /* 1: inflate f's bytes; 0: read them as they are */
  int z_live;        /* inflateInit2 succeeded (inflateEnd owed) */
  int z_done;        /* the last member ended and nothing follows */
  z_stream z;        /* gz: the inflate state, fed from in[] */
  unsigned char *in; /* gz: compressed bytes read from f */
  ad_status err;     /* why the last src_read returned -1 */
} idx_src;

enum { SRC_IN = 1 << 16 };

/* Refills in[] keeping the z.avail_in bytes not consumed yet (moved to the
 * front). Returns the bytes added (0 at end of file) or -1 on a read error. */
static int64_t gz_fill(idx_src *s) {
  if (s->z.avail_in > 0 && s->z.next_in != s->in) memmove(s->in, s->z.next_in, s->z.avail_in);
  s->z.next_in = s->in;
  size_t r = fread(s->in + s->z.avail_in, 1, SRC_IN - s->z.avail_in, s->f);
  if (r == 0 && ferror(s->f)) {
    s->err = ds_fail(AD_ERR_IO, "%s: read error: %s", s->path, strerror(errno));
    return -1;
  }
  s->z.avail_in += (uInt)r;
  return (int64_t)r;
}

/* After a member's end: another member (magic 1f 8b) starts a new inflate;
 * end of file ends the data; anything else is trailing garbage. Returns 0
 * to go on, 1 at the clean end, -1 on an error. */
static int gz_after_member(idx_src *s) {
  while (s->z.avail_in < 2) {
    int64_t r = gz_fill(s);
    if (r < 0) return -1;
    if (r == 0) break;
  }
  if (s->z.avail_in == 0) {
    s->z_done = 1;
    return 1;
  }
  if (s->z.avail_in >= 2 && s->z.next_in[0] == 0x1f && s->z.next_in[1] == 0x8b) {
    inflateReset(&s->z);
    return 0;
  }
  int64_t trailing = s->z.avail_in;
  unsigned char junk[4096];
  size_t r;
  while ((r = fread(junk, 1, sizeof junk, s->f)) > 0) trailing += (int64_t)r;
  s->err = ds_fail(AD_ERR_FORMAT,
                   "%s: %lld bytes of trailing garbage after the gzip stream (expected the file "
                   "to end with the stream)",
                   s->path, (long long)trailing);
  return -1;
}

/* Up to n decompressed bytes into buf. */
static int64_t gz_read(idx_src *s, unsigned char *buf, int64_t n) {
  int64_t got = 0;
  while (got < n && !s->z_done) {
    int64_t want = n - got;
    if (want > (1 << 30)) want = 1 << 30; /* z_stream counts are unsigned int */
    s->z.next_out = buf + got;
    s->z.avail_out = (uInt)want;
    if (s->z.avail_in == 0) {
      int64_t r = gz_fill(s);
      if (r < 0) return -1;
      if (r == 0) {
        s->err = ds_fail(AD_ERR_FORMAT,
                         "%s: corrupt or truncated gzip stream: unexpected end of file", s->path);
        return -1;
      }
    }
    int ret = inflate(&s->z, Z_NO_FLUSH);
    got += want - (int64_t)s->z.avail_out;
    if (ret == Z_STREAM_END) {
      if (gz_after_member(s) < 0) return -1;
    } else if (ret == Z_MEM_ERROR) {
      s->err = ds_fail(AD_ERR_NOMEM, "%s: out of memory in inflate", s->path);
      return -1;
    } else if (ret != Z_OK && !(ret == Z_BUF_ERROR && s->z.avail_in == 0)) {
      /* (Z_BUF_ERROR with input left would mean no progress: never loop on it) */
      s->err = ds_fail(AD_ERR_FORMAT, "%s: corrupt gzip stream: %s", s->path,
                       s->z.msg ? s->z.msg : "inflate failed");
      return -1;
    }
  }
  return got;
}

/* Reads up to n bytes; returns how many (< n only at end of data), or -1
 * on an error, with s->err and the message set. */
static int64_t src_read(idx_src *s, void *buf, int64_t n) {
  if (s->gz) return gz_read(s, buf, n);
  int64_t got = 0;
  while (got < n) {
    int64_t want = n - got;
    if (want > (1 << 30)) want = 1 << 30;
    size_t r = fread((char *)buf + got, 1, (size_t)want, s->f);
    got += (int64_t)r;
    if (r < (size_t)want) {
      if (ferror(s->f)) {
        s->err = ds_fail(AD_ERR_IO, "%s: read error: %s", s->path, strerror(errno));
        return -1;
      }
      break;
    }
  }
  return got;
}

static void src_close(idx_src *s) {
  if (s->z_live) inflateEnd(&s->z);
  free(s->in);
  if (s->f) fclose(s->f);
}

static ad_status src_open(idx_src *s, const char *path) {
  memset(s, 0, sizeof *s);
  s->path = path;
  s->f = fopen(path, "rb");
  if (!s->f) return ds_fail(AD_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
  unsigned char m[2] = {0, 0};
  size_t r = fread(m, 1, 2, s->f);
  rewind(s->f);
  if (r == 2 && m[0] == 0x1f && m[1] == 0x8b) {
    s->gz = 1;
    if (!(s->in = malloc(SRC_IN))) return ds_fail(AD_ERR_NOMEM, "%s: out of memory", path);
    /* 16 + MAX_WBITS: a gzip wrapper (header, CRC-32 and length checked) */
    if (inflateInit2(&s->z, 16 + MAX_WBITS) != Z_OK)
      return ds_fail(AD_ERR_NOMEM, "%s: cannot start inflate", path);
    s->z_live = 1;
  }
  return AD_OK;
}

static uint32_t be32(const unsigned char *b) {
  return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

/* Big-endian elements to native, in place, by assembling each from its
 * bytes: correct on any host without asking which endianness it has. */
static void to_native(void *data, ds_idx_type t, int64_t n) {
  unsigned char *b = data;
  switch (t) {
  case DS_IDX_U8:
  case DS_IDX_I8:
    return;
  case DS_IDX_I16:
    for (int64_t i = 0; i < n; i++) {
      uint16_t u = (uint16_t)(b[2 * i] << 8 | b[2 * i + 1]);
      memcpy(b + 2 * i, &u, 2);
    }
    return;
  case DS_IDX_I32:
  case DS_IDX_F32:
    for (int64_t i = 0; i < n; i++) {
      uint32_t u = be32(b + 4 * i);
      memcpy(b + 4 * i, &u, 4);
    }
    return;
  case DS_IDX_F64:
    for (int64_t i = 0; i < n; i++) {
      uint64_t u = (uint64_t)be32(b + 8 * i) << 32 | be32(b + 8 * i + 4);
      memcpy(b + 8 * i, &u, 8);
    }
    return;
  }
}

/* Header: magic and dims. Fills a (not its data). */
static ad_status read_header(idx_src *s, ds_idx *a) {
  unsigned char m[4];
  int64_t got = src_read(s, m, 4);
  if (got < 0) return s->err;
  if (got < 4)
    return ds_fail(AD_ERR_FORMAT, "%s: not an IDX file: %lld bytes, too short for the 4-byte magic",
                   s->path, (long long)got);
  unsigned magic = be32(m);
  a->type = (ds_idx_type)m[2];
  a->ndim = m[3];
  if (m[0] != 0 || m[1] != 0 || ds_idx_type_size(a->type) == 0 || a->ndim < 1 ||
      a->ndim > DS_IDX_MAX_DIMS)
    return ds_fail(AD_ERR_FORMAT,
                   "%s: bad IDX magic 0x%08x: expected 0x0000TTNN with type TT in "
                   "08,09,0b,0c,0d,0e and 1..%d dims NN (MNIST: 0x00000803 images, "
                   "0x00000801 labels)",
                   s->path, magic, DS_IDX_MAX_DIMS);
  unsigned char d[4 * DS_IDX_MAX_DIMS];
  got = src_read(s, d, 4 * a->ndim);
  if (got < 0) return s->err;
  if (got < 4 * a->ndim)
    return ds_fail(
        AD_ERR_FORMAT,
        "%s: truncated IDX header: magic 0x%08x announces %d dims (%d bytes), found %lld", s->path,
        magic, a->ndim, 4 * a->ndim, (long long)got);
  size_t esize = ds_idx_type_size(a->type);
  for (int i = 0; i < DS_IDX_MAX_DIMS; i++) a->dims[i] = 1;
  for (int i = 0; i < a->ndim; i++) {
    a->dims[i] = be32(d + 4 * i);
    if (a->dims[i] == 0)
      return ds_fail(AD_ERR_FORMAT, "%s: IDX dimension %d is 0; expected a positive size", s->path,
                     i);
  }
  /* Dims are < 2^32 each; four of them can overflow the byte count. */
  int64_t bytes;
  if (ds_prod_overflow(a->ndim, a->dims, (int64_t)esize, &bytes))
    return ds_fail(AD_ERR_FORMAT, "%s: IDX dims overflow a 64-bit byte count", s->path);
  a->count = bytes / (int64_t)esize;
  return AD_OK;
}

/* Data: grows the buffer as bytes arrive, so a corrupt header that claims
 * terabytes fails as "truncated" instead of as a giant malloc. */
static ad_status read_data(idx_src *s, ds_idx *a) {
  size_t esize = ds_idx_type_size(a->type);
  int64_t want = a->count * (int64_t)esize, have = 0;
  int64_t cap = want < (1 << 20) ? want : (1 << 20);
  unsigned char *buf = malloc((size_t)cap);
  if (!buf)
    return ds_fail(AD_ERR_NOMEM, "%s: out of memory for %lld bytes", s->path, (long long)cap);
  for (;;) {
    int64_t got = src_read(s, buf + have, cap - have);
    if (got < 0) {
      free(buf);
      return s->err;
    }
    have += got;
    if (have < cap || cap == want) break;
    int64_t ncap = cap > want / 2 ? want : 2 * cap;
    unsigned char *nb = realloc(buf, (size_t)ncap);
    if (!nb) {
      free(buf);
      return ds_fail(AD_ERR_NOMEM, "%s: out of memory for %lld bytes", s->path, (long long)ncap);
    }
    buf = nb;
    cap = ncap;
  }
  if (have < want) {
    char dims[160];
    free(buf);
    return ds_fail(AD_ERR_FORMAT,
                   "%s: truncated IDX data: header says %s %s = %lld bytes, found %lld", s->path,
                   dims_str(dims, sizeof dims, a->ndim, a->dims), ds_idx_type_name(a->type),
                   (long long)want, (long long)have);
  }
  /* Count what follows the data, to say how much too long the file is. */
  unsigned char extra[4096];
  int64_t trailing = 0, got;
  while ((got = src_read(s, extra, sizeof extra)) > 0) trailing += got;
  if (got < 0 || trailing > 0) {
    free(buf);
    if (got < 0) return s->err;
    return ds_fail(AD_ERR_FORMAT,
                   "%s: %lld bytes of trailing data: expected the IDX data to end after %lld "
                   "bytes (header %d + data %lld)",
                   s->path, (long long)trailing, (long long)(4 + 4 * a->ndim + want),
                   4 + 4 * a->ndim, (long long)want);
  }
  to_native(buf, a->type, a->count);
  a->data = buf;
  return AD_OK;
}

ad_status ds_idx_read(ds_idx **out, const char *path) {
  ds_enter(__func__);
  if (!out) return ds_fail(AD_ERR_NULL, "ds_idx_read: out is NULL");
  *out = NULL;
  if (!path) return ds_fail(AD_ERR_NULL, "ds_idx_read: path is NULL");
  ds_idx *a = calloc(1, sizeof *a);
  if (!a) return ds_fail(AD_ERR_NOMEM, "%s: out of memory", path);
  idx_src s;
  ad_status st = src_open(&s, path);
  if (st == AD_OK) st = read_header(&s, a);
  if (st == AD_OK) st = read_data(&s, a);
  src_close(&s);
  if (st != AD_OK) {
    ds_idx_free(a);
    return st;
  }
  *out = a;
  return AD_OK;
}

/* ------------------------------------------------------------------ writing */

typedef struct {
  FILE *f;
  gzFile g;
} idx_dst;

static int dst_write(idx_dst *d, const void *buf, size_t n) {
  if (d->g) return gzwrite(d->g, buf, (unsigned)n) == (int)n;
  return fwrite(buf, 1, n, d->f) == n;
}

static void put_be(unsigned char *b, uint64_t v, size_t n) {
  for (size_t i = 0; i < n; i++) b[i] = (unsigned char)(v >> (8 * (n - 1 - i)));
}

ad_status ds_idx_write(const char *path, ds_idx_type type, int ndim, const int64_t *dims,
                       const void *data, int gzip) {
  ds_enter(__func__);
  if (!path || !dims || !data) return ds_fail(AD_ERR_NULL, "ds_idx_write: NULL argument");
  size_t esize = ds_idx_type_size(type);
  if (esize == 0)
    return ds_fail(AD_ERR_ARG, "%s: unknown IDX type code 0x%02x", path, (unsigned)type);
  if (ndim < 1 || ndim > DS_IDX_MAX_DIMS)
    return ds_fail(AD_ERR_ARG, "%s: %d dims; IDX here takes 1..%d", path, ndim, DS_IDX_MAX_DIMS);
  for (int i = 0; i < ndim; i++)
    if (dims[i] < 1 || dims[i] > (int64_t)UINT32_MAX)
      return ds_fail(AD_ERR_ARG, "%s: dim %d is %lld; IDX dims are 1..2^32-1", path, i,
                     (long long)dims[i]);
  int64_t bytes;
  if (ds_prod_overflow(ndim, dims, (int64_t)esize, &bytes)) {
    char ds[160];
    return ds_fail(AD_ERR_ARG, "ds_idx_write: %s: dims %s of %s overflow a 64-bit byte count", path,
                   dims_str(ds, sizeof ds, ndim, dims), ds_idx_type_name(type));
  }
  int64_t count = bytes / (int64_t)esize;

  /* Atomic (ad__afile, like nn_params_save): a failure at any step removes
   * the temporary and leaves an existing file as it was (writing in place
   * and removing on failure lost the old file). */
  ad__afile af;
  int err = ad__afile_open(&af, path);
  if (err) {
    ad_status st =
        !af.tmp ? ds_fail(AD_ERR_NOMEM, "ds_idx_write: %s: out of memory", path)
                : ds_fail(AD_ERR_IO, "ds_idx_write: %s: cannot create a temporary file %s: %s",
                          path, af.tmp, strerror(err));
    ad__afile_finish(&af, path, err);
    return st;
  }
  /* The stream gets a duplicate descriptor: af.fd stays open for the fsync
   * in ad__afile_finish after the stream is closed. For gzip, zlib writes
   * mtime 0 and no file name: the same input gives the same bytes. */
  idx_dst d = {NULL, NULL};
  int fd2 = dup(af.fd);
  if (fd2 >= 0) {
    if (gzip)
      d.g = gzdopen(fd2, "wb9");
    else
      d.f = fdopen(fd2, "wb");
    if (!d.g && !d.f) close(fd2);
  }
  int ok = d.g || d.f;
  err = ok ? 0 : errno;

  unsigned char head[4 + 4 * DS_IDX_MAX_DIMS];
  head[0] = head[1] = 0;
  head[2] = (unsigned char)type;
  head[3] = (unsigned char)ndim;
  for (int i = 0; i < ndim; i++) put_be(head + 4 + 4 * i, (uint64_t)dims[i], 4);
  if (ok) ok = dst_write(&d, head, 4 + 4 * (size_t)ndim);

  /* Data through a small buffer, each element turned big-endian. */
  unsigned char buf[1 << 16];
  const unsigned char *src = data;
  int64_t per = (int64_t)(sizeof buf / esize);
  for (int64_t i = 0; ok && i < count; i += per) {
    int64_t m = count - i < per ? count - i : per;
    for (int64_t k = 0; k < m; k++) {
      uint64_t v = 0;
      const unsigned char *e = src + (i + k) * (int64_t)esize;
      if (esize == 1)
        v = e[0];
      else if (esize == 2) {
        uint16_t u;
        memcpy(&u, e, 2);
        v = u;
      } else if (esize == 4) {
        uint32_t u;
        memcpy(&u, e, 4);
        v = u;
      } else
        memcpy(&v, e, 8);
      put_be(buf + k * (int64_t)esize, v, esize);
    }
    ok = dst_write(&d, buf, (size_t)m * esize);
  }
  if (!ok && !err) err = errno;
  if (d.g) {
    if (gzclose(d.g) != Z_OK && ok) ok = 0, err = errno;
  } else if (d.f) {
    if (fclose(d.f) != 0 && ok) ok = 0, err = errno;
  }
  if (!ok && !err) err = EIO;
  err = ad__afile_finish(&af, path, ok ? 0 : err);
  if (err)
    return ds_fail(AD_ERR_IO,
                   "ds_idx_write: %s: write failed: %s (the old file, if any, is unchanged)", path,
                   strerror(err));
  return AD_OK;
}
