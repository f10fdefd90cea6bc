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

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { IN = 784, HIDDEN = 200, OUT = 10, BATCH = 128, EVAL_BATCH = 512 };
enum { CLS = 0, HPO = 1 }; /* level ids, in the order they are added */

typedef struct {
  ad_tensor *const *fixed_lam; /* the baseline: a decay that is no level's parameter */
} loss_ctx;

/* Both levels' loss: CE of the MLP on the level's batch + 1/2 sum_i <lam_i w_i, w_i>. */
static ad_tensor *loss(ad_tape *t, const bl_vars *v, void *ctx) {
  const loss_ctx *c = ctx;
  ad_tensor *const *w = v->p[CLS], *const *lam = c->fixed_lam ? c->fixed_lam : v->p[HPO];
  ad_tensor *h = ad_relu(t, ad_matmul(t, v->x, w[0], 0, 0));
  ad_tensor *L = ad_cross_entropy(t, ad_matmul(t, h, w[1], 0, 0), v->labels, v->n);
  for (int i = 0; i < 2; i++)
    L = ad_add(t, L, ad_scale(t, ad_dot(t, ad_mul(t, lam[i], w[i]), w[i]), 0.5));
  return L;
}

/* Keeps every decay >= 0 after each Adam step. */
static void nonneg(int n, ad_tensor *const *lam, void *ctx) {
  (void)ctx;
  for (int i = 0; i < n; i++) {
    float *p = lam[i]->data;
    for (int64_t j = 0; j < lam[i]->size; j++) p[j] = p[j] < 0 ? 0 : p[j];
  }
}

static double accuracy(ad_tape *t, ad_tensor *const *w, const ds_dataset *d) {
  int prev = ad_set_recording(t, 0);
  int64_t right = 0;
  for (int64_t s = 0; s < d->n; s += EVAL_BATCH) {
    int64_t n = d->n - s < EVAL_BATCH ? d->n - s : EVAL_BATCH;
    ad_marker m = ad_mark(t);
    ad_tensor *x = ad_const(t, AD_F32, 2, (int64_t[]){n, IN}, ((const float *)d->x->data) + s * IN);
    ad_tensor *lg = ad_matmul(t, ad_relu(t, ad_matmul(t, x, w[0], 0, 0)), w[1], 0, 0);
    if (lg) right += ex_hits(lg, d->labels + s);
    ad_rewind(t, m);
  }
  ad_set_recording(t, prev);
  return (double)right / (double)d->n;
}

/* Kaiming-scaled normal weights from the seed; every decay 1e-4. */
static int make_params(ad_tensor **w, ad_tensor **lam, uint64_t seed) {
  ad_rng rng;
  ad_rng_seed(&rng, seed);
  const int64_t shapes[2][2] = {{IN, HIDDEN}, {HIDDEN, OUT}};
  for (int i = 0; i < 2; i++) {
    if (ad_tensor_new(&w[i], AD_F32, 2, shapes[i]) || ad_tensor_new(&lam[i], AD_F32, 2, shapes[i]))
      return -1;
    ad_tensor_fill_normal(w[i], &rng, 0.0, sqrt(2.0 / (double)shapes[i][0]));
    for (int64_t j = 0; j < lam[i]->size; j++) ad_set(lam[i], j, 1e-4);
  }
  return 0;
}

/* This example's own options; the rest go to ex_parse. */
typedef struct {
  const char *method, *log, *save_state, *resume;
  long outer, inner;
  double outer_lr;
} hpo_options;

static int take(const char *a, const char *v, hpo_options *h, const char *prog) {
  char *end = NULL;
  if (!strcmp(a, "--method")) {
    h->method = v;
  } else if (!strcmp(a, "--log")) {
    h->log = v;
  } else if (!strcmp(a, "--save-state")) {
    h->save_state = v;
  } else if (!strcmp(a, "--resume")) {
    h->resume = v;
  } else if (!strcmp(a, "--outer")) {
    h->outer = strtol(v, &end, 10);
    if (*end || h->outer < 1) goto bad;
  } else if (!strcmp(a, "--inner")) {
    h->inner = strtol(v, &end, 10);
    if (*end || h->inner < 1) goto bad;
  } else if (!strcmp(a, "--outer-lr")) {
    h->outer_lr = strtod(v, &end);
    if (*end || !(h->outer_lr > 0)) goto bad;
  } else {
    return 0;
  }
  return 1;
bad:
  fprintf(stderr, "%s: bad value '%s' for %s\n", prog, v, a);
  return -1;
}

int main(int argc, char **argv) {
  hpo_options h = {.method = "unroll", .outer = 30, .inner = 20, .outer_lr = 1e-3};
  ex_options o = {.threads = 1, .seed = 7, .lr = 0.1};
  /* Split the command line: ours here, the shared ones to ex_parse. */
  char **rest = calloc((size_t)argc + 1, sizeof *rest);
  if (!rest) return 1;
  int nrest = 0;
  rest[nrest++] = argv[0];
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
      printf("%s: a weight decay per weight of a 784-200-10 MLP by hypergradient descent\n"
             "  --method M      hypergradient method (default unroll):",
             argv[0]);
      for (int m = 0; m < BL_METHOD_COUNT; m++) printf(" %s", bl_method_name((bl_method)m));
      printf(
          "\n  --outer N       engine steps = steps of the decay (default 30)\n"
          "  --inner T       classifier steps per engine step = unroll length (default 20)\n"
          "  --outer-lr LR   Adam's lr on the decay (default 1e-3); --lr: the classifier's\n"
          "  --log FILE      the progress records as JSON lines\n"
          "  --save-state F  save the whole engine state at the end; --resume F: start from it\n");
    }
    int r = i + 1 < argc ? take(argv[i], argv[i + 1], &h, argv[0]) : 0;
    if (r < 0) {
      free(rest);
      return 2;
    }
    if (r > 0)
      i++;
    else
      rest[nrest++] = argv[i];
  }
  int pr = ex_parse(nrest, rest, &o);
  free(rest);
  if (pr) return pr > 0 ? 0 : 2;
  if (bl_method_from_name(h.method) < 0) {
    fprintf(stderr, "%s: unknown --method %s (try --help)\n", argv[0], h.method);
    return 2;
  }
  ad_blas_set_threads(o.threads);

  ds_dataset *train = NULL, *test = NULL;
  if (ex_load_mnist("hpo_mnist", &o, &train, &test)) {
    ds_dataset_free(train);
    ds_dataset_free(test);
    return 1;
  }
  ad_tensor *w[2] = {0}, *lam[2] = {0}, *w_base[2] = {0}, *lam_base[2] = {0};
  if (make_params(w, lam, o.seed) || make_params(w_base, lam_base, o.seed)) {
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
                            .project = nonneg,
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
