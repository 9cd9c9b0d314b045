/* methods.c: glue between the exchanges (dist) and the loss math (kd) for each method. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/ckpt.h"
#include "kdpeers/kd.h"
#include "train_internal.h"

#define EVAL_MAX 500

typedef struct mstate {
  kdp_method id;
  kdp_cohort *cohort;
  kdp_exchange *ex;
  float *teacher;       /* EVAL_MAX x C */
  kdp_sgd mopt;         /* the replicated module's optimizer */
  size_t n_module;
  /* codistill, weights mode: stale copies of the other peers, refreshed every k steps */
  int weights_mode;
  kdp_model *stale[KDP_KD_MAX_PEERS];
  size_t counts[KDP_KD_MAX_PEERS], displs[KDP_KD_MAX_PEERS];
  float *flat_mine, *flat_all; /* params ++ buffers of this peer / of every peer */
  float *z_all, *dz_all;       /* P x Bl x C */
} mstate;

/* Sizes of every peer's (params ++ buffers) vector, from models built for their archs. */
static int weights_mode_init(kdp_trainer *t, mstate *s, kdp_error *err) {
  size_t P = (size_t)t->P, me = (size_t)t->d->peer, tot = 0;
  kdp_input_shape ish = {t->train.H, t->train.W, t->train.C, t->C};
  for (size_t j = 0; j < P; j++) {
    kdp_model *m = NULL;
    if (j != me) {
      int rc = kdp_model_create(&m, kdp_config_peer_arch(t->cfg, (int)j), ish, t->Bl, err);
      if (rc != 0) return rc;
      s->stale[j] = m;
    } else {
      m = t->model;
    }
    s->counts[j] = kdp_model_n_params(m) + kdp_model_n_buffers(m);
    s->displs[j] = tot;
    tot += s->counts[j];
  }
  s->flat_mine = kdp_falloc(s->counts[me]);
  s->flat_all = kdp_falloc(tot);
  s->z_all = kdp_falloc(P * t->Bl * t->C);
  s->dz_all = kdp_falloc(P * t->Bl * t->C);
  /* each peer trains on its own disjoint shard of the training set */
  size_t n = t->train.n;
  kdp_batcher_set_shard(&t->batcher, n * me / P, n * (me + 1) / P);
  return 0;
}

/* allgathers every peer's parameters and BN statistics into the stale copies */
static void weights_refresh(kdp_trainer *t, mstate *s) {
  size_t P = (size_t)t->P, me = (size_t)t->d->peer;
  size_t np = kdp_model_n_params(t->model), nb = kdp_model_n_buffers(t->model);
  memcpy(s->flat_mine, kdp_model_params(t->model), np * sizeof(float));
  memcpy(s->flat_mine + np, kdp_model_buffers(t->model), nb * sizeof(float));
  if (t->d->uniform) {
    kdp_dist_cohort_allgatherv(t->d, s->flat_mine, s->counts[me], s->flat_all, s->counts,
                               s->displs);
  } else {
    /* per-peer layout: every rank of a peer holds the same weights; one row of one "row" */
    kdp_dist_layout_allgather(t->d, s->flat_mine, 1, s->counts, s->displs, s->flat_all);
  }
  for (size_t j = 0; j < P; j++) {
    if (j == me) continue;
    kdp_model *m = s->stale[j];
    size_t mp = kdp_model_n_params(m), mb = kdp_model_n_buffers(m);
    memcpy(kdp_model_params(m), s->flat_all + s->displs[j], mp * sizeof(float));
    memcpy(kdp_model_buffers(m), s->flat_all + s->displs[j] + mp, mb * sizeof(float));
  }
}

/* codistill with stale weights: the other peers' predictions on this rank's own batch */
static void weights_step(kdp_trainer *t, mstate *s, const float *z, const kdp_kd_batch *proto,
                         int64_t step, float scale, kdp_step_loss *out) {
  size_t P = (size_t)t->P, me = (size_t)t->d->peer, b = proto->B, n = b * t->C;
  if (step % t->cfg->exchange_every == 0) weights_refresh(t, s);
  for (size_t j = 0; j < P; j++) {
    const float *zj = j == me ? z : kdp_model_forward(s->stale[j], t->cur_x, b, 0, NULL);
    memcpy(s->z_all + j * n, zj, n * sizeof(float));
  }
  kdp_kd_batch in = *proto;
  in.z = s->z_all;
  memset(s->dz_all, 0, P * n * sizeof(float));
  kdp_kd_losses L;
  kdp_error err;
  if (kdp_cohort_step(s->cohort, me, &in, s->dz_all, NULL, NULL, &L, &err) != 0) {
    fprintf(stderr, "kdpeers: internal error in the codistill step: %s\n", err.msg);
    abort();
  }
  const float *g = s->dz_all + me * n;
  for (size_t k = 0; k < n; k++) t->dlogits[k] += scale * g[k];
  out->ce = L.ce;
  out->kd = L.loss - L.ce;
  out->correct = L.n_correct;
}

static void teacher_eval(kdp_trainer *t, const float *z, size_t b, double *loss, size_t *correct) {
  mstate *s = t->method;
  kdp_error err;
  if (kdp_exchange_teacher_eval(s->ex, z, kdp_model_features(t->model), b, s->teacher, &err) != 0) {
    fprintf(stderr, "kdpeers: teacher evaluation failed: %s\n", err.msg);
    return;
  }
  *loss += kdp_ce_loss(s->teacher, t->ybuf, b, t->C, NULL, 0, correct) * (double)b;
}

static int teacher_logits(kdp_trainer *t, const float *z, const float *h, size_t b, float *out) {
  mstate *s = t->method;
  kdp_error err;
  return kdp_exchange_teacher_eval(s->ex, z, h, b, out, &err);
}

int kdp_method_init(kdp_trainer *t, kdp_error *err) {
  mstate *s = kdp_xcalloc(1, sizeof *s);
  t->method = s;
  t->lr_scale = 1.0;
  t->temperature = t->cfg->temperature;
  t->kd_weight = t->cfg->weight;
  s->id = KDP_METHOD_INDEPENDENT;
  if (t->P > 1) {
    int rc = kdp_method_parse(t->cfg->method, &s->id, err);
    if (rc != 0) return rc;
  }
  if (t->P > KDP_KD_MAX_PEERS)
    return kdp_fail(err, KDP_EINVAL, "%d peers: kdpeers supports at most %d peers per cohort",
                    t->P, KDP_KD_MAX_PEERS);
  s->weights_mode = s->id == KDP_METHOD_CODISTILL && strcmp(t->cfg->exchange, "weights") == 0;
  if (s->id == KDP_METHOD_OKDDIP && t->P < 3)
    return kdp_fail(err, KDP_EINVAL,
                    "kd.method = okddip needs at least 3 peers (a leader and 2 auxiliary peers); "
                    "got %d",
                    t->P);
  size_t P = (size_t)t->P;
  /* every peer's feature dim (peers may differ) */
  float mine = (float)kdp_model_feature_dim(t->model);
  float *all = kdp_falloc(P);
  if (t->d->uniform) {
    kdp_dist_cohort_allgather(t->d, &mine, all, 1);
  } else {
    double dims[KDP_KD_MAX_PEERS] = {0};
    dims[t->d->peer] = mine;
    kdp_dist_cohort_allreduce_f64(t->d, dims, P);
    for (size_t j = 0; j < P; j++) all[j] = (float)dims[j];
  }
  kdp_kd_spec spec;
  memset(&spec, 0, sizeof spec);
  spec.method = s->id;
  spec.P = P;
  spec.C = t->C;
  for (size_t j = 0; j < P; j++) spec.dims[j] = (size_t)all[j];
  free(all);
  spec.leader = t->cfg->leader;
  spec.detach = t->cfg->detach;
  spec.fusion_dim = (size_t)t->cfg->fusion_dim;
  /* per-peer layout: every rank computes the objective over the whole global batch */
  size_t rows = t->d->uniform ? t->Bl : t->Bg;
  size_t max_b = rows > EVAL_MAX ? rows : EVAL_MAX;
  int rc = kdp_cohort_create(&s->cohort, &spec, max_b, err);
  if (rc != 0) return rc;
  kdp_rng mrng;
  kdp_rng_seed(&mrng, t->cfg->seed, KDP_STREAM_MODULE);
  kdp_cohort_module_init(s->cohort, &mrng);
  t->uses_features_grad = kdp_cohort_feature_grads(s->cohort);
  rc = kdp_exchange_create(&s->ex, t->d, s->cohort, t->C, max_b, err);
  if (rc != 0) return rc;
  s->teacher = kdp_falloc(max_b * t->C);
  if (s->weights_mode && (rc = weights_mode_init(t, s, err)) != 0) return rc;
  s->n_module = kdp_cohort_module_n_params(s->cohort);
  if (s->n_module) {
    double wd = s->id == KDP_METHOD_FFL ? t->cfg->fusion_weight_decay : t->cfg->weight_decay;
    kdp_sgd_init(&s->mopt, s->n_module, (float)t->cfg->momentum, (float)wd, t->cfg->nesterov);
  }
  if (P > 1 && (s->id == KDP_METHOD_ONE || s->id == KDP_METHOD_FFL || s->id == KDP_METHOD_OKDDIP)) {
    t->teacher_eval = teacher_eval;
    t->teacher_logits = teacher_logits;
    t->teacher_name = s->id == KDP_METHOD_ONE ? "gate" : s->id == KDP_METHOD_FFL ? "fused" : "leader";
  }
  return 0;
}

void kdp_method_free(kdp_trainer *t) {
  mstate *s = t->method;
  if (!s) return;
  for (int j = 0; j < KDP_KD_MAX_PEERS; j++) kdp_model_free(s->stale[j]);
  free(s->flat_mine);
  free(s->flat_all);
  free(s->z_all);
  free(s->dz_all);
  kdp_exchange_free(s->ex);
  kdp_cohort_free(s->cohort);
  free(s->teacher);
  if (s->n_module) kdp_sgd_free(&s->mopt);
  free(s);
  t->method = NULL;
}

void kdp_method_step(kdp_trainer *t, const float *z, const int32_t *y, size_t b, int64_t step,
                     double epoch, float scale, kdp_step_loss *out) {
  mstate *s = t->method;
  const kdp_config *cfg = t->cfg;
  memset(out, 0, sizeof *out);
  if (s->id == KDP_METHOD_INDEPENDENT) {
    if (b == 0) return; /* no rows of a final partial batch on this rank */
    out->ce = kdp_ce_loss(z, y, b, t->C, t->dlogits, scale, &out->correct);
    return;
  }
  kdp_exchange_args a = {
      .y = y,
      .b = b,
      .T = (float)t->temperature,
      .weight = (float)(t->kd_weight * kdp_rampup(epoch, cfg->rampup_epochs)),
      .burn_in = s->id == KDP_METHOD_CODISTILL && step < cfg->burn_in_steps,
      .scale = scale,
  };
  if (s->weights_mode) {
    kdp_kd_batch proto = {.y = y, .B = b, .T = a.T, .weight = a.weight, .burn_in = a.burn_in};
    weights_step(t, s, z, &proto, step, scale, out);
    return;
  }
  kdp_kd_losses L;
  kdp_error err;
  if (!t->d->uniform) {
    /* per-peer layout: the whole global batch's objective, this rank's rows of its gradients */
    a.y = t->cur_yg;
    a.b = t->cur_bg;
    if (kdp_exchange_step_layout(s->ex, z, kdp_model_features(t->model), &a, t->cur_lo,
                                 t->cur_hi, t->dlogits, t->dfeat, &L, &err) != 0) {
      fprintf(stderr, "kdpeers: internal error in the %s step: %s\n", cfg->method, err.msg);
      abort();
    }
    /* ce and kd are the peer's means over the global batch (the same on each of its ranks);
       the hits are counted on this rank's rows */
    out->ce = L.ce;
    out->kd = L.loss - L.ce;
    for (size_t r = 0; r < b; r++) {
      const float *zr = z + r * t->C;
      size_t am = 0;
      for (size_t c = 1; c < t->C; c++)
        if (zr[c] > zr[am]) am = c;
      out->correct += (int32_t)am == y[r];
    }
    return;
  }
  if (kdp_exchange_step(s->ex, z, kdp_model_features(t->model), &a, t->dlogits, t->dfeat, &L,
                        &err) != 0) {
    fprintf(stderr, "kdpeers: internal error in the %s step: %s\n", cfg->method, err.msg);
    abort();
  }
  out->ce = L.ce;
  out->kd = L.loss - L.ce;
  out->correct = L.n_correct;
}

const float *kdp_method_eval_layout(kdp_trainer *t, const float *z, size_t B, float *teacher,
                                    int *has_teacher) {
  mstate *s = t->method;
  kdp_error err;
  *has_teacher = teacher && t->teacher_eval;
  const float *all = kdp_exchange_eval_layout(s->ex, z, kdp_model_features(t->model), B,
                                              *has_teacher ? teacher : NULL, &err);
  if (!all) fprintf(stderr, "kdpeers: evaluation failed: %s\n", err.msg);
  return all;
}

void kdp_method_after_backward(kdp_trainer *t) {
  mstate *s = t->method;
  /* replicated module: every rank holds its share; the sum over all ranks is the gradient */
  if (s->ex) kdp_exchange_module_allreduce(s->ex);
}

void kdp_method_opt_step(kdp_trainer *t, float lr) {
  mstate *s = t->method;
  if (s->n_module)
    kdp_sgd_step(&s->mopt, kdp_cohort_module_params(s->cohort), kdp_cohort_module_grads(s->cohort),
                 lr);
}

int kdp_method_save(kdp_trainer *t, kdp_ckpt_writer *w, kdp_error *err) {
  mstate *s = t->method;
  int rc = 0;
  if (s->n_module) {
    size_t n = s->n_module, nb = kdp_cohort_module_n_buffers(s->cohort);
    if (rc == 0) rc = kdp_ckpt_put_f32(w, "module.params", kdp_cohort_module_params(s->cohort), 1, &n, err);
    if (rc == 0) rc = kdp_ckpt_put_f32(w, "module.momentum", s->mopt.buf, 1, &n, err);
    if (rc == 0) rc = kdp_ckpt_put_i64(w, "module.opt_steps", s->mopt.n_steps, err);
    if (rc == 0 && nb)
      rc = kdp_ckpt_put_f32(w, "module.buffers", kdp_cohort_module_buffers(s->cohort), 1, &nb, err);
  }
  if (rc == 0 && s->weights_mode) {
    size_t tot = 0;
    for (int j = 0; j < t->P; j++) tot += s->counts[j];
    rc = kdp_ckpt_put_f32(w, "codistill.stale", s->flat_all, 1, &tot, err);
  }
  return rc;
}

int kdp_method_load(kdp_trainer *t, const kdp_ckpt *ck, kdp_error *err) {
  mstate *s = t->method;
  int rc = 0;
  if (s->n_module) {
    size_t n = s->n_module, nb = kdp_cohort_module_n_buffers(s->cohort);
    int64_t steps = 0;
    if (rc == 0) rc = kdp_ckpt_get_f32(ck, "module.params", kdp_cohort_module_params(s->cohort), n, err);
    if (rc == 0) rc = kdp_ckpt_get_f32(ck, "module.momentum", s->mopt.buf, n, err);
    if (rc == 0) rc = kdp_ckpt_get_i64(ck, "module.opt_steps", &steps, err);
    s->mopt.n_steps = steps;
    if (rc == 0 && nb)
      rc = kdp_ckpt_get_f32(ck, "module.buffers", kdp_cohort_module_buffers(s->cohort), nb, err);
  }
  if (rc == 0 && s->weights_mode) {
    size_t tot = 0;
    for (int j = 0; j < t->P; j++) tot += s->counts[j];
    rc = kdp_ckpt_get_f32(ck, "codistill.stale", s->flat_all, tot, err);
    if (rc == 0) {
      /* put the stale copies back into the models */
      size_t me = (size_t)t->d->peer;
      for (size_t j = 0; j < (size_t)t->P; j++) {
        if (j == me) continue;
        kdp_model *m = s->stale[j];
        size_t mp = kdp_model_n_params(m), mb = kdp_model_n_buffers(m);
        memcpy(kdp_model_params(m), s->flat_all + s->displs[j], mp * sizeof(float));
        memcpy(kdp_model_buffers(m), s->flat_all + s->displs[j] + mp, mb * sizeof(float));
      }
    }
  }
  return rc;
}
