/* boundary.c: the step boundary: the step's agreement point (divergence, signals, the
   checkpoint timer, control and prediction requests, agreed over the world), rollback, and what
   follows a step (commands, predictions, the pause loop, the checkpoint). */
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "train_internal.h"

static int all_finite(const float *v, size_t n) {
  float acc = 0.0f;
  for (size_t i = 0; i < n; i++) acc += v[i] * 0.0f; /* NaN or Inf make the sum NaN */
  return acc == 0.0f;
}

void kdp_loop_diverged(kdp_loop *L, int peer, int64_t step, const char *term, double v) {
  if (L->div.peer_plus1) return; /* keep the first */
  L->div.peer_plus1 = peer + 1;
  L->div.step = step;
  L->div.term = term;
  L->div.value = v;
}

/* KDP_FAULT_STOP_AT_STEP=N:R[:WHERE] (tests, docs/testing.md): the step at which rank R stops
   itself (SIGSTOP) at WHERE on this rank, or -1. WHERE: agree (the default: before the
   agreement point of loop step N), exchange (before the distillation exchange of loop step N),
   ckpt (halfway through writing its file of the checkpoint at step N: the temp file flushed,
   not renamed), eval (in the evaluation at step N, after its first batch's forward pass). */
int64_t kdp_fault_stop_step(const kdp_dist *d, int where) {
  static const char *const names[] = {"agree", "exchange", "ckpt", "eval"};
  const char *stop = getenv("KDP_FAULT_STOP_AT_STEP");
  long long at = -1;
  int rank = -1;
  char w[16] = "agree";
  if (!stop || sscanf(stop, "%lld:%d:%15s", &at, &rank, w) < 2 || rank != d->world_rank)
    return -1;
  return strcmp(w, names[where]) == 0 ? at : -1;
}

void kdp_fault_stop(const kdp_dist *d, int where, int64_t step) {
  if (step >= 0 && step == kdp_fault_stop_step(d, where)) raise(SIGSTOP);
}

/* Fault injection for the tests (docs/testing.md): rank 0 signals itself at step signal_at
   (KDP_FAULT_SIGNAL_AT_STEP=N) and makes a logit NaN at step nan_at (KDP_FAULT_NAN_AT_STEP=N);
   rank R stops itself (SIGSTOP) before the agreement point or the exchange of step stop_at
   (KDP_FAULT_STOP_AT_STEP=N:R[:exchange]). -1 = never. */
void kdp_loop_init(const kdp_trainer *t, kdp_loop *L) {
  memset(L, 0, sizeof *L);
  const char *sig = getenv("KDP_FAULT_SIGNAL_AT_STEP"), *nan = getenv("KDP_FAULT_NAN_AT_STEP");
  L->signal_at = sig && t->is_root ? atoll(sig) : -1;
  L->nan_at = nan && t->is_root ? atoll(nan) : -1;
  L->stop_at = kdp_fault_stop_step(t->d, KDP_FAULT_STOP_AGREE);
  L->stop_exchange_at = kdp_fault_stop_step(t->d, KDP_FAULT_STOP_EXCHANGE);
}

/* The divergence error on this rank (the rank of the diverged peer names the step and term),
   ending with what to do about it. */
static int divergence_error(const kdp_loop *L, kdp_dist *d, int peer, const char *advice,
                            kdp_error *err) {
  if (L->div.peer_plus1) {
    int contain = strcmp(L->div.term, "parameters") == 0 || strcmp(L->div.term, "logits") == 0;
    return kdp_fail(err, KDP_EDIVERGED, "divergence: peer %d, step %lld: the %s %s %g%s",
                    d->peer, (long long)L->div.step, L->div.term, contain ? "contain" : "is",
                    L->div.value, advice);
  }
  return kdp_fail(err, KDP_EDIVERGED,
                  "divergence in peer %d (its rank reports the step and term)%s", peer, advice);
}

/* Divergence with checkpoint.on_divergence = rollback: back to the newest checkpoint, lr scaled.
   The rollback count and the lr scale belong to this run, not to the checkpoint: they are kept
   across the restore (else every rollback would be the first, at the same scale). */
static int rollback(kdp_trainer *t, kdp_error *err) {
  int n = t->n_rollbacks;
  double scale = t->lr_scale;
  kdp_error e2;
  int r = kdp_train_restore_latest(t, NULL, &e2);
  if (r < 0) {
    *err = e2;
    return r;
  }
  if (r == 0) {
    kdp_error e3 = *err;
    return kdp_fail(err, KDP_EDIVERGED,
                    "%s. There is no checkpoint to roll back to yet: checkpoint earlier "
                    "(checkpoint.every_steps), or lower optim.lr or kd.weight",
                    e3.msg);
  }
  t->n_rollbacks = n + 1;
  t->lr_scale = scale * t->cfg->ckpt_rollback_lr_scale;
  if (t->is_root) {
    fprintf(stderr,
            "kdpeers: %s\nkdpeers: rolled back to step %lld with lr scale %g (rollback %d of "
            "%d)\n",
            err->msg, (long long)t->step, t->lr_scale, t->n_rollbacks,
            t->cfg->ckpt_max_rollbacks);
    kdp_metrics_event(t, "rollback", t->step, t->lr_scale);
  }
  return 0;
}

/* A divergence agreed at the step's agreement point (peer dpeer diverged; stop: a signal was
   agreed there too). Returns 0 after a rollback (t->step is the restored step), else the error
   the run stops with: the divergence, or KDP_ESTOPPED when a signal came first. */
static int on_divergence(kdp_trainer *t, const kdp_loop *L, int dpeer, int stop,
                         kdp_error *err) {
  const kdp_config *cfg = t->cfg;
  if (cfg->on_divergence_id != KDP_ON_DIVERGENCE_ROLLBACK)
    return divergence_error(L, t->d, dpeer,
                            ". Lower optim.lr or kd.weight, or set checkpoint.on_divergence = "
                            "rollback",
                            err);
  if (stop) {
    divergence_error(L, t->d, dpeer, "", err);
    if (t->is_root)
      fprintf(stderr,
              "kdpeers: %s\nkdpeers: stopping on the signal without rolling back (rollback %d "
              "of %d so far): rerunning resumes from the newest checkpoint\n",
              err->msg, t->n_rollbacks, cfg->ckpt_max_rollbacks);
    return kdp_fail(err, KDP_ESTOPPED, "stopped on a signal after a divergence");
  }
  if (t->n_rollbacks >= cfg->ckpt_max_rollbacks) {
    char advice[256];
    snprintf(advice, sizeof advice,
             ", after %d rollback%s (checkpoint.max_rollbacks = %d, lr scale %g). Lower "
             "optim.lr or kd.weight, or raise checkpoint.max_rollbacks",
             t->n_rollbacks, t->n_rollbacks == 1 ? "" : "s", cfg->ckpt_max_rollbacks,
             t->lr_scale);
    return divergence_error(L, t->d, dpeer, advice, err);
  }
  divergence_error(L, t->d, dpeer, "", err);
  return rollback(t, err);
}

int kdp_boundary_agree(kdp_trainer *t, kdp_loop *L, int64_t step, const float *z, size_t n,
                       kdp_step_result *r, kdp_error *err) {
  const kdp_config *cfg = t->cfg;
  kdp_dist *d = t->d;
  if (step == L->nan_at && n) {
    ((float *)z)[0] = NAN; /* fault injection for the tests, once per process */
    L->nan_at = -1;
  }
  if (step == L->stop_at) {
    L->stop_at = -1;
    raise(SIGSTOP); /* a stalled rank, until someone sends SIGCONT */
  }
  /* divergence now; a prediction is answered here; stop, checkpoint and control requests take
     effect at the end of this step, on every rank */
  int32_t *flags = r->flags;
  memset(r->flags, 0, sizeof r->flags);
  if (L->div.peer_plus1) flags[KDP_SYNC_DIVERGED] = L->div.peer_plus1;
  if (!all_finite(z, n * t->C)) {
    kdp_loop_diverged(L, d->peer, step, "logits", NAN);
    flags[KDP_SYNC_DIVERGED] = d->peer + 1;
  }
  if ((step + 1) % cfg->log_every == 0 &&
      !all_finite(kdp_model_params(t->model), kdp_model_n_params(t->model))) {
    kdp_loop_diverged(L, d->peer, step, "parameters", NAN);
    flags[KDP_SYNC_DIVERGED] = d->peer + 1;
  }
  flags[KDP_SYNC_STOP] = kdp_train_signal_count() > 0;
  if (t->is_root && cfg->ckpt_every_minutes > 0 &&
      kdp_now() - t->last_ckpt_time >= 60.0 * cfg->ckpt_every_minutes)
    flags[KDP_SYNC_CKPT] = 1;
  if (t->is_root) kdp_live_poll(t, flags);
  double ts0 = kdp_now();
  kdp_dist_step_sync(d, flags, KDP_SYNC_N);
  kdp_trace_mark(t, "wait", ts0, kdp_now());
  if (flags[KDP_SYNC_DIVERGED]) {
    int rc = on_divergence(t, L, flags[KDP_SYNC_DIVERGED] - 1, flags[KDP_SYNC_STOP], err);
    if (rc != 0) return rc;
    memset(&L->div, 0, sizeof L->div);
    return 1;
  }
  if (flags[KDP_SYNC_PREDICT]) {
    /* a prediction is answered as soon as it is agreed, by the weights this step's forward
       pass used (an inference copy: the step's activations stay for its backward pass); the
       time is left out of the step's training time */
    double tp0 = kdp_now();
    r->t0 += kdp_live_predict(t, flags[KDP_SYNC_PREDICT], flags[KDP_SYNC_PREDICT_FLOAT], 1);
    kdp_trace_mark(t, "predict", tp0, kdp_now());
  }
  return 0;
}

int kdp_boundary_pause(kdp_trainer *t, int *want, int *want_stop, kdp_error *err) {
  kdp_dist *d = t->d;
  int rc = 0;
  while (t->paused && !*want_stop) {
    /* paused: keep answering commands and predictions, and honour signals */
    usleep(20000);
    int32_t pf[KDP_SYNC_N] = {0};
    pf[KDP_SYNC_STOP] = kdp_train_signal_count() > 0;
    if (t->is_root) kdp_live_poll(t, pf);
    kdp_dist_step_sync(d, pf, KDP_SYNC_N);
    if (pf[KDP_SYNC_CMD]) kdp_live_command(t, want, want_stop);
    if (pf[KDP_SYNC_PREDICT])
      kdp_live_predict(t, pf[KDP_SYNC_PREDICT], pf[KDP_SYNC_PREDICT_FLOAT], 0);
    if (pf[KDP_SYNC_STOP]) *want = *want_stop = 1;
    if (*want && !*want_stop) {
      /* a checkpoint asked for while paused is written now */
      rc = kdp_train_save(t, err);
      if (rc != 0) break;
      t->last_ckpt_time = kdp_now();
      kdp_live_checkpointed(t);
      *want = 0;
    }
    if (t->is_root) kdp_live_publish(t, 1);
  }
  return rc;
}

int kdp_boundary_end(kdp_trainer *t, kdp_loop *L, int64_t step, const kdp_step_result *r,
                     int *stop, kdp_error *err) {
  const kdp_config *cfg = t->cfg;
  kdp_dist *d = t->d;
  const int32_t *flags = r->flags;
  int last = step + 1 == t->total_steps;
  int want = flags[KDP_SYNC_CKPT] || flags[KDP_SYNC_STOP] || last ||
             (cfg->ckpt_every_steps > 0 && (step + 1) % cfg->ckpt_every_steps == 0);
  /* control commands, at the step boundary, on every rank */
  int want_stop = flags[KDP_SYNC_STOP];
  if (flags[KDP_SYNC_CMD]) kdp_live_command(t, &want, &want_stop);
  /* While a client keeps sending predictions (one was answered in this step or at the last
     boundary), a prediction-only agreement point here as well: its next request, sent once
     the last reply arrived, need not wait for the next step's agreement point. Steps without
     predictions around skip it, so they cost what they did. */
  if (flags[KDP_SYNC_PREDICT] || L->predicting) {
    int32_t pf[2] = {0, 0};
    if (t->is_root) kdp_live_poll_predict(t, pf);
    kdp_dist_step_sync(d, pf, 2);
    if (pf[0]) {
      double tp0 = kdp_now();
      kdp_live_predict(t, pf[0], pf[1], 0);
      kdp_trace_mark(t, "predict", tp0, kdp_now());
    }
    L->predicting = pf[0] > 0;
  }
  int rc = kdp_boundary_pause(t, &want, &want_stop, err);
  if (rc != 0) return rc;
  if (t->is_root) kdp_live_publish(t, last);
  /* never checkpoint a diverged state: the next step's agreement point reports it */
  float *params = kdp_model_params(t->model);
  if (want &&
      !kdp_dist_all_ok(d, !L->div.peer_plus1 && all_finite(params, kdp_model_n_params(t->model))))
    want = 0;
  if (want) {
    double tk0 = kdp_now();
    rc = kdp_train_save(t, err);
    kdp_trace_mark(t, "checkpoint", tk0, kdp_now());
    if (rc != 0) return rc;
    t->last_ckpt_time = kdp_now();
    kdp_live_checkpointed(t);
  }
  *stop = want_stop;
  return 0;
}
