/* kd.h: the distillation math of every method on plain row buffers, behind one ops table (no MPI:
   the trainer feeds it with dist's collectives). The math: docs/kd-methods.md. */
#ifndef KDPEERS_KD_H
#define KDPEERS_KD_H

#include "kdpeers/common.h"

/* ===================================================================== losses (losses.c) */

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

/* T^2 KL(s_T(t) || s_T(z)) between two logit matrices (B x C), batchmean, with the gradients with
   respect to both (either may be NULL): dz += scale T (p - q) / B, dt += scale T q (l - k) / B,
   where q = s_T(t), p = s_T(z), l_c = log q_c - log p_c and k = the row's KL. */
double kdp_kl_logits(const float *t, const float *z, size_t B, size_t C, float T, float *dt,
                     float *dz, float scale);

/* Ramp-up weight w(e) = exp(-5 (1 - min(e / R, 1))^2), R <= 0 gives 1. */
double kdp_rampup(double epoch, double R);

/* Index of the first maximal entry of v[0..n) (0 when n is 0). The one argmax of kdpeers:
   accuracies, predicted labels and the CE's hit count all use it. */
size_t kdp_argmax(const float *v, size_t n);
/* Rows of z (B x C) whose argmax equals y. */
size_t kdp_count_hits(const float *z, const int32_t *y, size_t B, size_t C);

/* Probability-mean ensemble: out (B x C) = log(mean_j softmax(z_j)), z (P x B x C). */
void kdp_ensemble_logprob(float *out, const float *z, size_t P, size_t B, size_t C);

/* ---- numerical notes on the losses ----
 * All of them subtract the row max before exponentiating and accumulate in double, so logits of
 * +-80 (or more) stay finite. kdp_ce_loss returns NAN if a label is outside [0, C); the argmax
 * used for n_correct is kdp_argmax. kdp_kl_loss treats 0 log 0 as 0. */

/* ===================================================================== the method surface
 *
 * A step of every method, on one rank, is three parts (src/train/step.c runs them):
 *   1. gather (dist): the rows the method reads of every peer:
 *        - the peer term's rows: every peer's logits on this rank's own rows (peer_reads);
 *        - the module's rows: every peer's logits/features on this rank's row block of the batch
 *          (module_reads), row block w of a B-row batch on rank w of the module group;
 *   2. compute (kd, this file): ops->forward on the row block (the module's teachers), the peer
 *      term ops->peer_loss on the own rows, ops->backward on the row block;
 *   3. scatter (dist): every peer's rows of the module's gradients back to the ranks that hold
 *      them (and the teachers to their peers in between).
 * Losses are means over the whole B-row batch: a call on n rows multiplies every gradient by its
 * rows' share `scale` = n / B, so the sum over the calls is the whole batch's gradient.
 * ===================================================================================== */

#define KDP_KD_MAX_PEERS 64

/* The methods, in the order of the ops table (kd.c). */
typedef enum kdp_method {
  KDP_METHOD_INDEPENDENT = 0,
  KDP_METHOD_DML,
  KDP_METHOD_CODISTILL,
  KDP_METHOD_AVG,
  KDP_METHOD_ONE,
  KDP_METHOD_FFL,
  KDP_METHOD_OKDDIP,
  KDP_METHOD_KDCL,
  KDP_METHOD_PCL, /* issue 12: wired (run.ema_decay's copies are its mean teachers) */
  KDP_METHOD_MCL,
  KDP_METHOD_SWITOKD,
  KDP_METHOD_COUNT, /* the end of the methods kd.method accepts (kdp_method_parse/_at) */
  /* Staged methods would sit here: their math, ops and golden tests in src/kd, but not run by the
     trainer, so kdp_method_parse refuses them and only kdp_method_parse_staged (tests) accepts
     them. Wiring one in = moving it above KDP_METHOD_COUNT. None is staged today. */
  KDP_METHOD_END /* one past the last entry of the table */
} kdp_method;

/* What a method reads of every peer (bits of kdp_method_ops.peer_reads and .module_reads). */
enum {
  KDP_READS_LOGITS = 1u << 0,   /* z_j (B x C) */
  KDP_READS_FEATURES = 1u << 1, /* h_j (B x d_j): pooled penultimate features */
  KDP_READS_EMA_LOGITS = 1u << 2, /* z'_j (B x C): the logits of peer j's temporal mean (pcl) */
  KDP_READS_EMBEDDINGS = 1u << 3, /* v_j (B x E): peer j's embedding head's output (mcl) */
};

/* What a method differentiates besides each peer's own logits (kdp_method_ops.grads). */
enum {
  KDP_GRAD_TEACHER = 1u << 0,  /* the peers' teachers, back into the module */
  KDP_GRAD_FEATURES = 1u << 1, /* the peers' features h */
  KDP_GRAD_EMBEDDINGS = 1u << 2, /* every peer's embeddings v_j, from each peer term (mcl) */
  KDP_GRAD_LOGITS = 1u << 3, /* the peers' logits, from the module's backward (one's gate loss,
                                okddip without detach); without it the module's dz stays zero */
};

/* How the contributions of the peers to a reduced teacher are combined (kdcl): the op of the one
   MPI_Allreduce the trainer runs (MPI_SUM / MPI_MIN). */
typedef enum kdp_reduce_op { KDP_REDUCE_SUM = 0, KDP_REDUCE_MIN } kdp_reduce_op;

/* kdcl's ensemble teacher (kd.ensemble). */
typedef enum kdp_kdcl_ensemble {
  KDP_KDCL_NAIVE = 0, /* z_t = mean_j z_j */
  KDP_KDCL_MINLOGIT,  /* z_t[c] = min_j (z_j[c] - z_j[y]) */
  KDP_KDCL_GENERAL,   /* z_t = sum_j w_j z_j, w from the validation split (kdp_kdcl_general_weights) */
} kdp_kdcl_ensemble;

/* The weight decay of a module's parameters. */
typedef enum kdp_module_decay {
  KDP_DECAY_PEERS = 0, /* optim.weight_decay, as the peers */
  KDP_DECAY_MODULE,    /* kd.fusion_weight_decay (FFL gives its fusion module its own) */
} kdp_module_decay;

/* Static description of a cohort. */
typedef struct kdp_kd_spec {
  kdp_method method;
  size_t P;                       /* peers, 1..KDP_KD_MAX_PEERS */
  size_t C;                       /* classes */
  size_t dims[KDP_KD_MAX_PEERS];  /* d_j: feature dim of peer j (read when a method reads h) */
  int leader;                     /* okddip: leader peer; -1 = last (resolved to P-1) */
  int detach;                     /* okddip: 1 = stop-gradient through both teachers */
  size_t fusion_dim;              /* ffl: d_f; 0 = mean of the d_j (at least 1) */
  size_t proj_dim;                /* okddip: attention rank r; 0 = max(1, min_aux d_j / 8) */
  kdp_kdcl_ensemble ensemble;     /* kdcl: kd.ensemble */
  size_t embed_dim;               /* mcl: E, the embeddings' width; 0 = 128 */
  size_t embed_hidden;            /* mcl: the embedding heads' hidden width; 0 = 128 */
  float tau;                      /* mcl: contrastive temperature kd.tau; 0 = 0.07 */
  float contrast_weight;          /* mcl: lam_c = kd.contrast_weight, as given (0 is 0) */
  int teacher_peer;               /* switokd: the teacher peer kd.teacher_peer (0..P-1) */
} kdp_kd_spec;

typedef struct kdp_cohort kdp_cohort;

/* n rows of a B-row batch, for every peer in cohort order (what the gather delivers). */
typedef struct kdp_kd_rows {
  const float *z;   /* P x n x C logits, peer j at z + j n C; NULL when not read */
  const float *h;   /* P blocks (n x d_j) concatenated (kdp_cohort_feature_offset); NULL when
                       not read */
  const int32_t *y; /* n labels in [0, C) */
  size_t n;         /* rows; 0 is allowed (a rank whose row block is empty) */
  float T;          /* temperature > 0 */
  float weight;     /* effective KD weight lam * w(e) >= 0 */
  float scale;      /* the rows' share of the batch mean, n / B: multiplies every gradient */
  /* A module whose first layer is sharded by peer columns (kdp_cohort_col_width > 0): instead of
     h, the P peers' partial products of that layer on these rows (P x n x W, peer j's at
     part + j n W, from kdp_cohort_col_forward), summed by the module in peer order; backward
     then writes dpart (n x W), the gradient of their sum, for kdp_cohort_col_backward, in place
     of dh. NULL: the module reads h whole. */
  const float *part;
  float *dpart;
} kdp_kd_rows;

/* The peer term's input: peer i's own n rows. */
typedef struct kdp_kd_peer_in {
  const float *z;       /* peer i's logits (n x C) */
  const float *z_all;   /* peer_reads & KDP_READS_LOGITS: every peer's logits on these rows
                           (P x n x C, peer i's among them); else NULL */
  const float *teacher; /* a module's teacher for peer i on these rows (n x C); else NULL */
  const int32_t *y;
  size_t n;
  float T, weight, scale; /* as in kdp_kd_rows */
  int burn_in;            /* codistill: nonzero while step < kd.burn_in_steps (weight 0) */
  const float *z_ema;     /* peer_reads & KDP_READS_EMA_LOGITS: every peer's temporal mean's
                             logits on these rows (P x n x C); else NULL */
  const float *v_all;     /* peer_reads & KDP_READS_EMBEDDINGS: every peer's embeddings
                             (P x n x E); else NULL */
  float *dv_all;          /* OUTPUT when KDP_GRAD_EMBEDDINGS: += scale * dL_i/dv_j for every peer j
                             (P x n x E) */
  int expert;             /* switokd: nonzero in expert mode (kdp_switokd_mode of this step) */
} kdp_kd_peer_in;

/* Loss terms (means over the rows of the call). */
typedef struct kdp_kd_losses {
  double ce;              /* CE(z_i, y) */
  double kd;              /* the unweighted distillation term: T^2 KL(...) (mean over j != i for
                             dml) */
  double contrast;        /* mcl: the unweighted contrastive bracket (times kd.contrast_weight in
                             loss); else 0 */
  double loss;            /* L_i = ce + w_eff * kd (+ lam_c * contrast), w_eff = weight (0:
                             independent, burn-in) */
  double module_loss;     /* the module's own loss (one: L_gate, ffl: L_f), whole batch; else 0 */
  size_t n_correct;       /* argmax(z_i) == y */
  size_t teacher_correct; /* argmax(teacher) == y (kdp_cohort_objective) */
} kdp_kd_losses;

/* Sums n doubles over the ranks that hold the row blocks of one batch (a module's batchnorm
   statistics): every rank passes its blocks' sums and receives the batch's. NULL: the rows are
   the whole batch (one process). */
typedef struct kdp_kd_reduce {
  void (*sum)(void *ctx, double *buf, size_t n);
  void *ctx;
} kdp_kd_reduce;

/*
 * The ops table: everything kdpeers knows of a method. Adding a method is one file in src/kd,
 * one entry in the table (kd.c), its section in docs/kd-methods.md, its golden case and its
 * preset in configs/. The functions are called by kd.c's entry points below, which check their
 * inputs; a method without a module leaves setup ... teacher_eval NULL.
 */
typedef struct kdp_method_ops {
  const char *name;     /* kd.method */
  const char *teacher;  /* the method's own teacher in eval lines and /predict ("gate", "fused",
                           "leader"); NULL: none (the ensemble is reported for every method) */
  int min_peers;        /* the smallest cohort the method is defined for */
  unsigned peer_reads;  /* KDP_READS_*: what the peer term reads of every peer on its own rows */
  unsigned module_reads;/* KDP_READS_*: what the replicated module reads of every peer on its row
                           block; 0 = no module */
  int teacher_per_peer; /* module: 1 = a teacher per peer (P x n x C, sent back by all-to-all),
                           0 = one teacher for all (n x C, allgathered) */
  kdp_module_decay module_decay;
  int stale_ok;         /* the peer term reads only the peers' logits, so they may come from stale
                           local copies of the peers (kd.exchange = weights) */
  /* A teacher reduced over the peers (kdcl; NULL otherwise): peer j contributes
     contribute(c, j, z_j, y, n, out) (n x C; y may be NULL at evaluation), the trainer combines
     the contributions with one allreduce of reduce_op(c) and peer_loss reads the result as
     in->teacher. kdp_cohort_reduced_teacher is the same combination in one process. */
  void (*contribute)(const kdp_cohort *c, size_t j, const float *z, const int32_t *y, size_t n,
                     float *out);
  kdp_reduce_op (*reduce_op)(const kdp_cohort *c);
  /* Resolves the spec's defaults and declares the module: kdp_cohort_add_tensor /
     kdp_cohort_add_buffers in layout order, scratch from kdp_cohort_alloc (rows up to max_batch).
     Called once by kdp_cohort_create. */
  int (*setup)(kdp_cohort *c, kdp_kd_spec *s, kdp_error *err);
  /* PyTorch's default init of the module from rng (the same on every rank). */
  void (*init)(kdp_cohort *c, kdp_rng *rng);
  /* What the method differentiates besides each peer's own logits, KDP_GRAD_* bits (NULL:
     nothing): KDP_GRAD_TEACHER, the peers' teachers (okddip without detach: the peers' teacher
     gradients go back to the module's row blocks); KDP_GRAD_FEATURES, the peers' features (the
     module's input is not detached: ffl, okddip without detach); KDP_GRAD_LOGITS, the peers'
     logits from the module's backward (one, okddip without detach). */
  unsigned (*grads)(const kdp_cohort *c);
  /* Forward of the module on a row block: the teachers of its rows (teacher_per_peer:
     P x n x C, else n x C). train = 1: batch statistics summed over the blocks with red, running
     statistics updated once per call (identically on every rank); 0: eval mode (running
     statistics, red unused). */
  void (*forward)(kdp_cohort *c, const kdp_kd_rows *blk, int train, const kdp_kd_reduce *red,
                  float *teacher);
  /* The peer term L_i on peer i's own rows: dz (n x C) += scale * dL_i/dz_i and, when
     KDP_GRAD_TEACHER, dteacher (n x C) += scale * dL_i/dteacher. Required. */
  void (*peer_loss)(kdp_cohort *c, size_t i, const kdp_kd_peer_in *in, float *dz,
                    float *dteacher, kdp_kd_losses *out);
  /* Backward of the module on the row block of the last forward: the module's own loss (its
     gradients times blk->scale) and, when KDP_GRAD_TEACHER, the peers' dteacher (P x n x C, already
     scaled) into dz (P x n x C), dh (as blk->h) and the module's gradients, ACCUMULATED. Returns
     the module loss times blk->scale. */
  double (*backward)(kdp_cohort *c, const kdp_kd_rows *blk, const float *dteacher,
                     const kdp_kd_reduce *red, float *dz, float *dh);
  /* The method's own teacher in eval mode on n rows: out (n x C). NULL: the module's shared
     teacher, forward in eval mode. */
  void (*teacher_eval)(kdp_cohort *c, const kdp_kd_rows *blk, float *out);
  /* Sharding of the module's first layer by peer columns (ffl's fusion fc1 over concat_j h_j;
     NULL: not sharded). Its input's columns of peer j meet only peer j's features, so peer j
     computes their partial product on its own rows, col_forward: part (n x col_width) from h
     (n x d_j); the row block's owner sums the P partials (blk->part) and its backward returns
     their gradient (blk->dpart), which every peer takes back on its own rows, col_backward:
     peer j's columns of the weight's gradient += and dh (n x d_j) +=. */
  size_t (*col_width)(const kdp_cohort *c);
  void (*col_forward)(kdp_cohort *c, size_t j, const float *h, size_t n, float *part);
  void (*col_backward)(kdp_cohort *c, size_t j, const float *h, size_t n, const float *dpart,
                       float *dh);
} kdp_method_ops;

/* The table: the ops of method m (NULL outside the table); kdp_method_at(i) for i = 0, 1, ...
   until NULL (the config's list of kd.method values). */
const kdp_method_ops *kdp_method_ops_of(kdp_method m);
const char *kdp_method_at(size_t i);
/* "independent", "dml", ... (config kd.method). Unknown names fail with the list of known ones. */
int kdp_method_parse(const char *name, kdp_method *out, kdp_error *err);
const char *kdp_method_name(kdp_method m);
/* As kdp_method_parse, staged methods included (tests; the trainer does not run them yet). */
int kdp_method_parse_staged(const char *name, kdp_method *out, kdp_error *err);

/* ---------------------------------------------------------------- the cohort */

/*
 * Context for one cohort: the spec (defaults resolved), the method's ops, its replicated module
 * (one contiguous parameter arena, gradients in the same layout, non-trained buffers such as
 * running statistics) and scratch for calls of up to max_batch rows. No allocation per step.
 * Module layouts (D = sum_j d_j; BN momentum 0.1, eps 1e-5 as PyTorch):
 *   one:    gate.weight (P x D), gate.bias (P), gate_bn.weight (P), gate_bn.bias (P);
 *           buffers gate_bn.running_mean (P), gate_bn.running_var (P)
 *   ffl:    fusion.fc1.weight (d_f x D), fusion.fc1.bias (d_f), fusion.bn.weight (d_f),
 *           fusion.bn.bias (d_f), fusion.fc2.weight (C x d_f), fusion.fc2.bias (C);
 *           buffers fusion.bn.running_mean (d_f), fusion.bn.running_var (d_f)
 *   okddip: for each auxiliary peer j in cohort order (leader skipped):
 *           att.<j>.query.weight (r x d_j) = W_L^j, att.<j>.key.weight (r x d_j) = W_E^j
 * A module's input u (n x D) is concat_j h_j per row, in cohort order.
 */
int kdp_cohort_create(kdp_cohort **out, const kdp_kd_spec *spec, size_t max_batch,
                      kdp_error *err);
void kdp_cohort_free(kdp_cohort *c);
const kdp_kd_spec *kdp_cohort_spec(const kdp_cohort *c); /* with defaults resolved */
const kdp_method_ops *kdp_cohort_ops(const kdp_cohort *c);
size_t kdp_cohort_max_batch(const kdp_cohort *c);

/* How a module tensor's entries belong to the peers (for remapping a module to another cohort). */
typedef enum kdp_split {
  KDP_SPLIT_NONE = 0, /* not by peer */
  KDP_SPLIT_PEERS,    /* one entry per peer, cohort order (the gate's outputs) */
  KDP_SPLIT_FEATURES, /* one block of d_j per peer, cohort order (a module's input columns) */
} kdp_split;
typedef struct kdp_kd_tensor {
  char name[48];
  size_t off, size, rows, cols; /* row-major rows x cols at params + off */
  int owner;                    /* the peer the whole tensor belongs to, -1 = every peer */
  kdp_split row_split, col_split;
} kdp_kd_tensor;

/* PyTorch default init from rng: linear weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
   BN gamma 1, beta 0, running mean 0, var 1. Every rank uses the same seed and stream
   (KDP_STREAM_MODULE) so the replicas start identical. */
void kdp_cohort_module_init(kdp_cohort *c, kdp_rng *rng);
size_t kdp_cohort_module_n_params(const kdp_cohort *c); /* 0 for methods without a module */
float *kdp_cohort_module_params(kdp_cohort *c);
float *kdp_cohort_module_grads(kdp_cohort *c);
void kdp_cohort_module_zero_grad(kdp_cohort *c);
/* The parts of the module that a rank of peer j keeps current every step, as ranges [lo, hi) of
   the params' layout. A module sharded by peer columns (kdp_cohort_col_width > 0: ffl) splits its
   tensors of KDP_SPLIT_FEATURES columns (ffl's fc1 weight) by peer, since column block j meets only
   peer j's features:
     KDP_PART_SHARED:  every other tensor, replicated: its gradient is summed over every rank;
     KDP_PART_OWN:     peer j's column block of each sharded tensor (one range of d_j floats per
                       row): its gradient is complete on peer j's ranks, and only they update it;
     KDP_PART_SHARDED: the sharded tensors whole (the blocks of the other peers go stale on a rank
                       until they are gathered, kdp_pipeline_module_sync).
   Without such a module, SHARED is [0, n_params) and OWN and SHARDED are empty; j >= P: OWN is
   empty. Adjacent ranges are merged, in layout order. Writes at most max pairs (lo, hi) to lo_hi
   and returns the count (max = 0 sizes lo_hi). */
typedef enum kdp_module_part {
  KDP_PART_SHARED = 0,
  KDP_PART_OWN,
  KDP_PART_SHARDED
} kdp_module_part;
size_t kdp_cohort_module_ranges(const kdp_cohort *c, kdp_module_part part, size_t j,
                                size_t *lo_hi, size_t max);
/* Zeroes the gradient of peer j's parts, SHARED and OWN (what its step writes); j >= P: the
   whole gradient, as kdp_cohort_module_zero_grad. */
void kdp_cohort_module_zero_grad_of(kdp_cohort *c, size_t j);
size_t kdp_cohort_module_n_buffers(const kdp_cohort *c);
float *kdp_cohort_module_buffers(kdp_cohort *c);
size_t kdp_cohort_module_n_tensors(const kdp_cohort *c); /* params only, layout order */
const kdp_kd_tensor *kdp_cohort_module_tensor(const kdp_cohort *c, size_t i); /* NULL past end */
/* The module's buffer ranges (running statistics), layout order: offset, length and how the
   entries belong to the peers (a range is 1-d: KDP_SPLIT_PEERS = one entry per peer). -1 past
   the end. */
size_t kdp_cohort_module_n_buffer_ranges(const kdp_cohort *c);
int kdp_cohort_module_buffer_range(const kdp_cohort *c, size_t i, size_t *off, size_t *n,
                                   kdp_split *split);

/* Offset (in floats) of peer j's features inside the concatenated h of n rows: n * sum_{k<j} d_k;
   kdp_cohort_feature_floats: n * sum_j d_j (0 when the method reads no features). */
size_t kdp_cohort_feature_offset(const kdp_cohort *c, size_t j, size_t n);
size_t kdp_cohort_feature_floats(const kdp_cohort *c, size_t n);
/* 1 if the method writes nonzero dL/dh (ops->grads & KDP_GRAD_FEATURES: ffl; okddip without
   detach). */
int kdp_cohort_feature_grads(const kdp_cohort *c);
/* 1 if the peers' teachers are differentiated (ops->grads & KDP_GRAD_TEACHER). */
int kdp_cohort_teacher_grad(const kdp_cohort *c);
/* 1 if the module's backward writes the peers' logits' gradients (ops->grads & KDP_GRAD_LOGITS):
   else the pipeline sends no dz back from the module's row blocks. */
int kdp_cohort_logit_grads(const kdp_cohort *c);
/* Floats of the module's teachers for n rows: P n C (teacher_per_peer), n C, 0 without module. */
size_t kdp_cohort_teacher_floats(const kdp_cohort *c, size_t n);

/* Functions a method's file uses in ops->setup: declare the module in layout order, and scratch
   that lives as long as the cohort. kdp_cohort_add_tensor returns the tensor's offset. */
size_t kdp_cohort_add_tensor(kdp_cohort *c, const char *name, size_t rows, size_t cols, int owner,
                             kdp_split row_split, kdp_split col_split);
size_t kdp_cohort_add_buffers(kdp_cohort *c, size_t n, float value); /* value: at creation */
/* ... whose entries belong to the peers as split says (KDP_SPLIT_PEERS: one per peer) */
size_t kdp_cohort_add_buffers_split(kdp_cohort *c, size_t n, float value, kdp_split split);
void *kdp_cohort_alloc(kdp_cohort *c, size_t bytes); /* zeroed, 64-byte aligned */
float *kdp_cohort_falloc(kdp_cohort *c, size_t n);
void *kdp_cohort_state(kdp_cohort *c);               /* the method's own state */
void kdp_cohort_set_state(kdp_cohort *c, void *state);

/* ---------------------------------------------------------------- entry points (checked) */

/* The width W of the partial products of a module sharded by peer columns (ops->col_width); 0
   when the module is not. kdp_cohort_col_forward: peer j's partial product on its n own rows,
   part (n x W) from its features h (n x d_j); kdp_cohort_col_backward: from dpart (n x W) on
   the same rows, peer j's weight columns' gradient += and dh (n x d_j) +=. */
size_t kdp_cohort_col_width(const kdp_cohort *c);
int kdp_cohort_col_forward(kdp_cohort *c, size_t j, const float *h, size_t n, float *part,
                           kdp_error *err);
int kdp_cohort_col_backward(kdp_cohort *c, size_t j, const float *h, size_t n, const float *dpart,
                            float *dh, kdp_error *err);

/* ops->forward on a row block (blk->n may be 0; every rank of the module group calls it).
   teacher: kdp_cohort_teacher_floats(c, blk->n) floats. */
int kdp_cohort_module_forward(kdp_cohort *c, const kdp_kd_rows *blk, const kdp_kd_reduce *red,
                              float *teacher, kdp_error *err);
/* ops->peer_loss: peer i's term on its own rows. dteacher may be NULL unless
   kdp_cohort_teacher_grad. out may be NULL. */
int kdp_cohort_peer_loss(kdp_cohort *c, size_t i, const kdp_kd_peer_in *in, float *dz,
                         float *dteacher, kdp_kd_losses *out, kdp_error *err);
/* ops->backward after kdp_cohort_module_forward on the same block. dteacher: the peers' teacher
   gradients (P x n x C) when kdp_cohort_teacher_grad, else NULL; dz may be NULL unless
   kdp_cohort_logit_grads, dh unless kdp_cohort_feature_grads. *module_loss (may be NULL) receives the block's share. */
int kdp_cohort_module_backward(kdp_cohort *c, const kdp_kd_rows *blk, const float *dteacher,
                               const kdp_kd_reduce *red, float *dz, float *dh, double *module_loss,
                               kdp_error *err);
/* The method's reported teacher in eval mode on n rows: ops->teacher_eval, or for methods
   without a teacher the probability-mean ensemble log(mean_j softmax(z_j)). blk->z is required;
   blk->h when the module reads features. */
int kdp_cohort_teacher_eval_rows(kdp_cohort *c, const kdp_kd_rows *blk, float *teacher,
                                 kdp_error *err);

/* ---------------------------------------------------------------- the whole batch, one process */

/* One batch of B rows of the whole cohort (the single-process reference's input). */
typedef struct kdp_kd_batch {
  const float *z;     /* P x B x C logits, peer j at z + j*B*C */
  const float *h;     /* P blocks (B x d_j) concatenated; NULL unless the method reads features */
  const int32_t *y;   /* B labels in [0, C) */
  size_t B;           /* 1..max_batch */
  float T;            /* temperature > 0 */
  float weight;       /* effective KD weight lam * w(e) >= 0 */
  int burn_in;        /* codistill: nonzero while step < burn_in_steps (KD weight forced to 0) */
  const float *z_ema; /* pcl: every peer's temporal mean's logits (P x B x C) */
  const float *v;     /* mcl: every peer's embeddings (P x B x E) */
  float *dv;          /* mcl, OUTPUT: += dJ/dv (P x B x E) */
  int expert;         /* switokd: the step's mode (kdp_switokd_mode) */
} kdp_kd_batch;

/*
 * Reference (single process, the whole batch as one block): the total J = sum_i L_i + L_module
 * and its full gradients, ACCUMULATED into dz (P x B x C), dh (may be NULL when the method has no
 * feature gradients) and the module grads. per_peer (P entries) and total may be NULL. Runs the
 * module forward in train mode once (updates running stats). teacher (B x C, may be NULL)
 * receives the method's teacher: a shared module teacher from this forward (one: z_e, ffl: z_f),
 * else ops->teacher_eval (okddip: z_leader), else the probability-mean ensemble.
 * Stop-gradients follow docs/kd-methods.md.
 */
int kdp_cohort_objective(kdp_cohort *c, const kdp_kd_batch *in, float *dz, float *dh,
                         float *teacher, kdp_kd_losses *per_peer, double *total, kdp_error *err);

/* One peer's share of J over the whole batch, J_i = L_i + L_module / P (the module's terms
   scaled by 1/P), so that the sum over i of the shares is kdp_cohort_objective: the per-peer
   decomposition the golden tests check (tests/gen_kd_golden.py). The trainer does not use it. */
int kdp_cohort_step(kdp_cohort *c, size_t i, const kdp_kd_batch *in, float *dz, float *dh,
                    float *teacher, kdp_kd_losses *out, kdp_error *err);

/* Evaluation on a whole batch: kdp_cohort_teacher_eval_rows on B rows (h may be NULL unless the
   module reads features). */
int kdp_cohort_teacher_eval(kdp_cohort *c, const float *z, const float *h, size_t B,
                            float *teacher, kdp_error *err);

/* ===================================================================== the second generation
 * (issue 12; docs/kd-methods-gen2.md). Pure functions the trainer calls around the ops. */

/* ---- a teacher reduced over the peers (kdcl) ---- */

/* The allreduce op that combines the contributions (KDP_REDUCE_SUM for methods without any). */
kdp_reduce_op kdp_cohort_teacher_reduce_op(const kdp_cohort *c);
/* Peer j's contribution to the reduced teacher on n rows, out (n x C) from its logits z (n x C):
   kdcl naive z_j / P, general w_j z_j, minlogit z_j - z_j[y] (per row). y may be NULL except for
   minlogit. Fails for a method without a reduced teacher. */
int kdp_cohort_teacher_contribution(const kdp_cohort *c, size_t j, const float *z,
                                    const int32_t *y, size_t n, float *out, kdp_error *err);
/* The same reduction in one process, in peer order: out (n x C) from z_all (P x n x C). */
int kdp_cohort_reduced_teacher(const kdp_cohort *c, const float *z_all, const int32_t *y,
                               size_t n, float *out, kdp_error *err);

/* kdcl general: the ensemble weights w (P) from the peers' logits on the validation split, z_val
   (P x N x C), labels y (N): Q_jk = mean_n <e_j, e_k> with e_j = softmax(z_j) - onehot(y);
   x = (Q + 1e-6 I)^-1 1; w = x / sum(x); negative weights clipped to 0, the rest renormalised.
   Deterministic (double, fixed order): every rank that calls it on the same logits gets the same
   bits. */
int kdp_kdcl_general_weights(float *w, const float *z_val, const int32_t *y, size_t P, size_t N,
                             size_t C, kdp_error *err);
/* Installs w (P, >= 0, summing to 1) as the general teacher's weights. They live in the cohort's
   module buffers (1/P until the first evaluation), so checkpoints carry them. */
int kdp_kdcl_set_weights(kdp_cohort *c, const float *w, kdp_error *err);

/* ---- the temporal mean (pcl's peer mean teacher; run.ema_decay for any method) ---- */

/* a_t = min(1 - 1/(t + 1), decay); t >= 1 counts the optimizer steps done, this one included. */
double kdp_ema_rate(double decay, int64_t t);
/* ema = a_t ema + (1 - a_t) theta over n floats, after optimizer step t (parameters and batchnorm
   running statistics alike), in float as PyTorch's ema.mul_(a).add_(theta, alpha = 1 - a). */
void kdp_ema_update(float *ema, const float *theta, size_t n, double decay, int64_t t);
/* pcl's decay when run.ema_decay is 0 (unset): the paper's 0.999 */
#define KDP_PCL_EMA_DECAY 0.999

/* ---- mcl's embedding head, owned by one peer (its parameters are the peer's, not replicated):
   v = l2normalize(fc2(relu(fc1(x)))), x (n x d) the peer's features. Parameter layout:
   fc1.weight (hidden x d), fc1.bias (hidden), fc2.weight (E x hidden), fc2.bias (E). */
typedef struct kdp_embed_head kdp_embed_head;
int kdp_embed_head_create(kdp_embed_head **out, size_t d, size_t hidden, size_t E, size_t max_n,
                          kdp_error *err);
void kdp_embed_head_free(kdp_embed_head *h);
size_t kdp_embed_head_n_params(const kdp_embed_head *h);
/* PyTorch's default Linear init from rng. */
void kdp_embed_head_init(const kdp_embed_head *h, float *params, kdp_rng *rng);
/* v (n x E); keeps what backward needs (the last forward's rows). */
void kdp_embed_head_forward(kdp_embed_head *h, const float *params, const float *x, size_t n,
                            float *v);
/* From dv (n x E): dparams += and, when dx != NULL, dx (n x d) +=. */
void kdp_embed_head_backward(kdp_embed_head *h, const float *params, const float *x, size_t n,
                             const float *dv, float *dparams, float *dx);
/* E of an mcl cohort (spec.embed_dim resolved); 0 for other methods. */
size_t kdp_cohort_embed_dim(const kdp_cohort *c);

/* ---- switokd's mode ---- */

typedef struct kdp_switokd_gaps {
  double s;      /* mean_b ||softmax(z_s) - onehot(y)||_1, z_s the students' mean logits */
  double g_t;    /* mean_b ||softmax(z_t) - onehot(y)||_1 */
  double G;      /* mean_b ||softmax(z_t) - softmax(z_s)||_1 */
  double eps;    /* exp(-g_t / (g_t + s)) */
  double delta;  /* s - eps g_t */
  int expert;    /* G > delta and g_t < s */
} kdp_switokd_gaps;
/* The mode of a step from every peer's train-mode logits on the whole batch, z_all (P x n x C),
   teacher = kd.teacher_peer: 1 expert, 0 learning. Double, fixed order: identical on every rank
   that holds the same logits. out may be NULL. */
int kdp_switokd_mode(const float *z_all, const int32_t *y, size_t P, size_t n, size_t C,
                     size_t teacher, kdp_switokd_gaps *out);
/* The same in two halves, for a batch whose rows are spread over ranks (ranks_per_peer > 1):
   sums (3) = the row sums of ||softmax(z_s) - onehot||_1, ||softmax(z_t) - onehot||_1 and
   ||softmax(z_t) - softmax(z_s)||_1 over this rank's n rows; add them over the rows' ranks (one
   allreduce of 3 doubles, or gather them and add in a fixed order for bitwise agreement), then
   decide from the batch's sums and its row count. kdp_switokd_mode = sums + decide. */
void kdp_switokd_sums(const float *z_all, const int32_t *y, size_t P, size_t n, size_t C,
                      size_t teacher, double sums[3]);
int kdp_switokd_decide(const double sums[3], size_t n, kdp_switokd_gaps *out);
/* modes[k] for each of `steps` batches: z_seq (steps x P x n x C), y_seq (steps x n). */
void kdp_switokd_modes(int *modes, const float *z_seq, const int32_t *y_seq, size_t steps,
                       size_t P, size_t n, size_t C, size_t teacher);

/* ---- diversity of a cohort at an evaluation (T = 1), summed over evaluation batches ---- */

typedef struct kdp_diversity {
  size_t P, n;         /* peers, examples added */
  double kl_sum;       /* sum over examples and ordered pairs i != j of KL(p_i || p_j) */
  double disagree_sum; /* sum over examples and unordered pairs of [argmax p_i != argmax p_j] */
} kdp_diversity;
void kdp_diversity_init(kdp_diversity *d, size_t P);
/* Adds n examples: every peer's logits z_all (P x n x C). */
void kdp_diversity_add(kdp_diversity *d, const float *z_all, size_t n, size_t C);
/* Mean pairwise KL: mean over the examples and the P(P-1) ordered pairs (0 when P < 2 or empty). */
double kdp_diversity_kl(const kdp_diversity *d);
/* Disagreement: mean over the examples and the P(P-1)/2 pairs of the labels differing. */
double kdp_diversity_disagreement(const kdp_diversity *d);
/* Predicted labels (kdp_argmax per row) of n rows; churn: the fraction of the n examples whose
   label differs between two evaluations of one peer (0 when n is 0). */
void kdp_predicted_labels(int32_t *out, const float *z, size_t n, size_t C);
double kdp_churn(const int32_t *prev, const int32_t *cur, size_t n);

#endif
