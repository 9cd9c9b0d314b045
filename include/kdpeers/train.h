/* train.h: the training run: data, peers, the step loop, evaluation, metrics and progress output. */
#ifndef KDPEERS_TRAIN_H
#define KDPEERS_TRAIN_H

#include "kdpeers/config.h"
#include "kdpeers/dist.h"

/* Runs the job described by cfg on the layout d (kdp_dist_setup done). Rank 0 prints progress and
   writes run.dir/metrics.jsonl. Returns 0 or a negative code with err set (same on all ranks
   where the failure is collective). */
typedef struct kdp_run_opts {
  int fresh;        /* --fresh: ignore and delete old checkpoints, truncate metrics.jsonl */
  int allow_change; /* --allow-config-change: resume although non-structural keys changed */
  int serve_only;   /* kdpeers serve: restore the newest checkpoint and only serve (no steps);
                       control and prediction logs go to run.dir/serve.jsonl */
} kdp_run_opts;
int kdp_train_run(const kdp_config *cfg, kdp_dist *d, const kdp_run_opts *opts, kdp_error *err);

/* Threads of this rank's step (kdp_nn_set_threads): cfg->threads, else the cores this process
   is bound to when that is fewer than the node's, else cores / ranks on this node (at least 1). */
/* Loads the train and test sets named by data.*, then applies subset, test_subset and label
   noise. */
struct kdp_dataset;
int kdp_train_load_data(const kdp_config *cfg, struct kdp_dataset *train,
                        struct kdp_dataset *test, kdp_error *err);

/* Exit statuses batch scripts rely on (see README): */
#define KDP_EXIT_PREEMPTED 75   /* a signal: checkpointed at a step boundary; requeue and rerun */
#define KDP_EXIT_SIGNAL_NOW 143 /* a second signal: exited at once, no checkpoint */

/* SIGTERM, SIGUSR1, SIGINT: the first asks for a checkpoint and exit at the next step boundary;
   a second one exits at once. */
void kdp_train_install_signals(void);
int kdp_train_signal_count(void);

int kdp_train_blas_threads(const kdp_config *cfg, const kdp_dist *d);

#endif
