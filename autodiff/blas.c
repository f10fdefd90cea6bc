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
 * Known defect we work around: 0.9.0's haswell sup f32 kernels (used by
 * the haswell, zen* and our skx contexts) read past the end of A or B on
 * edge shapes (upstream issue #635, PR #824; the values are never used).
 * Every case we have seen (valgrind over the test sweep; an ASan SEGV at a
 * page end for 1x33x7 with B transposed) has m or n of 1 or 2, or k below
 * the kernels' 8-float vector, so such products never go to the sup
 * kernels (see sup_safe): they take the direct loop or the packed path.
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
#include "ad_internal.h"
#include "ad_simd.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------ kernel sets */

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
 * that the OS saves the AVX-512 register state (XGETBV); AVX2+FMA is
 * ad__cpu_avx2_fma (ad_simd.h). */
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
    return ad__cpu_avx2_fma();
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
  return n < 1 ? 1 : n > AD_MAX_THREADS ? AD_MAX_THREADS : (int)n;
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
  } else if (ad__cpu_avx2_fma()) {
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

/* ------------------------------------------------------------ paths by measurement
 *
 * Which way of running a product is fastest depends on the CPU, the kernel
 * set and the shape, and a table tuned on one CPU is wrong on the next (the
 * MLP's 128x200x784 ran BLIS's AVX2 sup kernels at 117 GF/s on a Zen 5
 * where the packed skx path did 164-187). So every shape class (dtype,
 * transposes, m, n, k, threads) is timed once, on first use, on the
 * caller's own A and B into a scratch C, and the fastest path is kept for
 * the rest of the process:
 *   direct     our own loop (below), no BLIS framework at all: for tiny
 *              products, where BLIS's per-call set-up, thread control and
 *              buffer checkout cost as much as the arithmetic;
 *   sup        BLIS's small/unpacked kernels, whatever the thresholds say;
 *   sup+packA, sup+packB   the same with one operand packed first (the
 *              dot-product kernel sup picks for A row- and B column-stored
 *              is slow when both m and n are large);
 *   packed     BLIS's packed (Goto) path with the chosen kernel set;
 *   packed:ALT the packed path with a second kernel set the CPU can run
 *              (on AVX-512: the AVX2 set; on Zen: haswell), as the best
 *              block sizes differ between CPUs of one ISA; and
 *              packed:skx, BLIS's AVX-512 microkernel, when the CPU has
 *              AVX-512 but the chosen set is an AVX2 one (automatic mode);
 *   direct:avx512  the direct loop's AVX-512 build (16-float vectors,
 *              tiles for 32 registers), where the CPU and kernel set allow;
 *   narrow, narrow:avx512   our kernels for n <= 64 (f32), below;
 *   wide:avx512  our AVX-512 kernel for f32 products of any n that reads A
 *              in place and copies only op(B), 32 columns at a time
 *              (autodiff/gemm_wide.c): on a Zen 5 it ran the MLP's
 *              products at 195-207 GF/s where BLIS's best path did 159-181;
 *   packed:team  BLIS's packed path on its own OpenMP team, a candidate
 *              only on several threads and for large products (TEAM_MIN):
 *              every other path runs multi-thread products split over our
 *              worker pool (run_choice), which is measured per shape too.
 * Rounds alternate the candidates so a burst of load elsewhere hits all of
 * them; each one's fastest round counts. Products too large to time
 * cheaply (MEASURE_MAX) go to BLIS's own threshold rule ("blis"), which
 * picks the packed path for them anyway. */

typedef enum {
  P_BLIS,
  P_DIRECT,
  P_SUP,
  P_SUP_PA,
  P_SUP_PB,
  P_PACKED,
  P_PACKED_ALT,
  P_NARROW,
  P_NARROW512,
  P_PACKED_ALT2,
  P_WIDE512,
  P_DIRECT512,
  P_TEAM,
  N_PATHS
} gemm_path;
static const char *const k_path_names[N_PATHS] = {
    "blis",        "direct",        "sup",        "sup+packA",     "sup+packB",
    "packed",      "packed-alt",    "narrow",     "narrow:avx512", "packed-alt2",
    "wide:avx512", "direct:avx512", "packed:team"};

static cntx_t g_cntx_sup; /* g_cntx with the sup thresholds out of reach */
static cntx_t g_cntx_alt; /* a second kernel set for the packed path */
static int g_have_alt;
static cntx_t g_cntx_alt2; /* an AVX-512 set (skx) when the main one is AVX2 */
static int g_have_alt2;
static char g_alt2_name[48];
static int g_have_sup;           /* the kernel set has sup kernels and block sizes */
static char g_alt_name[48];      /* "packed:haswell" */
static int g_have_narrow;        /* the AVX2+FMA narrow kernel can run */
static int g_have_narrow512;     /* the AVX-512 one can, and the kernel set allows it */
static int g_have_wide512;       /* the same for the wide kernel (gemm_wide.c) */
static int g_have_direct512;     /* the same for the AVX-512 direct loop */
static atomic_int g_forced = -1; /* a gemm_path, or -1: measure */

/* Products below this many multiply-adds run on one thread (see threads_for). */
#define SMALL_THREADED 262144.0
/* The direct loop is a candidate up to this many multiply-adds (about
 * 64^3; above it BLIS's framework cost is a small fraction of the call). */
#define DIRECT_MAX 262144.0
/* Products above this many multiply-adds are not timed (one call would
 * take milliseconds); BLIS's own rule picks for them. */
#define MEASURE_MAX 134217728.0
/* BLIS's own thread team (packed:team) is a candidate from this many
 * multiply-adds (256^3): below it its start-up and barriers are not
 * amortised, and measuring it would start OpenMP threads that then spin
 * on the cores the pool needs. */
#define TEAM_MIN 16777216.0
/* Time spent measuring one shape class, at most (rounds stop there). */
#define MEASURE_BUDGET_NS 3000000.0
#define MEASURE_ROUNDS_MIN 3
#define MEASURE_ROUNDS_MAX 40

/* The ALT kernel set for the packed path, chosen by what the CPU can run
 * (not by its model): only in automatic mode, as an explicit request names
 * one kernel set. */
static void setup_paths(int requested) {
  g_cntx_sup = *g_cntx;
  for (int t = 0; t < BLIS_NUM_THRESH; t++)
    for (int d = 0; d < BLIS_NUM_FP_TYPES; d++) {
      g_cntx_sup.l3_sup_thresh[t].v[d] = (dim_t)1 << 40;
      g_cntx_sup.l3_sup_thresh[t].e[d] = (dim_t)1 << 40;
    }
  /* The generic set has no sup block sizes (BLIS then divides by zero if
   * sup is forced), so sup is a candidate only where they are all set. */
  g_have_sup = 1;
  const bszid_t need[] = {BLIS_MR, BLIS_NR, BLIS_MC, BLIS_KC, BLIS_NC};
  for (size_t i = 0; i < sizeof need / sizeof need[0]; i++)
    if (g_cntx->l3_sup_blkszs[need[i]].v[BLIS_FLOAT] <= 0 ||
        g_cntx->l3_sup_blkszs[need[i]].v[BLIS_DOUBLE] <= 0)
      g_have_sup = 0;
  g_have_alt = g_have_alt2 = 0;
  if (requested) return;
#ifdef BLIS_CONFIG_SKX
  /* BLIS's own pick on an AVX-512 CPU it does not know may be an AVX2 set
   * (Zen 4 is detected as zen3); its skx microkernel is then one more
   * candidate for the packed path. */
  if (strcmp(g_kernel, "skx") != 0 && cpu_has_avx512()) {
    memset(&g_cntx_alt2, 0, sizeof g_cntx_alt2);
    bli_cntx_init_skx(&g_cntx_alt2);
    g_have_alt2 = 1;
    snprintf(g_alt2_name, sizeof g_alt2_name, "packed:skx");
  }
#endif
  const char *alt = NULL;
  if (strcmp(g_kernel, "skx") == 0)
    alt = cpu_is_amd() ? "zen3" : "haswell";
  else if (strncmp(g_kernel, "zen", 3) == 0)
    alt = "haswell";
  else if (strcmp(g_kernel, "haswell") == 0 && cpu_is_amd())
    alt = "zen3";
  const arch_entry *e = alt ? arch_by_name(alt) : NULL;
  if (!e || !cpu_can_run(e)) return;
  memset(&g_cntx_alt, 0, sizeof g_cntx_alt);
  e->init(&g_cntx_alt);
  g_have_alt = 1;
  snprintf(g_alt_name, sizeof g_alt_name, "packed:%s", e->name);
}

static const char *path_name(int p) {
  if (p == P_PACKED_ALT) return g_have_alt ? g_alt_name : "packed-alt";
  if (p == P_PACKED_ALT2) return g_have_alt2 ? g_alt2_name : "packed-alt2";
  return p >= 0 && p < N_PATHS ? k_path_names[p] : "?";
}

/* ---- the direct loop
 *
 * C = alpha op(A) op(B) + beta C for tiny products, in register tiles of
 * MR rows x NR columns of C: per k step one NR-wide row segment of op(B)
 * (NV vectors) and MR broadcasts of op(A). A column panel of op(B) is read
 * in place when B is not transposed and the panel is whole; otherwise it is
 * first copied, zero-padded, into a k x NR buffer (cheap next to the MR x k
 * x NR multiply-adds each panel serves). A partial row tile repeats its
 * last row (valid memory) and stores only the rows that exist. The order
 * of additions is fixed (p ascending for every element), so repeated calls
 * give the same bits. The body is written with GCC/Clang vector types and
 * compiled twice: for AVX2+FMA (taken when the CPU has them, with a*b+c
 * contracted to vfmadd) and for the baseline ISA. */
#include <math.h>

/* One column panel of C (columns j0 .. j0 + nr - 1, nr <= VL NV) over
 * all m rows; `panel` holds op(B)'s columns of it with row stride lp. */
#define AD_DIRECT_PANEL(NAME, T, VT, VTU, VL, NV, MR, ATTR)                                        \
  ATTR static inline void NAME(int64_t m, int64_t nr, int64_t k, T alpha, const T *a, int64_t ars, \
                               int64_t acs, const T *panel, int64_t lp, T beta, T *c,              \
                               int64_t ldc) {                                                      \
    for (int64_t i0 = 0; i0 < m; i0 += MR) {                                                       \
      const int64_t mr = m - i0 < MR ? m - i0 : MR;                                                \
      const T *ar[MR];                                                                             \
      for (int r = 0; r < MR; r++) ar[r] = a + (i0 + (r < mr ? r : mr - 1)) * ars;                 \
      VT acc[MR][NV];                                                                              \
      for (int r = 0; r < MR; r++)                                                                 \
        for (int v = 0; v < NV; v++) acc[r][v] = (VT){0};                                          \
      for (int64_t p = 0; p < k; p++) {                                                            \
        VT bv[NV];                                                                                 \
        for (int v = 0; v < NV; v++) bv[v] = *(const VTU *)(panel + p * lp + v * VL);              \
        for (int r = 0; r < MR; r++) {                                                             \
          const T av = ar[r][p * acs];                                                             \
          for (int v = 0; v < NV; v++) acc[r][v] = av * bv[v] + acc[r][v];                         \
        }                                                                                          \
      }                                                                                            \
      for (int64_t r = 0; r < mr; r++) {                                                           \
        T out[VL * NV];                                                                            \
        for (int v = 0; v < NV; v++) *(VTU *)(out + v * VL) = acc[r][v];                           \
        T *cr = c + (i0 + r) * ldc;                                                                \
        if (beta == 0)                                                                             \
          for (int64_t j = 0; j < nr; j++) cr[j] = alpha * out[j];                                 \
        else                                                                                       \
          for (int64_t j = 0; j < nr; j++) cr[j] = alpha * out[j] + beta * cr[j];                  \
      }                                                                                            \
    }                                                                                              \
  }

/* The whole product: panels of 2 VL columns, and a last one of VL when
 * that is enough (n = 1 or 10 products then do not pay for a double-width
 * tile of zeros). */
#define AD_DIRECT_KERNEL(NAME, T, VT, VTU, VL, MR, ATTR)                                           \
  AD_DIRECT_PANEL(NAME##_p1, T, VT, VTU, VL, 1, MR, ATTR)                                          \
  AD_DIRECT_PANEL(NAME##_p2, T, VT, VTU, VL, 2, MR, ATTR)                                          \
  ATTR static void NAME(int ta, int tb, int64_t m, int64_t n, int64_t k, T alpha, const T *a,      \
                        int64_t lda, const T *b, int64_t ldb, T beta, T *c, int64_t ldc, T *bp) {  \
    const int64_t ars = ta ? 1 : lda, acs = ta ? lda : 1; /* A(i, p) = a[i ars + p acs] */         \
    for (int64_t j0 = 0; j0 < n;) {                                                                \
      const int64_t left = n - j0, w = left > VL ? 2 * VL : VL, nr = left < w ? left : w;          \
      const T *panel; /* op(B)[p, j0 + j] = panel[p lp + j] */                                     \
      int64_t lp;                                                                                  \
      if (!tb && nr == w) {                                                                        \
        panel = b + j0;                                                                            \
        lp = ldb;                                                                                  \
      } else {                                                                                     \
        for (int64_t p = 0; p < k; p++)                                                            \
          for (int64_t j = 0; j < w; j++)                                                          \
            bp[p * w + j] = j >= nr ? 0 : tb ? b[(j0 + j) * ldb + p] : b[p * ldb + j0 + j];        \
        panel = bp;                                                                                \
        lp = w;                                                                                    \
      }                                                                                            \
      if (w == VL)                                                                                 \
        NAME##_p1(m, nr, k, alpha, a, ars, acs, panel, lp, beta, c + j0, ldc);                     \
      else                                                                                         \
        NAME##_p2(m, nr, k, alpha, a, ars, acs, panel, lp, beta, c + j0, ldc);                     \
      j0 += nr;                                                                                    \
    }                                                                                              \
  }

/* Columns of a tile, the bound on the panel copy below. */
#define DIRECT_NR_MAX 16

#if AD_X86 && defined(__GNUC__)
/* f32 rows per tile: 5 (10 accumulators + 2 B + 1 broadcast of the 16
 * registers). On Zen 4, 4 rows ran MAML's 10x40x40 at 48 GF/s and 5 at
 * 84-86 (6: 74, 8: 38, spilling). */
AD_DIRECT_KERNEL(direct_s_avx2, float, ad_v8f, ad_v8fu, 8, 5, AD_AVX2_ATTR)
AD_DIRECT_KERNEL(direct_d_avx2, double, ad_v4d, ad_v4du, 4, 4, AD_AVX2_ATTR)
#include <immintrin.h>
/* The AVX-512 build. Written apart from AD_DIRECT_KERNEL because masks
 * change its shape: a panel is up to 3 vectors wide (48 floats, 24
 * doubles) and its last vector is loaded and stored under a lane mask, so
 * B is read in place whenever it is not transposed, whatever n (MAML's n
 * = 40 is one panel of 2 whole vectors and 8 lanes, no copy), and C is
 * written with vector stores. With 32 registers, tiles of up to 10 rows
 * for 1-2 vectors (20 accumulators) and 5 for 3 (15); a partial tile runs
 * with exactly the rows left (its count a constant in each branch), so
 * m = 10 is one or two whole tiles and no row is computed twice. Each
 * element is still the sum over p ascending. */
#define D512_MRMAX 10
#define AD_D512_TILE(NAME, T, VT, VTU, VL, NV, LDM, STM)                                           \
  __attribute__((always_inline)) AD_AVX512_ATTR static inline void NAME(                           \
      const int R, int64_t k, T alpha, const T *a, int64_t ars, int64_t acs, const T *panel,       \
      int64_t lp, T beta, T *c, int64_t ldc, unsigned lm) {                                        \
    VT acc[D512_MRMAX][NV];                                                                        \
    for (int r = 0; r < R; r++)                                                                    \
      for (int v = 0; v < NV; v++) acc[r][v] = (VT){0};                                            \
    for (int64_t p = 0; p < k; p++) {                                                              \
      VT bv[NV];                                                                                   \
      const T *pr = panel + p * lp;                                                                \
      for (int v = 0; v < NV - 1; v++) bv[v] = *(const VTU *)(pr + v * VL);                        \
      bv[NV - 1] = LDM(pr + (NV - 1) * VL, lm);                                                    \
      for (int r = 0; r < R; r++) {                                                                \
        const T av = a[r * ars + p * acs];                                                         \
        for (int v = 0; v < NV; v++) acc[r][v] = av * bv[v] + acc[r][v];                           \
      }                                                                                            \
    }                                                                                              \
    for (int r = 0; r < R; r++) {                                                                  \
      T *cr = c + r * ldc;                                                                         \
      for (int v = 0; v < NV; v++) {                                                               \
        const unsigned mv = v == NV - 1 ? lm : ~0u;                                                \
        VT out = alpha * acc[r][v];                                                                \
        if (beta != 0) out = out + beta * LDM(cr + v * VL, mv);                                    \
        STM(cr + v * VL, mv, out);                                                                 \
      }                                                                                            \
    }                                                                                              \
  }
#define AD_D512_LEFT(TILE, MR, R, left, ...) else if (R < MR && left == R) TILE(R, __VA_ARGS__);
/* All m rows of one panel of NV vectors (MR rows per tile). */
#define AD_D512_PANEL(NAME, T, VT, VTU, VL, NV, MR, LDM, STM)                                      \
  AD_D512_TILE(NAME##_tile, T, VT, VTU, VL, NV, LDM, STM)                                          \
  AD_AVX512_ATTR static void NAME(int64_t m, int64_t k, T alpha, const T *a, int64_t ars,          \
                                  int64_t acs, const T *panel, int64_t lp, T beta, T *c,           \
                                  int64_t ldc, unsigned lm) {                                      \
    int64_t i0 = 0;                                                                                \
    for (; i0 + MR <= m; i0 += MR)                                                                 \
      NAME##_tile(MR, k, alpha, a + i0 * ars, ars, acs, panel, lp, beta, c + i0 * ldc, ldc, lm);   \
    const int64_t left = m - i0;                                                                   \
    a += i0 * ars, c += i0 * ldc;                                                                  \
    if (left <= 0) {                                                                               \
    }                                                                                              \
    AD_D512_LEFT(NAME##_tile, MR, 1, left, k, alpha, a, ars, acs, panel, lp, beta, c, ldc, lm)     \
    AD_D512_LEFT(NAME##_tile, MR, 2, left, k, alpha, a, ars, acs, panel, lp, beta, c, ldc, lm)     \
    AD_D512_LEFT(NAME##_tile, MR, 3, left, k, alpha, a, ars, acs, panel, lp, beta, c, ldc, lm)     \
    AD_D512_LEFT(NAME##_tile, MR, 4, left, k, alpha, a, ars, acs, panel, lp, beta, c, ldc, lm)     \
    AD_D512_LEFT(NAME##_tile, MR, 5, left, k, alpha, a, ars, acs, panel, lp, beta, c, ldc, lm)     \
    AD_D512_LEFT(NAME##_tile, MR, 6, left, k, alpha, a, ars, acs, panel, lp, beta, c, ldc, lm)     \
    AD_D512_LEFT(NAME##_tile, MR, 7, left, k, alpha, a, ars, acs, panel, lp, beta, c, ldc, lm)     \
    AD_D512_LEFT(NAME##_tile, MR, 8, left, k, alpha, a, ars, acs, panel, lp, beta, c, ldc, lm)     \
    AD_D512_LEFT(NAME##_tile, MR, 9, left, k, alpha, a, ars, acs, panel, lp, beta, c, ldc, lm)     \
  }
/* The whole product: panels of 3 vectors, the last one as narrow as its
 * columns allow; op(B) copied (zero-padded) only when B is transposed. */
#define AD_D512_KERNEL(NAME, T, VT, VTU, VL, LDM, STM)                                             \
  AD_D512_PANEL(NAME##_p1, T, VT, VTU, VL, 1, 10, LDM, STM)                                        \
  AD_D512_PANEL(NAME##_p2, T, VT, VTU, VL, 2, 10, LDM, STM)                                        \
  AD_D512_PANEL(NAME##_p3, T, VT, VTU, VL, 3, 5, LDM, STM)                                         \
  AD_AVX512_ATTR static void NAME(int ta, int tb, int64_t m, int64_t n, int64_t k, T alpha,        \
                                  const T *a, int64_t lda, const T *b, int64_t ldb, T beta, T *c,  \
                                  int64_t ldc, T *bp) {                                            \
    const int64_t ars = ta ? 1 : lda, acs = ta ? lda : 1;                                          \
    for (int64_t j0 = 0; j0 < n;) {                                                                \
      const int64_t left = n - j0, nr = left < 3 * VL ? left : 3 * VL, nv = (nr + VL - 1) / VL;    \
      const int64_t last = nr - (nv - 1) * VL;                                                     \
      const unsigned lm = last >= 32 ? ~0u : (1u << last) - 1u;                                    \
      const T *panel;                                                                              \
      int64_t lp;                                                                                  \
      if (!tb) {                                                                                   \
        panel = b + j0;                                                                            \
        lp = ldb;                                                                                  \
      } else {                                                                                     \
        for (int64_t p = 0; p < k; p++)                                                            \
          for (int64_t j = 0; j < nv * VL; j++)                                                    \
            bp[p * nv * VL + j] = j < nr ? b[(j0 + j) * ldb + p] : 0;                              \
        panel = bp;                                                                                \
        lp = nv * VL;                                                                              \
      }                                                                                            \
      if (nv == 1)                                                                                 \
        NAME##_p1(m, k, alpha, a, ars, acs, panel, lp, beta, c + j0, ldc, lm);                     \
      else if (nv == 2)                                                                            \
        NAME##_p2(m, k, alpha, a, ars, acs, panel, lp, beta, c + j0, ldc, lm);                     \
      else                                                                                         \
        NAME##_p3(m, k, alpha, a, ars, acs, panel, lp, beta, c + j0, ldc, lm);                     \
      j0 += nr;                                                                                    \
    }                                                                                              \
  }
#define D512_LDM_S(p, m) ((ad_v16f)_mm512_maskz_loadu_ps((__mmask16)(m), (p)))
#define D512_STM_S(p, m, v) _mm512_mask_storeu_ps((p), (__mmask16)(m), (__m512)(v))
#define D512_LDM_D(p, m) ((ad_v8d)_mm512_maskz_loadu_pd((__mmask8)(m), (p)))
#define D512_STM_D(p, m, v) _mm512_mask_storeu_pd((p), (__mmask8)(m), (__m512d)(v))
AD_D512_KERNEL(direct_s_avx512, float, ad_v16f, ad_v16fu, 16, D512_LDM_S, D512_STM_S)
AD_D512_KERNEL(direct_d_avx512, double, ad_v8d, ad_v8du, 8, D512_LDM_D, D512_STM_D)
#define AD_HAVE_DIRECT512 1
#else
#define AD_HAVE_DIRECT512 0
#endif
AD_DIRECT_KERNEL(direct_s_base, float, ad_v4f, ad_v4fu, 4, 4, )
AD_DIRECT_KERNEL(direct_d_base, double, ad_v2d, ad_v2du, 2, 4, )

typedef void (*direct_s_fn)(int, int, int64_t, int64_t, int64_t, float, const float *, int64_t,
                            const float *, int64_t, float, float *, int64_t, float *);
typedef void (*direct_d_fn)(int, int, int64_t, int64_t, int64_t, double, const double *, int64_t,
                            const double *, int64_t, double, double *, int64_t, double *);
static direct_s_fn g_direct_s = direct_s_base;
static direct_d_fn g_direct_d = direct_d_base;

/* Runs the direct loop with a scratch for one copied panel of op(B): on the
 * stack when small, else malloc (returns 0 if that fails, so the caller
 * can go through BLIS instead). */
#define DIRECT_STACK 4096
static int run_direct(int w512, int dt, int ta, int tb, int64_t m, int64_t n, int64_t k,
                      const void *alpha, const void *a, int64_t lda, const void *b, int64_t ldb,
                      const void *beta, void *c, int64_t ldc) {
  double stack[DIRECT_STACK]; /* room for DIRECT_STACK doubles or 2x floats */
  void *bp = stack;
  /* one zero-padded k x NR panel (AVX-512: 48 floats or 24 doubles wide) */
  const size_t es = dt == AD_F64 ? sizeof(double) : sizeof(float);
  size_t need = (size_t)k * (w512 ? (dt == AD_F64 ? 24 : 48) : DIRECT_NR_MAX) * es;
  if (need > sizeof stack) {
    bp = malloc(need);
    if (!bp) return 0;
  }
#if AD_HAVE_DIRECT512
  if (w512) {
    if (dt == AD_F64)
      direct_d_avx512(ta, tb, m, n, k, *(const double *)alpha, a, lda, b, ldb,
                      *(const double *)beta, c, ldc, bp);
    else
      direct_s_avx512(ta, tb, m, n, k, *(const float *)alpha, a, lda, b, ldb, *(const float *)beta,
                      c, ldc, bp);
  } else
#endif
      if (dt == AD_F64)
    g_direct_d(ta, tb, m, n, k, *(const double *)alpha, a, lda, b, ldb, *(const double *)beta, c,
               ldc, bp);
  else
    g_direct_s(ta, tb, m, n, k, *(const float *)alpha, a, lda, b, ldb, *(const float *)beta, c, ldc,
               bp);
  if (bp != stack) free(bp);
  return 1;
}

/* ---- the narrow kernels (n <= NARROW_N, f32): see blas_narrow.inc
 *
 * The MLP's output layer (128x10x200, and its gradient A^T B = 200x10x128)
 * ran at 0.6-0.74x OpenBLAS on Zen 4 through BLIS sup and the direct loop,
 * whose tiles run along C's rows and use 10 of 16 lanes. These kernels run
 * vectors along k or down C's columns instead. Two builds, AVX2+FMA and
 * AVX-512, each a candidate in the timing where the CPU (and the kernel
 * set asked for: HYPERTAPE_BLIS_ARCH=haswell means AVX2 only) allows. */
/* Up to 64 columns: past the MLP's 10, MAML's 40-wide products with B
 * transposed ran 3x BLIS sup here (64 vs 21 GF/s on 10x40x40), as they
 * need no copy. The dot kernel's copy of op(B) grows with n, but the
 * timing decides whether it pays. */
#define NARROW_N 64

#if AD_X86 && defined(__GNUC__)
#include <immintrin.h>

/* Lane masks for AVX2's maskload: the first r of 8 lanes are k_nw_mask +
 * 8 - r. */
static const int32_t k_nw_mask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

/* Sum of each of four vectors, into out[0..3]: two rounds of pairwise
 * adds within 128-bit halves, then the halves added. */
AD_AVX2_ATTR static inline void nw2_hsum4(__m256 v0, __m256 v1, __m256 v2, __m256 v3, float *out) {
  const __m256 t0 = _mm256_hadd_ps(v0, v1), t1 = _mm256_hadd_ps(v2, v3);
  const __m256 t2 = _mm256_hadd_ps(t0, t1); /* [s0 s1 s2 s3 | s0' s1' s2' s3'] */
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps(t2, 1)));
}
AD_AVX2_ATTR static inline float nw2_hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
/* bt[j k + p] = b[p ldb + j] for j < n: op(B)'s columns made
 * contiguous along k for the dot kernel, in 8x8 blocks transposed in
 * registers (a scalar copy cost 10% of a 128x10x200 product). */
AD_AVX2_ATTR static void nw_pack_bt(int64_t n, int64_t k, const float *b, int64_t ldb, float *bt) {
  int64_t p0 = 0;
  for (; p0 + 8 <= k; p0 += 8)
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
      const int64_t w = n - j0 < 8 ? n - j0 : 8;
      const __m256i msk = _mm256_loadu_si256((const __m256i *)(const void *)(k_nw_mask + 8 - w));
      __m256 r[8], col[8];
      for (int q = 0; q < 8; q++) r[q] = _mm256_maskload_ps(b + (p0 + q) * ldb + j0, msk);
      ad__tr8_ps(r, col);
      for (int64_t j = 0; j < w; j++) _mm256_storeu_ps(bt + (j0 + j) * k + p0, col[j]);
    }
  for (; p0 < k; p0++)
    for (int64_t j = 0; j < n; j++) bt[j * k + p0] = b[p0 * ldb + j];
}

#define NW(x) narrow_avx2_##x
#define NW_ATTR AD_AVX2_ATTR
#define NW_V __m256
#define NW_VL 8
#define NW_M __m256i
#define NW_LD(p) _mm256_loadu_ps(p)
#define NW_LDM(p, m) _mm256_maskload_ps((p), (m))
#define NW_FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define NW_BC(p) _mm256_broadcast_ss(p)
#define NW_ZERO _mm256_setzero_ps()
#define NW_ST(p, v) _mm256_storeu_ps((p), (v))
#define NW_MASK(r) _mm256_loadu_si256((const __m256i *)(const void *)(k_nw_mask + 8 - (r)))
#define NW_DOT_MR 3 /* 3 x 4 accumulators + 3 A + 1 B of 16 registers */
#define NW_DOT_NC 4
#define NW_OUT_NC 6 /* 6 x 2 accumulators + 2 A + 1 broadcast */
#define NW_DV NW_V
#define NW_DVL NW_VL
#define NW_DM NW_M
#define NW_DLD NW_LD
#define NW_DLDM NW_LDM
#define NW_DFMA NW_FMA
#define NW_DZERO NW_ZERO
#define NW_DMASK NW_MASK
#define NW_DHSUM(v) nw2_hsum(v)
#define NW_DHSUM4(a, b, c, d, out) nw2_hsum4((a), (b), (c), (d), (out))
#include "blas_narrow.inc"

#define NW(x) narrow_avx512_##x
#define NW_ATTR AD_AVX512_ATTR
#define NW_V __m512
#define NW_VL 16
#define NW_M __mmask16
#define NW_LD(p) _mm512_loadu_ps(p)
#define NW_LDM(p, m) _mm512_maskz_loadu_ps((m), (p))
#define NW_FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define NW_BC(p) _mm512_set1_ps(*(p))
#define NW_ZERO _mm512_setzero_ps()
#define NW_ST(p, v) _mm512_storeu_ps((p), (v))
#define NW_MASK(r) ((__mmask16)((1u << (r)) - 1u))
#define NW_DOT_MR 4 /* 4 x 4 accumulators (of 8 lanes) + 4 A + 1 B */
#define NW_DOT_NC 4
#define NW_OUT_NC 12 /* 12 x 2 accumulators + 2 A + 1 broadcast */
/* 256-bit vectors for the dot kernel (see blas_narrow.inc), in the 32
 * registers AVX-512VL gives them. */
#define NW_DV __m256
#define NW_DVL 8
#define NW_DM __mmask8
#define NW_DLD(p) _mm256_loadu_ps(p)
#define NW_DLDM(p, m) _mm256_maskz_loadu_ps((m), (p))
#define NW_DFMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define NW_DZERO _mm256_setzero_ps()
#define NW_DMASK(r) ((__mmask8)((1u << (r)) - 1u))
#define NW_DHSUM(v) nw2_hsum(v)
#define NW_DHSUM4(a, b, c, d, out) nw2_hsum4((a), (b), (c), (d), (out))
#include "blas_narrow.inc"
#define AD_HAVE_NARROW 1
#else
#define AD_HAVE_NARROW 0
#endif

/* Runs a narrow kernel when it applies (f32, n <= NARROW_N, the CPU can
 * run it); returns 0 otherwise, or when the scratch for op(B)'s columns
 * cannot be had, so the caller takes another path. */
#define NARROW_STACK 8192
static int run_narrow(int path, int dt, int ta, int tb, int64_t m, int64_t n, int64_t k,
                      const void *alpha, const void *a, int64_t lda, const void *b, int64_t ldb,
                      const void *beta, void *c, int64_t ldc) {
#if AD_HAVE_NARROW
  if (dt != AD_F32 || n > NARROW_N || (path == P_NARROW ? !g_have_narrow : !g_have_narrow512))
    return 0;
  float stack[NARROW_STACK];
  float *bt = stack;
  const int need = !ta && !tb;
  if (need && (size_t)n * (size_t)k > NARROW_STACK) {
    bt = malloc((size_t)n * (size_t)k * sizeof(float));
    if (!bt) return 0;
  }
  if (path == P_NARROW)
    narrow_avx2_gemm(ta, tb, m, n, k, *(const float *)alpha, a, lda, b, ldb, *(const float *)beta,
                     c, ldc, bt);
  else
    narrow_avx512_gemm(ta, tb, m, n, k, *(const float *)alpha, a, lda, b, ldb, *(const float *)beta,
                       c, ldc, bt);
  if (bt != stack) free(bt);
  return 1;
#else
  (void)path, (void)dt, (void)ta, (void)tb, (void)m, (void)n, (void)k, (void)alpha, (void)a;
  (void)lda, (void)b, (void)ldb, (void)beta, (void)c, (void)ldc;
  return 0;
#endif
}

/* ---- one call on a given path */

/* Runtime object and context for a BLIS call on a resolved path (see
 * resolve_path: "blis" has become sup, sup+packB or packed by then). */
static cntx_t *make_rntm(rntm_t *rn, int path, int threads) {
  rntm_t init = BLIS_RNTM_INITIALIZER;
  *rn = init;
  /* BLIS's own thread team only for packed:team: every other product on
   * several threads is split over our pool (run_choice), each part a
   * one-thread call, so BLIS never starts OpenMP threads that would fight
   * the pool for the cores. */
  bli_rntm_set_num_threads(path == P_TEAM ? threads : 1, rn);
  switch (path) {
  case P_SUP:
    return &g_cntx_sup;
  case P_SUP_PA:
    bli_rntm_set_pack_a(TRUE, rn);
    return &g_cntx_sup;
  case P_SUP_PB:
    bli_rntm_set_pack_b(TRUE, rn);
    return &g_cntx_sup;
  case P_PACKED:
  case P_TEAM:
    bli_rntm_disable_l3_sup(rn);
    return g_cntx;
  case P_PACKED_ALT:
    bli_rntm_disable_l3_sup(rn);
    return g_have_alt ? &g_cntx_alt : g_cntx;
  case P_PACKED_ALT2:
    bli_rntm_disable_l3_sup(rn);
    return g_have_alt2 ? &g_cntx_alt2 : g_cntx;
  default:
    return g_cntx;
  }
}

/* Whether BLIS's sup kernels may see this shape (see the top of the file:
 * they read past A or B when m or n is 1 or 2 or k is below 8). */
static int sup_safe(int64_t m, int64_t n, int64_t k) {
  return m > 2 && n > 2 && k >= 8;
}

/* The path a product of this shape really takes when `path` is asked
 * for: the kernels that do not apply (f64 for wide:avx512, n > NARROW_N
 * for narrow, a shape sup must not see, a kernel the CPU or the kernel set
 * rules out) give way to the direct loop when small, else the packed path.
 * Decided once for the whole product, so that every part of a split runs
 * the same kernels as the one-thread call would. */
static int resolve_path(int path, int dt, int ta, int tb, int64_t m, int64_t n, int64_t k) {
  const int ta_tb_packs_b = !ta && tb && m >= 32 && n >= 32;
  const double madds = (double)m * (double)n * (double)k;
  if (path == P_WIDE512 && !(dt == AD_F32 && g_have_wide512)) path = P_PACKED;
  if ((path == P_NARROW || path == P_NARROW512) &&
      !(AD_HAVE_NARROW && dt == AD_F32 && n <= NARROW_N &&
        (path == P_NARROW ? g_have_narrow : g_have_narrow512)))
    path = madds > DIRECT_MAX ? P_PACKED : P_DIRECT;
  if ((path == P_BLIS || path == P_SUP || path == P_SUP_PA || path == P_SUP_PB) &&
      !sup_safe(m, n, k))
    path = madds <= DIRECT_MAX ? P_DIRECT : P_PACKED;
  if (path == P_DIRECT512 && !g_have_direct512) path = P_DIRECT;
  if (path == P_BLIS) {
    /* "blis", the rule used before paths were measured: BLIS's own sup
     * thresholds (bli_cntx_l3_sup_thresh_is_met), and B packed when A is
     * row- and B column-stored and m, n >= 32 (on Zen 4, 128x200x10 ran
     * 31.6 us unpacked vs 7.1 us with B packed). Applied here to the whole
     * product: BLIS would apply it to each part of a split, and a part
     * below a threshold the whole is above would run other kernels. */
    cntx_t *cx = g_cntx;
    const num_t bt = dt == AD_F64 ? BLIS_DOUBLE : BLIS_FLOAT;
    const int small = m < bli_cntx_get_l3_sup_thresh_dt(bt, BLIS_MT, cx) ||
                      n < bli_cntx_get_l3_sup_thresh_dt(bt, BLIS_NT, cx) ||
                      k < bli_cntx_get_l3_sup_thresh_dt(bt, BLIS_KT, cx);
    path = !g_have_sup || !small ? P_PACKED : ta_tb_packs_b ? P_SUP_PB : P_SUP;
  }
  return path;
}

/* C = alpha op(A) op(B) + beta C on a resolved path, on this thread (or,
 * for packed:team, on BLIS's team of `threads`); alpha and beta point at
 * values of the dtype. BLIS takes non-const pointers but does not write A
 * or B. A kernel that cannot get its scratch memory falls back to BLIS's
 * packed path. */
static void run_resolved(int path, int threads, int dt, int ta, int tb, int64_t m, int64_t n,
                         int64_t k, const void *alpha, const void *a, int64_t lda, const void *b,
                         int64_t ldb, const void *beta, void *c, int64_t ldc) {
  if (path == P_WIDE512) {
    if (ad__gemm_wide512(ta, tb, m, n, k, *(const float *)alpha, a, lda, b, ldb,
                         *(const float *)beta, c, ldc))
      return;
    path = P_PACKED;
  }
  if (path == P_NARROW || path == P_NARROW512) {
    if (run_narrow(path, dt, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)) return;
    path = P_PACKED;
  }
  if ((path == P_DIRECT || path == P_DIRECT512) &&
      run_direct(path == P_DIRECT512, dt, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc))
    return;
  /* A part of a split sup product always has m, n > 2 (see split_ok);
   * this only guards the rule for sup's sake. */
  if ((path == P_SUP || path == P_SUP_PA || path == P_SUP_PB) && !sup_safe(m, n, k))
    path = P_PACKED;
  rntm_t rn;
  cntx_t *cx = make_rntm(&rn, path == P_DIRECT || path == P_DIRECT512 ? P_PACKED : path, threads);
  if (dt == AD_F64)
    bli_dgemm_ex(BLIS_NO_TRANSPOSE, BLIS_NO_TRANSPOSE, m, n, k, (double *)alpha, (double *)a,
                 ta ? 1 : lda, ta ? lda : 1, (double *)b, tb ? 1 : ldb, tb ? ldb : 1,
                 (double *)beta, c, ldc, 1, cx, &rn);
  else
    bli_sgemm_ex(BLIS_NO_TRANSPOSE, BLIS_NO_TRANSPOSE, m, n, k, (float *)alpha, (float *)a,
                 ta ? 1 : lda, ta ? lda : 1, (float *)b, tb ? 1 : ldb, tb ? ldb : 1, (float *)beta,
                 c, ldc, 1, cx, &rn);
}

/* ---- products on several threads: C split over our worker pool
 *
 * At more than one thread a product is not handed to BLIS's OpenMP team
 * (which would fight our own worker pool, ad__par_for, for the cores and
 * pays a team start-up and barrier per call) but split into `threads`
 * disjoint parts of C, each computed by a one-thread call of the same
 * path on the pool: by rows of C (part p: rows of op(A) and of C), or by
 * column blocks (columns of op(B) and of C). Part boundaries fall on
 * multiples of the kernel's register tile (rows: its MR, columns: its NR,
 * e.g. 32 for wide:avx512), so every part runs the same tiles as the
 * one-thread call over the same elements. The split depends only on the
 * shape, the path and the thread count, and each element of C is summed
 * by exactly one part in the one-thread k order, so the result has the
 * bits of the one-thread call of that path (tests/test_threads.c checks
 * it). Which split (or none, or BLIS's own team, "packed:team") is
 * fastest is measured per shape like the path itself. A split called
 * from inside a pool part, or while another user thread holds the pool,
 * runs its parts one after another on the caller (ad__par_for_parts). */
typedef enum { SPLIT_NONE, SPLIT_ROWS, SPLIT_COLS, N_SPLITS } gemm_split;
static const char *const k_split_names[N_SPLITS] = {"on 1 thread", "split rows", "split cols"};

/* A choice: path + N_PATHS split (what the cache and the reason keep). */
#define CHOICE(path, split) ((path) + N_PATHS * (split))
#define CHOICE_PATH(ch) ((ch) % N_PATHS)
#define CHOICE_SPLIT(ch) ((ch) / N_PATHS)
#define N_CHOICES (N_PATHS * N_SPLITS)

/* The register tile of a resolved path: rows (MR) or columns (NR). */
static int64_t tile_of(int path, int dt, int cols) {
  const int f64 = dt == AD_F64;
  const num_t bt = f64 ? BLIS_DOUBLE : BLIS_FLOAT;
  const bszid_t id = cols ? BLIS_NR : BLIS_MR;
  const cntx_t *cx = g_cntx;
  dim_t v;
  switch (path) {
  case P_WIDE512:
    return cols ? 32 : 12;
  case P_DIRECT512:
    return cols ? (f64 ? 24 : 48) : 10;
  case P_DIRECT:
    return cols ? (f64 ? 8 : 16) : (f64 ? 4 : 5);
  case P_NARROW:
  case P_NARROW512:
    /* Rows: a multiple of the dot kernel's 3 (AVX2) or 4 rows and of the
     * outer kernel's 2 vectors (16 or 32 rows). */
    return cols ? 16 : path == P_NARROW ? 48 : 32;
  case P_SUP:
  case P_SUP_PA:
  case P_SUP_PB:
  case P_BLIS:
    v = g_cntx->l3_sup_blkszs[id].v[bt];
    if (v > 0) return v;
    break;
  case P_PACKED_ALT:
    if (g_have_alt) cx = &g_cntx_alt;
    break;
  case P_PACKED_ALT2:
    if (g_have_alt2) cx = &g_cntx_alt2;
    break;
  default:
    break;
  }
  v = cx->blkszs[id].v[bt];
  return v > 0 ? v : 16;
}

/* Whether `split` gives every one of `threads` parts at least one whole
 * tile (and sup its m, n > 2). */
static int split_ok(int split, int path, int dt, int64_t m, int64_t n, int threads) {
  if (split == SPLIT_NONE) return 1;
  if (threads < 2 || path == P_TEAM) return 0;
  const int cols = split == SPLIT_COLS;
  /* The narrow kernels cut n into equal column tiles (their width, and
   * so the order of their lane sums, depends on n), so only rows split. */
  if (cols && (path == P_NARROW || path == P_NARROW512)) return 0;
  const int64_t t = tile_of(path, dt, cols), len = cols ? n : m;
  return t > 2 && len >= t * threads;
}

/* The split a forced path takes (no measurement): along the longer side
 * of C, where the parts come out closest to square. */
static int default_split(int path, int dt, int64_t m, int64_t n, int threads) {
  const int first = m >= n ? SPLIT_ROWS : SPLIT_COLS, second = SPLIT_ROWS + SPLIT_COLS - first;
  if (split_ok(first, path, dt, m, n, threads)) return first;
  if (split_ok(second, path, dt, m, n, threads)) return second;
  return SPLIT_NONE;
}

/* nb > 1: a sum of products into the same C (ad__gemm_sum), product i on
 * A + i sa and B + i sb elements, with beta for i = 0 and 1 after. */
typedef struct {
  int path, dt, ta, tb, cols;
  int64_t m, n, k, lda, ldb, ldc, tile;
  const void *alpha, *a, *b, *beta;
  void *c;
  int64_t nb, sa, sb;
} split_job;

/* Part [lo, hi) of the tiles along the split side: one one-thread call on
 * the rows (or columns) of op(A), op(B) and C it covers, per product of
 * the sum (in order, so each element of C is summed as the nb one-thread
 * calls would sum it). */
static void split_part(void *vj, int part, int64_t lo, int64_t hi) {
  (void)part;
  const split_job *j = vj;
  const size_t es = j->dt == AD_F64 ? sizeof(double) : sizeof(float);
  const int64_t len = j->cols ? j->n : j->m;
  const int64_t i0 = lo * j->tile, i1 = hi * j->tile < len ? hi * j->tile : len;
  if (i1 <= i0) return;
  const double one_d = 1.0;
  const float one_f = 1.0f;
  const void *one = j->dt == AD_F64 ? (const void *)&one_d : (const void *)&one_f;
  char *c = j->c;
  for (int64_t i = 0; i < (j->nb > 1 ? j->nb : 1); i++) {
    const char *a = (const char *)j->a + (size_t)(i * j->sa) * es;
    const char *b = (const char *)j->b + (size_t)(i * j->sb) * es;
    const void *beta = i ? one : j->beta;
    if (j->cols) /* columns i0..i1 of op(B): B's rows when transposed */
      run_resolved(j->path, 1, j->dt, j->ta, j->tb, j->m, i1 - i0, j->k, j->alpha, a, j->lda,
                   b + (size_t)(j->tb ? i0 * j->ldb : i0) * es, j->ldb, beta, c + (size_t)i0 * es,
                   j->ldc);
    else /* rows i0..i1 of op(A): A's columns when transposed */
      run_resolved(j->path, 1, j->dt, j->ta, j->tb, i1 - i0, j->n, j->k, j->alpha,
                   a + (size_t)(j->ta ? i0 : i0 * j->lda) * es, j->lda, b, j->ldb, beta,
                   c + (size_t)(i0 * j->ldc) * es, j->ldc);
  }
}

/* Runs a choice (path and split) at `threads`: the sum of nb products
 * (see split_job; nb = 1: one product). */
static void run_choice_sum(int choice, int threads, int dt, int ta, int tb, int64_t m, int64_t n,
                           int64_t k, const void *alpha, const void *a, int64_t lda, int64_t sa,
                           const void *b, int64_t ldb, int64_t sb, int64_t nb, const void *beta,
                           void *c, int64_t ldc) {
  const int path = resolve_path(CHOICE_PATH(choice), dt, ta, tb, m, n, k);
  int split = CHOICE_SPLIT(choice);
  if (threads < 2 || !split_ok(split, path, dt, m, n, threads)) split = SPLIT_NONE;
  if (split == SPLIT_NONE) {
    const size_t es = dt == AD_F64 ? sizeof(double) : sizeof(float);
    const double one_d = 1.0;
    const float one_f = 1.0f;
    const void *one = dt == AD_F64 ? (const void *)&one_d : (const void *)&one_f;
    /* Inside a pool part BLIS must not start a team of its own. */
    for (int64_t i = 0; i < (nb > 1 ? nb : 1); i++)
      run_resolved(path, path == P_TEAM && !ad__par_inside() ? threads : 1, dt, ta, tb, m, n, k,
                   alpha, (const char *)a + (size_t)(i * sa) * es, lda,
                   (const char *)b + (size_t)(i * sb) * es, ldb, i ? one : beta, c, ldc);
    return;
  }
  split_job j = {.path = path,
                 .dt = dt,
                 .ta = ta,
                 .tb = tb,
                 .cols = split == SPLIT_COLS,
                 .m = m,
                 .n = n,
                 .k = k,
                 .lda = lda,
                 .ldb = ldb,
                 .ldc = ldc,
                 .alpha = alpha,
                 .a = a,
                 .b = b,
                 .beta = beta,
                 .c = c,
                 .nb = nb,
                 .sa = sa,
                 .sb = sb};
  j.tile = tile_of(path, dt, j.cols);
  const int64_t len = j.cols ? n : m;
  ad__par_for_parts((len + j.tile - 1) / j.tile, threads, split_part, &j);
}

static void run_choice(int choice, int threads, int dt, int ta, int tb, int64_t m, int64_t n,
                       int64_t k, const void *alpha, const void *a, int64_t lda, const void *b,
                       int64_t ldb, const void *beta, void *c, int64_t ldc) {
  run_choice_sum(choice, threads, dt, ta, tb, m, n, k, alpha, a, lda, 0, b, ldb, 0, 1, beta, c,
                 ldc);
}

/* ---- the cache of measured choices */

typedef struct {
  int64_t m, n, k;
  int8_t used, dt, ta, tb;
  int16_t threads;
  int8_t path;             /* a choice: CHOICE(path, split) */
  float gflops[N_CHOICES]; /* as measured; 0 = not a candidate */
} shape_entry;

#define CACHE_SLOTS 1024 /* a power of two */
#define CACHE_FILL 768   /* beyond this many shapes, new ones use "blis" */
static shape_entry g_cache[CACHE_SLOTS];
static int g_cache_n;
static int g_cache_order[CACHE_FILL]; /* slots in the order they were measured */
static pthread_mutex_t g_cache_mu = PTHREAD_MUTEX_INITIALIZER;

/* Wall clock, or with `cpu` the calling thread's CPU time: a one-thread
 * product timed by CPU time does not count the time the thread spent
 * descheduled, so a choice made on a busy machine is the one an idle
 * machine would make. Products on several threads need the wall clock. */
static double now_ns(int cpu) {
  struct timespec ts;
  clock_gettime(cpu ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* Times the candidates for one shape on the caller's A and B (C goes to a
 * scratch buffer, so nothing of the caller's is written). Fills e->path
 * and e->gflops. */
static void measure(shape_entry *e, const void *a, int64_t lda, const void *b, int64_t ldb) {
  const double madds = (double)e->m * (double)e->n * (double)e->k;
  const int th = e->threads;
  e->path = P_BLIS;
  if (madds > MEASURE_MAX) {
    /* Not timed. On one thread BLIS's rule; on several, its packed path
     * (what the rule picks at this size) split over the pool. */
    if (th > 1) e->path = (int8_t)CHOICE(P_PACKED, default_split(P_PACKED, e->dt, e->m, e->n, th));
    return;
  }
  size_t es = e->dt == AD_F64 ? sizeof(double) : sizeof(float);
  void *c = malloc((size_t)e->m * (size_t)e->n * es);
  if (!c) return;
  int paths[N_PATHS], np = 0;
  /* On several threads each part of a split is 1/threads of the product,
   * so the direct loop may pay for larger ones. */
  const double direct_max = DIRECT_MAX * th;
  if (madds <= direct_max) paths[np++] = P_DIRECT;
  if (madds <= direct_max && g_have_direct512) paths[np++] = P_DIRECT512;
  const int sup = g_have_sup && sup_safe(e->m, e->n, e->k);
  if (sup) paths[np++] = P_SUP;
  /* Packing an operand only changes sup when there is more than one panel
   * of it to reuse. */
  if (sup && e->m > 16 && e->n > 16) {
    paths[np++] = P_SUP_PA;
    paths[np++] = P_SUP_PB;
  }
  paths[np++] = P_PACKED;
  if (g_have_alt) paths[np++] = P_PACKED_ALT;
  if (g_have_alt2) paths[np++] = P_PACKED_ALT2;
  if (e->dt == AD_F32 && e->n <= NARROW_N) {
    if (g_have_narrow) paths[np++] = P_NARROW;
    if (g_have_narrow512) paths[np++] = P_NARROW512;
  }
  if (e->dt == AD_F32 && g_have_wide512) paths[np++] = P_WIDE512;
  /* The candidates: on one thread each path; on several each path split
   * by rows and by columns where the shape allows, each path unsplit (on
   * one thread: it wins where threading does not pay, or when other
   * processes hold the other cores), and for large products BLIS's own
   * team. */
  int cand[N_CHOICES], nc = 0;
  for (int i = 0; i < np; i++) {
    if (th == 1) {
      cand[nc++] = CHOICE(paths[i], SPLIT_NONE);
      continue;
    }
    const int rp = resolve_path(paths[i], e->dt, e->ta, e->tb, e->m, e->n, e->k);
    for (int sp = SPLIT_ROWS; sp <= SPLIT_COLS; sp++)
      if (split_ok(sp, rp, e->dt, e->m, e->n, th)) cand[nc++] = CHOICE(paths[i], sp);
    cand[nc++] = CHOICE(paths[i], SPLIT_NONE);
  }
  if (th > 1 && madds >= TEAM_MIN) cand[nc++] = CHOICE(P_TEAM, SPLIT_NONE);
  double best[N_CHOICES];
  for (int i = 0; i < N_CHOICES; i++) best[i] = 1e300;
  const double one_d = 1.0, zero_d = 0.0;
  const float one_f = 1.0f, zero_f = 0.0f;
  const void *one = e->dt == AD_F64 ? (const void *)&one_d : (const void *)&one_f;
  const void *zero = e->dt == AD_F64 ? (const void *)&zero_d : (const void *)&zero_f;
  /* One untimed call each first (first touch of buffers, BLIS's memory
   * pools, instruction cache, the pool's workers). */
  const int cpu = th == 1;
  double t0 = now_ns(0);
  for (int i = 0; i < nc; i++)
    run_choice(cand[i], th, e->dt, e->ta, e->tb, e->m, e->n, e->k, one, a, lda, b, ldb, zero, c,
               e->n);
  /* Tiny products are timed in batches of `reps` calls (about 20 us of
   * work), so the clock's own cost (a system call for the CPU clock) does
   * not swamp the differences. */
  double per_call = (now_ns(0) - t0) / nc;
  int reps = per_call > 20000.0 ? 1 : per_call < 312.5 ? 64 : (int)(20000.0 / per_call);
  double start = now_ns(0);
  for (int round = 0; round < MEASURE_ROUNDS_MAX; round++) {
    for (int i = 0; i < nc; i++) {
      double ts = now_ns(cpu);
      for (int r = 0; r < reps; r++)
        run_choice(cand[i], th, e->dt, e->ta, e->tb, e->m, e->n, e->k, one, a, lda, b, ldb, zero, c,
                   e->n);
      double dt = (now_ns(cpu) - ts) / reps;
      if (dt < best[cand[i]]) best[cand[i]] = dt;
    }
    if (round + 1 >= MEASURE_ROUNDS_MIN && now_ns(0) - start > MEASURE_BUDGET_NS) break;
  }
  free(c);
  int win = cand[0];
  for (int i = 0; i < nc; i++) {
    e->gflops[cand[i]] = (float)(2.0 * madds / (best[cand[i]] > 1 ? best[cand[i]] : 1));
    if (best[cand[i]] < best[win]) win = cand[i];
  }
  e->path = (int8_t)win;
}

static unsigned shape_hash(int dt, int ta, int tb, int threads, int64_t m, int64_t n, int64_t k) {
  uint64_t h = 1469598103934665603ULL;
  const uint64_t v[7] = {(uint64_t)dt, (uint64_t)ta, (uint64_t)tb, (uint64_t)threads,
                         (uint64_t)m,  (uint64_t)n,  (uint64_t)k};
  for (int i = 0; i < 7; i++) h = (h ^ v[i]) * 1099511628211ULL;
  return (unsigned)(h ^ (h >> 29));
}

/* Each thread's last few answers of choose_path, direct-mapped by shape:
 * a tiny product's path is then one hash and one compare, no lock (the
 * mutex and the shared table's probe cost about 2% of MAML's per-task
 * products). Safe because an answer never changes once given: entries of
 * g_cache are never removed or re-measured, and a full table's "blis"
 * stays full. Forcing a path is checked before this cache. */
#define TL_SLOTS 16 /* a power of two */
typedef struct {
  int64_t m, n, k;
  int32_t tag; /* 0: empty; else 1 | dt, ta, tb, threads */
  int32_t path;
} tl_entry;
static _Thread_local tl_entry tl_cache[TL_SLOTS];

/* Threads for a product of m n k multiply-adds: 1 below SMALL_THREADED
 * (below ~64^3 multiply-adds a second thread costs more in start-up and
 * synchronisation than it saves: mnist_mlp's 32x784x200 steps ran 20x
 * slower at 2 threads on a loaded 2-core machine) and inside a pool part (where a split runs
 * serially anyway, so the product is a one-thread one and measured as such), else the setting. */
static int threads_for(int64_t m, int64_t n, int64_t k) {
  if ((double)m * (double)n * (double)k < SMALL_THREADED || ad__par_inside()) return 1;
  return atomic_load(&g_threads);
}

/* The choice (path and split) for this call: forced, cached, or measured
 * now; *threads_out gets the threads it runs on. */
static int choose_path(int dt, int ta, int tb, int64_t m, int64_t n, int64_t k, const void *a,
                       int64_t lda, const void *b, int64_t ldb, int *threads_out) {
  const int threads = threads_for(m, n, k);
  *threads_out = threads;
  int forced = atomic_load_explicit(&g_forced, memory_order_relaxed);
  if (forced >= 0)
    return threads > 1 ? CHOICE(forced, default_split(resolve_path(forced, dt, ta, tb, m, n, k), dt,
                                                      m, n, threads))
                       : forced;
  ta = !!ta;
  tb = !!tb;
  const int32_t tag = (int32_t)(1 | dt << 1 | ta << 3 | tb << 4 | threads << 5);
  tl_entry *te =
      &tl_cache[(unsigned)(m * 31 + n * 7 + k + (ta << 2) + tb + (dt << 3)) & (TL_SLOTS - 1)];
  if (te->tag == tag && te->m == m && te->n == n && te->k == k) return te->path;
  pthread_mutex_lock(&g_cache_mu);
  unsigned slot = shape_hash(dt, ta, tb, threads, m, n, k) & (CACHE_SLOTS - 1);
  int path = P_BLIS;
  for (;;) {
    shape_entry *e = &g_cache[slot];
    if (!e->used) {
      if (g_cache_n >= CACHE_FILL) break; /* full: BLIS's rule */
      *e = (shape_entry){.m = m,
                         .n = n,
                         .k = k,
                         .used = 1,
                         .dt = (int8_t)dt,
                         .ta = (int8_t)ta,
                         .tb = (int8_t)tb,
                         .threads = (int16_t)threads};
      measure(e, a, lda, b, ldb);
      g_cache_order[g_cache_n++] = (int)slot;
      path = e->path;
      break;
    }
    if (e->m == m && e->n == n && e->k == k && e->dt == dt && e->ta == ta && e->tb == tb &&
        e->threads == threads) {
      path = e->path;
      break;
    }
    slot = (slot + 1) & (CACHE_SLOTS - 1);
  }
  pthread_mutex_unlock(&g_cache_mu);
  *te = (tl_entry){.m = m, .n = n, .k = k, .tag = tag, .path = path};
  return path;
}

static int path_by_name(const char *s) {
  for (int p = 0; p < N_PATHS; p++)
    if (strcmp(s, k_path_names[p]) == 0 ||
        (p == P_PACKED_ALT && g_have_alt && strcmp(s, g_alt_name) == 0) ||
        (p == P_PACKED_ALT2 && g_have_alt2 && strcmp(s, g_alt2_name) == 0))
      return p;
  return -1;
}

/* Whether path p can be forced with this kernel set on this CPU. */
static int path_available(int p) {
  switch (p) {
  case P_PACKED_ALT:
    return g_have_alt;
  case P_PACKED_ALT2:
    return g_have_alt2;
  case P_SUP:
  case P_SUP_PA:
  case P_SUP_PB:
    return g_have_sup;
  case P_NARROW:
    return g_have_narrow;
  case P_NARROW512:
    return g_have_narrow512;
  case P_WIDE512:
    return g_have_wide512;
  case P_DIRECT512:
    return g_have_direct512;
  default:
    return p >= 0 && p < N_PATHS;
  }
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

  int taken = 0;
  if (req[0] && strcmp(req, "auto") != 0)
    taken = try_request("HYPERTAPE_BLIS_ARCH", req, why, sizeof why);
  else if (blis_req[0])
    taken = try_request("BLIS_ARCH_TYPE", blis_req, why, sizeof why);
  if (!taken) {
    if (why[0]) {
      size_t n = strlen(why);
      snprintf(why + n, sizeof why - n, "auto: ");
    }
    choose_auto(why);
  }
  setup_paths(taken);
#if AD_X86 && defined(__GNUC__)
  if (ad__cpu_avx2_fma()) {
    g_direct_s = direct_s_avx2;
    g_direct_d = direct_d_avx2;
  }
#endif
  /* Our AVX-512 kernels follow the kernel set: a request for an AVX2 set
   * (haswell, zen3, ...) means an AVX2-only setting, so they stay out. */
  const arch_entry *req_e = taken ? arch_by_name(g_kernel) : NULL;
  g_have_narrow = AD_HAVE_NARROW && ad__cpu_avx2_fma();
  g_have_narrow512 = AD_HAVE_NARROW && cpu_has_avx512() && (!req_e || req_e->need == NEED_AVX512);
  g_have_wide512 = ad__cpu_avx512() && cpu_has_avx512() && (!req_e || req_e->need == NEED_AVX512);
  g_have_direct512 = AD_HAVE_DIRECT512 && ad__cpu_avx512() && cpu_has_avx512() &&
                     (!req_e || req_e->need == NEED_AVX512);
  /* HYPERTAPE_GEMM_PATH=NAME forces one path for every GEMM (the same
   * names as ad_blas_set_path); a value we do not know is reported in the
   * reason and ignored. */
  const char *gp = getenv("HYPERTAPE_GEMM_PATH");
  if (gp && *gp && strcmp(gp, "auto") != 0) {
    int p = path_by_name(gp);
    if (p >= 0 && path_available(p))
      atomic_store(&g_forced, p);
    else {
      size_t n = strlen(g_reason);
      snprintf(g_reason + n, sizeof g_reason - n,
               "; HYPERTAPE_GEMM_PATH=%.40s ignored (unknown or not available)", gp);
    }
  }
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

/* The kernel set and why, then the path measured for each shape so far
 * (in the order first used, with every candidate's GF/s). Built into a
 * per-thread buffer, so the text stays put while the caller reads it even
 * if another thread measures a new shape. */
const char *ad_blas_reason(void) {
  static _Thread_local char buf[8192];
  ensure_init();
  size_t len = 0, cap = sizeof buf;
#define AD_PUT(...) (len = ad__buf_put(buf, len, cap, __VA_ARGS__))
  AD_PUT("%s", g_reason);
  int forced = atomic_load(&g_forced);
  if (forced >= 0) {
    AD_PUT("; every GEMM on path %s (forced)", path_name(forced));
    if (atomic_load(&g_threads) > 1 && forced != P_TEAM)
      AD_PUT("; at %d threads split by rows or columns of C over the pool",
             atomic_load(&g_threads));
    len = ad__bmm_describe(buf, len, cap);
    if (len >= cap) memcpy(buf + cap - 4, "...", 4);
    return buf;
  }
  pthread_mutex_lock(&g_cache_mu);
  AD_PUT("; GEMM path per shape, measured on first use (%d shape%s", g_cache_n,
         g_cache_n == 1 ? "" : "s");
  AD_PUT(g_cache_n ? "; GF/s of each candidate, * = chosen):" : ")");
  for (int i = 0; i < g_cache_n; i++) {
    const shape_entry *e = &g_cache[g_cache_order[i]];
    AD_PUT("%s %s %ldx%ldx%ld %c%c t%d:", i ? ";" : "", e->dt == AD_F64 ? "f64" : "f32", (long)e->m,
           (long)e->n, (long)e->k, e->ta ? 'T' : 'N', e->tb ? 'T' : 'N', e->threads);
    if (e->gflops[e->path] == 0.0f) {
      AD_PUT(" %s", path_name(CHOICE_PATH(e->path)));
      if (e->threads > 1 && CHOICE_SPLIT(e->path) != SPLIT_NONE)
        AD_PUT(" x%d %s", e->threads, k_split_names[CHOICE_SPLIT(e->path)]);
      AD_PUT(" (not timed: large)");
    }
    for (int ch = 0; ch < N_CHOICES; ch++) {
      if (e->gflops[ch] <= 0.0f) continue;
      AD_PUT(" %s%s", ch == e->path ? "*" : "", path_name(CHOICE_PATH(ch)));
      /* "wide:avx512 x2 split rows": on 2 threads, C split by rows. */
      if (e->threads > 1 && CHOICE_PATH(ch) != P_TEAM && CHOICE_SPLIT(ch) == SPLIT_NONE)
        AD_PUT(" on 1 thread");
      else if (e->threads > 1)
        AD_PUT(" x%d%s%s", e->threads, CHOICE_PATH(ch) == P_TEAM ? "" : " ",
               CHOICE_PATH(ch) == P_TEAM ? "" : k_split_names[CHOICE_SPLIT(ch)]);
      AD_PUT(" %.1f", (double)e->gflops[ch]);
    }
  }
  if (g_cache_n) AD_PUT(")");
  pthread_mutex_unlock(&g_cache_mu);
#undef AD_PUT
  len = ad__bmm_describe(buf, len, cap);
  if (len >= cap) memcpy(buf + cap - 4, "...", 4);
  return buf;
}

int ad__blas_avx512_allowed(void) {
  ensure_init();
  return g_have_direct512;
}

/* Threads inside each GEMM and each threaded loop; values below 1 mean 1,
 * above AD_MAX_THREADS mean AD_MAX_THREADS. */
void ad_blas_set_threads(int n) {
  ensure_init();
  atomic_store(&g_threads, clamp_threads(n));
}

/* The same setting, refusing what clamp_threads would change. */
ad_status ad_set_threads(int n) {
  if (n < 1 || n > AD_MAX_THREADS)
    return ad__set_last(AD_ERR_ARG, "ad_set_threads: %d threads (1..%d allowed)", n,
                        AD_MAX_THREADS);
  ensure_init();
  atomic_store(&g_threads, n);
  ad__clear_last();
  return AD_OK;
}

int ad_threads(void) {
  return ad_blas_threads();
}

/* Threads inside each GEMM now (HYPERTAPE_THREADS or 1 until set). */
int ad_blas_threads(void) {
  ensure_init();
  return atomic_load(&g_threads);
}

/* "auto" measures (the default); a path name forces that path for every
 * GEMM from now on. */
ad_status ad_blas_set_path(const char *path) {
  ensure_init();
  if (!path) {
    return ad__set_last(AD_ERR_NULL, "ad_blas_set_path: path is NULL");
  }
  if (strcmp(path, "auto") == 0) {
    atomic_store(&g_forced, -1);
    return AD_OK;
  }
  int p = path_by_name(path);
  if (p >= 0 && !g_have_sup && (p == P_SUP || p == P_SUP_PA || p == P_SUP_PB))
    return ad__set_last(AD_ERR_ARG, "ad_blas_set_path: kernel set %s has no sup kernels for '%s'",
                        g_kernel, path);
  if (p == P_NARROW || p == P_NARROW512 || p == P_WIDE512 || p == P_DIRECT512) {
    if (!path_available(p))
      return ad__set_last(AD_ERR_ARG, "ad_blas_set_path: '%s' needs %s, which %s", path,
                          p == P_NARROW ? "AVX2+FMA" : "AVX-512",
                          p == P_NARROW ? "this CPU lacks"
                                        : "this CPU or the kernel set asked for rules out");
  } else if (p < 0 || !path_available(p)) {
    return ad__set_last(
        AD_ERR_ARG,
        "ad_blas_set_path: '%s' is not auto, blis, direct, sup, sup+packA, sup+packB, "
        "packed, packed:team, narrow, narrow:avx512, wide:avx512, direct:avx512%s%s%s%s",
        path, g_have_alt ? ", " : "", g_have_alt ? g_alt_name : "", g_have_alt2 ? ", " : "",
        g_have_alt2 ? g_alt2_name : "");
  }
  atomic_store(&g_forced, p);
  return AD_OK;
}

/* The path a product of this shape takes (measuring it now if it is new;
 * A and B are then scratch arrays of the right size). */
const char *ad_blas_path(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, ad_dtype dt) {
  ensure_init();
  if (m <= 0 || n <= 0 || k <= 0 || (dt != AD_F32 && dt != AD_F64)) return "none";
  int forced = atomic_load(&g_forced);
  if (forced >= 0) return path_name(forced);
  int threads = threads_for(m, n, k);
  /* Already measured? (No scratch needed then.) */
  int found = -1;
  pthread_mutex_lock(&g_cache_mu);
  for (unsigned slot = shape_hash(dt, !!trans_a, !!trans_b, threads, m, n, k) & (CACHE_SLOTS - 1);
       g_cache[slot].used; slot = (slot + 1) & (CACHE_SLOTS - 1)) {
    const shape_entry *e = &g_cache[slot];
    if (e->m == m && e->n == n && e->k == k && e->dt == (int8_t)dt && e->ta == !!trans_a &&
        e->tb == !!trans_b && e->threads == threads) {
      found = CHOICE_PATH(e->path);
      break;
    }
  }
  int full = g_cache_n >= CACHE_FILL;
  pthread_mutex_unlock(&g_cache_mu);
  if (found >= 0) return path_name(found);
  if (full) return path_name(P_BLIS);
  size_t es = dt == AD_F64 ? sizeof(double) : sizeof(float);
  void *a = calloc((size_t)m * (size_t)k, es), *b = calloc((size_t)k * (size_t)n, es);
  int p = P_BLIS, th;
  if (a && b)
    p = CHOICE_PATH(
        choose_path(dt, trans_a, trans_b, m, n, k, a, trans_a ? m : k, b, trans_b ? k : n, &th));
  free(a);
  free(b);
  return path_name(p);
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
  int threads;
  int ch = choose_path(AD_F32, trans_a, trans_b, m, n, k, a, lda, b, ldb, &threads);
  run_choice(ch, threads, AD_F32, !!trans_a, !!trans_b, m, n, k, &alpha, a, lda, b, ldb, &beta, c,
             ldc);
}

int ad__gemm_f32_runs_wide(int ta, int tb, int64_t m, int64_t n, int64_t k, const float *a,
                           int64_t lda, const float *b, int64_t ldb) {
  /* the arguments as ad_gemm_f32 checks them; no C here (a stands in) */
  if (k <= 0 || !gemm_args_ok(ta, tb, m, n, k, a, lda, b, ldb, a, n)) return 0;
  ensure_init();
  int threads;
  const int ch = choose_path(AD_F32, ta, tb, m, n, k, a, lda, b, ldb, &threads);
  return resolve_path(CHOICE_PATH(ch), AD_F32, !!ta, !!tb, m, n, k) == P_WIDE512;
}

/* C = beta C + sum_{i < nb} op(A_i) op(B_i), A_i = a + i sa and B_i = b + i sb
 * elements: the bits of the nb calls ad_gemm_*(ta, tb, m, n, k, 1, A_i, lda,
 * B_i, ldb, i ? 1 : beta, C, ldc) one after another (the same choice of path
 * and split; each part of a split runs its block of C through every i in
 * order), in one job of the worker pool instead of nb. For per-image
 * products summed over a batch (a convolution's weight gradient). */
void ad__gemm_sum(ad_dtype dt, int ta, int tb, int64_t m, int64_t n, int64_t k, const void *a,
                  int64_t lda, int64_t sa, const void *b, int64_t ldb, int64_t sb, int64_t nb,
                  double beta, void *c, int64_t ldc) {
  if (nb <= 0 || (dt != AD_F32 && dt != AD_F64)) return;
  if (nb == 1 || k == 0 || !gemm_args_ok(ta, tb, m, n, k, a, lda, b, ldb, c, ldc)) {
    const size_t es = dt == AD_F64 ? sizeof(double) : sizeof(float);
    for (int64_t i = 0; i < nb; i++) { /* the calls themselves: their no-op and k = 0 rules */
      const char *ai = a ? (const char *)a + (size_t)(i * sa) * es : NULL;
      const char *bi = b ? (const char *)b + (size_t)(i * sb) * es : NULL;
      if (dt == AD_F32)
        ad_gemm_f32(ta, tb, m, n, k, 1.0f, (const float *)(const void *)ai, lda,
                    (const float *)(const void *)bi, ldb, i ? 1.0f : (float)beta, c, ldc);
      else
        ad_gemm_f64(ta, tb, m, n, k, 1.0, (const double *)(const void *)ai, lda,
                    (const double *)(const void *)bi, ldb, i ? 1.0 : beta, c, ldc);
    }
    return;
  }
  ensure_init();
  int threads;
  const int ch = choose_path(dt, ta, tb, m, n, k, a, lda, b, ldb, &threads);
  const float one_f = 1.0f, beta_f = (float)beta;
  const double one_d = 1.0;
  const void *one = dt == AD_F64 ? (const void *)&one_d : (const void *)&one_f;
  const void *bp = dt == AD_F64 ? (const void *)&beta : (const void *)&beta_f;
  run_choice_sum(ch, threads, dt, !!ta, !!tb, m, n, k, one, a, lda, sa, b, ldb, sb, nb, bp, c, ldc);
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
  int threads;
  int ch = choose_path(AD_F64, trans_a, trans_b, m, n, k, a, lda, b, ldb, &threads);
  run_choice(ch, threads, AD_F64, !!trans_a, !!trans_b, m, n, k, &alpha, a, lda, b, ldb, &beta, c,
             ldc);
}
