/* fuzz_engine_state.c — the engine's state loader (bl_engine_load_bytes) on
 * arbitrary bytes, against a fixed two-level engine (levels "model" [3] and
 * "decay" [3], Adam on the upper level so the file holds optimizer buffers).
 * The CRC-32 at the end would stop almost every mutation at "checksum
 * mismatch", so when the first byte is odd the target rewrites the last four
 * bytes of the rest with their real CRC: the checks behind the checksum get
 * fuzzed too. A failed load must return AD_ERR_FORMAT with a message and
 * leave the engine as it was; a successful one must leave it runnable.
 * The seed corpus (tests/fuzz/corpus/engine_state) is a 0 byte followed by
 * what bl_engine_save writes for this engine after one step; set
 * HYPERTAPE_FUZZ_SEED=path to have the target write that file again. */
#include "bilevel/bl_engine.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n);

static ad_tensor *w, *lam;
static nn_opt_cfg sgd = {.kind = NN_OPT_SGD, .lr = 0.1}, adam = {.kind = NN_OPT_ADAM, .lr = 0.01};

static ad_tensor *lower(ad_tape *t, const bl_vars *v, void *ctx) {
  (void)ctx;
  ad_tensor *x = v->p[0][0], *d = ad_add_scalar(t, x, -1.0);
  return ad_add(t, ad_dot(t, d, d), ad_dot(t, ad_mul(t, v->p[1][0], x), x));
}
static ad_tensor *upper(ad_tape *t, const bl_vars *v, void *ctx) {
  (void)ctx;
  ad_tensor *d = ad_add_scalar(t, v->p[0][0], -0.5);
  return ad_dot(t, d, d);
}

static bl_engine *make(void) {
  bl_engine *e = NULL;
  if (!w) {
    if (ad_tensor_new(&w, AD_F64, 1, (int64_t[]){3}) ||
        ad_tensor_new(&lam, AD_F64, 1, (int64_t[]){3}))
      abort();
  }
  for (int i = 0; i < 3; i++) ad_set(w, i, 0.1 * i), ad_set(lam, i, 0.2);
  if (bl_engine_new(&e, NULL) ||
      bl_engine_add(
          e,
          &(bl_level){
              .name = "model", .n = 1, .params = &w, .loss = lower, .opt = &sgd, .steps = 2},
          NULL) ||
      bl_engine_add(e,
                    &(bl_level){.name = "decay",
                                .n = 1,
                                .params = &lam,
                                .loss = upper,
                                .opt = &adam,
                                .n_deps = 1,
                                .deps = {{.level = "model"}}},
                    NULL) ||
      bl_engine_build(e) || bl_engine_run(e, 1, NULL))
    abort();
  return e;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  static bl_engine *e;
  if (!e) {
    e = make();
    const char *seed = getenv("HYPERTAPE_FUZZ_SEED");
    if (seed && bl_engine_save(e, seed) != AD_OK) abort();
  }
  if (n < 1) return 0;
  size_t len = n - 1;
  uint8_t *b = malloc(len ? len : 1);
  if (!b) abort();
  memcpy(b, data + 1, len);
  if ((data[0] & 1) && len >= 4) {
    uLong c = crc32(crc32(0L, Z_NULL, 0), b, (uInt)(len - 4));
    for (int i = 0; i < 4; i++) b[len - 4 + i] = (unsigned char)(c >> (8 * i));
  }
  double before[6];
  for (int i = 0; i < 3; i++) before[i] = ad_get(w, i), before[3 + i] = ad_get(lam, i);
  int64_t steps = bl_engine_steps_done(e);
  ad_status s = bl_engine_load_bytes(e, b, len);
  if (s == AD_OK) {
    /* A loaded state runs, or, when its values are finite but extreme
     * (1e300 passes every format check), its step stops with a clear
     * AD_ERR_NUMERIC before the parameters are touched. */
    ad_status st = bl_engine_step(e);
    if (st != AD_OK && (st != AD_ERR_NUMERIC || bl_engine_errmsg(e)[0] == '\0')) {
      fprintf(stderr, "loaded state does not run: %s\n", bl_engine_errmsg(e));
      abort();
    }
  } else {
    if (s != AD_ERR_FORMAT || bl_engine_errmsg(e)[0] == '\0') abort();
    for (int i = 0; i < 3; i++)
      if (memcmp(&before[i], &(double){ad_get(w, i)}, 8) ||
          memcmp(&before[3 + i], &(double){ad_get(lam, i)}, 8))
        abort(); /* a failed load wrote into the engine */
    if (bl_engine_steps_done(e) != steps) abort();
  }
  free(b);
  return 0;
}
