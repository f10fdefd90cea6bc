/*
 * blas.c — GEMM through BLIS, with the kernel set chosen here rather than
 * trusted to BLIS's own CPU detection.
 *
 * Why not just call bli_sgemm: Debian's BLIS 0.9.0 knows CPUs up to AMD Zen 3
 * / Intel Skylake-X. On a newer CPU (AMD Zen 5, family 0x1A) its detection
 * answers "generic" and every GEMM runs the portable C kernels, 4-5x slower,
 * without a word. Its own override (BLIS_ARCH_TYPE) cannot rescue it: in
 * 0.9.0 the check of that variable runs before the kernel table is filled,
 * so any value aborts the process. The static archive still carries every
 * x86-64 context initialiser (bli_cntx_init_skx, _haswell, _zen3, ...), so
 * we ask BLIS what it detected and, when that is generic (or the user asks),
 * build the right context ourselves from the CPU's features and hand it to
 * the expert interface (bli_?gemm_ex).
 *
 * Known defect we live with: 0.9.0's haswell sup f32 kernels (used by the
 * haswell, zen* and our skx contexts) read up to one float past the end of
 * A or B on some edge shapes (upstream issue #635, PR #824; the value is
 * never used). Under valgrind this shows as "Invalid read of size 4" in
 * bli_sgemmsup_r[dv]_haswell_asm_*; suppress it there.
 *
 * Row-major to BLIS: a row-major m x k matrix with row stride ld is the BLIS
 * matrix (rs = ld, cs = 1); its transpose is the same memory read with the
 * strides swapped (rs = 1, cs = ld). No transpose is ever copied.
 */
#define _POSIX_C_SOURCE 200809L

/* blis.h is a third-party header that does not compile clean under our
 * warning flags (unused parameters and static functions, type limits); the
 * pragmas keep -Werror for our code and silence only the header. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wtype-limits"
#pragma GCC diagnostic ignored "-Wpedantic"
#include <blis.h>
#pragma GCC diagnostic pop

#include "ad.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ kernel sets */

#if defined(__x86_64__) || defined(__i386__)
#define AD_X86 1
#else
#define AD_X86 0
#endif

typedef enum { NEED_NONE, NEED_AVX2_FMA, NEED_AVX512 } cpu_need;

/* The kernel sets we know how to pick. `id` is BLIS's arch id, so that a
 * numeric BLIS_ARCH_TYPE can be read too. Only sets compiled into this BLIS
 * (BLIS_CONFIG_*) are listed, so the file links against a BLIS built for
 * fewer architectures. */
typedef struct {
  const char *name;
  arch_t id;
  void (*init)(cntx_t *);
  cpu_need need;
} arch_entry;

static const arch_entry k_archs[] = {
#ifdef BLIS_CONFIG_SKX
    {"skx", BLIS_ARCH_SKX, bli_cntx_init_skx, NEED_AVX512},
#endif
#ifdef BLIS_CONFIG_ZEN3
    {"zen3", BLIS_ARCH_ZEN3, bli_cntx_init_zen3, NEED_AVX2_FMA},
#endif
#ifdef BLIS_CONFIG_ZEN2
    {"zen2", BLIS_ARCH_ZEN2, bli_cntx_init_zen2, NEED_AVX2_FMA},
#endif
#ifdef BLIS_CONFIG_ZEN
    {"zen", BLIS_ARCH_ZEN, bli_cntx_init_zen, NEED_AVX2_FMA},
#endif
#ifdef BLIS_CONFIG_HASWELL
    {"haswell", BLIS_ARCH_HASWELL, bli_cntx_init_haswell, NEED_AVX2_FMA},
#endif
#ifdef BLIS_CONFIG_GENERIC
    {"generic", BLIS_ARCH_GENERIC, bli_cntx_init_generic, NEED_NONE},
#endif
};
#define N_ARCHS ((int)(sizeof k_archs / sizeof k_archs[0]))

static const arch_entry *arch_by_name(const char *s) {
  for (int i = 0; i < N_ARCHS; i++)
    if (strcmp(s, k_archs[i].name) == 0) return &k_archs[i];
  return NULL;
}

/* "skx|zen3|...|generic|auto": the values the override understands. Only
 * called from the one-time initialisation, so the static buffer is safe. */
static const char *known_names(void) {
  static char buf[96];
  size_t n = 0;
  buf[0] = '\0';
  for (int i = 0; i < N_ARCHS && n < sizeof buf; i++)
    n += (size_t)snprintf(buf + n, sizeof buf - n, "%s|", k_archs[i].name);
  if (n < sizeof buf) snprintf(buf + n, sizeof buf - n, "auto");
  return buf;
}

/* Accepts a name ("skx") or BLIS's numeric arch id ("0"), as BLIS_ARCH_TYPE
 * documents both. */
static const arch_entry *arch_by_name_or_id(const char *s) {
  const arch_entry *e = arch_by_name(s);
  if (e || !*s) return e;
  char *end = NULL;
  long v = strtol(s, &end, 10);
  if (*end) return NULL;
  for (int i = 0; i < N_ARCHS; i++)
    if ((long)k_archs[i].id == v) return &k_archs[i];
  return NULL;
}

/* CPU features, checked with the compiler's cpuid helpers, which also check
 * that the OS saves the AVX / AVX-512 register state (XGETBV). */
static int cpu_has_avx2_fma(void) {
#if AD_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return 0;
#endif
}

static int cpu_has_avx512(void) {
#if AD_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
  return 0;
#endif
}

static int cpu_is_amd(void) {
#if AD_X86
  __builtin_cpu_init();
  return __builtin_cpu_is("amd");
#else
  return 0;
#endif
}

static int cpu_can_run(const arch_entry *e) {
  switch (e->need) {
  case NEED_AVX512:
    return cpu_has_avx512();
  case NEED_AVX2_FMA:
    return cpu_has_avx2_fma();
  default:
    return 1;
  }
}

/* ------------------------------------------------------------ state */

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static cntx_t g_cntx_own; /* a context we built (override / fallback) */
static cntx_t *g_cntx;    /* what every GEMM passes to BLIS */
static char g_kernel[32];
static char g_reason[512];
static atomic_int g_threads; /* threads per GEMM, >= 1 after init */

/* Caps a thread request to something sane; never fails. */
static int clamp_threads(long n) {
  return n < 1 ? 1 : n > 256 ? 256 : (int)n;
}

/* Builds the context for `e`. skx in BLIS 0.9.0 has no small/skinny ("sup")
 * kernels, so on its own it packs even 128x10 problems and loses 2x on them
 * (measured on Zen 4: the MLP's five GEMMs take 976 us with skx vs 839 us
 * with zen3). We graft the AVX2 sup kernels, thresholds and block sizes of
 * zen3 (AMD) or haswell (Intel) onto it: large GEMMs use the AVX-512
 * microkernel, small ones the sup path (the fix upstream BLIS issue #645
 * describes for the same gap). */
static void build_context(const arch_entry *e, char *note, size_t note_len) {
  memset(&g_cntx_own, 0, sizeof g_cntx_own);
  e->init(&g_cntx_own);
  g_cntx = &g_cntx_own;
  note[0] = '\0';
#if defined(BLIS_CONFIG_SKX) && (defined(BLIS_CONFIG_HASWELL) || defined(BLIS_CONFIG_ZEN3))
  if (e->id == BLIS_ARCH_SKX) {
    static cntx_t sup;
    const char *sup_name = "haswell";
    memset(&sup, 0, sizeof sup);
#if defined(BLIS_CONFIG_ZEN3)
    if (cpu_is_amd()) {
      bli_cntx_init_zen3(&sup);
      sup_name = "zen3";
    } else
#endif
    {
#if defined(BLIS_CONFIG_HASWELL)
      bli_cntx_init_haswell(&sup);
#else
      bli_cntx_init_zen3(&sup);
      sup_name = "zen3";
#endif
    }
    memcpy(g_cntx_own.l3_sup_thresh, sup.l3_sup_thresh, sizeof sup.l3_sup_thresh);
    memcpy(g_cntx_own.l3_sup_handlers, sup.l3_sup_handlers, sizeof sup.l3_sup_handlers);
    memcpy(g_cntx_own.l3_sup_blkszs, sup.l3_sup_blkszs, sizeof sup.l3_sup_blkszs);
    memcpy(g_cntx_own.l3_sup_kers, sup.l3_sup_kers, sizeof sup.l3_sup_kers);
    memcpy(g_cntx_own.l3_sup_kers_prefs, sup.l3_sup_kers_prefs, sizeof sup.l3_sup_kers_prefs);
    snprintf(note, note_len, " (small shapes: %s sup kernels)", sup_name);
  }
#endif
}

/* What to use when nothing is requested: BLIS's own choice unless it is
 * generic, in which case the best set the CPU features allow. */
static void choose_auto(const char *prefix) {
  arch_t id = bli_arch_query_id();
  char note[96];
  if (id != BLIS_ARCH_GENERIC) {
    g_cntx = bli_gks_query_cntx();
    snprintf(g_kernel, sizeof g_kernel, "%s", bli_arch_string(id));
    snprintf(g_reason, sizeof g_reason, "%sBLIS detected %s", prefix, g_kernel);
    return;
  }
  const arch_entry *e = NULL;
  const char *why = "CPU has neither AVX-512 nor AVX2+FMA";
  if (cpu_has_avx512() && (e = arch_by_name("skx")) != NULL) {
    why = "CPU has AVX-512";
  } else if (cpu_has_avx2_fma()) {
    e = cpu_is_amd() ? arch_by_name("zen3") : NULL;
    if (!e) e = arch_by_name("haswell");
    why = cpu_is_amd() ? "CPU is AMD with AVX2+FMA" : "CPU has AVX2+FMA";
  }
  if (!e) e = arch_by_name("generic");
  if (!e) { /* a BLIS without the generic config: keep its own context */
    g_cntx = bli_gks_query_cntx();
    snprintf(g_kernel, sizeof g_kernel, "generic");
    snprintf(g_reason, sizeof g_reason, "%sBLIS fell back to generic; %s", prefix, why);
    return;
  }
  build_context(e, note, sizeof note);
  snprintf(g_kernel, sizeof g_kernel, "%s", e->name);
  snprintf(g_reason, sizeof g_reason, "%sBLIS fell back to generic; %s -> %s%s", prefix, why,
           e->name, note);
}

/* Tries a user request; returns 1 when it was taken, else writes in `why`
 * (for the reason string) what was wrong with it. */
static int try_request(const char *var, const char *val, char *why, size_t why_len) {
  const arch_entry *e = arch_by_name_or_id(val);
  char note[96];
  if (!e) {
    snprintf(why, why_len, "%s=%s is not one of %s; ", var, val, known_names());
    return 0;
  }
  if (!cpu_can_run(e)) {
    snprintf(why, why_len, "%s=%s needs %s, which this CPU lacks; ", var, val,
             e->need == NEED_AVX512 ? "AVX-512" : "AVX2+FMA");
    return 0;
  }
  build_context(e, note, sizeof note);
  snprintf(g_kernel, sizeof g_kernel, "%s", e->name);
  snprintf(g_reason, sizeof g_reason, "%s=%s%s", var, val, note);
  return 1;
}

static void blas_init(void) {
  char why[256] = "";
  char req[64] = "", blis_req[64] = "";
  const char *v = getenv("HYPERTAPE_BLIS_ARCH");
  if (v) snprintf(req, sizeof req, "%s", v);
  /* BLIS 0.9.0 aborts on any BLIS_ARCH_TYPE (see the top of the file), so
   * we read it as a request of our own and hide it from BLIS before BLIS
   * first initialises. This is the only environment change we make. */
  v = getenv("BLIS_ARCH_TYPE");
  if (v) {
    snprintf(blis_req, sizeof blis_req, "%s", v);
    unsetenv("BLIS_ARCH_TYPE");
  }

  const char *t = getenv("HYPERTAPE_THREADS");
  long nt = 1;
  if (t && *t) {
    char *end = NULL;
    long x = strtol(t, &end, 10);
    if (!*end) nt = x;
  }
  atomic_store(&g_threads, clamp_threads(nt));

  /* Lower-case the request so "SKX" works too. */
  for (char *p = req; *p; p++)
    if (*p >= 'A' && *p <= 'Z') *p = (char)(*p - 'A' + 'a');
  for (char *p = blis_req; *p; p++)
    if (*p >= 'A' && *p <= 'Z') *p = (char)(*p - 'A' + 'a');

  if (req[0] && strcmp(req, "auto") != 0) {
    if (try_request("HYPERTAPE_BLIS_ARCH", req, why, sizeof why)) return;
  } else if (blis_req[0]) {
    if (try_request("BLIS_ARCH_TYPE", blis_req, why, sizeof why)) return;
  }
  if (why[0]) {
    size_t n = strlen(why);
    snprintf(why + n, sizeof why - n, "auto: ");
  }
  choose_auto(why);
}

static void ensure_init(void) {
  pthread_once(&g_once, blas_init);
}

/* ------------------------------------------------------------ public */

/* Name of the kernel set every GEMM uses; initialises BLAS on first call. */
const char *ad_blas_kernel(void) {
  ensure_init();
  return g_kernel;
}

/* One sentence on why that kernel set was chosen. */
const char *ad_blas_reason(void) {
  ensure_init();
  return g_reason;
}

/* Threads inside each GEMM; values below 1 mean 1, above 256 mean 256. */
void ad_blas_set_threads(int n) {
  ensure_init();
  atomic_store(&g_threads, clamp_threads(n));
}

/* Threads inside each GEMM now (HYPERTAPE_THREADS or 1 until set). */
int ad_blas_threads(void) {
  ensure_init();
  return atomic_load(&g_threads);
}

/* Products below this many multiply-adds run on one thread (see make_rntm). */
#define SMALL_THREADED 262144.0

/* Runtime object for one call. BLIS's small/unpacked ("sup") path picks a
 * dot-product kernel when A is row-stored and B column-stored (row-major
 * C = A B^T), which is 2-5x slower than packing B first when n is not tiny
 * (Zen 4, 1 thread: 128x200x10 31.6 us unpacked, 7.1 us with B packed;
 * 784x200x10 188 us vs 37 us). With n or m tiny the unpacked kernel wins
 * (128x10x784: 22 us vs 47 us), hence the size guard. */
static void make_rntm(rntm_t *rn, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k) {
  rntm_t init = BLIS_RNTM_INITIALIZER;
  *rn = init;
  /* Below ~64^3 multiply-adds a second thread costs more in start-up and
   * synchronisation than it saves (mnist_mlp's 32x784x200 steps ran 20x
   * slower at 2 threads on a loaded 2-core machine). */
  int threads = (double)m * (double)n * (double)k < SMALL_THREADED ? 1 : atomic_load(&g_threads);
  bli_rntm_set_num_threads(threads, rn);
  if (!trans_a && trans_b && m >= 32 && n >= 32) bli_rntm_set_pack_b(TRUE, rn);
}

/* Checks what BLIS would otherwise abort on; returns 1 when the call has
 * work to do. Leading dimensions must cover the stored row. */
static int gemm_args_ok(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, const void *a,
                        int64_t lda, const void *b, int64_t ldb, const void *c, int64_t ldc) {
  if (m <= 0 || n <= 0 || k < 0 || !c || ldc < n) return 0;
  if (k == 0) return 1;
  if (!a || !b) return 0;
  if (lda < (trans_a ? m : k) || ldb < (trans_b ? k : n)) return 0;
  return 1;
}

/* C = alpha op(A) op(B) + beta C on row-major arrays. Invalid arguments
 * (non-positive sizes, NULL arrays, leading dimensions shorter than a row)
 * make the call a no-op. As in BLAS, beta = 0 means C is not read. */
void ad_gemm_f32(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c,
                 int64_t ldc) {
  if (!gemm_args_ok(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc)) return;
  ensure_init();
  if (k == 0 || alpha == 0.0f) { /* C = beta C without touching A, B */
    for (int64_t i = 0; i < m; i++)
      for (int64_t j = 0; j < n; j++) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  rntm_t rn;
  make_rntm(&rn, trans_a, trans_b, m, n, k);
  /* BLIS takes non-const pointers but does not write A or B. */
  bli_sgemm_ex(BLIS_NO_TRANSPOSE, BLIS_NO_TRANSPOSE, m, n, k, &alpha, (float *)a, trans_a ? 1 : lda,
               trans_a ? lda : 1, (float *)b, trans_b ? 1 : ldb, trans_b ? ldb : 1, &beta, c, ldc,
               1, g_cntx, &rn);
}

void ad_gemm_f64(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                 const double *a, int64_t lda, const double *b, int64_t ldb, double beta, double *c,
                 int64_t ldc) {
  if (!gemm_args_ok(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc)) return;
  ensure_init();
  if (k == 0 || alpha == 0.0) {
    for (int64_t i = 0; i < m; i++)
      for (int64_t j = 0; j < n; j++) c[i * ldc + j] = beta == 0.0 ? 0.0 : beta * c[i * ldc + j];
    return;
  }
  rntm_t rn;
  make_rntm(&rn, trans_a, trans_b, m, n, k);
  bli_dgemm_ex(BLIS_NO_TRANSPOSE, BLIS_NO_TRANSPOSE, m, n, k, &alpha, (double *)a,
               trans_a ? 1 : lda, trans_a ? lda : 1, (double *)b, trans_b ? 1 : ldb,
               trans_b ? ldb : 1, &beta, c, ldc, 1, g_cntx, &rn);
}
