/* bench_neumann_K20.c — implicit hypergradient by a 20-term Neumann series
 * (bl_neumann), MLP 784-200-10, per-parameter weight decay. See
 * implicit_bench.h. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "implicit_bench.h"

int main(int argc, char **argv) {
  return ib_main(argc, argv, bl_neumann, (bl_opts){.K = IB_K, .alpha = 0.1}, "neumann_K20");
}
