/* kd_internal.h: what the method files of src/kd share: the cohort's fields, the methods' ops
   and the helpers of module.c (a module's input rows, its linear -> batchnorm -> relu layer). */
#ifndef KDPEERS_KD_INTERNAL_H
#define KDPEERS_KD_INTERNAL_H

#include "kdpeers/kd.h"

struct kdp_cohort {
  const kdp_method_ops *ops;
  kdp_kd_spec s;
  size_t maxB;
  size_t D;                             /* sum_j d_j (0 when no features are read) */
  size_t hoff[KDP_KD_MAX_PEERS + 1];    /* prefix sums of d_j */
  /* the module: params and grads in one layout, non-trained buffers */
  size_t n_params, n_buffers, n_tensors, cap_tensors;
  float *params, *grads, *buffers;
  kdp_kd_tensor *tensors;
  struct buffer_init { size_t off, n; float value; kdp_split split; } binit[8];
  size_t n_binit;
  /* memory that lives as long as the cohort (kdp_cohort_alloc) */
  void **allocs;
  size_t n_allocs, cap_allocs;
  void *state; /* the method's own state */
  /* kdp_cohort_objective's teachers and their gradients (P x maxB x C); the peer terms'
     scratch of the module methods (maxB x C) */
  float *tch, *dtch, *pq, *pg;
};

/* the ops of each method (one file each) */
extern const kdp_method_ops kdp_independent_ops, kdp_dml_ops, kdp_codistill_ops, kdp_avg_ops,
    kdp_one_ops, kdp_ffl_ops, kdp_okddip_ops, kdp_pcl_ops,
    /* staged (kd.h) */
    kdp_kdcl_ops, kdp_mcl_ops, kdp_switokd_ops;

/* ---- module.c ---- */

#define KD_BN_MOMENTUM 0.1f
#define KD_BN_EPS 1e-5f

/* A method's scratch of n floats each, for the cohort's life: *p = kdp_cohort_falloc(c, n) for
   every float **p of the NULL-terminated list (the per-peer projections' and the teachers'
   buffers of a module). */
void kd_falloc_each(kdp_cohort *c, size_t n, ...);

/* u (n x D) = concat_j h_j per row, h as in kdp_kd_rows (P blocks of n x d_j) */
void kd_concat_features(const kdp_cohort *c, float *u, const float *h, size_t n);
/* dh_j += the columns of du (n x D) that belong to peer j */
void kd_split_features(const kdp_cohort *c, float *dh, const float *du, size_t n);

/* linear(D -> H) -> batchnorm -> relu on a module's input u; the batchnorm's statistics are the
   whole batch's: each row block's sums are added over the blocks with a kdp_kd_reduce. */
typedef struct kd_hidden {
  size_t D, H;
  size_t o_w, o_b, o_gamma, o_beta, o_mean, o_var; /* params / buffers offsets */
  size_t total;                                    /* rows of the batch, from the last forward */
  float *a1, *xhat, *bno, *act, *dact, *dbno, *da1; /* maxB x H */
  float *mean, *invstd;                            /* H */
  double *sums;                                    /* 2H + 1 */
  double *shift;                                   /* H: the batchnorm sums' shift */
} kd_hidden;
/* declares "<lin>.weight" (H x D), "<lin>.bias", "<bn>.weight", "<bn>.bias" and the running
   statistics; out_split says how the H outputs belong to the peers */
void kd_hidden_setup(kdp_cohort *c, kd_hidden *L, const char *lin, const char *bn, size_t D,
                     size_t H, kdp_split out_split);
void kd_hidden_init(kdp_cohort *c, const kd_hidden *L, kdp_rng *rng);
/* act (n x H) from u; train: batch statistics summed with red, running stats updated */
void kd_hidden_forward(kdp_cohort *c, kd_hidden *L, const float *u, size_t n, int train,
                       const kdp_kd_reduce *red);
/* from L->dact: the layer's gradients and, when du != NULL, du (n x D, ACCUMULATED) */
void kd_hidden_backward(kdp_cohort *c, kd_hidden *L, const float *u, size_t n, float *du,
                        const kdp_kd_reduce *red);
/* The layer sharded by peer columns (its input u = concat_j h_j): peer j's partial product
   part (n x H) = h_j W_j^T from its features h (n x d_j), W_j its columns of the weight; the
   block's owner adds the bias and the P partials (P x n x H, peer order) and goes on through
   batchnorm -> relu (kd_hidden_forward_parts); backward_parts: the bias's gradient and dpart
   (n x H) = dL/da1 on the block; col_backward on peer j's rows: W_j's gradient += dpart^T h,
   dh (n x d_j) += dpart W_j. Together: kd_hidden_forward / _backward, summed in another order. */
void kd_hidden_col_forward(const kdp_cohort *c, const kd_hidden *L, size_t j, const float *h,
                           size_t n, float *part);
void kd_hidden_col_backward(kdp_cohort *c, const kd_hidden *L, size_t j, const float *h, size_t n,
                            const float *dpart, float *dh);
void kd_hidden_forward_parts(kdp_cohort *c, kd_hidden *L, const float *part, size_t n, int train,
                             const kdp_kd_reduce *red);
void kd_hidden_backward_parts(kdp_cohort *c, kd_hidden *L, size_t n, float *dpart,
                              const kdp_kd_reduce *red);
/* U(-1/sqrt(fan_in), 1/sqrt(fan_in)) */
void kd_fill_uniform(float *p, size_t n, size_t fan_in, kdp_rng *rng);

/* ---- peer.c: peer terms shared by the methods ---- */

/* dz += scale * src over n floats (the peer terms compute into scratch, then add their share) */
void kd_add_scaled(float *dz, const float *src, size_t n, float scale);
/* The end of a peer term computed into scratch g (n rows x C): dz += in->scale * g, and
   out->kd = kd, out->loss = out->ce + w kd. */
void kd_peer_done(float *dz, const float *g, size_t C, const kdp_kd_peer_in *in, float w,
                  double kd, kdp_kd_losses *out);
/* q (n x C) = mean over the peers j != skip (skip = -1: all) of s_T(z_j); probs (P x n x C) is
   scratch that receives every peer's s_T(z_j) */
void kd_mean_probs(float *q, float *probs, const float *z_all, size_t P, size_t n, size_t C,
                   float T, long skip);

/* mean over j != i of T^2 KL(sg s_T(t_j) || s_T(z_i)), t_all (P x n x C) every peer's teacher
   logits (dml: the peers' logits; pcl: their temporal means'); g (n x C) += w * its gradient with
   respect to z_i. 0 when P < 2. */
double kd_mean_kl_others(const float *t_all, const float *zi, size_t i, size_t P, size_t n,
                         size_t C, float T, float w, float *g);

/* The peer term against the mean of the peers' probabilities, q = mean_{j != skip} s_T(z_j)
   (codistill: skip = i; avg: skip = -1): L_i = CE(z_i, y) + w T^2 KL(sg q || s_T(z_i)).
   kd_mean_setup allocates its scratch as the method's state. */
int kd_mean_setup(kdp_cohort *c, kdp_kd_spec *s, kdp_error *err);
void kd_mean_peer_loss(kdp_cohort *c, const kdp_kd_peer_in *in, float *dz, long skip, float w,
                       kdp_kd_losses *out);
/* The peer term against a module's teacher, stop-gradient: L_i = CE(z_i, y) + w T^2
   KL(sg s_T(teacher) || s_T(z_i)) (one: z_e, ffl: z_f). An ops->peer_loss. */
void kd_sg_teacher_loss(kdp_cohort *c, size_t i, const kdp_kd_peer_in *in, float *dz,
                        float *dteacher, kdp_kd_losses *out);

/* ---- module.c: a softmax-weighted mix of logit rows (one's gate, okddip's attention) ----
   a = softmax(e) over m entries, t = sum_j a_j z_j (C classes); z[j] points at entry j's row.
   Backward: dz[j] += a_j dt, and de (m) = the gradient of e. */
void kd_softmax_mix(const double *e, size_t m, const float *const *z, size_t C, float *a,
                    float *t);
void kd_softmax_mix_backward(const float *a, size_t m, const float *const *z, float *const *dz,
                             const float *dt, size_t C, float *de);

#endif
