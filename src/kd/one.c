/* one: gated on-the-fly native ensemble (Lan et al., NeurIPS 2018). A gate, replicated on every
   rank, weighs the peers per example: g = softmax(relu(bn(linear(concat_j sg(h_j))))) (n x P),
   z_e = sum_j g_j z_j. Peers: L_i = CE(z_i, y) + lam w T^2 KL(sg s_T(z_e) || s_T(z_i)); the gate:
   L_gate = CE(z_e, y), counted once, which also reaches every peer's logits. Row-sharded: each
   rank runs the gate on its row block of the batch. */
#include <string.h>

#include "kd_internal.h"

typedef struct one_state {
  kd_hidden gate;
  float *u;        /* maxB x D: the gate's input */
  float *g;        /* maxB x P: the gate's weights */
  float *ze, *dze; /* maxB x C: the gated ensemble and its gradient */
} one_state;

static int setup(kdp_cohort *c, kdp_kd_spec *s, kdp_error *err) {
  (void)err;
  one_state *st = kdp_cohort_alloc(c, sizeof *st);
  kd_hidden_setup(c, &st->gate, "gate", "gate_bn", c->D, s->P, KDP_SPLIT_PEERS);
  st->u = kdp_cohort_falloc(c, c->maxB * c->D);
  st->g = kdp_cohort_falloc(c, c->maxB * s->P);
  st->ze = kdp_cohort_falloc(c, c->maxB * s->C);
  st->dze = kdp_cohort_falloc(c, c->maxB * s->C);
  kdp_cohort_set_state(c, st);
  return 0;
}

/* the gate's weights and the gated ensemble of the block's rows */
static void forward(kdp_cohort *c, const kdp_kd_rows *blk, int train, const kdp_kd_reduce *red,
                    float *teacher) {
  one_state *st = kdp_cohort_state(c);
  const size_t P = c->s.P, C = c->s.C, n = blk->n;
  if (n) kd_concat_features(c, st->u, blk->h, n);
  kd_hidden_forward(c, &st->gate, st->u, n, train, red);
  for (size_t b = 0; b < n; b++) {
    double e[KDP_KD_MAX_PEERS];
    const float *z[KDP_KD_MAX_PEERS];
    for (size_t j = 0; j < P; j++) {
      e[j] = st->gate.act[b * P + j];
      z[j] = blk->z + (j * n + b) * C;
    }
    kd_softmax_mix(e, P, z, C, st->g + b * P, st->ze + b * C);
  }
  memcpy(teacher, st->ze, n * C * sizeof(float));
}

static void init(kdp_cohort *c, kdp_rng *rng) {
  one_state *st = kdp_cohort_state(c);
  kd_hidden_init(c, &st->gate, rng);
}

/* L_gate = CE(z_e, y) on the block's rows: into every peer's logits and the gate */
static double backward(kdp_cohort *c, const kdp_kd_rows *blk, const float *dteacher,
                       const kdp_kd_reduce *red, float *dz, float *dh) {
  (void)dteacher;
  (void)dh;
  one_state *st = kdp_cohort_state(c);
  const size_t P = c->s.P, C = c->s.C, n = blk->n;
  memset(st->dze, 0, n * C * sizeof(float));
  double L = n ? kdp_ce_loss(st->ze, blk->y, n, C, st->dze, blk->scale, NULL) : 0.0;
  for (size_t b = 0; b < n; b++) {
    const float *z[KDP_KD_MAX_PEERS];
    float *dzr[KDP_KD_MAX_PEERS];
    for (size_t j = 0; j < P; j++) {
      z[j] = blk->z + (j * n + b) * C;
      dzr[j] = dz + (j * n + b) * C;
    }
    kd_softmax_mix_backward(st->g + b * P, P, z, dzr, st->dze + b * C, C, st->gate.dact + b * P);
  }
  kd_hidden_backward(c, &st->gate, st->u, n, NULL, red); /* the gate reads sg(h) */
  return L * (double)blk->scale;
}

static unsigned grads(const kdp_cohort *c) {
  (void)c;
  return KDP_GRAD_LOGITS; /* L_gate reaches every peer's logits */
}

const kdp_method_ops kdp_one_ops = {
    .name = "one", .teacher = "gate", .min_peers = 2, .module_decay = KDP_DECAY_PEERS,
    .module_reads = KDP_READS_LOGITS | KDP_READS_FEATURES,
    .setup = setup, .init = init, .forward = forward, .peer_loss = kd_sg_teacher_loss,
    .grads = grads, .backward = backward};

