/* bench_grad_mlp.c — gradient of the MLP loss (bench/mlp.h) w.r.t. both
 * weight matrices: forward on the tape, ad_grad, then ad_rewind to the mark
 * taken before the step, as a training loop would. Twin: grad_mlp in
 * bench/torch_twins.py. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "bench_util.h"
#include "mlp.h"

static void ours(void *ctx) {
  mlp_problem *p = ctx;
  ad_marker m = ad_mark(p->tape);
  ad_tensor *loss = mlp_loss(p);
  ad_tensor *g[2] = {NULL, NULL};
  ad_grad(p->tape, 1, &loss, NULL, 2, p->w, g, 0);
  ad_rewind(p->tape, m);
}

static void floor_gemms(void *ctx) {
  mlp_floor_grad(ctx);
}

/* One gradient, checked: the loss and both gradients finite. */
static int checked_step(mlp_problem *p, const char *prog) {
  ad_tensor *loss = mlp_loss(p);
  ad_tensor *g[2] = {NULL, NULL};
  ad_grad(p->tape, 1, &loss, NULL, 2, p->w, g, 0);
  if (bu_tape_failed(p->tape, prog) || !mlp_finite(loss) || !mlp_finite(g[0]) || !mlp_finite(g[1]))
    return 1;
  fprintf(stderr, "# loss %.6f  |dW1|_1 %.6f\n", ad_item(loss),
          ad_item(ad_sum(p->tape, ad_abs(p->tape, g[0]))));
  return 0;
}

int main(int argc, char **argv) {
  return mlp_bench_main(argc, argv, "bench_grad_mlp", "grad_mlp", ours, floor_gemms, checked_step);
}
