/* train_internal.h: state shared by the trainer's files (loop, methods glue, metrics, progress). */
#ifndef KDPEERS_TRAIN_INTERNAL_H
#define KDPEERS_TRAIN_INTERNAL_H

#include <stdio.h>

#include "kdpeers/config.h"
#include "kdpeers/data.h"
#include "kdpeers/dist.h"
#include "kdpeers/nn.h"
#include "kdpeers/train.h"

typedef struct kdp_step_loss {
  double ce, kd;  /* this rank's CE and distillation terms (mean over its slice) */
  double contrast; /* mcl: kd.contrast_weight x the contrastive bracket (not in kd); else 0 */
  size_t correct; /* argmax hits in the slice */
} kdp_step_loss;

typedef struct kdp_summary {
  int64_t steps, steps_this_run;
  double train_seconds, compute_seconds, exchange_seconds, allreduce_seconds, wait_seconds;
  double peak_rss_mb, bytes_per_step, rss_mb_mean, pss_mb_total;
} kdp_summary;

typedef struct kdp_trainer kdp_trainer;
typedef struct kdp_live kdp_live;
typedef struct kdp_trace kdp_trace;
typedef struct kdp_metrics_file kdp_metrics_file;

/* the per-step agreement point's flags (element-wise MAX over the world) */
enum {
  KDP_SYNC_DIVERGED, /* peer + 1 of a diverged rank */
  KDP_SYNC_STOP,     /* a signal: checkpoint and stop after this step */
  KDP_SYNC_CKPT,     /* rank 0's timer: checkpoint after this step */
  KDP_SYNC_CMD,      /* rank 0 holds a control command */
  KDP_SYNC_PREDICT,  /* rank 0 holds a prediction request of this many inputs */
  KDP_SYNC_PREDICT_FLOAT, /* ...with a value that is not a whole number (sent as floats) */
  KDP_SYNC_N
};
struct kdp_trainer {
  const kdp_config *cfg;
  kdp_dist *d;
  int P, is_root;
  size_t C, Bg, Bl;
  float mean[3], std[3];
  kdp_dataset train, test;
  kdp_dataset val; /* data.val_size: a view of the held-out tail of train's buffers (n = 0: none) */
  kdp_batcher batcher;
  kdp_model *model;
  kdp_sgd opt;
  kdp_rng dropout_rng;
  float *xbuf;
  int32_t *ybuf;
  float *dlogits, *dfeat;
  double lr_scale;
  double temperature, kd_weight; /* start as kd.temperature / kd.weight; /control can change them */
  int64_t step, total_steps, steps_per_epoch;
  kdp_schedule sched;
  /* distillation (distill.c, step.c): kd.method's ops (independent when P = 1), its cohort and replicated
     module, the module's optimizer, the pipeline that feeds it, codistill's stale copies */
  const struct kdp_method_ops *ops;
  struct kdp_cohort *cohort;
  kdp_pipeline *pipe;
  kdp_buckets *buckets; /* the peer's gradient allreduce in buckets (run.bucket_kb) */
  kdp_sgd mopt;
  struct kdp_stale *stale;
  const char *teacher_name; /* the method's own teacher, NULL without one */
  struct kdp_embed *embed;  /* mcl: this peer's embedding head (embedhead.c), else NULL */
  double run_contrast;      /* mcl: the log window's contrastive term (checkpointed) */
  double log_contrast;      /* mcl: its mean over the peer at the last log line */
  /* switokd: expert-mode steps and steps of the current epoch (checkpointed) */
  int64_t sw_expert, sw_steps;
  /* frozen.c: this rank's peer is a frozen model file (peer.N.teacher), its crc32 */
  int frozen;
  char frozen_crc[16];
  /* churn (eval.c, P >= 2): every peer's predicted labels on this rank's block rows of the test
     set at the evaluation of step div_step (-1: none yet), peer j's at div_labels[j * test.n ...],
     div_rows of them per peer; checkpointed */
  int32_t *div_labels, *div_cur;
  size_t div_rows;
  int64_t div_step;
  /* the teacher's logits for b eval-mode rows with logits z and pooled features h of a model
     built like t->model (collective over the cohort); 0 on success */
  int (*teacher_logits)(kdp_trainer *t, const float *z, const float *h, size_t b, float *out);
  kdp_live *live;
  void *data_win; /* the node's shared dataset window, or NULL */
  kdp_trace *trace; /* run.timeline */
  int paused;
  int64_t step0; /* the step this process started at */
  /* output (metrics.c) */
  kdp_metrics_file *metrics; /* run.dir/metrics.jsonl (rank 0), NULL when not open */
  int tty;
  double t_start, last_print;
  double last_acc[4];
  /* accumulators of the current log window and timers, checkpointed for exact resume */
  double run_loss, run_kd, train_time;
  uint64_t run_correct, run_n;
  int64_t log_window; /* steps in the current log window */
  int allow_change; /* --allow-config-change */
  int serve_only;   /* kdpeers serve */
  int n_rollbacks;
#define KDP_MAX_CHANGES 32
  struct {
    char key[KDP_PATH], old_value[KDP_PATH], new_value[KDP_PATH];
  } changes[KDP_MAX_CHANGES]; /* config changes accepted at resume, logged once metrics open */
  size_t n_changes;
  double last_ckpt_time;
  /* elastic resume (elastic.c): --resume-as's plan, and the run's resizes so far (a JSON array,
     kept in every checkpoint; NULL = none) */
  const kdp_elastic *elastic;
  char *resizes;
  /* run.ema_decay (ema.c): this rank's temporal mean of its peer (parameters and batchnorm
     running statistics) in a model of the peer's arch, NULL when off; pcl's mean teacher */
  kdp_model *ema;
  double ema_decay;
  int64_t ema_steps; /* updates so far (t of kdp_ema_update) */
  float *ema_save;   /* pcl: the EMA's running statistics around its train-mode forward */
  kdp_rng ema_rng;   /* pcl: the dropout of that forward */
  /* the last evaluation's validation accuracies (rank 0, data.val_size): "MODEL ACC\n" per model
     reported with one (kdp_metrics_eval_val), at step val_step; checkpointed for export --best */
  char *val_table;
  int64_t val_step;
};

/* distill.c: the distillation state (kd.method's ops, cohort, module optimizer, pipeline,
   stale copies) and its part of the checkpoint */
int kdp_distill_init(kdp_trainer *t, kdp_error *err);
void kdp_distill_free(kdp_trainer *t);
/* What a step left for the log and the step boundary. */
typedef struct kdp_step_result {
  kdp_step_loss loss;
  int32_t flags[KDP_SYNC_N]; /* the step's agreement point */
  size_t rows;               /* this rank's rows of the batch */
  double epoch, lr, t0;      /* fractional epoch; the lr used; when the step began */
} kdp_step_result;
/* The step's state that outlives it: the first divergence not yet agreed, fault injection. */
typedef struct kdp_loop {
  struct {
    int peer_plus1;
    int64_t step;
    const char *term;
    double value;
  } div;
  int64_t signal_at, nan_at, stop_at; /* fault injection (docs/testing.md), -1 = never */
  int64_t stop_exchange_at;
  int predicting;                     /* a prediction was answered at the last boundary */
  double t_compute;
} kdp_loop;
/* step.c: one training step */
/* Notes the first divergence of this rank (reported at the next agreement point). */
void kdp_loop_diverged(kdp_loop *L, int peer, int64_t step, const char *term, double value);
/* One optimizer step (collective): batch, forward, the agreement point (kdp_boundary_agree),
   distillation, backward, gradient allreduce, SGD. Returns 0, 1 when the agreement point rolled
   the run back (t->step is the restored step) or a negative error. */
int kdp_train_step(kdp_trainer *t, kdp_loop *L, int64_t step, kdp_step_result *r,
                   kdp_error *err);
/* The gradients' allreduce of a step: the peer's gradient arena within the peer (data
   parallelism; in buckets started during the backward pass, t->buckets), the replicated
   module's over the world. shm_lr >= 0: the peer's sum over the shared window fused with its SGD
   step at that lr (kdp_buckets_finish_sgd). */
void kdp_train_allreduce(kdp_trainer *t, float shm_lr);
/* The method's own state (replicated module, its optimizer, stale peer copies) into / out of
   this rank's checkpoint file. */
struct kdp_ckpt_writer;
struct kdp_ckpt;
int kdp_distill_save(kdp_trainer *t, struct kdp_ckpt_writer *w, kdp_error *err);
int kdp_distill_load(kdp_trainer *t, const struct kdp_ckpt *ck, kdp_error *err);

/* embedhead.c: mcl's embedding head of this rank's peer (its parameters, gradient, SGD and
   checkpoint part; none for other methods). */
typedef struct kdp_embed kdp_embed;
int kdp_embed_create(kdp_trainer *t, kdp_error *err); /* after the cohort; nothing unless mcl */
void kdp_embed_free(kdp_trainer *t);
size_t kdp_embed_n_params(const kdp_trainer *t); /* 0 without a head */
/* forward on this rank's n rows of the model's pooled features: *v (n x E) for the pipeline, *dv
   zeroed for its dJ/dv; the head's gradient zeroed */
void kdp_embed_forward(kdp_trainer *t, size_t n, const float **v, float **dv);
/* backward from *dv: the head's gradient, and dJ/dh added into dfeat (n x d) */
void kdp_embed_backward(kdp_trainer *t, size_t n, float *dfeat);
void kdp_embed_allreduce(kdp_trainer *t); /* the head's gradient summed over the peer's ranks */
void kdp_embed_sgd(kdp_trainer *t, float lr);
int kdp_embed_save(kdp_trainer *t, struct kdp_ckpt_writer *w, kdp_error *err);
int kdp_embed_load(kdp_trainer *t, const struct kdp_ckpt *ck, kdp_error *err);
/* 1 if peer p is a teacher rather than a student: switokd's kd.teacher_peer, or a frozen peer
   (peer.N.teacher); the "students" eval line is the mean of the others */
int kdp_distill_is_teacher(const kdp_trainer *t, int p);
/* switokd: counts the step's mode (every rank); at the end of an epoch (or of the run) rank 0
   writes the epoch's expert-mode fraction and the counts start over */
void kdp_distill_step_done(kdp_trainer *t, int64_t step);

/* frozen.c: a frozen peer (peer.N.teacher) */
/* Builds t->model from the peer's model file (its arch and weights), checked against the data
   (input shape, classes, normalisation) and peer.N.arch; sets t->frozen and the file's crc32. */
int kdp_frozen_model(kdp_trainer *t, kdp_input_shape ish, size_t max_batch, kdp_error *err);
/* peer.N.teacher only for peers of this cohort, and not for all of them */
int kdp_frozen_check_cohort(const kdp_config *cfg, int P, kdp_error *err);
/* "frozen.teacher" and "frozen.crc32" into the checkpoint; on resume the crc32 must match */
int kdp_frozen_save(kdp_trainer *t, struct kdp_ckpt_writer *w, kdp_error *err);
int kdp_frozen_load(kdp_trainer *t, const struct kdp_ckpt *ck, kdp_error *err);

/* stale.c: codistill's weights mode (kd.exchange = weights): each peer trains on its own shard
   and computes the other peers' logits from stale copies of them, refreshed every
   kd.exchange_every steps by a gather of every peer's parameters. */
typedef struct kdp_stale kdp_stale;
int kdp_stale_create(kdp_stale **out, kdp_trainer *t, kdp_error *err);
void kdp_stale_free(kdp_stale *s);
/* every peer's logits on this rank's rows x (n rows): P x n x C, peer me's are z */
const float *kdp_stale_logits(kdp_stale *s, kdp_trainer *t, int64_t step, const float *x,
                              const float *z, size_t n);
int kdp_stale_save(kdp_stale *s, struct kdp_ckpt_writer *w, kdp_error *err);
int kdp_stale_load(kdp_stale *s, const struct kdp_ckpt *ck, kdp_error *err);
/* --resume-as: the kept peers' stale copies from the old cohort's checkpoint (the new cohort's
   order); then, once every rank has restored its state (collective), kdp_stale_resize_finish
   makes a new peer's copy its weights now */
int kdp_stale_load_resized(kdp_stale *s, kdp_trainer *t, const kdp_elastic *e,
                           const struct kdp_ckpt *ck, kdp_error *err);
void kdp_stale_resize_finish(kdp_stale *s, kdp_trainer *t);

/* eval.c: evaluates every peer, the ensemble and the method's teacher on the test set and
   writes their eval lines (collective) */
int kdp_train_evaluate(kdp_trainer *t, int64_t step, double epoch, kdp_error *err);

/* ema.c: run.ema_decay's temporal mean of each peer (pcl's mean teacher) */
/* The decay in effect: run.ema_decay, or KDP_PCL_EMA_DECAY for pcl when it is 0; 0 = off. */
double kdp_ema_decay_of(const kdp_config *cfg, int P);
/* Builds t->ema as a copy of the peer (after its init); nothing when the decay is 0. */
int kdp_train_ema_init(kdp_trainer *t, kdp_error *err);
void kdp_train_ema_free(kdp_trainer *t);
/* The EMA restarts as a copy of the peer's weights and running statistics (t = 0). */
void kdp_train_ema_reset(kdp_trainer *t);
/* After an optimizer step: one kdp_ema_update of the parameters and of the running statistics. */
void kdp_train_ema_update(kdp_trainer *t);
/* pcl: the mean teacher's train-mode logits on n rows x (batch statistics; its running
   statistics are left as they were). Valid until the next call. */
const float *kdp_train_ema_forward(kdp_trainer *t, const float *x, size_t n);
/* ema.params, ema.buffers, ema.steps (and pcl's rng.ema) into / out of this rank's checkpoint.
   load: fresh = 1 (a new peer of an elastic resume, or a checkpoint without them) resets. */
int kdp_train_ema_save(kdp_trainer *t, struct kdp_ckpt_writer *w, kdp_error *err);
int kdp_train_ema_load(kdp_trainer *t, const struct kdp_ckpt *ck, int fresh, kdp_error *err);

/* boundary.c: the step boundary */
/* The step's agreement point (collective): this rank's flags (divergence of the logits z of its
   n rows or of its parameters, a signal, rank 0's checkpoint timer, control and prediction
   requests) are MAXed over the world into r->flags; an agreed prediction is answered. Returns
   1 after a rollback, 0, or a negative error. */
int kdp_boundary_agree(kdp_trainer *t, kdp_loop *L, int64_t step, const float *z, size_t n,
                       kdp_step_result *r, kdp_error *err);
/* After the step's log and evaluation: control commands, predictions, the pause loop, the
   checkpoint. *stop = 1 when the run stops after this step. */
int kdp_boundary_end(kdp_trainer *t, kdp_loop *L, int64_t step, const kdp_step_result *r,
                     int *stop, kdp_error *err);
/* While paused or serving only: commands, predictions and signals (collective). */
int kdp_boundary_pause(kdp_trainer *t, int *want_ckpt, int *want_stop, kdp_error *err);
void kdp_loop_init(const kdp_trainer *t, kdp_loop *L);
/* KDP_FAULT_STOP_AT_STEP=N:R[:WHERE] (tests): where a rank stops itself with SIGSTOP */
enum { KDP_FAULT_STOP_AGREE, KDP_FAULT_STOP_EXCHANGE, KDP_FAULT_STOP_CKPT, KDP_FAULT_STOP_EVAL };
/* the step at which this rank stops at WHERE, or -1 */
int64_t kdp_fault_stop_step(const kdp_dist *d, int where);
/* raises SIGSTOP when this rank stops at WHERE at this step */
void kdp_fault_stop(const kdp_dist *d, int where, int64_t step);

/* checkpoint.c */
/* Writes a checkpoint of the state after t->step steps (collective). */
int kdp_train_save(kdp_trainer *t, kdp_error *err);
/* Restores the newest complete checkpoint if there is one (collective). Returns 1 if restored,
   0 if there was none, negative on error. */
int kdp_train_restore_latest(kdp_trainer *t, int64_t *metrics_offset, kdp_error *err);
/* The checkpoint's config text against this run's: 0 if it may resume (changes allowed by
   --allow-config-change, and keys the checkpoint predates that this run keeps at their default,
   are added to t->changes on rank 0); KDP_EMISMATCH with the key in err otherwise. */
int kdp_ckpt_compare_configs(kdp_trainer *t, const char *saved, const char *now, kdp_error *err);
/* --fresh: removes run.dir/checkpoints (rank 0) and truncates metrics.jsonl. */
int kdp_train_forget_checkpoints(const char *dir, kdp_error *err);

/* elastic.c: --resume-as */
enum { KDP_ELASTIC_KEPT, KDP_ELASTIC_NEW, KDP_ELASTIC_CLONE };
/* The old world rank whose checkpoint file this rank (peer, slice) resumes from, and its role:
   a kept peer's own state, a new peer's (only the shared state: data position, module), a
   clone's (its source's weights, then kdp_elastic_perturb). */
int kdp_elastic_source(const kdp_elastic *e, int peer, int slice, int *role);
void kdp_elastic_perturb(kdp_trainer *t, const kdp_elastic *e);
/* The replicated module from the old cohort's checkpoint, remapped to this one (logged). */
int kdp_elastic_load_module(kdp_trainer *t, const kdp_elastic *e, const struct kdp_ckpt *ck,
                            kdp_error *err);
/* Appends this resize to t->resizes (the checkpoint's history). */
void kdp_elastic_record(kdp_trainer *t, const kdp_elastic *e);
/* {"event":"resize",...} in metrics.jsonl and the dashboard's history (rank 0, metrics open). */
void kdp_elastic_announce(kdp_trainer *t, const kdp_elastic *e);

/* rundir.c: before anything is written (collective): rank 0 checks server.listen, creates
   run.dir and, unless serve_only, locks it (KDP_EBUSY naming the holder when another run has
   it). The lock is released when the process ends; kdp_rundir_release_now also empties the lock
   file (a clean end; async-signal-safe). */
int kdp_rundir_open(const kdp_config *cfg, kdp_dist *d, int serve_only, kdp_error *err);
void kdp_rundir_release_now(void);

/* stall.c: the stall check (run.stall_warn_seconds, run.stall_abort_seconds): a watchdog thread
   and t->d's wait hook at the agreement point; kdp_stall_stop ends both. */
void kdp_stall_start(kdp_trainer *t);
void kdp_stall_stop(kdp_trainer *t);

/* live.c (the rank-0 server's trainer side) */
int kdp_live_start(kdp_trainer *t, kdp_error *err);
void kdp_live_stop(kdp_trainer *t);
void kdp_live_step_time(kdp_trainer *t, double seconds);
void kdp_live_peer_losses(kdp_trainer *t, const double *ce, const double *kd, const double *acc);
/* mcl: every peer's weighted contrastive loss of the last log window (/metrics, /status) */
void kdp_live_peer_contrast(kdp_trainer *t, const double *contrast);
void kdp_live_checkpointed(kdp_trainer *t);
/* The dashboard's history (rank 0; no-ops elsewhere or without a server). kdp_live_series adds
   one point to any series: a new chart id or series name shows on the page as it is (e.g.
   kdp_live_series(t, "diversity", "disagreement", step, v), or "test_accuracy", "peer0.ema").
   The others are called by metrics.c: a log line (learning rate, steps/s, the time split), an
   evaluation's figures, and events (checkpoint, control, rollback, stop, ...). */
void kdp_live_series(kdp_trainer *t, const char *chart, const char *name, int64_t step,
                     double value);
void kdp_live_progress(kdp_trainer *t, int64_t step, double lr);
void kdp_live_eval(kdp_trainer *t, int64_t step, const char *model, double acc, double loss);
void kdp_live_event(kdp_trainer *t, const char *kind, int64_t step, const char *text);
/* /healthz answers 503 with this reason and kdpeers_stalled is 1 (NULL: healthy again). Safe
   from any thread (the stall check's watchdog calls it). */
void kdp_live_stalled(kdp_trainer *t, const char *reason);
void kdp_live_publish(kdp_trainer *t, int force);
void kdp_live_poll(kdp_trainer *t, int32_t *flags);
void kdp_live_command(kdp_trainer *t, int *want_ckpt, int *want_stop);
/* Rank 0: takes a pending prediction (if it holds none): pf[0] = its input count (0 if none),
   pf[1] = 1 if a value is not a whole number (like flags[KDP_SYNC_PREDICT...]). */
void kdp_live_poll_predict(kdp_trainer *t, int32_t pf[2]);
/* Answers the prediction of n inputs agreed at this agreement point (collective over the world);
   the pixels are broadcast as bytes unless float_inputs. mid_step = 1: called between a training
   forward pass and its backward pass, so the peers' current weights are copied into a separate
   inference model and t->model and t->xbuf are left alone. Returns the seconds spent. */
double kdp_live_predict(kdp_trainer *t, int n, int float_inputs, int mid_step);

/* trace.c (run.timeline): phases as Chrome-trace complete events */
void kdp_trace_start(kdp_trainer *t);
void kdp_trace_mark(kdp_trainer *t, const char *name, double t0, double t1);
int kdp_trace_finish(kdp_trainer *t, kdp_error *err);

/* metrics.c */
/* a JSON string (escaped) / number (null for NaN and Inf) */
void kdp_json_str(FILE *f, const char *s);
void kdp_json_num(FILE *f, double v);
/* a JSON array of n numbers (as kdp_json_num) */
void kdp_json_nums(FILE *f, const double *v, int n);
/* 1 if the run has a distillation loss (more than one peer, a method other than independent) */
int kdp_metrics_distils(const kdp_trainer *t);
/* the most models one evaluation reports: every peer and its EMA copy (run.ema_decay), and the
   cohort's ensemble, students' mean and teacher; the tables of the last evaluation hold them all */
#define KDP_EVAL_ROWS_MAX (2 * KDP_MAX_PEERS + 8)
/* the last evaluation's figures, by model name; returns the count */
int kdp_metrics_last_evals(const char **names, double *accs, double *losses, int max);
/* {"event":"control",...}; NaN values are left out */
void kdp_metrics_control(kdp_trainer *t, uint64_t id, const char *action, double lr_scale,
                         double temperature, double kd_weight);
/* opens run.dir/metrics.jsonl for appending; truncate_at >= 0 first cuts it there (resume). Every
   line is written whole with one write(2); a write that fails is counted and warned about once,
   and training goes on. */
int kdp_metrics_open(kdp_trainer *t, int64_t truncate_at, kdp_error *err);
/* one whole line of JSON (with its newline), as it is */
void kdp_metrics_line(kdp_trainer *t, const char *json);
/* {"event":NAME,"step":S,"value":V} */
void kdp_metrics_event(kdp_trainer *t, const char *name, int64_t step, double value);
void kdp_metrics_config_change(kdp_trainer *t, const char *key, const char *old_value,
                               const char *new_value);
/* current byte offset of metrics.jsonl (synced to disk), for checkpoints */
int64_t kdp_metrics_offset(kdp_trainer *t);
/* lines of metrics.jsonl that could not be written (a full disk, ...) */
uint64_t kdp_metrics_lost(const kdp_trainer *t);
void kdp_metrics_close(kdp_trainer *t);
void kdp_metrics_eval(kdp_trainer *t, int64_t step, double epoch, const char *model, double acc,
                      double loss);
/* The same with the model's validation accuracy and loss (data.val_size; NaN: none, as
   kdp_metrics_eval): the eval line gains "val_acc" and "val_loss", /metrics and /status show
   them, and the model joins t->val_table (export --best's candidates). */
void kdp_metrics_eval_val(kdp_trainer *t, int64_t step, double epoch, const char *model,
                          double acc, double loss, double val_acc, double val_loss);
/* the last evaluation's validation figures, by model name (models without any left out) */
int kdp_metrics_last_val(const char **names, double *accs, double *losses, int max);
/* {"event":"diversity","epoch":E,"step":S,"kl":K,"disagreement":D[,"churn":[c0,...]]} (churn left
   out when NULL: the first evaluation), the dashboard's "diversity" chart, and the figures
   /metrics and /status show (kdp_metrics_last_diversity: 0 before the first evaluation, else
   the churn count, which may be 0, and the figures) */
void kdp_metrics_diversity(kdp_trainer *t, int64_t step, double epoch, double kl,
                           double disagreement, const double *churn, int P);
int kdp_metrics_last_diversity(double *kl, double *disagreement, double *churn, int *n_churn);
/* What /metrics and /status show as the last evaluation, without a metrics.jsonl line or a chart
   point: kdp_metrics_eval_val and kdp_metrics_diversity call them, and a resumed run (or
   kdpeers serve) seeds them from the evaluations metrics.jsonl holds (live.c seed_history), so
   the gauges are there from the first scrape rather than from the next evaluation. */
void kdp_metrics_set_last_eval(const char *model, double acc, double loss, double val_acc,
                               double val_loss);
void kdp_metrics_set_last_diversity(double kl, double disagreement, const double *churn, int P);
void kdp_metrics_set_last_switokd(double fraction, double epoch);
/* switokd: {"event":"switokd","epoch":E,"step":S,"expert_steps":K,"steps":N,"expert_fraction":F}
   at the end of each epoch, the dashboard's "switokd" chart, and the figure /metrics and /status
   show (kdp_metrics_last_switokd: 0 before the first epoch's end) */
void kdp_metrics_switokd(kdp_trainer *t, int64_t step, double epoch, int64_t expert,
                         int64_t steps);
int kdp_metrics_last_switokd(double *fraction, double *epoch);
void kdp_metrics_summary(kdp_trainer *t, const kdp_summary *s);
void kdp_progress_start(kdp_trainer *t, double load_seconds);
/* 1 when the launcher's stderr is a terminal (KDP_TTY_COLUMNS, set by launch/kdpeers-local):
   rank 0 then draws the bar although mpirun pipes its stderr */
int kdp_progress_launcher_tty(void);
void kdp_progress_update(kdp_trainer *t, int64_t step, double epoch, double loss, double kd,
                         double acc, double train_seconds, double lr);


#endif
