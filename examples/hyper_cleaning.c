/* hyper_cleaning — data hyper-cleaning (Franceschi et al. 2017): half of the
 * training labels are wrong, and a weight per training example, learned by
 * hypergradient on a small clean validation set, finds which.
 *
 *   Upper:  min_lam  L_val(w*(lam))                      (mean CE, clean digits)
 *   Lower:  w*(lam) = argmin_w  1/n sum_i sigmoid(lam_i) CE_i(w) + wd/2 ||W||^2
 *
 * The model is softmax regression (W [784, 10], b [10]) trained by full-batch
 * gradient descent. Each outer step asks a bilevel method for dL_val/dlam at
 * the current weights (an implicit method, cg by default, after one more
 * inner step: it needs w near w*(lam), which the warm start keeps; the others
 * through T inner steps from them), takes an Adam step on the logits lam, and
 * trains the weights T more steps with the new weighting (warm start). At the end the
 * same model is trained from scratch for the same budget twice: on the learned
 * weighting (test_accuracy) and on the noisy labels as they are
 * (baseline_accuracy); an example counts as flagged when sigmoid(lam_i) < 0.5,
 * and f1 scores the flags against the labels that were really changed.
 *
 *     ./build/examples/hyper_cleaning                     # 4,000 / 1,000 / 2,000 embedded digits
 *     ./build/examples/hyper_cleaning --method unroll     # reverse mode through the inner run
 *     ./build/examples/hyper_cleaning --data ~/mnist --franceschi   # the paper's
 * 5,000/5,000/10,000
 *
 * Ends with one line:
 *   summary: method=M test_accuracy=A baseline_accuracy=B oracle_accuracy=O f1=F ... */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "example_util.h"
#include "hypertape.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { IN = 784, OUT = 10 };

typedef struct {
  ad_tensor *x;          /* [n, 784] heap tensor: a constant input, never copied */
  const int32_t *labels; /* the labels the model is trained on (noisy for train) */
  int64_t n;
} split;

typedef struct {
  split train, val;
  double wd; /* L2 on W: keeps the inner problem strongly convex (implicit methods) */
} clean_ctx;

/* Logits x W + b of a split. */
static ad_tensor *logits(ad_tape *t, ad_tensor *const *w, const split *s) {
  return ad_add_rowvec(t, ad_matmul(t, s->x, w[0], 0, 0), w[1]);
}

/* L_train(w, lam) = 1/n sum_i sigmoid(lam_i) CE_i(w) + wd/2 ||W||^2. One
 * batch (all n examples), so the step index is not used. */
static ad_tensor *train_loss(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                             void *vctx) {
  (void)step;
  clean_ctx *c = vctx;
  ad_tensor *ce = nn_cross_entropy_each(t, logits(t, w, &c->train), c->train.labels, c->train.n);
  ad_tensor *fit = ad_scale(t, ad_dot(t, ad_sigmoid(t, lam[0]), ce), 1.0 / (double)c->train.n);
  return ad_add(t, fit, ad_scale(t, ad_dot(t, w[0], w[0]), 0.5 * c->wd));
}

/* L_val(w) = mean CE on the clean validation digits (lam enters only through w). */
static ad_tensor *val_loss(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                           void *vctx) {
  (void)lam, (void)step;
  clean_ctx *c = vctx;
  return ad_cross_entropy(t, logits(t, w, &c->val), c->val.labels, c->val.n);
}

static double accuracy(ad_tape *t, ad_tensor *const *w, const split *s) {
  int prev = ad_set_recording(t, 0);
  ad_marker m = ad_mark(t);
  ad_tensor *z = logits(t, w, s);
  double acc = z ? (double)ex_hits(z, s->labels) / (double)s->n : NAN;
  ad_rewind(t, m);
  ad_set_recording(t, prev);
  return acc;
}

/* `steps` full-batch gradient-descent steps on L_train(w, lam), in place. */
static int train(ad_tape *t, const nn_opt_cfg *opt, ad_tensor *const *w, ad_tensor *lam,
                 clean_ctx *c, int64_t steps) {
  for (int64_t s = 0; s < steps; s++) {
    ad_marker m = ad_mark(t);
    ad_tensor *L = train_loss(t, w, &lam, s, c), *g[2];
    if (!L || ad_grad(t, 1, &L, NULL, 2, w, g, 0) || nn_opt_step(opt, NULL, 2, w, g)) {
      fprintf(stderr, "hyper_cleaning: training: %s\n", ad_tape_errmsg(t));
      return -1;
    }
    if (ex_diverged("hyper_cleaning", ad_item(L), "a training step")) return -1;
    ad_rewind(t, m);
  }
  return 0;
}

/* Flags (sigmoid(lam_i) < 0.5, i.e. lam_i < 0) against the truth. */
typedef struct {
  double precision, recall, f1, w_clean, w_noisy; /* w_*: mean weight of each group */
} flag_score;

static flag_score score(const ad_tensor *lam, const uint8_t *flipped) {
  int64_t tp = 0, fp = 0, fn = 0, n = lam->size, n_noisy = 0;
  double wc = 0, wn = 0;
  for (int64_t i = 0; i < n; i++) {
    double l = ad_get(lam, i), wgt = 1 / (1 + exp(-l));
    int flag = l < 0;
    tp += flag && flipped[i];
    fp += flag && !flipped[i];
    fn += !flag && flipped[i];
    n_noisy += flipped[i];
    *(flipped[i] ? &wn : &wc) += wgt;
  }
  flag_score f = {0};
  f.precision = tp + fp ? (double)tp / (double)(tp + fp) : 0;
  f.recall = tp + fn ? (double)tp / (double)(tp + fn) : 0;
  f.f1 = tp ? 2 * f.precision * f.recall / (f.precision + f.recall) : 0;
  f.w_noisy = n_noisy ? wn / (double)n_noisy : NAN;
  f.w_clean = n > n_noisy ? wc / (double)(n - n_noisy) : NAN;
  return f;
}

/* implicit: the method needs w near w*(lam), not a trajectory, so it gets
 * one inner step from the current (warm-started) weights; the others
 * differentiate through T inner steps from them. */
static const struct {
  const char *name;
  bl_method_fn fn;
  int implicit;
} METHODS[] = {{"cg", bl_cg, 1},
               {"neumann", bl_neumann, 1},
               {"fixed_point", bl_fixed_point, 1},
               {"hoag", bl_hoag, 1},
               {"unroll", bl_unroll, 0},
               {"checkpointed", bl_checkpointed, 0},
               {"drmad", bl_drmad, 0},
               {"one_step", bl_one_step, 0},
               {"t1t2", bl_t1t2, 0},
               {"greedy", bl_greedy, 0},
               {"hyperdistill", bl_hyperdistill, 0},
               {"sama", bl_sama, 0}};
enum { N_METHODS = sizeof METHODS / sizeof METHODS[0] };

int main(int argc, char **argv) {
  const char *method = "cg", *dir = NULL, *log_path = "/tmp/hyper_cleaning.jsonl";
  int steps = 100, inner = 20, budget = 400, warmup = 100, threads = 0, franceschi = 0;
  uint64_t seed = 1;
  double outer_lr = 0.1;
  const char *names[N_METHODS + 1] = {0};
  for (int k = 0; k < N_METHODS; k++) names[k] = METHODS[k].name;
  const ex_opt opts[] = {
      {"--method", EX_STR, &method, "M", .help = "hypergradient method", .choices = names},
      {"--steps", EX_INT, &steps, "N", .help = "outer (hypergradient) steps", .max = 100000},
      {"--inner", EX_INT, &inner, "T", .help = "inner GD steps per outer step", .min = 1,
       .max = 100000},
      {"--warmup", EX_INT, &warmup, "W", .help = "GD steps before the first hypergradient",
       .max = 1000000},
      {"--budget", EX_INT, &budget, "B", .help = "GD steps of each final training run", .min = 1,
       .max = 1000000},
      {"--seed", EX_U64, &seed, "S", .help = "which labels are corrupted, and how"},
      {"--data", EX_STR, &dir, "DIR",
       .help = "MNIST IDX files (default: the embedded 8,000/2,000 digits)"},
      {"--franceschi", EX_FLAG, &franceschi, NULL,
       .help = "Franceschi et al. 2017's split: 5,000 train (2,500 flipped), 5,000 validation, "
               "10,000 test; needs --data with the full MNIST"},
      {"--outer-lr", EX_DOUBLE, &outer_lr, "LR", .help = "Adam step on the example logits",
       .max = 100, .gt_min = 1},
      {"--log", EX_STR, &log_path, "FILE", .help = "JSON lines, one per outer step"},
      EX_OPT_THREADS(&threads),
      {0}};
  ex_parse_args(argc, argv,
                "data hyper-cleaning: one weight per training example, learned by hypergradient, "
                "finds the corrupted labels",
                opts);
  bl_method_fn fn = NULL;
  int implicit = 0;
  for (int k = 0; k < N_METHODS; k++)
    if (!strcmp(method, METHODS[k].name)) fn = METHODS[k].fn, implicit = METHODS[k].implicit;
  if (franceschi && !dir)
    ex_usage_error("--franceschi needs --data DIR with the full MNIST (10,000 training digits are "
                   "more than the embedded 8,000)");
  ex_set_threads(threads);
  const int64_t n_train = franceschi ? 5000 : 4000, n_val = franceschi ? 5000 : 1000,
                n_test = franceschi ? 10000 : 2000;

  /* Data: train and validation are disjoint slices of the training split. */
  ds_dataset *all = NULL, *test_all = NULL, *tr = NULL, *va = NULL, *te = NULL;
  if (ds_mnist_load(&all, dir, "train", NULL) || ds_mnist_load(&test_all, dir, "test", NULL)) {
    fprintf(stderr, "hyper_cleaning: %s\n", ds_errmsg());
    return 1;
  }
  if (all->n < n_train + n_val || test_all->n < n_test || all->dim != IN) {
    fprintf(stderr,
            "hyper_cleaning: need %lld training and %lld test 28x28 digits, found %lld "
            "and %lld\n",
            (long long)(n_train + n_val), (long long)n_test, (long long)all->n,
            (long long)test_all->n);
    return 1;
  }
  if (ds_dataset_slice(&tr, all, 0, n_train) || ds_dataset_slice(&va, all, n_train, n_val) ||
      ds_dataset_slice(&te, test_all, 0, n_test)) {
    fprintf(stderr, "hyper_cleaning: %s\n", ds_errmsg());
    return 1;
  }
  /* Half of the training labels replaced by another class. */
  int32_t *noisy = malloc(sizeof(int32_t) * (size_t)n_train);
  uint8_t *flipped = malloc((size_t)n_train);
  if (!noisy || !flipped) return 1;
  memcpy(noisy, tr->labels, sizeof(int32_t) * (size_t)n_train);
  ad_rng rng;
  ad_rng_seed(&rng, seed);
  int64_t n_flipped = 0;
  if (ds_corrupt_labels(noisy, n_train, 10, 0.5, &rng, flipped, &n_flipped)) {
    fprintf(stderr, "hyper_cleaning: %s\n", ds_errmsg());
    return 1;
  }
  clean_ctx ctx = {.train = {tr->x, noisy, n_train}, .val = {va->x, va->labels, n_val}, .wd = 1e-3};
  split test = {te->x, te->labels, n_test};

  /* Softmax regression from zero; one logit per training example, all 0
   * (weight 1/2: no example is trusted more than another at the start). */
  ad_tensor *w[2], *lam = NULL, *hg = NULL, *ones = NULL, *oracle = NULL;
  if (ad_tensor_new(&w[0], AD_F32, 2, (int64_t[]){IN, OUT}) ||
      ad_tensor_new(&w[1], AD_F32, 1, (int64_t[]){OUT}) ||
      ad_tensor_new(&lam, AD_F32, 1, (int64_t[]){n_train}) ||
      ad_tensor_new(&hg, AD_F32, 1, (int64_t[]){n_train}) ||
      ad_tensor_new(&ones, AD_F32, 1, (int64_t[]){n_train}) ||
      ad_tensor_new(&oracle, AD_F32, 1, (int64_t[]){n_train})) {
    fprintf(stderr, "hyper_cleaning: %s\n", ad_last_error());
    return 1;
  }
  for (int64_t i = 0; i < n_train; i++) {
    ad_set(ones, i, 20.0);                        /* sigmoid(20) = 1 - 2e-9: every example */
    ad_set(oracle, i, flipped[i] ? -20.0 : 20.0); /* only the clean ones */
  }
  ad_requires_grad(w[0], 1);
  ad_requires_grad(w[1], 1);
  ad_requires_grad(lam, 1);
  ad_tape *tape = NULL;
  if (ad_tape_new(&tape, &(ad_tape_opts){.arena_mb = 64, .arena_max_mb = 4096})) {
    fprintf(stderr, "hyper_cleaning: %s\n", ad_last_error());
    return 1;
  }
  FILE *log = fopen(log_path, "w");
  if (!log) {
    fprintf(stderr, "hyper_cleaning: cannot write the log %s\n", log_path);
    return 1;
  }
  const nn_opt_cfg inner_opt = {.kind = NN_OPT_SGD, .lr = 0.5};
  bl_problem p = {.n_w = 2,
                  .w0 = w,
                  .n_lam = 1,
                  .lam = &lam,
                  .train_loss = train_loss,
                  .val_loss = val_loss,
                  .ctx = &ctx,
                  .opt = inner_opt,
                  .inner_steps = implicit ? 1 : inner};
  const nn_opt_cfg outer_opt = {.kind = NN_OPT_ADAM, .lr = outer_lr};
  nn_opt_state outer_state;
  bl_hoag_state hoag = {0};
  /* K = 10 conjugate-gradient (or Neumann) iterations: the flags need the
   * sign of each example's hypergradient, not ten digits of it. */
  const bl_opts mo = {.K = 10, .hoag = &hoag, .warm_start = 1};
  if (nn_opt_state_init(&outer_opt, &outer_state, 1, &lam)) {
    fprintf(stderr, "hyper_cleaning: %s\n", ad_last_error());
    return 1;
  }
  printf("hyper_cleaning: %lld train digits (%lld labels flipped) / %lld clean validation / %lld "
         "test, softmax regression, method %s, T = %d, GEMM %s\n",
         (long long)n_train, (long long)n_flipped, (long long)n_val, (long long)n_test, method,
         inner, ad_blas_kernel());
  double t0 = ex_now_s();
  if (train(tape, &inner_opt, w, lam, &ctx, warmup)) return 1;
  flag_score fs = score(lam, flipped);
  for (int it = 0; it < steps; it++) {
    bl_stats st = {0};
    if (fn(tape, &p, &mo, &hg, &st) != AD_OK) {
      fprintf(stderr, "hyper_cleaning: %s: %s\n", method, ad_tape_errmsg(tape));
      return 1;
    }
    nn_opt_step(&outer_opt, &outer_state, 1, &lam, &hg);
    if (train(tape, &inner_opt, w, lam, &ctx, inner)) return 1;
    fs = score(lam, flipped);
    double val_acc = accuracy(tape, w, &ctx.val);
    fprintf(log,
            "{\"step\": %d, \"val_loss\": %.6f, \"val_accuracy\": %.4f, \"precision\": %.4f, "
            "\"recall\": %.4f, \"f1\": %.4f, \"weight_clean\": %.4f, \"weight_noisy\": %.4f, "
            "\"seconds\": %.3f}\n",
            it, st.val_loss, val_acc, fs.precision, fs.recall, fs.f1, fs.w_clean, fs.w_noisy,
            ex_now_s() - t0);
    if (it % 10 == 0 || it == steps - 1)
      printf("outer %3d  val_loss %.4f  val_acc %.4f  f1 %.3f (P %.3f R %.3f)  mean weight "
             "clean %.3f noisy %.3f  %.1f s\n",
             it, st.val_loss, val_acc, fs.f1, fs.precision, fs.recall, fs.w_clean, fs.w_noisy,
             ex_now_s() - t0);
  }
  fclose(log);

  /* The comparison: the same model, from the same start, for the same budget. */
  double acc[3];
  ad_tensor *weightings[3] = {lam, ones, oracle};
  for (int k = 0; k < 3; k++) {
    for (int i = 0; i < 2; i++)
      memset(w[i]->data, 0, ad_dtype_size(w[i]->dtype) * (size_t)w[i]->size);
    if (train(tape, &inner_opt, w, weightings[k], &ctx, budget)) return 1;
    acc[k] = accuracy(tape, w, &test);
  }
  printf("trained %d GD steps from zero: learned weighting %.4f, noisy labels as they are %.4f, "
         "only the truly clean examples (oracle) %.4f\n",
         budget, acc[0], acc[1], acc[2]);
  printf("summary: method=%s test_accuracy=%.4f baseline_accuracy=%.4f oracle_accuracy=%.4f "
         "f1=%.4f precision=%.4f recall=%.4f seconds=%.1f log=%s\n",
         method, acc[0], acc[1], acc[2], fs.f1, fs.precision, fs.recall, ex_now_s() - t0, log_path);
  bl_hoag_state_free(&hoag);
  nn_opt_state_free(&outer_state);
  for (int i = 0; i < 2; i++) ad_tensor_free(w[i]);
  ad_tensor_free(lam);
  ad_tensor_free(hg);
  ad_tensor_free(ones);
  ad_tensor_free(oracle);
  ad_tape_free(tape);
  free(noisy);
  free(flipped);
  ds_dataset_free(all);
  ds_dataset_free(test_all);
  ds_dataset_free(tr);
  ds_dataset_free(va);
  ds_dataset_free(te);
  return 0;
}
