/* unroll_bench.h — the unroll_T{10,50,200} workloads (bench_unroll_T*.c
 * define UNROLL_T and include this): the hypergradient of the validation
 * loss with respect to per-parameter weight decay, by reverse mode through
 * T recorded SGD steps (bl_unroll).
 *
 * Model (no biases, as bench/mlp.h): logits = relu(X W1) W2,
 * loss = mean NLL of log_softmax; W1 [784, 200], W2 [200, 10], f32.
 * Inner: SGD, lr 0.1, w <- w - lr (grad L_train(w) + lam . w), lam shaped
 * like w (weight_decay_vars); step k uses training batch k mod NB (128
 * random inputs, random labels). Outer: L_val on one batch of 512.
 * Twin: unroll_T* in bench/torch_twins.py (torch.autograd.grad through T
 * steps built with create_graph=True).
 *
 * Floor: the GEMMs the computation cannot avoid, through ad_gemm_f32:
 * per inner step the 5 of loss + gradient and, for every step but the
 * first, the 8 of the backward through that gradient (bench/mlp.h's
 * mlp_floor_hvp: the reverse pass through a recorded gradient step is an
 * HVP plus a mixed partial; at step 0 only lam's adjoint is wanted, which
 * does not go through the gradient of L_train), and the 5 of L_val's
 * gradient at batch 512. PyTorch's engine prunes the same step-0 work.
 *
 * Iterations: a T = 200 hypergradient takes about a second, so the timed
 * iterations are capped at max(5, 2000 / T) (warmup at 2); the JSON line
 * reports the number used. It also reports peak_arena_bytes (bl_stats: the
 * arena high-water mark of one hypergradient above what was in use before). */
#ifndef HT_BENCH_UNROLL_H
#define HT_BENCH_UNROLL_H

#include "bench_util.h"
#include "bilevel/bl.h"

#include <math.h>

enum { UB_B = 128, UB_V = 512, UB_IN = 784, UB_H = 200, UB_OUT = 10, UB_NB = 8 };

typedef struct {
  ad_tape *tape;
  ad_tensor *x[UB_NB], *xv, *w0[2], *lam[2], *hg[2];
  int32_t y[UB_NB][UB_B], yv[UB_V];
  bl_problem p;
  bl_stats st;
  float *buf[8]; /* floor scratch */
} ub_problem;

static ad_tensor *ub_loss(ad_tape *t, ad_tensor *x, ad_tensor *const *w, const int32_t *y,
                          int64_t n) {
  ad_tensor *a = ad_relu(t, ad_matmul(t, x, w[0], 0, 0));
  return ad_nll(t, ad_log_softmax(t, ad_matmul(t, a, w[1], 0, 0), 1), y, n);
}

static ad_tensor *ub_train(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                           void *ctx) {
  (void)lam;
  ub_problem *u = ctx;
  return ub_loss(t, u->x[step % UB_NB], w, u->y[step % UB_NB], UB_B);
}

static ad_tensor *ub_val(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                         void *ctx) {
  (void)lam, (void)step;
  ub_problem *u = ctx;
  return ub_loss(t, u->xv, w, u->yv, UB_V);
}

static void ub_free(ub_problem *u) {
  ad_tape_free(u->tape);
  for (int i = 0; i < UB_NB; i++) ad_tensor_free(u->x[i]);
  ad_tensor_free(u->xv);
  for (int i = 0; i < 2; i++) {
    ad_tensor_free(u->w0[i]);
    ad_tensor_free(u->lam[i]);
    ad_tensor_free(u->hg[i]);
  }
  for (int i = 0; i < 8; i++) free(u->buf[i]);
}

static int ub_init(ub_problem *u, int64_t T) {
  *u = (ub_problem){0};
  ad_rng r;
  ad_rng_seed(&r, 42);
  const int64_t sx[2] = {UB_B, UB_IN}, sv[2] = {UB_V, UB_IN}, s1[2] = {UB_IN, UB_H},
                s2[2] = {UB_H, UB_OUT};
  /* Arena: the recorded trajectory grows with T (about 3 MB per step). */
  size_t mb = (size_t)(64 + 4 * T);
  if (ad_tape_new(&u->tape, &(ad_tape_opts){.arena_mb = mb, .arena_max_mb = 2 * mb}) != AD_OK)
    return -1;
  for (int i = 0; i < UB_NB; i++) {
    if (ad_tensor_new(&u->x[i], AD_F32, 2, sx) != AD_OK) return -1;
    ad_tensor_fill_normal(u->x[i], &r, 0.0, 1.0);
    for (int j = 0; j < UB_B; j++) u->y[i][j] = (int32_t)ad_rng_below(&r, UB_OUT);
  }
  if (ad_tensor_new(&u->xv, AD_F32, 2, sv) != AD_OK) return -1;
  ad_tensor_fill_normal(u->xv, &r, 0.0, 1.0);
  for (int j = 0; j < UB_V; j++) u->yv[j] = (int32_t)ad_rng_below(&r, UB_OUT);
  const int64_t *sh[2] = {s1, s2};
  for (int i = 0; i < 2; i++) {
    if (ad_tensor_new(&u->w0[i], AD_F32, 2, sh[i]) != AD_OK ||
        ad_tensor_new(&u->lam[i], AD_F32, 2, sh[i]) != AD_OK ||
        ad_tensor_new(&u->hg[i], AD_F32, 2, sh[i]) != AD_OK)
      return -1;
    ad_tensor_fill_normal(u->w0[i], &r, 0.0, sqrt(2.0 / (double)sh[i][0]));
    ad_tensor_fill_uniform(u->lam[i], &r, 1e-4, 1e-3);
  }
  u->p = (bl_problem){.n_w = 2,
                      .w0 = u->w0,
                      .n_lam = 2,
                      .lam = u->lam,
                      .train_loss = ub_train,
                      .val_loss = ub_val,
                      .ctx = u,
                      .opt = {.kind = NN_OPT_SGD, .lr = 0.1, .weight_decay_vars = u->lam},
                      .inner_steps = T};
  const size_t sizes[8] = {(size_t)UB_V * UB_H,  (size_t)UB_V * UB_OUT, (size_t)UB_V * UB_H,
                           (size_t)UB_IN * UB_H, (size_t)UB_H * UB_OUT, (size_t)UB_IN * UB_H,
                           (size_t)UB_V * UB_H,  (size_t)UB_V * UB_OUT};
  for (int i = 0; i < 8; i++) {
    u->buf[i] = malloc(sizes[i] * sizeof(float));
    if (!u->buf[i]) return -1;
    for (size_t j = 0; j < sizes[i]; j++) u->buf[i][j] = (float)(0.01 * ad_rng_normal(&r));
  }
  return 0;
}

static void ub_ours(void *ctx) {
  ub_problem *u = ctx;
  bl_unroll(u->tape, &u->p, NULL, u->hg, &u->st);
}

/* The GEMMs of forward + gradient on n rows (X [n, 784]). */
static void ub_floor_grad(ub_problem *u, const float *x, int64_t n) {
  const float *w1 = u->w0[0]->data, *w2 = u->w0[1]->data;
  float *h = u->buf[0], *z = u->buf[1], *da = u->buf[2], *dw1 = u->buf[3], *dw2 = u->buf[4];
  ad_gemm_f32(0, 0, n, UB_H, UB_IN, 1, x, UB_IN, w1, UB_H, 0, h, UB_H);      /* H = X W1 */
  ad_gemm_f32(0, 0, n, UB_OUT, UB_H, 1, h, UB_H, w2, UB_OUT, 0, z, UB_OUT);  /* Z = A W2 */
  ad_gemm_f32(1, 0, UB_H, UB_OUT, n, 1, h, UB_H, z, UB_OUT, 0, dw2, UB_OUT); /* dW2 = A^T G */
  ad_gemm_f32(0, 1, n, UB_H, UB_OUT, 1, z, UB_OUT, w2, UB_OUT, 0, da, UB_H); /* dA = G W2^T */
  ad_gemm_f32(1, 0, UB_IN, UB_H, n, 1, x, UB_IN, da, UB_H, 0, dw1, UB_H);    /* dW1 = X^T dH */
}

/* The 8 GEMMs of the backward through one recorded gradient (batch 128). */
static void ub_floor_second(ub_problem *u, const float *x) {
  const float *w2 = u->w0[1]->data, *v1 = u->buf[5], *v2 = u->buf[4];
  float *h = u->buf[0], *z = u->buf[1], *da = u->buf[2], *bh = u->buf[6], *bz = u->buf[7];
  float *dw1 = u->buf[3], *dw2 = u->buf[4];
  const int64_t n = UB_B;
  ad_gemm_f32(0, 0, n, UB_H, UB_IN, 1, x, UB_IN, v1, UB_H, 0, bh, UB_H);      /* X bdW1 */
  ad_gemm_f32(0, 1, n, UB_H, UB_OUT, 1, z, UB_OUT, v2, UB_OUT, 0, da, UB_H);  /* G bdW2^T */
  ad_gemm_f32(0, 0, n, UB_OUT, UB_H, 1, h, UB_H, v2, UB_OUT, 0, bz, UB_OUT);  /* A bdW2 */
  ad_gemm_f32(0, 0, n, UB_OUT, UB_H, 1, da, UB_H, w2, UB_OUT, 0, z, UB_OUT);  /* bdA W2 */
  ad_gemm_f32(1, 0, UB_H, UB_OUT, n, 1, da, UB_H, z, UB_OUT, 0, dw2, UB_OUT); /* bdA^T G */
  ad_gemm_f32(1, 0, UB_H, UB_OUT, n, 1, h, UB_H, bz, UB_OUT, 0, dw2, UB_OUT); /* A^T bZ */
  ad_gemm_f32(0, 1, n, UB_H, UB_OUT, 1, bz, UB_OUT, w2, UB_OUT, 0, da, UB_H); /* bZ W2^T */
  ad_gemm_f32(1, 0, UB_IN, UB_H, n, 1, x, UB_IN, bh, UB_H, 0, dw1, UB_H);     /* X^T bH */
}

static void ub_floor(void *ctx) {
  ub_problem *u = ctx;
  for (int64_t k = 0; k < u->p.inner_steps; k++) {
    const float *x = u->x[k % UB_NB]->data;
    ub_floor_grad(u, x, UB_B);
    if (k > 0) ub_floor_second(u, x); /* step 0: w_0 is not differentiated */
  }
  ub_floor_grad(u, u->xv->data, UB_V);
}

static int ub_main(int argc, char **argv, int64_t T, const char *name) {
  bu_opts o;
  int rc = bu_parse(argc, argv, &o);
  if (rc) return rc > 0 ? 0 : 2;
  int cap = (int)(2000 / T) > 5 ? (int)(2000 / T) : 5;
  if (o.iters > cap) o.iters = cap;
  if (o.warmup > 2) o.warmup = 2;
  ub_problem u;
  if (ub_init(&u, T) != 0) {
    fprintf(stderr, "%s: setup failed: %s\n", name, ad_last_error());
    ub_free(&u);
    return 1;
  }
  bu_header(name, &o);
  /* One checked hypergradient first. */
  if (bl_unroll(u.tape, &u.p, NULL, u.hg, &u.st) != AD_OK || !isfinite(ad_get(u.hg[0], 0))) {
    fprintf(stderr, "%s: hypergradient failed: %s\n", name, ad_tape_errmsg(u.tape));
    ub_free(&u);
    return 1;
  }
  double n1 = 0;
  for (int64_t i = 0; i < u.hg[0]->size; i++) n1 += fabs(ad_get(u.hg[0], i));
  fprintf(stderr, "# L_val(w_T) %.6f  |dL/dlam1|_1 %.6g  peak arena %.1f MB  hvps %lld\n",
          u.st.val_loss, n1, (double)u.st.peak_arena_bytes / 1048576.0, (long long)u.st.hvps);
  size_t peak = u.st.peak_arena_bytes;
  double ours_ms = 0, floor_ms = 0;
  if (bu_time_pair(ub_ours, ub_floor, &u, &o, &ours_ms, &floor_ms) != 0 ||
      bu_tape_failed(u.tape, name)) {
    ub_free(&u);
    return 1;
  }
  /* bu_report's line with one more field, the memory. */
  printf("{\"workload\": \"%s\", \"threads\": %d, \"iters\": %d, \"ours_ms\": %.4f, "
         "\"floor_ms\": %.4f, \"peak_arena_bytes\": %zu, \"kernel\": ",
         name, o.threads, o.iters, ours_ms, floor_ms, peak);
  bu_json_str(stdout, ad_blas_kernel());
  printf(", \"kernel_reason\": ");
  bu_json_str(stdout, ad_blas_reason());
  printf("}\n");
  ub_free(&u);
  return 0;
}

#endif
