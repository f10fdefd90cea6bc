/* mnist.c — MNIST-format image/label pairs from a directory (where the
 * embedded subset lives is data_dir.c). */
#include "datasets/ds_internal.h"

#include <stdlib.h>
#include <string.h>

/* Spellings seen in the wild: the official "-idx3-ubyte" names, gzipped
 * or not, and "train-images.idx3-ubyte" from some mirrors and Kaggle. */
static const char *const name_forms[] = {"%s-%s-%s-ubyte.gz", "%s-%s-%s-ubyte", "%s-%s.%s-ubyte.gz",
                                         "%s-%s.%s-ubyte"};
#define N_FORMS (sizeof name_forms / sizeof name_forms[0])

/* Finds the first existing file of the kind ("images", "idx3") in dir;
 * *path is malloc'd. AD_ERR_IO with the names tried when none exists. */
static ad_status find_file(char **path, const char *dir, const char *prefix, const char *kind,
                           const char *idx) {
  char tried[512] = "";
  size_t used = 0;
  *path = NULL;
  for (size_t i = 0; i < N_FORMS; i++) {
    char name[64];
    snprintf(name, sizeof name, name_forms[i], prefix, kind, idx);
    size_t len = strlen(dir) + 1 + strlen(name) + 1;
    char *p = malloc(len);
    if (!p) return ds_fail(AD_ERR_NOMEM, "out of memory");
    snprintf(p, len, "%s/%s", dir, name);
    FILE *f = fopen(p, "rb");
    if (f) {
      fclose(f);
      *path = p;
      return AD_OK;
    }
    free(p);
    if (used < sizeof tried)
      used += (size_t)snprintf(tried + used, sizeof tried - used, "%s%s", i ? ", " : "", name);
  }
  return ds_fail(AD_ERR_IO, "no MNIST %s file in %s (tried %s)", kind, dir, tried);
}

static ad_status read_pair(ds_idx **img, ds_idx **lab, const char *dir, const char *prefix) {
  char *ipath = NULL, *lpath = NULL;
  *img = *lab = NULL;
  ad_status s = find_file(&ipath, dir, prefix, "images", "idx3");
  if (s == AD_OK) s = find_file(&lpath, dir, prefix, "labels", "idx1");
  if (s == AD_OK) s = ds_idx_read(img, ipath);
  if (s == AD_OK && ((*img)->type != DS_IDX_U8 || (*img)->ndim != 3))
    s = ds_fail(AD_ERR_FORMAT,
                "%s: expected u8 images [N, rows, cols] (magic 0x00000803), found %s with %d dims",
                ipath, ds_idx_type_name((*img)->type), (*img)->ndim);
  if (s == AD_OK) s = ds_idx_read(lab, lpath);
  if (s == AD_OK && ((*lab)->type != DS_IDX_U8 || (*lab)->ndim != 1))
    s = ds_fail(AD_ERR_FORMAT,
                "%s: expected u8 labels [N] (magic 0x00000801), found %s with %d dims", lpath,
                ds_idx_type_name((*lab)->type), (*lab)->ndim);
  if (s == AD_OK && (*lab)->dims[0] != (*img)->dims[0])
    s = ds_fail(AD_ERR_FORMAT, "%s has %lld images but %s has %lld labels", ipath,
                (long long)(*img)->dims[0], lpath, (long long)(*lab)->dims[0]);
  if (s == AD_OK) {
    const uint8_t *l = (*lab)->data;
    for (int64_t i = 0; i < (*lab)->count; i++)
      if (l[i] > 9) {
        s = ds_fail(AD_ERR_FORMAT, "%s: label %lld is %u; expected a digit class 0..9", lpath,
                    (long long)i, l[i]);
        break;
      }
  }
  free(ipath);
  free(lpath);
  if (s != AD_OK) {
    ds_idx_free(*img);
    ds_idx_free(*lab);
    *img = *lab = NULL;
  }
  return s;
}

ad_status ds_mnist_load(ds_dataset **out, const char *dir, const char *split,
                        const ds_mnist_opts *opts) {
  ds_clear_error();
  if (!out) return ds_fail(AD_ERR_NULL, "ds_mnist_load: out is NULL");
  *out = NULL;
  if (!split) return ds_fail(AD_ERR_NULL, "ds_mnist_load: split is NULL");
  const char *prefix = NULL;
  if (strcmp(split, "train") == 0)
    prefix = "train";
  else if (strcmp(split, "test") == 0 || strcmp(split, "t10k") == 0)
    prefix = "t10k";
  else
    return ds_fail(AD_ERR_ARG, "ds_mnist_load: split \"%s\"; expected \"train\" or \"test\"",
                   split);
  ds_mnist_opts o = opts ? *opts : (ds_mnist_opts){0};
  if (!ds_dtype_ok(o.dtype) || o.limit < 0)
    return ds_fail(AD_ERR_ARG, "ds_mnist_load: bad options (dtype %d, limit %lld)", (int)o.dtype,
                   (long long)o.limit);
  if (!dir) dir = ds_default_mnist_dir();

  ds_idx *img = NULL, *lab = NULL;
  ad_status s = read_pair(&img, &lab, dir, prefix);
  if (s != AD_OK) return s;

  int64_t n = img->dims[0], rows = img->dims[1], cols = img->dims[2];
  if (o.limit > 0 && o.limit < n) n = o.limit;
  ds_dataset *d = calloc(1, sizeof *d);
  if (!d) s = ds_fail(AD_ERR_NOMEM, "ds_mnist_load: out of memory");
  if (s == AD_OK) s = ds_tensor_new(&d->x, o.dtype, 2, (int64_t[]){n, rows * cols});
  if (s == AD_OK && !(d->labels = malloc((size_t)n * sizeof *d->labels)))
    s = ds_fail(AD_ERR_NOMEM, "ds_mnist_load: out of memory for %lld labels", (long long)n);
  if (s == AD_OK) {
    const uint8_t *px = img->data, *l = lab->data;
    int64_t m = n * rows * cols;
    /* Pixels / 255 exactly as torchvision's ToTensor does, so numbers
     * compare with the PyTorch reference. */
    if (o.dtype == AD_F32) {
      float *x = d->x->data;
      for (int64_t i = 0; i < m; i++) x[i] = (float)px[i] / 255.0f;
    } else {
      double *x = d->x->data;
      for (int64_t i = 0; i < m; i++) x[i] = px[i] / 255.0;
    }
    for (int64_t i = 0; i < n; i++) d->labels[i] = l[i];
    d->n = n;
    d->dim = rows * cols;
    d->n_classes = 10;
    d->rows = rows;
    d->cols = cols;
  }
  ds_idx_free(img);
  ds_idx_free(lab);
  if (s != AD_OK) {
    ds_dataset_free(d);
    return s;
  }
  *out = d;
  return AD_OK;
}
