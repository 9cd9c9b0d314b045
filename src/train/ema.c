/* ema.c: run.ema_decay: every rank keeps a temporal mean (EMA) of its peer, parameters and
   batchnorm running statistics alike, updated after every optimizer step with kdp_ema_update
   (src/kd/ema.c, PyTorch's bits) and evaluated as peerN.ema. pcl reads it as the peer's mean
   teacher (its train-mode logits on the step's batch). Each rank of a peer holds its own copy:
   the parameters are the same on all of them, the running statistics are the rank's own, as
   the peer's are (docs/design.md). */
#include <stdlib.h>
#include <string.h>

#include "kdpeers/ckpt.h"
#include "kdpeers/kd.h"
#include "train_internal.h"

double kdp_ema_decay_of(const kdp_config *cfg, int P) {
  if (cfg->ema_decay > 0) return cfg->ema_decay;
  return P > 1 && cfg->method_id == KDP_METHOD_PCL ? KDP_PCL_EMA_DECAY : 0.0;
}

static int is_teacher(const kdp_trainer *t) {
  return t->ops && (t->ops->peer_reads & KDP_READS_EMA_LOGITS);
}

int kdp_train_ema_init(kdp_trainer *t, kdp_error *err) {
  t->ema_decay = kdp_ema_decay_of(t->cfg, t->P);
  if (t->ema_decay <= 0) return 0;
  kdp_input_shape ish = {t->train.H, t->train.W, t->train.C, t->C};
  size_t maxb = t->Bl > KDP_TRAIN_EVAL_BATCH ? t->Bl : KDP_TRAIN_EVAL_BATCH;
  /* pcl runs it forward in train mode (batch statistics): a full model; else eval only */
  int rc = is_teacher(t) ? kdp_model_create(&t->ema, kdp_model_arch(t->model), ish, maxb, err)
                         : kdp_model_create_infer(&t->ema, kdp_model_arch(t->model), ish, maxb,
                                                  err);
  if (rc != 0) return rc;
  size_t nb = kdp_model_n_buffers(t->model);
  if (is_teacher(t)) {
    t->ema_save = kdp_falloc(nb ? nb : 1);
    kdp_rng_seed(&t->ema_rng, t->cfg->seed, KDP_STREAM_EMA + 16 * (uint64_t)t->d->world_rank);
  }
  kdp_train_ema_reset(t);
  return 0;
}

void kdp_train_ema_free(kdp_trainer *t) {
  kdp_model_free(t->ema);
  free(t->ema_save);
  t->ema = NULL;
  t->ema_save = NULL;
}

void kdp_train_ema_reset(kdp_trainer *t) {
  if (!t->ema) return;
  memcpy(kdp_model_params(t->ema), kdp_model_params(t->model),
         kdp_model_n_params(t->model) * sizeof(float));
  size_t nb = kdp_model_n_buffers(t->model);
  if (nb) memcpy(kdp_model_buffers(t->ema), kdp_model_buffers(t->model), nb * sizeof(float));
  t->ema_steps = 0;
}

void kdp_train_ema_update(kdp_trainer *t) {
  if (!t->ema) return;
  t->ema_steps++;
  kdp_ema_update(kdp_model_params(t->ema), kdp_model_params(t->model),
                 kdp_model_n_params(t->model), t->ema_decay, t->ema_steps);
  size_t nb = kdp_model_n_buffers(t->model);
  if (nb)
    kdp_ema_update(kdp_model_buffers(t->ema), kdp_model_buffers(t->model), nb, t->ema_decay,
                   t->ema_steps);
}

const float *kdp_train_ema_forward(kdp_trainer *t, const float *x, size_t n) {
  size_t nb = kdp_model_n_buffers(t->ema);
  if (nb) memcpy(t->ema_save, kdp_model_buffers(t->ema), nb * sizeof(float));
  const float *z = kdp_model_forward(t->ema, x, n, 1, &t->ema_rng);
  if (nb) memcpy(kdp_model_buffers(t->ema), t->ema_save, nb * sizeof(float));
  return z;
}

int kdp_train_ema_save(kdp_trainer *t, kdp_ckpt_writer *w, kdp_error *err) {
  if (!t->ema) return 0;
  size_t np = kdp_model_n_params(t->ema), nb = kdp_model_n_buffers(t->ema);
  int rc = kdp_ckpt_put_f32(w, "ema.params", kdp_model_params(t->ema), 1, &np, err);
  if (rc == 0) rc = kdp_ckpt_put_f32(w, "ema.buffers", kdp_model_buffers(t->ema), 1, &nb, err);
  if (rc == 0) rc = kdp_ckpt_put_i64(w, "ema.steps", t->ema_steps, err);
  if (rc == 0) rc = kdp_ckpt_put_f64(w, "ema.decay", t->ema_decay, err);
  if (rc == 0 && is_teacher(t)) {
    rc = kdp_ckpt_put_u64(w, "rng.ema.state", t->ema_rng.state, err);
    if (rc == 0) rc = kdp_ckpt_put_u64(w, "rng.ema.inc", t->ema_rng.inc, err);
  }
  return rc;
}

int kdp_train_ema_load(kdp_trainer *t, const kdp_ckpt *ck, int fresh, kdp_error *err) {
  if (!t->ema) return 0;
  /* a new peer, or a checkpoint of a run without the EMA (run.ema_decay changed with
     --allow-config-change): the mean starts here, from the peer's weights */
  if (fresh || !kdp_ckpt_has(ck, "ema.params")) {
    kdp_train_ema_reset(t);
    return 0;
  }
  size_t np = kdp_model_n_params(t->ema), nb = kdp_model_n_buffers(t->ema);
  int rc = kdp_ckpt_get_f32(ck, "ema.params", kdp_model_params(t->ema), np, err);
  if (rc == 0) rc = kdp_ckpt_get_f32(ck, "ema.buffers", kdp_model_buffers(t->ema), nb, err);
  if (rc == 0) rc = kdp_ckpt_get_i64(ck, "ema.steps", &t->ema_steps, err);
  if (rc == 0 && is_teacher(t) && kdp_ckpt_has(ck, "rng.ema.state")) {
    rc = kdp_ckpt_get_u64(ck, "rng.ema.state", &t->ema_rng.state, err);
    if (rc == 0) rc = kdp_ckpt_get_u64(ck, "rng.ema.inc", &t->ema_rng.inc, err);
  }
  return rc;
}
