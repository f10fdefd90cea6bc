/* bench_hvp_mlp.c — Hessian-vector product of the MLP loss (bench/mlp.h)
 * w.r.t. both weight matrices along a random direction V: ad_hvp, i.e. the
 * gradient recorded on the tape and differentiated again. Twin: hvp_mlp in
 * bench/torch_twins.py (double backward). */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "bench_util.h"
#include "mlp.h"

static void ours(void *ctx) {
  mlp_problem *p = ctx;
  ad_marker m = ad_mark(p->tape);
  ad_tensor *loss = mlp_loss(p);
  ad_tensor *hv[2] = {NULL, NULL};
  ad_hvp(p->tape, loss, 2, p->w, p->v, hv, 0);
  ad_rewind(p->tape, m);
}

static void floor_gemms(void *ctx) {
  mlp_floor_hvp(ctx);
}

/* One HVP, checked: the loss and both products finite. */
static int checked_step(mlp_problem *p, const char *prog) {
  ad_tensor *loss = mlp_loss(p);
  ad_tensor *hv[2] = {NULL, NULL};
  ad_hvp(p->tape, loss, 2, p->w, p->v, hv, 0);
  if (bu_tape_failed(p->tape, prog) || !mlp_finite(loss) || !mlp_finite(hv[0]) ||
      !mlp_finite(hv[1]))
    return 1;
  fprintf(stderr, "# loss %.6f  v.Hv %.6f\n", ad_item(loss),
          ad_item(ad_dot(p->tape, hv[0], p->v[0])) + ad_item(ad_dot(p->tape, hv[1], p->v[1])));
  return 0;
}

int main(int argc, char **argv) {
  return mlp_bench_main(argc, argv, "bench_hvp_mlp", "hvp_mlp", ours, floor_gemms, checked_step);
}
