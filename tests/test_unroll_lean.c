/* test_unroll_lean.c — bl_unroll's lean walk back (leaf views of w_start,
 * adjoints moved down over each freed chunk, no buffers made up front,
 * L_val's and w_T's memory freed before the walk back) gives the same bits
 * as its old walk back (bl__unroll_set_legacy(1): copies and double-buffered
 * adjoints), with a peak no higher: for SGD with per-parameter decay (the
 * fused sgd_step), momentum, Adam, a learned learning rate in the training
 * loss, a user bl_step, a validation loss that reads lam (the direct term
 * reached), full and truncated unrolls. Every hypergradient is compared
 * with memcmp, not a tolerance: the change only moves memory. */
#include "bilevel/bl_internal.h"
#include "bl_fixtures.h"
#include "gradcheck.h"

#include <check.h>
#include <math.h>
#include <string.h>

/* Heavy ball with lam[0] as the learning rate: m' = 0.9 m + g,
 * w' = w - lam0 m' (lam reaches every step's update, not only the loss). */
static ad_status user_hb(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *state,
                         ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                         ad_tensor **w_new, ad_tensor **state_new) {
  (void)step, (void)ctx;
  for (int i = 0; i < n; i++) {
    state_new[i] = ad_add(t, ad_scale(t, state[i], 0.9), g[i]);
    w_new[i] = ad_sub(t, w[i], ad_mul(t, lam[0], state_new[i]));
  }
  return ad_tape_status(t);
}

/* L_val plus lam1 |w|^2 / 2: dL_val/dlam is reached at w_T. */
static ad_tensor *val_with_lam(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                               void *ctx) {
  ad_tensor *L = fx_mlp_val(t, w, lam, step, ctx), *pen = NULL;
  for (int i = 0; i < 3; i++) {
    ad_tensor *q = ad_dot(t, w[i], w[i]);
    pen = pen ? ad_add(t, pen, q) : q;
  }
  return ad_add(t, L, ad_mul(t, ad_scale(t, lam[1], 0.5), pen));
}

/* Runs bl_unroll the old way, then the lean way, on p: hypergradients
 * equal bit for bit, the same statistics, the lean peak no higher. */
static void check_same(const char *what, bl_problem *p, ad_tensor *const *hg, int n_lam,
                       int64_t K) {
  ad_tensor *ref[4];
  bl_stats st[2];
  for (int pass = 0; pass < 2; pass++) {
    for (int k = 0; k < n_lam; k++) memset(hg[k]->data, 0, (size_t)hg[k]->size * sizeof(double));
    ad_tape *t = fx_tape(16);
    bl__unroll_set_legacy(pass == 0);
    ad_status s = bl_unroll(t, p, &(bl_opts){.K = K}, hg, &st[pass]);
    bl__unroll_set_legacy(0);
    ck_assert_msg(s == AD_OK, "%s K=%lld pass %d: %s", what, (long long)K, pass, ad_tape_errmsg(t));
    ad_arena_stats as;
    ad_arena_stats_get(t, &as);
    ck_assert_msg(as.used == 0, "%s: %zu arena bytes left after the call", what, as.used);
    ad_tape_free(t);
    for (int k = 0; k < n_lam; k++) {
      if (pass == 0) {
        ref[k] = fx_new(AD_F64, hg[k]->ndim, hg[k]->shape);
        ad_copy_values(ref[k], hg[k]);
        /* filled in: a zero hypergradient would make the comparison vacuous */
        double l1 = 0;
        for (int64_t j = 0; j < hg[k]->size; j++) l1 += fabs(ad_get(hg[k], j));
        ck_assert_msg(l1 > 0, "%s K=%lld: hypergradient %d is zero", what, (long long)K, k);
      } else {
        ck_assert_msg(memcmp(hg[k]->data, ref[k]->data, (size_t)hg[k]->size * sizeof(double)) == 0,
                      "%s K=%lld: hypergradient %d differs from the old walk back", what,
                      (long long)K, k);
      }
    }
  }
  ck_assert_msg(st[1].peak_arena_bytes <= st[0].peak_arena_bytes, "%s K=%lld: peak %zu > %zu", what,
                (long long)K, st[1].peak_arena_bytes, st[0].peak_arena_bytes);
  ck_assert_int_eq(st[1].hvps, st[0].hvps);
  ck_assert_int_eq(st[1].inner_steps, st[0].inner_steps);
  ck_assert(memcmp(&st[1].val_loss, &st[0].val_loss, sizeof(double)) == 0);
  for (int k = 0; k < n_lam; k++) ad_tensor_free(ref[k]);
}

static const int64_t Ks[] = {0, 3, 6, 1};

START_TEST(test_lean_same_bits_optimizers) {
  static const char *names[] = {"sgd, learned lr in the loss", "sgd + per-parameter decay",
                                "momentum + decay", "adam + decay + lr var",
                                "momentum, lr var, lam in the loss"};
  for (int kind = 0; kind <= 4; kind++) {
    fx_mlp c;
    fx_mlp_setup(&c, kind, 7);
    for (size_t q = 0; q < sizeof Ks / sizeof *Ks; q++)
      check_same(names[kind], &c.p, c.hg, c.n_lam, Ks[q]);
    fx_mlp_free(&c);
  }
}
END_TEST

START_TEST(test_lean_same_bits_user_step_direct_term) {
  fx_mlp c;
  fx_mlp_setup(&c, 4, 7);
  ad_set(c.lam[0], 0, 0.05);
  c.p.step = (bl_step){.fn = user_hb, .slots = 1, .name = "user heavy ball"};
  for (size_t q = 0; q < sizeof Ks / sizeof *Ks; q++)
    check_same("user step", &c.p, c.hg, c.n_lam, Ks[q]);
  c.p.val_loss = val_with_lam;
  for (size_t q = 0; q < sizeof Ks / sizeof *Ks; q++)
    check_same("user step, lam in L_val", &c.p, c.hg, c.n_lam, Ks[q]);
  fx_mlp_free(&c);
}
END_TEST

/* One inner step (the whole segment is one chunk, walked with the start
 * adjoint skipped) and the peak: the lean walk back holds at least two
 * weight-sized buffers fewer than the old one on the bench's shape. */
START_TEST(test_lean_one_step_and_peak) {
  fx_mlp c;
  fx_mlp_setup(&c, 1, 1);
  check_same("one step", &c.p, c.hg, c.n_lam, 0);
  fx_mlp_free(&c);
  fx_mlp_setup(&c, 1, 12);
  bl_stats st[2];
  for (int pass = 0; pass < 2; pass++) {
    ad_tape *t = fx_tape(16);
    bl__unroll_set_legacy(pass == 0);
    ck_assert_int_eq(bl_unroll(t, &c.p, NULL, c.hg, &st[pass]), AD_OK);
    bl__unroll_set_legacy(0);
    ad_tape_free(t);
  }
  size_t wbytes = 0;
  for (int i = 0; i < 3; i++) wbytes += (size_t)c.w0[i]->size * sizeof(double);
  ck_assert_msg(st[1].peak_arena_bytes + 2 * wbytes <= st[0].peak_arena_bytes,
                "lean peak %zu, old %zu, weights %zu", st[1].peak_arena_bytes,
                st[0].peak_arena_bytes, wbytes);
  fx_mlp_free(&c);
}
END_TEST

int main(void) {
  Suite *s = suite_create("unroll_lean");
  TCase *tc = tcase_create("core");
  tcase_add_test(tc, test_lean_same_bits_optimizers);
  tcase_add_test(tc, test_lean_same_bits_user_step_direct_term);
  tcase_add_test(tc, test_lean_one_step_and_peak);
  suite_add_tcase(s, tc);
  return gc_run_suite(s);
}
