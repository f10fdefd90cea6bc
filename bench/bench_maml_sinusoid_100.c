/* bench_maml_sinusoid_100.c — the MAML meta-gradient on sinusoid regression, 100 tasks per
 * meta-batch (see bench/maml_bench.h). Twin: maml_sinusoid_100 in bench/twins_implicit.py. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "maml_bench.h"

int main(int argc, char **argv) {
  return mb_main(argc, argv, 100, "maml_sinusoid_100");
}
