/* pcl: peer collaborative learning (Wu and Gong, AAAI 2021), trunk-free. Every peer keeps a
   temporal mean of itself (kdp_ema_update after each optimizer step); the mean teachers run
   forward on the batch and their logits z'_j are allgathered. A peer ensemble teacher, a linear
   module replicated on every rank, reads the peers' features (not detached):
   z_e = linear(concat_j h_j). Peers: L_i = CE(z_i, y) + lam w T^2 [KL(sg s_T(z_e) || s_T(z_i))
   + (1/(P-1)) sum_{j != i} KL(sg s_T(z'_j) || s_T(z_i))]; the module: L_e = CE(z_e, y), counted
   once, not ramped, which also reaches every peer's features. Row-sharded as ffl. */
#include <string.h>

#include "kd_internal.h"
#include "kdpeers/nn.h"

typedef struct pcl_state {
  size_t o_w, o_b;  /* ens.weight (C x D), ens.bias (C) */
  float *u, *du;    /* maxB x D */
  float *ze, *dze;  /* maxB x C: the ensemble teacher's logits and their gradient */
  float *g;         /* maxB x C: the peer term's gradient */
} pcl_state;

static int setup(kdp_cohort *c, kdp_kd_spec *s, kdp_error *err) {
  (void)err;
  const size_t B = c->maxB;
  pcl_state *st = kdp_cohort_alloc(c, sizeof *st);
  st->o_w = kdp_cohort_add_tensor(c, "ens.weight", s->C, c->D, -1, KDP_SPLIT_NONE,
                                  KDP_SPLIT_FEATURES);
  st->o_b = kdp_cohort_add_tensor(c, "ens.bias", s->C, 1, -1, KDP_SPLIT_NONE, KDP_SPLIT_NONE);
  kd_falloc_each(c, B * c->D, &st->u, &st->du, NULL);
  kd_falloc_each(c, B * s->C, &st->ze, &st->dze, &st->g, NULL);
  kdp_cohort_set_state(c, st);
  return 0;
}

static void init(kdp_cohort *c, kdp_rng *rng) {
  pcl_state *st = kdp_cohort_state(c);
  kd_fill_uniform(c->params + st->o_w, c->s.C * c->D, c->D, rng);
  kd_fill_uniform(c->params + st->o_b, c->s.C, c->D, rng);
}

/* z_e on the block's rows (a linear layer: train and eval are the same) */
static void forward(kdp_cohort *c, const kdp_kd_rows *blk, int train, const kdp_kd_reduce *red,
                    float *teacher) {
  (void)train;
  (void)red;
  pcl_state *st = kdp_cohort_state(c);
  const size_t n = blk->n, C = c->s.C;
  if (!n) return;
  kd_concat_features(c, st->u, blk->h, n);
  kdp_dense_forward(st->ze, st->u, c->params + st->o_w, c->params + st->o_b, n, c->D, C);
  memcpy(teacher, st->ze, n * C * sizeof(float));
}

static void peer_loss(kdp_cohort *c, size_t i, const kdp_kd_peer_in *in, float *dz,
                      float *dteacher, kdp_kd_losses *out) {
  (void)dteacher;
  pcl_state *st = kdp_cohort_state(c);
  const size_t n = in->n, C = c->s.C;
  const float w = in->weight;
  memset(st->g, 0, n * C * sizeof(float));
  out->ce = kdp_ce_loss(in->z, in->y, n, C, st->g, 1.0f, &out->n_correct);
  double kd = kdp_kl_logits(in->teacher, in->z, n, C, in->T, NULL, st->g, w);
  kd += kd_mean_kl_others(in->z_ema, in->z, i, c->s.P, n, C, in->T, w, st->g);
  kd_peer_done(dz, st->g, C, in, w, kd, out);
}

/* L_e = CE(z_e, y) on the block's rows: into the module and every peer's features */
static double backward(kdp_cohort *c, const kdp_kd_rows *blk, const float *dteacher,
                       const kdp_kd_reduce *red, float *dz, float *dh) {
  (void)dteacher;
  (void)red;
  (void)dz;
  pcl_state *st = kdp_cohort_state(c);
  const size_t n = blk->n, C = c->s.C;
  if (!n) return 0.0;
  memset(st->dze, 0, n * C * sizeof(float));
  double L = kdp_ce_loss(st->ze, blk->y, n, C, st->dze, blk->scale, NULL);
  memset(st->du, 0, n * c->D * sizeof(float));
  kdp_dense_backward(st->du, c->grads + st->o_w, c->grads + st->o_b, st->dze, st->u,
                     c->params + st->o_w, n, c->D, C);
  kd_split_features(c, dh, st->du, n);
  return L * (double)blk->scale;
}

static unsigned grads(const kdp_cohort *c) {
  (void)c;
  return KDP_GRAD_FEATURES;
}

const kdp_method_ops kdp_pcl_ops = {
    .name = "pcl", .teacher = "pcl", .min_peers = 2, .module_decay = KDP_DECAY_PEERS,
    .peer_reads = KDP_READS_EMA_LOGITS, .module_reads = KDP_READS_FEATURES,
    .setup = setup, .init = init, .grads = grads, .forward = forward, .peer_loss = peer_loss,
    .backward = backward};
