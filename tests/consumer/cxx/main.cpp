// consumer/cxx/main.cpp — the installed headers from C++ (their extern "C"
// guards) and the static library linked into a C++-only CMake project,
// where no C compiler is enabled to find OpenMP for libblis.a with.
// Checks d/dx sum(x * x) = 2x through a BLIS GEMM: x [1, 3] times x^T.
#include "hypertape.h"

#include <cmath>
#include <cstdio>

int main() {
  ad_tape *tape = nullptr;
  if (ad_tape_new(&tape, nullptr) != AD_OK) {
    std::fprintf(stderr, "consumer-cxx: %s\n", ad_last_error());
    return 1;
  }
  const double xs[3] = {1.5, -2.0, 0.25};
  const int64_t shape[2] = {1, 3};
  ad_tensor *x = ad_const(tape, AD_F64, 2, shape, xs);
  ad_requires_grad(x, 1);
  ad_tensor *f = ad_matmul(tape, x, x, 0, 1), *g = nullptr; // x x^T = sum x_i^2
  if (!f || ad_grad(tape, 1, &f, nullptr, 1, &x, &g, 0) != AD_OK) {
    std::fprintf(stderr, "consumer-cxx: %s\n", ad_tape_errmsg(tape));
    return 1;
  }
  double worst = 0;
  for (int i = 0; i < 3; i++) worst = std::fmax(worst, std::fabs(ad_get(g, i) - 2 * xs[i]));
  std::printf("consumer-cxx: f = %.4f (want 6.3125), max |df/dx - 2x| = %.1e, BLIS %s\n",
              ad_item(f), worst, ad_blas_kernel());
  int ok = std::fabs(ad_item(f) - 6.3125) < 1e-12 && worst < 1e-12;
  ad_tape_free(tape);
  std::printf("consumer-cxx: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
