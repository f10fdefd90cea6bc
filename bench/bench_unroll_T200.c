/* bench_unroll_T200.c — hypergradient by reverse mode through 200 SGD steps of
 * the 784-200-10 MLP (see bench/unroll_bench.h). Twin: unroll_T200 in
 * bench/torch_twins.py. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "unroll_bench.h"

int main(int argc, char **argv) {
  return ub_main(argc, argv, 200, "unroll_T200");
}
