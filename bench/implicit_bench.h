/* implicit_bench.h — the neumann_K20 and cg_K20 workloads (bench_neumann_K20.c,
 * bench_cg_K20.c): the implicit hypergradient of the validation loss with
 * respect to per-parameter weight decay, with K = 20 Hessian-vector
 * products, at given weights (T = 0: no inner training in the timed part).
 *
 * Model (no biases, as bench/mlp.h and unroll_bench.h): logits = relu(X W1) W2,
 * loss = mean NLL of log_softmax; W1 [784, 200], W2 [200, 10], f32.
 * L_train on one batch of 128, plus the decay sum_k lam_k/2 ||W_k||^2 (lam
 * shaped like W, the inner optimizer's weight_decay_vars); L_val on 512.
 *   neumann: v = alpha sum_{j=0}^{20} (I - alpha H)^j b, alpha = 0.1
 *   cg:      20 CG iterations on (H + I) v = b (tolerance 0: all 20 run;
 *            the damping keeps H + I positive definite at these random
 *            weights, where H alone is not — checked before timing)
 * then hg = -(d^2 L_train / dlam dW) v. Twins: neumann_K20 and cg_K20 in
 * bench/twins_implicit.py (torch.autograd.grad with create_graph=True
 * once, then grad_outputs=v per product), the same algebra step for step.
 *
 * Floor (ad_gemm_f32): the 5 GEMMs of L_val's gradient at 512, the 5 of
 * L_train's at 128, and 8 per product for the backward through the
 * recorded gradient (as bench/mlp.h's mlp_floor_hvp). The mixed partial
 * needs no GEMM: lam touches only the decay term. */
#ifndef HT_BENCH_IMPLICIT_H
#define HT_BENCH_IMPLICIT_H

#include "bench_util.h"
#include "bilevel/bl.h"
#include "hg_mlp.h"

#include <math.h>

enum { IB_B = HG_B, IB_V = HG_V, IB_IN = MLP_IN, IB_OUT = MLP_OUT, IB_K = 20 };

typedef struct {
  ad_tape *tape;
  ad_tensor *x, *xv, *w0[2], *lam[2], *hg[2];
  int32_t y[IB_B], yv[IB_V];
  bl_problem p;
  bl_opts o;
  bl_method_fn method;
  bl_stats st;
  float *buf[HG_NBUF]; /* floor scratch (hg_mlp.h) */
} ib_problem;

static ad_tensor *ib_train(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                           void *ctx) {
  (void)lam, (void)step;
  ib_problem *u = ctx;
  return mlp_nll(t, u->x, w, u->y, IB_B);
}
static ad_tensor *ib_val(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                         void *ctx) {
  (void)lam, (void)step;
  ib_problem *u = ctx;
  return mlp_nll(t, u->xv, w, u->yv, IB_V);
}

static void ib_free(ib_problem *u) {
  ad_tape_free(u->tape);
  ad_tensor_free(u->x);
  ad_tensor_free(u->xv);
  for (int i = 0; i < 2; i++) {
    ad_tensor_free(u->w0[i]);
    ad_tensor_free(u->lam[i]);
    ad_tensor_free(u->hg[i]);
  }
  hg_floor_free(u->buf);
}

/* Data as bench/twins_implicit.py makes it is not bit-identical (different
 * generators); the distributions and shapes are. */
static int ib_init(ib_problem *u) {
  *u = (ib_problem){0};
  ad_rng r;
  ad_rng_seed(&r, 42);
  const int64_t sx[2] = {IB_B, IB_IN}, sv[2] = {IB_V, IB_IN};
  if (ad_tape_new(&u->tape, &(ad_tape_opts){.arena_mb = 64, .arena_max_mb = 256}) != AD_OK ||
      ad_tensor_new(&u->x, AD_F32, 2, sx) != AD_OK || ad_tensor_new(&u->xv, AD_F32, 2, sv) != AD_OK)
    return -1;
  ad_tensor_fill_normal(u->x, &r, 0.0, 1.0);
  ad_tensor_fill_normal(u->xv, &r, 0.0, 1.0);
  for (int j = 0; j < IB_B; j++) u->y[j] = (int32_t)ad_rng_below(&r, IB_OUT);
  for (int j = 0; j < IB_V; j++) u->yv[j] = (int32_t)ad_rng_below(&r, IB_OUT);
  if (hg_weights_init(u->w0, u->lam, u->hg, &r) != 0) return -1;
  u->p = (bl_problem){.n_w = 2,
                      .w0 = u->w0,
                      .n_lam = 2,
                      .lam = u->lam,
                      .train_loss = ib_train,
                      .val_loss = ib_val,
                      .ctx = u,
                      .opt = {.kind = NN_OPT_SGD, .lr = 0.1, .weight_decay_vars = u->lam},
                      .inner_steps = 0};
  if (hg_floor_alloc(u->buf, &r) != 0) return -1;
  return 0;
}

static void ib_ours(void *ctx) {
  ib_problem *u = ctx;
  u->method(u->tape, &u->p, &u->o, u->hg, &u->st);
}

static void ib_floor(void *ctx) {
  ib_problem *u = ctx;
  hg_floor_grad(u->buf, u->w0, u->xv->data, IB_V);
  hg_floor_grad(u->buf, u->w0, u->x->data, IB_B);
  for (int k = 0; k < IB_K; k++) hg_floor_second(u->buf, u->w0, u->x->data);
}

static int ib_main(int argc, char **argv, bl_method_fn method, bl_opts opts, const char *name) {
  bu_opts o;
  int rc = bu_parse(argc, argv, &o);
  if (rc) return rc > 0 ? 0 : 2;
  ib_problem u;
  if (ib_init(&u) != 0) {
    fprintf(stderr, "%s: setup failed: %s\n", name, ad_last_error());
    ib_free(&u);
    return 1;
  }
  u.method = method;
  u.o = opts;
  bu_header(name, &o);
  /* One checked hypergradient first: finite, and all K products used. */
  if (method(u.tape, &u.p, &u.o, u.hg, &u.st) != AD_OK || !isfinite(ad_get(u.hg[0], 0)) ||
      u.st.hvps != IB_K + 1) {
    fprintf(stderr, "%s: hypergradient failed (%lld products): %s\n", name, (long long)u.st.hvps,
            ad_tape_errmsg(u.tape));
    ib_free(&u);
    return 1;
  }
  double n1 = 0, n2 = 0;
  for (int64_t i = 0; i < u.hg[0]->size; i++) n1 += fabs(ad_get(u.hg[0], i));
  for (int64_t i = 0; i < u.hg[1]->size; i++) n2 += fabs(ad_get(u.hg[1], i));
  fprintf(stderr,
          "# L_val %.6f  |hg1|_1 %.6g  |hg2|_1 %.6g  residual %.3g  peak arena %.1f MB  "
          "products %lld\n",
          u.st.val_loss, n1, n2, u.st.residual, (double)u.st.peak_arena_bytes / 1048576.0,
          (long long)u.st.hvps);
  size_t peak = u.st.peak_arena_bytes;
  double ours_ms = 0, floor_ms = 0;
  if (bu_time_pair(ib_ours, ib_floor, &u, &o, &ours_ms, &floor_ms) != 0 ||
      bu_tape_failed(u.tape, name)) {
    ib_free(&u);
    return 1;
  }
  bu_report_peak(name, &o, ours_ms, floor_ms, peak);
  ib_free(&u);
  return 0;
}

#endif
