/* example_util.h — the boring parts the MNIST examples share: the command
 * line, loading the train and test splits, counting right answers, and a
 * clock. Each example keeps its model and its training loop; this header
 * holds nothing an example is meant to teach.
 *
 * Header-only (static functions): examples/CMakeLists.txt makes every
 * .c file in examples/ an executable. Define _POSIX_C_SOURCE 200809L before the
 * first include (clock_gettime). */
#ifndef HT_EXAMPLE_UTIL_H
#define HT_EXAMPLE_UTIL_H

#include "autodiff/ad.h"
#include "datasets/ds.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
  const char *data;        /* NULL = the embedded subset */
  const char *load, *save; /* parameter files (nn_params_load / nn_params_save), or NULL */
  int epochs, threads;
  int64_t limit; /* use only the first `limit` train and test examples (0 = all) */
  uint64_t seed;
  double lr;
} ex_options;

/* Monotonic wall clock in seconds. */
static inline double ex_now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Parses --data --epochs --seed --threads --lr --limit --load --save into
 * *o, which holds the example's defaults on entry. Returns 0 to go on, 1
 * after --help, -1 on a bad argument (the message is printed). */
static inline int ex_parse(int argc, char **argv, ex_options *o) {
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    char *end = NULL;
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      printf("usage: %s [--data DIR] [--epochs N] [--seed S] [--threads N] [--lr LR] [--limit N]\n"
             "       [--load FILE] [--save FILE]\n"
             "  --data DIR   MNIST or Fashion-MNIST IDX files (default: the embedded subset)\n"
             "  --limit N    only the first N train and test examples (quick runs, valgrind)\n"
             "  --load FILE  start from parameters saved by --save (--epochs 0: evaluate only)\n"
             "  --save FILE  write the trained parameters (atomically, checksummed)\n",
             argv[0]);
      return 1;
    }
    if (!v) {
      fprintf(stderr, "%s: %s needs a value (try --help)\n", argv[0], a);
      return -1;
    }
    i++;
    if (strcmp(a, "--data") == 0) {
      o->data = v;
    } else if (strcmp(a, "--epochs") == 0) {
      long n = strtol(v, &end, 10);
      if (*end || n < 0 || n > 10000) goto bad;
      o->epochs = (int)n;
    } else if (strcmp(a, "--seed") == 0) {
      o->seed = strtoull(v, &end, 10);
      if (*end) goto bad;
    } else if (strcmp(a, "--threads") == 0) {
      long n = strtol(v, &end, 10);
      if (*end || n < 1 || n > 256) goto bad;
      o->threads = (int)n;
    } else if (strcmp(a, "--load") == 0) {
      o->load = v;
    } else if (strcmp(a, "--save") == 0) {
      o->save = v;
    } else if (strcmp(a, "--limit") == 0) {
      long long n = strtoll(v, &end, 10);
      if (*end || n < 0) goto bad;
      o->limit = n;
    } else if (strcmp(a, "--lr") == 0) {
      o->lr = strtod(v, &end);
      if (*end || !(o->lr > 0)) goto bad;
    } else {
      fprintf(stderr, "%s: unknown option %s (try --help)\n", argv[0], a);
      return -1;
    }
    continue;
  bad:
    fprintf(stderr, "%s: bad value '%s' for %s\n", argv[0], v, a);
    return -1;
  }
  return 0;
}

/* Loads the MNIST train and test splits (o->data, o->limit) and checks
 * that they hold 28x28 images. Returns 0 on success; otherwise prints
 * "name: why" and returns -1 (whatever was loaded is in *train / *test, for
 * the caller to free). */
static inline int ex_load_mnist(const char *name, const ex_options *o, ds_dataset **train,
                                ds_dataset **test) {
  const ds_mnist_opts lim = {.limit = o->limit};
  if (ds_mnist_load(train, o->data, "train", &lim) != AD_OK ||
      ds_mnist_load(test, o->data, "test", &lim) != AD_OK) {
    fprintf(stderr, "%s: %s\n", name, ds_errmsg());
    return -1;
  }
  if ((*train)->dim != 28 * 28 || (*test)->dim != 28 * 28) {
    fprintf(stderr, "%s: expected 28x28 images, got %lld features\n", name,
            (long long)(*train)->dim);
    return -1;
  }
  return 0;
}

/* Number of rows of f32 logits [n, c] whose largest entry (the first one,
 * on ties) is the label. */
static inline int64_t ex_hits(const ad_tensor *logits, const int32_t *labels) {
  int64_t n = logits->shape[0], c = logits->shape[1], k = 0;
  const float *z = logits->data;
  for (int64_t i = 0; i < n; i++) {
    int64_t best = 0;
    for (int64_t j = 1; j < c; j++)
      if (z[i * c + j] > z[i * c + best]) best = j;
    k += best == labels[i];
  }
  return k;
}

#endif
