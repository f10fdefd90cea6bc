/* bench_cg_K20.c — implicit hypergradient by 20 conjugate-gradient
 * iterations (bl_cg) on H + I, MLP 784-200-10, per-parameter weight
 * decay. See implicit_bench.h. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "implicit_bench.h"

int main(int argc, char **argv) {
  return ib_main(argc, argv, bl_cg, (bl_opts){.K = IB_K, .tol = 1e-300, .damping = 1.0}, "cg_K20");
}
