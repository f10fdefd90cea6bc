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

int main(int argc, char **argv) {
  bu_opts o;
  int rc = bu_parse(argc, argv, &o);
  if (rc) return rc > 0 ? 0 : 2;
  mlp_problem p;
  if (mlp_init(&p, 42) != 0) {
    fprintf(stderr, "bench_grad_mlp: setup failed: %s\n", ad_last_error());
    mlp_free(&p);
    return 1;
  }
  bu_header("grad_mlp", &o);

  /* One checked step first: a failing op must not be timed as a fast one. */
  ad_marker m = ad_mark(p.tape);
  ad_tensor *loss = mlp_loss(&p);
  ad_tensor *g[2] = {NULL, NULL};
  ad_grad(p.tape, 1, &loss, NULL, 2, p.w, g, 0);
  if (bu_tape_failed(p.tape, "bench_grad_mlp") || !mlp_finite(loss) || !mlp_finite(g[0]) ||
      !mlp_finite(g[1])) {
    fprintf(stderr, "bench_grad_mlp: the checked step failed or is not finite\n");
    mlp_free(&p);
    return 1;
  }
  fprintf(stderr, "# loss %.6f  |dW1|_1 %.6f\n", ad_item(loss),
          ad_item(ad_sum(p.tape, ad_abs(p.tape, g[0]))));
  ad_rewind(p.tape, m);

  double ours_ms = 0, floor_ms = 0;
  if (bu_time_pair(ours, floor_gemms, &p, &o, &ours_ms, &floor_ms) != 0 ||
      bu_tape_failed(p.tape, "bench_grad_mlp")) {
    mlp_free(&p);
    return 1;
  }
  bu_report("grad_mlp", &o, ours_ms, floor_ms);
  mlp_free(&p);
  return 0;
}
