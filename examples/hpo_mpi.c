/* hpo_mpi — hpo_mnist's two levels (a weight decay per weight of a
 * 784-200-10 MLP, learned by hypergradient descent) data-parallel over MPI:
 * each rank holds a shard of the training digits and draws a batch of
 * 128 / P rows from it, so the global batch stays 128 (strong scaling).
 * Both levels' losses are bl_mpi_level_loss (bilevel/bl_mpi.h), so the
 * method on the edge sees the whole batch's loss, gradients and
 * second-order products, with the same bits on every rank.
 *
 *     mpirun -np 2 ./build-mpi/examples/hpo_mpi                  # unroll
 *     mpirun -np 2 ./build-mpi/examples/hpo_mpi --method cg --outer 10
 *
 * (as root: OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;
 * more ranks than cores: --oversubscribe.) Prints per rank and in total
 * the training rows processed per second (every row of every recorded or
 * in-place step of the classifier, as the method and the training step
 * see them), the time inside the sums and the bytes received per engine
 * step, then one line:
 *   summary: ranks=P method=M rows_per_s_total=R comm_fraction=F
 *            bytes_per_outer_step=B val_loss_last=L seconds=S */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "bilevel/bl_mpi.h"
#include "example_util.h"
#include "hypertape.h"
#include "mlp_hpo.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  int size;        /* ranks */
  int64_t batch_g; /* global batch: the shares are divided by it */
} share_ctx;

/* This rank's share of CE + 1/2 sum_i <lam_i w_i, w_i>: its rows' CE
 * weighted by rows / global batch, and the penalty divided by the ranks
 * (every rank records the same ops). */
static ad_tensor *local_loss(ad_tape *t, const bl_vars *v, void *ctx) {
  const share_ctx *c = ctx;
  ad_tensor *const *w = v->p[CLS], *const *lam = v->p[HPO];
  ad_tensor *ce = ad_cross_entropy(t, mlp_logits(t, v->x, w), v->labels, v->n);
  return mlp_add_decay(t, ad_scale(t, ce, (double)v->n / (double)c->batch_g), w, lam,
                       0.5 / c->size);
}

int main(int argc, char **argv) {
  const char *method = "unroll";
  int64_t outer = 10, inner = 10;
  ex_options o = {.threads = 0, .seed = 7, .lr = 0.1};
  const char *names[BL_METHOD_COUNT + 1] = {NULL};
  for (int m = 0; m < BL_METHOD_COUNT; m++) names[m] = bl_method_name((bl_method)m);
  const ex_opt opts[] = {
      {"--method", EX_STR, &method, "M", .help = "the hypergradient method", .choices = names},
      {"--outer", EX_I64, &outer, "N", .help = "engine steps", .min = 1, .max = 1e6},
      {"--inner", EX_I64, &inner, "T", .help = "classifier steps per engine step", .min = 1,
       .max = 1e6},
      {"--lr", EX_DOUBLE, &o.lr, "LR", .help = "the classifier's SGD learning rate", .max = 100,
       .gt_min = 1},
      {"--data", EX_STR, &o.data, "DIR",
       .help = "MNIST or Fashion-MNIST IDX files (default: the embedded subset)"},
      {"--limit", EX_I64, &o.limit, "N", .help = "only the first N train and test examples",
       .max = 1e9},
      {"--seed", EX_U64, &o.seed, "S", .help = "seeds the initial weights and the batch order"},
      EX_OPT_THREADS(&o.threads),
      {0}};
  /* Parsed before MPI starts: a usage error exits with status 2 on every
   * rank alike, with nothing to finalize. */
  ex_parse_args(argc, argv,
                "hpo_mnist's two levels data-parallel over MPI: per-rank and total throughput",
                opts);
  MPI_Init(&argc, &argv);
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  ex_set_threads(o.threads);

  int rc = 0;
  ds_dataset *train = NULL, *test = NULL, *shard = NULL;
  ad_tensor *w[2] = {0}, *lam[2] = {0};
  bl_mpi *d = NULL;
  bl_engine *e = NULL;
  if (ex_load_mnist("hpo_mpi", &o, &train, &test) || mlp_make_params(w, lam, o.seed) ||
      bl_mpi_open(&d, MPI_COMM_WORLD, NULL)) {
    fprintf(stderr, "hpo_mpi: rank %d: %s\n", rank, ad_last_error());
    MPI_Abort(MPI_COMM_WORLD, 1); /* before the first collective: nothing to agree on */
  }
  /* rank r's rows: [r n / P, (r + 1) n / P) */
  int64_t lo = train->n * rank / size, hi = train->n * (rank + 1) / size;
  int64_t local_batch = BATCH / size;
  if (ds_dataset_slice(&shard, train, lo, hi - lo) || local_batch < 1) {
    fprintf(stderr, "hpo_mpi: rank %d: cannot shard %lld rows\n", rank, (long long)train->n);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  share_ctx sc = {.size = size, .batch_g = local_batch * size};
  bl_mpi_level lv = {.mpi = d, .local = local_loss, .ctx = &sc, .n = {2, 2}};
  nn_opt_cfg sgd = {.kind = NN_OPT_SGD, .lr = o.lr}, adam = {.kind = NN_OPT_ADAM, .lr = 1e-3};
  bl_engine_new(&e, &(bl_engine_opts){.log_every = 0});
  bl_engine_add(e,
                &(bl_level){.name = "classifier",
                            .n = 2,
                            .params = w,
                            .loss = bl_mpi_level_loss,
                            .ctx = &lv,
                            .opt = &sgd,
                            .data = shard,
                            .batch = {.batch = local_batch, .seed = o.seed + (uint64_t)rank},
                            .steps = inner},
                NULL);
  bl_engine_add(e,
                &(bl_level){.name = "hpo",
                            .n = 2,
                            .params = lam,
                            .loss = bl_mpi_level_loss,
                            .ctx = &lv,
                            .opt = &adam,
                            .data = shard,
                            .batch = {.batch = local_batch, .seed = o.seed + 1000 + (uint64_t)rank},
                            .project = mlp_nonneg,
                            .n_deps = 1,
                            .deps = {{.level = "classifier", .method_name = method}}},
                NULL);
  /* Collective from here on: every rank builds (a dry evaluation of each
   * loss) and runs; an error is every rank's (the sums carry statuses). */
  if (bl_engine_build(e) != AD_OK) {
    if (!rank) fprintf(stderr, "hpo_mpi: %s\n", bl_engine_errmsg(e));
    rc = 1;
  }
  if (!rank && !rc)
    printf("hpo_mpi: %d ranks, %lld train digits (%lld on rank 0), batch %lld per rank, method "
           "%s, T = %lld\n",
           size, (long long)train->n, (long long)(hi - lo), (long long)local_batch, method,
           (long long)inner);
  bl_mpi_stats_reset(d);
  double t0 = ex_now_s();
  if (!rc && bl_engine_run(e, outer, NULL) != AD_OK) {
    fprintf(stderr, "hpo_mpi: rank %d: %s\n", rank, bl_engine_errmsg(e));
    rc = 1;
  }
  double secs = ex_now_s() - t0;
  bl_mpi_stats ms;
  bl_mpi_stats_get(d, &ms);
  /* Rows this rank pushed through the classifier: the in-place steps plus
   * the method's look-ahead over the same number of steps (each engine step
   * looks ahead inner steps and then takes them). */
  double rows = (double)bl_engine_level_steps(e, CLS) * 2.0 * (double)local_batch;
  double mine[3] = {rows / secs, ms.seconds, (double)ms.bytes}, all[3 * 64];
  if (size <= 64) {
    MPI_Gather(mine, 3, MPI_DOUBLE, all, 3, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    if (!rank && !rc) {
      double total = 0;
      for (int r = 0; r < size; r++) {
        printf("rank %d: %.0f rows/s, %.3f s of %.3f in sums (%.1f%%), %.0f bytes received\n", r,
               all[3 * r], all[3 * r + 1], secs, 100 * all[3 * r + 1] / secs, all[3 * r + 2]);
        total += all[3 * r];
      }
      printf("total: %.0f rows/s over %d ranks\n", total, size);
      printf("summary: ranks=%d method=%s rows_per_s_total=%.0f comm_fraction=%.3f "
             "bytes_per_outer_step=%.0f sums_per_outer_step=%.0f val_loss_last=%.4f seconds=%.2f\n",
             size, method, total, ms.seconds / secs, (double)ms.bytes / (double)outer,
             (double)ms.sums / (double)outer, bl_engine_loss(e, HPO), secs);
    }
  }
  bl_engine_free(e);
  bl_mpi_close(d);
  for (int i = 0; i < 2; i++) {
    ad_tensor_free(w[i]);
    ad_tensor_free(lam[i]);
  }
  ds_dataset_free(shard);
  ds_dataset_free(train);
  ds_dataset_free(test);
  MPI_Finalize();
  return rc;
}
