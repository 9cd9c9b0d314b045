/* kd.h: the loss math of every distillation method, on plain buffers (no MPI). */
#ifndef KDPEERS_KD_H
#define KDPEERS_KD_H

#include "kdpeers/common.h"

/* Row-wise softmax of z / T: out, z (B x C). */
void kdp_softmax_t(float *out, const float *z, size_t B, size_t C, float T);

/* Softmax cross-entropy with integer labels, mean over the batch.
   If dz != NULL: dz += scale * dL/dz = scale * (softmax(z) - onehot(y)) / B.
   If n_correct != NULL it receives the number of rows whose argmax equals y. Returns the loss. */
double kdp_ce_loss(const float *z, const int32_t *y, size_t B, size_t C, float *dz, float scale,
                   size_t *n_correct);

/* T^2 * KL(q || softmax(z / T)), summed over classes, averaged over the batch (batchmean).
   q (B x C) is a probability distribution per row (treated as stop-gradient).
   If dz != NULL: dz += scale * T * (softmax(z/T) - q) / B. Returns the loss (times T^2). */
double kdp_kl_loss(const float *z, const float *q, size_t B, size_t C, float T, float *dz,
                   float scale);

/* Ramp-up weight w(e) = exp(-5 (1 - min(e / R, 1))^2), R <= 0 gives 1. */
double kdp_rampup(double epoch, double R);

#endif
