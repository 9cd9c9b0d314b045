/* independent.c: no distillation, L_i = CE(z_i, y): the baseline every method is measured
   against. */
#include "kd_internal.h"

static void peer_loss(kdp_cohort *c, size_t i, const kdp_kd_peer_in *in, float *dz,
                      float *dteacher, kdp_kd_losses *out) {
  (void)i;
  (void)dteacher;
  out->ce = kdp_ce_loss(in->z, in->y, in->n, c->s.C, dz, in->scale, &out->n_correct);
  out->loss = out->ce;
}

const kdp_method_ops kdp_independent_ops = {
    .name = "independent", .min_peers = 1,
    .peer_loss = peer_loss};

