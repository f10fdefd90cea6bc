/* csv.c — numeric CSV tables into a [rows, cols] tensor.
 *
 * Deliberately small: numbers only, one delimiter, double-quoted fields
 * allowed (header names often are). Every bad input is reported as
 * "name:line:field: what" so the user can open the file at the spot. */
#include "datasets/ds_internal.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  const char *name;
  char delim;
  double *vals; /* row-major values read so far */
  int64_t n, cap;
} csv_state;

static int is_blank(char c) {
  return c == ' ' || c == '\t';
}

static ad_status push(csv_state *st, double v) {
  if (st->n == st->cap) {
    int64_t ncap = 1024, bytes;
    if (st->cap && ds_mul_overflow(st->cap, 2, &ncap))
      return ds_fail(AD_ERR_NOMEM, "%s: too many values", st->name);
    if (ds_mul_overflow(ncap, (int64_t)sizeof *st->vals, &bytes) || (uint64_t)bytes > SIZE_MAX)
      return ds_fail(AD_ERR_NOMEM, "%s: too many values", st->name);
    double *nv = realloc(st->vals, (size_t)bytes);
    if (!nv) return ds_fail(AD_ERR_NOMEM, "%s: out of memory", st->name);
    st->vals = nv;
    st->cap = ncap;
  }
  st->vals[st->n++] = v;
  return AD_OK;
}

/* Splits [p, end) at the next delimiter outside quotes. Sets the field's
 * trimmed text (quotes removed) into buf; returns a pointer to the
 * delimiter, or end. *bad is set when the field is malformed. */
static const char *next_field(const char *p, const char *end, char delim, char *buf, size_t len,
                              const char **bad) {
  size_t k = 0;
  *bad = NULL;
  while (p < end && is_blank(*p)) p++;
  if (p < end && *p == '"') {
    p++;
    for (;;) {
      if (p >= end) {
        *bad = "has an unclosed quote";
        return end;
      }
      if (*p == '"') {
        if (p + 1 < end && p[1] == '"')
          p++; /* "" inside quotes is one quote */
        else {
          p++;
          break;
        }
      }
      if (k + 1 < len)
        buf[k++] = *p;
      else
        *bad = "is too long";
      p++;
    }
    while (p < end && is_blank(*p)) p++;
    if (p < end && *p != delim && !*bad) *bad = "has text after its closing quote";
  } else {
    while (p < end && *p != delim) {
      if (k + 1 < len)
        buf[k++] = *p;
      else
        *bad = "is too long";
      p++;
    }
    while (k > 0 && is_blank(buf[k - 1])) k--;
  }
  buf[k] = '\0';
  while (p < end && *p != delim) p++;
  return p;
}

/* Parses a whole field as a number. 0 on success. */
static int parse_number(const char *s, double *v) {
  if (!*s) return -1;
  char *e = NULL;
  errno = 0;
  *v = strtod(s, &e);
  if (*e != '\0') return -1;
  if (errno == ERANGE && fabs(*v) == HUGE_VAL) return -2;
  return 0;
}

/* Splits a line into fields; counts them into *nf. When vals is set the
 * fields must be numbers and are appended. */
static ad_status do_line(csv_state *st, const char *p, const char *end, int64_t line, int parse,
                         ad_dtype dt, int64_t *nf) {
  char buf[256];
  int64_t f = 0;
  for (;;) {
    const char *bad = NULL;
    const char *q = next_field(p, end, st->delim, buf, sizeof buf, &bad);
    f++;
    if (parse) {
      double v = 0;
      int r = bad ? -1 : parse_number(buf, &v);
      if (bad)
        return ds_fail(AD_ERR_FORMAT, "%s:%lld:%lld: field %s", st->name, (long long)line,
                       (long long)f, bad);
      if (r == -1)
        return ds_fail(AD_ERR_FORMAT, "%s:%lld:%lld: field \"%s\" is not a number", st->name,
                       (long long)line, (long long)f, buf);
      if (r == -2 || (dt == AD_F32 && isfinite(v) && fabs(v) > FLT_MAX))
        return ds_fail(AD_ERR_FORMAT, "%s:%lld:%lld: field \"%s\" is out of %s range", st->name,
                       (long long)line, (long long)f, buf, ad_dtype_name(dt));
      ad_status s = push(st, v);
      if (s != AD_OK) return s;
    }
    /* A delimiter at the very end of the line opens one more (empty) field. */
    if (q >= end) break;
    p = q + 1;
  }
  *nf = f;
  return AD_OK;
}

/* 1 when no field of the line is a number: the auto-detected header. */
static int looks_like_header(const csv_state *st, const char *p, const char *end) {
  char buf[256];
  for (;;) {
    const char *bad = NULL;
    double v;
    const char *q = next_field(p, end, st->delim, buf, sizeof buf, &bad);
    if (!bad && parse_number(buf, &v) != -1) return 0; /* out of range is still a number */
    if (q >= end) return 1;
    p = q + 1;
  }
}

ad_status ds_csv_parse(ad_tensor **out, const char *text, size_t len, const char *name,
                       const ds_csv_opts *opts) {
  ds_enter(__func__);
  if (!out) return ds_fail(AD_ERR_NULL, "ds_csv_parse: out is NULL");
  *out = NULL;
  if (!text && len) return ds_fail(AD_ERR_NULL, "ds_csv_parse: text is NULL");
  ds_csv_opts o = opts ? *opts : (ds_csv_opts){0};
  if (!name) name = "<csv>";
  if (!ds_dtype_ok(o.dtype) || o.header < -1 || o.header > 1 || o.delim == '"' || o.delim == '\n' ||
      o.delim == '\r')
    return ds_fail(AD_ERR_ARG, "%s: bad CSV options", name);
  csv_state st = {name, o.delim ? o.delim : ',', NULL, 0, 0};

  int64_t line = 0, rows = 0, cols = -1, header_cols = -1, first_line = 0;
  ad_status s = AD_OK;
  const char *p = text, *end = text + len;
  while (s == AD_OK && p < end) {
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    const char *le = nl ? nl : end;
    line++;
    /* A NUL cannot be part of a number, and strtod would stop at it and
     * accept the field's first half: reject it where it is. */
    const char *nul = memchr(p, '\0', (size_t)(le - p));
    if (nul) {
      s = ds_fail(AD_ERR_FORMAT, "%s:%lld: NUL byte at column %lld: not a text CSV file", name,
                  (long long)line, (long long)(nul - p + 1));
      break;
    }
    const char *lend = (le > p && le[-1] == '\r') ? le - 1 : le;
    const char *t = p;
    while (t < lend && (is_blank(*t))) t++;
    p = nl ? nl + 1 : end;
    if (t == lend) continue; /* blank line */

    int is_header = 0;
    if (cols < 0 && header_cols < 0)
      is_header = o.header == 1 || (o.header == 0 && looks_like_header(&st, t, lend));
    int64_t nf = 0;
    s = do_line(&st, t, lend, line, !is_header, o.dtype, &nf);
    if (s != AD_OK) break;
    if (is_header) {
      header_cols = nf;
      continue;
    }
    int64_t want = cols >= 0 ? cols : header_cols;
    if (want >= 0 && nf != want) {
      s = ds_fail(AD_ERR_FORMAT, "%s:%lld: %lld fields, expected %lld (as on line %lld)", name,
                  (long long)line, (long long)nf, (long long)want,
                  (long long)(cols >= 0 ? first_line : 1));
      break;
    }
    if (cols < 0) first_line = line;
    cols = nf;
    rows++;
  }
  if (s == AD_OK && rows == 0) s = ds_fail(AD_ERR_FORMAT, "%s: no data rows", name);
  if (s == AD_OK) s = ds_tensor_new(out, o.dtype, 2, (int64_t[]){rows, cols});
  if (s == AD_OK) ds_convert((*out)->data, o.dtype, st.vals, AD_F64, rows * cols);
  free(st.vals);
  return s;
}

ad_status ds_csv_read(ad_tensor **out, const char *path, const ds_csv_opts *opts) {
  ds_enter(__func__);
  if (!out) return ds_fail(AD_ERR_NULL, "ds_csv_read: out is NULL");
  *out = NULL;
  if (!path) return ds_fail(AD_ERR_NULL, "ds_csv_read: path is NULL");
  FILE *f = fopen(path, "rb");
  if (!f) return ds_fail(AD_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
  char *buf = NULL;
  size_t n = 0, cap = 0;
  for (;;) {
    if (n == cap) {
      size_t ncap = 1 << 16;
      char *nb = cap && __builtin_mul_overflow(cap, 2, &ncap) ? NULL : realloc(buf, ncap);
      if (!nb) {
        free(buf);
        fclose(f);
        return ds_fail(AD_ERR_NOMEM, "%s: out of memory", path);
      }
      buf = nb;
      cap = ncap;
    }
    size_t r = fread(buf + n, 1, cap - n, f);
    n += r;
    if (r == 0) break;
  }
  int err = ferror(f);
  fclose(f);
  if (err) {
    free(buf);
    return ds_fail(AD_ERR_IO, "%s: read error", path);
  }
  ad_status s = ds_csv_parse(out, buf, n, path, opts);
  ds_resume("ds_csv_read");
  free(buf);
  return s;
}
