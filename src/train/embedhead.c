/* embedhead.c: mcl's embedding head of this rank's peer (docs/kd-methods-gen2.md, "mcl"). The head is
   the peer's own, like its network: every rank of the peer holds the same copy, its gradient is
   summed over the peer's ranks, its own SGD (the peers' momentum, Nesterov and weight decay) steps
   it with the peers' learning rate, and each rank's checkpoint file carries it ("embed.*"). A step:
   forward on this rank's rows of the pooled features (kdp_embed_forward), the pipeline exchanges
   the embeddings and returns this rank's rows of dJ/dv (step.c), backward into the head's
   gradient and the features' (kdp_embed_backward). */
#include <stdlib.h>
#include <string.h>

#include "kdpeers/ckpt.h"
#include "kdpeers/kd.h"
#include "train_internal.h"

struct kdp_embed {
  kdp_embed_head *hd;
  size_t np, E;
  float *params, *grads, *v, *dv; /* np, np, Bl x E, Bl x E */
  kdp_sgd opt;
};

int kdp_embed_create(kdp_trainer *t, kdp_error *err) {
  const size_t E = kdp_cohort_embed_dim(t->cohort);
  if (!E) return 0;
  const kdp_config *cfg = t->cfg;
  const size_t d = kdp_model_feature_dim(t->model), H = kdp_cohort_spec(t->cohort)->embed_hidden;
  const size_t maxn = t->Bg; /* at least any rank's rows of a batch */
  kdp_embed *e = kdp_xcalloc(1, sizeof *e);
  int rc = kdp_embed_head_create(&e->hd, d, H, E, maxn, err);
  if (rc != 0) {
    free(e);
    return rc;
  }
  e->E = E;
  e->np = kdp_embed_head_n_params(e->hd);
  e->params = kdp_falloc(e->np);
  e->grads = kdp_falloc(e->np);
  e->v = kdp_falloc(maxn * E);
  e->dv = kdp_falloc(maxn * E);
  /* the same head on every rank of the peer, a different one per peer */
  kdp_rng rng;
  kdp_rng_seed(&rng, cfg->seed, KDP_STREAM_EMBED + 16 * (uint64_t)t->d->peer);
  kdp_embed_head_init(e->hd, e->params, &rng);
  kdp_sgd_init(&e->opt, e->np, (float)cfg->momentum, (float)cfg->weight_decay, cfg->nesterov);
  t->embed = e;
  return 0;
}

void kdp_embed_free(kdp_trainer *t) {
  kdp_embed *e = t->embed;
  if (!e) return;
  kdp_sgd_free(&e->opt);
  kdp_embed_head_free(e->hd);
  free(e->params);
  free(e->grads);
  free(e->v);
  free(e->dv);
  free(e);
  t->embed = NULL;
}

size_t kdp_embed_n_params(const kdp_trainer *t) { return t->embed ? t->embed->np : 0; }

void kdp_embed_forward(kdp_trainer *t, size_t n, const float **v, float **dv) {
  kdp_embed *e = t->embed;
  memset(e->grads, 0, e->np * sizeof(float));
  memset(e->dv, 0, (n ? n : 1) * e->E * sizeof(float));
  if (n) kdp_embed_head_forward(e->hd, e->params, kdp_model_features(t->model), n, e->v);
  *v = e->v;
  *dv = e->dv;
}

void kdp_embed_backward(kdp_trainer *t, size_t n, float *dfeat) {
  kdp_embed *e = t->embed;
  if (n)
    kdp_embed_head_backward(e->hd, e->params, kdp_model_features(t->model), n, e->dv, e->grads,
                            dfeat);
}

void kdp_embed_allreduce(kdp_trainer *t) {
  if (t->embed) kdp_dist_peer_allreduce(t->d, t->embed->grads, t->embed->np);
}

void kdp_embed_sgd(kdp_trainer *t, float lr) {
  if (t->embed) kdp_sgd_step(&t->embed->opt, t->embed->params, t->embed->grads, lr);
}

int kdp_embed_save(kdp_trainer *t, kdp_ckpt_writer *w, kdp_error *err) {
  kdp_embed *e = t->embed;
  if (!e) return 0;
  size_t n = e->np;
  int rc = kdp_ckpt_put_f32(w, "embed.params", e->params, 1, &n, err);
  if (rc == 0) rc = kdp_ckpt_put_f32(w, "embed.momentum", e->opt.buf, 1, &n, err);
  if (rc == 0) rc = kdp_ckpt_put_i64(w, "embed.opt_steps", e->opt.n_steps, err);
  if (rc == 0) rc = kdp_ckpt_put_f64(w, "log.contrast", t->run_contrast, err);
  return rc;
}

int kdp_embed_load(kdp_trainer *t, const kdp_ckpt *ck, kdp_error *err) {
  kdp_embed *e = t->embed;
  if (!e) return 0;
  int64_t steps = 0;
  int rc = kdp_ckpt_get_f32(ck, "embed.params", e->params, e->np, err);
  if (rc == 0) rc = kdp_ckpt_get_f32(ck, "embed.momentum", e->opt.buf, e->np, err);
  if (rc == 0) rc = kdp_ckpt_get_i64(ck, "embed.opt_steps", &steps, err);
  if (rc == 0) e->opt.n_steps = steps;
  if (rc == 0) rc = kdp_ckpt_get_f64(ck, "log.contrast", &t->run_contrast, err);
  return rc;
}
