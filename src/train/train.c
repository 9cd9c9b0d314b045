/* train.c: a run: setup (data, model, distillation, resume), the loop of steps (step.c), their
   log, evaluation (eval.c) and boundary (boundary.c), and the finish (summary, release). */
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
  /* the validation split: the last data.val_size examples leave the training set (they stay in
     its buffer, right after train->n: kdp_train_val_view); label noise then touches only the
     training part, so the validation labels are the dataset's own */
  if (cfg->val_size > 0 && (size_t)cfg->val_size >= train->n) {
    int rc2 = kdp_fail(err, KDP_EINVAL,
                       "data.val_size = %lld leaves no training examples: the training set has "
                       "%zu (after data.subset)",
                       (long long)cfg->val_size, train->n);
    kdp_dataset_free(train);
    kdp_dataset_free(test);
    return rc2;
  }
  if (cfg->val_size > 0) train->n -= (size_t)cfg->val_size;
  if (cfg->label_noise > 0) kdp_dataset_label_noise(train, cfg->label_noise, cfg->noise_seed);
  return 0;
}

void kdp_train_val_view(const kdp_dataset *train, size_t n, kdp_dataset *val) {
  const size_t isz = train->H * train->W * train->C * kdp_dataset_elem(train);
  *val = (kdp_dataset){.n = n, .H = train->H, .W = train->W, .C = train->C,
                       .n_classes = train->n_classes, .images = train->images + train->n * isz,
                       .labels = train->labels + train->n, .owns = 0, .elem = train->elem};
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
  /* the training images and labels are followed by the validation split's (data.val_size) */
  const size_t n_tr = meta[0] + (size_t)t->cfg->val_size;
  size_t tr_img = n_tr * meta[1] * meta[2] * meta[3] * meta[10],
         te_img = meta[5] * meta[6] * meta[7] * meta[8] * meta[10];
  size_t total = tr_img + n_tr + te_img + meta[5];
  uint8_t *base = kdp_dist_node_shared(d, total, &t->data_win);
  if (d->local_rank == 0) {
    memcpy(base, tr.images, tr_img);
    memcpy(base + tr_img, tr.labels, n_tr);
    memcpy(base + tr_img + n_tr, te.images, te_img);
    memcpy(base + tr_img + n_tr + te_img, te.labels, meta[5]);
    kdp_dataset_free(&tr);
    kdp_dataset_free(&te);
  }
  kdp_dist_node_barrier(d);
  t->train = (kdp_dataset){.n = meta[0], .H = meta[1], .W = meta[2], .C = meta[3],
                           .n_classes = meta[4], .images = base, .labels = base + tr_img, .owns = 0,
                           .elem = meta[10], .class_names = names};
  t->test = (kdp_dataset){.n = meta[5], .H = meta[6], .W = meta[7], .C = meta[8],
                          .n_classes = meta[9], .images = base + tr_img + n_tr,
                          .labels = base + tr_img + n_tr + te_img, .owns = 0,
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
/* ---------------- signals ---------------- */

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


/* ---------------- setup ---------------- */

/* Frees the data of a setup that stopped before the model existed. */
static int drop_data(kdp_trainer *t, int rc) {
  kdp_dataset_free(&t->train);
  kdp_dataset_free(&t->test);
  kdp_dist_node_shared_free(t->data_win);
  return rc;
}

/* The batch layout, the data, the memory check, run.dir and the start-up agreement (config,
   dataset). Nothing is allocated or written unless every check passed. */
static int setup_data(kdp_trainer *t, const kdp_run_opts *opts, double *t_load, kdp_error *err) {
  const kdp_config *cfg = t->cfg;
  kdp_dist *d = t->d;
  int rc = 0;
  for (int p = 0; rc == 0 && p < d->n_peers; p++)
    if (cfg->batch_size % d->peer_k[p] != 0)
      rc = d->uniform
               ? kdp_fail(err, KDP_EINVAL,
                          "optim.batch_size = %d is not divisible by run.ranks_per_peer = %d: "
                          "each rank of a peer takes an equal slice of the batch",
                          cfg->batch_size, d->peer_k[p])
               : kdp_fail(err, KDP_EINVAL,
                          "optim.batch_size = %d is not divisible by peer %d's ranks_per_peer = "
                          "%d: each rank of a peer takes an equal slice of the batch",
                          cfg->batch_size, p, d->peer_k[p]);
  *t_load = kdp_now();
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
  *t_load = kdp_now() - *t_load;
  if (cfg->val_size > 0) kdp_train_val_view(&t->train, (size_t)cfg->val_size, &t->val);
  /* refuse a run that cannot fit before anything is allocated or written */
  kdp_memory_estimate *mem = kdp_xmalloc(sizeof *mem);
  rc = kdp_train_memory_estimate(cfg, d, &t->train, &t->test, mem, err);
  if (rc == 0) rc = kdp_train_memory_check(mem, err);
  free(mem);
  if (!kdp_dist_all_ok(d, rc == 0) && rc == 0)
    rc = kdp_fail(err, KDP_EINVAL, "the run does not fit the memory of another node");
  /* only now is run.dir created and locked: every refusal above wrote nothing */
  if (rc == 0) rc = kdp_rundir_open(cfg, d, opts && opts->serve_only, err);
  if (rc != 0) return drop_data(t, rc);
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
  return rc != 0 ? drop_data(t, rc) : 0;
}

/* The learning-rate schedule of cfg over steps_per_epoch-step epochs. */
static void setup_schedule(kdp_trainer *t) {
  const kdp_config *cfg = t->cfg;
  kdp_schedule *s = &t->sched;
  memset(s, 0, sizeof *s);
  s->kind = cfg->schedule_id == KDP_LR_COSINE      ? KDP_SCHEDULE_COSINE
            : cfg->schedule_id == KDP_LR_MULTISTEP ? KDP_SCHEDULE_MULTISTEP
                                                   : KDP_SCHEDULE_CONSTANT;
  s->base_lr = cfg->lr;
  /* the schedule spans the configured epochs; run.max_steps only stops early, so a short run
     trains exactly like the start of the full one */
  s->total_steps = (int64_t)cfg->epochs * t->steps_per_epoch;
  s->steps_per_epoch = t->steps_per_epoch;
  s->warmup_epochs = cfg->warmup_epochs;
  s->gamma = cfg->gamma;
  int nm = kdp_config_milestones(cfg, s->milestones, 16, NULL);
  s->n_milestones = nm > 0 ? nm : 0;
}

/* The peer's model and optimizer, the batcher, the distillation (kd.method), the schedule and
   the step's buffers. 0, or an error agreed over the world. */
static int setup_model(kdp_trainer *t, kdp_error *err) {
  const kdp_config *cfg = t->cfg;
  kdp_dist *d = t->d;
  int k = d->ranks_per_peer;
  t->C = t->train.n_classes;
  t->Bg = (size_t)cfg->batch_size;
  t->Bl = t->Bg / (size_t)k;
  for (size_t c = 0; c < 3; c++) {
    t->mean[c] = (float)cfg->mean[c];
    t->std[c] = (float)cfg->std[c];
  }
  kdp_input_shape ish = {t->train.H, t->train.W, t->train.C, t->C};
  size_t maxb = t->Bl > EVAL_BATCH ? t->Bl : EVAL_BATCH;
  int rc = kdp_frozen_check_cohort(cfg, t->P, err);
  if (rc == 0)
    rc = d->peer < KDP_MAX_PEERS && cfg->peer_teacher[d->peer][0]
             ? kdp_frozen_model(t, ish, maxb, err)
             : kdp_model_create(&t->model, kdp_config_peer_arch(cfg, d->peer), ish, maxb, err);
  if (!kdp_dist_all_ok(d, rc == 0)) {
    if (rc == 0) rc = kdp_fail(err, KDP_EINVAL, "another rank could not build its model");
    kdp_model_free(t->model);
    t->model = NULL;
    return drop_data(t, rc);
  }
  kdp_rng init_rng;
  /* for the tests: KDP_TEST_SAME_INIT=1 starts every peer from peer 0's weights (a cohort of
     identical peers, whose diversity must be 0) */
  const char *same = getenv("KDP_TEST_SAME_INIT");
  uint64_t init_peer = same && strcmp(same, "1") == 0 ? 0 : (uint64_t)d->peer;
  kdp_rng_seed(&init_rng, cfg->seed, KDP_STREAM_INIT + 16 * init_peer);
  if (!t->frozen) kdp_model_init(t->model, &init_rng); /* a frozen peer keeps its file's */
  kdp_rng_seed(&t->dropout_rng, cfg->seed, KDP_STREAM_DROPOUT + 16 * (uint64_t)d->world_rank);
  kdp_sgd_init(&t->opt, kdp_model_n_params(t->model), (float)cfg->momentum,
               (float)cfg->weight_decay, cfg->nesterov);
  kdp_batcher_init(&t->batcher, &t->train, t->Bg, cfg->seed, 1, 0);
  t->batcher.augment = cfg->augment;
  /* data.augment_per_peer: each peer its own crop and flip stream (peer 0's is the shared one) */
  if (cfg->augment_per_peer)
    kdp_rng_seed(&t->batcher.aug_rng, cfg->seed, KDP_STREAM_AUGMENT + 16 * (uint64_t)d->peer);
  t->batcher.crop_pad = (size_t)cfg->crop_pad;
  t->batcher.flip = cfg->flip;
  for (int c = 0; c < 3; c++) {
    t->batcher.mean[c] = t->mean[c];
    t->batcher.std[c] = t->std[c];
  }
  size_t isz = t->train.H * t->train.W * t->train.C, rows = t->Bg > EVAL_BATCH ? t->Bg : EVAL_BATCH;
  t->xbuf = kdp_falloc(rows * isz);
  t->ybuf = kdp_xcalloc(rows, sizeof(int32_t));
  t->div_step = -1;
  t->dlogits = kdp_falloc(t->Bl * t->C);
  t->dfeat = kdp_falloc(t->Bl * kdp_model_feature_dim(t->model));
  rc = kdp_distill_init(t, err);
  if (rc == 0) rc = kdp_train_ema_init(t, err);
  if (!kdp_dist_all_ok(d, rc == 0))
    return rc != 0 ? rc : kdp_fail(err, KDP_EINVAL, "another rank failed to set up the method");
  /* uniform layout: every rank of a peer needs a row of every batch, the epoch's last included */
  size_t tail = (t->batcher.hi - t->batcher.lo) % t->Bg;
  if (d->uniform && k > 1 && tail > 0 && tail < (size_t)k)
    rc = kdp_fail(err, KDP_EINVAL,
                  "the last batch of an epoch holds %zu example%s (%zu training examples, "
                  "optim.batch_size = %zu), fewer than run.ranks_per_peer = %d: every rank of a "
                  "peer needs at least one row; change data.subset or optim.batch_size",
                  tail, tail == 1 ? "" : "s", t->batcher.hi - t->batcher.lo, t->Bg, k);
  if (!kdp_dist_all_ok(d, rc == 0))
    return rc != 0 ? rc : kdp_fail(err, KDP_EINVAL, "another rank refused the batch layout");
  t->steps_per_epoch = (int64_t)kdp_batcher_n_batches(&t->batcher);
  int64_t total = (int64_t)cfg->epochs * t->steps_per_epoch;
  if (cfg->max_steps > 0 && cfg->max_steps < total) total = cfg->max_steps;
  t->total_steps = total;
  setup_schedule(t);
  return 0;
}

/* --fresh or resume, the metrics file, the server, the stall check, the timeline. */
static int start(kdp_trainer *t, const kdp_run_opts *opts, double t_load, kdp_error *err) {
  const kdp_config *cfg = t->cfg;
  kdp_dist *d = t->d;
  int rc = 0;
  if (t->is_root && opts && opts->fresh) rc = kdp_train_forget_checkpoints(cfg->dir, err);
  if (!kdp_dist_all_ok(d, rc == 0))
    return rc != 0 ? rc : kdp_fail(err, KDP_EIO, "rank 0 could not start over in run.dir");
  t->allow_change = opts ? opts->allow_change : 0;
  t->elastic = opts && opts->elastic && opts->elastic->step >= 0 ? opts->elastic : NULL;
  t->serve_only = opts ? opts->serve_only : 0;
  /* resume from the newest complete checkpoint, unless --fresh */
  int64_t metrics_offset = -1;
  if (!(opts && opts->fresh)) {
    int r = kdp_train_restore_latest(t, &metrics_offset, err);
    if (r < 0) return r;
    if (t->serve_only) {
      metrics_offset = -1; /* serving never rewrites the run's own log */
      if (r == 0) return kdp_fail(err, KDP_EIO, "kdpeers serve: %s holds no complete checkpoint",
                                  cfg->dir);
    }
  }
  if (t->is_root) {
    rc = kdp_metrics_open(t, metrics_offset, err);
    for (size_t i = 0; rc == 0 && i < t->n_changes; i++)
      kdp_metrics_config_change(t, t->changes[i].key, t->changes[i].old_value,
                                t->changes[i].new_value);
    if (rc == 0) kdp_progress_start(t, t_load);
  }
  if (!kdp_dist_all_ok(d, rc == 0))
    return rc != 0 ? rc : kdp_fail(err, KDP_EIO, "rank 0 could not open the metrics file");
  t->last_ckpt_time = kdp_now();
  rc = kdp_live_start(t, err);
  if (!kdp_dist_all_ok(d, rc == 0))
    return rc != 0 ? rc : kdp_fail(err, KDP_EIO, "rank 0 could not start the server");
  if (t->is_root && t->elastic && t->elastic->resized) kdp_elastic_announce(t, t->elastic);
  kdp_stall_start(t);
  t->step0 = t->step;
  kdp_trace_start(t);
  if (t->is_root && t->step >= t->total_steps && t->tty >= 0 && !t->serve_only)
    fprintf(stderr,
            "kdpeers: %s already holds a finished run (step %lld of %lld): nothing to train. Use "
            "--fresh to start over, another run.dir, or raise run.epochs with --allow-config-change to continue\n",
            cfg->dir, (long long)t->step, (long long)t->total_steps);
  return 0;
}

/* ---------------- the loop ---------------- */

/* The step's figures into the log window; at its end, every peer's figures for /metrics and
   the progress line. */
static void log_step(kdp_trainer *t, int64_t step, const kdp_step_result *r) {
  const kdp_config *cfg = t->cfg;
  kdp_dist *d = t->d;
  const int k = d->ranks_per_peer;
  t->run_loss += r->loss.ce;
  t->run_kd += r->loss.kd;
  t->run_contrast += r->loss.contrast;
  t->run_correct += r->loss.correct;
  t->run_n += r->rows;
  t->log_window++;
  int last = step + 1 == t->total_steps, end_of_epoch = (step + 1) % t->steps_per_epoch == 0;
  if (!((step + 1) % cfg->log_every == 0 || last || end_of_epoch)) return;
  double sums[4] = {t->run_loss, t->run_kd, (double)t->run_correct, (double)t->run_n};
  kdp_dist_peer_allreduce_f64(d, sums, 4);
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
  if (t->embed) { /* mcl's contrastive term, beside kd */
    double con[KDP_MAX_PEERS] = {0}, mine = t->run_contrast;
    kdp_dist_peer_allreduce_f64(d, &mine, 1);
    t->log_contrast = mine / (double)w / (double)k;
    if (t->P <= KDP_MAX_PEERS) {
      con[d->peer] = t->log_contrast;
      kdp_dist_cohort_allreduce_f64(d, con, (size_t)t->P);
      kdp_live_peer_contrast(t, con);
    }
    t->run_contrast = 0;
  }
  if (t->is_root) {
    int64_t in_window = (step + 1) % cfg->log_every;
    if (in_window == 0 || end_of_epoch || last) in_window = t->log_window;
    kdp_progress_update(t, step + 1, r->epoch + 1.0 / (double)t->steps_per_epoch,
                        sums[0] / (double)in_window / (double)k,
                        sums[1] / (double)in_window / (double)k,
                        sums[3] > 0 ? sums[2] / sums[3] : 0, t->train_time, r->lr);
  }
  t->run_loss = t->run_kd = 0;
  t->run_correct = t->run_n = 0;
  t->log_window = 0;
}

/* The steps from t->step to t->total_steps: step, log, evaluation, boundary. *stopped = 1 when
   a signal or a command stopped the run. */
static int loop(kdp_trainer *t, kdp_loop *L, int *stopped, kdp_error *err) {
  const kdp_config *cfg = t->cfg;
  const int64_t spe = t->steps_per_epoch;
  int rc = 0;
  for (int64_t step = t->step; step < t->total_steps; step++) {
    kdp_step_result r;
    rc = kdp_train_step(t, L, step, &r, err);
    if (rc == 1) { /* rolled back: the loop's ++ resumes at the restored step */
      step = t->step - 1;
      rc = 0;
      continue;
    }
    if (rc != 0) break;
    log_step(t, step, &r);
    kdp_distill_step_done(t, step);
    int last = step + 1 == t->total_steps, end_of_epoch = (step + 1) % spe == 0;
    if ((end_of_epoch && ((step + 1) / spe) % cfg->eval_every == 0) || last) {
      double te0 = kdp_now();
      rc = kdp_train_evaluate(t, step + 1, (double)(step + 1) / (double)spe, err);
      kdp_trace_mark(t, "eval", te0, kdp_now());
      if (rc != 0) break;
    }
    rc = kdp_boundary_end(t, L, step, &r, stopped, err);
    if (rc != 0 || *stopped) break;
  }
  return rc;
}

/* ---------------- finish ---------------- */

/* The run's summary line and the learning curves (rank 0). */
static void summary(kdp_trainer *t, const kdp_loop *L, const double *base) {
  kdp_dist *d = t->d;
  kdp_summary sm = {0};
  sm.steps = t->step;
  sm.steps_this_run = t->step - t->step0;
  sm.train_seconds = kdp_dist_max(d, t->train_time);
  sm.compute_seconds = L->t_compute;
  sm.exchange_seconds = d->t_exchange - base[0];
  sm.allreduce_seconds = d->t_allreduce - base[1];
  sm.wait_seconds = d->t_wait - base[2];
  sm.peak_rss_mb = kdp_dist_max(d, peak_rss_mb());
  double rss = 0, pss = 0;
  memory_now(&rss, &pss);
  sm.rss_mb_mean = kdp_dist_sum(d, rss) / (double)d->world_size;
  sm.pss_mb_total = kdp_dist_sum(d, pss);
  sm.bytes_per_step = t->step > t->step0 ? d->bytes_exchanged / (double)(t->step - t->step0) : 0;
  if (t->is_root) {
    kdp_metrics_summary(t, &sm);
    /* the learning curves, next to the metrics */
    char svg[KDP_PATH + 32], why[512];
    snprintf(svg, sizeof svg, "%s/curves.svg", t->cfg->dir);
    if (kdp_plot_run(t->cfg->dir, svg, why, sizeof why) != 0)
      fprintf(stderr, "kdpeers: warning: no learning curves: %s\n", why);
  }
}

static void release(kdp_trainer *t) {
  kdp_trace_finish(t, NULL);
  kdp_stall_stop(t);
  kdp_live_stop(t);
  if (t->is_root) kdp_metrics_close(t);
  kdp_distill_free(t);
  kdp_train_ema_free(t);
  free(t->resizes);
  t->resizes = NULL;
  kdp_sgd_free(&t->opt);
  kdp_batcher_free(&t->batcher);
  kdp_model_free(t->model);
  kdp_dataset_free(&t->train);
  kdp_dataset_free(&t->test);
  kdp_dist_node_shared_free(t->data_win);
  free(t->xbuf);
  free(t->ybuf);
  free(t->div_labels);
  free(t->div_cur);
  free(t->val_table);
  free(t->dlogits);
  free(t->dfeat);
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
  double t_load = 0;
  int rc = setup_data(t, opts, &t_load, err);
  if (rc != 0) return rc;
  rc = setup_model(t, err);
  if (rc != 0 && !t->model) return rc;
  if (rc == 0) rc = start(t, opts, t_load, err);
  if (rc == 0 && t->serve_only) {
    /* kdpeers serve: the restored peers answer until a stop command or a signal */
    int want = 0, want_stop = 0;
    t->paused = 1;
    kdp_live_publish(t, 1);
    rc = kdp_boundary_pause(t, &want, &want_stop, err);
  } else if (rc == 0) {
    kdp_loop L;
    kdp_loop_init(t, &L);
    double base[3] = {d->t_exchange, d->t_allreduce, d->t_wait};
    int stopped = 0;
    t->buckets = kdp_buckets_for_model(t->d, t->model, (size_t)cfg->bucket_kb,
                                       (kdp_grad_sum)cfg->grad_sum_id);
    /* the shared window: the sum fused with the SGD step (src/dist/buckets.c) */
    if (kdp_buckets_is_shm(t->buckets)) kdp_buckets_share_sgd(t->buckets, t->model, &t->opt);
    rc = loop(t, &L, &stopped, err);
    kdp_buckets_free(t->buckets);
    t->buckets = NULL;
    if (rc == 0 && stopped) {
      if (t->is_root) {
        fprintf(stderr, "kdpeers: stopped after step %lld; checkpoint written, rerun the "
                        "same command to resume\n", (long long)t->step);
        /* the last line of the log says so too (batch scripts read it when mpirun hides the 75) */
        kdp_metrics_event(t, "stop", t->step, (double)kdp_train_signal_count());
      }
      rc = kdp_fail(err, KDP_ESTOPPED, "stopped after step %lld", (long long)t->step);
    }
    if (rc == 0) summary(t, &L, base);
    if (rc == 0 || rc == KDP_ESTOPPED) {
      kdp_error terr;
      if (kdp_trace_finish(t, &terr) != 0) fprintf(stderr, "kdpeers: %s\n", terr.msg);
    }
  }
  release(t);
  return rc;
}

int kdp_train_run(const kdp_config *cfg, kdp_dist *d, const kdp_run_opts *opts, kdp_error *err) {
  int rc = run(cfg, d, opts, err);
  kdp_rundir_release_now();
  return rc;
}
