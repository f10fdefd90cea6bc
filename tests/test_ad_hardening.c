/* test_ad_hardening.c — regression tests for the autodiff defects of issue 9:
 * bounds and sizes that overflowed, tensors from another tape or from a
 * rewound mark, an arena that would not grow after a rewind, silent zero
 * gradients, errors that outlived their cause, and NaN-guard messages
 * without context. Each test is one instance of a class fixed everywhere
 * in autodiff/. */
#define _POSIX_C_SOURCE 200809L /* open_memstream */
#include "autodiff/ad.h"
#include "gradcheck.h"
#include "nn/nn.h"

#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define S(...) ((const int64_t[]){__VA_ARGS__})

static ad_tape *new_tape(size_t mb, size_t max_mb) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = mb, .arena_max_mb = max_mb}), AD_OK);
  return t;
}

/* The tape's message contains `needle`. */
#define ck_msg_has(t, needle)                                                                      \
  ck_assert_msg(strstr(ad_tape_errmsg(t), (needle)) != NULL, "message '%s' lacks '%s'",            \
                ad_tape_errmsg(t), (needle))
#define ck_last_has(needle)                                                                        \
  ck_assert_msg(strstr(ad_last_error(), (needle)) != NULL, "message '%s' lacks '%s'",              \
                ad_last_error(), (needle))

/* All of x equals v. */
static int all_eq(const ad_tensor *x, double v) {
  for (int64_t i = 0; i < x->size; i++)
    if (ad_get(x, i) != v) return 0;
  return 1;
}

/* ------------------------------------------------------------------ 1. checked arithmetic */

/* ad_slice(x, axis 0, start INT64_MAX, len 1): start + len wraps negative and
 * used to pass the bound check, reading far outside x. Now AD_ERR_ARG naming
 * the op, and the live tensor next to x is untouched; so is every other way
 * of putting the range outside the axis. */
START_TEST(test_slice_bounds_overflow) {
  ad_tape *t = new_tape(1, 1);
  ad_tensor *x = ad_full(t, AD_F64, 1, S(4), 1.0);
  ad_tensor *nb = ad_full(t, AD_F64, 1, S(64), 7.0);
  const int64_t bad[][2] = {{INT64_MAX, 1}, {1, INT64_MAX}, {INT64_MAX, INT64_MAX}, {-1, 2}, {3, 2},
                            {0, 0},         {2, -1},        {INT64_MIN, 5}};
  for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
    ck_assert_ptr_null(ad_slice(t, x, 0, bad[k][0], bad[k][1]));
    ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
    ck_msg_has(t, "ad_slice");
    ad_tape_clear_error(t);
  }
  ck_assert_ptr_null(ad_slice(t, x, 0, INT64_MAX, 1));
  ck_msg_has(t, "start 9223372036854775807, length 1");
  ad_tape_clear_error(t);
  ck_assert(all_eq(nb, 7.0) && all_eq(x, 1.0));
  /* the last valid slice still works: [3, 4) */
  ad_tensor *s = ad_slice(t, x, 0, 3, 1);
  ck_assert_ptr_nonnull(s);
  ck_assert_int_eq(s->size, 1);
  ad_tape_free(t);
}
END_TEST

/* ad_pad_axis(x[4], axis 0, start INT64_MAX, full_len 5): start + 4 wraps and
 * the copy used to write outside the result, into a live neighbour. */
START_TEST(test_pad_bounds_overflow) {
  ad_tape *t = new_tape(1, 1);
  ad_tensor *x = ad_full(t, AD_F64, 1, S(4), 1.0);
  ad_tensor *nb = ad_full(t, AD_F64, 1, S(64), 7.0);
  ck_assert_ptr_null(ad_pad_axis(t, x, 0, INT64_MAX, 5));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ck_msg_has(t, "ad_pad_axis: 4 elements at 9223372036854775807 do not fit in 5");
  ad_tape_clear_error(t);
  ck_assert_ptr_null(ad_pad_axis(t, x, 0, 2, 5)); /* 2 + 4 > 5 */
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ad_tape_clear_error(t);
  ck_assert_ptr_null(ad_pad_axis(t, x, 0, -1, 5));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ad_tape_clear_error(t);
  /* a full length past 2^40 elements: a shape error, not a wrapped size */
  ck_assert_ptr_null(ad_pad_axis(t, x, 0, 0, INT64_MAX));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_msg_has(t, "ad_pad_axis");
  ad_tape_clear_error(t);
  ck_assert(all_eq(nb, 7.0) && all_eq(x, 1.0));
  /* in range: x lands at [1, 5) of 5 zeros */
  ad_tensor *p = ad_pad_axis(t, x, 0, 1, 5);
  ck_assert_ptr_nonnull(p);
  ck_assert_double_eq(ad_get(p, 0), 0.0);
  ck_assert_double_eq(ad_get(p, 4), 1.0);
  ad_tape_free(t);
}
END_TEST

/* Shape [2^32, 2^32] has 2^64 elements: the product wrapped to 0 and
 * ad_zeros returned a size-0 tensor that a later op wrote through. Now
 * AD_ERR_SHAPE naming the function and the shape, for arena and heap
 * constructors alike; also for a product that overflows int64 and one
 * that fits but passes the 2^40 limit. */
START_TEST(test_constructor_size_overflow) {
  ad_tape *t = new_tape(1, 1);
  const int64_t big[2] = {(int64_t)1 << 32, (int64_t)1 << 32};
  ck_assert_ptr_null(ad_zeros(t, AD_F64, 2, big));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_msg_has(t, "ad_zeros: shape [4294967296, 4294967296] has more than 2^40 elements");
  ad_tape_clear_error(t);
  ad_tensor *h = (ad_tensor *)1;
  ck_assert_int_eq(ad_tensor_new(&h, AD_F32, 2, big), AD_ERR_SHAPE);
  ck_assert_ptr_null(h);
  ck_last_has("ad_tensor_new: shape [4294967296, 4294967296]");
  const int64_t wrap3[3] = {(int64_t)1 << 21, (int64_t)1 << 21, (int64_t)1 << 21}; /* 2^63 */
  ck_assert_int_eq(ad_tensor_new(&h, AD_F64, 3, wrap3), AD_ERR_SHAPE);
  const int64_t over[3] = {(int64_t)1 << 20, (int64_t)1 << 20, 2}; /* 2^41: fits int64 */
  ck_assert_int_eq(ad_tensor_from(&h, AD_F64, 3, over, (double[]){0}), AD_ERR_SHAPE);
  ck_assert_int_eq(ad_tensor_wrap(&h, AD_F64, 3, over, (double[]){0}), AD_ERR_SHAPE);
  const char *names[] = {"ad_empty", "ad_full", "ad_ones", "ad_const", "ad_randn"};
  ad_rng r;
  ad_rng_seed(&r, 1);
  for (int k = 0; k < 5; k++) {
    ad_tensor *y = k == 0   ? ad_empty(t, AD_F32, 3, over)
                   : k == 1 ? ad_full(t, AD_F32, 3, over, 1.0)
                   : k == 2 ? ad_ones(t, AD_F32, 3, over)
                   : k == 3 ? ad_const(t, AD_F32, 3, over, (float[]){0})
                            : ad_randn(t, AD_F32, 3, over, &r);
    ck_assert_ptr_null(y);
    ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
    ck_msg_has(t, names[k]);
    ad_tape_clear_error(t);
  }
  /* a bad dtype is a dtype error, with its own status */
  ck_assert_int_eq(ad_tensor_new(&h, (ad_dtype)9, 1, S(3)), AD_ERR_DTYPE);
  ad_arena_stats s;
  ad_arena_stats_get(t, &s);
  ck_assert_uint_eq(s.used, 0); /* nothing was allocated by the failures */
  ad_tape_free(t);
}
END_TEST

/* Derived shapes: reshape to [2^62 + 1, 4] has (2^62 + 1) * 4 = 2^64 + 4
 * elements, which wrapped to x's 4 and was accepted; broadcasting, padding,
 * concatenating and multiplying past 2^40 elements. The oversized inputs
 * are wrapped shapes over a small buffer: every check fails before any
 * element is touched. */
START_TEST(test_derived_shape_overflow) {
  ad_tape *t = new_tape(1, 1);
  ad_tensor *x = ad_full(t, AD_F64, 1, S(4), 1.0);
  ck_assert_ptr_null(ad_reshape(t, x, 2, S(((int64_t)1 << 62) + 1, 4)));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_msg_has(t, "ad_reshape");
  ad_tape_clear_error(t);
  ck_assert_ptr_null(ad_broadcast_axis(t, x, 0, INT64_MAX / 2, 0));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_msg_has(t, "ad_broadcast_axis");
  ad_tape_clear_error(t);
  double buf[8] = {0};
  ad_tensor *big = NULL, *col = NULL, *row = NULL;
  ck_assert_int_eq(ad_tensor_wrap(&big, AD_F64, 1, S((int64_t)1 << 40), buf), AD_OK);
  ck_assert_int_eq(ad_tensor_wrap(&col, AD_F64, 2, S((int64_t)1 << 20, 1), buf), AD_OK);
  ck_assert_int_eq(ad_tensor_wrap(&row, AD_F64, 2, S(1, (int64_t)1 << 21), buf), AD_OK);
  ad_tensor *two[2] = {big, big};
  ck_assert_ptr_null(ad_concat(t, 2, two, 0));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_msg_has(t, "ad_concat");
  ad_tape_clear_error(t);
  ck_assert_ptr_null(ad_matmul(t, col, row, 0, 0)); /* [2^20, 2^21] */
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_msg_has(t, "ad_matmul");
  ad_tape_clear_error(t);
  ad_tensor_free(big);
  ad_tensor_free(col);
  ad_tensor_free(row);
  ad_tape_free(t);
}
END_TEST

/* Raw arena requests near SIZE_MAX: rounding up or adding the offset used
 * to wrap to a small number and "succeed". A forged marker whose offset lies
 * past its chunk is ignored (it used to poison/unpoison a wrapped length).
 * MiB options that would wrap when turned into bytes are refused. */
START_TEST(test_arena_request_overflow) {
  ad_tape *t = new_tape(1, 1);
  ck_assert_ptr_nonnull(ad_arena_alloc(t, 100)); /* off > 0 */
  size_t sizes[] = {SIZE_MAX, SIZE_MAX - 10, SIZE_MAX - 100, SIZE_MAX / 2 + 1};
  for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
    ck_assert_ptr_null(ad_arena_alloc(t, sizes[k]));
    ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARENA);
    ad_tape_clear_error(t);
  }
  ad_arena_stats s;
  ad_arena_stats_get(t, &s);
  ck_assert_uint_eq(s.used, 128);
  ad_marker m = ad_mark(t);
  m.offset = SIZE_MAX - 5;
  ad_rewind(t, m);
  ad_arena_stats_get(t, &s);
  ck_assert_uint_eq(s.used, 128);
  ck_assert_ptr_nonnull(ad_arena_alloc(t, 64));
  ad_tape_free(t);
  ad_tape *u = NULL;
  ck_assert_int_eq(ad_tape_new(&u, &(ad_tape_opts){.arena_mb = 1, .arena_max_mb = SIZE_MAX}),
                   AD_ERR_ARG);
  ck_assert_ptr_null(u);
  ck_last_has("arena_max_mb");
}
END_TEST

/* ------------------------------------------------------------------ 2. tensors of another tape */

/* The two tape numbers in a "belongs to tape #A, but this call is on tape #B" message. */
static void two_tapes(const char *msg, size_t *a, size_t *b) {
  const char *p = strstr(msg, "belongs to tape #");
  ck_assert_msg(p != NULL, "message '%s' does not name the tapes", msg);
  ck_assert_int_eq(sscanf(p, "belongs to tape #%zu, but this call is on tape #%zu", a, b), 2);
}

/* x = 0.1 a heap leaf; y = x*x on tape a; f = sum(y*x) on tape b. The true
 * df/dx is 3x^2 = 0.03; tape b only saw f = y*x with y a constant and
 * returned 0.01 with AD_OK. Now the op on b refuses a's tensor with
 * AD_ERR_ARG naming the op and both tapes; every transform does the same
 * for outputs, seeds, vectors and tangents of another tape; and the heap
 * leaf x works on both tapes (0.03 when the whole of f is on one). */
START_TEST(test_foreign_tape) {
  ad_tape *a = new_tape(1, 1), *b = new_tape(1, 1);
  ad_tensor *x = NULL;
  ck_assert_int_eq(ad_tensor_from(&x, AD_F64, 0, NULL, (double[]){0.1}), AD_OK);
  ad_requires_grad(x, 1);
  ad_tensor *y = ad_mul(a, x, x);
  ck_assert_ptr_nonnull(y);
  ck_assert_ptr_null(ad_mul(b, y, x));
  ck_assert_int_eq(ad_tape_status(b), AD_ERR_ARG);
  ck_msg_has(b, "ad_mul: input 0");
  size_t ta, tb;
  two_tapes(ad_tape_errmsg(b), &ta, &tb);
  ck_assert_uint_ne(ta, tb);
  ck_assert_int_eq(ad_tape_status(a), AD_OK); /* the tape that owns y is fine */
  ad_tape_clear_error(b);

  /* transforms: a's output, seed, vectors on tape b */
  ad_tensor *fa = ad_sum(a, ad_mul(a, y, x)), *g = NULL;
  ck_assert_int_eq(ad_grad(b, 1, &fa, NULL, 1, &x, &g, 0), AD_ERR_ARG);
  ck_msg_has(b, "ad_grad: output 0");
  ad_tape_clear_error(b);
  ck_assert_int_eq(ad_backward(b, fa, NULL), AD_ERR_ARG);
  ck_msg_has(b, "ad_backward: loss 0");
  ad_tape_clear_error(b);
  ck_assert_int_eq(ad_hvp(b, fa, 1, &x, &y, &g, 0), AD_ERR_ARG);
  ck_msg_has(b, "ad_hvp");
  ad_tape_clear_error(b);
  ad_tensor *fb = ad_sum(b, ad_mul(b, ad_mul(b, x, x), x)), *one = ad_scalar(a, AD_F64, 1.0);
  ck_assert_int_eq(ad_grad(b, 1, &fb, &one, 1, &x, &g, 0), AD_ERR_ARG);
  ck_msg_has(b, "ad_grad: seed 0");
  ad_tape_clear_error(b);
  ck_assert_int_eq(ad_hvp(b, fb, 1, &x, &one, &g, 0), AD_ERR_ARG);
  ck_msg_has(b, "ad_hvp: v 0");
  ad_tape_clear_error(b);
  ck_assert_int_eq(ad_jvp(b, 1, &x, &one, 1, &fb, &g, 0), AD_ERR_ARG);
  ck_msg_has(b, "ad_jvp: tangent 0");
  ad_tape_clear_error(b);
  ck_assert_ptr_null(ad_detach(b, y));
  ck_msg_has(b, "ad_detach");
  ad_tape_clear_error(b);
  ck_assert_ptr_null(ad_where(b, y, x, x));
  ck_msg_has(b, "ad_where: mask 0");
  ad_tape_clear_error(b);

  /* heap tensors on any tape: d/dx x^3 = 3 x^2 = 0.03 on b, and on a */
  ck_assert_int_eq(ad_grad(b, 1, &fb, NULL, 1, &x, &g, 0), AD_OK);
  ck_assert_double_eq_tol(ad_item(g), 0.03, 1e-17);
  ck_assert_int_eq(ad_grad(a, 1, &fa, NULL, 1, &x, &g, 0), AD_OK);
  ck_assert_double_eq_tol(ad_item(g), 0.03, 1e-17);
  ad_tensor_free(x);
  ad_tape_free(a);
  ad_tape_free(b);
}
END_TEST

/* A tensor made after a mark is freed by rewinding to it. Using it used to
 * read whatever reused the memory; now AD_ERR_ARG, both while the memory is
 * free (no byte of it is read: this runs clean under ASan, which poisons
 * it) and after it was handed out again as raw scratch. Tensors made
 * before the mark stay usable, with correct values. */
START_TEST(test_use_after_rewind) {
  ad_tape *t = new_tape(1, 1);
  ad_tensor *x = ad_full(t, AD_F64, 1, S(3), 2.0);
  ad_requires_grad(x, 1);
  ad_marker m = ad_mark(t);
  ad_tensor *y = ad_exp(t, x), *old = y;
  ck_assert_ptr_nonnull(y);
  ad_rewind(t, m);
  ck_assert_ptr_null(ad_add(t, y, x));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ck_msg_has(t, "ad_add: input 0 was freed by ad_rewind");
  ad_tape_clear_error(t);
  ad_tensor *g = NULL;
  ck_assert_int_eq(ad_grad(t, 1, &y, NULL, 1, &x, &g, 0), AD_ERR_ARG);
  ck_msg_has(t, "ad_grad: output 0 was freed");
  ad_tape_clear_error(t);
  /* the memory handed out again as raw bytes: y now points into them */
  unsigned char *raw = ad_arena_alloc(t, 4096);
  ck_assert_ptr_nonnull(raw);
  memset(raw, 0xab, 4096);
  ck_assert_ptr_null(ad_sum(t, old));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ck_msg_has(t, "not at a live tensor");
  ad_tape_clear_error(t);
  /* x, made before the mark, is fine: d/dx sum(x^2) = 2x = 4 */
  ad_tensor *f = ad_sum(t, ad_mul(t, x, x));
  ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 1, &x, &g, 0), AD_OK);
  ck_assert_double_eq(ad_get(g, 2), 4.0);
  ad_tape_free(t);
}
END_TEST

/* ------------------------------------------------------------------ 3. arena growth */

/* arena_mb = 1, arena_max_mb = 64: mark, 512 KiB and 800 KiB (the second
 * reserves a 1 MiB chunk), rewind, then 512 KiB and 2 MiB. The kept 1 MiB
 * chunk was too small for 2 MiB and the arena refused to grow ("arena
 * exhausted") although a fresh tape does the same sequence. Now it grows,
 * every byte handed out is writable, and repeating the cycle reserves
 * nothing more. */
START_TEST(test_grow_after_rewind) {
  const size_t K = 1024;
  for (int fresh = 0; fresh < 2; fresh++) {
    ad_tape *t = new_tape(1, 64);
    ad_marker m = ad_mark(t);
    if (!fresh) {
      ck_assert_ptr_nonnull(ad_arena_alloc(t, 512 * K));
      ck_assert_ptr_nonnull(ad_arena_alloc(t, 800 * K));
      ad_rewind(t, m);
    }
    ad_arena_stats s1, s2;
    for (int rep = 0; rep < 5; rep++) {
      unsigned char *a = ad_arena_alloc(t, 512 * K), *b = ad_arena_alloc(t, 2048 * K);
      ck_assert_msg(a && b, "fresh=%d rep=%d: %s", fresh, rep, ad_tape_errmsg(t));
      memset(a, 1, 512 * K);
      memset(b, 2, 2048 * K);
      ck_assert_int_eq(a[512 * K - 1] + b[0], 3);
      if (rep == 0) ad_arena_stats_get(t, &s1);
      ad_rewind(t, m);
    }
    ad_arena_stats_get(t, &s2);
    ck_assert_int_eq(ad_tape_status(t), AD_OK);
    ck_assert_uint_eq(s2.n_grows, s1.n_grows); /* only the first cycle reserved */
    ck_assert_uint_eq(s2.capacity, s1.capacity);
    ck_assert_uint_le(s2.capacity, (size_t)64 << 20);
    ck_assert_uint_eq(s2.used, 0);
    ad_tape_free(t);
  }
}
END_TEST

/* The default tape (opts NULL) starts at 64 MiB and grows up to 4 GiB: a
 * 100 MiB request succeeds (it stopped at 64 MiB before), one past the cap
 * fails with AD_ERR_ARENA naming the cap; arena_max_mb = arena_mb still
 * gives a fixed arena. */
START_TEST(test_default_tape_grows) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  ad_arena_stats s;
  ad_arena_stats_get(t, &s);
  ck_assert_uint_eq(s.capacity, (size_t)AD_ARENA_DEFAULT_MB << 20);
  ck_assert_uint_eq(AD_ARENA_DEFAULT_MB, 64);
  ck_assert_uint_ge(AD_ARENA_DEFAULT_MAX_MB, 1024);
  ck_assert_ptr_nonnull(ad_arena_alloc(t, (size_t)100 << 20));
  ad_arena_stats_get(t, &s);
  ck_assert_uint_gt(s.capacity, (size_t)100 << 20);
  ck_assert_ptr_null(ad_arena_alloc(t, (size_t)AD_ARENA_DEFAULT_MAX_MB << 20));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARENA);
  ck_msg_has(t, "cap 4096 MiB");
  ad_tape_free(t);
  t = new_tape(2, 2);
  ck_assert_ptr_null(ad_arena_alloc(t, (size_t)3 << 20));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARENA);
  ad_arena_stats_get(t, &s);
  ck_assert_uint_eq(s.n_chunks, 1);
  ad_tape_free(t);
}
END_TEST

/* ------------------------------------------------------------------ 6. silent zeros */

/* f = sum(x^3) at x = 0.5 computed with recording off: ad_grad returned
 * AD_OK and 0 (the answer is 3x^2 = 0.75). Now AD_ERR_GRAD saying the
 * output was not recorded, from ad_grad, ad_backward, ad_hvp and ad_jvp.
 * The same for differentiating a gradient taken without AD_GRAD_RECORD
 * (6x = 3 with it). A genuine constant is still a zero: the gradient of a
 * linear f is constant, so its derivative and the HVP of f are 0, AD_OK. */
START_TEST(test_unrecorded_output) {
  ad_tape *t = new_tape(1, 1);
  ad_tensor *x = ad_full(t, AD_F64, 1, S(1), 0.5), *g = NULL, *h = NULL;
  ad_requires_grad(x, 1);
  int prev = ad_set_recording(t, 0);
  ad_tensor *f = ad_sum(t, ad_pow_scalar(t, x, 3));
  ad_set_recording(t, prev);
  ck_assert_double_eq(ad_item(f), 0.125);
  ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 1, &x, &g, 0), AD_ERR_GRAD);
  ck_msg_has(t, "ad_grad: output 0 ([] f64) was not recorded");
  ck_assert_ptr_null(g);
  ad_tape_clear_error(t);
  ck_assert_int_eq(ad_backward(t, f, NULL), AD_ERR_GRAD);
  ck_msg_has(t, "ad_backward: loss ([] f64) was not recorded");
  ad_tape_clear_error(t);
  ck_assert_int_eq(ad_hvp(t, f, 1, &x, &x, &h, 0), AD_ERR_GRAD);
  ck_msg_has(t, "not recorded");
  ad_tape_clear_error(t);
  ck_assert_int_eq(ad_jvp(t, 1, &x, &x, 1, &f, &h, 0), AD_ERR_GRAD);
  ck_msg_has(t, "not recorded");
  ad_tape_clear_error(t);

  /* recorded: 3x^2; its gradient without AD_GRAD_RECORD is not differentiable */
  f = ad_sum(t, ad_pow_scalar(t, x, 3));
  ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 1, &x, &g, 0), AD_OK);
  ck_assert_double_eq_tol(ad_item(g), 0.75, 1e-15);
  ad_tensor *sg = ad_sum(t, g);
  ck_assert_int_eq(ad_grad(t, 1, &sg, NULL, 1, &x, &h, 0), AD_ERR_GRAD);
  ck_msg_has(t, "AD_GRAD_RECORD");
  ad_tape_clear_error(t);
  ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 1, &x, &g, AD_GRAD_RECORD), AD_OK);
  sg = ad_sum(t, g);
  ck_assert_int_eq(ad_grad(t, 1, &sg, NULL, 1, &x, &h, 0), AD_OK);
  ck_assert_double_eq_tol(ad_item(h), 3.0, 1e-15);

  /* linear f = sum(2x): grad 2 is a true constant; its derivative is 0 */
  ad_tensor *lin = ad_sum(t, ad_scale(t, x, 2.0));
  ck_assert_int_eq(ad_grad(t, 1, &lin, NULL, 1, &x, &g, AD_GRAD_RECORD), AD_OK);
  ck_assert_double_eq(ad_item(g), 2.0);
  sg = ad_sum(t, g);
  ck_assert_int_eq(ad_grad(t, 1, &sg, NULL, 1, &x, &h, 0), AD_OK);
  ck_assert_double_eq(ad_item(h), 0.0);
  ad_tensor *v = ad_full(t, AD_F64, 1, S(1), 1.5);
  ck_assert_int_eq(ad_hvp(t, lin, 1, &x, &v, &h, 0), AD_OK);
  ck_assert_double_eq(ad_item(h), 0.0);
  ad_tape_free(t);
}
END_TEST

/* An input that is an op's result computed with recording off: the message
 * says it was not recorded and does not send the user to ad_requires_grad
 * (which would only turn it into a disconnected leaf); a plain constant
 * still gets that advice. */
START_TEST(test_unrecorded_input) {
  ad_tape *t = new_tape(1, 1);
  ad_tensor *x = ad_full(t, AD_F64, 1, S(3), 0.5), *g = NULL;
  ad_requires_grad(x, 1);
  int prev = ad_set_recording(t, 0);
  ad_tensor *h = ad_exp(t, x);
  ad_set_recording(t, prev);
  ad_tensor *f = ad_sum(t, ad_mul(t, ad_mul(t, h, h), x));
  ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 1, &h, &g, 0), AD_ERR_GRAD);
  ck_msg_has(t, "ad_grad: input 0 ([3] f64) was made by an op that was not recorded");
  ck_assert_msg(strstr(ad_tape_errmsg(t), "ad_requires_grad") == NULL, "'%s'", ad_tape_errmsg(t));
  ad_tape_clear_error(t);
  ad_tensor *c = ad_full(t, AD_F64, 1, S(3), 1.0);
  ad_tensor *f2 = ad_sum(t, ad_mul(t, c, x));
  ck_assert_int_eq(ad_grad(t, 1, &f2, NULL, 1, &c, &g, 0), AD_ERR_GRAD);
  ck_msg_has(t, "ad_requires_grad");
  ad_tape_clear_error(t);
  /* d/dx of sum(h^2 x) with h a constant: h^2 = e^1 */
  ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 1, &x, &g, 0), AD_OK);
  ck_assert_double_eq_tol(ad_get(g, 1), exp(1.0), 1e-15);
  ad_tape_free(t);
}
END_TEST

/* ad_backward of a [3] loss without a seed used a ones seed and ad_hvp of a
 * non-scalar f summed it; ad_mse and ad_dot of [3, 4] against [4, 3]
 * silently reshaped, as did ad_hvp's vector. All AD_ERR_SHAPE now; with a
 * seed, ad_backward of y = x^2 gives 2 x seed = (1, 4, 9)... for x = (0.5,
 * 1, 1.5), seed (1, 2, 3). Same shapes: mse of a - b = 0.5 everywhere is
 * 0.25, dot of ones is 12. */
START_TEST(test_no_silent_reshape) {
  ad_tape *t = new_tape(1, 1);
  ad_tensor *x = NULL;
  ck_assert_int_eq(ad_tensor_from(&x, AD_F64, 1, S(3), (double[]){0.5, 1, 1.5}), AD_OK);
  ad_requires_grad(x, 1);
  ad_tensor *y = ad_mul(t, x, x), *hv = NULL;
  ck_assert_int_eq(ad_backward(t, y, NULL), AD_ERR_SHAPE);
  ck_msg_has(t, "ad_backward: loss is [3] f64, not a scalar");
  ck_assert_ptr_null(x->grad);
  ad_tape_clear_error(t);
  ck_assert_int_eq(ad_hvp(t, y, 1, &x, &x, &hv, 0), AD_ERR_SHAPE);
  ck_msg_has(t, "ad_hvp: f must be a scalar, got [3] f64");
  ad_tape_clear_error(t);
  ad_tensor *seed = ad_const(t, AD_F64, 1, S(3), (double[]){1, 2, 3});
  ck_assert_int_eq(ad_backward(t, y, seed), AD_OK);
  ck_assert_double_eq(ad_get(x->grad, 0), 1.0);
  ck_assert_double_eq(ad_get(x->grad, 1), 4.0);
  ck_assert_double_eq(ad_get(x->grad, 2), 9.0);

  ad_tensor *a = ad_full(t, AD_F64, 2, S(3, 4), 1.5), *b = ad_full(t, AD_F64, 2, S(4, 3), 1.0);
  ck_assert_ptr_null(ad_mse(t, a, b));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_msg_has(t, "ad_mse: shapes [3, 4] f64 and [4, 3] f64 differ");
  ad_tape_clear_error(t);
  ck_assert_ptr_null(ad_dot(t, a, b));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_msg_has(t, "ad_dot: shapes [3, 4] f64 and [4, 3] f64 differ");
  ad_tape_clear_error(t);
  ad_tensor *b2 = ad_full(t, AD_F64, 2, S(3, 4), 1.0);
  ck_assert_double_eq(ad_item(ad_mse(t, a, b2)), 0.25);
  ck_assert_double_eq(ad_item(ad_dot(t, b2, b2)), 12.0);

  ad_tensor *w = ad_full(t, AD_F64, 2, S(3, 4), 0.5);
  ad_requires_grad(w, 1);
  ad_tensor *f = ad_sum(t, ad_mul(t, ad_mul(t, w, w), w));
  ck_assert_int_eq(ad_hvp(t, f, 1, &w, &b, &hv, 0), AD_ERR_SHAPE);
  ck_msg_has(t, "ad_hvp: vector 0 is [4, 3] f64 but its partner is [3, 4] f64");
  ad_tape_clear_error(t);
  ck_assert_int_eq(ad_hvp(t, f, 1, &w, &b2, &hv, 0), AD_OK); /* H v = 6 w v = 3 */
  ck_assert_double_eq_tol(ad_get(hv, 7), 3.0, 1e-15);
  ad_tensor_free(x);
  ad_tape_free(t);
}
END_TEST

/* ------------------------------------------------------------------ 7. when errors clear */

/* An arena error inside a step, then ad_rewind to the step's mark: the
 * status stayed set and every later call failed with it. Now the rewind to
 * a mark taken before the error clears it (the message stays readable), and
 * the next step computes d/dx sum(x^2) = 2x = 3 at x = 1.5; rewinding to a
 * mark taken after the error does not clear it; ad_tape_reset does. */
START_TEST(test_error_clears_on_rewind) {
  ad_tape *t = new_tape(1, 1);
  ad_tensor *x = ad_full(t, AD_F64, 1, S(4), 1.5), *g = NULL;
  ad_requires_grad(x, 1);
  ad_marker m = ad_mark(t);
  ck_assert_ptr_null(ad_zeros(t, AD_F64, 2, S(512, 512))); /* 2 MiB */
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARENA);
  ad_tensor *f = ad_sum(t, ad_mul(t, x, x));
  ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 1, &x, &g, 0), AD_ERR_ARENA); /* in force */
  ad_marker after = ad_mark(t);
  ad_rewind(t, after);
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARENA); /* a later mark: still in force */
  ad_rewind(t, m);
  ck_assert_int_eq(ad_tape_status(t), AD_OK);
  ck_msg_has(t, "arena exhausted"); /* why the step failed is still readable */
  f = ad_sum(t, ad_mul(t, x, x));
  ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 1, &x, &g, 0), AD_OK);
  ck_assert_double_eq(ad_get(g, 3), 3.0);
  /* a new error replaces the retired message */
  ck_assert_ptr_null(ad_exp(t, NULL));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_NULL);
  ck_msg_has(t, "ad_exp: input 0 is NULL");
  ad_tape_reset(t); /* a rewind to the very start */
  ck_assert_int_eq(ad_tape_status(t), AD_OK);
  ad_tape_clear_error(t);
  ck_assert_str_eq(ad_tape_errmsg(t), "");
  ad_tape_free(t);
}
END_TEST

/* ad_last_error() is the last failing tapeless call's message and "" after
 * a tapeless call that succeeds (it used to keep the old message, and to
 * pick up errors raised on tapes). */
START_TEST(test_last_error_clears) {
  ad_tensor *h = NULL, *h2 = NULL;
  ck_assert_int_eq(ad_tensor_new(&h, AD_F64, 1, S(-1)), AD_ERR_SHAPE);
  ck_last_has("ad_tensor_new");
  ck_assert_int_eq(ad_tensor_new(&h, AD_F64, 1, S(2)), AD_OK);
  ck_assert_str_eq(ad_last_error(), "");
  ck_assert_int_eq(ad_tensor_new(&h2, AD_F64, 1, S(3)), AD_OK);
  ck_assert_int_eq(ad_copy_values(h, h2), AD_ERR_SHAPE);
  ck_last_has("ad_copy_values");
  ck_assert_int_eq(ad_copy_values(h2, h2), AD_OK);
  ck_assert_str_eq(ad_last_error(), "");
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 4, .arena_max_mb = 2}), AD_ERR_ARG);
  ck_last_has("ad_tape_new");
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 1}), AD_OK);
  ck_assert_str_eq(ad_last_error(), "");
  ck_assert_ptr_null(ad_add(t, h, h2)); /* on a tape: reported there only */
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_SHAPE);
  ck_assert_str_eq(ad_last_error(), "");
  ck_assert_ptr_null(ad_add(NULL, h, h2));
  ck_last_has("ad_add: tape is NULL");
  FILE *devnull = fopen("/dev/null", "w");
  ck_assert_ptr_nonnull(devnull);
  ck_assert_int_eq(ad_tape_print(t, devnull), AD_OK);
  ck_assert_str_eq(ad_last_error(), "");
  fclose(devnull);
  ad_tensor_free(h);
  ad_tensor_free(h2);
  ad_tape_free(t);
}
END_TEST

/* ------------------------------------------------------------------ 8. NaN guard context */

/* d/dx sum(sqrt(x*x)) at x = (1, 0, 2, -1): sqrt's rule divides by
 * sqrt(0) = 0. The message was "div produced Inf at element 1 of [4] f64";
 * now it names the public op, the input shapes, and which node's rule it
 * was. Recorded (AD_GRAD_RECORD), the failed div node is taken off the
 * tape: the node count is what it was before the call. */
START_TEST(test_nan_guard_in_rule) {
  ad_tape *t = new_tape(1, 1);
  ad_set_nan_guard(t, 1);
  ad_tensor *x = ad_const(t, AD_F64, 1, S(4), (double[]){1, 0, 2, -1}), *g = NULL;
  ad_requires_grad(x, 1);
  ad_tensor *f = ad_sum(t, ad_sqrt(t, ad_mul(t, x, x))); /* nodes 0 mul, 1 sqrt, 2 sum */
  ck_assert_double_eq(ad_item(f), 4.0);
  ad_arena_stats s0, s1;
  ad_arena_stats_get(t, &s0);
  ck_assert_uint_eq(s0.n_nodes, 3);
  ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 1, &x, &g, AD_GRAD_RECORD), AD_ERR_NUMERIC);
  ck_msg_has(t, "ad_div produced Inf at element 1 of [4] f64 from inputs [4] f64, [4] f64");
  ck_msg_has(t, "in the derivative of sqrt (node 1)");
  ad_arena_stats_get(t, &s1);
  ck_assert_uint_eq(s1.n_nodes, s0.n_nodes);
  char *buf = NULL;
  size_t len = 0;
  FILE *mem = open_memstream(&buf, &len);
  ck_assert_int_eq(ad_tape_print(t, mem), AD_OK);
  fclose(mem);
  ck_assert_msg(strstr(buf, "div(") == NULL, "the failed node is still on the tape:\n%s", buf);
  free(buf);
  ad_tape_free(t);
}
END_TEST

/* A forward op: log(-1) names ad_log, its input shape and its tape node,
 * which is removed; ad_relu(NaN) is NaN (it was 0, hiding the NaN) and its
 * gradient there is NaN too, while relu'(1) = 1 and relu'(-1) = 0. */
START_TEST(test_nan_guard_forward_and_relu) {
  ad_tape *t = new_tape(1, 1);
  ad_set_nan_guard(t, 1);
  ad_tensor *x = ad_const(t, AD_F64, 1, S(3), (double[]){1, -1, 2});
  ad_requires_grad(x, 1);
  ad_tensor *e = ad_exp(t, x);                                                   /* node 0 */
  ck_assert_ptr_null(ad_log(t, ad_sub(t, e, ad_full(t, AD_F64, 1, S(3), 1.0)))); /* 1 sub */
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_NUMERIC);
  ck_msg_has(t, "ad_log produced NaN at element 1 of [3] f64 from inputs [3] f64 (tape node 2");
  ad_arena_stats st;
  ad_arena_stats_get(t, &st);
  ck_assert_uint_eq(st.n_nodes, 2);
  ad_tape_clear_error(t);

  ad_tensor *nan = ad_const(t, AD_F64, 1, S(3), (double[]){NAN, 1, -1}), *g = NULL;
  ad_requires_grad(nan, 1);
  ck_assert_ptr_null(ad_relu(t, nan));
  ck_msg_has(t, "ad_relu produced NaN at element 0");
  ad_tape_clear_error(t);
  ad_set_nan_guard(t, 0);
  ad_tensor *r = ad_relu(t, nan);
  ck_assert(isnan(ad_get(r, 0)));
  ck_assert_double_eq(ad_get(r, 1), 1.0);
  ck_assert_double_eq(ad_get(r, 2), 0.0);
  ad_tensor *f = ad_sum(t, r);
  ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 1, &nan, &g, 0), AD_OK);
  ck_assert(isnan(ad_get(g, 0)));
  ck_assert_double_eq(ad_get(g, 1), 1.0);
  ck_assert_double_eq(ad_get(g, 2), 0.0);
  ad_tape_free(t);
}
END_TEST

/* nn_layer_norm over a row holding Inf: the guard trips in an internal
 * reduction, and the message begins with the layer the user called. */
START_TEST(test_nan_guard_names_layer) {
  ad_tape *t = new_tape(1, 1);
  ad_set_nan_guard(t, 1);
  ad_tensor *x = ad_const(t, AD_F64, 2, S(2, 3), (double[]){1, INFINITY, 2, 0, 1, 2});
  ck_assert_ptr_null(nn_layer_norm(t, x, NULL, NULL, 1e-5));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_NUMERIC);
  ck_assert_msg(strncmp(ad_tape_errmsg(t), "nn_layer_norm: ", 15) == 0, "'%s'", ad_tape_errmsg(t));
  ad_tape_clear_error(t);
  /* afterwards no scope is left over: a plain op's error is its own */
  ck_assert_ptr_null(ad_exp(t, NULL));
  ck_assert_str_eq(ad_tape_errmsg(t), "ad_exp: input 0 is NULL");
  ad_tape_free(t);
}
END_TEST

int main(void) {
  Suite *s = suite_create("ad_hardening");
  TCase *tc = tcase_create("overflow");
  tcase_add_test(tc, test_slice_bounds_overflow);
  tcase_add_test(tc, test_pad_bounds_overflow);
  tcase_add_test(tc, test_constructor_size_overflow);
  tcase_add_test(tc, test_derived_shape_overflow);
  tcase_add_test(tc, test_arena_request_overflow);
  suite_add_tcase(s, tc);
  tc = tcase_create("tapes");
  tcase_add_test(tc, test_foreign_tape);
  tcase_add_test(tc, test_use_after_rewind);
  suite_add_tcase(s, tc);
  tc = tcase_create("arena");
  tcase_add_test(tc, test_grow_after_rewind);
  tcase_add_test(tc, test_default_tape_grows);
  suite_add_tcase(s, tc);
  tc = tcase_create("silent");
  tcase_add_test(tc, test_unrecorded_output);
  tcase_add_test(tc, test_unrecorded_input);
  tcase_add_test(tc, test_no_silent_reshape);
  suite_add_tcase(s, tc);
  tc = tcase_create("errors");
  tcase_add_test(tc, test_error_clears_on_rewind);
  tcase_add_test(tc, test_last_error_clears);
  suite_add_tcase(s, tc);
  tc = tcase_create("nan_guard");
  tcase_add_test(tc, test_nan_guard_in_rule);
  tcase_add_test(tc, test_nan_guard_forward_and_relu);
  tcase_add_test(tc, test_nan_guard_names_layer);
  suite_add_tcase(s, tc);
  return gc_run_suite(s);
}
