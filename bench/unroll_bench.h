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
#include "hg_mlp.h"

#include <math.h>

enum { UB_B = HG_B, UB_V = HG_V, UB_IN = MLP_IN, UB_OUT = MLP_OUT, UB_NB = 8 };

typedef struct {
  ad_tape *tape;
  ad_tensor *x[UB_NB], *xv, *w0[2], *lam[2], *hg[2];
  int32_t y[UB_NB][UB_B], yv[UB_V];
  bl_problem p;
  bl_stats st;
  float *buf[HG_NBUF]; /* floor scratch (hg_mlp.h) */
} ub_problem;

static ad_tensor *ub_train(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                           void *ctx) {
  (void)lam;
  ub_problem *u = ctx;
  return mlp_nll(t, u->x[step % UB_NB], w, u->y[step % UB_NB], UB_B);
}

static ad_tensor *ub_val(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                         void *ctx) {
  (void)lam, (void)step;
  ub_problem *u = ctx;
  return mlp_nll(t, u->xv, w, u->yv, UB_V);
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
  hg_floor_free(u->buf);
}

static int ub_init(ub_problem *u, int64_t T) {
  *u = (ub_problem){0};
  ad_rng r;
  ad_rng_seed(&r, 42);
  const int64_t sx[2] = {UB_B, UB_IN}, sv[2] = {UB_V, UB_IN};
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
  if (hg_weights_init(u->w0, u->lam, u->hg, &r) != 0) return -1;
  u->p = (bl_problem){.n_w = 2,
                      .w0 = u->w0,
                      .n_lam = 2,
                      .lam = u->lam,
                      .train_loss = ub_train,
                      .val_loss = ub_val,
                      .ctx = u,
                      .opt = {.kind = NN_OPT_SGD, .lr = 0.1, .weight_decay_vars = u->lam},
                      .inner_steps = T};
  if (hg_floor_alloc(u->buf, &r) != 0) return -1;
  return 0;
}

static void ub_ours(void *ctx) {
  ub_problem *u = ctx;
  bl_unroll(u->tape, &u->p, NULL, u->hg, &u->st);
}

static void ub_floor(void *ctx) {
  ub_problem *u = ctx;
  for (int64_t k = 0; k < u->p.inner_steps; k++) {
    const float *x = u->x[k % UB_NB]->data;
    hg_floor_grad(u->buf, u->w0, x, UB_B);
    if (k > 0) hg_floor_second(u->buf, u->w0, x); /* step 0: w_0 is not differentiated */
  }
  hg_floor_grad(u->buf, u->w0, u->xv->data, UB_V);
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
  bu_report_peak(name, &o, ours_ms, floor_ms, peak);
  ub_free(&u);
  return 0;
}

#endif
