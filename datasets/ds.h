/*
 * ds.h — datasets: IDX (MNIST format) and CSV readers, synthetic task
 * generators, label corruption, and shuffled batch iterators.
 *
 * MNIST in a few lines (the embedded 8,000/2,000 subset, or any directory
 * holding the standard MNIST / Fashion-MNIST files):
 *
 *     ds_dataset *train = NULL;
 *     if (ds_mnist_load(&train, NULL, "train", NULL) != AD_OK) {  // NULL = embedded
 *       fprintf(stderr, "%s\n", ds_errmsg());
 *       return 1;
 *     }
 *     // train->x: [8000, 784] f32 in [0, 1]; train->labels: 8000 int32 in [0, 10)
 *     ds_iter *it = NULL;
 *     ds_iter_new(&it, train->x, train->labels, NULL, &(ds_iter_opts){.batch = 128, .seed = 1});
 *     ad_tensor *xb = NULL;
 *     ad_tensor_new(&xb, AD_F32, 2, (int64_t[]){128, 784});
 *     int32_t yb[128];
 *     ds_batch b;
 *     do {
 *       ds_iter_next(it, xb, yb, NULL, &b);  // copies, allocates nothing
 *       // ... one training step on xb, yb (b.size rows) ...
 *     } while (!b.epoch_end);
 *     ds_iter_free(it);
 *     ad_tensor_free(xb);
 *     ds_dataset_free(train);
 *
 * Errors: every fallible call returns an ad_status (AD_OK = 0) and sets its
 * OUT pointers to NULL on failure. The message of the last failing ds_ call
 * on this thread is ds_errmsg(): it names the file, what was expected and
 * what was found ("t.idx: truncated IDX data: header says 60000 x 28 x 28
 * u8 = 47040000 bytes, found 1000"). A call that succeeds sets it to "".
 * Destructors accept NULL. Nothing here aborts or exits on bad input.
 *
 * Randomness comes only from the caller's ad_rng, so every generator and
 * iterator is deterministic for a seed on every machine.
 */
#ifndef HYPERTAPE_DS_H
#define HYPERTAPE_DS_H

#include "autodiff/ad.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ errors */

/* Message of the last failing ds_ call on this thread; "" when the last
 * fallible call succeeded. Never NULL. Valid until the next ds_ call on the
 * same thread. */
const char *ds_errmsg(void);

/* ------------------------------------------------------------------ datasets */

/* A labelled data set: what the loaders and generators return. Every
 * pointer is owned by the struct and freed by ds_dataset_free. */
typedef struct ds_dataset {
  int64_t n;          /* examples */
  int64_t dim;        /* features per example: x is [n, dim] */
  ad_tensor *x;       /* [n, dim] inputs (heap tensor) */
  int32_t *labels;    /* n class labels in [0, n_classes), or NULL (regression) */
  int n_classes;      /* 0 when there are no labels */
  ad_tensor *y;       /* [n, 1] real targets (regression; 0/1 for logistic), or NULL */
  ad_tensor *w_true;  /* [dim] f64 generating weights (synthetic linear data), or NULL */
  double b_true;      /* generating bias (synthetic linear data), else 0 */
  int64_t rows, cols; /* image data: height and width (dim = rows*cols); else 0 */
} ds_dataset;

/* Frees d and everything it owns. Accepts NULL. */
void ds_dataset_free(ds_dataset *d);

/* Copies examples [start, start+count) of d into a new data set *out (x, y
 * and labels sliced; w_true copied whole). Use it for train/validation
 * splits. AD_ERR_ARG if the range is not inside [0, d->n). */
ad_status ds_dataset_slice(ds_dataset **out, const ds_dataset *d, int64_t start, int64_t count);

/* ------------------------------------------------------------------ IDX */

/* IDX element types (the third byte of the magic number). */
typedef enum {
  DS_IDX_U8 = 0x08,
  DS_IDX_I8 = 0x09,
  DS_IDX_I16 = 0x0B,
  DS_IDX_I32 = 0x0C,
  DS_IDX_F32 = 0x0D,
  DS_IDX_F64 = 0x0E
} ds_idx_type;

#define DS_IDX_MAX_DIMS 8

/* An IDX array in memory, in native byte order. */
typedef struct ds_idx {
  ds_idx_type type;
  int ndim;                      /* 1 .. DS_IDX_MAX_DIMS */
  int64_t dims[DS_IDX_MAX_DIMS]; /* unused dims are 1 */
  int64_t count;                 /* product of dims */
  void *data;                    /* count elements of type, owned */
} ds_idx;

/* Bytes of one element of an IDX type; 0 for an unknown code. */
size_t ds_idx_type_size(ds_idx_type t);
/* "u8", "i8", "i16", "i32", "f32", "f64", or "unknown". Never NULL. */
const char *ds_idx_type_name(ds_idx_type t);

/* Reads an IDX file, plain or gzip (told apart by the gzip magic 1f 8b).
 * Checks the magic (two zero bytes, a known type code, 1..8 dims), that
 * each dim is positive, and that the (decompressed) length is exactly header
 * + count * element size: a truncated file, a corrupt gzip stream and
 * trailing bytes are AD_ERR_FORMAT with a message naming the file, what was
 * expected and what was found. A missing/unreadable file is AD_ERR_IO.
 * *out is owned by the caller (ds_idx_free). */
ad_status ds_idx_read(ds_idx **out, const char *path);

/* Frees a and its data. Accepts NULL. */
void ds_idx_free(ds_idx *a);

/* Writes count = prod(dims) elements of `type` from data (native order) as
 * an IDX file, gzip-compressed when gzip is nonzero (no name, no timestamp,
 * so the bytes are reproducible). AD_ERR_ARG for a bad type or dims,
 * AD_ERR_IO when the file cannot be written. */
ad_status ds_idx_write(const char *path, ds_idx_type type, int ndim, const int64_t *dims,
                       const void *data, int gzip);

/* ------------------------------------------------------------------ MNIST */

typedef struct {
  ad_dtype dtype; /* dtype of x: AD_F32 (default, 0) or AD_F64 */
  int64_t limit;  /* keep only the first `limit` examples; 0 = all */
} ds_mnist_opts;

/* Loads an MNIST-format split from directory dir (NULL = ds_default_mnist_dir()).
 * split is "train" or "test" ("t10k" also accepted). Looks for
 * {train,t10k}-{images-idx3,labels-idx1}-ubyte, with ".gz" or without, and
 * the "train-images.idx3-ubyte" spelling some mirrors use, so the full
 * MNIST or Fashion-MNIST directory works as is. Images must be u8 [N, R, C],
 * labels u8 [N] with values < 10 and the same N.
 * On success *out holds x [N, R*C] (pixels / 255, in [0, 1]), labels
 * (int32), n_classes = 10, rows = R, cols = C; free with ds_dataset_free.
 * Errors: AD_ERR_IO (no such files: the message lists the names tried),
 * AD_ERR_FORMAT (corrupt file, mismatched counts, label out of range),
 * AD_ERR_ARG (bad split or opts). opts may be NULL. */
ad_status ds_mnist_load(ds_dataset **out, const char *dir, const char *split,
                        const ds_mnist_opts *opts);

/* Directory of the embedded MNIST subset, the first of:
 *   1. $HYPERTAPE_DATA, when set and not empty (read on every call);
 *   2. <dir of the library>/../share/hypertape/mnist (the relative path is
 *      CMake's LIBDIR -> DATADIR), when it holds the data: an installed
 *      libhypertape.so finds its prefix's copy even after the prefix is
 *      moved; linked statically, "the library" is the program;
 *   3. <source tree>/datasets/mnist, when it holds the data (uninstalled
 *      builds: tests, examples run from build/);
 *   4. the configured install path, <CMAKE_INSTALL_FULL_DATADIR>/hypertape/
 *      mnist, whether or not it exists (so a failing load names it).
 * 2-4 are decided once per process. Never NULL; the string is static (or
 * the environment's). */
const char *ds_default_mnist_dir(void);

/* ------------------------------------------------------------------ CSV */

/* Zeroed options (or opts NULL) mean: detect the header, comma, f32. */
typedef struct {
  int header;     /* 0: the first row is a header when none of its fields is
                     a number; 1: it is a header; -1: there is no header */
  char delim;     /* field separator; 0 = ',' */
  ad_dtype dtype; /* AD_F32 (0) or AD_F64 */
} ds_csv_opts;

/* Reads a numeric CSV table into *out, a heap tensor [rows, cols]. Fields
 * are numbers as strtod reads them (surrounding blanks allowed); blank
 * lines are skipped; CRLF is accepted. Every row must have the same number
 * of fields. A bad field is AD_ERR_FORMAT with "path:line:field:" (both
 * counted from 1) and the field's text; a row with the wrong number of
 * fields, or no data rows, is AD_ERR_FORMAT; an unreadable file AD_ERR_IO.
 * opts may be NULL. */
ad_status ds_csv_read(ad_tensor **out, const char *path, const ds_csv_opts *opts);

/* Same from a buffer of len bytes; name is used in messages (may be NULL). */
ad_status ds_csv_parse(ad_tensor **out, const char *text, size_t len, const char *name,
                       const ds_csv_opts *opts);

/* ------------------------------------------------------------------ synthetic */

/* Sinusoid regression tasks as in MAML (Finn et al. 2017):
 * y = amplitude * sin(x + phase), amplitude ~ U[0.1, 5], phase ~ U[0, pi],
 * x ~ U[-5, 5]. */
typedef struct {
  double amplitude;
  double phase;
} ds_sine_task;

#define DS_SINE_AMP_MIN 0.1
#define DS_SINE_AMP_MAX 5.0
#define DS_SINE_X_MIN -5.0
#define DS_SINE_X_MAX 5.0

/* Draws a task (amplitude, then phase) from r. AD_ERR_NULL on NULL. */
ad_status ds_sine_task_sample(ds_sine_task *task, ad_rng *r);

/* Draws K points of the task into caller tensors x and y (any dtype, K =
 * x->size elements, e.g. shape [K, 1]; y->size must equal x->size):
 * x ~ U[-5, 5], y = A sin(x + phase). Allocates nothing. */
ad_status ds_sine_task_points(const ds_sine_task *task, ad_rng *r, ad_tensor *x, ad_tensor *y);

/* Writes y = A sin(x + phase) for the given x (e.g. a plotting grid). */
ad_status ds_sine_task_eval(const ds_sine_task *task, const ad_tensor *x, ad_tensor *y);

/* Options of the linear generators. */
typedef struct {
  int64_t n;       /* examples (> 0) */
  int64_t dim;     /* features (> 0) */
  double noise;    /* linear: std of Gaussian noise added to y (>= 0) */
  double bias;     /* true bias b */
  const double *w; /* dim true weights; NULL = draw w ~ N(0, 1) from r */
  ad_dtype dtype;  /* dtype of x and y (default AD_F32 = 0) */
} ds_linear_opts;

/* Linear regression: x ~ N(0, I) [n, dim], y = x w + b + noise * N(0, 1),
 * y [n, 1]; w_true and b_true hold the generating weights. */
ad_status ds_linear_regression(ds_dataset **out, const ds_linear_opts *opts, ad_rng *r);

/* Logistic regression: x ~ N(0, I), label ~ Bernoulli(sigmoid(x w + b));
 * labels (n_classes 2) and y [n, 1] (the same 0/1 values as reals).
 * opts->noise is ignored. */
ad_status ds_logistic_regression(ds_dataset **out, const ds_linear_opts *opts, ad_rng *r);

/* Two interleaving half circles (as scikit-learn's make_moons): n/2 points
 * on the upper moon (label 0), n - n/2 on the lower one (label 1), angles
 * evenly spaced on [0, pi], plus Gaussian noise of std `noise`, then the
 * examples shuffled by r. x [n, 2] of dtype dt. */
ad_status ds_two_moons(ds_dataset **out, int64_t n, double noise, ad_dtype dt, ad_rng *r);

/* Label corruption for data hyper-cleaning: picks exactly round(frac * n)
 * distinct indices uniformly at random and changes each label to a
 * different class drawn uniformly from the other n_classes - 1. flipped,
 * when not NULL, is a caller array of n bytes set to 1 where a label was
 * changed and 0 elsewhere; *n_flipped (may be NULL) gets the count.
 * Allocates nothing. Labels are checked to lie in [0, n_classes) before any
 * is changed: on error nothing is modified. AD_ERR_ARG for frac outside
 * [0, 1], n_classes < 2 or a label out of range. */
ad_status ds_corrupt_labels(int32_t *labels, int64_t n, int n_classes, double frac, ad_rng *r,
                            uint8_t *flipped, int64_t *n_flipped);

/* ------------------------------------------------------------------ batches */

typedef struct {
  int64_t batch;  /* examples per batch (> 0) */
  uint64_t seed;  /* seeds the iterator's own ad_rng */
  int no_shuffle; /* 1: keep the data order (default 0: shuffle every epoch) */
  int keep_last;  /* 1: yield the last partial batch of an epoch (default 0: drop it) */
} ds_iter_opts;

/* What one ds_iter_next call produced. */
typedef struct {
  int64_t size;  /* rows filled (== batch except a kept partial last batch) */
  int64_t epoch; /* epoch this batch belongs to, from 0 */
  int64_t index; /* batch number within the epoch, from 0 */
  int epoch_end; /* 1 when this is the last batch of its epoch */
} ds_batch;

typedef struct ds_iter ds_iter;

/* Makes an iterator over n = x->shape[0] examples. x is borrowed (it must
 * outlive the iterator) and so are labels (n int32, may be NULL) and y
 * (shape[0] == n, may be NULL). Each epoch visits every example once, in an
 * order drawn by Fisher-Yates from the iterator's rng (seeded by
 * opts->seed), so the batches are the same for the same seed.
 * AD_ERR_ARG when batch <= 0, shapes disagree, or the batch is larger than
 * n with the partial batch dropped (no batch would ever come). */
ad_status ds_iter_new(ds_iter **out, const ad_tensor *x, const int32_t *labels, const ad_tensor *y,
                      const ds_iter_opts *opts);

/* Copies the next batch into caller buffers, allocating nothing: xb (any
 * dtype, shape[0] == batch, same elements per example as x), lb (batch
 * int32, may be NULL), yb (like xb for y, may be NULL). Rows past b->size
 * of a partial batch are zeroed and their labels set to -1. Past the end of
 * an epoch the next call starts a new one (reshuffled). b may be NULL.
 * AD_ERR_ARG when a buffer's shape does not fit. */
ad_status ds_iter_next(ds_iter *it, ad_tensor *xb, int32_t *lb, ad_tensor *yb, ds_batch *b);

/* Batches per epoch with these options. */
int64_t ds_iter_batches_per_epoch(const ds_iter *it);

/* Restarts at epoch 0 with the rng re-seeded: the same sequence again. */
void ds_iter_reset(ds_iter *it);

/* Frees the iterator (not the data it borrows). Accepts NULL. */
void ds_iter_free(ds_iter *it);

#ifdef __cplusplus
}
#endif
#endif
