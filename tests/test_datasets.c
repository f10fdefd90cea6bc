/* test_datasets.c — datasets/: the embedded MNIST, IDX and CSV readers on
 * good and broken files, the synthetic generators' statistics, label
 * corruption, and the batch iterator's coverage, determinism and
 * allocation-free steady state. */
#define _POSIX_C_SOURCE 200809L /* mkdtemp, setenv */
#include "datasets/ds.h"
#include "gradcheck.h"

#include <check.h>
#include <math.h>
#include <signal.h>
#include <sys/resource.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

/* ------------------------------------------------------------------ helpers */

/* Counting allocator: forwards to glibc and counts calls while `counting`
 * is set, so a test can assert that a loop allocates nothing. Left out
 * under AddressSanitizer, which must own malloc itself. */
#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__)
#define HT_COUNT_ALLOCS 1
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
static volatile int counting;
static volatile long n_allocs;
void *malloc(size_t n) {
  if (counting) n_allocs++;
  return __libc_malloc(n);
}
void *calloc(size_t a, size_t b) {
  if (counting) n_allocs++;
  return __libc_calloc(a, b);
}
void *realloc(void *p, size_t n) {
  if (counting) n_allocs++;
  return __libc_realloc(p, n);
}
void free(void *p) {
  __libc_free(p);
}
#endif

static const double PI = 3.14159265358979323846;
static char tmpdir[64];

static void make_tmpdir(void) {
  strcpy(tmpdir, "/tmp/ht_ds_XXXXXX");
  ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

/* rm -r of a flat directory we made */
static void remove_tmpdir(void) {
  static const char *names[] = {"a.idx",
                                "b.idx",
                                "c.idx",
                                "a.csv",
                                "train-images-idx3-ubyte",
                                "train-labels-idx1-ubyte.gz",
                                "t10k-images.idx3-ubyte",
                                "t10k-labels.idx1-ubyte"};
  char p[128];
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    snprintf(p, sizeof p, "%s/%s", tmpdir, names[i]);
    remove(p);
  }
  rmdir(tmpdir);
}

static const char *tpath(const char *name) {
  static char p[4][128];
  static int k;
  k = (k + 1) % 4;
  snprintf(p[k], sizeof p[k], "%s/%s", tmpdir, name);
  return p[k];
}

static void write_bytes(const char *path, const void *b, size_t n) {
  FILE *f = fopen(path, "wb");
  ck_assert_ptr_nonnull(f);
  ck_assert_uint_eq(fwrite(b, 1, n, f), n);
  fclose(f);
}

/* Whole file into a malloc'd buffer; *n gets its length. */
static unsigned char *read_bytes(const char *path, size_t *n) {
  FILE *f = fopen(path, "rb");
  ck_assert_ptr_nonnull(f);
  size_t cap = 1 << 16, len = 0;
  unsigned char *b = malloc(cap);
  size_t r;
  while ((r = fread(b + len, 1, cap - len, f)) > 0) {
    len += r;
    if (len == cap) b = realloc(b, cap *= 2);
  }
  fclose(f);
  *n = len;
  return b;
}

#define ck_assert_msg_has(needle)                                                                  \
  ck_assert_msg(strstr(ds_errmsg(), (needle)) != NULL, "message \"%s\" lacks \"%s\"", ds_errmsg(), \
                (needle))

/* ------------------------------------------------------------------ header example */

/* The worked example at the top of ds.h, as written there. */
START_TEST(test_header_example) {
  ds_dataset *train = NULL;
  if (ds_mnist_load(&train, NULL, "train", NULL) != AD_OK) {
    fprintf(stderr, "%s\n", ds_errmsg());
    ck_abort_msg("ds_mnist_load failed: %s", ds_errmsg());
  }
  ds_iter *it = NULL;
  ds_iter_new(&it, train->x, train->labels, NULL, &(ds_iter_opts){.batch = 128, .seed = 1});
  ad_tensor *xb = NULL;
  ad_tensor_new(&xb, AD_F32, 2, (int64_t[]){128, 784});
  int32_t yb[128];
  ds_batch b;
  int64_t batches = 0;
  do {
    ds_iter_next(it, xb, yb, NULL, &b);
    batches++;
  } while (!b.epoch_end);
  ck_assert_int_eq(batches, 8000 / 128);
  ds_iter_free(it);
  ad_tensor_free(xb);
  ds_dataset_free(train);
}
END_TEST

/* ------------------------------------------------------------------ embedded MNIST */

/* Per-class counts of the embedded split (see datasets/mnist/README.md). */
static const int64_t train_hist[10] = {793, 889, 800, 822, 798, 704, 795, 853, 765, 781};
static const int64_t test_hist[10] = {208, 238, 191, 210, 182, 159, 219, 217, 179, 197};

static void check_embedded(const char *split, int64_t n, const int64_t *hist) {
  ds_dataset *d = NULL;
  ck_assert_msg(ds_mnist_load(&d, NULL, split, NULL) == AD_OK, "%s", ds_errmsg());
  ck_assert_str_eq(ds_errmsg(), "");
  ck_assert_int_eq(d->n, n);
  ck_assert_int_eq(d->dim, 784);
  ck_assert_int_eq(d->rows, 28);
  ck_assert_int_eq(d->cols, 28);
  ck_assert_int_eq(d->n_classes, 10);
  ck_assert_int_eq(d->x->dtype, AD_F32);
  ck_assert_int_eq(d->x->ndim, 2);
  ck_assert_int_eq(d->x->shape[0], n);
  ck_assert_int_eq(d->x->shape[1], 784);
  int64_t h[10] = {0}, bad = 0;
  for (int64_t i = 0; i < n; i++) {
    if (d->labels[i] >= 0 && d->labels[i] < 10)
      h[d->labels[i]]++;
    else
      bad++;
  }
  ck_assert_int_eq(bad, 0);
  for (int c = 0; c < 10; c++) ck_assert_int_eq(h[c], hist[c]);
  const float *x = d->x->data;
  double sum = 0, lo = 1, hi = 0;
  int64_t zeros = 0, off_grid = 0;
  /* Check's asserts are slow (one message each), so loops count and the
   * count is asserted once. */
  for (int64_t i = 0; i < n * 784; i++) {
    sum += x[i];
    if (x[i] < lo) lo = x[i];
    if (x[i] > hi) hi = x[i];
    zeros += x[i] == 0.0f;
    double k = x[i] * 255.0; /* every pixel is k/255 for an integer k */
    off_grid += fabs(k - round(k)) > 1e-3;
  }
  ck_assert_int_eq(off_grid, 0);
  ck_assert_double_eq(lo, 0.0);
  ck_assert_double_eq(hi, 1.0);
  /* MNIST's mean pixel is 0.1307 and about 81% of pixels are 0. */
  ck_assert_double_eq_tol(sum / (double)(n * 784), 0.1307, 0.01);
  ck_assert_double_eq_tol((double)zeros / (double)(n * 784), 0.81, 0.03);
  ds_dataset_free(d);
}

START_TEST(test_mnist_embedded_train) {
  check_embedded("train", 8000, train_hist);
}
END_TEST

START_TEST(test_mnist_embedded_test) {
  check_embedded("test", 2000, test_hist);
  ds_dataset *d = NULL;
  ck_assert_int_eq(ds_mnist_load(&d, NULL, "t10k", NULL), AD_OK); /* alias */
  ck_assert_int_eq(d->n, 2000);
  ds_dataset_free(d);
}
END_TEST

START_TEST(test_mnist_f64_limit) {
  ds_dataset *a = NULL, *b = NULL;
  ck_assert_int_eq(ds_mnist_load(&a, NULL, "train", NULL), AD_OK);
  ck_assert_int_eq(
      ds_mnist_load(&b, NULL, "train", &(ds_mnist_opts){.dtype = AD_F64, .limit = 100}), AD_OK);
  ck_assert_int_eq(b->n, 100);
  ck_assert_int_eq(b->x->dtype, AD_F64);
  ck_assert_int_eq(b->x->shape[0], 100);
  const float *xa = a->x->data;
  const double *xb = b->x->data;
  double worst = 0;
  for (int64_t i = 0; i < 100 * 784; i++) worst = fmax(worst, fabs(xa[i] - xb[i]));
  ck_assert_double_le(worst, 1e-7);
  for (int64_t i = 0; i < 100; i++) ck_assert_int_eq(a->labels[i], b->labels[i]);
  /* The first training image is a 1 (see the split in the README). */
  ck_assert_int_eq(a->labels[0], 1);
  ds_dataset_free(a);
  ds_dataset_free(b);
}
END_TEST

START_TEST(test_mnist_default_dir) {
  unsetenv("HYPERTAPE_DATA");
  const char *d = ds_default_mnist_dir();
  ck_assert_ptr_nonnull(strstr(d, "datasets/mnist"));
  ck_assert_msg(d[0] == '/', "default dir %s is not absolute", d);
  setenv("HYPERTAPE_DATA", "/somewhere/else", 1);
  ck_assert_str_eq(ds_default_mnist_dir(), "/somewhere/else");
  ds_dataset *x = NULL;
  ck_assert_int_eq(ds_mnist_load(&x, NULL, "train", NULL), AD_ERR_IO);
  ck_assert_msg_has("/somewhere/else");
  setenv("HYPERTAPE_DATA", "", 1); /* empty = unset */
  ck_assert_str_eq(ds_default_mnist_dir(), d);
}
END_TEST

/* A small MNIST-format directory with the standard names (one plain, one
 * gzipped, and the dotted spelling for the test split). */
static void write_small_mnist(int n_img, int n_lab, uint8_t bad_label) {
  uint8_t img[5 * 2 * 3], lab[5];
  for (int i = 0; i < 30; i++) img[i] = (uint8_t)(i * 8);
  for (int i = 0; i < 5; i++) lab[i] = (uint8_t)(i * 2);
  if (bad_label) lab[2] = bad_label;
  ck_assert_int_eq(ds_idx_write(tpath("train-images-idx3-ubyte"), DS_IDX_U8, 3,
                                (int64_t[]){n_img, 2, 3}, img, 0),
                   AD_OK);
  ck_assert_int_eq(
      ds_idx_write(tpath("train-labels-idx1-ubyte.gz"), DS_IDX_U8, 1, (int64_t[]){n_lab}, lab, 1),
      AD_OK);
  ck_assert_int_eq(
      ds_idx_write(tpath("t10k-images.idx3-ubyte"), DS_IDX_U8, 3, (int64_t[]){n_img, 2, 3}, img, 0),
      AD_OK);
  ck_assert_int_eq(
      ds_idx_write(tpath("t10k-labels.idx1-ubyte"), DS_IDX_U8, 1, (int64_t[]){n_lab}, lab, 0),
      AD_OK);
}

START_TEST(test_mnist_standard_names) {
  write_small_mnist(5, 5, 0);
  for (int s = 0; s < 2; s++) {
    ds_dataset *d = NULL;
    ck_assert_msg(ds_mnist_load(&d, tmpdir, s ? "test" : "train", NULL) == AD_OK, "%s",
                  ds_errmsg());
    ck_assert_int_eq(d->n, 5);
    ck_assert_int_eq(d->rows, 2);
    ck_assert_int_eq(d->cols, 3);
    ck_assert_int_eq(d->dim, 6);
    for (int i = 0; i < 30; i++)
      ck_assert_float_eq(((float *)d->x->data)[i], (float)(i * 8) / 255.0f);
    for (int i = 0; i < 5; i++) ck_assert_int_eq(d->labels[i], i * 2);
    ds_dataset_free(d);
  }
}
END_TEST

START_TEST(test_mnist_bad_dirs) {
  ds_dataset *d = (ds_dataset *)&d; /* must be set to NULL on failure */
  ck_assert_int_eq(ds_mnist_load(&d, tmpdir, "train", NULL), AD_ERR_IO);
  ck_assert_ptr_null(d);
  ck_assert_msg_has("train-images-idx3-ubyte.gz");
  ck_assert_msg_has("tried");
  ck_assert_int_eq(ds_mnist_load(&d, NULL, "validation", NULL), AD_ERR_ARG);
  ck_assert_msg_has("validation");
  ck_assert_int_eq(ds_mnist_load(&d, NULL, "train", &(ds_mnist_opts){.limit = -1}), AD_ERR_ARG);
  ck_assert_int_eq(ds_mnist_load(NULL, NULL, "train", NULL), AD_ERR_NULL);

  write_small_mnist(5, 4, 0);
  ck_assert_int_eq(ds_mnist_load(&d, tmpdir, "train", NULL), AD_ERR_FORMAT);
  ck_assert_ptr_null(d);
  ck_assert_msg_has("5 images");
  ck_assert_msg_has("4 labels");

  write_small_mnist(5, 5, 10);
  ck_assert_int_eq(ds_mnist_load(&d, tmpdir, "train", NULL), AD_ERR_FORMAT);
  ck_assert_msg_has("label 2 is 10");

  /* a labels file where images belong */
  uint8_t lab[5] = {0};
  ds_idx_write(tpath("train-images-idx3-ubyte"), DS_IDX_U8, 1, (int64_t[]){5}, lab, 0);
  ck_assert_int_eq(ds_mnist_load(&d, tmpdir, "train", NULL), AD_ERR_FORMAT);
  ck_assert_msg_has("expected u8 images");
}
END_TEST

START_TEST(test_dataset_slice) {
  ds_dataset *d = NULL, *v = NULL;
  ck_assert_int_eq(ds_mnist_load(&d, NULL, "test", NULL), AD_OK);
  ck_assert_int_eq(ds_dataset_slice(&v, d, 1500, 500), AD_OK);
  ck_assert_int_eq(v->n, 500);
  ck_assert_int_eq(v->x->shape[0], 500);
  ck_assert_int_eq(v->rows, 28);
  for (int64_t i = 0; i < 500; i++) ck_assert_int_eq(v->labels[i], d->labels[1500 + i]);
  ck_assert(memcmp(v->x->data, (float *)d->x->data + 1500 * 784, 500 * 784 * sizeof(float)) == 0);
  ds_dataset_free(v);
  v = (ds_dataset *)&v;
  ck_assert_int_eq(ds_dataset_slice(&v, d, 1600, 500), AD_ERR_ARG);
  ck_assert_ptr_null(v);
  ds_dataset_free(d);
  ds_dataset_free(NULL);
}
END_TEST

/* ------------------------------------------------------------------ IDX */

START_TEST(test_idx_roundtrip) {
  static const ds_idx_type types[] = {DS_IDX_U8,  DS_IDX_I8,  DS_IDX_I16,
                                      DS_IDX_I32, DS_IDX_F32, DS_IDX_F64};
  int64_t dims[3] = {3, 4, 5};
  for (int gz = 0; gz < 2; gz++)
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
      unsigned char data[60 * 8];
      size_t es = ds_idx_type_size(types[t]);
      for (int i = 0; i < 60; i++) {
        double v = (i - 30) * 1001.25 + 0.5; /* negative, fractional, multi-byte */
        if (types[t] == DS_IDX_U8)
          data[i] = (uint8_t)(i * 4);
        else if (types[t] == DS_IDX_I8)
          ((int8_t *)data)[i] = (int8_t)(i - 30);
        else if (types[t] == DS_IDX_I16)
          ((int16_t *)data)[i] = (int16_t)(i * 1000 - 30000);
        else if (types[t] == DS_IDX_I32)
          ((int32_t *)data)[i] = (int32_t)((int64_t)i * 70000000 - 2000000000);
        else if (types[t] == DS_IDX_F32)
          ((float *)data)[i] = (float)v;
        else
          ((double *)data)[i] = v / 3.0;
      }
      ck_assert_int_eq(ds_idx_write(tpath("a.idx"), types[t], 3, dims, data, gz), AD_OK);
      size_t n;
      unsigned char *raw = read_bytes(tpath("a.idx"), &n);
      ck_assert_int_eq(raw[0] == 0x1f && raw[1] == 0x8b, gz);
      if (!gz) {
        ck_assert_uint_eq(n, 16 + 60 * es);
        ck_assert_int_eq(raw[2], types[t]);
        ck_assert_int_eq(raw[3], 3);
        ck_assert_int_eq(raw[7], 3); /* dims big-endian */
        ck_assert_int_eq(raw[15], 5);
      }
      free(raw);
      ds_idx *a = NULL;
      ck_assert_msg(ds_idx_read(&a, tpath("a.idx")) == AD_OK, "%s", ds_errmsg());
      ck_assert_int_eq(a->type, types[t]);
      ck_assert_int_eq(a->ndim, 3);
      ck_assert_int_eq(a->dims[0], 3);
      ck_assert_int_eq(a->dims[1], 4);
      ck_assert_int_eq(a->dims[2], 5);
      ck_assert_int_eq(a->dims[3], 1);
      ck_assert_int_eq(a->count, 60);
      ck_assert_msg(memcmp(a->data, data, 60 * es) == 0, "type %s gzip %d differs",
                    ds_idx_type_name(types[t]), gz);
      ds_idx_free(a);
    }
  ds_idx_free(NULL);
}
END_TEST

START_TEST(test_idx_big_endian_layout) {
  int32_t v = 0x01020304;
  ck_assert_int_eq(ds_idx_write(tpath("a.idx"), DS_IDX_I32, 1, (int64_t[]){1}, &v, 0), AD_OK);
  size_t n;
  unsigned char *raw = read_bytes(tpath("a.idx"), &n);
  const unsigned char want[] = {0, 0, 0x0c, 1, 0, 0, 0, 1, 1, 2, 3, 4};
  ck_assert_uint_eq(n, sizeof want);
  ck_assert(memcmp(raw, want, n) == 0);
  free(raw);
}
END_TEST

START_TEST(test_idx_gzip_reproducible) {
  uint8_t d[1000];
  for (int i = 0; i < 1000; i++) d[i] = (uint8_t)(i % 7);
  ck_assert_int_eq(ds_idx_write(tpath("a.idx"), DS_IDX_U8, 1, (int64_t[]){1000}, d, 1), AD_OK);
  ck_assert_int_eq(ds_idx_write(tpath("b.idx"), DS_IDX_U8, 1, (int64_t[]){1000}, d, 1), AD_OK);
  size_t na, nb;
  unsigned char *a = read_bytes(tpath("a.idx"), &na), *b = read_bytes(tpath("b.idx"), &nb);
  ck_assert_uint_eq(na, nb);
  ck_assert(memcmp(a, b, na) == 0);
  ck_assert(na < 200); /* it did compress */
  free(a);
  free(b);
}
END_TEST

/* A valid 2 x 3 u8 file: 8 + 4 header bytes and 6 data bytes. */
static const unsigned char good_idx[] = {0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6};

static ad_status read_raw(const unsigned char *b, size_t n) {
  write_bytes(tpath("c.idx"), b, n);
  ds_idx *a = (ds_idx *)&a;
  ad_status s = ds_idx_read(&a, tpath("c.idx"));
  if (s != AD_OK) ck_assert_ptr_null(a);
  ds_idx_free(a);
  if (s != AD_OK) ck_assert_msg_has(tpath("c.idx")); /* the message names the file */
  return s;
}

START_TEST(test_idx_rejects_truncated) {
  ck_assert_int_eq(read_raw(good_idx, sizeof good_idx), AD_OK);
  ck_assert_str_eq(ds_errmsg(), "");
  ck_assert_int_eq(read_raw(good_idx, sizeof good_idx - 2), AD_ERR_FORMAT);
  ck_assert_msg_has("truncated IDX data");
  ck_assert_msg_has("2 x 3 u8 = 6 bytes, found 4");
  ck_assert_int_eq(read_raw(good_idx, 10), AD_ERR_FORMAT);
  ck_assert_msg_has("truncated IDX header");
  ck_assert_msg_has("2 dims (8 bytes), found 6");
  ck_assert_int_eq(read_raw(good_idx, 3), AD_ERR_FORMAT);
  ck_assert_msg_has("too short");
  ck_assert_int_eq(read_raw(good_idx, 0), AD_ERR_FORMAT);
}
END_TEST

START_TEST(test_idx_rejects_wrong_magic) {
  unsigned char b[sizeof good_idx];
  memcpy(b, good_idx, sizeof b);
  b[0] = 1; /* nonzero leading byte */
  ck_assert_int_eq(read_raw(b, sizeof b), AD_ERR_FORMAT);
  ck_assert_msg_has("bad IDX magic 0x01000802");
  memcpy(b, good_idx, sizeof b);
  b[2] = 0x0A; /* no such type */
  ck_assert_int_eq(read_raw(b, sizeof b), AD_ERR_FORMAT);
  ck_assert_msg_has("bad IDX magic 0x00000a02");
  /* A text file is not IDX either. */
  ck_assert_int_eq(read_raw((const unsigned char *)"hello world\n", 12), AD_ERR_FORMAT);
  ck_assert_msg_has("bad IDX magic 0x68656c6c");
}
END_TEST

START_TEST(test_idx_rejects_wrong_dims) {
  unsigned char b[sizeof good_idx];
  memcpy(b, good_idx, sizeof b);
  b[3] = 0; /* zero dims */
  ck_assert_int_eq(read_raw(b, sizeof b), AD_ERR_FORMAT);
  ck_assert_msg_has("bad IDX magic 0x00000800");
  memcpy(b, good_idx, sizeof b);
  b[3] = 3; /* says 3 dims: the third "dim" is the data 01020304, far too big */
  ck_assert_int_eq(read_raw(b, sizeof b), AD_ERR_FORMAT);
  ck_assert_msg_has("truncated IDX data");
  ck_assert_msg_has("2 x 3 x 16909060 u8");
  memcpy(b, good_idx, sizeof b);
  b[11] = 0; /* a zero dimension */
  ck_assert_int_eq(read_raw(b, sizeof b), AD_ERR_FORMAT);
  ck_assert_msg_has("dimension 1 is 0");
  memcpy(b, good_idx, sizeof b);
  b[11] = 2; /* 2 x 2: the data is 2 bytes too long */
  ck_assert_int_eq(read_raw(b, sizeof b), AD_ERR_FORMAT);
  ck_assert_msg_has("2 bytes of trailing data");
  /* huge dims must fail as truncated, not try to allocate 64 GiB */
  unsigned char huge[] = {0, 0, 0x0e, 2, 0, 0, 0, 2, 0xff, 0xff, 0xff, 0xff, 0};
  ck_assert_int_eq(read_raw(huge, sizeof huge), AD_ERR_FORMAT);
  ck_assert_msg_has("truncated IDX data");
  ck_assert_msg_has("2 x 4294967295 f64 = 68719476720 bytes, found 1");
  huge[4] = 0xff; /* 4294967295^2 f64 elements: the byte count overflows */
  ck_assert_int_eq(read_raw(huge, sizeof huge), AD_ERR_FORMAT);
  ck_assert_msg_has("overflow");
}
END_TEST

START_TEST(test_idx_rejects_trailing_garbage) {
  unsigned char b[sizeof good_idx + 7];
  memcpy(b, good_idx, sizeof good_idx);
  memcpy(b + sizeof good_idx, "garbage", 7);
  ck_assert_int_eq(read_raw(b, sizeof b), AD_ERR_FORMAT);
  ck_assert_msg_has("7 bytes of trailing data");
  ck_assert_msg_has("end after 18 bytes");
  /* the same inside a gzip stream */
  gzFile g = gzopen(tpath("c.idx"), "wb");
  ck_assert_ptr_nonnull(g);
  ck_assert_int_eq(gzwrite(g, b, sizeof b), (int)sizeof b);
  gzclose(g);
  ds_idx *a = NULL;
  ck_assert_int_eq(ds_idx_read(&a, tpath("c.idx")), AD_ERR_FORMAT);
  ck_assert_msg_has("7 bytes of trailing data");
}
END_TEST

START_TEST(test_idx_rejects_truncated_gzip) {
  uint8_t d[4096];
  ad_rng r;
  ad_rng_seed(&r, 3);
  for (int i = 0; i < 4096; i++) d[i] = (uint8_t)ad_rng_below(&r, 256); /* incompressible */
  ck_assert_int_eq(ds_idx_write(tpath("a.idx"), DS_IDX_U8, 1, (int64_t[]){4096}, d, 1), AD_OK);
  size_t n;
  unsigned char *raw = read_bytes(tpath("a.idx"), &n);
  ck_assert_int_eq(read_raw(raw, n), AD_OK);
  ck_assert_int_eq(read_raw(raw, n / 2), AD_ERR_FORMAT);
  ck_assert_msg_has("gzip");
  ck_assert_int_eq(read_raw(raw, n - 4), AD_ERR_FORMAT); /* only the trailer cut */
  ck_assert_msg_has("gzip");
  raw[n / 2] ^= 0xff; /* corrupt the middle of the stream */
  ck_assert_int_eq(read_raw(raw, n), AD_ERR_FORMAT);
  free(raw);
}
END_TEST

START_TEST(test_idx_io_errors) {
  ds_idx *a = (ds_idx *)&a;
  ck_assert_int_eq(ds_idx_read(&a, "/nonexistent/x.idx"), AD_ERR_IO);
  ck_assert_ptr_null(a);
  ck_assert_msg_has("/nonexistent/x.idx");
  ck_assert_int_eq(ds_idx_read(&a, NULL), AD_ERR_NULL);
  uint8_t d = 0;
  ck_assert_int_eq(ds_idx_write("/nonexistent/x.idx", DS_IDX_U8, 1, (int64_t[]){1}, &d, 0),
                   AD_ERR_IO);
  ck_assert_int_eq(ds_idx_write(tpath("a.idx"), (ds_idx_type)0x0A, 1, (int64_t[]){1}, &d, 0),
                   AD_ERR_ARG);
  ck_assert_int_eq(ds_idx_write(tpath("a.idx"), DS_IDX_U8, 0, (int64_t[]){1}, &d, 0), AD_ERR_ARG);
  ck_assert_int_eq(ds_idx_write(tpath("a.idx"), DS_IDX_U8, 1, (int64_t[]){0}, &d, 0), AD_ERR_ARG);
}
END_TEST

/* Sizes that overflow (issue 9): dims {4e9, 4e9, 4e9} are each a valid IDX
 * dim but their product wraps an int64; the write is AD_ERR_ARG naming the
 * dims before any byte is read from data or written (it segfaulted), and
 * no file appears. On reading, three 0xffffffff u8 dims overflow too. */
START_TEST(test_idx_sizes_overflow) {
  uint8_t d = 7;
  const int64_t big = 4000000000LL;
  ck_assert_int_eq(ds_idx_write(tpath("a.idx"), DS_IDX_U8, 3, (int64_t[]){big, big, big}, &d, 0),
                   AD_ERR_ARG);
  ck_assert_msg_has("ds_idx_write");
  ck_assert_msg_has("4000000000 x 4000000000 x 4000000000");
  ck_assert_msg_has("overflow");
  ck_assert_int_eq(access(tpath("a.idx"), F_OK), -1);
  ck_assert_int_eq(ds_idx_write(tpath("a.idx"), DS_IDX_F64, 2, (int64_t[]){big, big}, &d, 1),
                   AD_ERR_ARG); /* 1.28e20 bytes: the byte count overflows, not the count */
  ck_assert_msg_has("overflow");
  unsigned char h[] = {0,    0,    8,    3,    0xff, 0xff, 0xff, 0xff, 0xff,
                       0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0};
  ck_assert_int_eq(read_raw(h, sizeof h), AD_ERR_FORMAT);
  ck_assert_msg_has("overflow");
}
END_TEST

/* ds_idx_write over an existing file that fails midway (issue 9): the
 * failure is injected with RLIMIT_FSIZE (8 KiB; SIGXFSZ ignored, so the
 * write returns EFBIG), a real short write at any data size beyond the
 * limit. Plain and gzip: AD_ERR_IO, the old file byte-identical, no
 * temporary left (one entry in the directory); then with the limit lifted
 * the same write replaces the file and reads back. */
START_TEST(test_idx_write_atomic) {
  enum { N = 100000 };
  uint8_t *big = malloc(N);
  ad_rng r;
  ad_rng_seed(&r, 5);
  for (int i = 0; i < N; i++) big[i] = (uint8_t)ad_rng_below(&r, 256); /* incompressible */
  ck_assert_int_eq(ds_idx_write(tpath("a.idx"), DS_IDX_U8, 2, (int64_t[]){2, 3}, good_idx + 12, 0),
                   AD_OK);
  size_t n0;
  unsigned char *before = read_bytes(tpath("a.idx"), &n0);
  ck_assert_uint_eq(n0, sizeof good_idx);
  ck_assert(memcmp(before, good_idx, n0) == 0);
  struct rlimit old, lim;
  ck_assert_int_eq(getrlimit(RLIMIT_FSIZE, &old), 0);
  lim = old;
  lim.rlim_cur = 8192;
  signal(SIGXFSZ, SIG_IGN);
  for (int gz = 0; gz < 2; gz++) {
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &lim), 0);
    ck_assert_int_eq(ds_idx_write(tpath("a.idx"), DS_IDX_U8, 1, (int64_t[]){N}, big, gz),
                     AD_ERR_IO);
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &old), 0);
    ck_assert_msg_has("ds_idx_write");
    ck_assert_msg_has("unchanged");
    size_t n1;
    unsigned char *after = read_bytes(tpath("a.idx"), &n1);
    ck_assert_uint_eq(n1, n0);
    ck_assert(memcmp(after, before, n0) == 0);
    free(after);
    ck_assert_int_eq(gc_dir_entries(tmpdir), 1);
  }
  for (int gz = 0; gz < 2; gz++) {
    ck_assert_int_eq(ds_idx_write(tpath("a.idx"), DS_IDX_U8, 1, (int64_t[]){N}, big, gz), AD_OK);
    ck_assert_int_eq(gc_dir_entries(tmpdir), 1);
    ds_idx *a = NULL;
    ck_assert_int_eq(ds_idx_read(&a, tpath("a.idx")), AD_OK);
    ck_assert_int_eq(a->count, N);
    ck_assert(memcmp(a->data, big, N) == 0);
    ds_idx_free(a);
  }
  /* a directory that does not exist: no temporary can be made */
  ck_assert_int_eq(ds_idx_write("/nonexistent/x.idx", DS_IDX_U8, 1, (int64_t[]){1}, big, 0),
                   AD_ERR_IO);
  ck_assert_msg_has("temporary");
  free(before);
  free(big);
}
END_TEST

/* gzip: bytes after the stream are a format error like bytes after a plain
 * file's data (zlib's gzread ignored them): one extra byte, a word of
 * garbage, a run of zeros. Two members (gzip's concatenation) are one
 * stream and read fine. */
START_TEST(test_idx_gzip_trailing_garbage) {
  ck_assert_int_eq(ds_idx_write(tpath("a.idx"), DS_IDX_U8, 2, (int64_t[]){2, 3}, good_idx + 12, 1),
                   AD_OK);
  size_t n;
  unsigned char *gz = read_bytes(tpath("a.idx"), &n);
  ck_assert_int_eq(read_raw(gz, n), AD_OK);
  unsigned char *b = malloc(n + 16);
  memcpy(b, gz, n);
  b[n] = 'x';
  ck_assert_int_eq(read_raw(b, n + 1), AD_ERR_FORMAT);
  ck_assert_msg_has("1 bytes of trailing garbage after the gzip stream");
  memcpy(b + n, "garbage", 7);
  ck_assert_int_eq(read_raw(b, n + 7), AD_ERR_FORMAT);
  ck_assert_msg_has("7 bytes of trailing garbage");
  memset(b + n, 0, 16);
  ck_assert_int_eq(read_raw(b, n + 16), AD_ERR_FORMAT);
  ck_assert_msg_has("16 bytes of trailing garbage");
  /* The input the gzip fuzz target flagged (its harness cut the stream's
   * 2 last trailer bytes and appended 2 zero bytes: a valid stream after
   * all, so it was the harness that was wrong). As meant, the whole member
   * of an i32 [2] IDX followed by two zero bytes must be rejected. */
  static const unsigned char i32x2[16] = {0,    0,    0x0c, 1, 0,    0,    0, 2,
                                          0x3f, 0xc0, 0,    0, 0xbe, 0x80, 0, 0};
  gzFile gi = gzopen(tpath("a.idx"), "wb6");
  ck_assert_int_eq(gzwrite(gi, i32x2, 16), 16);
  gzclose(gi);
  size_t ni;
  unsigned char *mi = read_bytes(tpath("a.idx"), &ni);
  ck_assert_int_eq(read_raw(mi, ni), AD_OK);
  mi = realloc(mi, ni + 2);
  mi[ni] = mi[ni + 1] = 0;
  ck_assert_int_eq(read_raw(mi, ni + 2), AD_ERR_FORMAT);
  ck_assert_msg_has("2 bytes of trailing garbage");
  free(mi);
  /* a plain file with one extra byte, for comparison */
  unsigned char p[sizeof good_idx + 1];
  memcpy(p, good_idx, sizeof good_idx);
  p[sizeof good_idx] = 'x';
  ck_assert_int_eq(read_raw(p, sizeof p), AD_ERR_FORMAT);
  ck_assert_msg_has("1 bytes of trailing data");
  /* two members: the header in one, the data in the next */
  gzFile g = gzopen(tpath("a.idx"), "wb");
  ck_assert_int_eq(gzwrite(g, good_idx, 12), 12);
  gzclose(g);
  unsigned char *m1 = read_bytes(tpath("a.idx"), &n);
  g = gzopen(tpath("a.idx"), "wb");
  ck_assert_int_eq(gzwrite(g, good_idx + 12, 6), 6);
  gzclose(g);
  size_t n2;
  unsigned char *m2 = read_bytes(tpath("a.idx"), &n2);
  unsigned char *both = malloc(n + n2);
  memcpy(both, m1, n);
  memcpy(both + n, m2, n2);
  write_bytes(tpath("c.idx"), both, n + n2);
  ds_idx *a = NULL;
  ck_assert_msg(ds_idx_read(&a, tpath("c.idx")) == AD_OK, "%s", ds_errmsg());
  ck_assert_int_eq(a->count, 6);
  ck_assert(memcmp(a->data, good_idx + 12, 6) == 0);
  ds_idx_free(a);
  free(both);
  free(m1);
  free(m2);
  free(b);
  free(gz);
}
END_TEST

/* ------------------------------------------------------------------ CSV */

static ad_status csv(const char *text, const ds_csv_opts *o, ad_tensor **t) {
  *t = (ad_tensor *)t;
  ad_status s = ds_csv_parse(t, text, strlen(text), "t.csv", o);
  if (s != AD_OK) ck_assert_ptr_null(*t);
  return s;
}

START_TEST(test_csv_good) {
  ad_tensor *t;
  ck_assert_int_eq(csv("a,b,c\n1,2,3\n4.5,-6e2, 7 \n", NULL, &t), AD_OK);
  ck_assert_int_eq(t->dtype, AD_F32);
  ck_assert_int_eq(t->shape[0], 2);
  ck_assert_int_eq(t->shape[1], 3);
  const float *v = t->data;
  const float want[] = {1, 2, 3, 4.5f, -600, 7};
  for (int i = 0; i < 6; i++) ck_assert_float_eq(v[i], want[i]);
  ad_tensor_free(t);

  /* no header, CRLF, blank lines, quotes, f64 */
  ck_assert_int_eq(
      csv("\r\n0.1,\"2\"\r\n\r\n  \n3,1e-300\r\n", &(ds_csv_opts){.dtype = AD_F64}, &t), AD_OK);
  ck_assert_int_eq(t->shape[0], 2);
  ck_assert_int_eq(t->shape[1], 2);
  ck_assert_double_eq(((double *)t->data)[0], 0.1);
  ck_assert_double_eq(((double *)t->data)[1], 2.0);
  ck_assert_double_eq(((double *)t->data)[3], 1e-300);
  ad_tensor_free(t);

  /* quoted header with a comma in a name; tabs as delimiter */
  ck_assert_int_eq(csv("\"x, cm\",y\n1,2\n", NULL, &t), AD_OK);
  ck_assert_int_eq(t->shape[1], 2);
  ad_tensor_free(t);
  ck_assert_int_eq(csv("x\ty\n1\t2\n3\t4", &(ds_csv_opts){.delim = '\t'}, &t), AD_OK);
  ck_assert_int_eq(t->shape[0], 2);
  ck_assert_float_eq(((float *)t->data)[3], 4);
  ad_tensor_free(t);

  /* header = 1 skips a numeric first row; a single column works */
  ck_assert_int_eq(csv("10\n20\n30\n", &(ds_csv_opts){.header = 1}, &t), AD_OK);
  ck_assert_int_eq(t->shape[0], 2);
  ck_assert_int_eq(t->shape[1], 1);
  ck_assert_float_eq(((float *)t->data)[0], 20);
  ad_tensor_free(t);
}
END_TEST

START_TEST(test_csv_bad) {
  ad_tensor *t;
  ck_assert_int_eq(csv("1,2\n3,x\n", NULL, &t), AD_ERR_FORMAT);
  ck_assert_msg_has("t.csv:2:2: field \"x\" is not a number");
  ck_assert_int_eq(csv("a,b\n1,2\n3\n", NULL, &t), AD_ERR_FORMAT);
  ck_assert_msg_has("t.csv:3: 1 fields, expected 2");
  ck_assert_int_eq(csv("a,b\n1,2,3\n", NULL, &t), AD_ERR_FORMAT);
  ck_assert_msg_has("t.csv:2: 3 fields, expected 2 (as on line 1)");
  ck_assert_int_eq(csv("1,2,\n", NULL, &t), AD_ERR_FORMAT);
  ck_assert_msg_has("t.csv:1:3: field \"\" is not a number");
  ck_assert_int_eq(csv("1,2\n3,,4\n", NULL, &t), AD_ERR_FORMAT);
  ck_assert_msg_has("t.csv:2:2:");
  /* a typo in the first row is data with a bad field, not a header */
  ck_assert_int_eq(csv("1,2o\n3,4\n", NULL, &t), AD_ERR_FORMAT);
  ck_assert_msg_has("t.csv:1:2: field \"2o\"");
  /* header = -1: a text first row is an error */
  ck_assert_int_eq(csv("a,b\n1,2\n", &(ds_csv_opts){.header = -1}, &t), AD_ERR_FORMAT);
  ck_assert_msg_has("t.csv:1:1: field \"a\"");
  ck_assert_int_eq(csv("a,b\n", NULL, &t), AD_ERR_FORMAT);
  ck_assert_msg_has("no data rows");
  ck_assert_int_eq(csv("", NULL, &t), AD_ERR_FORMAT);
  ck_assert_int_eq(csv("1,\"2\n", NULL, &t), AD_ERR_FORMAT);
  ck_assert_msg_has("unclosed quote");
  ck_assert_int_eq(csv("1e39\n", NULL, &t), AD_ERR_FORMAT);
  ck_assert_msg_has("out of f32 range");
  ck_assert_int_eq(csv("1e999\n", &(ds_csv_opts){.dtype = AD_F64}, &t), AD_ERR_FORMAT);
  ck_assert_msg_has("out of f64 range");
  ck_assert_int_eq(csv("1\n", &(ds_csv_opts){.header = 2}, &t), AD_ERR_ARG);
}
END_TEST

/* An embedded NUL is a format error naming the line and column (strtod
 * stopped at it, so "3\0" + "99" read as 3): in a field, at a line's end,
 * in a header, and through ds_csv_read. */
START_TEST(test_csv_nul) {
  static const char a[] = "1,2\n3,4\00099\n";
  ad_tensor *t = (ad_tensor *)&t;
  ck_assert_int_eq(ds_csv_parse(&t, a, sizeof a - 1, "t.csv", NULL), AD_ERR_FORMAT);
  ck_assert_ptr_null(t);
  ck_assert_msg_has("t.csv:2: NUL byte at column 4");
  static const char b[] = "1,2\n3,4\0\n";
  ck_assert_int_eq(ds_csv_parse(&t, b, sizeof b - 1, "t.csv", NULL), AD_ERR_FORMAT);
  ck_assert_msg_has("t.csv:2: NUL byte");
  static const char c[] = "x\0,y\n1,2\n";
  ck_assert_int_eq(ds_csv_parse(&t, c, sizeof c - 1, "t.csv", NULL), AD_ERR_FORMAT);
  ck_assert_msg_has("t.csv:1: NUL byte at column 2");
  write_bytes(tpath("a.csv"), a, sizeof a - 1);
  ck_assert_int_eq(ds_csv_read(&t, tpath("a.csv"), NULL), AD_ERR_FORMAT);
  ck_assert_msg_has("NUL byte");
  /* the same text without the NUL is fine */
  ck_assert_int_eq(ds_csv_parse(&t, a, 7, "t.csv", NULL), AD_OK);
  ck_assert_int_eq(t->shape[0], 2);
  ad_tensor_free(t);
}
END_TEST

START_TEST(test_csv_file) {
  const char *text = "w,x,y\n1,2,3\n4,5,6\n";
  write_bytes(tpath("a.csv"), text, strlen(text));
  ad_tensor *t = NULL;
  ck_assert_msg(ds_csv_read(&t, tpath("a.csv"), NULL) == AD_OK, "%s", ds_errmsg());
  ck_assert_int_eq(t->shape[0], 2);
  ck_assert_float_eq(((float *)t->data)[5], 6);
  ad_tensor_free(t);
  ck_assert_int_eq(ds_csv_read(&t, tpath("missing.csv"), NULL), AD_ERR_IO);
  ck_assert_ptr_null(t);
  ck_assert_msg_has("missing.csv");
  write_bytes(tpath("a.csv"), "1,2\n3,?\n", 8);
  ck_assert_int_eq(ds_csv_read(&t, tpath("a.csv"), NULL), AD_ERR_FORMAT);
  ck_assert_msg_has("a.csv:2:2:");
}
END_TEST

/* ------------------------------------------------------------------ synthetic */

START_TEST(test_sine_tasks) {
  ad_rng r, r2;
  ad_rng_seed(&r, 42);
  ad_rng_seed(&r2, 42);
  double amp_sum = 0, ph_sum = 0;
  const int T = 4000;
  for (int i = 0; i < T; i++) {
    ds_sine_task t, t2;
    ck_assert_int_eq(ds_sine_task_sample(&t, &r), AD_OK);
    ds_sine_task_sample(&t2, &r2);
    ck_assert_double_eq(t.amplitude, t2.amplitude);
    ck_assert(t.amplitude >= 0.1 && t.amplitude <= 5.0);
    ck_assert(t.phase >= 0 && t.phase <= PI);
    amp_sum += t.amplitude;
    ph_sum += t.phase;
  }
  /* means of U[0.1, 5] and U[0, pi]: 2.55 and 1.571; std of the mean ~0.022, ~0.014 */
  ck_assert_double_eq_tol(amp_sum / T, 2.55, 0.1);
  ck_assert_double_eq_tol(ph_sum / T, PI / 2, 0.07);

  ds_sine_task task = {.amplitude = 2.0, .phase = 0.5};
  ad_tensor *x = NULL, *y = NULL, *yy = NULL;
  ad_tensor_new(&x, AD_F64, 2, (int64_t[]){1000, 1});
  ad_tensor_new(&y, AD_F32, 2, (int64_t[]){1000, 1});
  ad_tensor_new(&yy, AD_F64, 2, (int64_t[]){1000, 1});
  ck_assert_int_eq(ds_sine_task_points(&task, &r, x, y), AD_OK);
  ck_assert_int_eq(ds_sine_task_eval(&task, x, yy), AD_OK);
  double lo = 1e9, hi = -1e9;
  for (int i = 0; i < 1000; i++) {
    double xi = ((double *)x->data)[i];
    lo = fmin(lo, xi);
    hi = fmax(hi, xi);
    ck_assert_double_eq_tol(((float *)y->data)[i], 2.0 * sin(xi + 0.5), 1e-6);
    ck_assert_double_eq(((double *)yy->data)[i], 2.0 * sin(xi + 0.5));
  }
  ck_assert(lo >= -5.0 && lo < -4.9 && hi < 5.0 && hi > 4.9);
  ad_tensor *bad = NULL;
  ad_tensor_new(&bad, AD_F64, 1, (int64_t[]){7});
  ck_assert_int_eq(ds_sine_task_points(&task, &r, x, bad), AD_ERR_SHAPE);
  ck_assert_int_eq(ds_sine_task_points(NULL, &r, x, y), AD_ERR_NULL);
  ad_tensor_free(x);
  ad_tensor_free(y);
  ad_tensor_free(yy);
  ad_tensor_free(bad);
}
END_TEST

/* Solves A z = b (n x n, row-major) by Gaussian elimination with partial
 * pivoting; A and b are overwritten, z returned in b. */
static void solve(int n, double *A, double *b) {
  for (int c = 0; c < n; c++) {
    int p = c;
    for (int i = c + 1; i < n; i++)
      if (fabs(A[i * n + c]) > fabs(A[p * n + c])) p = i;
    for (int j = 0; j < n; j++) {
      double t = A[c * n + j];
      A[c * n + j] = A[p * n + j];
      A[p * n + j] = t;
    }
    double t = b[c];
    b[c] = b[p];
    b[p] = t;
    for (int i = c + 1; i < n; i++) {
      double f = A[i * n + c] / A[c * n + c];
      for (int j = c; j < n; j++) A[i * n + j] -= f * A[c * n + j];
      b[i] -= f * b[c];
    }
  }
  for (int i = n - 1; i >= 0; i--) {
    for (int j = i + 1; j < n; j++) b[i] -= A[i * n + j] * b[j];
    b[i] /= A[i * n + i];
  }
}

/* Least squares with a bias column: theta = [w; b]. */
static void least_squares(const ds_dataset *d, double *theta) {
  int p = (int)d->dim + 1;
  double A[64] = {0}, b[8] = {0}, row[8];
  for (int64_t i = 0; i < d->n; i++) {
    for (int j = 0; j < p - 1; j++) row[j] = ad_get(d->x, i * d->dim + j);
    row[p - 1] = 1;
    double y = ad_get(d->y, i);
    for (int j = 0; j < p; j++) {
      b[j] += row[j] * y;
      for (int k = 0; k < p; k++) A[j * p + k] += row[j] * row[k];
    }
  }
  solve(p, A, b);
  memcpy(theta, b, (size_t)p * sizeof *theta);
}

START_TEST(test_linear_regression_recovers_weights) {
  ad_rng r;
  ad_rng_seed(&r, 7);
  const double w[5] = {1.5, -2.0, 0.25, 0.0, 3.0};
  ds_dataset *d = NULL;
  ds_linear_opts o = {.n = 4000, .dim = 5, .noise = 0.1, .bias = -0.5, .w = w, .dtype = AD_F64};
  ck_assert_int_eq(ds_linear_regression(&d, &o, &r), AD_OK);
  ck_assert_int_eq(d->x->shape[0], 4000);
  ck_assert_int_eq(d->x->shape[1], 5);
  ck_assert_int_eq(d->y->shape[0], 4000);
  ck_assert_int_eq(d->y->shape[1], 1);
  ck_assert_ptr_null(d->labels);
  ck_assert_double_eq(d->b_true, -0.5);
  double theta[6];
  least_squares(d, theta);
  /* std of each estimate ~ noise / sqrt(n) = 0.0016 */
  for (int j = 0; j < 5; j++) {
    ck_assert_double_eq(((double *)d->w_true->data)[j], w[j]);
    ck_assert_double_eq_tol(theta[j], w[j], 0.01);
  }
  ck_assert_double_eq_tol(theta[5], -0.5, 0.01);
  /* residual std ~ noise */
  double ss = 0;
  for (int64_t i = 0; i < d->n; i++) {
    double pred = theta[5];
    for (int j = 0; j < 5; j++) pred += theta[j] * ad_get(d->x, i * 5 + j);
    ss += (ad_get(d->y, i) - pred) * (ad_get(d->y, i) - pred);
  }
  ck_assert_double_eq_tol(sqrt(ss / (double)d->n), 0.1, 0.005);
  ds_dataset_free(d);

  /* drawn weights, f32, noise-free: recovered to f32 precision */
  ds_linear_opts o2 = {.n = 50, .dim = 3};
  ck_assert_int_eq(ds_linear_regression(&d, &o2, &r), AD_OK);
  ck_assert_int_eq(d->x->dtype, AD_F32);
  least_squares(d, theta);
  for (int j = 0; j < 3; j++)
    ck_assert_double_eq_tol(theta[j], ((double *)d->w_true->data)[j], 1e-5);
  ck_assert_double_eq_tol(theta[3], 0.0, 1e-5);
  ds_dataset_free(d);

  d = (ds_dataset *)&d;
  ck_assert_int_eq(ds_linear_regression(&d, &(ds_linear_opts){.n = 0, .dim = 2}, &r), AD_ERR_ARG);
  ck_assert_ptr_null(d);
  ck_assert_int_eq(ds_linear_regression(&d, &(ds_linear_opts){.n = 5, .dim = 2, .noise = -1}, &r),
                   AD_ERR_ARG);
}
END_TEST

START_TEST(test_logistic_regression_recovers_weights) {
  ad_rng r;
  ad_rng_seed(&r, 11);
  const double w[2] = {2.0, -1.0};
  ds_dataset *d = NULL;
  ds_linear_opts o = {.n = 20000, .dim = 2, .bias = 0.5, .w = w, .dtype = AD_F64};
  ck_assert_int_eq(ds_logistic_regression(&d, &o, &r), AD_OK);
  ck_assert_int_eq(d->n_classes, 2);
  int64_t ones = 0;
  for (int64_t i = 0; i < d->n; i++) {
    ck_assert(d->labels[i] == 0 || d->labels[i] == 1);
    ck_assert_double_eq(ad_get(d->y, i), d->labels[i]);
    ones += d->labels[i];
  }
  ck_assert(ones > 9000 && ones < 13000); /* bias 0.5 tilts towards 1 */
  /* maximum likelihood by Newton's method (IRLS) */
  double th[3] = {0, 0, 0};
  for (int it = 0; it < 12; it++) {
    double H[9] = {0}, g[3] = {0};
    for (int64_t i = 0; i < d->n; i++) {
      double xi[3] = {ad_get(d->x, 2 * i), ad_get(d->x, 2 * i + 1), 1.0};
      double z = th[0] * xi[0] + th[1] * xi[1] + th[2];
      double p = 1 / (1 + exp(-z));
      for (int j = 0; j < 3; j++) {
        g[j] += (d->labels[i] - p) * xi[j];
        for (int k = 0; k < 3; k++) H[j * 3 + k] += p * (1 - p) * xi[j] * xi[k];
      }
    }
    solve(3, H, g);
    for (int j = 0; j < 3; j++) th[j] += g[j];
  }
  /* std of the MLE here is ~0.03 */
  ck_assert_double_eq_tol(th[0], 2.0, 0.15);
  ck_assert_double_eq_tol(th[1], -1.0, 0.15);
  ck_assert_double_eq_tol(th[2], 0.5, 0.15);
  ds_dataset_free(d);
}
END_TEST

START_TEST(test_two_moons) {
  ad_rng r;
  ad_rng_seed(&r, 5);
  ds_dataset *d = NULL;
  ck_assert_int_eq(ds_two_moons(&d, 1001, 0.0, AD_F64, &r), AD_OK);
  ck_assert_int_eq(d->n, 1001);
  ck_assert_int_eq(d->dim, 2);
  int64_t c[2] = {0, 0}, first_half0 = 0;
  for (int64_t i = 0; i < d->n; i++) {
    double x = ad_get(d->x, 2 * i), y = ad_get(d->x, 2 * i + 1);
    c[d->labels[i]]++;
    if (i < 500) first_half0 += d->labels[i] == 0;
    if (d->labels[i] == 0) { /* upper moon: unit circle, y >= 0 */
      ck_assert_double_eq_tol(x * x + y * y, 1.0, 1e-12);
      ck_assert(y >= -1e-12);
    } else { /* lower moon: circle around (1, 0.5), y <= 0.5 */
      ck_assert_double_eq_tol((x - 1) * (x - 1) + (y - 0.5) * (y - 0.5), 1.0, 1e-12);
      ck_assert(y <= 0.5 + 1e-12);
    }
  }
  ck_assert_int_eq(c[0], 500);
  ck_assert_int_eq(c[1], 501);
  ck_assert(first_half0 > 200 && first_half0 < 300); /* shuffled, not sorted by class */
  ds_dataset_free(d);

  /* with noise: the distance to the moon's circle has std ~ noise */
  ck_assert_int_eq(ds_two_moons(&d, 4000, 0.1, AD_F32, &r), AD_OK);
  double ss = 0;
  for (int64_t i = 0; i < d->n; i++) {
    double x = ad_get(d->x, 2 * i), y = ad_get(d->x, 2 * i + 1);
    double rad = d->labels[i] ? hypot(x - 1, y - 0.5) : hypot(x, y);
    ss += (rad - 1) * (rad - 1);
  }
  ck_assert_double_eq_tol(sqrt(ss / 4000), 0.1, 0.01);
  ds_dataset_free(d);

  /* same seed, same data */
  ds_dataset *a = NULL, *b = NULL;
  ad_rng_seed(&r, 9);
  ds_two_moons(&a, 100, 0.2, AD_F64, &r);
  ad_rng_seed(&r, 9);
  ds_two_moons(&b, 100, 0.2, AD_F64, &r);
  ck_assert(memcmp(a->x->data, b->x->data, 200 * sizeof(double)) == 0);
  ck_assert(memcmp(a->labels, b->labels, 100 * sizeof(int32_t)) == 0);
  ds_dataset_free(a);
  ds_dataset_free(b);
  ck_assert_int_eq(ds_two_moons(&a, 1, 0.1, AD_F64, &r), AD_ERR_ARG);
}
END_TEST

/* ------------------------------------------------------------------ label corruption */

static void check_corrupt(int64_t n, double frac, int64_t want) {
  int32_t *orig = malloc((size_t)n * sizeof *orig), *lab = malloc((size_t)n * sizeof *lab);
  uint8_t *mask = malloc((size_t)n);
  for (int64_t i = 0; i < n; i++) orig[i] = lab[i] = (int32_t)(i % 10);
  ad_rng r;
  ad_rng_seed(&r, (uint64_t)n);
  int64_t k = -1;
  ck_assert_int_eq(ds_corrupt_labels(lab, n, 10, frac, &r, mask, &k), AD_OK);
  ck_assert_int_eq(k, want);
  int64_t changed = 0, marked = 0;
  for (int64_t i = 0; i < n; i++) {
    ck_assert(lab[i] >= 0 && lab[i] < 10);
    ck_assert_int_eq(mask[i] != 0, lab[i] != orig[i]); /* flipped means a different class */
    changed += lab[i] != orig[i];
    marked += mask[i];
  }
  ck_assert_int_eq(changed, want);
  ck_assert_int_eq(marked, want);
  free(orig);
  free(lab);
  free(mask);
}

START_TEST(test_corrupt_labels_counts) {
  check_corrupt(1000, 0.3, 300);
  check_corrupt(10, 0.25, 3); /* round(2.5) = 3 */
  check_corrupt(7, 0.5, 4);   /* round(3.5) = 4 */
  check_corrupt(100, 0.0, 0);
  check_corrupt(100, 1.0, 100);
  check_corrupt(5000, 0.123, 615);
}
END_TEST

START_TEST(test_corrupt_labels_distribution) {
  /* all class 0, 90% flipped: the 9000 new labels spread evenly over 1..9,
   * and the flipped positions are spread evenly over the array */
  enum { N = 10000 };
  static int32_t lab[N];
  static uint8_t mask[N];
  ad_rng r;
  ad_rng_seed(&r, 1);
  ck_assert_int_eq(ds_corrupt_labels(lab, N, 10, 0.9, &r, mask, NULL), AD_OK);
  int64_t h[10] = {0}, first_half = 0;
  for (int i = 0; i < N; i++) {
    h[lab[i]]++;
    if (i < N / 2) first_half += mask[i];
  }
  ck_assert_int_eq(h[0], 1000);
  for (int c = 1; c < 10; c++) ck_assert_msg(h[c] > 850 && h[c] < 1150, "class %d: %ld", c, h[c]);
  ck_assert(first_half > 4400 && first_half < 4600);

  /* determinism, and nothing changes on a bad call */
  int32_t a[50], b[50];
  for (int i = 0; i < 50; i++) a[i] = b[i] = i % 3;
  ad_rng_seed(&r, 2);
  ds_corrupt_labels(a, 50, 3, 0.4, &r, NULL, NULL);
  ad_rng_seed(&r, 2);
  ds_corrupt_labels(b, 50, 3, 0.4, &r, NULL, NULL);
  ck_assert(memcmp(a, b, sizeof a) == 0);
  int32_t c[3] = {0, 1, 5};
  ck_assert_int_eq(ds_corrupt_labels(c, 3, 3, 0.5, &r, NULL, NULL), AD_ERR_ARG);
  ck_assert_msg_has("label 2 is 5");
  ck_assert_int_eq(c[0], 0);
  ck_assert_int_eq(c[1], 1);
  ck_assert_int_eq(ds_corrupt_labels(a, 50, 3, 1.5, &r, NULL, NULL), AD_ERR_ARG);
  ck_assert_int_eq(ds_corrupt_labels(a, 50, 1, 0.5, &r, NULL, NULL), AD_ERR_ARG);
}
END_TEST

/* ------------------------------------------------------------------ batch iterator */

/* x[i] = (i, -i), y[i] = 10 i, label[i] = i % 7: every copied row names
 * its source. */
typedef struct {
  ad_tensor *x, *y;
  int32_t *lab;
} iter_data;

static iter_data make_iter_data(int64_t n) {
  iter_data d;
  ck_assert_int_eq(ad_tensor_new(&d.x, AD_F64, 2, (int64_t[]){n, 2}), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&d.y, AD_F32, 1, (int64_t[]){n}), AD_OK);
  d.lab = malloc((size_t)n * sizeof *d.lab);
  for (int64_t i = 0; i < n; i++) {
    ((double *)d.x->data)[2 * i] = (double)i;
    ((double *)d.x->data)[2 * i + 1] = -(double)i;
    ((float *)d.y->data)[i] = 10.0f * (float)i;
    d.lab[i] = (int32_t)(i % 7);
  }
  return d;
}

static void free_iter_data(iter_data d) {
  ad_tensor_free(d.x);
  ad_tensor_free(d.y);
  free(d.lab);
}

START_TEST(test_iter_covers_each_index_once) {
  enum { N = 103, B = 10 };
  iter_data d = make_iter_data(N);
  for (int keep = 0; keep < 2; keep++) {
    ds_iter *it = NULL;
    ds_iter_opts o = {.batch = B, .seed = 4, .keep_last = keep};
    ck_assert_int_eq(ds_iter_new(&it, d.x, d.lab, d.y, &o), AD_OK);
    int64_t per_epoch = keep ? 11 : 10;
    ck_assert_int_eq(ds_iter_batches_per_epoch(it), per_epoch);
    ad_tensor *xb = NULL, *yb = NULL;
    ad_tensor_new(&xb, AD_F32, 2, (int64_t[]){B, 2}); /* f64 source into f32 batch */
    ad_tensor_new(&yb, AD_F64, 2, (int64_t[]){B, 1});
    int32_t lb[B];
    for (int64_t epoch = 0; epoch < 3; epoch++) {
      int seen[N] = {0};
      int64_t seen_total = 0;
      for (int64_t k = 0; k < per_epoch; k++) {
        ds_batch b;
        ck_assert_msg(ds_iter_next(it, xb, lb, yb, &b) == AD_OK, "%s", ds_errmsg());
        ck_assert_int_eq(b.epoch, epoch);
        ck_assert_int_eq(b.index, k);
        ck_assert_int_eq(b.epoch_end, k == per_epoch - 1);
        ck_assert_int_eq(b.size, keep && k == 10 ? 3 : B);
        for (int64_t r = 0; r < B; r++) {
          float x0 = ((float *)xb->data)[2 * r], x1 = ((float *)xb->data)[2 * r + 1];
          if (r >= b.size) { /* padding of the partial batch */
            ck_assert_float_eq(x0, 0);
            ck_assert_int_eq(lb[r], -1);
            ck_assert_double_eq(((double *)yb->data)[r], 0);
            continue;
          }
          int i = (int)x0;
          ck_assert(i >= 0 && i < N);
          ck_assert_float_eq(x1, -x0);
          ck_assert_int_eq(lb[r], i % 7);
          ck_assert_double_eq(((double *)yb->data)[r], 10.0 * i);
          ck_assert_msg(seen[i] == 0, "index %d seen twice in epoch %ld", i, (long)epoch);
          seen[i] = 1;
          seen_total++;
        }
      }
      ck_assert_int_eq(seen_total, keep ? N : 100);
    }
    ds_iter_free(it);
    ad_tensor_free(xb);
    ad_tensor_free(yb);
  }
  free_iter_data(d);
}
END_TEST

/* The first `count` indices the iterator yields (x's first column). */
static void take(ds_iter *it, ad_tensor *xb, int64_t count, int *out) {
  int64_t got = 0;
  while (got < count) {
    ds_batch b;
    ck_assert_int_eq(ds_iter_next(it, xb, NULL, NULL, &b), AD_OK);
    for (int64_t r = 0; r < b.size && got < count; r++)
      out[got++] = (int)((double *)xb->data)[2 * r];
  }
}

START_TEST(test_iter_deterministic_and_reshuffles) {
  enum { N = 50, B = 5, M = 3 * N };
  iter_data d = make_iter_data(N);
  ds_iter *a = NULL, *b = NULL, *c = NULL, *s = NULL;
  ds_iter_new(&a, d.x, NULL, NULL, &(ds_iter_opts){.batch = B, .seed = 1});
  ds_iter_new(&b, d.x, NULL, NULL, &(ds_iter_opts){.batch = B, .seed = 1});
  ds_iter_new(&c, d.x, NULL, NULL, &(ds_iter_opts){.batch = B, .seed = 2});
  ds_iter_new(&s, d.x, NULL, NULL, &(ds_iter_opts){.batch = B, .no_shuffle = 1});
  ad_tensor *xb = NULL;
  ad_tensor_new(&xb, AD_F64, 2, (int64_t[]){B, 2});
  int ia[M], ib[M], ic[M], is[M], again[M];
  take(a, xb, M, ia);
  take(b, xb, M, ib);
  take(c, xb, M, ic);
  take(s, xb, M, is);
  ck_assert(memcmp(ia, ib, sizeof ia) == 0);           /* same seed, same batches */
  ck_assert(memcmp(ia, ic, sizeof ia) != 0);           /* another seed, other batches */
  ck_assert(memcmp(ia, ia + N, N * sizeof(int)) != 0); /* epoch 1 reshuffled */
  for (int i = 0; i < M; i++) ck_assert_int_eq(is[i], i % N);
  int in_place = 0;
  for (int i = 0; i < N; i++) in_place += ia[i] == i;
  ck_assert(in_place < 10); /* epoch 0 is shuffled (about 1 fixed point expected) */
  ds_iter_reset(a);
  take(a, xb, M, again);
  ck_assert(memcmp(ia, again, sizeof ia) == 0);
  ds_iter_free(a);
  ds_iter_free(b);
  ds_iter_free(c);
  ds_iter_free(s);
  ds_iter_free(NULL);
  ad_tensor_free(xb);
  free_iter_data(d);
}
END_TEST

START_TEST(test_iter_no_allocation_per_batch) {
  ds_dataset *m = NULL;
  ck_assert_int_eq(ds_mnist_load(&m, NULL, "test", NULL), AD_OK);
  ds_iter *it = NULL;
  ck_assert_int_eq(ds_iter_new(&it, m->x, m->labels, NULL,
                               &(ds_iter_opts){.batch = 64, .seed = 3, .keep_last = 1}),
                   AD_OK);
  ad_tensor *xb = NULL;
  ad_tensor_new(&xb, AD_F32, 2, (int64_t[]){64, 784});
  int32_t lb[64];
  int64_t epochs = 0;
#ifdef HT_COUNT_ALLOCS
  n_allocs = 0;
  counting = 1;
#endif
  for (int k = 0; k < 200; k++) { /* > 6 epochs, partial batches and reshuffles included */
    ds_batch b;
    ad_status s = ds_iter_next(it, xb, lb, NULL, &b);
    if (s != AD_OK) ck_abort_msg("next failed: %s", ds_errmsg());
    epochs += b.epoch_end;
  }
#ifdef HT_COUNT_ALLOCS
  counting = 0;
  ck_assert_int_eq(n_allocs, 0);
  /* the counter works: making a tensor is counted */
  counting = 1;
  ad_tensor *t = NULL;
  ad_tensor_new(&t, AD_F32, 1, (int64_t[]){4});
  counting = 0;
  ck_assert_int_gt(n_allocs, 0);
  ad_tensor_free(t);
#endif
  ck_assert_int_eq(epochs, 200 / 32); /* 2000 / 64 -> 32 batches per epoch */
  ds_iter_free(it);
  ad_tensor_free(xb);
  ds_dataset_free(m);
}
END_TEST

START_TEST(test_iter_bad_args) {
  iter_data d = make_iter_data(20);
  ds_iter *it = (ds_iter *)&it;
  ck_assert_int_eq(ds_iter_new(&it, d.x, NULL, NULL, &(ds_iter_opts){.batch = 0}), AD_ERR_ARG);
  ck_assert_ptr_null(it);
  ck_assert_int_eq(ds_iter_new(&it, d.x, NULL, NULL, &(ds_iter_opts){.batch = 21}), AD_ERR_ARG);
  ck_assert_msg_has("keep_last");
  ck_assert_int_eq(ds_iter_new(&it, d.x, NULL, NULL, &(ds_iter_opts){.batch = 21, .keep_last = 1}),
                   AD_OK);
  ds_iter_free(it);
  ad_tensor *short_y = NULL;
  ad_tensor_new(&short_y, AD_F32, 1, (int64_t[]){19});
  ck_assert_int_eq(ds_iter_new(&it, d.x, NULL, short_y, &(ds_iter_opts){.batch = 4}), AD_ERR_SHAPE);
  ck_assert_int_eq(ds_iter_new(&it, d.x, d.lab, NULL, &(ds_iter_opts){.batch = 4}), AD_OK);
  ad_tensor *xb = NULL, *wrong = NULL;
  ad_tensor_new(&xb, AD_F32, 2, (int64_t[]){4, 2});
  ad_tensor_new(&wrong, AD_F32, 2, (int64_t[]){5, 2});
  int32_t lb[4];
  ck_assert_int_eq(ds_iter_next(it, wrong, lb, NULL, NULL), AD_ERR_SHAPE);
  ck_assert_msg_has("[5, 2]");
  ck_assert_int_eq(ds_iter_next(it, xb, lb, xb, NULL), AD_ERR_ARG); /* no y in the iterator */
  ck_assert_int_eq(ds_iter_next(it, xb, lb, NULL, NULL), AD_OK);
  ck_assert_str_eq(ds_errmsg(), "");
  ds_iter_free(it);
  ck_assert_int_eq(ds_iter_new(&it, d.x, NULL, NULL, &(ds_iter_opts){.batch = 4}), AD_OK);
  ck_assert_int_eq(ds_iter_next(it, xb, lb, NULL, NULL), AD_ERR_ARG); /* no labels */
  ds_iter_free(it);
  /* A batch near INT64_MAX: ceil(20 / batch) is 1, with no n + batch - 1
   * wrapping, and a buffer check that does not form batch * per. */
  ck_assert_int_eq(
      ds_iter_new(&it, d.x, NULL, NULL, &(ds_iter_opts){.batch = INT64_MAX, .keep_last = 1}),
      AD_OK);
  ck_assert_int_eq(ds_iter_batches_per_epoch(it), 1);
  ck_assert_int_eq(ds_iter_next(it, xb, NULL, NULL, NULL), AD_ERR_SHAPE);
  ds_iter_free(it);
  /* n x dim past 2^63 is an argument error, not a wrapped allocation. */
  ad_rng r;
  ad_rng_seed(&r, 1);
  ds_dataset *big = (ds_dataset *)&big;
  ck_assert_int_eq(ds_linear_regression(
                       &big, &(ds_linear_opts){.n = (int64_t)1 << 40, .dim = (int64_t)1 << 40}, &r),
                   AD_ERR_ARG);
  ck_assert_ptr_null(big);
  ck_assert_msg_has("overflow");
  ad_tensor_free(xb);
  ad_tensor_free(wrong);
  ad_tensor_free(short_y);
  free_iter_data(d);
}
END_TEST

/* ------------------------------------------------------------------ suite */

static Suite *datasets_suite(void) {
  Suite *s = suite_create("datasets");
  TCase *tc = tcase_create("mnist");
  tcase_add_checked_fixture(tc, make_tmpdir, remove_tmpdir);
  tcase_add_test(tc, test_header_example);
  tcase_add_test(tc, test_mnist_embedded_train);
  tcase_add_test(tc, test_mnist_embedded_test);
  tcase_add_test(tc, test_mnist_f64_limit);
  tcase_add_test(tc, test_mnist_default_dir);
  tcase_add_test(tc, test_mnist_standard_names);
  tcase_add_test(tc, test_mnist_bad_dirs);
  tcase_add_test(tc, test_dataset_slice);
  suite_add_tcase(s, tc);

  tc = tcase_create("idx");
  tcase_add_checked_fixture(tc, make_tmpdir, remove_tmpdir);
  tcase_add_test(tc, test_idx_roundtrip);
  tcase_add_test(tc, test_idx_big_endian_layout);
  tcase_add_test(tc, test_idx_gzip_reproducible);
  tcase_add_test(tc, test_idx_rejects_truncated);
  tcase_add_test(tc, test_idx_rejects_wrong_magic);
  tcase_add_test(tc, test_idx_rejects_wrong_dims);
  tcase_add_test(tc, test_idx_rejects_trailing_garbage);
  tcase_add_test(tc, test_idx_rejects_truncated_gzip);
  tcase_add_test(tc, test_idx_io_errors);
  tcase_add_test(tc, test_idx_sizes_overflow);
  tcase_add_test(tc, test_idx_write_atomic);
  tcase_add_test(tc, test_idx_gzip_trailing_garbage);
  suite_add_tcase(s, tc);

  tc = tcase_create("csv");
  tcase_add_checked_fixture(tc, make_tmpdir, remove_tmpdir);
  tcase_add_test(tc, test_csv_good);
  tcase_add_test(tc, test_csv_bad);
  tcase_add_test(tc, test_csv_nul);
  tcase_add_test(tc, test_csv_file);
  suite_add_tcase(s, tc);

  tc = tcase_create("synthetic");
  tcase_add_test(tc, test_sine_tasks);
  tcase_add_test(tc, test_linear_regression_recovers_weights);
  tcase_add_test(tc, test_logistic_regression_recovers_weights);
  tcase_add_test(tc, test_two_moons);
  tcase_add_test(tc, test_corrupt_labels_counts);
  tcase_add_test(tc, test_corrupt_labels_distribution);
  suite_add_tcase(s, tc);

  tc = tcase_create("iter");
  tcase_add_test(tc, test_iter_covers_each_index_once);
  tcase_add_test(tc, test_iter_deterministic_and_reshuffles);
  tcase_add_test(tc, test_iter_no_allocation_per_batch);
  tcase_add_test(tc, test_iter_bad_args);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  return gc_run_suite(datasets_suite());
}
