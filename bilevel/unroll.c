/* unroll.c — reverse-mode hypergradient through the recorded inner loop.
 *
 *   w_{k+1} = Phi_k(w_k, s_k, lam)        k = 0 .. T-1 (any nn/ optimizer)
 *   dL_val/dlam = dL_val/dlam|_{w_T} + sum_k alpha_{k+1} B_k
 *   alpha_T = grad_w L_val(w_T),  alpha_k = alpha_{k+1} A_k,
 *   A_k = dPhi_k/d(w_k, s_k),  B_k = dPhi_k/dlam
 * (the optimizer state s rides along with w: its adjoint is carried too).
 *
 * All T steps are recorded (the backward of each L_train gradient included,
 * AD_GRAD_RECORD), then walked back a chunk of ~sqrt(T) steps at a time
 * (bl__segment_*): each chunk's graph is freed as soon as its adjoint is
 * taken, so the peak is the forward tape plus one chunk's backward rather
 * than both whole tapes. Step 0's backward through its L_train gradient
 * leads only to w_0 and is skipped.
 *
 * Truncated (o->K in 1..T-1): the first T-K steps run in place, and the
 * recorded part starts from a detached copy of w_{T-K} (stop-gradient), so
 * only the last K steps' B_k are summed: the K-step truncated hypergradient
 * of Shaban et al. (2019). K = 0 or K >= T: the full unroll. */
#include "bl_internal.h"

/* The old walk back (copies of w_start and of the adjoints in buffers made
 * up front), for tests that check the lean one gives the same bits. */
static _Thread_local int unroll_legacy;
void bl__unroll_set_legacy(int on) {
  unroll_legacy = on != 0;
}

/* The lean unroll (no o.keep_tape): what the old one computes, value for
 * value, holding fewer weight-sized buffers at its peak (the first chunk
 * walked back, or L_val's gradient):
 *  - the recorded segment starts from leaf views of w_start and the state
 *    (nothing writes them while it lives), not copies;
 *  - no adjoint buffers before the record: alpha_T is L_val's gradient
 *    itself, kept when L_val's graph is freed;
 *  - each chunk's adjoint results are moved down over the chunk as it is
 *    freed, so there is no second adjoint buffer to copy them into.
 * glam is made before the record, below everything a compaction moves:
 * made after it, it rode down with the adjoints at every chunk dropped,
 * one lam-sized move per step (in the 784-200-10 unroll at T = 50, 31 MB
 * of memmove per hypergradient). */
static ad_status unroll_lean(bl_run *r, ad_tensor *const *w, bl_state *os, int64_t start, int64_t T,
                             ad_tensor **glam) {
  ad_tensor *aw[NN_MAX_PARAMS], *as[BL_MAX_STATE];
  bl_segment sg = {0};
  ad_status s = bl__zeros_new(r, r->p->n_lam, r->lam, glam);
  if (!s) s = bl__segment_record_ex(r, &sg, w, os, start, T, 0, BL_SEG_LEAN);
  sg.skip_start_adjoint = 1; /* nothing is differentiated before the start */
  if (!s) s = bl__val_keep(r, sg.w_end, aw, glam);
  ad_tensor *sb[BL_MAX_STATE];
  int ns = bl__state_list(&sg.s_end, sb);
  if (!s) s = bl__zeros_new(r, ns, sb, as);
  if (!s) s = bl__segment_release_end(r, &sg, aw, ns ? as : NULL);
  if (!s) s = bl__segment_reverse_lean(r, &sg, aw, as, glam);
  return s;
}

ad_status bl_unroll(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                    bl_stats *st) {
  bl_run r;
  ad_status s = bl__begin(&r, "bl_unroll", t, p, o, hg, 0);
  if (s) return bl__end(&r, s, st);
  if (r.o.K < 0) return bl__end(&r, bl__fail(&r, AD_ERR_ARG, "K = %lld < 0", (long long)r.o.K), st);
  int64_t T = p->inner_steps;
  int64_t start = r.o.K > 0 && r.o.K < T ? T - r.o.K : 0;
  int n = p->n_w, n_lam = p->n_lam;

  /* Long-lived buffers: w and the state (in place up to `start`), the
   * adjoints alpha (on w and on the state) and the hypergradient. */
  ad_tensor *w[NN_MAX_PARAMS], *aw[NN_MAX_PARAMS], *as[BL_MAX_STATE], *glam[NN_MAX_PARAMS];
  ad_tensor *gw_T[NN_MAX_PARAMS], *glam_T[NN_MAX_PARAMS], *sb[BL_MAX_STATE];
  bl_state os = {0};
  /* Writable copies of w0 only when steps run in place before the cut: the
   * recorded segment copies its start itself, so a full unroll reads the
   * caller's w0 (never written) and saves one weight-sized buffer. */
  if (start > 0)
    s = bl__w0_copy(&r, w);
  else
    for (int i = 0; i < n; i++) w[i] = p->w0[i];
  if (!s) s = bl__state_new(&r, &os);
  if (!r.o.keep_tape && !unroll_legacy) {
    if (!s) s = bl__run_inplace(&r, r.lam, w, &os, 0, start);
    if (!s) s = unroll_lean(&r, w, &os, start, T, glam);
    if (!s) s = bl__write_hg(&r, glam, hg);
    return bl__end(&r, s, st);
  }
  int ns = bl__state_list(&os, sb);
  if (!s) s = bl__zeros_new(&r, n, w, aw);
  if (!s) s = bl__zeros_new(&r, ns, sb, as);
  if (!s) s = bl__zeros_new(&r, n_lam, r.lam, glam);

  /* Steps 0 .. start-1 without a tape (truncation). */
  if (!s) s = bl__run_inplace(&r, r.lam, w, &os, 0, start);

  /* Steps start .. T-1 recorded, from a copy of w_start: the cut. */
  bl_segment sg = {0};
  if (!s) s = bl__segment_record(&r, &sg, w, &os, start, T, 0);
  sg.skip_start_adjoint = 1; /* nothing is differentiated before the start */

  /* alpha_T = grad_w L_val(w_T); the direct term dL_val/dlam at w_T. */
  ad_marker m = ad_mark(t);
  if (!s) s = bl__val_grad(&r, r.lam, sg.w_end, NULL, gw_T, glam_T);
  if (!s) {
    bl__copy_list(n, aw, gw_T);
    bl__copy_list(n_lam, glam, glam_T);
    bl__rewind(&r, m);
  }

  /* Walk back: glam += alpha_{k+1} B_k, alpha_k = alpha_{k+1} A_k. */
  if (!s) s = bl__segment_reverse(&r, &sg, aw, as, glam);
  if (!s) s = bl__write_hg(&r, glam, hg);
  return bl__end(&r, s, st);
}
