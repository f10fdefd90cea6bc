/* test_gemm_narrow.c — our own f32 GEMM kernels: the narrow ones (paths
 * "narrow", AVX2+FMA, and "narrow:avx512") and the wide AVX-512 one
 * ("wide:avx512", any n: autodiff/gemm_wide.c, whose row tiles are 12 and
 * column panels 32, edges the sizes below cross), forced with
 * ad_blas_set_path, against a naive
 * triple loop in double: all four transposes, every n = 1..17 and n
 * around the tile widths up to the kernels' limit of 64 (and 65, past it,
 * where the path falls back), m and k around the
 * vector and tile edges, alpha/beta, padded leading dimensions, beta = 0
 * with NaN in C, the MLP shapes, large k (the heap scratch for op(B)),
 * f64 (which falls back), and the kernel-set rule: HYPERTAPE_BLIS_ARCH=
 * haswell (an AVX2-only setting) keeps the AVX-512 kernel out, forced or
 * measured. A path the CPU cannot run is refused with AD_ERR_ARG and its
 * test does nothing (the CPU, not the test, decides). */
#define _POSIX_C_SOURCE 200809L
#include "autodiff/ad.h"
#include "gradcheck.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static double lcg(uint64_t *s) {
  *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
  return (double)(*s >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

static void naive(int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha, const float *a,
                  int64_t lda, const float *b, int64_t ldb, double beta, const float *c0,
                  double *ref, int64_t ldc) {
  for (int64_t i = 0; i < m; i++)
    for (int64_t j = 0; j < n; j++) {
      double s = 0;
      for (int64_t p = 0; p < k; p++)
        s += (double)(ta ? a[p * lda + i] : a[i * lda + p]) *
             (double)(tb ? b[j * ldb + p] : b[p * ldb + j]);
      ref[i * ldc + j] = alpha * s + (beta == 0 ? 0 : beta * (double)c0[i * ldc + j]);
    }
}

/* One f32 case on the current path; returns the worst error relative to
 * 1 + |reference| (infinite if C's padding changed or a NaN of C leaked
 * through beta = 0). A, B are exact in float so the reference sees the
 * same inputs. */
static double run_f32(int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha, double beta,
                      int64_t pad) {
  int64_t ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
  int64_t lda = ac + pad, ldb = bc + pad, ldc = n + pad;
  size_t na = (size_t)(ar * lda), nb = (size_t)(br * ldb), nc = (size_t)(m * ldc);
  float *a = malloc(na * sizeof *a), *b = malloc(nb * sizeof *b);
  float *c = malloc(nc * sizeof *c), *c0 = malloc(nc * sizeof *c0);
  double *ref = malloc(nc * sizeof *ref);
  uint64_t s = (uint64_t)(m * 1000003 + n * 1009 + k * 17 + ta * 2 + tb + pad * 7);
  for (size_t i = 0; i < na; i++) a[i] = (float)lcg(&s);
  for (size_t i = 0; i < nb; i++) b[i] = (float)lcg(&s);
  for (size_t i = 0; i < nc; i++) {
    /* beta = 0: C holds NaN, which must not reach the result. */
    c0[i] = c[i] = beta == 0 && (int64_t)i % ldc < n ? NAN : (float)lcg(&s);
    ref[i] = c0[i];
  }
  naive(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c0, ref, ldc);
  ad_gemm_f32(ta, tb, m, n, k, (float)alpha, a, lda, b, ldb, (float)beta, c, ldc);
  double worst = 0;
  for (size_t i = 0; i < nc; i++) {
    if ((int64_t)i % ldc >= n) {
      if (memcmp(&c[i], &c0[i], sizeof c[i]) != 0) worst = INFINITY; /* padding written */
      continue;
    }
    double e = fabs((double)c[i] - ref[i]) / (1 + fabs(ref[i]));
    if (!(e <= worst)) worst = isnan(e) ? INFINITY : e;
  }
  free(a);
  free(b);
  free(c);
  free(c0);
  free(ref);
  return worst;
}

static const char *const NARROW[] = {"narrow", "narrow:avx512", "wide:avx512"};

/* Forces NARROW[i]; 0 (and the test returns) if this CPU / kernel set
 * cannot run it, which must then be a clean AD_ERR_ARG naming the path. */
static int force(int i) {
  ad_blas_set_threads(1);
  ad_status st = ad_blas_set_path(NARROW[i]);
  if (st != AD_OK) {
    ck_assert_int_eq(st, AD_ERR_ARG);
    ck_assert_msg(strstr(ad_last_error(), NARROW[i]) != NULL, "%s", ad_last_error());
    return 0;
  }
  ck_assert_str_eq(ad_blas_path(0, 0, 5, 10, 5, AD_F32), NARROW[i]);
  return 1;
}

static const int64_t MS[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 37};
static const int64_t KS[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 37};
static const double AB[][2] = {{1.0, 0.0}, {0.5, -1.25}, {-1.5, 0.0}, {1.0, 1.0}, {-2.0, 1.0}};

static const int64_t NS[] = {1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12,
                             13, 14, 15, 16, 17, 23, 24, 25, 40, 63, 64, 65};
#define N_NS ((int)(sizeof NS / sizeof NS[0]))

/* The n above x the m and k above x four transposes, alpha/beta and
 * padding varied across the cases. */
START_TEST(narrow_sweep) {
  if (!force(_i)) return;
  int cases = 0;
  for (int t = 0; t < 4; t++)
    for (int in = 0; in < N_NS; in++)
      for (size_t im = 0; im < sizeof MS / sizeof MS[0]; im++)
        for (size_t ik = 0; ik < sizeof KS / sizeof KS[0]; ik++) {
          const int64_t m = MS[im], n = NS[in], k = KS[ik];
          const size_t sel = (size_t)(n + (int64_t)im + 2 * (int64_t)ik + t) % 5;
          const int64_t pad = (int64_t)((im + ik + (size_t)n) % 3) * 5;
          double e = run_f32(t >> 1, t & 1, m, n, k, AB[sel][0], AB[sel][1], pad);
          ck_assert_msg(e <= 1e-6 * (double)(k + 1),
                        "%s t%d%d m=%lld n=%lld k=%lld alpha=%g beta=%g pad=%lld: error %.3g",
                        NARROW[_i], t >> 1, t & 1, (long long)m, (long long)n, (long long)k,
                        AB[sel][0], AB[sel][1], (long long)pad, e);
          cases++;
        }
  ck_assert_int_eq(cases, 4 * N_NS * 13 * 13);
}
END_TEST

/* Every m = 1..37 at k = 37 and every k = 1..37 at m = 37 (all row tails
 * of both kernels, all k tails), n = 10 and 16, beta = 0 and not. */
START_TEST(narrow_all_small_sizes) {
  if (!force(_i)) return;
  for (int t = 0; t < 4; t++)
    for (int64_t x = 1; x <= 37; x++)
      for (int64_t n = 10; n <= 16; n += 6) {
        double e1 = run_f32(t >> 1, t & 1, x, n, 37, 1.0, 0.0, 1);
        double e2 = run_f32(t >> 1, t & 1, 37, n, x, -0.75, 0.5, 3);
        ck_assert_msg(e1 <= 4e-5 && e2 <= 1e-6 * (double)(x + 1),
                      "%s t%d%d n=%lld size %lld: errors %.3g %.3g", NARROW[_i], t >> 1, t & 1,
                      (long long)n, (long long)x, e1, e2);
      }
}
END_TEST

/* The MLP's narrow products (and their wider-batch twins), a k large
 * enough that the copy of op(B)'s columns goes to the heap, and f64 and
 * n > 64, which the path hands to another kernel. */
START_TEST(narrow_mlp_and_large) {
  static const int64_t shapes[][3] = {
      {128, 10, 200},  {200, 10, 128}, {512, 10, 200}, {200, 10, 512}, {100, 16, 1500},
      {3, 10, 4099},   {10, 40, 40},   {40, 40, 10},   {10, 64, 300},  {128, 200, 784},
      {784, 200, 128}, {37, 97, 65},   {25, 1568, 10}};
  if (!force(_i)) return;
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int t = 0; t < 4; t++) {
      double e = run_f32(t >> 1, t & 1, shapes[s][0], shapes[s][1], shapes[s][2], 1.0, 0.0, 0);
      double e2 = run_f32(t >> 1, t & 1, shapes[s][0], shapes[s][1], shapes[s][2], 0.5, 2.0, 2);
      ck_assert_msg(e <= 1e-6 * (double)shapes[s][2] && e2 <= 1e-6 * (double)shapes[s][2],
                    "%s %lldx%lldx%lld t%d%d: %.3g %.3g", NARROW[_i], (long long)shapes[s][0],
                    (long long)shapes[s][1], (long long)shapes[s][2], t >> 1, t & 1, e, e2);
    }
  ck_assert_double_le(run_f32(1, 0, 40, 80, 40, 1.0, 0.0, 1), 1e-4); /* n > 64 */
  double a[6] = {1, 2, 3, 4, 5, 6}, b[6] = {1, 0, 0, 1, 1, 1}, c[4] = {NAN, NAN, NAN, NAN};
  ad_gemm_f64(0, 0, 2, 2, 3, 1.0, a, 3, b, 2, 0.0, c, 2); /* f64: not a narrow kernel's */
  ck_assert_double_eq(c[0], 4.0);
  ck_assert_double_eq(c[1], 5.0);
  ck_assert_double_eq(c[2], 10.0);
  ck_assert_double_eq(c[3], 11.0);
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
}
END_TEST

/* Same inputs, same bits (the order of additions is fixed). */
START_TEST(narrow_deterministic) {
  enum { M = 45, N = 10, K = 77 };
  float a[K * M], b[K * N], c1[M * N], c2[M * N];
  uint64_t s = 3;
  for (int i = 0; i < M * K; i++) a[i] = (float)lcg(&s);
  for (int i = 0; i < K * N; i++) b[i] = (float)lcg(&s);
  if (!force(_i)) return;
  for (int t = 0; t < 4; t++) {
    const int ta = t >> 1, tb = t & 1;
    ad_gemm_f32(ta, tb, M, N, K, 1.0f, a, ta ? M : K, b, tb ? K : N, 0.0f, c1, N);
    ad_gemm_f32(ta, tb, M, N, K, 1.0f, a, ta ? M : K, b, tb ? K : N, 0.0f, c2, N);
    ck_assert_msg(memcmp(c1, c2, sizeof c1) == 0, "%s t%d%d differs", NARROW[_i], ta, tb);
  }
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
}
END_TEST

/* Measured choice: narrow shapes have the narrow kernels among the
 * candidates (when the CPU has AVX2+FMA), and the result is right. */
START_TEST(narrow_in_measurement) {
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
  ad_blas_set_threads(1);
  ck_assert_double_le(run_f32(1, 0, 200, 10, 128, 1.0, 0.0, 0), 1e-6 * 128);
  if (ad_blas_set_path("narrow") == AD_OK) {
    ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
    const char *r = ad_blas_reason();
    const char *at = strstr(r, "f32 200x10x128 TN t1:");
    ck_assert_msg(at != NULL, "reason lacks the shape: %s", r);
    ck_assert_msg(strstr(at, " narrow ") != NULL || strstr(at, "*narrow ") != NULL, "%s", r);
  }
}
END_TEST

/* HYPERTAPE_BLIS_ARCH=haswell is an AVX2-only setting: the AVX-512 kernel
 * is refused when forced and never measured (forked: fresh state). */
START_TEST(env_haswell_no_avx512) {
  setenv("HYPERTAPE_BLIS_ARCH", "haswell", 1);
  unsetenv("HYPERTAPE_GEMM_PATH");
  if (strcmp(ad_blas_kernel(), "haswell") != 0) return; /* this CPU cannot run haswell */
  ck_assert_int_eq(ad_blas_set_path("narrow:avx512"), AD_ERR_ARG);
  ck_assert_msg(strstr(ad_last_error(), "AVX-512") != NULL, "%s", ad_last_error());
  ck_assert_int_eq(ad_blas_set_path("wide:avx512"), AD_ERR_ARG);
  ck_assert_msg(strstr(ad_last_error(), "AVX-512") != NULL, "%s", ad_last_error());
  ck_assert_int_eq(ad_blas_set_path("narrow"), AD_OK);
  ck_assert_double_le(run_f32(1, 0, 200, 10, 128, 1.0, 0.0, 0), 1e-6 * 128);
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
  ad_blas_set_threads(1);
  ck_assert_double_le(run_f32(0, 0, 128, 10, 200, 1.0, 0.0, 0), 1e-6 * 200);
  ck_assert_msg(strstr(ad_blas_reason(), "avx512") == NULL, "%s", ad_blas_reason());
}
END_TEST

/* HYPERTAPE_GEMM_PATH accepts the narrow names. */
START_TEST(env_gemm_path_narrow) {
  unsetenv("HYPERTAPE_BLIS_ARCH");
  setenv("HYPERTAPE_GEMM_PATH", "narrow", 1);
  const char *p = ad_blas_path(0, 0, 128, 10, 200, AD_F32);
  if (strcmp(p, "narrow") != 0) { /* no AVX2+FMA: ignored, and the reason says so */
    ck_assert_msg(strstr(ad_blas_reason(), "HYPERTAPE_GEMM_PATH=narrow ignored") != NULL, "%s",
                  ad_blas_reason());
    return;
  }
  ck_assert_double_le(run_f32(0, 1, 33, 7, 65, 1.0, 0.5, 2), 1e-6 * 66);
}
END_TEST

static Suite *narrow_suite(int forking) {
  Suite *s = suite_create("gemm_narrow");
  TCase *tc = tcase_create("narrow");
  tcase_set_timeout(tc, 120);
  tcase_add_loop_test(tc, narrow_sweep, 0, 3);
  tcase_add_loop_test(tc, narrow_all_small_sizes, 0, 3);
  tcase_add_loop_test(tc, narrow_mlp_and_large, 0, 3);
  tcase_add_loop_test(tc, narrow_deterministic, 0, 3);
  suite_add_tcase(s, tc);
  if (forking) {
    TCase *te = tcase_create("env");
    tcase_set_timeout(te, 60);
    tcase_add_test(te, narrow_in_measurement); /* needs a fresh shape cache */
    tcase_add_test(te, env_haswell_no_avx512);
    tcase_add_test(te, env_gemm_path_narrow);
    suite_add_tcase(s, te);
  }
  return s;
}

int main(void) {
  /* The environment tests need a fresh process each. */
  return gc_run_suite(narrow_suite(gc_forking()));
}
