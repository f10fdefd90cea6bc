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
#include "example_util.h"
#include "nn/nn.h"

#include <stdio.h>

enum { IN = 784, HIDDEN = 200, OUT = 10, BATCH = 32 };

/* logits [N, 10] = relu(x w1^T + b1) w2^T + b2 */
static ad_tensor *forward(ad_tape *t, const nn_params *p, ad_tensor *x) {
  ad_tensor *h = ad_relu(t, nn_linear(t, x, nn_params_get(p, "fc1.w"), nn_params_get(p, "fc1.b")));
  return nn_linear(t, h, nn_params_get(p, "fc2.w"), nn_params_get(p, "fc2.b"));
}

/* Test accuracy, values only (recording off): one forward over the whole
 * test set, then everything it allocated is rewound. */
static int evaluate(ad_tape *t, const nn_params *p, const ds_dataset *test, double *acc) {
  ad_marker m = ad_mark(t);
  int prev = ad_set_recording(t, 0);
  ad_tensor *logits = forward(t, p, test->x);
  ad_set_recording(t, prev);
  if (logits) *acc = (double)ex_hits(logits, test->labels) / (double)test->n;
  ad_rewind(t, m);
  return logits != NULL;
}

int main(int argc, char **argv) {
  ex_options o = {.epochs = 15, .seed = 1, .lr = 0.2};
  const ex_opt opts[] = {EX_OPTS_MNIST(&o), {0}};
  ex_parse_args(argc, argv, "a 784-200-10 MLP trained with SGD on MNIST; ends with a summary: line",
                opts);
  ex_set_threads(o.threads);

  ds_dataset *train = NULL, *test = NULL;
  ad_tape *tape = NULL;
  nn_params *p = NULL;
  ds_iter *it = NULL;
  ad_tensor *xb = NULL;
  nn_opt_state st = {0};
  int status = 1;
  if (ex_load_mnist("mnist_mlp", &o, &train, &test) != 0) goto out;
  printf("mnist_mlp: %lld train / %lld test digits, %d-%d-%d MLP, SGD lr %g, batch %d, "
         "BLIS %s, threads %d\n",
         (long long)train->n, (long long)test->n, IN, HIDDEN, OUT, o.lr, BATCH, ad_blas_kernel(),
         ad_blas_threads());

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
  double t0 = ex_now_s(), acc = 0;
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
      /* A loss that is no longer a number means the run diverged: stop,
       * rather than train on and report an accuracy of garbage. */
      char where[64];
      snprintf(where, sizeof where, "epoch %d, step %lld", epoch, (long long)steps + 1);
      if (ex_diverged("mnist_mlp", ad_item(loss), where)) goto out;
      loss_sum += ad_item(loss);
      steps++;
      ad_rewind(tape, start); /* everything of this step is gone */
    } while (!b.epoch_end);

    if (!evaluate(tape, p, test, &acc)) {
      fprintf(stderr, "mnist_mlp: evaluation failed: %s\n", ad_tape_errmsg(tape));
      goto out;
    }
    printf("epoch %2d/%d  train_loss %.4f  test_accuracy %.4f  %.2f s\n", epoch, o.epochs,
           loss_sum / (double)steps, acc, ex_now_s() - t0);
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
  printf("summary: test_accuracy=%.4f epochs=%d seconds=%.2f\n", acc, o.epochs, ex_now_s() - t0);
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
