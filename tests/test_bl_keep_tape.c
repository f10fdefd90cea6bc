/* test_bl_keep_tape.c — bl_opts.keep_tape: a method leaves what it recorded
 * on the tape (to draw a real method's graph), gives the same hypergradient
 * bit for bit as without it, and the caller's rewind frees it all; a failed
 * call leaves nothing behind either way. */
#define _POSIX_C_SOURCE 200809L /* open_memstream */
#include "bl_fixtures.h"
#include "gradcheck.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static size_t nodes(const ad_tape *t) {
  ad_arena_stats s;
  ad_arena_stats_get(t, &s);
  return s.n_nodes;
}

/* Runs fn on the ridge case with and without keep_tape: same bits, nodes
 * kept only with it, gone after the caller's rewind. Returns the kept count. */
static size_t check_kept(const char *who, bl_method_fn fn, int64_t T, int64_t K) {
  fx_rcase c;
  fx_rcase_setup(&c, 1, T, 0.05);
  ad_tape *t = fx_tape(64);
  bl_opts plain = {.K = K}, keep = {.K = K, .keep_tape = 1};
  ck_assert_msg(fn(t, &c.p, &plain, c.hg, NULL) == AD_OK, "%s: %s", who, ad_tape_errmsg(t));
  int64_t d = c.hg[0]->size;
  double *ref = malloc((size_t)d * sizeof *ref);
  for (int64_t j = 0; j < d; j++) ref[j] = ad_get(c.hg[0], j);
  ck_assert_uint_eq(nodes(t), 0); /* the method rewound everything */

  ad_marker m = ad_mark(t);
  ck_assert_msg(fn(t, &c.p, &keep, c.hg, NULL) == AD_OK, "%s: %s", who, ad_tape_errmsg(t));
  size_t kept = nodes(t);
  printf("%s (T = %lld, K = %lld): %zu nodes kept\n", who, (long long)T, (long long)K, kept);
  ck_assert_msg(kept > 0, "%s kept no node", who);
  for (int64_t j = 0; j < d; j++)
    ck_assert_msg(ad_get(c.hg[0], j) == ref[j], "%s: hg[%lld] %.17g with keep_tape, %.17g without",
                  who, (long long)j, ad_get(c.hg[0], j), ref[j]);
  /* what was kept can be drawn */
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  ck_assert_ptr_nonnull(f);
  ck_assert_int_eq(ad_tape_dot(t, f), AD_OK);
  fclose(f);
  ck_assert_msg(len > 100 && strstr(buf, "digraph"), "%s: DOT of %zu bytes", who, len);
  free(buf);
  ad_rewind(t, m);
  ck_assert_uint_eq(nodes(t), 0);
  /* the tape is as usable as before */
  ck_assert_int_eq(fn(t, &c.p, &plain, c.hg, NULL), AD_OK);
  for (int64_t j = 0; j < d; j++) ck_assert(ad_get(c.hg[0], j) == ref[j]);
  free(ref);
  ad_tape_free(t);
  fx_rcase_free(&c);
  return kept;
}

START_TEST(test_kept_and_same) {
  size_t one = check_kept("bl_one_step", bl_one_step, 3, 0);
  size_t u2 = check_kept("bl_unroll", bl_unroll, 2, 0);
  size_t u6 = check_kept("bl_unroll", bl_unroll, 6, 0);
  check_kept("bl_unroll truncated", bl_unroll, 6, 2);
  check_kept("bl_t1t2", bl_t1t2, 3, 0);
  check_kept("bl_fo", bl_fo, 3, 0);
  /* a longer unroll records more: the whole trajectory is there */
  ck_assert_msg(u6 > u2, "unroll T = 6 kept %zu nodes, T = 2 kept %zu", u6, u2);
  ck_assert(one > 0);
}
END_TEST

START_TEST(test_failure_leaves_nothing) {
  fx_rcase c;
  fx_rcase_setup(&c, 1, 3, 0.05);
  ad_tape *t = fx_tape(64);
  ad_set(c.hg[0], 0, 42.0);
  ck_assert_int_eq(bl_unroll(t, &c.p, &(bl_opts){.K = -1, .keep_tape = 1}, c.hg, NULL), AD_ERR_ARG);
  ck_assert_uint_eq(nodes(t), 0);
  ck_assert(ad_get(c.hg[0], 0) == 42.0);
  ad_tape_free(t);
  fx_rcase_free(&c);
}
END_TEST

int main(void) {
  Suite *s = suite_create("bl_keep_tape");
  TCase *tc = tcase_create("core");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, test_kept_and_same);
  tcase_add_test(tc, test_failure_leaves_nothing);
  suite_add_tcase(s, tc);
  return gc_run_suite(s);
}
