/* params.c — parameter sets: named tensors that are views into ONE value
 * block and ONE gradient block (llm.c's layout), so a method that works on
 * plain vectors (CG, Neumann series, line searches) sees the whole model as
 * one contiguous array without copying. */
#include "nn.h"

#include "autodiff/ad_internal.h"
#include "nn_internal.h"

#include <stdlib.h>
#include <string.h>

struct nn_params {
  ad_dtype dtype;
  int n;
  int64_t numel;
  void *values, *grads;                /* the two blocks, numel elements each */
  ad_tensor *flat_values, *flat_grads; /* [numel] views of the blocks */
  ad_tensor *t[NN_MAX_PARAMS];         /* views; t[i]->grad views the grad block */
  int64_t off[NN_MAX_PARAMS];          /* element offset of tensor i */
  char name[NN_MAX_PARAMS][NN_NAME_MAX];
};

static int name_ok(const char *s) {
  if (!s || !s[0]) return 0;
  for (int i = 0; i < NN_NAME_MAX; i++)
    if (!s[i]) return 1;
  return 0;
}

ad_status nn_params_new(nn_params **out, ad_dtype dt, int n, const nn_param_spec *specs) {
  if (!out) return ad__set_last(AD_ERR_NULL, "nn_params_new: out is NULL");
  *out = NULL;
  if (!specs || n <= 0 || n > NN_MAX_PARAMS)
    return ad__set_last(specs ? AD_ERR_ARG : AD_ERR_NULL,
                        "nn_params_new: need 1..%d specs, got %d%s", NN_MAX_PARAMS, n,
                        specs ? "" : " (NULL)");
  if (dt != AD_F32 && dt != AD_F64)
    return ad__set_last(AD_ERR_DTYPE, "nn_params_new: dtype %d is neither AD_F32 nor AD_F64",
                        (int)dt);
  int64_t total = 0;
  for (int i = 0; i < n; i++) {
    const nn_param_spec *s = &specs[i];
    if (!name_ok(s->name))
      return ad__set_last(AD_ERR_ARG, "nn_params_new: spec %d: name must be 1..%d characters", i,
                          NN_NAME_MAX - 1);
    for (int j = 0; j < i; j++)
      if (strcmp(specs[j].name, s->name) == 0)
        return ad__set_last(AD_ERR_ARG, "nn_params_new: name '%s' used twice (specs %d and %d)",
                            s->name, j, i);
    if (s->ndim < 0 || s->ndim > AD_MAX_DIMS)
      return ad__set_last(AD_ERR_SHAPE, "nn_params_new: '%s': ndim %d outside 0..%d", s->name,
                          s->ndim, AD_MAX_DIMS);
    int64_t k = 1;
    for (int d = 0; d < s->ndim; d++) {
      if (s->shape[d] <= 0 || s->shape[d] > ((int64_t)1 << 40))
        return ad__set_last(AD_ERR_SHAPE, "nn_params_new: '%s': dimension %d is %lld", s->name, d,
                            (long long)s->shape[d]);
      if (nn__mul_overflow(k, s->shape[d], &k) || k > ((int64_t)1 << 40))
        return ad__set_last(AD_ERR_SHAPE, "nn_params_new: '%s': more than 2^40 elements", s->name);
    }
    if (nn__add_overflow(total, k, &total) || total > ((int64_t)1 << 40))
      return ad__set_last(AD_ERR_SHAPE, "nn_params_new: more than 2^40 elements in all");
  }
  nn_params *p = calloc(1, sizeof *p);
  if (!p) return ad__set_last(AD_ERR_NOMEM, "nn_params_new: out of memory");
  p->dtype = dt;
  p->numel = total;
  size_t es = ad_dtype_size(dt);
  size_t bytes = ((size_t)total * es + 63) & ~(size_t)63;
  p->values = aligned_alloc(64, bytes);
  p->grads = aligned_alloc(64, bytes);
  if (!p->values || !p->grads) goto nomem;
  memset(p->values, 0, bytes);
  memset(p->grads, 0, bytes);
  if (ad_tensor_wrap(&p->flat_values, dt, 1, &total, p->values) != AD_OK ||
      ad_tensor_wrap(&p->flat_grads, dt, 1, &total, p->grads) != AD_OK)
    goto nomem;
  int64_t off = 0;
  for (int i = 0; i < n; i++) {
    const nn_param_spec *s = &specs[i];
    char *v = (char *)p->values + (size_t)off * es, *g = (char *)p->grads + (size_t)off * es;
    if (ad_tensor_wrap(&p->t[i], dt, s->ndim, s->shape, v) != AD_OK) goto nomem;
    p->n = i + 1;
    if (ad_tensor_wrap(&p->t[i]->grad, dt, s->ndim, s->shape, g) != AD_OK) goto nomem;
    strcpy(p->name[i], s->name);
    p->t[i]->name = p->name[i];
    p->off[i] = off;
    ad_requires_grad(p->t[i], 1);
    off += p->t[i]->size;
  }
  *out = p;
  return AD_OK;
nomem:
  nn_params_free(p);
  return ad__set_last(AD_ERR_NOMEM, "nn_params_new: cannot allocate %lld elements",
                      (long long)total);
}

void nn_params_free(nn_params *p) {
  if (!p) return;
  for (int i = 0; i < p->n; i++) ad_tensor_free(p->t[i]); /* frees the grad view too */
  ad_tensor_free(p->flat_values);
  ad_tensor_free(p->flat_grads);
  free(p->values);
  free(p->grads);
  free(p);
}

int nn_params_count(const nn_params *p) {
  return p ? p->n : 0;
}
int64_t nn_params_numel(const nn_params *p) {
  return p ? p->numel : 0;
}
ad_dtype nn_params_dtype(const nn_params *p) {
  return p ? p->dtype : AD_F32;
}

int nn_params_index(const nn_params *p, const char *name) {
  if (!p || !name) return -1;
  for (int i = 0; i < p->n; i++)
    if (strcmp(p->name[i], name) == 0) return i;
  return -1;
}

ad_tensor *nn_params_get(const nn_params *p, const char *name) {
  int i = nn_params_index(p, name);
  return i < 0 ? NULL : p->t[i];
}

ad_tensor *nn_params_at(const nn_params *p, int i) {
  return p && i >= 0 && i < p->n ? p->t[i] : NULL;
}

const char *nn_params_name(const nn_params *p, int i) {
  return p && i >= 0 && i < p->n ? p->name[i] : NULL;
}

int64_t nn_params_offset(const nn_params *p, int i) {
  return p && i >= 0 && i < p->n ? p->off[i] : -1;
}

ad_tensor *const *nn_params_list(const nn_params *p) {
  return p ? p->t : NULL;
}

ad_tensor *nn_params_values(const nn_params *p) {
  return p ? p->flat_values : NULL;
}
ad_tensor *nn_params_grads(const nn_params *p) {
  return p ? p->flat_grads : NULL;
}

void nn_params_zero_grad(nn_params *p) {
  if (p) memset(p->grads, 0, (size_t)p->numel * ad_dtype_size(p->dtype));
}

void nn_params_requires_grad(nn_params *p, int on) {
  if (!p) return;
  for (int i = 0; i < p->n; i++) ad_requires_grad(p->t[i], on);
}

/* Same names, dtypes and shapes in the same order. */
static int same_layout(const nn_params *a, const nn_params *b) {
  if (a->n != b->n || a->dtype != b->dtype) return 0;
  for (int i = 0; i < a->n; i++)
    if (strcmp(a->name[i], b->name[i]) != 0 || !ad_same_shape(a->t[i], b->t[i])) return 0;
  return 1;
}

ad_status nn_params_copy(nn_params *dst, const nn_params *src) {
  if (!dst || !src) return ad__set_last(AD_ERR_NULL, "nn_params_copy: NULL argument");
  if (!same_layout(dst, src))
    return ad__set_last(AD_ERR_SHAPE, "nn_params_copy: the sets differ in names, dtype or shapes");
  memcpy(dst->values, src->values, (size_t)src->numel * ad_dtype_size(src->dtype));
  return AD_OK;
}

ad_status nn_params_clone(nn_params **out, const nn_params *src) {
  if (!out) return ad__set_last(AD_ERR_NULL, "nn_params_clone: out is NULL");
  *out = NULL;
  if (!src) return ad__set_last(AD_ERR_NULL, "nn_params_clone: src is NULL");
  nn_param_spec specs[NN_MAX_PARAMS];
  for (int i = 0; i < src->n; i++) {
    specs[i].name = src->name[i];
    specs[i].ndim = src->t[i]->ndim;
    memcpy(specs[i].shape, src->t[i]->shape, sizeof specs[i].shape);
  }
  ad_status s = nn_params_new(out, src->dtype, src->n, specs);
  if (s != AD_OK) return s;
  return nn_params_copy(*out, src);
}

ad_status nn_params_to_vector(const nn_params *p, ad_tensor *v) {
  if (!p || !v) return ad__set_last(AD_ERR_NULL, "nn_params_to_vector: NULL argument");
  if (v->size != p->numel)
    return ad__set_last(AD_ERR_SHAPE, "nn_params_to_vector: vector has %lld elements, set has %lld",
                        (long long)v->size, (long long)p->numel);
  return ad_copy_values(v, p->flat_values);
}

ad_status nn_params_from_vector(nn_params *p, const ad_tensor *v) {
  if (!p || !v) return ad__set_last(AD_ERR_NULL, "nn_params_from_vector: NULL argument");
  if (v->size != p->numel)
    return ad__set_last(AD_ERR_SHAPE,
                        "nn_params_from_vector: vector has %lld elements, set has %lld",
                        (long long)v->size, (long long)p->numel);
  return ad_copy_values(p->flat_values, v);
}

/* ---------------------------------------------------------------- on the tape */
/* pack = concat of the flattened tensors; its rule (concat's) slices g
 * back, so unpack(pack(xs)) is the identity to every order. */
ad_tensor *nn_pack(ad_tape *t, int n, ad_tensor *const *xs) {
  if (t && (n <= 0 || n > NN_MAX_PARAMS || !xs))
    return ad__fail(t, AD_ERR_ARG, "nn_pack: need 1..%d tensors, got %d", NN_MAX_PARAMS, n);
  if (!ad__check(t, "nn_pack", n, xs)) return NULL;
  ad_tensor *flat[NN_MAX_PARAMS];
  for (int i = 0; i < n; i++) {
    int64_t len = xs[i]->size;
    flat[i] = ad_reshape(t, xs[i], 1, &len);
    if (!flat[i]) return NULL;
  }
  return n == 1 ? flat[0] : ad_concat(t, n, flat, 0);
}

ad_status nn_unpack(ad_tape *t, ad_tensor *v, int n, ad_tensor *const *like, ad_tensor **out) {
  if (!t) return ad__set_last(AD_ERR_NULL, "nn_unpack: tape is NULL");
  if (!out || !like || n <= 0) {
    ad__fail(t, AD_ERR_ARG, "nn_unpack: need outputs and %d shapes", n);
    return ad_tape_status(t);
  }
  for (int i = 0; i < n; i++) out[i] = NULL;
  if (!ad__check(t, "nn_unpack", 1, &v)) return ad_tape_status(t);
  int64_t total = 0;
  for (int i = 0; i < n; i++) {
    if (!like[i]) {
      ad__fail(t, AD_ERR_NULL, "nn_unpack: shape %d is NULL", i);
      return ad_tape_status(t);
    }
    total += like[i]->size;
  }
  if (v->ndim != 1 || v->size != total) {
    char s[96];
    ad__fail(t, AD_ERR_SHAPE, "nn_unpack: vector %s does not hold the %lld elements of %d tensors",
             ad_shape_str(v, s, sizeof s), (long long)total, n);
    return ad_tape_status(t);
  }
  int64_t off = 0;
  for (int i = 0; i < n; i++) {
    ad_tensor *piece = n == 1 ? v : ad_slice(t, v, 0, off, like[i]->size);
    out[i] = ad_reshape(t, piece, like[i]->ndim, like[i]->shape);
    off += like[i]->size;
  }
  return ad_tape_status(t);
}
