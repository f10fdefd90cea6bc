/* mlp.h — the MLP problem shared by bench_grad_mlp.c and bench_hvp_mlp.c,
 * and the GEMMs its gradient and Hessian-vector product cannot avoid.
 *
 * Model (no biases): logits = relu(X W1) W2, loss = mean_i -log_softmax(logits)[i, y_i]
 *   X  [128, 784]  input batch (constant)
 *   W1 [784, 200]  W2 [200, 10]  (leaves, f32)
 *   V1, V2         a random direction, shapes of W1, W2 (for the HVP)
 * bench/torch_twins.py builds the same model with the same layout. */
#ifndef HT_BENCH_MLP_H
#define HT_BENCH_MLP_H

#include "autodiff/ad.h"
#include "bench_util.h"

#include <math.h>
#include <stdlib.h>

enum { MLP_B = 128, MLP_IN = 784, MLP_H = 200, MLP_OUT = 10 };

typedef struct {
  ad_tape *tape;
  ad_tensor *x, *w[2], *v[2];
  int32_t labels[MLP_B];
  /* Scratch for the floor GEMMs, named after what they hold in the math. */
  float *h, *z, *g, *dw2, *da, *dw1;       /* forward + first backward */
  float *xv1, *ga, *av2, *bda, *bz, *bdw1; /* second backward (HVP) */
  float *bw2a, *bw2b, *bg;
} mlp_problem;

static inline float *mlp_buf(size_t n, ad_rng *r) {
  float *p = malloc(n * sizeof *p);
  if (p)
    for (size_t i = 0; i < n; i++) p[i] = (float)(0.1 * ad_rng_normal(r));
  return p;
}

static inline void mlp_free(mlp_problem *p) {
  ad_tape_free(p->tape);
  ad_tensor_free(p->x);
  for (int i = 0; i < 2; i++) {
    ad_tensor_free(p->w[i]);
    ad_tensor_free(p->v[i]);
  }
  float *bufs[] = {p->h,   p->z,   p->g,  p->dw2,  p->da,   p->dw1,  p->xv1, p->ga,
                   p->av2, p->bda, p->bz, p->bdw1, p->bw2a, p->bw2b, p->bg};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
}

/* Makes the data (He-initialised weights, N(0,1) inputs, uniform labels).
 * Returns 0 on success. */
static inline int mlp_init(mlp_problem *p, uint64_t seed) {
  ad_rng r;
  ad_rng_seed(&r, seed);
  *p = (mlp_problem){0};
  const int64_t sx[2] = {MLP_B, MLP_IN}, s1[2] = {MLP_IN, MLP_H}, s2[2] = {MLP_H, MLP_OUT};
  if (ad_tape_new(&p->tape, &(ad_tape_opts){.arena_mb = 64, .arena_max_mb = 512}) != AD_OK ||
      ad_tensor_new(&p->x, AD_F32, 2, sx) != AD_OK ||
      ad_tensor_new(&p->w[0], AD_F32, 2, s1) != AD_OK ||
      ad_tensor_new(&p->w[1], AD_F32, 2, s2) != AD_OK ||
      ad_tensor_new(&p->v[0], AD_F32, 2, s1) != AD_OK ||
      ad_tensor_new(&p->v[1], AD_F32, 2, s2) != AD_OK)
    return -1;
  ad_tensor_fill_normal(p->x, &r, 0.0, 1.0);
  ad_tensor_fill_normal(p->w[0], &r, 0.0, sqrt(2.0 / MLP_IN));
  ad_tensor_fill_normal(p->w[1], &r, 0.0, sqrt(2.0 / MLP_H));
  ad_tensor_fill_normal(p->v[0], &r, 0.0, 1.0);
  ad_tensor_fill_normal(p->v[1], &r, 0.0, 1.0);
  ad_requires_grad(p->w[0], 1);
  ad_requires_grad(p->w[1], 1);
  for (int i = 0; i < MLP_B; i++) p->labels[i] = (int32_t)ad_rng_below(&r, MLP_OUT);
  const size_t bh = (size_t)MLP_B * MLP_H, bo = (size_t)MLP_B * MLP_OUT;
  const size_t w1 = (size_t)MLP_IN * MLP_H, w2 = (size_t)MLP_H * MLP_OUT;
  p->h = mlp_buf(bh, &r), p->z = mlp_buf(bo, &r), p->g = mlp_buf(bo, &r);
  p->dw2 = mlp_buf(w2, &r), p->da = mlp_buf(bh, &r), p->dw1 = mlp_buf(w1, &r);
  p->xv1 = mlp_buf(bh, &r), p->ga = mlp_buf(bh, &r), p->av2 = mlp_buf(bo, &r);
  p->bda = mlp_buf(bh, &r), p->bz = mlp_buf(bo, &r), p->bdw1 = mlp_buf(w1, &r);
  p->bw2a = mlp_buf(w2, &r), p->bw2b = mlp_buf(w2, &r), p->bg = mlp_buf(bo, &r);
  return p->h && p->z && p->g && p->dw2 && p->da && p->dw1 && p->xv1 && p->ga && p->av2 && p->bda &&
                 p->bz && p->bdw1 && p->bw2a && p->bw2b && p->bg
             ? 0
             : -1;
}

/* nll(log_softmax(relu(X W1) W2)) on the n rows of x, on the tape; also
 * the loss of the hypergradient benches (hg_mlp.h). */
static inline ad_tensor *mlp_nll(ad_tape *t, ad_tensor *x, ad_tensor *const *w, const int32_t *y,
                                 int64_t n) {
  ad_tensor *a = ad_relu(t, ad_matmul(t, x, w[0], 0, 0));
  return ad_nll(t, ad_log_softmax(t, ad_matmul(t, a, w[1], 0, 0), 1), y, n);
}

/* The loss on the tape at the problem's batch. */
static inline ad_tensor *mlp_loss(mlp_problem *p) {
  return mlp_nll(p->tape, p->x, p->w, p->labels, MLP_B);
}

static inline float *mlp_f(ad_tensor *t) {
  return (float *)t->data;
}

/* The five GEMMs of loss + gradient (A = relu(H) shares H's buffer here:
 * the floor times GEMMs, not the elementwise work between them):
 *   H = X W1 [128x200x784]     Z = A W2 [128x10x200]
 *   dW2 = A^T G [200x10x128]   dA = G W2^T [128x200x10]   dW1 = X^T dH [784x200x128] */
static inline void mlp_floor_grad(mlp_problem *p) {
  const float *x = mlp_f(p->x), *w1 = mlp_f(p->w[0]), *w2 = mlp_f(p->w[1]);
  ad_gemm_f32(0, 0, MLP_B, MLP_H, MLP_IN, 1, x, MLP_IN, w1, MLP_H, 0, p->h, MLP_H);
  ad_gemm_f32(0, 0, MLP_B, MLP_OUT, MLP_H, 1, p->h, MLP_H, w2, MLP_OUT, 0, p->z, MLP_OUT);
  ad_gemm_f32(1, 0, MLP_H, MLP_OUT, MLP_B, 1, p->h, MLP_H, p->g, MLP_OUT, 0, p->dw2, MLP_OUT);
  ad_gemm_f32(0, 1, MLP_B, MLP_H, MLP_OUT, 1, p->g, MLP_OUT, w2, MLP_OUT, 0, p->da, MLP_H);
  ad_gemm_f32(1, 0, MLP_IN, MLP_H, MLP_B, 1, x, MLP_IN, p->da, MLP_H, 0, p->dw1, MLP_H);
}

/* The HVP by reverse-over-reverse (what ad_hvp and torch's double backward
 * do): the five above, then the second backward of s = <dW1,V1> + <dW2,V2>:
 *   X V1 [128x200x784]          (through dW1 = X^T dH)
 *   G V2^T [128x200x10], A V2 [128x10x200]        (through dW2 = A^T G)
 *   bdA W2 [128x10x200], bdA^T G [200x10x128]     (through dA = G W2^T)
 *   A^T bZ [200x10x128], bZ W2^T [128x200x10]     (through Z = A W2)
 *   X^T bH [784x200x128]        (through H = X W1)
 * 13 GEMMs, four of them the large 128x200x784 kind. */
static inline void mlp_floor_hvp(mlp_problem *p) {
  const float *x = mlp_f(p->x), *w2 = mlp_f(p->w[1]);
  const float *v1 = mlp_f(p->v[0]), *v2 = mlp_f(p->v[1]);
  mlp_floor_grad(p);
  ad_gemm_f32(0, 0, MLP_B, MLP_H, MLP_IN, 1, x, MLP_IN, v1, MLP_H, 0, p->xv1, MLP_H);
  ad_gemm_f32(0, 1, MLP_B, MLP_H, MLP_OUT, 1, p->g, MLP_OUT, v2, MLP_OUT, 0, p->ga, MLP_H);
  ad_gemm_f32(0, 0, MLP_B, MLP_OUT, MLP_H, 1, p->h, MLP_H, v2, MLP_OUT, 0, p->av2, MLP_OUT);
  ad_gemm_f32(0, 0, MLP_B, MLP_OUT, MLP_H, 1, p->bda, MLP_H, w2, MLP_OUT, 0, p->bg, MLP_OUT);
  ad_gemm_f32(1, 0, MLP_H, MLP_OUT, MLP_B, 1, p->bda, MLP_H, p->g, MLP_OUT, 0, p->bw2a, MLP_OUT);
  ad_gemm_f32(1, 0, MLP_H, MLP_OUT, MLP_B, 1, p->h, MLP_H, p->bz, MLP_OUT, 0, p->bw2b, MLP_OUT);
  ad_gemm_f32(0, 1, MLP_B, MLP_H, MLP_OUT, 1, p->bz, MLP_OUT, w2, MLP_OUT, 0, p->bda, MLP_H);
  ad_gemm_f32(1, 0, MLP_IN, MLP_H, MLP_B, 1, x, MLP_IN, p->xv1, MLP_H, 0, p->bdw1, MLP_H);
}

/* 1 if every element of the tensor is finite. */
static inline int mlp_finite(const ad_tensor *t) {
  if (!t) return 0;
  for (int64_t i = 0; i < t->size; i++)
    if (!isfinite(ad_get(t, i))) return 0;
  return 1;
}

/* The whole program of bench_grad_mlp and bench_hvp_mlp: options, the
 * problem (seed 42), one checked step (checked_step runs it on the tape,
 * prints its "#" line and returns 0, or returns nonzero if an op failed or
 * a result is not finite: a failing op must not be timed as a fast one),
 * then ours against floor_fn and the JSON line. Returns the exit code. */
static inline int mlp_bench_main(int argc, char **argv, const char *prog, const char *workload,
                                 bu_fn ours, bu_fn floor_fn,
                                 int (*checked_step)(mlp_problem *p, const char *prog)) {
  bu_opts o;
  int rc = bu_parse(argc, argv, &o);
  if (rc) return rc > 0 ? 0 : 2;
  mlp_problem p;
  if (mlp_init(&p, 42) != 0) {
    fprintf(stderr, "%s: setup failed: %s\n", prog, ad_last_error());
    mlp_free(&p);
    return 1;
  }
  bu_header(workload, &o);

  ad_marker m = ad_mark(p.tape);
  if (checked_step(&p, prog) != 0) {
    fprintf(stderr, "%s: the checked step failed or is not finite\n", prog);
    mlp_free(&p);
    return 1;
  }
  ad_rewind(p.tape, m);

  double ours_ms = 0, floor_ms = 0;
  if (bu_time_pair(ours, floor_fn, &p, &o, &ours_ms, &floor_ms) != 0 ||
      bu_tape_failed(p.tape, prog)) {
    mlp_free(&p);
    return 1;
  }
  bu_report(workload, &o, ours_ms, floor_ms);
  mlp_free(&p);
  return 0;
}

#endif
