/* maml_bench.h — what bench_maml_sinusoid.c (25 tasks) and
 * bench_maml_sinusoid_100.c (100 tasks) share: the MAML meta-gradient
 * (bl_maml) on sinusoid regression (Finn et al. 2017): MLP 1-40-40-1 with
 * ReLU and biases, f32, n_tasks tasks, 10 support and 10 query points each, one inner SGD step
 * (alpha = 0.01), meta-loss = mean query MSE, its gradient w.r.t. the six
 * parameter tensors through the inner step (second order).
 * Twins: maml_sinusoid and maml_sinusoid_100 in bench/twins_implicit.py
 * (the fastest of the per-task loop, functorch.vmap(grad) and hand-batched
 * autograd with bmm).
 *
 * A small-op workload: every GEMM is at most 10 x 40 x 40, so the time goes
 * to per-op overhead (recording, allocation, dispatch), not arithmetic.
 * Ours runs the batched path (bl_meta_problem.support_batch / query_batch):
 * 25 tasks at a time as one graph on parameters stacked over tasks
 * ([25, ...], ad_bmm and ad_add_batch_rowvec), so the op count is that of
 * one task per batch. (All 100 at once is ~25% slower here: that graph,
 * ~12 MB of arena, no longer stays in cache; batches of 25 use ~3 MB.)
 * The per-task loop (support / query below) is kept and its meta-gradient
 * compared with the batched one at setup (stderr).
 * The batched graph does the same products as the per-task loop, the 30
 * per task counted below, but each ad_bmm runs them for the whole batch in
 * one call of its own tiny-product loop (autodiff/ops_bmm.c) rather than
 * one ad_gemm_f32 call per task. The floor stays what it was, these
 * products through ad_gemm_f32 one task at a time: the reference the
 * per-task path cannot beat. Ours may go below it (ours/floor < 1):
 * ad_bmm's loop has no per-call overhead and computes A B^T without a
 * transposed copy.
 * Floor (ad_gemm_f32): per task the 30 GEMMs the second-order meta-gradient
 * cannot avoid (and bl_maml issues exactly these) — support forward 3 and
 * backward 5, query forward 3 and backward 5, then back through the
 * recorded support gradient (2 per GEMM of its backward, 1 for dW1 = X^T dZ1
 * whose X is data: 9) and the support forward (5). */
#ifndef HT_BENCH_MAML_H
#define HT_BENCH_MAML_H
#include "bench_util.h"
#include "bilevel/bl.h"
#include "datasets/ds.h"

#include <math.h>

enum { MT_MAX = 100, MK = 10, MHID = 40 };

typedef struct {
  int n_tasks; /* <= MT_MAX */
  ad_tape *tape;
  ad_tensor *xs[MT_MAX], *ys[MT_MAX], *xq[MT_MAX], *yq[MT_MAX];
  ad_tensor *XS, *YS, *XQ, *YQ; /* [n_tasks, MK, 1]: the same points stacked */
  ad_tensor *theta[6], *mg[6];
  bl_meta_problem p;
  bl_stats st;
  float fb[16][MHID * MHID]; /* floor scratch */
} mb_problem;

static ad_tensor *net(ad_tape *t, ad_tensor *const *p, ad_tensor *x) {
  ad_tensor *h = ad_relu(t, ad_add_rowvec(t, ad_matmul(t, x, p[0], 0, 0), p[1]));
  h = ad_relu(t, ad_add_rowvec(t, ad_matmul(t, h, p[2], 0, 0), p[3]));
  return ad_add_rowvec(t, ad_matmul(t, h, p[4], 0, 0), p[5]);
}
static ad_tensor *support(ad_tape *t, ad_tensor *const *p, int i, void *ctx) {
  mb_problem *u = ctx;
  return ad_mse(t, net(t, p, u->xs[i]), u->ys[i]);
}
static ad_tensor *query(ad_tape *t, ad_tensor *const *p, int i, void *ctx) {
  mb_problem *u = ctx;
  return ad_mse(t, net(t, p, u->xq[i]), u->yq[i]);
}

/* The batched twins: the same MLP on stacked parameters, the sum over tasks
 * of the per-task MSEs (ad_mse means over all n_tasks MK points). */
static ad_tensor *net_b(ad_tape *t, ad_tensor *const *p, ad_tensor *x) {
  ad_tensor *h = ad_relu(t, ad_add_batch_rowvec(t, ad_bmm(t, x, p[0], 0, 0), p[1]));
  h = ad_relu(t, ad_add_batch_rowvec(t, ad_bmm(t, h, p[2], 0, 0), p[3]));
  return ad_add_batch_rowvec(t, ad_bmm(t, h, p[4], 0, 0), p[5]);
}
static ad_tensor *batch_mse(ad_tape *t, ad_tensor *const *p, ad_tensor *X, ad_tensor *Y, int task0,
                            int n) {
  ad_tensor *out = net_b(t, p, ad_slice(t, X, 0, task0, n));
  return ad_scale(t, ad_mse(t, out, ad_slice(t, Y, 0, task0, n)), n);
}
static ad_tensor *support_b(ad_tape *t, ad_tensor *const *p, int task0, int n, void *ctx) {
  mb_problem *u = ctx;
  return batch_mse(t, p, u->XS, u->YS, task0, n);
}
static ad_tensor *query_b(ad_tape *t, ad_tensor *const *p, int task0, int n, void *ctx) {
  mb_problem *u = ctx;
  return batch_mse(t, p, u->XQ, u->YQ, task0, n);
}

static void mb_free(mb_problem *u) {
  ad_tape_free(u->tape);
  for (int i = 0; i < u->n_tasks; i++) {
    ad_tensor_free(u->xs[i]);
    ad_tensor_free(u->ys[i]);
    ad_tensor_free(u->xq[i]);
    ad_tensor_free(u->yq[i]);
  }
  ad_tensor_free(u->XS);
  ad_tensor_free(u->YS);
  ad_tensor_free(u->XQ);
  ad_tensor_free(u->YQ);
  for (int k = 0; k < 6; k++) {
    ad_tensor_free(u->theta[k]);
    ad_tensor_free(u->mg[k]);
  }
}

static int mb_init(mb_problem *u, int n_tasks) {
  memset(u, 0, sizeof *u);
  u->n_tasks = n_tasks;
  ad_rng r;
  ad_rng_seed(&r, 42);
  if (ad_tape_new(&u->tape, &(ad_tape_opts){.arena_mb = 16, .arena_max_mb = 64}) != AD_OK)
    return -1;
  const int64_t sk[2] = {MK, 1}, sb[3] = {n_tasks, MK, 1};
  if (ad_tensor_new(&u->XS, AD_F32, 3, sb) || ad_tensor_new(&u->YS, AD_F32, 3, sb) ||
      ad_tensor_new(&u->XQ, AD_F32, 3, sb) || ad_tensor_new(&u->YQ, AD_F32, 3, sb))
    return -1;
  for (int i = 0; i < n_tasks; i++) {
    ds_sine_task task;
    if (ad_tensor_new(&u->xs[i], AD_F32, 2, sk) || ad_tensor_new(&u->ys[i], AD_F32, 2, sk) ||
        ad_tensor_new(&u->xq[i], AD_F32, 2, sk) || ad_tensor_new(&u->yq[i], AD_F32, 2, sk) ||
        ds_sine_task_sample(&task, &r) || ds_sine_task_points(&task, &r, u->xs[i], u->ys[i]) ||
        ds_sine_task_points(&task, &r, u->xq[i], u->yq[i]))
      return -1;
    memcpy((float *)u->XS->data + i * MK, u->xs[i]->data, MK * sizeof(float));
    memcpy((float *)u->YS->data + i * MK, u->ys[i]->data, MK * sizeof(float));
    memcpy((float *)u->XQ->data + i * MK, u->xq[i]->data, MK * sizeof(float));
    memcpy((float *)u->YQ->data + i * MK, u->yq[i]->data, MK * sizeof(float));
  }
  const int nd[6] = {2, 1, 2, 1, 2, 1};
  const int64_t sh[6][2] = {{1, MHID}, {MHID}, {MHID, MHID}, {MHID}, {MHID, 1}, {1}};
  for (int k = 0; k < 6; k++) {
    if (ad_tensor_new(&u->theta[k], AD_F32, nd[k], sh[k]) ||
        ad_tensor_new(&u->mg[k], AD_F32, nd[k], sh[k]))
      return -1;
    /* Kaiming-uniform-like weights, zero biases (the twin draws the same
     * distributions). */
    if (k % 2 == 0) {
      double bound = 1.0 / sqrt((double)sh[k][0]);
      ad_tensor_fill_uniform(u->theta[k], &r, -bound, bound);
    }
  }
  u->p = (bl_meta_problem){.n_theta = 6,
                           .theta = u->theta,
                           .n_tasks = n_tasks,
                           .support_loss = support,
                           .query_loss = query,
                           .support_batch = support_b,
                           .query_batch = query_b,
                           .batch_tasks = 25,
                           .ctx = u,
                           .inner_lr = 0.01,
                           .inner_steps = 1};
  for (int i = 0; i < 16; i++)
    for (int j = 0; j < MHID * MHID; j++) u->fb[i][j] = (float)(0.01 * ad_rng_normal(&r));
  return 0;
}

static void ours(void *ctx) {
  mb_problem *u = ctx;
  bl_maml(u->tape, &u->p, NULL, u->mg, &u->st);
}

/* C [m x n] = op(A) op(B) on the scratch buffers (row strides as stored). */
static void mm(mb_problem *u, int ta, int tb, int64_t m, int64_t n, int64_t k, int a, int b,
               int c) {
  ad_gemm_f32(ta, tb, m, n, k, 1, u->fb[a], ta ? m : k, u->fb[b], tb ? k : n, 0, u->fb[c], n);
}

static void floor_gemms(void *ctx) {
  mb_problem *u = ctx;
  const int64_t K = MK, H = MHID;
  for (int i = 0; i < u->n_tasks; i++) {
    for (int pass = 0; pass < 2; pass++) { /* support, then query: forward + backward */
      mm(u, 0, 0, K, H, 1, 0, 1, 2);       /* X W1 */
      mm(u, 0, 0, K, H, H, 2, 3, 4);       /* A1 W2 */
      mm(u, 0, 0, K, 1, H, 4, 5, 6);       /* A2 W3 */
      mm(u, 1, 0, H, 1, K, 4, 6, 7);       /* dW3 = A2^T G */
      mm(u, 0, 1, K, H, 1, 6, 5, 8);       /* dA2 = G W3^T */
      mm(u, 1, 0, H, H, K, 2, 8, 9);       /* dW2 = A1^T dZ2 */
      mm(u, 0, 1, K, H, H, 8, 3, 10);      /* dA1 = dZ2 W2^T */
      mm(u, 1, 0, 1, H, K, 0, 10, 11);     /* dW1 = X^T dZ1 */
    }
    /* back through the support gradient's five GEMMs */
    mm(u, 0, 0, K, 1, H, 4, 7, 12);  /* A2 bdW3 */
    mm(u, 0, 0, K, H, 1, 6, 7, 13);  /* G bdW3^T ... */
    mm(u, 0, 0, K, 1, H, 8, 5, 12);  /* bdA2 W3 */
    mm(u, 1, 0, 1, H, K, 6, 8, 13);  /* G^T bdA2 */
    mm(u, 0, 0, K, H, H, 2, 9, 14);  /* A1 bdW2 */
    mm(u, 0, 1, K, H, H, 8, 9, 15);  /* dZ2 bdW2^T */
    mm(u, 0, 0, K, H, H, 10, 3, 14); /* bdA1 W2 */
    mm(u, 1, 0, H, H, K, 8, 10, 15); /* dZ2^T bdA1 */
    mm(u, 0, 0, K, H, 1, 0, 11, 14); /* X bdW1 */
    /* and through the support forward to theta */
    mm(u, 1, 0, H, 1, K, 4, 6, 7);   /* A2^T bZ3 */
    mm(u, 0, 1, K, H, 1, 6, 5, 8);   /* bZ3 W3^T */
    mm(u, 1, 0, H, H, K, 2, 8, 9);   /* A1^T bZ2 */
    mm(u, 0, 1, K, H, H, 8, 3, 10);  /* bZ2 W2^T */
    mm(u, 1, 0, 1, H, K, 0, 10, 11); /* X^T bZ1 */
  }
}

static int mb_main(int argc, char **argv, int n_tasks, const char *name) {
  bu_opts o;
  int rc = bu_parse(argc, argv, &o);
  if (rc) return rc > 0 ? 0 : 2;
  mb_problem *u = malloc(sizeof *u);
  if (!u || mb_init(u, n_tasks) != 0) {
    fprintf(stderr, "bench_%s: setup failed: %s\n", name, ad_last_error());
    if (u) mb_free(u);
    free(u);
    return 1;
  }
  bu_header(name, &o);
  if (bl_maml(u->tape, &u->p, NULL, u->mg, &u->st) != AD_OK || !isfinite(ad_get(u->mg[0], 0))) {
    fprintf(stderr, "bench_%s: meta-gradient failed: %s\n", name, ad_tape_errmsg(u->tape));
    mb_free(u);
    free(u);
    return 1;
  }
  /* The per-task loop's meta-gradient, for the record: the batched one
   * must agree to f32 rounding (tests/test_bl_meta_batched.c asserts it). */
  {
    bl_meta_problem q = u->p;
    q.support_batch = q.query_batch = NULL;
    ad_tensor *g1[6] = {0};
    double num = 0, den = 0;
    for (int k = 0; k < 6; k++)
      if (ad_tensor_new(&g1[k], AD_F32, u->mg[k]->ndim, u->mg[k]->shape)) break;
    if (g1[5] && bl_maml(u->tape, &q, NULL, g1, NULL) == AD_OK)
      for (int k = 0; k < 6; k++)
        for (int64_t j = 0; j < g1[k]->size; j++) {
          num = fmax(num, fabs(ad_get(g1[k], j) - ad_get(u->mg[k], j)));
          den = fmax(den, fabs(ad_get(g1[k], j)));
        }
    fprintf(stderr, "# batched vs per-task meta-gradient: max rel diff %.2e\n",
            den > 0 ? num / den : num);
    for (int k = 0; k < 6; k++) ad_tensor_free(g1[k]);
  }
  double n1 = 0;
  for (int k = 0; k < 6; k++)
    for (int64_t j = 0; j < u->mg[k]->size; j++) n1 += fabs(ad_get(u->mg[k], j));
  fprintf(stderr, "# meta-loss %.6f  |meta-grad|_1 %.6g  peak arena %.2f MB\n", u->st.val_loss, n1,
          (double)u->st.peak_arena_bytes / 1048576.0);
  double ours_ms = 0, floor_ms = 0;
  if (bu_time_pair(ours, floor_gemms, u, &o, &ours_ms, &floor_ms) != 0 ||
      bu_tape_failed(u->tape, name)) {
    mb_free(u);
    free(u);
    return 1;
  }
  bu_report(name, &o, ours_ms, floor_ms);
  mb_free(u);
  free(u);
  return 0;
}
#endif
