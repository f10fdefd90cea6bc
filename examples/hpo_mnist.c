/* hpo_mnist — hyperparameter optimization end to end: a weight decay for
 * every single weight of a 784-200-10 MLP, learned by hypergradient descent
 * on MNIST.
 *
 *   Upper:  min_lam  L_val(w_T(lam))                (cross-entropy, held-out digits)
 *   Lower:  w_T = T steps of SGD on  L_train(w, lam) = CE(w) + 1/2 sum lam * w^2
 *
 *     ./build/examples/hpo_mnist                         # unrolled hypergradient
 *     ./build/examples/hpo_mnist --method cg --outer 20  # implicit (CG) instead
 *     ./build/examples/hpo_mnist --data ~/mnist          # full MNIST
 *
 * Each outer iteration asks a bilevel method (bl.h) for dL_val/dlam from the
 * current weights, takes an Adam step on lam (the same nn_opt_step that
 * trains weights, here on hyperparameters), keeps lam >= 0, and then trains
 * the weights T more steps with the new decay: warm-started training, as in
 * online HPO. Ends with one line:
 *   summary: method=M val_loss_first=A val_loss_last=B test_accuracy=C seconds=S */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "example_util.h"
#include "hypertape.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { IN = 784, HIDDEN = 200, OUT = 10, BATCH = 128, VAL_BATCH = 512 };

typedef struct {
  const ds_dataset *train, *val;
  int64_t offset; /* first training batch of the current outer iteration */
} data_ctx;

/* Cross-entropy of the MLP on rows [start, start + n) of a data set. */
static ad_tensor *ce(ad_tape *t, ad_tensor *const *w, const ds_dataset *d, int64_t start,
                     int64_t n) {
  ad_tensor *x =
      ad_const(t, AD_F32, 2, (int64_t[]){n, IN}, ((const float *)d->x->data) + start * IN);
  ad_tensor *h = ad_relu(t, ad_matmul(t, x, w[0], 0, 0));
  return ad_cross_entropy(t, ad_matmul(t, h, w[1], 0, 0), d->labels + start, n);
}

/* L_train(w, lam) = CE on batch (offset + step) + 1/2 sum_i <lam_i * w_i, w_i> */
static ad_tensor *train_loss(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                             void *ctx) {
  data_ctx *c = ctx;
  int64_t nb = c->train->n / BATCH, b = (c->offset + (step < 0 ? 0 : step)) % nb;
  ad_tensor *loss = ce(t, w, c->train, b * BATCH, BATCH);
  for (int i = 0; i < 2; i++)
    loss = ad_add(t, loss, ad_scale(t, ad_dot(t, ad_mul(t, lam[i], w[i]), w[i]), 0.5));
  return loss;
}

/* L_val(w) = CE on a fixed validation batch (no direct dependence on lam). */
static ad_tensor *val_loss(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                           void *ctx) {
  (void)lam, (void)step;
  data_ctx *c = ctx;
  return ce(t, w, c->val, 0, VAL_BATCH);
}

static double accuracy(ad_tape *t, ad_tensor *const *w, const ds_dataset *d) {
  int prev = ad_set_recording(t, 0);
  int64_t right = 0;
  for (int64_t s = 0; s < d->n; s += VAL_BATCH) {
    int64_t n = d->n - s < VAL_BATCH ? d->n - s : VAL_BATCH;
    ad_marker m = ad_mark(t);
    ad_tensor *x = ad_const(t, AD_F32, 2, (int64_t[]){n, IN}, ((const float *)d->x->data) + s * IN);
    ad_tensor *lg = ad_matmul(t, ad_relu(t, ad_matmul(t, x, w[0], 0, 0)), w[1], 0, 0);
    if (lg) right += ex_hits(lg, d->labels + s);
    ad_rewind(t, m);
  }
  ad_set_recording(t, prev);
  return (double)right / (double)d->n;
}

static const struct {
  const char *name;
  bl_method_fn fn;
} METHODS[] = {{"unroll", bl_unroll},
               {"checkpointed", bl_checkpointed},
               {"one_step", bl_one_step},
               {"greedy", bl_greedy},
               {"t1t2", bl_t1t2},
               {"neumann", bl_neumann},
               {"cg", bl_cg},
               {"fixed_point", bl_fixed_point},
               {"drmad", bl_drmad},
               {"hyperdistill", bl_hyperdistill},
               {"sama", bl_sama}};

int main(int argc, char **argv) {
  const char *dir = NULL, *method = "unroll";
  int outer = 30, threads = 0;
  int64_t inner = 20;
  uint64_t seed = 7;
  double outer_lr = 1e-3;
  enum { N_METHODS = sizeof METHODS / sizeof METHODS[0] };
  const char *names[N_METHODS + 1] = {NULL};
  for (size_t k = 0; k < N_METHODS; k++) names[k] = METHODS[k].name;
  const ex_opt opts[] = {
      {"--method", EX_STR, &method, "M", .help = "the hypergradient method", .choices = names},
      {"--outer", EX_INT, &outer, "N", .help = "outer (hypergradient) iterations", .min = 1,
       .max = 1e6},
      {"--inner", EX_I64, &inner, "T", .help = "inner SGD steps per outer iteration", .min = 1,
       .max = 1e6},
      {"--outer-lr", EX_DOUBLE, &outer_lr, "LR", .help = "Adam learning rate on the decays",
       .max = 10, .gt_min = 1},
      {"--data", EX_STR, &dir, "DIR",
       .help = "MNIST or Fashion-MNIST IDX files (default: the embedded subset)"},
      {"--seed", EX_U64, &seed, "S", .help = "seeds the initial weights"},
      EX_OPT_THREADS(&threads),
      {0}};
  ex_parse_args(argc, argv,
                "learns a weight decay for every weight of an MLP on MNIST by hypergradient "
                "descent",
                opts);
  bl_method_fn fn = NULL;
  for (size_t k = 0; k < N_METHODS; k++)
    if (!strcmp(method, METHODS[k].name)) fn = METHODS[k].fn;
  ex_set_threads(threads);

  /* Data: the training split is cut into inner-training and validation. */
  ds_dataset *all = NULL, *test = NULL, *train = NULL, *val = NULL;
  if (ds_mnist_load(&all, dir, "train", NULL) || ds_mnist_load(&test, dir, "test", NULL)) {
    fprintf(stderr, "%s\n", ds_errmsg());
    return 1;
  }
  int64_t n_val = all->n / 4;
  if (ds_dataset_slice(&train, all, 0, all->n - n_val) ||
      ds_dataset_slice(&val, all, all->n - n_val, n_val) || n_val < VAL_BATCH) {
    fprintf(stderr, "data set too small: %s\n", ds_errmsg());
    return 1;
  }
  data_ctx ctx = {train, val, 0};

  /* Weights (Kaiming-scaled normals) and one decay per weight, all 1e-4. */
  ad_rng rng;
  ad_rng_seed(&rng, seed);
  ad_tensor *w[2], *lam[2], *hg[2];
  const int64_t shapes[2][2] = {{IN, HIDDEN}, {HIDDEN, OUT}};
  for (int i = 0; i < 2; i++) {
    if (ad_tensor_new(&w[i], AD_F32, 2, shapes[i]) ||
        ad_tensor_new(&lam[i], AD_F32, 2, shapes[i]) ||
        ad_tensor_new(&hg[i], AD_F32, 2, shapes[i])) {
      fprintf(stderr, "%s\n", ad_last_error());
      return 1;
    }
    ad_tensor_fill_normal(w[i], &rng, 0.0, sqrt(2.0 / (double)shapes[i][0]));
    ad_requires_grad(w[i], 1);
    for (int64_t j = 0; j < lam[i]->size; j++) ad_set(lam[i], j, 1e-4);
    ad_requires_grad(lam[i], 1);
  }
  ad_tape *tape = NULL;
  if (ad_tape_new(&tape, &(ad_tape_opts){.arena_mb = 64, .arena_max_mb = 4096})) {
    fprintf(stderr, "%s\n", ad_last_error());
    return 1;
  }
  nn_opt_cfg inner_opt = {.kind = NN_OPT_SGD, .lr = 0.1};
  bl_problem p = {.n_w = 2,
                  .w0 = w,
                  .n_lam = 2,
                  .lam = lam,
                  .train_loss = train_loss,
                  .val_loss = val_loss,
                  .ctx = &ctx,
                  .opt = inner_opt,
                  .inner_steps = inner};
  nn_opt_cfg outer_opt = {.kind = NN_OPT_ADAM, .lr = outer_lr};
  nn_opt_state outer_state;
  if (nn_opt_state_init(&outer_opt, &outer_state, 2, lam)) {
    fprintf(stderr, "%s\n", ad_last_error());
    return 1;
  }
  printf("hpo_mnist: %lld train / %lld val / %lld test digits, method %s, T = %lld, GEMM %s, "
         "threads %d\n",
         (long long)train->n, (long long)val->n, (long long)test->n, method, (long long)inner,
         ad_blas_kernel(), ad_blas_threads());
  double t0 = ex_now_s(), first = NAN, last = NAN;
  for (int it = 0; it < outer; it++) {
    bl_stats st;
    if (fn(tape, &p, &(bl_opts){0}, hg, &st) != AD_OK) {
      fprintf(stderr, "%s: %s\n", method, ad_tape_errmsg(tape));
      return 1;
    }
    if (!isfinite(st.val_loss)) {
      fprintf(stderr, "hpo_mnist: the validation loss is %g at outer %d: stopping\n", st.val_loss,
              it);
      return 1;
    }
    if (it == 0) first = st.val_loss;
    last = st.val_loss;
    /* Hypergradient step on lam, kept non-negative (a decay, not a push). */
    nn_opt_step(&outer_opt, &outer_state, 2, lam, hg);
    double lam_mean = 0;
    for (int i = 0; i < 2; i++)
      for (int64_t j = 0; j < lam[i]->size; j++) {
        if (ad_get(lam[i], j) < 0) ad_set(lam[i], j, 0);
        lam_mean += ad_get(lam[i], j) / (double)(lam[0]->size + lam[1]->size);
      }
    /* Warm start: train the weights T steps with the new decay, in place. */
    for (int64_t s = 0; s < inner; s++) {
      ad_marker m = ad_mark(tape);
      ad_tensor *L = train_loss(tape, w, lam, s, &ctx), *g[2];
      if (ad_grad(tape, 1, &L, NULL, 2, w, g, 0) || nn_opt_step(&inner_opt, NULL, 2, w, g)) {
        fprintf(stderr, "training: %s\n", ad_tape_errmsg(tape));
        return 1;
      }
      char where[64];
      snprintf(where, sizeof where, "outer %d, inner step %lld", it, (long long)s);
      if (ex_diverged("hpo_mnist", ad_item(L), where)) return 1;
      ad_rewind(tape, m);
    }
    ctx.offset += inner;
    if (it % 5 == 0 || it == outer - 1)
      printf("outer %3d  val_loss(w_T) %.4f  mean decay %.2e  peak arena %.1f MB  %.2f s\n", it,
             st.val_loss, lam_mean, (double)st.peak_arena_bytes / 1048576.0, ex_now_s() - t0);
  }
  double acc = accuracy(tape, w, test);
  printf("summary: method=%s val_loss_first=%.4f val_loss_last=%.4f test_accuracy=%.4f "
         "seconds=%.2f\n",
         method, first, last, acc, ex_now_s() - t0);
  nn_opt_state_free(&outer_state);
  for (int i = 0; i < 2; i++) {
    ad_tensor_free(w[i]);
    ad_tensor_free(lam[i]);
    ad_tensor_free(hg[i]);
  }
  ad_tape_free(tape);
  ds_dataset_free(all);
  ds_dataset_free(test);
  ds_dataset_free(train);
  ds_dataset_free(val);
  return 0;
}
