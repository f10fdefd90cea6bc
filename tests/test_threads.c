/* test_threads.c — the one thread setting (ad_set_threads) and the worker
 * pool behind ad__par_for: every part runs exactly once with the split the
 * interface promises, results of threaded ops equal the one-thread results
 * (bit for bit for elementwise ops; reductions are the same bits on
 * repeated runs at a fixed thread count and within 1e-6 across counts),
 * nested calls and concurrent callers from two user threads are correct,
 * and bad settings are refused with a message. */
#define _POSIX_C_SOURCE 200809L
#include "autodiff/ad_internal.h"
#include "gradcheck.h"

#include <check.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ the setting */

START_TEST(test_set_threads_values) {
  ck_assert_int_eq(ad_set_threads(3), AD_OK);
  ck_assert_int_eq(ad_threads(), 3);
  ck_assert_int_eq(ad_blas_threads(), 3); /* one setting, two names */
  ck_assert_str_eq(ad_last_error(), "");
  ad_blas_set_threads(2);
  ck_assert_int_eq(ad_threads(), 2);
  const int bad[] = {0, -1, -1000000, AD_MAX_THREADS + 1, 1 << 30};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    ck_assert_int_eq(ad_set_threads(bad[i]), AD_ERR_ARG);
    ck_assert_int_eq(ad_threads(), 2); /* kept */
    ck_assert_msg(strstr(ad_last_error(), "ad_set_threads") != NULL, "message: %s",
                  ad_last_error());
  }
  ck_assert_int_eq(ad_set_threads(AD_MAX_THREADS), AD_OK);
  ck_assert_int_eq(ad_threads(), AD_MAX_THREADS);
  ck_assert_int_eq(ad_set_threads(1), AD_OK);
  ck_assert_int_eq(ad_threads(), 1);
}
END_TEST

/* ------------------------------------------------------------ ad__par_for */

typedef struct {
  int64_t n;
  int parts;
  atomic_int *hits;    /* per element: how many parts covered it */
  atomic_int *seen;    /* per part: how many times it ran */
  int64_t (*range)[2]; /* per part: the range it got */
  int nested;          /* call ad__par_for from inside each part */
  atomic_int inner;    /* elements the nested calls covered */
} cover_ctx;

static void inner_part(void *vc, int part, int64_t lo, int64_t hi) {
  (void)part;
  cover_ctx *c = vc;
  atomic_fetch_add(&c->inner, (int)(hi - lo));
}

static void cover_part(void *vc, int part, int64_t lo, int64_t hi) {
  cover_ctx *c = vc;
  atomic_fetch_add(&c->seen[part], 1);
  c->range[part][0] = lo;
  c->range[part][1] = hi;
  for (int64_t i = lo; i < hi; i++) atomic_fetch_add(&c->hits[i], 1);
  if (c->nested) ad__par_for(1 << 16, 1, inner_part, c);
}

/* Runs one ad__par_for over n and checks the split it used. */
static void check_cover(int64_t n, int64_t grain, int nested) {
  int parts = ad__par_parts(n, grain);
  int th = ad_threads();
  int64_t by = n / (grain < 1 ? 1 : grain);
  ck_assert_int_eq(parts, by < 1 ? 1 : by < th ? (int)by : th);
  cover_ctx c = {.n = n, .parts = parts, .nested = nested};
  c.hits = calloc((size_t)(n > 0 ? n : 1), sizeof *c.hits);
  c.seen = calloc((size_t)parts, sizeof *c.seen);
  c.range = calloc((size_t)parts, sizeof *c.range);
  atomic_init(&c.inner, 0);
  ad__par_for(n, grain, cover_part, &c);
  /* Counted first, asserted once: Check reports every assertion through a
   * pipe, and millions of them would make this test a write() benchmark. */
  int64_t bad_hits = 0, bad_parts = 0;
  for (int64_t i = 0; i < n; i++) bad_hits += atomic_load(&c.hits[i]) != 1;
  if (n > 0)
    for (int p = 0; p < parts; p++)
      bad_parts += atomic_load(&c.seen[p]) != 1 || c.range[p][0] != n * p / parts ||
                   c.range[p][1] != n * (p + 1) / parts;
  ck_assert_msg(bad_hits == 0 && bad_parts == 0,
                "n=%ld grain=%ld threads=%d: %ld elements not covered once, %ld parts wrong",
                (long)n, (long)grain, th, (long)bad_hits, (long)bad_parts);
  if (nested && n > 0) ck_assert_int_eq(atomic_load(&c.inner), parts << 16);
  free(c.hits);
  free(c.seen);
  free(c.range);
}

START_TEST(test_par_for_covers) {
  const int threads[] = {1, 2, 3, 4, 7};
  const int64_t sizes[] = {0, 1, 2, 3, 5, 100, 4097, 100003};
  const int64_t grains[] = {1, 2, 1000, 1 << 20};
  for (size_t a = 0; a < sizeof threads / sizeof threads[0]; a++) {
    ck_assert_int_eq(ad_set_threads(threads[a]), AD_OK);
    for (size_t b = 0; b < sizeof sizes / sizeof sizes[0]; b++)
      for (size_t g = 0; g < sizeof grains / sizeof grains[0]; g++)
        for (int nested = 0; nested < 2; nested++) check_cover(sizes[b], grains[g], nested);
  }
  ad_set_threads(1);
}
END_TEST

/* Many small jobs back to back: the hand-over between jobs (a worker still
 * finishing part of job k while job k+1 is published) must not lose or
 * repeat a part. */
typedef struct {
  double *x;
  atomic_long sum;
} many_ctx;

static void many_part(void *vc, int part, int64_t lo, int64_t hi) {
  (void)part;
  many_ctx *c = vc;
  long s = 0;
  for (int64_t i = lo; i < hi; i++) {
    c->x[i] += 1;
    s += (long)i;
  }
  atomic_fetch_add(&c->sum, s);
}

START_TEST(test_par_for_many_jobs) {
  for (int th = 2; th <= 3; th++) {
    ck_assert_int_eq(ad_set_threads(th), AD_OK);
    enum { N = 3000, JOBS = 20000 };
    many_ctx c = {.x = calloc(N, sizeof(double))};
    for (int j = 0; j < JOBS; j++) {
      atomic_store(&c.sum, 0);
      int64_t n = 1 + j % N;
      ad__par_for(n, 1, many_part, &c);
      if (atomic_load(&c.sum) != (long)(n * (n - 1) / 2))
        ck_abort_msg("job %d: sum %ld, want %ld", j, atomic_load(&c.sum), (long)(n * (n - 1) / 2));
    }
    /* element i was in every job with n > i */
    for (int64_t i = 0; i < N; i++) {
      long expect = 0;
      for (int j = 0; j < JOBS; j++) expect += 1 + j % N > i;
      if (c.x[i] != (double)expect) ck_abort_msg("x[%ld] = %g, want %ld", (long)i, c.x[i], expect);
    }
    free(c.x);
  }
  ad_set_threads(1);
}
END_TEST

/* Two user threads calling ad__par_for at once: one of them gets the pool,
 * the other runs its parts itself; both see every part once. */
static void *cover_thread(void *arg) {
  (void)arg;
  for (int r = 0; r < 300; r++) check_cover(20000 + r, 100, r & 1);
  return NULL;
}

START_TEST(test_par_for_concurrent_callers) {
  ck_assert_int_eq(ad_set_threads(2), AD_OK);
  pthread_t a, b;
  ck_assert_int_eq(pthread_create(&a, NULL, cover_thread, NULL), 0);
  ck_assert_int_eq(pthread_create(&b, NULL, cover_thread, NULL), 0);
  pthread_join(a, NULL);
  pthread_join(b, NULL);
  ad_set_threads(1);
}
END_TEST

Suite *threads_suite(void) {
  Suite *s = suite_create("threads");
  TCase *tc = tcase_create("pool");
  tcase_add_test(tc, test_set_threads_values);
  tcase_add_test(tc, test_par_for_covers);
  tcase_add_test(tc, test_par_for_many_jobs);
  tcase_add_test(tc, test_par_for_concurrent_callers);
  tcase_set_timeout(tc, 600);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  SRunner *sr = srunner_create(threads_suite());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
