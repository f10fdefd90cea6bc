/* lr_hypergradient — the learning rate and the momentum of SGD learned while
 * it trains, by forward-mode hypergradient (hypergradient descent, Baydin et
 * al. 2018; real-time forward mode, Franceschi et al. 2017).
 *
 * Heavy-ball SGD on a 784-100-10 MLP (MNIST minibatches of 128):
 *     m_{t+1} = mu m_t + g_t,   w_{t+1} = w_t - lr m_{t+1},   g_t = grad L_t(w_t)
 * The hyperparameters lam = (lr, mu) act on every step, so the loss at step t
 * depends on them through the whole past. Forward mode carries the tangents
 *     Z_t = d(w_t, m_t)/d lam_k   (one pair per hyperparameter)
 * along with the weights:
 *     Z_{t+1} = A_t (gamma Z_t) + B_t,   A_t = d(w_{t+1}, m_{t+1})/d(w_t, m_t),
 *                                        B_t = d(w_{t+1}, m_{t+1})/d lam_k
 * (one ad_jvp per hyperparameter on the recorded step: the Hessian of the loss
 * enters through A_t), and the hypergradient of the current loss is
 *     h_k = dL_t/d lam_k = g_t . Z_t^w.
 * gamma = 0 keeps one step of history: Baydin's rule, h_lr = -g_t . m_t.
 * gamma = 1 is the exact forward-mode hypergradient of the online run; in
 * between, the influence of old steps fades geometrically.
 *
 * Each step then moves log lr and logit mu against the cosine between g_t and
 * Z_t^w (the scale-free, multiplicative form of Baydin's update: lr stays
 * positive, mu inside (0, 1), and beta is a step in log-space whatever the
 * size of the gradients). A second copy of the network trains on the same
 * batches from the same start with lr and mu fixed at their initial values.
 *
 *     ./build/examples/lr_hypergradient                 # lr 0.01, mu 0.5 to start
 *     ./build/examples/lr_hypergradient --gamma 0       # Baydin's one-step rule
 *     ./build/examples/lr_hypergradient --no-momentum   # learn lr only (plain SGD-HD)
 *
 * Ends with one line:
 *   summary: final_loss=A fixed_lr_loss=B final_lr=... final_momentum=... */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "example_util.h"
#include "hypertape.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { IN = 784, HID = 100, OUT = 10, BATCH = 128, NP = 4 };

/* Mean cross-entropy of the MLP x -> relu(x W1 + b1) W2 + b2. */
static ad_tensor *mlp_logits(ad_tape *t, ad_tensor *const *w, ad_tensor *x) {
  ad_tensor *h = ad_relu(t, ad_add_rowvec(t, ad_matmul(t, x, w[0], 0, 0), w[1]));
  return ad_add_rowvec(t, ad_matmul(t, h, w[2], 0, 0), w[3]);
}

/* Mean cross-entropy and accuracy over a whole data set, recording nothing. */
static double eval(ad_tape *t, ad_tensor *const *w, const ds_dataset *d, double *acc) {
  int prev = ad_set_recording(t, 0);
  ad_marker mk = ad_mark(t);
  ad_tensor *z = mlp_logits(t, w, d->x);
  ad_tensor *L = ad_cross_entropy(t, z, d->labels, d->n);
  double loss = L ? ad_item(L) : NAN;
  if (acc) *acc = z ? (double)ex_hits(z, d->labels) / (double)d->n : NAN;
  ad_rewind(t, mk);
  ad_set_recording(t, prev);
  return loss;
}

static double dotv(ad_tensor *const *a, ad_tensor *const *b) {
  double s = 0;
  for (int i = 0; i < NP; i++)
    for (int64_t j = 0; j < a[i]->size; j++) s += ad_get(a[i], j) * ad_get(b[i], j);
  return s;
}

typedef struct {
  double lr, mu;     /* the values used by this step */
  double h_lr, h_mu; /* hypergradients dL_t/dlr, dL_t/dmu */
  double c_lr, c_mu; /* the cosines the update used */
  double loss;       /* L_t(w_t) on this batch */
} hd_record;

/* Heap state of the learning run. */
typedef struct {
  ad_tensor *w[NP], *m[NP]; /* weights and momentum buffers */
  ad_tensor *Z[2][2 * NP];  /* Z[k] = d(w, m)/d lam_k: NP tangents for w, NP for m */
  ad_tensor *lr, *mu;       /* scalar leaves the recorded step reads */
  double log_lr, logit_mu;  /* what the updates move */
  int learn_mu;
} hd_state;

static double sigmoid(double x) {
  return 1 / (1 + exp(-x));
}

/* One step of hypergradient descent on the batch (xb, yb). */
static int hd_step(ad_tape *t, hd_state *s, ad_tensor *xb, const int32_t *yb, double beta,
                   double gamma, hd_record *r) {
  ad_marker mk = ad_mark(t);
  ad_tensor *L = ad_cross_entropy(t, mlp_logits(t, s->w, xb), yb, BATCH), *g[NP];
  /* Recorded gradient: the step below is then a function of w whose
   * derivative (A_t) contains the Hessian of L_t. */
  if (!L || ad_grad(t, 1, &L, NULL, NP, s->w, g, AD_GRAD_RECORD)) goto fail;
  r->loss = ad_item(L);

  /* The hypergradient of this loss through the past, and the update. */
  ad_tensor *zw[2][NP];
  for (int k = 0; k < 2; k++) memcpy(zw[k], s->Z[k], sizeof zw[k]);
  double gg = sqrt(dotv(g, g));
  r->h_lr = dotv(g, zw[0]), r->h_mu = dotv(g, zw[1]);
  double n_lr = sqrt(dotv(zw[0], zw[0])), n_mu = sqrt(dotv(zw[1], zw[1]));
  r->c_lr = n_lr > 0 && gg > 0 ? r->h_lr / (gg * n_lr) : 0;
  r->c_mu = n_mu > 0 && gg > 0 ? r->h_mu / (gg * n_mu) : 0;
  /* d/dlog lr = lr h_lr has the sign of h_lr: a step against it in log-space. */
  s->log_lr -= beta * r->c_lr;
  if (s->learn_mu) s->logit_mu -= beta * r->c_mu;
  r->lr = exp(s->log_lr), r->mu = sigmoid(s->logit_mu);
  ad_set(s->lr, 0, r->lr);
  ad_set(s->mu, 0, r->mu);

  /* The step, recorded: m' = mu m + g, w' = w - lr m'. */
  ad_tensor *out[2 * NP], *in[2 * NP + 2], *tan[2 * NP + 2], *zo[2 * NP];
  for (int i = 0; i < NP; i++) {
    out[NP + i] = ad_add(t, ad_mul(t, s->mu, s->m[i]), g[i]);
    out[i] = ad_sub(t, s->w[i], ad_mul(t, s->lr, out[NP + i]));
    in[i] = s->w[i], in[NP + i] = s->m[i];
  }
  in[2 * NP] = s->lr, in[2 * NP + 1] = s->mu;
  if (ad_tape_status(t)) goto fail;
  /* Forward mode, one hyperparameter at a time: the tangent of (w', m') in
   * the direction (gamma Z, e_k). */
  for (int k = 0; k < 2; k++) {
    if (k == 1 && !s->learn_mu) break;
    for (int i = 0; i < 2 * NP; i++) tan[i] = ad_scale(t, s->Z[k][i], gamma);
    tan[2 * NP] = ad_scalar(t, AD_F32, k == 0);
    tan[2 * NP + 1] = ad_scalar(t, AD_F32, k == 1);
    if (ad_jvp(t, 2 * NP + 2, in, tan, 2 * NP, out, zo, 0)) goto fail;
    for (int i = 0; i < 2 * NP; i++)
      if (ad_copy_values(s->Z[k][i], zo[i])) goto fail;
  }
  for (int i = 0; i < NP; i++)
    if (ad_copy_values(s->w[i], out[i]) || ad_copy_values(s->m[i], out[NP + i])) goto fail;
  ad_rewind(t, mk);
  return 0;
fail:
  fprintf(stderr, "lr_hypergradient: %s\n", ad_tape_errmsg(t));
  return -1;
}

int main(int argc, char **argv) {
  const char *dir = NULL, *log_path = "/tmp/lr_hypergradient.jsonl";
  int steps = 1500, threads = 0, fixed_mu = 0;
  int64_t limit = 0;
  uint64_t seed = 1;
  double lr0 = 0.01, mu0 = 0.5, beta = 0.02, gamma = 0.9;
  const ex_opt opts[] = {
      {"--steps", EX_INT, &steps, "N", .help = "SGD steps (minibatches of 128)", .min = 1,
       .max = 10000000},
      {"--lr", EX_DOUBLE, &lr0, "LR",
       .help = "initial learning rate, and the fixed one of the comparison", .max = 10,
       .gt_min = 1},
      {"--momentum", EX_DOUBLE, &mu0, "MU", .help = "initial momentum (and the fixed one)",
       .max = 0.999},
      {"--beta", EX_DOUBLE, &beta, "B", .help = "hyper step in log-space per unit cosine",
       .max = 10},
      {"--gamma", EX_DOUBLE, &gamma, "G",
       .help = "decay of the forward tangents: 0 = Baydin's one-step rule, 1 = the exact online "
               "forward-mode hypergradient",
       .max = 1},
      {"--no-momentum", EX_FLAG, &fixed_mu, NULL,
       .help = "keep mu at its initial value; learn lr only"},
      {"--seed", EX_U64, &seed, "S", .help = "initial weights and batch order"},
      {"--data", EX_STR, &dir, "DIR",
       .help = "MNIST IDX files (default: the embedded 8,000/2,000 digits)"},
      {"--limit", EX_I64, &limit, "N",
       .help = "only the first N train and test digits (quick runs, valgrind)", .min = BATCH,
       .max = 1e9},
      {"--log", EX_STR, &log_path, "FILE", .help = "JSON lines, one per step"},
      EX_OPT_THREADS(&threads),
      {0}};
  ex_parse_args(argc, argv,
                "learns the learning rate and momentum of SGD while it trains, by forward-mode "
                "hypergradient (hypergradient descent)",
                opts);
  const int learn_mu = !fixed_mu;
  ex_set_threads(threads);
  ds_dataset *train = NULL, *test = NULL;
  const ds_mnist_opts lim = {.limit = limit};
  if (ds_mnist_load(&train, dir, "train", &lim) || ds_mnist_load(&test, dir, "test", &lim)) {
    fprintf(stderr, "lr_hypergradient: %s\n", ds_errmsg());
    return 1;
  }
  if (train->dim != IN || test->dim != IN || train->n < BATCH) {
    fprintf(stderr, "lr_hypergradient: expected at least %d 28x28 digits\n", BATCH);
    return 1;
  }

  /* Two identical networks: hd (learns lr and mu) and fixed. */
  const int nd[NP] = {2, 1, 2, 1};
  const int64_t shapes[NP][2] = {{IN, HID}, {HID}, {HID, OUT}, {OUT}};
  hd_state s = {.log_lr = log(lr0), .logit_mu = log(mu0 / (1 - mu0)), .learn_mu = learn_mu};
  ad_tensor *fw[NP];
  ad_rng rng;
  ad_rng_seed(&rng, seed);
  int err = 0;
  for (int i = 0; i < NP; i++) {
    err |= ad_tensor_new(&s.w[i], AD_F32, nd[i], shapes[i]) ||
           ad_tensor_new(&s.m[i], AD_F32, nd[i], shapes[i]) ||
           ad_tensor_new(&fw[i], AD_F32, nd[i], shapes[i]);
    for (int k = 0; k < 2; k++)
      err |= ad_tensor_new(&s.Z[k][i], AD_F32, nd[i], shapes[i]) ||
             ad_tensor_new(&s.Z[k][NP + i], AD_F32, nd[i], shapes[i]);
    if (err) break;
    if (nd[i] == 2) ad_tensor_fill_normal(s.w[i], &rng, 0.0, sqrt(2.0 / (double)shapes[i][0]));
    ad_copy_values(fw[i], s.w[i]);
    ad_requires_grad(s.w[i], 1);
    ad_requires_grad(s.m[i], 1);
    ad_requires_grad(fw[i], 1);
  }
  err = err || ad_tensor_new(&s.lr, AD_F32, 0, NULL) || ad_tensor_new(&s.mu, AD_F32, 0, NULL);
  ad_tape *tape = NULL;
  err = err || ad_tape_new(&tape, &(ad_tape_opts){.arena_mb = 64, .arena_max_mb = 1024});
  if (err) {
    fprintf(stderr, "lr_hypergradient: %s\n", ad_last_error());
    return 1;
  }
  ad_requires_grad(s.lr, 1);
  ad_requires_grad(s.mu, 1);
  const nn_opt_cfg fixed_opt = {.kind = NN_OPT_MOMENTUM, .lr = lr0, .momentum = mu0};
  nn_opt_state fixed_state;
  ds_iter *it = NULL;
  ad_tensor *xb = NULL;
  int32_t yb[BATCH];
  if (nn_opt_state_init(&fixed_opt, &fixed_state, NP, fw) ||
      ad_tensor_new(&xb, AD_F32, 2, (int64_t[]){BATCH, IN})) {
    fprintf(stderr, "lr_hypergradient: %s\n", ad_last_error());
    return 1;
  }
  if (ds_iter_new(&it, train->x, train->labels, NULL,
                  &(ds_iter_opts){.batch = BATCH, .seed = seed})) {
    fprintf(stderr, "lr_hypergradient: %s\n", ds_errmsg());
    return 1;
  }
  FILE *log = fopen(log_path, "w");
  if (!log) {
    fprintf(stderr, "lr_hypergradient: cannot write the log %s\n", log_path);
    return 1;
  }
  printf("lr_hypergradient: MLP %d-%d-%d on %lld digits, batch %d, %d steps, heavy-ball SGD "
         "from lr %g mu %g, beta %g, gamma %g%s\n",
         IN, HID, OUT, (long long)train->n, BATCH, steps, lr0, mu0, beta, gamma,
         learn_mu ? "" : " (mu fixed)");
  printf("%6s %9s %9s %9s %9s %10s %10s\n", "step", "loss", "fixed", "lr", "momentum", "cos(g,Zlr)",
         "cos(g,Zmu)");
  double t0 = ex_now_s(), ema = NAN, ema_fixed = NAN;
  for (int step = 0; step < steps; step++) {
    if (ds_iter_next(it, xb, yb, NULL, NULL)) {
      fprintf(stderr, "lr_hypergradient: %s\n", ds_errmsg());
      return 1;
    }
    hd_record r;
    if (hd_step(tape, &s, xb, yb, beta, gamma, &r)) return 1;
    if (ex_diverged("lr_hypergradient", r.loss, "the learned-schedule run")) return 1;
    /* The comparison run: the library's in-place heavy ball, lr and mu fixed. */
    ad_marker mk = ad_mark(tape);
    ad_tensor *L = ad_cross_entropy(tape, mlp_logits(tape, fw, xb), yb, BATCH), *g[NP];
    if (!L || ad_grad(tape, 1, &L, NULL, NP, fw, g, 0) ||
        nn_opt_step(&fixed_opt, &fixed_state, NP, fw, g)) {
      fprintf(stderr, "lr_hypergradient: %s\n", ad_tape_errmsg(tape));
      return 1;
    }
    double lf = ad_item(L);
    if (ex_diverged("lr_hypergradient", lf, "the fixed-lr run")) return 1;
    ad_rewind(tape, mk);
    /* Smoothed batch losses (EMA over ~50 steps) for the progress lines. */
    ema = step ? 0.98 * ema + 0.02 * r.loss : r.loss;
    ema_fixed = step ? 0.98 * ema_fixed + 0.02 * lf : lf;
    fprintf(log,
            "{\"step\": %d, \"loss\": %.6f, \"loss_fixed\": %.6f, \"loss_ema\": %.6f, "
            "\"loss_fixed_ema\": %.6f, \"lr\": %.6g, \"momentum\": %.6f, \"hg_lr\": %.6g, "
            "\"hg_momentum\": %.6g, \"cos_lr\": %.4f, \"cos_momentum\": %.4f}\n",
            step, r.loss, lf, ema, ema_fixed, r.lr, r.mu, r.h_lr, r.h_mu, r.c_lr, r.c_mu);
    if (step % 100 == 0 || step == steps - 1)
      printf("%6d %9.4f %9.4f %9.5f %9.4f %10.3f %10.3f\n", step, ema, ema_fixed, r.lr, r.mu,
             r.c_lr, r.c_mu);
  }
  fclose(log);
  double acc_hd, acc_fixed;
  double loss_hd = eval(tape, s.w, train, NULL), loss_fixed = eval(tape, fw, train, NULL);
  eval(tape, s.w, test, &acc_hd);
  eval(tape, fw, test, &acc_fixed);
  printf("training loss over all %lld digits after %d steps: learned schedule %.4f, fixed lr "
         "%.4f; test accuracy %.4f vs %.4f\n",
         (long long)train->n, steps, loss_hd, loss_fixed, acc_hd, acc_fixed);
  printf("summary: final_loss=%.4f fixed_lr_loss=%.4f final_lr=%.5f final_momentum=%.4f "
         "test_accuracy=%.4f fixed_lr_test_accuracy=%.4f seconds=%.1f log=%s\n",
         loss_hd, loss_fixed, exp(s.log_lr), sigmoid(s.logit_mu), acc_hd, acc_fixed,
         ex_now_s() - t0, log_path);
  ds_iter_free(it);
  nn_opt_state_free(&fixed_state);
  ad_tensor_free(xb);
  for (int i = 0; i < NP; i++) {
    ad_tensor_free(s.w[i]);
    ad_tensor_free(s.m[i]);
    ad_tensor_free(fw[i]);
    for (int k = 0; k < 2; k++) {
      ad_tensor_free(s.Z[k][i]);
      ad_tensor_free(s.Z[k][NP + i]);
    }
  }
  ad_tensor_free(s.lr);
  ad_tensor_free(s.mu);
  ad_tape_free(tape);
  ds_dataset_free(train);
  ds_dataset_free(test);
  return 0;
}
