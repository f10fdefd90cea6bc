/* bench_util.h — what every bench/bench_*.c shares: command line, timing,
 * the header line and the JSON result line that bench/run.py reads.
 *
 * A bench times two things in the same run: "ours" (the workload through
 * the tape) and "floor" (the same GEMMs alone through ad_gemm_f32, the best
 * any autodiff on this BLAS could do). Iterations of the two alternate, so
 * both medians see the same machine conditions (frequency, neighbours).
 *
 * Usage of a bench program:  bench_X [--threads N] [--iters N] [--warmup N] [--clock wall|cpu]
 * --clock cpu times by the process's CPU time instead of the wall clock: on
 * a machine shared with other work, a one-thread run then does not count
 * the time it spent descheduled (with more threads it would add the
 * threads' times up, so bench/run.py uses it at one thread only).
 * stdout: one JSON line; stderr: a "#" header naming the kernel set.
 *
 * Include it first, after defining _POSIX_C_SOURCE 200809L (clock_gettime). */
#ifndef HT_BENCH_UTIL_H
#define HT_BENCH_UTIL_H

#include "autodiff/ad.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
  int threads; /* threads inside each GEMM (ad_blas_set_threads) */
  int iters;   /* timed iterations; the median is reported */
  int warmup;  /* untimed iterations first (arena growth, caches, clocks) */
} bu_opts;

/* The clock every timing reads (--clock). */
static clockid_t bu_clock = CLOCK_MONOTONIC;

/* bu_clock in milliseconds. */
static inline double bu_now_ms(void) {
  struct timespec ts;
  clock_gettime(bu_clock, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static inline int bu_cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Median of n samples (sorts them in place). */
static inline double bu_median(double *x, int n) {
  if (n <= 0) return 0.0;
  qsort(x, (size_t)n, sizeof *x, bu_cmp_double);
  return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

/* Parses --threads/--iters/--warmup/--clock (defaults 1/200/20/wall). Returns 0 when
 * the program should go on, 1 for --help, -1 on a bad argument. */
static inline int bu_parse(int argc, char **argv, bu_opts *o) {
  o->threads = 1;
  o->iters = 200;
  o->warmup = 20;
  for (int i = 1; i < argc; i++) {
    int *dst = NULL;
    if (strcmp(argv[i], "--threads") == 0)
      dst = &o->threads;
    else if (strcmp(argv[i], "--iters") == 0)
      dst = &o->iters;
    else if (strcmp(argv[i], "--warmup") == 0)
      dst = &o->warmup;
    else if (strcmp(argv[i], "--clock") == 0 && i + 1 < argc) {
      const char *v = argv[++i];
      if (strcmp(v, "wall") != 0 && strcmp(v, "cpu") != 0) {
        fprintf(stderr, "%s: --clock wants wall or cpu, not '%s'\n", argv[0], v);
        return -1;
      }
      bu_clock = strcmp(v, "cpu") == 0 ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC;
      continue;
    } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      printf("usage: %s [--threads N] [--iters N] [--warmup N] [--clock wall|cpu]\n", argv[0]);
      return 1;
    }
    if (!dst || i + 1 >= argc) {
      fprintf(stderr, "%s: bad argument '%s' (try --help)\n", argv[0], argv[i]);
      return -1;
    }
    char *end = NULL;
    long v = strtol(argv[++i], &end, 10);
    if (*end || v < (dst == &o->warmup ? 0 : 1) || v > 1000000) {
      fprintf(stderr, "%s: bad value '%s' for %s\n", argv[0], argv[i], argv[i - 1]);
      return -1;
    }
    *dst = (int)v;
  }
  ad_blas_set_threads(o->threads);
  return 0;
}

/* The header line, on stderr so stdout stays one JSON line. */
static inline void bu_header(const char *workload, const bu_opts *o) {
  fprintf(stderr, "# %s: kernel=%s (%s) threads=%d iters=%d warmup=%d\n", workload,
          ad_blas_kernel(), ad_blas_reason(), ad_blas_threads(), o->iters, o->warmup);
}

typedef void (*bu_fn)(void *ctx);

/* Runs warmup rounds of both, then `iters` rounds alternating ours/floor,
 * each call timed alone; writes the two medians in ms. */
static inline int bu_time_pair(bu_fn ours, bu_fn floor_fn, void *ctx, const bu_opts *o,
                               double *ours_ms, double *floor_ms) {
  double *a = malloc(sizeof *a * (size_t)o->iters), *b = malloc(sizeof *b * (size_t)o->iters);
  if (!a || !b) {
    free(a);
    free(b);
    return -1;
  }
  for (int i = 0; i < o->warmup; i++) {
    ours(ctx);
    floor_fn(ctx);
  }
  for (int i = 0; i < o->iters; i++) {
    double t0 = bu_now_ms();
    ours(ctx);
    double t1 = bu_now_ms();
    floor_fn(ctx);
    double t2 = bu_now_ms();
    a[i] = t1 - t0;
    b[i] = t2 - t1;
  }
  *ours_ms = bu_median(a, o->iters);
  *floor_ms = bu_median(b, o->iters);
  free(a);
  free(b);
  return 0;
}

/* Writes s as a JSON string (quotes, backslashes and control characters
 * escaped: the reason can quote an environment variable's value). */
static inline void bu_json_str(FILE *f, const char *s) {
  fputc('"', f);
  for (; *s; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\')
      fprintf(f, "\\%c", ch);
    else if (ch < 0x20)
      fprintf(f, "\\u%04x", ch);
    else
      fputc(ch, f);
  }
  fputc('"', f);
}

/* The rest of the result line, from "kernel" on. */
static inline void bu_report_kernel(void) {
  printf("\"kernel\": ");
  bu_json_str(stdout, ad_blas_kernel());
  printf(", \"kernel_reason\": ");
  bu_json_str(stdout, ad_blas_reason());
  printf("}\n");
  fflush(stdout);
}

/* The result line bench/run.py reads. */
static inline void bu_report(const char *workload, const bu_opts *o, double ours_ms,
                             double floor_ms) {
  printf("{\"workload\": \"%s\", \"threads\": %d, \"iters\": %d, \"ours_ms\": %.4f, "
         "\"floor_ms\": %.4f, ",
         workload, o->threads, o->iters, ours_ms, floor_ms);
  bu_report_kernel();
}

/* bu_report's line with one more field, the memory: peak_arena_bytes
 * (bl_stats: the arena high-water mark of one hypergradient). */
static inline void bu_report_peak(const char *workload, const bu_opts *o, double ours_ms,
                                  double floor_ms, size_t peak) {
  printf("{\"workload\": \"%s\", \"threads\": %d, \"iters\": %d, \"ours_ms\": %.4f, "
         "\"floor_ms\": %.4f, \"peak_arena_bytes\": %zu, ",
         workload, o->threads, o->iters, ours_ms, floor_ms, peak);
  bu_report_kernel();
}

/* Prints the tape's error and returns 1 if an op failed. */
static inline int bu_tape_failed(ad_tape *t, const char *where) {
  if (ad_tape_status(t) == AD_OK) return 0;
  fprintf(stderr, "%s: %s: %s\n", where, ad_status_str(ad_tape_status(t)), ad_tape_errmsg(t));
  return 1;
}

#endif
