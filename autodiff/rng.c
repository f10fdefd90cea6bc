/* rng.c — the documented generator: xoshiro256** seeded by splitmix64.
 * Same integer stream on every machine; see ad.h for the normals. */
#include "ad_internal.h"

#include <math.h>

static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

void ad_rng_seed(ad_rng *r, uint64_t seed) {
  if (!r) return;
  uint64_t x = seed;
  for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
  r->has_spare = 0;
  r->spare = 0;
}

static uint64_t rotl(uint64_t x, int k) {
  return (x << k) | (x >> (64 - k));
}

uint64_t ad_rng_next(ad_rng *r) {
  uint64_t *s = r->s;
  uint64_t result = rotl(s[1] * 5, 7) * 9;
  uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return result;
}

double ad_rng_uniform(ad_rng *r) {
  return (double)(ad_rng_next(r) >> 11) * 0x1.0p-53;
}

uint64_t ad_rng_below(ad_rng *r, uint64_t n) {
  if (n == 0) return 0;
  /* Rejection keeps it unbiased: drop the top partial block of 2^64. */
  uint64_t lim = UINT64_MAX - UINT64_MAX % n;
  uint64_t x;
  do x = ad_rng_next(r);
  while (x >= lim);
  return x % n;
}

double ad_rng_normal(ad_rng *r) {
  if (r->has_spare) {
    r->has_spare = 0;
    return r->spare;
  }
  /* Marsaglia polar method: (u, v) uniform in the unit disc,
   * z = u * sqrt(-2 ln s / s), s = u^2 + v^2. */
  double u, v, s;
  do {
    u = 2.0 * ad_rng_uniform(r) - 1.0;
    v = 2.0 * ad_rng_uniform(r) - 1.0;
    s = u * u + v * v;
  } while (s >= 1.0 || s == 0.0);
  double m = sqrt(-2.0 * log(s) / s);
  r->spare = v * m;
  r->has_spare = 1;
  return u * m;
}

void ad_tensor_fill_normal(ad_tensor *t, ad_rng *r, double mean, double std) {
  if (!t || !r) return;
  for (int64_t i = 0; i < t->size; i++) ad_set(t, i, mean + std * ad_rng_normal(r));
}

void ad_tensor_fill_uniform(ad_tensor *t, ad_rng *r, double lo, double hi) {
  if (!t || !r) return;
  for (int64_t i = 0; i < t->size; i++) ad_set(t, i, lo + (hi - lo) * ad_rng_uniform(r));
}
