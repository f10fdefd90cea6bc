/* hg_mlp.h — what the hypergradient benches of the MLP share
 * (implicit_bench.h: neumann_K20, cg_K20; unroll_bench.h: unroll_T*):
 * the weights with their per-weight decay, and the floor's scratch and
 * GEMMs.
 *
 * Model (no biases, as bench/mlp.h): logits = relu(X W1) W2, loss = mean
 * NLL of log_softmax (mlp_nll); W1 [784, 200], W2 [200, 10], f32; lam shaped
 * like W (the inner optimizer's weight_decay_vars). Training batches of
 * HG_B rows, one validation batch of HG_V. */
#ifndef HT_BENCH_HG_MLP_H
#define HT_BENCH_HG_MLP_H

#include "bench_util.h"
#include "mlp.h"

#include <math.h>

enum { HG_B = 128, HG_V = 512, HG_NBUF = 8 };

/* W0 (He-initialised), lam ~ U[1e-4, 1e-3] and the hypergradient outputs,
 * drawn from r in this order (the data the benches made before stays
 * bit-identical). Returns 0 on success. */
static inline int hg_weights_init(ad_tensor *w0[2], ad_tensor *lam[2], ad_tensor *hg[2],
                                  ad_rng *r) {
  const int64_t s1[2] = {MLP_IN, MLP_H}, s2[2] = {MLP_H, MLP_OUT};
  const int64_t *sh[2] = {s1, s2};
  for (int i = 0; i < 2; i++) {
    if (ad_tensor_new(&w0[i], AD_F32, 2, sh[i]) != AD_OK ||
        ad_tensor_new(&lam[i], AD_F32, 2, sh[i]) != AD_OK ||
        ad_tensor_new(&hg[i], AD_F32, 2, sh[i]) != AD_OK)
      return -1;
    ad_tensor_fill_normal(w0[i], r, 0.0, sqrt(2.0 / (double)sh[i][0]));
    ad_tensor_fill_uniform(lam[i], r, 1e-4, 1e-3);
  }
  return 0;
}

/* The floor's scratch, N(0, 0.01^2) so no GEMM sees denormals or NaNs.
 * Returns 0 on success (hg_floor_free frees a partial one). */
static inline int hg_floor_alloc(float *buf[HG_NBUF], ad_rng *r) {
  const size_t sizes[HG_NBUF] = {(size_t)HG_V * MLP_H,    (size_t)HG_V * MLP_OUT,
                                 (size_t)HG_V * MLP_H,    (size_t)MLP_IN * MLP_H,
                                 (size_t)MLP_H * MLP_OUT, (size_t)MLP_IN * MLP_H,
                                 (size_t)HG_V * MLP_H,    (size_t)HG_V * MLP_OUT};
  for (int i = 0; i < HG_NBUF; i++) {
    buf[i] = malloc(sizes[i] * sizeof(float));
    if (!buf[i]) return -1;
    for (size_t j = 0; j < sizes[i]; j++) buf[i][j] = (float)(0.01 * ad_rng_normal(r));
  }
  return 0;
}

static inline void hg_floor_free(float *buf[HG_NBUF]) {
  for (int i = 0; i < HG_NBUF; i++) free(buf[i]);
}

/* The GEMMs of forward + gradient on n <= HG_V rows (X [n, 784]). */
static inline void hg_floor_grad(float *const buf[HG_NBUF], ad_tensor *const w0[2], const float *x,
                                 int64_t n) {
  const float *w1 = w0[0]->data, *w2 = w0[1]->data;
  float *h = buf[0], *z = buf[1], *da = buf[2], *dw1 = buf[3], *dw2 = buf[4];
  const int64_t IN = MLP_IN, H = MLP_H, OUT = MLP_OUT;
  ad_gemm_f32(0, 0, n, H, IN, 1, x, IN, w1, H, 0, h, H);      /* H = X W1 */
  ad_gemm_f32(0, 0, n, OUT, H, 1, h, H, w2, OUT, 0, z, OUT);  /* Z = A W2 */
  ad_gemm_f32(1, 0, H, OUT, n, 1, h, H, z, OUT, 0, dw2, OUT); /* dW2 = A^T G */
  ad_gemm_f32(0, 1, n, H, OUT, 1, z, OUT, w2, OUT, 0, da, H); /* dA = G W2^T */
  ad_gemm_f32(1, 0, IN, H, n, 1, x, IN, da, H, 0, dw1, H);    /* dW1 = X^T dH */
}

/* The 8 GEMMs of one backward through a recorded gradient (batch HG_B):
 * the second half of bench/mlp.h's mlp_floor_hvp. V1, V2 stand for the
 * adjoints of dW1, dW2 arriving from above. */
static inline void hg_floor_second(float *const buf[HG_NBUF], ad_tensor *const w0[2],
                                   const float *x) {
  const float *w2 = w0[1]->data, *v1 = buf[5], *v2 = buf[4];
  float *h = buf[0], *z = buf[1], *da = buf[2], *bh = buf[6], *bz = buf[7];
  float *dw1 = buf[3], *dw2 = buf[4];
  const int64_t n = HG_B, IN = MLP_IN, H = MLP_H, OUT = MLP_OUT;
  ad_gemm_f32(0, 0, n, H, IN, 1, x, IN, v1, H, 0, bh, H);      /* X V1 */
  ad_gemm_f32(0, 1, n, H, OUT, 1, z, OUT, v2, OUT, 0, da, H);  /* G V2^T */
  ad_gemm_f32(0, 0, n, OUT, H, 1, h, H, v2, OUT, 0, bz, OUT);  /* A V2 */
  ad_gemm_f32(0, 0, n, OUT, H, 1, da, H, w2, OUT, 0, z, OUT);  /* bdA W2 */
  ad_gemm_f32(1, 0, H, OUT, n, 1, da, H, z, OUT, 0, dw2, OUT); /* bdA^T G */
  ad_gemm_f32(1, 0, H, OUT, n, 1, h, H, bz, OUT, 0, dw2, OUT); /* A^T bZ */
  ad_gemm_f32(0, 1, n, H, OUT, 1, bz, OUT, w2, OUT, 0, da, H); /* bZ W2^T */
  ad_gemm_f32(1, 0, IN, H, n, 1, x, IN, bh, H, 0, dw1, H);     /* X^T bH */
}

#endif
