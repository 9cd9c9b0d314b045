/* live.c: the trainer's side of the rank-0 server: publishes metrics and status, feeds the
   dashboard's history, writes the Prometheus file-discovery target, applies control commands at
   step boundaries on every rank, and answers predictions with the live peers. */
#include <cblas.h>
#include <ctype.h>
#include <errno.h>
#include <json-c/json.h>
#include <limits.h>
#include <math.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kdpeers/ckpt.h"
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
  double peer_contrast[KDP_MAX_PEERS]; /* mcl */
  double last_publish;
  int64_t last_ckpt_step;
  double last_ckpt_unix; /* Unix time of the last checkpoint (0: none) */
  double lr;             /* the learning rate of the last logged step (NaN: none yet) */
  /* the dashboard's per-window figures: rank 0's counters at the last log line (the
     communication ones re-based after an evaluation and at resume, whose collectives are not
     training steps) */
  int64_t win_step;
  double win_train, win_ex, win_ar, win_wait;
  char sd_file[2][KDP_PATH + 96]; /* run.dir/prometheus.json and server.sd_dir's (or "") */
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

static double unix_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void rebase_comm(kdp_live *lv, const kdp_dist *d) {
  lv->win_ex = d->t_exchange;
  lv->win_ar = d->t_allreduce;
  lv->win_wait = d->t_wait;
}

/* The charts of the dashboard, in the order the page shows them (see kdp_server_history_chart;
   a series of an undeclared chart id gets a chart of its own after these). */
static void declare_charts(kdp_trainer *t) {
  static const struct {
    const char *id, *title, *unit;
    int stacked;
  } charts[] = {
      {"test_accuracy", "Test accuracy (peers, ensemble, teacher)", "ratio", 0},
      {"train_loss", "Training loss (cross-entropy, per peer)", "", 0},
      {"kd_loss", "Distillation loss (weighted, per peer)", "", 0},
      {"test_loss", "Test loss", "", 0},
      {"train_accuracy", "Training accuracy (per peer)", "ratio", 0},
      {"learning_rate", "Learning rate", "", 0},
      {"throughput", "Training steps per second", "steps/s", 0},
      {"time_split", "Where rank 0's step time goes", "share", 1},
      {"diversity", "Diversity of the cohort (mean pairwise KL, disagreement, churn per peer)", "",
       0},
  };
  for (size_t i = 0; i < sizeof charts / sizeof charts[0]; i++)
    if (t->P > 1 || strcmp(charts[i].id, "diversity") != 0) /* a lone peer has no diversity */
      kdp_server_history_chart(t->live->srv, charts[i].id, charts[i].title, charts[i].unit,
                               charts[i].stacked);
}

/* Writes the file_sd target list (one target, the run's labels) to path, atomically; 0 or -1. */
static int write_target_file(const char *path, const char *target, const kdp_trainer *t) {
  char tmp[KDP_PATH + 104];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  FILE *f = fopen(tmp, "w");
  int ok = f != NULL;
  if (f) {
    fputs("[{\"targets\":[", f);
    kdp_json_str(f, target);
    fputs("],\"labels\":{\"run_dir\":", f);
    kdp_json_str(f, t->cfg->dir);
    fputs(",\"method\":", f);
    kdp_json_str(f, t->P > 1 ? t->cfg->method : "independent");
    fputs("}}]\n", f);
    ok = fclose(f) == 0 && ok;
  }
  if (!ok || rename(tmp, path) != 0) {
    fprintf(stderr, "kdpeers: warning: cannot write the Prometheus target %s: %s\n", path,
            strerror(errno));
    remove(tmp);
    return -1;
  }
  return 0;
}

/* run.dir/prometheus.json: a Prometheus file_sd target for this server, written next to
   server.addr and removed with it; with server.sd_dir also DIR/kdpeers-NAME-HASH.json (Prometheus
   globs only a file name, never a directory: a shared directory of targets is what a scrape
   config can name once for every run) */
static void write_sd_files(kdp_trainer *t) {
  kdp_live *lv = t->live;
  const char *addr = kdp_server_address(lv->srv);
  const char *hp = strstr(addr, "://");
  char host[256];
  snprintf(host, sizeof host, "%s", hp ? hp + 3 : addr);
  char *colon = strrchr(host, ':');
  if (!colon) return;
  *colon = 0;
  /* a wildcard address is no place to scrape: name this node instead */
  if (strcmp(host, "0.0.0.0") == 0 || strcmp(host, "[::]") == 0) {
    if (gethostname(host, sizeof host - 1) != 0) snprintf(host, sizeof host, "localhost");
    host[sizeof host - 1] = 0;
  }
  char target[300];
  snprintf(target, sizeof target, "%s:%d", host, kdp_server_port(lv->srv));
  snprintf(lv->sd_file[0], sizeof lv->sd_file[0], "%s/prometheus.json", t->cfg->dir);
  if (write_target_file(lv->sd_file[0], target, t) != 0) lv->sd_file[0][0] = 0;
  if (!t->cfg->server_sd_dir[0]) return;
  /* a name per run: its directory's last component, and a hash of its absolute path */
  char abs[PATH_MAX], name[64];
  if (!realpath(t->cfg->dir, abs)) snprintf(abs, sizeof abs, "%s", t->cfg->dir);
  uint32_t h = 2166136261u; /* FNV-1a */
  for (const char *p = abs; *p; p++) h = (h ^ (unsigned char)*p) * 16777619u;
  const char *base = strrchr(abs, '/');
  base = base && base[1] ? base + 1 : abs;
  size_t n = 0;
  for (; *base && n < 40; base++)
    name[n++] = isalnum((unsigned char)*base) || *base == '-' || *base == '.' ? *base : '_';
  name[n] = 0;
  snprintf(lv->sd_file[1], sizeof lv->sd_file[1], "%s/kdpeers-%s-%08x.json",
           t->cfg->server_sd_dir, name, h);
  if (write_target_file(lv->sd_file[1], target, t) != 0) lv->sd_file[1][0] = 0;
}

/* A resumed run (or kdpeers serve) starts its history with what metrics.jsonl holds up to the
   checkpoint: every evaluation (test and validation accuracy, diversity), switokd's expert
   fraction per epoch, the logged learning rate and the events; the per-peer training curves
   (only rank 0's peer is in the file) start at the resume. The last evaluation and diversity
   also become /metrics' and /status' "last evaluation" until the run makes its next one. */
static void seed_history(kdp_trainer *t) {
  kdp_live *lv = t->live;
  char path[KDP_PATH + 32];
  snprintf(path, sizeof path, "%s/metrics.jsonl", t->cfg->dir);
  FILE *f = fopen(path, "r");
  if (!f) return;
  char *ln = NULL;
  size_t cap = 0;
  while (getline(&ln, &cap, f) > 0) {
    json_object *o = json_tokener_parse(ln), *ev, *v;
    if (!o || !json_object_object_get_ex(o, "event", &ev) ||
        !json_object_object_get_ex(o, "step", &v)) {
      json_object_put(o);
      continue;
    }
    const char *kind = json_object_get_string(ev);
    double x = json_object_get_double(v);
    json_object *a, *b;
    if (strcmp(kind, "eval") == 0 && json_object_object_get_ex(o, "model", &v) &&
        json_object_object_get_ex(o, "acc", &a) && json_object_object_get_ex(o, "loss", &b)) {
      kdp_server_history_add(lv->srv, "test_accuracy", json_object_get_string(v), x,
                             json_object_get_double(a));
      kdp_server_history_add(lv->srv, "test_loss", json_object_get_string(v), x,
                             json_object_get_double(b));
      double val_acc = NAN, val_loss = NAN;
      json_object *c;
      if (json_object_object_get_ex(o, "val_acc", &c) && !json_object_is_type(c, json_type_null)) {
        val_acc = json_object_get_double(c);
        kdp_server_history_add(lv->srv, "val_accuracy", json_object_get_string(v), x, val_acc);
        if (json_object_object_get_ex(o, "val_loss", &c) && !json_object_is_type(c, json_type_null))
          val_loss = json_object_get_double(c);
      }
      kdp_metrics_set_last_eval(json_object_get_string(v), json_object_get_double(a),
                                json_object_get_double(b), val_acc, val_loss);
    } else if (strcmp(kind, "switokd") == 0 &&
               json_object_object_get_ex(o, "expert_fraction", &a)) {
      kdp_server_history_add(lv->srv, "switokd", "expert_fraction", x, json_object_get_double(a));
      if (json_object_object_get_ex(o, "epoch", &b))
        kdp_metrics_set_last_switokd(json_object_get_double(a), json_object_get_double(b));
    } else if (strcmp(kind, "diversity") == 0 && json_object_object_get_ex(o, "kl", &a) &&
               json_object_object_get_ex(o, "disagreement", &b)) {
      kdp_server_history_add(lv->srv, "diversity", "kl", x, json_object_get_double(a));
      kdp_server_history_add(lv->srv, "diversity", "disagreement", x, json_object_get_double(b));
      double churn[KDP_MAX_PEERS];
      int nch = 0;
      json_object *c;
      if (json_object_object_get_ex(o, "churn", &c) && json_object_is_type(c, json_type_array))
        for (size_t p = 0; p < json_object_array_length(c) && nch < KDP_MAX_PEERS; p++) {
          char name[32];
          snprintf(name, sizeof name, "churn.peer%zu", p);
          churn[nch] = json_object_get_double(json_object_array_get_idx(c, p));
          kdp_server_history_add(lv->srv, "diversity", name, x, churn[nch++]);
        }
      kdp_metrics_set_last_diversity(json_object_get_double(a), json_object_get_double(b),
                                     nch ? churn : NULL, nch);
    } else if (strcmp(kind, "train") == 0 && json_object_object_get_ex(o, "lr", &a)) {
      kdp_server_history_add(lv->srv, "learning_rate", "lr", x, json_object_get_double(a));
    } else if (strcmp(kind, "control") == 0 && json_object_object_get_ex(o, "action", &a)) {
      kdp_server_history_event(lv->srv, kind, x, json_object_get_string(a));
    } else if (strcmp(kind, "resize") == 0 && json_object_object_get_ex(o, "from", &a) &&
               json_object_object_get_ex(o, "to", &b)) {
      char text[64];
      snprintf(text, sizeof text, "%d -> %d peers", json_object_get_int(a), json_object_get_int(b));
      kdp_server_history_event(lv->srv, kind, x, text);
    } else if (strcmp(kind, "checkpoint") == 0 || strcmp(kind, "rollback") == 0 ||
               strcmp(kind, "stop") == 0) {
      kdp_server_history_event(lv->srv, kind, x, "");
    }
    json_object_put(o);
  }
  free(ln);
  fclose(f);
}

int kdp_live_start(kdp_trainer *t, kdp_error *err) {
  kdp_live *lv = kdp_xcalloc(1, sizeof *lv);
  t->live = lv;
  lv->last_ckpt_step = -1;
  lv->lr = NAN;
  lv->budget = t->cfg->server_predict_share * LIVE_BUDGET_WINDOW;
  lv->budget_time = kdp_now();
  lv->win_step = t->step;
  lv->win_train = t->train_time;
  rebase_comm(lv, t->d);
  if (!t->is_root || !t->cfg->server_enabled) return 0;
  /* resumed (or serving) from a checkpoint: that one is the last checkpoint */
  char manifest[KDP_PATH + 64];
  struct stat st;
  if (t->step > 0 && kdp_ckpt_manifest_path(t->cfg->dir, t->step, manifest, sizeof manifest) == 0 &&
      stat(manifest, &st) == 0) {
    lv->last_ckpt_step = t->step;
    lv->last_ckpt_unix = (double)st.st_mtim.tv_sec + (double)st.st_mtim.tv_nsec * 1e-9;
  }
  kdp_server_options o;
  kdp_server_strings str;
  kdp_train_server_options(t->cfg, &o, &str);
  o.input_dim = (int)(t->train.H * t->train.W * t->train.C);
  o.quiet = t->tty < 0;
  int rc = kdp_server_start(&lv->srv, &o, err);
  if (rc != 0) return rc;
  declare_charts(t);
  if (t->step > 0) {
    seed_history(t);
    char text[64];
    snprintf(text, sizeof text, "%s at step %lld", t->serve_only ? "serving" : "resumed",
             (long long)t->step);
    kdp_server_history_event(lv->srv, t->serve_only ? "serve" : "resume", (double)t->step, text);
  }
  write_sd_files(t);
  if (t->tty >= 0) fprintf(stderr, "kdpeers: serving on %s (dashboard at %s/)\n",
                           kdp_server_address(lv->srv), kdp_server_address(lv->srv));
  return 0;
}

void kdp_live_stop(kdp_trainer *t) {
  kdp_live *lv = t->live;
  if (!lv) return;
  if (lv->req) kdp_server_fail_predict(lv->srv, lv->req, 503, "the run is ending");
  for (int i = 0; i < 2; i++)
    if (lv->sd_file[i][0]) remove(lv->sd_file[i]);
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
  int kd_series = kdp_metrics_distils(t);
  for (int p = 0; p < t->P && p < KDP_MAX_PEERS; p++) {
    lv->peer_ce[p] = ce[p];
    lv->peer_kd[p] = kd[p];
    lv->peer_acc[p] = acc[p];
    if (!lv->srv) continue;
    char name[16];
    snprintf(name, sizeof name, "peer%d", p);
    kdp_server_history_add(lv->srv, "train_loss", name, (double)t->step, ce[p]);
    if (kd_series) kdp_server_history_add(lv->srv, "kd_loss", name, (double)t->step, kd[p]);
    kdp_server_history_add(lv->srv, "train_accuracy", name, (double)t->step, acc[p]);
  }
}

void kdp_live_peer_contrast(kdp_trainer *t, const double *contrast) {
  kdp_live *lv = t->live;
  if (!lv) return;
  for (int p = 0; p < t->P && p < KDP_MAX_PEERS; p++) {
    lv->peer_contrast[p] = contrast[p];
    char name[32];
    snprintf(name, sizeof name, "peer%d.contrast", p);
    if (lv->srv) kdp_server_history_add(lv->srv, "kd_loss", name, (double)t->step, contrast[p]);
  }
}

void kdp_live_series(kdp_trainer *t, const char *chart, const char *name, int64_t step,
                     double value) {
  kdp_live *lv = t->live;
  if (lv && lv->srv) kdp_server_history_add(lv->srv, chart, name, (double)step, value);
}

void kdp_live_progress(kdp_trainer *t, int64_t step, double lr) {
  kdp_live *lv = t->live;
  if (!lv) return;
  lv->lr = lr;
  const kdp_dist *d = t->d;
  double dt = t->train_time - lv->win_train;
  int64_t ds = step - lv->win_step;
  if (lv->srv) {
    double x = (double)step;
    kdp_server_history_add(lv->srv, "learning_rate", "lr", x, lr);
    if (ds > 0 && dt > 0) {
      kdp_server_history_add(lv->srv, "throughput", "steps/s", x, (double)ds / dt);
      /* shares of the training time since the last log line; compute is the rest of the step
         (data, forward, losses, backward, optimizer) */
      double ex = d->t_exchange - lv->win_ex, ar = d->t_allreduce - lv->win_ar,
             wait = d->t_wait - lv->win_wait;
      double comp = dt - ex - ar - wait;
      kdp_server_history_add(lv->srv, "time_split", "compute", x, comp > 0 ? comp / dt : 0);
      kdp_server_history_add(lv->srv, "time_split", "exchange", x, ex / dt);
      kdp_server_history_add(lv->srv, "time_split", "allreduce", x, ar / dt);
      kdp_server_history_add(lv->srv, "time_split", "wait", x, wait / dt);
    }
  }
  lv->win_step = step;
  lv->win_train = t->train_time;
  rebase_comm(lv, d);
}

void kdp_live_eval(kdp_trainer *t, int64_t step, const char *model, double acc, double loss) {
  kdp_live *lv = t->live;
  if (!lv) return;
  rebase_comm(lv, t->d); /* the evaluation's collectives are no training step's */
  if (!lv->srv) return;
  kdp_server_history_add(lv->srv, "test_accuracy", model, (double)step, acc);
  kdp_server_history_add(lv->srv, "test_loss", model, (double)step, loss);
}

void kdp_live_event(kdp_trainer *t, const char *kind, int64_t step, const char *text) {
  kdp_live *lv = t->live;
  if (lv && lv->srv) kdp_server_history_event(lv->srv, kind, (double)step, text);
}

void kdp_live_checkpointed(kdp_trainer *t) {
  kdp_live *lv = t->live;
  if (!lv) return;
  lv->last_ckpt_step = t->step;
  lv->last_ckpt_unix = unix_now();
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

/* Training samples each peer has drawn in its first `step` steps (a partial last batch of an
   epoch counts what it holds; drop_last skips it). */
static double samples_at(const kdp_trainer *t, int64_t step) {
  const kdp_batcher *b = &t->batcher;
  int64_t spe = t->steps_per_epoch;
  if (spe <= 0 || step <= 0) return 0;
  double per_epoch = b->drop_last ? (double)spe * (double)b->batch : (double)(b->hi - b->lo);
  double in_epoch = (double)(step % spe) * (double)b->batch;
  return (double)(step / spe) * per_epoch + (in_epoch < per_epoch ? in_epoch : per_epoch);
}

/* name="value" (escaped), preceded by a comma unless first */
static void prom_label(FILE *f, const char *name, const char *value, int first) {
  char esc[2 * KDP_PATH + 16];
  kdp_prom_label_value(esc, sizeof esc, value);
  fprintf(f, "%s%s=\"%s\"", first ? "" : ",", name, esc);
}

/* kdpeers_build_info and kdpeers_run_info: constant 1, the facts in their labels */
static void render_info(FILE *f, const kdp_trainer *t) {
  const kdp_config *c = t->cfg;
  char mpi[512];
  kdp_dist_library_version(mpi, sizeof mpi);
  mpi[strcspn(mpi, ",")] = 0; /* "Open MPI v4.1.4" of "Open MPI v4.1.4, package: ..., ident: ..." */
  prom_header(f, "kdpeers_build_info", "gauge",
              "Always 1: the kdpeers build (version, git commit, MPI library, OpenBLAS).");
  fputs("kdpeers_build_info{", f);
  prom_label(f, "version", KDP_VERSION, 1);
  prom_label(f, "git_hash", kdp_git_hash(), 0);
  prom_label(f, "mpi", mpi, 0);
  prom_label(f, "openblas", openblas_get_config(), 0);
  fputs("} 1\n", f);
  char archs[KDP_PATH] = "";
  size_t used = 0;
  for (int p = 0; p < t->P && used < sizeof archs; p++)
    used += (size_t)snprintf(archs + used, sizeof archs - used, "%s%s", p ? " " : "",
                             kdp_config_peer_arch(c, p));
  char num_s[3][24];
  snprintf(num_s[0], sizeof num_s[0], "%d", t->P);
  snprintf(num_s[1], sizeof num_s[1], "%d", t->d->world_size);
  snprintf(num_s[2], sizeof num_s[2], "%llu", (unsigned long long)c->seed);
  prom_header(f, "kdpeers_run_info", "gauge",
              "Always 1: the run (its directory, method, model architecture, each peer's "
              "architecture, peers, ranks, seed).");
  fputs("kdpeers_run_info{", f);
  prom_label(f, "run_dir", c->dir, 1);
  prom_label(f, "method", t->P > 1 ? c->method : "independent", 0);
  prom_label(f, "arch", c->arch, 0);
  prom_label(f, "peer_archs", archs, 0);
  prom_label(f, "peers", num_s[0], 0);
  prom_label(f, "ranks", num_s[1], 0);
  prom_label(f, "seed", num_s[2], 0);
  fputs("} 1\n", f);
}

/* a labelled family: NAME{LABEL="i or names[i]"} values[i] */
static void prom_family(FILE *f, const char *name, const char *type, const char *help,
                        const char *label, const char *const *names, const double *values,
                        int n) {
  prom_header(f, name, type, help);
  for (int i = 0; i < n; i++) {
    if (names) fprintf(f, "%s{%s=\"%s\"} ", name, label, names[i]);
    else fprintf(f, "%s{%s=\"%d\"} ", name, label, i);
    num(f, values[i]);
  }
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
  prom_header(f, "kdpeers_steps_total", "counter",
              "Optimizer steps taken by this process (from 0 at start and at each resume; "
              "kdpeers_step is the run's position).");
  fprintf(f, "kdpeers_steps_total %lld\n", (long long)(t->step - t->step0));
  prom_header(f, "kdpeers_samples_total", "counter",
              "Training samples each peer trained on in this process (from 0 at start and at "
              "each resume).");
  fprintf(f, "kdpeers_samples_total %.0f\n", samples_at(t, t->step) - samples_at(t, t->step0));
  if (!isnan(lv->lr)) {
    prom_header(f, "kdpeers_learning_rate", "gauge",
                "Learning rate of the last logged step (the schedule's value x lr_scale).");
    fprintf(f, "kdpeers_learning_rate ");
    num(f, lv->lr);
  }
  int P = t->P < KDP_MAX_PEERS ? t->P : KDP_MAX_PEERS;
  prom_family(f, "kdpeers_loss_ce", "gauge", "Cross-entropy loss of each peer, last log window.",
              "peer", NULL, lv->peer_ce, P);
  prom_family(f, "kdpeers_loss_kd", "gauge",
              "Weighted distillation loss of each peer, last log window.", "peer", NULL,
              lv->peer_kd, P);
  if (t->embed)
    prom_family(f, "kdpeers_loss_contrast", "gauge",
                "mcl: weighted contrastive loss of each peer (kd.contrast_weight x the "
                "contrastive terms), last log window.", "peer", NULL, lv->peer_contrast, P);
  prom_family(f, "kdpeers_train_accuracy_ratio", "gauge",
              "Training accuracy of each peer (0..1), last log window.", "peer", NULL,
              lv->peer_acc, P);
  prom_family(f, "kdpeers_train_accuracy", "gauge",
              "Deprecated (removed after 0.2): kdpeers_train_accuracy_ratio.", "peer", NULL,
              lv->peer_acc, P);
  const char *names[KDP_EVAL_ROWS_MAX];
  double accs[KDP_EVAL_ROWS_MAX], losses[KDP_EVAL_ROWS_MAX];
  int n = kdp_metrics_last_evals(names, accs, losses, KDP_EVAL_ROWS_MAX);
  prom_family(f, "kdpeers_test_accuracy_ratio", "gauge",
              "Test accuracy (0..1) at the last evaluation, per peer, ensemble and teacher.",
              "model", names, accs, n);
  prom_family(f, "kdpeers_test_accuracy", "gauge",
              "Deprecated (removed after 0.2): kdpeers_test_accuracy_ratio.", "model", names, accs,
              n);
  prom_family(f, "kdpeers_test_loss", "gauge", "Test loss at the last evaluation.", "model", names,
              losses, n);
  n = kdp_metrics_last_val(names, accs, losses, KDP_EVAL_ROWS_MAX);
  if (n) {
    prom_family(f, "kdpeers_val_accuracy_ratio", "gauge",
                "Validation accuracy (0..1, data.val_size) at the last evaluation, per peer, "
                "ensemble and teacher.", "model", names, accs, n);
    prom_family(f, "kdpeers_val_loss", "gauge", "Validation loss at the last evaluation.",
                "model", names, losses, n);
  }
  double dkl, ddis, churn[KDP_MAX_PEERS];
  int nch = 0;
  if (kdp_metrics_last_diversity(&dkl, &ddis, churn, &nch)) {
    prom_header(f, "kdpeers_diversity_kl", "gauge",
                "Mean pairwise KL between the peers' test-set predictions (T = 1), last evaluation.");
    fprintf(f, "kdpeers_diversity_kl ");
    num(f, dkl);
    prom_header(f, "kdpeers_diversity_disagreement", "gauge",
                "Fraction of test examples two peers label differently, averaged over pairs, last "
                "evaluation.");
    fprintf(f, "kdpeers_diversity_disagreement ");
    num(f, ddis);
    if (nch)
      prom_family(f, "kdpeers_churn_ratio", "gauge",
                  "Fraction of test examples whose label each peer changed since the previous "
                  "evaluation.",
                  "peer", NULL, churn, nch);
  }
  double swf, swe;
  if (kdp_metrics_last_switokd(&swf, &swe)) {
    prom_header(f, "kdpeers_switokd_expert_ratio", "gauge",
                "switokd: fraction of the last finished epoch's steps in expert mode (the teacher "
                "paused).");
    fprintf(f, "kdpeers_switokd_expert_ratio ");
    num(f, swf);
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
  prom_header(f, "kdpeers_last_checkpoint_timestamp_seconds", "gauge",
              "Unix time of the last checkpoint (written by this process, or the one it resumed "
              "from; 0: none).");
  fprintf(f, "kdpeers_last_checkpoint_timestamp_seconds %.3f\n", lv->last_ckpt_unix);
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
  render_info(f, t);
  fclose(f);
  return buf;
}

static void json_kv_str(FILE *f, const char *k, const char *v, int comma) {
  fprintf(f, "%s\"%s\":", comma ? "," : "", k);
  kdp_json_str(f, v);
}


/* ,"KEY":{"MODEL":{"acc":A,"loss":L},...} of /status */
static void status_models(FILE *f, const char *key, const char **names, const double *accs,
                          const double *losses, int n) {
  fprintf(f, ",\"%s\":{", key);
  for (int i = 0; i < n; i++) {
    fprintf(f, "%s\"%s\":{\"acc\":", i ? "," : "", names[i]);
    kdp_json_num(f, accs[i]);
    fputs(",\"loss\":", f);
    kdp_json_num(f, losses[i]);
    fputc('}', f);
  }
  fputc('}', f);
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
    if (t->embed) {
      fputs(",\"contrast\":", f);
      kdp_json_num(f, lv->peer_contrast[p]);
    }
    fputs(",\"train_acc\":", f);
    kdp_json_num(f, lv->peer_acc[p]);
    fputc('}', f);
  }
  fputs("]", f);
  const char *names[KDP_EVAL_ROWS_MAX];
  double accs[KDP_EVAL_ROWS_MAX], losses[KDP_EVAL_ROWS_MAX];
  int n = kdp_metrics_last_evals(names, accs, losses, KDP_EVAL_ROWS_MAX);
  status_models(f, "eval", names, accs, losses, n);
  n = kdp_metrics_last_val(names, accs, losses, KDP_EVAL_ROWS_MAX);
  if (n) status_models(f, "val", names, accs, losses, n); /* data.val_size */
  double dkl, ddis, churn[KDP_MAX_PEERS];
  int nch = 0;
  if (kdp_metrics_last_diversity(&dkl, &ddis, churn, &nch)) {
    fputs(",\"diversity\":{\"kl\":", f);
    kdp_json_num(f, dkl);
    fputs(",\"disagreement\":", f);
    kdp_json_num(f, ddis);
    if (nch) {
      fputs(",\"churn\":", f);
      kdp_json_nums(f, churn, nch);
    }
    fputc('}', f);
  }
  double swf, swe;
  if (kdp_metrics_last_switokd(&swf, &swe)) {
    fputs(",\"switokd\":{\"epoch\":", f);
    kdp_json_num(f, swe);
    fputs(",\"expert_fraction\":", f);
    kdp_json_num(f, swf);
    fputc('}', f);
  }
  fprintf(f, ",\"checkpoint\":{\"last_step\":%lld,\"age_seconds\":", (long long)lv->last_ckpt_step);
  kdp_json_num(f, lv->last_ckpt_step >= 0 ? unix_now() - lv->last_ckpt_unix : -1);
  fprintf(f, ",\"every_steps\":%lld,\"every_minutes\":%.9g,\"keep\":%d},\"resizes\":%s}",
          (long long)c->ckpt_every_steps, c->ckpt_every_minutes, c->ckpt_keep,
          t->resizes ? t->resizes : "[]");
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
      rebase_comm(lv, t->d); /* the pause's agreement points are no training step's */
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
  if (t->pipe) kdp_pipeline_module_sync(t->pipe, NULL); /* the teacher reads the whole module */
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
