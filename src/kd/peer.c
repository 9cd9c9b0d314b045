/* peer.c: the peer terms several methods share: the scaled hand-over of a peer's gradient,
   the mean of the peers' probabilities (codistill, avg), a module's stop-gradient teacher (one,
   ffl). */
#include <string.h>

#include "kd_internal.h"


void kd_add_scaled(float *dz, const float *src, size_t n, float scale) {
  for (size_t k = 0; k < n; k++) dz[k] += scale * src[k];
}

void kd_peer_done(float *dz, const float *g, size_t C, const kdp_kd_peer_in *in, float w,
                  double kd, kdp_kd_losses *out) {
  kd_add_scaled(dz, g, in->n * C, in->scale);
  out->kd = kd;
  out->loss = out->ce + (double)w * kd;
}

void kd_mean_probs(float *q, float *probs, const float *z_all, size_t P, size_t n, size_t C,
                   float T, long skip) {
  for (size_t j = 0; j < P; j++) kdp_softmax_t(probs + j * n * C, z_all + j * n * C, n, C, T);
  size_t m = skip >= 0 ? P - 1 : P;
  for (size_t k = 0; k < n * C; k++) {
    double acc = 0.0;
    for (size_t j = 0; j < P; j++)
      if ((long)j != skip) acc += probs[j * n * C + k];
    q[k] = (float)(acc / (double)m);
  }
}

typedef struct mean_state {
  float *g, *probs, *q; /* maxB x C, P x maxB x C, maxB x C */
} mean_state;

int kd_mean_setup(kdp_cohort *c, kdp_kd_spec *s, kdp_error *err) {
  (void)err;
  mean_state *st = kdp_cohort_alloc(c, sizeof *st);
  st->g = kdp_cohort_falloc(c, c->maxB * s->C);
  st->probs = kdp_cohort_falloc(c, s->P * c->maxB * s->C);
  st->q = kdp_cohort_falloc(c, c->maxB * s->C);
  kdp_cohort_set_state(c, st);
  return 0;
}

void kd_mean_peer_loss(kdp_cohort *c, const kdp_kd_peer_in *in, float *dz, long skip, float w,
                       kdp_kd_losses *out) {
  mean_state *st = kdp_cohort_state(c);
  const size_t P = c->s.P, n = in->n, C = c->s.C;
  double kd = 0.0;
  memset(st->g, 0, n * C * sizeof(float));
  out->ce = kdp_ce_loss(in->z, in->y, n, C, st->g, 1.0f, &out->n_correct);
  if (P > (skip >= 0 ? 1u : 0u)) {
    kd_mean_probs(st->q, st->probs, in->z_all, P, n, C, in->T, skip);
    kd = kdp_kl_loss(in->z, st->q, n, C, in->T, st->g, w);
  }
  kd_peer_done(dz, st->g, C, in, w, kd, out);
}

void kd_sg_teacher_loss(kdp_cohort *c, size_t i, const kdp_kd_peer_in *in, float *dz,
                        float *dteacher, kdp_kd_losses *out) {
  (void)i;
  (void)dteacher;
  const size_t n = in->n, C = c->s.C;
  memset(c->pg, 0, n * C * sizeof(float));
  out->ce = kdp_ce_loss(in->z, in->y, n, C, c->pg, 1.0f, &out->n_correct);
  kdp_softmax_t(c->pq, in->teacher, n, C, in->T);
  double kd = kdp_kl_loss(in->z, c->pq, n, C, in->T, c->pg, in->weight);
  kd_peer_done(dz, c->pg, C, in, in->weight, kd, out);
}
