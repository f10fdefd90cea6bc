/* mnist_mlp — a 784-200-10 MLP (ReLU) trained with plain SGD on MNIST.
 *
 *     ./build/examples/mnist_mlp                       # embedded 8,000 / 2,000 digits
 *     ./build/examples/mnist_mlp --data ~/mnist --epochs 5 --threads 2
 *
 * What to look at:
 *   - the parameters are one nn_params set: four named tensors that are
 *     views into one flat block (and one block for their gradients);
 *   - each step records the forward pass on the tape, takes ad_grad, lets
 *     nn_opt_step update the weights in place, then ad_rewind drops every
 *     tensor of the step: after the first step nothing is allocated;
 *   - evaluation runs with recording off (values only);
 *   - --save / --load write and read the whole parameter set as one
 *     versioned, checksummed file (nn_params_save / nn_params_load).
 * Ends with one line: summary: test_accuracy=0.xxxx epochs=N seconds=S */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "autodiff/ad.h"
#include "datasets/ds.h"
#include "nn/nn.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { IN = 784, HIDDEN = 200, OUT = 10, BATCH = 32 };

typedef struct {
  const char *data;        /* NULL = the embedded subset */
  const char *load, *save; /* parameter files (nn_params_load / nn_params_save), or NULL */
  int epochs, threads;
  int64_t limit; /* use only the first `limit` train and test examples (0 = all) */
  uint64_t seed;
  double lr;
} options;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int parse(int argc, char **argv, options *o) {
  *o = (options){.data = NULL, .epochs = 15, .threads = 1, .seed = 1, .lr = 0.2};
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

/* logits [N, 10] = relu(x w1^T + b1) w2^T + b2 */
static ad_tensor *forward(ad_tape *t, const nn_params *p, ad_tensor *x) {
  ad_tensor *h = ad_relu(t, nn_linear(t, x, nn_params_get(p, "fc1.w"), nn_params_get(p, "fc1.b")));
  return nn_linear(t, h, nn_params_get(p, "fc2.w"), nn_params_get(p, "fc2.b"));
}

/* Fraction of rows whose largest logit is the label. */
static double accuracy(const ad_tensor *logits, const int32_t *labels) {
  int64_t n = logits->shape[0], c = logits->shape[1], hits = 0;
  const float *z = logits->data;
  for (int64_t i = 0; i < n; i++) {
    int64_t best = 0;
    for (int64_t k = 1; k < c; k++)
      if (z[i * c + k] > z[i * c + best]) best = k;
    hits += best == labels[i];
  }
  return (double)hits / (double)n;
}

/* Test accuracy, values only (recording off): one forward over the whole
 * test set, then everything it allocated is rewound. */
static int evaluate(ad_tape *t, const nn_params *p, const ds_dataset *test, double *acc) {
  ad_marker m = ad_mark(t);
  int prev = ad_set_recording(t, 0);
  ad_tensor *logits = forward(t, p, test->x);
  ad_set_recording(t, prev);
  if (logits) *acc = accuracy(logits, test->labels);
  ad_rewind(t, m);
  return logits != NULL;
}

int main(int argc, char **argv) {
  options o;
  int rc = parse(argc, argv, &o);
  if (rc) return rc > 0 ? 0 : 2;
  ad_blas_set_threads(o.threads);

  ds_dataset *train = NULL, *test = NULL;
  ad_tape *tape = NULL;
  nn_params *p = NULL;
  ds_iter *it = NULL;
  ad_tensor *xb = NULL;
  nn_opt_state st = {0};
  int status = 1;
  const ds_mnist_opts lim = {.limit = o.limit};
  if (ds_mnist_load(&train, o.data, "train", &lim) != AD_OK ||
      ds_mnist_load(&test, o.data, "test", &lim) != AD_OK) {
    fprintf(stderr, "mnist_mlp: %s\n", ds_errmsg());
    goto out;
  }
  if (train->dim != IN || test->dim != IN) {
    fprintf(stderr, "mnist_mlp: expected 28x28 images, got %lld features\n", (long long)train->dim);
    goto out;
  }
  printf("mnist_mlp: %lld train / %lld test digits, %d-%d-%d MLP, SGD lr %g, batch %d, "
         "BLIS %s\n",
         (long long)train->n, (long long)test->n, IN, HIDDEN, OUT, o.lr, BATCH, ad_blas_kernel());

  /* Parameters: PyTorch's [out, in] layout, Kaiming-normal weights (ReLU
   * gain), zero biases, all in one flat block. */
  const nn_param_spec specs[4] = {{"fc1.w", 2, {HIDDEN, IN}},
                                  {"fc1.b", 1, {HIDDEN}},
                                  {"fc2.w", 2, {OUT, HIDDEN}},
                                  {"fc2.b", 1, {OUT}}};
  ad_rng rng;
  ad_rng_seed(&rng, o.seed);
  if (nn_params_new(&p, AD_F32, 4, specs) != AD_OK ||
      nn_init_kaiming(nn_params_get(p, "fc1.w"), &rng, NN_INIT_NORMAL, 0) != AD_OK ||
      nn_init_kaiming(nn_params_get(p, "fc2.w"), &rng, NN_INIT_NORMAL, 1.0) != AD_OK) {
    fprintf(stderr, "mnist_mlp: %s\n", ad_last_error());
    goto out;
  }
  if (o.load && nn_params_load(p, o.load) != AD_OK) {
    fprintf(stderr, "mnist_mlp: %s\n", ad_last_error());
    goto out;
  }
  ad_tensor *const *w = nn_params_list(p);
  nn_opt_cfg cfg = {.kind = NN_OPT_SGD, .lr = o.lr};
  if (nn_opt_state_init(&cfg, &st, 4, w) != AD_OK ||
      ad_tape_new(&tape, &(ad_tape_opts){.arena_mb = 32}) != AD_OK ||
      ds_iter_new(&it, train->x, train->labels, NULL,
                  &(ds_iter_opts){.batch = BATCH, .seed = o.seed}) != AD_OK ||
      ad_tensor_new(&xb, AD_F32, 2, (int64_t[]){BATCH, IN}) != AD_OK) {
    fprintf(stderr, "mnist_mlp: setup failed: %s%s\n", ad_last_error(), ds_errmsg());
    goto out;
  }

  int32_t yb[BATCH];
  double t0 = now_s(), acc = 0;
  ad_marker start = ad_mark(tape);
  for (int epoch = 1; epoch <= o.epochs; epoch++) {
    double loss_sum = 0;
    int64_t steps = 0;
    ds_batch b;
    do {
      if (ds_iter_next(it, xb, yb, NULL, &b) != AD_OK) {
        fprintf(stderr, "mnist_mlp: %s\n", ds_errmsg());
        goto out;
      }
      ad_tensor *loss = ad_cross_entropy(tape, forward(tape, p, xb), yb, BATCH);
      ad_tensor *g[4];
      if (ad_grad(tape, 1, &loss, NULL, 4, w, g, 0) != AD_OK ||
          nn_opt_step(&cfg, &st, 4, w, g) != AD_OK) {
        fprintf(stderr, "mnist_mlp: step failed: %s%s\n", ad_tape_errmsg(tape), ad_last_error());
        goto out;
      }
      loss_sum += ad_item(loss);
      steps++;
      ad_rewind(tape, start); /* everything of this step is gone */
    } while (!b.epoch_end);

    if (!evaluate(tape, p, test, &acc)) {
      fprintf(stderr, "mnist_mlp: evaluation failed: %s\n", ad_tape_errmsg(tape));
      goto out;
    }
    printf("epoch %2d/%d  train_loss %.4f  test_accuracy %.4f  %.2f s\n", epoch, o.epochs,
           loss_sum / (double)steps, acc, now_s() - t0);
    fflush(stdout);
  }
  if (o.epochs == 0 && !evaluate(tape, p, test, &acc)) {
    fprintf(stderr, "mnist_mlp: evaluation failed: %s\n", ad_tape_errmsg(tape));
    goto out;
  }
  if (o.save) {
    if (nn_params_save(p, o.save) != AD_OK) {
      fprintf(stderr, "mnist_mlp: %s\n", ad_last_error());
      goto out;
    }
    printf("saved %lld parameters to %s\n", (long long)nn_params_numel(p), o.save);
  }
  printf("summary: test_accuracy=%.4f epochs=%d seconds=%.2f\n", acc, o.epochs, now_s() - t0);
  status = 0;
out:
  ad_tensor_free(xb);
  ds_iter_free(it);
  ad_tape_free(tape);
  nn_opt_state_free(&st);
  nn_params_free(p);
  ds_dataset_free(train);
  ds_dataset_free(test);
  return status;
}
