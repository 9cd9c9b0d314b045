/* distill.c: the trainer's distillation state: kd.method's ops, its cohort and replicated module,
   the module's optimizer, the pipeline that feeds it (step.c), codistill's stale copies
   (stale.c), and their part of the checkpoint. */
#include <stdlib.h>
#include <string.h>

#include "kdpeers/ckpt.h"
#include "kdpeers/kd.h"
#include "train_internal.h"

/* the /predict teacher: n eval-mode rows of this cohort's peers, in chunks the pipeline takes */
static int teacher_logits(kdp_trainer *t, const float *z, const float *h, size_t n, float *out) {
  const size_t C = t->C, d = kdp_model_feature_dim(t->model), max = t->Bg > KDP_TRAIN_EVAL_BATCH
                                                                       ? t->Bg
                                                                       : KDP_TRAIN_EVAL_BATCH;
  kdp_error err;
  for (size_t first = 0; first < n; first += max) {
    size_t b = n - first < max ? n - first : max;
    int rc = kdp_pipeline_teacher_cohort(t->pipe, z + first * C, h ? h + first * d : NULL, b,
                                         out + first * C, &err);
    if (rc != 0) return rc;
  }
  return 0;
}

/* every peer's feature dimension (peers may differ) */
static void feature_dims(kdp_trainer *t, size_t *dims) {
  double v[KDP_KD_MAX_PEERS] = {0};
  v[t->d->peer] = (double)kdp_model_feature_dim(t->model);
  kdp_dist_cohort_allreduce_f64(t->d, v, (size_t)t->P);
  for (int j = 0; j < t->P; j++) dims[j] = (size_t)v[j];
}

static int is_switokd(const kdp_trainer *t) {
  return t->ops == kdp_method_ops_of(KDP_METHOD_SWITOKD);
}

int kdp_distill_is_teacher(const kdp_trainer *t, int p) {
  return (is_switokd(t) && p == t->cfg->teacher_peer) ||
         (p >= 0 && p < KDP_MAX_PEERS && t->cfg->peer_teacher[p][0]);
}

void kdp_distill_step_done(kdp_trainer *t, int64_t step) {
  if (!is_switokd(t)) return;
  t->sw_expert += kdp_pipeline_expert(t->pipe, NULL);
  t->sw_steps++;
  if ((step + 1) % t->steps_per_epoch != 0 && step + 1 != t->total_steps) return;
  if (t->is_root)
    kdp_metrics_switokd(t, step + 1, (double)(step + 1) / (double)t->steps_per_epoch,
                        t->sw_expert, t->sw_steps);
  t->sw_expert = t->sw_steps = 0;
}

int kdp_distill_init(kdp_trainer *t, kdp_error *err) {
  const kdp_config *cfg = t->cfg;
  t->lr_scale = 1.0;
  t->temperature = cfg->temperature;
  t->kd_weight = cfg->weight;
  if (t->P > KDP_KD_MAX_PEERS)
    return kdp_fail(err, KDP_EINVAL, "%d peers: kdpeers supports at most %d peers per cohort",
                    t->P, KDP_KD_MAX_PEERS);
  kdp_method m = t->P > 1 ? (kdp_method)cfg->method_id : KDP_METHOD_INDEPENDENT;
  t->ops = kdp_method_ops_of(m);
  if (!t->ops) return kdp_fail(err, KDP_EINVAL, "kd.method %d is not in the methods' table", (int)m);
  if (t->P < t->ops->min_peers)
    return kdp_fail(err, KDP_EINVAL, "kd.method = %s needs at least %d peers; got %d",
                    t->ops->name, t->ops->min_peers, t->P);
  kdp_kd_spec spec;
  memset(&spec, 0, sizeof spec);
  spec.method = m;
  spec.P = (size_t)t->P;
  spec.C = t->C;
  feature_dims(t, spec.dims);
  spec.leader = cfg->leader;
  spec.detach = cfg->detach;
  spec.fusion_dim = (size_t)cfg->fusion_dim;
  spec.ensemble = (kdp_kdcl_ensemble)cfg->ensemble_id;
  spec.tau = (float)cfg->tau;
  spec.contrast_weight = (float)cfg->contrast_weight;
  spec.embed_dim = (size_t)cfg->embed_dim;
  spec.embed_hidden = (size_t)cfg->embed_hidden;
  spec.teacher_peer = cfg->teacher_peer;
  /* a step gathers rows of the global batch; an evaluation, of an eval batch */
  size_t max_b = t->Bg > KDP_TRAIN_EVAL_BATCH ? t->Bg : KDP_TRAIN_EVAL_BATCH;
  int rc = kdp_cohort_create(&t->cohort, &spec, max_b, err);
  if (rc == 0) rc = kdp_pipeline_create(&t->pipe, t->d, t->cohort, max_b, err);
  if (rc != 0) return rc;
  kdp_rng mrng;
  kdp_rng_seed(&mrng, cfg->seed, KDP_STREAM_MODULE);
  kdp_cohort_module_init(t->cohort, &mrng);
  size_t nm = kdp_cohort_module_n_params(t->cohort);
  if (nm) {
    double wd = t->ops->module_decay == KDP_DECAY_MODULE ? cfg->fusion_weight_decay
                                                         : cfg->weight_decay;
    kdp_sgd_init(&t->mopt, nm, (float)cfg->momentum, (float)wd, cfg->nesterov);
  }
  if ((rc = kdp_embed_create(t, err)) != 0) return rc;
  if (t->ops->stale_ok && cfg->exchange_id == KDP_EXCHANGE_WEIGHTS &&
      (rc = kdp_stale_create(&t->stale, t, err)) != 0)
    return rc;
  if (t->P > 1 && t->ops->teacher) {
    t->teacher_name = t->ops->teacher;
    t->teacher_logits = teacher_logits;
  }
  return 0;
}

void kdp_distill_free(kdp_trainer *t) {
  if (t->cohort && kdp_cohort_module_n_params(t->cohort)) kdp_sgd_free(&t->mopt);
  kdp_stale_free(t->stale);
  kdp_embed_free(t);
  kdp_pipeline_free(t->pipe);
  kdp_cohort_free(t->cohort);
  t->stale = NULL;
  t->pipe = NULL;
  t->cohort = NULL;
}

int kdp_distill_save(kdp_trainer *t, kdp_ckpt_writer *w, kdp_error *err) {
  size_t n = kdp_cohort_module_n_params(t->cohort), nb = kdp_cohort_module_n_buffers(t->cohort);
  int rc = 0;
  if (n) {
    rc = kdp_ckpt_put_f32(w, "module.params", kdp_cohort_module_params(t->cohort), 1, &n, err);
    if (rc == 0) rc = kdp_ckpt_put_f32(w, "module.momentum", t->mopt.buf, 1, &n, err);
    if (rc == 0) rc = kdp_ckpt_put_i64(w, "module.opt_steps", t->mopt.n_steps, err);
  }
  /* buffers without parameters too (kdcl general's ensemble weights) */
  if (rc == 0 && nb)
    rc = kdp_ckpt_put_f32(w, "module.buffers", kdp_cohort_module_buffers(t->cohort), 1, &nb, err);
  if (rc == 0 && t->stale) rc = kdp_stale_save(t->stale, w, err);
  if (rc == 0) rc = kdp_embed_save(t, w, err);
  if (rc == 0 && is_switokd(t)) rc = kdp_ckpt_put_i64(w, "switokd.expert", t->sw_expert, err);
  if (rc == 0 && is_switokd(t)) rc = kdp_ckpt_put_i64(w, "switokd.steps", t->sw_steps, err);
  if (rc == 0) rc = kdp_frozen_save(t, w, err);
  return rc;
}

int kdp_distill_load(kdp_trainer *t, const kdp_ckpt *ck, kdp_error *err) {
  size_t n = kdp_cohort_module_n_params(t->cohort), nb = kdp_cohort_module_n_buffers(t->cohort);
  int rc = 0;
  if (n) {
    int64_t steps = 0;
    rc = kdp_ckpt_get_f32(ck, "module.params", kdp_cohort_module_params(t->cohort), n, err);
    if (rc == 0) rc = kdp_ckpt_get_f32(ck, "module.momentum", t->mopt.buf, n, err);
    if (rc == 0) rc = kdp_ckpt_get_i64(ck, "module.opt_steps", &steps, err);
    t->mopt.n_steps = steps;
  }
  if (rc == 0 && nb)
    rc = kdp_ckpt_get_f32(ck, "module.buffers", kdp_cohort_module_buffers(t->cohort), nb, err);
  if (rc == 0 && t->stale) rc = kdp_stale_load(t->stale, ck, err);
  if (rc == 0) rc = kdp_embed_load(t, ck, err);
  if (rc == 0 && is_switokd(t)) rc = kdp_ckpt_get_i64(ck, "switokd.expert", &t->sw_expert, err);
  if (rc == 0 && is_switokd(t)) rc = kdp_ckpt_get_i64(ck, "switokd.steps", &t->sw_steps, err);
  if (rc == 0) rc = kdp_frozen_load(t, ck, err);
  return rc;
}
