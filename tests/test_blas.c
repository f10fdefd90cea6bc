/* test_blas.c — ad_gemm_f32/f64 against a naive triple loop (all four
 * transpose combinations, odd sizes, alpha/beta, padded leading dimensions,
 * edge cases) on every GEMM path (direct loop, BLIS sup with and without
 * packing, BLIS packed with each kernel set) and on the path chosen by
 * measurement, the kernel-set selection and its environment overrides.
 *
 * The override tests call setenv before the first BLAS use, which works
 * because Check runs each test in a forked child (the default); with
 * CK_FORK=no they are left out. */
#define _POSIX_C_SOURCE 200809L
#include "autodiff/ad.h"
#include "autodiff/ad_internal.h" /* ad__gemm_sum */
#include "gradcheck.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Names BLIS 0.9.0 can report for x86-64, plus our own choices. */
static int known_kernel(const char *k) {
  static const char *names[] = {"skx",        "knl",       "haswell", "sandybridge", "penryn",
                                "zen3",       "zen2",      "zen",     "excavator",   "steamroller",
                                "piledriver", "bulldozer", "generic"};
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
    if (strcmp(k, names[i]) == 0) return 1;
  return 0;
}

/* Deterministic values in [-1, 1) without pulling in the library's rng. */
static double lcg(uint64_t *s) {
  *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
  return (double)(*s >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

/* Reference: C = alpha op(A) op(B) + beta C in double, row-major. */
static void naive(int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha, const double *a,
                  int64_t lda, const double *b, int64_t ldb, double beta, double *c, int64_t ldc) {
  for (int64_t i = 0; i < m; i++)
    for (int64_t j = 0; j < n; j++) {
      double s = 0;
      for (int64_t p = 0; p < k; p++)
        s += (ta ? a[p * lda + i] : a[i * lda + p]) * (tb ? b[j * ldb + p] : b[p * ldb + j]);
      c[i * ldc + j] = alpha * s + (beta == 0 ? 0 : beta * c[i * ldc + j]);
    }
}

/* Runs one case in the given dtype and returns the worst error relative to
 * 1 + |reference|. Padding makes every leading dimension longer than its
 * row; padded elements of C must come back untouched. */
static double run_case(ad_dtype dt, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha,
                       double beta, int64_t pad) {
  int64_t ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
  int64_t lda = ac + pad, ldb = bc + pad, ldc = n + pad;
  size_t na = (size_t)(ar * lda), nb = (size_t)(br * ldb), nc = (size_t)(m * ldc);
  double *a = malloc(na * sizeof *a), *b = malloc(nb * sizeof *b);
  double *c0 = malloc(nc * sizeof *c0), *ref = malloc(nc * sizeof *ref);
  uint64_t s = (uint64_t)(m * 1000003 + n * 1009 + k * 17 + ta * 2 + tb);
  for (size_t i = 0; i < na; i++) a[i] = lcg(&s);
  for (size_t i = 0; i < nb; i++) b[i] = lcg(&s);
  for (size_t i = 0; i < nc; i++) c0[i] = ref[i] = lcg(&s);
  naive(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, ref, ldc);

  double worst = 0;
  if (dt == AD_F64) {
    double *c = malloc(nc * sizeof *c);
    memcpy(c, c0, nc * sizeof *c);
    ad_gemm_f64(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    for (size_t i = 0; i < nc; i++) {
      double e = fabs(c[i] - ref[i]) / (1 + fabs(ref[i]));
      if (e > worst) worst = e;
      if ((int64_t)i % ldc >= n && c[i] != c0[i]) worst = INFINITY; /* padding written */
    }
    free(c);
  } else {
    float *af = malloc(na * sizeof *af), *bf = malloc(nb * sizeof *bf), *c = malloc(nc * sizeof *c);
    /* The reference uses the same rounded inputs as the f32 call. */
    for (size_t i = 0; i < na; i++) a[i] = af[i] = (float)a[i];
    for (size_t i = 0; i < nb; i++) b[i] = bf[i] = (float)b[i];
    for (size_t i = 0; i < nc; i++) c0[i] = ref[i] = c[i] = (float)c0[i];
    naive(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, ref, ldc);
    ad_gemm_f32(ta, tb, m, n, k, (float)alpha, af, lda, bf, ldb, (float)beta, c, ldc);
    for (size_t i = 0; i < nc; i++) {
      double e = fabs(c[i] - ref[i]) / (1 + fabs(ref[i]));
      if (e > worst) worst = e;
      if ((int64_t)i % ldc >= n && c[i] != (float)c0[i]) worst = INFINITY; /* padding written */
    }
    free(af);
    free(bf);
    free(c);
  }
  free(a);
  free(b);
  free(c0);
  free(ref);
  return worst;
}

static const int64_t SIZES[] = {1, 2, 7, 16, 33, 65};
static const double AB[][2] = {{1.0, 0.0}, {0.5, -1.25}, {-2.0, 1.0}};

static void sweep(ad_dtype dt, double tol) {
  int n_cases = 0;
  for (int ta = 0; ta < 2; ta++)
    for (int tb = 0; tb < 2; tb++)
      for (size_t im = 0; im < 6; im++)
        for (size_t in = 0; in < 6; in++)
          for (size_t ik = 0; ik < 6; ik++) {
            int64_t m = SIZES[im], n = SIZES[in], k = SIZES[ik];
            size_t sel = (im + in + ik) % 3; /* vary alpha/beta and padding cheaply */
            int64_t pad = (int64_t)((im + 2 * in + ik) % 3) * 3;
            double e = run_case(dt, ta, tb, m, n, k, AB[sel][0], AB[sel][1], pad);
            ck_assert_msg(e <= tol * (double)(k + 1),
                          "%s gemm ta=%d tb=%d m=%lld n=%lld k=%lld alpha=%g beta=%g pad=%lld: "
                          "error %.3g",
                          dt == AD_F32 ? "f32" : "f64", ta, tb, (long long)m, (long long)n,
                          (long long)k, AB[sel][0], AB[sel][1], (long long)pad, e);
            n_cases++;
          }
  ck_assert_int_eq(n_cases, 4 * 216);
}

START_TEST(gemm_f32_sweep) {
  sweep(AD_F32, 1e-6);
}
END_TEST

START_TEST(gemm_f64_sweep) {
  sweep(AD_F64, 1e-14);
}
END_TEST

/* The MLP benchmark's shapes, all four transposes, 1 and 2 threads. */
START_TEST(gemm_mlp_shapes) {
  static const int64_t shapes[][3] = {
      {128, 200, 784}, {128, 10, 200}, {200, 10, 128}, {128, 200, 10}, {784, 200, 128}};
  for (int threads = 1; threads <= 2; threads++) {
    ad_blas_set_threads(threads);
    ck_assert_int_eq(ad_blas_threads(), threads);
    for (size_t s = 0; s < 5; s++)
      for (int t = 0; t < 4; t++) {
        double e =
            run_case(AD_F32, t >> 1, t & 1, shapes[s][0], shapes[s][1], shapes[s][2], 1.0, 0.0, 0);
        ck_assert_msg(e <= 1e-6 * (double)shapes[s][2], "%lldx%lldx%lld t%d%d threads=%d: %.3g",
                      (long long)shapes[s][0], (long long)shapes[s][1], (long long)shapes[s][2],
                      t >> 1, t & 1, threads, e);
      }
  }
}
END_TEST

/* beta = 0 must not read C (NaN there stays out); alpha = 0 and k = 0 give
 * beta C; padding of C is never written. */
START_TEST(gemm_edge_cases) {
  float a[6] = {1, 2, 3, 4, 5, 6}, b[6] = {1, 0, 0, 1, 1, 1};
  float c[2 * 3];
  for (int i = 0; i < 6; i++) c[i] = NAN;
  c[2] = c[5] = 42.0f; /* padding column: ldc = 3, n = 2 */
  /* A 2x3, B 3x2: C = [[1+3, 2+3], [4+6, 5+6]] */
  ad_gemm_f32(0, 0, 2, 2, 3, 1.0f, a, 3, b, 2, 0.0f, c, 3);
  ck_assert_float_eq(c[0], 4.0f);
  ck_assert_float_eq(c[1], 5.0f);
  ck_assert_float_eq(c[3], 10.0f);
  ck_assert_float_eq(c[4], 11.0f);
  ck_assert_float_eq(c[2], 42.0f);
  ck_assert_float_eq(c[5], 42.0f);

  double d[4] = {1, 2, 3, 4};
  ad_gemm_f64(0, 0, 2, 2, 0, 1.0, NULL, 1, NULL, 2, 2.0, d, 2); /* k = 0: C = 2C */
  ck_assert_double_eq(d[0], 2.0);
  ck_assert_double_eq(d[3], 8.0);
  double ad[4] = {1, 1, 1, 1};
  ad_gemm_f64(1, 1, 2, 2, 2, 0.0, ad, 2, ad, 2, 0.5, d, 2); /* alpha = 0: C = C/2 */
  ck_assert_double_eq(d[0], 1.0);
  ck_assert_double_eq(d[3], 4.0);
  ad_gemm_f64(0, 0, 2, 2, 2, 1.0, ad, 2, ad, 2, 0.0, d, 2);
  ck_assert_double_eq(d[1], 2.0);
}
END_TEST

/* Bad arguments leave C alone and do not abort. */
START_TEST(gemm_bad_args_noop) {
  float a[4] = {1, 2, 3, 4}, c[4] = {9, 9, 9, 9};
  ad_gemm_f32(0, 0, 2, 2, 2, 1.0f, a, 1, a, 2, 0.0f, c, 2); /* lda < k */
  ad_gemm_f32(0, 1, 2, 2, 2, 1.0f, a, 2, a, 1, 0.0f, c, 2); /* ldb < k (transposed) */
  ad_gemm_f32(0, 0, 2, 2, 2, 1.0f, a, 2, a, 2, 0.0f, c, 1); /* ldc < n */
  ad_gemm_f32(0, 0, -1, 2, 2, 1.0f, a, 2, a, 2, 0.0f, c, 2);
  ad_gemm_f32(0, 0, 2, 2, 2, 1.0f, NULL, 2, a, 2, 0.0f, c, 2);
  ad_gemm_f32(0, 0, 2, 2, 2, 1.0f, a, 2, a, 2, 0.0f, NULL, 2);
  for (int i = 0; i < 4; i++) ck_assert_float_eq(c[i], 9.0f);
  ad_blas_set_threads(0);
  ck_assert_int_eq(ad_blas_threads(), 1);
  ad_blas_set_threads(-5);
  ck_assert_int_eq(ad_blas_threads(), 1);
}
END_TEST

/* Every path ad_blas_set_path accepts on this CPU ("packed:SET" only for
 * the second kernel set the CPU can run, and the narrow kernels only where
 * the CPU has their instructions, so those are probed). */
static const char *const PATHS[] = {
    "blis",           "direct",      "sup",        "sup+packA", "sup+packB",     "packed",
    "packed:haswell", "packed:zen3", "packed:skx", "narrow",    "narrow:avx512", "wide:avx512"};
#define N_PATHS ((int)(sizeof PATHS / sizeof PATHS[0]))

/* The sweep and MLP-like shapes (1 thread) on one forced path (a loop
 * test: _i indexes PATHS), f32 and f64: the direct loop's partial tiles
 * and copied panels, and BLIS's sup kernels outside their usual
 * thresholds, all against the reference loop. A "packed:SET" the CPU
 * cannot run is refused with AD_ERR_ARG and skipped. */
START_TEST(gemm_every_path) {
  static const int64_t shapes[][3] = {{128, 10, 200}, {200, 10, 128}, {128, 200, 10},
                                      {65, 97, 130},  {10, 40, 40},   {40, 1, 10}};
  ad_blas_set_threads(1);
  if (ad_blas_set_path(PATHS[_i]) != AD_OK) {
    ck_assert_msg(strncmp(PATHS[_i], "packed:", 7) == 0 || strncmp(PATHS[_i], "narrow", 6) == 0 ||
                      strncmp(PATHS[_i], "wide", 4) == 0,
                  "path %s refused: %s", PATHS[_i], ad_last_error());
    return;
  }
  ck_assert_str_eq(ad_blas_path(0, 0, 3, 3, 3, AD_F32), PATHS[_i]);
  sweep(AD_F32, 1e-6);
  sweep(AD_F64, 1e-14);
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int t = 0; t < 4; t++) {
      double e =
          run_case(AD_F32, t >> 1, t & 1, shapes[s][0], shapes[s][1], shapes[s][2], 0.5, -1.0, 1);
      ck_assert_msg(e <= 1e-6 * (double)shapes[s][2], "%s %lldx%lldx%lld t%d%d: %.3g", PATHS[_i],
                    (long long)shapes[s][0], (long long)shapes[s][1], (long long)shapes[s][2],
                    t >> 1, t & 1, e);
    }
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
}
END_TEST

/* At least the six paths that exist on every CPU are accepted. */
START_TEST(gemm_paths_accepted) {
  int n_paths = 0;
  for (int p = 0; p < N_PATHS; p++) n_paths += ad_blas_set_path(PATHS[p]) == AD_OK;
  ck_assert_int_ge(n_paths, 6);
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
}
END_TEST

/* Same inputs, same path: the same bits, call after call, and the measured
 * choice of a shape does not change once made (so an auto call equals the
 * forced call of the path it reports). */
START_TEST(gemm_deterministic) {
  enum { M = 33, N = 40, K = 17 };
  float a[M * K], b[K * N], c1[M * N], c2[M * N];
  uint64_t s = 7;
  for (int i = 0; i < M * K; i++) a[i] = (float)lcg(&s);
  for (int i = 0; i < K * N; i++) b[i] = (float)lcg(&s);
  ad_blas_set_threads(1);
  for (int p = 0; p < N_PATHS; p++) {
    if (ad_blas_set_path(PATHS[p]) != AD_OK) continue;
    ad_gemm_f32(0, 1, M, N, K, 1.0f, a, K, b, K, 0.0f, c1, N);
    for (int rep = 0; rep < 3; rep++) {
      ad_gemm_f32(0, 1, M, N, K, 1.0f, a, K, b, K, 0.0f, c2, N);
      ck_assert_msg(memcmp(c1, c2, sizeof c1) == 0, "path %s differs on call %d", PATHS[p], rep);
    }
  }
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
  const char *chosen = ad_blas_path(0, 1, M, N, K, AD_F32);
  char name[32];
  snprintf(name, sizeof name, "%s", chosen);
  ck_assert_msg(strcmp(name, "none") != 0 && strcmp(name, "?") != 0, "path %s", name);
  ad_gemm_f32(0, 1, M, N, K, 1.0f, a, K, b, K, 0.0f, c1, N);
  ck_assert_str_eq(ad_blas_path(0, 1, M, N, K, AD_F32), name);
  ck_assert_int_eq(ad_blas_set_path(name), AD_OK);
  ad_gemm_f32(0, 1, M, N, K, 1.0f, a, K, b, K, 0.0f, c2, N);
  ck_assert_msg(memcmp(c1, c2, sizeof c1) == 0, "auto and forced %s differ", name);
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
}
END_TEST

/* ad__gemm_sum (a convolution's weight gradient summed over a batch in one
 * pool job) gives the bits of its products' ad_gemm calls in order, on
 * every path, on 1 and 2 threads (where the shape is split), f32 and f64,
 * beta 0 and 1, transposed B; and the sum itself is right. */
START_TEST(gemm_sum_equals_calls) {
  enum { M = 32, N = 144, K = 196, NB = 5 };
  static double a[NB * M * K], b[NB * N * K], c0[M * N];
  static double s1[M * N], s2[M * N];
  static float af[NB * M * K], bf[NB * N * K], f1[M * N], f2[M * N];
  uint64_t s = 11;
  for (int i = 0; i < NB * M * K; i++) af[i] = (float)(a[i] = lcg(&s));
  for (int i = 0; i < NB * N * K; i++) bf[i] = (float)(b[i] = lcg(&s));
  for (int i = 0; i < M * N; i++) c0[i] = lcg(&s);
  const int threads0 = ad_threads();
  for (int th = 1; th <= 2; th++)
    for (int p = -1; p < N_PATHS; p++) {
      ad_blas_set_threads(th);
      if (ad_blas_set_path(p < 0 ? "auto" : PATHS[p]) != AD_OK) continue;
      for (int beta = 0; beta < 2; beta++) {
        for (int i = 0; i < M * N; i++) s1[i] = s2[i] = c0[i], f1[i] = f2[i] = (float)c0[i];
        for (int i = 0; i < NB; i++) {
          ad_gemm_f64(0, 1, M, N, K, 1.0, a + i * M * K, K, b + i * N * K, K, i ? 1.0 : beta, s1,
                      N);
          ad_gemm_f32(0, 1, M, N, K, 1.0f, af + i * M * K, K, bf + i * N * K, K,
                      i ? 1.0f : (float)beta, f1, N);
        }
        ad__gemm_sum(AD_F64, 0, 1, M, N, K, a, K, M * K, b, K, N * K, NB, beta, s2, N);
        ad__gemm_sum(AD_F32, 0, 1, M, N, K, af, K, M * K, bf, K, N * K, NB, beta, f2, N);
        ck_assert_msg(memcmp(s1, s2, sizeof s1) == 0, "f64 sum differs: path %s, %d threads",
                      p < 0 ? "auto" : PATHS[p], th);
        ck_assert_msg(memcmp(f1, f2, sizeof f1) == 0, "f32 sum differs: path %s, %d threads",
                      p < 0 ? "auto" : PATHS[p], th);
        double worst = 0; /* against the sum in long double */
        for (int r = 0; r < M; r++)
          for (int c = 0; c < N; c++) {
            long double want = beta ? c0[r * N + c] : 0;
            for (int i = 0; i < NB; i++)
              for (int e = 0; e < K; e++)
                want += (long double)a[i * M * K + r * K + e] * b[i * N * K + c * K + e];
            const double err = fabs((double)(want - s2[r * N + c]));
            if (err > worst) worst = err;
          }
        ck_assert_msg(worst < 1e-10, "f64 sum off by %g", worst);
      }
    }
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
  ad_blas_set_threads(threads0);
}
END_TEST

/* The measured choice shows in the reason: the shape, each candidate's
 * GF/s and a starred winner; MAML's tiny products have the direct loop
 * among the candidates, the 128x200x784 product does not. */
START_TEST(gemm_reason_shows_choice) {
  enum { M = 10, N = 40, K = 40 };
  float a[M * K], b[K * N], c[M * N];
  for (int i = 0; i < M * K; i++) a[i] = 0.01f * (float)(i % 17);
  for (int i = 0; i < K * N; i++) b[i] = 0.02f * (float)(i % 13);
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
  ad_gemm_f32(0, 0, M, N, K, 1.0f, a, K, b, N, 0.0f, c, N);
  const char *r = ad_blas_reason();
  const char *at = strstr(r, "f32 10x40x40 NN t1:");
  ck_assert_msg(at != NULL, "reason lacks the shape: %s", r);
  ck_assert_msg(strstr(at, "direct") != NULL && strchr(at, '*') != NULL, "reason: %s", r);
  ck_assert_str_ne(ad_blas_path(0, 0, 128, 200, 784, AD_F32), "direct");
  ck_assert_str_eq(ad_blas_path(0, 0, 0, 200, 784, AD_F32), "none");
  ck_assert_str_eq(ad_blas_path(0, 0, 4, 4, 4, (ad_dtype)7), "none");
}
END_TEST

START_TEST(gemm_set_path_errors) {
  ck_assert_int_eq(ad_blas_set_path(NULL), AD_ERR_NULL);
  ck_assert_msg(strstr(ad_last_error(), "ad_blas_set_path") != NULL, "%s", ad_last_error());
  ck_assert_int_eq(ad_blas_set_path("fastest"), AD_ERR_ARG);
  ck_assert_msg(strstr(ad_last_error(), "ad_blas_set_path") != NULL &&
                    strstr(ad_last_error(), "fastest") != NULL,
                "%s", ad_last_error());
  /* A refused name leaves the previous setting in place. */
  ck_assert_int_eq(ad_blas_set_path("direct"), AD_OK);
  ck_assert_int_eq(ad_blas_set_path("no-such"), AD_ERR_ARG);
  ck_assert_str_eq(ad_blas_path(1, 1, 5, 5, 5, AD_F64), "direct");
  ck_assert_msg(strstr(ad_blas_reason(), "direct (forced)") != NULL, "%s", ad_blas_reason());
  ck_assert_int_eq(ad_blas_set_path("auto"), AD_OK);
}
END_TEST

START_TEST(kernel_is_known) {
  unsetenv("HYPERTAPE_BLIS_ARCH");
  unsetenv("BLIS_ARCH_TYPE");
  const char *k = ad_blas_kernel();
  ck_assert_ptr_nonnull(k);
  ck_assert_msg(known_kernel(k), "unknown kernel name '%s'", k);
  ck_assert_ptr_nonnull(ad_blas_reason());
  ck_assert_msg(strlen(ad_blas_reason()) > 0, "empty reason");
  /* Twice gives the same answer (the choice is made once). */
  ck_assert_str_eq(ad_blas_kernel(), k);
}
END_TEST

/* The forked-env tests: setenv before the first BLAS call in this child. */
START_TEST(env_generic_honoured) {
  setenv("HYPERTAPE_BLIS_ARCH", "generic", 1);
  ck_assert_str_eq(ad_blas_kernel(), "generic");
  ck_assert_msg(strstr(ad_blas_reason(), "HYPERTAPE_BLIS_ARCH=generic") != NULL, "reason: %s",
                ad_blas_reason());
  double e = run_case(AD_F32, 1, 1, 33, 17, 65, 1.0, 0.5, 2);
  ck_assert_msg(e < 1e-4, "generic kernels wrong: %.3g", e);
}
END_TEST

START_TEST(env_unknown_falls_back) {
  setenv("HYPERTAPE_BLIS_ARCH", "no-such-cpu", 1);
  const char *k = ad_blas_kernel();
  ck_assert_msg(known_kernel(k), "kernel '%s'", k);
  ck_assert_msg(strstr(ad_blas_reason(), "no-such-cpu") != NULL &&
                    strstr(ad_blas_reason(), "auto") != NULL,
                "reason should name the bad value and say auto: %s", ad_blas_reason());
  ck_assert_double_le(run_case(AD_F64, 0, 1, 7, 7, 7, 1.0, 0.0, 0), 1e-13);
}
END_TEST

START_TEST(env_auto_and_threads) {
  setenv("HYPERTAPE_BLIS_ARCH", "AUTO", 1);
  setenv("HYPERTAPE_THREADS", "2", 1);
  ck_assert_int_eq(ad_blas_threads(), 2);
  ck_assert_msg(strstr(ad_blas_reason(), "HYPERTAPE_BLIS_ARCH") == NULL, "reason: %s",
                ad_blas_reason());
  ck_assert_double_le(run_case(AD_F32, 0, 0, 65, 33, 200, 1.0, 0.0, 0), 1e-4);
}
END_TEST

/* BLIS 0.9.0 itself aborts on any BLIS_ARCH_TYPE; we must not. */
START_TEST(env_blis_arch_type_survives) {
  unsetenv("HYPERTAPE_BLIS_ARCH"); /* it would take precedence */
  setenv("BLIS_ARCH_TYPE", "generic", 1);
  ck_assert_str_eq(ad_blas_kernel(), "generic");
  ck_assert_double_le(run_case(AD_F64, 1, 0, 7, 33, 2, 1.0, 1.0, 1), 1e-13);
}
END_TEST

START_TEST(env_blis_arch_type_garbage) {
  unsetenv("HYPERTAPE_BLIS_ARCH");
  setenv("BLIS_ARCH_TYPE", "99", 1);
  ck_assert_msg(known_kernel(ad_blas_kernel()), "kernel '%s'", ad_blas_kernel());
  ck_assert_double_le(run_case(AD_F64, 1, 1, 7, 7, 7, 1.0, 0.0, 0), 1e-13);
}
END_TEST

START_TEST(env_gemm_path) {
  setenv("HYPERTAPE_GEMM_PATH", "direct", 1);
  ck_assert_str_eq(ad_blas_path(0, 0, 128, 200, 784, AD_F32), "direct");
  ck_assert_double_le(run_case(AD_F64, 1, 1, 33, 7, 65, 1.0, 0.5, 2), 1e-13);
}
END_TEST

START_TEST(env_gemm_path_unknown) {
  setenv("HYPERTAPE_GEMM_PATH", "warp-speed", 1);
  ck_assert_msg(strstr(ad_blas_reason(), "HYPERTAPE_GEMM_PATH=warp-speed ignored") != NULL, "%s",
                ad_blas_reason());
  ck_assert_str_ne(ad_blas_path(0, 0, 8, 8, 8, AD_F32), "none");
  ck_assert_double_le(run_case(AD_F32, 0, 1, 16, 33, 7, 1.0, 0.0, 0), 1e-5);
}
END_TEST

static Suite *blas_suite(int forking) {
  Suite *s = suite_create("blas");
  TCase *tc = tcase_create("gemm");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, gemm_f32_sweep);
  tcase_add_test(tc, gemm_f64_sweep);
  tcase_add_test(tc, gemm_mlp_shapes);
  tcase_add_test(tc, gemm_edge_cases);
  tcase_add_test(tc, gemm_bad_args_noop);
  tcase_add_loop_test(tc, gemm_every_path, 0, N_PATHS);
  tcase_add_test(tc, gemm_paths_accepted);
  tcase_add_test(tc, gemm_sum_equals_calls);
  tcase_add_test(tc, gemm_deterministic);
  tcase_add_test(tc, gemm_set_path_errors);
  tcase_add_test(tc, kernel_is_known);
  suite_add_tcase(s, tc);
  if (forking) {
    TCase *te = tcase_create("env");
    tcase_add_test(te, env_generic_honoured);
    tcase_add_test(te, env_unknown_falls_back);
    tcase_add_test(te, env_auto_and_threads);
    tcase_add_test(te, env_blis_arch_type_survives);
    tcase_add_test(te, env_blis_arch_type_garbage);
    tcase_add_test(te, gemm_reason_shows_choice); /* needs a fresh shape cache */
    tcase_add_test(te, env_gemm_path);
    tcase_add_test(te, env_gemm_path_unknown);
    suite_add_tcase(s, te);
  }
  return s;
}

int main(void) {
  /* The environment tests need a fresh process each. */
  return gc_run_suite(blas_suite(gc_forking()));
}
