/* bucketprof.c: kdp-bucketprof, under mpirun -np 2: one peer's training step (synthetic batch,
 * forward, cross-entropy, backward, SGD) several ways, interleaved step by step so that a change
 * of the machine's load hits them alike (six ways):
 *   k1      every rank trains the whole batch alone (a peer on 1 rank: no communication)
 *   k2      the 2 ranks split the batch; one blocking allreduce after the backward pass
 *   k2-bkt  the 2 ranks split the batch; the allreduce in buckets of --bucket-kb KiB started
 *           during the backward pass (src/dist/buckets.c)
 *   k2-shard the 2 ranks split the batch; reduce-scatter of the gradients, each rank steps its
 *           half of the parameters, allgather of the weights (a sharded optimizer step)
 *   k2-shm  the 2 ranks split the batch; the gradient arenas, the parameters and the momentum in
 *           MPI-3 shared windows, each rank sums its half of both arenas and takes that half's
 *           SGD step into both ranks' copies (run.grad_sum = shm: kdp_buckets_finish_sgd; its
 *           "allreduce" figure holds the SGD step, its "sgd" is 0)
 *   k2-shmsum the same window, before issue 13: each rank sums its half into both arenas, then
 *           every rank takes the whole SGD step (kdp_buckets_finish + kdp_sgd_step)
 * Every step starts at a barrier; a step's time is the slower rank's. Reported: the median and
 * the 10th percentile of each way's step, backward and allreduce, and the paired ratios (within
 * each group of consecutive steps, one of each way): k1 / k2, k1 / k2-bkt (speed-up of 2 ranks
 * over 1), k2 / k2-bkt (what the buckets gain), k1 / k2-shard, k1 / k2-shm, k2 / k2-shm, k1 / k2-shmsum
 * and k2-shmsum / k2-shm (what the fused step gains), as medians over the groups; per way also
 * the forward and SGD parts and the minimum.
 *
 * --ways k2-shm,k2-shmsum: those ways only, in that order (the ratios between them only).
 *
 * Usage: mpirun -np 2 kdp-bucketprof [--model ARCH] [--batch N] [--bucket-kb N] [--steps N]
 *                                    [--warmup N] [--ways W1,W2,...] [--json FILE]
 */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/dist.h"
#include "kdpeers/kd.h"
#include "kdpeers/nn.h"

enum { W_K1, W_K2, W_BKT, W_SHARD, W_SHM, W_SHMSUM, W_N };
static const char *const WAY[W_N] = {"k1", "k2", "k2-bkt", "k2-shard", "k2-shm", "k2-shmsum"};
enum { F_STEP, F_BACKWARD, F_ALLREDUCE, F_FORWARD, F_SGD, F_N };
static const char *const FIG[F_N] = {"step", "backward", "allreduce", "forward", "sgd"};

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double quantile(const double *v, int n, double q) {
  double *c = malloc((size_t)n * sizeof *c);
  memcpy(c, v, (size_t)n * sizeof *c);
  qsort(c, (size_t)n, sizeof *c, cmp_double);
  double r = c[(int)(q * (n - 1) + 0.5)];
  free(c);
  return r;
}

int main(int argc, char **argv) {
  const char *arch = "mlp(512,256)", *json = NULL, *ways = NULL;
  long batch = 128, bucket_kb = 256, steps = 300, warmup = 30;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    long *num = !strcmp(a, "--batch")       ? &batch
                : !strcmp(a, "--bucket-kb") ? &bucket_kb
                : !strcmp(a, "--steps")     ? &steps
                : !strcmp(a, "--warmup")    ? &warmup
                                            : NULL;
    if (!v || (!num && strcmp(a, "--model") && strcmp(a, "--json") && strcmp(a, "--ways"))) {
      fprintf(stderr, "usage: mpirun -np 2 kdp-bucketprof [--model ARCH] [--batch N] "
                      "[--bucket-kb N] [--steps N] [--warmup N] [--ways W1,W2,...] [--json FILE]\n");
      return 2;
    }
    if (num) *num = strtol(v, NULL, 10);
    else if (!strcmp(a, "--model")) arch = v;
    else if (!strcmp(a, "--ways")) ways = v;
    else json = v;
    i++;
  }
  /* the ways run, in order: sel[0, nsel) */
  int on[W_N] = {0}, sel[W_N], nsel = 0;
  for (int w = 0; w < W_N; w++) {
    const char *h = ways ? strstr(ways, WAY[w]) : NULL;
    size_t l = strlen(WAY[w]);
    while (h && ((h != ways && h[-1] != ',') || (h[l] && h[l] != ',')))
      h = strstr(h + 1, WAY[w]);
    if (!ways || h) on[w] = 1, sel[nsel++] = w;
  }
  kdp_error err = {{0}};
  kdp_dist d;
  if (kdp_dist_init_mpi(&argc, &argv, &err) != 0 || kdp_dist_setup(&d, 2, &err) != 0) {
    fprintf(stderr, "kdp-bucketprof: %s\n", err.msg);
    return 1;
  }
  if (d.world_size != 2 || batch < 2 || batch % 2 || steps < 3 || bucket_kb < 1 || !nsel) {
    if (d.world_rank == 0)
      fprintf(stderr, "kdp-bucketprof: needs mpirun -np 2, an even --batch, --steps >= 3, "
                      "--bucket-kb >= 1, --ways among k1,k2,k2-bkt,k2-shard,k2-shm,k2-shmsum\n");
    kdp_dist_free(&d);
    kdp_dist_finalize();
    return 2;
  }
  kdp_nn_set_threads(1);
  kdp_input_shape in = {28, 28, 1, 10};
  kdp_model *m = NULL;
  if (kdp_model_create(&m, arch, in, (size_t)batch, &err) != 0) {
    fprintf(stderr, "kdp-bucketprof: %s\n", err.msg);
    return 1;
  }
  kdp_rng rng, drop;
  kdp_rng_seed(&rng, 0, KDP_STREAM_INIT);
  kdp_rng_seed(&drop, (uint64_t)d.world_rank, KDP_STREAM_DROPOUT);
  kdp_model_init(m, &rng);
  const size_t isz = 28 * 28, C = 10, np = kdp_model_n_params(m);
  float *x = kdp_falloc((size_t)batch * isz), *dz = kdp_falloc((size_t)batch * C);
  int32_t *y = kdp_xcalloc((size_t)batch, sizeof(int32_t));
  for (size_t k = 0; k < (size_t)batch * isz; k++) x[k] = kdp_rng_uniform(&rng);
  for (long k = 0; k < batch; k++) y[k] = (int32_t)kdp_rng_below(&rng, C);
  kdp_sgd o;
  kdp_sgd_init(&o, np, 0.9f, 5e-4f, 1);
  kdp_buckets *bk = kdp_buckets_for_model(&d, m, (size_t)bucket_kb, KDP_GRAD_SUM_ALLREDUCE);
  size_t nb = kdp_buckets_count(bk);
  float *shm_grads = NULL;
  kdp_buckets *shm = kdp_buckets_create_shm(&d, np, &shm_grads);
  if (!shm) {
    fprintf(stderr, "kdp-bucketprof: the 2 ranks are not on one node (no shared window)\n");
    return 1;
  }
  /* the parameters and momentum in the window for every way (each rank's own copy; only k2-shm
     writes the other rank's) */
  kdp_buckets_share_sgd(shm, m, &o);
  int cnt[2] = {(int)(np / 2), (int)(np - np / 2)}, dsp[2] = {0, (int)(np / 2)};
  float *half = kdp_falloc(np - np / 2);
  long n = steps - steps % nsel, total = warmup + n;
  /* per timed step: the three figures of this rank, at [rank][fig][step] for the sum below */
  float *t = kdp_xcalloc((size_t)2 * F_N * (size_t)n, sizeof(float));
  for (long s = 0; s < total; s++) {
    int way = sel[s % nsel];
    size_t bs = way == W_K1 ? (size_t)batch : (size_t)batch / 2;
    const float *xs = x + (way == W_K1 ? 0 : (size_t)d.slice * bs * isz);
    const int32_t *ys = y + (way == W_K1 ? 0 : (size_t)d.slice * bs);
    kdp_model_set_backward_hook(m, way == W_BKT ? kdp_buckets_ready : NULL, bk);
    /* k2-shm: the model's gradient arena is the window's for this step (swapped outside the
       timed part) */
    const int in_window = way == W_SHM || way == W_SHMSUM;
    float *own_grads = in_window ? kdp_model_swap_grads(m, shm_grads) : NULL;
    kdp_dist_barrier(&d);
    double t0 = kdp_now();
    const float *z = kdp_model_forward(m, xs, bs, 1, &drop);
    memset(dz, 0, bs * C * sizeof(float));
    kdp_ce_loss(z, ys, bs, C, dz, way == W_K1 ? 1.0f : 0.5f, NULL);
    double t1 = kdp_now();
    kdp_model_backward_set(m, dz, NULL);
    double t2 = kdp_now();
    if (way == W_K2) kdp_dist_peer_allreduce(&d, kdp_model_grads(m), np);
    if (way == W_BKT) kdp_buckets_finish(bk);
    if (way == W_SHM) kdp_buckets_finish_sgd(shm, 0.01f);
    if (way == W_SHMSUM) kdp_buckets_finish(shm);
    if (way == W_SHARD)
      MPI_Reduce_scatter(kdp_model_grads(m), half, cnt, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    double t3 = kdp_now();
    if (way == W_SHARD) {
      size_t r[2] = {(size_t)dsp[d.world_rank], (size_t)(dsp[d.world_rank] + cnt[d.world_rank])};
      kdp_sgd_step_ranges(&o, kdp_model_params(m), half - r[0], 0.01f, r, 1);
      MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, kdp_model_params(m), cnt, dsp, MPI_FLOAT,
                     MPI_COMM_WORLD);
    } else if (way != W_SHM) {
      kdp_sgd_step(&o, kdp_model_params(m), kdp_model_grads(m), 0.01f);
    }
    double t4 = kdp_now();
    if (own_grads) kdp_model_swap_grads(m, own_grads);
    if (s < warmup) continue;
    size_t i = (size_t)(s - warmup), base = (size_t)d.world_rank * F_N * (size_t)n;
    t[base + F_STEP * (size_t)n + i] = (float)(t4 - t0);
    t[base + F_BACKWARD * (size_t)n + i] = (float)(t2 - t1);
    t[base + F_ALLREDUCE * (size_t)n + i] = (float)(t3 - t2);
    t[base + F_FORWARD * (size_t)n + i] = (float)(t1 - t0);
    t[base + F_SGD * (size_t)n + i] = (float)(t4 - t3);
  }
  kdp_dist_world_allreduce(&d, t, (size_t)2 * F_N * (size_t)n);
  if (d.world_rank == 0) {
    /* per step: the slower rank's step, and that rank's backward and allreduce */
    long per = n / nsel;
    double *v[W_N][F_N];
    for (int w = 0; w < W_N; w++)
      for (int f = 0; f < F_N; f++) v[w][f] = calloc((size_t)per, sizeof(double));
    for (long i = 0; i < n; i++) {
      int w = sel[(warmup + i) % nsel];
      int r = t[F_STEP * n + i] >= t[F_N * n + F_STEP * n + i] ? 0 : 1;
      for (int f = 0; f < F_N; f++) v[w][f][i / nsel] = 1e3 * t[(size_t)r * F_N * n + f * n + i];
    }
    enum { NR = 8 };
    double *ratio[NR];
    static const char *const RATIO[NR] = {
        "k1 / k2",     "k1 / k2-bkt", "k2 / k2-bkt",    "k1 / k2-shard",
        "k1 / k2-shm", "k2 / k2-shm", "k1 / k2-shmsum", "k2-shmsum / k2-shm"};
    static const char *const RKEY[NR] = {"k1_k2",     "k1_bkt",    "k2_bkt",
                                         "k1_shard",  "k1_shm",    "k2_shm",
                                         "k1_shmsum", "shmsum_shm"};
    static const int RA[NR][2] = {
        {W_K1, W_K2},  {W_K1, W_BKT}, {W_K2, W_BKT},    {W_K1, W_SHARD},
        {W_K1, W_SHM}, {W_K2, W_SHM}, {W_K1, W_SHMSUM}, {W_SHMSUM, W_SHM}};
    for (int q = 0; q < NR; q++) {
      ratio[q] = calloc((size_t)per, sizeof(double));
      if (!on[RA[q][0]] || !on[RA[q][1]]) continue;
      for (long i = 0; i < per; i++) ratio[q][i] = v[RA[q][0]][F_STEP][i] / v[RA[q][1]][F_STEP][i];
    }
    printf("kdp-bucketprof: %s, batch %ld (k2: %ld per rank), %zu buckets of >= %ld KiB, %ld "
           "groups of steps after %ld warm-up steps\n",
           arch, batch, batch / 2, nb, bucket_kb, per, warmup);
    printf("%-9s %-10s %9s %9s %9s\n", "way", "figure", "median", "p10", "min");
    for (int w = 0; w < W_N; w++)
      for (int f = 0; f < F_N && on[w]; f++)
        printf("%-9s %-10s %8.3fms %8.3fms %8.3fms\n", WAY[w], FIG[f],
               quantile(v[w][f], (int)per, 0.5), quantile(v[w][f], (int)per, 0.1),
               quantile(v[w][f], (int)per, 0.0));
    for (int q = 0; q < NR; q++)
      if (on[RA[q][0]] && on[RA[q][1]])
        printf("%-18s paired step ratio: median %.3f, quartiles %.3f-%.3f\n", RATIO[q],
               quantile(ratio[q], (int)per, 0.5), quantile(ratio[q], (int)per, 0.25),
               quantile(ratio[q], (int)per, 0.75));
    if (json) {
      FILE *f = fopen(json, "a");
      if (f) {
        fprintf(f, "{\"arch\":\"%s\",\"batch\":%ld,\"bucket_kb\":%ld,\"buckets\":%zu,\"triples\":%ld",
                arch, batch, bucket_kb, nb, per);
        for (int w = 0; w < W_N; w++)
          for (int fi = 0; fi < F_N && on[w]; fi++)
            fprintf(f, ",\"%s_%s_median_ms\":%.4f,\"%s_%s_p10_ms\":%.4f,\"%s_%s_min_ms\":%.4f",
                    WAY[w], FIG[fi], quantile(v[w][fi], (int)per, 0.5), WAY[w], FIG[fi],
                    quantile(v[w][fi], (int)per, 0.1), WAY[w], FIG[fi],
                    quantile(v[w][fi], (int)per, 0.0));
        for (int q = 0; q < NR; q++)
          if (on[RA[q][0]] && on[RA[q][1]])
            fprintf(f, ",\"ratio_%s_median\":%.4f,\"ratio_%s_q1\":%.4f,\"ratio_%s_q3\":%.4f",
                    RKEY[q], quantile(ratio[q], (int)per, 0.5), RKEY[q],
                    quantile(ratio[q], (int)per, 0.25), RKEY[q], quantile(ratio[q], (int)per, 0.75));
        fprintf(f, "}\n");
        fclose(f);
      }
    }
    for (int w = 0; w < W_N; w++)
      for (int fi = 0; fi < F_N; fi++) free(v[w][fi]);
    for (int q = 0; q < NR; q++) free(ratio[q]);
  }
  kdp_buckets_free(bk);
  kdp_buckets_free(shm);
  kdp_sgd_free(&o);
  free(t);
  free(x), free(dz), free(y), free(half);
  kdp_model_free(m);
  kdp_dist_free(&d);
  kdp_dist_finalize();
  return 0;
}
