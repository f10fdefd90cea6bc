/* bench_train_step_cnn.c — one SGD step of examples/mnist_cnn.c's net at
 * batch 64, f32: forward on the tape, ad_grad for the six parameters,
 * nn_opt_step in place, ad_rewind. Twin: train_step_cnn in
 * bench/torch_twins.py.
 *
 *   x [64, 1, 28, 28]
 *   conv 3x3 16, pad 1 -> relu + max pool 2   [64, 16, 14, 14]
 *   conv 3x3 32, pad 1 -> relu + max pool 2   [64, 32, 7, 7]
 * (conv + relu + max pool: nn_conv2d_relu_max_pool2d, the three fused; the
 * same function as conv, max pool then relu, which is how the twin writes
 * it)
 *   flatten -> linear 1568 -> 10, cross-entropy
 *
 * The floor is the GEMMs this step cannot avoid, as nn_conv2d issues them
 * (im2col + one GEMM per image) and nn_linear does, alone through
 * ad_gemm_f32 (m x n x k):
 *   conv1 forward        per image  16 x 784 x 9      W1 col
 *   conv2 forward        per image  32 x 196 x 144    W2 col
 *   fc forward                      64 x 10 x 1568    A Wf^T
 *   fc dWf                          10 x 1568 x 64    G^T A
 *   fc dA                           64 x 1568 x 10    G Wf
 *   conv2 d input        per image  144 x 196 x 32    W2^T G  (then col2im)
 *   conv2 d weight       per image  32 x 144 x 196    G col^T
 *   conv1 d weight       per image  16 x 9 x 784      G col^T
 * (the input needs no gradient, so conv1 has no d-input GEMM). */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "bench_util.h"
#include "nn/nn.h"

#include <math.h>

enum { B = 64, SIDE = 28, C1 = 16, C2 = 32, OUT = 10, FLAT = C2 * 7 * 7 };

typedef struct {
  ad_tape *tape;
  nn_params *p;
  ad_tensor *x;
  int32_t labels[B];
  nn_opt_cfg cfg;
  float *buf[10]; /* floor scratch: w1 col1 y1 w2 col2 y2 gy2 dcol2 dw2 dw1 */
  float *fw, *fa, *fg, *fdw, *fda;
} cnn_problem;

static float *rnd(size_t n, ad_rng *r) {
  float *p = malloc(n * sizeof *p);
  if (p)
    for (size_t i = 0; i < n; i++) p[i] = (float)(0.1 * ad_rng_normal(r));
  return p;
}

static void cnn_free(cnn_problem *c) {
  ad_tape_free(c->tape);
  nn_params_free(c->p);
  ad_tensor_free(c->x);
  for (int i = 0; i < 10; i++) free(c->buf[i]);
  free(c->fw), free(c->fa), free(c->fg), free(c->fdw), free(c->fda);
}

static int cnn_init(cnn_problem *c, uint64_t seed) {
  *c = (cnn_problem){0};
  ad_rng r;
  ad_rng_seed(&r, seed);
  const nn_param_spec specs[6] = {{"conv1.w", 4, {C1, 1, 3, 3}},  {"conv1.b", 1, {C1}},
                                  {"conv2.w", 4, {C2, C1, 3, 3}}, {"conv2.b", 1, {C2}},
                                  {"fc.w", 2, {OUT, FLAT}},       {"fc.b", 1, {OUT}}};
  if (ad_tape_new(&c->tape, &(ad_tape_opts){.arena_mb = 64, .arena_max_mb = 256}) != AD_OK ||
      nn_params_new(&c->p, AD_F32, 6, specs) != AD_OK ||
      ad_tensor_new(&c->x, AD_F32, 4, (int64_t[]){B, 1, SIDE, SIDE}) != AD_OK)
    return -1;
  nn_init_kaiming(nn_params_get(c->p, "conv1.w"), &r, NN_INIT_NORMAL, 0);
  nn_init_kaiming(nn_params_get(c->p, "conv2.w"), &r, NN_INIT_NORMAL, 0);
  nn_init_kaiming(nn_params_get(c->p, "fc.w"), &r, NN_INIT_NORMAL, 1.0);
  ad_tensor_fill_uniform(c->x, &r, 0.0, 1.0); /* pixel-like inputs */
  for (int i = 0; i < B; i++) c->labels[i] = (int32_t)ad_rng_below(&r, OUT);
  c->cfg = (nn_opt_cfg){.kind = NN_OPT_SGD, .lr = 0.01};
  const size_t sz[10] = {C1 * 9,   9 * 784,  C1 * 784,     C2 * C1 * 9, C1 * 9 * 196,
                         C2 * 196, C2 * 196, C1 * 9 * 196, C2 * C1 * 9, C1 * 9};
  for (int i = 0; i < 10; i++)
    if (!(c->buf[i] = rnd(sz[i], &r))) return -1;
  c->fw = rnd(OUT * FLAT, &r), c->fa = rnd(B * FLAT, &r), c->fg = rnd(B * OUT, &r);
  c->fdw = rnd(OUT * FLAT, &r), c->fda = rnd(B * FLAT, &r);
  return c->fw && c->fa && c->fg && c->fdw && c->fda ? 0 : -1;
}

static ad_tensor *cnn_loss(cnn_problem *c) {
  ad_tape *t = c->tape;
  const nn_params *p = c->p;
  /* conv, bias, relu and pool as one fused op (relu and max commute: the
   * twin pools first and applies relu to the pooled tensor, the cheap
   * order there) */
  ad_tensor *h = nn_conv2d_relu_max_pool2d(t, c->x, nn_params_get(p, "conv1.w"),
                                           nn_params_get(p, "conv1.b"), 1, 1, 2, 2, 0);
  h = nn_conv2d_relu_max_pool2d(t, h, nn_params_get(p, "conv2.w"), nn_params_get(p, "conv2.b"), 1,
                                1, 2, 2, 0);
  ad_tensor *z = nn_linear(t, nn_flatten(t, h), nn_params_get(p, "fc.w"), nn_params_get(p, "fc.b"));
  return ad_cross_entropy(t, z, c->labels, B);
}

static void step(cnn_problem *c, ad_tensor **g) {
  ad_grad(c->tape, 1, (ad_tensor *[]){cnn_loss(c)}, NULL, 6, nn_params_list(c->p), g, 0);
  nn_opt_step(&c->cfg, NULL, 6, nn_params_list(c->p), g);
}

static void ours(void *ctx) {
  cnn_problem *c = ctx;
  ad_marker m = ad_mark(c->tape);
  ad_tensor *g[6];
  step(c, g);
  ad_rewind(c->tape, m);
}

static void floor_gemms(void *ctx) {
  cnn_problem *c = ctx;
  float *w1 = c->buf[0], *col1 = c->buf[1], *y1 = c->buf[2], *w2 = c->buf[3];
  float *col2 = c->buf[4], *y2 = c->buf[5], *gy2 = c->buf[6], *gy1 = c->buf[2];
  float *dcol2 = c->buf[7], *dw2 = c->buf[8], *dw1 = c->buf[9];
  for (int n = 0; n < B; n++) {
    ad_gemm_f32(0, 0, C1, 784, 9, 1, w1, 9, col1, 784, 0, y1, 784);
    ad_gemm_f32(0, 0, C2, 196, C1 * 9, 1, w2, C1 * 9, col2, 196, 0, y2, 196);
  }
  ad_gemm_f32(0, 1, B, OUT, FLAT, 1, c->fa, FLAT, c->fw, FLAT, 0, c->fg, OUT);
  ad_gemm_f32(1, 0, OUT, FLAT, B, 1, c->fg, OUT, c->fa, FLAT, 0, c->fdw, FLAT);
  ad_gemm_f32(0, 0, B, FLAT, OUT, 1, c->fg, OUT, c->fw, FLAT, 0, c->fda, FLAT);
  for (int n = 0; n < B; n++) {
    ad_gemm_f32(1, 0, C1 * 9, 196, C2, 1, w2, C1 * 9, gy2, 196, 0, dcol2, 196);
    ad_gemm_f32(0, 1, C2, C1 * 9, 196, 1, gy2, 196, col2, 196, n ? 1 : 0, dw2, C1 * 9);
    ad_gemm_f32(0, 1, C1, 9, 784, 1, gy1, 784, col1, 784, n ? 1 : 0, dw1, 9);
  }
}

static int finite(const ad_tensor *t) {
  for (int64_t i = 0; t && i < t->size; i++)
    if (!isfinite(ad_get(t, i))) return 0;
  return t != NULL;
}

int main(int argc, char **argv) {
  bu_opts o;
  int rc = bu_parse(argc, argv, &o);
  if (rc) return rc > 0 ? 0 : 2;
  cnn_problem c;
  if (cnn_init(&c, 42) != 0) {
    fprintf(stderr, "bench_train_step_cnn: setup failed: %s\n", ad_last_error());
    cnn_free(&c);
    return 1;
  }
  bu_header("train_step_cnn", &o);

  /* One checked step first: a failing op must not be timed as a fast one. */
  ad_marker m = ad_mark(c.tape);
  ad_tensor *loss = cnn_loss(&c), *g[6] = {0};
  ad_grad(c.tape, 1, &loss, NULL, 6, nn_params_list(c.p), g, 0);
  int ok = !bu_tape_failed(c.tape, "bench_train_step_cnn") && finite(loss);
  for (int i = 0; ok && i < 6; i++) ok = finite(g[i]);
  if (!ok) {
    fprintf(stderr, "bench_train_step_cnn: the checked step failed or is not finite\n");
    cnn_free(&c);
    return 1;
  }
  fprintf(stderr, "# loss %.6f  |d conv1.w|_1 %.6f\n", ad_item(loss),
          ad_item(ad_sum(c.tape, ad_abs(c.tape, g[0]))));
  ad_rewind(c.tape, m);

  double ours_ms = 0, floor_ms = 0;
  if (bu_time_pair(ours, floor_gemms, &c, &o, &ours_ms, &floor_ms) != 0 ||
      bu_tape_failed(c.tape, "bench_train_step_cnn")) {
    cnn_free(&c);
    return 1;
  }
  bu_report("train_step_cnn", &o, ours_ms, floor_ms);
  cnn_free(&c);
  return 0;
}
