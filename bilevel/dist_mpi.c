/* dist_mpi.c — data-parallel levels, distributed implicit solvers,
 * meta-batches and zero-order samples over MPI (bl_mpi.h). Built only with
 * -DHYPERTAPE_MPI=ON.
 *
 * Why two ops and no change to the methods: every method is a composition of
 * losses, steps and ad_grad. With each loss written R(local(C(w), C(lam))),
 * the values the methods see are the whole batch's, and because R's rule is
 * C and C's rule is R, every backward pass (recorded or not) is again a
 * composition of local work and R, so second-order products are the whole
 * batch's too. The methods' own arithmetic (CG's dot products, Neumann's
 * sums, the inner steps) runs on replicated values, identically on every
 * rank, with no communication.
 *
 * Why sums in rank order: MPI_Allreduce may give results that differ in
 * the last bit between ranks (the standard only recommends otherwise); a
 * CG that stops one iteration earlier on one rank would then leave the
 * ranks out of step, waiting in different collectives. Here every element
 * is summed once, in rank order, in f64, and the result sent to all.
 *
 * Why a header before each payload: MPI collectives with mismatched counts
 * are erroneous (undefined, often a hang). Each exchange first allgathers a
 * fixed 256-byte header per rank (status, count, shape hash, a message);
 * only when every rank is ok and agrees does the payload move. Scalars (a
 * loss) ride inside the header: one round per loss evaluation. */
#define _POSIX_C_SOURCE 200809L
#include "bl_mpi.h"

#include "autodiff/ad_internal.h" /* ad__set_last: bl_mpi_open's messages */

#include <math.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HDR_MSG 200
#define HDR_VALS 2 /* payloads this small travel in the header */

typedef struct {
  int32_t status; /* ad_status of the sending rank (0 = ok) */
  int32_t dtype;
  int64_t count; /* payload elements */
  uint64_t hash; /* shape / settings hash the ranks must agree on */
  int64_t seq;   /* exchanges since the call began: a rank that skipped one shows */
  double extra;  /* a value the caller reduces itself (max, rank 0's, ...) */
  double val[HDR_VALS];
  char msg[HDR_MSG]; /* the sender's error message when status != 0 */
} hdr;

struct bl_mpi {
  MPI_Comm comm;
  int rank, size;
  double timeout;
  int64_t large;
  int broken;      /* a collective timed out or failed: refuse further work */
  int shared_fail; /* the last exchange reported a failure to every rank */
  int ran;         /* set by R's forward (the exchange took place) */
  int64_t seq;     /* exchanges since the last call_begin */
  bl_mpi_stats st;
  hdr *hdrs; /* size headers, the last exchange's */
  double *buf;
  size_t buf_n;
  int *cnt, *dsp; /* size each: segment counts / displacements */
  char msg[512];
};

/* ---------------------------------------------------------------- hashing */

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
  const unsigned char *c = p;
  for (size_t i = 0; i < n; i++) h = (h ^ c[i]) * 0x100000001b3ull;
  return h;
}
static uint64_t fnv_i(uint64_t h, int64_t v) {
  return fnv(h, &v, sizeof v);
}
static uint64_t fnv_d(uint64_t h, double v) {
  return fnv(h, &v, sizeof v);
}
#define FNV0 0xcbf29ce484222325ull

/* Shape, dtype and (with values) the elements as f64 bits. */
static uint64_t hash_tensor(uint64_t h, const ad_tensor *x, int values) {
  if (!x) return fnv_i(h, -1);
  h = fnv_i(h, x->dtype);
  h = fnv_i(h, x->ndim);
  for (int k = 0; k < x->ndim; k++) h = fnv_i(h, x->shape[k]);
  if (values)
    for (int64_t i = 0; i < x->size; i++) h = fnv_d(h, ad_get(x, i));
  return h;
}

/* ---------------------------------------------------------------- handle */

ad_status bl_mpi_open(bl_mpi **out, MPI_Comm comm, const bl_mpi_opts *opts) {
  if (!out) return ad__set_last(AD_ERR_NULL, "bl_mpi_open: out is NULL");
  *out = NULL;
  int init = 0;
  MPI_Initialized(&init);
  if (!init)
    return ad__set_last(AD_ERR_ARG, "bl_mpi_open: MPI is not initialised (MPI_Init first)");
  if (opts && (opts->timeout < 0 || opts->large < 0 || isnan(opts->timeout)))
    return ad__set_last(AD_ERR_ARG, "bl_mpi_open: timeout = %g and large = %lld must be >= 0",
                        opts->timeout, (long long)opts->large);
  bl_mpi *d = calloc(1, sizeof *d);
  if (!d) return ad__set_last(AD_ERR_NOMEM, "bl_mpi_open: out of memory");
  if (comm == MPI_COMM_NULL || MPI_Comm_dup(comm, &d->comm) != MPI_SUCCESS) {
    free(d);
    return ad__set_last(AD_ERR_ARG, "bl_mpi_open: cannot duplicate the communicator");
  }
  /* Errors come back as codes (turned into statuses), never abort. */
  MPI_Comm_set_errhandler(d->comm, MPI_ERRORS_RETURN);
  MPI_Comm_rank(d->comm, &d->rank);
  MPI_Comm_size(d->comm, &d->size);
  d->timeout = opts && opts->timeout > 0 ? opts->timeout : 60.0;
  d->large = opts && opts->large > 0 ? opts->large : 4096;
  d->hdrs = calloc((size_t)d->size, sizeof *d->hdrs);
  d->cnt = calloc((size_t)d->size, sizeof *d->cnt);
  d->dsp = calloc((size_t)d->size, sizeof *d->dsp);
  if (!d->hdrs || !d->cnt || !d->dsp) {
    bl_mpi_close(d);
    return ad__set_last(AD_ERR_NOMEM, "bl_mpi_open: out of memory");
  }
  *out = d;
  return AD_OK;
}

void bl_mpi_close(bl_mpi *d) {
  if (!d) return;
  /* A broken communicator has a collective outstanding; freeing it would
   * wait for that collective on some implementations. */
  if (!d->broken && d->comm != MPI_COMM_NULL) MPI_Comm_free(&d->comm);
  free(d->hdrs);
  free(d->buf);
  free(d->cnt);
  free(d->dsp);
  free(d);
}

int bl_mpi_rank(const bl_mpi *d) {
  return d ? d->rank : -1;
}
int bl_mpi_size(const bl_mpi *d) {
  return d ? d->size : 0;
}
const char *bl_mpi_errmsg(const bl_mpi *d) {
  return d ? d->msg : "bl_mpi: handle is NULL";
}
void bl_mpi_stats_get(const bl_mpi *d, bl_mpi_stats *out) {
  if (d && out) *out = d->st;
}
void bl_mpi_stats_reset(bl_mpi *d) {
  if (d) memset(&d->st, 0, sizeof d->st);
}

static double *scratch(bl_mpi *d, size_t n) {
  if (n > d->buf_n) {
    double *b = realloc(d->buf, n * sizeof *b);
    if (!b) return NULL;
    d->buf = b;
    d->buf_n = n;
  }
  return d->buf;
}

/* Sets the handle's message (and the tape's, when given) and returns s. */
#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
static ad_status
fail(bl_mpi *d, ad_tape *t, ad_status s, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(d->msg, sizeof d->msg, fmt, ap);
  va_end(ap);
  if (t) ad_custom_fail(t, s, "%s", d->msg);
  return s;
}

/* ---------------------------------------------------------------- collectives */

/* Waits for a started collective at most d->timeout seconds. Polling with
 * a yield keeps oversubscribed ranks (more ranks than cores) moving. */
static ad_status wait_req(bl_mpi *d, MPI_Request *rq, const char *who) {
  double t0 = MPI_Wtime();
  for (;;) {
    int done = 0;
    if (MPI_Test(rq, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
      d->broken = 1;
      d->st.seconds += MPI_Wtime() - t0;
      return fail(d, NULL, AD_ERR_ARG, "%s: MPI error on rank %d; the handle is unusable", who,
                  d->rank);
    }
    if (done) break;
    if (MPI_Wtime() - t0 > d->timeout) {
      d->broken = 1;
      d->st.seconds += MPI_Wtime() - t0;
      return fail(d, NULL, AD_ERR_ARG,
                  "%s: rank %d waited %.3g s for its peers (one failed, exited or is in a "
                  "different call); the handle is unusable",
                  who, d->rank, d->timeout);
    }
    sched_yield();
  }
  d->st.seconds += MPI_Wtime() - t0;
  return AD_OK;
}

/* Allgathers the headers into d->hdrs and checks them: the first rank that
 * failed (its status and message), then agreement with rank 0 on count,
 * dtype and hash. *peer_failed tells a reported failure from a disagreement. */
static ad_status exchange_hdr(bl_mpi *d, const char *who, hdr *mine) {
  if (d->broken)
    return fail(d, NULL, AD_ERR_ARG, "%s: the handle is unusable after an earlier failure (%s)",
                who, d->msg);
  MPI_Request rq;
  mine->seq = d->seq++;
  d->st.collectives++;
  if (MPI_Iallgather(mine, (int)sizeof *mine, MPI_BYTE, d->hdrs, (int)sizeof *mine, MPI_BYTE,
                     d->comm, &rq) != MPI_SUCCESS) {
    d->broken = 1;
    return fail(d, NULL, AD_ERR_ARG, "%s: MPI_Iallgather failed on rank %d", who, d->rank);
  }
  ad_status s = wait_req(d, &rq, who);
  if (s) return s;
  d->st.bytes += (int64_t)(d->size - 1) * (int64_t)sizeof *mine;
  d->shared_fail = 0;
  for (int r = 0; r < d->size; r++)
    if (d->hdrs[r].status != AD_OK) {
      d->shared_fail = 1;
      d->hdrs[r].msg[HDR_MSG - 1] = 0;
      return fail(d, NULL, (ad_status)d->hdrs[r].status, "%s: rank %d failed: %s", who, r,
                  d->hdrs[r].msg);
    }
  for (int r = 1; r < d->size; r++) {
    const hdr *a = &d->hdrs[0], *b = &d->hdrs[r];
    if (a->seq != b->seq) {
      d->shared_fail = 1;
      return fail(d, NULL, AD_ERR_ARG,
                  "%s: rank %d is at exchange %lld of the call, rank 0 at %lld: the ranks' "
                  "local work recorded different ops (every rank's local loss must record the "
                  "same ops on every parameter and hyperparameter, only the data differing: a "
                  "replicated term goes on every rank divided by the size, not on one rank)",
                  who, r, (long long)b->seq, (long long)a->seq);
    }
    if (a->count != b->count || a->dtype != b->dtype || a->hash != b->hash) {
      d->shared_fail = 1;
      return fail(d, NULL, AD_ERR_ARG,
                  "%s: rank %d disagrees with rank 0 (%lld elements of %s vs %lld of %s, "
                  "shape/settings hash %016llx vs %016llx): every rank must pass the same "
                  "shapes and settings",
                  who, r, (long long)b->count, ad_dtype_name((ad_dtype)b->dtype),
                  (long long)a->count, ad_dtype_name((ad_dtype)a->dtype),
                  (unsigned long long)b->hash, (unsigned long long)a->hash);
    }
  }
  return AD_OK;
}

static void hdr_fill(hdr *h, ad_status s, const char *msg, int dtype, int64_t count,
                     uint64_t hash) {
  memset(h, 0, sizeof *h);
  h->status = s;
  h->dtype = dtype;
  h->count = count;
  h->hash = hash;
  if (s && msg) snprintf(h->msg, HDR_MSG, "%s", msg);
}

/* The core: v[0..n) <- sum over ranks of v, in rank order, the same bits on
 * every rank. h is this rank's header (status, hash; count set here); on a
 * failure anywhere every rank returns that failure. v may be NULL when the
 * local status is a failure. */
static ad_status sum_f64(bl_mpi *d, const char *who, hdr *h, double *v, int64_t n) {
  h->count = n;
  if (!h->status && n <= HDR_VALS)
    for (int64_t i = 0; i < n; i++) h->val[i] = v[i];
  d->st.sums++;
  ad_status s = exchange_hdr(d, who, h);
  if (s) return s;
  int P = d->size;
  if (n <= HDR_VALS) {
    for (int64_t i = 0; i < n; i++) {
      double acc = d->hdrs[0].val[i];
      for (int r = 1; r < P; r++) acc += d->hdrs[r].val[i];
      v[i] = acc;
    }
    return AD_OK;
  }
  if (P == 1) return AD_OK;
  if (n > INT32_MAX)
    return fail(d, NULL, AD_ERR_ARG, "%s: %lld elements exceed one MPI message", who, (long long)n);
  MPI_Request rq;
  if (n < d->large) {
    /* one round: everybody's vector to everybody, then the same ordered sum */
    double *all = scratch(d, (size_t)n * (size_t)P);
    if (!all) return fail(d, NULL, AD_ERR_NOMEM, "%s: out of memory", who);
    d->st.collectives++;
    if (MPI_Iallgather(v, (int)n, MPI_DOUBLE, all, (int)n, MPI_DOUBLE, d->comm, &rq) !=
        MPI_SUCCESS) {
      d->broken = 1;
      return fail(d, NULL, AD_ERR_ARG, "%s: MPI_Iallgather failed on rank %d", who, d->rank);
    }
    if ((s = wait_req(d, &rq, who))) return s;
    d->st.bytes += (int64_t)(P - 1) * n * 8;
    for (int64_t i = 0; i < n; i++) {
      double acc = all[i];
      for (int r = 1; r < P; r++) acc += all[(size_t)r * (size_t)n + (size_t)i];
      v[i] = acc;
    }
    return AD_OK;
  }
  /* Reduce-scatter (each rank sums its segment of everybody's vector, in
   * rank order) then allgather of the segments: 2 (p-1)/p n received. */
  for (int r = 0; r < P; r++) {
    int64_t lo = n * r / P, hi = n * (r + 1) / P;
    d->cnt[r] = (int)(hi - lo);
    d->dsp[r] = (int)lo;
  }
  int me = d->rank, seg = d->cnt[me];
  double *recv = scratch(d, (size_t)seg * (size_t)P + 1);
  if (!recv) return fail(d, NULL, AD_ERR_NOMEM, "%s: out of memory", who);
  int *rc = malloc(2 * (size_t)P * sizeof *rc);
  if (!rc) return fail(d, NULL, AD_ERR_NOMEM, "%s: out of memory", who);
  int *rd = rc + P;
  for (int r = 0; r < P; r++) {
    rc[r] = seg;
    rd[r] = r * seg;
  }
  d->st.collectives++;
  if (MPI_Ialltoallv(v, d->cnt, d->dsp, MPI_DOUBLE, recv, rc, rd, MPI_DOUBLE, d->comm, &rq) !=
      MPI_SUCCESS) {
    free(rc);
    d->broken = 1;
    return fail(d, NULL, AD_ERR_ARG, "%s: MPI_Ialltoallv failed on rank %d", who, d->rank);
  }
  s = wait_req(d, &rq, who);
  free(rc);
  if (s) return s;
  double *mine = v + d->dsp[me];
  for (int i = 0; i < seg; i++) {
    double acc = recv[i];
    for (int r = 1; r < P; r++) acc += recv[(size_t)r * (size_t)seg + (size_t)i];
    mine[i] = acc;
  }
  d->st.collectives++;
  if (MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, v, d->cnt, d->dsp, MPI_DOUBLE, d->comm,
                      &rq) != MPI_SUCCESS) {
    d->broken = 1;
    return fail(d, NULL, AD_ERR_ARG, "%s: MPI_Iallgatherv failed on rank %d", who, d->rank);
  }
  if ((s = wait_req(d, &rq, who))) return s;
  d->st.bytes += ((int64_t)(P - 1) * seg + (n - seg)) * 8; /* all-to-all in, allgather in */
  return AD_OK;
}

/* A header-only exchange: status and hash agreement, nothing summed. */
static ad_status agree(bl_mpi *d, const char *who, ad_status mine, const char *msg, uint64_t hash) {
  hdr h;
  hdr_fill(&h, mine, msg, 0, 0, hash);
  return exchange_hdr(d, who, &h);
}

/* ---------------------------------------------------------------- the two ops */

static uint64_t shape_hash(const ad_tensor *x) {
  return hash_tensor(FNV0, x, 0);
}

/* R forward: out = sum over ranks of in[0]. */
static ad_status r_fwd(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out, const void *attrs) {
  (void)n;
  bl_mpi *d = (bl_mpi *)attrs;
  d->ran = 1;
  const ad_tensor *x = in[0];
  hdr h;
  hdr_fill(&h, AD_OK, NULL, x->dtype, x->size, shape_hash(x));
  double small[HDR_VALS];
  double *v = x->size <= HDR_VALS ? small : malloc((size_t)x->size * sizeof *v);
  if (!v) {
    hdr_fill(&h, AD_ERR_NOMEM, "bl_mpi_sum: out of memory", x->dtype, x->size, 0);
    sum_f64(d, "bl_mpi_sum", &h, NULL, 0);
    return ad_custom_fail(t, AD_ERR_NOMEM, "bl_mpi_sum: out of memory on rank %d", d->rank);
  }
  for (int64_t i = 0; i < x->size; i++) v[i] = ad_get(x, i);
  ad_status s = sum_f64(d, "bl_mpi_sum", &h, v, x->size);
  if (!s)
    for (int64_t i = 0; i < x->size; i++) ad_set(out, i, v[i]);
  if (v != small) free(v);
  if (s) return ad_custom_fail(t, s, "%s", d->msg);
  return AD_OK;
}

/* d/dx of y = sum_r x_r, with everything downstream replicated: each rank's
 * x_r receives the (replicated) ybar, entering its local work: C(ybar). */
static ad_status r_vjp(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out, ad_tensor *g,
                       const int *need, ad_tensor **gin, const void *attrs) {
  (void)n, (void)in, (void)out;
  if (need[0]) gin[0] = bl_mpi_copy(t, (bl_mpi *)attrs, g);
  return ad_tape_status(t);
}

static ad_status c_fwd(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out, const void *attrs) {
  (void)t, (void)n, (void)attrs;
  return ad_copy_values(out, in[0]);
}

/* d/dx of y = x for a replicated x used by every rank's local work: the
 * cotangent of x is the sum of the ranks' partial cotangents, R(xbar). */
static ad_status c_vjp(ad_tape *t, int n, ad_tensor *const *in, ad_tensor *out, ad_tensor *g,
                       const int *need, ad_tensor **gin, const void *attrs) {
  (void)n, (void)in, (void)out;
  if (need[0]) gin[0] = bl_mpi_sum(t, (bl_mpi *)attrs, g);
  return ad_tape_status(t);
}

static const ad_custom_op R_OP = {.name = "mpi_sum", .forward = r_fwd, .vjp = r_vjp};
static const ad_custom_op C_OP = {.name = "mpi_copy", .forward = c_fwd, .vjp = c_vjp};

ad_tensor *bl_mpi_sum(ad_tape *t, bl_mpi *d, ad_tensor *x) {
  if (!t) return NULL;
  if (!d) {
    ad_custom_fail(t, AD_ERR_NULL, "bl_mpi_sum: handle is NULL");
    return NULL;
  }
  if (!x && ad_tape_status(t) == AD_OK)
    ad_custom_fail(t, AD_ERR_NULL, "bl_mpi_sum: x is NULL on rank %d", d->rank);
  d->ran = 0;
  ad_tensor *y = NULL;
  if (ad_tape_status(t) == AD_OK) y = ad_custom(t, &R_OP, 1, &x, d, 0);
  /* This rank failed before reaching the exchange (its local work, or the
   * op's own checks): it still takes part, reporting the failure, so the
   * others stop with it instead of waiting. An error every rank already
   * learnt from an exchange needs no second round. */
  if (!y && !d->ran && !d->shared_fail && !d->broken) {
    hdr h;
    hdr_fill(&h, ad_tape_status(t) ? ad_tape_status(t) : AD_ERR_ARG, ad_tape_errmsg(t), 0, 0, 0);
    sum_f64(d, "bl_mpi_sum", &h, NULL, 0);
  }
  return y;
}

ad_tensor *bl_mpi_copy(ad_tape *t, bl_mpi *d, ad_tensor *x) {
  if (!t) return NULL;
  if (!d) {
    ad_custom_fail(t, AD_ERR_NULL, "bl_mpi_copy: handle is NULL");
    return NULL;
  }
  /* Nothing to differentiate: C is the identity. */
  if (!x || !ad_needs_grad(x) || !ad_is_recording(t)) return x;
  return ad_custom(t, &C_OP, 1, &x, d, 0);
}

/* ---------------------------------------------------------------- data-parallel losses */

static ad_tensor *dp_loss(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                          void *ctx, int val) {
  bl_mpi_problem *dp = ctx;
  bl_mpi *d = dp->mpi;
  ad_tensor *cw[NN_MAX_PARAMS], *cl[NN_MAX_PARAMS];
  for (int i = 0; i < dp->p.n_w; i++) cw[i] = bl_mpi_copy(t, d, w[i]);
  for (int k = 0; k < dp->p.n_lam; k++) cl[k] = bl_mpi_copy(t, d, lam[k]);
  ad_tensor *l = NULL;
  if (ad_tape_status(t) == AD_OK) l = (val ? dp->val : dp->train)(t, cw, cl, step, dp->ctx);
  if (l && l->size != 1) {
    ad_custom_fail(t, AD_ERR_SHAPE, "bl_mpi: rank %d's local %s loss has %lld elements, not 1",
                   d->rank, val ? "validation" : "training", (long long)l->size);
    l = NULL;
  } else if (!l && ad_tape_status(t) == AD_OK) {
    ad_custom_fail(t, AD_ERR_NULL, "bl_mpi: rank %d's local %s loss returned NULL", d->rank,
                   val ? "validation" : "training");
  }
  return bl_mpi_sum(t, d, l);
}

static ad_tensor *dp_train(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                           void *ctx) {
  return dp_loss(t, w, lam, step, ctx, 0);
}
static ad_tensor *dp_val(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                         void *ctx) {
  return dp_loss(t, w, lam, step, ctx, 1);
}

ad_status bl_mpi_shard(bl_mpi *d, const bl_problem *local, bl_mpi_problem *dp) {
  if (!d || !local || !dp) {
    if (d) fail(d, NULL, AD_ERR_NULL, "bl_mpi_shard: %s is NULL", !local ? "local" : "dp");
    return AD_ERR_NULL;
  }
  if (!local->train_loss || !local->val_loss)
    return fail(d, NULL, AD_ERR_NULL, "bl_mpi_shard: the local problem needs both losses");
  if (local->train_output || local->train_out_loss || local->train_reg)
    return fail(d, NULL, AD_ERR_ARG,
                "bl_mpi_shard: the Gauss-Newton split is not distributed (its model outputs "
                "are per shard); leave train_output/train_out_loss/train_reg unset");
  if (local->n_w < 1 || local->n_w > NN_MAX_PARAMS || local->n_lam < 0 ||
      local->n_lam > NN_MAX_PARAMS)
    return fail(d, NULL, AD_ERR_ARG, "bl_mpi_shard: n_w = %d, n_lam = %d out of range", local->n_w,
                local->n_lam);
  memset(dp, 0, sizeof *dp);
  dp->p = *local;
  dp->p.train_loss = dp_train;
  dp->p.val_loss = dp_val;
  dp->p.ctx = dp;
  dp->mpi = d;
  dp->train = local->train_loss;
  dp->val = local->val_loss;
  dp->ctx = local->ctx;
  return AD_OK;
}

/* ---------------------------------------------------------------- agreement on a call */

static int lam_index(int n_lam, ad_tensor *const *lam, const ad_tensor *x) {
  for (int k = 0; k < n_lam; k++)
    if (lam[k] == x) return k;
  return x ? -2 : -1;
}

static uint64_t hash_cfg(uint64_t h, const nn_opt_cfg *c, int n_lam, ad_tensor *const *lam) {
  h = fnv_i(h, c->kind);
  h = fnv_d(h, c->lr);
  h = fnv_d(h, c->momentum);
  h = fnv_d(h, c->beta1);
  h = fnv_d(h, c->beta2);
  h = fnv_d(h, c->alpha);
  h = fnv_d(h, c->eps);
  h = fnv_d(h, c->weight_decay);
  h = fnv_i(h, lam_index(n_lam, lam, c->lr_var));
  h = fnv_i(h, lam_index(n_lam, lam, c->momentum_var));
  h = fnv_i(h, lam_index(n_lam, lam, c->weight_decay_var));
  h = fnv_i(h, c->lr_vars != NULL);
  h = fnv_i(h, c->weight_decay_vars != NULL);
  return h;
}

static uint64_t hash_opts(uint64_t h, const bl_opts *o) {
  if (!o) return fnv_i(h, -1);
  h = fnv_i(h, o->K);
  h = fnv_d(h, o->tol);
  h = fnv_d(h, o->alpha);
  h = fnv_d(h, o->gamma);
  h = fnv_d(h, o->eps);
  h = fnv_i(h, o->darts_fd);
  h = fnv_i(h, o->gauss_newton);
  h = fnv_d(h, o->damping);
  h = fnv_i(h, o->checkpoint_every);
  h = fnv_i(h, o->distill_every);
  h = fnv_i(h, o->samples);
  h = fnv_d(h, o->sigma);
  h = fnv_i(h, o->antithetic);
  h = fnv_i(h, (int64_t)o->seed);
  h = fnv_i(h, o->warm_start);
  h = fnv_i(h, o->hoag != NULL);
  if (o->hoag) {
    h = fnv_d(h, o->hoag->tol);
    h = fnv_i(h, o->hoag->calls);
  }
  return h;
}

static uint64_t hash_problem(const bl_problem *p, const bl_opts *o, int n_out,
                             ad_tensor *const *out) {
  uint64_t h = FNV0;
  h = fnv_i(h, p->n_w);
  for (int i = 0; i < p->n_w && p->w0; i++) h = hash_tensor(h, p->w0[i], 1);
  h = fnv_i(h, p->n_lam);
  for (int k = 0; k < p->n_lam && p->lam; k++) h = hash_tensor(h, p->lam[k], 1);
  h = fnv_i(h, p->inner_steps);
  h = hash_cfg(h, &p->opt, p->n_lam, p->lam);
  h = fnv_i(h, p->step.fn != NULL);
  h = fnv_i(h, p->step.slots);
  h = hash_opts(h, o);
  for (int k = 0; out && k < n_out; k++) h = hash_tensor(h, out[k], 0);
  return h;
}

static uint64_t hash_values(int n, ad_tensor *const *x) {
  uint64_t h = FNV0;
  for (int k = 0; k < n; k++) h = hash_tensor(h, x[k], 1);
  return h;
}

/* Heap tensors shaped like like[0..n). */
static ad_status new_like(int n, ad_tensor *const *like, ad_tensor **out) {
  for (int k = 0; k < n; k++) out[k] = NULL;
  for (int k = 0; k < n; k++)
    if (!like[k] || ad_tensor_new(&out[k], like[k]->dtype, like[k]->ndim, like[k]->shape))
      return AD_ERR_NOMEM;
  return AD_OK;
}
static void free_list(int n, ad_tensor **x) {
  for (int k = 0; k < n; k++) ad_tensor_free(x[k]);
}

/* Before the first collective of a call: a clear error on every rank if
 * any rank brought a failed tape or different shapes, settings or values. */
static ad_status call_begin(bl_mpi *d, ad_tape *t, const char *who, uint64_t hash) {
  if (d->broken) return fail(d, t, AD_ERR_ARG, "%s: the handle is unusable (%s)", who, d->msg);
  d->shared_fail = 0;
  d->seq = 0;
  ad_status mine = ad_tape_status(t);
  ad_status s = agree(d, who, mine, mine ? ad_tape_errmsg(t) : NULL, hash);
  if (s) {
    if (ad_tape_status(t) == AD_OK) ad_custom_fail(t, s, "%s", d->msg);
  }
  return s;
}

ad_status bl_mpi_call(bl_mpi *d, bl_method_fn f, ad_tape *t, const bl_problem *p, const bl_opts *o,
                      ad_tensor *const *hg, bl_stats *st) {
  if (!d) return AD_ERR_NULL;
  if (!f || !t || !p || !hg)
    return fail(d, t, AD_ERR_NULL, "bl_mpi_call: %s is NULL",
                !f   ? "method"
                : !t ? "tape"
                : !p ? "problem"
                     : "hg");
  if (p->n_lam < 1 || p->n_lam > NN_MAX_PARAMS || !p->lam)
    return fail(d, t, AD_ERR_ARG, "bl_mpi_call: n_lam = %d (1..%d, with lam set)", p->n_lam,
                NN_MAX_PARAMS);
  for (int k = 0; k < p->n_lam; k++)
    if (!hg[k]) return fail(d, t, AD_ERR_NULL, "bl_mpi_call: hg[%d] is NULL", k);
  ad_status s = call_begin(d, t, "bl_mpi_call", hash_problem(p, o, p->n_lam, hg));
  if (s) return s;
  ad_tensor *tmp[NN_MAX_PARAMS];
  ad_status local = new_like(p->n_lam, hg, tmp);
  if (local) ad_custom_fail(t, local, "bl_mpi_call: out of memory on rank %d", d->rank);
  bl_stats lst = {0};
  /* A method's error stops being in force when it rewinds past it (ad.h),
   * but its message stays: start from no message, so a message after the
   * call is the method's own, and only a silent failure gets ours. */
  if (!local) {
    ad_tape_clear_error(t);
    local = f(t, p, o, tmp, &lst);
  }
  if (local && !*ad_tape_errmsg(t))
    ad_custom_fail(t, local, "bl_mpi_call: the method failed (%s)", ad_status_str(local));
  else if (local && !ad_tape_status(t))
    ad_custom_fail(t, local, "%s", ad_tape_errmsg(t)); /* in force again, for the agreement */
  /* The outcome, agreed: a failure anywhere is every rank's failure, and a
   * success must have produced the same bits everywhere. */
  uint64_t hh = local ? 0 : hash_values(p->n_lam, tmp);
  if (d->shared_fail) {
    /* every rank already failed in the same exchange */
    s = local ? local : AD_ERR_ARG;
  } else {
    s = agree(d, "bl_mpi_call", local, local ? ad_tape_errmsg(t) : NULL, hh);
    if (s && !local && !d->shared_fail) { /* only the hash differs */
      fail(d, t, AD_ERR_NUMERIC,
           "bl_mpi_call: the hypergradients differ between ranks (%s); are the local "
           "losses deterministic and the replicated inputs equal?",
           d->msg);
      s = AD_ERR_NUMERIC;
    } else if (s && ad_tape_status(t) == AD_OK) {
      ad_custom_fail(t, s, "%s", d->msg);
    }
  }
  if (!s) {
    for (int k = 0; k < p->n_lam; k++) ad_copy_values(hg[k], tmp[k]);
    if (st) *st = lst;
  } else if (local && ad_tape_status(t)) {
    snprintf(d->msg, sizeof d->msg, "%s", ad_tape_errmsg(t));
  }
  free_list(p->n_lam, tmp);
  return s;
}

/* ---------------------------------------------------------------- meta-batches */

typedef struct {
  const bl_meta_problem *p;
  int offset; /* global index of this rank's first task */
} meta_ctx;

static ad_tensor *meta_support(ad_tape *t, ad_tensor *const *params, int task, void *ctx) {
  const meta_ctx *m = ctx;
  return m->p->support_loss(t, params, m->offset + task, m->p->ctx);
}
static ad_tensor *meta_query(ad_tape *t, ad_tensor *const *params, int task, void *ctx) {
  const meta_ctx *m = ctx;
  return m->p->query_loss(t, params, m->offset + task, m->p->ctx);
}

static uint64_t hash_meta(const bl_meta_problem *p, const bl_opts *o, int n_out,
                          ad_tensor *const *out) {
  uint64_t h = FNV0;
  h = fnv_i(h, p->n_theta);
  for (int i = 0; i < p->n_theta && p->theta; i++) h = hash_tensor(h, p->theta[i], 1);
  h = fnv_i(h, p->n_tasks);
  h = fnv_d(h, p->inner_lr);
  h = fnv_i(h, p->inner_steps);
  h = fnv_d(h, p->prox);
  h = fnv_i(h, p->opt != NULL);
  if (p->opt) h = hash_cfg(h, p->opt, p->n_lam, p->lam);
  h = fnv_i(h, p->step.fn != NULL);
  h = fnv_i(h, p->step.slots);
  h = fnv_i(h, p->n_lam);
  for (int k = 0; k < p->n_lam && p->lam; k++) h = hash_tensor(h, p->lam[k], 1);
  h = hash_opts(h, o);
  for (int k = 0; k < n_out; k++) h = hash_tensor(h, out[k], 0);
  return h;
}

/* Sums weight * x (n tensors) plus `extra` trailing values over the ranks
 * into out (tensors) and extra; reports the local status. */
static ad_status sum_tensors(bl_mpi *d, ad_tape *t, const char *who, ad_status local, int n,
                             ad_tensor *const *x, double weight, ad_tensor *const *out,
                             double *extra, int n_extra, double mine_max, double *max_out) {
  int64_t total = n_extra;
  for (int k = 0; k < n; k++) total += out[k]->size;
  double *v = malloc((size_t)(total > 0 ? total : 1) * sizeof *v);
  hdr h;
  if (!v && !local) {
    local = AD_ERR_NOMEM;
    ad_custom_fail(t, local, "%s: out of memory on rank %d", who, d->rank);
  }
  hdr_fill(&h, local, local ? ad_tape_errmsg(t) : NULL, 0, total, 0);
  h.extra = mine_max;
  int64_t j = 0;
  if (!local) {
    for (int k = 0; k < n; k++)
      for (int64_t i = 0; i < out[k]->size; i++) v[j++] = x ? weight * ad_get(x[k], i) : 0.0;
    for (int e = 0; e < n_extra; e++) v[j++] = extra[e];
  }
  ad_status s = sum_f64(d, who, &h, local ? NULL : v, total);
  if (!s) {
    j = 0;
    for (int k = 0; k < n; k++)
      for (int64_t i = 0; i < out[k]->size; i++) ad_set(out[k], i, v[j++]);
    for (int e = 0; e < n_extra; e++) extra[e] = v[j++];
    if (max_out) {
      *max_out = d->hdrs[0].extra;
      for (int r = 1; r < d->size; r++)
        if (d->hdrs[r].extra > *max_out || isnan(d->hdrs[r].extra)) *max_out = d->hdrs[r].extra;
    }
  } else if (!local) {
    ad_custom_fail(t, s, "%s", d->msg);
  }
  free(v);
  return s;
}

ad_status bl_mpi_meta(bl_mpi *d, bl_meta_method_fn f, ad_tape *t, const bl_meta_problem *p,
                      const bl_opts *o, ad_tensor *const *meta_grad, bl_stats *st) {
  if (!d) return AD_ERR_NULL;
  if (!f || !t || !p || !meta_grad)
    return fail(d, t, AD_ERR_NULL, "bl_mpi_meta: %s is NULL",
                !f   ? "method"
                : !t ? "tape"
                : !p ? "problem"
                     : "meta_grad");
  int n_out = p->n_theta + p->n_lam;
  if (p->n_theta < 1 || p->n_lam < 0 || n_out > 2 * NN_MAX_PARAMS || !p->support_loss ||
      !p->query_loss || p->n_tasks < 1)
    return fail(d, t, AD_ERR_ARG,
                "bl_mpi_meta: n_theta = %d, n_lam = %d, n_tasks = %d (need >= 1, >= 0, >= 1, "
                "and both task losses)",
                p->n_theta, p->n_lam, p->n_tasks);
  for (int k = 0; k < n_out; k++)
    if (!meta_grad[k]) return fail(d, t, AD_ERR_NULL, "bl_mpi_meta: meta_grad[%d] is NULL", k);
  ad_status s = call_begin(d, t, "bl_mpi_meta", hash_meta(p, o, n_out, meta_grad));
  if (s) return s;
  int P = d->size, r = d->rank, N = p->n_tasks;
  int lo = (int)((int64_t)N * r / P), hi = (int)((int64_t)N * (r + 1) / P);
  ad_tensor *tmp[2 * NN_MAX_PARAMS];
  ad_status local = new_like(n_out, meta_grad, tmp);
  if (local) ad_custom_fail(t, local, "bl_mpi_meta: out of memory on rank %d", d->rank);
  bl_stats lst = {0};
  meta_ctx mc = {p, lo};
  if (!local && hi > lo) {
    bl_meta_problem lp = *p;
    lp.n_tasks = hi - lo;
    lp.support_loss = meta_support;
    lp.query_loss = meta_query;
    lp.ctx = &mc;
    ad_tape_clear_error(t); /* as in bl_mpi_call */
    local = f(t, &lp, o, tmp, &lst);
    if (local && !*ad_tape_errmsg(t))
      ad_custom_fail(t, local, "bl_mpi_meta: the method failed (%s)", ad_status_str(local));
    else if (local && !ad_tape_status(t))
      ad_custom_fail(t, local, "%s", ad_tape_errmsg(t));
  }
  /* this rank's share of the mean: (n_r / N) * its own mean */
  double wgt = (double)(hi - lo) / N;
  double ex[4] = {wgt * lst.val_loss, (double)lst.inner_steps, (double)lst.hvps,
                  (double)lst.iterations};
  if (hi == lo) ex[0] = 0;
  double res = hi > lo ? lst.residual : 0, res_all = 0;
  s = sum_tensors(d, t, "bl_mpi_meta", local, n_out, hi > lo ? tmp : NULL, wgt, tmp, ex, 4, res,
                  &res_all);
  if (!s) {
    for (int k = 0; k < n_out; k++) ad_copy_values(meta_grad[k], tmp[k]);
    if (st) {
      *st = lst;
      st->val_loss = ex[0];
      st->inner_steps = (int64_t)ex[1];
      st->hvps = (int64_t)ex[2];
      st->iterations = (int64_t)ex[3];
      st->residual = res_all;
    }
  }
  free_list(n_out, tmp);
  return s;
}

/* ---------------------------------------------------------------- zero-order */

uint64_t bl_mpi_zo_seed(uint64_t seed, int64_t block) {
  /* splitmix64 of (seed, block): distinct, well-mixed streams per block */
  uint64_t z = (seed ? seed : 0x5eed) + 0x9e3779b97f4a7c15ull * (uint64_t)(block + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return z ? z : 1;
}

ad_status bl_mpi_zero_order(bl_mpi *d, ad_tape *t, const bl_problem *p, const bl_opts *o,
                            int64_t blocks, ad_tensor *const *hg, bl_stats *st) {
  if (!d) return AD_ERR_NULL;
  if (!t || !p || !hg)
    return fail(d, t, AD_ERR_NULL, "bl_mpi_zero_order: %s is NULL",
                !t   ? "tape"
                : !p ? "problem"
                     : "hg");
  if (p->n_lam < 1 || p->n_lam > NN_MAX_PARAMS || !p->lam)
    return fail(d, t, AD_ERR_ARG, "bl_mpi_zero_order: n_lam = %d (1..%d, with lam set)", p->n_lam,
                NN_MAX_PARAMS);
  for (int k = 0; k < p->n_lam; k++)
    if (!hg[k]) return fail(d, t, AD_ERR_NULL, "bl_mpi_zero_order: hg[%d] is NULL", k);
  bl_opts oo = o ? *o : (bl_opts){0};
  int64_t N = oo.samples ? oo.samples : 16;
  if (N < 1 || blocks < 0)
    return fail(d, t, AD_ERR_ARG, "bl_mpi_zero_order: samples = %lld, blocks = %lld", (long long)N,
                (long long)blocks);
  int64_t B = blocks ? (blocks < N ? blocks : N) : N;
  uint64_t hh = fnv_i(hash_problem(p, o, p->n_lam, hg), B);
  ad_status s = call_begin(d, t, "bl_mpi_zero_order", hh);
  if (s) return s;
  ad_tensor *acc[NN_MAX_PARAMS], *gb[NN_MAX_PARAMS];
  ad_status local = new_like(p->n_lam, hg, acc);
  if (!local)
    local = new_like(p->n_lam, hg, gb);
  else
    for (int k = 0; k < p->n_lam; k++) gb[k] = NULL;
  if (local) ad_custom_fail(t, local, "bl_mpi_zero_order: out of memory on rank %d", d->rank);
  bl_stats lst = {0};
  double val = 0, steps = 0;
  for (int64_t b = d->rank; b < B && !local; b += d->size) {
    int64_t nb = N / B + (b < N % B);
    bl_opts ob = oo;
    ob.samples = nb;
    ob.seed = bl_mpi_zo_seed(oo.seed, b);
    local = bl_zero_order(t, p, &ob, gb, &lst);
    if (local) break;
    for (int k = 0; k < p->n_lam; k++)
      for (int64_t i = 0; i < acc[k]->size; i++)
        ad_set(acc[k], i, ad_get(acc[k], i) + (double)nb / N * ad_get(gb[k], i));
    val = lst.val_loss;
    steps += (double)lst.inner_steps;
  }
  if (local && !ad_tape_status(t))
    ad_custom_fail(t, local, "bl_mpi_zero_order: failed (%s)", ad_status_str(local));
  /* rank 0 holds block 0, so its val_loss is F(lam) */
  double ex[1] = {steps}, v0 = 0;
  s = sum_tensors(d, t, "bl_mpi_zero_order", local, p->n_lam, acc, 1.0, acc, ex, 1,
                  d->rank == 0 ? val : -INFINITY, &v0);
  if (!s) {
    for (int k = 0; k < p->n_lam; k++) ad_copy_values(hg[k], acc[k]);
    if (st) {
      *st = lst;
      st->val_loss = v0;
      st->inner_steps = (int64_t)ex[0];
    }
  }
  free_list(p->n_lam, acc);
  free_list(p->n_lam, gb);
  return s;
}

/* ---------------------------------------------------------------- the engine */

ad_tensor *bl_mpi_level_loss(ad_tape *t, const bl_vars *v, void *ctx) {
  bl_mpi_level *lv = ctx;
  if (!t) return NULL;
  if (!lv || !lv->mpi || !lv->local || !v) {
    ad_custom_fail(t, AD_ERR_NULL, "bl_mpi_level_loss: %s is NULL",
                   !v         ? "the view"
                   : !lv      ? "ctx (a bl_mpi_level)"
                   : !lv->mpi ? "ctx->mpi"
                              : "ctx->local");
    return NULL; /* the same on every rank: no exchange to join */
  }
  bl_mpi *d = lv->mpi;
  static const int MAXP = NN_MAX_PARAMS;
  ad_tensor *cp[BL_ENGINE_MAX_LEVELS][NN_MAX_PARAMS];
  bl_vars cv = *v;
  for (int id = 0; id < BL_ENGINE_MAX_LEVELS; id++) {
    int n = lv->n[id];
    if (n <= 0 || !v->p[id]) continue;
    if (n > MAXP) {
      ad_custom_fail(t, AD_ERR_ARG, "bl_mpi_level_loss: n[%d] = %d exceeds %d", id, n, MAXP);
      break;
    }
    for (int i = 0; i < n; i++) cp[id][i] = bl_mpi_copy(t, d, v->p[id][i]);
    cv.p[id] = cp[id];
  }
  ad_tensor *l = NULL;
  if (ad_tape_status(t) == AD_OK) l = lv->local(t, &cv, lv->ctx);
  if (l && l->size != 1) {
    ad_custom_fail(t, AD_ERR_SHAPE, "bl_mpi_level_loss: rank %d's local loss has %lld elements",
                   d->rank, (long long)l->size);
    l = NULL;
  } else if (!l && ad_tape_status(t) == AD_OK) {
    ad_custom_fail(t, AD_ERR_NULL, "bl_mpi_level_loss: rank %d's local loss returned NULL",
                   d->rank);
  }
  return bl_mpi_sum(t, d, l);
}

static ad_status engine_io(bl_mpi *d, bl_engine *e, const char *path, int load) {
  const char *who = load ? "bl_mpi_engine_load" : "bl_mpi_engine_save";
  if (!d) return AD_ERR_NULL;
  if (!e || !path) return fail(d, NULL, AD_ERR_NULL, "%s: %s is NULL", who, !e ? "engine" : "path");
  d->seq = 0;
  d->shared_fail = 0;
  char file[4096];
  ad_status local = AD_OK;
  char msg[HDR_MSG] = "";
  if (snprintf(file, sizeof file, "%s.%dof%d", path, d->rank, d->size) >= (int)sizeof file) {
    local = AD_ERR_ARG;
    snprintf(msg, sizeof msg, "%s: path too long", who);
  } else {
    local = load ? bl_engine_load(e, file) : bl_engine_save(e, file);
    if (local) snprintf(msg, sizeof msg, "%s", bl_engine_errmsg(e));
  }
  /* the step counter rides in the hash: resumed ranks must agree on it */
  uint64_t h = load && !local ? fnv_i(FNV0, bl_engine_steps_done(e)) : 0;
  ad_status s = agree(d, who, local, msg, h);
  return s;
}

ad_status bl_mpi_engine_save(bl_mpi *d, bl_engine *e, const char *path) {
  return engine_io(d, e, path, 0);
}
ad_status bl_mpi_engine_load(bl_mpi *d, bl_engine *e, const char *path) {
  return engine_io(d, e, path, 1);
}
