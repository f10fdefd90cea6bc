/* error.c — the thread-local message behind ds_errmsg(), and small shared
 * helpers (dtype conversion, tensor allocation with a message). */
#include "datasets/ds_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* One message per thread, like errno: loaders may run on worker threads. */
static _Thread_local char ds_msg[512];

const char *ds_errmsg(void) {
  return ds_msg;
}

/* The public function now running on this thread (a string literal). */
static _Thread_local const char *ds_fn;

void ds_enter(const char *fn) {
  ds_msg[0] = '\0';
  ds_fn = fn;
}

/* 1 when ds_msg already starts with "fn:". */
static int named(const char *fn) {
  size_t n = strlen(fn);
  return strncmp(ds_msg, fn, n) == 0 && ds_msg[n] == ':';
}

/* ds_msg = "fn: " ds_msg, cut to fit. */
static void prefix(const char *fn) {
  size_t n = strlen(fn) + 2, len = strlen(ds_msg);
  if (n >= sizeof ds_msg) return;
  if (len > sizeof ds_msg - 1 - n) len = sizeof ds_msg - 1 - n;
  memmove(ds_msg + n, ds_msg, len);
  ds_msg[n + len] = '\0';
  memcpy(ds_msg, fn, n - 2);
  ds_msg[n - 2] = ':';
  ds_msg[n - 1] = ' ';
}

void ds_resume(const char *fn) {
  ds_fn = fn;
  if (ds_msg[0] && !named(fn)) prefix(fn);
}

ad_status ds_fail(ad_status s, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(ds_msg, sizeof ds_msg, fmt, ap);
  va_end(ap);
  if (ds_fn && !named(ds_fn)) prefix(ds_fn);
  return s;
}

int ds_dtype_ok(ad_dtype dt) {
  return dt == AD_F32 || dt == AD_F64;
}

void ds_convert(void *dst, ad_dtype dt_dst, const void *src, ad_dtype dt_src, int64_t n) {
  if (dt_dst == AD_F32 && dt_src == AD_F32) {
    const float *s = src;
    float *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = s[i];
  } else if (dt_dst == AD_F64 && dt_src == AD_F64) {
    const double *s = src;
    double *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = s[i];
  } else if (dt_dst == AD_F32) {
    const double *s = src;
    float *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = (float)s[i];
  } else {
    const float *s = src;
    double *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = s[i];
  }
}

ad_status ds_tensor_new(ad_tensor **out, ad_dtype dt, int ndim, const int64_t *shape) {
  ad_status s = ad_tensor_new(out, dt, ndim, shape);
  if (s != AD_OK) {
    *out = NULL;
    return ds_fail(s, "cannot make a tensor: %s", ad_last_error());
  }
  return AD_OK;
}
