/* stepprof.c: kdp-stepprof, one peer's training step (batch from the Fashion-MNIST batcher,
 * forward, cross-entropy, backward, SGD: the step of `kdpeers` with kd.method = independent, minus
 * MPI and bookkeeping) timed phase by phase at a given thread count, and its parallel profile:
 * the share of the step outside the parallel loops of src/nn (the serial part) and the step
 * modelled at 1, 2, 4, ..., 64 threads (Amdahl, and from the loops' task counts).
 *
 * Usage: kdp-stepprof [--model ARCH] [--batch N] [--threads N] [--steps N] [--warmup N]
 *                     [--data DIR] [--json FILE] [--unfused]
 *   ARCH: any model of the zoo on 28x28x1 inputs (default mlp(512,256)).
 *   --unfused: the SGD step after the backward pass, as the trainer does at k > 1 ranks per
 *   peer (default: fused into it, kdp_model_backward_sgd, as at k = 1; then "optimizer" is 0).
 * Times are medians over the timed steps; "best" is the fastest window of 10 consecutive steps
 * (what the step costs when no other process takes the core). The profile is collected in a
 * second pass at 1 thread.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/data.h"
#include "kdpeers/kd.h"
#include "kdpeers/nn.h"

enum { PH_DATA, PH_FORWARD, PH_LOSS, PH_BACKWARD, PH_OPTIM, PH_N };
static const char *const PHASE[PH_N] = {"data", "forward", "loss", "backward", "optimizer"};

static int fuse_sgd = 1; /* --unfused: 0 */

typedef struct run {
  double *step, *phase[PH_N]; /* seconds per timed step */
  kdp_nn_profile prof;
} run;

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(const double *v, int n) {
  double *c = malloc((size_t)n * sizeof *c);
  memcpy(c, v, (size_t)n * sizeof *c);
  qsort(c, (size_t)n, sizeof *c, cmp_double);
  double m = n % 2 ? c[n / 2] : 0.5 * (c[n / 2 - 1] + c[n / 2]);
  free(c);
  return m;
}

/* mean step of the fastest window of w consecutive steps */
static double best_window(const double *v, int n, int w) {
  if (w > n) w = n;
  double best = INFINITY;
  for (int i = 0; i + w <= n; i++) {
    double s = 0;
    for (int k = 0; k < w; k++) s += v[i + k];
    if (s / w < best) best = s / w;
  }
  return best;
}

static int train(const char *arch, const kdp_dataset *ds, size_t batch, int threads, int warmup,
                 int steps, int profile, run *out) {
  kdp_model *m = NULL;
  kdp_error err = {{0}};
  kdp_input_shape in = {ds->H, ds->W, ds->C, ds->n_classes};
  if (kdp_model_create(&m, arch, in, batch, &err) != 0) {
    fprintf(stderr, "kdp-stepprof: %s\n", err.msg);
    return -1;
  }
  kdp_nn_set_threads(threads);
  kdp_rng init, drop;
  kdp_rng_seed(&init, 0, KDP_STREAM_INIT);
  kdp_rng_seed(&drop, 0, KDP_STREAM_DROPOUT);
  kdp_model_init(m, &init);
  kdp_batcher b;
  kdp_batcher_init(&b, ds, batch, 0, 1, 1);
  b.mean[0] = 0.2860f; /* kdpeers' Fashion-MNIST defaults */
  b.std[0] = 0.3530f;
  const size_t isz = ds->H * ds->W * ds->C, C = ds->n_classes, np = kdp_model_n_params(m);
  float *x = kdp_falloc(batch * isz), *dz = kdp_falloc(batch * C);
  int32_t *y = kdp_xcalloc(batch, sizeof(int32_t));
  kdp_sgd o;
  kdp_sgd_init(&o, np, 0.9f, 5e-4f, 1);
  for (int s = 0; s < warmup + steps; s++) {
    if (profile && s == warmup) kdp_nn_profile_start();
    double t[PH_N + 1];
    t[0] = kdp_now();
    size_t bs = kdp_batcher_next(&b, x, y);
    t[1] = kdp_now();
    const float *z = kdp_model_forward(m, x, bs, 1, &drop);
    t[2] = kdp_now();
    memset(dz, 0, bs * C * sizeof(float));
    double loss = kdp_ce_loss(z, y, bs, C, dz, 1.0f, NULL);
    t[3] = kdp_now();
    if (fuse_sgd) {
      /* as the trainer at k = 1: no zeroing pass, each layer's SGD step inside the backward */
      kdp_model_backward_sgd(m, dz, NULL, &o, 0.05f);
      t[4] = t[5] = kdp_now();
    } else {
      kdp_model_backward_set(m, dz, NULL); /* as the trainer at k > 1 */
      t[4] = kdp_now();
      kdp_sgd_step(&o, kdp_model_params(m), kdp_model_grads(m), 0.05f);
      t[5] = kdp_now();
    }
    if (!isfinite(loss)) {
      fprintf(stderr, "kdp-stepprof: the loss diverged at step %d\n", s);
      return -1;
    }
    if (s < warmup) continue;
    out->step[s - warmup] = t[PH_N] - t[0];
    for (int p = 0; p < PH_N; p++) out->phase[p][s - warmup] = t[p + 1] - t[p];
  }
  if (profile) kdp_nn_profile_stop(&out->prof);
  kdp_sgd_free(&o);
  kdp_batcher_free(&b);
  free(x), free(dz), free(y);
  kdp_model_free(m);
  return 0;
}

static void run_alloc(run *r, int steps) {
  memset(r, 0, sizeof *r);
  r->step = calloc((size_t)steps, sizeof(double));
  for (int p = 0; p < PH_N; p++) r->phase[p] = calloc((size_t)steps, sizeof(double));
}

static void run_free(run *r) {
  free(r->step);
  for (int p = 0; p < PH_N; p++) free(r->phase[p]);
}

static void usage(FILE *f) {
  fprintf(f, "usage: kdp-stepprof [--model ARCH] [--batch N] [--threads N] [--steps N] "
             "[--warmup N] [--data DIR] [--json FILE] [--unfused]\n");
}

int main(int argc, char **argv) {
  const char *arch = "mlp(512,256)", *dir = "/usr/share/datasets/fashion-mnist", *json = NULL;
  long batch = 128, threads = 1, steps = 200, warmup = 20;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    long *num = !strcmp(a, "--batch")     ? &batch
                : !strcmp(a, "--threads") ? &threads
                : !strcmp(a, "--steps")   ? &steps
                : !strcmp(a, "--warmup")  ? &warmup
                                          : NULL;
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    }
    if (!strcmp(a, "--unfused")) {
      fuse_sgd = 0;
      continue;
    }
    if (!v) {
      fprintf(stderr, "kdp-stepprof: %s needs a value\n", a);
      usage(stderr);
      return 2;
    }
    i++;
    if (num) {
      char *end;
      errno = 0;
      *num = strtol(v, &end, 10);
      if (errno || *end || *num < (num == &warmup ? 0 : 1) || *num > 100000) {
        fprintf(stderr, "kdp-stepprof: %s expects a positive integer, got '%s'\n", a, v);
        return 2;
      }
    } else if (!strcmp(a, "--model")) {
      arch = v;
    } else if (!strcmp(a, "--data")) {
      dir = v;
    } else if (!strcmp(a, "--json")) {
      json = v;
    } else {
      fprintf(stderr, "kdp-stepprof: unknown option '%s'\n", a);
      usage(stderr);
      return 2;
    }
  }
  char ip[4096], lp[4096];
  snprintf(ip, sizeof ip, "%s/train-images-idx3-ubyte.gz", dir);
  snprintf(lp, sizeof lp, "%s/train-labels-idx1-ubyte.gz", dir);
  kdp_dataset ds;
  kdp_error err = {{0}};
  if (kdp_idx_load(&ds, ip, lp, &err) != 0) {
    fprintf(stderr, "kdp-stepprof: %s (the dataset: Debian's dataset-fashion-mnist)\n", err.msg);
    return 1;
  }
  run r, p;
  run_alloc(&r, (int)steps);
  run_alloc(&p, (int)steps);
  if (train(arch, &ds, (size_t)batch, (int)threads, (int)warmup, (int)steps, 0, &r) ||
      train(arch, &ds, (size_t)batch, 1, (int)warmup, (int)steps, 1, &p))
    return 1;
  const int n = (int)steps;
  double step = median(r.step, n), best = best_window(r.step, n, 10);
  double step1 = 0, par1 = p.prof.parallel_seconds / (double)n;
  for (int s = 0; s < n; s++) step1 += p.step[s];
  step1 /= (double)n; /* mean: the profile sums over every step */
  double serial = step1 - par1 > 0 ? (step1 - par1) / step1 : 0;
  printf("kdp-stepprof: %s, batch %ld, %ld threads: step %.3f ms (median of %d; best window "
         "%.3f ms), %.1f steps/s\n",
         arch, batch, threads, 1e3 * step, n, 1e3 * best, 1.0 / step);
  printf("  phases (median ms):");
  for (int k = 0; k < PH_N; k++) printf(" %s %.3f", PHASE[k], 1e3 * median(r.phase[k], n));
  printf("\n  at 1 thread: %.3f ms per step, %.1f%% of it inside %llu parallel loops, serial "
         "share %.1f%%\n",
         1e3 * step1, 100.0 * par1 / step1, (unsigned long long)(p.prof.loops / (uint64_t)n),
         100.0 * serial);
  printf("  modelled speed-up  threads: ");
  for (int k = 0; k < KDP_NN_PROFILE_WIDTHS; k++) printf("%8d", 1 << k);
  printf("\n    Amdahl (serial share)   : ");
  for (int k = 0; k < KDP_NN_PROFILE_WIDTHS; k++)
    printf("%8.2f", 1.0 / (serial + (1.0 - serial) / (double)(1 << k)));
  printf("\n    + task counts of loops  : ");
  for (int k = 0; k < KDP_NN_PROFILE_WIDTHS; k++)
    printf("%8.2f", step1 / (step1 - par1 + p.prof.modelled_seconds[k] / (double)n));
  printf("\n");
  if (json) {
    FILE *f = fopen(json, "w");
    if (!f) {
      fprintf(stderr, "kdp-stepprof: cannot write %s: %s\n", json, strerror(errno));
      return 1;
    }
    fprintf(f, "{\"arch\":\"%s\",\"batch\":%ld,\"threads\":%ld,\"steps\":%d,"
               "\"step_seconds_median\":%.6e,\"step_seconds_best_window\":%.6e,\"phases\":{",
            arch, batch, threads, n, step, best);
    for (int k = 0; k < PH_N; k++)
      fprintf(f, "%s\"%s\":%.6e", k ? "," : "", PHASE[k], median(r.phase[k], n));
    fprintf(f, "},\"profile_1_thread\":{\"step_seconds\":%.6e,\"parallel_seconds\":%.6e,"
               "\"serial_share\":%.6f,\"loops_per_step\":%.1f,\"modelled\":[",
            step1, par1, serial, (double)p.prof.loops / (double)n);
    for (int k = 0; k < KDP_NN_PROFILE_WIDTHS; k++)
      fprintf(f, "%s{\"threads\":%d,\"amdahl_speedup\":%.4f,\"task_speedup\":%.4f}", k ? "," : "",
              1 << k, 1.0 / (serial + (1.0 - serial) / (double)(1 << k)),
              step1 / (step1 - par1 + p.prof.modelled_seconds[k] / (double)n));
    fprintf(f, "]}}\n");
    fclose(f);
  }
  run_free(&r);
  run_free(&p);
  kdp_dataset_free(&ds);
  return 0;
}
