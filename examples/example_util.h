/* example_util.h — the boring parts the examples share: the command line,
 * the thread count, loading the MNIST train and test splits, counting right
 * answers, a clock, and the check that a loss is still finite. Each example
 * keeps its model and its training loop; this header holds nothing an
 * example is meant to teach.
 *
 * Header-only (static functions): examples/CMakeLists.txt makes every .c
 * file in examples/ an executable. Define _POSIX_C_SOURCE 200809L before
 * the first include (clock_gettime).
 *
 * The command line, in one table. Each option names the variable it sets;
 * the value that variable holds before the call is the default --help
 * prints:
 *
 *     int epochs = 15, threads = 0;   // threads 0: not given (see ex_set_threads)
 *     double lr = 0.2;
 *     const char *data = NULL;
 *     const ex_opt opts[] = {
 *         {"--epochs", EX_INT, &epochs, "N", .help = "passes over the training set", .max = 1e4},
 *         {"--lr", EX_DOUBLE, &lr, "LR", .help = "learning rate", .max = 100, .gt_min = 1},
 *         {"--data", EX_STR, &data, "DIR", .help = "MNIST-format IDX files"},
 *         EX_OPT_THREADS(&threads),
 *         {0}};                        // the table ends with an empty entry
 *     ex_parse_args(argc, argv, "trains an MLP on MNIST", opts);
 *     ex_set_threads(threads);
 *
 * The help line and the bounds are named (.help =, .min =): a table entry
 * lists only what it needs, the rest is zero. A string from a fixed set and
 * a flag without a value:
 *
 *     {"--method", EX_STR, &method, "M", .help = "hypergradient method",
 *      .choices = (const char *const[]){"unroll", "cg", NULL}},
 *     {"--quiet", EX_FLAG, &quiet, NULL, .help = "no progress lines"},
 *
 * ex_parse_args accepts "--name value" and "--name=value". --help (or -h)
 * prints the usage and every option with its default on stdout and exits 0.
 * Anything else it cannot take prints "prog: what was wrong", the usage
 * line and a pointer to --help on stderr and exits with status 2: an
 * unknown option, a positional argument, a missing value (also a value that
 * starts with "--", which is the next option, not a value), a number with
 * trailing characters ("12abc"), NaN or infinity, a value outside
 * [min, max], a string not among `choices`. It runs before anything is
 * allocated, so exiting from it leaks nothing.
 *
 * Types and their variables: EX_INT int, EX_I64 int64_t, EX_U64 uint64_t,
 * EX_DOUBLE double (finite only), EX_STR const char * (points into argv),
 * EX_FLAG int (no value; set to 1). Bounds: min <= value <= max, with
 * gt_min = 1 making it min < value; min == max == 0 means no bound beyond
 * the type's range (so "> 0, no upper bound" needs a max, e.g. 1e300). --help shows a default only
 * when it lies in the accepted range, so an out-of-range initial value (threads = 0) can mean "not
 * given".
 *
 * After parsing, a check the table cannot express (two options that
 * contradict each other) reports through ex_usage_error(fmt, ...), which
 * prints like the parser and exits 2. */
#ifndef HT_EXAMPLE_UTIL_H
#define HT_EXAMPLE_UTIL_H

#include "autodiff/ad.h"
#include "datasets/ds.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---------------------------------------------------------------- command line */

typedef enum { EX_INT, EX_I64, EX_U64, EX_DOUBLE, EX_STR, EX_FLAG } ex_type;

typedef struct {
  const char *name; /* "--epochs" */
  ex_type type;
  void *dst;                  /* the variable it sets (see the types above) */
  const char *meta;           /* the value's placeholder in the usage ("N"); NULL for EX_FLAG */
  const char *help;           /* one line for --help */
  double min, max;            /* numbers: accepted range (both 0: the type's whole range) */
  int gt_min;                 /* 1: the lower bound is strict (value > min) */
  const char *const *choices; /* EX_STR: NULL-terminated accepted values, or NULL: any */
} ex_opt;

/* --threads, the same on every example: 0 (not given) leaves the library's
 * default, $HYPERTAPE_THREADS or 1; ex_set_threads applies it. */
#define EX_OPT_THREADS(dst)                                                                        \
  {                                                                                                \
    "--threads", EX_INT, (dst), "N",                                                               \
        "threads inside each GEMM (default: $HYPERTAPE_THREADS, else 1)", .min = 1, .max = 256     \
  }

/* What ex_usage_error needs: set by ex_parse_args. */
static const char *ex__prog = "example";
static const ex_opt *ex__opts = NULL;

/* "usage: prog [--a N] [--b]..." wrapped at 80 columns, on f. */
static inline void ex__synopsis(FILE *f) {
  int col = fprintf(f, "usage: %s", ex__prog);
  int indent = (int)strlen("usage: ") + (int)strlen(ex__prog);
  for (const ex_opt *o = ex__opts; o && o->name; o++) {
    int len = (int)strlen(o->name) + 3 + (o->meta ? (int)strlen(o->meta) + 1 : 0);
    if (col + len > 80) col = fprintf(f, "\n%*s", indent, "") - 1;
    col += o->meta ? fprintf(f, " [%s %s]", o->name, o->meta) : fprintf(f, " [%s]", o->name);
  }
  fprintf(f, "%s [--help]\n", col + 9 > 80 ? "\n       " : "");
}

/* Prints "prog: <message>", the usage line and a pointer to --help on
 * stderr, and exits 2: for a check on the options the table cannot make. */
static inline void ex_usage_error(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "%s: ", ex__prog);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  ex__synopsis(stderr);
  fprintf(stderr, "run '%s --help' for what each option does\n", ex__prog);
  exit(2);
}

/* The accepted range of a number option, as words: "0 to 10000", "> 0". */
static inline void ex__range(const ex_opt *o, char *buf, size_t n) {
  if (o->min == 0 && o->max == 0)
    snprintf(buf, n, "any");
  else if (o->gt_min)
    snprintf(buf, n, "> %.15g and <= %.15g", o->min, o->max);
  else
    snprintf(buf, n, "%.15g to %.15g", o->min, o->max);
}

static inline int ex__in_range(const ex_opt *o, double v) {
  if (o->min == 0 && o->max == 0) return 1;
  return (o->gt_min ? v > o->min : v >= o->min) && v <= o->max;
}

/* The current value of o's variable as --help shows it ("" for none). */
static inline void ex__default(const ex_opt *o, char *buf, size_t n) {
  buf[0] = 0;
  switch (o->type) {
  case EX_INT:
    if (ex__in_range(o, *(int *)o->dst)) snprintf(buf, n, "%d", *(int *)o->dst);
    break;
  case EX_I64:
    if (ex__in_range(o, (double)*(int64_t *)o->dst))
      snprintf(buf, n, "%lld", (long long)*(int64_t *)o->dst);
    break;
  case EX_U64:
    if (ex__in_range(o, (double)*(uint64_t *)o->dst))
      snprintf(buf, n, "%llu", (unsigned long long)*(uint64_t *)o->dst);
    break;
  case EX_DOUBLE:
    if (ex__in_range(o, *(double *)o->dst)) snprintf(buf, n, "%g", *(double *)o->dst);
    break;
  case EX_STR:
    if (*(const char **)o->dst) snprintf(buf, n, "%s", *(const char **)o->dst);
    break;
  case EX_FLAG:
    break;
  }
}

/* Prints text word-wrapped at 80 columns; continuation lines are indented
 * by `indent`, the first line starts at column `col`. */
static inline void ex__wrap(const char *text, int col, int indent) {
  while (*text) {
    while (*text == ' ') text++;
    size_t w = strcspn(text, " ");
    if (col > indent && col + 1 + (int)w > 80)
      col = printf("\n%*s", indent, "") - 1;
    else if (col > indent)
      col += printf(" ");
    col += printf("%.*s", (int)w, text);
    text += w;
  }
  printf("\n");
}

static inline void ex__help(const char *about) {
  ex__synopsis(stdout);
  if (about) ex__wrap(about, 0, 0);
  printf("\noptions:\n");
  for (const ex_opt *o = ex__opts; o->name; o++) {
    char head[64], def[128], range[64], text[1024];
    snprintf(head, sizeof head, "%s%s%s", o->name, o->meta ? " " : "", o->meta ? o->meta : "");
    ex__default(o, def, sizeof def);
    size_t used = (size_t)snprintf(text, sizeof text, "%s", o->help ? o->help : "");
    if (o->type != EX_STR && o->type != EX_FLAG && !(o->min == 0 && o->max == 0)) {
      ex__range(o, range, sizeof range);
      used += (size_t)snprintf(text + used, sizeof text - used, " [%s]", range);
    }
    for (const char *const *c = o->choices; c && *c && used < sizeof text; c++)
      used += (size_t)snprintf(text + used, sizeof text - used, "%s%s%s",
                               c == o->choices ? " (one of: " : ", ", *c, c[1] ? "" : ")");
    if (def[0] && used < sizeof text)
      snprintf(text + used, sizeof text - used, " (default %s)", def);
    ex__wrap(text, printf("  %-19s", head), 21);
  }
  printf("  %-19sprint this help and exit\n", "--help");
}

/* Parses v as o's type into o's variable, or exits 2 naming what is wrong. */
static inline void ex__set(const ex_opt *o, const char *v) {
  char range[64], *end = NULL;
  ex__range(o, range, sizeof range);
  /* strtod/strtoll skip leading blanks and strtoull takes "-1" as 2^64-1:
   * refuse both so the value is exactly what the user meant. */
  int blank = v[0] == ' ' || v[0] == '\t' || v[0] == '\n';
  errno = 0;
  if (o->type == EX_STR) {
    if (o->choices) {
      const char *const *c = o->choices;
      while (*c && strcmp(*c, v) != 0) c++;
      if (!*c) {
        char list[512] = "";
        size_t used = 0;
        for (c = o->choices; *c && used < sizeof list; c++)
          used += (size_t)snprintf(list + used, sizeof list - used, "%s%s",
                                   c == o->choices ? "" : ", ", *c);
        ex_usage_error("%s: '%s' is not one of %s", o->name, v, list);
      }
    }
    *(const char **)o->dst = v;
  } else if (o->type == EX_DOUBLE) {
    double x = blank ? 0 : strtod(v, &end);
    if (blank || end == v || *end) ex_usage_error("%s: '%s' is not a number", o->name, v);
    if (!isfinite(x)) ex_usage_error("%s: '%s' is not a finite number", o->name, v);
    if (errno == ERANGE) ex_usage_error("%s: '%s' is too small to represent", o->name, v);
    if (!ex__in_range(o, x))
      ex_usage_error("%s: %s is out of range (expected %s)", o->name, v, range);
    *(double *)o->dst = x;
  } else if (o->type == EX_U64) {
    unsigned long long x = blank || v[0] == '-' ? 0 : strtoull(v, &end, 10);
    if (blank || v[0] == '-' || end == v || *end)
      ex_usage_error("%s: '%s' is not a non-negative integer", o->name, v);
    if (errno == ERANGE || !ex__in_range(o, (double)x))
      ex_usage_error("%s: %s is out of range (expected %s)", o->name, v,
                     o->min == 0 && o->max == 0 ? "0 to 18446744073709551615" : range);
    *(uint64_t *)o->dst = x;
  } else {
    long long x = blank ? 0 : strtoll(v, &end, 10);
    if (blank || end == v || *end) ex_usage_error("%s: '%s' is not an integer", o->name, v);
    int fits = errno != ERANGE && (o->type == EX_I64 || (x >= INT_MIN && x <= INT_MAX));
    if (!fits || !ex__in_range(o, (double)x))
      ex_usage_error("%s: %s is out of range (expected %s)", o->name, v, range);
    if (o->type == EX_INT)
      *(int *)o->dst = (int)x;
    else
      *(int64_t *)o->dst = x;
  }
}

/* Parses argv against the table opts (ended by an entry with name NULL);
 * see the top of this file. Returns only when every argument was taken. */
static inline void ex_parse_args(int argc, char **argv, const char *about, const ex_opt *opts) {
  const char *slash = argc > 0 && argv[0] ? strrchr(argv[0], '/') : NULL;
  ex__prog = slash ? slash + 1 : argc > 0 && argv[0] ? argv[0] : "example";
  ex__opts = opts;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      ex__help(about);
      exit(0);
    }
    if (strncmp(a, "--help=", 7) == 0) ex_usage_error("--help takes no value");
    if (a[0] == '-' && a[1] != '-' && a[1] != 0) ex_usage_error("unknown option '%s'", a);
    if (strncmp(a, "--", 2) != 0 || a[2] == 0)
      ex_usage_error("unexpected argument '%s' (every argument is an --option)", a);
    const char *eq = strchr(a, '=');
    size_t len = eq ? (size_t)(eq - a) : strlen(a);
    const ex_opt *o = opts;
    while (o->name && !(strlen(o->name) == len && strncmp(o->name, a, len) == 0)) o++;
    if (!o->name) ex_usage_error("unknown option '%.*s'", (int)len, a);
    if (o->type == EX_FLAG) {
      if (eq) ex_usage_error("%s takes no value", o->name);
      *(int *)o->dst = 1;
      continue;
    }
    const char *v = eq ? eq + 1 : i + 1 < argc ? argv[++i] : NULL;
    if (!v || (!eq && strncmp(v, "--", 2) == 0) || !v[0])
      ex_usage_error("%s needs a value (%s)", o->name, o->meta ? o->meta : "");
    ex__set(o, v);
  }
}

/* Applies a --threads value: n > 0 sets the GEMM threads; 0 (not given)
 * leaves the library's default, $HYPERTAPE_THREADS or 1. */
static inline void ex_set_threads(int n) {
  if (n > 0) ad_blas_set_threads(n);
}

/* ---------------------------------------------------------------- training */

/* 0 while loss is finite; otherwise prints "name: the training loss is nan
 * at <where> ..." on stderr and returns 1, for the caller to stop with a
 * non-zero exit status instead of training on garbage. */
static inline int ex_diverged(const char *name, double loss, const char *where) {
  if (isfinite(loss)) return 0;
  fprintf(stderr,
          "%s: the training loss is %s at %s: training diverged (a smaller learning rate "
          "may help); stopping\n",
          name,
          isnan(loss) ? "nan"
          : loss > 0  ? "inf"
                      : "-inf",
          where);
  return 1;
}

/* Monotonic wall clock in seconds. */
static inline double ex_now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---------------------------------------------------------------- MNIST */

/* What the MNIST programs share: their options' variables. */
typedef struct {
  const char *data;        /* NULL = the embedded subset */
  const char *load, *save; /* parameter files (nn_params_load / nn_params_save), or NULL */
  int epochs, threads;     /* threads 0: not given */
  int64_t limit;           /* use only the first `limit` train and test examples (0 = all) */
  uint64_t seed;
  double lr;
} ex_options;

/* The option table entries of ex_options (put them in a table, then {0}). */
#define EX_OPTS_MNIST(o)                                                                             \
  {"--data", EX_STR, &(o)->data, "DIR",                                                              \
   .help = "MNIST or Fashion-MNIST IDX files (default: the embedded subset)"},                       \
      {"--epochs", EX_INT, &(o)->epochs, "N", .help = "passes over the training set", .max = 10000}, \
      {"--seed", EX_U64, &(o)->seed, "S", .help = "seeds the initialisation and the batch order"},   \
      EX_OPT_THREADS(&(o)->threads),                                                                 \
      {"--lr", EX_DOUBLE, &(o)->lr, "LR", .help = "learning rate", .max = 100, .gt_min = 1},         \
      {"--limit",                                                                                    \
       EX_I64,                                                                                       \
       &(o)->limit,                                                                                  \
       "N",                                                                                          \
       .help = "only the first N train and test examples, 0 = all (quick runs, valgrind)",           \
       .max = 1e9},                                                                                  \
      {"--load", EX_STR, &(o)->load, "FILE",                                                         \
       .help = "start from parameters saved by --save (--epochs 0: evaluate only)"},                 \
  {                                                                                                  \
    "--save", EX_STR, &(o)->save, "FILE",                                                            \
        .help = "write the trained parameters (atomic, checksummed)"                                 \
  }

/* Loads the MNIST train and test splits (o->data, o->limit) and checks
 * that they hold 28x28 images. Returns 0 on success; otherwise prints
 * "name: why" and returns -1 (whatever was loaded is in *train / *test, for
 * the caller to free). */
static inline int ex_load_mnist(const char *name, const ex_options *o, ds_dataset **train,
                                ds_dataset **test) {
  const ds_mnist_opts lim = {.limit = o->limit};
  if (ds_mnist_load(train, o->data, "train", &lim) != AD_OK ||
      ds_mnist_load(test, o->data, "test", &lim) != AD_OK) {
    fprintf(stderr, "%s: %s\n", name, ds_errmsg());
    return -1;
  }
  if ((*train)->dim != 28 * 28 || (*test)->dim != 28 * 28) {
    fprintf(stderr, "%s: expected 28x28 images, got %lld features\n", name,
            (long long)(*train)->dim);
    return -1;
  }
  return 0;
}

/* Number of rows of f32 logits [n, c] whose largest entry (the first one,
 * on ties) is the label. */
static inline int64_t ex_hits(const ad_tensor *logits, const int32_t *labels) {
  int64_t n = logits->shape[0], c = logits->shape[1], k = 0;
  const float *z = logits->data;
  for (int64_t i = 0; i < n; i++) {
    int64_t best = 0;
    for (int64_t j = 1; j < c; j++)
      if (z[i * c + j] > z[i * c + best]) best = j;
    k += best == labels[i];
  }
  return k;
}

#endif
