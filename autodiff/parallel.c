/* parallel.c — the split of a loop into parts and the worker pool that runs
 * them (ad__par_parts/ad__par_for, see ad_internal.h).
 *
 * The split: parts = min(threads, n / grain), at least 1; part p is
 * [n p / parts, n (p + 1) / parts). It depends on n, grain and the thread
 * count only, never on which thread runs a part or when, so a reduction
 * that keeps one partial per part and adds them in part order gives the
 * same bits on every run with the same thread count, threaded or not.
 *
 * The pool: threads - 1 persistent workers, created on the first call that
 * has more than one part (never for a one-thread setting) and grown if the
 * setting grows. A call publishes its job, runs part 0 itself, and then
 * claims the parts nobody has claimed yet the same way the workers do (an
 * atomic counter): when a worker is slow to wake (a loaded machine) the
 * caller runs its part too, so a call never waits for a descheduled worker
 * to start, only for parts already running to end.
 *
 * Waking: a worker spins for a short while after each job (the next loop of
 * an op, or the next GEMM of a training step, usually follows within
 * microseconds to a couple of hundred) and then sleeps on a condition
 * variable; the caller signals only when someone sleeps. The spin is
 * bounded because on a 2-core machine a spinning worker takes the core from
 * BLIS's OpenMP threads and from other processes (see WORKER_SPIN_NS). The
 * caller, once its parts are done, spins for the others about as long as
 * its own took before it sleeps (a part of the same size started with it).
 *
 * Serial fallbacks (the same parts, one after another, on the caller):
 * a call from inside a part (nested), a call while another user thread's
 * job holds the pool (concurrent callers never wait for each other), a
 * one-part split, and a failure to create threads.
 *
 * Shutdown: an atexit handler stops and joins the workers, so nothing is
 * left running or allocated at exit (valgrind, LeakSanitizer). A fork()ed
 * child has no workers: the pool is forgotten there and made again on its
 * first call. */
#define _POSIX_C_SOURCE 200809L
#include "ad.h"
#include "ad_internal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/* How long a worker spins for the next job before it sleeps (WORKER_SPIN_NS),
 * and how long the caller spins for running parts to end beyond the time
 * its own parts took (SPIN_NS). Measured on the 2-core test machine: a
 * condition-variable wake costs ~10-50 us, a spinning worker picks a job
 * up in well under 1 us. The loops of consecutive ops follow each other
 * within tens of us, but a recorded training step's tape work (recording,
 * compaction, the sweep's bookkeeping) leaves gaps of 50-200 us between
 * its GEMMs: with a 50 us worker spin, 27-29 of the 2-thread unroll's ~135
 * pool jobs per iteration (bench_unroll_T10, Zen 4) found the worker
 * asleep and started their second half 10-50 us late; at 200 us about one
 * did, and the unroll ran 1.35 -> 1.28 times its GEMM floor (medians of 6
 * alternating runs). 200 us of spinning after the last job is still far
 * below what OpenMP runtimes spin by default (libgomp: about 300,000
 * iterations), and the spin ends when no job follows. */
#define WORKER_SPIN_NS 200000
#define SPIN_NS 50000
#define CALLER_SPIN_CAP_NS 1000000 /* at most this much of the caller's own time */

/* At most this many threads in one loop (the GEMM setting caps at 256). */
#define MAX_WORKERS 255

typedef struct {
  ad__range_fn fn;
  void *ctx;
  int64_t n;
  int parts;
} job_t;

static pthread_mutex_t g_dispatch = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;       /* guards the sleeps */
static pthread_cond_t g_wake = PTHREAD_COND_INITIALIZER;       /* a job or quit */
static pthread_cond_t g_done = PTHREAD_COND_INITIALIZER;       /* the last part ended */

static job_t g_job;
/* Job generation (bits 63..32), its number of parts (31..16) and the next
 * part to claim (15..0), in one word: a claim reads and takes a part of one
 * job in one compare-exchange, and never reads g_job, which the caller
 * rewrites once every part of a job has ended. */
static _Atomic uint64_t g_state;
static atomic_int g_left;       /* parts of the current job not yet ended */
static atomic_int g_sleepers;   /* workers asleep on g_wake */
static atomic_int g_caller_slp; /* 1 while the caller sleeps on g_done */
static atomic_int g_quit;
static pthread_t g_tid[MAX_WORKERS];
static int g_nworkers; /* under g_dispatch */
static int g_registered;
static int g_stopped; /* after exit began: every call runs serially */

static _Thread_local int t_in_par; /* inside a part, or a worker */

/* The split of the last ad__par_parts call on this thread, so that an
 * ad__par_for right after it with the same n and grain uses the same
 * number of parts even if another thread changes the setting in between
 * (the caller sized its per-part partials from that answer). */
static _Thread_local int64_t t_last_n = -1, t_last_grain = -1;
static _Thread_local int t_last_parts;

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int parts_for(int64_t n, int64_t grain, int th) {
  if (grain < 1) grain = 1;
  int64_t by_size = n / grain;
  int parts = by_size < th ? (int)by_size : th;
  return parts < 1 ? 1 : parts;
}

int ad__par_parts(int64_t n, int64_t grain) {
  int parts = parts_for(n, grain, ad_blas_threads());
  t_last_n = n;
  t_last_grain = grain;
  t_last_parts = parts;
  return parts;
}

static void run_part(const job_t *j, int p) {
  j->fn(j->ctx, p, j->n * p / j->parts, j->n * (p + 1) / j->parts);
}

/* Claims and runs parts of generation `gen` until none is left. Returns
 * after the last claim fails; wakes the caller if it ended the last part. */
static void work_on(uint32_t gen) {
  for (;;) {
    uint64_t s = atomic_load_explicit(&g_state, memory_order_acquire);
    if ((uint32_t)(s >> 32) != gen) return;
    int p = (int)(s & 0xffff), parts = (int)((s >> 16) & 0xffff);
    if (p >= parts) return;
    if (!atomic_compare_exchange_weak_explicit(&g_state, &s, s + 1, memory_order_acq_rel,
                                               memory_order_acquire))
      continue;
    /* Part p of `gen` was unclaimed, so the job has not ended and g_job
     * is the one published with it (the acquire above sees it). */
    job_t j = g_job;
    run_part(&j, p);
    /* seq_cst against the caller's store of g_caller_slp then load of
     * g_left: one of the two sees the other, so no lost wake-up. */
    if (atomic_fetch_sub(&g_left, 1) == 1 && atomic_load(&g_caller_slp)) {
      pthread_mutex_lock(&g_mu);
      pthread_cond_signal(&g_done);
      pthread_mutex_unlock(&g_mu);
    }
  }
}

/* arg: the generation current when the worker was made (it may start
 * after the job that made it is published, and must take part in it). */
static void *worker_main(void *arg) {
  t_in_par = 1;
  uint32_t seen = (uint32_t)(uintptr_t)arg;
  for (;;) {
    /* Wait for a generation other than `seen`, spinning first. */
    uint32_t gen = seen;
    int64_t t0 = now_ns();
    for (int i = 0;; i++) {
      if (atomic_load_explicit(&g_quit, memory_order_acquire)) return NULL;
      gen = (uint32_t)(atomic_load_explicit(&g_state, memory_order_acquire) >> 32);
      if (gen != seen) break;
      cpu_relax();
      if ((i & 63) == 63 && now_ns() - t0 > WORKER_SPIN_NS) {
        pthread_mutex_lock(&g_mu);
        atomic_fetch_add(&g_sleepers, 1);
        while (!atomic_load(&g_quit) && (uint32_t)(atomic_load(&g_state) >> 32) == seen)
          pthread_cond_wait(&g_wake, &g_mu);
        atomic_fetch_sub(&g_sleepers, 1);
        pthread_mutex_unlock(&g_mu);
        t0 = now_ns();
      }
    }
    seen = gen;
    work_on(gen);
  }
}

static void pool_stop(void) {
  pthread_mutex_lock(&g_dispatch);
  pthread_mutex_lock(&g_mu);
  atomic_store(&g_quit, 1);
  pthread_cond_broadcast(&g_wake);
  pthread_mutex_unlock(&g_mu);
  for (int i = 0; i < g_nworkers; i++) pthread_join(g_tid[i], NULL);
  g_nworkers = 0;
  g_stopped = 1;
  pthread_mutex_unlock(&g_dispatch);
}

/* In a fork()ed child only the forking thread exists: forget the workers
 * (their pthread_t are meaningless there) and take the locks fresh. */
static void pool_after_fork_child(void) {
  pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
  pthread_cond_t c = PTHREAD_COND_INITIALIZER;
  g_dispatch = m;
  g_mu = m;
  g_wake = c;
  g_done = c;
  g_nworkers = 0;
  atomic_store(&g_sleepers, 0);
  atomic_store(&g_caller_slp, 0);
}

/* Grows the pool to `want` workers (under g_dispatch). Returns how many
 * there are: fewer if a thread could not be made. */
static int pool_grow(int want) {
  if (!g_registered) {
    g_registered = 1;
    atexit(pool_stop);
    pthread_atfork(NULL, NULL, pool_after_fork_child);
  }
  if (want > MAX_WORKERS) want = MAX_WORKERS;
  while (g_nworkers < want) {
    void *gen = (void *)(uintptr_t)(uint32_t)(atomic_load(&g_state) >> 32);
    if (pthread_create(&g_tid[g_nworkers], NULL, worker_main, gen) != 0) break;
    g_nworkers++;
  }
  return g_nworkers;
}

static void run_serial(int64_t n, int parts, ad__range_fn fn, void *ctx) {
  job_t j = {fn, ctx, n, parts};
  int outer = t_in_par;
  t_in_par = 1;
  for (int p = 0; p < parts; p++) run_part(&j, p);
  t_in_par = outer;
}

static void par_run(int64_t n, int parts, ad__range_fn fn, void *ctx);

void ad__par_for(int64_t n, int64_t grain, ad__range_fn fn, void *ctx) {
  if (n <= 0) return;
  int parts;
  if (n == t_last_n && grain == t_last_grain) {
    parts = t_last_parts;
    t_last_n = -1;
  } else
    parts = parts_for(n, grain, ad_blas_threads());
  par_run(n, parts, fn, ctx);
}

/* The GEMM split (blas.c) names its part count itself (it is part of the
 * shape class it measured), and must not take or clear the split an
 * ad__par_parts call of its caller left for the next ad__par_for. */
void ad__par_for_parts(int64_t n, int parts, ad__range_fn fn, void *ctx) {
  if (n <= 0) return;
  if (parts > n) parts = (int)n;
  if (parts > MAX_WORKERS + 1) parts = MAX_WORKERS + 1;
  par_run(n, parts < 1 ? 1 : parts, fn, ctx);
}

int ad__par_inside(void) {
  return t_in_par;
}

static void par_run(int64_t n, int parts, ad__range_fn fn, void *ctx) {
  if (parts == 1 || t_in_par || pthread_mutex_trylock(&g_dispatch) != 0) {
    run_serial(n, parts, fn, ctx);
    return;
  }
  if (g_stopped || pool_grow(parts - 1) < 1) {
    pthread_mutex_unlock(&g_dispatch);
    run_serial(n, parts, fn, ctx);
    return;
  }
  g_job = (job_t){fn, ctx, n, parts};
  atomic_store_explicit(&g_left, parts, memory_order_relaxed);
  uint64_t s = atomic_load_explicit(&g_state, memory_order_relaxed);
  uint32_t gen = (uint32_t)(s >> 32) + 1;
  /* Publishing the new generation with part 0 already taken (the caller
   * runs it, so it starts at once and in cache of the caller's last op):
   * the seq_cst store makes g_job and g_left visible to whoever claims a
   * part, and orders against the load of g_sleepers below (see
   * worker_main). */
  atomic_store_explicit(&g_state, (uint64_t)gen << 32 | (uint64_t)parts << 16 | 1u,
                        memory_order_seq_cst);
  if (atomic_load(&g_sleepers) > 0) {
    pthread_mutex_lock(&g_mu);
    if (parts - 1 >= g_nworkers)
      pthread_cond_broadcast(&g_wake);
    else
      for (int i = 1; i < parts; i++) pthread_cond_signal(&g_wake);
    pthread_mutex_unlock(&g_mu);
  }
  t_in_par = 1;
  const int64_t t_run = now_ns();
  run_part(&g_job, 0);
  atomic_fetch_sub(&g_left, 1);
  work_on(gen);
  t_in_par = 0;
  /* Every part is claimed; wait for those still running elsewhere. The
   * parts are of one size, so a part that started with ours ends about as
   * long after it as ours took, plus a worker's wake-up: spin for that
   * long (the time our own parts took, plus SPIN_NS) before sleeping. A
   * fixed SPIN_NS made the caller sleep, and then pay a futex wake-up of
   * 10-50 us, on 45% of the calls of the 2-thread 784-200-10 unroll
   * (bench_unroll_T10), whose GEMM halves run for hundreds of us. Capped
   * (CALLER_SPIN_CAP_NS): a part that runs on long after ours usually
   * means its thread was descheduled (more threads than free cores, as
   * with several MPI ranks per machine), and then the core is better
   * given up than spun on. */
  const int64_t t0 = now_ns(), own = t0 - t_run;
  const int64_t spin = SPIN_NS + (own < CALLER_SPIN_CAP_NS ? own : CALLER_SPIN_CAP_NS);
  for (int i = 0; atomic_load_explicit(&g_left, memory_order_acquire) > 0; i++) {
    cpu_relax();
    if ((i & 63) == 63 && now_ns() - t0 > spin) {
      pthread_mutex_lock(&g_mu);
      atomic_store(&g_caller_slp, 1);
      while (atomic_load(&g_left) > 0) pthread_cond_wait(&g_done, &g_mu);
      atomic_store(&g_caller_slp, 0);
      pthread_mutex_unlock(&g_mu);
    }
  }
  pthread_mutex_unlock(&g_dispatch);
}
