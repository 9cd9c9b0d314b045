/* live.c: the trainer's side of the rank-0 server: publishes metrics and status, applies control
   commands at step boundaries on every rank, and answers predictions with the live peers. */
#include <math.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kdpeers/kd.h"
#include "kdpeers/serve.h"
#include "kdpeers/train.h"
#include "train_internal.h"

/* step-time histogram buckets (seconds) */
static const double hist_le[] = {0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5};
#define N_BUCKETS (sizeof hist_le / sizeof hist_le[0])

struct kdp_live {
  kdp_server *srv;
  kdp_command pending; /* rank 0: a dequeued command waiting for the next agreement point */
  int has_pending;
  kdp_predict_req *req; /* rank 0: a prediction waiting for the next agreement point */
  uint64_t hist[N_BUCKETS + 1];
  double hist_sum;
  uint64_t hist_count;
  double peer_ce[KDP_MAX_PEERS], peer_kd[KDP_MAX_PEERS], peer_acc[KDP_MAX_PEERS];
  double last_publish;
  int64_t last_ckpt_step;
  double last_ckpt_wall;
  uint64_t commands, predictions, predict_inputs;
  double predict_seconds;
  /* rank 0, server.predict_share < 1: a token bucket of prediction seconds, refilled at
     predict_share seconds per second of wall time while training (not while paused) */
  double budget, budget_time;
  uint64_t predict_deferred; /* polls that left a waiting prediction for later (budget) */
  kdp_model *imodel; /* inference model for mid-step predictions (slice 0 ranks) */
  float *ix;         /* its normalised inputs, LIVE_CHUNK rows */
};

/* The most prediction time the budget saves up while no prediction waits (seconds of wall time
   at predict_share): a burst after a quiet spell is answered at once. */
#define LIVE_BUDGET_WINDOW 1.0

void kdp_train_server_options(const kdp_config *cfg, kdp_server_options *o,
                              kdp_server_strings *str) {
  kdp_server_options_defaults(o);
  snprintf(str->addr_file, sizeof str->addr_file, "%s/server.addr", cfg->dir);
  o->listen = cfg->server_listen;
  o->port = cfg->server_port;
  o->token = cfg->server_token[0] ? cfg->server_token : NULL;
  o->addr_file = str->addr_file;
  o->max_body = (size_t)cfg->server_max_body;
  o->max_body_total = (size_t)cfg->server_max_body_total;
  o->max_connections = cfg->server_max_connections;
  o->idle_timeout = cfg->server_idle_timeout;
  o->header_timeout = cfg->server_header_timeout;
  o->min_rate = cfg->server_min_rate > 0 ? (double)cfg->server_min_rate : -1;
  /* /control values within the ranges config validation accepts: temperature and kd_weight
     those of kd.temperature and kd.weight, lr_scale such that optim.lr x lr_scale stays within
     optim.lr's (and > 0: a scale of 0 is a pause, which has its own action) */
  static const char *const keys[KDP_NCONTROLS][2] = {
      {"optim", "lr"}, {"kd", "temperature"}, {"kd", "weight"}};
  for (int i = 0; i < KDP_NCONTROLS; i++) {
    kdp_range r;
    if (kdp_config_range(keys[i][0], keys[i][1], &r) != 0) continue; /* no such key: a bug */
    char rt[96];
    kdp_range_text(&r, rt, sizeof rt);
    if (i == KDP_CONTROL_LR_SCALE) {
      char lr[32];
      kdp_fmt_double(cfg->lr, lr, sizeof lr);
      snprintf(str->note[i], sizeof str->note[i],
               "optim.lr x lr_scale must stay within optim.lr's range %s; optim.lr = %s", rt, lr);
      if (!(cfg->lr > 0)) continue; /* any scale of a zero lr is zero */
      r.lo = (r.flags & KDP_RANGE_LO) ? r.lo / cfg->lr : 0;
      r.hi /= cfg->lr;
      if (!(r.lo > 0)) r.lo = 0, r.flags |= KDP_RANGE_LO | KDP_RANGE_LO_EXCL;
    } else {
      snprintf(str->note[i], sizeof str->note[i], "the range of %s.%s", keys[i][0], keys[i][1]);
    }
    o->control_range[i] = r;
    o->control_note[i] = str->note[i];
  }
}

int kdp_live_start(kdp_trainer *t, kdp_error *err) {
  kdp_live *lv = kdp_xcalloc(1, sizeof *lv);
  t->live = lv;
  lv->last_ckpt_step = -1;
  lv->budget = t->cfg->server_predict_share * LIVE_BUDGET_WINDOW;
  lv->budget_time = kdp_now();
  if (!t->is_root || !t->cfg->server_enabled) return 0;
  kdp_server_options o;
  kdp_server_strings str;
  kdp_train_server_options(t->cfg, &o, &str);
  o.input_dim = (int)(t->train.H * t->train.W * t->train.C);
  o.quiet = t->tty < 0;
  int rc = kdp_server_start(&lv->srv, &o, err);
  if (rc != 0) return rc;
  if (t->tty >= 0) fprintf(stderr, "kdpeers: serving on %s\n", kdp_server_address(lv->srv));
  return 0;
}

void kdp_live_stop(kdp_trainer *t) {
  kdp_live *lv = t->live;
  if (!lv) return;
  if (lv->req) kdp_server_fail_predict(lv->srv, lv->req, 503, "the run is ending");
  if (lv->srv) kdp_server_stop(lv->srv);
  kdp_model_free(lv->imodel);
  free(lv->ix);
  free(lv);
  t->live = NULL;
}

void kdp_live_step_time(kdp_trainer *t, double seconds) {
  kdp_live *lv = t->live;
  if (!lv) return;
  size_t b = 0;
  while (b < N_BUCKETS && seconds > hist_le[b]) b++;
  lv->hist[b]++;
  lv->hist_sum += seconds;
  lv->hist_count++;
}

void kdp_live_peer_losses(kdp_trainer *t, const double *ce, const double *kd, const double *acc) {
  kdp_live *lv = t->live;
  if (!lv) return;
  for (int p = 0; p < t->P && p < KDP_MAX_PEERS; p++) {
    lv->peer_ce[p] = ce[p];
    lv->peer_kd[p] = kd[p];
    lv->peer_acc[p] = acc[p];
  }
}

void kdp_live_checkpointed(kdp_trainer *t) {
  kdp_live *lv = t->live;
  if (!lv) return;
  lv->last_ckpt_step = t->step;
  lv->last_ckpt_wall = kdp_now();
}

/* ---- rendering (rank 0) ---- */

static void prom_header(FILE *f, const char *name, const char *type, const char *help) {
  fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void num(FILE *f, double v) {
  if (isfinite(v))
    fprintf(f, "%.9g\n", v);
  else
    fputs(isnan(v) ? "NaN\n" : v > 0 ? "+Inf\n" : "-Inf\n", f);
}

static char *render_metrics(kdp_trainer *t) {
  kdp_live *lv = t->live;
  kdp_dist *d = t->d;
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  if (!f) return NULL;
  double sps = t->train_time > 0 ? (double)(t->step - t->step0) * (double)t->Bg / t->train_time : 0;
  prom_header(f, "kdpeers_step", "gauge", "Optimizer steps taken.");
  fprintf(f, "kdpeers_step %lld\n", (long long)t->step);
  prom_header(f, "kdpeers_run_steps", "gauge", "Steps the run will take.");
  fprintf(f, "kdpeers_run_steps %lld\n", (long long)t->total_steps);
  prom_header(f, "kdpeers_epoch", "gauge", "Fractional epoch.");
  fprintf(f, "kdpeers_epoch ");
  num(f, t->steps_per_epoch ? (double)t->step / (double)t->steps_per_epoch : 0);
  prom_header(f, "kdpeers_peers", "gauge", "Peers (students) in the cohort.");
  fprintf(f, "kdpeers_peers %d\n", t->P);
  prom_header(f, "kdpeers_loss_ce", "gauge", "Cross-entropy loss of each peer, last log window.");
  for (int p = 0; p < t->P; p++) {
    fprintf(f, "kdpeers_loss_ce{peer=\"%d\"} ", p);
    num(f, lv->peer_ce[p]);
  }
  prom_header(f, "kdpeers_loss_kd", "gauge", "Weighted distillation loss of each peer, last log window.");
  for (int p = 0; p < t->P; p++) {
    fprintf(f, "kdpeers_loss_kd{peer=\"%d\"} ", p);
    num(f, lv->peer_kd[p]);
  }
  prom_header(f, "kdpeers_train_accuracy", "gauge", "Training accuracy of each peer, last log window.");
  for (int p = 0; p < t->P; p++) {
    fprintf(f, "kdpeers_train_accuracy{peer=\"%d\"} ", p);
    num(f, lv->peer_acc[p]);
  }
  const char *names[80];
  double accs[80], losses[80];
  int n = kdp_metrics_last_evals(names, accs, losses, 80);
  prom_header(f, "kdpeers_test_accuracy", "gauge",
              "Test accuracy at the last evaluation, per peer, ensemble and teacher.");
  for (int i = 0; i < n; i++) {
    fprintf(f, "kdpeers_test_accuracy{model=\"%s\"} ", names[i]);
    num(f, accs[i]);
  }
  prom_header(f, "kdpeers_test_loss", "gauge", "Test loss at the last evaluation.");
  for (int i = 0; i < n; i++) {
    fprintf(f, "kdpeers_test_loss{model=\"%s\"} ", names[i]);
    num(f, losses[i]);
  }
  prom_header(f, "kdpeers_step_duration_seconds", "histogram", "Wall time of a training step on rank 0.");
  uint64_t cum = 0;
  for (size_t b = 0; b < N_BUCKETS; b++) {
    cum += lv->hist[b];
    fprintf(f, "kdpeers_step_duration_seconds_bucket{le=\"%g\"} %llu\n", hist_le[b],
            (unsigned long long)cum);
  }
  cum += lv->hist[N_BUCKETS];
  fprintf(f, "kdpeers_step_duration_seconds_bucket{le=\"+Inf\"} %llu\n", (unsigned long long)cum);
  fprintf(f, "kdpeers_step_duration_seconds_sum %.9g\n", lv->hist_sum);
  fprintf(f, "kdpeers_step_duration_seconds_count %llu\n", (unsigned long long)lv->hist_count);
  prom_header(f, "kdpeers_exchange_seconds_total", "counter", "Seconds in cohort exchanges (rank 0).");
  fprintf(f, "kdpeers_exchange_seconds_total %.9g\n", d->t_exchange);
  prom_header(f, "kdpeers_allreduce_seconds_total", "counter",
              "Seconds in gradient allreduce inside a peer (rank 0).");
  fprintf(f, "kdpeers_allreduce_seconds_total %.9g\n", d->t_allreduce);
  prom_header(f, "kdpeers_wait_seconds_total", "counter",
              "Seconds waiting for the slowest rank at the step agreement point (rank 0).");
  fprintf(f, "kdpeers_wait_seconds_total %.9g\n", d->t_wait);
  prom_header(f, "kdpeers_exchanged_bytes_total", "counter", "Bytes sent by rank 0's exchanges.");
  fprintf(f, "kdpeers_exchanged_bytes_total %.0f\n", d->bytes_exchanged);
  prom_header(f, "kdpeers_samples_per_second", "gauge", "Training throughput of one peer.");
  fprintf(f, "kdpeers_samples_per_second ");
  num(f, sps);
  prom_header(f, "kdpeers_learning_rate_scale", "gauge", "lr multiplier set by /control or rollbacks.");
  fprintf(f, "kdpeers_learning_rate_scale %.9g\n", t->lr_scale);
  prom_header(f, "kdpeers_temperature", "gauge", "Distillation temperature in use.");
  fprintf(f, "kdpeers_temperature %.9g\n", t->temperature);
  prom_header(f, "kdpeers_kd_weight", "gauge", "Distillation weight in use.");
  fprintf(f, "kdpeers_kd_weight %.9g\n", t->kd_weight);
  prom_header(f, "kdpeers_paused", "gauge", "1 while training is paused.");
  fprintf(f, "kdpeers_paused %d\n", t->paused);
  prom_header(f, "kdpeers_checkpoint_step", "gauge", "Step of the last checkpoint written (-1: none).");
  fprintf(f, "kdpeers_checkpoint_step %lld\n", (long long)lv->last_ckpt_step);
  prom_header(f, "kdpeers_commands_total", "counter", "Control commands applied.");
  fprintf(f, "kdpeers_commands_total %llu\n", (unsigned long long)lv->commands);
  prom_header(f, "kdpeers_predictions_total", "counter", "Prediction requests answered.");
  fprintf(f, "kdpeers_predictions_total %llu\n", (unsigned long long)lv->predictions);
  prom_header(f, "kdpeers_predict_seconds_total", "counter",
              "Seconds the training loop spent answering predictions.");
  fprintf(f, "kdpeers_predict_seconds_total %.9g\n", lv->predict_seconds);
  prom_header(f, "kdpeers_predict_deferred_total", "counter",
              "Step agreement points that left a waiting prediction for later "
              "(server.predict_share spent).");
  fprintf(f, "kdpeers_predict_deferred_total %llu\n", (unsigned long long)lv->predict_deferred);
  fclose(f);
  return buf;
}

static void json_kv_str(FILE *f, const char *k, const char *v, int comma) {
  fprintf(f, "%s\"%s\":", comma ? "," : "", k);
  kdp_json_str(f, v);
}

static char *render_status(kdp_trainer *t) {
  kdp_live *lv = t->live;
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  if (!f) return NULL;
  const kdp_config *c = t->cfg;
  double done = (double)(t->step - t->step0);
  double eta = done > 0 ? t->train_time / done * (double)(t->total_steps - t->step) : -1;
  fputs("{\"config\":{", f);
  json_kv_str(f, "method", t->P > 1 ? c->method : "independent", 0);
  json_kv_str(f, "arch", c->arch, 1);
  fprintf(f, ",\"peers\":%d,\"ranks\":%d,\"ranks_per_peer\":%d,\"batch_size\":%d,\"lr\":%.9g,"
             "\"epochs\":%d,\"seed\":%llu",
          t->P, t->d->world_size, t->d->ranks_per_peer, c->batch_size, c->lr, c->epochs,
          (unsigned long long)c->seed);
  json_kv_str(f, "dir", c->dir, 1);
  fputs(",\"peer_ranks\":[", f);
  for (int p = 0; p < t->P && p < KDP_DIST_MAX_PEERS; p++)
    fprintf(f, "%s%d", p ? "," : "", t->d->peer_k[p]);
  fputs("]", f);
  fputs(",\"peer_arch\":[", f);
  for (int p = 0; p < t->P; p++) {
    if (p) fputc(',', f);
    kdp_json_str(f, kdp_config_peer_arch(c, p));
  }
  fputs("]},\"progress\":{", f);
  fprintf(f, "\"step\":%lld,\"total_steps\":%lld,\"epoch\":", (long long)t->step,
          (long long)t->total_steps);
  kdp_json_num(f, t->steps_per_epoch ? (double)t->step / (double)t->steps_per_epoch : 0);
  fputs(",\"eta_seconds\":", f);
  kdp_json_num(f, eta);
  fprintf(f, ",\"train_seconds\":%.3f,\"paused\":%s,\"lr_scale\":%.9g,\"temperature\":%.9g,"
             "\"kd_weight\":%.9g,\"metrics_lines_lost\":%llu},\"peers\":[",
          t->train_time, t->paused ? "true" : "false", t->lr_scale, t->temperature, t->kd_weight,
          (unsigned long long)kdp_metrics_lost(t));
  for (int p = 0; p < t->P; p++) {
    fprintf(f, "%s{\"peer\":%d,\"ce\":", p ? "," : "", p);
    kdp_json_num(f, lv->peer_ce[p]);
    fputs(",\"kd\":", f);
    kdp_json_num(f, lv->peer_kd[p]);
    fputs(",\"train_acc\":", f);
    kdp_json_num(f, lv->peer_acc[p]);
    fputc('}', f);
  }
  fputs("],\"eval\":{", f);
  const char *names[80];
  double accs[80], losses[80];
  int n = kdp_metrics_last_evals(names, accs, losses, 80);
  for (int i = 0; i < n; i++) {
    fprintf(f, "%s\"%s\":{\"acc\":", i ? "," : "", names[i]);
    kdp_json_num(f, accs[i]);
    fputs(",\"loss\":", f);
    kdp_json_num(f, losses[i]);
    fputc('}', f);
  }
  fprintf(f, "},\"checkpoint\":{\"last_step\":%lld,\"age_seconds\":", (long long)lv->last_ckpt_step);
  kdp_json_num(f, lv->last_ckpt_step >= 0 ? kdp_now() - lv->last_ckpt_wall : -1);
  fprintf(f, ",\"every_steps\":%lld,\"every_minutes\":%.9g,\"keep\":%d}}", (long long)c->ckpt_every_steps,
          c->ckpt_every_minutes, c->ckpt_keep);
  fclose(f);
  return buf;
}

void kdp_live_publish(kdp_trainer *t, int force) {
  kdp_live *lv = t->live;
  if (!lv || !lv->srv) return;
  double now = kdp_now();
  if (!force && now - lv->last_publish < 0.5) return;
  lv->last_publish = now;
  char *m = render_metrics(t), *s = render_status(t);
  if (m && s) kdp_server_publish(lv->srv, m, s);
  free(m);
  free(s);
}

void kdp_live_stalled(kdp_trainer *t, const char *reason) {
  kdp_live *lv = t->live;
  if (lv && lv->srv) kdp_server_set_health(lv->srv, reason);
}

/* ---- commands and predictions at the agreement point ---- */

/* 1 if some pixel value of req is not a whole number (they are all in [0, 255]) */
static int needs_floats(const kdp_predict_req *req) {
  size_t m = (size_t)req->n * (size_t)req->input_dim;
  for (size_t i = 0; i < m; i++)
    if (req->x[i] != (float)(uint8_t)req->x[i]) return 1;
  return 0;
}

/* Rank 0: 1 if the prediction budget lets training stop for a prediction now. While paused (or
   serving only) predictions are all there is to do: no budget. */
static int budget_allows(kdp_trainer *t) {
  kdp_live *lv = t->live;
  double share = t->cfg->server_predict_share;
  double now = kdp_now();
  lv->budget += (now - lv->budget_time) * share;
  lv->budget_time = now;
  if (lv->budget > share * LIVE_BUDGET_WINDOW) lv->budget = share * LIVE_BUDGET_WINDOW;
  return t->paused || share >= 1 || lv->budget > 0;
}

void kdp_live_poll_predict(kdp_trainer *t, int32_t pf[2]) {
  kdp_live *lv = t->live;
  pf[0] = pf[1] = 0;
  if (!lv || !lv->srv) return;
  if (!lv->req && !budget_allows(t)) {
    lv->predict_deferred += kdp_server_predict_waiting(lv->srv) > 0;
    return;
  }
  if (!lv->req) lv->req = kdp_server_take_predict(lv->srv);
  if (!lv->req) return;
  pf[0] = lv->req->n;
  pf[1] = needs_floats(lv->req);
}

void kdp_live_poll(kdp_trainer *t, int32_t *flags) {
  kdp_live *lv = t->live;
  if (!lv || !lv->srv) return;
  if (!lv->has_pending && kdp_server_poll_command(lv->srv, &lv->pending)) lv->has_pending = 1;
  flags[KDP_SYNC_CMD] = lv->has_pending;
  kdp_live_poll_predict(t, flags + KDP_SYNC_PREDICT);
}

/* Broadcasts rank 0's command and applies it on every rank. */
void kdp_live_command(kdp_trainer *t, int *want_ckpt, int *want_stop) {
  kdp_live *lv = t->live;
  kdp_command cmd;
  memset(&cmd, 0, sizeof cmd);
  if (t->is_root && lv->has_pending) cmd = lv->pending;
  kdp_dist_bcast(t->d, &cmd, sizeof cmd);
  lv->has_pending = 0;
  lv->commands++;
  const char *what = "set";
  switch (cmd.action) {
    case KDP_ACTION_CHECKPOINT:
      *want_ckpt = 1;
      what = "checkpoint";
      break;
    case KDP_ACTION_STOP:
      *want_ckpt = 1;
      *want_stop = 1;
      what = "stop";
      break;
    case KDP_ACTION_PAUSE:
      t->paused = 1;
      what = "pause";
      break;
    case KDP_ACTION_RESUME:
      t->paused = 0;
      what = "resume";
      break;
    default:
      break;
  }
  if (cmd.has_lr_scale) t->lr_scale = cmd.lr_scale;
  if (cmd.has_temperature) t->temperature = cmd.temperature;
  if (cmd.has_kd_weight) t->kd_weight = cmd.kd_weight;
  if (t->is_root) {
    kdp_metrics_control(t, cmd.id, what, cmd.has_lr_scale ? cmd.lr_scale : NAN,
                        cmd.has_temperature ? cmd.temperature : NAN,
                        cmd.has_kd_weight ? cmd.kd_weight : NAN);
    if (t->tty >= 0)
      fprintf(stderr, "%skdpeers: control #%llu at step %lld: %s (lr scale %g, T %g, kd weight %g)\n",
              t->tty ? "\r\033[K" : "", (unsigned long long)cmd.id, (long long)t->step, what,
              t->lr_scale, t->temperature, t->kd_weight);
  }
}

/* Inputs per forward pass of the inference model: bounds its activation memory (a fraction of
   t->model's, which is built for max(batch slice, 500) rows). */
#define LIVE_CHUNK 64
/* Longest rank 0 waits for the loop thread to send a reply (seconds). */
#define LIVE_DELIVER_WAIT 0.005

/* The inference model for predictions between a training forward pass and its backward pass
   (rank of slice 0 only): built on first use, then refreshed with t->model's weights and
   running statistics at every use. */
static kdp_model *inference_model(kdp_trainer *t) {
  kdp_live *lv = t->live;
  if (!lv->imodel) {
    kdp_input_shape ish = {t->train.H, t->train.W, t->train.C, t->C};
    kdp_error err;
    if (kdp_model_create(&lv->imodel, kdp_model_arch(t->model), ish, LIVE_CHUNK, &err) != 0) {
      /* t->model was built from the same architecture string: only a bug gets here */
      kdp_die("internal error building the inference model: %s", err.msg);
    }
    lv->ix = kdp_falloc((size_t)LIVE_CHUNK * t->train.H * t->train.W * t->train.C);
  }
  memcpy(kdp_model_params(lv->imodel), kdp_model_params(t->model),
         kdp_model_n_params(t->model) * sizeof(float));
  size_t nb = kdp_model_n_buffers(t->model); /* BN running statistics; none in an MLP */
  if (nb) memcpy(kdp_model_buffers(lv->imodel), kdp_model_buffers(t->model), nb * sizeof(float));
  return lv->imodel;
}

/* Every peer evaluates the broadcast inputs in eval mode; rank 0 answers with every peer's, the
   ensemble's and the teacher's probabilities. Collective over the world. */
double kdp_live_predict(kdp_trainer *t, int n, int float_inputs, int mid_step) {
  kdp_live *lv = t->live;
  kdp_dist *d = t->d;
  double t0 = kdp_now();
  size_t isz = t->train.H * t->train.W * t->train.C, C = t->C, P = (size_t)t->P;
  size_t nv = (size_t)n * isz;
  float *raw = kdp_falloc(nv);
  if (float_inputs) {
    if (t->is_root) memcpy(raw, lv->req->x, nv * sizeof(float));
    kdp_dist_bcast(d, raw, nv * sizeof(float));
  } else { /* whole numbers 0..255: a quarter of the bytes */
    uint8_t *px = kdp_xmalloc(nv);
    if (t->is_root)
      for (size_t i = 0; i < nv; i++) px[i] = (uint8_t)lv->req->x[i];
    kdp_dist_bcast(d, px, nv);
    for (size_t i = 0; i < nv; i++) raw[i] = (float)px[i];
    free(px);
  }
  float *all = kdp_falloc(P * (size_t)n * C), *ens = kdp_falloc((size_t)n * C);
  float *teacher = kdp_falloc((size_t)n * C), *mine = kdp_falloc((size_t)n * C);
  int has_teacher = 0;
  if (d->slice == 0) { /* the cohort that holds rank 0 does the work */
    /* between steps t->model and t->xbuf are free; mid-step they hold the step's activations */
    kdp_model *m = mid_step ? inference_model(t) : t->model;
    float *xb = mid_step ? lv->ix : t->xbuf;
    size_t chunk = mid_step ? LIVE_CHUNK : (size_t)n;
    has_teacher = t->teacher_logits != NULL;
    for (size_t first = 0; first < (size_t)n; first += chunk) {
      size_t b = (size_t)n - first < chunk ? (size_t)n - first : chunk;
      /* normalise like the batcher: (v/255 - mean[c]) / std[c] */
      const float *r = raw + first * isz;
      for (size_t i = 0; i < b * isz; i++) {
        size_t c = i % t->train.C;
        xb[i] = (r[i] / 255.0f - t->mean[c]) / t->std[c];
      }
      const float *z = kdp_model_forward(m, xb, b, 0, NULL);
      kdp_softmax_t(mine + first * C, z, b, C, 1.0f);
      if (t->teacher_logits &&
          t->teacher_logits(t, z, kdp_model_features(m), b, teacher + first * C) != 0)
        has_teacher = 0;
    }
    kdp_dist_cohort_allgather(d, mine, all, (size_t)n * C);
  }
  free(raw);
  if (t->is_root) {
    for (size_t k = 0; k < (size_t)n * C; k++) {
      double s = 0;
      for (size_t p = 0; p < P; p++) s += all[p * (size_t)n * C + k];
      ens[k] = (float)(s / (double)P);
    }
    if (has_teacher) kdp_softmax_t(teacher, teacher, (size_t)n, C, 1.0f);
    kdp_predict_result r = {.P = (int)P,
                            .C = (int)C,
                            .peers = all,
                            .ensemble = ens,
                            .teacher = has_teacher ? teacher : NULL,
                            .teacher_name = has_teacher ? t->teacher_name : NULL};
    kdp_server_answer_predict(lv->srv, lv->req, &r);
    lv->req = NULL;
    lv->predictions++;
    lv->predict_inputs += (uint64_t)n;
  }
  free(all);
  free(ens);
  free(teacher);
  free(mine);
  /* hand this core to the loop thread until the reply is on its socket: with every core busy
     training, the reply would otherwise wait for the scheduler to get round to the loop. Then
     yield once: the reply's reader, if it runs on this machine, may be queued behind this rank
     (fair scheduling gives the time back later) */
  if (t->is_root && kdp_server_wait_delivered(lv->srv, LIVE_DELIVER_WAIT)) sched_yield();
  double dt = kdp_now() - t0;
  lv->predict_seconds += dt;
  if (!t->paused) lv->budget -= dt; /* in debt past zero: the next waits until it is paid */
  return dt;
}
