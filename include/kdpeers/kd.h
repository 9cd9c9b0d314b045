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

/* ---- numerical notes on the four functions above ----
 * All of them subtract the row max before exponentiating and accumulate in double, so logits of
 * +-80 (or more) stay finite. kdp_ce_loss returns NAN if a label is outside [0, C); the argmax
 * used for n_correct is the first maximal entry. kdp_kl_loss treats 0 log 0 as 0. */

/* =====================================================================================
 * Cohort API: everything one rank needs to compute an online-distillation method for a
 * cohort of P peers (see /work/shared/kd-methods.md for the math). MPI-free: the dist code
 * allgathers the peers' logits/features, calls kdp_cohort_step, reduce-scatters the
 * gradients it returns and sum-allreduces the module gradients.
 * ===================================================================================== */

#define KDP_KD_MAX_PEERS 64

typedef enum kdp_method {
  KDP_METHOD_INDEPENDENT = 0,
  KDP_METHOD_DML,
  KDP_METHOD_CODISTILL, /* logits mode; weights mode reuses it with locally computed logits */
  KDP_METHOD_AVG,
  KDP_METHOD_ONE,
  KDP_METHOD_FFL,
  KDP_METHOD_OKDDIP,
  KDP_METHOD_COUNT
} kdp_method;

/* "independent", "dml", ... (config kd.method). Unknown names fail with the list of known ones. */
int kdp_method_parse(const char *name, kdp_method *out, kdp_error *err);
const char *kdp_method_name(kdp_method m);
/* 1 if the method reads the peers' pooled features h (one, ffl, okddip). */
int kdp_method_uses_features(kdp_method m);

/* Static description of a cohort. */
typedef struct kdp_kd_spec {
  kdp_method method;
  size_t P;                       /* peers, 1..KDP_KD_MAX_PEERS */
  size_t C;                       /* classes */
  size_t dims[KDP_KD_MAX_PEERS];  /* d_j: feature dim of peer j (only read by one/ffl/okddip) */
  int leader;                     /* okddip: leader peer; -1 = last (resolved to P-1) */
  int detach;                     /* okddip: 1 = stop-gradient through both teachers */
  size_t fusion_dim;              /* ffl: d_f; 0 = mean of the d_j (at least 1) */
  size_t proj_dim;                /* okddip: attention rank r; 0 = max(1, min_aux d_j / 8) */
} kdp_kd_spec;

/*
 * Context for one cohort: the spec (defaults resolved), the replicated module (gate for one,
 * fusion head for ffl, attention projections for okddip; empty for the other methods) and
 * scratch for batches up to max_batch. No allocation happens per step.
 *
 * Module layouts (one contiguous param arena, grads in the same layout; D = sum_j d_j):
 *   one:    gate.weight (P x D), gate.bias (P), gate_bn.weight (P), gate_bn.bias (P)
 *           buffers: gate_bn.running_mean (P), gate_bn.running_var (P)
 *   ffl:    fusion.fc1.weight (d_f x D), fusion.fc1.bias (d_f), fusion.bn.weight (d_f),
 *           fusion.bn.bias (d_f), fusion.fc2.weight (C x d_f), fusion.fc2.bias (C)
 *           buffers: fusion.bn.running_mean (d_f), fusion.bn.running_var (d_f)
 *   okddip: for each auxiliary peer j in cohort order (leader skipped):
 *           att.<j>.query.weight (r x d_j) = W_L^j, att.<j>.key.weight (r x d_j) = W_E^j; no bias
 * BN: momentum 0.1, eps 1e-5 (PyTorch defaults). The gate/fusion input u (B x D) is
 * concat_j h_j per sample, in cohort order.
 */
typedef struct kdp_cohort kdp_cohort;

int kdp_cohort_create(kdp_cohort **out, const kdp_kd_spec *spec, size_t max_batch,
                      kdp_error *err);
void kdp_cohort_free(kdp_cohort *c);
const kdp_kd_spec *kdp_cohort_spec(const kdp_cohort *c); /* with defaults resolved */

/* PyTorch default init from rng: linear weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
   BN gamma 1, beta 0, running mean 0, var 1. Every rank must use the same seed and stream
   (KDP_STREAM_MODULE) so the replicas start identical. */
void kdp_cohort_module_init(kdp_cohort *c, kdp_rng *rng);
size_t kdp_cohort_module_n_params(const kdp_cohort *c); /* 0 for methods without a module */
float *kdp_cohort_module_params(kdp_cohort *c);
float *kdp_cohort_module_grads(kdp_cohort *c);
void kdp_cohort_module_zero_grad(kdp_cohort *c);
size_t kdp_cohort_module_n_buffers(const kdp_cohort *c); /* BN running stats (one, ffl) */
float *kdp_cohort_module_buffers(kdp_cohort *c);
size_t kdp_cohort_module_n_tensors(const kdp_cohort *c);  /* params only, layout order */
const char *kdp_cohort_module_tensor_name(const kdp_cohort *c, size_t i);
size_t kdp_cohort_module_tensor_offset(const kdp_cohort *c, size_t i);
size_t kdp_cohort_module_tensor_size(const kdp_cohort *c, size_t i);

/* Offset (in floats) of peer j's features inside the concatenated h for batch B:
   B * sum_{k<j} d_k. kdp_cohort_feature_floats gives the total B * sum_j d_j. */
size_t kdp_cohort_feature_offset(const kdp_cohort *c, size_t j, size_t B);
size_t kdp_cohort_feature_floats(const kdp_cohort *c, size_t B);
/* 1 if kdp_cohort_step can write nonzero dL/dh (ffl; okddip without detach), so the dist code
   must reduce-scatter dh. */
int kdp_cohort_feature_grads(const kdp_cohort *c);

/* One step's inputs, all in cohort order. */
typedef struct kdp_kd_batch {
  const float *z;     /* P x B x C logits, peer j at z + j*B*C */
  const float *h;     /* P blocks (B x d_j) concatenated; NULL unless the method uses features */
  const int32_t *y;   /* B labels in [0, C) */
  size_t B;           /* 1..max_batch */
  float T;            /* temperature > 0 */
  float weight;       /* effective KD weight lam * w(e) >= 0 */
  int burn_in;        /* codistill: nonzero while step < burn_in_steps (KD weight forced to 0) */
} kdp_kd_batch;

/* Loss terms (all means over the batch). */
typedef struct kdp_kd_losses {
  double ce;            /* CE(z_i, y) */
  double kd;            /* the unweighted distillation term: T^2 KL(...) (mean over j != i for dml) */
  double loss;          /* L_i = ce + w_eff * kd, w_eff = weight (0 for independent, codistill burn-in) */
  double module_loss;   /* one: L_gate = CE(z_e, y); ffl: L_f (with its weighted KL); else 0 */
  size_t n_correct;     /* argmax(z_i) == y */
  size_t teacher_correct; /* argmax(teacher) == y */
} kdp_kd_losses;

/*
 * This rank's share of the global objective  J = sum_i L_i + L_module  (L_module = L_gate for one,
 * L_f for ffl, else 0), for peer i. Runs the module forward in TRAIN mode (batch statistics;
 * updates the BN running stats once per call: every replica sees the same allgathered input, so
 * the replicas' running stats stay identical).
 *
 * The share is  J_i = L_i + L_module / P : every rank computes L_module identically and
 * contributes 1/P of its gradients. Therefore, summed over the P ranks:
 *   - dz (P x B x C), ACCUMULATED: dJ_i/dz_j for every peer j. The reduce-scatter (sum) of block j
 *     over ranks gives peer j its true gradient dJ/dz_j.
 *   - dh (kdp_cohort_feature_floats floats, same layout as h), ACCUMULATED: dJ_i/dh_j. May be NULL
 *     unless kdp_cohort_feature_grads(c). Reduce-scatter (sum) likewise.
 *   - module grads (kdp_cohort_module_grads), ACCUMULATED: dJ_i/dtheta. They must be SUMMED over
 *     the cohort (not averaged): for okddip each rank holds only its own loss's contribution, for
 *     one/ffl each rank holds 1/P of the module loss's gradient.
 * teacher (B x C) may be NULL (then out->teacher_correct is 0 and no teacher is computed: the
 * probability-mean ensemble costs P*C exps per row); it receives the method's teacher logits:
 *   one: z_e (gated ensemble), ffl: z_f (fused head), okddip: z_leader,
 *   others: log(mean_j softmax(z_j)) (the probability-mean ensemble, T = 1).
 * out may be NULL. Returns 0 or KDP_EINVAL (bad i, B, T, weight, missing h or dh).
 * Stop-gradients follow kd-methods.md: dml/codistill/avg/one/ffl peer teachers are sg; the gate
 * input is sg(h); the fusion input is not; okddip detaches nothing unless spec.detach.
 */
int kdp_cohort_step(kdp_cohort *c, size_t i, const kdp_kd_batch *in, float *dz, float *dh,
                    float *teacher, kdp_kd_losses *out, kdp_error *err);

/*
 * Reference (single process): the total J = sum_i L_i + L_module and its full gradients, ACCUMULATED
 * into dz, dh (may be NULL when no feature grads) and the module grads. per_peer (P entries) may be
 * NULL; total receives J. Runs the module forward in train mode once (updates running stats).
 */
int kdp_cohort_objective(kdp_cohort *c, const kdp_kd_batch *in, float *dz, float *dh,
                         float *teacher, kdp_kd_losses *per_peer, double *total, kdp_error *err);

/*
 * Evaluation: the method's teacher logits (B x C) in EVAL mode (BN running stats), same choice as
 * kdp_cohort_step's teacher. z (P x B x C), h as in kdp_kd_batch (NULL unless one/ffl).
 * B may be at most max_batch.
 */
int kdp_cohort_teacher_eval(kdp_cohort *c, const float *z, const float *h, size_t B,
                            float *teacher, kdp_error *err);

/* Probability-mean ensemble: out (B x C) = log(mean_j softmax(z_j)), z (P x B x C). */
void kdp_ensemble_logprob(float *out, const float *z, size_t P, size_t B, size_t C);

#endif
