/* quickstart.c — the smallest complete use of the tape: fit y = 3x - 1 by
 * gradient descent with gradients from ad_grad, then show the recorded tape
 * of one step as a Wengert list, and the hypergradient of the final loss
 * with respect to the learning rate through the whole (recorded) run.
 *
 *   ./build/examples/quickstart
 *   ./build/examples/quickstart --steps 50 --lr 0.3 --seed 2
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, in example_util.h */
#include "example_util.h"
#include "hypertape.h"

#include <stdio.h>

#define N 32

int main(int argc, char **argv) {
  int steps = 200, threads = 0;
  double lr = 0.1;
  uint64_t seed = 1;
  const ex_opt opts[] = {{"--steps", EX_INT, &steps, "N",
                          .help = "gradient-descent steps of the fit", .min = 1, .max = 1e6},
                         {"--lr", EX_DOUBLE, &lr, "LR",
                          .help = "learning rate (also of the recorded run)", .max = 10,
                          .gt_min = 1},
                         {"--seed", EX_U64, &seed, "S", .help = "seeds the noise on the data"},
                         EX_OPT_THREADS(&threads),
                         {0}};
  ex_parse_args(argc, argv,
                "fits y = 3x - 1 by gradient descent, prints the tape of one step, and takes "
                "d loss / d lr through a recorded run",
                opts);
  ex_set_threads(threads);
  ad_tape *tape = NULL;
  if (ad_tape_new(&tape, &(ad_tape_opts){.arena_mb = 8}) != AD_OK) {
    fprintf(stderr, "%s\n", ad_last_error());
    return 1;
  }
  /* Data: x in [-1, 1], y = 3x - 1 + noise. */
  ad_rng rng;
  ad_rng_seed(&rng, seed);
  double xs[N], ys[N];
  for (int i = 0; i < N; i++) {
    xs[i] = -1 + 2.0 * i / (N - 1);
    ys[i] = 3 * xs[i] - 1 + 0.05 * ad_rng_normal(&rng);
  }
  ad_tensor *x = ad_const(tape, AD_F64, 2, (int64_t[]){N, 1}, xs);
  ad_tensor *y = ad_const(tape, AD_F64, 2, (int64_t[]){N, 1}, ys);
  ad_set_name(x, "x");
  ad_set_name(y, "y");

  /* Parameters w (slope) and b (bias) live on the heap: leaves of any tape. */
  ad_tensor *w = NULL, *b = NULL;
  ad_tensor_new(&w, AD_F64, 2, (int64_t[]){1, 1});
  ad_tensor_new(&b, AD_F64, 1, (int64_t[]){1});
  ad_requires_grad(w, 1);
  ad_requires_grad(b, 1);
  ad_set_name(w, "w");
  ad_set_name(b, "b");
  ad_tensor *params[2] = {w, b};

  ad_marker start = ad_mark(tape);
  for (int step = 0; step < steps; step++) {
    ad_marker m = ad_mark(tape);
    ad_tensor *pred = ad_add_rowvec(tape, ad_matmul(tape, x, w, 0, 0), b);
    ad_tensor *loss = ad_mse(tape, pred, y), *g[2];
    if (step == 0) {
      printf("the tape of one step (forward only):\n");
      ad_tape_print(tape, stdout);
    }
    if (ad_grad(tape, 1, &loss, NULL, 2, params, g, 0) != AD_OK) {
      fprintf(stderr, "%s\n", ad_tape_errmsg(tape));
      return 1;
    }
    char where[32];
    snprintf(where, sizeof where, "step %d", step);
    if (ex_diverged("quickstart", ad_item(loss), where)) goto fail;
    /* w -= lr dL/dw: in place, nothing recorded. */
    for (int k = 0; k < 2; k++) ad_set(params[k], 0, ad_get(params[k], 0) - lr * ad_item(g[k]));
    if (step % 50 == 0) printf("step %3d  loss %.6f\n", step, ad_item(loss));
    ad_rewind(tape, m); /* the next step reuses the same memory */
  }
  printf("fitted w = %.4f (true 3), b = %.4f (true -1)\n", ad_item(w), ad_item(b));

  /* The same run, recorded, with the learning rate as a tape variable: the
   * derivative of the final loss with respect to it flows back through all
   * 20 steps (each step's backward was recorded with AD_GRAD_RECORD). */
  ad_rewind(tape, start);
  ad_tensor *lr_t = ad_scalar(tape, AD_F64, lr);
  ad_requires_grad(lr_t, 1);
  ad_tensor *wt = ad_zeros(tape, AD_F64, 2, (int64_t[]){1, 1}),
            *bt = ad_zeros(tape, AD_F64, 1, (int64_t[]){1});
  ad_requires_grad(wt, 1);
  ad_requires_grad(bt, 1);
  ad_tensor *loss = NULL;
  for (int step = 0; step <= 20; step++) {
    ad_tensor *cur[2] = {wt, bt}, *g[2];
    loss = ad_mse(tape, ad_add_rowvec(tape, ad_matmul(tape, x, wt, 0, 0), bt), y);
    if (step == 20) break;
    ad_grad(tape, 1, &loss, NULL, 2, cur, g, AD_GRAD_RECORD);
    wt = ad_sub(tape, wt, ad_mul(tape, lr_t, g[0]));
    bt = ad_sub(tape, bt, ad_mul(tape, lr_t, g[1]));
  }
  ad_tensor *dlr = NULL;
  if (ad_grad(tape, 1, &loss, NULL, 1, &lr_t, &dlr, 0) != AD_OK) {
    fprintf(stderr, "%s\n", ad_tape_errmsg(tape));
    return 1;
  }
  if (ex_diverged("quickstart", ad_item(loss), "the end of the recorded run")) goto fail;
  ad_arena_stats st;
  ad_arena_stats_get(tape, &st);
  printf("after 20 recorded steps: loss %.6f, dloss/dlr = %.6f (%zu nodes on the tape)\n",
         ad_item(loss), ad_item(dlr), st.n_nodes);
  printf("GEMM kernels: %s (%s), threads %d\n", ad_blas_kernel(), ad_blas_reason(),
         ad_blas_threads());
  ad_tensor_free(w);
  ad_tensor_free(b);
  ad_tape_free(tape);
  return 0;
fail:
  ad_tensor_free(w);
  ad_tensor_free(b);
  ad_tape_free(tape);
  return 1;
}
