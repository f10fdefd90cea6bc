/* test_nn_params.c — parameter sets (one flat block), initialisers, vector
 * round trips, and the parameter file: round trip, and rejection of a
 * corrupted byte, a truncated file, a version bump, a wrong name / shape /
 * dtype, with the destination left untouched. */
#define _POSIX_C_SOURCE 200809L
#include "gradcheck.h"
#include "nn/nn.h"

#include <check.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#define S(...) ((const int64_t[]){__VA_ARGS__})

static const nn_param_spec SPECS[3] = {
    {"fc1.w", 2, {4, 3}},
    {"fc1.b", 1, {4}},
    {"conv.w", 4, {2, 3, 2, 2}},
};

static nn_params *make_set(ad_dtype dt, uint64_t seed) {
  nn_params *p = NULL;
  ck_assert_int_eq(nn_params_new(&p, dt, 3, SPECS), AD_OK);
  ad_rng r;
  ad_rng_seed(&r, seed);
  ad_tensor_fill_normal(nn_params_values(p), &r, 0.0, 1.0);
  return p;
}

/* Layout: each tensor's data and grad lie in the two blocks at the running
 * offset (exact pointer equality), the flat views cover numel elements,
 * lookups by name work, and ad_backward accumulates into the grad block. */
START_TEST(test_flat_layout) {
  nn_params *p = make_set(AD_F64, 1);
  ck_assert_int_eq(nn_params_count(p), 3);
  ck_assert_int_eq(nn_params_numel(p), 12 + 4 + 24);
  const char *v0 = nn_params_values(p)->data, *g0 = nn_params_grads(p)->data;
  int64_t off = 0;
  for (int i = 0; i < 3; i++) {
    ad_tensor *x = nn_params_at(p, i);
    ck_assert_int_eq(nn_params_offset(p, i), off);
    ck_assert_ptr_eq(x->data, v0 + off * 8);
    ck_assert_ptr_eq(x->grad->data, g0 + off * 8);
    ck_assert_ptr_eq(nn_params_get(p, SPECS[i].name), x);
    ck_assert_int_eq(ad_needs_grad(x), 1);
    off += x->size;
  }
  ck_assert_ptr_null(nn_params_get(p, "nope"));
  ck_assert_int_eq(nn_params_index(p, "fc1.b"), 1);
  /* loss = sum(w^2) + 3 sum(b): grads 2w and 3 land in the block. */
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  ad_tensor *w = nn_params_get(p, "fc1.w"), *b = nn_params_get(p, "fc1.b");
  ad_tensor *loss = ad_add(t, ad_sum(t, ad_mul(t, w, w)), ad_scale(t, ad_sum(t, b), 3.0));
  ck_assert_int_eq(ad_backward(t, loss, NULL), AD_OK);
  const ad_tensor *G = nn_params_grads(p);
  for (int64_t k = 0; k < 12; k++) ck_assert_double_eq(ad_get(G, k), 2 * ad_get(w, k));
  for (int64_t k = 12; k < 16; k++) ck_assert_double_eq(ad_get(G, k), 3.0);
  for (int64_t k = 16; k < 40; k++) ck_assert_double_eq(ad_get(G, k), 0.0);
  nn_params_zero_grad(p);
  for (int64_t k = 0; k < 40; k++) ck_assert_double_eq(ad_get(G, k), 0.0);
  ad_tape_free(t);
  nn_params_free(p);
  nn_params_free(NULL);
}
END_TEST

/* Bad specs are rejected with a status and a message, nothing allocated. */
START_TEST(test_bad_specs) {
  nn_params *p = (nn_params *)1;
  nn_param_spec dup[2] = {{"a", 1, {3}}, {"a", 1, {2}}};
  ck_assert_int_eq(nn_params_new(&p, AD_F32, 2, dup), AD_ERR_ARG);
  ck_assert_ptr_null(p);
  ck_assert_ptr_nonnull(strstr(ad_last_error(), "twice"));
  nn_param_spec zero[1] = {{"z", 2, {3, 0}}};
  ck_assert_int_eq(nn_params_new(&p, AD_F32, 1, zero), AD_ERR_SHAPE);
  nn_param_spec noname[1] = {{"", 1, {3}}};
  ck_assert_int_eq(nn_params_new(&p, AD_F32, 1, noname), AD_ERR_ARG);
  ck_assert_int_eq(nn_params_new(&p, AD_F32, 0, dup), AD_ERR_ARG);
}
END_TEST

/* Vector round trip: to_vector into an f32 vector then from_vector into a
 * zeroed clone gives the values back within f32 rounding (2^-24 relative),
 * and f64 -> f64 exactly; a wrong size is AD_ERR_SHAPE. copy/clone copy
 * exactly. */
START_TEST(test_vector_round_trip) {
  nn_params *p = make_set(AD_F64, 2), *q = NULL;
  ck_assert_int_eq(nn_params_clone(&q, p), AD_OK);
  for (int64_t k = 0; k < 40; k++)
    ck_assert_double_eq(ad_get(nn_params_values(q), k), ad_get(nn_params_values(p), k));
  ad_tensor *v32 = NULL, *v64 = NULL, *bad = NULL;
  ck_assert_int_eq(ad_tensor_new(&v32, AD_F32, 1, S(40)), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&v64, AD_F64, 2, S(8, 5)), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&bad, AD_F64, 1, S(39)), AD_OK);
  ck_assert_int_eq(nn_params_to_vector(p, v32), AD_OK);
  ck_assert_int_eq(nn_params_to_vector(p, v64), AD_OK);
  ck_assert_int_eq(nn_params_to_vector(p, bad), AD_ERR_SHAPE);
  ck_assert_int_eq(nn_params_from_vector(q, bad), AD_ERR_SHAPE);
  ck_assert_int_eq(nn_params_from_vector(q, v32), AD_OK);
  for (int64_t k = 0; k < 40; k++) {
    double a = ad_get(nn_params_values(p), k);
    ck_assert_double_le(fabs(ad_get(nn_params_values(q), k) - a), fabs(a) * 6e-8);
  }
  ck_assert_int_eq(nn_params_from_vector(q, v64), AD_OK);
  for (int64_t k = 0; k < 40; k++)
    ck_assert_double_eq(ad_get(nn_params_values(q), k), ad_get(nn_params_values(p), k));
  nn_params *other = NULL;
  ck_assert_int_eq(nn_params_new(&other, AD_F64, 2, SPECS), AD_OK);
  ck_assert_int_eq(nn_params_copy(other, p), AD_ERR_SHAPE);
  ad_tensor_free(v32);
  ad_tensor_free(v64);
  ad_tensor_free(bad);
  nn_params_free(other);
  nn_params_free(q);
  nn_params_free(p);
}
END_TEST

/* pack/unpack on the tape: values are the blocks' layout, and a function of
 * the unpacked pieces has gradient / HVP / JVP matching finite differences
 * (bound 1e-6 as for every op). */
static ad_tensor *f_pack(ad_tape *t, ad_tensor *const *x, void *ctx) {
  (void)ctx;
  ad_tensor *v = nn_pack(t, 2, x);
  ad_tensor *pieces[2];
  ad_tensor *like[2] = {x[1], x[0]}; /* re-cut in the other order: 6 then 12 */
  if (nn_unpack(t, ad_tanh(t, v), 2, like, pieces) != AD_OK) return NULL;
  return ad_mul(t, pieces[0],
                ad_reshape(t, ad_slice(t, nn_pack(t, 1, &pieces[1]), 0, 0, 6), 2, x[1]->shape));
}
START_TEST(test_pack_unpack) {
  ad_rng r;
  ad_rng_seed(&r, 3);
  ad_tensor *in[2] = {gc_leaf(2, S(3, 4), &r, 0, 0), gc_leaf(2, S(2, 3), &r, 0, 0)};
  char rep[512];
  double worst = gc_check("pack_unpack", f_pack, 2, in, NULL, (gc_opts){0}, rep, sizeof rep);
  fprintf(stderr, "%s\n", rep);
  ck_assert_msg(worst <= 1e-6, "%s", rep);
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  ad_tensor *v = nn_pack(t, 2, in);
  ck_assert_int_eq(v->size, 18);
  for (int64_t k = 0; k < 12; k++) ck_assert_double_eq(ad_get(v, k), ad_get(in[0], k));
  for (int64_t k = 0; k < 6; k++) ck_assert_double_eq(ad_get(v, 12 + k), ad_get(in[1], k));
  ad_tensor *out[2];
  ad_tensor *wrong[1] = {in[0]};
  ck_assert_int_eq(nn_unpack(t, v, 1, wrong, out), AD_ERR_SHAPE);
  ad_tape_free(t);
  ad_tensor_free(in[0]);
  ad_tensor_free(in[1]);
}
END_TEST

/* Initialisers: for a [256, 64, 3, 3] weight (fan_in 576, fan_out 2304,
 * n = 147456) the sample std is within 1% of the target (the standard
 * error of a sample std is std / sqrt(2n) = 0.18%), the mean within 4
 * standard errors of 0, uniform draws stay inside +-sqrt(3) std, and the
 * same seed gives identical values. */
START_TEST(test_init) {
  ad_tensor *w = NULL, *w2 = NULL;
  ck_assert_int_eq(ad_tensor_new(&w, AD_F32, 4, S(256, 64, 3, 3)), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&w2, AD_F32, 4, S(256, 64, 3, 3)), AD_OK);
  int64_t fi, fo;
  ck_assert_int_eq(nn_init_fans(w, &fi, &fo), AD_OK);
  ck_assert_int_eq(fi, 576);
  ck_assert_int_eq(fo, 2304);
  const double targets[4] = {sqrt(2.0 / 576), sqrt(2.0 / 576), sqrt(2.0 / (576 + 2304)),
                             0.5 * sqrt(2.0 / (576 + 2304))};
  for (int c = 0; c < 4; c++) {
    ad_rng r;
    ad_rng_seed(&r, 10 + (uint64_t)c);
    nn_init_dist dist = c % 2 ? NN_INIT_UNIFORM : NN_INIT_NORMAL;
    ad_status s =
        c < 2 ? nn_init_kaiming(w, &r, dist, 0) : nn_init_xavier(w, &r, dist, c == 3 ? 0.5 : 0);
    ck_assert_int_eq(s, AD_OK);
    double m = 0, v = 0, amax = 0;
    for (int64_t i = 0; i < w->size; i++) m += ad_get(w, i);
    m /= (double)w->size;
    for (int64_t i = 0; i < w->size; i++) {
      double d = ad_get(w, i) - m;
      v += d * d;
      amax = fmax(amax, fabs(ad_get(w, i)));
    }
    double sd = sqrt(v / (double)(w->size - 1));
    ck_assert_double_le(fabs(sd / targets[c] - 1), 0.01);
    ck_assert_double_le(fabs(m), 4 * targets[c] / sqrt((double)w->size));
    if (dist == NN_INIT_UNIFORM) ck_assert_double_le(amax, sqrt(3.0) * targets[c] * (1 + 1e-6));
    ad_rng_seed(&r, 10 + (uint64_t)c);
    s = c < 2 ? nn_init_kaiming(w2, &r, dist, 0) : nn_init_xavier(w2, &r, dist, c == 3 ? 0.5 : 0);
    ck_assert_int_eq(memcmp(w->data, w2->data, (size_t)w->size * 4), 0);
  }
  ad_tensor *b = NULL;
  ck_assert_int_eq(ad_tensor_new(&b, AD_F64, 1, S(5)), AD_OK);
  ck_assert_int_eq(nn_init_fans(b, &fi, &fo), AD_ERR_SHAPE);
  ck_assert_int_eq(nn_init_constant(b, 0.25), AD_OK);
  for (int i = 0; i < 5; i++) ck_assert_double_eq(ad_get(b, i), 0.25);
  ad_tensor_free(b);
  ad_tensor_free(w);
  ad_tensor_free(w2);
}
END_TEST

/* ---------------------------------------------------------------- files */

static char dir[256];

static void make_dir(void) {
  const char *base = getenv("TMPDIR");
  snprintf(dir, sizeof dir, "%s/ht_params_XXXXXX", base && base[0] ? base : "/tmp");
  ck_assert_ptr_nonnull(mkdtemp(dir));
}

static void remove_dir(void) {
  DIR *d = opendir(dir);
  if (!d) return;
  struct dirent *e;
  char path[600];
  while ((e = readdir(d)))
    if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
      snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
      unlink(path);
    }
  closedir(d);
  rmdir(dir);
}

static unsigned char *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  ck_assert_ptr_nonnull(f);
  fseek(f, 0, SEEK_END);
  *len = (size_t)ftell(f);
  fseek(f, 0, SEEK_SET);
  unsigned char *b = malloc(*len);
  ck_assert_uint_eq(fread(b, 1, *len, f), *len);
  fclose(f);
  return b;
}

static void spit(const char *path, const unsigned char *b, size_t len) {
  FILE *f = fopen(path, "wb");
  ck_assert_ptr_nonnull(f);
  ck_assert_uint_eq(fwrite(b, 1, len, f), len);
  fclose(f);
}

/* Rewrites the trailing CRC so a deliberate edit is not caught by it. */
static void fix_crc(unsigned char *b, size_t len) {
  uLong c = crc32(crc32(0L, Z_NULL, 0), b, (uInt)(len - 4));
  for (int i = 0; i < 4; i++) b[len - 4 + i] = (unsigned char)(c >> (8 * i));
}

/* Loads path into dst expecting AD_ERR_FORMAT with `needle` in the
 * message, and checks dst's values are bit-identical to before. */
static void expect_rejected(nn_params *dst, const char *path, const char *needle) {
  ad_tensor *v = nn_params_values(dst);
  size_t bytes = (size_t)v->size * ad_dtype_size(v->dtype);
  void *before = malloc(bytes);
  memcpy(before, v->data, bytes);
  ck_assert_int_eq(nn_params_load(dst, path), AD_ERR_FORMAT);
  ck_assert_msg(strstr(ad_last_error(), needle), "message '%s' lacks '%s'", ad_last_error(),
                needle);
  ck_assert_int_eq(memcmp(before, v->data, bytes), 0);
  free(before);
}

/* Save then load (into a set of other values, and into a new set): every
 * value bit-identical, in f32 and f64; the file has the documented size
 * (header + data + CRC); saving over an existing file leaves exactly one
 * entry in the directory (no temporary). */
START_TEST(test_save_load_round_trip) {
  make_dir();
  char path[400];
  snprintf(path, sizeof path, "%s/model.htp", dir);
  for (int k = 0; k < 2; k++) {
    ad_dtype dt = k ? AD_F64 : AD_F32;
    nn_params *p = make_set(dt, 4), *q = make_set(dt, 5), *r = NULL;
    ck_assert_int_eq(nn_params_save(p, path), AD_OK);
    ck_assert_int_eq(nn_params_save(p, path), AD_OK); /* over the old one */
    ck_assert_int_eq(gc_dir_entries(dir), 1);
    size_t len;
    unsigned char *b = slurp(path, &len);
    size_t header = 16 + (2 + 5 + 2 + 16) + (2 + 5 + 2 + 8) + (2 + 6 + 2 + 32);
    ck_assert_uint_eq(len, header + 40 * ad_dtype_size(dt) + 4);
    free(b);
    ck_assert_int_eq(nn_params_load(q, path), AD_OK);
    size_t bytes = 40 * ad_dtype_size(dt);
    ck_assert_int_eq(memcmp(nn_params_values(p)->data, nn_params_values(q)->data, bytes), 0);
    ck_assert_int_eq(nn_params_load_new(&r, path), AD_OK);
    ck_assert_int_eq(nn_params_dtype(r), dt);
    ck_assert_int_eq(nn_params_count(r), 3);
    ck_assert_str_eq(nn_params_name(r, 2), "conv.w");
    ck_assert_int_eq(nn_params_at(r, 2)->ndim, 4);
    ck_assert_int_eq(nn_params_at(r, 2)->shape[3], 2);
    ck_assert_int_eq(memcmp(nn_params_values(p)->data, nn_params_values(r)->data, bytes), 0);
    nn_params_free(p);
    nn_params_free(q);
    nn_params_free(r);
  }
  remove_dir();
}
END_TEST

/* Every kind of bad file is AD_ERR_FORMAT with a message saying what, and
 * the destination keeps its values: one flipped data byte (checksum), a
 * file cut short (truncated), the version bumped to 2 with a valid CRC
 * (version), bad magic, a renamed tensor and a reshaped tensor (both with
 * valid CRCs: caught by the layout check), another dtype; a missing file is
 * AD_ERR_IO. */
START_TEST(test_load_rejects) {
  make_dir();
  char path[400], bad[400];
  snprintf(path, sizeof path, "%s/model.htp", dir);
  snprintf(bad, sizeof bad, "%s/bad.htp", dir);
  nn_params *p = make_set(AD_F32, 6), *dst = make_set(AD_F32, 7);
  ck_assert_int_eq(nn_params_save(p, path), AD_OK);
  size_t len;
  unsigned char *orig = slurp(path, &len), *b = malloc(len);

  memcpy(b, orig, len);
  b[len - 20] ^= 0x10; /* a data byte */
  spit(bad, b, len);
  expect_rejected(dst, bad, "checksum");

  memcpy(b, orig, len);
  b[19] ^= 0x01; /* a header byte, in the first tensor's name */
  spit(bad, b, len);
  expect_rejected(dst, bad, "checksum");

  spit(bad, orig, len - 7);
  expect_rejected(dst, bad, "truncated");
  spit(bad, orig, 30);
  expect_rejected(dst, bad, "truncated");
  spit(bad, orig, 10);
  expect_rejected(dst, bad, "truncated");

  memcpy(b, orig, len);
  b[8] = 2; /* version 1 -> 2 */
  fix_crc(b, len);
  spit(bad, b, len);
  expect_rejected(dst, bad, "version 2");

  memcpy(b, orig, len);
  b[0] = 'X';
  spit(bad, b, len);
  expect_rejected(dst, bad, "magic");

  memcpy(b, orig, len);
  b[16 + 2 + 4] = 'W'; /* "fc1.w" -> "fc1.W" */
  fix_crc(b, len);
  spit(bad, b, len);
  expect_rejected(dst, bad, "fc1.W");

  nn_param_spec other[3] = {SPECS[0], SPECS[1], {"conv.w", 4, {2, 3, 4, 1}}};
  nn_params *o = NULL;
  ck_assert_int_eq(nn_params_new(&o, AD_F32, 3, other), AD_OK);
  expect_rejected(o, path, "conv.w"); /* same count, shape [2,3,4,1] vs [2,3,2,2] */
  nn_params_free(o);
  nn_params *d64 = make_set(AD_F64, 8);
  expect_rejected(d64, path, "f32");
  nn_params_free(d64);

  char missing[400];
  snprintf(missing, sizeof missing, "%s/none.htp", dir);
  ck_assert_int_eq(nn_params_load(dst, missing), AD_ERR_IO);

  /* The original file still loads. */
  ck_assert_int_eq(nn_params_load(dst, path), AD_OK);
  ck_assert_int_eq(memcmp(nn_params_values(p)->data, nn_params_values(dst)->data, 160), 0);
  free(b);
  free(orig);
  nn_params_free(p);
  nn_params_free(dst);
  remove_dir();
}
END_TEST

/* Sizes that overflow (issue 9): a 41-byte file whose one tensor has dims
 * [2^40, 2^24] (each dim within the per-dim bound, the product 2^64 wraps
 * to 0) is a format error naming the size, not "cannot allocate 0
 * elements"; both loaders say so; nn_params_new with the same shape, or
 * with 2^39 + 2^39 + 2^39 elements in all, is AD_ERR_SHAPE. */
START_TEST(test_sizes_overflow) {
  make_dir();
  char path[400];
  snprintf(path, sizeof path, "%s/huge.htp", dir);
  unsigned char b[41] = {'H', 'T', 'P', 'A', 'R', 'A', 'M', 'S', 1,           0, 0,
                         0,   1,   0,   0,   0,   1,   0,   'w', 0 /* f32 */, 2 /* ndim */};
  int64_t dims[2] = {(int64_t)1 << 40, (int64_t)1 << 24};
  for (int d = 0; d < 2; d++)
    for (int i = 0; i < 8; i++) b[21 + 8 * d + i] = (unsigned char)((uint64_t)dims[d] >> (8 * i));
  fix_crc(b, sizeof b);
  spit(path, b, sizeof b);
  nn_params *dst = make_set(AD_F32, 1);
  expect_rejected(dst, path, "more than 2^40 elements");
  nn_params *q = (nn_params *)1;
  ck_assert_int_eq(nn_params_load_new(&q, path), AD_ERR_FORMAT);
  ck_assert_ptr_null(q);
  ck_assert_ptr_nonnull(strstr(ad_last_error(), "more than 2^40 elements"));
  ck_assert_ptr_null(strstr(ad_last_error(), "allocate"));
  nn_params_free(dst);

  nn_param_spec huge[1] = {{"w", 2, {(int64_t)1 << 40, (int64_t)1 << 24}}};
  ck_assert_int_eq(nn_params_new(&q, AD_F32, 1, huge), AD_ERR_SHAPE);
  ck_assert_ptr_null(q);
  ck_assert_ptr_nonnull(strstr(ad_last_error(), "more than 2^40"));
  nn_param_spec three[3] = {
      {"a", 1, {(int64_t)1 << 39}}, {"b", 1, {(int64_t)1 << 39}}, {"c", 1, {(int64_t)1 << 39}}};
  ck_assert_int_eq(nn_params_new(&q, AD_F32, 3, three), AD_ERR_SHAPE);
  ck_assert_ptr_nonnull(strstr(ad_last_error(), "in all"));
  remove_dir();
}
END_TEST

/* A save that cannot complete (the destination is a directory, so the
 * final rename fails) returns AD_ERR_IO, removes its temporary, and leaves
 * the directory as it was. */
START_TEST(test_save_failure_cleans_up) {
  make_dir();
  char sub[400];
  snprintf(sub, sizeof sub, "%s/sub", dir);
  ck_assert_int_eq(mkdir(sub, 0755), 0);
  ck_assert_int_eq(gc_dir_entries(dir), 1);
  nn_params *p = make_set(AD_F32, 9);
  ck_assert_int_eq(nn_params_save(p, sub), AD_ERR_IO);
  ck_assert_int_eq(gc_dir_entries(dir), 1);
  char nodir[400];
  snprintf(nodir, sizeof nodir, "%s/no/such/dir/x.htp", dir);
  ck_assert_int_eq(nn_params_save(p, nodir), AD_ERR_IO);
  rmdir(sub);
  nn_params_free(p);
  remove_dir();
}
END_TEST

Suite *nn_params_suite(void) {
  Suite *s = suite_create("nn_params");
  TCase *tc = tcase_create("params");
  tcase_add_test(tc, test_flat_layout);
  tcase_add_test(tc, test_bad_specs);
  tcase_add_test(tc, test_vector_round_trip);
  tcase_add_test(tc, test_pack_unpack);
  tcase_add_test(tc, test_init);
  tcase_add_test(tc, test_save_load_round_trip);
  tcase_add_test(tc, test_load_rejects);
  tcase_add_test(tc, test_save_failure_cleans_up);
  tcase_add_test(tc, test_sizes_overflow);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  return gc_run_suite(nn_params_suite());
}
