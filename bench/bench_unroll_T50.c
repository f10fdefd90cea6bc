/* bench_unroll_T50.c — hypergradient by reverse mode through 50 SGD steps of
 * the 784-200-10 MLP (see bench/unroll_bench.h). Twin: unroll_T50 in
 * bench/torch_twins.py. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "unroll_bench.h"

int main(int argc, char **argv) {
  return ub_main(argc, argv, 50, "unroll_T50");
}
