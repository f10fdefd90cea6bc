/* serialize.c — parameter sets to and from a versioned, checksummed file.
 *
 * Layout (version 1), all integers little-endian:
 *   "HTPARAMS"                      8-byte magic
 *   u32 version                     NN_PARAMS_FILE_VERSION
 *   u32 n                           number of tensors
 *   n times:
 *     u16 name_len, name bytes      no terminating NUL
 *     u8 dtype (0 f32, 1 f64), u8 ndim, ndim x i64 shape
 *   the tensors' elements, in order, little-endian IEEE 754
 *   u32 CRC-32 (zlib's) of every byte before it
 *
 * Saving is atomic: the bytes go to a temporary file in the destination's
 * directory, are fsync'ed, and the temporary is renamed over the
 * destination (then the directory is fsync'ed), so a crash leaves either
 * the old file or the new one, never half of one. Loading reads and checks
 * the whole file (magic, version, sizes, checksum, then every name, dtype
 * and shape against the destination) before it writes a single value, so
 * a failed load leaves the destination untouched. */
#define _POSIX_C_SOURCE 200809L

#include "nn.h"

#include "autodiff/ad_internal.h"
#include "nn_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

static const char MAGIC[8] = {'H', 'T', 'P', 'A', 'R', 'A', 'M', 'S'};

static int host_le(void) {
  const uint16_t one = 1;
  unsigned char b;
  memcpy(&b, &one, 1);
  return b == 1;
}

/* Reverses each es-byte element of p in place (big-endian hosts only). */
static void swap_elems(unsigned char *p, size_t n, size_t es) {
  for (size_t i = 0; i < n; i++, p += es)
    for (size_t a = 0, b = es - 1; a < b; a++, b--) {
      unsigned char c = p[a];
      p[a] = p[b];
      p[b] = c;
    }
}

static uLong crc_update(uLong crc, const unsigned char *p, size_t n) {
  while (n > 0) { /* zlib takes uInt lengths */
    uInt k = n > (1u << 30) ? (1u << 30) : (uInt)n;
    crc = crc32(crc, p, k);
    p += k;
    n -= k;
  }
  return crc;
}

/* ---------------------------------------------------------------- header bytes */

static uint64_t get_le(const unsigned char *p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; i++) v |= (uint64_t)p[i] << (8 * i);
  return v;
}

/* ---------------------------------------------------------------- save */

/* Writes n elements of size es from src, little-endian, updating crc. */
static int write_elems(FILE *f, const void *src, size_t n, size_t es, uLong *crc) {
  const unsigned char *s = src;
  size_t total = n * es;
  if (host_le()) {
    *crc = crc_update(*crc, s, total);
    return fwrite(s, 1, total, f) == total;
  }
  unsigned char tmp[1 << 14];
  size_t per = sizeof tmp / es;
  for (size_t i = 0; i < n; i += per) {
    size_t k = n - i < per ? n - i : per;
    memcpy(tmp, s + i * es, k * es);
    swap_elems(tmp, k, es);
    *crc = crc_update(*crc, tmp, k * es);
    if (fwrite(tmp, 1, k * es, f) != k * es) return 0;
  }
  return 1;
}

ad_status nn_params_save(const nn_params *p, const char *path) {
  if (!p || !path) return ad__set_last(AD_ERR_NULL, "nn_params_save: NULL argument");
  ad__bytebuf h = {0};
  ad__bytebuf_put(&h, MAGIC, sizeof MAGIC);
  ad__bytebuf_put_le(&h, NN_PARAMS_FILE_VERSION, 4);
  ad__bytebuf_put_le(&h, (uint64_t)nn_params_count(p), 4);
  for (int i = 0; i < nn_params_count(p); i++) {
    const char *name = nn_params_name(p, i);
    const ad_tensor *x = nn_params_at(p, i);
    size_t len = strlen(name);
    ad__bytebuf_put_le(&h, len, 2);
    ad__bytebuf_put(&h, name, len);
    ad__bytebuf_put_le(&h, (uint64_t)x->dtype, 1);
    ad__bytebuf_put_le(&h, (uint64_t)x->ndim, 1);
    for (int d = 0; d < x->ndim; d++) ad__bytebuf_put_le(&h, (uint64_t)x->shape[d], 8);
  }
  if (h.oom) {
    ad__bytebuf_free(&h);
    return ad__set_last(AD_ERR_NOMEM, "nn_params_save: out of memory");
  }
  ad__afile af;
  int err = ad__afile_open(&af, path);
  if (err) {
    ad_status s =
        !af.tmp ? ad__set_last(AD_ERR_NOMEM, "nn_params_save: out of memory")
                : ad__set_last(AD_ERR_IO, "nn_params_save: cannot create a temporary file %s: %s",
                               af.tmp, strerror(err));
    ad__afile_finish(&af, path, err);
    ad__bytebuf_free(&h);
    return s;
  }
  /* On a duplicate descriptor: af.fd stays open for ad__afile_finish's fsync. */
  int fd2 = dup(af.fd);
  FILE *f = fd2 >= 0 ? fdopen(fd2, "wb") : NULL;
  if (!f && fd2 >= 0) close(fd2);
  int ok = f != NULL;
  uLong crc = crc32(0L, Z_NULL, 0);
  if (ok) {
    crc = crc_update(crc, h.p, h.n);
    ok = fwrite(h.p, 1, h.n, f) == h.n;
  }
  const ad_tensor *flat = nn_params_values(p);
  if (ok) ok = write_elems(f, flat->data, (size_t)flat->size, ad_dtype_size(flat->dtype), &crc);
  if (ok) {
    unsigned char c[4];
    for (int i = 0; i < 4; i++) c[i] = (unsigned char)(crc >> (8 * i));
    ok = fwrite(c, 1, 4, f) == 4;
  }
  err = ok ? 0 : (errno ? errno : EIO);
  if (f && fclose(f) != 0 && !err) err = errno ? errno : EIO;
  err = ad__afile_finish(&af, path, err);
  ad__bytebuf_free(&h);
  if (err)
    return ad__set_last(AD_ERR_IO,
                        "nn_params_save: writing %s failed: %s (the old file, if any, is "
                        "unchanged)",
                        path, strerror(err));
  return AD_OK;
}

/* ---------------------------------------------------------------- load */

typedef struct {
  int n;
  const unsigned char *name[NN_MAX_PARAMS];
  int name_len[NN_MAX_PARAMS];
  int dtype[NN_MAX_PARAMS];
  int ndim[NN_MAX_PARAMS];
  int64_t shape[NN_MAX_PARAMS][AD_MAX_DIMS];
  int64_t numel;             /* elements in all tensors */
  const unsigned char *data; /* first element of tensor 0 */
  int dt;                    /* the one dtype of every tensor */
} parsed;

static ad_status read_all(const char *fn, const char *path, unsigned char **out, size_t *len) {
  *out = NULL;
  *len = 0;
  FILE *f = fopen(path, "rb");
  if (!f) return ad__set_last(AD_ERR_IO, "%s: cannot open %s: %s", fn, path, strerror(errno));
  ad__bytebuf b = {0};
  ad__bytebuf_read(&b, f);
  int bad = ferror(f);
  fclose(f);
  if (bad || b.oom) {
    ad__bytebuf_free(&b);
    return b.oom ? ad__set_last(AD_ERR_NOMEM, "%s: %s: out of memory", fn, path)
                 : ad__set_last(AD_ERR_IO, "%s: error reading %s", fn, path);
  }
  *out = b.p;
  *len = b.n;
  return AD_OK;
}

#define FMT(...) ad__set_last(AD_ERR_FORMAT, __VA_ARGS__)

/* Checks everything that can be checked without the destination. */
static ad_status parse(const char *fn, const unsigned char *b, size_t len, const char *path,
                       parsed *ps) {
  memset(ps, 0, sizeof *ps);
  if (len < 16 + 4)
    return FMT("%s: %s: truncated: %zu bytes, a parameter file has at least 20", fn, path, len);
  if (memcmp(b, MAGIC, sizeof MAGIC) != 0)
    return FMT("%s: %s: not a hypertape parameter file (bad magic)", fn, path);
  uint32_t version = (uint32_t)get_le(b + 8, 4);
  uint32_t stored = (uint32_t)get_le(b + len - 4, 4);
  uint32_t crc = (uint32_t)crc_update(crc32(0L, Z_NULL, 0), b, len - 4);
  if (version != NN_PARAMS_FILE_VERSION)
    return FMT("%s: %s: file format version %u, this build reads version %d%s", fn, path, version,
               NN_PARAMS_FILE_VERSION,
               stored != crc ? " (and the checksum does not match: the file may be corrupt)" : "");
  uint32_t n = (uint32_t)get_le(b + 12, 4);
  if (n < 1 || n > NN_MAX_PARAMS)
    return FMT("%s: %s: header says %u tensors, allowed 1..%d", fn, path, n, NN_MAX_PARAMS);
  ps->n = (int)n;
  size_t at = 16, end = len - 4;
  int64_t numel = 0;
  for (int i = 0; i < ps->n; i++) {
    if (at + 2 > end) goto truncated;
    int nl = (int)get_le(b + at, 2);
    at += 2;
    if (nl < 1 || nl >= NN_NAME_MAX)
      return FMT("%s: %s: tensor %d has a name of %d bytes (allowed 1..%d)", fn, path, i, nl,
                 NN_NAME_MAX - 1);
    if (at + (size_t)nl + 2 > end) goto truncated;
    ps->name[i] = b + at;
    ps->name_len[i] = nl;
    at += (size_t)nl;
    ps->dtype[i] = b[at];
    ps->ndim[i] = b[at + 1];
    at += 2;
    if (ps->dtype[i] != AD_F32 && ps->dtype[i] != AD_F64)
      return FMT("%s: %s: tensor %d has unknown dtype code %d", fn, path, i, ps->dtype[i]);
    if (ps->dtype[i] != ps->dtype[0])
      return FMT("%s: %s: tensors 0 and %d differ in dtype", fn, path, i);
    if (ps->ndim[i] > AD_MAX_DIMS)
      return FMT("%s: %s: tensor %d has %d dims (at most %d)", fn, path, i, ps->ndim[i],
                 AD_MAX_DIMS);
    if (at + 8 * (size_t)ps->ndim[i] > end) goto truncated;
    int64_t k = 1;
    for (int d = 0; d < ps->ndim[i]; d++) {
      int64_t v = (int64_t)get_le(b + at, 8);
      at += 8;
      if (v <= 0 || v > ((int64_t)1 << 40))
        return FMT("%s: %s: tensor %d has dimension %d of size %lld", fn, path, i, d, (long long)v);
      ps->shape[i][d] = v;
      /* Each dim is <= 2^40, so two of them can already wrap an int64. */
      if (nn__mul_overflow(k, v, &k) || k > ((int64_t)1 << 40))
        return FMT("%s: %s: tensor %d has more than 2^40 elements (dimension %d of "
                   "size %lld)",
                   fn, path, i, d, (long long)v);
    }
    if (nn__add_overflow(numel, k, &numel) || numel > ((int64_t)1 << 40))
      return FMT("%s: %s: the tensors hold more than 2^40 elements", fn, path);
  }
  ps->dt = ps->dtype[0];
  ps->numel = numel;
  ps->data = b + at;
  size_t want = at + (size_t)numel * ad_dtype_size((ad_dtype)ps->dt) + 4;
  if (want != len)
    return FMT("%s: %s: %s: the header describes %zu bytes, the file has %zu", fn, path,
               len < want ? "truncated" : "trailing bytes", want, len);
  if (stored != crc)
    return FMT("%s: %s: checksum mismatch (stored %08x, computed %08x): the file is "
               "corrupt",
               fn, path, stored, crc);
  return AD_OK;
truncated:
  return FMT("%s: %s: truncated inside the tensor table (%zu bytes)", fn, path, len);
}

/* Copies the checked data into p's value block. */
static void fill_values(nn_params *p, const parsed *ps) {
  ad_tensor *flat = nn_params_values(p);
  size_t es = ad_dtype_size(flat->dtype);
  memcpy(flat->data, ps->data, (size_t)ps->numel * es);
  if (!host_le()) swap_elems(flat->data, (size_t)ps->numel, es);
}

static void shape_text(char *buf, size_t len, int dt, int ndim, const int64_t *shape) {
  size_t k = (size_t)snprintf(buf, len, "%s [", ad_dtype_name((ad_dtype)dt));
  for (int d = 0; d < ndim && k < len; d++)
    k += (size_t)snprintf(buf + k, len - k, d ? ", %lld" : "%lld", (long long)shape[d]);
  if (k < len) snprintf(buf + k, len - k, "]");
}

ad_status nn_params_load(nn_params *p, const char *path) {
  static const char FN[] = "nn_params_load";
  if (!p || !path) return ad__set_last(AD_ERR_NULL, "nn_params_load: NULL argument");
  unsigned char *b = NULL;
  size_t len = 0;
  ad_status s = read_all(FN, path, &b, &len);
  if (s != AD_OK) return s;
  parsed ps;
  s = parse(FN, b, len, path, &ps);
  if (s == AD_OK && ps.n != nn_params_count(p))
    s = FMT("nn_params_load: %s holds %d tensors, the destination has %d", path, ps.n,
            nn_params_count(p));
  for (int i = 0; s == AD_OK && i < ps.n; i++) {
    const ad_tensor *x = nn_params_at(p, i);
    const char *name = nn_params_name(p, i);
    int same = (int)strlen(name) == ps.name_len[i] &&
               memcmp(name, ps.name[i], (size_t)ps.name_len[i]) == 0 && (int)x->dtype == ps.dt &&
               x->ndim == ps.ndim[i];
    for (int d = 0; same && d < x->ndim; d++) same = x->shape[d] == ps.shape[i][d];
    if (!same) {
      char fs[128], ds[128];
      shape_text(fs, sizeof fs, ps.dt, ps.ndim[i], ps.shape[i]);
      shape_text(ds, sizeof ds, x->dtype, x->ndim, x->shape);
      s = FMT("nn_params_load: %s: tensor %d is '%.*s' %s in the file but '%s' %s in the "
              "destination",
              path, i, ps.name_len[i], (const char *)ps.name[i], fs, name, ds);
    }
  }
  if (s == AD_OK) fill_values(p, &ps);
  free(b);
  return s;
}

ad_status nn_params_load_new(nn_params **out, const char *path) {
  static const char FN[] = "nn_params_load_new";
  if (!out) return ad__set_last(AD_ERR_NULL, "nn_params_load_new: out is NULL");
  *out = NULL;
  if (!path) return ad__set_last(AD_ERR_NULL, "nn_params_load_new: path is NULL");
  unsigned char *b = NULL;
  size_t len = 0;
  ad_status s = read_all(FN, path, &b, &len);
  if (s != AD_OK) return s;
  parsed ps;
  s = parse(FN, b, len, path, &ps);
  if (s == AD_OK) {
    char names[NN_MAX_PARAMS][NN_NAME_MAX];
    nn_param_spec specs[NN_MAX_PARAMS];
    for (int i = 0; i < ps.n; i++) {
      memcpy(names[i], ps.name[i], (size_t)ps.name_len[i]);
      names[i][ps.name_len[i]] = 0;
      specs[i].name = names[i];
      specs[i].ndim = ps.ndim[i];
      memcpy(specs[i].shape, ps.shape[i], sizeof specs[i].shape);
    }
    s = nn_params_new(out, (ad_dtype)ps.dt, ps.n, specs);
    if (s == AD_ERR_ARG || s == AD_ERR_SHAPE) { /* e.g. a duplicated or NUL-bearing name */
      char why[512];
      snprintf(why, sizeof why, "%s", ad_last_error());
      s = FMT("nn_params_load_new: %s: %s", path, why);
    }
    if (s == AD_OK) fill_values(*out, &ps);
  }
  free(b);
  return s;
}
