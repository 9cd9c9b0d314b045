/* eval.c: every peer, the ensemble (mean of the peers' probabilities) and the method's teacher
   on the test set, in eval batches of the whole cohort (the pipeline's evaluation: each rank
   scores its peer on its own rows, and the ensemble and the teacher on its block of rows). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "train_internal.h"

#define EVAL_BATCH KDP_TRAIN_EVAL_BATCH

int kdp_train_evaluate(kdp_trainer *t, int64_t step, double epoch, kdp_error *err) {
  const kdp_dataset *ds = &t->test;
  kdp_dist *d = t->d;
  const size_t n = ds->n, P = (size_t)t->P;
  kdp_eval_sums s;
  memset(&s, 0, sizeof s);
  kdp_diversity_init(&s.div, P);
  if (P > 1) {
    if (!t->div_cur) {
      t->div_cur = kdp_xmalloc(P * n * sizeof(int32_t));
      if (!t->div_labels) t->div_labels = kdp_xmalloc(P * n * sizeof(int32_t));
    }
    s.labels = t->div_cur;
    s.labels_stride = n;
  }
  /* tests: KDP_TEST_EVAL_FAIL=R fails world rank R's first evaluation (its teacher's) */
  const char *fail = getenv("KDP_TEST_EVAL_FAIL");
  const int inject = fail && *fail && atoi(fail) == d->world_rank;
  int rc = 0;
  for (size_t first = 0; first < n && rc == 0; first += EVAL_BATCH) {
    size_t B = n - first < EVAL_BATCH ? n - first : EVAL_BATCH, lo, hi;
    kdp_dist_rows(d, KDP_GROUP_WORLD, KDP_ROWS_OWN, B, &lo, &hi);
    /* this rank's rows, and the labels of the whole eval batch */
    kdp_dataset_get(ds, first + lo, hi - lo, t->mean, t->std, t->xbuf, t->ybuf + lo);
    for (size_t i = 0; i < B; i++)
      if (i < lo || i >= hi) t->ybuf[i] = (int32_t)ds->labels[first + i];
    const float *z = hi > lo ? kdp_model_forward(t->model, t->xbuf, hi - lo, 0, NULL) : NULL;
    rc = kdp_pipeline_eval(t->pipe, B, t->ybuf, z, kdp_model_features(t->model), &s, err);
    if (rc == 0 && inject)
      rc = kdp_fail(err, KDP_EIO, "the %s's evaluation failed (injected by KDP_TEST_EVAL_FAIL)",
                    t->teacher_name ? t->teacher_name : "ensemble");
    if (rc != 0) {
      char cause[KDP_ERRLEN];
      snprintf(cause, sizeof cause, "%s", err->msg);
      kdp_fail(err, rc, "peer %d, step %lld: evaluation failed: %s", d->peer, (long long)step,
               cause);
    }
    /* a failure on one rank stops the evaluation of every rank here, with its message: the
       others would wait for it in the next batch's gathers */
    rc = kdp_dist_first_error(d, rc, err);
  }
  if (rc != 0) return rc;
  /* summed over the world: [2p], [2p + 1] loss and hits of peer p (its ranks' rows), then the
     ensemble's and the teacher's (every rank's block), the diversity sums (every rank's block)
     and each peer's changed labels since the last evaluation (every rank's block) */
  const size_t nv = 2 * P + 7 + P;
  double *v = kdp_xcalloc(nv, sizeof(double));
  v[2 * (size_t)d->peer] = s.peer_loss;
  v[2 * (size_t)d->peer + 1] = s.peer_hits;
  double rest[7] = {s.ens_loss, s.ens_hits, s.teacher_loss, s.teacher_hits,
                    s.div.kl_sum, s.div.disagree_sum, (double)s.div.n};
  memcpy(v + 2 * P, rest, sizeof rest);
  /* churn needs the previous labels of the same rows: every rank had them or none did */
  const int had = P > 1 && t->div_step >= 0 && t->div_rows == s.labels_n;
  if (had)
    for (size_t j = 0; j < P; j++)
      v[2 * P + 7 + j] = (double)llround(kdp_churn(t->div_labels + j * n, t->div_cur + j * n,
                                                   s.labels_n) * (double)s.labels_n);
  if (P > 1) { /* the current labels become the previous ones */
    int32_t *tmp = t->div_labels;
    t->div_labels = t->div_cur;
    t->div_cur = tmp;
    t->div_rows = s.labels_n;
    t->div_step = step;
  }
  kdp_dist_group_sum_f64(d, KDP_GROUP_WORLD, v, nv);
  if (t->is_root) {
    char name[32];
    for (size_t p = 0; p < P; p++) {
      snprintf(name, sizeof name, "peer%zu", p);
      kdp_metrics_eval(t, step, epoch, name, v[2 * p + 1] / (double)n, v[2 * p] / (double)n);
    }
    if (P > 1)
      kdp_metrics_eval(t, step, epoch, "ensemble", v[2 * P + 1] / (double)n, v[2 * P] / (double)n);
    if (t->teacher_name)
      kdp_metrics_eval(t, step, epoch, t->teacher_name, v[2 * P + 3] / (double)n,
                       v[2 * P + 2] / (double)n);
    if (P > 1) {
      kdp_diversity all = {.P = P, .n = (size_t)v[2 * P + 6], .kl_sum = v[2 * P + 4],
                           .disagree_sum = v[2 * P + 5]};
      double *churn = v + 2 * P + 7;
      for (size_t j = 0; j < P; j++) churn[j] /= (double)n;
      kdp_metrics_diversity(t, step, epoch, kdp_diversity_kl(&all),
                            kdp_diversity_disagreement(&all), had ? churn : NULL, (int)P);
    }
  }
  free(v);
  return 0;
}
