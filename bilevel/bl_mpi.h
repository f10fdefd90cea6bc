/* bl_mpi.h — scale out over MPI (built with -DHYPERTAPE_MPI=ON; Open MPI on
 * Debian: libopenmpi-dev, openmpi-bin). Nothing else in the library knows
 * MPI: distribution is two user ops (autodiff/ad.h, "user ops") and
 * wrappers around the methods.
 *
 * The two ops (the f/g pair of Megatron-LM's tensor parallelism):
 *   bl_mpi_sum  R(x) = sum over ranks of x      adjoint: C(ybar)
 *   bl_mpi_copy C(x) = x (a replicated value     adjoint: R(xbar)
 *                    entering rank-local work)
 * Each derivative rule is written with the other op, so a recorded backward
 * pass is again made of R and C: Hessian-vector products, mixed partials,
 * gradients through unrolled inner loops and double-VJP forward mode are
 * exact across ranks with no change to the methods. A data-parallel loss is
 *   L(w, lam) = R(local_loss(C(w), C(lam)))
 * with local_loss this rank's share of the batch (its shard's terms of the
 * sum that makes L, so the shares add up to L: for a mean over the whole
 * batch, sum over the shard / the global batch size; a replicated term such
 * as a penalty on one rank only).
 *
 * Every rank holds the same replicated values bit for bit: the sums are
 * taken in rank order on every rank (no MPI_Allreduce, whose result may
 * differ in the last bit between ranks), so the methods' branches (CG's
 * stopping test, HOAG's tolerance, ...) go the same way everywhere and the
 * ranks stay in step without further talk.
 *
 * Usage, on every rank (shards picked by bl_mpi_rank):
 *     bl_mpi *d;
 *     bl_mpi_open(&d, MPI_COMM_WORLD, NULL);
 *     bl_problem local = {..., .train_loss = my_shard_train, .val_loss = my_shard_val};
 *     bl_mpi_problem dp;
 *     bl_mpi_shard(d, &local, &dp);
 *     ad_status s = bl_mpi_call(d, bl_cg, tape, &dp.p, &opts, hg, &st); // same hg on every rank
 *     bl_mpi_close(d);
 *
 * Faults end in an error on every rank, never a hang or an abort:
 * bl_mpi_call first agrees on a hash of the problem's shapes, settings and
 * starting values (ranks that disagree all fail with AD_ERR_ARG naming the
 * first rank that differs); every exchange carries each rank's status, so a
 * rank whose local loss fails makes every rank's op fail with that rank's
 * status and message ("rank 1 failed: ..."); and every collective waits at
 * most the handle's timeout, after which the handle is broken (AD_ERR_ARG
 * from every later call; bl_mpi_close then leaves its duplicate
 * communicator alone, as a collective may be outstanding on it: if the late
 * peer never comes, end with MPI_Abort rather than MPI_Finalize). Every
 * rank's local work must record the same ops (the data differ, not the
 * graph): the exchanges are numbered, and a rank that skipped one is named
 * in an error instead of its sums being mixed up with another tensor's. */
#ifndef HYPERTAPE_BL_MPI_H
#define HYPERTAPE_BL_MPI_H
#include <mpi.h>

#include "bl.h"
#include "bl_engine.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bl_mpi bl_mpi;

typedef struct {
  double timeout; /* seconds a collective may wait for its peers (default 60) */
  /* elements from which a sum switches from one allgather (latency: one
   * round, (p-1) n received) to reduce-scatter + allgather (bandwidth:
   * 2 (p-1)/p n received, two rounds); default 4096 */
  int64_t large;
} bl_mpi_opts;

/* Communication counters (since open or bl_mpi_stats_reset). bytes: payload
 * bytes this rank received in sums, headers included. */
typedef struct {
  int64_t collectives; /* MPI collectives started */
  int64_t sums;        /* tensors summed (bl_mpi_sum forwards and the wrappers' sums) */
  int64_t bytes;
  double seconds; /* wall time inside collectives (waiting included) */
} bl_mpi_stats;

/* Opens a handle on a duplicate of comm (MPI must be initialised; collective
 * over comm). opts may be NULL (fields 0: defaults). Returns AD_OK, or
 * AD_ERR_NULL / AD_ERR_ARG / AD_ERR_NOMEM with ad_last_error() saying why. */
ad_status bl_mpi_open(bl_mpi **out, MPI_Comm comm, const bl_mpi_opts *opts);
/* Frees the duplicate (not collective when the handle is broken). Accepts NULL. */
void bl_mpi_close(bl_mpi *d);
int bl_mpi_rank(const bl_mpi *d);
int bl_mpi_size(const bl_mpi *d);
/* The last error message of a wrapper on this handle ("" if none). */
const char *bl_mpi_errmsg(const bl_mpi *d);
void bl_mpi_stats_get(const bl_mpi *d, bl_mpi_stats *out);
void bl_mpi_stats_reset(bl_mpi *d);

/* R(x): the sum of x over the ranks (x of one shape and dtype on every rank),
 * the same bits on every rank. Recorded when x needs a gradient; its rule
 * is ybar -> C(ybar). NULL with the error on the tape (AD_ERR_ARG for a rank
 * that failed or disagrees on x's shape or dtype, or a timeout). Collective:
 * every rank must call it, in the same order. */
ad_tensor *bl_mpi_sum(ad_tape *t, bl_mpi *d, ad_tensor *x);
/* C(x) = x for a replicated x; recorded when x needs a gradient (returns x
 * itself otherwise), rule xbar -> R(xbar). Not collective itself; its
 * derivative is. */
ad_tensor *bl_mpi_copy(ad_tape *t, bl_mpi *d, ad_tensor *x);

/* A data-parallel problem: p is `local` with train_loss / val_loss replaced
 * by R(local(C(w), C(lam))) and ctx by this struct (filled by bl_mpi_shard;
 * keep it alive while p is used). */
typedef struct {
  bl_problem p;
  bl_mpi *mpi;
  bl_loss_fn train, val; /* the local losses */
  void *ctx;             /* their ctx */
} bl_mpi_problem;

/* Fills dp from local (w0, lam, opt, step, inner_steps replicated and equal
 * on every rank; the losses this rank's shares). The Gauss-Newton split is
 * not distributed: AD_ERR_ARG if local sets it. Not collective. */
ad_status bl_mpi_shard(bl_mpi *d, const bl_problem *local, bl_mpi_problem *dp);

/* Runs any method on a problem whose losses are data-parallel (a
 * bl_mpi_problem's p) or replicated: agrees on shapes, settings and
 * starting values first, runs f, then agrees on the outcome (every rank
 * returns the first failing rank's status and message, on its tape and in
 * bl_mpi_errmsg; hg is then untouched) and checks that hg came out the same
 * on every rank. Collective. */
ad_status bl_mpi_call(bl_mpi *d, bl_method_fn f, ad_tape *t, const bl_problem *p, const bl_opts *o,
                      ad_tensor *const *hg, bl_stats *st);

/* Meta-batch parallel MAML / FOMAML / iMAML: p describes the whole
 * meta-batch (n_tasks tasks, the same on every rank); rank r takes tasks
 * [r N / P, (r + 1) N / P), runs f on them and the ranks' meta-gradients are
 * summed with weights n_r / N, so meta_grad is the whole batch's mean on
 * every rank. st: inner_steps, hvps and iterations summed, val_loss the
 * mean query loss, residual the worst. Collective. */
ad_status bl_mpi_meta(bl_mpi *d, bl_meta_method_fn f, ad_tape *t, const bl_meta_problem *p,
                      const bl_opts *o, ad_tensor *const *meta_grad, bl_stats *st);

/* Zero-order with the directions split across ranks. The o->samples
 * directions form `blocks` blocks (0: one direction per block), block b
 * drawn with seed bl_mpi_zo_seed(o->seed, b) by bl_zero_order; blocks go to
 * ranks round-robin and the estimate is sum_b (n_b / N) g_b, so it does not
 * depend on the number of ranks. Each block also runs the inner loop once
 * at lam for st->val_loss (bl_zero_order does): fewer, larger blocks cost
 * less. p is replicated (every rank runs whole inner problems). Collective. */
ad_status bl_mpi_zero_order(bl_mpi *d, ad_tape *t, const bl_problem *p, const bl_opts *o,
                            int64_t blocks, ad_tensor *const *hg, bl_stats *st);
uint64_t bl_mpi_zo_seed(uint64_t seed, int64_t block);

/* ------------------------------------------------------------------ the engine
 * A data-parallel level: its loss is bl_mpi_level_loss with ctx a
 * bl_mpi_level naming the rank-local loss (this rank's share, as above,
 * read from this rank's shard of the level's data or from ctx) and how many
 * parameter tensors each level has (the levels the loss reads; 0 for the
 * others). The wrapper applies C to every such parameter of the view and R
 * to the local loss, so every method on every edge, and the engine's
 * responses of deeper levels, are the whole batch's on every rank. Every
 * rank builds and runs the same engine (same levels, steps and options);
 * only the data and the local losses differ. Validation callbacks should
 * return replicated metrics (sum them with bl_mpi_sum) so early stopping
 * agrees. */
typedef struct {
  bl_mpi *mpi;
  bl_level_loss_fn local;
  void *ctx;
  int n[BL_ENGINE_MAX_LEVELS]; /* parameter tensors of level id the loss reads */
} bl_mpi_level;

ad_tensor *bl_mpi_level_loss(ad_tape *t, const bl_vars *v, void *ctx);

/* Save / resume with ranks: one file per rank, "<path>.<rank>of<size>"
 * (replicated parameters and each rank's own iterator positions), each
 * written atomically by bl_engine_save; then the ranks agree on the
 * outcome, so a failure on any rank is an error (AD_ERR_IO / the loader's
 * status, message naming the rank) on every rank. load also checks that
 * every rank resumed at the same engine step. A load that failed on some
 * ranks only has changed the others' engines: stop rather than continue.
 * Collective. */
ad_status bl_mpi_engine_save(bl_mpi *d, bl_engine *e, const char *path);
ad_status bl_mpi_engine_load(bl_mpi *d, bl_engine *e, const char *path);

#ifdef __cplusplus
}
#endif
#endif
