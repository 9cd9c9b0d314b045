/* avg: the ensemble of the peers' probabilities, peer i included, teaches every peer:
   L_i = CE(z_i, y) + lam w T^2 KL(sg mean_j s_T(z_j) || s_T(z_i)). */
#include "kd_internal.h"

static void peer_loss(kdp_cohort *c, size_t i, const kdp_kd_peer_in *in, float *dz,
                      float *dteacher, kdp_kd_losses *out) {
  (void)i;
  (void)dteacher;
  kd_mean_peer_loss(c, in, dz, -1, in->weight, out);
}

const kdp_method_ops kdp_avg_ops = {
    .name = "avg", .min_peers = 2, .peer_reads = KDP_READS_LOGITS,
    .setup = kd_mean_setup, .peer_loss = peer_loss};

