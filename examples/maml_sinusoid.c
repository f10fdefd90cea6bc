/* maml_sinusoid — few-shot sinusoid regression (Finn et al. 2017), the
 * canonical meta-learning task, learned by four meta methods and a baseline:
 *
 *   task i:   y = A sin(x + phase),  A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]
 *   model:    MLP 1-40-40-1, ReLU; meta-parameters theta
 *   adapt:    phi_i = theta - alpha * grad L_support,i(theta)   (one step, K = 10 shots)
 *   meta:     min_theta  mean_i L_query,i(phi_i)                 (meta-batch 25, Adam)
 *
 *     ./build/examples/maml_sinusoid                     # all five, default steps
 *     ./build/examples/maml_sinusoid --method metasgd --steps 2000
 *
 * maml differentiates through the adaptation (second order), fomaml holds
 * the inner gradient constant, imaml takes the implicit meta-gradient of a
 * proximal adaptation, metasgd (Li et al. 2017) learns alpha too, one rate
 * per weight (the library optimizer's lr_vars, learned as bl_meta_problem's
 * lam), and the baseline trains one network on all tasks jointly (no
 * adaptation in training). Each is then tested the same way on 600 held-out
 * tasks: one adaptation step on 10 shots (at alpha, or at the learned rates
 * for metasgd), MSE on 100 fresh points of the task. Published for 10
 * shots, one step (Li et al. 2017, Table 1): MAML 0.77, Meta-SGD 0.53.
 * Ends with one line:
 *   summary: maml_mse=A fomaml_mse=B imaml_mse=C metasgd_mse=D baseline_mse=E seconds=S */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "example_util.h"
#include "hypertape.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { HID = 40, NP = 6, META_BATCH = 25, SHOTS = 10, EVAL_TASKS = 600, EVAL_POINTS = 100 };

/* The points of a set of tasks: support [SHOTS, 1], query [nq, 1]. */
typedef struct {
  int n;
  ad_tensor **xs, **ys, **xq, **yq;
} task_set;

static void tasks_free(task_set *s) {
  for (int i = 0; i < s->n && s->xs && s->ys && s->xq && s->yq; i++) {
    ad_tensor_free(s->xs[i]);
    ad_tensor_free(s->ys[i]);
    ad_tensor_free(s->xq[i]);
    ad_tensor_free(s->yq[i]);
  }
  free(s->xs), free(s->ys), free(s->xq), free(s->yq);
}
static int tasks_new(task_set *s, int n, int64_t nq) {
  *s = (task_set){.n = n};
  s->xs = calloc((size_t)n, sizeof *s->xs), s->ys = calloc((size_t)n, sizeof *s->ys);
  s->xq = calloc((size_t)n, sizeof *s->xq), s->yq = calloc((size_t)n, sizeof *s->yq);
  if (!s->xs || !s->ys || !s->xq || !s->yq) return -1;
  for (int i = 0; i < n; i++)
    if (ad_tensor_new(&s->xs[i], AD_F32, 2, (int64_t[]){SHOTS, 1}) ||
        ad_tensor_new(&s->ys[i], AD_F32, 2, (int64_t[]){SHOTS, 1}) ||
        ad_tensor_new(&s->xq[i], AD_F32, 2, (int64_t[]){nq, 1}) ||
        ad_tensor_new(&s->yq[i], AD_F32, 2, (int64_t[]){nq, 1}))
      return -1;
  return 0;
}

/* Fresh tasks from r, their support and query points drawn independently. */
static int tasks_draw(task_set *s, ad_rng *r) {
  for (int i = 0; i < s->n; i++) {
    ds_sine_task task;
    if (ds_sine_task_sample(&task, r) || ds_sine_task_points(&task, r, s->xs[i], s->ys[i]) ||
        ds_sine_task_points(&task, r, s->xq[i], s->yq[i]))
      return -1;
  }
  return 0;
}

/* p: W1 [1, H], b1 [H], W2 [H, H], b2 [H], W3 [H, 1], b3 [1] */
static ad_tensor *mlp(ad_tape *t, ad_tensor *const *p, ad_tensor *x) {
  ad_tensor *h = ad_relu(t, ad_add_rowvec(t, ad_matmul(t, x, p[0], 0, 0), p[1]));
  h = ad_relu(t, ad_add_rowvec(t, ad_matmul(t, h, p[2], 0, 0), p[3]));
  return ad_add_rowvec(t, ad_matmul(t, h, p[4], 0, 0), p[5]);
}
static ad_tensor *support_loss(ad_tape *t, ad_tensor *const *p, int task, void *ctx) {
  task_set *s = ctx;
  return ad_mse(t, mlp(t, p, s->xs[task]), s->ys[task]);
}
static ad_tensor *query_loss(ad_tape *t, ad_tensor *const *p, int task, void *ctx) {
  task_set *s = ctx;
  return ad_mse(t, mlp(t, p, s->xq[task]), s->yq[task]);
}
/* The baseline's training gradient: no adaptation, the network as it is
 * fitted to every point (support and query) of the meta-batch's tasks;
 * st->val_loss its mean MSE. */
static ad_status joint_grad(ad_tape *t, const bl_meta_problem *p, ad_tensor *const *g,
                            bl_stats *st) {
  ad_marker mk = ad_mark(t);
  ad_tensor *L = NULL, *gr[NP];
  for (int i = 0; i < p->n_tasks; i++) {
    ad_tensor *li =
        ad_add(t, support_loss(t, p->theta, i, p->ctx), query_loss(t, p->theta, i, p->ctx));
    L = L ? ad_add(t, L, li) : li;
  }
  L = ad_scale(t, L, 0.5 / p->n_tasks);
  ad_status s = ad_grad(t, 1, &L, NULL, NP, p->theta, gr, 0);
  if (s == AD_OK) {
    for (int k = 0; k < NP; k++) ad_copy_values(g[k], gr[k]);
    st->val_loss = ad_item(L);
  }
  ad_rewind(t, mk);
  return s;
}

typedef enum { M_MAML, M_FOMAML, M_IMAML, M_METASGD, M_BASELINE, N_METHODS } method_id;
static const char *const METHOD_NAMES[N_METHODS + 2] = {"maml",     "fomaml", "imaml", "metasgd",
                                                        "baseline", "all",    NULL};

typedef struct {
  int64_t steps;
  double alpha, meta_lr, prox;
  int64_t imaml_steps, cg_iters;
  uint64_t seed;
  FILE *log;
} run_cfg;

/* Held-out score: mean over the evaluation tasks of the query MSE after one
 * adaptation step (p's adaptation: SGD at alpha, or the learned rates).
 * bl_fomaml's st->val_loss is exactly that mean; its meta-gradient (into
 * scratch) is not used. */
static int evaluate(ad_tape *t, bl_meta_problem p, task_set *eval, ad_tensor *const *scratch,
                    double *mse) {
  p.ctx = eval, p.n_tasks = eval->n, p.inner_steps = 1, p.prox = 0;
  p.support_loss = support_loss, p.query_loss = query_loss;
  bl_stats st;
  if (bl_fomaml(t, &p, NULL, scratch, &st) != AD_OK) return -1;
  *mse = st.val_loss;
  return 0;
}

/* Meta-trains one method from the same initial theta (seeded) and returns
 * its held-out MSE. */
static int run(method_id m, const run_cfg *c, ad_tape *t, task_set *train, task_set *eval,
               double *mse) {
  static const int64_t shapes[NP][2] = {{1, HID}, {HID, 0}, {HID, HID}, {HID, 0}, {HID, 1}, {1, 0}};
  ad_tensor *theta[2 * NP] = {0}, *mg[2 * NP] = {0}, *scratch[2 * NP] = {0};
  ad_tensor **alpha = theta + NP; /* Meta-SGD rates, after theta in one list */
  int n_lam = m == M_METASGD ? NP : 0, n = NP + n_lam, status = -1;
  nn_opt_state outer_state = {0};
  ad_rng init, draw;
  ad_rng_seed(&init, c->seed);
  ad_rng_seed(&draw, c->seed * 7919 + 1); /* the training tasks, the same for every method */
  for (int k = 0; k < n; k++) {
    const int64_t *sh = shapes[k % NP];
    int nd = sh[1] ? 2 : 1;
    if (ad_tensor_new(&theta[k], AD_F32, nd, sh) || ad_tensor_new(&mg[k], AD_F32, nd, sh) ||
        ad_tensor_new(&scratch[k], AD_F32, nd, sh))
      goto out;
    if (k >= NP) {
      nn_init_constant(theta[k], c->alpha); /* Meta-SGD: start at MAML's rate */
    } else {
      /* PyTorch's nn.Linear default, U(-1/sqrt(in), 1/sqrt(in)) for weights
       * and biases alike (in = the layer's fan-in, the rows of W: x W). He's
       * larger start makes alpha = 0.01 overshoot: |h|^2 ~ 10^3. */
      double b = 1 / sqrt((double)shapes[k - k % 2][0]);
      for (int64_t e = 0; e < theta[k]->size; e++)
        ad_set(theta[k], e, b * (2 * ad_rng_uniform(&init) - 1));
    }
    ad_requires_grad(theta[k], 1);
  }
  nn_opt_cfg sgd_rates = {.kind = NN_OPT_SGD, .lr_vars = alpha};
  bl_meta_problem p = {.n_theta = NP,
                       .theta = theta,
                       .n_tasks = META_BATCH,
                       .support_loss = support_loss,
                       .query_loss = query_loss,
                       .ctx = train,
                       .inner_lr = m == M_METASGD ? 0 : c->alpha,
                       .inner_steps = m == M_IMAML ? c->imaml_steps : 1,
                       .prox = c->prox,
                       .opt = m == M_METASGD ? &sgd_rates : NULL,
                       .n_lam = n_lam,
                       .lam = n_lam ? alpha : NULL};
  nn_opt_cfg outer = {.kind = NN_OPT_ADAM, .lr = c->meta_lr};
  if (nn_opt_state_init(&outer, &outer_state, n, theta) != AD_OK) goto out;
  const bl_meta_method_fn fns[N_METHODS] = {bl_maml, bl_fomaml, bl_imaml, bl_maml, NULL};
  const char *name = METHOD_NAMES[m];
  double t0 = ex_now_s(), window = 0, worst_residual = 0;
  int64_t every = c->steps >= 10 ? c->steps / 10 : 1, in_window = 0;
  for (int64_t s = 0; s < c->steps; s++) {
    if (tasks_draw(train, &draw) != 0) {
      fprintf(stderr, "maml_sinusoid: %s\n", ds_errmsg());
      goto out;
    }
    bl_stats st = {0};
    if (m == M_BASELINE ? joint_grad(t, &p, mg, &st)
                        : fns[m](t, &p, &(bl_opts){.K = c->cg_iters, .tol = 1e-4}, mg, &st)) {
      fprintf(stderr, "maml_sinusoid: %s: %s\n", name, ad_tape_errmsg(t));
      goto out;
    }
    char where[64];
    snprintf(where, sizeof where, "%s meta-step %lld", name, (long long)s);
    if (ex_diverged("maml_sinusoid", st.val_loss, where)) goto out;
    if (nn_opt_step(&outer, &outer_state, n, theta, mg) != AD_OK) {
      fprintf(stderr, "maml_sinusoid: %s\n", ad_last_error());
      goto out;
    }
    window += st.val_loss, in_window++;
    worst_residual = fmax(worst_residual, st.residual);
    if ((s + 1) % every == 0 || s + 1 == c->steps) {
      printf("%-8s step %6lld/%lld  %s %.4f", name, (long long)s + 1, (long long)c->steps,
             m == M_BASELINE ? "joint_loss" : "query_loss(phi)", window / (double)in_window);
      if (m == M_IMAML) /* how well CG solved (I + H/lambda) x = grad L_query */
        printf("  worst CG residual %.2e", worst_residual);
      printf("  %.1f s\n", ex_now_s() - t0);
      worst_residual = 0;
      fflush(stdout);
      if (c->log)
        fprintf(c->log, "{\"step\": %lld, \"%s_train_loss\": %.6g}\n", (long long)s + 1, name,
                window / (double)in_window);
      window = 0, in_window = 0;
    }
  }
  if (evaluate(t, p, eval, scratch, mse) != 0) {
    fprintf(stderr, "maml_sinusoid: evaluating %s: %s\n", name, ad_tape_errmsg(t));
    goto out;
  }
  if (m == M_METASGD) {
    double mean = 0;
    int64_t cnt = 0;
    for (int k = NP; k < n; k++)
      for (int64_t e = 0; e < theta[k]->size; e++) mean += ad_get(theta[k], e), cnt++;
    printf("%-8s learned rates: mean %.4f (started at %g)\n", name, mean / (double)cnt, c->alpha);
  }
  printf("%-8s held-out MSE after one step on %d shots: %.4f  (%d tasks, %d query points each, "
         "%.1f s)\n",
         name, SHOTS, *mse, eval->n, EVAL_POINTS, ex_now_s() - t0);
  if (c->log) fprintf(c->log, "{\"method\": \"%s\", \"eval_mse\": %.6g}\n", name, *mse);
  status = 0;
out:
  nn_opt_state_free(&outer_state);
  for (int k = 0; k < 2 * NP; k++) {
    ad_tensor_free(theta[k]);
    ad_tensor_free(mg[k]);
    ad_tensor_free(scratch[k]);
  }
  return status;
}

int main(int argc, char **argv) {
  const char *method = "all", *log_path = "/tmp/maml_sinusoid.jsonl";
  run_cfg c = {.steps = 3000,
               .alpha = 0.01,
               .meta_lr = 3e-3,
               .prox = 100,
               .imaml_steps = 1,
               .cg_iters = 3,
               .seed = 1};
  int threads = 0, eval_tasks = EVAL_TASKS;
  const ex_opt opts[] = {
      {"--method", EX_STR, &method, "M", .help = "the meta method, or all of them",
       .choices = METHOD_NAMES},
      {"--steps", EX_I64, &c.steps, "N", .help = "meta-iterations (meta-batch of 25 tasks each)",
       .min = 1, .max = 1e7},
      {"--alpha", EX_DOUBLE, &c.alpha, "A",
       .help = "the adaptation step size (Meta-SGD: the rates' start)", .max = 10, .gt_min = 1},
      {"--meta-lr", EX_DOUBLE, &c.meta_lr, "LR", .help = "Adam learning rate on theta", .max = 1,
       .gt_min = 1},
      {"--prox", EX_DOUBLE, &c.prox, "L", .help = "iMAML's proximal weight lambda", .max = 1e6,
       .gt_min = 1},
      {"--imaml-steps", EX_I64, &c.imaml_steps, "K",
       .help = "iMAML: adaptation steps on its proximal problem in training", .min = 1,
       .max = 1000},
      {"--cg-iters", EX_I64, &c.cg_iters, "K",
       .help = "iMAML: most CG iterations per task (stops earlier at relative residual 1e-4)",
       .min = 1, .max = 1000},
      {"--eval-tasks", EX_INT, &eval_tasks, "N",
       .help = "held-out tasks scored (fewer: quick runs, valgrind)", .min = 1, .max = 100000},
      {"--seed", EX_U64, &c.seed, "S", .help = "seeds the initial weights and the training tasks"},
      {"--log", EX_STR, &log_path, "FILE", .help = "JSON lines: training loss per method"},
      EX_OPT_THREADS(&threads),
      {0}};
  ex_parse_args(argc, argv,
                "few-shot sinusoid regression (Finn et al. 2017) by MAML, first-order MAML, "
                "iMAML and Meta-SGD, against a network trained on all tasks jointly; each tested "
                "by one adaptation step on 10 shots of 600 held-out tasks",
                opts);
  ex_set_threads(threads);

  int status = 1;
  task_set train = {0}, eval = {0};
  ad_tape *tape = NULL;
  run_cfg rc = c;
  double mse[N_METHODS];
  for (int k = 0; k < N_METHODS; k++) mse[k] = NAN;
  if (tasks_new(&train, META_BATCH, SHOTS) != 0 || tasks_new(&eval, eval_tasks, EVAL_POINTS) != 0 ||
      ad_tape_new(&tape, &(ad_tape_opts){.arena_mb = 16, .arena_max_mb = 1024}) != AD_OK) {
    fprintf(stderr, "maml_sinusoid: setup failed: %s\n", ad_last_error());
    goto out;
  }
  /* The held-out tasks come from their own fixed stream: every seed and
   * every method is scored on the same 600 tasks. */
  ad_rng er;
  ad_rng_seed(&er, 0x5eed600);
  if (tasks_draw(&eval, &er) != 0) {
    fprintf(stderr, "maml_sinusoid: %s\n", ds_errmsg());
    goto out;
  }
  rc.log = fopen(log_path, "w");
  if (!rc.log) {
    fprintf(stderr, "maml_sinusoid: cannot write the log %s\n", log_path);
    goto out;
  }
  printf("maml_sinusoid: MLP 1-%d-%d-1 ReLU, meta-batch %d, %d shots, alpha %g, Adam %g, "
         "%lld steps, seed %llu\n",
         HID, HID, META_BATCH, SHOTS, c.alpha, c.meta_lr, (long long)c.steps,
         (unsigned long long)c.seed);
  double t0 = ex_now_s();
  for (int k = 0; k < N_METHODS; k++)
    if (!strcmp(method, "all") || !strcmp(method, METHOD_NAMES[k]))
      if (run((method_id)k, &rc, tape, &train, &eval, &mse[k]) != 0) goto out;
  printf("summary: maml_mse=%.4f fomaml_mse=%.4f imaml_mse=%.4f metasgd_mse=%.4f "
         "baseline_mse=%.4f seconds=%.1f log=%s\n",
         mse[M_MAML], mse[M_FOMAML], mse[M_IMAML], mse[M_METASGD], mse[M_BASELINE], ex_now_s() - t0,
         log_path);
  status = 0;
out:
  if (rc.log) fclose(rc.log);
  tasks_free(&train);
  tasks_free(&eval);
  ad_tape_free(tape);
  return status;
}
