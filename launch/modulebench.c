/* modulebench.c: kdp-modulebench, the per-rank cost of a replicated module (one's gate, ffl's
 * fusion head, okddip's attention) against the cohort size P, in one process. kd has no MPI, so
 * the share one rank computes in a training step at P peers -- the module's forward and backward
 * on its row block of B/P rows (src/train/step.c) -- is timed directly.
 *
 * Usage: kdp-modulebench [--methods LIST] [--peers LIST] [--batch B] [--dim D] [--classes C]
 *                        [--reps R] [--json FILE]
 *   --methods  comma-separated subset of one,ffl,okddip (default all three)
 *   --peers    cohort sizes (default 2,4,8,16,64)
 *   --batch    rows of the batch, B (default 128, bench-scaling's)
 *   --dim      every peer's feature dim d (default 256: mlp(512,256)'s last hidden layer)
 *   --classes  C (default 10)
 *   --reps     timed steps per configuration (default 200; the median is reported)
 *   --json     append one JSON line per configuration
 *   --replicated 1: time the whole batch on every rank instead (the module before it was sharded
 *              by rows), for comparison
 *   --cols     1 (default): a module whose first layer is sharded by peer columns (ffl,
 *              kdp_cohort_col_width) runs as the trainer does: this peer's partial product on its
 *              B own rows (one rank per peer), the row block's sum of the P partials, its backward,
 *              this peer's columns' backward; 0: rows only (the whole first layer on the block of
 *              B/P rows, as before the column sharding), for comparison
 * Also printed: the floats one rank exchanges per step for the module's features (the
 * all-to-all of the block's inputs and of their gradients, received + sent; the logits' rows
 * not counted) and the module gradient's allreduce length over the world (floats), from the
 * shapes; with --cols 1 the own block's floats too (summed over the peer's ranks only, when a
 * peer has several).
 * ms/step includes the zeroing of the module's gradient (every step does it, printed alone as
 * "zero ms"): with --cols 1 of the parts the rank keeps (kdp_cohort_module_zero_grad_of: the
 * replicated tensors and its own column block of the sharded one), else all of it. "sgd ms":
 * the module's SGD step (momentum 0.9, weight decay, as the trainer's) of the same parts, timed
 * alone, not in ms/step. Not timed: the batchnorm sums' allreduce (2 d_f + 1
 * doubles per step) and the exchanges (see
 * bench/cost-model.md). Also printed: the module's FLOPs per rank per step from its shapes
 * (forward + backward = 3 x the forward's matrix products), so the time can be read per FLOP.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/kd.h"
#include "kdpeers/nn.h"

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* forward + backward matrix-product FLOPs of one rank's m rows (own: its peer's own rows when
   the first layer is sharded by peer columns, else 0) */
static double module_flops(kdp_method m, size_t P, size_t rows, size_t own, size_t d, size_t C) {
  double n = (double)rows, D = (double)(P * d), p = (double)P;
  switch (m) {
  case KDP_METHOD_ONE: return 6.0 * n * D * p + 6.0 * n * p * (double)C;  /* gate, mixture */
  case KDP_METHOD_FFL:
    if (own) return 6.0 * (double)own * (double)d * (double)d + 6.0 * n * (double)d * (double)C;
    return 6.0 * n * D * (double)d + 6.0 * n * (double)d * (double)C;
  case KDP_METHOD_OKDDIP: {
    double a = p - 1, r = (double)(d / 8 ? d / 8 : 1);
    return 6.0 * n * 2.0 * a * (double)d * r + 6.0 * n * a * a * (r + (double)C);
  }
  default: return 0;
  }
}

static size_t parse_list(const char *s, size_t *out, size_t max) {
  size_t n = 0;
  char *copy = strdup(s), *save = NULL;
  for (char *t = strtok_r(copy, ",", &save); t && n < max; t = strtok_r(NULL, ",", &save))
    out[n++] = (size_t)strtoul(t, NULL, 10);
  free(copy);
  return n;
}

int main(int argc, char **argv) {
  const char *methods = "one,ffl,okddip", *peers = "2,4,8,16,64", *json = NULL;
  size_t B = 128, d = 256, C = 10;
  int reps = 200, replicated = 0, cols = 1;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!v) {
      fprintf(stderr, "kdp-modulebench: %s needs a value (see the comment atop launch/modulebench.c)\n", a);
      return 2;
    }
    if (!strcmp(a, "--methods")) methods = v;
    else if (!strcmp(a, "--peers")) peers = v;
    else if (!strcmp(a, "--batch")) B = strtoul(v, NULL, 10);
    else if (!strcmp(a, "--dim")) d = strtoul(v, NULL, 10);
    else if (!strcmp(a, "--classes")) C = strtoul(v, NULL, 10);
    else if (!strcmp(a, "--reps")) reps = atoi(v);
    else if (!strcmp(a, "--json")) json = v;
    else if (!strcmp(a, "--replicated")) replicated = atoi(v);
    else if (!strcmp(a, "--cols")) cols = atoi(v);
    else {
      fprintf(stderr, "kdp-modulebench: unknown option %s\n", a);
      return 2;
    }
    i++;
  }
  size_t Ps[16];
  size_t nP = parse_list(peers, Ps, 16);
  FILE *jf = json ? fopen(json, "a") : NULL;
  if (json && !jf) {
    fprintf(stderr, "kdp-modulebench: cannot open %s\n", json);
    return 1;
  }
  printf("%-7s %4s %5s %10s %10s %9s %12s %9s %9s %10s %10s %8s\n", "method", "P", "rows",
         "ms/step", "vs P=first", "MFLOP", "GFLOP/s", "zero ms", "sgd ms", "a2a float",
         "allreduce", "own");
  char *mcopy = strdup(methods), *save = NULL;
  for (char *name = strtok_r(mcopy, ",", &save); name; name = strtok_r(NULL, ",", &save)) {
    kdp_method m;
    kdp_error err;
    if (kdp_method_parse(name, &m, &err) != 0 || !kdp_method_ops_of(m)->module_reads) {
      fprintf(stderr, "kdp-modulebench: %s is not a method with a module\n", name);
      return 2;
    }
    double first_ms = 0;
    for (size_t pi = 0; pi < nP; pi++) {
      size_t P = Ps[pi];
      if ((int)P < kdp_method_ops_of(m)->min_peers) continue;
      kdp_kd_spec s;
      memset(&s, 0, sizeof s);
      s.method = m;
      s.P = P;
      s.C = C;
      s.leader = -1;
      for (size_t j = 0; j < P; j++) s.dims[j] = d;
      kdp_cohort *c = NULL;
      if (kdp_cohort_create(&c, &s, B, &err) != 0) {
        fprintf(stderr, "kdp-modulebench: %s\n", err.msg);
        return 1;
      }
      kdp_rng rng;
      kdp_rng_seed(&rng, 1, KDP_STREAM_MODULE);
      kdp_cohort_module_init(c, &rng);
      /* row block r of the batch on rank r: B / P rows (the largest block, rounded up) */
      size_t rows = replicated ? B : (B + P - 1) / P;
      float *z = kdp_falloc(P * rows * C), *h = kdp_falloc(kdp_cohort_feature_floats(c, rows));
      float *t = kdp_falloc(P * rows * C), *dt = kdp_falloc(P * rows * C);
      float *dz = kdp_falloc(P * rows * C), *dh = kdp_falloc(kdp_cohort_feature_floats(c, rows));
      /* sharded by peer columns: this peer's partials on its B own rows, the block's P partials */
      const size_t W = replicated || !cols ? 0 : kdp_cohort_col_width(c);
      float *part = W ? kdp_falloc(B * W) : NULL, *dpart = W ? kdp_falloc(B * W) : NULL;
      float *partb = W ? kdp_falloc(P * rows * W) : NULL, *dpartb = W ? kdp_falloc(rows * W) : NULL;
      float *hown = W ? kdp_falloc(B * d) : NULL, *dhown = W ? kdp_falloc(B * d) : NULL;
      for (size_t k = 0; W && k < B * d; k++) hown[k] = kdp_rng_normal(&rng);
      for (size_t k = 0; W && k < P * rows * W; k++) partb[k] = kdp_rng_normal(&rng);
      int32_t *y = calloc(rows, sizeof *y);
      for (size_t k = 0; k < P * rows * C; k++) {
        z[k] = 2.0f * kdp_rng_normal(&rng);
        dt[k] = 1e-3f * kdp_rng_normal(&rng);
      }
      for (size_t k = 0; k < kdp_cohort_feature_floats(c, rows); k++) h[k] = kdp_rng_normal(&rng);
      for (size_t k = 0; k < rows; k++) y[k] = (int32_t)kdp_rng_below(&rng, (uint32_t)C);
      kdp_kd_rows blk = {.z = z, .h = h, .y = y, .n = rows, .T = 3.0f, .weight = 1.0f,
                         .scale = (float)rows / (float)B, .part = partb, .dpart = dpartb};
      int tgrad = kdp_cohort_teacher_grad(c);
      /* the parts peer 0's rank keeps: its zeroing, its SGD step */
      const size_t j0 = W ? 0 : P, nm = kdp_cohort_module_n_params(c);
      size_t nsh = W ? kdp_cohort_module_ranges(c, KDP_PART_SHARED, 0, NULL, 0) : 1;
      size_t nown = W ? kdp_cohort_module_ranges(c, KDP_PART_OWN, 0, NULL, 0) : 0;
      size_t *rg = calloc(2 * (nsh + nown), sizeof *rg), shared_n = nm, own_n = 0;
      if (W) {
        kdp_cohort_module_ranges(c, KDP_PART_SHARED, 0, rg, nsh);
        kdp_cohort_module_ranges(c, KDP_PART_OWN, 0, rg + 2 * nsh, nown);
        shared_n = 0;
        for (size_t k = 0; k < nsh + nown; k++)
          *(k < nsh ? &shared_n : &own_n) += rg[2 * k + 1] - rg[2 * k];
      } else {
        rg[1] = nm;
      }
      kdp_sgd opt;
      kdp_sgd_init(&opt, nm, 0.9f, 5e-4f, 0);
      double *ms = calloc((size_t)reps, sizeof *ms), *zms = calloc((size_t)reps, sizeof *zms);
      double *sms = calloc((size_t)reps, sizeof *sms);
      for (int r = -5; r < reps; r++) {
        double t0 = kdp_now();
        kdp_cohort_module_zero_grad_of(c, j0);
        if (r >= 0) zms[r] = (kdp_now() - t0) * 1e3;
        /* (with W: the all-to-all between col_forward and the block's forward, and between its
           backward and col_backward, is not timed; the block's partials are random) */
        if ((W && kdp_cohort_col_forward(c, 0, hown, B, part, &err) != 0) ||
            kdp_cohort_module_forward(c, &blk, NULL, t, &err) != 0 ||
            kdp_cohort_module_backward(c, &blk, tgrad ? dt : NULL, NULL, dz, dh, NULL, &err) != 0 ||
            (W && kdp_cohort_col_backward(c, 0, hown, B, dpartb, dhown, &err) != 0)) {
          fprintf(stderr, "kdp-modulebench: %s\n", err.msg);
          return 1;
        }
        if (r >= 0) ms[r] = (kdp_now() - t0) * 1e3;
        t0 = kdp_now();
        kdp_sgd_step_ranges(&opt, kdp_cohort_module_params(c), kdp_cohort_module_grads(c), 1e-6f,
                            rg, nsh + nown);
        if (r >= 0) sms[r] = (kdp_now() - t0) * 1e3;
      }
      qsort(ms, (size_t)reps, sizeof *ms, cmp_double);
      qsort(zms, (size_t)reps, sizeof *zms, cmp_double);
      qsort(sms, (size_t)reps, sizeof *sms, cmp_double);
      double med = ms[reps / 2], fl = module_flops(m, P, rows, W ? B : 0, d, C);
      if (first_ms == 0) first_ms = med;
      /* the module's feature exchange of one rank (received + sent), floats: the block's inputs
         from the P - 1 other peers and their gradients back (features d_j each, or W partials);
         the logits' rows (the same either way) are not counted */
      const kdp_method_ops *o = kdp_method_ops_of(m);
      const size_t in_w = (o->module_reads & KDP_READS_FEATURES) ? (W ? W : d) : 0;
      const size_t back_w = kdp_cohort_feature_grads(c) ? in_w : 0;
      const double a2a = replicated ? 0 : 2.0 * (double)(P - 1) * (double)rows *
                                              (double)(in_w + back_w);
      printf("%-7s %4zu %5zu %10.4f %10.2f %9.2f %12.2f %9.4f %9.4f %10.0f %10zu %8zu\n", name, P,
             rows, med, med / first_ms, fl / 1e6, fl / (med * 1e-3) / 1e9, zms[reps / 2],
             sms[reps / 2], a2a, shared_n, own_n);
      if (jf)
        fprintf(jf,
                "{\"method\":\"%s\",\"replicated\":%d,\"cols\":%d,\"P\":%zu,\"B\":%zu,\"d\":%zu,"
                "\"C\":%zu,\"rows\":%zu,\"ms_median\":%.6f,\"ms_best\":%.6f,\"mflop\":%.4f,"
                "\"zero_grad_ms_median\":%.6f,\"sgd_ms_median\":%.6f,\"a2a_floats\":%.0f,"
                "\"allreduce_floats\":%zu,\"own_floats\":%zu,\"reps\":%d}\n",
                name, replicated, W ? 1 : 0, P, B, d, C, rows, med, ms[0], fl / 1e6,
                zms[reps / 2], sms[reps / 2], a2a, shared_n, own_n, reps);
      kdp_sgd_free(&opt);
      free(rg);
      free(ms);
      free(zms);
      free(sms);
      free(y);
      float *bufs[] = {z, h, t, dt, dz, dh, part, dpart, partb, dpartb, hown, dhown};
      for (size_t k = 0; k < sizeof bufs / sizeof bufs[0]; k++) free(bufs[k]);
      kdp_cohort_free(c);
    }
  }
  free(mcopy);
  if (jf) fclose(jf);
  return 0;
}
