/* darts_search — a small differentiable architecture search (DARTS, Liu et
 * al. 2019) on MNIST: the architecture is a hyperparameter, learned by
 * hypergradient on a validation split.
 *
 *   stem:  conv 3x3 (C filters) -> relu -> max pool 2        h0 [N, C, 14, 14]
 *   cell:  h1 = edge0(h0),  h2 = (edge1(h1) + edge2(h0)) / 2
 *          edge(x) = sum_o softmax(a_e)_o op_o(x), o in
 *          {conv 3x3 + relu, conv 5x5 + relu, max pool 3x3, skip, zero}
 *   head:  max pool 2 -> linear C*7*7 -> 10
 *
 *   Upper:  min_a  L_val(w*(a), a)           (cross-entropy on held-out digits)
 *   Lower:  w*(a) = argmin_w L_train(w, a)
 *
 * Each search step asks bl.h for dL_val/da through one virtual SGD step of
 * the weights (--method one_step: the exact second-order DARTS gradient by a
 * VJP of the recorded step; darts_fd: bl_t1t2 with DARTS's central
 * difference in place of that VJP; fo: first-order DARTS, the direct term
 * only), takes an Adam step on a, then trains the weights one real step on
 * a training batch. The genotype keeps, per edge, the strongest operation
 * other than zero (as DARTS does); that derived net, 2C wide, is trained
 * from scratch for a few epochs on all training digits and tested.
 *
 *     ./build/examples/darts_search
 *     ./build/examples/darts_search --method darts_fd --steps 100
 *
 * Ends with one line:
 *   summary: method=M genotype=E0:op,E1:op,E2:op test_accuracy=A seconds=S */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "example_util.h"
#include "hypertape.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { SIDE = 28, OUT = 10, BATCH = 64, EVAL_CHUNK = 250, EDGES = 3, OPS = 5 };
enum { OP_CONV3, OP_CONV5, OP_POOL, OP_SKIP, OP_ZERO };
static const char *const OP_NAMES[OPS] = {"conv3x3", "conv5x5", "maxpool3x3", "skip", "zero"};
static const char *const EDGE_NAMES[EDGES] = {"h0->h1", "h1->h2", "h0->h2"};

/* Parameters: stem (2), per edge conv 3x3 w, b and conv 5x5 w, b (4 each),
 * fc (2); the derived net has the same layout (unused convs stay unused). */
enum { NW = 2 + 4 * EDGES + 2 };

static ad_status make_params(nn_params **out, int64_t C, ad_rng *r) {
  static char names[NW][16];
  nn_param_spec specs[NW] = {{"stem.w", 4, {C, 1, 3, 3}}, {"stem.b", 1, {C}}};
  for (int e = 0; e < EDGES; e++) {
    for (int k = 0; k < 4; k++) {
      int i = 2 + 4 * e + k, ks = k < 2 ? 3 : 5;
      snprintf(names[i], sizeof names[i], "e%d.c%d.%c", e, ks, k % 2 ? 'b' : 'w');
      specs[i] =
          k % 2 ? (nn_param_spec){names[i], 1, {C}} : (nn_param_spec){names[i], 4, {C, C, ks, ks}};
    }
  }
  specs[NW - 2] = (nn_param_spec){"fc.w", 2, {OUT, C * 7 * 7}};
  specs[NW - 1] = (nn_param_spec){"fc.b", 1, {OUT}};
  ad_status s = nn_params_new(out, AD_F32, NW, specs);
  for (int i = 0; !s && i < NW; i += 2) /* the weights; biases stay 0 */
    s = nn_init_kaiming(nn_params_at(*out, i), r, NN_INIT_NORMAL, i == NW - 2 ? 1.0 : 0);
  return s;
}

/* One candidate operation on x [N, C, 14, 14]; w: the edge's 4 tensors. */
static ad_tensor *op(ad_tape *t, int o, ad_tensor *x, ad_tensor *const *w) {
  switch (o) {
  case OP_CONV3:
    return ad_relu(t, nn_conv2d(t, x, w[0], w[1], 1, 1));
  case OP_CONV5:
    return ad_relu(t, nn_conv2d(t, x, w[2], w[3], 1, 2));
  case OP_POOL:
    return nn_max_pool2d(t, x, 3, 1, 1);
  default:
    return x; /* skip (zero never gets here) */
  }
}

/* An edge: the mixed operation sum_o softmax(a)_o op_o(x) (a: logits [OPS]),
 * or, with a NULL, the single operation `chosen`. The zero operation adds
 * nothing; its share of the softmax only scales the others down. */
static ad_tensor *edge(ad_tape *t, ad_tensor *x, ad_tensor *const *w, ad_tensor *a, int chosen) {
  if (!a) return op(t, chosen, x, w);
  ad_tensor *sw = ad_softmax(t, a, 0), *sum = NULL;
  for (int o = 0; o < OPS; o++) {
    if (o == OP_ZERO) continue;
    ad_tensor *y = ad_mul(t, ad_slice(t, sw, 0, o, 1), op(t, o, x, w));
    sum = sum ? ad_add(t, sum, y) : y;
  }
  return sum;
}

/* logits [N, 10] from images x [N, 784]: the supernet (a = EDGES logit
 * tensors) or the derived net (a NULL, geno = the op of each edge). */
static ad_tensor *forward(ad_tape *t, ad_tensor *const *w, ad_tensor *const *a, const int *geno,
                          ad_tensor *x) {
  const int64_t img[4] = {x->shape[0], 1, SIDE, SIDE};
  ad_tensor *h0 = ad_relu(t, nn_conv2d(t, ad_reshape(t, x, 4, img), w[0], w[1], 1, 1));
  h0 = nn_max_pool2d(t, h0, 2, 2, 0);
  ad_tensor *ew[EDGES][4];
  for (int e = 0; e < EDGES; e++)
    for (int k = 0; k < 4; k++) ew[e][k] = w[2 + 4 * e + k];
  ad_tensor *h1 = edge(t, h0, ew[0], a ? a[0] : NULL, geno ? geno[0] : 0);
  /* h2 averages its two inputs, so its scale does not grow with the fan-in
   * (a plain sum doubles the variance the head starts from). */
  ad_tensor *h2 = ad_scale(t,
                           ad_add(t, edge(t, h1, ew[1], a ? a[1] : NULL, geno ? geno[1] : 0),
                                  edge(t, h0, ew[2], a ? a[2] : NULL, geno ? geno[2] : 0)),
                           0.5);
  h2 = nn_max_pool2d(t, h2, 2, 2, 0);
  return nn_linear(t, nn_flatten(t, h2), w[NW - 2], w[NW - 1]);
}

typedef struct {
  const ds_dataset *train, *val;
  int64_t offset; /* training batches used so far */
  int64_t val_offset;
} search_ctx;

static ad_tensor *batch_ce(ad_tape *t, ad_tensor *const *w, ad_tensor *const *a,
                           const ds_dataset *d, int64_t b) {
  int64_t nb = d->n / BATCH, start = (b % nb) * BATCH;
  ad_tensor *x = ad_const(t, AD_F32, 2, (int64_t[]){BATCH, d->dim},
                          (const float *)d->x->data + start * d->dim);
  return ad_cross_entropy(t, forward(t, w, a, NULL, x), d->labels + start, BATCH);
}
/* L_train(w, a): the next training batch (step: the virtual step's index). */
static ad_tensor *train_loss(ad_tape *t, ad_tensor *const *w, ad_tensor *const *a, int64_t step,
                             void *ctx) {
  search_ctx *c = ctx;
  return batch_ce(t, w, a, c->train, c->offset + (step < 0 ? 0 : step));
}
/* L_val(w, a): the current validation batch. */
static ad_tensor *val_loss(ad_tape *t, ad_tensor *const *w, ad_tensor *const *a, int64_t step,
                           void *ctx) {
  (void)step;
  search_ctx *c = ctx;
  return batch_ce(t, w, a, c->val, c->val_offset);
}

/* Test accuracy of the derived net, values only, in chunks. */
static int evaluate(ad_tape *t, ad_tensor *const *w, const int *geno, const ds_dataset *d,
                    double *acc) {
  ad_marker m = ad_mark(t);
  int prev = ad_set_recording(t, 0);
  int64_t right = 0;
  for (int64_t i = 0; i < d->n; i += EVAL_CHUNK) {
    int64_t n = d->n - i < EVAL_CHUNK ? d->n - i : EVAL_CHUNK;
    ad_tensor *x =
        ad_const(t, AD_F32, 2, (int64_t[]){n, d->dim}, (const float *)d->x->data + i * d->dim);
    ad_tensor *logits = x ? forward(t, w, NULL, geno, x) : NULL;
    if (!logits) break;
    right += ex_hits(logits, d->labels + i);
    ad_rewind(t, m);
  }
  ad_set_recording(t, prev);
  ad_rewind(t, m);
  *acc = (double)right / (double)d->n;
  return ad_tape_status(t) == AD_OK ? 0 : -1;
}

/* The strongest operation of each edge other than zero. */
static void derive(ad_tensor *const *a, int *geno) {
  for (int e = 0; e < EDGES; e++) {
    geno[e] = 0;
    for (int o = 1; o < OPS; o++)
      if (o != OP_ZERO && ad_get(a[e], o) > ad_get(a[e], geno[e])) geno[e] = o;
  }
}

static void print_weights(ad_tensor *const *a) {
  for (int e = 0; e < EDGES; e++) {
    double mx = -INFINITY, z = 0;
    for (int o = 0; o < OPS; o++) mx = fmax(mx, ad_get(a[e], o));
    for (int o = 0; o < OPS; o++) z += exp(ad_get(a[e], o) - mx);
    printf("  edge %s:", EDGE_NAMES[e]);
    for (int o = 0; o < OPS; o++) printf(" %s %.3f", OP_NAMES[o], exp(ad_get(a[e], o) - mx) / z);
    printf("\n");
  }
}

int main(int argc, char **argv) {
  const char *dir = NULL, *method = "one_step", *log_path = "/tmp/darts_search.jsonl";
  int steps = 150, epochs = 6, threads = 0;
  int64_t width = 8, limit = 0;
  uint64_t seed = 1;
  double arch_lr = 0.03, w_lr = 0.05, retrain_lr = 0.05;
  const char *fixed = NULL;
  const ex_opt opts[] = {
      {"--method", EX_STR, &method, "M",
       .help = "architecture gradient: one_step (second-order DARTS, exact), darts_fd (T1-T2 "
               "with DARTS's finite difference), fo (first-order DARTS)",
       .choices = (const char *const[]){"one_step", "darts_fd", "fo", NULL}},
      {"--steps", EX_INT, &steps, "N", .help = "search steps (one architecture + one weight step)",
       .min = 1, .max = 1e6},
      {"--epochs", EX_INT, &epochs, "N", .help = "epochs training the derived net", .min = 0,
       .max = 1000},
      {"--width", EX_I64, &width, "C", .help = "channels in the search (the derived net: 2C)",
       .min = 1, .max = 256},
      {"--arch-lr", EX_DOUBLE, &arch_lr, "LR", .help = "Adam learning rate on the architecture",
       .max = 10, .gt_min = 1},
      {"--lr", EX_DOUBLE, &w_lr, "LR", .help = "SGD (momentum 0.9) learning rate on the weights",
       .max = 10, .gt_min = 1},
      {"--retrain-lr", EX_DOUBLE, &retrain_lr, "LR",
       .help = "SGD (momentum 0.9) learning rate training the derived net", .max = 10, .gt_min = 1},
      {"--genotype", EX_STR, &fixed, "OPS",
       .help = "skip the search and train this cell: three of conv3x3, conv5x5, maxpool3x3, skip, "
               "comma-separated (edges h0->h1, h1->h2, h0->h2)"},
      {"--data", EX_STR, &dir, "DIR",
       .help = "MNIST or Fashion-MNIST IDX files (default: the embedded subset)"},
      {"--limit", EX_I64, &limit, "N",
       .help = "only the first N train and test examples, 0 = all (quick runs, valgrind)",
       .max = 1e9},
      {"--seed", EX_U64, &seed, "S", .help = "seeds the weights, the logits and the batch order"},
      {"--log", EX_STR, &log_path, "FILE", .help = "JSON lines: losses and op weights per step"},
      EX_OPT_THREADS(&threads),
      {0}};
  ex_parse_args(argc, argv,
                "searches a cell of mixed operations on MNIST by DARTS (architecture weights "
                "learned by hypergradient on a validation split), then trains and tests the "
                "derived net",
                opts);
  ex_set_threads(threads);
  int geno[EDGES];
  if (fixed) { /* "op,op,op" */
    const char *q = fixed;
    for (int e = 0; e < EDGES; e++) {
      size_t len = strcspn(q, ",");
      geno[e] = -1;
      for (int o = 0; o < OP_ZERO; o++)
        if (strlen(OP_NAMES[o]) == len && !strncmp(q, OP_NAMES[o], len)) geno[e] = o;
      if (geno[e] < 0 || (e < EDGES - 1 && q[len] != ',') || (e == EDGES - 1 && q[len]))
        ex_usage_error("--genotype: '%s' is not three of conv3x3, conv5x5, maxpool3x3, skip "
                       "separated by commas",
                       fixed);
      q += len + (q[len] == ',');
    }
  }

  int status = 1;
  ds_dataset *all = NULL, *test = NULL, *train = NULL, *val = NULL;
  nn_params *sw = NULL, *dw = NULL;
  ad_tape *tape = NULL;
  ad_tensor *a[EDGES] = {0}, *hg[EDGES] = {0}, *xb = NULL;
  nn_opt_state arch_state = {0}, w_state = {0}, d_state = {0};
  ds_iter *it = NULL;
  FILE *log = NULL;
  ex_options mo = {.data = dir, .limit = limit};
  if (ex_load_mnist("darts_search", &mo, &all, &test) != 0) goto out;
  /* The search splits the training digits in half: weights on one half,
   * the architecture on the other (as DARTS does with CIFAR-10). */
  int64_t n_val = all->n / 2;
  if (n_val < BATCH || ds_dataset_slice(&train, all, 0, all->n - n_val) != AD_OK ||
      ds_dataset_slice(&val, all, all->n - n_val, n_val) != AD_OK) {
    fprintf(stderr, "darts_search: the training set is too small to split (%lld digits): %s\n",
            (long long)all->n, ds_errmsg());
    goto out;
  }
  ad_rng rng;
  ad_rng_seed(&rng, seed);
  if (make_params(&sw, width, &rng) != AD_OK) {
    fprintf(stderr, "darts_search: %s\n", ad_last_error());
    goto out;
  }
  for (int e = 0; e < EDGES; e++) {
    if (ad_tensor_new(&a[e], AD_F32, 1, (int64_t[]){OPS}) ||
        ad_tensor_new(&hg[e], AD_F32, 1, (int64_t[]){OPS})) {
      fprintf(stderr, "darts_search: %s\n", ad_last_error());
      goto out;
    }
    ad_tensor_fill_normal(a[e], &rng, 0, 1e-3); /* DARTS: 1e-3 N(0, 1), near uniform */
    ad_requires_grad(a[e], 1);
  }
  ad_tensor *const *w = nn_params_list(sw);
  log = fopen(log_path, "w");
  if (!log) {
    fprintf(stderr, "darts_search: cannot write the log %s\n", log_path);
    goto out;
  }
  if (ad_tape_new(&tape, &(ad_tape_opts){.arena_mb = 64, .arena_max_mb = 2048}) != AD_OK) {
    fprintf(stderr, "darts_search: %s\n", ad_last_error());
    goto out;
  }
  search_ctx ctx = {train, val, 0, 0};
  nn_opt_cfg w_cfg = {.kind = NN_OPT_MOMENTUM, .lr = w_lr, .momentum = 0.9};
  nn_opt_cfg arch_cfg = {.kind = NN_OPT_ADAM, .lr = arch_lr, .beta1 = 0.5, .beta2 = 0.999};
  if (nn_opt_state_init(&w_cfg, &w_state, NW, w) != AD_OK ||
      nn_opt_state_init(&arch_cfg, &arch_state, EDGES, a) != AD_OK) {
    fprintf(stderr, "darts_search: %s\n", ad_last_error());
    goto out;
  }
  /* The virtual step the architecture gradient goes through: plain SGD at
   * the weights' rate (DARTS's xi = the weights' learning rate). */
  bl_problem p = {.n_w = NW,
                  .w0 = w,
                  .n_lam = EDGES,
                  .lam = a,
                  .train_loss = train_loss,
                  .val_loss = val_loss,
                  .ctx = &ctx,
                  .opt = {.kind = NN_OPT_SGD, .lr = w_lr},
                  .inner_steps = 1};
  bl_method_fn fn = !strcmp(method, "fo") ? bl_fo : bl_t1t2;
  bl_opts bo = {.darts_fd = !strcmp(method, "darts_fd")};
  printf("darts_search: %lld search-train / %lld search-val / %lld test digits, width %lld, "
         "%d edges x %d ops, method %s, %d steps, batch %d\n",
         (long long)train->n, (long long)val->n, (long long)test->n, (long long)width, EDGES, OPS,
         method, steps, BATCH);
  double t0 = ex_now_s(), tl_sum = 0, vl_sum = 0;
  int every = steps >= 10 ? steps / 10 : 1, in_window = 0;
  for (int s = 0; s < (fixed ? 0 : steps); s++) {
    bl_stats st;
    if (fn(tape, &p, &bo, hg, &st) != AD_OK) {
      fprintf(stderr, "darts_search: %s: %s\n", method, ad_tape_errmsg(tape));
      goto out;
    }
    if (nn_opt_step(&arch_cfg, &arch_state, EDGES, a, hg) != AD_OK) {
      fprintf(stderr, "darts_search: %s\n", ad_last_error());
      goto out;
    }
    /* The real weight step, on the same training batch with the new a. */
    ad_marker m = ad_mark(tape);
    ad_tensor *L = train_loss(tape, w, a, 0, &ctx), *g[NW];
    if (ad_grad(tape, 1, &L, NULL, NW, w, g, 0) != AD_OK ||
        nn_opt_step(&w_cfg, &w_state, NW, w, g) != AD_OK) {
      fprintf(stderr, "darts_search: weight step: %s%s\n", ad_tape_errmsg(tape), ad_last_error());
      goto out;
    }
    double tl = ad_item(L);
    ad_rewind(tape, m);
    char where[64];
    snprintf(where, sizeof where, "search step %d", s + 1);
    if (ex_diverged("darts_search", tl, where) || ex_diverged("darts_search", st.val_loss, where))
      goto out;
    ctx.offset++, ctx.val_offset++;
    tl_sum += tl, vl_sum += st.val_loss, in_window++;
    fprintf(log, "{\"step\": %d, \"train_loss\": %.5g, \"val_loss\": %.5g", s + 1, tl, st.val_loss);
    for (int e = 0; e < EDGES; e++) {
      double mx = -INFINITY, z = 0;
      for (int o = 0; o < OPS; o++) mx = fmax(mx, ad_get(a[e], o));
      for (int o = 0; o < OPS; o++) z += exp(ad_get(a[e], o) - mx);
      for (int o = 0; o < OPS; o++)
        fprintf(log, ", \"e%d_%s\": %.4f", e, OP_NAMES[o], exp(ad_get(a[e], o) - mx) / z);
    }
    fprintf(log, "}\n");
    if ((s + 1) % every == 0 || s + 1 == steps) {
      printf("search %4d/%d  train_loss %.4f  val_loss %.4f  %.1f s\n", s + 1, steps,
             tl_sum / in_window, vl_sum / in_window, ex_now_s() - t0);
      fflush(stdout);
      tl_sum = vl_sum = 0, in_window = 0;
    }
  }
  if (!fixed) {
    printf("architecture weights (softmax of a) after the search:\n");
    print_weights(a);
    derive(a, geno);
  }
  char genotype[128];
  int used = 0;
  for (int e = 0; e < EDGES; e++)
    used += snprintf(genotype + used, sizeof genotype - (size_t)used, "%s%s:%s", e ? "," : "",
                     EDGE_NAMES[e], OP_NAMES[geno[e]]);
  printf("%s cell: %s\n", fixed ? "given" : "derived", genotype);

  /* The derived net, twice as wide, from scratch on all training digits. */
  if (make_params(&dw, 2 * width, &rng) != AD_OK) {
    fprintf(stderr, "darts_search: %s\n", ad_last_error());
    goto out;
  }
  ad_tensor *const *v = nn_params_list(dw);
  nn_opt_cfg d_cfg = {.kind = NN_OPT_MOMENTUM, .lr = retrain_lr, .momentum = 0.9};
  if (nn_opt_state_init(&d_cfg, &d_state, NW, v) != AD_OK ||
      ds_iter_new(&it, all->x, all->labels, NULL, &(ds_iter_opts){.batch = BATCH, .seed = seed}) !=
          AD_OK ||
      ad_tensor_new(&xb, AD_F32, 2, (int64_t[]){BATCH, SIDE * SIDE}) != AD_OK) {
    fprintf(stderr, "darts_search: setup failed: %s%s\n", ad_last_error(), ds_errmsg());
    goto out;
  }
  int32_t yb[BATCH];
  double acc = 0;
  for (int epoch = 1; epoch <= epochs; epoch++) {
    /* the last epoch at a tenth of the rate, as mnist_cnn does */
    d_cfg.lr = epoch == epochs && epochs > 1 ? 0.1 * retrain_lr : retrain_lr;
    double loss_sum = 0;
    int64_t n_steps = 0;
    ds_batch b;
    do {
      if (ds_iter_next(it, xb, yb, NULL, &b) != AD_OK) {
        fprintf(stderr, "darts_search: %s\n", ds_errmsg());
        goto out;
      }
      ad_marker m = ad_mark(tape);
      ad_tensor *L = ad_cross_entropy(tape, forward(tape, v, NULL, geno, xb), yb, BATCH), *g[NW];
      /* the convs of operations not chosen do not reach the loss: their
       * gradient is zero and their values unused */
      if (ad_grad(tape, 1, &L, NULL, NW, v, g, 0) != AD_OK ||
          nn_opt_step(&d_cfg, &d_state, NW, v, g) != AD_OK) {
        fprintf(stderr, "darts_search: step failed: %s%s\n", ad_tape_errmsg(tape), ad_last_error());
        goto out;
      }
      char where[64];
      snprintf(where, sizeof where, "retraining epoch %d", epoch);
      if (ex_diverged("darts_search", ad_item(L), where)) goto out;
      loss_sum += ad_item(L), n_steps++;
      ad_rewind(tape, m);
    } while (!b.epoch_end);
    if (evaluate(tape, v, geno, test, &acc) != 0) {
      fprintf(stderr, "darts_search: evaluation failed: %s\n", ad_tape_errmsg(tape));
      goto out;
    }
    printf("derived net epoch %d/%d  train_loss %.4f  test_accuracy %.4f  %.1f s\n", epoch, epochs,
           loss_sum / (double)n_steps, acc, ex_now_s() - t0);
    fflush(stdout);
  }
  if (epochs == 0 && evaluate(tape, v, geno, test, &acc) != 0) {
    fprintf(stderr, "darts_search: evaluation failed: %s\n", ad_tape_errmsg(tape));
    goto out;
  }
  printf("summary: method=%s genotype=%s test_accuracy=%.4f seconds=%.1f log=%s\n", method,
         genotype, acc, ex_now_s() - t0, log_path);
  status = 0;
out:
  if (log) fclose(log);
  ad_tensor_free(xb);
  ds_iter_free(it);
  nn_opt_state_free(&arch_state);
  nn_opt_state_free(&w_state);
  nn_opt_state_free(&d_state);
  for (int e = 0; e < EDGES; e++) {
    ad_tensor_free(a[e]);
    ad_tensor_free(hg[e]);
  }
  nn_params_free(sw);
  nn_params_free(dw);
  ad_tape_free(tape);
  ds_dataset_free(all);
  ds_dataset_free(test);
  ds_dataset_free(train);
  ds_dataset_free(val);
  return status;
}
