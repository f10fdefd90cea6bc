/* checkpoint.c — unroll with checkpoints (Griewank's revolve, one level):
 * the same hypergradient as bl_unroll in O(sqrt T) memory for one extra
 * forward pass.
 *
 * Forward, in place: every C steps store (w_k, s_k) — bl_state is a
 * plain struct, so a checkpoint is a copy of it and its buffers.
 * Backward, segment by segment from the last: restore the checkpoint,
 * record its C steps, walk them back carrying the adjoints (alpha on w and
 * on the optimizer state) exactly as bl_unroll does, rewind. Memory:
 * ceil(T/C) checkpoints plus one segment's tape, minimal near C = sqrt(T)
 * (the default; o->checkpoint_every sets C). st->peak_arena_bytes shows it. */
#include "bl_internal.h"

#include <math.h>

ad_status bl_checkpointed(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                          bl_stats *st) {
  bl_run r;
  ad_status s = bl__begin(&r, "bl_checkpointed", t, p, o, hg, 0);
  if (s) return bl__end(&r, s, st);
  int n = p->n_w, n_lam = p->n_lam;
  int64_t T = p->inner_steps;
  int64_t C = r.o.checkpoint_every;
  if (C < 0) return bl__end(&r, bl__fail(&r, AD_ERR_ARG, "checkpoint_every < 0"), st);
  if (C == 0) C = (int64_t)ceil(sqrt((double)T));
  if (C < 1) C = 1;
  int64_t n_seg = (T + C - 1) / C;

  ad_tensor *w[NN_MAX_PARAMS], *aw[NN_MAX_PARAMS], *as[BL_MAX_STATE], *glam[NN_MAX_PARAMS];
  ad_tensor *sb[BL_MAX_STATE];
  bl_state os = {0};
  s = bl__w0_copy(&r, w);
  if (!s) s = bl__state_new(&r, &os);
  int ns = bl__state_list(&os, sb);
  if (!s) s = bl__zeros_new(&r, n, w, aw);
  if (!s) s = bl__zeros_new(&r, ns, sb, as);
  if (!s) s = bl__zeros_new(&r, n_lam, r.lam, glam);

  /* Checkpoint j holds (w, s) at step j*C, in the arena. */
  ad_tensor **ck_w = ad_arena_alloc(t, sizeof(ad_tensor *) * (size_t)(n_seg * n + 1));
  bl_state *ck_s = ad_arena_alloc(t, sizeof(bl_state) * (size_t)(n_seg + 1));
  if (!s && (!ck_w || !ck_s)) s = ad_tape_status(t);

  /* Forward in place, saving a checkpoint at the start of each segment. */
  for (int64_t j = 0; j < n_seg && !s; j++) {
    s = bl__copy_new(&r, n, w, ck_w + j * n);
    if (!s) s = bl__state_copy(&r, &ck_s[j], &os, BL_STATE_INPLACE);
    int64_t end = (j + 1) * C < T ? (j + 1) * C : T;
    if (!s) s = bl__run_inplace(&r, r.lam, w, &os, j * C, end);
  }

  /* alpha_T and the direct term at w_T. */
  ad_marker m = ad_mark(t);
  ad_tensor *gw[NN_MAX_PARAMS], *gd[NN_MAX_PARAMS];
  if (!s) s = bl__val_grad(&r, r.lam, w, NULL, gw, gd);
  if (!s) {
    bl__copy_list(n, aw, gw);
    bl__copy_list(n_lam, glam, gd);
  }
  ad_rewind(t, m);

  /* Backward, last segment first: recompute it on the tape, walk it back. */
  for (int64_t j = n_seg - 1; j >= 0 && !s; j--) {
    int64_t end = (j + 1) * C < T ? (j + 1) * C : T;
    bl_segment sg = {0};
    s = bl__segment_record(&r, &sg, ck_w + j * n, &ck_s[j], j * C, end, 0);
    sg.skip_start_adjoint = j == 0; /* no adjoint needed at w_0 */
    if (!s) s = bl__segment_reverse(&r, &sg, aw, as, glam);
    ad_rewind(t, m);
  }
  if (!s) s = bl__write_hg(&r, glam, hg);
  return bl__end(&r, s, st);
}
