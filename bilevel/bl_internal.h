/* bl_internal.h — what the hypergradient methods share (bilevel/common.c):
 * the per-call working set, the inner trajectory run in place or recorded,
 * one recorded step and its VJP, optimizer-state copies, and plain vector
 * algebra over lists of tensors. Not installed; users never see it.
 *
 * A method reads like this (bilevel/fo.c is the shortest example):
 *
 *     ad_status bl_fo(ad_tape *t, const bl_problem *p, const bl_opts *o,
 *                     ad_tensor *const *hg, bl_stats *st) {
 *       bl_run r;
 *       ad_status s = bl__begin(&r, "bl_fo", t, p, o, hg, 0);   // checks + mark
 *       if (s) return bl__end(&r, s, st);
 *       ad_tensor *w[NN_MAX_PARAMS], *glam[NN_MAX_PARAMS];
 *       bl_state os;
 *       s = bl__w0_copy(&r, w);                                  // writable copies of w0
 *       if (!s) s = bl__state_new(&r, &os);                      // the step's state at step 0
 *       if (!s) s = bl__run_inplace(&r, r.lam, w, &os, 0, p->inner_steps);
 *       if (!s) s = bl__val_grad(&r, r.lam, w, NULL, glam);      // dL_val/dlam at w_T
 *       if (!s) s = bl__write_hg(&r, glam, hg);
 *       return bl__end(&r, s, st);                               // rewind, stats
 *     }
 *
 * Conventions
 * -----------
 * - Step s (0-based) maps w_s to w_{s+1} and calls L_train with step = s.
 *   The validation loss is called with step = -1.
 * - Every helper that can fail records the error on the tape (ad__fail) and
 *   returns it, so a method chains them with `if (!s) s = ...` and reports
 *   the first failure. nn/ errors (thread-local messages) are moved onto the
 *   tape with their text.
 * - Memory: every buffer a method needs for the whole call (copies of w,
 *   optimizer states, checkpoints, accumulated hypergradients) is allocated
 *   in the arena right after bl__begin, so bl__end's rewind frees it and
 *   st->peak_arena_bytes counts it. Per-step work sits between an ad_mark /
 *   ad_rewind pair and is gone after the step; results that must survive a
 *   rewind are copied into the long-lived buffers first (bl__copy_list,
 *   bl__axpy).
 * - The method differentiates by r->lam: views of p->lam that are leaves
 *   needing a gradient, so the user's tensors are neither written nor
 *   re-flagged. r->opt.cfg is p->opt with every *_var that pointed at p->lam[k]
 *   pointing at r->lam[k] instead. Pass r->lam to the trajectory helpers; to
 *   evaluate at perturbed hyperparameters, pass other tensors shaped like
 *   lam: the step (bilevel/step.c) resolves p->opt's *_var fields against
 *   whatever lam it is called with.
 * - The inner step is r->step: the user's bl_step, or the provider wrapping
 *   p->opt (bilevel/step.c). Every trajectory helper goes through it; only
 *   the in-place run of a library optimizer takes nn_opt_step's fast path
 *   (bl__step_inplace). Its state is a bl_state: r->step.slots * n_w
 *   buffers, slot k of parameter i at k * n_w + i; the step count is the
 *   step index (0-based), so a state carries no counter.
 * - st->hvps counts second-order products: each reverse (or forward) sweep
 *   through the derivative of one inner step, or one Hessian-vector /
 *   mixed-partial product, is one.
 */
#ifndef HYPERTAPE_BL_INTERNAL_H
#define HYPERTAPE_BL_INTERNAL_H

#include "bl.h"
#include "autodiff/ad_internal.h"

/* Most state buffers one step's state holds (m and v per parameter). */
#define BL_MAX_STATE (BL_STEP_MAX_SLOTS * NN_MAX_PARAMS)

/* The inner step's state: n = slots * n_w buffers (slot k of parameter i at
 * k * n_w + i). A plain struct: copying it copies the pointers. */
typedef struct {
  int n;
  ad_tensor *b[BL_MAX_STATE];
} bl_state;

/* An optimizer config whose tape variables point at a given set of
 * hyperparameter tensors. Holds the per-parameter arrays the config points
 * into, so keep it where it is (do not copy it by value and use the copy). */
typedef struct {
  nn_opt_cfg cfg;
  ad_tensor *lr_vars[NN_MAX_PARAMS];
  ad_tensor *wd_vars[NN_MAX_PARAMS];
} bl_cfg_map;

/* The working set of one method call. */
typedef struct {
  ad_tape *t;
  const bl_problem *p;
  bl_opts o;                     /* the caller's options, or all zero */
  const char *who;               /* method name for messages */
  ad_tensor *lam[NN_MAX_PARAMS]; /* leaf views of p->lam (see Conventions) */
  bl_cfg_map opt;                /* p->opt pointing at lam above (zeros for a user step) */
  bl_step step;                  /* the inner step: the user's, or p->opt's provider */
  int lib;                       /* step is p->opt's provider (nn_opt_step fast path) */
  int64_t val_at;                /* t of the iterate L_val is taken at (messages); T at entry */
  bl_stats st;                   /* filled as the method goes */
  /* restored by bl__end */
  ad_marker mark;
  int recording;
  size_t used0; /* arena bytes in use at entry */
  double t0;    /* seconds at entry */
  int begun;    /* bl__begin got as far as the mark */
} bl_run;

/* ---------------------------------------------------------------- entry, exit */

/* Starts a method call: checks t (not NULL, no pending error), p (non-NULL
 * callbacks and tensors, 1 <= n_w, n_lam <= NN_MAX_PARAMS, w0 of one dtype),
 * hg (non-NULL, hg[k] shaped like lam[k]), p->inner_steps >= min_steps;
 * then marks the arena, resets its peak, turns recording on, starts the
 * clock and makes r->lam / r->opt. Errors go on the tape (or to
 * ad_last_error when t is NULL). Always pair with bl__end, even on error. */
ad_status bl__begin(bl_run *r, const char *who, ad_tape *t, const bl_problem *p, const bl_opts *o,
                    ad_tensor *const *hg, int64_t min_steps);

/* Ends a call: rewinds everything recorded or allocated since bl__begin,
 * restores recording, fills st (if not NULL) with r->st plus
 * peak_arena_bytes (arena high-water in the call above the bytes in use at
 * entry) and seconds. Returns s unchanged. The tape's own peak statistic is
 * left at the call's high-water mark (ad.h has no way to restore it). */
ad_status bl__end(bl_run *r, ad_status s, bl_stats *st);

/* ad_rewind(r->t, m), unless the caller asked to keep the tape
 * (bl_opts.keep_tape): every rewind of what a method recorded goes here. */
void bl__rewind(bl_run *r, ad_marker m);

/* Records an error on the tape and returns it (printf-style message,
 * prefixed with r->who). */
ad_status bl__fail(bl_run *r, ad_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Moves a failed nn_ call's status and ad_last_error() message onto the
 * tape; returns s (AD_OK passes through). */
ad_status bl__nn(bl_run *r, ad_status s);

/* r->o.<field> if nonzero, else the default. */
#define BL_OPT(r, field, dflt) ((r)->o.field ? (r)->o.field : (dflt))

/* The inner learning rate as a number (lr_var read as its value; the first
 * parameter's lr_vars entry, element 0), with nn's default 0.01. */
double bl__lr(const nn_opt_cfg *cfg);
/* o->alpha if set, else the library optimizer's lr; a user step has no lr
 * to default to, so then it is an AD_ERR_ARG naming the step. */
ad_status bl__alpha(bl_run *r, double *alpha);

/* cfg = p->opt with each *_var / *_vars entry that is p->lam[k] replaced by
 * lam[k] (other tensors are kept). */
void bl__cfg_map(const bl_problem *p, ad_tensor *const *lam, bl_cfg_map *m);

/* ---------------------------------------------------------------- tensors */

/* An arena tensor with x's shape, dtype and values and no history. */
ad_tensor *bl__copy(ad_tape *t, const ad_tensor *x);
/* bl__copy, marked as a leaf that needs a gradient: the start of a
 * recorded segment. */
ad_tensor *bl__leaf(ad_tape *t, const ad_tensor *x);
/* A leaf view of x sharing its data (no copy): only when x's values will
 * not change while the view is used. */
ad_tensor *bl__leaf_view(ad_tape *t, const ad_tensor *x);

/* out[i] = bl__copy(src[i]) / bl__leaf(src[i]) / arena zeros like src[i]. */
ad_status bl__copy_new(bl_run *r, int n, ad_tensor *const *src, ad_tensor **out);
ad_status bl__leaf_new(bl_run *r, int n, ad_tensor *const *src, ad_tensor **out);
ad_status bl__zeros_new(bl_run *r, int n, ad_tensor *const *like, ad_tensor **out);

/* Writable copies of p->w0 in the arena, marked as leaves needing a
 * gradient so the in-place run can take L_train's gradient at them. */
ad_status bl__w0_copy(bl_run *r, ad_tensor **w);

/* Copies the hypergradient g (tensors shaped like lam, any dtype) into the
 * caller's hg. Call it last, once everything has succeeded. */
ad_status bl__write_hg(bl_run *r, ad_tensor *const *g, ad_tensor *const *hg);

/* ---------------------------------------------------------------- lists as vectors
 * Plain value arithmetic (no recording) over lists of n tensors, summed in
 * double; tensors paired by index must have the same size (dtypes may
 * differ). NULL entries of x count as zero. */

double bl__dot(int n, ad_tensor *const *a, ad_tensor *const *b);          /* sum_i <a_i, b_i> */
double bl__norm(int n, ad_tensor *const *a);                              /* sqrt(bl__dot(a, a)) */
void bl__axpy(int n, ad_tensor *const *y, double c, ad_tensor *const *x); /* y_i += c x_i */
void bl__scale(int n, ad_tensor *const *y, double c);                     /* y_i *= c */
void bl__zero(int n, ad_tensor *const *y);
/* dst_i = src_i (values; NULL src_i gives zeros). */
void bl__copy_list(int n, ad_tensor *const *dst, ad_tensor *const *src);
/* y_i = (1 - b) a_i + b c_i: points on the segment from a to c. */
void bl__lerp(int n, ad_tensor *const *y, ad_tensor *const *a, ad_tensor *const *c, double b);

/* The same dot product recorded on the tape (a scalar tensor): for building
 * <grad_w L, v> to differentiate again. NULL on error (on the tape). */
ad_tensor *bl__dot_tape(ad_tape *t, int n, ad_tensor *const *a, ad_tensor *const *b);

/* ---------------------------------------------------------------- the step and its state */

/* Resolves r->step (the user's step, checked, or p->opt's provider, its
 * settings checked by nn_opt_check for parameters shaped like w) and
 * r->lib; called by bl__begin. */
ad_status bl__step_resolve(bl_run *r, ad_tensor *const *w);

/* A library optimizer with its settings already resolved (ctx = the
 * nn_opt_cfg) as a bl_step_fn: state slots m then v, as nn_opt_state keeps
 * them for cfg->kind. p->opt's provider calls it; so do the meta methods. */
ad_status bl__cfg_step(ad_tape *t, int n, ad_tensor *const *w, ad_tensor *const *state,
                       ad_tensor *const *g, ad_tensor *const *lam, int64_t step, void *ctx,
                       ad_tensor **w_new, ad_tensor **state_new);

/* The step's name for messages: "user step" or the step's own name. */
const char *bl__step_name(const bl_run *r);

/* One step recorded through r->step at hyperparameters lam: w_new and the
 * new state (s_new, may be s itself: replaced) from w, s and the gradient
 * g. Checks what a user step returned (non-NULL, shaped like its input). */
ad_status bl__step_call(bl_run *r, ad_tensor *const *lam, ad_tensor *const *w, const bl_state *s,
                        ad_tensor *const *g, int64_t step, ad_tensor **w_new, bl_state *s_new);

/* One step in place: w and s's buffers overwritten with the new values.
 * A library optimizer runs nn_opt_step (no recording, no allocation); a
 * user step runs with recording off and its outputs copied back. */
ad_status bl__step_inplace(bl_run *r, ad_tensor *const *lam, ad_tensor *const *w, bl_state *s,
                           ad_tensor *const *g, int64_t step);

/* A fresh state for r->step with its buffers (zeros, or the step's init) in
 * the arena: freed by bl__end's rewind, counted in the peak. */
ad_status bl__state_new(bl_run *r, bl_state *s);

/* dst = src with every buffer replaced by an arena copy of its values.
 * mode BL_STATE_INPLACE / BL_STATE_TAPE: plain copies (writable, no
 * history); BL_STATE_LEAF: leaves needing a gradient, to differentiate
 * with respect to the state. */
enum { BL_STATE_INPLACE = 0, BL_STATE_TAPE = 1, BL_STATE_LEAF = 2 };
ad_status bl__state_copy(bl_run *r, bl_state *dst, const bl_state *src, int mode);

/* Copies src's buffer values into dst's existing buffers. */
void bl__state_set(bl_state *dst, const bl_state *src);

/* The buffers of s as a list (slot-major); returns how many (0 for SGD). */
int bl__state_list(const bl_state *s, ad_tensor **out);

/* Checks that every element of the n tensors is finite; else records
 * AD_ERR_NUMERIC "<what> is not finite (element e of tensor i is x) at
 * <where>" and returns it. */
ad_status bl__check_finite(bl_run *r, int n, ad_tensor *const *x, const char *what,
                           const char *where);

/* ---------------------------------------------------------------- the inner trajectory */

/* Checks that a loss callback returned a scalar; records the error if not. */
ad_status bl__check_loss(bl_run *r, const ad_tensor *L, const char *which, int64_t step);

/* In place: w (writable, leaves needing a gradient, e.g. from bl__w0_copy)
 * and s (from bl__state_new / bl__state_copy INPLACE) advance through steps
 * from..to-1: L_train recorded at w, its gradient (not recorded),
 * bl__step_inplace. Each step is rewound, so memory stays flat. lam: the
 * hyperparameters the losses and the step see (r->lam, or perturbed
 * copies). Fails with AD_ERR_NUMERIC at the first inner step whose
 * training loss is not finite, and when w_to is not. */
ad_status bl__run_inplace(bl_run *r, ad_tensor *const *lam, ad_tensor *const *w, bl_state *s,
                          int64_t from, int64_t to);

/* The inner run of the last-step methods (one_step, t1t2): T steps in place
 * from w0 into fresh buffers w / *os, keeping the input of the last step
 * (w_prev = w_{T-1}, *os_prev = s_{T-1}) and the validation gradients at
 * w_T (gw, glam: arena tensors, as bl__val_grad). Needs T >= 1. */
ad_status bl__run_keep_last(bl_run *r, ad_tensor **w, ad_tensor **w_prev, bl_state *os,
                            bl_state *os_prev, ad_tensor **gw, ad_tensor **glam);

/* Recorded: from w_in (leaves or tensors with history) and a tape state s
 * (advanced in place to the state after the last step), records steps
 * from..to-1 (the gradient with AD_GRAD_RECORD, the step recorded) and
 * sets w_out to w_to. Nothing is rewound: this is what reverse mode walks
 * back. */
ad_status bl__run_recorded(bl_run *r, ad_tensor *const *lam, ad_tensor *const *w_in, bl_state *s,
                           int64_t from, int64_t to, ad_tensor **w_out);

/* One recorded step: w_new = Phi(w, grad_w L_train(w, lam, step), s), s
 * advanced. g_out (may be NULL) receives the recorded gradient. */
ad_status bl__step_recorded(bl_run *r, ad_tensor *const *lam, ad_tensor *const *w, bl_state *s,
                            int64_t step, ad_tensor **g_out, ad_tensor **w_new);

/* The VJP of one inner step at (w, s) with cotangent a on w_new and as on
 * the new state's buffers (as may be NULL: zero; else a list matching
 * bl__state_list):
 *   glam = a dPhi/dlam + as dS/dlam      (shaped like r->lam)
 *   gw   = a dPhi/dw   + as dS/dw        (shaped like w)
 *   gs   = a dPhi/ds   + as dS/ds        (a list matching bl__state_list)
 * The step is recorded from fresh leaf copies of w and s's buffers at step
 * index `step` (s is not changed); any of glam, gw,
 * gs may be NULL. Results are arena tensors made after the call's start:
 * copy them out before rewinding. Counts one hvp. */
ad_status bl__step_vjp(bl_run *r, ad_tensor *const *w, const bl_state *s, int64_t step,
                       ad_tensor *const *a, ad_tensor *const *as, ad_tensor **glam, ad_tensor **gw,
                       ad_tensor **gs);

/* DrMAD's backward (bilevel/drmad.c; HyperDistill estimates its theta with
 * it): walks steps k = t_end-1 .. 0 back along the straight line from
 * (w0, s0) to (w_end, s_end) instead of the true trajectory,
 *   w_k ~ (1 - k/t_end) w0 + (k/t_end) w_end  (the state's buffers alike),
 * carrying the adjoints (aw: in alpha at w_end, out the adjoint at w0; the
 * state's adjoint starts at zero) and accumulating glam += alpha_{k+1} B_k.
 * Allocates its buffers in the arena (freed by the caller's rewind); each
 * step is rewound. Counts one hvp per step. */
ad_status bl__drmad_reverse(bl_run *r, ad_tensor *const *w0, const bl_state *s0,
                            ad_tensor *const *w_end, const bl_state *s_end, int64_t t_end,
                            ad_tensor *const *aw, ad_tensor *const *glam);

/* L_val at w (step -1) with its value in *val (may be NULL) and, not
 * recorded, its partial gradients at fixed w: gw (shaped like w) and glam
 * (shaped like lam); either may be NULL. w is read through detached leaf
 * views, so history it carries is not followed. Sets r->st.val_loss.
 * Results are arena tensors: copy them before rewinding. */
ad_status bl__val_grad(bl_run *r, ad_tensor *const *lam, ad_tensor *const *w, double *val,
                       ad_tensor **gw, ad_tensor **glam);
/* With ad_grad flags (AD_GRAD_NULL_UNREACHED). */
ad_status bl__val_grad_ex(bl_run *r, ad_tensor *const *lam, ad_tensor *const *w, double *val,
                          ad_tensor **gw, ad_tensor **glam, unsigned flags);

/* A recorded stretch of the trajectory, steps from..to-1, walked back one
 * chunk of steps at a time. The steps are recorded in chunks of `chunk`
 * steps; each chunk starts from detached leaf views of its input (w, s), so
 * chunks are separate graphs joined only through the values. Reverse mode
 * then takes one chunk's VJP (one ad_grad), copies the adjoints into
 * long-lived buffers and rewinds that chunk's graph and backward: the peak
 * is the segment's forward tape plus one chunk's backward.
 * Each recorded step is compacted (ad_tape_compact: only what the
 * derivative rules read is kept, plus w and the state), unless the tape is
 * kept (o.keep_tape). chunk <= 0 then picks one step per chunk: the
 * backward held at once is one step's, and ad_grad walks only the graph
 * reachable from a chunk's outputs (the cut stops it), so T calls stay
 * linear in T. With a kept tape it picks ceil((to - from) /
 * BL_SEGMENT_CHUNKS), the backward held at once at most 1/BL_SEGMENT_CHUNKS
 * of the forward tape.
 *   record:  from values (w_from, s_from) — copied, so in-place buffers may
 *            change afterwards — records the steps with r->lam / r->opt;
 *            w_end / s_end are leaf views of w_to and the state after it.
 *   reverse: with adjoints aw (on w_to) and as (on s_end's buffers, a list
 *            matching bl__state_list; ignored for stateless optimizers),
 *            for each chunk from the last, with Phi_c its steps composed:
 *              glam += aw dPhi_c/dlam + as dS_c/dlam
 *              (aw, as) <- (aw dPhi_c/dw + as dS_c/dw, aw dPhi_c/ds + as dS_c/ds)
 *            and rewinds the chunk. On return aw, as are the adjoints at
 *            (w_from, s_from) — unless sg->skip_start_adjoint is set, in
 *            which case the first chunk's VJP is taken for lam only (the
 *            backward through step `from`'s L_train gradient, which only
 *            leads to w_from, is skipped) and aw, as are left meaningless.
 *            Everything the record made after its own bookkeeping is
 *            rewound (rewind to a mark taken before the record to free that
 *            too). Counts one hvp per step. */
#define BL_SEGMENT_CHUNKS 16

typedef struct {
  int64_t from, to, chunk, n_chunks;
  int n_w, ns;            /* parameters, state buffers */
  int skip_start_adjoint; /* set by the caller: no adjoint needed at w_from */
  ad_marker *marks;       /* [n_chunks]: before chunk c */
  ad_tensor **in, **out;  /* [n_chunks][n_w + ns]: chunk c's leaves and outputs */
  ad_tensor *w_end[NN_MAX_PARAMS];
  bl_state s_end;
  ad_tensor *spare[NN_MAX_PARAMS + BL_MAX_STATE]; /* second adjoint buffer */
} bl_segment;

/* bl__segment_record_ex flags. BL_SEG_LEAN: the segment starts from leaf
 * views of w_from / s_from, not copies (the caller writes neither while the
 * segment lives), and holds no second adjoint buffer: walk it back with
 * bl__segment_reverse_lean only. */
enum { BL_SEG_LEAN = 1u << 0 };
ad_status bl__segment_record_ex(bl_run *r, bl_segment *sg, ad_tensor *const *w_from,
                                const bl_state *s_from, int64_t from, int64_t to, int64_t chunk,
                                unsigned flags);
/* The walk back of a lean segment (bl_unroll's; no o.keep_tape): as
 * bl__segment_reverse, but the adjoints are tensors, not buffers: aw (n_w)
 * and as (ns, or NULL) hold arena tensors made after the record (seeds at
 * w_end, s_end: bl__val_keep's, zeros for the state) and are replaced by
 * each chunk's results, which are moved down over the chunk when it is
 * freed (ad_tape_compact) instead of copied into a second buffer. glam
 * (n_lam) holds tensors made before the record (bl__val_keep's: zeros or
 * the direct term), so that no compaction moves them; each chunk's part
 * is added into them in place, as bl__segment_reverse adds it. */
ad_status bl__segment_reverse_lean(bl_run *r, bl_segment *sg, ad_tensor **aw, ad_tensor **as,
                                   ad_tensor **glam);
/* alpha_T and the direct term for the lean walk back: grad_w L_val(w_end)
 * into aw, and dL_val/dlam copied into glam (n_lam tensors of zeros made
 * before the record; left zeros where L_val does not reach lam), with
 * L_val's graph and temporaries freed: aw is all that stays of it. */
ad_status bl__val_keep(bl_run *r, ad_tensor *const *w_end, ad_tensor **aw, ad_tensor **glam);

/* After bl__val_keep (aw: alpha_T): the lean segment's last chunk is
 * compacted again with its outputs as roots, so w_T's values (read by
 * L_val, by no rule of the walk back) are freed before the walk back
 * starts; aw and the chunk's outputs are updated; sg->w_end and sg->s_end
 * must not be used after. */
ad_status bl__segment_release_end(bl_run *r, bl_segment *sg, ad_tensor **aw, ad_tensor **as);

/* Tests: 1 makes bl_unroll take its old walk back (copies of w_start and
 * double-buffered adjoints made up front) instead of the lean one, to
 * check that both give the same bits. Per thread. */
void bl__unroll_set_legacy(int on);

/* bl__val_grad_ex only: compact L_val's forward before its backward. */
#define BL_VAL_COMPACT (1u << 29)

ad_status bl__segment_record(bl_run *r, bl_segment *sg, ad_tensor *const *w_from,
                             const bl_state *s_from, int64_t from, int64_t to, int64_t chunk);
ad_status bl__segment_reverse(bl_run *r, bl_segment *sg, ad_tensor *const *aw, ad_tensor *const *as,
                              ad_tensor *const *glam);

/* L_val(w, lam) value only (no gradient); rewinds what it records. */
ad_status bl__val_value(bl_run *r, ad_tensor *const *lam, ad_tensor *const *w, double *val);

/* Seconds from an arbitrary origin (C11 timespec_get). */
double bl__now(void);

#endif
