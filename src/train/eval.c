/* eval.c: every peer, the ensemble (mean of the peers' probabilities) and the method's teacher
   on the test set, in eval batches of the whole cohort (the pipeline's evaluation: each rank
   scores its peer on its own rows, and the ensemble and the teacher on its block of rows). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/kd.h"
#include "train_internal.h"

#define EVAL_BATCH KDP_TRAIN_EVAL_BATCH

/* One pass over a dataset in eval batches of the whole cohort, added to s; with run.ema_decay,
   this rank's EMA copy on its own rows is added to ema[0] (loss sum) and ema[1] (hits). A failure
   on one rank stops the pass on every rank after that batch, with its message (the others would
   otherwise wait for it in the next batch's gathers). The test set's pass (test = 1) carries the
   test hooks: KDP_FAULT_STOP_AT_STEP=step:R:eval stops rank R after the first batch's forward (a
   rank lost in the middle of an evaluation), KDP_TEST_EVAL_FAIL=R fails world rank R's first
   evaluation (its teacher's). */
static int eval_pass(kdp_trainer *t, const kdp_dataset *ds, kdp_eval_sums *s, double ema[2],
                     int64_t step, int test, kdp_error *err) {
  kdp_dist *d = t->d;
  const size_t n = ds->n;
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
    if (first == 0 && test) kdp_fault_stop(d, KDP_FAULT_STOP_EVAL, step);
    s->first = first;
    rc = kdp_pipeline_eval(t->pipe, B, t->ybuf, z, kdp_model_features(t->model), s, err);
    if (rc == 0 && test && inject)
      rc = kdp_fail(err, KDP_EIO, "the %s's evaluation failed (injected by KDP_TEST_EVAL_FAIL)",
                    t->teacher_name ? t->teacher_name : "ensemble");
    if (rc != 0) {
      char cause[KDP_ERRLEN];
      snprintf(cause, sizeof cause, "%s", err->msg);
      kdp_fail(err, rc, "peer %d, step %lld: evaluation failed: %s", d->peer, (long long)step,
               cause);
    }
    rc = kdp_dist_first_error(d, rc, err);
    if (t->ema && hi > lo) {
      size_t hits = 0;
      const float *ze = kdp_model_forward(t->ema, t->xbuf, hi - lo, 0, NULL);
      ema[0] += kdp_ce_loss(ze, t->ybuf + lo, hi - lo, t->C, NULL, 0, &hits) * (double)(hi - lo);
      ema[1] += (double)hits;
    }
  }
  return rc;
}

/* 1 when the cohort is kdcl with kd.ensemble = general (its weights come from the validation
   split at every evaluation) */
static int kdcl_general(const kdp_trainer *t) {
  const kdp_kd_spec *sp = t->P > 1 ? kdp_cohort_spec(t->cohort) : NULL;
  return sp && sp->method == KDP_METHOD_KDCL && sp->ensemble == KDP_KDCL_GENERAL;
}

/* The validation split (data.val_size): every peer, the ensemble and the teacher, summed over
   the world into out (4P + 4: loss and hits of each peer, the ensemble's, the teacher's, then of
   each peer's EMA copy when run.ema_decay keeps them). kdcl
   general: the peers' validation logits (P x N x C, each row written by one rank, so the sum is
   exact) then give every rank the same new ensemble weights. */
static int eval_val(kdp_trainer *t, double *out, kdp_error *err) {
  const size_t P = (size_t)t->P, N = t->val.n, C = t->C;
  kdp_eval_sums s;
  memset(&s, 0, sizeof s);
  kdp_diversity_init(&s.div, P);
  const int general = kdcl_general(t);
  if (general) {
    s.logits = kdp_xcalloc(P * N * C, sizeof(float));
    s.logits_stride = N;
  }
  double ema[2] = {0, 0};
  int rc = eval_pass(t, &t->val, &s, ema, t->step, 0, err);
  memset(out, 0, (4 * P + 4) * sizeof(double));
  out[2 * (size_t)t->d->peer] = s.peer_loss;
  out[2 * (size_t)t->d->peer + 1] = s.peer_hits;
  double rest[4] = {s.ens_loss, s.ens_hits, s.teacher_loss, s.teacher_hits};
  memcpy(out + 2 * P, rest, sizeof rest);
  out[2 * P + 4 + 2 * (size_t)t->d->peer] = ema[0];
  out[2 * P + 4 + 2 * (size_t)t->d->peer + 1] = ema[1];
  kdp_dist_group_sum_f64(t->d, KDP_GROUP_WORLD, out, 4 * P + 4);
  if (general && rc == 0) {
    kdp_dist_world_allreduce(t->d, s.logits, P * N * C);
    int32_t *y = kdp_xmalloc(N * sizeof(int32_t));
    for (size_t i = 0; i < N; i++) y[i] = (int32_t)t->val.labels[i];
    float w[KDP_KD_MAX_PEERS];
    rc = kdp_kdcl_general_weights(w, s.logits, y, P, N, C, err);
    if (rc == 0) rc = kdp_kdcl_set_weights(t->cohort, w, err);
    if (rc == 0 && t->is_root) { /* {"event":"kdcl_weights","step":S,"weights":[...]} */
      char line[64 + 24 * KDP_KD_MAX_PEERS];
      int k = snprintf(line, sizeof line, "{\"event\":\"kdcl_weights\",\"step\":%lld,\"weights\":[",
                       (long long)t->step);
      for (size_t j = 0; j < P; j++)
        k += snprintf(line + k, sizeof line - (size_t)k, "%s%.9g", j ? "," : "", (double)w[j]);
      snprintf(line + k, sizeof line - (size_t)k, "]}\n");
      kdp_metrics_line(t, line);
    }
    free(y);
  }
  free(s.logits);
  return rc;
}

int kdp_train_evaluate(kdp_trainer *t, int64_t step, double epoch, kdp_error *err) {
  const kdp_dataset *ds = &t->test;
  kdp_dist *d = t->d;
  const size_t n = ds->n, P = (size_t)t->P, nval = t->val.n;
  /* the validation split first: kdcl general's weights then serve the test pass */
  double *vv = kdp_xcalloc(4 * P + 4, sizeof(double));
  int rc = nval ? eval_val(t, vv, err) : 0;
  if (rc != 0) {
    free(vv);
    return rc;
  }
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
  double ema_sums[2] = {0, 0}; /* run.ema_decay: this rank's EMA copy on its own rows */
  rc = eval_pass(t, ds, &s, ema_sums, step, 1, err);
  if (rc != 0) {
    free(vv);
    return rc;
  }
  /* summed over the world: [2p], [2p + 1] loss and hits of peer p (its ranks' rows), then the
     ensemble's and the teacher's (every rank's block), the diversity sums (every rank's block)
     and each peer's changed labels since the last evaluation (every rank's block) */
  const size_t nv = 2 * P + 7 + P + 2 * P, ve = 3 * P + 7; /* v[ve + 2p]: peer p's EMA */
  double *v = kdp_xcalloc(nv, sizeof(double));
  v[2 * (size_t)d->peer] = s.peer_loss;
  v[2 * (size_t)d->peer + 1] = s.peer_hits;
  v[ve + 2 * (size_t)d->peer] = ema_sums[0];
  v[ve + 2 * (size_t)d->peer + 1] = ema_sums[1];
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
    /* validation accuracy and loss of entry k (peer p: k = p; ensemble P; teacher P + 1), NaN
       without a validation split */
#define VAL(k) (nval ? vv[2 * (k) + 1] / (double)nval : NAN), (nval ? vv[2 * (k)] / (double)nval : NAN)
    for (size_t p = 0; p < P; p++) {
      snprintf(name, sizeof name, "peer%zu", p);
      kdp_metrics_eval_val(t, step, epoch, name, v[2 * p + 1] / (double)n, v[2 * p] / (double)n,
                           VAL(p));
      if (t->ema) {
        snprintf(name, sizeof name, "peer%zu.ema", p);
        kdp_metrics_eval_val(t, step, epoch, name, v[ve + 2 * p + 1] / (double)n,
                             v[ve + 2 * p] / (double)n, VAL(P + 2 + p));
      }
    }
    /* a cohort with a teacher peer (switokd's, or a frozen one): the students' mean */
    double sacc = 0, sloss = 0;
    size_t ns = 0;
    for (size_t p = 0; p < P; p++)
      if (!kdp_distill_is_teacher(t, (int)p)) {
        sacc += v[2 * p + 1] / (double)n;
        sloss += v[2 * p] / (double)n;
        ns++;
      }
    if (ns > 0 && ns < P)
      kdp_metrics_eval(t, step, epoch, "students", sacc / (double)ns, sloss / (double)ns);
    if (P > 1)
      kdp_metrics_eval_val(t, step, epoch, "ensemble", v[2 * P + 1] / (double)n,
                           v[2 * P] / (double)n, VAL(P));
    if (t->teacher_name)
      kdp_metrics_eval_val(t, step, epoch, t->teacher_name, v[2 * P + 3] / (double)n,
                           v[2 * P + 2] / (double)n, VAL(P + 1));
#undef VAL
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
  free(vv);
  return 0;
}
