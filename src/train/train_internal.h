/* train_internal.h: state shared by the trainer's files (loop, methods glue, metrics, progress). */
#ifndef KDPEERS_TRAIN_INTERNAL_H
#define KDPEERS_TRAIN_INTERNAL_H

#include <stdio.h>

#include "kdpeers/config.h"
#include "kdpeers/data.h"
#include "kdpeers/dist.h"
#include "kdpeers/nn.h"

typedef struct kdp_step_loss {
  double ce, kd;  /* this rank's CE and distillation terms (mean over its slice) */
  size_t correct; /* argmax hits in the slice */
} kdp_step_loss;

typedef struct kdp_summary {
  int64_t steps;
  double train_seconds, compute_seconds, exchange_seconds, allreduce_seconds, wait_seconds;
  double peak_rss_mb, bytes_per_step;
} kdp_summary;

typedef struct kdp_trainer kdp_trainer;
struct kdp_trainer {
  const kdp_config *cfg;
  kdp_dist *d;
  int P, is_root;
  size_t C, Bg, Bl;
  float mean[3], std[3];
  kdp_dataset train, test;
  kdp_batcher batcher;
  kdp_model *model;
  kdp_sgd opt;
  kdp_rng dropout_rng;
  float *xbuf;
  int32_t *ybuf;
  float *dlogits, *dfeat;
  const float *cur_x;     /* this rank's slice of the current batch (codistill weights mode) */
  int uses_features_grad;
  double lr_scale;
  int64_t step, total_steps, steps_per_epoch;
  /* method state (methods.c) */
  void *method;
  const char *teacher_name;
  /* evaluates the method's teacher on an eval batch whose peer logits are z (collective over the
     cohort); adds the summed loss and the hit count */
  void (*teacher_eval)(kdp_trainer *t, const float *z, size_t b, double *loss, size_t *correct);
  /* output (metrics.c) */
  FILE *metrics;
  int tty;
  double t_start, last_print;
  double last_acc[4];
};

/* methods.c */
int kdp_method_init(kdp_trainer *t, kdp_error *err);
/* Computes this rank's loss for the batch slice (z: this peer's logits, y its labels) and writes
   t->dlogits (and t->dfeat when uses_features_grad) scaled by `scale`. */
void kdp_method_step(kdp_trainer *t, const float *z, const int32_t *y, size_t b, int64_t step,
                     double epoch, float scale, kdp_step_loss *out);
void kdp_method_after_backward(kdp_trainer *t);
void kdp_method_opt_step(kdp_trainer *t, float lr);
void kdp_method_free(kdp_trainer *t);

/* metrics.c */
int kdp_metrics_open(kdp_trainer *t, kdp_error *err);
void kdp_metrics_close(kdp_trainer *t);
void kdp_metrics_eval(kdp_trainer *t, int64_t step, double epoch, const char *model, double acc,
                      double loss);
void kdp_metrics_summary(kdp_trainer *t, const kdp_summary *s);
void kdp_progress_start(kdp_trainer *t, double load_seconds);
void kdp_progress_update(kdp_trainer *t, int64_t step, double epoch, double loss, double kd,
                         double acc, double train_seconds, double lr);


#endif
