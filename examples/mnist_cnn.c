/* mnist_cnn — a small convolutional net trained with SGD on MNIST:
 *
 *   x [N, 1, 28, 28]
 *   conv 3x3, 16 filters, pad 1 -> relu -> max pool 2   [N, 16, 14, 14]
 *   conv 3x3, 32 filters, pad 1 -> relu -> max pool 2   [N, 32, 7, 7]
 *   flatten -> linear 1568 -> 10                        logits [N, 10]
 *
 * SGD with momentum 0.9, lr 0.05, the last third of the epochs at lr 0.005.
 *
 *     ./build/examples/mnist_cnn                       # embedded 8,000 / 2,000 digits
 *     ./build/examples/mnist_cnn --data ~/fashion-mnist --epochs 5 --threads 2
 *
 * The same loop as mnist_mlp: one nn_params block, a recorded forward,
 * ad_grad, nn_opt_step in place, ad_rewind. nn_conv2d runs im2col + one BLIS
 * GEMM per image with its workspace in the tape's arena, so after the first
 * step nothing is allocated. bench/bench_train_step_cnn.c times one step of
 * this net (batch 64).
 * Ends with one line: summary: test_accuracy=0.xxxx epochs=N seconds=S */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "autodiff/ad.h"
#include "datasets/ds.h"
#include "example_util.h"
#include "nn/nn.h"

#include <stdio.h>

enum { SIDE = 28, C1 = 16, C2 = 32, OUT = 10, BATCH = 64, EVAL_CHUNK = 250 };
#define FLAT (C2 * (SIDE / 4) * (SIDE / 4))

/* logits [N, 10] from images x [N, 784] */
static ad_tensor *forward(ad_tape *t, const nn_params *p, ad_tensor *x) {
  const int64_t img[4] = {x->shape[0], 1, SIDE, SIDE};
  ad_tensor *h = ad_reshape(t, x, 4, img);
  h = ad_relu(t, nn_conv2d(t, h, nn_params_get(p, "conv1.w"), nn_params_get(p, "conv1.b"), 1, 1));
  h = nn_max_pool2d(t, h, 2, 2, 0); /* [N, 16, 14, 14] */
  h = ad_relu(t, nn_conv2d(t, h, nn_params_get(p, "conv2.w"), nn_params_get(p, "conv2.b"), 1, 1));
  h = nn_max_pool2d(t, h, 2, 2, 0); /* [N, 32, 7, 7] */
  return nn_linear(t, nn_flatten(t, h), nn_params_get(p, "fc.w"), nn_params_get(p, "fc.b"));
}

/* Test accuracy, values only, in chunks so the activations stay small. */
static int evaluate(ad_tape *t, const nn_params *p, const ds_dataset *test, double *acc) {
  ad_marker m = ad_mark(t);
  int prev = ad_set_recording(t, 0);
  int64_t right = 0;
  for (int64_t i = 0; i < test->n; i += EVAL_CHUNK) {
    int64_t n = test->n - i < EVAL_CHUNK ? test->n - i : EVAL_CHUNK;
    const int64_t shape[2] = {n, test->dim};
    ad_tensor *x = ad_const(t, AD_F32, 2, shape, (const float *)test->x->data + i * test->dim);
    ad_tensor *logits = x ? forward(t, p, x) : NULL;
    if (!logits) break;
    right += ex_hits(logits, test->labels + i);
    ad_rewind(t, m);
  }
  ad_set_recording(t, prev);
  ad_rewind(t, m);
  *acc = (double)right / (double)test->n;
  return ad_tape_status(t) == AD_OK;
}

int main(int argc, char **argv) {
  ex_options o = {.epochs = 6, .seed = 1, .lr = 0.05};
  const double momentum = 0.9;
  const ex_opt opts[] = {EX_OPTS_MNIST(&o), {0}};
  ex_parse_args(argc, argv,
                "a conv-pool-conv-pool-linear net trained with SGD + momentum on MNIST; ends with "
                "a summary: line",
                opts);
  ex_set_threads(o.threads);

  ds_dataset *train = NULL, *test = NULL;
  ad_tape *tape = NULL;
  nn_params *p = NULL;
  ds_iter *it = NULL;
  ad_tensor *xb = NULL;
  nn_opt_state st = {0};
  int status = 1;
  if (ex_load_mnist("mnist_cnn", &o, &train, &test) != 0) goto out;
  printf("mnist_cnn: %lld train / %lld test digits, conv%d-pool-conv%d-pool-fc%d, SGD lr %g "
         "momentum %g, batch %d, BLIS %s, threads %d\n",
         (long long)train->n, (long long)test->n, C1, C2, OUT, o.lr, momentum, BATCH,
         ad_blas_kernel(), ad_blas_threads());

  const nn_param_spec specs[6] = {{"conv1.w", 4, {C1, 1, 3, 3}},  {"conv1.b", 1, {C1}},
                                  {"conv2.w", 4, {C2, C1, 3, 3}}, {"conv2.b", 1, {C2}},
                                  {"fc.w", 2, {OUT, FLAT}},       {"fc.b", 1, {OUT}}};
  ad_rng rng;
  ad_rng_seed(&rng, o.seed);
  if (nn_params_new(&p, AD_F32, 6, specs) != AD_OK ||
      nn_init_kaiming(nn_params_get(p, "conv1.w"), &rng, NN_INIT_NORMAL, 0) != AD_OK ||
      nn_init_kaiming(nn_params_get(p, "conv2.w"), &rng, NN_INIT_NORMAL, 0) != AD_OK ||
      nn_init_kaiming(nn_params_get(p, "fc.w"), &rng, NN_INIT_NORMAL, 1.0) != AD_OK) {
    fprintf(stderr, "mnist_cnn: %s\n", ad_last_error());
    goto out;
  }
  if (o.load && nn_params_load(p, o.load) != AD_OK) {
    fprintf(stderr, "mnist_cnn: %s\n", ad_last_error());
    goto out;
  }
  ad_tensor *const *w = nn_params_list(p);
  nn_opt_cfg cfg = {.kind = NN_OPT_MOMENTUM, .lr = o.lr, .momentum = momentum};
  if (nn_opt_state_init(&cfg, &st, 6, w) != AD_OK ||
      ad_tape_new(&tape, &(ad_tape_opts){.arena_mb = 64, .arena_max_mb = 256}) != AD_OK ||
      ds_iter_new(&it, train->x, train->labels, NULL,
                  &(ds_iter_opts){.batch = BATCH, .seed = o.seed}) != AD_OK ||
      ad_tensor_new(&xb, AD_F32, 2, (int64_t[]){BATCH, SIDE * SIDE}) != AD_OK) {
    fprintf(stderr, "mnist_cnn: setup failed: %s%s\n", ad_last_error(), ds_errmsg());
    goto out;
  }

  int32_t yb[BATCH];
  double t0 = ex_now_s(), acc = 0;
  ad_marker start = ad_mark(tape);
  for (int epoch = 1; epoch <= o.epochs; epoch++) {
    /* Step decay: the last third of the epochs at a tenth of the rate. */
    cfg.lr = 3 * (epoch - 1) >= 2 * o.epochs ? 0.1 * o.lr : o.lr;
    double loss_sum = 0;
    int64_t steps = 0;
    ds_batch b;
    do {
      if (ds_iter_next(it, xb, yb, NULL, &b) != AD_OK) {
        fprintf(stderr, "mnist_cnn: %s\n", ds_errmsg());
        goto out;
      }
      ad_tensor *loss = ad_cross_entropy(tape, forward(tape, p, xb), yb, BATCH);
      ad_tensor *g[6];
      if (ad_grad(tape, 1, &loss, NULL, 6, w, g, 0) != AD_OK ||
          nn_opt_step(&cfg, &st, 6, w, g) != AD_OK) {
        fprintf(stderr, "mnist_cnn: step failed: %s%s\n", ad_tape_errmsg(tape), ad_last_error());
        goto out;
      }
      /* A loss that is no longer a number means the run diverged: stop,
       * rather than train on and report an accuracy of garbage. */
      char where[64];
      snprintf(where, sizeof where, "epoch %d, step %lld", epoch, (long long)steps + 1);
      if (ex_diverged("mnist_cnn", ad_item(loss), where)) goto out;
      loss_sum += ad_item(loss);
      steps++;
      ad_rewind(tape, start);
    } while (!b.epoch_end);
    if (!evaluate(tape, p, test, &acc)) {
      fprintf(stderr, "mnist_cnn: evaluation failed: %s\n", ad_tape_errmsg(tape));
      goto out;
    }
    printf("epoch %2d/%d  lr %.4f  train_loss %.4f  test_accuracy %.4f  %.2f s\n", epoch, o.epochs,
           cfg.lr, loss_sum / (double)steps, acc, ex_now_s() - t0);
    fflush(stdout);
  }
  if (o.epochs == 0 && !evaluate(tape, p, test, &acc)) {
    fprintf(stderr, "mnist_cnn: evaluation failed: %s\n", ad_tape_errmsg(tape));
    goto out;
  }
  if (o.save) {
    if (nn_params_save(p, o.save) != AD_OK) {
      fprintf(stderr, "mnist_cnn: %s\n", ad_last_error());
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
