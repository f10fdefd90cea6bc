/* test_bad_input.c — the public ad_, bl_, ds_ and nn_ functions
 * called with each kind of bad input that applies: NULL, wrong shape, wrong dtype, empty, too many
 * dims, negative and overflowing sizes, out-of-range labels and indices, non-finite values. Each
 * call must return the documented status with a message that names the function (and, where the
 * case says, the offending value), must not crash or trip a sanitizer, and must leave the caller's
 * data as it was.
 *
 * Table-driven so other modules can add rows: a case is a function that
 * makes the call on a fresh fixture (bi_env) and returns the status it got;
 * the row says which function it calls, the kind of bad input, where the
 * message is (tape, ad_last_error, ds_errmsg), the status documented for
 * it, and a substring the message must hold besides the function's name.
 * The suite prints one line per case that fails and a summary: cases,
 * outcomes, and counts per kind. */
#define _POSIX_C_SOURCE 200809L   /* mkdtemp */
#include "autodiff/ad_internal.h" /* ad__set_last, to clear the last error between cases */
#include "bilevel/bl_engine.h"
#include "bl_fixtures.h"
#include "datasets/ds.h"
#include "gradcheck.h"
#include "nn/nn.h"

#include <check.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#define S(...) ((const int64_t[]){__VA_ARGS__})

/* ------------------------------------------------------------------ fixture */

/* What every case starts from: a fresh tape and a few well-formed inputs,
 * so each case gets exactly one thing wrong. */
typedef struct {
  ad_tape *t;
  ad_rng r;
  ad_tensor *x24, *w34, *b3, *x24f; /* f64 [2,4], [3,4], [3]; f32 [2,4] */
  ad_tensor *img, *filt;            /* f64 [2,3,5,5], [4,3,3,3] */
  ad_tensor *logits;                /* f64 [4,3] */
  int32_t labels[4];                /* in [0, 3) */
  nn_bn_state bn;                   /* 3 channels, f64 */
  nn_params *p;                     /* "w" [3,4], "b" [3], f64 */
  ad_tensor *hx;                    /* heap f64 [10, 2], for ds_ */
  int32_t hl[10];                   /* heap labels in [0, 2) */
  char dir[64];                     /* a scratch directory */
  int modified;                     /* set by a case that finds its input changed */
  char msg[512];                    /* BI_OWN: the message the case copied */
} bi_env;

static void env_init(bi_env *e) {
  memset(e, 0, sizeof *e);
  ck_assert_int_eq(ad_tape_new(&e->t, &(ad_tape_opts){.arena_mb = 8}), AD_OK);
  ad_rng_seed(&e->r, 42);
  e->x24 = ad_randn(e->t, AD_F64, 2, S(2, 4), &e->r);
  e->w34 = ad_randn(e->t, AD_F64, 2, S(3, 4), &e->r);
  e->b3 = ad_randn(e->t, AD_F64, 1, S(3), &e->r);
  e->x24f = ad_randn(e->t, AD_F32, 2, S(2, 4), &e->r);
  e->img = ad_randn(e->t, AD_F64, 4, S(2, 3, 5, 5), &e->r);
  e->filt = ad_randn(e->t, AD_F64, 4, S(4, 3, 3, 3), &e->r);
  e->logits = ad_randn(e->t, AD_F64, 2, S(4, 3), &e->r);
  ck_assert_int_eq(ad_tape_status(e->t), AD_OK);
  const int32_t l[4] = {0, 2, 1, 2};
  memcpy(e->labels, l, sizeof l);
  ck_assert_int_eq(nn_bn_state_init(&e->bn, AD_F64, 3, 0.1, 1e-5), AD_OK);
  nn_param_spec specs[2] = {{"w", 2, {3, 4}}, {"b", 1, {3}}};
  ck_assert_int_eq(nn_params_new(&e->p, AD_F64, 2, specs), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&e->hx, AD_F64, 2, S(10, 2)), AD_OK);
  for (int i = 0; i < 20; i++) ad_set(e->hx, i, i * 0.5);
  for (int i = 0; i < 10; i++) e->hl[i] = i % 2;
  strcpy(e->dir, "/tmp/ht_bad_XXXXXX");
  ck_assert_ptr_nonnull(mkdtemp(e->dir));
  ad__set_last(AD_OK, "%s", ""); /* a stale message must not satisfy a case */
}

static void env_free(bi_env *e) {
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf %s", e->dir);
  ck_assert_int_eq(system(cmd), 0);
  ad_tensor_free(e->hx);
  nn_params_free(e->p);
  nn_bn_state_free(&e->bn);
  ad_tape_free(e->t);
}

static const char *epath(bi_env *e, const char *name) {
  static char p[128];
  snprintf(p, sizeof p, "%s/%s", e->dir, name);
  return p;
}

static void write_file(const char *path, const void *b, size_t n) {
  FILE *f = fopen(path, "wb");
  ck_assert_ptr_nonnull(f);
  ck_assert_uint_eq(fwrite(b, 1, n, f), n);
  fclose(f);
}

/* A tape op's verdict: NULL with the error on the tape. A non-NULL result
 * with the tape still clean is "accepted" (AD_OK); a non-NULL result with an
 * error recorded is inconsistent and reported as AD_ERR_STATE. */
static ad_status on_tape(bi_env *e, const ad_tensor *y) {
  ad_status s = ad_tape_status(e->t);
  if (y && s != AD_OK) return AD_ERR_STATE;
  return s;
}

/* ------------------------------------------------------------------ cases */

typedef enum { BI_TAPE, BI_LAST, BI_DS, BI_OWN } bi_chan; /* where the message is */

typedef struct {
  const char *fn;   /* the public function called */
  const char *kind; /* kind of bad input */
  bi_chan chan;
  ad_status want;     /* the documented status */
  const char *needle; /* must be in the message besides fn (or NULL) */
  ad_status (*run)(bi_env *e);
} bi_case;

#define T(id, expr)                                                                                \
  static ad_status id(bi_env *e) {                                                                 \
    ad_tape *t = e->t;                                                                             \
    (void)t;                                                                                       \
    return on_tape(e, (expr));                                                                     \
  }
#define ST(id, expr)                                                                               \
  static ad_status id(bi_env *e) {                                                                 \
    (void)e;                                                                                       \
    return (expr);                                                                                 \
  }

/* nn layers (on the tape) */
T(linear_null, nn_linear(t, NULL, e->w34, NULL))
T(linear_shape, nn_linear(t, e->x24, ad_zeros(t, AD_F64, 2, S(3, 5)), NULL))
T(linear_bias, nn_linear(t, e->x24, e->w34, ad_zeros(t, AD_F64, 1, S(4))))
T(linear_dtype, nn_linear(t, e->x24f, e->w34, NULL))
T(linear_1d, nn_linear(t, ad_zeros(t, AD_F64, 1, S(4)), e->w34, NULL))
static ad_status linear_notape(bi_env *e) {
  return nn_linear(NULL, e->x24, e->w34, NULL) ? AD_OK : AD_ERR_NULL; /* no tape: ad_last_error */
}
T(flatten_null, nn_flatten(t, NULL))
T(flatten_scalar, nn_flatten(t, ad_scalar(t, AD_F64, 1.0)))
T(dropout_nan, nn_dropout(t, e->x24, NAN, &e->r, 1))
T(dropout_one, nn_dropout(t, e->x24, 1.0, &e->r, 1))
T(dropout_neg, nn_dropout(t, e->x24, -0.1, &e->r, 1))
T(dropout_norng, nn_dropout(t, e->x24, 0.5, NULL, 1))
T(conv_null, nn_conv2d(t, e->img, NULL, NULL, 1, 0))
T(conv_2d, nn_conv2d(t, e->x24, e->filt, NULL, 1, 0))
T(conv_channels, nn_conv2d(t, e->img, ad_zeros(t, AD_F64, 4, S(4, 2, 3, 3)), NULL, 1, 0))
T(conv_dtype, nn_conv2d(t, e->img, ad_zeros(t, AD_F32, 4, S(4, 3, 3, 3)), NULL, 1, 0))
T(conv_bias, nn_conv2d(t, e->img, e->filt, e->b3, 1, 0))
T(conv_stride0, nn_conv2d(t, e->img, e->filt, NULL, 0, 0))
T(conv_padneg, nn_conv2d(t, e->img, e->filt, NULL, 1, -1))
T(conv_padhuge, nn_conv2d(t, e->img, e->filt, NULL, 1, INT32_MAX))
T(conv_toobig, nn_conv2d(t, e->img, ad_zeros(t, AD_F64, 4, S(4, 3, 7, 7)), NULL, 1, 0))
T(convbi_hneg,
  nn_conv2d_backward_input(t, ad_zeros(t, AD_F64, 4, S(2, 4, 3, 3)), e->filt, -3, 5, 1, 0))
T(convbi_hhuge,
  nn_conv2d_backward_input(t, ad_zeros(t, AD_F64, 4, S(2, 4, 3, 3)), e->filt, INT64_MAX, 5, 1, 1))
T(convbi_gshape,
  nn_conv2d_backward_input(t, ad_zeros(t, AD_F64, 4, S(2, 4, 2, 3)), e->filt, 5, 5, 1, 0))
T(convbi_null, nn_conv2d_backward_input(t, NULL, e->filt, 5, 5, 1, 0))
T(convbw_r0,
  nn_conv2d_backward_weight(t, e->img, ad_zeros(t, AD_F64, 4, S(2, 4, 3, 3)), 0, 3, 1, 0))
T(convbw_rhuge,
  nn_conv2d_backward_weight(t, e->img, ad_zeros(t, AD_F64, 4, S(2, 4, 3, 3)), INT64_MAX, 3, 1, 0))
T(convbw_null, nn_conv2d_backward_weight(t, e->img, NULL, 3, 3, 1, 0))
T(maxpool_null, nn_max_pool2d(t, NULL, 2, 2, 0))
T(maxpool_2d, nn_max_pool2d(t, e->x24, 2, 2, 0))
T(maxpool_k0, nn_max_pool2d(t, e->img, 0, 1, 0))
T(maxpool_strideneg, nn_max_pool2d(t, e->img, 2, -1, 0))
T(maxpool_padbig, nn_max_pool2d(t, e->img, 2, 2, 2))
T(maxpool_padhuge, nn_max_pool2d(t, e->img, 3, 1, INT32_MAX))
T(maxpool_window, nn_max_pool2d(t, e->img, 9, 1, 0))
T(avgpool_null, nn_avg_pool2d(t, NULL, 2, 2, 0))
T(avgpool_k0, nn_avg_pool2d(t, e->img, 0, 1, 0))
T(avgpool_padhuge, nn_avg_pool2d(t, e->img, 3, 1, INT32_MAX))
T(avgpool_window, nn_avg_pool2d(t, e->img, 6, 1, 0))
T(ln_null, nn_layer_norm(t, NULL, NULL, NULL, 1e-5))
T(ln_scalar, nn_layer_norm(t, ad_scalar(t, AD_F64, 1), NULL, NULL, 1e-5))
T(ln_gamma, nn_layer_norm(t, e->x24, e->b3, NULL, 1e-5))
T(ln_gamma_dtype, nn_layer_norm(t, e->x24, ad_ones(t, AD_F32, 1, S(4)), NULL, 1e-5))
T(ln_eps0, nn_layer_norm(t, e->x24, NULL, NULL, 0))
T(ln_epsnan, nn_layer_norm(t, e->x24, NULL, NULL, NAN))
T(ln_epsinf, nn_layer_norm(t, e->x24, NULL, NULL, INFINITY))
T(bn_null, nn_batch_norm(t, NULL, NULL, NULL, &e->bn, NN_BN_EVAL))
T(bn_3d, nn_batch_norm(t, ad_zeros(t, AD_F64, 3, S(4, 3, 2)), NULL, NULL, &e->bn, NN_BN_EVAL))
T(bn_mode, nn_batch_norm(t, e->logits, NULL, NULL, &e->bn, 8u))
T(bn_update_only, nn_batch_norm(t, e->logits, NULL, NULL, &e->bn, NN_BN_UPDATE))
T(bn_eval_nostate, nn_batch_norm(t, e->logits, NULL, NULL, NULL, NN_BN_EVAL))
T(bn_channels, nn_batch_norm(t, e->x24, NULL, NULL, &e->bn, NN_BN_EVAL))
T(bn_state_dtype, nn_batch_norm(t, ad_zeros(t, AD_F32, 2, S(4, 3)), NULL, NULL, &e->bn, NN_BN_EVAL))
T(bn_gamma, nn_batch_norm(t, e->logits, ad_ones(t, AD_F64, 1, S(4)), NULL, &e->bn, NN_BN_EVAL))
T(bn_batch1, nn_batch_norm(t, ad_zeros(t, AD_F64, 2, S(1, 3)), NULL, NULL, NULL, NN_BN_TRAIN))
static ad_status bn_eps_nan(bi_env *e) {
  e->bn.eps = NAN;
  return on_tape(e, nn_batch_norm(e->t, e->logits, NULL, NULL, &e->bn, NN_BN_EVAL));
}
static ad_status bn_momentum_nan(bi_env *e) {
  e->bn.momentum = NAN;
  ad_status s =
      on_tape(e, nn_batch_norm(e->t, e->logits, NULL, NULL, &e->bn, NN_BN_TRAIN | NN_BN_UPDATE));
  for (int c = 0; c < 3; c++)
    if (ad_get(e->bn.mean, c) != 0.0 || ad_get(e->bn.var, c) != 1.0) e->modified = 1;
  return s;
}
T(gelu_null, nn_gelu(t, NULL))
T(gelubw_shape, nn_gelu_backward(t, e->x24, e->w34))
T(gelubw_dtype, nn_gelu_backward(t, e->x24f, e->x24))
T(leaky_null, nn_leaky_relu(t, NULL, 0.1))
T(leaky_nan, nn_leaky_relu(t, e->x24, NAN))
T(leaky_inf, nn_leaky_relu(t, e->x24, INFINITY))
T(leaky_f32_inf, nn_leaky_relu(t, e->x24f, 1e300))
T(leakybw_shape, nn_leaky_relu_backward(t, e->x24, e->w34, 0.1))
T(leakybw_nan, nn_leaky_relu_backward(t, e->x24, e->x24, NAN))

/* nn losses (on the tape) */
T(nll_null_labels, nn_nll_each(t, e->logits, NULL, 4))
T(nll_label_high, nn_nll_each(t, e->logits, ((const int32_t[]){0, 3, 1, 2}), 4))
T(nll_label_neg, nn_nll_each(t, e->logits, ((const int32_t[]){0, -1, 1, 2}), 4))
T(nll_count, nn_nll_each(t, e->logits, e->labels, 3))
T(nll_count_neg, nn_nll_each(t, e->logits, e->labels, -4))
T(nll_1d, nn_nll_each(t, e->b3, e->labels, 3))
T(ce_1d, nn_cross_entropy_each(t, e->b3, e->labels, 3))
T(ce_label, nn_cross_entropy_each(t, e->logits, ((const int32_t[]){0, 1, 7, 2}), 4))
T(ce_null, nn_cross_entropy_each(t, NULL, e->labels, 4))
T(mse_shape, nn_mse_each(t, e->x24, e->w34))
T(mse_null, nn_mse_each(t, e->x24, NULL))
T(mse_dtype, nn_mse_each(t, e->x24, e->x24f))
T(bce_shape, nn_bce_with_logits(t, e->x24, e->w34))
T(bce_each_shape, nn_bce_with_logits_each(t, e->x24, e->b3))
T(bce_null, nn_bce_with_logits(t, NULL, e->x24))
T(pack_n0, nn_pack(t, 0, &e->x24))
T(pack_toomany, nn_pack(t, NN_MAX_PARAMS + 1, &e->x24))
T(pack_null, nn_pack(t, 2, ((ad_tensor *const[]){e->x24, NULL})))
static ad_status unpack_size(bi_env *e) {
  ad_tensor *out[2];
  ad_tensor *like[2] = {e->x24, e->b3};
  return nn_unpack(e->t, ad_zeros(e->t, AD_F64, 1, S(10)), 2, like, out);
}
static ad_status unpack_null(bi_env *e) {
  ad_tensor *out[1];
  return nn_unpack(e->t, NULL, 1, &e->x24, out);
}

/* nn state, parameter sets, init, files (ad_last_error) */
ST(bnst_null, nn_bn_state_init(NULL, AD_F64, 3, 0.1, 1e-5))
static ad_status bnst_run(double momentum, double eps, int64_t c) {
  nn_bn_state s;
  ad_status st = nn_bn_state_init(&s, AD_F64, c, momentum, eps);
  if (st == AD_OK) nn_bn_state_free(&s);
  return st;
}
ST(bnst_channels0, bnst_run(0.1, 1e-5, 0))
ST(bnst_channels_neg, bnst_run(0.1, 1e-5, -2))
ST(bnst_momentum_nan, bnst_run(NAN, 1e-5, 3))
ST(bnst_momentum_big, bnst_run(2.0, 1e-5, 3))
ST(bnst_eps_inf, bnst_run(0.1, INFINITY, 3))
ST(bnst_eps_neg, bnst_run(0.1, -1.0, 3))
ST(bnclone_null, nn_bn_state_clone(&(nn_bn_state){0}, NULL))
static ad_status bncopy_channels(bi_env *e) {
  nn_bn_state s;
  ck_assert_int_eq(nn_bn_state_init(&s, AD_F64, 4, 0, 0), AD_OK);
  ad_set(s.mean, 0, 9.0);
  ad_status st = nn_bn_state_copy(&e->bn, &s);
  if (ad_get(e->bn.mean, 0) != 0.0) e->modified = 1;
  nn_bn_state_free(&s);
  return st;
}
ST(params_out_null, nn_params_new(NULL, AD_F32, 1, ((nn_param_spec[]){{"a", 1, {2}}})))
static ad_status params_run(ad_dtype dt, int n, const nn_param_spec *specs) {
  nn_params *p = (nn_params *)&p;
  ad_status s = nn_params_new(&p, dt, n, specs);
  if (s != AD_OK && p) return AD_ERR_STATE; /* *out must be NULL */
  nn_params_free(p);
  return s;
}
ST(params_specs_null, params_run(AD_F32, 1, NULL))
ST(params_n0, params_run(AD_F32, 0, ((nn_param_spec[]){{"a", 1, {2}}})))
ST(params_n_big, params_run(AD_F32, NN_MAX_PARAMS + 1, ((nn_param_spec[]){{"a", 1, {2}}})))
ST(params_dtype, params_run((ad_dtype)7, 1, ((nn_param_spec[]){{"a", 1, {2}}})))
ST(params_ndim5, params_run(AD_F32, 1, ((nn_param_spec[]){{"a", 5, {2, 2, 2, 2}}})))
ST(params_dim0, params_run(AD_F32, 1, ((nn_param_spec[]){{"a", 2, {2, 0}}})))
ST(params_dimneg, params_run(AD_F32, 1, ((nn_param_spec[]){{"a", 1, {-3}}})))
ST(params_overflow,
   params_run(AD_F32, 1, ((nn_param_spec[]){{"a", 2, {(int64_t)1 << 40, (int64_t)1 << 24}}})))
ST(params_dup, params_run(AD_F32, 2, ((nn_param_spec[]){{"a", 1, {2}}, {"a", 1, {2}}})))
ST(params_noname, params_run(AD_F32, 1, ((nn_param_spec[]){{"", 1, {2}}})))
ST(params_nullname, params_run(AD_F32, 1, ((nn_param_spec[]){{NULL, 1, {2}}})))
static ad_status pcopy_layout(bi_env *e) {
  nn_params *q = NULL;
  ck_assert_int_eq(nn_params_new(&q, AD_F64, 1, ((nn_param_spec[]){{"w", 1, {15}}})), AD_OK);
  ad_set(nn_params_values(q), 0, 5.0);
  ad_status s = nn_params_copy(e->p, q);
  if (ad_get(nn_params_values(e->p), 0) != 0.0) e->modified = 1;
  nn_params_free(q);
  return s;
}
ST(pcopy_null, nn_params_copy(e->p, NULL))
static ad_status pclone_null(bi_env *e) {
  (void)e;
  nn_params *q = (nn_params *)&q;
  ad_status s = nn_params_clone(&q, NULL);
  return s != AD_OK && q ? AD_ERR_STATE : s;
}
static ad_status ptovec_size(bi_env *e) {
  ad_tensor *v = NULL;
  ck_assert_int_eq(ad_tensor_new(&v, AD_F64, 1, S(14)), AD_OK);
  ad_status s = nn_params_to_vector(e->p, v);
  ad_tensor_free(v);
  return s;
}
static ad_status pfromvec_size(bi_env *e) {
  ad_tensor *v = NULL;
  ck_assert_int_eq(ad_tensor_new(&v, AD_F64, 2, S(4, 4)), AD_OK);
  ad_set(v, 0, 3.0);
  ad_status s = nn_params_from_vector(e->p, v);
  if (ad_get(nn_params_values(e->p), 0) != 0.0) e->modified = 1;
  ad_tensor_free(v);
  return s;
}
ST(ptovec_null, nn_params_to_vector(e->p, NULL))
ST(fans_null, nn_init_fans(NULL, NULL, NULL))
ST(fans_1d, nn_init_fans(nn_params_get(e->p, "b"), NULL, NULL))
ST(kaiming_norng, nn_init_kaiming(nn_params_get(e->p, "w"), NULL, NN_INIT_NORMAL, 0))
ST(kaiming_nan, nn_init_kaiming(nn_params_get(e->p, "w"), &e->r, NN_INIT_NORMAL, NAN))
ST(kaiming_dist, nn_init_kaiming(nn_params_get(e->p, "w"), &e->r, (nn_init_dist)5, 0))
ST(xavier_inf, nn_init_xavier(nn_params_get(e->p, "w"), &e->r, NN_INIT_UNIFORM, INFINITY))
ST(xavier_1d, nn_init_xavier(nn_params_get(e->p, "b"), &e->r, NN_INIT_UNIFORM, 1))
ST(constant_null, nn_init_constant(NULL, 1.0))
ST(constant_nan, nn_init_constant(nn_params_get(e->p, "b"), NAN))
ST(save_null, nn_params_save(NULL, epath(e, "p.htp")))
ST(save_nodir, nn_params_save(e->p, epath(e, "no/such/p.htp")))
ST(load_null, nn_params_load(e->p, NULL))
ST(load_missing, nn_params_load(e->p, epath(e, "none.htp")))
static ad_status load_empty(bi_env *e) {
  write_file(epath(e, "empty.htp"), "", 0);
  return nn_params_load(e->p, epath(e, "empty.htp"));
}
static ad_status load_garbage(bi_env *e) {
  static const char g[] = "HTPARAMS\x01\0\0\0\xff\xff\xff\xff garbage"; /* 2^32-1 tensors */
  write_file(epath(e, "g.htp"), g, sizeof g - 1);
  return nn_params_load(e->p, epath(e, "g.htp"));
}
static ad_status loadnew_null(bi_env *e) {
  return nn_params_load_new(NULL, epath(e, "p.htp"));
}
static ad_status loadnew_overflow(bi_env *e) {
  /* one tensor "w" f32 [2^40, 2^24]: the element count wraps */
  unsigned char b[41] = {'H', 'T', 'P', 'A', 'R', 'A', 'M', 'S', 1, 0, 0,
                         0,   1,   0,   0,   0,   1,   0,   'w', 0, 2};
  b[21 + 5] = 1; /* 2^40 little-endian: byte 5 */
  b[29 + 3] = 1; /* 2^24: byte 3 */
  uLong crc = crc32(crc32(0L, Z_NULL, 0), b, 37);
  for (int i = 0; i < 4; i++) b[37 + i] = (unsigned char)(crc >> (8 * i));
  write_file(epath(e, "o.htp"), b, sizeof b);
  nn_params *q = (nn_params *)&q;
  ad_status s = nn_params_load_new(&q, epath(e, "o.htp"));
  return s != AD_OK && q ? AD_ERR_STATE : s;
}

/* datasets (ds_errmsg) */
static ds_dataset *small_set(bi_env *e) {
  ds_dataset *d = NULL;
  ck_assert_int_eq(ds_two_moons(&d, 10, 0.1, AD_F64, &e->r), AD_OK);
  return d;
}
static ad_status slice_run(bi_env *e, int64_t start, int64_t count, int null_out) {
  ds_dataset *d = small_set(e), *out = (ds_dataset *)&out;
  ad_status s = ds_dataset_slice(null_out ? NULL : &out, d, start, count);
  if (s != AD_OK && !null_out && out) s = AD_ERR_STATE;
  if (s == AD_OK) ds_dataset_free(out);
  ds_dataset_free(d);
  return s;
}
ST(slice_null_out, slice_run(e, 0, 1, 1))
ST(slice_null_d, ds_dataset_slice(&(ds_dataset *){NULL}, NULL, 0, 1))
ST(slice_neg, slice_run(e, -1, 2, 0))
ST(slice_empty, slice_run(e, 0, 0, 0))
ST(slice_past, slice_run(e, 5, 6, 0))
ST(slice_overflow, slice_run(e, INT64_MAX, 2, 0))
static ad_status idx_read_run(bi_env *e, const char *path) {
  (void)e;
  ds_idx *a = (ds_idx *)&a;
  ad_status s = ds_idx_read(&a, path);
  if (s != AD_OK && a) return AD_ERR_STATE;
  ds_idx_free(a);
  return s;
}
ST(idxr_null_out, ds_idx_read(NULL, "x"))
ST(idxr_null_path, idx_read_run(e, NULL))
ST(idxr_missing, idx_read_run(e, epath(e, "none.idx")))
static ad_status idxr_empty(bi_env *e) {
  write_file(epath(e, "e.idx"), "", 0);
  return idx_read_run(e, epath(e, "e.idx"));
}
static ad_status idxr_dims_overflow(bi_env *e) {
  const unsigned char h[] = {0, 0, 0x0e, 2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
  write_file(epath(e, "o.idx"), h, sizeof h);
  return idx_read_run(e, epath(e, "o.idx"));
}
static ad_status idxr_ndim9(bi_env *e) {
  const unsigned char h[] = {0, 0, 0x08, 9, 0, 0, 0, 1};
  write_file(epath(e, "n.idx"), h, sizeof h);
  return idx_read_run(e, epath(e, "n.idx"));
}
static const uint8_t BYTES[4] = {1, 2, 3, 4};
ST(idxw_null, ds_idx_write(epath(e, "w.idx"), DS_IDX_U8, 1, S(4), NULL, 0))
ST(idxw_type, ds_idx_write(epath(e, "w.idx"), (ds_idx_type)0x0a, 1, S(4), BYTES, 0))
ST(idxw_ndim0, ds_idx_write(epath(e, "w.idx"), DS_IDX_U8, 0, S(4), BYTES, 0))
ST(idxw_ndim9, ds_idx_write(epath(e, "w.idx"), DS_IDX_U8, 9, S(1, 1, 1, 1), BYTES, 0))
ST(idxw_dim0, ds_idx_write(epath(e, "w.idx"), DS_IDX_U8, 2, S(0, 4), BYTES, 0))
ST(idxw_dimneg, ds_idx_write(epath(e, "w.idx"), DS_IDX_U8, 1, S(-4), BYTES, 0))
ST(idxw_dim2p32, ds_idx_write(epath(e, "w.idx"), DS_IDX_U8, 1, S((int64_t)1 << 32), BYTES, 0))
ST(idxw_overflow,
   ds_idx_write(epath(e, "w.idx"), DS_IDX_U8, 3, S(4000000000, 4000000000, 4000000000), BYTES, 0))
ST(idxw_nodir, ds_idx_write(epath(e, "no/w.idx"), DS_IDX_U8, 1, S(4), BYTES, 1))
static ad_status mnist_run(const char *dir, const char *split, const ds_mnist_opts *o) {
  ds_dataset *d = (ds_dataset *)&d;
  ad_status s = ds_mnist_load(&d, dir, split, o);
  if (s != AD_OK && d) return AD_ERR_STATE;
  ds_dataset_free(d);
  return s;
}
ST(mnist_null_out, ds_mnist_load(NULL, NULL, "train", NULL))
ST(mnist_split, mnist_run(NULL, "validation", NULL))
ST(mnist_split_null, mnist_run(NULL, NULL, NULL))
ST(mnist_dir, mnist_run(epath(e, "nothing"), "train", NULL))
ST(mnist_limit, mnist_run(NULL, "test", &(ds_mnist_opts){.limit = -1}))
ST(mnist_dtype, mnist_run(NULL, "test", &(ds_mnist_opts){.dtype = (ad_dtype)9}))
static ad_status mnist_bad_label(bi_env *e) {
  /* 1 image of 2x2 and a label 10: out of the digit range */
  const unsigned char img[] = {0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3, 4};
  const unsigned char lab[] = {0, 0, 8, 1, 0, 0, 0, 1, 10};
  write_file(epath(e, "train-images-idx3-ubyte"), img, sizeof img);
  write_file(epath(e, "train-labels-idx1-ubyte"), lab, sizeof lab);
  return mnist_run(e->dir, "train", NULL);
}
static ad_status csv_run(const char *text, size_t len, const ds_csv_opts *o) {
  ad_tensor *t = (ad_tensor *)&t;
  ad_status s = ds_csv_parse(&t, text, len, "t.csv", o);
  if (s != AD_OK && t) return AD_ERR_STATE;
  ad_tensor_free(t);
  return s;
}
ST(csvr_null, ds_csv_read(NULL, "x.csv", NULL))
ST(csvr_path_null, ds_csv_read(&(ad_tensor *){NULL}, NULL, NULL))
ST(csvr_missing, ds_csv_read(&(ad_tensor *){NULL}, epath(e, "none.csv"), NULL))
ST(csvp_null_out, ds_csv_parse(NULL, "1\n", 2, "t.csv", NULL))
ST(csvp_null_text, csv_run(NULL, 4, NULL))
ST(csvp_empty, csv_run("", 0, NULL))
ST(csvp_header_only, csv_run("a,b\n", 4, NULL))
ST(csvp_nul, csv_run("1,2\n3,\0"
                     "4\n",
                     8, NULL))
ST(csvp_ragged, csv_run("1,2\n3\n", 6, NULL))
ST(csvp_field, csv_run("1,2\n3,x\n", 8, NULL))
ST(csvp_range, csv_run("1e39\n", 5, NULL))
ST(csvp_delim, csv_run("1\n", 2, &(ds_csv_opts){.delim = '"'}))
ST(csvp_dtype, csv_run("1\n", 2, &(ds_csv_opts){.dtype = (ad_dtype)3}))
ST(csvp_header_mode, csv_run("1\n", 2, &(ds_csv_opts){.header = 5}))
ST(sine_sample_null, ds_sine_task_sample(NULL, &e->r))
ST(sine_sample_norng, ds_sine_task_sample(&(ds_sine_task){0}, NULL))
static ad_status sine_points_run(bi_env *e, ds_sine_task task, int64_t nx, int64_t ny) {
  ad_tensor *x = NULL, *y = NULL;
  ck_assert_int_eq(ad_tensor_new(&x, AD_F64, 1, &nx), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&y, AD_F64, 1, &ny), AD_OK);
  ad_status s = ds_sine_task_points(&task, &e->r, x, y);
  ad_tensor_free(x);
  ad_tensor_free(y);
  return s;
}
ST(sine_points_size, sine_points_run(e, (ds_sine_task){1, 0}, 5, 4))
ST(sine_points_nan, sine_points_run(e, (ds_sine_task){NAN, 0}, 5, 5))
ST(sine_points_null, ds_sine_task_points(NULL, &e->r, e->hx, e->hx))
ST(sine_eval_inf, ds_sine_task_eval(&(ds_sine_task){1, INFINITY}, e->hx, e->hx))
ST(sine_eval_null, ds_sine_task_eval(&(ds_sine_task){1, 0}, NULL, e->hx))
static ad_status linreg_run(bi_env *e, ds_linear_opts o, int logistic) {
  ds_dataset *d = (ds_dataset *)&d;
  ad_status s =
      logistic ? ds_logistic_regression(&d, &o, &e->r) : ds_linear_regression(&d, &o, &e->r);
  if (s != AD_OK && d) return AD_ERR_STATE;
  ds_dataset_free(d);
  return s;
}
ST(linreg_null, ds_linear_regression(&(ds_dataset *){NULL}, NULL, &e->r))
ST(linreg_norng,
   ds_linear_regression(&(ds_dataset *){NULL}, &(ds_linear_opts){.n = 2, .dim = 2}, NULL))
ST(linreg_n0, linreg_run(e, (ds_linear_opts){.n = 0, .dim = 2}, 0))
ST(linreg_dimneg, linreg_run(e, (ds_linear_opts){.n = 4, .dim = -2}, 0))
ST(linreg_noise_nan, linreg_run(e, (ds_linear_opts){.n = 4, .dim = 2, .noise = NAN}, 0))
ST(linreg_noise_inf, linreg_run(e, (ds_linear_opts){.n = 4, .dim = 2, .noise = INFINITY}, 0))
ST(linreg_noise_neg, linreg_run(e, (ds_linear_opts){.n = 4, .dim = 2, .noise = -1}, 0))
ST(linreg_bias_inf, linreg_run(e, (ds_linear_opts){.n = 4, .dim = 2, .bias = -INFINITY}, 0))
ST(linreg_w_nan,
   linreg_run(e, (ds_linear_opts){.n = 4, .dim = 2, .w = (const double[]){1, NAN}}, 0))
ST(linreg_overflow,
   linreg_run(e, (ds_linear_opts){.n = (int64_t)1 << 40, .dim = (int64_t)1 << 40}, 0))
ST(linreg_dtype, linreg_run(e, (ds_linear_opts){.n = 4, .dim = 2, .dtype = (ad_dtype)4}, 0))
ST(logreg_n0, linreg_run(e, (ds_linear_opts){.n = 0, .dim = 2}, 1))
ST(logreg_w_inf,
   linreg_run(e, (ds_linear_opts){.n = 4, .dim = 2, .w = (const double[]){INFINITY, 1}}, 1))
ST(logreg_null_out, ds_logistic_regression(NULL, &(ds_linear_opts){.n = 2, .dim = 2}, &e->r))
static ad_status moons_run(bi_env *e, int64_t n, double noise, ad_dtype dt, ad_rng *r) {
  (void)e;
  ds_dataset *d = (ds_dataset *)&d;
  ad_status s = ds_two_moons(&d, n, noise, dt, r);
  if (s != AD_OK && d) return AD_ERR_STATE;
  ds_dataset_free(d);
  return s;
}
ST(moons_n1, moons_run(e, 1, 0.1, AD_F64, &e->r))
ST(moons_nneg, moons_run(e, -10, 0.1, AD_F64, &e->r))
ST(moons_noise_nan, moons_run(e, 10, NAN, AD_F64, &e->r))
ST(moons_noise_inf, moons_run(e, 10, INFINITY, AD_F64, &e->r))
ST(moons_norng, moons_run(e, 10, 0.1, AD_F64, NULL))
ST(moons_dtype, moons_run(e, 10, 0.1, (ad_dtype)6, &e->r))
ST(moons_null_out, ds_two_moons(NULL, 10, 0.1, AD_F64, &e->r))
static ad_status corrupt_run(bi_env *e, int64_t n, int nc, double frac, int bad_label) {
  int32_t l[10];
  memcpy(l, e->hl, sizeof l);
  if (bad_label) l[7] = 2;
  int32_t before[10];
  memcpy(before, l, sizeof l);
  int64_t nf = -1;
  ad_status s = ds_corrupt_labels(l, n, nc, frac, &e->r, NULL, &nf);
  if (s != AD_OK && (memcmp(before, l, sizeof l) != 0 || nf != 0)) e->modified = 1;
  return s;
}
ST(corrupt_null, ds_corrupt_labels(NULL, 10, 2, 0.5, &e->r, NULL, NULL))
ST(corrupt_frac_nan, corrupt_run(e, 10, 2, NAN, 0))
ST(corrupt_frac_big, corrupt_run(e, 10, 2, 1.5, 0))
ST(corrupt_classes, corrupt_run(e, 10, 1, 0.5, 0))
ST(corrupt_nneg, corrupt_run(e, -1, 2, 0.5, 0))
ST(corrupt_label, corrupt_run(e, 10, 2, 0.5, 1))
static ad_status iter_run(bi_env *e, const ad_tensor *x, const ad_tensor *y, ds_iter_opts o) {
  (void)e;
  ds_iter *it = (ds_iter *)&it;
  ad_status s = ds_iter_new(&it, x, NULL, y, &o);
  if (s != AD_OK && it) return AD_ERR_STATE;
  ds_iter_free(it);
  return s;
}
ST(iter_null_x, iter_run(e, NULL, NULL, (ds_iter_opts){.batch = 2}))
ST(iter_null_opts, ds_iter_new(&(ds_iter *){NULL}, e->hx, NULL, NULL, NULL))
ST(iter_batch0, iter_run(e, e->hx, NULL, (ds_iter_opts){.batch = 0}))
ST(iter_batchneg, iter_run(e, e->hx, NULL, (ds_iter_opts){.batch = -5}))
ST(iter_batch_big, iter_run(e, e->hx, NULL, (ds_iter_opts){.batch = 11}))
ST(iter_y_rows, iter_run(e, e->hx, e->b3, (ds_iter_opts){.batch = 2}))
ST(iter_scalar, iter_run(e, ad_scalar(e->t, AD_F64, 1), NULL, (ds_iter_opts){.batch = 1}))
static ad_status itnext_run(bi_env *e, int64_t rows, int64_t cols, int with_y, int with_labels) {
  ds_iter *it = NULL;
  ck_assert_int_eq(ds_iter_new(&it, e->hx, NULL, NULL, &(ds_iter_opts){.batch = 2}), AD_OK);
  ad_tensor *xb = NULL;
  ck_assert_int_eq(ad_tensor_new(&xb, AD_F64, 2, ((int64_t[]){rows, cols})), AD_OK);
  int32_t lb[8];
  ad_status s = ds_iter_next(it, xb, with_labels ? lb : NULL, with_y ? xb : NULL, NULL);
  ad_tensor_free(xb);
  ds_iter_free(it);
  return s;
}
ST(itnext_null, ds_iter_next(NULL, e->hx, NULL, NULL, NULL))
ST(itnext_rows, itnext_run(e, 3, 2, 0, 0))
ST(itnext_cols, itnext_run(e, 2, 3, 0, 0))
ST(itnext_y, itnext_run(e, 2, 2, 1, 0))
ST(itnext_labels, itnext_run(e, 2, 2, 0, 1))

/* autodiff: constructors and ops (on the tape), heap tensors (ad_last_error) */
static ad_status heap_run(ad_dtype dt, int ndim, const int64_t *shape, int wrap, int from) {
  ad_tensor *x = (ad_tensor *)&x;
  static double buf[4];
  ad_status s = wrap   ? ad_tensor_wrap(&x, dt, ndim, shape, buf)
                : from ? ad_tensor_from(&x, dt, ndim, shape, NULL)
                       : ad_tensor_new(&x, dt, ndim, shape);
  if (s != AD_OK && x) return AD_ERR_STATE; /* *out must be NULL */
  if (s == AD_OK) ad_tensor_free(x);
  return s;
}
ST(tnew_null, ad_tensor_new(NULL, AD_F64, 1, S(2)))
ST(tnew_ndim5, heap_run(AD_F64, 5, S(1, 1, 1, 1, 1), 0, 0))
ST(tnew_ndimneg, heap_run(AD_F64, -1, S(2), 0, 0))
ST(tnew_dimneg, heap_run(AD_F64, 2, S(2, -3), 0, 0))
ST(tnew_overflow, heap_run(AD_F64, 2, S((int64_t)1 << 32, (int64_t)1 << 32), 0, 0))
ST(tnew_dtype, heap_run((ad_dtype)5, 1, S(2), 0, 0))
ST(tnew_shape_null, heap_run(AD_F64, 2, NULL, 0, 0))
ST(tfrom_null, heap_run(AD_F64, 1, S(2), 0, 1))
ST(twrap_ndim5, heap_run(AD_F64, 5, S(1, 1, 1, 1, 1), 1, 0))
ST(twrap_null, ad_tensor_wrap(&(ad_tensor *){NULL}, AD_F64, 1, S(2), NULL))
static ad_status copyv_shape(bi_env *e) {
  ad_tensor *d = NULL;
  ck_assert_int_eq(ad_tensor_new(&d, AD_F64, 1, S(3)), AD_OK);
  ad_set(d, 0, 7.0);
  ad_status s = ad_copy_values(d, e->hx);
  if (ad_get(d, 0) != 7.0) e->modified = 1;
  ad_tensor_free(d);
  return s;
}
ST(copyv_null, ad_copy_values(e->hx, NULL))
ST(tapenew_null, ad_tape_new(NULL, NULL))
static ad_status tapenew_max(bi_env *e) {
  (void)e;
  ad_tape *t = (ad_tape *)&t;
  ad_status s = ad_tape_new(&t, &(ad_tape_opts){.arena_mb = (size_t)1 << 50});
  if (s != AD_OK && t) return AD_ERR_STATE;
  ad_tape_free(s == AD_OK ? t : NULL);
  return s;
}
ST(print_null, ad_tape_print(NULL, stdout))
ST(print_file_null, ad_tape_print(e->t, NULL))
ST(tapedot_null, ad_tape_dot(NULL, stdout))
static ad_status arena_huge(bi_env *e) {
  void *p = ad_arena_alloc(e->t, SIZE_MAX - 8);
  return p ? AD_OK : ad_tape_status(e->t);
}
T(zeros_ndim5, ad_zeros(t, AD_F64, 5, S(1, 1, 1, 1, 1)))
T(zeros_dimneg, ad_zeros(t, AD_F64, 1, S(-1)))
T(zeros_overflow, ad_zeros(t, AD_F64, 2, S((int64_t)1 << 32, (int64_t)1 << 32)))
T(zeros_dtype, ad_zeros(t, (ad_dtype)3, 1, S(2)))
T(zeros_shape_null, ad_zeros(t, AD_F64, 1, NULL))
static ad_status zeros_notape(bi_env *e) {
  (void)e;
  return ad_zeros(NULL, AD_F64, 1, S(2)) ? AD_OK : AD_ERR_NULL;
}
T(full_ndim5, ad_full(t, AD_F64, 7, S(1, 1, 1, 1), 2.0))
T(const_null, ad_const(t, AD_F64, 1, S(2), NULL))
T(zeroslike_null, ad_zeros_like(t, NULL))
T(randn_norng, ad_randn(t, AD_F64, 1, S(3), NULL))
T(randu_nan, ad_rand_uniform(t, AD_F64, 1, S(3), &e->r, NAN, 1))
T(randu_order, ad_rand_uniform(t, AD_F64, 1, S(3), &e->r, 2, 1))
T(detach_null, ad_detach(t, NULL))
T(add_null, ad_add(t, e->x24, NULL))
T(add_shape, ad_add(t, e->x24, e->w34))
T(sub_dtype, ad_sub(t, e->x24, e->x24f))
T(mul_shape, ad_mul(t, e->x24, e->b3))
T(div_null, ad_div(t, NULL, e->x24))
T(neg_null, ad_neg(t, NULL))
T(exp_null, ad_exp(t, NULL))
T(log_null, ad_log(t, NULL))
T(reluback_shape, ad_relu_backward(t, e->x24, e->w34))
T(axpy_shape, ad_axpy(t, e->x24, 2.0, e->w34))
T(scale_nan, ad_scale(t, e->x24, NAN))
T(scale_inf, ad_scale(t, e->x24, -INFINITY))
T(scale_f32_big, ad_scale(t, e->x24f, 1e300)) /* finite in f64, Inf in f32 */
T(addscalar_nan, ad_add_scalar(t, e->x24, NAN))
T(addscalar_inf, ad_add_scalar(t, e->x24, INFINITY))
T(addscalar_f32_big, ad_add_scalar(t, e->x24f, -1e39))
T(pow_nan, ad_pow_scalar(t, e->x24, NAN))
T(pow_inf, ad_pow_scalar(t, e->x24, INFINITY))
T(pow_f32_big, ad_pow_scalar(t, e->x24f, 1e300))
T(axpy_nan, ad_axpy(t, e->x24, NAN, e->x24))
T(axpy_f32_big, ad_axpy(t, e->x24f, 1e300, e->x24f))
T(matmul_inner, ad_matmul(t, e->x24, e->w34, 0, 0))
T(matmul_1d, ad_matmul(t, e->b3, e->w34, 0, 0))
T(matmul_dtype, ad_matmul(t, e->x24f, e->w34, 0, 1))
T(matmul_null, ad_matmul(t, NULL, e->w34, 0, 1))
T(transpose_3d, ad_transpose(t, ad_zeros(t, AD_F64, 3, S(2, 2, 2))))
T(reshape_size, ad_reshape(t, e->x24, 2, S(3, 3)))
T(reshape_ndim5, ad_reshape(t, e->x24, 5, S(2, 4, 1, 1, 1)))
T(reshape_neg, ad_reshape(t, e->x24, 2, S(-2, -4)))
T(rowvec_shape, ad_add_rowvec(t, e->x24, e->b3))
T(sum_null, ad_sum(t, NULL))
T(mean_null, ad_mean(t, NULL))
T(sumaxis_range, ad_sum_axis(t, e->x24, 2, 0))
T(sumaxis_neg, ad_sum_axis(t, e->x24, -3, 0))
T(meanaxis_range, ad_mean_axis(t, e->x24, 5, 1))
T(maxaxis_range, ad_max_axis(t, e->x24, 9, 0))
T(bcast_neg, ad_broadcast_axis(t, ad_sum_axis(t, e->x24, 1, 1), 1, -4, 1))
T(bcast_axis, ad_broadcast_axis(t, e->x24, 7, 4, 1))
T(expand_shape, ad_expand(t, e->x24, e->w34))
T(lse_axis, ad_logsumexp(t, e->x24, 4, 0))
T(softmax_axis, ad_softmax(t, e->x24, 3))
T(logsoftmax_null, ad_log_softmax(t, NULL, 1))
T(nll_label, ad_nll(t, e->logits, ((const int32_t[]){0, 1, 3, 2}), 4))
T(nll_neg_label, ad_nll(t, e->logits, ((const int32_t[]){0, -2, 1, 2}), 4))
T(nll_n, ad_nll(t, e->logits, e->labels, 5))
T(nll_labels_null, ad_nll(t, e->logits, NULL, 4))
T(ce_ad_label, ad_cross_entropy(t, e->logits, ((const int32_t[]){9, 1, 0, 2}), 4))
T(ce_ad_neg, ad_cross_entropy(t, e->logits, e->labels, -1))
T(mse_transposed, ad_mse(t, ad_zeros(t, AD_F64, 2, S(3, 4)), ad_zeros(t, AD_F64, 2, S(4, 3))))
T(dot_transposed, ad_dot(t, ad_zeros(t, AD_F64, 2, S(3, 4)), ad_zeros(t, AD_F64, 2, S(4, 3))))
T(dot_null, ad_dot(t, e->x24, NULL))
T(where_shape, ad_where(t, e->w34, e->x24, e->x24))
T(where_null, ad_where(t, NULL, e->x24, e->x24))
T(concat_n0, ad_concat(t, 0, &e->x24, 0))
T(concat_shape, ad_concat(t, 2, ((ad_tensor *const[]){e->x24, e->w34}), 1))
T(concat_axis, ad_concat(t, 2, ((ad_tensor *const[]){e->x24, e->x24}), 4))
T(concat_null, ad_concat(t, 2, ((ad_tensor *const[]){e->x24, NULL}), 0))
T(concat_dtype, ad_concat(t, 2, ((ad_tensor *const[]){e->x24, e->x24f}), 0))
T(slice_ad_overflow, ad_slice(t, e->x24, 0, INT64_MAX, 1))
T(slice_ad_neg, ad_slice(t, e->x24, 1, -1, 2))
T(slice_ad_past, ad_slice(t, e->x24, 1, 3, 2))
T(slice_ad_len0, ad_slice(t, e->x24, 1, 0, -1))
T(slice_ad_axis, ad_slice(t, e->x24, 2, 0, 1))
T(pad_overflow, ad_pad_axis(t, e->x24, 0, INT64_MAX, 5))
T(pad_short, ad_pad_axis(t, e->x24, 1, 1, 4))
T(pad_neg, ad_pad_axis(t, e->x24, 1, -1, 6))
/* transforms: a recorded scalar f = sum(w*w) of a heap leaf w */
static ad_tensor *leaf_w(void) {
  ad_tensor *w = NULL;
  ck_assert_int_eq(ad_tensor_new(&w, AD_F64, 1, S(3)), AD_OK);
  ad_set(w, 0, 1.0);
  ad_requires_grad(w, 1);
  return w;
}
typedef enum {
  G_NULL_OUT,
  G_N0,
  G_SEED_SHAPE,
  G_CONST_IN,
  G_UNRECORDED,
  G_FOREIGN,
  G_REWOUND,
  G_NIN_NEG
} g_bad;
static ad_status grad_run(bi_env *e, g_bad how) {
  ad_tensor *w = leaf_w();
  ad_marker m = ad_mark(e->t);
  ad_tensor *f = ad_sum(e->t, ad_mul(e->t, w, w));
  ad_tensor *g[1] = {NULL}, *seed = NULL, *in = w;
  int n_out = 1, n_in = 1;
  ad_tensor *out = f;
  ad_tape *other = NULL;
  switch (how) {
  case G_NULL_OUT:
    out = NULL;
    break;
  case G_N0:
    n_out = 0;
    break;
  case G_NIN_NEG:
    n_in = -1;
    break;
  case G_SEED_SHAPE:
    seed = ad_zeros(e->t, AD_F64, 1, S(2));
    break;
  case G_CONST_IN:
    in = ad_zeros(e->t, AD_F64, 1, S(3));
    break;
  case G_UNRECORDED: {
    int was = ad_set_recording(e->t, 0);
    out = ad_sum(e->t, ad_mul(e->t, w, w));
    ad_set_recording(e->t, was);
  } break;
  case G_FOREIGN: /* f recorded on e->t, differentiated on another tape */
    ck_assert_int_eq(ad_tape_new(&other, &(ad_tape_opts){.arena_mb = 1}), AD_OK);
    break;
  case G_REWOUND: /* f freed by a rewind, then used */
    ad_rewind(e->t, m);
    break;
  }
  ad_tensor *seeds[1] = {seed};
  ad_status s = ad_grad(other ? other : e->t, n_out, &out, seed ? seeds : NULL, n_in, &in, g, 0);
  if (other) {
    /* the message is on the tape that was called: read it from there */
    ad_tape_free(e->t);
    e->t = other;
  }
  if (ad_get(w, 0) != 1.0) e->modified = 1;
  ad_tensor_free(w);
  return s;
}
ST(grad_null_out, grad_run(e, G_NULL_OUT))
ST(grad_n0, grad_run(e, G_N0))
ST(grad_nin_neg, grad_run(e, G_NIN_NEG))
ST(grad_seed_shape, grad_run(e, G_SEED_SHAPE))
ST(grad_const_in, grad_run(e, G_CONST_IN))
ST(grad_unrecorded, grad_run(e, G_UNRECORDED))
ST(grad_foreign, grad_run(e, G_FOREIGN))
ST(grad_rewound, grad_run(e, G_REWOUND))
static ad_status grad_notape(bi_env *e) {
  ad_tensor *g[1];
  return ad_grad(NULL, 1, &e->x24, NULL, 1, &e->x24, g, 0);
}
static ad_status backward_nonscalar(bi_env *e) {
  ad_tensor *w = leaf_w();
  ad_status s = ad_backward(e->t, ad_mul(e->t, w, w), NULL);
  if (w->grad) e->modified = 1;
  ad_tensor_free(w);
  return s;
}
ST(backward_null, ad_backward(e->t, NULL, NULL))
static ad_status hvp_run(bi_env *e, int bad_v, int nonscalar) {
  ad_tensor *w = leaf_w();
  ad_tensor *sq = ad_mul(e->t, w, w);
  ad_tensor *f = nonscalar ? sq : ad_sum(e->t, sq);
  ad_tensor *v = bad_v ? ad_ones(e->t, AD_F64, 1, S(4)) : ad_ones(e->t, AD_F64, 1, S(3));
  ad_tensor *hv[1];
  ad_status s = ad_hvp(e->t, f, 1, &w, &v, hv, 0);
  ad_tensor_free(w);
  return s;
}
ST(hvp_vshape, hvp_run(e, 1, 0))
ST(hvp_nonscalar, hvp_run(e, 0, 1))
ST(hvp_null, ad_hvp(e->t, NULL, 1, &e->x24, &e->x24, (ad_tensor *[1]){NULL}, 0))
static ad_status mixed_run(bi_env *e, int nlam) {
  ad_tensor *w = leaf_w();
  ad_tensor *f = ad_sum(e->t, ad_mul(e->t, w, w));
  ad_tensor *v = ad_ones(e->t, AD_F64, 1, S(3));
  ad_tensor *out[1];
  ad_status s = ad_mixed_partial(e->t, f, 1, &w, &v, nlam, &w, out, 0);
  ad_tensor_free(w);
  return s;
}
ST(mixed_nlam_neg, mixed_run(e, -1))
ST(mixed_null,
   ad_mixed_partial(e->t, NULL, 1, &e->x24, &e->x24, 1, &e->x24, (ad_tensor *[1]){NULL}, 0))
static ad_status jvp_run(bi_env *e, int bad_tan) {
  ad_tensor *w = leaf_w();
  ad_tensor *f = ad_sum(e->t, ad_mul(e->t, w, w));
  ad_tensor *tan = ad_ones(e->t, AD_F64, 1, S(bad_tan ? 2 : 3));
  ad_tensor *out[1];
  ad_status s = ad_jvp(e->t, 1, &w, &tan, 1, &f, out, 0);
  ad_tensor_free(w);
  return s;
}
ST(jvp_tshape, jvp_run(e, 1))
ST(jvp_null, ad_jvp(e->t, 1, &e->x24, NULL, 1, &e->x24, (ad_tensor *[1]){NULL}, 0))
/* foreign-tape tensors and use after rewind in ops */
static ad_status op_foreign(bi_env *e) {
  ad_tape *other = NULL;
  ck_assert_int_eq(ad_tape_new(&other, &(ad_tape_opts){.arena_mb = 1}), AD_OK);
  ad_tensor *y = ad_mul(other, e->x24, e->x24); /* x24 lives on e->t */
  ad_status s = y ? AD_OK : ad_tape_status(other);
  ad_tape_free(e->t); /* the message is read from e->t */
  e->t = other;
  return s;
}
static ad_status op_rewound(bi_env *e) {
  ad_marker m = ad_mark(e->t);
  ad_tensor *z = ad_zeros(e->t, AD_F64, 2, S(2, 4));
  ad_rewind(e->t, m);
  return on_tape(e, ad_add(e->t, e->x24, z));
}

/* bilevel: a ridge problem (tests/bl_fixtures.h) with one thing wrong; the
 * message is on the tape, hg must be left as it was */
typedef enum {
  B_NULL_TRAIN,
  B_NULL_VAL,
  B_NW0,
  B_NW_BIG,
  B_HG_SHAPE,
  B_K_NEG,
  B_LR500,
  B_T_NEG
} b_bad;
static ad_status bl_run(bi_env *e, bl_method_fn f, b_bad how) {
  fx_rcase c;
  fx_rcase_setup(&c, 0, 10, 0.1);
  bl_problem p = c.p;
  bl_opts o = {0};
  ad_tensor *hg[1] = {c.hg[0]}, *bad = NULL;
  ad_set(c.hg[0], 0, 42.0);
  switch (how) {
  case B_NULL_TRAIN:
    p.train_loss = NULL;
    break;
  case B_NULL_VAL:
    p.val_loss = NULL;
    break;
  case B_NW0:
    p.n_w = 0;
    break;
  case B_NW_BIG:
    p.n_w = NN_MAX_PARAMS + 1;
    break;
  case B_HG_SHAPE:
    ck_assert_int_eq(ad_tensor_new(&bad, AD_F64, 1, S(2)), AD_OK);
    ad_set(bad, 0, 42.0);
    hg[0] = bad;
    break;
  case B_K_NEG:
    o.K = -3;
    break;
  case B_LR500:
    p.opt.lr = 500;
    p.inner_steps = 200;
    break;
  case B_T_NEG:
    p.inner_steps = -5;
    break;
  }
  bl_stats st;
  ad_status s = f(e->t, &p, &o, hg, &st);
  if (ad_get(hg[0], 0) != 42.0) e->modified = 1;
  if (ad_get(c.lam[0], 0) != 0.3) e->modified = 1;
  ad_tensor_free(bad);
  fx_rcase_free(&c);
  return s;
}
#define BL(id, f, how) ST(id, bl_run(e, f, how))
BL(unroll_null_train, bl_unroll, B_NULL_TRAIN)
BL(unroll_nw0, bl_unroll, B_NW0)
BL(unroll_nw_big, bl_unroll, B_NW_BIG)
BL(unroll_hg_shape, bl_unroll, B_HG_SHAPE)
BL(unroll_k_neg, bl_unroll, B_K_NEG)
BL(unroll_lr500, bl_unroll, B_LR500)
BL(unroll_t_neg, bl_unroll, B_T_NEG)
BL(forward_null_val, bl_forward, B_NULL_VAL)
BL(forward_lr500, bl_forward, B_LR500)
BL(ckpt_hg_shape, bl_checkpointed, B_HG_SHAPE)
BL(ckpt_lr500, bl_checkpointed, B_LR500)
BL(fo_nw_big, bl_fo, B_NW_BIG)
BL(fo_lr500, bl_fo, B_LR500)
BL(onestep_null_train, bl_one_step, B_NULL_TRAIN)
BL(greedy_lr500, bl_greedy, B_LR500)
BL(neumann_hg_shape, bl_neumann, B_HG_SHAPE)
BL(neumann_lr500, bl_neumann, B_LR500)
BL(cg_nw0, bl_cg, B_NW0)
BL(cg_lr500, bl_cg, B_LR500)
BL(fixed_point_lr500, bl_fixed_point, B_LR500)
BL(exact_lr500, bl_exact, B_LR500)
BL(exact_t_neg, bl_exact, B_T_NEG)
BL(sama_lr500, bl_sama, B_LR500)
BL(zero_order_lr500, bl_zero_order, B_LR500)
static ad_status slots_null(bi_env *e) {
  (void)e;
  return bl_step_slots(NULL) == -1 ? AD_ERR_NULL : AD_OK;
}
static ad_status slots_kind(bi_env *e) {
  (void)e;
  bl_problem p = {0};
  p.opt.kind = (nn_opt_kind)17;
  return bl_step_slots(&p) == -1 ? AD_ERR_ARG : AD_OK;
}
/* meta-learning: theta [2], task i's loss sum((theta - i)^2) */
static ad_tensor *meta_loss(ad_tape *t, ad_tensor *const *params, int task, void *ctx) {
  (void)ctx;
  return ad_sum(t, ad_pow_scalar(t, ad_add_scalar(t, params[0], -(double)task), 2.0));
}
typedef enum { M_NULL_SUPPORT, M_TASKS0, M_LR_NAN, M_STEPS0, M_THETA0, M_HG_SHAPE } m_bad;
static ad_status meta_run(bi_env *e, bl_meta_method_fn f, m_bad how) {
  ad_tensor *theta = NULL, *hg = NULL;
  ck_assert_int_eq(ad_tensor_new(&theta, AD_F64, 1, S(2)), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&hg, AD_F64, 1, S(how == M_HG_SHAPE ? 3 : 2)), AD_OK);
  ad_requires_grad(theta, 1);
  ad_set(hg, 0, 42.0);
  bl_meta_problem p = {.n_theta = 1,
                       .theta = &theta,
                       .n_tasks = 3,
                       .support_loss = meta_loss,
                       .query_loss = meta_loss,
                       .inner_lr = 0.1,
                       .inner_steps = 2,
                       .prox = 1.0};
  switch (how) {
  case M_NULL_SUPPORT:
    p.support_loss = NULL;
    break;
  case M_TASKS0:
    p.n_tasks = 0;
    break;
  case M_LR_NAN:
    p.inner_lr = NAN;
    break;
  case M_STEPS0:
    p.inner_steps = 0;
    break;
  case M_THETA0:
    p.n_theta = 0;
    break;
  case M_HG_SHAPE:
    break;
  }
  bl_stats st;
  ad_status s = f(e->t, &p, &(bl_opts){0}, &hg, &st);
  if (ad_get(hg, 0) != 42.0 || ad_get(theta, 0) != 0.0) e->modified = 1;
  ad_tensor_free(hg);
  ad_tensor_free(theta);
  return s;
}
ST(maml_null_support, meta_run(e, bl_maml, M_NULL_SUPPORT))
ST(maml_tasks0, meta_run(e, bl_maml, M_TASKS0))
ST(maml_lr_nan, meta_run(e, bl_maml, M_LR_NAN))
ST(maml_steps0, meta_run(e, bl_maml, M_STEPS0))
ST(maml_theta0, meta_run(e, bl_maml, M_THETA0))
ST(maml_hg_shape, meta_run(e, bl_maml, M_HG_SHAPE))
ST(fomaml_lr_nan, meta_run(e, bl_fomaml, M_LR_NAN))
ST(imaml_null_support, meta_run(e, bl_imaml, M_NULL_SUPPORT))
/* engine: the message is bl_engine_errmsg's, copied to e->msg */
static ad_status eng_run(bi_env *e, int how) {
  bl_engine *g = NULL;
  ck_assert_int_eq(bl_engine_new(&g, NULL), AD_OK);
  ad_tensor *w = e->hx;
  bl_level l = {.name = "inner",
                .n = 1,
                .params = &w,
                .loss = NULL,
                .opt = &(nn_opt_cfg){.kind = NN_OPT_SGD, .lr = 0.1}};
  ad_status s = AD_OK;
  switch (how) {
  case 0:
    s = bl_engine_add(g, NULL, NULL);
    break;
  case 1:
    s = bl_engine_step(g);
    break; /* before build */
  case 2:
    s = bl_engine_hypergrad(g, 5, &w, NULL);
    break;
  case 3:
    l.name = "";
    s = bl_engine_add(g, &l, NULL);
    break;
  case 4:
    s = bl_engine_load(g, epath(e, "none.eng"));
    break;
  case 5:
    s = bl_engine_add(g, &l, NULL);
    if (s == AD_OK) s = bl_engine_build(g);
    break;
  case 6:
    s = bl_engine_run(g, -1, NULL);
    break;
  }
  snprintf(e->msg, sizeof e->msg, "%s", bl_engine_errmsg(g));
  bl_engine_free(g);
  return s;
}
ST(eng_new_null, bl_engine_new(NULL, NULL))
ST(eng_add_null, eng_run(e, 0))
ST(eng_step_unbuilt, eng_run(e, 1))
ST(eng_hg_id, eng_run(e, 2))
ST(eng_add_noname, eng_run(e, 3))
ST(eng_load_missing, eng_run(e, 4))
ST(eng_build_noloss, eng_run(e, 5))
ST(eng_run_neg, eng_run(e, 6))
/* nn optimizers: the in-place step reports in ad_last_error */
static ad_status opt_run(bi_env *e, nn_opt_cfg cfg) {
  ad_tensor *w = e->hx, *g = NULL;
  ck_assert_int_eq(ad_tensor_new(&g, AD_F64, 2, S(10, 2)), AD_OK);
  for (int i = 0; i < 20; i++) ad_set(g, i, 1.0);
  nn_opt_state s;
  ad_status st = nn_opt_state_init(&cfg, &s, 1, &w);
  if (st == AD_OK) {
    st = nn_opt_step(&cfg, &s, 1, &w, &g);
    nn_opt_state_free(&s);
  }
  for (int i = 0; i < 20; i++)
    if (ad_get(e->hx, i) != i * 0.5) e->modified = 1;
  ad_tensor_free(g);
  return st;
}
ST(opt_kind, opt_run(e, (nn_opt_cfg){.kind = (nn_opt_kind)9}))
ST(optinit_null, nn_opt_state_init(NULL, &(nn_opt_state){0}, 1, &e->hx))
ST(optstep_null, nn_opt_step(&(nn_opt_cfg){0}, &(nn_opt_state){0}, 1, &e->hx, NULL))
ST(opt_lr_nan, opt_run(e, (nn_opt_cfg){.kind = NN_OPT_SGD, .lr = NAN}))
ST(opt_lr_inf, opt_run(e, (nn_opt_cfg){.kind = NN_OPT_SGD, .lr = INFINITY}))
ST(opt_lr_neg, opt_run(e, (nn_opt_cfg){.kind = NN_OPT_SGD, .lr = -0.1}))
ST(opt_beta1_one, opt_run(e, (nn_opt_cfg){.kind = NN_OPT_ADAM, .beta1 = 1.0}))
ST(opt_adam_eps_neg, opt_run(e, (nn_opt_cfg){.kind = NN_OPT_ADAM, .eps = -1e-8}))
ST(opt_rms_eps_neg, opt_run(e, (nn_opt_cfg){.kind = NN_OPT_RMSPROP, .eps = -1e-8}))

/* The table. Rows for other modules go at the end in the same form. */
#define A AD_ERR_ARG
#define N AD_ERR_NULL
#define SH AD_ERR_SHAPE
#define DT AD_ERR_DTYPE
#define F AD_ERR_FORMAT
#define IO AD_ERR_IO
#define AR AD_ERR_ARENA
#define GR AD_ERR_GRAD
#define NUM AD_ERR_NUMERIC
#define ST_ AD_ERR_STATE
static const bi_case CASES[] = {
    {"nn_linear", "NULL", BI_TAPE, N, "NULL", linear_null},
    {"nn_linear", "shape", BI_TAPE, SH, "[3, 5]", linear_shape},
    {"nn_linear", "shape", BI_TAPE, SH, "b [4]", linear_bias},
    {"nn_linear", "dtype", BI_TAPE, DT, NULL, linear_dtype},
    {"nn_linear", "shape", BI_TAPE, SH, NULL, linear_1d},
    {"nn_linear", "NULL", BI_LAST, N, "tape", linear_notape},
    {"nn_flatten", "NULL", BI_TAPE, N, NULL, flatten_null},
    {"nn_flatten", "shape", BI_TAPE, SH, NULL, flatten_scalar},
    {"nn_dropout", "non-finite", BI_TAPE, A, "nan", dropout_nan},
    {"nn_dropout", "range", BI_TAPE, A, "p = 1", dropout_one},
    {"nn_dropout", "negative", BI_TAPE, A, "-0.1", dropout_neg},
    {"nn_dropout", "NULL", BI_TAPE, N, "rng", dropout_norng},
    {"nn_conv2d", "NULL", BI_TAPE, N, NULL, conv_null},
    {"nn_conv2d", "shape", BI_TAPE, SH, "4-D", conv_2d},
    {"nn_conv2d", "shape", BI_TAPE, SH, "[4, 2, 3, 3]", conv_channels},
    {"nn_conv2d", "dtype", BI_TAPE, DT, NULL, conv_dtype},
    {"nn_conv2d", "shape", BI_TAPE, SH, "b [3]", conv_bias},
    {"nn_conv2d", "range", BI_TAPE, A, "stride 0", conv_stride0},
    {"nn_conv2d", "negative", BI_TAPE, A, "pad -1", conv_padneg},
    {"nn_conv2d", "overflow", BI_TAPE, SH, "overflow", conv_padhuge},
    {"nn_conv2d", "shape", BI_TAPE, SH, "7x7", conv_toobig},
    {"nn_conv2d_backward_input", "negative", BI_TAPE, SH, "-3", convbi_hneg},
    {"nn_conv2d_backward_input", "overflow", BI_TAPE, SH, "overflow", convbi_hhuge},
    {"nn_conv2d_backward_input", "shape", BI_TAPE, SH, "[2, 4, 2, 3]", convbi_gshape},
    {"nn_conv2d_backward_input", "NULL", BI_TAPE, N, NULL, convbi_null},
    {"nn_conv2d_backward_weight", "range", BI_TAPE, A, "0x3", convbw_r0},
    {"nn_conv2d_backward_weight", "overflow", BI_TAPE, SH, NULL, convbw_rhuge},
    {"nn_conv2d_backward_weight", "NULL", BI_TAPE, N, NULL, convbw_null},
    {"nn_max_pool2d", "NULL", BI_TAPE, N, NULL, maxpool_null},
    {"nn_max_pool2d", "shape", BI_TAPE, SH, "4-D", maxpool_2d},
    {"nn_max_pool2d", "range", BI_TAPE, A, "kernel 0", maxpool_k0},
    {"nn_max_pool2d", "negative", BI_TAPE, A, "stride -1", maxpool_strideneg},
    {"nn_max_pool2d", "range", BI_TAPE, A, "pad 2", maxpool_padbig},
    {"nn_max_pool2d", "overflow", BI_TAPE, A, "pad 2147483647", maxpool_padhuge},
    {"nn_max_pool2d", "shape", BI_TAPE, SH, "9x9", maxpool_window},
    {"nn_avg_pool2d", "NULL", BI_TAPE, N, NULL, avgpool_null},
    {"nn_avg_pool2d", "range", BI_TAPE, A, "kernel 0", avgpool_k0},
    {"nn_avg_pool2d", "overflow", BI_TAPE, A, "pad 2147483647", avgpool_padhuge},
    {"nn_avg_pool2d", "shape", BI_TAPE, SH, "6x6", avgpool_window},
    {"nn_layer_norm", "NULL", BI_TAPE, N, NULL, ln_null},
    {"nn_layer_norm", "shape", BI_TAPE, SH, "scalar", ln_scalar},
    {"nn_layer_norm", "shape", BI_TAPE, SH, "[3]", ln_gamma},
    {"nn_layer_norm", "dtype", BI_TAPE, SH, NULL, ln_gamma_dtype},
    {"nn_layer_norm", "range", BI_TAPE, A, "eps 0", ln_eps0},
    {"nn_layer_norm", "non-finite", BI_TAPE, A, "eps nan", ln_epsnan},
    {"nn_layer_norm", "non-finite", BI_TAPE, A, "eps inf", ln_epsinf},
    {"nn_batch_norm", "NULL", BI_TAPE, N, NULL, bn_null},
    {"nn_batch_norm", "shape", BI_TAPE, SH, "[4, 3, 2]", bn_3d},
    {"nn_batch_norm", "range", BI_TAPE, A, "0x8", bn_mode},
    {"nn_batch_norm", "range", BI_TAPE, A, "NN_BN_TRAIN", bn_update_only},
    {"nn_batch_norm", "NULL", BI_TAPE, N, "state", bn_eval_nostate},
    {"nn_batch_norm", "shape", BI_TAPE, SH, "3 f64 channels, x has 4", bn_channels},
    {"nn_batch_norm", "dtype", BI_TAPE, SH, "f32", bn_state_dtype},
    {"nn_batch_norm", "shape", BI_TAPE, SH, "[3]", bn_gamma},
    {"nn_batch_norm", "empty", BI_TAPE, SH, "more than one value", bn_batch1},
    {"nn_batch_norm", "non-finite", BI_TAPE, A, "eps nan", bn_eps_nan},
    {"nn_batch_norm", "non-finite", BI_TAPE, A, "momentum nan", bn_momentum_nan},
    {"nn_gelu", "NULL", BI_TAPE, N, NULL, gelu_null},
    {"nn_gelu_backward", "shape", BI_TAPE, SH, "[3, 4]", gelubw_shape},
    {"nn_gelu_backward", "dtype", BI_TAPE, DT, NULL, gelubw_dtype},
    {"nn_leaky_relu", "NULL", BI_TAPE, N, NULL, leaky_null},
    {"nn_leaky_relu", "non-finite", BI_TAPE, A, "slope nan", leaky_nan},
    {"nn_leaky_relu", "non-finite", BI_TAPE, A, "slope inf", leaky_inf},
    {"nn_leaky_relu", "non-finite", BI_TAPE, A, "f32", leaky_f32_inf},
    {"nn_leaky_relu_backward", "shape", BI_TAPE, SH, NULL, leakybw_shape},
    {"nn_leaky_relu_backward", "non-finite", BI_TAPE, A, "slope nan", leakybw_nan},
    {"nn_nll_each", "NULL", BI_TAPE, N, NULL, nll_null_labels},
    {"nn_nll_each", "label range", BI_TAPE, A, "3", nll_label_high},
    {"nn_nll_each", "label range", BI_TAPE, A, "-1", nll_label_neg},
    {"nn_nll_each", "shape", BI_TAPE, SH, NULL, nll_count},
    {"nn_nll_each", "negative", BI_TAPE, SH, "-4", nll_count_neg},
    {"nn_nll_each", "shape", BI_TAPE, SH, NULL, nll_1d},
    {"nn_cross_entropy_each", "shape", BI_TAPE, SH, "[N, C]", ce_1d},
    {"nn_cross_entropy_each", "label range", BI_TAPE, A, "7", ce_label},
    {"nn_cross_entropy_each", "NULL", BI_TAPE, N, NULL, ce_null},
    {"nn_mse_each", "shape", BI_TAPE, SH, "[3, 4]", mse_shape},
    {"nn_mse_each", "NULL", BI_TAPE, N, NULL, mse_null},
    {"nn_mse_each", "dtype", BI_TAPE, DT, NULL, mse_dtype},
    {"nn_bce_with_logits", "shape", BI_TAPE, SH, "[3, 4]", bce_shape},
    {"nn_bce_with_logits_each", "shape", BI_TAPE, SH, "[3]", bce_each_shape},
    {"nn_bce_with_logits", "NULL", BI_TAPE, N, NULL, bce_null},
    {"nn_pack", "empty", BI_TAPE, A, "got 0", pack_n0},
    {"nn_pack", "range", BI_TAPE, A, "got 65", pack_toomany},
    {"nn_pack", "NULL", BI_TAPE, N, NULL, pack_null},
    {"nn_unpack", "shape", BI_TAPE, SH, NULL, unpack_size},
    {"nn_unpack", "NULL", BI_TAPE, N, NULL, unpack_null},
    {"nn_bn_state_init", "NULL", BI_LAST, N, NULL, bnst_null},
    {"nn_bn_state_init", "empty", BI_LAST, A, "channels 0", bnst_channels0},
    {"nn_bn_state_init", "negative", BI_LAST, A, "channels -2", bnst_channels_neg},
    {"nn_bn_state_init", "non-finite", BI_LAST, A, "momentum nan", bnst_momentum_nan},
    {"nn_bn_state_init", "range", BI_LAST, A, "momentum 2", bnst_momentum_big},
    {"nn_bn_state_init", "non-finite", BI_LAST, A, "eps inf", bnst_eps_inf},
    {"nn_bn_state_init", "negative", BI_LAST, A, "eps -1", bnst_eps_neg},
    {"nn_bn_state_clone", "NULL", BI_LAST, N, NULL, bnclone_null},
    {"nn_bn_state_copy", "shape", BI_LAST, SH, "4 channels into 3", bncopy_channels},
    {"nn_params_new", "NULL", BI_LAST, N, NULL, params_out_null},
    {"nn_params_new", "NULL", BI_LAST, N, NULL, params_specs_null},
    {"nn_params_new", "empty", BI_LAST, A, "got 0", params_n0},
    {"nn_params_new", "range", BI_LAST, A, "got 65", params_n_big},
    {"nn_params_new", "dtype", BI_LAST, DT, "dtype 7", params_dtype},
    {"nn_params_new", "ndim > 4", BI_LAST, SH, "ndim 5", params_ndim5},
    {"nn_params_new", "empty", BI_LAST, SH, "dimension 1 is 0", params_dim0},
    {"nn_params_new", "negative", BI_LAST, SH, "-3", params_dimneg},
    {"nn_params_new", "overflow", BI_LAST, SH, "2^40", params_overflow},
    {"nn_params_new", "range", BI_LAST, A, "twice", params_dup},
    {"nn_params_new", "empty", BI_LAST, A, "name", params_noname},
    {"nn_params_new", "NULL", BI_LAST, A, "name", params_nullname},
    {"nn_params_copy", "shape", BI_LAST, SH, NULL, pcopy_layout},
    {"nn_params_copy", "NULL", BI_LAST, N, NULL, pcopy_null},
    {"nn_params_clone", "NULL", BI_LAST, N, NULL, pclone_null},
    {"nn_params_to_vector", "shape", BI_LAST, SH, "14", ptovec_size},
    {"nn_params_to_vector", "NULL", BI_LAST, N, NULL, ptovec_null},
    {"nn_params_from_vector", "shape", BI_LAST, SH, "16", pfromvec_size},
    {"nn_init_fans", "NULL", BI_LAST, N, NULL, fans_null},
    {"nn_init_fans", "shape", BI_LAST, SH, "[3]", fans_1d},
    {"nn_init_kaiming", "NULL", BI_LAST, N, "rng", kaiming_norng},
    {"nn_init_kaiming", "non-finite", BI_LAST, A, "nan", kaiming_nan},
    {"nn_init_kaiming", "range", BI_LAST, A, "distribution 5", kaiming_dist},
    {"nn_init_xavier", "non-finite", BI_LAST, A, "inf", xavier_inf},
    {"nn_init_xavier", "shape", BI_LAST, SH, NULL, xavier_1d},
    {"nn_init_constant", "NULL", BI_LAST, N, NULL, constant_null},
    {"nn_init_constant", "non-finite", BI_LAST, A, "nan", constant_nan},
    {"nn_params_save", "NULL", BI_LAST, N, NULL, save_null},
    {"nn_params_save", "file", BI_LAST, IO, "no/such", save_nodir},
    {"nn_params_load", "NULL", BI_LAST, N, NULL, load_null},
    {"nn_params_load", "file", BI_LAST, IO, "none.htp", load_missing},
    {"nn_params_load", "empty", BI_LAST, F, "truncated", load_empty},
    {"nn_params_load", "file", BI_LAST, F, NULL, load_garbage},
    {"nn_params_load_new", "NULL", BI_LAST, N, NULL, loadnew_null},
    {"nn_params_load_new", "overflow", BI_LAST, F, "2^40", loadnew_overflow},
    {"ds_dataset_slice", "NULL", BI_DS, N, NULL, slice_null_out},
    {"ds_dataset_slice", "NULL", BI_DS, N, NULL, slice_null_d},
    {"ds_dataset_slice", "negative", BI_DS, A, "[-1, 1)", slice_neg},
    {"ds_dataset_slice", "empty", BI_DS, A, NULL, slice_empty},
    {"ds_dataset_slice", "index range", BI_DS, A, "[5, 11)", slice_past},
    {"ds_dataset_slice", "overflow", BI_DS, A, NULL, slice_overflow},
    {"ds_idx_read", "NULL", BI_DS, N, NULL, idxr_null_out},
    {"ds_idx_read", "NULL", BI_DS, N, NULL, idxr_null_path},
    {"ds_idx_read", "file", BI_DS, IO, "none.idx", idxr_missing},
    {"ds_idx_read", "empty", BI_DS, F, "0 bytes", idxr_empty},
    {"ds_idx_read", "overflow", BI_DS, F, "overflow", idxr_dims_overflow},
    {"ds_idx_read", "ndim > 4", BI_DS, F, "0x00000809", idxr_ndim9},
    {"ds_idx_write", "NULL", BI_DS, N, NULL, idxw_null},
    {"ds_idx_write", "dtype", BI_DS, A, "0x0a", idxw_type},
    {"ds_idx_write", "empty", BI_DS, A, "0 dims", idxw_ndim0},
    {"ds_idx_write", "ndim > 4", BI_DS, A, "9 dims", idxw_ndim9},
    {"ds_idx_write", "empty", BI_DS, A, "dim 0 is 0", idxw_dim0},
    {"ds_idx_write", "negative", BI_DS, A, "-4", idxw_dimneg},
    {"ds_idx_write", "range", BI_DS, A, "4294967296", idxw_dim2p32},
    {"ds_idx_write", "overflow", BI_DS, A, "overflow", idxw_overflow},
    {"ds_idx_write", "file", BI_DS, IO, "no/w.idx", idxw_nodir},
    {"ds_mnist_load", "NULL", BI_DS, N, NULL, mnist_null_out},
    {"ds_mnist_load", "range", BI_DS, A, "validation", mnist_split},
    {"ds_mnist_load", "NULL", BI_DS, N, "split", mnist_split_null},
    {"ds_mnist_load", "file", BI_DS, IO, "tried", mnist_dir},
    {"ds_mnist_load", "negative", BI_DS, A, "-1", mnist_limit},
    {"ds_mnist_load", "dtype", BI_DS, A, NULL, mnist_dtype},
    {"ds_mnist_load", "label range", BI_DS, F, "label 0 is 10", mnist_bad_label},
    {"ds_csv_read", "NULL", BI_DS, N, NULL, csvr_null},
    {"ds_csv_read", "NULL", BI_DS, N, NULL, csvr_path_null},
    {"ds_csv_read", "file", BI_DS, IO, "none.csv", csvr_missing},
    {"ds_csv_parse", "NULL", BI_DS, N, NULL, csvp_null_out},
    {"ds_csv_parse", "NULL", BI_DS, N, "text", csvp_null_text},
    {"ds_csv_parse", "empty", BI_DS, F, "no data rows", csvp_empty},
    {"ds_csv_parse", "empty", BI_DS, F, "no data rows", csvp_header_only},
    {"ds_csv_parse", "file", BI_DS, F, "NUL byte", csvp_nul},
    {"ds_csv_parse", "shape", BI_DS, F, "1 fields, expected 2", csvp_ragged},
    {"ds_csv_parse", "file", BI_DS, F, "\"x\"", csvp_field},
    {"ds_csv_parse", "non-finite", BI_DS, F, "out of f32 range", csvp_range},
    {"ds_csv_parse", "range", BI_DS, A, NULL, csvp_delim},
    {"ds_csv_parse", "dtype", BI_DS, A, NULL, csvp_dtype},
    {"ds_csv_parse", "range", BI_DS, A, NULL, csvp_header_mode},
    {"ds_sine_task_sample", "NULL", BI_DS, N, NULL, sine_sample_null},
    {"ds_sine_task_sample", "NULL", BI_DS, N, NULL, sine_sample_norng},
    {"ds_sine_task_points", "shape", BI_DS, SH, "[5]", sine_points_size},
    {"ds_sine_task_points", "non-finite", BI_DS, A, "nan", sine_points_nan},
    {"ds_sine_task_points", "NULL", BI_DS, N, NULL, sine_points_null},
    {"ds_sine_task_eval", "non-finite", BI_DS, A, "inf", sine_eval_inf},
    {"ds_sine_task_eval", "NULL", BI_DS, N, NULL, sine_eval_null},
    {"ds_linear_regression", "NULL", BI_DS, N, NULL, linreg_null},
    {"ds_linear_regression", "NULL", BI_DS, N, NULL, linreg_norng},
    {"ds_linear_regression", "empty", BI_DS, A, "n 0", linreg_n0},
    {"ds_linear_regression", "negative", BI_DS, A, "dim -2", linreg_dimneg},
    {"ds_linear_regression", "non-finite", BI_DS, A, "noise nan", linreg_noise_nan},
    {"ds_linear_regression", "non-finite", BI_DS, A, "noise inf", linreg_noise_inf},
    {"ds_linear_regression", "negative", BI_DS, A, "noise -1", linreg_noise_neg},
    {"ds_linear_regression", "non-finite", BI_DS, A, NULL, linreg_bias_inf},
    {"ds_linear_regression", "non-finite", BI_DS, A, "w[1] is nan", linreg_w_nan},
    {"ds_linear_regression", "overflow", BI_DS, A, "overflow", linreg_overflow},
    {"ds_linear_regression", "dtype", BI_DS, A, "dtype 4", linreg_dtype},
    {"ds_logistic_regression", "empty", BI_DS, A, "n 0", logreg_n0},
    {"ds_logistic_regression", "non-finite", BI_DS, A, "w[0] is inf", logreg_w_inf},
    {"ds_logistic_regression", "NULL", BI_DS, N, NULL, logreg_null_out},
    {"ds_two_moons", "empty", BI_DS, A, "n 1", moons_n1},
    {"ds_two_moons", "negative", BI_DS, A, "n -10", moons_nneg},
    {"ds_two_moons", "non-finite", BI_DS, A, "noise nan", moons_noise_nan},
    {"ds_two_moons", "non-finite", BI_DS, A, "noise inf", moons_noise_inf},
    {"ds_two_moons", "NULL", BI_DS, N, "rng", moons_norng},
    {"ds_two_moons", "dtype", BI_DS, A, "dtype 6", moons_dtype},
    {"ds_two_moons", "NULL", BI_DS, N, NULL, moons_null_out},
    {"ds_corrupt_labels", "NULL", BI_DS, N, NULL, corrupt_null},
    {"ds_corrupt_labels", "non-finite", BI_DS, A, "frac nan", corrupt_frac_nan},
    {"ds_corrupt_labels", "range", BI_DS, A, "frac 1.5", corrupt_frac_big},
    {"ds_corrupt_labels", "range", BI_DS, A, "n_classes 1", corrupt_classes},
    {"ds_corrupt_labels", "negative", BI_DS, A, "n -1", corrupt_nneg},
    {"ds_corrupt_labels", "label range", BI_DS, A, "label 7 is 2", corrupt_label},
    {"ds_iter_new", "NULL", BI_DS, N, NULL, iter_null_x},
    {"ds_iter_new", "NULL", BI_DS, N, NULL, iter_null_opts},
    {"ds_iter_new", "empty", BI_DS, A, "batch 0", iter_batch0},
    {"ds_iter_new", "negative", BI_DS, A, "batch -5", iter_batchneg},
    {"ds_iter_new", "range", BI_DS, A, "batch 11", iter_batch_big},
    {"ds_iter_new", "shape", BI_DS, SH, "[3]", iter_y_rows},
    {"ds_iter_new", "shape", BI_DS, A, NULL, iter_scalar},
    {"ds_iter_next", "NULL", BI_DS, N, NULL, itnext_null},
    {"ds_iter_next", "shape", BI_DS, SH, "[3, 2]", itnext_rows},
    {"ds_iter_next", "shape", BI_DS, SH, "[2, 3]", itnext_cols},
    {"ds_iter_next", "NULL", BI_DS, A, "y buffer", itnext_y},
    {"ds_iter_next", "NULL", BI_DS, A, "label buffer", itnext_labels},
    {"ad_tensor_new", "NULL", BI_LAST, N, NULL, tnew_null},
    {"ad_tensor_new", "ndim > 4", BI_LAST, SH, "ndim 5", tnew_ndim5},
    {"ad_tensor_new", "negative", BI_LAST, SH, "ndim -1", tnew_ndimneg},
    {"ad_tensor_new", "negative", BI_LAST, SH, "-3", tnew_dimneg},
    {"ad_tensor_new", "overflow", BI_LAST, SH, "4294967296", tnew_overflow},
    {"ad_tensor_new", "dtype", BI_LAST, DT, "5", tnew_dtype},
    {"ad_tensor_new", "NULL", BI_LAST, N, "shape", tnew_shape_null},
    {"ad_tensor_from", "NULL", BI_LAST, N, "data", tfrom_null},
    {"ad_tensor_wrap", "ndim > 4", BI_LAST, SH, "ndim 5", twrap_ndim5},
    {"ad_tensor_wrap", "NULL", BI_LAST, N, "data", twrap_null},
    {"ad_copy_values", "shape", BI_LAST, SH, "20 elements into 3", copyv_shape},
    {"ad_copy_values", "NULL", BI_LAST, N, NULL, copyv_null},
    {"ad_tape_new", "NULL", BI_LAST, N, NULL, tapenew_null},
    {"ad_tape_new", "overflow", BI_LAST, A, "1125899906842624", tapenew_max},
    {"ad_tape_print", "NULL", BI_LAST, N, NULL, print_null},
    {"ad_tape_print", "NULL", BI_LAST, N, NULL, print_file_null},
    {"ad_tape_dot", "NULL", BI_LAST, N, NULL, tapedot_null},
    {"ad_arena_alloc", "overflow", BI_TAPE, AR, NULL, arena_huge},
    {"ad_zeros", "ndim > 4", BI_TAPE, SH, "ndim 5", zeros_ndim5},
    {"ad_zeros", "negative", BI_TAPE, SH, "-1", zeros_dimneg},
    {"ad_zeros", "overflow", BI_TAPE, SH, "4294967296", zeros_overflow},
    {"ad_zeros", "dtype", BI_TAPE, DT, "3", zeros_dtype},
    {"ad_zeros", "NULL", BI_TAPE, N, "shape", zeros_shape_null},
    {"ad_zeros", "NULL", BI_LAST, N, "tape", zeros_notape},
    {"ad_full", "ndim > 4", BI_TAPE, SH, "ndim 7", full_ndim5},
    {"ad_const", "NULL", BI_TAPE, N, "data", const_null},
    {"ad_zeros_like", "NULL", BI_TAPE, N, NULL, zeroslike_null},
    {"ad_randn", "NULL", BI_TAPE, N, "rng", randn_norng},
    {"ad_rand_uniform", "non-finite", BI_TAPE, A, "[nan, 1)", randu_nan},
    {"ad_rand_uniform", "range", BI_TAPE, A, "[2, 1)", randu_order},
    {"ad_detach", "NULL", BI_TAPE, N, NULL, detach_null},
    {"ad_add", "NULL", BI_TAPE, N, NULL, add_null},
    {"ad_add", "shape", BI_TAPE, SH, "[3, 4]", add_shape},
    {"ad_sub", "dtype", BI_TAPE, DT, "f32", sub_dtype},
    {"ad_mul", "shape", BI_TAPE, SH, "[3]", mul_shape},
    {"ad_div", "NULL", BI_TAPE, N, NULL, div_null},
    {"ad_neg", "NULL", BI_TAPE, N, NULL, neg_null},
    {"ad_exp", "NULL", BI_TAPE, N, NULL, exp_null},
    {"ad_log", "NULL", BI_TAPE, N, NULL, log_null},
    {"ad_relu_backward", "shape", BI_TAPE, SH, "[3, 4]", reluback_shape},
    {"ad_axpy", "shape", BI_TAPE, SH, "[3, 4]", axpy_shape},
    {"ad_scale", "non-finite", BI_TAPE, A, "c = nan", scale_nan},
    {"ad_scale", "non-finite", BI_TAPE, A, "c = -inf", scale_inf},
    {"ad_scale", "non-finite", BI_TAPE, A, "c = 1e+300 must be finite (in f32)", scale_f32_big},
    {"ad_add_scalar", "non-finite", BI_TAPE, A, "c = nan", addscalar_nan},
    {"ad_add_scalar", "non-finite", BI_TAPE, A, "c = inf", addscalar_inf},
    {"ad_add_scalar", "non-finite", BI_TAPE, A, "(in f32)", addscalar_f32_big},
    {"ad_pow_scalar", "non-finite", BI_TAPE, A, "p = nan", pow_nan},
    {"ad_pow_scalar", "non-finite", BI_TAPE, A, "p = inf", pow_inf},
    {"ad_pow_scalar", "non-finite", BI_TAPE, A, "(in f32)", pow_f32_big},
    {"ad_axpy", "non-finite", BI_TAPE, A, "c = nan", axpy_nan},
    {"ad_axpy", "non-finite", BI_TAPE, A, "(in f32)", axpy_f32_big},
    {"ad_matmul", "shape", BI_TAPE, SH, "[3, 4]", matmul_inner},
    {"ad_matmul", "shape", BI_TAPE, SH, "[3]", matmul_1d},
    {"ad_matmul", "dtype", BI_TAPE, DT, "f32", matmul_dtype},
    {"ad_matmul", "NULL", BI_TAPE, N, NULL, matmul_null},
    {"ad_transpose", "shape", BI_TAPE, SH, "[2, 2, 2]", transpose_3d},
    {"ad_reshape", "shape", BI_TAPE, SH, "[3, 3]", reshape_size},
    {"ad_reshape", "ndim > 4", BI_TAPE, A, "ndim 5", reshape_ndim5},
    {"ad_reshape", "negative", BI_TAPE, SH, "-2", reshape_neg},
    {"ad_add_rowvec", "shape", BI_TAPE, SH, "[3]", rowvec_shape},
    {"ad_sum", "NULL", BI_TAPE, N, NULL, sum_null},
    {"ad_mean", "NULL", BI_TAPE, N, NULL, mean_null},
    {"ad_sum_axis", "index range", BI_TAPE, A, "axis 2", sumaxis_range},
    {"ad_sum_axis", "negative", BI_TAPE, A, "axis -3", sumaxis_neg},
    {"ad_mean_axis", "index range", BI_TAPE, A, "axis 5", meanaxis_range},
    {"ad_max_axis", "index range", BI_TAPE, A, "axis 9", maxaxis_range},
    {"ad_broadcast_axis", "negative", BI_TAPE, A, "-4", bcast_neg},
    {"ad_broadcast_axis", "index range", BI_TAPE, A, "axis 7", bcast_axis},
    {"ad_expand", "shape", BI_TAPE, SH, "[2, 4]", expand_shape},
    {"ad_logsumexp", "index range", BI_TAPE, A, "axis 4", lse_axis},
    {"ad_softmax", "index range", BI_TAPE, A, "axis 3", softmax_axis},
    {"ad_log_softmax", "NULL", BI_TAPE, N, NULL, logsoftmax_null},
    {"ad_nll", "label range", BI_TAPE, A, "3", nll_label},
    {"ad_nll", "label range", BI_TAPE, A, "-2", nll_neg_label},
    {"ad_nll", "shape", BI_TAPE, SH, "5", nll_n},
    {"ad_nll", "NULL", BI_TAPE, N, "labels", nll_labels_null},
    {"ad_cross_entropy", "label range", BI_TAPE, A, "9", ce_ad_label},
    {"ad_cross_entropy", "negative", BI_TAPE, SH, "-1", ce_ad_neg},
    {"ad_mse", "shape", BI_TAPE, SH, "[4, 3]", mse_transposed},
    {"ad_dot", "shape", BI_TAPE, SH, "[4, 3]", dot_transposed},
    {"ad_dot", "NULL", BI_TAPE, N, NULL, dot_null},
    {"ad_where", "shape", BI_TAPE, SH, "[3, 4]", where_shape},
    {"ad_where", "NULL", BI_TAPE, N, NULL, where_null},
    {"ad_concat", "empty", BI_TAPE, A, "no inputs", concat_n0},
    {"ad_concat", "shape", BI_TAPE, SH, "[3, 4]", concat_shape},
    {"ad_concat", "index range", BI_TAPE, A, "axis 4", concat_axis},
    {"ad_concat", "NULL", BI_TAPE, N, NULL, concat_null},
    {"ad_concat", "dtype", BI_TAPE, DT, "f32", concat_dtype},
    {"ad_slice", "overflow", BI_TAPE, A, "9223372036854775807", slice_ad_overflow},
    {"ad_slice", "negative", BI_TAPE, A, "-1", slice_ad_neg},
    {"ad_slice", "index range", BI_TAPE, A, "3", slice_ad_past},
    {"ad_slice", "negative", BI_TAPE, A, "-1", slice_ad_len0},
    {"ad_slice", "index range", BI_TAPE, A, "axis 2", slice_ad_axis},
    {"ad_pad_axis", "overflow", BI_TAPE, A, "9223372036854775807", pad_overflow},
    {"ad_pad_axis", "index range", BI_TAPE, A, "4", pad_short},
    {"ad_pad_axis", "negative", BI_TAPE, A, "-1", pad_neg},
    {"ad_grad", "NULL", BI_TAPE, N, NULL, grad_null_out},
    {"ad_grad", "empty", BI_TAPE, A, "0", grad_n0},
    {"ad_grad", "negative", BI_TAPE, A, "-1", grad_nin_neg},
    {"ad_grad", "shape", BI_TAPE, SH, "[2]", grad_seed_shape},
    {"ad_grad", "unrecorded", BI_TAPE, GR, "ad_requires_grad", grad_const_in},
    {"ad_grad", "unrecorded", BI_TAPE, GR, "recording", grad_unrecorded},
    {"ad_grad", "foreign tape", BI_TAPE, A, "tape", grad_foreign},
    {"ad_grad", "after rewind", BI_TAPE, A, "rewind", grad_rewound},
    {"ad_grad", "NULL", BI_LAST, N, "tape", grad_notape},
    {"ad_backward", "shape", BI_TAPE, SH, "seed", backward_nonscalar},
    {"ad_backward", "NULL", BI_TAPE, N, NULL, backward_null},
    {"ad_hvp", "shape", BI_TAPE, SH, "[4]", hvp_vshape},
    {"ad_hvp", "shape", BI_TAPE, SH, "[3]", hvp_nonscalar},
    {"ad_hvp", "NULL", BI_TAPE, N, NULL, hvp_null},
    {"ad_mixed_partial", "negative", BI_TAPE, A, "-1", mixed_nlam_neg},
    {"ad_mixed_partial", "NULL", BI_TAPE, N, NULL, mixed_null},
    {"ad_jvp", "shape", BI_TAPE, SH, "[2]", jvp_tshape},
    {"ad_jvp", "NULL", BI_TAPE, N, NULL, jvp_null},
    {"ad_mul", "foreign tape", BI_TAPE, A, "tape", op_foreign},
    {"ad_add", "after rewind", BI_TAPE, A, "rewind", op_rewound},
    {"bl_unroll", "NULL", BI_TAPE, N, "train_loss", unroll_null_train},
    {"bl_unroll", "empty", BI_TAPE, A, "0 tensors", unroll_nw0},
    {"bl_unroll", "range", BI_TAPE, A, "65", unroll_nw_big},
    {"bl_unroll", "shape", BI_TAPE, SH, "hg[0]", unroll_hg_shape},
    {"bl_unroll", "negative", BI_TAPE, A, "K = -3", unroll_k_neg},
    {"bl_unroll", "diverging", BI_TAPE, NUM, "step", unroll_lr500},
    {"bl_unroll", "negative", BI_TAPE, A, "-5", unroll_t_neg},
    {"bl_forward", "NULL", BI_TAPE, N, "val_loss", forward_null_val},
    {"bl_forward", "diverging", BI_TAPE, NUM, "step", forward_lr500},
    {"bl_checkpointed", "shape", BI_TAPE, SH, "hg[0]", ckpt_hg_shape},
    {"bl_checkpointed", "diverging", BI_TAPE, NUM, "step", ckpt_lr500},
    {"bl_fo", "range", BI_TAPE, A, "65", fo_nw_big},
    {"bl_fo", "diverging", BI_TAPE, NUM, "step", fo_lr500},
    {"bl_one_step", "NULL", BI_TAPE, N, "train_loss", onestep_null_train},
    {"bl_greedy", "diverging", BI_TAPE, NUM, "is inf", greedy_lr500},
    {"bl_neumann", "shape", BI_TAPE, SH, "hg[0]", neumann_hg_shape},
    {"bl_neumann", "diverging", BI_TAPE, NUM, "step", neumann_lr500},
    {"bl_cg", "empty", BI_TAPE, A, "0 tensors", cg_nw0},
    {"bl_cg", "diverging", BI_TAPE, NUM, "step", cg_lr500},
    {"bl_fixed_point", "diverging", BI_TAPE, NUM, "is inf", fixed_point_lr500},
    {"bl_exact", "diverging", BI_TAPE, NUM, "step", exact_lr500},
    {"bl_exact", "negative", BI_TAPE, A, "-5", exact_t_neg},
    {"bl_sama", "diverging", BI_TAPE, NUM, "step", sama_lr500},
    {"bl_zero_order", "diverging", BI_TAPE, NUM, "step", zero_order_lr500},
    {"bl_step_slots", "NULL", BI_LAST, N, NULL, slots_null},
    {"bl_step_slots", "range", BI_LAST, A, "17", slots_kind},
    {"bl_maml", "NULL", BI_TAPE, N, "support_loss", maml_null_support},
    {"bl_maml", "empty", BI_TAPE, A, "n_tasks is 0", maml_tasks0},
    {"bl_maml", "non-finite", BI_TAPE, A, "inner_lr is nan", maml_lr_nan},
    {"bl_maml", "empty", BI_TAPE, A, "inner_steps is 0", maml_steps0},
    {"bl_maml", "empty", BI_TAPE, A, "theta: 0 tensors", maml_theta0},
    {"bl_maml", "shape", BI_TAPE, SH, "[3]", maml_hg_shape},
    {"bl_fomaml", "non-finite", BI_TAPE, A, "nan", fomaml_lr_nan},
    {"bl_imaml", "NULL", BI_TAPE, N, "support_loss", imaml_null_support},
    {"bl_engine_new", "NULL", BI_LAST, N, NULL, eng_new_null},
    {"bl_engine_add", "NULL", BI_OWN, N, NULL, eng_add_null},
    {"bl_engine_step", "state", BI_OWN, ST_, "build", eng_step_unbuilt},
    {"bl_engine_hypergrad", "state", BI_OWN, ST_, "build", eng_hg_id},
    {"bl_engine_add", "empty", BI_OWN, A, "name", eng_add_noname},
    {"bl_engine_load", "state", BI_OWN, ST_, "build", eng_load_missing},
    {"bl_engine_build", "NULL", BI_OWN, N, "inner", eng_build_noloss},
    {"bl_engine_run", "state", BI_OWN, ST_, "build", eng_run_neg},
    {"nn_opt_state_init", "range", BI_LAST, A, "9", opt_kind},
    {"nn_opt_state_init", "NULL", BI_LAST, N, NULL, optinit_null},
    {"nn_opt_step", "NULL", BI_LAST, N, NULL, optstep_null},
    {"nn_opt_state_init", "non-finite", BI_LAST, A, "lr = nan", opt_lr_nan},
    {"nn_opt_state_init", "non-finite", BI_LAST, A, "lr = inf", opt_lr_inf},
    {"nn_opt_state_init", "negative", BI_LAST, A, "lr = -0.1", opt_lr_neg},
    {"nn_opt_state_init", "range", BI_LAST, A, "beta1 = 1", opt_beta1_one},
    {"nn_opt_state_init", "negative", BI_LAST, A, "eps = -1e-08", opt_adam_eps_neg},
    {"nn_opt_state_init", "negative", BI_LAST, A, "eps = -1e-08", opt_rms_eps_neg},
};
#define N_CASES ((int)(sizeof CASES / sizeof CASES[0]))

/* ------------------------------------------------------------------ runner */

typedef enum { OK, WRONG_STATUS, ACCEPTED, UNNAMED, NO_VALUE, MODIFIED, N_OUTCOMES } bi_outcome;
static const char *const OUTCOME[N_OUTCOMES] = {
    "documented status and message", "another status",          "accepted silently (AD_OK)",
    "message lacks the function",    "message lacks the value", "input modified"};

static const char *message(const bi_env *e, bi_chan c) {
  if (c == BI_TAPE) return ad_tape_errmsg(e->t);
  if (c == BI_DS) return ds_errmsg();
  if (c == BI_OWN) return e->msg;
  return ad_last_error();
}

START_TEST(test_bad_input_table) {
  int count[N_OUTCOMES] = {0};
  const char *kinds[32];
  int kind_n[32] = {0}, n_kinds = 0;
  for (int i = 0; i < N_CASES; i++) {
    const bi_case *c = &CASES[i];
    bi_env e;
    env_init(&e);
    ad_status got = c->run(&e);
    const char *msg = message(&e, c->chan);
    bi_outcome o = OK;
    if (got == AD_OK)
      o = ACCEPTED;
    else if (got != c->want)
      o = WRONG_STATUS;
    else if (!strstr(msg, c->fn))
      o = UNNAMED;
    else if (c->needle && !strstr(msg, c->needle))
      o = NO_VALUE;
    else if (e.modified)
      o = MODIFIED;
    count[o]++;
    if (o != OK)
      printf("bad input FAIL %s (%s): %s; want %s, got %s: \"%s\"\n", c->fn, c->kind, OUTCOME[o],
             ad_status_str(c->want), ad_status_str(got), msg);
    int k = 0;
    while (k < n_kinds && strcmp(kinds[k], c->kind)) k++;
    if (k == n_kinds && n_kinds < 32) kinds[n_kinds++] = c->kind;
    if (k < 32) kind_n[k]++;
    env_free(&e);
  }
  int nfn = 0;
  for (int i = 0; i < N_CASES; i++) {
    int seen = 0;
    for (int j = 0; j < i && !seen; j++) seen = strcmp(CASES[i].fn, CASES[j].fn) == 0;
    nfn += !seen;
  }
  /* per module: the prefix before the first '_' (ad, bl, ds, nn) */
  const char *mods[8];
  int mod_n[8] = {0}, mod_fn[8] = {0}, n_mods = 0;
  for (int i = 0; i < N_CASES; i++) {
    size_t len = strcspn(CASES[i].fn, "_");
    int m = 0;
    while (m < n_mods && (strncmp(mods[m], CASES[i].fn, len) || mods[m][len] != '_')) m++;
    if (m == n_mods && n_mods < 8) mods[n_mods++] = CASES[i].fn;
    if (m == 8) continue;
    mod_n[m]++;
    int seen = 0;
    for (int j = 0; j < i && !seen; j++) seen = strcmp(CASES[i].fn, CASES[j].fn) == 0;
    mod_fn[m] += !seen;
  }
  printf("bad input: %d cases over %d public functions:", N_CASES, nfn);
  for (int o = 0; o < N_OUTCOMES; o++)
    printf(" %d %s%s", count[o], OUTCOME[o], o + 1 < N_OUTCOMES ? "," : "\n");
  printf("bad input: by module:");
  for (int m = 0; m < n_mods; m++)
    printf(" %.*s_ %d cases over %d functions%s", (int)strcspn(mods[m], "_"), mods[m], mod_n[m],
           mod_fn[m], m + 1 < n_mods ? "," : "\n");
  printf("bad input: by kind:");
  for (int k = 0; k < n_kinds; k++)
    printf(" %s %d%s", kinds[k], kind_n[k], k + 1 < n_kinds ? "," : "\n");
  fflush(stdout); /* Check's forked child does not flush on exit */
  ck_assert_msg(count[OK] == N_CASES, "%d of %d bad-input cases did not give the documented error",
                N_CASES - count[OK], N_CASES);
}
END_TEST

/* The edges the scalar-constant refusals must not reach: the largest f32
 * and a large f64 constant are accepted and computed exactly. */
START_TEST(test_scalar_constant_edges) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  ad_tensor *xf = ad_full(t, AD_F32, 1, S(3), 0.5), *xd = ad_full(t, AD_F64, 1, S(3), 1e-300);
  ad_tensor *yf = ad_scale(t, xf, FLT_MAX), *yd = ad_scale(t, xd, 1e300);
  ad_tensor *af = ad_axpy(t, xf, -FLT_MAX, xf), *pd = ad_pow_scalar(t, xd, 1e300);
  ck_assert_msg(yf && yd && af && pd, "%s", ad_tape_errmsg(t));
  ck_assert_float_eq(((float *)yf->data)[0], 0.5f * FLT_MAX);
  ck_assert_double_eq_tol(ad_get(yd, 2), 1.0, 1e-15);
  ck_assert_float_eq(((float *)af->data)[1], 0.5f - 0.5f * FLT_MAX);
  ck_assert_double_eq(ad_get(pd, 0), 0.0); /* (1e-300)^1e300 underflows: a value, not NaN */
  ad_tape_free(t);
}
END_TEST

/* The byte buffer behind the parameter and engine state files
 * (autodiff/bytebuf.c): little-endian puts, growth past its first
 * allocation with every byte kept, a whole-file read across several
 * reservations, and a size past SIZE_MAX refused as out of memory (no
 * wrap-around to a small allocation) with later puts ignored. */
START_TEST(test_bytebuf) {
  ad__bytebuf b = {0};
  ad__bytebuf_put_le(&b, 0x0807060504030201u, 8);
  ck_assert_uint_eq(b.n, 8);
  for (int i = 0; i < 8; i++) ck_assert_uint_eq(b.p[i], (unsigned)(i + 1));
  for (int i = 0; i < 20000; i++) ad__bytebuf_put_le(&b, (uint64_t)(i * 7), 1);
  ck_assert_uint_eq(b.n, 20008);
  ck_assert(!b.oom && b.cap >= b.n);
  for (int i = 0; i < 20000; i++) ck_assert_uint_eq(b.p[8 + i], (unsigned char)(i * 7));
  ck_assert_int_eq(ad__bytebuf_reserve(&b, SIZE_MAX), 0);
  ck_assert(b.oom);
  ad__bytebuf_put(&b, "x", 1);
  ck_assert_uint_eq(b.n, 20008);
  ad__bytebuf_free(&b);
  ck_assert(b.p == NULL && b.n == 0 && b.cap == 0 && !b.oom);

  enum { N = 300000 }; /* > 4 reservations of 64 KiB */
  FILE *f = tmpfile();
  ck_assert_ptr_nonnull(f);
  for (int i = 0; i < N; i++) fputc((i * 31 + 7) & 0xff, f);
  rewind(f);
  ad__bytebuf_read(&b, f);
  ck_assert(!ferror(f) && !b.oom);
  fclose(f);
  ck_assert_uint_eq(b.n, N);
  for (int i = 0; i < N; i++) ck_assert_uint_eq(b.p[i], (unsigned)((i * 31 + 7) & 0xff));
  ad__bytebuf_free(&b);
}
END_TEST

static Suite *bad_input_suite(void) {
  Suite *s = suite_create("bad_input");
  TCase *tc = tcase_create("table");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, test_bad_input_table);
  tcase_add_test(tc, test_scalar_constant_edges);
  tcase_add_test(tc, test_bytebuf);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  return gc_run_suite(bad_input_suite());
}
