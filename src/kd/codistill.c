/* codistill: codistillation (Anil et al., ICLR 2018), L_i = CE(z_i, y) + lam w_t T^2
   KL(sg mean_{j != i} s_T(z_j) || s_T(z_i)), with w_t = 0 for the first kd.burn_in_steps steps.
   Logits mode reads every peer's fresh logits on its own rows; weights mode (kd.exchange =
   weights, a trainer strategy: src/train/stale.c) computes them from stale copies of the peers. */
#include "kd_internal.h"

static void peer_loss(kdp_cohort *c, size_t i, const kdp_kd_peer_in *in, float *dz,
                      float *dteacher, kdp_kd_losses *out) {
  (void)dteacher;
  kd_mean_peer_loss(c, in, dz, (long)i, in->burn_in ? 0.0f : in->weight, out);
}

const kdp_method_ops kdp_codistill_ops = {
    .name = "codistill", .min_peers = 2, .peer_reads = KDP_READS_LOGITS, .stale_ok = 1,
    .setup = kd_mean_setup, .peer_loss = peer_loss};

