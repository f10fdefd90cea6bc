/* test_threads.c — the one thread setting (ad_set_threads) and the worker
 * pool behind ad__par_for: every part runs exactly once with the split the
 * interface promises, results of threaded ops equal the one-thread results
 * (bit for bit for elementwise ops; reductions are the same bits on
 * repeated runs at a fixed thread count and within 1e-6 across counts),
 * nested calls and concurrent callers from two user threads are correct,
 * and bad settings are refused with a message. GEMMs at 2 threads (split
 * over the pool, BLIS at one thread) give the 1-thread bits per forced
 * path, start no OpenMP team, and stay right nested and concurrent. */
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
#include <time.h>

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

/* The pool really runs parts on other threads: part 0 waits (up to 10 s)
 * for part 1 to start, which only a worker can do while the caller is in
 * part 0. The parts record their threads: part 1 ran on a thread other
 * than the caller's. */
typedef struct {
  atomic_int started1;
  pthread_t who[2];
  int waited_out;
} pair_ctx;

static void pair_part(void *vc, int part, int64_t lo, int64_t hi) {
  (void)lo, (void)hi;
  pair_ctx *c = vc;
  c->who[part] = pthread_self();
  if (part == 1) {
    atomic_store(&c->started1, 1);
    return;
  }
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (;;) {
    if (atomic_load(&c->started1)) return;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (t1.tv_sec - t0.tv_sec > 10) {
      c->waited_out = 1;
      return;
    }
  }
}

START_TEST(test_par_for_uses_workers) {
  for (int th = 2; th <= 3; th++) {
    ck_assert_int_eq(ad_set_threads(th), AD_OK);
    for (int r = 0; r < 20; r++) {
      pair_ctx c = {.waited_out = 0};
      atomic_init(&c.started1, 0);
      ad__par_for(2, 1, pair_part, &c);
      ck_assert_msg(!c.waited_out, "threads=%d, job %d: no worker took part 1 in 10 s", th, r);
      ck_assert_msg(pthread_equal(c.who[0], pthread_self()), "part 0 not on the caller");
      ck_assert_msg(!pthread_equal(c.who[1], pthread_self()), "part 1 on the caller");
    }
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

/* ------------------------------------------------------------ threaded ops */

/* A heap tensor of `size` elements drawn from seed: values in [lo, hi). */
static ad_tensor *random_tensor(ad_dtype dt, int ndim, const int64_t *shape, uint64_t seed,
                                double lo, double hi) {
  ad_tensor *x = NULL;
  ck_assert_int_eq(ad_tensor_new(&x, dt, ndim, shape), AD_OK);
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int64_t i = 0; i < x->size; i++) {
    z ^= z << 13, z ^= z >> 7, z ^= z << 17;
    ad_set(x, i, lo + (hi - lo) * (double)(z >> 11) / 9007199254740992.0);
  }
  return x;
}

static ad_tensor *keep(const ad_tensor *x) { /* a heap copy of an op's result */
  ck_assert_ptr_nonnull(x);
  ad_tensor *y = NULL;
  ck_assert_int_eq(ad_tensor_new(&y, x->dtype, x->ndim, x->shape), AD_OK);
  ck_assert_int_eq(ad_copy_values(y, x), AD_OK);
  return y;
}

static int same_bits(const ad_tensor *a, const ad_tensor *b) {
  return a->dtype == b->dtype && a->size == b->size &&
         memcmp(a->data, b->data, (size_t)a->size * ad_dtype_size(a->dtype)) == 0;
}

static double max_rel_diff(const ad_tensor *a, const ad_tensor *b) {
  double m = 0;
  for (int64_t i = 0; i < a->size; i++) {
    double x = ad_get(a, i), y = ad_get(b, i);
    double d = fabs(x - y) / fmax(1.0, fabs(x));
    if (d > m || d != d) m = d;
  }
  return m;
}

enum { N_ELEM_OPS = 27 };

/* Op k of the elementwise set on x (in (0.5, 2)), w (same shape) and s
 * (a scalar): forward ops and the backward ops their rules use. */
static ad_tensor *elem_op(ad_tape *t, int k, ad_tensor *x, ad_tensor *w, ad_tensor *s) {
  switch (k) {
  case 0:
    return ad_add(t, x, w);
  case 1:
    return ad_sub(t, x, w);
  case 2:
    return ad_mul(t, x, w);
  case 3:
    return ad_div(t, x, w);
  case 4:
    return ad_mul(t, s, x); /* broadcast scalar, both sides */
  case 5:
    return ad_div(t, x, s);
  case 6:
    return ad_axpy(t, x, -0.3, w);
  case 7:
    return ad_neg(t, x);
  case 8:
    return ad_scale(t, x, 1.7);
  case 9:
    return ad_add_scalar(t, x, -1.25); /* crosses 0: relu, sign, abs see both signs */
  case 10:
    return ad_pow_scalar(t, x, 2.0);
  case 11:
    return ad_pow_scalar(t, x, 0.5);
  case 12:
    return ad_pow_scalar(t, x, 1.3);
  case 13:
    return ad_exp(t, x);
  case 14:
    return ad_log(t, x);
  case 15:
    return ad_sqrt(t, x);
  case 16:
    return ad_tanh(t, ad_add_scalar(t, x, -1.25));
  case 17:
    return ad_sigmoid(t, ad_add_scalar(t, x, -1.25));
  case 18:
    return ad_softplus(t, ad_add_scalar(t, x, -1.25));
  case 19:
    return ad_relu(t, ad_add_scalar(t, x, -1.25));
  case 20:
    return ad_relu_backward(t, w, ad_add_scalar(t, x, -1.25));
  case 21:
    return ad_abs(t, ad_add_scalar(t, x, -1.25));
  case 22:
    return ad_sign(t, ad_add_scalar(t, x, -1.25));
  case 23:
    return ad_broadcast_axis(t, ad_reshape(t, x, 2, (int64_t[]){1, x->size}), 0, 3, 1);
  case 24:
    return ad_expand(t, s, x);
  case 25:
    return ad_slice(t, ad_reshape(t, x, 2, (int64_t[]){x->size / 7, 7}), 1, 2, 4);
  default: {
    ad_tensor *xs[2] = {x, w};
    return ad_concat(t, 2, xs, 0);
  }
  }
}

/* Every elementwise op and copy gives the same bits at 1, 2 and 3 threads,
 * for sizes below and above the threading threshold, in both dtypes. */
START_TEST(test_elementwise_bit_identical) {
  const int64_t sizes[] = {7, 4095 * 7, 100003 * 7};
  for (int dti = 0; dti < 2; dti++) {
    ad_dtype dt = dti ? AD_F64 : AD_F32;
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
      int64_t n = sizes[si];
      ad_tensor *x = random_tensor(dt, 1, &n, 1 + si, 0.5, 2.0);
      ad_tensor *w = random_tensor(dt, 1, &n, 100 + si, 0.5, 2.0);
      ad_tensor *s = random_tensor(dt, 0, NULL, 7, 0.5, 2.0);
      ad_tape *t = NULL;
      ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
      for (int k = 0; k < N_ELEM_OPS; k++) {
        ad_tensor *ref = NULL;
        for (int th = 1; th <= 3; th++) {
          ck_assert_int_eq(ad_set_threads(th), AD_OK);
          ad_marker m = ad_mark(t);
          ad_tensor *y = elem_op(t, k, x, w, s);
          ck_assert_msg(y != NULL, "op %d: %s", k, ad_tape_errmsg(t));
          if (!ref)
            ref = keep(y);
          else
            ck_assert_msg(same_bits(ref, y),
                          "op %d, %s, %ld elements: %d threads differ from 1 by up to %g", k,
                          ad_dtype_name(dt), (long)n, th, max_rel_diff(ref, y));
          ad_rewind(t, m);
        }
        ad_tensor_free(ref);
      }
      ad_tape_free(t);
      ad_tensor_free(x);
      ad_tensor_free(w);
      ad_tensor_free(s);
    }
  }
  ad_set_threads(1);
}
END_TEST

/* The threaded copies against the layout they promise (not only against
 * one thread): a large broadcast, pad and concat read back by index. */
START_TEST(test_copies_closed_form) {
  ck_assert_int_eq(ad_set_threads(2), AD_OK);
  int64_t shape[2] = {3, 50000};
  ad_tensor *x = random_tensor(AD_F32, 2, shape, 3, -1, 1);
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  ad_tensor *b = ad_broadcast_axis(t, x, 1, 4, 0); /* [3, 4, 50000] */
  ad_tensor *p = ad_pad_axis(t, x, 0, 2, 6);       /* rows 2..4 of 6 */
  ad_tensor *xs[2] = {x, p};
  ad_tensor *c = ad_concat(t, 2, xs, 0); /* [9, 50000] */
  ck_assert_ptr_nonnull(b);
  ck_assert_ptr_nonnull(c);
  int64_t bad = 0;
  for (int64_t o = 0; o < 3; o++)
    for (int64_t k = 0; k < 4; k++)
      for (int64_t i = 0; i < shape[1]; i++)
        bad += ad_get(b, (o * 4 + k) * shape[1] + i) != ad_get(x, o * shape[1] + i);
  for (int64_t r = 0; r < 6; r++)
    for (int64_t i = 0; i < shape[1]; i++) {
      double want = r >= 2 && r < 5 ? ad_get(x, (r - 2) * shape[1] + i) : 0.0;
      bad += ad_get(p, r * shape[1] + i) != want;
      bad += ad_get(c, (3 + r) * shape[1] + i) != want;
    }
  for (int64_t i = 0; i < 3 * shape[1]; i++) bad += ad_get(c, i) != ad_get(x, i);
  ck_assert_msg(bad == 0, "%ld elements misplaced", (long)bad);
  ad_tape_free(t);
  ad_tensor_free(x);
  ad_set_threads(1);
}
END_TEST

enum { N_RED_OPS = 10 };

static ad_tensor *red_op(ad_tape *t, int k, ad_tensor *x, ad_tensor *w) {
  switch (k) {
  case 0:
    return ad_sum(t, x);
  case 1:
    return ad_mean(t, x);
  case 2:
    return ad_dot(t, x, w);
  case 3:
    return ad_sum_axis(t, x, 0, 0);
  case 4:
    return ad_sum_axis(t, x, 1, 1);
  case 5:
    return ad_sum_axis(t, x, 2, 0);
  case 6:
    return ad_max_axis(t, x, 1, 0);
  case 7:
    return ad_logsumexp(t, x, 2, 0);
  case 8:
    return ad_softmax(t, x, 1);
  default:
    return ad_log_softmax(t, x, 2);
  }
}

/* Reductions: repeated runs at a fixed thread count give the same bits;
 * 1, 2 and 3 threads agree to 1e-6 (whole sums add per-part partials, so
 * their last bits may move with the thread count: 1e-6 of the sum of the
 * terms' magnitudes; axis reductions do not split a sum and must agree
 * exactly). Shapes [outer, n, inner] put the
 * work in each of the three places the kernels split. */
START_TEST(test_reductions_deterministic) {
  const int64_t shapes[][3] = {
      {2, 3, 5}, {4, 257, 300}, {1, 3000, 40}, {3000, 40, 1}, {2, 2, 50000}};
  for (int dti = 0; dti < 2; dti++) {
    ad_dtype dt = dti ? AD_F64 : AD_F32;
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
      ad_tensor *x = random_tensor(dt, 3, shapes[si], 11 + si, -3, 3);
      ad_tensor *w = random_tensor(dt, 3, shapes[si], 50 + si, -1, 1);
      ad_tape *t = NULL;
      ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
      for (int k = 0; k < N_RED_OPS; k++) {
        ad_tensor *ref = NULL;
        for (int th = 1; th <= 3; th++) {
          ck_assert_int_eq(ad_set_threads(th), AD_OK);
          ad_tensor *first = NULL;
          for (int rep = 0; rep < 3; rep++) {
            ad_marker m = ad_mark(t);
            ad_tensor *y = red_op(t, k, x, w);
            ck_assert_msg(y != NULL, "op %d: %s", k, ad_tape_errmsg(t));
            if (!first)
              first = keep(y);
            else
              ck_assert_msg(same_bits(first, y), "op %d at %d threads: run %d differs", k, th, rep);
            ad_rewind(t, m);
          }
          if (!ref)
            ref = first;
          else {
            double d = max_rel_diff(ref, first);
            if (k <= 2) {
              /* A whole sum's rounding is relative to the sum of the terms'
               * magnitudes (cancellation can make the result itself tiny):
               * the error of the one-thread f32 sum is of that size too. */
              double mag = 0;
              for (int64_t i = 0; i < x->size; i++)
                mag += fabs(ad_get(x, i) * (k == 2 ? ad_get(w, i) : 1.0));
              if (k == 1) mag /= (double)x->size;
              d = fabs(ad_item(ref) - ad_item(first)) / fmax(1.0, mag);
            }
            ck_assert_msg(d <= 1e-6, "op %d, %s: %d threads differ from 1 by %g", k,
                          ad_dtype_name(dt), th, d);
            if (k >= 3) ck_assert_msg(same_bits(ref, first), "axis op %d: bits moved", k);
            ad_tensor_free(first);
          }
        }
        ad_tensor_free(ref);
      }
      ad_tape_free(t);
      ad_tensor_free(x);
      ad_tensor_free(w);
    }
  }
  ad_set_threads(1);
}
END_TEST

/* A whole sum against its closed form at every thread count: the sums of
 * i and i^2 for i < n (every partial sum an integer below 2^53: exact). */
START_TEST(test_sum_closed_form) {
  int64_t n = 150000;
  ad_tensor *x = NULL;
  ck_assert_int_eq(ad_tensor_new(&x, AD_F64, 1, &n), AD_OK);
  for (int64_t i = 0; i < n; i++) ad_set(x, i, (double)i);
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  for (int th = 1; th <= 4; th++) {
    ck_assert_int_eq(ad_set_threads(th), AD_OK);
    ad_marker m = ad_mark(t);
    ck_assert_double_eq(ad_item(ad_sum(t, x)), (double)n * (double)(n - 1) / 2);
    ck_assert_double_eq(ad_item(ad_dot(t, x, x)),
                        (double)(n - 1) * (double)n * (double)(2 * n - 1) / 6);
    ad_rewind(t, m);
  }
  ad_tape_free(t);
  ad_tensor_free(x);
  ad_set_threads(1);
}
END_TEST

/* A small network step: forward, gradient (the backward ops through the
 * pool too) and the loss, as one workload for the tests below. */
typedef struct {
  ad_dtype dt;
  ad_tensor *x, *w1, *w2; /* inputs; w1, w2 require gradients */
  ad_tensor *out[3];      /* loss, d loss/d w1, d loss/d w2 (heap copies) */
} step_case;

static void step_run(step_case *c) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  /* [256, 300] -> relu -> [256, 300] -> log_softmax over 300 classes */
  ad_tensor *h = ad_relu(t, ad_matmul(t, c->x, c->w1, 0, 0));
  ad_tensor *z = ad_tanh(t, ad_mul(t, h, c->w2));
  ad_tensor *lp = ad_log_softmax(t, z, 1);
  int32_t labels[256];
  for (int i = 0; i < 256; i++) labels[i] = (i * 37) % 300;
  ad_tensor *loss = ad_add(t, ad_nll(t, lp, labels, 256), ad_mean(t, ad_exp(t, z)));
  ad_tensor *wrt[2] = {c->w1, c->w2}, *g[2];
  ck_assert_msg(ad_grad(t, 1, &loss, NULL, 2, wrt, g, 0) == AD_OK, "%s", ad_tape_errmsg(t));
  c->out[0] = keep(loss);
  c->out[1] = keep(g[0]);
  c->out[2] = keep(g[1]);
  ad_tape_free(t);
}

static void step_init(step_case *c, ad_dtype dt) {
  memset(c, 0, sizeof *c);
  c->dt = dt;
  c->x = random_tensor(dt, 2, (int64_t[]){256, 64}, 21, -1, 1);
  c->w1 = random_tensor(dt, 2, (int64_t[]){64, 300}, 22, -0.3, 0.3);
  c->w2 = random_tensor(dt, 2, (int64_t[]){256, 300}, 23, -1, 1);
  ad_requires_grad(c->w1, 1);
  ad_requires_grad(c->w2, 1);
}

static void step_free_out(step_case *c) {
  for (int i = 0; i < 3; i++) ad_tensor_free(c->out[i]), c->out[i] = NULL;
}

static void step_free(step_case *c) {
  step_free_out(c);
  ad_tensor_free(c->x);
  ad_tensor_free(c->w1);
  ad_tensor_free(c->w2);
}

/* The step's loss and gradients at 2 and 3 threads agree with 1 thread to
 * 1e-6, and repeat bit for bit at a fixed thread count. */
START_TEST(test_step_gradients_across_threads) {
  for (int dti = 0; dti < 2; dti++) {
    step_case ref, c;
    ck_assert_int_eq(ad_set_threads(1), AD_OK);
    step_init(&ref, dti ? AD_F64 : AD_F32);
    step_run(&ref);
    step_init(&c, ref.dt);
    for (int th = 2; th <= 3; th++) {
      ck_assert_int_eq(ad_set_threads(th), AD_OK);
      step_run(&c);
      for (int i = 0; i < 3; i++) {
        double d = max_rel_diff(ref.out[i], c.out[i]);
        ck_assert_msg(d <= 1e-6, "output %d at %d threads: %g from 1 thread", i, th, d);
      }
      ad_tensor *first[3] = {c.out[0], c.out[1], c.out[2]};
      memset(c.out, 0, sizeof c.out);
      step_run(&c);
      for (int i = 0; i < 3; i++) {
        ck_assert_msg(same_bits(first[i], c.out[i]), "output %d at %d threads: runs differ", i, th);
        ad_tensor_free(first[i]);
      }
      step_free_out(&c);
    }
    step_free(&c);
    step_free(&ref);
  }
  ad_set_threads(1);
}
END_TEST

/* Two user threads running steps at once (each its own tape): one of them
 * gets the pool, the other's loops run on itself; both give the results of
 * a lone run at the same setting, bit for bit. */
typedef struct {
  step_case c;
  const step_case *ref;
  int bad;
} step_thread_arg;

static void *step_thread(void *vp) {
  step_thread_arg *a = vp;
  for (int r = 0; r < 6; r++) {
    step_run(&a->c);
    for (int i = 0; i < 3; i++) a->bad += !same_bits(a->ref->out[i], a->c.out[i]);
    step_free_out(&a->c);
  }
  return NULL;
}

START_TEST(test_concurrent_callers_ops) {
  ck_assert_int_eq(ad_set_threads(2), AD_OK);
  step_case ref;
  step_init(&ref, AD_F32);
  step_run(&ref);
  step_thread_arg a[2];
  pthread_t tid[2];
  for (int i = 0; i < 2; i++) {
    step_init(&a[i].c, AD_F32);
    a[i].ref = &ref;
    a[i].bad = 0;
    ck_assert_int_eq(pthread_create(&tid[i], NULL, step_thread, &a[i]), 0);
  }
  for (int i = 0; i < 2; i++) pthread_join(tid[i], NULL);
  for (int i = 0; i < 2; i++) {
    ck_assert_msg(a[i].bad == 0, "thread %d: %d results differ from a lone run", i, a[i].bad);
    step_free(&a[i].c);
  }
  step_free(&ref);
  ad_set_threads(1);
}
END_TEST

/* ------------------------------------------------------------ GEMM on the pool
 *
 * At more than one thread a product is split into disjoint parts of C (by
 * rows or by column blocks on tile boundaries), each computed by a
 * one-thread call of the same path on the worker pool (blas.c,
 * run_choice). Each element is summed by one part in the one-thread k
 * order, so for a forced path the 2-thread result must have exactly the
 * bits of the 1-thread one. */

static const char *const GEMM_PATHS[] = {
    "blis",      "direct",        "direct:avx512",  "sup",         "sup+packA",
    "sup+packB", "packed",        "packed:haswell", "packed:zen3", "packed:skx",
    "narrow",    "narrow:avx512", "wide:avx512",    "packed:team"};
#define N_GEMM_PATHS ((int)(sizeof GEMM_PATHS / sizeof GEMM_PATHS[0]))

/* Above blas.c's SMALL_THREADED (262144 multiply-adds), so they thread:
 * odd m and n, tall, wide, narrow (n <= 64) and a k past BLIS's KC. */
static const int64_t GEMM_SHAPES[][3] = {{67, 131, 61}, {201, 45, 33}, {31, 257, 70},
                                         {129, 97, 40}, {13, 301, 80}, {300, 7, 151},
                                         {96, 64, 64},  {37, 41, 400}};
#define N_GEMM_SHAPES ((int)(sizeof GEMM_SHAPES / sizeof GEMM_SHAPES[0]))

typedef struct {
  int ta, tb;
  int64_t m, n, k;
  double *a, *b, *c0; /* the operands and C's start, as doubles */
  double *ref;        /* alpha op(A) op(B) + beta C0 in double */
} gemm_case;

static const double G_ALPHA = 0.75, G_BETA = -0.5;

/* Uniform in [-1, 1] in steps of 1/1000 (a 64-bit LCG's top bits). */
static double unit_rand(uint64_t *s) {
  *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
  return (double)((*s >> 33) % 2001) / 1000.0 - 1.0;
}

static void gemm_case_init(gemm_case *g, int ta, int tb, int64_t m, int64_t n, int64_t k,
                           uint64_t seed) {
  *g = (gemm_case){.ta = ta, .tb = tb, .m = m, .n = n, .k = k};
  g->a = malloc(sizeof(double) * (size_t)(m * k));
  g->b = malloc(sizeof(double) * (size_t)(k * n));
  g->c0 = malloc(sizeof(double) * (size_t)(m * n));
  g->ref = malloc(sizeof(double) * (size_t)(m * n));
  ck_assert(g->a && g->b && g->c0 && g->ref);
  uint64_t st = seed;
  for (int64_t i = 0; i < m * k; i++) g->a[i] = unit_rand(&st);
  for (int64_t i = 0; i < k * n; i++) g->b[i] = unit_rand(&st);
  for (int64_t i = 0; i < m * n; i++) g->c0[i] = unit_rand(&st);
  /* op(A)[i, p] = a[ta ? p m + i : i k + p], op(B)[p, j] = b[tb ? j k + p : p n + j] */
  for (int64_t i = 0; i < m; i++)
    for (int64_t j = 0; j < n; j++) {
      double acc = 0;
      for (int64_t p = 0; p < k; p++)
        acc += g->a[ta ? p * m + i : i * k + p] * g->b[tb ? j * k + p : p * n + j];
      g->ref[i * n + j] = G_ALPHA * acc + G_BETA * g->c0[i * n + j];
    }
}

static void gemm_case_free(gemm_case *g) {
  free(g->a);
  free(g->b);
  free(g->c0);
  free(g->ref);
}

/* C = alpha op(A) op(B) + beta C0 in dtype dt on the current setting, into
 * out (f32 or f64 values by dt). */
static void gemm_case_run(const gemm_case *g, ad_dtype dt, void *out) {
  const int64_t m = g->m, n = g->n, k = g->k, lda = g->ta ? m : k, ldb = g->tb ? k : n;
  if (dt == AD_F64) {
    double *c = out;
    memcpy(c, g->c0, sizeof(double) * (size_t)(m * n));
    ad_gemm_f64(g->ta, g->tb, m, n, k, G_ALPHA, g->a, lda, g->b, ldb, G_BETA, c, n);
    return;
  }
  float *a = malloc(sizeof(float) * (size_t)(m * k)), *b = malloc(sizeof(float) * (size_t)(k * n));
  float *c = out;
  ck_assert(a && b);
  for (int64_t i = 0; i < m * k; i++) a[i] = (float)g->a[i];
  for (int64_t i = 0; i < k * n; i++) b[i] = (float)g->b[i];
  for (int64_t i = 0; i < m * n; i++) c[i] = (float)g->c0[i];
  ad_gemm_f32(g->ta, g->tb, m, n, k, (float)G_ALPHA, a, lda, b, ldb, (float)G_BETA, c, n);
  free(a);
  free(b);
}

/* Largest |out - ref| / (1 + |ref|) over C. */
static double gemm_case_err(const gemm_case *g, ad_dtype dt, const void *out) {
  double worst = 0;
  for (int64_t i = 0; i < g->m * g->n; i++) {
    const double v = dt == AD_F64 ? ((const double *)out)[i] : (double)((const float *)out)[i];
    const double e = fabs(v - g->ref[i]) / (1.0 + fabs(g->ref[i]));
    if (e > worst) worst = e;
  }
  return worst;
}

/* BLIS's sup kernels are the exception: their edge kernels along n
 * (and the rd ones, A row- and B column-stored) sum some elements in an
 * order that depends on where the call's rows start, so a split changes
 * a few last bits; "blis" may resolve to them. For those the 2-thread
 * results are only the same on every run and close to the reference. */
static int split_exact(const char *path) {
  return strncmp(path, "sup", 3) != 0 && strcmp(path, "blis") != 0;
}

/* Per forced path, f32 and f64, every shape and transpose: the 2-thread
 * result (split over the pool) equals the 1-thread one bit for bit, a
 * second 2-thread run too, and both match the double reference. */
START_TEST(test_gemm_split_bit_identical) {
  int tried = 0;
  for (int s = 0; s < N_GEMM_SHAPES; s++)
    for (int t = 0; t < 4; t++) {
      gemm_case g;
      gemm_case_init(&g, t >> 1, t & 1, GEMM_SHAPES[s][0], GEMM_SHAPES[s][1], GEMM_SHAPES[s][2],
                     (uint64_t)(s * 4 + t + 1));
      const size_t cells = (size_t)(g.m * g.n);
      double *c1 = malloc(sizeof(double) * cells), *c2 = malloc(sizeof(double) * cells);
      double *c3 = malloc(sizeof(double) * cells);
      ck_assert(c1 && c2 && c3);
      for (int p = 0; p < N_GEMM_PATHS; p++) {
        if (ad_blas_set_path(GEMM_PATHS[p]) != AD_OK) continue; /* not on this CPU */
        tried++;
        for (int d = 0; d < 2; d++) {
          const ad_dtype dt = d ? AD_F64 : AD_F32;
          const size_t bytes = cells * (dt == AD_F64 ? sizeof(double) : sizeof(float));
          ck_assert_int_eq(ad_set_threads(1), AD_OK);
          gemm_case_run(&g, dt, c1);
          ck_assert_int_eq(ad_set_threads(2), AD_OK);
          gemm_case_run(&g, dt, c2);
          gemm_case_run(&g, dt, c3);
          ck_assert_msg((!split_exact(GEMM_PATHS[p]) || memcmp(c1, c2, bytes) == 0) &&
                            memcmp(c2, c3, bytes) == 0,
                        "%s %s %lldx%lldx%lld t%d%d: 2-thread result differs from 1-thread",
                        GEMM_PATHS[p], d ? "f64" : "f32", (long long)g.m, (long long)g.n,
                        (long long)g.k, g.ta, g.tb);
          const double err = gemm_case_err(&g, dt, c2), tol = (d ? 1e-13 : 2e-6) * (double)g.k;
          ck_assert_msg(err <= tol, "%s %s %lldx%lldx%lld t%d%d: error %.3g vs reference",
                        GEMM_PATHS[p], d ? "f64" : "f32", (long long)g.m, (long long)g.n,
                        (long long)g.k, g.ta, g.tb, err);
        }
      }
      free(c1);
      free(c2);
      free(c3);
      gemm_case_free(&g);
    }
  ck_assert_int_ge(tried, 5 * N_GEMM_SHAPES * 4); /* blis, direct, sup*, packed at least */
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
  ad_set_threads(1);
}
END_TEST

/* The measured choice at 2 threads is named in the reason (path, threads
 * and split) and its results match the reference. */
START_TEST(test_gemm_split_measured) {
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
  ck_assert_int_eq(ad_set_threads(2), AD_OK);
  /* A large square first (the reason lists shapes in the order first
   * used, and is cut at its buffer's end): BLIS's own team is one more
   * candidate there. */
  gemm_case g0;
  gemm_case_init(&g0, 0, 0, 256, 256, 256, 5);
  float *c0 = malloc(sizeof(float) * 256 * 256);
  ck_assert_ptr_nonnull(c0);
  gemm_case_run(&g0, AD_F32, c0);
  gemm_case_run(&g0, AD_F32, c0);
  ck_assert(gemm_case_err(&g0, AD_F32, c0) <= 2e-6 * 256);
  free(c0);
  gemm_case_free(&g0);
  for (int s = 0; s < N_GEMM_SHAPES; s++)
    for (int d = 0; d < 2; d++) {
      gemm_case g;
      gemm_case_init(&g, s & 1, (s >> 1) & 1, GEMM_SHAPES[s][0], GEMM_SHAPES[s][1],
                     GEMM_SHAPES[s][2], (uint64_t)(100 + s));
      double *c = malloc(sizeof(double) * (size_t)(g.m * g.n));
      ck_assert_ptr_nonnull(c);
      const ad_dtype dt = d ? AD_F64 : AD_F32;
      gemm_case_run(&g, dt, c); /* measures */
      gemm_case_run(&g, dt, c); /* the kept choice */
      const double err = gemm_case_err(&g, dt, c), tol = (d ? 1e-13 : 2e-6) * (double)g.k;
      ck_assert_msg(err <= tol, "auto %s shape %d: error %.3g", d ? "f64" : "f32", s, err);
      free(c);
      gemm_case_free(&g);
    }
  const char *r = ad_blas_reason();
  const int named = strstr(r, " t2:") != NULL && strstr(r, "x2 split rows") != NULL &&
                    strstr(r, "x2 split cols") != NULL && strstr(r, "on 1 thread") != NULL &&
                    strstr(r, "packed:team x2") != NULL;
  if (!named) fprintf(stderr, "reason: %s\n", r);
  ck_assert_msg(named, "the reason does not name the 2-thread choices (printed above)");
  ad_set_threads(1);
}
END_TEST

/* A GEMM called from inside a pool part (nested: it runs serially on the
 * part's thread, as a one-thread product) gives the one-thread bits. */
typedef struct {
  const gemm_case *g;
  float *out[2];
} nested_gemm_ctx;

static void nested_gemm_part(void *vc, int part, int64_t lo, int64_t hi) {
  nested_gemm_ctx *c = vc;
  for (int64_t i = lo; i < hi; i++) gemm_case_run(c->g, AD_F32, c->out[i]);
  (void)part;
}

START_TEST(test_gemm_inside_par_for) {
  gemm_case g;
  gemm_case_init(&g, 0, 1, 129, 97, 40, 7);
  const size_t bytes = sizeof(float) * (size_t)(g.m * g.n);
  float *ref = malloc(bytes), *o0 = malloc(bytes), *o1 = malloc(bytes);
  ck_assert(ref && o0 && o1);
  const char *paths[] = {"packed", "wide:avx512", "auto"};
  for (int p = 0; p < 3; p++) {
    if (ad_blas_set_path(paths[p]) != AD_OK) continue;
    ck_assert_int_eq(ad_set_threads(1), AD_OK);
    gemm_case_run(&g, AD_F32, ref);
    ck_assert_int_eq(ad_set_threads(2), AD_OK);
    nested_gemm_ctx c = {&g, {o0, o1}};
    ck_assert_int_eq(ad__par_parts(2, 1), 2);
    ad__par_for(2, 1, nested_gemm_part, &c);
    for (int i = 0; i < 2; i++) {
      const float *o = c.out[i];
      ck_assert_msg(gemm_case_err(&g, AD_F32, o) <= 2e-6 * (double)g.k, "%s part %d", paths[p], i);
      if (p < 2) ck_assert_msg(memcmp(o, ref, bytes) == 0, "%s part %d: bits", paths[p], i);
    }
  }
  free(ref);
  free(o0);
  free(o1);
  gemm_case_free(&g);
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
  ad_set_threads(1);
}
END_TEST

/* Two user threads multiplying at once at 2 threads (one gets the pool,
 * the other runs its parts serially): every result has the bits of a
 * lone one-thread run. */
typedef struct {
  const gemm_case *g;
  const float *ref;
  int bad;
} gemm_thread_arg;

static void *gemm_thread(void *vp) {
  gemm_thread_arg *a = vp;
  const size_t bytes = sizeof(float) * (size_t)(a->g->m * a->g->n);
  float *o = malloc(bytes);
  if (!o) {
    a->bad = -1;
    return NULL;
  }
  for (int r = 0; r < 40; r++) {
    gemm_case_run(a->g, AD_F32, o);
    a->bad += memcmp(o, a->ref, bytes) != 0;
  }
  free(o);
  return NULL;
}

START_TEST(test_gemm_concurrent_callers) {
  ck_assert_int_eq(ad_blas_set_path("packed"), AD_OK);
  gemm_case g[2];
  float *ref[2];
  gemm_case_init(&g[0], 0, 0, 67, 131, 61, 11);
  gemm_case_init(&g[1], 1, 0, 201, 45, 33, 12);
  ck_assert_int_eq(ad_set_threads(1), AD_OK);
  for (int i = 0; i < 2; i++) {
    ref[i] = malloc(sizeof(float) * (size_t)(g[i].m * g[i].n));
    ck_assert_ptr_nonnull(ref[i]);
    gemm_case_run(&g[i], AD_F32, ref[i]);
    ck_assert(gemm_case_err(&g[i], AD_F32, ref[i]) <= 2e-6 * (double)g[i].k);
  }
  ck_assert_int_eq(ad_set_threads(2), AD_OK);
  gemm_thread_arg a[2] = {{&g[0], ref[0], 0}, {&g[1], ref[1], 0}};
  pthread_t tid[2];
  for (int i = 0; i < 2; i++)
    ck_assert_int_eq(pthread_create(&tid[i], NULL, gemm_thread, &a[i]), 0);
  for (int i = 0; i < 2; i++) pthread_join(tid[i], NULL);
  for (int i = 0; i < 2; i++) {
    ck_assert_msg(a[i].bad == 0, "thread %d: %d results differ", i, a[i].bad);
    free(ref[i]);
    gemm_case_free(&g[i]);
  }
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
  ad_set_threads(1);
}
END_TEST

#ifdef __linux__
#include <dirent.h>
/* Threads of this process now (/proc/self/task). */
static int count_threads(void) {
  DIR *d = opendir("/proc/self/task");
  if (!d) return -1;
  int n = 0;
  for (struct dirent *e; (e = readdir(d)) != NULL;) n += e->d_name[0] != '.';
  closedir(d);
  return n;
}

static void noop_part(void *vc, int part, int64_t lo, int64_t hi) {
  (void)vc, (void)part, (void)lo, (void)hi;
}

/* A split product starts no thread besides the pool's: BLIS runs at one
 * thread in every part, so its OpenMP team (whose idle threads would spin
 * on the cores the pool needs) never exists. */
START_TEST(test_gemm_split_starts_no_team) {
  ck_assert_int_eq(ad_set_threads(2), AD_OK);
  ad__par_for(2, 1, noop_part, NULL); /* the pool's worker exists now */
  const int base = count_threads();
  ck_assert_int_ge(base, 2);
  const char *paths[] = {"packed", "sup", "blis", "wide:avx512", "auto"};
  gemm_case g;
  gemm_case_init(&g, 0, 0, 129, 97, 40, 3);
  float *c = malloc(sizeof(float) * (size_t)(g.m * g.n));
  ck_assert_ptr_nonnull(c);
  for (int p = 0; p < 5; p++) {
    if (ad_blas_set_path(paths[p]) != AD_OK) continue;
    gemm_case_run(&g, AD_F32, c);
    ck_assert_msg(count_threads() == base, "%s: %d threads, %d before", paths[p], count_threads(),
                  base);
  }
  free(c);
  gemm_case_free(&g);
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
  ad_set_threads(1);
}
END_TEST
#endif

Suite *threads_suite(void) {
  Suite *s = suite_create("threads");
  TCase *tc = tcase_create("pool");
  tcase_add_test(tc, test_set_threads_values);
  tcase_add_test(tc, test_par_for_covers);
  tcase_add_test(tc, test_par_for_many_jobs);
  tcase_add_test(tc, test_par_for_uses_workers);
  tcase_add_test(tc, test_par_for_concurrent_callers);
  tcase_set_timeout(tc, 600);
  suite_add_tcase(s, tc);
  TCase *to = tcase_create("ops");
  tcase_add_test(to, test_elementwise_bit_identical);
  tcase_add_test(to, test_copies_closed_form);
  tcase_add_test(to, test_reductions_deterministic);
  tcase_add_test(to, test_sum_closed_form);
  tcase_add_test(to, test_step_gradients_across_threads);
  tcase_add_test(to, test_concurrent_callers_ops);
  tcase_set_timeout(to, 600);
  suite_add_tcase(s, to);
  TCase *tg = tcase_create("gemm");
#ifdef __linux__
  tcase_add_test(tg, test_gemm_split_starts_no_team);
#endif
  tcase_add_test(tg, test_gemm_split_bit_identical);
  tcase_add_test(tg, test_gemm_split_measured);
  tcase_add_test(tg, test_gemm_inside_par_for);
  tcase_add_test(tg, test_gemm_concurrent_callers);
  tcase_set_timeout(tg, 600);
  suite_add_tcase(s, tg);
  return s;
}

int main(void) {
  SRunner *sr = srunner_create(threads_suite());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
