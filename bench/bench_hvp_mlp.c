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

int main(int argc, char **argv) {
  bu_opts o;
  int rc = bu_parse(argc, argv, &o);
  if (rc) return rc > 0 ? 0 : 2;
  mlp_problem p;
  if (mlp_init(&p, 42) != 0) {
    fprintf(stderr, "bench_hvp_mlp: setup failed: %s\n", ad_last_error());
    mlp_free(&p);
    return 1;
  }
  bu_header("hvp_mlp", &o);

  ad_marker m = ad_mark(p.tape);
  ad_tensor *loss = mlp_loss(&p);
  ad_tensor *hv[2] = {NULL, NULL};
  ad_hvp(p.tape, loss, 2, p.w, p.v, hv, 0);
  if (bu_tape_failed(p.tape, "bench_hvp_mlp") || !mlp_finite(loss) || !mlp_finite(hv[0]) ||
      !mlp_finite(hv[1])) {
    fprintf(stderr, "bench_hvp_mlp: the checked step failed or is not finite\n");
    mlp_free(&p);
    return 1;
  }
  fprintf(stderr, "# loss %.6f  v.Hv %.6f\n", ad_item(loss),
          ad_item(ad_dot(p.tape, hv[0], p.v[0])) + ad_item(ad_dot(p.tape, hv[1], p.v[1])));
  ad_rewind(p.tape, m);

  double ours_ms = 0, floor_ms = 0;
  if (bu_time_pair(ours, floor_gemms, &p, &o, &ours_ms, &floor_ms) != 0 ||
      bu_tape_failed(p.tape, "bench_hvp_mlp")) {
    mlp_free(&p);
    return 1;
  }
  bu_report("hvp_mlp", &o, ours_ms, floor_ms);
  mlp_free(&p);
  return 0;
}
