/* consumer/main.c — a program built against an installed hypertape, the way
 * a user builds one (scripts/consumer_test.sh builds it three ways: with
 * pkg-config, shared and --static, and with find_package(hypertape)).
 *
 * It loads the embedded MNIST through ds_mnist_load(NULL, ...) — so the data
 * must be found from the install prefix alone — and takes the gradient of
 * a softmax regression's cross-entropy on 64 digits by the tape, checked
 * against central finite differences. Exits 0 when everything holds. */
#include "hypertape.h"

#include <math.h>
#include <stdio.h>

enum { N = 64, IN = 784, OUT = 10 };

/* Cross-entropy of softmax(x W) against the labels. */
static ad_tensor *loss_of(ad_tape *t, const ds_dataset *d, ad_tensor *w) {
  ad_tensor *x = ad_const(t, AD_F64, 2, (int64_t[]){N, IN}, d->x->data);
  return ad_cross_entropy(t, ad_matmul(t, x, w, 0, 0), d->labels, N);
}

int main(void) {
  ds_dataset *train = NULL, *test = NULL;
  ad_tape *tape = NULL;
  ad_tensor *w = NULL;
  int fails = 0;
  const ds_mnist_opts o = {.dtype = AD_F64, .limit = N};
  if (ds_mnist_load(&train, NULL, "train", &o) != AD_OK ||
      ds_mnist_load(&test, NULL, "test", &o) != AD_OK) {
    fprintf(stderr, "consumer: %s\n", ds_errmsg());
    return 1;
  }
  printf("consumer: embedded MNIST from %s: %lld train / %lld test digits of %lldx%lld\n",
         ds_default_mnist_dir(), (long long)train->n, (long long)test->n, (long long)train->rows,
         (long long)train->cols);
  if (train->n != N || train->dim != IN || train->rows != 28 || train->n_classes != 10) {
    fprintf(stderr, "consumer: unexpected shape of the embedded set\n");
    return 1;
  }
  /* Real digits: pixels in [0, 1], ink on about a fifth of them, every
   * label a digit. */
  double ink = 0;
  for (int64_t i = 0; i < N * IN; i++) ink += ad_get(train->x, i) > 0.5;
  for (int i = 0; i < N; i++) fails += train->labels[i] < 0 || train->labels[i] > 9;
  ink /= (double)(N * IN);
  printf("consumer: %.3f of the pixels are ink\n", ink);
  if (!(ink > 0.05 && ink < 0.4)) fails++;

  if (ad_tape_new(&tape, NULL) != AD_OK ||
      ad_tensor_new(&w, AD_F64, 2, (int64_t[]){IN, OUT}) != AD_OK) {
    fprintf(stderr, "consumer: %s\n", ad_last_error());
    return 1;
  }
  ad_rng rng;
  ad_rng_seed(&rng, 3);
  ad_tensor_fill_normal(w, &rng, 0, 0.05);
  ad_requires_grad(w, 1);
  ad_tensor *L = loss_of(tape, train, w), *g = NULL;
  if (!L || ad_grad(tape, 1, &L, NULL, 1, &w, &g, 0) != AD_OK) {
    fprintf(stderr, "consumer: %s\n", ad_tape_errmsg(tape));
    return 1;
  }
  /* dL/dW_ij against (L(W + h e_ij) - L(W - h e_ij)) / 2h on pixels that
   * carry ink in some image (elsewhere the gradient is 0 exactly). */
  const double h = 1e-5;
  double worst = 0;
  int checked = 0;
  int prev = ad_set_recording(tape, 0);
  for (int64_t i = 150; i < IN && checked < 12; i += 37)
    for (int64_t j = 0; j < OUT; j += 4) {
      ad_marker m = ad_mark(tape);
      double w0 = ad_get(w, i * OUT + j);
      ad_set(w, i * OUT + j, w0 + h);
      double lp = ad_item(loss_of(tape, train, w));
      ad_set(w, i * OUT + j, w0 - h);
      double lm = ad_item(loss_of(tape, train, w));
      ad_set(w, i * OUT + j, w0);
      ad_rewind(tape, m);
      double fd = (lp - lm) / (2 * h), ad = ad_get(g, i * OUT + j);
      double err = fabs(ad - fd) / (fabs(fd) + 1e-8);
      if (fabs(fd) > 1e-6) {
        checked++;
        if (err > worst) worst = err;
      }
    }
  ad_set_recording(tape, prev);
  printf("consumer: loss %.6f, %d gradient entries against finite differences, worst relative "
         "error %.2e, BLIS %s\n",
         ad_item(L), checked, worst, ad_blas_kernel());
  /* ln 10 = 2.303 for near-uniform predictions from small weights. */
  if (!(fabs(ad_item(L) - log(10.0)) < 0.5) || checked < 6 || !(worst < 1e-6)) fails++;
  ad_tensor_free(w);
  ad_tape_free(tape);
  ds_dataset_free(train);
  ds_dataset_free(test);
  printf("consumer: %s\n", fails ? "FAILED" : "ok");
  return fails ? 1 : 0;
}
