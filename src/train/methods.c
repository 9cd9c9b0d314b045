/* methods.c: glue between the exchanges (dist) and the loss math (kd) for each method. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/kd.h"
#include "train_internal.h"

#define EVAL_MAX 500

typedef struct mstate {
  kdp_method id;
  kdp_cohort *cohort;
  int cross_grads;      /* dz must be reduce-scattered (gradients reach other peers' logits) */
  int feat_grads;       /* dh must be reduce-scattered */
  int uses_feat;        /* the method reads features */
  size_t max_b;
  float *z_all, *dz;    /* P x max_b x C */
  float *h_all, *dh;    /* feature floats for max_b */
  float *my_dz;         /* max_b x C */
  float *teacher;       /* max_b x C */
  size_t dims[KDP_KD_MAX_PEERS];
  size_t counts[KDP_KD_MAX_PEERS], displs[KDP_KD_MAX_PEERS];
  kdp_sgd mopt;         /* the replicated module's optimizer */
  size_t n_module;
} mstate;

static void set_counts(mstate *s, size_t P, size_t b) {
  for (size_t j = 0; j < P; j++) {
    s->counts[j] = b * s->dims[j];
    s->displs[j] = kdp_cohort_feature_offset(s->cohort, j, b);
  }
}

/* allgathers this peer's logits (and features) for a batch of b into z_all (and h_all) */
static void gather(kdp_trainer *t, mstate *s, const float *z, const float *h, size_t b) {
  kdp_dist_cohort_allgather(t->d, z, s->z_all, b * t->C);
  if (s->uses_feat && h) {
    set_counts(s, (size_t)t->P, b);
    kdp_dist_cohort_allgatherv(t->d, h, b * s->dims[t->d->peer], s->h_all, s->counts, s->displs);
  }
}

static void teacher_eval(kdp_trainer *t, const float *z, size_t b, double *loss, size_t *correct) {
  mstate *s = t->method;
  kdp_error err;
  gather(t, s, z, kdp_model_features(t->model), b);
  if (kdp_cohort_teacher_eval(s->cohort, s->z_all, s->uses_feat ? s->h_all : NULL, b, s->teacher,
                              &err) != 0) {
    fprintf(stderr, "kdpeers: teacher evaluation failed: %s\n", err.msg);
    return;
  }
  *loss += kdp_ce_loss(s->teacher, t->ybuf, b, t->C, NULL, 0, correct) * (double)b;
}

int kdp_method_init(kdp_trainer *t, kdp_error *err) {
  mstate *s = kdp_xcalloc(1, sizeof *s);
  t->method = s;
  t->lr_scale = 1.0;
  s->id = KDP_METHOD_INDEPENDENT;
  if (t->P > 1) {
    int rc = kdp_method_parse(t->cfg->method, &s->id, err);
    if (rc != 0) return rc;
  }
  if (t->P > KDP_KD_MAX_PEERS)
    return kdp_fail(err, KDP_EINVAL, "%d peers: kdpeers supports at most %d peers per cohort",
                    t->P, KDP_KD_MAX_PEERS);
  if (s->id == KDP_METHOD_CODISTILL && strcmp(t->cfg->exchange, "weights") == 0)
    return kdp_fail(err, KDP_EINVAL,
                    "kd.exchange = weights is not available yet in this build; use "
                    "kd.exchange = logits");
  if (s->id == KDP_METHOD_OKDDIP && t->P < 3)
    return kdp_fail(err, KDP_EINVAL,
                    "kd.method = okddip needs at least 3 peers (a leader and 2 auxiliary peers); "
                    "got %d",
                    t->P);
  size_t P = (size_t)t->P;
  /* every peer's feature dim (peers may differ) */
  float mine = (float)kdp_model_feature_dim(t->model);
  float *all = kdp_falloc(P);
  kdp_dist_cohort_allgather(t->d, &mine, all, 1);
  kdp_kd_spec spec;
  memset(&spec, 0, sizeof spec);
  spec.method = s->id;
  spec.P = P;
  spec.C = t->C;
  for (size_t j = 0; j < P; j++) spec.dims[j] = s->dims[j] = (size_t)all[j];
  free(all);
  spec.leader = t->cfg->leader;
  spec.detach = t->cfg->detach;
  spec.fusion_dim = (size_t)t->cfg->fusion_dim;
  s->max_b = t->Bl > EVAL_MAX ? t->Bl : EVAL_MAX;
  int rc = kdp_cohort_create(&s->cohort, &spec, s->max_b, err);
  if (rc != 0) return rc;
  kdp_rng mrng;
  kdp_rng_seed(&mrng, t->cfg->seed, KDP_STREAM_MODULE);
  kdp_cohort_module_init(s->cohort, &mrng);
  s->uses_feat = kdp_method_uses_features(s->id);
  s->feat_grads = kdp_cohort_feature_grads(s->cohort);
  s->cross_grads = s->id == KDP_METHOD_ONE || s->id == KDP_METHOD_FFL ||
                   (s->id == KDP_METHOD_OKDDIP && !t->cfg->detach);
  t->uses_features_grad = s->feat_grads;
  size_t C = t->C;
  s->z_all = kdp_falloc(P * s->max_b * C);
  s->dz = kdp_falloc(P * s->max_b * C);
  s->my_dz = kdp_falloc(s->max_b * C);
  s->teacher = kdp_falloc(s->max_b * C);
  size_t nf = kdp_cohort_feature_floats(s->cohort, s->max_b);
  s->h_all = kdp_falloc(nf ? nf : 1);
  s->dh = kdp_falloc(nf ? nf : 1);
  s->n_module = kdp_cohort_module_n_params(s->cohort);
  if (s->n_module) {
    double wd = s->id == KDP_METHOD_FFL ? t->cfg->fusion_weight_decay : t->cfg->weight_decay;
    kdp_sgd_init(&s->mopt, s->n_module, (float)t->cfg->momentum, (float)wd, t->cfg->nesterov);
  }
  if (P > 1 && (s->id == KDP_METHOD_ONE || s->id == KDP_METHOD_FFL || s->id == KDP_METHOD_OKDDIP)) {
    t->teacher_eval = teacher_eval;
    t->teacher_name = s->id == KDP_METHOD_ONE ? "gate" : s->id == KDP_METHOD_FFL ? "fused" : "leader";
  }
  return 0;
}

void kdp_method_free(kdp_trainer *t) {
  mstate *s = t->method;
  if (!s) return;
  kdp_cohort_free(s->cohort);
  free(s->z_all);
  free(s->dz);
  free(s->my_dz);
  free(s->teacher);
  free(s->h_all);
  free(s->dh);
  if (s->n_module) kdp_sgd_free(&s->mopt);
  free(s);
  t->method = NULL;
}

void kdp_method_step(kdp_trainer *t, const float *z, const int32_t *y, size_t b, int64_t step,
                     double epoch, float scale, kdp_step_loss *out) {
  mstate *s = t->method;
  size_t C = t->C, n = b * C;
  size_t P = (size_t)t->P, me = (size_t)t->d->peer;
  const kdp_config *cfg = t->cfg;
  memset(out, 0, sizeof *out);
  if (s->id == KDP_METHOD_INDEPENDENT) {
    out->ce = kdp_ce_loss(z, y, b, C, t->dlogits, scale, &out->correct);
    return;
  }
  gather(t, s, z, kdp_model_features(t->model), b);
  kdp_kd_batch in = {
      .z = s->z_all,
      .h = s->uses_feat ? s->h_all : NULL,
      .y = y,
      .B = b,
      .T = (float)cfg->temperature,
      .weight = (float)(cfg->weight * kdp_rampup(epoch, cfg->rampup_epochs)),
      .burn_in = s->id == KDP_METHOD_CODISTILL && step < cfg->burn_in_steps,
  };
  memset(s->dz, 0, P * n * sizeof(float));
  size_t nf = kdp_cohort_feature_floats(s->cohort, b);
  if (s->feat_grads) memset(s->dh, 0, nf * sizeof(float));
  if (s->n_module) kdp_cohort_module_zero_grad(s->cohort);
  kdp_kd_losses L;
  kdp_error err;
  if (kdp_cohort_step(s->cohort, me, &in, s->dz, s->feat_grads ? s->dh : NULL, NULL, &L, &err) !=
      0) {
    fprintf(stderr, "kdpeers: internal error in the %s step: %s\n", cfg->method, err.msg);
    abort();
  }
  const float *g = s->dz + me * n;
  if (s->cross_grads) {
    /* each rank computed dJ_i/dz_j for every j: sum the blocks addressed to this peer */
    kdp_dist_cohort_reduce_scatter(t->d, s->dz, s->my_dz, n);
    g = s->my_dz;
  }
  for (size_t k = 0; k < n; k++) t->dlogits[k] += scale * g[k];
  if (s->feat_grads) {
    set_counts(s, P, b);
    /* the blocks are laid out back to back in cohort order, as reduce_scatterv expects */
    float *mine = s->h_all; /* reuse as receive buffer: h_all is not needed any more this step */
    kdp_dist_cohort_reduce_scatterv(t->d, s->dh, mine, s->counts);
    size_t nd = b * s->dims[me];
    for (size_t k = 0; k < nd; k++) t->dfeat[k] += scale * mine[k];
  }
  if (s->n_module) {
    float *mg = kdp_cohort_module_grads(s->cohort);
    for (size_t k = 0; k < s->n_module; k++) mg[k] *= scale;
  }
  out->ce = L.ce;
  out->kd = L.loss - L.ce;
  out->correct = L.n_correct;
}

void kdp_method_after_backward(kdp_trainer *t) {
  mstate *s = t->method;
  /* replicated module: every rank holds its share; the sum over all ranks is the gradient */
  if (s->n_module) kdp_dist_world_allreduce(t->d, kdp_cohort_module_grads(s->cohort), s->n_module);
}

void kdp_method_opt_step(kdp_trainer *t, float lr) {
  mstate *s = t->method;
  if (s->n_module)
    kdp_sgd_step(&s->mopt, kdp_cohort_module_params(s->cohort), kdp_cohort_module_grads(s->cohort),
                 lr);
}
