/* gemm_rates.c — GF/s of ad_gemm_f32 (or _f64) per shape, for bench/run.py --gemm.
 *
 *   gemm_rates [--threads N] [--f64] [--ms BUDGET] [--all-paths] [--clock wall|cpu]
 *              m,n,k,ta,tb [...]
 *
 * --all-paths also times every path ad_blas_set_path accepts, forced one
 * by one, batches of the paths interleaved in the same run (field
 * "paths": GF/s per path), so their ratios see the same machine load.
 *
 * One JSON line per shape on stdout: sizes, threads, the path ad_blas chose
 * for it (ad_blas_path), microseconds per call and GF/s (2 m n k flops per
 * call). Timing: after the first call (which may measure the paths and is
 * excluded), batches of calls of about BUDGET/8 ms each, the fastest batch
 * kept: on a shared machine the least disturbed batch is the closest to
 * what the hardware does. */
#define _POSIX_C_SOURCE 200809L
#include "autodiff/ad.h"
#include "bench_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void fill(void *p, size_t n, int f64) {
  uint64_t s = 12345;
  for (size_t i = 0; i < n; i++) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    double v = (double)(s >> 11) / 9007199254740992.0 - 0.5;
    if (f64)
      ((double *)p)[i] = v;
    else
      ((float *)p)[i] = (float)v;
  }
}

static void call(int f64, int ta, int tb, long m, long n, long k, void *a, void *b, void *c) {
  long lda = ta ? m : k, ldb = tb ? k : n;
  if (f64)
    ad_gemm_f64(ta, tb, m, n, k, 1.0, a, lda, b, ldb, 0.0, c, n);
  else
    ad_gemm_f32(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, n);
}

/* Fastest batch of `per` calls, in microseconds per call. */
static double batch_us(int f64, int ta, int tb, long m, long n, long k, void *a, void *b, void *c,
                       long per) {
  double s = bu_now_ms();
  for (long r = 0; r < per; r++) call(f64, ta, tb, m, n, k, a, b, c);
  return (bu_now_ms() - s) * 1e3 / (double)per;
}

static const char *const k_paths[] = {"direct",     "sup",    "sup+packA",      "sup+packB",
                                      "packed",     "blis",   "packed:haswell", "packed:zen3",
                                      "packed:skx", "narrow", "narrow:avx512",  "wide:avx512"};
#define N_PATHS_TRY ((int)(sizeof k_paths / sizeof k_paths[0]))

int main(int argc, char **argv) {
  int threads = 1, f64 = 0, all_paths = 0;
  double budget_ms = 40;
  int first = 1;
  for (; first < argc && argv[first][0] == '-'; first++) {
    if (strcmp(argv[first], "--threads") == 0 && first + 1 < argc)
      threads = atoi(argv[++first]);
    else if (strcmp(argv[first], "--ms") == 0 && first + 1 < argc)
      budget_ms = atof(argv[++first]);
    else if (strcmp(argv[first], "--f64") == 0)
      f64 = 1;
    else if (strcmp(argv[first], "--all-paths") == 0)
      all_paths = 1;
    else if (strcmp(argv[first], "--clock") == 0 && first + 1 < argc)
      bu_clock = strcmp(argv[++first], "cpu") == 0 ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC;
    else {
      fprintf(stderr, "usage: %s [--threads N] [--f64] [--ms BUDGET] m,n,k,ta,tb ...\n", argv[0]);
      return 2;
    }
  }
  ad_blas_set_threads(threads);
  size_t es = f64 ? sizeof(double) : sizeof(float);
  for (int i = first; i < argc; i++) {
    long m, n, k;
    int ta, tb;
    if (sscanf(argv[i], "%ld,%ld,%ld,%d,%d", &m, &n, &k, &ta, &tb) != 5 || m < 1 || n < 1 ||
        k < 1) {
      fprintf(stderr, "gemm_rates: bad shape '%s' (want m,n,k,ta,tb)\n", argv[i]);
      return 2;
    }
    void *a = malloc((size_t)(m * k) * es), *b = malloc((size_t)(k * n) * es);
    void *c = malloc((size_t)(m * n) * es);
    if (!a || !b || !c) return 1;
    fill(a, (size_t)(m * k), f64);
    fill(b, (size_t)(k * n), f64);
    call(f64, ta, tb, m, n, k, a, b, c); /* first use: path measurement */
    double t0 = bu_now_ms();
    long reps = 0;
    while (bu_now_ms() - t0 < budget_ms / 16 || reps < 2) {
      call(f64, ta, tb, m, n, k, a, b, c);
      reps++;
    }
    long per = reps * 2 > 1 ? reps * 2 : 1; /* about budget/8 per batch */
    double best = 1e30, pbest[N_PATHS_TRY];
    int pok[N_PATHS_TRY] = {0};
    for (int q = 0; q < N_PATHS_TRY; q++) pbest[q] = 1e30;
    for (int bt = 0; bt < 8; bt++) {
      double us = batch_us(f64, ta, tb, m, n, k, a, b, c, per);
      if (us < best) best = us;
      for (int q = 0; all_paths && q < N_PATHS_TRY; q++) {
        if (ad_blas_set_path(k_paths[q]) != AD_OK) continue;
        pok[q] = 1;
        call(f64, ta, tb, m, n, k, a, b, c);
        us = batch_us(f64, ta, tb, m, n, k, a, b, c, per);
        if (us < pbest[q]) pbest[q] = us;
        ad_blas_set_path("auto");
      }
    }
    printf("{\"m\": %ld, \"n\": %ld, \"k\": %ld, \"ta\": %d, \"tb\": %d, \"dtype\": \"%s\", "
           "\"threads\": %d, \"path\": ",
           m, n, k, ta, tb, f64 ? "f64" : "f32", threads);
    bu_json_str(stdout, ad_blas_path(ta, tb, m, n, k, f64 ? AD_F64 : AD_F32));
    printf(", \"us\": %.3f, \"gflops\": %.2f, \"kernel\": ", best,
           2.0 * (double)m * (double)n * (double)k / (best * 1e3));
    bu_json_str(stdout, ad_blas_kernel());
    if (all_paths) {
      printf(", \"paths\": {");
      for (int q = 0, any = 0; q < N_PATHS_TRY; q++)
        if (pok[q])
          printf("%s\"%s\": %.2f", any++ ? ", " : "", k_paths[q],
                 2.0 * (double)m * (double)n * (double)k / (pbest[q] * 1e3));
      printf("}");
    }
    printf("}\n");
    fflush(stdout);
    free(a);
    free(b);
    free(c);
  }
  return 0;
}
