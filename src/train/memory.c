/* memory.c: what a run will take in memory, estimated from the model plans before anything is
   allocated or written, and the refusal of runs that cannot fit the node. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "kdpeers/data.h"
#include "kdpeers/kd.h"
#include "kdpeers/nn.h"
#include "kdpeers/train.h"
#include "train_internal.h"

#define GIB (1024.0 * 1024.0 * 1024.0)

/* "1.5 GiB", "320 MiB", "12 KiB" */
static const char *fmt_bytes(double b, char *buf, size_t n) {
  if (b >= GIB)
    snprintf(buf, n, "%.1f GiB", b / GIB);
  else if (b >= 1024.0 * 1024.0)
    snprintf(buf, n, "%.0f MiB", b / (1024.0 * 1024.0));
  else
    snprintf(buf, n, "%.0f KiB", b / 1024.0);
  return buf;
}

/* physical memory, or the cgroup's limit when it is lower (Slurm confines jobs with cgroups) */
static double node_memory(void) {
  double phys = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGE_SIZE);
  FILE *f = fopen("/sys/fs/cgroup/memory.max", "r");
  if (f) {
    unsigned long long v;
    if (fscanf(f, "%llu", &v) == 1 && (double)v < phys) phys = (double)v;
    fclose(f);
  }
  return phys;
}

int kdp_train_memory_estimate(const kdp_config *cfg, const kdp_dist *d,
                              const struct kdp_dataset *train, const struct kdp_dataset *test,
                              kdp_memory_estimate *est, kdp_error *err) {
  memset(est, 0, sizeof *est);
  size_t isz = train->H * train->W * train->C, C = train->n_classes;
  size_t Bg = (size_t)cfg->batch_size, Be = Bg > KDP_TRAIN_EVAL_BATCH ? Bg : KDP_TRAIN_EVAL_BATCH;
  kdp_input_shape in = {train->H, train->W, train->C, C};
  double node_ranks = 0;
  for (int p = 0; p < d->n_peers; p++) {
    int k = d->uniform ? d->ranks_per_peer : d->peer_k[p];
    size_t Bl = Bg / (size_t)(k > 0 ? k : 1);
    size_t maxb = Bl > KDP_TRAIN_EVAL_BATCH ? Bl : KDP_TRAIN_EVAL_BATCH;
    kdp_model_memory mm;
    const char *arch = kdp_config_peer_arch(cfg, p);
    int rc = kdp_model_plan(arch, in, maxb, &mm, err);
    if (rc != 0) return rc;
    kdp_peer_memory *pm = &est->peer[p < KDP_MAX_PEERS ? p : KDP_MAX_PEERS - 1];
    pm->params = (double)mm.n_params * 4.0;
    pm->model = mm.params_bytes;               /* parameters, gradients, buffers */
    pm->optimizer = (double)mm.n_params * 4.0; /* SGD momentum */
    pm->activations = mm.activation_bytes;
    /* the trainer's batch, logits of every peer and feature gradients */
    pm->buffers = (double)Be * (double)isz * 4.0 +
                  4.0 * (double)Be * (double)C * (double)(d->n_peers + 2) +
                  2.0 * (double)Bl * (double)mm.feature_dim * 4.0;
    /* run.ema_decay's copy; pcl runs it forward in train mode (its activations too) */
    if (kdp_ema_decay_of(cfg, d->n_peers) > 0) {
      pm->model += mm.params_bytes;
      if (d->n_peers > 1 && cfg->method_id == KDP_METHOD_PCL) pm->activations *= 2.0;
    }
    if (cfg->method_id == KDP_METHOD_MCL && d->n_peers > 1) {
      /* mcl: the peer's embedding head (parameters, gradient, momentum), its activations, and
         the whole batch's embeddings and similarity matrices of the contrastive term */
      double H = (double)cfg->embed_hidden, E = (double)cfg->embed_dim, b = (double)Bg;
      double hp = H * (double)mm.feature_dim + H + E * H + E;
      pm->params += hp * 4.0;
      pm->model += 2.0 * hp * 4.0;
      pm->optimizer += hp * 4.0;
      pm->buffers += 4.0 * (b * (3.0 * H + 3.0 * E + 1.0) +
                            2.0 * (double)d->n_peers * b * E + 6.0 * b * b + b * (double)C);
    }
    pm->per_rank = pm->model + pm->optimizer + pm->activations + pm->buffers;
    pm->ranks = k;
    pm->batch = maxb;
    if (pm->per_rank > est->per_rank_max) {
      est->per_rank_max = pm->per_rank;
      est->worst_peer = p;
    }
    node_ranks += pm->per_rank * (double)k;
  }
  est->n_peers = d->n_peers < KDP_MAX_PEERS ? d->n_peers : KDP_MAX_PEERS;
  size_t elem = kdp_dataset_elem(train);
  est->dataset = (double)train->n * ((double)isz * (double)elem + 1.0) +
                 (double)test->n * ((double)isz * (double)elem + 1.0);
  int local = d->local_size > 0 ? d->local_size : 1;
  /* one node holding the whole world: the exact sum; else the heaviest rank on every slot */
  double ranks_here = local >= d->world_size ? node_ranks : est->per_rank_max * (double)local;
  est->node_total = ranks_here + est->dataset * (cfg->shared ? 1.0 : (double)local);
  est->local_ranks = local;
  uint64_t cap = kdp_config_max_memory(cfg);
  est->limit_is_config = cap > 0;
  est->limit = cap > 0 ? (double)cap : node_memory();
  return 0;
}

void kdp_train_memory_print(const kdp_memory_estimate *est, FILE *f) {
  char a[32], b[32], c[32], e[32], g[32];
  for (int p = 0; p < est->n_peers; p++) {
    const kdp_peer_memory *pm = &est->peer[p];
    char h[32];
    fprintf(f,
            "peer %d memory per rank: %s (parameters %s, with gradients and buffers %s, "
            "optimizer %s, activations for a batch of %zu %s); %d rank%s: %s for the peer\n",
            p, fmt_bytes(pm->per_rank, a, sizeof a), fmt_bytes(pm->params, b, sizeof b),
            fmt_bytes(pm->model, c, sizeof c), fmt_bytes(pm->optimizer, e, sizeof e), pm->batch,
            fmt_bytes(pm->activations, g, sizeof g), pm->ranks, pm->ranks == 1 ? "" : "s",
            fmt_bytes(pm->per_rank * pm->ranks, h, sizeof h));
  }
  fprintf(f, "memory on this node: %s for %d rank%s with the dataset (%s); limit %s (%s)\n",
          fmt_bytes(est->node_total, a, sizeof a), est->local_ranks,
          est->local_ranks == 1 ? "" : "s", fmt_bytes(est->dataset, b, sizeof b),
          fmt_bytes(est->limit, c, sizeof c),
          est->limit_is_config ? "run.max_memory" : "physical memory");
}

int kdp_train_memory_check(const kdp_memory_estimate *est, kdp_error *err) {
  if (est->node_total <= est->limit) return 0;
  const kdp_peer_memory *pm = &est->peer[est->worst_peer];
  char a[32], b[32], c[32], e[32], g[32], h[32], l[32];
  return kdp_fail(err, KDP_EINVAL,
                  "the run would need about %s on this node (%d rank%s; peer %d alone needs %s per "
                  "rank: %s of parameters, gradients and buffers, %s of optimizer state, %s of "
                  "activations for a batch of %zu; dataset %s), more than the %s %s. Use a "
                  "smaller model or optim.batch_size, fewer ranks per node, or set "
                  "run.max_memory",
                  fmt_bytes(est->node_total, a, sizeof a), est->local_ranks,
                  est->local_ranks == 1 ? "" : "s", est->worst_peer,
                  fmt_bytes(pm->per_rank, b, sizeof b), fmt_bytes(pm->model, c, sizeof c),
                  fmt_bytes(pm->optimizer, e, sizeof e), fmt_bytes(pm->activations, g, sizeof g),
                  pm->batch, fmt_bytes(est->dataset, h, sizeof h),
                  est->limit_is_config ? "run.max_memory of" : "physical memory,",
                  fmt_bytes(est->limit, l, sizeof l));
}
