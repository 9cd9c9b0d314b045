/* diversity.c: how different the peers of a cohort are at an evaluation (T = 1): the mean pairwise
   KL between their predictive distributions, their disagreement, and each peer's churn between
   two evaluations. Pure functions on logits and labels; the trainer feeds them the evaluation
   batches. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/kd.h"

void kdp_diversity_init(kdp_diversity *d, size_t P) {
  memset(d, 0, sizeof *d);
  d->P = P;
}

/* lp (C) = log softmax of z (C), in double */
static void log_softmax_d(double *lp, const float *z, size_t C) {
  float mx = z[kdp_argmax(z, C)];
  double s = 0.0;
  for (size_t k = 0; k < C; k++) s += exp((double)z[k] - mx);
  double l = log(s);
  for (size_t k = 0; k < C; k++) lp[k] = (double)z[k] - mx - l;
}

void kdp_diversity_add(kdp_diversity *d, const float *z_all, size_t n, size_t C) {
  const size_t P = d->P;
  if (!n || !C) return;
  double *lp = kdp_xmalloc(P * C * sizeof(double));
  size_t *lab = kdp_xmalloc(P * sizeof(size_t));
  for (size_t b = 0; b < n; b++) {
    for (size_t j = 0; j < P; j++) {
      const float *zr = z_all + (j * n + b) * C;
      log_softmax_d(lp + j * C, zr, C);
      lab[j] = kdp_argmax(zr, C);
    }
    for (size_t i = 0; i < P; i++)
      for (size_t j = 0; j < P; j++) {
        if (i == j) continue;
        const double *li = lp + i * C, *lj = lp + j * C;
        double kl = 0.0;
        for (size_t k = 0; k < C; k++) kl += exp(li[k]) * (li[k] - lj[k]);
        d->kl_sum += kl;
        if (i < j) d->disagree_sum += lab[i] != lab[j];
      }
  }
  d->n += n;
  free(lp);
  free(lab);
}

double kdp_diversity_kl(const kdp_diversity *d) {
  if (d->P < 2 || !d->n) return 0.0;
  return d->kl_sum / ((double)d->n * (double)(d->P * (d->P - 1)));
}

double kdp_diversity_disagreement(const kdp_diversity *d) {
  if (d->P < 2 || !d->n) return 0.0;
  return d->disagree_sum / ((double)d->n * (double)(d->P * (d->P - 1) / 2));
}

void kdp_predicted_labels(int32_t *out, const float *z, size_t n, size_t C) {
  for (size_t b = 0; b < n; b++) out[b] = (int32_t)kdp_argmax(z + b * C, C);
}

double kdp_churn(const int32_t *prev, const int32_t *cur, size_t n) {
  if (!n) return 0.0;
  size_t changed = 0;
  for (size_t b = 0; b < n; b++) changed += prev[b] != cur[b];
  return (double)changed / (double)n;
}
