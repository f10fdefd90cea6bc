/* hpo_mnist — the Problem/Engine tutorial in C: a weight decay for every
 * single weight of a 784-200-10 MLP, learned by hypergradient descent on
 * MNIST, written as two levels run by a bl_engine (bilevel/bl_engine.h).
 *
 *   Upper (hpo):         lam* = argmin_lam  f(X; w*) + 1/2 w*^T diag(lam) w*
 *   Lower (classifier):  w*   = argmin_w    f(X; w)  + 1/2 w^T  diag(lam) w
 *
 * f is the cross-entropy on the training digits. As in the tutorial, both
 * levels use the same data and the same loss (following Bai et al. 2021, "How
 * important is the train-validation split in meta-learning?"); each level
 * draws its own batches.
 *
 *     ./build/examples/hpo_mnist                          # unrolled hypergradient
 *     ./build/examples/hpo_mnist --method cg --outer 20   # implicit (CG) instead
 *     ./build/examples/hpo_mnist --log hpo.jsonl          # JSON lines to plot
 *     ./build/examples/hpo_mnist --data ~/mnist           # full MNIST
 *
 * Each engine step asks the method for d(upper loss)/d lam through the
 * classifier's next --inner SGD steps, takes an Adam step on lam (kept
 * >= 0: a decay, not a push), then trains the classifier those --inner
 * steps with the new decay. A second run with the decay held at its initial
 * value gives the baseline. Ends with one line:
 *   summary: method=M val_loss_first=A val_loss_last=B test_accuracy=C
 *            baseline_accuracy=D seconds=S
 * (val_loss_*: the upper level's loss as the method saw it at the first
 * and the last step.) */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "example_util.h"
#include "hypertape.h"
#include "mlp_hpo.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { EVAL_BATCH = 512 };

typedef struct {
  ad_tensor *const *fixed_lam; /* the baseline: a decay that is no level's parameter */
} loss_ctx;

/* Both levels' loss: CE of the MLP on the level's batch + 1/2 sum_i <lam_i w_i, w_i>. */
static ad_tensor *loss(ad_tape *t, const bl_vars *v, void *ctx) {
  const loss_ctx *c = ctx;
  ad_tensor *const *w = v->p[CLS], *const *lam = c->fixed_lam ? c->fixed_lam : v->p[HPO];
  return mlp_add_decay(t, ad_cross_entropy(t, mlp_logits(t, v->x, w), v->labels, v->n), w, lam,
                       0.5);
}

static double accuracy(ad_tape *t, ad_tensor *const *w, const ds_dataset *d) {
  int prev = ad_set_recording(t, 0);
  int64_t right = 0;
  for (int64_t s = 0; s < d->n; s += EVAL_BATCH) {
    int64_t n = d->n - s < EVAL_BATCH ? d->n - s : EVAL_BATCH;
    ad_marker m = ad_mark(t);
    ad_tensor *x = ad_const(t, AD_F32, 2, (int64_t[]){n, IN}, ((const float *)d->x->data) + s * IN);
    ad_tensor *lg = mlp_logits(t, x, w);
    if (lg) right += ex_hits(lg, d->labels + s);
    ad_rewind(t, m);
  }
  ad_set_recording(t, prev);
  return (double)right / (double)d->n;
}

/* This example's own options, beside the MNIST ones of example_util.h. */
typedef struct {
  const char *method, *log, *save_state, *resume;
  int64_t outer, inner;
  double outer_lr;
} hpo_options;

int main(int argc, char **argv) {
  hpo_options h = {.method = "unroll", .outer = 30, .inner = 20, .outer_lr = 1e-3};
  ex_options o = {.threads = 0, .seed = 7, .lr = 0.1};
  const char *names[BL_METHOD_COUNT + 1] = {NULL};
  for (int m = 0; m < BL_METHOD_COUNT; m++) names[m] = bl_method_name((bl_method)m);
  const ex_opt opts[] = {
      {"--method", EX_STR, &h.method, "M", .help = "the hypergradient method", .choices = names},
      {"--outer", EX_I64, &h.outer, "N", .help = "engine steps = steps of the decay", .min = 1,
       .max = 1e6},
      {"--inner", EX_I64, &h.inner, "T", .help = "classifier steps per engine step = unroll length",
       .min = 1, .max = 1e6},
      {"--outer-lr", EX_DOUBLE, &h.outer_lr, "LR", .help = "Adam's learning rate on the decays",
       .max = 10, .gt_min = 1},
      {"--lr", EX_DOUBLE, &o.lr, "LR", .help = "the classifier's SGD learning rate", .max = 100,
       .gt_min = 1},
      {"--data", EX_STR, &o.data, "DIR",
       .help = "MNIST or Fashion-MNIST IDX files (default: the embedded subset)"},
      {"--limit", EX_I64, &o.limit, "N",
       .help = "only the first N train and test examples, 0 = all (quick runs, valgrind)",
       .max = 1e9},
      {"--seed", EX_U64, &o.seed, "S", .help = "seeds the initial weights and the batch order"},
      {"--log", EX_STR, &h.log, "FILE", .help = "the progress records as JSON lines"},
      {"--save-state", EX_STR, &h.save_state, "FILE",
       .help = "save the whole engine state at the end"},
      {"--resume", EX_STR, &h.resume, "FILE", .help = "start from a state saved by --save-state"},
      EX_OPT_THREADS(&o.threads),
      {0}};
  ex_parse_args(argc, argv,
                "learns a weight decay for every weight of a 784-200-10 MLP on MNIST by "
                "hypergradient descent, run through the engine",
                opts);
  ex_set_threads(o.threads);

  ds_dataset *train = NULL, *test = NULL;
  if (ex_load_mnist("hpo_mnist", &o, &train, &test)) {
    ds_dataset_free(train);
    ds_dataset_free(test);
    return 1;
  }
  ad_tensor *w[2] = {0}, *lam[2] = {0}, *w_base[2] = {0}, *lam_base[2] = {0};
  if (mlp_make_params(w, lam, o.seed) || mlp_make_params(w_base, lam_base, o.seed)) {
    fprintf(stderr, "hpo_mnist: %s\n", ad_last_error());
    return 1;
  }

  /* The two levels and the engine that runs them. */
  loss_ctx lc = {0};
  nn_opt_cfg sgd = {.kind = NN_OPT_SGD, .lr = o.lr}, adam = {.kind = NN_OPT_ADAM, .lr = h.outer_lr};
  bl_engine *e = NULL;
  int rc = 0;
  if (bl_engine_new(&e, &(bl_engine_opts){.log_every = 5, .json_path = h.log})) {
    fprintf(stderr, "hpo_mnist: %s\n", ad_last_error());
    return 1;
  }
  bl_engine_add(e,
                &(bl_level){.name = "classifier",
                            .n = 2,
                            .params = w,
                            .loss = loss,
                            .ctx = &lc,
                            .opt = &sgd,
                            .data = train,
                            .batch = {.batch = BATCH, .seed = o.seed},
                            .steps = h.inner},
                NULL);
  bl_engine_add(e,
                &(bl_level){.name = "hpo",
                            .n = 2,
                            .params = lam,
                            .loss = loss,
                            .ctx = &lc,
                            .opt = &adam,
                            .data = train,
                            .batch = {.batch = BATCH, .seed = o.seed + 1},
                            .project = mlp_nonneg,
                            .n_deps = 1,
                            .deps = {{.level = "classifier", .method_name = h.method}}},
                NULL);
  if (bl_engine_build(e) != AD_OK) {
    fprintf(stderr, "hpo_mnist: %s\n", bl_engine_errmsg(e));
    bl_engine_free(e);
    return 2;
  }
  if (h.resume && bl_engine_load(e, h.resume) != AD_OK) {
    fprintf(stderr, "hpo_mnist: %s\n", bl_engine_errmsg(e));
    bl_engine_free(e);
    return 1;
  }
  printf("hpo_mnist: %lld train / %lld test digits, method %s, T = %ld, GEMM %s\n",
         (long long)train->n, (long long)test->n, h.method, h.inner, ad_blas_kernel());
  double t0 = ex_now_s();
  double first = NAN, last = NAN;
  for (long it = 0; it < h.outer && !rc; it++) {
    if (bl_engine_run(e, 1, NULL) != AD_OK) {
      fprintf(stderr, "hpo_mnist: %s\n", bl_engine_errmsg(e));
      rc = 1;
    }
    if (it == 0) first = bl_engine_loss(e, HPO);
    last = bl_engine_loss(e, HPO);
  }
  if (!rc && h.save_state && bl_engine_save(e, h.save_state) != AD_OK) {
    fprintf(stderr, "hpo_mnist: %s\n", bl_engine_errmsg(e));
    rc = 1;
  }
  double acc = rc ? NAN : accuracy(bl_engine_tape(e), w, test);
  double lam_mean = 0;
  for (int i = 0; i < 2; i++)
    for (int64_t j = 0; j < lam[i]->size; j++)
      lam_mean += ad_get(lam[i], j) / (double)(lam[0]->size + lam[1]->size);

  /* The baseline: the classifier alone, its decay held at 1e-4, as many
   * steps from the same weights and the same batches. */
  double base = NAN;
  if (!rc) {
    loss_ctx bc = {.fixed_lam = lam_base};
    bl_engine *b = NULL;
    int ok = bl_engine_new(&b, NULL) == AD_OK;
    ok = ok && bl_engine_add(b,
                             &(bl_level){.name = "classifier",
                                         .n = 2,
                                         .params = w_base,
                                         .loss = loss,
                                         .ctx = &bc,
                                         .opt = &sgd,
                                         .data = train,
                                         .batch = {.batch = BATCH, .seed = o.seed},
                                         .steps = h.inner},
                             NULL) == AD_OK;
    ok = ok && bl_engine_build(b) == AD_OK &&
         bl_engine_run(b, bl_engine_level_steps(e, CLS) / h.inner, NULL) == AD_OK;
    if (ok)
      base = accuracy(bl_engine_tape(b), w_base, test);
    else
      fprintf(stderr, "hpo_mnist: baseline: %s\n", bl_engine_errmsg(b));
    bl_engine_free(b);
  }
  if (!rc) {
    printf("mean decay %.3e after %lld classifier steps\n", lam_mean,
           (long long)bl_engine_level_steps(e, CLS));
    printf("summary: method=%s val_loss_first=%.4f val_loss_last=%.4f test_accuracy=%.4f "
           "baseline_accuracy=%.4f seconds=%.2f\n",
           h.method, first, last, acc, base, ex_now_s() - t0);
  }
  bl_engine_free(e);
  for (int i = 0; i < 2; i++) {
    ad_tensor_free(w[i]);
    ad_tensor_free(lam[i]);
    ad_tensor_free(w_base[i]);
    ad_tensor_free(lam_base[i]);
  }
  ds_dataset_free(train);
  ds_dataset_free(test);
  return rc;
}
