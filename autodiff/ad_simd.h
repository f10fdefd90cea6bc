/* ad_simd.h — what the hand-vectorised kernels (blas.c, ops_bmm.c) share:
 * GCC/Clang vector types, the x86 test, the AVX2+FMA target attribute and
 * the run-time check that the CPU (and OS) can run it. Not installed. */
#ifndef HYPERTAPE_AD_SIMD_H
#define HYPERTAPE_AD_SIMD_H

#if defined(__x86_64__) || defined(__i386__)
#define AD_X86 1
#else
#define AD_X86 0
#endif

/* Vector types, and their unaligned, aliasing twins for loads and stores
 * from float/double arrays. */
#define AD_VEC(NAME, T, BYTES)                                                                     \
  typedef T NAME __attribute__((vector_size(BYTES)));                                              \
  typedef T NAME##u __attribute__((vector_size(BYTES), aligned(sizeof(T)), may_alias));
AD_VEC(ad_v8f, float, 32)
AD_VEC(ad_v4d, double, 32)
AD_VEC(ad_v4f, float, 16)
AD_VEC(ad_v2d, double, 16)
AD_VEC(ad_v16f, float, 64)
AD_VEC(ad_v8d, double, 64)

#if AD_X86 && defined(__GNUC__)
/* GCC contracts a*b+c only with fp-contract=fast; clang has no optimize
 * attribute and contracts within a statement by default. */
#if defined(__clang__)
#define AD_AVX2_ATTR __attribute__((target("avx2,fma")))
#else
#define AD_AVX2_ATTR __attribute__((target("avx2,fma"), optimize("fp-contract=fast")))
#endif
/* AVX-512F for the 512-bit vectors and masks, VL for 256-bit vectors in
 * all 32 registers (kernels that keep 8-float vectors but want more
 * accumulators). Taken only where ad__cpu_avx512 says so. */
#if defined(__clang__)
#define AD_AVX512_ATTR __attribute__((target("avx512f,avx512vl,avx2,fma")))
#else
#define AD_AVX512_ATTR                                                                             \
  __attribute__((target("avx512f,avx512vl,avx2,fma"), optimize("fp-contract=fast")))
#endif
/* The same instruction sets with nothing contracted into an FMA, for
 * passes whose bits must equal the portable build's (each product rounded,
 * as the composed public ops do). GCC: fp-contract=off on the function;
 * clang has no such attribute and contracts within a statement, so a body
 * that must not fuse starts with AD_NO_FMA. */
#if defined(__clang__)
#define AD_AVX512_EXACT_ATTR __attribute__((target("avx512f,avx512vl,avx2")))
#define AD_AVX2_EXACT_ATTR __attribute__((target("avx2")))
#define AD_NO_FMA _Pragma("clang fp contract(off)")
#else
#define AD_AVX512_EXACT_ATTR                                                                       \
  __attribute__((target("avx512f,avx512vl,avx2"), optimize("fp-contract=off")))
#define AD_AVX2_EXACT_ATTR __attribute__((target("avx2"), optimize("fp-contract=off")))
#define AD_NO_FMA
#endif
#else
#define AD_NO_FMA
#endif

/* AD_WIDE_PASS(NAME, body): a range pass with ad__par_for's signature
 * (ctx, part, lo, hi) whose body is compiled twice, for the base ISA and
 * (x86, GCC/Clang) for AVX-512 with nothing contracted, NAME taking the
 * AVX-512 one where ad__blas_avx512_allowed() says so (ad_internal.h must be
 * included first). The passes it is for are memory-bound loops over
 * weight-sized arrays: the base ISA's 128-bit loads and stores leave the
 * load ports half used on a CPU that has 512-bit ones. Every element is the
 * same expression in the same order either way, so both give the same bits.
 * (Kept out of clang-format, which folds the three functions into one run.) */
/* clang-format off */
#if AD_X86 && defined(__GNUC__)
#define AD_WIDE_PASS(NAME, ...)                                                                    \
  static void NAME##_base(void *ctx, int part, int64_t lo, int64_t hi) {                           \
    AD_NO_FMA __VA_ARGS__                                                                          \
  }                                                                                                \
  AD_AVX512_EXACT_ATTR static void NAME##_w512(void *ctx, int part, int64_t lo, int64_t hi) {      \
    AD_NO_FMA __VA_ARGS__                                                                          \
  }                                                                                                \
  static void NAME(void *ctx, int part, int64_t lo, int64_t hi) {                                  \
    (ad__blas_avx512_allowed() ? NAME##_w512 : NAME##_base)(ctx, part, lo, hi);                    \
  }
#else
#define AD_WIDE_PASS(NAME, ...)                                                                    \
  static void NAME(void *ctx, int part, int64_t lo, int64_t hi) {                                  \
    AD_NO_FMA __VA_ARGS__                                                                          \
  }
#endif
/* clang-format on */

#if AD_X86 && defined(__GNUC__)
#include <immintrin.h>
/* out[x] = lane x of r[0..7]: an 8x8 transpose of floats in registers
 * (pairs interleaved, then quads, then the 128-bit halves swapped). Used
 * to copy a matrix's columns into rows for the GEMM kernels. */
AD_AVX2_ATTR static inline void ad__tr8_ps(const __m256 r[8], __m256 out[8]) {
  __m256 t[8], u[8];
  for (int q = 0; q < 8; q += 2) {
    t[q] = _mm256_unpacklo_ps(r[q], r[q + 1]);
    t[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);
  }
  for (int h = 0; h < 8; h += 4) {
    u[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
    u[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);
    u[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
    u[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
  }
  for (int q = 0; q < 4; q++) {
    out[q] = _mm256_permute2f128_ps(u[q], u[q + 4], 0x20);
    out[q + 4] = _mm256_permute2f128_ps(u[q], u[q + 4], 0x31);
  }
}
#endif

/* Whether the CPU runs AVX2+FMA, by the compiler's cpuid helpers (which
 * also check that the OS saves the AVX register state). The CPU model is
 * filled in at load time; __builtin_cpu_init only makes sure of it. */
static inline int ad__cpu_avx2_fma(void) {
#if AD_X86 && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return 0;
#endif
}

/* Whether the CPU (and OS) run AVX-512F and VL, what AD_AVX512_ATTR code
 * needs. */
static inline int ad__cpu_avx512(void) {
#if AD_X86 && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         ad__cpu_avx2_fma();
#else
  return 0;
#endif
}

#endif
