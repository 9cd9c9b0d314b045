/* train.c: the step loop: batches, forward, distillation loss, backward, allreduce, SGD, eval. */
#include "kdpeers/train.h"

#include <cblas.h>
#include <errno.h>
#include <sched.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kdpeers/data.h"
#include "kdpeers/kd.h"
#include "kdpeers/nn.h"
#include "kdpeers/tools.h"
#include "train_internal.h"

#define EVAL_BATCH KDP_TRAIN_EVAL_BATCH

int kdp_train_blas_threads(const kdp_config *cfg, const kdp_dist *d) {
  if (cfg->threads > 0) return cfg->threads;
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  /* bound by the launcher to fewer cores (mpirun --map-by slot:PE=N, srun --cpus-per-task): its
     share of the node */
  cpu_set_t mask;
  if (sched_getaffinity(0, sizeof mask, &mask) == 0 && CPU_COUNT(&mask) < cores)
    return CPU_COUNT(&mask);
  int local = d->local_size > 0 ? d->local_size : 1;
  int t = (int)(cores / local);
  return t < 1 ? 1 : t;
}

int kdp_train_load_data(const kdp_config *cfg, kdp_dataset *train, kdp_dataset *test,
                        kdp_error *err) {
  int rc = kdp_dataset_load(train, cfg->format, cfg->train_images, cfg->train_labels, NULL, err);
  if (rc == 0)
    rc = kdp_dataset_load(test, cfg->format, cfg->test_images, cfg->test_labels,
                          train->class_names, err);
  if (rc != 0) {
    kdp_dataset_free(train);
    kdp_dataset_free(test);
    return rc;
  }
  if (train->H != test->H || train->W != test->W || train->C != test->C ||
      kdp_dataset_elem(train) != kdp_dataset_elem(test)) {
    rc = kdp_fail(err, KDP_EFORMAT,
                  "training images are %zux%zux%zu %s but test images are %zux%zux%zu %s: data.* "
                  "files must come from the same dataset",
                  train->H, train->W, train->C, kdp_dataset_elem(train) == 4 ? "float32" : "uint8",
                  test->H, test->W, test->C, kdp_dataset_elem(test) == 4 ? "float32" : "uint8");
    kdp_dataset_free(train);
    kdp_dataset_free(test);
    return rc;
  }
  if (train->n_classes < test->n_classes) train->n_classes = test->n_classes;
  test->n_classes = train->n_classes;
  if (cfg->subset > 0) kdp_dataset_subset(train, (size_t)cfg->subset);
  if (cfg->test_subset > 0) kdp_dataset_subset(test, (size_t)cfg->test_subset);
  if (cfg->label_noise > 0) kdp_dataset_label_noise(train, cfg->label_noise, cfg->noise_seed);
  return 0;
}

static double peak_rss_mb(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_maxrss / 1024.0;
}

/* One copy of the data per node: local rank 0 loads (subset, label noise and all), the other
   ranks of the node map the same MPI shared-memory window. */
static int load_data_shared(kdp_trainer *t, kdp_error *err) {
  kdp_dist *d = t->d;
  uint64_t meta[13] = {0}; /* shapes, [10] pixel bytes, [11] rc, [12] class-name bytes */
  kdp_dataset tr, te;
  int rc = 0;
  if (d->local_rank == 0) {
    rc = kdp_train_load_data(t->cfg, &tr, &te, err);
    if (rc == 0) {
      uint64_t m[11] = {tr.n, tr.H, tr.W, tr.C, tr.n_classes, te.n, te.H, te.W, te.C, te.n_classes,
                        kdp_dataset_elem(&tr)};
      memcpy(meta, m, sizeof m);
      meta[12] = tr.class_names ? strlen(tr.class_names) + 1 : 0;
    }
    meta[11] = (uint64_t)(int64_t)rc;
  }
  kdp_dist_node_bcast(d, meta, sizeof meta);
  if ((int64_t)meta[11] != 0) {
    if (d->local_rank != 0)
      rc = kdp_fail(err, KDP_EIO, "local rank 0 of this node failed to load the data (see its message)");
    return rc;
  }
  char *names = meta[12] ? kdp_xcalloc(meta[12], 1) : NULL;
  if (names && d->local_rank == 0) memcpy(names, tr.class_names, meta[12]);
  if (names) kdp_dist_node_bcast(d, names, meta[12]);
  size_t tr_img = meta[0] * meta[1] * meta[2] * meta[3] * meta[10],
         te_img = meta[5] * meta[6] * meta[7] * meta[8] * meta[10];
  size_t total = tr_img + meta[0] + te_img + meta[5];
  uint8_t *base = kdp_dist_node_shared(d, total, &t->data_win);
  if (d->local_rank == 0) {
    memcpy(base, tr.images, tr_img);
    memcpy(base + tr_img, tr.labels, meta[0]);
    memcpy(base + tr_img + meta[0], te.images, te_img);
    memcpy(base + tr_img + meta[0] + te_img, te.labels, meta[5]);
    kdp_dataset_free(&tr);
    kdp_dataset_free(&te);
  }
  kdp_dist_node_barrier(d);
  t->train = (kdp_dataset){.n = meta[0], .H = meta[1], .W = meta[2], .C = meta[3],
                           .n_classes = meta[4], .images = base, .labels = base + tr_img, .owns = 0,
                           .elem = meta[10], .class_names = names};
  t->test = (kdp_dataset){.n = meta[5], .H = meta[6], .W = meta[7], .C = meta[8],
                          .n_classes = meta[9], .images = base + tr_img + meta[0],
                          .labels = base + tr_img + meta[0] + te_img, .owns = 0,
                          .elem = meta[10]};
  return 0;
}

/* resident and proportional set sizes of this process now, in MB (Linux /proc) */
static void memory_now(double *rss_mb, double *pss_mb) {
  *rss_mb = *pss_mb = 0;
  FILE *f = fopen("/proc/self/smaps_rollup", "r");
  if (!f) return;
  char line[256];
  while (fgets(line, sizeof line, f)) {
    unsigned long kb;
    if (sscanf(line, "Rss: %lu kB", &kb) == 1) *rss_mb = (double)kb / 1024.0;
    if (sscanf(line, "Pss: %lu kB", &kb) == 1) *pss_mb = (double)kb / 1024.0;
  }
  fclose(f);
}

/* ---------------- evaluation ---------------- */

/* Per-peer layout: the test set in chunks of EVAL_BATCH rows; each rank computes its rows of a
   chunk, the rows are allgathered over the world, and rank 0 scores every peer, the ensemble and
   the teacher on the whole chunk. */
static void evaluate_layout(kdp_trainer *t, int64_t step, double epoch) {
  const kdp_dataset *ds = &t->test;
  kdp_dist *d = t->d;
  size_t C = t->C, n = ds->n, P = (size_t)t->P, isz = ds->H * ds->W * ds->C;
  /* [2p] loss and [2p+1] hits of peer p, then ensemble, then teacher */
  double *s = kdp_xcalloc(2 * P + 4, sizeof(double));
  float *prob = kdp_falloc(EVAL_BATCH * C), *ens = kdp_falloc(EVAL_BATCH * C);
  float *teacher = t->is_root && t->teacher_eval ? kdp_falloc(EVAL_BATCH * C) : NULL;
  for (size_t first = 0; first < n; first += EVAL_BATCH) {
    size_t B = n - first < EVAL_BATCH ? n - first : EVAL_BATCH, lo, hi;
    kdp_dist_rank_rows(d, d->peer, d->slice, B, &lo, &hi);
    kdp_dataset_get(ds, first, B, t->mean, t->std, t->xbuf, t->ybuf);
    const float *z = hi > lo ? kdp_model_forward(t->model, t->xbuf + lo * isz, hi - lo, 0, NULL)
                             : NULL;
    int has_teacher = 0;
    const float *all = kdp_method_eval_layout(t, z, B, teacher, &has_teacher);
    if (!t->is_root || !all) continue;
    memset(ens, 0, B * C * sizeof(float));
    for (size_t p = 0; p < P; p++) {
      size_t correct = 0;
      const float *zp = all + p * B * C;
      s[2 * p] += kdp_ce_loss(zp, t->ybuf, B, C, NULL, 0, &correct) * (double)B;
      s[2 * p + 1] += (double)correct;
      kdp_softmax_t(prob, zp, B, C, 1.0f);
      for (size_t k = 0; k < B * C; k++) ens[k] += prob[k];
    }
    for (size_t i = 0; i < B; i++) {
      const float *pr = ens + i * C;
      size_t am = 0;
      for (size_t k = 1; k < C; k++)
        if (pr[k] > pr[am]) am = k;
      s[2 * P + 1] += am == (size_t)t->ybuf[i];
      double q = pr[t->ybuf[i]] / (double)P;
      s[2 * P] -= log(q > 1e-30 ? q : 1e-30);
    }
    if (has_teacher) {
      size_t tc = 0;
      s[2 * P + 2] += kdp_ce_loss(teacher, t->ybuf, B, C, NULL, 0, &tc) * (double)B;
      s[2 * P + 3] += (double)tc;
    }
  }
  if (t->is_root) {
    char name[32];
    for (size_t p = 0; p < P; p++) {
      snprintf(name, sizeof name, "peer%zu", p);
      kdp_metrics_eval(t, step, epoch, name, s[2 * p + 1] / (double)n, s[2 * p] / (double)n);
    }
    kdp_metrics_eval(t, step, epoch, "ensemble", s[2 * P + 1] / (double)n, s[2 * P] / (double)n);
    if (t->teacher_eval)
      kdp_metrics_eval(t, step, epoch, t->teacher_name, s[2 * P + 3] / (double)n,
                       s[2 * P + 2] / (double)n);
  }
  free(s);
  free(prob);
  free(ens);
  free(teacher);
}

/* Evaluates every peer on the test set (split over the ranks of a peer), the mean-of-probabilities
   ensemble over the cohort, and the method's teacher when it has one. */
static void evaluate(kdp_trainer *t, int64_t step, double epoch) {
  const kdp_dataset *ds = &t->test;
  kdp_dist *d = t->d;
  if (!d->uniform) {
    evaluate_layout(t, step, epoch);
    return;
  }
  size_t C = t->C;
  size_t n = ds->n;
  /* this rank's share of the test set */
  size_t lo = n * (size_t)d->slice / (size_t)d->ranks_per_peer;
  size_t hi = n * (size_t)(d->slice + 1) / (size_t)d->ranks_per_peer;
  /* sums: [0] peer loss, [1] peer correct, [2] ens loss, [3] ens correct, [4] teacher loss,
     [5] teacher correct */
  double s[6] = {0, 0, 0, 0, 0, 0};
  float *prob = kdp_falloc(EVAL_BATCH * C);
  float *ens = kdp_falloc(EVAL_BATCH * C);
  for (size_t first = lo; first < hi; first += EVAL_BATCH) {
    size_t b = hi - first < EVAL_BATCH ? hi - first : EVAL_BATCH;
    /* every cohort member must take part in each allreduce: pad to the cohort's batch count */
    kdp_dataset_get(ds, first, b, t->mean, t->std, t->xbuf, t->ybuf);
    const float *z = kdp_model_forward(t->model, t->xbuf, b, 0, NULL);
    size_t correct = 0;
    s[0] += kdp_ce_loss(z, t->ybuf, b, C, NULL, 0, &correct) * (double)b;
    s[1] += (double)correct;
    kdp_softmax_t(prob, z, b, C, 1.0f);
    if (t->P > 1) {
      memcpy(ens, prob, b * C * sizeof(float));
      kdp_dist_cohort_allreduce(d, ens, b * C);
      double l = 0;
      size_t c = 0;
      for (size_t i = 0; i < b; i++) {
        const float *p = ens + i * C;
        size_t am = 0;
        for (size_t k = 1; k < C; k++)
          if (p[k] > p[am]) am = k;
        c += am == (size_t)t->ybuf[i];
        double q = p[t->ybuf[i]] / (double)t->P;
        l -= log(q > 1e-30 ? q : 1e-30);
      }
      s[2] += l;
      s[3] += (double)c;
    }
    if (t->teacher_eval) {
      double tl = 0;
      size_t tc = 0;
      t->teacher_eval(t, z, b, &tl, &tc);
      s[4] += tl;
      s[5] += (double)tc;
    }
  }
  free(prob);
  free(ens);
  kdp_dist_peer_allreduce_f64(d, s, 6);
  /* gather every peer's (loss, acc) on the cohort */
  double *all = kdp_xcalloc((size_t)t->P * 2, sizeof(double));
  all[2 * d->peer] = s[0] / (double)n;
  all[2 * d->peer + 1] = s[1] / (double)n;
  kdp_dist_cohort_allreduce_f64(d, all, (size_t)t->P * 2);
  if (t->is_root) {
    char name[32];
    for (int p = 0; p < t->P; p++) {
      snprintf(name, sizeof name, "peer%d", p);
      kdp_metrics_eval(t, step, epoch, name, all[2 * p + 1], all[2 * p]);
    }
    if (t->P > 1) kdp_metrics_eval(t, step, epoch, "ensemble", s[3] / (double)n, s[2] / (double)n);
    if (t->teacher_eval)
      kdp_metrics_eval(t, step, epoch, t->teacher_name, s[5] / (double)n, s[4] / (double)n);
  }
  free(all);
}

/* ---------------- divergence and signals ---------------- */


typedef struct divergence {
  int peer_plus1;
  int64_t step;
  const char *term;
  double value;
} divergence;

static int all_finite(const float *v, size_t n) {
  float acc = 0.0f;
  for (size_t i = 0; i < n; i++) acc += v[i] * 0.0f; /* NaN or Inf make the sum NaN */
  return acc == 0.0f;
}

static void note_divergence(divergence *dv, int peer, int64_t step, const char *term, double v) {
  if (dv->peer_plus1) return; /* keep the first */
  dv->peer_plus1 = peer + 1;
  dv->step = step;
  dv->term = term;
  dv->value = v;
}

/* The divergence error on this rank (the rank of the diverged peer names the step and term),
   ending with what to do about it. */
static int divergence_error(const divergence *dv, kdp_dist *d, int peer, const char *advice,
                            kdp_error *err) {
  if (dv->peer_plus1)
    return kdp_fail(err, KDP_EDIVERGED, "divergence: peer %d, step %lld: the %s %s %g%s",
                    d->peer, (long long)dv->step, dv->term,
                    strcmp(dv->term, "parameters") == 0 || strcmp(dv->term, "logits") == 0
                        ? "contain"
                        : "is",
                    dv->value, advice);
  return kdp_fail(err, KDP_EDIVERGED,
                  "divergence in peer %d (its rank reports the step and term)%s", peer, advice);
}

static volatile sig_atomic_t g_signals;

static void on_signal(int sig) {
  (void)sig;
  if (g_signals++ > 0) {
    /* a second signal: exit at once */
    static const char msg[] = "kdpeers: second signal, exiting now\n";
    ssize_t w = write(STDERR_FILENO, msg, sizeof msg - 1);
    (void)w;
    kdp_rundir_release_now();
    _exit(KDP_EXIT_SIGNAL_NOW);
  }
}

void kdp_train_install_signals(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGUSR1, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  /* a file-size limit (ulimit -f) then fails a write with EFBIG, which is handled, instead of
     killing the process */
  signal(SIGXFSZ, SIG_IGN);
}

int kdp_train_signal_count(void) { return (int)g_signals; }

/* While paused (or serving only): answer commands and predictions at ~50 agreement points a
   second, honour signals, and write a checkpoint asked for meanwhile. Collective. */
static int pause_loop(kdp_trainer *t, int *want, int *want_stop, kdp_error *err) {
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
    if (pf[KDP_SYNC_PREDICT]) kdp_live_predict(t, pf[KDP_SYNC_PREDICT], pf[KDP_SYNC_PREDICT_FLOAT], 0);
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

/* ---------------- the run ---------------- */

/* Fault injection for the tests (docs/testing.md): rank 0 signals itself at step signal_at
   (KDP_FAULT_SIGNAL_AT_STEP=N) and makes a logit NaN at step nan_at (KDP_FAULT_NAN_AT_STEP=N);
   rank R stops itself (SIGSTOP) before the agreement point of step stop_at
   (KDP_FAULT_STOP_AT_STEP=N:R). -1 = never. */
typedef struct faults {
  int64_t signal_at, nan_at, stop_at;
} faults;

static void faults_init(const kdp_trainer *t, faults *f) {
  const char *sig = getenv("KDP_FAULT_SIGNAL_AT_STEP"), *nan = getenv("KDP_FAULT_NAN_AT_STEP");
  const char *stop = getenv("KDP_FAULT_STOP_AT_STEP");
  f->signal_at = sig && t->is_root ? atoll(sig) : -1;
  f->nan_at = nan && t->is_root ? atoll(nan) : -1;
  long long at = -1;
  int rank = -1;
  f->stop_at = stop && sscanf(stop, "%lld:%d", &at, &rank) == 2 && rank == t->d->world_rank
                   ? at
                   : -1;
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
static int on_divergence(kdp_trainer *t, const divergence *dv, int dpeer, int stop,
                         kdp_error *err) {
  const kdp_config *cfg = t->cfg;
  if (strcmp(cfg->ckpt_on_divergence, "rollback") != 0)
    return divergence_error(dv, t->d, dpeer,
                            ". Lower optim.lr or kd.weight, or set checkpoint.on_divergence = "
                            "rollback",
                            err);
  if (stop) {
    divergence_error(dv, t->d, dpeer, "", err);
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
    return divergence_error(dv, t->d, dpeer, advice, err);
  }
  divergence_error(dv, t->d, dpeer, "", err);
  return rollback(t, err);
}

static int run(const kdp_config *cfg, kdp_dist *d, const kdp_run_opts *opts, kdp_error *err) {
  kdp_trainer T;
  kdp_trainer *t = &T;
  memset(t, 0, sizeof *t);
  t->cfg = cfg;
  t->d = d;
  t->P = d->n_peers;
  t->is_root = d->world_rank == 0;
  kdp_nn_set_threads(kdp_train_blas_threads(cfg, d)); /* the whole step's threads */

  int rc = 0;
  int k = d->ranks_per_peer;
  if (d->uniform && cfg->batch_size % k != 0)
    rc = kdp_fail(err, KDP_EINVAL,
                  "optim.batch_size = %d is not divisible by run.ranks_per_peer = %d: each rank "
                  "of a peer takes an equal slice of the batch",
                  cfg->batch_size, k);
  for (int p = 0; !d->uniform && rc == 0 && p < d->n_peers; p++)
    if (cfg->batch_size % d->peer_k[p] != 0)
      rc = kdp_fail(err, KDP_EINVAL,
                    "optim.batch_size = %d is not divisible by peer %d's ranks_per_peer = %d: "
                    "each rank of a peer takes an equal slice of the batch",
                    cfg->batch_size, p, d->peer_k[p]);
  double t_load = kdp_now();
  if (rc == 0) {
    if (cfg->shared && d->local_size > 1)
      rc = load_data_shared(t, err);
    else
      rc = kdp_train_load_data(cfg, &t->train, &t->test, err);
  }
  if (!kdp_dist_all_ok(d, rc == 0)) {
    if (rc == 0) rc = kdp_fail(err, KDP_EIO, "another rank failed to load the data (see its message)");
    return rc;
  }
  t_load = kdp_now() - t_load;
  /* refuse a run that cannot fit before anything is allocated or written */
  kdp_memory_estimate *mem = kdp_xmalloc(sizeof *mem);
  rc = kdp_train_memory_estimate(cfg, d, &t->train, &t->test, mem, err);
  if (rc == 0) rc = kdp_train_memory_check(mem, err);
  free(mem);
  if (!kdp_dist_all_ok(d, rc == 0) && rc == 0)
    rc = kdp_fail(err, KDP_EINVAL, "the run does not fit the memory of another node");
  /* only now is run.dir created and locked: every refusal above wrote nothing */
  if (rc == 0) rc = kdp_rundir_open(cfg, d, opts && opts->serve_only, err);
  if (rc != 0) {
    kdp_dataset_free(&t->train);
    kdp_dataset_free(&t->test);
    kdp_dist_node_shared_free(t->data_win);
    return rc;
  }
  /* start-up agreement: config, dataset and layout */
  rc = kdp_dist_agree(d, cfg, sizeof *cfg, "configuration", err);
  if (rc == 0) {
    uint64_t sig[6] = {t->train.n, t->test.n, t->train.H * 1000000 + t->train.W * 1000 + t->train.C,
                       t->train.n_classes, 0, 0};
    for (size_t i = 0; i < t->train.n; i += 997) sig[4] = sig[4] * 31 + t->train.labels[i];
    size_t bytes = t->train.n * t->train.H * t->train.W * t->train.C * kdp_dataset_elem(&t->train);
    for (size_t i = 0; i < bytes; i += 104729)
      sig[5] = sig[5] * 131 + t->train.images[i];
    rc = kdp_dist_agree(d, sig, sizeof sig, "dataset (sizes, labels or pixels)", err);
  }
  if (rc != 0) {
    kdp_dataset_free(&t->train);
    kdp_dataset_free(&t->test);
    kdp_dist_node_shared_free(t->data_win);
    return rc;
  }

  t->C = t->train.n_classes;
  t->Bg = (size_t)cfg->batch_size;
  t->Bl = t->Bg / (size_t)k;
  for (size_t c = 0; c < 3; c++) {
    t->mean[c] = (float)cfg->mean[c];
    t->std[c] = (float)cfg->std[c];
  }
  kdp_input_shape ish = {t->train.H, t->train.W, t->train.C, t->C};
  size_t maxb = t->Bl > EVAL_BATCH ? t->Bl : EVAL_BATCH;
  const char *arch = kdp_config_peer_arch(cfg, d->peer);
  rc = kdp_model_create(&t->model, arch, ish, maxb, err);
  if (!kdp_dist_all_ok(d, rc == 0)) {
    if (rc == 0) rc = kdp_fail(err, KDP_EINVAL, "another rank could not build its model");
    kdp_dataset_free(&t->train);
    kdp_dataset_free(&t->test);
    kdp_dist_node_shared_free(t->data_win);
    return rc;
  }
  kdp_rng init_rng;
  kdp_rng_seed(&init_rng, cfg->seed, KDP_STREAM_INIT + 16 * (uint64_t)d->peer);
  kdp_model_init(t->model, &init_rng);
  kdp_rng_seed(&t->dropout_rng, cfg->seed, KDP_STREAM_DROPOUT + 16 * (uint64_t)d->world_rank);
  kdp_sgd_init(&t->opt, kdp_model_n_params(t->model), (float)cfg->momentum,
               (float)cfg->weight_decay, cfg->nesterov);

  kdp_batcher_init(&t->batcher, &t->train, t->Bg, cfg->seed, 1, 0);
  t->batcher.augment = cfg->augment;
  t->batcher.crop_pad = (size_t)cfg->crop_pad;
  t->batcher.flip = cfg->flip;
  for (int c = 0; c < 3; c++) {
    t->batcher.mean[c] = t->mean[c];
    t->batcher.std[c] = t->std[c];
  }
  rc = kdp_method_init(t, err);
  if (!kdp_dist_all_ok(d, rc == 0)) {
    if (rc == 0) rc = kdp_fail(err, KDP_EINVAL, "another rank failed to set up the method");
    goto done;
  }

  /* uniform layout: every rank of a peer needs a row of every batch, the epoch's last included */
  size_t tail = (t->batcher.hi - t->batcher.lo) % t->Bg;
  if (rc == 0 && d->uniform && k > 1 && tail > 0 && tail < (size_t)k)
    rc = kdp_fail(err, KDP_EINVAL,
                  "the last batch of an epoch holds %zu example%s (%zu training examples, "
                  "optim.batch_size = %zu), fewer than run.ranks_per_peer = %d: every rank of a "
                  "peer needs at least one row; change data.subset or optim.batch_size",
                  tail, tail == 1 ? "" : "s", t->batcher.hi - t->batcher.lo, t->Bg, k);
  if (!kdp_dist_all_ok(d, rc == 0)) {
    if (rc == 0) rc = kdp_fail(err, KDP_EINVAL, "another rank refused the batch layout");
    goto done;
  }
  size_t spe = kdp_batcher_n_batches(&t->batcher);
  t->steps_per_epoch = (int64_t)spe;
  int64_t total = (int64_t)cfg->epochs * (int64_t)spe;
  if (cfg->max_steps > 0 && cfg->max_steps < total) total = cfg->max_steps;
  t->total_steps = total;
  kdp_schedule sch = {0};
  sch.kind = strcmp(cfg->schedule, "cosine") == 0      ? KDP_SCHEDULE_COSINE
             : strcmp(cfg->schedule, "multistep") == 0 ? KDP_SCHEDULE_MULTISTEP
                                                       : KDP_SCHEDULE_CONSTANT;
  sch.base_lr = cfg->lr;
  /* the schedule spans the configured epochs; run.max_steps only stops early, so a short run
     trains exactly like the start of the full one */
  sch.total_steps = (int64_t)cfg->epochs * (int64_t)spe;
  sch.steps_per_epoch = (int64_t)spe;
  sch.warmup_epochs = cfg->warmup_epochs;
  sch.gamma = cfg->gamma;
  int nm = kdp_config_milestones(cfg, sch.milestones, 16, err);
  sch.n_milestones = nm > 0 ? nm : 0;

  size_t isz = t->train.H * t->train.W * t->train.C;
  t->xbuf = kdp_falloc((t->Bg > EVAL_BATCH ? t->Bg : EVAL_BATCH) * isz);
  t->ybuf = kdp_xcalloc(t->Bg > EVAL_BATCH ? t->Bg : EVAL_BATCH, sizeof(int32_t));
  t->dlogits = kdp_falloc(t->Bl * t->C);
  t->dfeat = kdp_falloc(t->Bl * kdp_model_feature_dim(t->model));

  if (t->is_root && opts && opts->fresh) rc = kdp_train_forget_checkpoints(cfg->dir, err);
  if (!kdp_dist_all_ok(d, rc == 0)) {
    if (rc == 0) rc = kdp_fail(err, KDP_EIO, "rank 0 could not start over in run.dir");
    goto done;
  }
  t->allow_change = opts ? opts->allow_change : 0;
  t->serve_only = opts ? opts->serve_only : 0;
  /* resume from the newest complete checkpoint, unless --fresh */
  int64_t metrics_offset = -1;
  if (!(opts && opts->fresh)) {
    int r = kdp_train_restore_latest(t, &metrics_offset, err);
    if (r < 0) {
      rc = r;
      goto done;
    }
    if (t->serve_only) {
      metrics_offset = -1; /* serving never rewrites the run's own log */
      if (r == 0) {
        rc = kdp_fail(err, KDP_EIO, "kdpeers serve: %s holds no complete checkpoint", cfg->dir);
        goto done;
      }
    }
  }
  if (t->is_root) {
    rc = kdp_metrics_open(t, metrics_offset, err);
    for (size_t i = 0; rc == 0 && i < t->n_changes; i++)
      kdp_metrics_config_change(t, t->changes[i].key, t->changes[i].old_value,
                                t->changes[i].new_value);
    if (rc == 0) kdp_progress_start(t, t_load);
  }
  if (!kdp_dist_all_ok(d, rc == 0)) {
    if (rc == 0) rc = kdp_fail(err, KDP_EIO, "rank 0 could not open the metrics file");
    goto done;
  }
  t->last_ckpt_time = kdp_now();
  rc = kdp_live_start(t, err);
  if (!kdp_dist_all_ok(d, rc == 0)) {
    if (rc == 0) rc = kdp_fail(err, KDP_EIO, "rank 0 could not start the server");
    goto done;
  }
  kdp_stall_start(t);
  t->step0 = t->step;
  kdp_trace_start(t);
  if (t->is_root && t->step >= total && t->tty >= 0 && !t->serve_only)
    fprintf(stderr,
            "kdpeers: %s already holds a finished run (step %lld of %lld): nothing to train. Use "
            "--fresh to start over, another run.dir, or raise run.epochs with --allow-config-change to continue\n",
            cfg->dir, (long long)t->step, (long long)total);

  if (t->serve_only) {
    /* kdpeers serve: the restored peers answer until a stop command or a signal */
    int want = 0, want_stop = 0;
    t->paused = 1;
    kdp_live_publish(t, 1);
    rc = pause_loop(t, &want, &want_stop, err);
    goto done;
  }

  double t_compute = 0;
  double ex0 = d->t_exchange, ar0 = d->t_allreduce, wt0 = d->t_wait;
  int64_t step0 = t->step;
  float *params = kdp_model_params(t->model), *grads = kdp_model_grads(t->model);
  size_t np = kdp_model_n_params(t->model);
  kdp_buckets *buckets = kdp_buckets_for_model(d, t->model, (size_t)cfg->bucket_kb);
  divergence pending_div = {0};
  int stopped = 0;
  int predicting = 0; /* a prediction was answered at the last step boundary */
  faults fault;
  faults_init(t, &fault);
  for (int64_t step = t->step; step < total; step++) {
    if (step == fault.signal_at) raise(SIGUSR1);
    double t0 = kdp_now();
    size_t bg = kdp_batcher_next(&t->batcher, t->xbuf, t->ybuf);
    kdp_trace_mark(t, "data", t0, kdp_now());
    /* this rank's slice of the global batch */
    size_t lo = bg * (size_t)d->slice / (size_t)k, hi = bg * (size_t)(d->slice + 1) / (size_t)k;
    size_t bl = hi - lo;
    const float *x = t->xbuf + lo * isz;
    const int32_t *y = t->ybuf + lo;
    double epoch_f = (double)step / (double)spe;
    kdp_model_zero_grad(t->model);
    double tc0 = kdp_now();
    /* a rank can hold no rows of a final partial batch smaller than its peer's k: it then only
       takes part in the collectives, with zero gradients */
    const float *z = bl ? kdp_model_forward(t->model, x, bl, 1, &t->dropout_rng) : t->dlogits;
    t_compute += kdp_now() - tc0;
    kdp_trace_mark(t, "forward", tc0, kdp_now());
    if (step == fault.nan_at) {
      ((float *)z)[0] = NAN; /* fault injection for the tests, once per process */
      fault.nan_at = -1;
    }
    if (step == fault.stop_at) {
      fault.stop_at = -1;
      raise(SIGSTOP); /* a stalled rank, until someone sends SIGCONT */
    }
    /* the step's agreement point, before the exchange: divergence now; a prediction is answered
       here; stop, checkpoint and control requests take effect at the end of this step, on every
       rank */
    int32_t flags[KDP_SYNC_N] = {0};
    if (pending_div.peer_plus1) flags[KDP_SYNC_DIVERGED] = pending_div.peer_plus1;
    if (!all_finite(z, bl * t->C)) {
      note_divergence(&pending_div, d->peer, step, "logits", NAN);
      flags[KDP_SYNC_DIVERGED] = d->peer + 1;
    }
    if ((step + 1) % cfg->log_every == 0 && !all_finite(params, np)) {
      note_divergence(&pending_div, d->peer, step, "parameters", NAN);
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
      rc = on_divergence(t, &pending_div, flags[KDP_SYNC_DIVERGED] - 1, flags[KDP_SYNC_STOP],
                         err);
      if (rc != 0) break;
      memset(&pending_div, 0, sizeof pending_div);
      step = t->step - 1; /* the loop's ++ resumes at the restored step */
      continue;
    }
    if (flags[KDP_SYNC_PREDICT]) {
      /* a prediction is answered as soon as it is agreed, by the weights this step's forward
         pass used (an inference copy: the step's activations stay for its backward pass); the
         time is left out of the step's training time */
      double tp0 = kdp_now();
      t0 += kdp_live_predict(t, flags[KDP_SYNC_PREDICT], flags[KDP_SYNC_PREDICT_FLOAT], 1);
      kdp_trace_mark(t, "predict", tp0, kdp_now());
    }
    kdp_step_loss sl;
    memset(t->dlogits, 0, bl * t->C * sizeof(float));
    int need_feat = t->uses_features_grad;
    if (need_feat) memset(t->dfeat, 0, bl * kdp_model_feature_dim(t->model) * sizeof(float));
    /* hybrid: each rank's CE is the mean over its slice; scale by bl/bg so that the allreduced sum
       is the mean over the global batch */
    float scale = (float)bl / (float)bg;
    t->cur_x = x;
    t->cur_yg = t->ybuf;
    t->cur_bg = bg;
    t->cur_lo = lo;
    t->cur_hi = hi;
    double tx0 = kdp_now();
    kdp_method_step(t, z, y, bl, step, epoch_f, scale, &sl);
    kdp_trace_mark(t, "exchange+kd", tx0, kdp_now());
    if (!isfinite(sl.ce))
      note_divergence(&pending_div, d->peer, step, "cross-entropy loss", sl.ce);
    else if (!isfinite(sl.kd))
      note_divergence(&pending_div, d->peer, step, "distillation loss", sl.kd);
    tc0 = kdp_now();
    if (bl) kdp_model_backward(t->model, t->dlogits, need_feat ? t->dfeat : NULL);
    t_compute += kdp_now() - tc0;
    kdp_trace_mark(t, "backward", tc0, kdp_now());
    double ta0 = kdp_now();
    kdp_buckets_finish(buckets); /* the peer's gradient allreduce, started during backward */
    kdp_method_after_backward(t);
    kdp_trace_mark(t, "allreduce", ta0, kdp_now());
    double lr = kdp_schedule_lr(&sch, step) * t->lr_scale;
    tc0 = kdp_now();
    kdp_sgd_step(&t->opt, params, grads, (float)lr);
    kdp_method_opt_step(t, (float)lr);
    t_compute += kdp_now() - tc0;
    kdp_trace_mark(t, "optimizer", tc0, kdp_now());
    t->train_time += kdp_now() - t0;
    kdp_live_step_time(t, kdp_now() - t0);
    t->step = step + 1;

    t->run_loss += sl.ce;
    t->run_kd += sl.kd;
    t->run_correct += sl.correct;
    t->run_n += bl;
    t->log_window++;
    int end_of_epoch = (step + 1) % (int64_t)spe == 0;
    int last = step + 1 == total;
    if ((step + 1) % cfg->log_every == 0 || last || end_of_epoch) {
      double sums[4] = {t->run_loss, t->run_kd, (double)t->run_correct, (double)t->run_n};
      kdp_dist_peer_allreduce_f64(d, sums, 4);
      {
        /* every peer's window figures, for /metrics and /status */
        int64_t w = t->log_window > 0 ? t->log_window : 1;
        double *pl = kdp_xcalloc((size_t)t->P * 3, sizeof(double));
        pl[3 * d->peer] = sums[0] / (double)w / (double)k;
        pl[3 * d->peer + 1] = sums[1] / (double)w / (double)k;
        pl[3 * d->peer + 2] = sums[3] > 0 ? sums[2] / sums[3] : 0;
        kdp_dist_cohort_allreduce_f64(d, pl, (size_t)t->P * 3);
        double ce[KDP_MAX_PEERS], kdv[KDP_MAX_PEERS], ac[KDP_MAX_PEERS];
        for (int p = 0; p < t->P && p < KDP_MAX_PEERS; p++) {
          ce[p] = pl[3 * p];
          kdv[p] = pl[3 * p + 1];
          ac[p] = pl[3 * p + 2];
        }
        kdp_live_peer_losses(t, ce, kdv, ac);
        free(pl);
      }
      if (t->is_root) {
        int64_t in_window = (step + 1) % cfg->log_every;
        if (in_window == 0 || end_of_epoch || last) in_window = t->log_window;
        kdp_progress_update(t, step + 1, epoch_f + 1.0 / (double)spe,
                            sums[0] / (double)in_window / (double)k,
                            sums[1] / (double)in_window / (double)k,
                            sums[3] > 0 ? sums[2] / sums[3] : 0, t->train_time, lr);
      }
      t->run_loss = t->run_kd = 0;
      t->run_correct = t->run_n = 0;
      t->log_window = 0;
    }
    int64_t ep_done = (step + 1) / (int64_t)spe;
    if ((end_of_epoch && ep_done % cfg->eval_every == 0) || last) {
      double te0 = kdp_now();
      evaluate(t, step + 1, (double)(step + 1) / (double)spe);
      kdp_trace_mark(t, "eval", te0, kdp_now());
    }
    int want = flags[KDP_SYNC_CKPT] || flags[KDP_SYNC_STOP] || last ||
               (cfg->ckpt_every_steps > 0 && (step + 1) % cfg->ckpt_every_steps == 0);
    /* control commands, at the step boundary, on every rank */
    int want_stop = flags[KDP_SYNC_STOP];
    if (flags[KDP_SYNC_CMD]) kdp_live_command(t, &want, &want_stop);
    /* While a client keeps sending predictions (one was answered in this step or at the last
       boundary), a prediction-only agreement point here as well: its next request, sent once
       the last reply arrived, need not wait for the next step's agreement point. Steps without
       predictions around skip it, so they cost what they did. */
    if (flags[KDP_SYNC_PREDICT] || predicting) {
      int32_t pf[2] = {0, 0};
      if (t->is_root) kdp_live_poll_predict(t, pf);
      kdp_dist_step_sync(d, pf, 2);
      if (pf[0]) {
        double tp0 = kdp_now();
        kdp_live_predict(t, pf[0], pf[1], 0);
        kdp_trace_mark(t, "predict", tp0, kdp_now());
      }
      predicting = pf[0] > 0;
    }
    rc = pause_loop(t, &want, &want_stop, err);
    if (rc != 0) break;
    if (t->is_root) kdp_live_publish(t, last);
    /* never checkpoint a diverged state: the next step's agreement point reports it */
    if (want && !kdp_dist_all_ok(d, !pending_div.peer_plus1 && all_finite(params, np))) want = 0;
    if (want) {
      double tk0 = kdp_now();
      rc = kdp_train_save(t, err);
      kdp_trace_mark(t, "checkpoint", tk0, kdp_now());
      if (rc != 0) break;
      t->last_ckpt_time = kdp_now();
      kdp_live_checkpointed(t);
    }
    if (want_stop) {
      stopped = 1;
      break;
    }
  }
  kdp_buckets_free(buckets);
  if (rc == 0 && stopped) {
    if (t->is_root) {
      fprintf(stderr, "kdpeers: stopped after step %lld; checkpoint written, rerun the "
                      "same command to resume\n", (long long)t->step);
      /* the last line of the log says so too (batch scripts read it when mpirun hides the 75) */
      kdp_metrics_event(t, "stop", t->step, (double)kdp_train_signal_count());
    }
    rc = kdp_fail(err, KDP_ESTOPPED, "stopped after step %lld", (long long)t->step);
  }
  if (rc == 0) {
    kdp_summary sm = {0};
    sm.steps = t->step;
    sm.steps_this_run = t->step - step0;
    sm.train_seconds = kdp_dist_max(d, t->train_time);
    sm.compute_seconds = t_compute;
    sm.exchange_seconds = d->t_exchange - ex0;
    sm.allreduce_seconds = d->t_allreduce - ar0;
    sm.wait_seconds = d->t_wait - wt0;
    sm.peak_rss_mb = kdp_dist_max(d, peak_rss_mb());
    double rss = 0, pss = 0;
    memory_now(&rss, &pss);
    sm.rss_mb_mean = kdp_dist_sum(d, rss) / (double)d->world_size;
    sm.pss_mb_total = kdp_dist_sum(d, pss);
    sm.bytes_per_step = t->step > step0 ? d->bytes_exchanged / (double)(t->step - step0) : 0;
    if (t->is_root) {
      kdp_metrics_summary(t, &sm);
      /* the learning curves, next to the metrics */
      char svg[KDP_PATH + 32], why[512];
      snprintf(svg, sizeof svg, "%s/curves.svg", cfg->dir);
      if (kdp_plot_run(cfg->dir, svg, why, sizeof why) != 0)
        fprintf(stderr, "kdpeers: warning: no learning curves: %s\n", why);
    }
  }
  if (rc == 0 || rc == KDP_ESTOPPED) {
    kdp_error terr;
    if (kdp_trace_finish(t, &terr) != 0) fprintf(stderr, "kdpeers: %s\n", terr.msg);
  }
done:
  kdp_trace_finish(t, NULL);
  kdp_stall_stop(t);
  kdp_live_stop(t);
  if (t->is_root) kdp_metrics_close(t);
  kdp_method_free(t);
  kdp_sgd_free(&t->opt);
  kdp_batcher_free(&t->batcher);
  kdp_model_free(t->model);
  kdp_dataset_free(&t->train);
  kdp_dataset_free(&t->test);
  kdp_dist_node_shared_free(t->data_win);
  free(t->xbuf);
  free(t->ybuf);
  free(t->dlogits);
  free(t->dfeat);
  return rc;
}

int kdp_train_run(const kdp_config *cfg, kdp_dist *d, const kdp_run_opts *opts, kdp_error *err) {
  int rc = run(cfg, d, opts, err);
  kdp_rundir_release_now();
  return rc;
}
