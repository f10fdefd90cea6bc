/* mlp_hpo.h — the model of hpo_mnist and hpo_mpi: a 784-200-10 MLP with a
 * weight decay for every single weight. Its shapes, forward pass, decay
 * penalty, initial weights and the projection that keeps the decays >= 0,
 * so the serial and the MPI example learn the same thing.
 *
 * Header-only (static inline functions), like example_util.h. */
#ifndef HT_MLP_HPO_H
#define HT_MLP_HPO_H

#include "hypertape.h"

#include <math.h>

enum { IN = 784, HIDDEN = 200, OUT = 10, BATCH = 128 };
enum { CLS = 0, HPO = 1 }; /* level ids, in the order they are added */

/* The MLP's logits: relu(x w0) w1. */
static inline ad_tensor *mlp_logits(ad_tape *t, ad_tensor *x, ad_tensor *const *w) {
  return ad_matmul(t, ad_relu(t, ad_matmul(t, x, w[0], 0, 0)), w[1], 0, 0);
}

/* L + c sum_i <lam_i w_i, w_i>: the decay penalty (c = 1/2 for the plain
 * 1/2 w^T diag(lam) w). */
static inline ad_tensor *mlp_add_decay(ad_tape *t, ad_tensor *L, ad_tensor *const *w,
                                       ad_tensor *const *lam, double c) {
  for (int i = 0; i < 2; i++)
    L = ad_add(t, L, ad_scale(t, ad_dot(t, ad_mul(t, lam[i], w[i]), w[i]), c));
  return L;
}

/* Keeps every decay >= 0 after each Adam step (a bl_level's project). */
static inline void mlp_nonneg(int n, ad_tensor *const *lam, void *ctx) {
  (void)ctx;
  for (int i = 0; i < n; i++) {
    float *p = lam[i]->data;
    for (int64_t j = 0; j < lam[i]->size; j++) p[j] = p[j] < 0 ? 0 : p[j];
  }
}

/* Kaiming-scaled normal weights from the seed (the same seed, the same
 * weights: on every rank too); every decay 1e-4. */
static inline int mlp_make_params(ad_tensor **w, ad_tensor **lam, uint64_t seed) {
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

#endif
