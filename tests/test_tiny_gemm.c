/* test_tiny_gemm.c — ad_bmm's tiny-product loops (autodiff/ops_bmm.c), each
 * build forced in turn (baseline, AVX2+FMA, AVX-512, as far as this CPU
 * and HYPERTAPE_BLIS_ARCH allow), over a sweep of small shapes: m, n, k in
 * 1..48 with odd sizes and the vector widths' neighbours, every transpose
 * pair, batch 1..7, batched and shared operands, f32 and f64.
 *
 * ad_bmm picks between the AVX2 and AVX-512 builds by timing, once per
 * shape class and process, so the two must give the same bits or a re-run
 * of the same seed could differ in its last bits: the x86 builds are
 * compared bit for bit (outputs, and gradients through ad_bmm's own VJP),
 * the automatic choice against them too. The baseline build (taken only
 * where there is no AVX2: no FMA, so its roundings differ) and every build
 * are checked against a long double reference within the error bound of a
 * k-term sum, |err| <= (k + 2) u sum_p |A(i,p) B(p,j)|. Derivatives are
 * checked against central finite differences in f64 (tests/gradcheck.h),
 * per build. */
#include "autodiff/ad_internal.h"
#include "gradcheck.h"

#include <check.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* autodiff/ops_bmm.c (tests only): force one build of the loop (1 base, 2
 * AVX2, 3 AVX-512, 0 automatic); -1 when this CPU cannot run it. */
int ad__bmm_force_isa(int isa);

enum { ISA_AUTO, ISA_BASE, ISA_AVX2, ISA_AVX512, ISA_N };
static const char *const k_isa[ISA_N] = {"auto", "base", "avx2", "avx512"};

/* The builds this process can force (base always), in order. */
static int available(int *isa) {
  int n = 0;
  for (int i = ISA_BASE; i < ISA_N; i++)
    if (ad__bmm_force_isa(i) >= 0) isa[n++] = i;
  ad__bmm_force_isa(ISA_AUTO);
  return n;
}

/* ck_assert_* marks a point (a write and a flush) on every call, most of
 * the sweep's time: its per-point checks test first and abort only on a
 * failure. */
#define REQUIRE(cond, ...)                                                                         \
  do {                                                                                             \
    if (!(cond)) ck_abort_msg(__VA_ARGS__);                                                        \
  } while (0)

static const int64_t k_dims[] = {1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 40, 48};
#define N_DIMS ((int)(sizeof k_dims / sizeof k_dims[0]))

/* Element i of x (f32 or f64) as long double. */
static long double ld_at(const ad_tensor *x, int64_t i) {
  return x->dtype == AD_F64 ? (long double)AD_D(x)[i] : (long double)AD_F(x)[i];
}

/* One sweep point: the product under every build, compared bit for bit
 * between the x86 builds (and auto), each against the reference. */
static void check_point(ad_tape *t, ad_rng *r, const int *isa, int nisa, ad_dtype dt, int64_t B,
                        int64_t m, int64_t n, int64_t k, int ta, int tb, int mode) {
  ad_marker mk = ad_mark(t);
  const int64_t as[3] = {B, ta ? k : m, ta ? m : k}, bs[3] = {B, tb ? n : k, tb ? k : n};
  ad_tensor *a = mode == 1 ? ad_randn(t, dt, 2, as + 1, r) : ad_randn(t, dt, 3, as, r);
  ad_tensor *b = mode == 2 ? ad_randn(t, dt, 2, bs + 1, r) : ad_randn(t, dt, 3, bs, r);
  REQUIRE(a && b, "ad_randn: %s", ad_tape_errmsg(t));
  const int64_t nc = B * m * n;
  long double *ref = malloc((size_t)nc * 2 * sizeof *ref), *mag = ref + nc;
  REQUIRE(ref, "out of memory");
  /* reference: op(A)(i, p) = A[i lda + p] or A[p lda + i], lda = as[2] */
  for (int64_t e = 0; e < B; e++) {
    const int64_t oa = mode == 1 ? 0 : e * as[1] * as[2], ob = mode == 2 ? 0 : e * bs[1] * bs[2];
    for (int64_t i = 0; i < m; i++)
      for (int64_t j = 0; j < n; j++) {
        long double sum = 0, mg = 0;
        for (int64_t p = 0; p < k; p++) {
          const long double x = ld_at(a, oa + (ta ? p * as[2] + i : i * as[2] + p)) *
                                ld_at(b, ob + (tb ? j * bs[2] + p : p * bs[2] + j));
          sum += x;
          mg += fabsl(x);
        }
        ref[(e * m + i) * n + j] = sum;
        mag[(e * m + i) * n + j] = mg;
      }
  }
  const size_t es = dt == AD_F64 ? sizeof(double) : sizeof(float);
  const long double u = dt == AD_F64 ? DBL_EPSILON / 2 : FLT_EPSILON / 2;
  const void *first = NULL;
  int first_isa = 0;
  for (int q = -1; q < nisa; q++) {
    const int want = q < 0 ? ISA_AUTO : isa[q];
    REQUIRE(ad__bmm_force_isa(want) >= 0, "cannot force %s", k_isa[want]);
    ad_tensor *c = ad_bmm(t, a, b, ta, tb);
    REQUIRE(c, "ad_bmm: %s", ad_tape_errmsg(t));
    REQUIRE(c->shape[0] == B && c->shape[1] == m && c->shape[2] == n, "ad_bmm: wrong shape");
    for (int64_t i = 0; i < nc; i++) {
      const long double got = ld_at(c, i);
      REQUIRE(fabsl(got - ref[i]) <= (long double)(k + 2) * u * mag[i],
              "%s %s %s B %lld m %lld n %lld k %lld mode %d under %s: element %lld is "
              "%.17Lg, the reference %.17Lg (bound %.3Lg)",
              dt == AD_F64 ? "f64" : "f32", ta ? "A^T" : "A", tb ? "B^T" : "B", (long long)B,
              (long long)m, (long long)n, (long long)k, mode, k_isa[want], (long long)i, got,
              ref[i], (long double)(k + 2) * u * mag[i]);
    }
    if (want == ISA_BASE) continue; /* no FMA: other roundings */
    if (!first) {
      first = c->data, first_isa = want;
      continue;
    }
    for (int64_t i = 0; i < nc; i++)
      REQUIRE(!memcmp((const char *)first + (size_t)i * es, (char *)c->data + (size_t)i * es, es),
              "%s %s %s B %lld m %lld n %lld k %lld mode %d: element %lld is %a under %s, "
              "%a under %s",
              dt == AD_F64 ? "f64" : "f32", ta ? "A^T" : "A", tb ? "B^T" : "B", (long long)B,
              (long long)m, (long long)n, (long long)k, mode, (long long)i, (double)ld_at(c, i),
              k_isa[want],
              dt == AD_F64 ? ((const double *)first)[i] : (double)((const float *)first)[i],
              k_isa[first_isa]);
  }
  free(ref);
  ad__bmm_force_isa(ISA_AUTO);
  ad_rewind(t, mk);
}

/* The sweep, split by dtype and transpose pair (loop index: dt * 4 + ta *
 * 2 + tb) so each test stays short. Every (m, n, k) of k_dims^3; batch
 * and operand mode cycle with the point so all of 1..7 and the three
 * modes (both batched, A shared, B shared) meet every size class. */
START_TEST(test_tiny_sweep) {
  const ad_dtype dt = (ad_dtype)(_i / 4);
  const int ta = _i / 2 % 2, tb = _i % 2;
  int isa[ISA_N];
  const int nisa = available(isa);
  ck_assert_int_ge(nisa, 1);
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  ad_rng r;
  ad_rng_seed(&r, 100 + (uint64_t)_i);
  int64_t point = 0;
  for (int im = 0; im < N_DIMS; im++)
    for (int in = 0; in < N_DIMS; in++)
      for (int ik = 0; ik < N_DIMS; ik++, point++) {
        const int64_t B = 1 + point % 7;
        const int mode = (int)(point / 7 % 3);
        check_point(t, &r, isa, nisa, dt, B, k_dims[im], k_dims[in], k_dims[ik], ta, tb, mode);
      }
  ck_assert_int_eq(ad_tape_status(t), AD_OK);
  ad_tape_free(t);
}
END_TEST

/* MAML's shapes (a 1-40-40-1 MLP on 10-point tasks, meta-batches of 25
 * and 100) as the batched inner loop records them, forward and the
 * gradients ad_bmm's rule produces, bit for bit between the x86 builds. */
static void grads_under(ad_tape *t, int isa, ad_tensor *a, ad_tensor *b, ad_tensor *w, int ta,
                        int tb, void **out, size_t *bytes) {
  ck_assert_int_ge(ad__bmm_force_isa(isa), 0);
  ad_marker mk = ad_mark(t);
  ad_tensor *c = ad_bmm(t, a, b, ta, tb);
  ck_assert_msg(c != NULL, "%s", ad_tape_errmsg(t));
  ad_tensor *L = ad_sum(t, ad_mul(t, ad_tanh(t, c), w));
  ad_tensor *in[2] = {a, b}, *g[2] = {NULL, NULL};
  ck_assert_int_eq(ad_grad(t, 1, &L, NULL, 2, in, g, 0), AD_OK);
  ad_tensor *parts[3] = {c, g[0], g[1]};
  size_t tot = 0;
  for (int i = 0; i < 3; i++) tot += (size_t)parts[i]->size * sizeof(double);
  double *buf = malloc(tot);
  ck_assert_ptr_nonnull(buf);
  size_t n = 0;
  for (int i = 0; i < 3; i++)
    for (int64_t j = 0; j < parts[i]->size; j++) buf[n++] = ad_get(parts[i], j);
  *out = buf;
  *bytes = tot;
  ad_rewind(t, mk);
  ad__bmm_force_isa(ISA_AUTO);
}

/* A heap leaf of the given shape, N(0, 1), gradient on. */
static ad_tensor *leaf(ad_dtype dt, const int64_t *shape, ad_rng *r) {
  ad_tensor *x = NULL;
  ck_assert_int_eq(ad_tensor_new(&x, dt, 3, shape), AD_OK);
  ad_tensor_fill_normal(x, r, 0, 1);
  ad_requires_grad(x, 1);
  return x;
}

START_TEST(test_maml_shapes_bits) {
  int isa[ISA_N];
  const int nisa = available(isa);
  static const int64_t shapes[][4] = {/* B, m, n, k */
                                      {25, 10, 40, 40},  {100, 10, 40, 40}, {25, 40, 40, 10},
                                      {100, 40, 40, 10}, {25, 10, 40, 1},   {100, 10, 1, 40},
                                      {25, 40, 1, 10},   {100, 1, 40, 10},  {25, 40, 10, 40}};
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, NULL), AD_OK);
  ad_rng r;
  ad_rng_seed(&r, 77);
  for (int dt = 0; dt < 2; dt++)
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
      for (int tr = 0; tr < 4; tr++) {
        const int ta = tr / 2, tb = tr % 2;
        const int64_t B = shapes[s][0], m = shapes[s][1], n = shapes[s][2], k = shapes[s][3];
        ad_marker mk = ad_mark(t);
        const int64_t as[3] = {B, ta ? k : m, ta ? m : k}, bs[3] = {B, tb ? n : k, tb ? k : n};
        ad_tensor *a = leaf((ad_dtype)dt, as, &r), *b = leaf((ad_dtype)dt, bs, &r);
        ad_tensor *w = ad_randn(t, (ad_dtype)dt, 3, (const int64_t[]){B, m, n}, &r);
        void *ref = NULL;
        size_t nref = 0;
        int ref_isa = 0;
        for (int q = 0; q < nisa; q++) {
          if (isa[q] == ISA_BASE) continue;
          void *got;
          size_t ngot;
          grads_under(t, isa[q], a, b, w, ta, tb, &got, &ngot);
          if (!ref) {
            ref = got, nref = ngot, ref_isa = isa[q];
            continue;
          }
          ck_assert_uint_eq(ngot, nref);
          ck_assert_msg(!memcmp(got, ref, nref),
                        "%s B %lld m %lld n %lld k %lld ta %d tb %d: %s and %s differ",
                        dt ? "f64" : "f32", (long long)B, (long long)m, (long long)n, (long long)k,
                        ta, tb, k_isa[isa[q]], k_isa[ref_isa]);
          free(got);
        }
        free(ref);
        ad_tensor_free(a);
        ad_tensor_free(b);
        ad_rewind(t, mk);
      }
  ck_assert_int_eq(ad_tape_status(t), AD_OK);
  ad_tape_free(t);
}
END_TEST

/* ---------------------------------------------------------------- gradcheck
 * tanh around the product so the second derivative is not zero; per
 * build (loop index = the build), shapes that take the loop's different
 * routes: the dot kernel (A B^T, k >= the vector), panels read in place
 * and copied, narrow outputs computed transposed, k = 1. */
#define TG_F(NAME, TA, TB)                                                                         \
  static ad_tensor *NAME(ad_tape *t, ad_tensor *const *x, void *ctx) {                             \
    (void)ctx;                                                                                     \
    return ad_tanh(t, ad_bmm(t, x[0], x[1], TA, TB));                                              \
  }
TG_F(tg00, 0, 0)
TG_F(tg10, 1, 0)
TG_F(tg01, 0, 1)
TG_F(tg11, 1, 1)

static const gc_case GC[] = {
    {"nn_5x9x7", tg00, 2, {3, 3}, {{3, 5, 7}, {3, 7, 9}}, {0, 0}, {0, 0}, 0},
    {"tn_5x9x7", tg10, 2, {3, 3}, {{2, 7, 5}, {2, 7, 9}}, {0, 0}, {0, 0}, 0},
    {"nt_dot_3x6x9", tg01, 2, {3, 3}, {{2, 3, 9}, {2, 6, 9}}, {0, 0}, {0, 0}, 0},
    {"tt_4x17x3", tg11, 2, {3, 3}, {{2, 3, 4}, {2, 17, 3}}, {0, 0}, {0, 0}, 0},
    {"narrow_11x1x5", tg00, 2, {3, 3}, {{3, 11, 5}, {3, 5, 1}}, {0, 0}, {0, 0}, 0},
    {"outer_6x10x1", tg00, 2, {3, 3}, {{2, 6, 1}, {2, 1, 10}}, {0, 0}, {0, 0}, 0},
    {"wide_2x33x4", tg01, 2, {3, 3}, {{2, 2, 4}, {2, 33, 4}}, {0, 0}, {0, 0}, 0},
    {"shared_b_5x9x7", tg00, 2, {3, 2}, {{3, 5, 7}, {7, 9}}, {0, 0}, {0, 0}, 0},
    {"shared_a_t_7x3x5", tg10, 2, {2, 3}, {{5, 7}, {3, 5, 3}}, {0, 0}, {0, 0}, 0},
};
#define N_GC ((int)(sizeof GC / sizeof GC[0]))

START_TEST(test_tiny_gradcheck) {
  const int isa = ISA_BASE + _i;
  if (ad__bmm_force_isa(isa) < 0) {
    fprintf(stderr, "test_tiny_gradcheck: %s not available here, skipped\n", k_isa[isa]);
    return;
  }
  char rep[512];
  for (int c = 0; c < N_GC; c++) {
    double worst = gc_check_case(&GC[c], 4321 + (uint64_t)c, rep, sizeof rep);
    ck_assert_msg(worst <= 1e-6, "%s: %s", k_isa[isa], rep);
  }
  ad__bmm_force_isa(ISA_AUTO);
}
END_TEST

/* The knob itself: out-of-range builds refused, the previous one returned. */
START_TEST(test_force_knob) {
  ck_assert_int_eq(ad__bmm_force_isa(-1), -1);
  ck_assert_int_eq(ad__bmm_force_isa(ISA_N), -1);
  ck_assert_int_eq(ad__bmm_force_isa(ISA_BASE), ISA_AUTO);
  ck_assert_int_eq(ad__bmm_force_isa(ISA_AUTO), ISA_BASE);
}
END_TEST

static Suite *tiny_suite(void) {
  Suite *s = suite_create("tiny_gemm");
  TCase *tc = tcase_create("tiny_gemm");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, test_force_knob);
  tcase_add_loop_test(tc, test_tiny_sweep, 0, 8);
  tcase_add_test(tc, test_maml_shapes_bits);
  tcase_add_loop_test(tc, test_tiny_gradcheck, 0, 3);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  return gc_run_suite(tiny_suite());
}
