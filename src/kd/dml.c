/* dml: deep mutual learning (Zhang et al., CVPR 2018): every peer learns from each other peer,
   L_i = CE(z_i, y) + lam w T^2 (1/(P-1)) sum_{j != i} KL(sg s_T(z_j) || s_T(z_i)).
   Reads every peer's logits on its own rows (allgathered). */
#include <string.h>

#include "kd_internal.h"

typedef struct dml_state {
  float *g; /* maxB x C: peer i's gradient before its rows' share is applied */
} dml_state;

static int setup(kdp_cohort *c, kdp_kd_spec *s, kdp_error *err) {
  (void)err;
  dml_state *st = kdp_cohort_alloc(c, sizeof *st);
  st->g = kdp_cohort_falloc(c, c->maxB * s->C);
  kdp_cohort_set_state(c, st);
  return 0;
}

static void peer_loss(kdp_cohort *c, size_t i, const kdp_kd_peer_in *in, float *dz,
                      float *dteacher, kdp_kd_losses *out) {
  (void)dteacher;
  dml_state *st = kdp_cohort_state(c);
  const size_t P = c->s.P, n = in->n, C = c->s.C;
  const float *zi = in->z;
  float w = in->weight;
  double kd = 0.0;
  memset(st->g, 0, n * C * sizeof(float));
  out->ce = kdp_ce_loss(zi, in->y, n, C, st->g, 1.0f, &out->n_correct);
  if (P > 1) {
    for (size_t j = 0; j < P; j++)
      if (j != i) kd += kdp_kl_logits(in->z_all + j * n * C, zi, n, C, in->T, NULL, st->g,
                                      w / (float)(P - 1));
    kd /= (double)(P - 1);
  }
  kd_peer_done(dz, st->g, C, in, w, kd, out);
}

const kdp_method_ops kdp_dml_ops = {
    .name = "dml", .min_peers = 2, .peer_reads = KDP_READS_LOGITS,
    .setup = setup, .peer_loss = peer_loss};

